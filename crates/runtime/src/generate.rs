//! Text generation over a loaded graph folder: prefill, then decode through the KV cache, with
//! Rust-side sampling, stop conditions (eos ids, stop strings, max tokens, context length) and
//! streaming of text deltas that never split a UTF-8 character.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::chat_template::{ChatTemplate, RenderOptions};
use crate::ep::ExecutionProvider;
use crate::model::{DecoderModel, Fetch, KvCache, StepOutput};
use crate::sampling::{Sampler, SamplingParams, TokenLogprob};
use crate::tokenizer::Tokenizer;

/// What to generate and when to stop.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop when the generated text contains one of these (the stop string is not returned).
    pub stop: Vec<String>,
    /// Extra stop token ids besides the model's eos ids.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past eos ids (benchmarks).
    pub ignore_eos: bool,
    /// Return the chosen token's logprob and this many alternatives per token (None: no logprobs).
    pub logprobs: Option<usize>,
    /// Drop special tokens (eos, <|im_end|>) from the returned text.
    pub skip_special_tokens: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            logprobs: None,
            skip_special_tokens: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An eos id, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The graph's context length reached.
    ContextLength,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// `token_id` of the one event that may follow the last token: text the detokenizer or the
/// stop-string matcher still held when generation ended (no token of its own).
pub const TEXT_TAIL_TOKEN: u32 = u32::MAX;

/// One generated token as streamed to the caller (or, with `token_id == TEXT_TAIL_TOKEN`, the
/// final text that was still held back when generation ended).
#[derive(Clone, Debug, Serialize)]
pub struct TokenEvent {
    pub token_id: u32,
    /// Text that became final with this token (may be empty while a character or a possible stop
    /// string is incomplete).
    pub text: String,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<TokenLogprob>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the previous generation's cache (prefix caching).
    #[serde(default)]
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From the call to the first generated token (prefill + first sample).
    pub time_to_first_token_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Tokens after the first, over the time after the first.
    pub decode_tokens_per_s: f64,
    pub total_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerationOutput {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub logprobs: Vec<Option<f32>>,
    pub timings: Timings,
}

/// Holds back streamed text that might be the start of a stop string.
struct StopMatcher {
    stops: Vec<String>,
    /// Final text not yet handed out.
    pending: String,
}

impl StopMatcher {
    fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new() }
    }

    /// Adds decoded text; returns (text safe to emit, whether a stop string was hit).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// A model ready to generate: the decoder session, and the tokenizer and chat template when the
/// export carried them.
pub struct Generator {
    pub model: DecoderModel,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// Keep the last generation's KV cache and start the next prompt after the longest prefix
    /// it shares with it (a chat's earlier turns, a repeated system prompt). Applies to
    /// GroupQueryAttention's shared buffer, the GPU's cache; on by default.
    pub prefix_caching: bool,
    prefix: Option<CachedPrefix>,
}

/// A cache kept from the last generation, and the tokens it holds.
struct CachedPrefix {
    cache: KvCache,
    tokens: Vec<u32>,
}

impl Generator {
    pub fn load(dir: &Path, ep: &ExecutionProvider) -> Result<Self> {
        let model = DecoderModel::load(dir, ep)?;
        let (tokenizer, chat_template) = if dir.join("tokenizer.json").is_file() {
            let tok =
                Tokenizer::from_dir(dir).with_context(|| format!("loading the tokenizer in {}", dir.display()))?;
            let template = match tok.chat_template_source() {
                Some(_) => Some(ChatTemplate::from_config(tok.config()).map_err(|e| anyhow!("{e}"))?),
                None => None,
            };
            (Some(tok), template)
        } else {
            (None, None)
        };
        Ok(Generator { model, tokenizer, chat_template, prefix_caching: true, prefix: None })
    }

