//! What a generation is asked for and what it returns: [`GenerateOptions`] (max tokens,
//! sampling, stop conditions, logprobs), the streamed [`TokenEvent`]s and the final
//! [`GenerationOutput`] with its [`Timings`]. The serving engine (`crate::engine`) runs them.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::sampling::{PromptTokenLogprob, SamplingParams, TokenLogprob};
use crate::structured::StructuredOutput;

/// What to generate and when to stop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// Tokens to generate at most. None: until the sequence fills what the engine gives one
    /// sequence (finish reason `context_length`). A prompt plus `max_tokens` over that is
    /// refused when submitted.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Stop when the generated text contains one of these (the stop string is not returned,
    /// unless `include_stop_str_in_output`).
    pub stop: Vec<String>,
    /// vLLM's option: end the text with the stop string that ended it instead of cutting it off.
    #[serde(default)]
    pub include_stop_str_in_output: bool,
    /// vLLM's option: the first `min_tokens` tokens are never an eos or stop token id (those ids are
    /// masked before sampling) and stop strings are not looked for before then. At most the
    /// resolved `max_tokens`.
    #[serde(default)]
    pub min_tokens: usize,
    /// Extra stop token ids besides the model's eos ids.
    pub stop_token_ids: Vec<u32>,
    /// vLLM's: only these ids may be generated (None: any).
    #[serde(default)]
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's: words never generated. Each is tokenized as written without its leading
    /// whitespace and with one leading space; the last token of either is masked wherever the
    /// generated tokens end with the ones before it. Needs a tokenizer.
    #[serde(default)]
    pub bad_words: Vec<String>,
    /// vLLM's: only the prompt's last this many tokens are used (None: all).
    #[serde(default)]
    pub truncate_prompt_tokens: Option<usize>,
    /// Keep generating past eos ids (benchmarks).
    pub ignore_eos: bool,
    /// Return the chosen token's logprob and this many alternatives per token (None: no logprobs).
    pub logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs`: each prompt token's logprob given the tokens before it (none
    /// for the first), with this many alternatives per position, from the model's raw logits
    /// (no temperature nor penalties). The prompt then skips the prefix cache (its positions'
    /// logits must run), and on graphs exported with last-position logits only it prefills one
    /// token per run (`pio-export --all-logits` computes them inside the prefill).
    #[serde(default)]
    pub prompt_logprobs: Option<usize>,
    /// Drop special tokens (eos, <|im_end|>) from the returned text.
    pub skip_special_tokens: bool,
    /// What the text must be (a JSON schema, a regex, ...): tokens outside it are masked before
    /// sampling, and the generation stops once the text is complete. Needs a tokenizer.
    #[serde(default)]
    pub structured_output: Option<StructuredOutput>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: Some(256),
            sampling: SamplingParams::default(),
            stop: vec![],
            include_stop_str_in_output: false,
            min_tokens: 0,
            stop_token_ids: vec![],
            allowed_token_ids: None,
            bad_words: vec![],
            truncate_prompt_tokens: None,
            ignore_eos: false,
            logprobs: None,
            prompt_logprobs: None,
            skip_special_tokens: true,
            structured_output: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An eos id, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// No `max_tokens`, and the sequence filled the room the engine gives one sequence.
    ContextLength,
    /// The caller stopped it (dropped its handle, or a callback asked to stop).
    Cancelled,
}

impl FinishReason {
    pub const ALL: [FinishReason; 4] =
        [FinishReason::Stop, FinishReason::Length, FinishReason::ContextLength, FinishReason::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextLength => "context_length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// `token_id` of the one event that may follow the last token: text the detokenizer or the
/// stop-string matcher still held when generation ended (no token of its own).
pub const TEXT_TAIL_TOKEN: u32 = u32::MAX;

/// One generated token as streamed to the caller (or, with `token_id == TEXT_TAIL_TOKEN`, the
/// final text that was still held back when generation ended).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenEvent {
    pub token_id: u32,
    /// Text that became final with this token (may be empty while a character or a possible stop
    /// string is incomplete).
    pub text: String,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<TokenLogprob>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (an earlier request's).
    #[serde(default)]
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From submission until the request got a sequence slot.
    #[serde(default)]
    pub queue_ms: f64,
    /// From submission to the first generated token (queue, prefill and first sample).
    pub time_to_first_token_ms: f64,
    /// Prompt tokens that ran (not those from the cache), over the time from admission to the
    /// first token.
    pub prefill_tokens_per_s: f64,
    /// Tokens after the first, over the time after the first.
    pub decode_tokens_per_s: f64,
    pub total_ms: f64,
    /// The prompt's images (None: it had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImageTimings>,
}

/// What a prompt's images cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageTimings {
    /// Images in the prompt, and the prompt tokens that stand for them.
    pub images: usize,
    pub image_tokens: usize,
    /// Images the vision encoder ran for; the others came from the encoder cache
    /// (`encoder_cache_hits`) or lay inside a prefix-cache hit (no encoding needed).
    pub encoded: usize,
    pub encoder_cache_hits: usize,
    /// Reading, hashing and decoding the images, when the request was submitted.
    pub decode_ms: f64,
    /// The image processor (resize, normalize, patches) of the images encoded.
    pub preprocess_ms: f64,
    /// The vision encoder's runs.
    pub encode_ms: f64,
}

/// Token counts the way OpenAI's `usage` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens reused from the prefix cache (`prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerationOutput {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub logprobs: Vec<Option<f32>>,
    /// Each prompt position's logprob (None for the first), when the request asked for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<PromptTokenLogprob>>>,
    pub timings: Timings,
}

