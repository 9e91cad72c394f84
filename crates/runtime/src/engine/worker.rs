//! The engine's worker thread: it owns the model (through the [`Runner`]) and loops over steps
//! while there is work, and sleeps on its command channel when there is none.
//!
//! One step:
//! 1. take new requests; drop waiting requests whose handle is gone; mark running sequences
//!    whose handle is gone as cancelled;
//! 2. offer the KV of finished sequences to the prefix cache (their slots are still theirs);
//! 3. look up the prefix cache for the requests that could be admitted, and plan the step
//!    ([`plan_step`]): release finished sequences' slots, admit waiting requests (copying their
//!    cached prefix into the slot);
//! 4. one batched decode over slots 0..n for every decoding sequence, each choosing its token
//!    with its own sampler;
//! 5. the planned prefill chunks, in runs ([`prefill_runs`]: chunks of one length in consecutive
//!    slots run batched, others batch 1); a chunk that ends a prompt gives its first token.
//!
//! The decode run and every prefill run are timed: the [`PrefillPacer`] sizes the next steps' prefill
//! from them, and a step far slower than decoding is logged with where its time went.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::generate::FinishReason;
use crate::model::{Fetch, StepOutput};

use super::decode_rows::DecodeRow;
use super::error::EngineError;
use super::metrics::MetricsSnapshot;
use super::pacing::PrefillPacer;
use super::runner::Runner;
use super::scheduler::{plan_step, prefill_runs, Phase, PrefillChunk, Running, StepPlan, Waiting};
use super::sequence::{Choice, Sequence};

/// Sampling threads take at least this many sequences each (a thread costs more to start than
/// a few samples take).
const SEQUENCES_PER_SAMPLING_THREAD: usize = 4;

/// The longest chunk of a scored prompt on a graph that returns every position's logits: each
/// position's logits come to the host (Qwen3's 151,936 floats, 0.6 MB) and are scored within the
/// step, so a chunk of the prefill budget's size would stall every stream for hundreds of
/// milliseconds and hold gigabytes.
const SCORED_CHUNK_TOKENS: usize = 128;
/// A step is logged as slow when it takes this many times the decode run's average, and at
/// least [`SLOW_STEP_MIN`]: a stall (an allocation, a copy, a capture) shows with its cause.
const SLOW_STEP_FACTOR: f64 = 8.0;
const SLOW_STEP_MIN: Duration = Duration::from_millis(100);
/// Stalls logged at `info` at most once per this interval (the others at `debug`, and counted in
/// the next `info` line): a CPU serving a large model stalls on every long prefill.
const SLOW_STEP_INFO_EVERY: Duration = Duration::from_secs(10);

/// Rate-limits the `info` lines of stalled steps.
#[derive(Debug, Default)]
struct StallLog {
    last_info: Option<Instant>,
    /// Stalls since the last `info` line that went to `debug`.
    quiet: u64,
}

impl StallLog {
    /// For a stall at `now`: Some(stalls not shown at `info` since the last one) when this one
    /// goes to `info`, None when it goes to `debug`.
    fn info_now(&mut self, now: Instant) -> Option<u64> {
        match self.last_info {
            Some(last) if now.duration_since(last) < SLOW_STEP_INFO_EVERY => {
                self.quiet += 1;
                None
            }
            _ => {
                self.last_info = Some(now);
                Some(std::mem::take(&mut self.quiet))
            }
        }
    }
}

pub(crate) enum Command {
    /// Requests queued together (in order).
    Submit(Vec<Sequence>),
    Shutdown,
}

/// What the worker shares with the engine's handles.
pub(crate) struct Shared {
    pub metrics: Mutex<MetricsSnapshot>,
    /// Requests submitted and not yet admitted (the admission queue's length).
    pub waiting: AtomicUsize,
    /// Slots held by sequences.
    pub active: AtomicUsize,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Shared {
            metrics: Mutex::new(MetricsSnapshot::new()),
            waiting: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
        }
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let mut m = match self.metrics.lock() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        m.requests_waiting = self.waiting.load(Ordering::Acquire);
        m
    }
}

