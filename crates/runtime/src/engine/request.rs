//! What a caller submits ([`Request`]) and what comes back ([`Event`]), and what the engine
//! says about the model it serves ([`ModelInfo`]).

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value as Json;

use crate::chat_template::RenderOptions;
use crate::generate::{GenerateOptions, GenerationOutput, TokenEvent};
use crate::sampling::{PromptTokenLogprob, SamplingParams};

/// A prompt: plain text (tokenized as is, no template), chat messages (through the model's chat
/// template; a message's `content` is a string or a list of OpenAI / transformers content parts,
/// and a vision-language model takes image parts: see [`crate::vision::chat_images`]), or token
/// ids.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Json>),
    Ids(Vec<u32>),
}

impl Prompt {
    /// The request field the prompt came in (for errors): `messages` or `prompt`.
    pub fn field(&self) -> &'static str {
        match self {
            Prompt::Chat(_) => "messages",
            Prompt::Text(_) | Prompt::Ids(_) => "prompt",
        }
    }
}

/// One generation: the prompt, what to generate, and how chat messages are rendered.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Prompt,
    pub options: GenerateOptions,
    /// Chat-template arguments (only read for [`Prompt::Chat`]).
    pub render: RenderOptions,
    /// vLLM's `cache_salt`: the prefix cache shares KV only between requests with the same salt
    /// (None: between requests without one), so that a tenant cannot tell from its time to first
    /// token what another tenant's prompts hold. Not empty.
    pub cache_salt: Option<String>,
}

impl Request {
    /// `prompt` with the default options (256 tokens at most, sampling at temperature 1) and a
    /// generation prompt after chat messages.
    pub fn new(prompt: Prompt) -> Self {
        Request { prompt, options: GenerateOptions::default(), render: RenderOptions::generation(), cache_salt: None }
    }

    pub fn with_options(mut self, options: GenerateOptions) -> Self {
        self.options = options;
        self
    }

    pub fn with_render(mut self, render: RenderOptions) -> Self {
        self.render = render;
        self
    }

    pub fn with_cache_salt(mut self, salt: impl Into<String>) -> Self {
        self.cache_salt = Some(salt.into());
        self
    }
}

/// What a request's handle yields: `PromptLogprobs` once its prompt is prefilled when the
/// request asked for them ([`GenerateOptions::prompt_logprobs`]), one `Token` per generated
/// token (and possibly one last `Token` with [`TEXT_TAIL_TOKEN`](crate::generate::TEXT_TAIL_TOKEN)
/// for text held back until the end), then `Finished` with the whole output. Errors end the
/// stream instead.
#[derive(Clone, Debug)]
pub enum Event {
    /// Each prompt position's logprob (None for the first), before the first token.
    PromptLogprobs(Vec<Option<PromptTokenLogprob>>),
    Token(TokenEvent),
    Finished(GenerationOutput),
}

/// The model an engine serves and how the engine was sized.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// The name clients use (the graph's name unless configured).
    pub served_name: String,
    pub graphs: PathBuf,
    pub architecture: String,
    pub precision: String,
    pub execution_provider: String,
    /// The graph's context length.
    pub context_length: usize,
    /// Tokens one sequence can hold (prompt plus generated): each slot's capacity.
    pub max_model_len: usize,
    /// Sequences the KV pool holds at once.
    pub max_seqs: usize,
    /// Bytes of the KV pool (every slot).
    pub kv_cache_bytes: u64,
    /// Prompt tokens prefilled per engine step at most while sequences decode.
    pub prefill_budget: usize,
    /// Prompt tokens prefilled per engine step at most when no sequence decodes.
    pub idle_prefill_budget: usize,
    /// Prompt tokens of one sequence prefilled per engine step at most while sequences decode,
    /// outside catch-up steps and steps where two or more long prompts could prefill (None: only
    /// the prefill budget).
    pub long_prefill_token_threshold: Option<usize>,
    /// Prefill pacing's factor: while sequences decode, a step takes at most this times a
    /// decode-only step (None: off).
    pub itl_factor: Option<f64>,
    /// Catch-up prefill: prompts to prefill at or above this times the decoding sequences get the
    /// idle budget in one step (None: off).
    pub waiting_served_ratio: Option<f64>,
    /// Whether KV is reused across requests.
    pub prefix_caching: bool,
    /// Decode batch sizes with a captured CUDA graph (empty: no CUDA graphs).
    pub cuda_graph_batch_sizes: Vec<usize>,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// Sampling from the checkpoint's generation_config.json (greedy where it says so).
    pub default_sampling: SamplingParams,
    pub has_tokenizer: bool,
    pub has_chat_template: bool,
    /// Whether chat messages may carry images (a vision-language export).
    pub takes_images: bool,
}
