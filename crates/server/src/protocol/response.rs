//! The responses, in OpenAI's shapes: `chat.completion`, `chat.completion.chunk`,
//! `text_completion`, `usage`, both endpoints' logprobs, and `/v1/models`' list. vLLM's
//! `token_ids` / `prompt_token_ids` appear when the request sets `return_token_ids`.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Absent in a stream's running usage (`continuous_usage_stats`), where the cache hits are
    /// not known yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl From<pio_runtime::generate::Usage> for Usage {
    fn from(u: pio_runtime::generate::Usage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: u.cached_tokens }),
        }
    }
}

impl Usage {
    /// The usage of a request's choices, from each one's in index order, `per_prompt` (`n`) of
    /// each prompt in turn, as vLLM counts it: each prompt once, the completions summed. A
    /// prompt's cached tokens are its first choice's: its choices share the prompt, and what
    /// later ones find cached may be the KV the first one just computed, which saved the client
    /// nothing.
    pub fn of_choices(choices: impl IntoIterator<Item = pio_runtime::generate::Usage>, per_prompt: usize) -> Self {
        let mut usage = Usage::default();
        let mut cached_tokens = 0;
        for (i, choice) in choices.into_iter().enumerate() {
            if i % per_prompt.max(1) == 0 {
                usage.prompt_tokens += choice.prompt_tokens;
                usage.total_tokens += choice.prompt_tokens;
                cached_tokens += choice.cached_tokens;
            }
            usage.completion_tokens += choice.completion_tokens;
            usage.total_tokens += choice.completion_tokens;
        }
        usage.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens });
        usage
    }
}

/// `usage` of a response or chunk: absent (a stream without `include_usage`), `null` (the
/// other chunks of a stream with it), or the numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageField {
    Absent,
    Null,
    Usage(Usage),
}

impl UsageField {
    fn is_absent(&self) -> bool {
        matches!(self, UsageField::Absent)
    }
}

impl Serialize for UsageField {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UsageField::Absent | UsageField::Null => s.serialize_none(),
            UsageField::Usage(u) => u.serialize(s),
        }
    }
}

/// One alternative token with its logprob (chat).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's bytes (a token can be part of a UTF-8 character, which `token` cannot show).
    pub bytes: Vec<u8>,
}

/// One generated token's logprob (chat).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// Chat's `logprobs`: `{"content": [...]}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

/// Completions' `logprobs`: parallel lists, one entry per token (with `echo`, the prompt's
/// first: its first token has `null` for its logprob and alternatives).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<TopLogprobMap>>,
    /// Where each token starts in the completion's text, in characters.
    pub text_offset: Vec<usize>,
}

/// A JSON object whose keys keep the order they were pushed in (serde_json's map sorts them):
/// alternatives most likely first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrderedMap<K, V>(pub Vec<(K, V)>);

impl<K: Serialize, V: Serialize> Serialize for OrderedMap<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// The alternatives of one token as `{token: logprob}`, most likely first.
pub type TopLogprobMap = OrderedMap<String, f32>;

/// One token of vLLM's `prompt_logprobs`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptLogprob {
    pub logprob: f32,
    /// 1 for the most likely token.
    pub rank: usize,
    pub decoded_token: String,
}

/// One prompt position of vLLM's `prompt_logprobs`: `{token id: {logprob, rank,
/// decoded_token}}` for the prompt's token and the most likely ones, in that order (JSON keys
/// are strings: serde writes the ids as such).
pub type PromptLogprobMap = OrderedMap<u32, PromptLogprob>;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// None (`null`) only when the answer is tool calls and no text.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// The function a tool call calls: its name and its arguments, a JSON object serialized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// One of an answer's `tool_calls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ToolCall {
    /// `call_` and 24 random letters and digits.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

impl From<crate::tool_calls::ToolCall> for ToolCall {
    fn from(call: crate::tool_calls::ToolCall) -> Self {
        ToolCall {
            id: crate::tool_calls::call_id(),
            kind: "function",
            function: FunctionCall { name: call.name, arguments: call.arguments },
        }
    }
}

/// A streamed tool call: sent whole, in one chunk, once its block is complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeltaToolCall {
    /// Which of the answer's calls (0, 1, ...).
    pub index: usize,
    #[serde(flatten)]
    pub call: ToolCall,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatChoice {
    /// Which of the request's `n` choices (0, 1, ...).
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `chat.completion`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM's `prompt_logprobs` of the rendered prompt (`null` for its first token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<PromptLogprobMap>>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<DeltaToolCall>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatChunkChoice {
    /// Which of the request's `n` choices (0, 1, ...).
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `chat.completion.chunk`: one server-sent event of a streamed chat answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TextChoice {
    /// Which of the request's `n` choices (0, 1, ...).
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// vLLM's `prompt_logprobs` (`null` for the prompt's first token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<PromptLogprobMap>>>,
}

/// `text_completion`: a completions answer, or one event of a streamed one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "UsageField::is_absent")]
    pub usage: UsageField,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Tokens one sequence holds (prompt and answer), as vLLM reports it.
    pub max_model_len: usize,
}

/// `/v1/models`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}