struct Worker {
    runner: Runner,
    shared: Arc<Shared>,
    pacer: PrefillPacer,
    stalls: StallLog,
    waiting: VecDeque<Sequence>,
    /// Sequences holding a slot, in admission order.
    running: Vec<Sequence>,
    metrics: MetricsSnapshot,
}

/// Runs steps until shut down (a `Shutdown` command, or every engine handle gone).
pub(crate) fn run(runner: Runner, commands: Receiver<Command>, shared: Arc<Shared>, pacer: PrefillPacer) {
    let metrics = shared.snapshot();
    let mut worker = Worker {
        runner,
        shared,
        pacer,
        stalls: StallLog::default(),
        waiting: VecDeque::new(),
        running: Vec::new(),
        metrics,
    };
    loop {
        if worker.waiting.is_empty() && worker.running.is_empty() {
            match commands.recv() {
                Ok(Command::Submit(seqs)) => worker.waiting.extend(seqs),
                Ok(Command::Shutdown) | Err(_) => break,
            }
        }
        if read_queued(&commands, &mut worker.waiting) {
            break;
        }
        worker.step();
        worker.publish();
    }
    // Requests submitted before the engine closed but not yet read are failed with the rest.
    read_queued(&commands, &mut worker.waiting);
    worker.shut_down();
}

/// Reads every command already queued, submitted requests into `waiting`; whether one said to
/// stop (or every handle is gone).
fn read_queued(commands: &Receiver<Command>, waiting: &mut VecDeque<Sequence>) -> bool {
    let mut stop = false;
    loop {
        match commands.try_recv() {
            Ok(Command::Submit(seqs)) => waiting.extend(seqs),
            Ok(Command::Shutdown) => stop = true,
            Err(TryRecvError::Disconnected) => return true,
            Err(TryRecvError::Empty) => return stop,
        }
    }
}

