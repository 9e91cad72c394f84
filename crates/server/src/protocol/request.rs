//! The requests, checked and typed: what [`crate::parse`] makes of a body, before the model is
//! consulted (the served name, the sampling defaults and the context are applied by
//! [`crate::convert`]).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value as Json};

/// A chat message's author. `developer` (OpenAI's newer name for system instructions) reaches
/// the chat template as `system`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The role the chat template sees.
    pub fn template_name(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One part of a message's content.
#[derive(Clone, Debug, PartialEq)]
pub enum ContentPart {
    Text(String),
    /// An image by URL (or `data:` URL). Parsed so that a model with a vision encoder can take
    /// it; the text models served today refuse it by name.
    ImageUrl {
        url: String,
        detail: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: Role,
    /// None only for an assistant message that carries `tool_calls`.
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<Json>>,
    pub tool_call_id: Option<String>,
    pub reasoning_content: Option<String>,
}

/// `/v1/completions`' prompt: text (no chat template) or token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum CompletionPrompt {
    Text(String),
    Ids(Vec<u32>),
}

impl CompletionPrompt {
    pub fn is_empty(&self) -> bool {
        match self {
            CompletionPrompt::Text(t) => t.is_empty(),
            CompletionPrompt::Ids(ids) => ids.is_empty(),
        }
    }
}

/// Sampling values the request sets; the rest come from the checkpoint's generation config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0: off.
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    /// OpenAI's `logit_bias` (empty: none).
    pub logit_bias: BTreeMap<u32, f32>,
}

/// How a streamed answer is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSettings {
    /// `stream_options.include_usage`: a last chunk with the usage (and `"usage": null` in the
    /// others).
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats` (vLLM's, with `include_usage`): every chunk of a
    /// choice carries that choice's usage so far (its prompt, its tokens until then).
    pub continuous_usage: bool,
}

/// What both endpoints ask of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    /// The model the client names (None: the served one).
    pub model: Option<String>,
    /// At least 1, or 0 with `echo` (the prompt alone, as vLLM answers it); None: the rest of
    /// the sequence.
    pub max_tokens: Option<usize>,
    /// The field `max_tokens` came in (`max_tokens` or `max_completion_tokens`), for errors.
    pub max_tokens_field: &'static str,
    pub sampling: SamplingOverrides,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// vLLM's: only these ids may be generated (None: any).
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's `cache_salt` (not empty): prefix-cache hits only between requests with the same salt.
    pub cache_salt: Option<String>,
    /// vLLM's: words never generated.
    pub bad_words: Vec<String>,
    /// vLLM's: the prompt's last N tokens only (None: all of it).
    pub truncate_prompt_tokens: Option<PromptTruncation>,
    /// vLLM's: no stop before this many tokens.
    pub min_tokens: usize,
    /// vLLM's: the text ends with the stop string that ended it.
    pub include_stop_str_in_output: bool,
    /// None: one JSON answer.
    pub stream: Option<StreamSettings>,
    /// Each token's logprob with this many alternatives (None: no logprobs).
    pub logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs`: each prompt token's logprob with this many alternatives (not
    /// while streaming, as in vLLM).
    pub prompt_logprobs: Option<usize>,
    /// Completions' `echo`: the answer's text (and logprobs) start with the prompt's.
    pub echo: bool,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    /// vLLM's `return_token_ids`: the prompt's and the answer's token ids in the response.
    pub return_token_ids: bool,
    /// vLLM's `return_tokens_as_token_ids`: logprobs spell tokens `token_id:ID` instead of their
    /// text.
    pub return_tokens_as_token_ids: bool,
    /// OpenAI's `n`: choices to generate, each from the same prompt (1 to
    /// [`MAX_CHOICES`](crate::parse::MAX_CHOICES)).
    pub n: usize,
    /// The answer's constraint (a JSON schema, a regex, ...) and the field it came in.
    pub structured: Option<crate::structured::Structured>,
}

impl GenerationParams {
    /// `echo` with `max_tokens: 0`: the answer is the prompt alone (the one token the engine
    /// generates for it is not returned).
    pub fn echo_only(&self) -> bool {
        self.echo && self.max_tokens == Some(0)
    }

    /// The alternatives per prompt position the engine must score: `prompt_logprobs`, or
    /// `logprobs` when the prompt is echoed with its logprobs (None: none).
    pub fn prompt_scores(&self) -> Option<usize> {
        let echoed = self.logprobs.filter(|_| self.echo);
        match (self.prompt_logprobs, echoed) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// vLLM's `truncate_prompt_tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptTruncation {
    /// The last N tokens (N >= 1).
    Last(usize),
    /// -1: as many as one sequence holds.
    ToContext,
}

/// Chat-template arguments a chat request may set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TemplateArgs {
    pub add_generation_prompt: bool,
    /// vLLM's (transformers'): the prompt ends with the final message's text, left open, so the
    /// answer continues it (an assistant reply the client began). Not with `add_generation_prompt`.
    pub continue_final_message: bool,
    pub enable_thinking: Option<bool>,
    /// vLLM's `documents`: objects the template reads as `documents` (None: none given).
    pub documents: Option<Vec<Json>>,
    /// `chat_template_kwargs` besides `enable_thinking`.
    pub extra: Map<String, Json>,
}

/// `tool_choice`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model may call the tools; calls in its answer are parsed.
    #[default]
    Auto,
    /// The tools are shown to the model (the template renders them, as vLLM does), and its
    /// answer is text.
    None,
    /// One call or more, of any of the tools, forced by constrained decoding
    /// ([`crate::forced_calls`]).
    Required,
    /// One call of this function (one of the request's tools), forced by constrained decoding.
    Function(String),
}

/// A checked `/v1/chat/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatCompletionRequest {
    /// Not empty.
    pub messages: Vec<ChatMessage>,
    /// `{"type": "function", "function": {"name", ...}}` each, as the client sent them (the
    /// chat template's `tools`); empty when none.
    pub tools: Vec<Json>,
    pub tool_choice: ToolChoice,
    /// `parallel_tool_calls` (default true); false: at most one tool call in an answer.
    pub parallel_tool_calls: bool,
    pub template: TemplateArgs,
    pub params: GenerationParams,
}

/// A checked `/v1/completions` body.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    /// One or more (OpenAI's batch form), all of one kind; each is answered with `n` choices.
    pub prompts: Vec<CompletionPrompt>,
    pub params: GenerationParams,
}
