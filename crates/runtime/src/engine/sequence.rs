//! One request inside the engine: its prompt, its own sampler (and seed), the streaming
//! detokenizer and stop conditions that turn each chosen token into an event, and where its KV
//! is (slot, tokens filled).

use std::ops::Range;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::generate::{Clock, FinishReason, GenerateOptions, OutputBuilder, TokenEvent, TEXT_TAIL_TOKEN};
use crate::model::{Fetch, Logits};
use crate::sampling::{PromptScorer, PromptTokenLogprob, Sampler};
use crate::structured::{Constraint, StructuredError};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

use super::error::EngineError;
use super::images::SequenceImages;
use super::metrics::MetricsSnapshot;
use super::prefix_cache::{block_keys, salt_key, BlockKey, ExtraKey};
use super::request::Event;
use super::scheduler::{Phase, SeqId};
use super::stop_matcher::StopMatcher;
use super::token_rules::TokenRules;

pub(crate) type EventSender = UnboundedSender<Result<Event, EngineError>>;

/// What a step gave a sequence to choose its next token from.
pub(crate) enum Choice<'a> {
    /// The graph's argmax (plain greedy, no logprobs).
    Token(u32),
    /// The logits row of its last position.
    Logits(&'a [f32]),
}

/// How a submitted request is to be generated, checked and tokenized on the caller's thread.
pub(crate) struct Admitted {
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    pub sampler: Sampler,
    /// Tokens it may generate: `max_tokens`, or what the sequence has room for.
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
    pub tokenizer: Option<Tokenizer>,
    /// The prompt's images (None: a text prompt).
    pub images: Option<SequenceImages>,
    /// The compiled structured output (None: unconstrained).
    pub constraint: Option<Constraint>,
    /// `allowed_token_ids` and `bad_words`.
    pub rules: TokenRules,
    /// The request's `cache_salt`.
    pub cache_salt: Option<String>,
}

pub(crate) struct Sequence {
    pub id: SeqId,
    events: EventSender,
    /// Block keys of the prompt (prefix-cache lookups).
    pub prompt_keys: Vec<BlockKey>,
    /// What the tokens do not show that its blocks' keys hold: its images' hashes, its cache salt.
    extra_keys: Vec<(Range<usize>, ExtraKey)>,
    /// The prompt's images (None: a text prompt).
    pub images: Option<SequenceImages>,
    prompt_len: usize,
    /// Prompt and generated tokens.
    history: Vec<u32>,
    sampler: Sampler,
    decoder: Option<IncrementalDecoder>,
    stops: StopMatcher,
    stop_ids: Vec<u32>,
    /// Tokens before which no stop id may be sampled and no stop string is looked for.
    min_tokens: usize,
    /// Plain greedy without logprobs nor constraint: the graph's argmax serves it once
    /// `min_tokens` are out.
    plain_greedy: bool,
    /// The structured output's matcher: masks the logits before each token, is fed each token.
    constraint: Option<Constraint>,
    /// `allowed_token_ids` and `bad_words`: mask the logits before each token.
    rules: TokenRules,
    max_tokens: usize,
    /// Why it ends when `max_tokens` is reached: `Length`, or `ContextLength` when the request
    /// set no maximum.
    full_reason: FinishReason,
    logprobs: Option<usize>,
    /// Each prompt position's logprob as its prefill runs, when asked for.
    prompt_logprobs: Option<PromptLogprobs>,
    output: OutputBuilder,
    clock: Clock,
    last_token_at: Option<Instant>,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached: usize,
    pub slot: usize,
    /// Tokens whose KV the slot holds: history[..filled].
    pub filled: usize,
    pub phase: Phase,
    /// Whether its KV has been offered to the prefix cache when it finished, or must never be
    /// (a failed step may have left it half written).
    pub stored: bool,
}

