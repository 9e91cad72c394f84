//! The engine's errors: what a caller did wrong (named by field), what the engine cannot take
//! now, and what failed underneath (with its cause chain).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// Errors at the engine's boundary. Cheap to clone: a failed batched step reports the same cause
/// to every request in it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    /// A request the engine cannot take as written. `field` names it as OpenAI's API does
    /// (`prompt`, `messages`, `max_tokens`, `temperature`, `stop`, `top_logprobs`, ...); `part`,
    /// when the error is about one content part of a message, names that part
    /// (`messages[1].content[0].image_url`).
    #[error("invalid request: `{}`: {message}", part.as_deref().unwrap_or(field))]
    InvalidRequest {
        field: &'static str,
        part: Option<String>,
        message: String,
        #[source]
        source: Option<Arc<dyn StdError + Send + Sync>>,
    },
    /// The prompt, plus `max_tokens` when given, does not fit one sequence.
    #[error("{}", context_length_message(*prompt_tokens, *max_tokens, *limit))]
    ContextLength {
        prompt_tokens: usize,
        /// None: the request asked for no maximum, and the prompt leaves no room for one token.
        max_tokens: Option<usize>,
        /// Tokens one sequence can hold: the graph's context length or the engine's
        /// `max_model_len`, whichever is smaller.
        limit: usize,
    },
    /// The admission queue is full.
    #[error(
        "the engine is overloaded: {waiting} requests are waiting for a sequence slot (at most {limit}); retry later"
    )]
    Overloaded { waiting: usize, limit: usize },
    /// The request was cancelled before it finished.
    #[error("the request was cancelled")]
    Cancelled,
    /// The engine was shut down (or its worker stopped) before the request finished.
    #[error("the engine has shut down")]
    Shutdown,
    /// A setting the engine cannot start with, or a KV cache that does not fit.
    #[error("engine setting `{setting}`: {message}")]
    Config { setting: &'static str, message: String },
    /// The model or ONNX Runtime failed; `source` keeps the cause chain.
    #[error("{context}")]
    Model {
        context: String,
        #[source]
        source: Arc<ModelFailure>,
    },
}

fn context_length_message(prompt: usize, max_tokens: Option<usize>, limit: usize) -> String {
    match max_tokens {
        Some(n) => format!(
            "the prompt has {prompt} tokens and max_tokens is {n}: {} tokens in all, but a sequence holds at most {limit}",
            prompt + n
        ),
        None => format!(
            "the prompt has {prompt} tokens, but a sequence holds at most {limit} (leave room for at least one generated token)"
        ),
    }
}

impl EngineError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        EngineError::InvalidRequest { field, part: None, message: message.into(), source: None }
    }

    pub(crate) fn invalid_because(
        field: &'static str,
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        EngineError::InvalidRequest { field, part: None, message: message.into(), source: Some(Arc::new(source)) }
    }

    /// A chat message's content part (an image) the engine cannot take.
    pub(crate) fn content(error: crate::vision::ContentError) -> Self {
        let crate::vision::ContentError { part, message, source } = error;
        EngineError::InvalidRequest {
            field: "messages",
            part: Some(part),
            message,
            source: source.map(|s| -> Arc<dyn StdError + Send + Sync> { Arc::from(s) }),
        }
    }

    /// A failure underneath the engine (a tokenizer, ONNX Runtime, the model layer) with `source` as its cause.
    pub(crate) fn model_failed(
        context: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        EngineError::Model { context: context.into(), source: Arc::new(ModelFailure(source.into())) }
    }

    pub(crate) fn config(setting: &'static str, message: impl Into<String>) -> Self {
        EngineError::Config { setting, message: message.into() }
    }
}

/// A failure of the worker's model runner (`runner.rs`, `images.rs`): of the model layer, a
/// KV or image-row copy, an image's encoding, or the runner's own bookkeeping. The worker
/// reports it to the requests as [`EngineError::Model`] with this as the cause.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunnerError {
    #[error(transparent)]
    Model(#[from] crate::model_error::ModelError),
    /// A copy of KV or image rows (`what`) failed or could not run.
    #[error("{what}")]
    Copy {
        what: &'static str,
        #[source]
        source: crate::cuda_rt::CudaError,
    },
    #[error(transparent)]
    Image(#[from] super::images::ImageEncodeError),
    /// A prompt with images reached a model that has no vision encoder.
    #[error("a prompt with images on a model without a vision encoder")]
    NoVisionEncoder,
    /// The runner's own bookkeeping (the prefix cache, rows run apart) disagrees with itself.
    #[error("{0}")]
    Bookkeeping(String),
}

/// A failure reported by the model layer (`crate::model`, ONNX Runtime, the tokenizer): its
/// message, with the causes underneath as the [`source`](StdError::source) chain.
pub struct ModelFailure(Box<dyn StdError + Send + Sync + 'static>);

impl fmt::Debug for ModelFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for ModelFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for ModelFailure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(err: &dyn StdError) -> Vec<String> {
        let mut chain = vec![err.to_string()];
        let mut source = err.source();
        while let Some(e) = source {
            chain.push(e.to_string());
            source = e.source();
        }
        chain
    }

    #[test]
    fn a_model_failure_keeps_its_cause_chain() {
        let cuda = crate::model_error::CudaError::Call { call: "cudaMemcpy to the host", code: 700 };
        let err = EngineError::model_failed(
            "the decode step failed",
            crate::model_error::ModelError::from(cuda).context("reading logits"),
        );
        assert_eq!(
            chain(&err),
            ["the decode step failed", "reading logits", "cudaMemcpy to the host failed (cudaError 700)"]
        );
    }

    #[test]
    fn a_typed_cause_is_kept_as_it_is() {
        let io = std::io::Error::other("the disk is gone");
        let err = EngineError::model_failed("detokenizing a generated token", io);
        assert_eq!(chain(&err), ["detokenizing a generated token", "the disk is gone"]);
        let EngineError::Model { source, .. } = &err else { panic!("{err:?}") };
        assert!(source.0.downcast_ref::<std::io::Error>().is_some(), "the io::Error itself, not its text");
    }

    #[test]
    fn context_length_errors_give_the_numbers() {
        let err = EngineError::ContextLength { prompt_tokens: 20, max_tokens: Some(8), limit: 16 };
        let text = err.to_string();
        assert!(text.contains("20") && text.contains("28") && text.contains("16"), "{text}");
        let err = EngineError::ContextLength { prompt_tokens: 16, max_tokens: None, limit: 16 };
        assert!(err.to_string().contains("at least one generated token"), "{err}");
    }
}