impl GenerationOutput {
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_ids.len(),
            cached_tokens: self.timings.cached_prompt_tokens,
            completion_tokens: self.generated_ids.len(),
        }
    }
}

/// The moments a generation's timings are computed from.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub submitted: Instant,
    pub admitted: Option<Instant>,
    pub first_token: Option<Instant>,
}

impl Clock {
    pub fn new(submitted: Instant) -> Self {
        Clock { submitted, admitted: None, first_token: None }
    }
}

/// Collects a generation's events into its [`GenerationOutput`]: the engine for every request,
/// and a caller that stops reading (its output holds what it saw).
#[derive(Clone, Debug, Default)]
pub struct OutputBuilder {
    generated_ids: Vec<u32>,
    text: String,
    logprobs: Vec<Option<f32>>,
}

impl OutputBuilder {
    pub fn push(&mut self, event: &TokenEvent) {
        if event.token_id != TEXT_TAIL_TOKEN {
            self.generated_ids.push(event.token_id);
            self.logprobs.push(event.logprob);
        }
        self.text.push_str(&event.text);
    }

    pub fn generated(&self) -> usize {
        self.generated_ids.len()
    }

    pub fn finish(
        self,
        prompt_ids: Vec<u32>,
        cached: usize,
        finish_reason: FinishReason,
        clock: Clock,
    ) -> GenerationOutput {
        let end = Instant::now();
        let first = clock.first_token.unwrap_or(end);
        let admitted = clock.admitted.unwrap_or(clock.submitted);
        let generated = self.generated_ids.len();
        let prefill_s = (first - admitted).as_secs_f64();
        let decode_s = (end - first).as_secs_f64();
        let timings = Timings {
            prompt_tokens: prompt_ids.len(),
            cached_prompt_tokens: cached,
            generated_tokens: generated,
            queue_ms: (admitted - clock.submitted).as_secs_f64() * 1e3,
            time_to_first_token_ms: (first - clock.submitted).as_secs_f64() * 1e3,
            // Only the tokens that ran: a prefix from the cache costs nothing.
            prefill_tokens_per_s: if prefill_s > 0.0 && generated > 0 {
                (prompt_ids.len() - cached) as f64 / prefill_s
            } else {
                0.0
            },
            decode_tokens_per_s: if generated > 1 && decode_s > 0.0 { (generated - 1) as f64 / decode_s } else { 0.0 },
            total_ms: (end - clock.submitted).as_secs_f64() * 1e3,
            images: None,
        };
        GenerationOutput {
            prompt_ids,
            generated_ids: self.generated_ids,
            text: self.text,
            finish_reason,
            logprobs: self.logprobs,
            prompt_logprobs: None,
            timings,
        }
    }
}
