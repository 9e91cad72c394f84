//! Prefill pacing: how much a step may prefill while other sequences decode, so that the step
//! (their inter-token latency) stays within a set multiple of a decode-only step.
//!
//! This is Sarathi-Serve's rule (the prefill budget follows from the latency target), with the
//! times measured as the engine runs rather than profiled once. A prefill chunk runs on its own
//! (batch 1, after the batched decode), so it costs a fixed part, whatever its length (every
//! weight is read once, every layer's kernels launched), plus a part per token. The pacer fits
//! that line to recent chunks (least squares, recent runs weighing more), keeps a moving average
//! of the decode run, and hands the scheduler a [`PrefillBudget`] in tokens: the time a step may
//! add over the per-token time, with each chunk's fixed part in the same unit. A fixed token
//! budget cannot do this: 512 tokens cost a 4B model on an H100 three decode steps, and a CPU
//! thirty.

use std::time::Duration;

use super::scheduler::PrefillBudget;

/// Prompt tokens a step may always prefill while sequences decode, however slow chunks are: a
/// long prompt must still make progress.
pub(crate) const MIN_PACED_CHUNK: usize = 16;
/// Weight of the newest decode time in its moving average.
const DECODE_SMOOTHING: f64 = 0.2;
/// How much an older prefill run weighs in the fit, per newer run (about the last 20 count).
const FIT_DECAY: f64 = 0.95;

/// `time = fixed + per_token * tokens`, fitted to observations by weighted least squares.
#[derive(Clone, Debug, Default)]
struct LineFit {
    w: f64,
    k: f64,
    t: f64,
    kk: f64,
    kt: f64,
}

impl LineFit {
    fn add(&mut self, tokens: f64, ms: f64) {
        let d = FIT_DECAY;
        self.w = self.w * d + 1.0;
        self.k = self.k * d + tokens;
        self.t = self.t * d + ms;
        self.kk = self.kk * d + tokens * tokens;
        self.kt = self.kt * d + tokens * ms;
    }

    /// (fixed ms, ms per token), once a run was seen. Runs all of one length, or a fit that
    /// comes out with a negative part, give the line through the origin (all cost per token),
    /// which overstates small chunks' cost: it errs on the side of the latency.
    fn line(&self) -> Option<(f64, f64)> {
        if self.kk <= 0.0 {
            return None;
        }
        let through_origin = (0.0, self.kt / self.kk);
        let det = self.w * self.kk - self.k * self.k;
        if det <= 1e-9 * self.w * self.kk {
            return Some(through_origin);
        }
        let per_token = (self.w * self.kt - self.k * self.t) / det;
        let fixed = (self.t - per_token * self.k) / self.w;
        if per_token > 0.0 && fixed >= 0.0 {
            Some((fixed, per_token))
        } else {
            Some(through_origin)
        }
    }
}

/// Measures decode runs and prefill runs and turns a latency factor into a step's budget.
#[derive(Clone, Debug)]
pub(crate) struct PrefillPacer {
    /// Prompt tokens per step at most while sequences decode (`--prefill-budget`).
    cap: usize,
    /// Prompt tokens per step at most when none decodes (`--idle-prefill-budget`).
    idle_cap: usize,
    /// Prompt tokens of one sequence per step at most while sequences decode
    /// (`--long-prefill-token-threshold`; `usize::MAX`: no cap beyond `cap`). Not when none
    /// decodes: no stream's latency is at stake then, and a lone prompt should finish soonest.
    /// The scheduler lifts it when several long prompts could run (see `plan_step`).
    per_sequence: usize,
    /// A step that prefills while sequences decode takes at most this times a decode-only step;
    /// None: only `cap` counts.
    factor: Option<f64>,
    /// Prompts to prefill at or above this times the decoding sequences get the idle cap in one
    /// step (TGI's `waiting_served_ratio`); None: never while sequences decode.
    catch_up: Option<f64>,
    decode_ms: Option<f64>,
    chunks: LineFit,
}

impl PrefillPacer {
    pub(crate) fn new(cap: usize, idle_cap: usize, factor: Option<f64>, catch_up: Option<f64>) -> Self {
        PrefillPacer {
            cap,
            idle_cap,
            per_sequence: usize::MAX,
            factor,
            catch_up,
            decode_ms: None,
            chunks: LineFit::default(),
        }
    }