impl Sequence {
    pub(crate) fn new(id: SeqId, a: Admitted, events: EventSender, submitted: Instant) -> Self {
        // A constrained sequence needs the logits: the graph's argmax may be a masked token.
        let plain_greedy = a.options.sampling.is_plain_argmax()
            && a.options.logprobs.is_none()
            && a.constraint.is_none()
            && a.rules.is_empty();
        let mut sampler = a.sampler;
        sampler.set_prompt_len(a.prompt.len());
        let mut extra_keys = a.images.as_ref().map(SequenceImages::extra_keys).unwrap_or_default();
        extra_keys.extend(a.cache_salt.as_deref().map(salt_key));
        Sequence {
            id,
            events,
            prompt_keys: block_keys(&a.prompt, &extra_keys),
            extra_keys,
            images: a.images,
            prompt_len: a.prompt.len(),
            decoder: a.tokenizer.as_ref().map(|t| t.incremental_decoder(a.options.skip_special_tokens)),
            stops: StopMatcher::new(&a.options.stop, a.options.include_stop_str_in_output),
            stop_ids: a.stop_ids,
            min_tokens: a.options.min_tokens,
            plain_greedy,
            constraint: a.constraint,
            rules: a.rules,
            max_tokens: a.max_tokens,
            full_reason: if a.options.max_tokens.is_some() {
                FinishReason::Length
            } else {
                FinishReason::ContextLength
            },
            logprobs: a.options.logprobs,
            prompt_logprobs: a.options.prompt_logprobs.map(PromptLogprobs::new),
            history: a.prompt,
            sampler,
            output: OutputBuilder::default(),
            clock: Clock::new(submitted),
            last_token_at: None,
            cached: 0,
            slot: 0,
            filled: 0,
            phase: Phase::Prefill { done: 0, prompt_len: 0 },
            stored: false,
        }
    }

    /// What its next step must return: the graph's argmax for plain greedy, else the logits (also
    /// for plain greedy until `min_tokens` are out: the stop ids are masked on the host).
    pub(crate) fn fetch(&self) -> Fetch {
        if self.plain_greedy && self.output.generated() >= self.min_tokens {
            Fetch::Greedy
        } else {
            Fetch::Logits
        }
    }

    pub(crate) fn prompt(&self) -> &[u32] {
        &self.history[..self.prompt_len]
    }

    /// Whether its prompt positions' logprobs are asked for: every prefill chunk then fetches
    /// the logits of each of its positions, and no prefix-cache hit may skip any.
    pub(crate) fn wants_prompt_logprobs(&self) -> bool {
        self.prompt_logprobs.is_some()
    }

    /// Whether its prefill chunks run alone, never batched with other prompts': a prompt with
    /// images (the encoder's output goes into its run) or a scored one (its run fetches every
    /// position's logits).
    pub(crate) fn runs_alone(&self) -> bool {
        self.images.is_some() || self.wants_prompt_logprobs()
    }

    /// What a prefill chunk must return: the last chunk what [`fetch`](Self::fetch) says, an
    /// earlier one nothing but its argmax (not read), unless the prompt's logprobs are asked for.
    pub(crate) fn prefill_fetch(&self, last: bool) -> Fetch {
        match (self.wants_prompt_logprobs(), last) {
            (true, _) => Fetch::Logits,
            (false, true) => self.fetch(),
            (false, false) => Fetch::Greedy,
        }
    }

    /// Scores the prompt tokens that the positions `start..start + len` predict, from row `row`
    /// of a prefill run's `logits` (every position's logits, or one chunk of one token), and
    /// sends them all once the last prompt token is scored. Does nothing unless asked for.
    pub(crate) fn score_prompt(
        &mut self,
        logits: &Logits,
        row: usize,
        start: usize,
        len: usize,
    ) -> Result<(), EngineError> {
        let Some(scores) = self.prompt_logprobs.as_mut() else { return Ok(()) };
        if logits.rows != len || row >= logits.batch {
            return Err(EngineError::model_failed(
                "scoring the prompt's tokens",
                format!(
                    "a prefill run of {len} tokens returned {} logits rows for each of {} sequences (row {row} wanted)",
                    logits.rows, logits.batch
                ),
            ));
        }
        // Position p's logits predict prompt token p + 1; the last position's predict the first
        // generated token instead.
        let rows: Vec<(&[f32], u32)> = (0..len)
            .map_while(|i| {
                self.history[..self.prompt_len].get(start + i + 1).map(|&next| (logits.row_of(row, i), next))
            })
            .collect();
        scores.push_all(&rows);
        if start + len == self.prompt_len {
            let _ = self.events.send(Ok(Event::PromptLogprobs(scores.positions.clone())));
        }
        Ok(())
    }