impl Worker {
    fn step(&mut self) {
        let start = Instant::now();
        self.drop_cancelled();
        self.store_finished_prefixes();
        let stored = start.elapsed();
        let plan = self.plan();
        self.apply(&plan);
        let admitted = start.elapsed();
        let mut decode_time = Duration::ZERO;
        if !plan.decode.is_empty() {
            let t = Instant::now();
            self.decode(&plan);
            decode_time = t.elapsed();
            self.pacer.decode_ran(decode_time);
        }
        let t = Instant::now();
        let runs_alone = |id| self.running.iter().any(|s| s.id == id && s.runs_alone());
        let runs = prefill_runs(&plan.prefill, runs_alone);
        for run in &runs {
            let scored = run.iter().any(|c| self.running.iter().any(|s| s.id == c.id && s.wants_prompt_logprobs()));
            let run_start = Instant::now();
            self.prefill_run(run);
            // A scored run's time holds its logits' transfer and scoring, which no other run pays:
            // it would skew the pacer's cost of a run.
            if !scored {
                self.pacer.chunk_ran(run.iter().map(|c| c.len).sum(), run_start.elapsed());
            }
        }
        self.metrics.prefill_chunks += plan.prefill.len() as u64;
        self.metrics.prefill_runs += runs.len() as u64;
        let prefill_time = t.elapsed();
        self.metrics.steps += 1;
        let total = start.elapsed();
        // Every step's breakdown at `trace` (where a prefix hit's or a first token's time goes);
        // slow ones as below.
        let slow = total >= SLOW_STEP_MIN;
        if !slow && !tracing::enabled!(tracing::Level::TRACE) {
            return;
        }
        let typical_ms = self.pacer.decode_ms().unwrap_or(0.0);
        let line = format!(
            "engine step {}: {:.1} ms (prefix-cache stores {:.1} ms, admission {:.1} ms for {} requests, decode {:.1} ms for {} sequences, prefill {:.1} ms for {} tokens in {} chunks, {} runs; decode runs average {:.1} ms)",
            self.metrics.steps,
            ms(total),
            ms(stored),
            ms(admitted - stored),
            plan.admitted.len(),
            ms(decode_time),
            plan.decode.len(),
            ms(prefill_time),
            plan.prefill_tokens(),
            plan.prefill.len(),
            runs.len(),
            typical_ms,
        );
        if !slow {
            tracing::trace!("{line}");
            return;
        }
        let stalled = !plan.decode.is_empty() && ms(total) >= SLOW_STEP_FACTOR * typical_ms;
        match if stalled { self.stalls.info_now(Instant::now()) } else { None } {
            Some(0) => tracing::info!("slow {line}"),
            Some(quiet) => tracing::info!("slow {line}; {quiet} more stalls since the last one shown"),
            None => tracing::debug!("slow {line}"),
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.is_cancelled());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.shared.waiting.fetch_sub(gone, Ordering::AcqRel);
            self.metrics.finished.cancelled += gone as u64;
        }
        for seq in &mut self.running {
            if seq.phase != Phase::Finished && seq.is_cancelled() {
                // Nothing is sent: no one listens.
                let _ = seq.finish(FinishReason::Cancelled, false, &mut self.metrics);
            }
        }
    }

    /// Offers finished sequences' KV to the prefix cache before their slots are given back.
    fn store_finished_prefixes(&mut self) {
        for seq in self.running.iter_mut().filter(|s| s.phase == Phase::Finished && !s.stored) {
            seq.stored = true;
            if let Err(e) = self.runner.store_prefix(seq.slot, seq.kv_tokens(), &seq.kv_keys()) {
                tracing::warn!("the prefix cache could not keep a finished sequence's KV: {e:#}");
            }
        }
    }

    fn plan(&mut self) -> StepPlan {
        let finished = self.running.iter().filter(|s| s.phase == Phase::Finished).count();
        let free = self.runner.pool().free_slots();
        // Only the requests that could get a slot this step are looked up.
        let admissible = free.len() + finished;
        let waiting: Vec<Waiting> = self
            .waiting
            .iter()
            .take(admissible)
            .map(|s| Waiting {
                id: s.id,
                prompt_len: s.prompt().len(),
                // Every position of a scored prompt runs: a hit would skip their logits.
                cached: if s.wants_prompt_logprobs() { 0 } else { self.runner.lookup(s.prompt(), &s.prompt_keys) },
                runs_alone: s.runs_alone(),
                max_chunk: self.max_chunk(s),
            })
            .collect();
        let running: Vec<Running> = self
            .running
            .iter()
            .map(|s| Running { id: s.id, slot: s.slot, phase: s.phase, max_chunk: self.max_chunk(s) })
            .collect();
        let decoding = self.running.iter().filter(|s| s.phase == Phase::Decode).count();
        let prefilling = self.running.iter().filter(|s| matches!(s.phase, Phase::Prefill { .. })).count();
        let catch_up = self.pacer.catches_up(decoding, waiting.len() + prefilling);
        plan_step(&waiting, &running, &free, self.pacer.budget(decoding > 0 && !catch_up))
    }

    /// A sequence's own cap on its chunks when its prompt is scored: one token on a graph that
    /// returns only the last position's logits (each run then scores one position), else
    /// [`SCORED_CHUNK_TOKENS`] (each position's logits come to the host and are scored before the
    /// step ends).
    fn max_chunk(&self, seq: &Sequence) -> Option<usize> {
        let last_only = self.runner.model().manifest.options.last_token_logits;
        seq.wants_prompt_logprobs().then_some(if last_only { 1 } else { SCORED_CHUNK_TOKENS })
    }

    /// Releases and admissions.
    fn apply(&mut self, plan: &StepPlan) {
        for &(id, slot) in &plan.released {
            self.running.retain(|s| s.id != id);
            if let Err(e) = self.runner.release(slot) {
                tracing::error!("cannot reset slot {slot}: {e:#}");
            }
        }
        for admission in &plan.admitted {
            // The plan admits from the front, in order.
            let Some(mut seq) = self.waiting.pop_front() else { break };
            debug_assert_eq!(seq.id, admission.id);
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            if let Err(e) = self.runner.take(admission.slot) {
                seq.admit(admission.slot, 0);
                seq.fail(EngineError::model_failed("starting the KV cache over for the request", e), &mut self.metrics);
                self.running.push(seq);
                continue;
            }
            self.metrics.prompt_tokens += seq.prompt().len() as u64;
            // A scored prompt never looks the cache up.
            if !seq.wants_prompt_logprobs() {
                self.metrics.prefix_cache_queried_tokens += seq.prompt().len() as u64;
            }
            let cached = match self.runner.load_prefix(admission.slot, seq.prompt(), &seq.prompt_keys, admission.cached)
            {
                Ok(n) => n,
                Err(e) => {
                    seq.admit(admission.slot, 0);
                    seq.fail(
                        EngineError::model_failed("copying cached KV into the request's slot", e),
                        &mut self.metrics,
                    );
                    self.running.push(seq);
                    continue;
                }
            };
            self.metrics.prefix_cache_hit_tokens += cached as u64;
            seq.admit(admission.slot, cached);
            self.running.push(seq);
        }
    }

    fn decode(&mut self, plan: &StepPlan) {
        let decoding = |s: &Sequence| s.phase == Phase::Decode && plan.decode.contains(&s.id);
        let n = self.running.iter().filter(|s| decoding(s)).map(|s| s.slot + 1).max().unwrap_or(0);
        let rows_len = self.runner.decode_rows(n);
        let mut rows = vec![DecodeRow::idle(0); rows_len];
        for seq in &self.running {
            if seq.slot >= rows_len || seq.phase == Phase::Finished {
                continue;
            }
            rows[seq.slot] = if decoding(seq) {
                DecodeRow::decode(seq.next_input(), seq.filled, seq.rope_delta())
            } else {
                DecodeRow::idle(seq.filled)
            };
        }
        let all_greedy = self.running.iter().filter(|s| decoding(s)).all(|s| s.fetch() == Fetch::Greedy);
        let fetch = if all_greedy { Fetch::Greedy } else { Fetch::Logits };
        match self.runner.decode(&rows, fetch) {
            Ok((output, apart)) => {
                self.metrics.decode_rows_run_apart += apart as u64;
                let mut decoded: Vec<&mut Sequence> = self.running.iter_mut().filter(|s| decoding(s)).collect();
                for seq in decoded.iter_mut() {
                    seq.filled += 1;
                }
                Self::choose_all(&mut decoded, &output, &mut self.metrics);
            }
            Err(e) => {
                let error = EngineError::model_failed("the batched decode step failed", e);
                for seq in self.running.iter_mut().filter(|s| decoding(s)) {
                    seq.fail(error.clone(), &mut self.metrics);
                }
            }
        }
    }

    /// One run of [`prefill_runs`]: a lone chunk, or chunks batched into one graph run. A chunk
    /// that cannot batch (a prompt with images; a scored prompt, whose run fetches every
    /// position's logits; a sequence that failed at admission) runs alone,
    /// and the chunks on either side of it as runs of their own, as the scheduler's budget
    /// counted them.
    fn prefill_run(&mut self, run: &[PrefillChunk]) {
        let batchable = |w: &Self, c: &PrefillChunk| {
            w.running.iter().position(|s| s.id == c.id && s.phase != Phase::Finished && !s.runs_alone())
        };
        let mut rest = run;
        while let Some(first) = rest.first() {
            let rows: Vec<usize> = rest.iter().map_while(|c| batchable(self, c)).collect();
            if rows.len() > 1 {
                let (stretch, after) = rest.split_at(rows.len());
                self.prefill_batched(stretch, &rows);
                rest = after;
            } else {
                self.prefill(first.id, first.start, first.len);
                rest = &rest[1..];
            }
        }
    }

    /// Chunks of one run (first chunks of their prompts, one length, consecutive slots) of the
    /// sequences at `rows` of `running`, as one graph run.
    fn prefill_batched(&mut self, run: &[PrefillChunk], rows: &[usize]) {
        let mut tokens = Vec::with_capacity(run.iter().map(|c| c.len).sum());
        let mut pasts = Vec::with_capacity(run.len());
        let mut fetch = Fetch::Greedy;
        for (chunk, &i) in run.iter().zip(rows) {
            let seq = &self.running[i];
            debug_assert_eq!(chunk.start, seq.filled);
            tokens.extend_from_slice(&seq.prompt()[chunk.start..chunk.start + chunk.len]);
            pasts.push(chunk.start);
            if seq.prefill_fetch(chunk.start + chunk.len == seq.prompt().len()) == Fetch::Logits {
                fetch = Fetch::Logits;
            }
        }
        let result = self
            .runner
            .prefill_rows(run[0].slot, tokens, pasts, fetch)
            .map_err(|e| EngineError::model_failed("a batched prefill run failed", e));
        for (row, (chunk, &i)) in run.iter().zip(rows).enumerate() {
            let seq = &mut self.running[i];
            match &result {
                Ok(output) => Self::prefilled(seq, chunk.start, chunk.len, output, row, &mut self.metrics),
                Err(error) => seq.fail(error.clone(), &mut self.metrics),
            }
        }
    }

    /// `seq`'s chunk of `len` tokens from `start` ran as row `row` of a run: its prompt is in its
    /// slot up to `start + len`, its positions are scored when asked for, and once that is all of
    /// the prompt it chooses its first token from the run's output.
    fn prefilled(
        seq: &mut Sequence,
        start: usize,
        len: usize,
        output: &StepOutput,
        row: usize,
        metrics: &mut MetricsSnapshot,
    ) {
        let prompt_len = seq.prompt().len();
        let filled = start + len;
        seq.filled = filled;
        if seq.wants_prompt_logprobs() {
            let scored = match output {
                StepOutput::Logits(logits) => seq.score_prompt(logits, row, start, len),
                StepOutput::Greedy(_) => Err(EngineError::model_failed(
                    "scoring the prompt's tokens",
                    "a prefill run returned its argmax, not its logits",
                )),
            };
            if let Err(e) = scored {
                seq.fail(e, metrics);
                return;
            }
        }
        if filled == prompt_len {
            seq.phase = Phase::Decode;
            Self::choose(seq, output, row, metrics);
        } else {
            seq.phase = Phase::Prefill { done: filled, prompt_len };
        }
    }

    fn prefill(&mut self, id: u64, start: usize, len: usize) {
        let Some(seq) = self.running.iter_mut().find(|s| s.id == id && s.phase != Phase::Finished) else { return };
        let prompt_len = seq.prompt().len();
        debug_assert_eq!(start, seq.filled);
        let last = start + len == prompt_len;
        let fetch = seq.prefill_fetch(last);
        let tokens = seq.prompt()[start..start + len].to_vec();
        let images = seq.images.as_mut().map(|images| (images, &mut self.metrics));
        match self.runner.prefill(seq.slot, &tokens, start, fetch, images) {
            Ok(output) => Self::prefilled(seq, start, len, &output, 0, &mut self.metrics),
            Err(e) => seq.fail(EngineError::model_failed("a prefill chunk failed", e), &mut self.metrics),
        }
    }

    /// Each sequence chooses its next token from its slot's row of a decode step. Sampling from
    /// logits (a full-vocabulary pass per sequence) runs on several threads when many sequences
    /// sample: each has a sampler and seed of its own, so the split changes nothing they choose.
    fn choose_all(seqs: &mut [&mut Sequence], output: &StepOutput, metrics: &mut MetricsSnapshot) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = match output {
            StepOutput::Logits(_) => seqs.len().div_ceil(SEQUENCES_PER_SAMPLING_THREAD).min(cores),
            StepOutput::Greedy(_) => 1,
        };
        if threads <= 1 {
            for seq in seqs.iter_mut() {
                let row = seq.slot;
                Self::choose(seq, output, row, metrics);
            }
            return;
        }
        let per_thread = seqs.len().div_ceil(threads);
        let partials: Vec<MetricsSnapshot> = std::thread::scope(|scope| {
            let workers: Vec<_> = seqs
                .chunks_mut(per_thread)
                .map(|chunk| {
                    scope.spawn(move || {
                        let mut m = MetricsSnapshot::new();
                        for seq in chunk.iter_mut() {
                            let row = seq.slot;
                            Self::choose(seq, output, row, &mut m);
                        }
                        m
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
        });
        for partial in &partials {
            metrics.absorb(partial);
        }
    }

    /// `seq` chooses its next token from row `row` of a step's output.
    fn choose(seq: &mut Sequence, output: &StepOutput, row: usize, metrics: &mut MetricsSnapshot) {
        let choice = match output {
            StepOutput::Greedy(tokens) => tokens.get(row).copied().map(Choice::Token),
            StepOutput::Logits(logits) => (row < logits.batch).then(|| Choice::Logits(logits.last_of(row))),
        };
        let result = match choice {
            Some(choice) => seq.accept(choice, metrics).map(|_| ()),
            None => {
                Err(EngineError::model_failed("reading a step's output", format!("the step returned no row {row}")))
            }
        };
        if let Err(e) = result {
            seq.fail(e, metrics);
        }
    }

    fn publish(&mut self) {
        let pool = self.runner.pool();
        let used = pool.slots_in_use();
        self.metrics.requests_running = self.running.iter().filter(|s| s.phase != Phase::Finished).count();
        self.metrics.kv_cache_usage = used as f64 / pool.plan().slots.max(1) as f64;
        self.metrics.prefix_cache_bytes = self.runner.prefix_cache_bytes();
        self.metrics.encoder_cache_bytes = self.runner.encoder_cache_bytes();
        match self.shared.metrics.lock() {
            Ok(mut m) => *m = self.metrics.clone(),
            Err(poisoned) => *poisoned.into_inner() = self.metrics.clone(),
        }
        // After the metrics: whoever sees the slots free sees the metrics of that step.
        self.shared.active.store(used, Ordering::Release);
    }

    /// Ends every request with `Shutdown`.
    fn shut_down(&mut self) {
        let waiting = self.waiting.len();
        for seq in self.waiting.iter_mut().chain(self.running.iter_mut()) {
            if seq.phase != Phase::Finished {
                seq.fail(EngineError::Shutdown, &mut self.metrics);
            }
        }
        self.shared.waiting.fetch_sub(waiting, Ordering::AcqRel);
        self.waiting.clear();
        self.running.clear();
        self.publish();
        self.shared.active.store(0, Ordering::Release);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_reach_info_once_per_interval_and_count_the_rest() {
        let mut log = StallLog::default();
        let t0 = Instant::now();
        assert_eq!(log.info_now(t0), Some(0));
        assert_eq!(log.info_now(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.info_now(t0 + Duration::from_secs(9)), None);
        assert_eq!(log.info_now(t0 + SLOW_STEP_INFO_EVERY), Some(2));
        assert_eq!(log.info_now(t0 + 3 * SLOW_STEP_INFO_EVERY), Some(0));
    }
}