    /// At most `tokens` prompt tokens of one sequence per step while sequences decode (None: no
    /// cap beyond the prefill budget).
    pub(crate) fn with_per_sequence(mut self, tokens: Option<usize>) -> Self {
        self.per_sequence = tokens.unwrap_or(usize::MAX);
        self
    }

    /// Whether a step with `decoding` sequences decoding and `prompts` prompts still to prefill
    /// (waiting, or admitted and not done) prefills up to the idle cap, as if none decoded. A
    /// burst of requests then interrupts the running streams once, with one long step, instead
    /// of one step in every few for as long as the burst takes at `cap` tokens a step: an ITL
    /// percentile counts the slow steps a stream sees, not how slow the slowest was. A long
    /// prompt arriving alone among many streams does not qualify, and is chunked at `cap` (or at
    /// the per-sequence cap). Never with pacing on: pacing bounds every step, which one long step
    /// would break.
    pub(crate) fn catches_up(&self, decoding: usize, prompts: usize) -> bool {
        self.factor.is_none()
            && decoding > 0
            && prompts > 0
            && self.catch_up.is_some_and(|ratio| prompts as f64 >= ratio * decoding as f64)
    }

    /// A batched decode run took `elapsed`.
    pub(crate) fn decode_ran(&mut self, elapsed: Duration) {
        let ms = elapsed.as_secs_f64() * 1e3;
        self.decode_ms = Some(match self.decode_ms {
            Some(avg) => avg + DECODE_SMOOTHING * (ms - avg),
            None => ms,
        });
    }

    /// A prefill run of `tokens` tokens (one chunk, or several batched) took `elapsed`.
    pub(crate) fn chunk_ran(&mut self, tokens: usize, elapsed: Duration) {
        if tokens > 0 {
            self.chunks.add(tokens as f64, elapsed.as_secs_f64() * 1e3);
        }
    }

    /// The decode run's moving average, in ms.
    pub(crate) fn decode_ms(&self) -> Option<f64> {
        self.decode_ms
    }