    /// The tokens whose KV the slot holds.
    pub(crate) fn kv_tokens(&self) -> &[u32] {
        &self.history[..self.filled]
    }

    /// The keys of the tokens whose KV the slot holds (offering them to the prefix cache).
    pub(crate) fn kv_keys(&self) -> Vec<BlockKey> {
        block_keys(self.kv_tokens(), &self.extra_keys)
    }

    /// The token the next decode step runs (the last one chosen).
    pub(crate) fn next_input(&self) -> u32 {
        self.history.last().copied().unwrap_or(0)
    }

    /// Added to its generated tokens' positions on every axis (0 without images).
    pub(crate) fn rope_delta(&self) -> i64 {
        self.images.as_ref().map_or(0, SequenceImages::rope_delta)
    }

    /// Whether the caller dropped its handle.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Takes `slot`, whose first `cached` positions the prefix cache filled.
    pub(crate) fn admit(&mut self, slot: usize, cached: usize) {
        self.slot = slot;
        self.cached = cached;
        self.filled = cached;
        self.phase = Phase::Prefill { done: cached, prompt_len: self.prompt_len };
        self.clock.admitted = Some(Instant::now());
        if let Some(images) = self.images.as_mut() {
            images.skip_cached(cached);
        }
    }

    /// Chooses the next token from `choice`, streams it, and says whether the sequence is done.
    pub(crate) fn accept(&mut self, choice: Choice<'_>, metrics: &mut MetricsSnapshot) -> Result<bool, EngineError> {
        // The tokens out before this one; stops count from `min_tokens` on.
        let generated = self.output.generated();
        let mask_stops = generated < self.min_tokens && !self.stop_ids.is_empty();
        let masked;
        let choice = match choice {
            Choice::Logits(row) if mask_stops || self.constraint.is_some() || !self.rules.is_empty() => {
                let mut row = row.to_vec();
                self.rules.apply(&mut row, &self.history[self.prompt_len..]);
                if let Some(constraint) = self.constraint.as_mut() {
                    let allowed = constraint.mask().map_err(constraint_failed)?;
                    Constraint::apply(&allowed, &mut row);
                }
                // vLLM's min_tokens: the stop ids cannot be chosen yet, unless a constraint
                // allows nothing else (its text is complete): the constraint wins.
                if mask_stops && (self.constraint.is_none() || self.allows_other_than_stops(&row)) {
                    for &id in &self.stop_ids {
                        if let Some(v) = row.get_mut(id as usize) {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
                // The rules together (a bad word completing the only allowed tokens, say) can
                // leave nothing: the request ends rather than emit a token they forbid.
                if !self.rules.is_empty() && row.iter().all(|&v| v == f32::NEG_INFINITY) {
                    return Err(EngineError::invalid(
                        "allowed_token_ids",
                        format!(
                            "allowed_token_ids, bad_words and min_tokens leave no token to generate after {generated} tokens"
                        ),
                    ));
                }
                masked = row;
                Choice::Logits(&masked)
            }
            // Constrained sequences fetch logits (see `fetch`); an argmax would be unchecked.
            Choice::Token(t) if self.constraint.is_some() || !self.rules.is_empty() => {
                return Err(constraint_failed(StructuredError::Matcher(format!(
                    "the step gave the argmax {t} of a constrained sequence instead of its logits"
                ))));
            }
            other => other,
        };
        let (token, logprob, top_logprobs) = match (choice, self.logprobs) {
            (Choice::Token(t), _) => (t, None, vec![]),
            (Choice::Logits(row), Some(n)) => {
                let s = self.sampler.sample_with_logprobs(row, &self.history, n);
                (s.token, Some(s.logprob), s.top_logprobs.to_vec())
            }
            (Choice::Logits(row), None) => (self.sampler.sample(row, &self.history), None, vec![]),
        };
        let now = Instant::now();
        match self.last_token_at {
            None => {
                self.clock.first_token = Some(now);
                metrics.time_to_first_token.observe((now - self.clock.submitted).as_secs_f64());
            }
            Some(last) => metrics.inter_token_latency.observe((now - last).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        metrics.generation_tokens += 1;
        self.history.push(token);
        let is_stop_id = self.stop_ids.contains(&token);
        // A stop id ends the sequence anyway; the matcher needs only the text's tokens.
        if let Some(constraint) = self.constraint.as_mut().filter(|_| !is_stop_id) {
            constraint.consume(token).map_err(constraint_failed)?;
        }
        let mut text = String::new();
        let mut hit_stop_string = false;
        if let Some(d) = self.decoder.as_mut() {
            // A stop id is not part of the answer's text.
            if !is_stop_id {
                let piece = d
                    .push(token)
                    .map_err(|e| EngineError::model_failed("detokenizing a generated token", e))?
                    .unwrap_or_default();
                let (emit, hit) = self.stops.push(&piece, generated + 1 >= self.min_tokens);
                text = emit;
                hit_stop_string = hit;
            }
        }
        self.emit(TokenEvent { token_id: token, text, logprob, top_logprobs });
        // (Below `min_tokens` a stop id can only come from device argmax, which such a sequence
        // does not ask for; it still ends it rather than emit a stop token as text.)
        if is_stop_id || hit_stop_string {
            self.finish(FinishReason::Stop, !hit_stop_string, metrics)?;
            return Ok(true);
        }
        // The constrained text is complete (only an end may follow): stop, as vLLM does.
        if self.constraint.as_ref().is_some_and(Constraint::is_finished) {
            self.finish(FinishReason::Stop, true, metrics)?;
            return Ok(true);
        }
        if self.output.generated() == self.max_tokens {
            self.finish(self.full_reason, true, metrics)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether a masked logits row still allows a token that is not a stop id.
    fn allows_other_than_stops(&self, row: &[f32]) -> bool {
        row.iter().enumerate().any(|(id, v)| *v != f32::NEG_INFINITY && !self.stop_ids.contains(&(id as u32)))
    }

    fn emit(&mut self, event: TokenEvent) {
        self.output.push(&event);
        // A closed channel is a cancellation, which the next step notices.
        let _ = self.events.send(Ok(Event::Token(event)));
    }

    /// Ends the sequence: the text still held back (unless a stop string cut it), then the
    /// output. `Cancelled` sends nothing (no one is listening).
    pub(crate) fn finish(
        &mut self,
        reason: FinishReason,
        flush: bool,
        metrics: &mut MetricsSnapshot,
    ) -> Result<(), EngineError> {
        self.phase = Phase::Finished;
        if reason == FinishReason::Cancelled {
            metrics.finished.count(reason);
            return Ok(());
        }
        let mut reason = reason;
        if flush {
            let mut tail = String::new();
            if let Some(d) = self.decoder.as_mut() {
                let rest = d.flush().map_err(|e| EngineError::model_failed("detokenizing the last tokens", e))?;
                let (text, hit) = self.stops.push(&rest, self.output.generated() >= self.min_tokens);
                tail.push_str(&text);
                // Text held back (a token ending mid-character) can complete a stop string only
                // now: the answer is cut there, so it stopped, whatever ended the generation.
                if hit {
                    reason = FinishReason::Stop;
                }
            }
            tail.push_str(&self.stops.flush());
            if !tail.is_empty() {
                self.emit(TokenEvent { token_id: TEXT_TAIL_TOKEN, text: tail, logprob: None, top_logprobs: vec![] });
            }
        }
        metrics.finished.count(reason);
        let mut output =
            std::mem::take(&mut self.output).finish(self.prompt().to_vec(), self.cached, reason, self.clock);
        output.timings.images = self.images.as_ref().map(|i| i.timings.clone());
        output.prompt_logprobs = self.prompt_logprobs.take().map(|p| p.positions);
        let _ = self.events.send(Ok(Event::Finished(output)));
        Ok(())
    }

    /// Ends the sequence with an error.
    pub(crate) fn fail(&mut self, error: EngineError, metrics: &mut MetricsSnapshot) {
        if self.phase != Phase::Finished {
            metrics.finished.error += 1;
        }
        self.phase = Phase::Finished;
        self.stored = true;
        let _ = self.events.send(Err(error));
    }
}

/// A prompt's logprobs, position by position, as its prefill chunks run.
struct PromptLogprobs {
    top_n: usize,
    /// None for the first position (nothing predicts it).
    positions: Vec<Option<PromptTokenLogprob>>,
}

/// Positions a scoring thread takes at least (a few full-vocabulary passes each).
const POSITIONS_PER_SCORING_THREAD: usize = 16;

impl PromptLogprobs {
    fn new(top_n: usize) -> Self {
        PromptLogprobs { top_n, positions: vec![None] }
    }

    /// Scores each (logits row, the token it predicts) in order, on several threads for a long
    /// chunk: the step waits for them, and so does every other stream.
    fn push_all(&mut self, rows: &[(&[f32], u32)]) {
        let top_n = self.top_n;
        let score = |part: &[(&[f32], u32)]| {
            let mut scorer = PromptScorer::default();
            part.iter().map(|&(row, token)| Some(scorer.score(row, token, top_n))).collect::<Vec<_>>()
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = rows.len().div_ceil(POSITIONS_PER_SCORING_THREAD).clamp(1, cores);
        if threads == 1 {
            self.positions.extend(score(rows));
            return;
        }
        let per_thread = rows.len().div_ceil(threads);
        let parts: Vec<Vec<Option<PromptTokenLogprob>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = rows.chunks(per_thread).map(|part| scope.spawn(move || score(part))).collect();
            workers.into_iter().map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        self.positions.extend(parts.into_iter().flatten());
    }
}

/// A constraint that failed mid-generation ends its own request only.
fn constraint_failed(e: StructuredError) -> EngineError {
    EngineError::model_failed("the structured-output constraint failed", e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    /// A stop string completed only by the text the detokenizer held back (the last token ends
    /// mid-character) cuts the answer at the final flush: the reason is `Stop`, not `Length`.
    #[test]
    fn a_stop_string_completed_at_the_final_flush_finishes_with_stop() {
        let tok = crate::tokenizer::tests::qwen3();
        let x = tok.encode("x", false).unwrap();
        // A token that is a space and the first bytes of a multi-byte character.
        let partial = (0..tok.vocab_size() as u32)
            .find(|&id| tok.decode(&[id], false).is_ok_and(|t| t == " \u{FFFD}"))
            .expect("a token ending mid-character");
        let options = GenerateOptions { max_tokens: Some(2), stop: vec!["x ".into()], ..Default::default() };
        let admitted = Admitted {
            prompt: vec![1, 2, 3],
            sampler: Sampler::new(SamplingParams::greedy()).unwrap(),
            options,
            max_tokens: 2,
            stop_ids: vec![],
            tokenizer: Some(tok.clone()),
            images: None,
            constraint: None,
            rules: TokenRules::default(),
            cache_salt: None,
        };
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        let mut seq = Sequence::new(0, admitted, events, Instant::now());
        let mut metrics = MetricsSnapshot::new();
        assert!(!seq.accept(Choice::Token(x[0]), &mut metrics).unwrap());
        assert!(seq.accept(Choice::Token(partial), &mut metrics).unwrap());
        let mut finished = None;
        while let Ok(event) = received.try_recv() {
            if let Ok(Event::Finished(output)) = event {
                finished = Some(output);
            }
        }
        let output = finished.expect("a Finished event");
        assert_eq!(output.text, "", "cut at the stop string");
        assert_eq!(output.finish_reason, FinishReason::Stop);
    }
}
