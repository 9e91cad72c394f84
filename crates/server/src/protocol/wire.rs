//! The request bodies as clients send them: every field of both endpoints, each optional and as
//! loosely typed as OpenAI's API allows (a string or a list, a flag or a count). Parsing
//! ([`crate::parse`]) checks them and builds the typed requests of [`super::request`].

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use super::request::Role;

/// One body of `/v1/chat/completions` or `/v1/completions`. Fields of the other endpoint are
/// refused by name when parsing; fields of neither are ignored (and logged), as vLLM does.
#[derive(Debug, Deserialize)]
pub(crate) struct WireRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<WireMessage>>,
    /// A string, a list of token ids, or a one-element list of either.
    pub prompt: Option<Json>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's: -1 and 0 mean off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    /// A string or a list of strings.
    pub stop: Option<Json>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<WireStreamOptions>,
    /// Chat: `true`/`false`; completions: the number of alternatives.
    pub logprobs: Option<WireLogprobs>,
    pub top_logprobs: Option<i64>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub return_token_ids: Option<bool>,
    /// vLLM's: logprobs spell tokens `token_id:ID`.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM's: at least this many tokens before a stop (0 = off), and the stop string kept in
    /// the text.
    pub min_tokens: Option<usize>,
    pub include_stop_str_in_output: Option<bool>,
    /// Qwen3 templates' switch, at the top level (as `pio serve` took it before `chat_template_kwargs`).
    pub enable_thinking: Option<bool>,
    pub chat_template_kwargs: Option<Map<String, Json>>,
    pub add_generation_prompt: Option<bool>,
    /// vLLM's: documents for retrieval-augmented templates (their `documents` variable).
    pub documents: Option<Json>,
    /// Completions: the prompt's text (and, with `logprobs`, its tokens' logprobs) before the
    /// answer's.
    pub echo: Option<bool>,
    /// Fields the server knows and cannot honour: a request that sets them is refused rather
    /// than answered as if they were not there.
    pub best_of: Option<i64>,
    pub suffix: Option<Json>,
    pub continue_final_message: Option<bool>,
    pub tools: Option<Json>,
    pub tool_choice: Option<Json>,
    pub functions: Option<Json>,
    pub function_call: Option<Json>,
    /// OpenAI's answer format (`text`, `json_object`, `json_schema`), vLLM's
    /// `structured_outputs` and its older `guided_*` fields: see [`crate::structured`].
    pub response_format: Option<Json>,
    pub structured_outputs: Option<Json>,
    pub guided_json: Option<Json>,
    pub guided_regex: Option<Json>,
    pub guided_choice: Option<Json>,
    pub guided_grammar: Option<Json>,
    pub logit_bias: Option<Map<String, Json>>,
    /// vLLM's: prefix-cache hits only between requests with the same salt.
    pub cache_salt: Option<String>,
    /// vLLM's: only these ids may be generated.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's: words never generated.
    pub bad_words: Option<Vec<String>>,
    /// vLLM's: the prompt's last N tokens only (-1: as many as a sequence holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM's: each prompt token's logprob with this many alternatives (null: none).
    pub prompt_logprobs: Option<i64>,
    /// OpenAI's: false allows one tool call an answer (chat).
    #[serde(default, deserialize_with = "flag")]
    pub parallel_tool_calls: Option<bool>,
    /// Accepted and not used: they change nothing in the answer (and are not logged as unknown).
    #[serde(rename = "user")]
    _user: Option<IgnoredAny>,
    #[serde(rename = "metadata")]
    _metadata: Option<IgnoredAny>,
    #[serde(rename = "store")]
    _store: Option<IgnoredAny>,
    #[serde(rename = "service_tier")]
    _service_tier: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct WireStreamOptions {
    #[serde(default, deserialize_with = "flag")]
    pub include_usage: Option<bool>,
    /// vLLM's: the usage so far in every chunk too (with `include_usage`).
    #[serde(default, deserialize_with = "flag")]
    pub continuous_usage_stats: Option<bool>,
}

/// `logprobs`: a flag (chat) or a count (completions).
#[derive(Debug, Clone, Copy)]
pub(crate) enum WireLogprobs {
    Flag(bool),
    Count(i64),
}

impl<'de> Deserialize<'de> for WireLogprobs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = WireLogprobs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true/false (chat) or a number of alternatives (completions)")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<WireLogprobs, E> {
                Ok(WireLogprobs::Flag(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<WireLogprobs, E> {
                Ok(WireLogprobs::Count(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<WireLogprobs, E> {
                Ok(WireLogprobs::Count(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A boolean, also written as the string "true" or "false" (some gateways' examples send
/// `"include_usage": "true"`, which vLLM's validation accepts).
fn flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("true or false")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Option<bool>, E> {
            Ok(Some(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<bool>, E> {
            match v {
                "true" => Ok(Some(true)),
                "false" => Ok(Some(false)),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<bool>, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Option<bool>, E> {
            Ok(None)
        }
    }
    deserializer.deserialize_any(V)
}

#[derive(Debug, Deserialize)]
pub(crate) struct WireMessage {
    pub role: Role,
    #[serde(default)]
    pub content: Option<WireContent>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<Json>>,
    pub tool_call_id: Option<String>,
    pub reasoning_content: Option<String>,
}

/// A message's `content`: a string, or a list of parts (what the openai SDKs send).
#[derive(Debug)]
pub(crate) enum WireContent {
    Text(String),
    Parts(Vec<WirePart>),
}

impl<'de> Deserialize<'de> for WireContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WireContent;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WireContent, E> {
                Ok(WireContent::Text(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<WireContent, E> {
                Ok(WireContent::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WireContent, A::Error> {
                let mut parts = Vec::new();
                while let Some(part) = seq.next_element()? {
                    parts.push(part);
                }
                Ok(WireContent::Parts(parts))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// One content part: `{"type": "text", "text": ...}`, `{"type": "image_url", "image_url":
/// {"url": ...}}`, or another type (named in the error).
#[derive(Debug, Deserialize)]
pub(crate) struct WirePart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image_url: Option<WireImageUrl>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct WireImageUrl {
    pub url: String,
    pub detail: Option<String>,
}