    /// What the next step may prefill; `decoding`: whether sequences decode in it.
    pub(crate) fn budget(&self, decoding: bool) -> PrefillBudget {
        if !decoding {
            return PrefillBudget::tokens(self.idle_cap);
        }
        let full = PrefillBudget::tokens(self.cap).per_sequence(self.per_sequence);
        let Some(factor) = self.factor else { return full };
        let (Some(step_ms), Some((fixed_ms, per_token_ms))) = (self.decode_ms, self.chunks.line()) else {
            return full;
        };
        let room_ms = (factor - 1.0).max(0.0) * step_ms;
        // In tokens; bounded so that a near-zero per-token time cannot overflow.
        let tokens = |ms: f64| (ms / per_token_ms).clamp(0.0, 1e9) as usize;
        let chunk_overhead = tokens(fixed_ms).min(self.cap);
        let cost = tokens(room_ms).max(chunk_overhead + MIN_PACED_CHUNK.min(self.cap));
        PrefillBudget { cost, chunk_overhead, ..full }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1e3)
    }

    #[test]
    fn the_fit_finds_the_fixed_and_per_token_parts() {
        let mut fit = LineFit::default();
        assert_eq!(fit.line(), None);
        for k in [512.0, 128.0, 200.0, 64.0, 300.0] {
            fit.add(k, 2.5 + 0.025 * k);
        }
        let (fixed, per_token) = fit.line().unwrap();
        assert!((fixed - 2.5).abs() < 1e-6, "{fixed}");
        assert!((per_token - 0.025).abs() < 1e-9, "{per_token}");
        // One length only: the line through the origin, exact at that length.
        let mut same = LineFit::default();
        same.add(100.0, 5.0);
        same.add(100.0, 5.0);
        assert_eq!(same.line(), Some((0.0, 0.05)));
    }

    #[test]
    fn the_per_sequence_cap_applies_only_while_sequences_decode() {
        let capped = PrefillPacer::new(512, 2048, None, None).with_per_sequence(Some(128));
        assert_eq!(capped.budget(true), PrefillBudget::tokens(512).per_sequence(128));
        assert_eq!(capped.budget(false), PrefillBudget::tokens(2048), "nothing decodes: no cap");
        let mut paced = PrefillPacer::new(512, 2048, Some(3.0), None).with_per_sequence(Some(128));
        paced.decode_ran(ms(4.0));
        for k in [64.0, 128.0, 256.0] {
            paced.chunk_ran(k as usize, ms(2.0 + 0.02 * k));
        }
        assert_eq!(paced.budget(true).per_sequence, 128);
        let uncapped = PrefillPacer::new(512, 2048, None, None).with_per_sequence(None);
        assert_eq!(uncapped.budget(true), PrefillBudget::tokens(512));
    }

    #[test]
    fn without_decoding_or_a_factor_the_budget_is_the_cap() {
        let mut off = PrefillPacer::new(512, 2048, None, None);
        off.decode_ran(ms(5.0));
        off.chunk_ran(512, ms(15.0));
        assert_eq!(off.budget(true), PrefillBudget::tokens(512));
        assert_eq!(off.budget(false), PrefillBudget::tokens(2048), "no stream decodes: the idle cap");
        let mut on = PrefillPacer::new(512, 512, Some(2.0), None);
        assert_eq!(on.budget(true), PrefillBudget::tokens(512), "nothing measured yet");
        on.decode_ran(ms(5.0));
        on.chunk_ran(512, ms(15.0));
        assert_eq!(on.budget(false), PrefillBudget::tokens(512));
        assert_ne!(on.budget(true), PrefillBudget::tokens(512));
    }

    #[test]
    fn a_paced_step_converges_to_the_chunk_that_fills_the_room() {
        // Decode 5 ms; a chunk of k tokens 2.5 + 0.025 k ms; factor 2: 5 ms of room, so the
        // chunk that fits is (5 - 2.5) / 0.025 = 100 tokens. The pacer starts from a full
        // 512-token chunk and chunks of what it allows.
        let chunk_ms = |k: usize| 2.5 + 0.025 * k as f64;
        let mut pacer = PrefillPacer::new(512, 512, Some(2.0), None);
        pacer.decode_ran(ms(5.0));
        pacer.chunk_ran(512, ms(chunk_ms(512)));
        let mut k = 0;
        for _ in 0..6 {
            let b = pacer.budget(true);
            k = b.chunk(usize::MAX);
            pacer.chunk_ran(k, ms(chunk_ms(k)));
        }
        assert!((99..=101).contains(&k), "{k}");
        let b = pacer.budget(true);
        assert!((99..=100).contains(&b.chunk_overhead), "2.5 ms at 0.025 ms a token: {b:?}");
        // Two chunks of 50 cost more than one of 100: the overhead counts twice.
        assert!(2 * (b.chunk_overhead + 50) > b.cost);
    }

    #[test]
    fn slow_chunks_still_get_the_minimum() {
        // A chunk's fixed part alone is over the room: the minimum chunk still runs.
        let mut pacer = PrefillPacer::new(512, 512, Some(1.5), None);
        pacer.decode_ran(ms(5.0));
        pacer.chunk_ran(100, ms(10.0));
        pacer.chunk_ran(400, ms(13.0));
        let b = pacer.budget(true);
        assert_eq!(b.cost - b.chunk_overhead, MIN_PACED_CHUNK);
        // A cap under the minimum wins.
        let mut tiny = PrefillPacer::new(7, 7, Some(1.5), None);
        tiny.decode_ran(ms(5.0));
        tiny.chunk_ran(7, ms(10.0));
        let b = tiny.budget(true);
        assert_eq!(b.tokens, 7);
        assert!(b.cost >= b.chunk_overhead + 7);
    }

    #[test]
    fn a_burst_of_prompts_catches_up_a_lone_long_prompt_does_not() {
        let pacer = PrefillPacer::new(512, 4096, None, Some(1.2));
        // 22 prompts arrived while the first 10 streams decode: one step at the idle cap.
        assert!(pacer.catches_up(10, 22));
        assert!(pacer.catches_up(10, 12), "exactly at the ratio");
        // One 4,096-token prompt among 31 streams: chunked at the budget.
        assert!(!pacer.catches_up(31, 1));
        assert!(!pacer.catches_up(10, 11));
        // Nothing decodes or nothing waits: not a catch-up (the idle cap applies anyway).
        assert!(!pacer.catches_up(0, 5));
        assert!(!pacer.catches_up(5, 0));
        assert!(!PrefillPacer::new(512, 4096, None, None).catches_up(1, 100), "off");
        assert!(!PrefillPacer::new(512, 4096, Some(2.0), Some(1.2)).catches_up(1, 100), "pacing on");
    }
}