    /// The cache for `prompt` and how many of its tokens it already holds: the last
    /// generation's cache cut to the longest prefix it shares with `prompt` (at most all but the
    /// prompt's last token, which must run to give the next token's logits), or a new one.
    fn cache_for(&mut self, prompt: &[u32]) -> Result<(KvCache, usize)> {
        if let Some(CachedPrefix { mut cache, tokens }) = self.prefix.take().filter(|_| self.prefix_caching) {
            let shared = tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
            let reuse = shared.min(prompt.len().saturating_sub(1));
            if cache.capacity().is_some_and(|c| c >= prompt.len()) && cache.truncate(reuse).is_ok() {
                return Ok((cache, reuse));
            }
        }
        Ok((self.model.new_cache()?, 0))
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            anyhow!("{} has no tokenizer.json: pass token ids (--prompt-ids) instead of text", self.model.dir.display())
        })
    }

    /// Renders chat messages with the checkpoint's own template and tokenizes the result.
    pub fn chat_prompt(&self, messages: &[Json], opts: &RenderOptions) -> Result<(String, Vec<u32>)> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            anyhow!(
                "{} has no chat template (tokenizer_config.json without chat_template); use a raw prompt",
                self.model.dir.display()
            )
        })?;
        let text = template.render(messages, opts).map_err(|e| anyhow!("{e}"))?;
        // Templates write special tokens as text; they are parsed back as special tokens here.
        let ids = self.tokenizer()?.encode(&text, false).map_err(|e| anyhow!("{e}"))?;
        Ok((text, ids))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer()?.encode(text, false).map_err(|e| anyhow!("{e}"))
    }

    /// Token ids that end generation: the manifest's eos ids plus the caller's.
    fn stop_ids(&self, opts: &GenerateOptions) -> Vec<u32> {
        let mut ids = if opts.ignore_eos { vec![] } else { self.model.manifest.eos_token_ids.clone() };
        ids.extend(&opts.stop_token_ids);
        ids
    }

    /// Generates from `prompt_ids`, calling `on_token` for each token; the callback may stop
    /// generation by returning `ControlFlow::Break(())`.
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<GenerationOutput> {
        let start = Instant::now();
        if prompt_ids.is_empty() {
            bail!("the prompt is empty");
        }
        let context = self.model.context_length();
        if prompt_ids.len() >= context {
            bail!(
                "the prompt has {} tokens, but the graph's context length is {context} (leave room for at least one generated token)",
                prompt_ids.len()
            );
        }
        if !opts.stop.is_empty() && self.tokenizer.is_none() {
            bail!("stop strings need a tokenizer, and {} has none", self.model.dir.display());
        }
        let mut sampler = Sampler::new(opts.sampling.clone()).map_err(|e| anyhow!("{e}"))?;
        sampler.set_prompt_len(prompt_ids.len());
        let stop_ids = self.stop_ids(opts);
        let mut decoder = self.tokenizer.as_ref().map(|t| t.incremental_decoder(opts.skip_special_tokens));
        let mut stops = StopMatcher::new(&opts.stop);

        let (mut cache, cached) = self.cache_for(prompt_ids)?;
        let mut history: Vec<u32> = prompt_ids.to_vec();
        // Plain greedy decoding needs no logits on the host: the graph's argmax comes back instead.
        let fetch =
            if opts.sampling.is_plain_argmax() && opts.logprobs.is_none() { Fetch::Greedy } else { Fetch::Logits };
        let mut step = self.model.step(&prompt_ids[cached..], 1, &mut cache, fetch)?;
        let prefill_done = Instant::now();
        let mut first_token_at = None;
        let mut text = String::new();
        let mut logprobs = Vec::new();
        let mut finish = FinishReason::Length;
        let mut generated = 0usize;
        let mut stopped_by_string = false;
        while generated < opts.max_tokens {
            let (token, logprob, top) = match (&step, opts.logprobs) {
                (StepOutput::Greedy(tokens), _) => {
                    (*tokens.first().context("the step returned no token")?, None, vec![])
                }
                (StepOutput::Logits(logits), Some(n)) => {
                    let s = sampler.sample_with_logprobs(logits.last(), &history, n);
                    (s.token, Some(s.logprob), s.top_logprobs.to_vec())
                }
                (StepOutput::Logits(logits), None) => (sampler.sample(logits.last(), &history), None, vec![]),
            };
            first_token_at.get_or_insert_with(Instant::now);
            generated += 1;
            history.push(token);
            logprobs.push(logprob);
            let is_stop_id = stop_ids.contains(&token);
            let mut delta = String::new();
            let mut hit_stop_string = false;
            if let Some(d) = decoder.as_mut() {
                // A stop id is not part of the answer's text.
                if !is_stop_id {
                    let piece = d.push(token).map_err(|e| anyhow!("{e}"))?.unwrap_or_default();
                    let (emit, hit) = stops.push(&piece);
                    delta = emit;
                    hit_stop_string = hit;
                }
            }
            text.push_str(&delta);
            let event = TokenEvent { token_id: token, text: delta, logprob, top_logprobs: top };
            if on_token(&event).is_break() {
                finish = FinishReason::Cancelled;
                break;
            }
            if is_stop_id || hit_stop_string {
                finish = FinishReason::Stop;
                stopped_by_string = hit_stop_string;
                break;
            }
            if generated == opts.max_tokens {
                break;
            }
            if cache.len + 1 > context {
                finish = FinishReason::ContextLength;
                break;
            }
            step = self.model.step(&[token], 1, &mut cache, fetch)?;
        }
        if !stopped_by_string {
            // Whatever the decoder and the stop matcher still hold is final now.
            let mut tail = String::new();
            if let Some(d) = decoder.as_mut() {
                let rest = d.flush().map_err(|e| anyhow!("{e}"))?;
                tail.push_str(&stops.push(&rest).0);
            }
            tail.push_str(&stops.flush());
            if !tail.is_empty() {
                text.push_str(&tail);
                let _ = on_token(&TokenEvent {
                    token_id: TEXT_TAIL_TOKEN,
                    text: tail,
                    logprob: None,
                    top_logprobs: vec![],
                });
            }
        }
        if self.prefix_caching && cache.is_shared_buffer() {
            // The cache holds the prompt and every generated token but the last.
            let tokens = history[..cache.len].to_vec();
            self.prefix = Some(CachedPrefix { cache, tokens });
        }
        let end = Instant::now();
        let first = first_token_at.unwrap_or(end);
        let prefill_s = (prefill_done - start).as_secs_f64();
        let decode_s = (end - first).as_secs_f64();
        let timings = Timings {
            prompt_tokens: prompt_ids.len(),
            cached_prompt_tokens: cached,
            generated_tokens: generated,
            time_to_first_token_ms: (first - start).as_secs_f64() * 1e3,
            // Only the tokens that ran: a prefix from the cache costs nothing.
            prefill_tokens_per_s: if prefill_s > 0.0 { (prompt_ids.len() - cached) as f64 / prefill_s } else { 0.0 },
            decode_tokens_per_s: if generated > 1 && decode_s > 0.0 { (generated - 1) as f64 / decode_s } else { 0.0 },
            total_ms: (end - start).as_secs_f64() * 1e3,
        };
        Ok(GenerationOutput {
            prompt_ids: prompt_ids.to_vec(),
            generated_ids: history[prompt_ids.len()..].to_vec(),
            text,
            finish_reason: finish,
            logprobs,
            timings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = String::new();
        for p in pieces {
            let (emit, hit) = m.push(p);
            out.push_str(&emit);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_caught_and_cut() {
        assert_eq!(run(&["</end>"], &["hello </e", "nd> more"]), ("hello ".to_string(), true));
    }

    #[test]
    fn text_that_only_looks_like_a_stop_prefix_is_released() {
        assert_eq!(run(&["STOP"], &["ST", "ART"]), ("START".to_string(), false));
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        assert_eq!(run(&["bb", "a"], &["xxbba"]), ("xx".to_string(), true));
    }

    #[test]
    fn multibyte_stop_strings_are_cut_on_char_boundaries() {
        assert_eq!(run(&["。结束"], &["你好。", "结", "束了"]), ("你好".to_string(), true));
    }
}
