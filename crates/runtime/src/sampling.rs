//! Rust-side token sampling over the full vocabulary (e.g. 151,936 entries for Qwen3), following
//! Hugging Face transformers' `generate` logits processors / warpers, with OpenAI/vLLM-style
//! presence and frequency penalties on top.
//!
//! # Order of operations (one call = one token)
//!
//! 0. **Logit bias** (OpenAI's `logit_bias`): `logit += bias` for the listed ids, before anything
//!    else, as vLLM applies it (so the penalties below act on the biased logit). A bias of -100
//!    bans a token in practice, +100 all but forces it.
//! 1. **Repetition penalty** (HF `RepetitionPenaltyLogitsProcessor`): for every *distinct* token
//!    id in `previous_tokens` (prompt + generated), `logit = if logit < 0 { logit * penalty }
//!    else { logit / penalty }`. Applied once per distinct id, however often it occurs.
//! 2. **Frequency, then presence penalty** (OpenAI / vLLM definition), counted over the
//!    *generated* tokens only (`previous_tokens[prompt_len..]`, see [`Sampler::set_prompt_len`]):
//!    `logit -= frequency_penalty * count; logit -= presence_penalty * (count > 0)`.
//! 3. **Greedy** (`temperature == 0`, see [`SamplingParams::is_greedy`]): argmax of the penalized
//!    logits, ties broken towards the lowest token id (as `torch.argmax`). Nothing below applies.
//! 4. **Temperature**: `logit / temperature` (a real division, as HF `TemperatureLogitsWarper`).
//! 5. **top-k** (HF `TopKLogitsWarper`): keep tokens whose logit is `>=` the k-th largest logit,
//!    so ties at the k-th value are all kept, exactly like HF.
//! 6. **top-p** (HF `TopPLogitsWarper`): on the softmax of what top-k kept, keep the smallest
//!    prefix of the tokens sorted by probability (descending) whose mass is `>= top_p`; i.e. a
//!    token is kept iff the mass of the tokens ranked strictly before it is `< top_p`. The most
//!    likely token is always kept (`min_tokens_to_keep = 1`).
//! 7. **min-p** (HF `MinPLogitsWarper`): drop tokens whose probability is `< min_p * max_prob`,
//!    measured on the post-temperature distribution (the ratio is unaffected by renormalization).
//! 8. **Sample** from the renormalized softmax of the survivors (ChaCha8 RNG, f64 inverse CDF).
//!
//! Sanitization: a NaN (processed) logit is treated as `-inf` and `+inf` is clamped to `f32::MAX`,
//! after each arithmetic step, so a single bad value can never poison the distribution.
//!
//! # Deviations from HF / vLLM (all deliberate, all documented here)
//!
//! * Ties: HF uses an unstable `torch.sort`, so which of several *equally likely* tokens survive
//!   at the top-p boundary is unspecified there. Here the order is "probability descending, then
//!   token id ascending", so the lower ids are kept. top-k and min-p keep all ties, as HF does.
//! * Temperatures below [`GREEDY_TEMPERATURE_EPS`] (1e-5) are treated as 0 = greedy, like vLLM
//!   (HF rejects temperature 0 and would overflow on tiny temperatures).
//! * Probabilities are computed as `exp(l - max)` in f32 with a Cephes-style polynomial (max
//!   relative error ~2e-7, not bit-identical to libm); values below `e^-87` relative to the best
//!   token flush to 0. Normalizers, top-p prefix masses and the sampling CDF are accumulated in
//!   f64 from those f32 probabilities, so a top-p decision can differ from HF's f32 `cumsum` only
//!   when a prefix mass is within float rounding (~1e-7 relative) of `top_p`. (In the tests the
//!   kept sets equal a brute-force f64 full-sort reference exactly, ties included.)
//! * Presence / frequency penalties do not exist in HF `generate`; they follow vLLM/OpenAI
//!   (generated tokens only, applied after the repetition penalty, as vLLM does).
//!
//! # Log-probabilities
//!
//! [`Sampler::sample_with_logprobs`] returns `log_softmax` of the **biased, penalized,
//! temperature-scaled, unfiltered** logits (steps 0, 1, 2 and 4 applied; top-k / top-p / min-p not
//! applied). This sits between vLLM's `raw_logprobs` (nothing applied) and `processed_logprobs`
//! (filters applied, so filtered tokens get `-inf`). In greedy mode there is no temperature, so
//! the log-softmax of the penalized logits is returned.
//!
//! # Performance
//!
//! No per-token allocation in steady state: all scratch buffers live in the [`Sampler`]. The
//! vocabulary is never fully sorted: top-k and top-n use a streaming threshold + `select_nth`;
//! top-p collects the tokens within 16 nats of the best one while computing the softmax
//! normalizer (one pass), widens only if their mass falls short, bisects huge candidate sets
//! (flat distributions) and sorts only the small set straddling the boundary; min-p is a plain
//! threshold. Penalties touch only the distinct ids in the history through a reusable
//! vocab-sized count table. The full-vocabulary passes are plain loops that LLVM auto-vectorizes;
//! on x86-64 they are compiled twice and the AVX2 copy is picked at run time when available.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Defines `fn $name(..) -> $ret` running `$imp` (which must be `#[inline(always)]`) compiled
/// with AVX2 when the CPU has it (runtime check, cached by std), else the portable build.
/// The kernels are plain element-wise loops that LLVM auto-vectorizes either way; AVX2 doubles
/// the lane count of the exp / compare passes. Results are bit-identical (no FMA contraction).
macro_rules! dispatch_avx2 {
    ($(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty => $imp:path) => {
        $(#[$attr])*
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: `avx2` only needs the AVX2 target feature, and this CPU was just
                    // checked to support it.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
    ($(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $imp:path) => {
        dispatch_avx2! { $(#[$attr])* fn $name($($arg: $ty),*) -> () => $imp }
    };
}

/// Temperatures strictly below this are treated as 0, i.e. greedy decoding (same as vLLM).
pub const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;

/// Sampling configuration. Every filter has an "off" value, and the default is plain sampling at
/// temperature 1 with every filter and penalty off. **Temperature 0 means greedy** (argmax).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature, `>= 0`. 0 (anything below [`GREEDY_TEMPERATURE_EPS`]) = greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (ties at the k-th logit are kept). 0 = off.
    pub top_k: usize,
    /// Nucleus sampling mass in `(0, 1]`. 1.0 = off.
    pub top_p: f32,
    /// Drop tokens with `prob < min_p * max_prob`, in `[0, 1]`. 0 = off.
    pub min_p: f32,
    /// HF repetition penalty, `> 0`, over prompt + generated tokens. 1.0 = off.
    pub repetition_penalty: f32,
    /// OpenAI/vLLM presence penalty over generated tokens. 0 = off.
    pub presence_penalty: f32,
    /// OpenAI/vLLM frequency penalty over generated tokens. 0 = off.
    pub frequency_penalty: f32,
    /// RNG seed; `None` seeds from OS entropy.
    pub seed: Option<u64>,
    /// OpenAI's `logit_bias`: added to these token ids' logits before everything else, each in
    /// [-100, 100]. Empty = off. (In JSON a map from the id, as a string, to the bias.)
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub logit_bias: BTreeMap<u32, f32>,
}

/// The largest `|bias|` [`SamplingParams::logit_bias`] takes (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logit_bias: BTreeMap::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), no penalties.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// A checkpoint's `generation_config.json` sampling (as recorded in `pio.json`): greedy where
    /// it says `do_sample: false`, else its temperature, top-k, top-p, min-p and repetition
    /// penalty over the defaults.
    pub fn from_generation_config(g: &pio_models::manifest::GenerationSettings) -> Self {
        if !g.do_sample {
            return Self::greedy();
        }
        let mut p = Self::default();
        if let Some(t) = g.temperature {
            p.temperature = t as f32;
        }
        if let Some(t) = g.top_p {
            p.top_p = t as f32;
        }
        if let Some(k) = g.top_k {
            p.top_k = k;
        }
        if let Some(m) = g.min_p {
            p.min_p = m as f32;
        }
        if let Some(r) = g.repetition_penalty {
            p.repetition_penalty = r as f32;
        }
        p
    }

    /// True when `temperature` is 0 (or below [`GREEDY_TEMPERATURE_EPS`]): argmax decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPS
    }

    /// Greedy with no penalty or bias either: the choice is the plain argmax of the logits, which
    /// the graph can make itself (see [`crate::model::Fetch::Greedy`]).
    pub fn is_plain_argmax(&self) -> bool {
        self.is_greedy()
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.logit_bias.is_empty()
    }

    /// Checks every field's range; the error names the field and the offending value.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(SamplingError::invalid("temperature", t, "must be a finite number >= 0 (0 = greedy)"));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(SamplingError::invalid("top_p", p, "must be in (0, 1] (1 = off)"));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(SamplingError::invalid("min_p", m, "must be in [0, 1] (0 = off)"));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(SamplingError::invalid("repetition_penalty", r, "must be a finite number > 0 (1 = off)"));
        }
        if !self.presence_penalty.is_finite() {
            return Err(SamplingError::invalid("presence_penalty", self.presence_penalty, "must be finite (0 = off)"));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(SamplingError::invalid(
                "frequency_penalty",
                self.frequency_penalty,
                "must be finite (0 = off)",
            ));
        }
        if let Some((&id, &bias)) =
            self.logit_bias.iter().find(|(_, b)| !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(*b))
        {
            return Err(SamplingError::InvalidParam {
                field: "logit_bias",
                value: format!("{bias} for token {id}"),
                expected: "each bias must be a number in [-100, 100]",
            });
        }
        Ok(())
    }
}

/// Errors from [`SamplingParams::validate`] / [`Sampler::new`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("invalid sampling parameter `{field}` = {value}: {expected}")]
    InvalidParam { field: &'static str, value: String, expected: &'static str },
}

impl SamplingError {
    fn invalid(field: &'static str, value: f32, expected: &'static str) -> Self {
        Self::InvalidParam { field, value: value.to_string(), expected }
    }
}

/// One token with its log-probability (see the module docs for which distribution).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// A prompt token's logprob given the tokens before it (vLLM's `prompt_logprobs`; see
/// [`PromptScorer`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptTokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// vLLM's rank: how many tokens of the vocabulary have a logprob at least as high (1 for the
    /// most likely token).
    pub rank: usize,
    /// The most likely tokens at this position, most likely first (ties by id).
    pub top_logprobs: Vec<TokenLogprob>,
}

/// Scores prompt tokens against the raw logits of the positions before them: the model's own
/// log-softmax, without temperature, penalties or bias (vLLM's default `raw_logprobs`), as
/// lm-evaluation-harness reads them. Keeps its scratch between rows.
#[derive(Debug, Default)]
pub struct PromptScorer {
    s: Vec<f32>,
    idx: Vec<u32>,
    vals: Vec<f32>,
}

impl PromptScorer {
    /// `token`'s logprob under `logits` with the `top_n` most likely tokens. A token outside
    /// the row has logprob -inf and the lowest rank.
    pub fn score(&mut self, logits: &[f32], token: u32, top_n: usize) -> PromptTokenLogprob {
        self.s.resize(logits.len(), 0.0);
        let max = copy_max(logits, &mut self.s);
        let Some(&own) = self.s.get(token as usize).filter(|_| max > f32::NEG_INFINITY) else {
            return PromptTokenLogprob { token, logprob: f32::NEG_INFINITY, rank: logits.len(), top_logprobs: vec![] };
        };
        let log_z = exp_sum(&self.s, max).ln();
        let lp = |x: f32| ((x - max) as f64 - log_z) as f32;
        let rank = self.s.iter().filter(|&&x| x >= own).count();
        let mut top_logprobs = Vec::new();
        if top_n > 0 {
            top_k_indices(&self.s, top_n, &mut self.idx, &mut self.vals);
            let s = &self.s;
            self.idx.sort_unstable_by(|&a, &b| {
                s[b as usize].partial_cmp(&s[a as usize]).unwrap_or(Ordering::Equal).then(a.cmp(&b))
            });
            self.idx.truncate(top_n);
            top_logprobs.extend(self.idx.iter().map(|&i| TokenLogprob { token: i, logprob: lp(s[i as usize]) }));
        }
        PromptTokenLogprob { token, logprob: lp(own), rank, top_logprobs }
    }
}

/// Result of [`Sampler::sample_with_logprobs`]. `top_logprobs` borrows the sampler's scratch
/// buffer (copy it out if it must outlive the next call); sorted by logprob descending, then id.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled<'a> {
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: &'a [TokenLogprob],
}

/// A candidate token: id, processed (penalized, temperature-scaled) logit, `exp(logit - max)`.
#[derive(Clone, Copy, Debug)]
struct Cand {
    idx: u32,
    s: f32,
    e: f32,
}

/// Elements per processing block (also the granularity of the sampling CDF's block sums).
const BLOCK: usize = 2048;
/// Chunk size for the "any element above the threshold?" quick reject.
const CHUNK: usize = 64;
/// top-p: candidate sets larger than this are bisected before the final sort.
const BAND_MAX: usize = 2048;
/// top-p: tokens with log-probability at least this far below the best one's (`d = s - max >=
/// TOP_P_GATHER`) are collected while computing the softmax normalizer; the set is widened to
/// [`TOP_P_WIDEN`] thresholds only if their mass falls short of `top_p`.
const TOP_P_GATHER: f32 = -16.0;
const TOP_P_WIDEN: [f32; 3] = [-32.0, -64.0, -88.0];

/// Stateful sampler: parameters, a seeded ChaCha8 RNG and reusable scratch buffers.
///
/// `previous_tokens` passed to the sampling methods is the full history (prompt followed by
/// generated tokens). Its first [`prompt_len`](Sampler::set_prompt_len) entries count as prompt:
/// they get the repetition penalty but not presence/frequency penalties. With the default
/// `prompt_len` of 0 every previous token counts as generated.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    prompt_len: usize,
    /// Processed logits (penalized, temperature-scaled, sanitized).
    s: Vec<f32>,
    /// `exp(s - max)` for the full vocabulary when a full pass is needed.
    e: Vec<f32>,
    /// Per vocab id: 0 = not in history, else 1 + count in generated tokens. All zero between calls.
    marks: Vec<u32>,
    touched: Vec<u32>,
    idx: Vec<u32>,
    vals: Vec<f32>,
    band: Vec<Cand>,
    kept: Vec<Cand>,
    upper: Vec<Cand>,
    lower: Vec<Cand>,
    block_sums: Vec<f64>,
    top: Vec<TokenLogprob>,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("prompt_len", &self.prompt_len)
            .field("vocab", &self.s.len())
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// Validates `params` and seeds the RNG from `params.seed` (or OS entropy when `None`).
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Self {
            params,
            rng,
            prompt_len: 0,
            s: Vec::new(),
            e: Vec::new(),
            marks: Vec::new(),
            touched: Vec::new(),
            idx: Vec::new(),
            vals: Vec::new(),
            band: Vec::new(),
            kept: Vec::new(),
            upper: Vec::new(),
            lower: Vec::new(),
            block_sums: Vec::new(),
            top: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Number of leading `previous_tokens` that are prompt (no presence/frequency penalty).
    pub fn set_prompt_len(&mut self, prompt_len: usize) {
        self.prompt_len = prompt_len;
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Restarts the RNG stream from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    /// Samples one token id from `logits` (one row, full vocabulary) given the history
    /// `previous_tokens` (prompt + generated). History ids outside the vocabulary are ignored
    /// (with a warning). Degenerate input: empty logits, or logits that are all `-inf`/NaN,
    /// yield token 0 and an error/warning log.
    pub fn sample(&mut self, logits: &[f32], previous_tokens: &[u32]) -> u32 {
        self.run(logits, previous_tokens, false, 0).0
    }

    /// Like [`sample`](Self::sample), also returning the chosen token's logprob and the `top_n`
    /// most likely tokens with theirs (0 = none), all from `log_softmax` of the penalized,
    /// temperature-scaled, unfiltered logits (see the module docs).
    pub fn sample_with_logprobs(&mut self, logits: &[f32], previous_tokens: &[u32], top_n: usize) -> Sampled<'_> {
        let (token, logprob) = self.run(logits, previous_tokens, true, top_n);
        Sampled { token, logprob, top_logprobs: &self.top }
    }

    fn run(&mut self, logits: &[f32], previous: &[u32], want_logprobs: bool, top_n: usize) -> (u32, f32) {
        self.top.clear();
        if logits.is_empty() {
            tracing::error!("sampling called with empty logits; returning token 0");
            return (0, f32::NEG_INFINITY);
        }
        let greedy = self.params.is_greedy();
        let max = self.prepare(logits, previous, greedy);
        if max == f32::NEG_INFINITY {
            tracing::warn!(vocab = logits.len(), "all logits are -inf or NaN; returning token 0");
            return (0, f32::NEG_INFINITY);
        }
        let (token, z) = if greedy { (first_index_of(&self.s, max), None) } else { self.sample_processed(max) };
        if !want_logprobs {
            return (token, 0.0);
        }
        let z = match z {
            Some(z) => z,
            None => exp_sum(&self.s, max),
        };
        let log_z = z.ln();
        let lp = |s: f32| ((s - max) as f64 - log_z) as f32;
        let logprob = lp(self.s[token as usize]);
        if top_n > 0 {
            top_k_indices(&self.s, top_n, &mut self.idx, &mut self.vals);
            self.band.clear();
            self.band.extend(self.idx.iter().map(|&i| Cand { idx: i, s: self.s[i as usize], e: 0.0 }));
            self.band.sort_unstable_by(by_prob_desc);
            self.band.truncate(top_n);
            self.top.extend(self.band.iter().map(|c| TokenLogprob { token: c.idx, logprob: lp(c.s) }));
        }
        (token, logprob)
    }

    /// Fills `self.s` with the biased, penalized, temperature-scaled (unless greedy), sanitized
    /// logits and returns their maximum.
    fn prepare(&mut self, logits: &[f32], previous: &[u32], greedy: bool) -> f32 {
        let vocab = logits.len();
        self.s.resize(vocab, 0.0);
        if self.marks.len() != vocab {
            self.marks.clear();
            self.marks.resize(vocab, 0);
        }
        let temp = if greedy { 1.0 } else { self.params.temperature };
        let divide = temp != 1.0;
        let max = if divide { scale_max(logits, &mut self.s, temp) } else { copy_max(logits, &mut self.s) };

        let rep = self.params.repetition_penalty;
        let presence = self.params.presence_penalty;
        let frequency = self.params.frequency_penalty;
        let penalize = (rep != 1.0 || presence != 0.0 || frequency != 0.0) && !previous.is_empty();
        let bias = &self.params.logit_bias;
        if !penalize && bias.is_empty() {
            return max;
        }

        // Count distinct history ids (and generated occurrences) in the reusable table.
        self.touched.clear();
        if penalize {
            let (prompt, generated) = previous.split_at(self.prompt_len.min(previous.len()));
            let mut out_of_range = 0usize;
            if rep != 1.0 {
                for &t in prompt {
                    match self.marks.get_mut(t as usize) {
                        Some(m) if *m == 0 => {
                            *m = 1;
                            self.touched.push(t);
                        }
                        Some(_) => {}
                        None => out_of_range += 1,
                    }
                }
            }
            for &t in generated {
                match self.marks.get_mut(t as usize) {
                    Some(m) => {
                        if *m == 0 {
                            self.touched.push(t);
                            *m = 1;
                        }
                        *m += 1;
                    }
                    None => out_of_range += 1,
                }
            }
            if out_of_range > 0 {
                tracing::warn!(
                    out_of_range,
                    vocab,
                    "previous token ids outside the vocabulary were ignored by penalties"
                );
            }
        }

        // Each changed logit: bias on the raw logit, then the penalties (HF order), then
        // temperature. The history's ids reset the table as they go.
        let mut rewrite = MaxTracker::new(max);
        for (&t, &b) in bias {
            let i = t as usize;
            match self.marks.get(i) {
                // In the history: biased in the pass below, with its penalties.
                Some(&m) if m != 0 => {}
                Some(_) => {
                    let y = sanitize(if divide { (logits[i] + b) / temp } else { logits[i] + b });
                    rewrite.set(&mut self.s[i], y);
                }
                None => tracing::warn!(token = t, vocab, "a logit_bias id outside the vocabulary was ignored"),
            }
        }
        for &t in &self.touched {
            let i = t as usize;
            let count = self.marks[i] - 1;
            self.marks[i] = 0;
            let mut x = logits[i] + bias.get(&t).copied().unwrap_or(0.0);
            if rep != 1.0 {
                x = if x < 0.0 { x * rep } else { x / rep };
            }
            if count > 0 {
                x -= frequency * count as f32;
                x -= presence;
            }
            let y = sanitize(if divide { x / temp } else { x });
            rewrite.set(&mut self.s[i], y);
        }
        rewrite.max(&self.s)
    }

    /// Non-greedy path on the processed logits in `self.s`. Returns the token and, when a
    /// full-vocabulary exp pass was done, the softmax normalizer `sum(exp(s - max))`.
    fn sample_processed(&mut self, max: f32) -> (u32, Option<f64>) {
        let vocab = self.s.len();
        let top_k = self.params.top_k;
        let top_p = self.params.top_p;
        let min_p = self.params.min_p;
        let k_on = top_k > 0 && top_k < vocab;
        let p_on = top_p < 1.0;
        let m_on = min_p > 0.0;
        self.kept.clear();
        self.band.clear();

        if k_on {
            // top-k candidates (ties kept), then top-p / min-p on their renormalized softmax.
            top_k_indices(&self.s, top_k, &mut self.idx, &mut self.vals);
            let s = &self.s;
            self.band.extend(self.idx.iter().map(|&i| {
                let v = s[i as usize];
                Cand { idx: i, s: v, e: fast_exp(v - max) }
            }));
            self.band.sort_unstable_by(by_prob_desc);
            let z: f64 = self.band.iter().map(|c| c.e as f64).sum();
            let target = if p_on { top_p as f64 * z } else { f64::INFINITY };
            walk_prefix(&self.band, 0.0, target, min_p, &mut self.kept);
            (draw(&self.kept, &mut self.rng), None)
        } else if p_on {
            // Work in log space, d = s - max. While computing the normalizer z, collect every
            // token with d >= TOP_P_GATHER; if their mass reaches top_p * z, the kept prefix lies
            // inside them (anything below is less likely than all of them), else widen.
            let floor = if m_on { (min_p as f64).ln() as f32 - 1e-3 } else { f32::NEG_INFINITY };
            let mut d_lo = TOP_P_GATHER.max(floor);
            let z = exp_sum_gather(&self.s, max, d_lo, &mut self.band);
            let target = top_p as f64 * z;
            while d_lo > floor && self.band.iter().map(|c| c.e as f64).sum::<f64>() < target {
                d_lo = TOP_P_WIDEN.iter().copied().find(|&t| t < d_lo && t > floor).unwrap_or(floor);
                self.band.clear();
                gather_ge(&self.s, max, d_lo, &mut self.band);
            }
            // Flat distributions gather huge sets: bisect in log space first, moving tokens that
            // are certainly kept to `kept` (mass `above`) and dropping those certainly not kept.
            // Each step splits at the midpoint of the remaining set's own range of d, so both
            // sides are non-empty and it always makes progress; it stops on a set of exact ties.
            let mut above = 0.0f64;
            if self.band.len() > BAND_MAX {
                let (mut lo, mut hi) = d_range(&self.band, max);
                let mut iters = 0;
                while self.band.len() > BAND_MAX && iters < 64 {
                    iters += 1;
                    let mid = 0.5 * (lo + hi);
                    if !(mid > lo && mid <= hi) {
                        break;
                    }
                    self.upper.clear();
                    self.lower.clear();
                    let mut ge = 0.0f64;
                    for c in &self.band {
                        if c.s - max >= mid {
                            ge += c.e as f64;
                            self.upper.push(*c);
                        } else {
                            self.lower.push(*c);
                        }
                    }
                    if above + ge >= target {
                        std::mem::swap(&mut self.band, &mut self.upper);
                    } else {
                        self.kept.extend_from_slice(&self.upper);
                        above += ge;
                        std::mem::swap(&mut self.band, &mut self.lower);
                    }
                    (lo, hi) = d_range(&self.band, max);
                }
            }
            self.band.sort_unstable_by(by_prob_desc);
            walk_prefix(&self.band, above, target, min_p, &mut self.kept);
            if m_on {
                self.kept.retain(|c| c.e >= min_p); // the best token (e == 1) always stays
            }
            (draw(&self.kept, &mut self.rng), Some(z))
        } else if m_on {
            // min-p alone: prob >= min_p * max_prob <=> exp(s - max) >= min_p. Prefilter in log
            // space with a margin, decide exactly on the computed probability.
            let log_floor = (min_p as f64).ln() as f32 - 1e-3;
            gather_min_p(&self.s, max, log_floor, min_p, &mut self.kept);
            (draw(&self.kept, &mut self.rng), None)
        } else {
            let z = exp_pass(&self.s, max, &mut self.e, &mut self.block_sums);
            let u = self.rng.random::<f64>() * z;
            let token = draw_full(&self.e, &self.block_sums, u).unwrap_or_else(|| first_index_of(&self.s, max));
            (token, Some(z))
        }
    }

    /// Test hook: the processed logits of the last call.
    #[cfg(test)]
    fn processed(&self) -> &[f32] {
        &self.s
    }

    /// Test hook: ids that survive top-k / top-p / min-p for these logits (sorted ascending).
    /// Consumes one random draw.
    #[cfg(test)]
    fn kept_ids(&mut self, logits: &[f32], previous: &[u32]) -> Vec<u32> {
        let max = self.prepare(logits, previous, false);
        let vocab = self.s.len();
        let (k_on, p_on, m_on) =
            (self.params.top_k > 0 && self.params.top_k < vocab, self.params.top_p < 1.0, self.params.min_p > 0.0);
        self.sample_processed(max);
        let mut ids: Vec<u32> =
            if k_on || p_on || m_on { self.kept.iter().map(|c| c.idx).collect() } else { (0..vocab as u32).collect() };
        ids.sort_unstable();
        ids
    }
}

dispatch_avx2! {
    /// Appends every token with `s - max >= d_lo` to `out`.
    fn gather_ge(s: &[f32], max: f32, d_lo: f32, out: &mut Vec<Cand>) => gather_ge_impl
}

#[inline(always)]
fn gather_ge_impl(s: &[f32], max: f32, d_lo: f32, out: &mut Vec<Cand>) {
    for (ci, chunk) in s.chunks(CHUNK).enumerate() {
        if chunk_max(chunk) - max < d_lo {
            continue;
        }
        let base = ci * CHUNK;
        for (j, &x) in chunk.iter().enumerate() {
            let d = x - max;
            if d >= d_lo {
                out.push(Cand { idx: (base + j) as u32, s: x, e: fast_exp(d) });
            }
        }
    }
}

dispatch_avx2! {
    /// min-p gather: tokens with `s - max >= log_floor` (prefilter) and `exp(s - max) >= min_p`.
    fn gather_min_p(s: &[f32], max: f32, log_floor: f32, min_p: f32, kept: &mut Vec<Cand>) => gather_min_p_impl
}

#[inline(always)]
fn gather_min_p_impl(s: &[f32], max: f32, log_floor: f32, min_p: f32, kept: &mut Vec<Cand>) {
    for (ci, chunk) in s.chunks(CHUNK).enumerate() {
        if chunk_max(chunk) - max < log_floor {
            continue;
        }
        let base = ci * CHUNK;
        for (j, &x) in chunk.iter().enumerate() {
            let d = x - max;
            if d >= log_floor {
                let e = fast_exp(d);
                if e >= min_p {
                    kept.push(Cand { idx: (base + j) as u32, s: x, e });
                }
            }
        }
    }
}

/// Range `(min, max)` of `d = s - max` over the candidates, with `d` clamped to `>= -88` (where
/// the probability is 0 anyway).
fn d_range(c: &[Cand], max: f32) -> (f32, f32) {
    c.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), c| {
        let d = (c.s - max).max(-88.0);
        (lo.min(d), hi.max(d))
    })
}

/// Probability descending (processed logit descending), then token id ascending.
fn by_prob_desc(a: &Cand, b: &Cand) -> Ordering {
    b.s.partial_cmp(&a.s).unwrap_or(Ordering::Equal).then(a.idx.cmp(&b.idx))
}

/// Appends to `out` the prefix of `sorted` that top-p / min-p keep: a token is kept while the
/// mass before it (starting at `mass_before`) is `< target` and its `e >= min_p`. The very first
/// token overall is always kept.
fn walk_prefix(sorted: &[Cand], mass_before: f64, target: f64, min_p: f32, out: &mut Vec<Cand>) {
    let mut cum = mass_before;
    for c in sorted {
        if !out.is_empty() && (cum >= target || c.e < min_p) {
            break;
        }
        cum += c.e as f64;
        out.push(*c);
    }
}

/// Inverse-CDF draw over the candidates' unnormalized probabilities.
fn draw(kept: &[Cand], rng: &mut ChaCha8Rng) -> u32 {
    let total: f64 = kept.iter().map(|c| c.e as f64).sum();
    let u = rng.random::<f64>() * total;
    let mut acc = 0.0f64;
    for c in kept {
        acc += c.e as f64;
        if u < acc {
            return c.idx;
        }
    }
    // Rounding fallback: the last candidate with non-zero probability (or the first one).
    kept.iter().rev().find(|c| c.e > 0.0).or(kept.first()).map_or(0, |c| c.idx)
}

/// Inverse-CDF draw over the full vocabulary using per-block sums; `None` only on rounding miss.
fn draw_full(e: &[f32], block_sums: &[f64], u: f64) -> Option<u32> {
    let mut acc = 0.0f64;
    for (b, &bs) in block_sums.iter().enumerate() {
        if u < acc + bs {
            let start = b * BLOCK;
            let block = &e[start..(start + BLOCK).min(e.len())];
            let mut last = None;
            for (j, &x) in block.iter().enumerate() {
                if x > 0.0 {
                    acc += x as f64;
                    last = Some((start + j) as u32);
                    if u < acc {
                        return last;
                    }
                }
            }
            return last;
        }
        acc += bs;
    }
    None
}

/// The maximum of a buffer while some of its entries are rewritten: kept up to date from the
/// new values, and recomputed only when an entry holding the old maximum went down.
struct MaxTracker {
    old: f32,
    new: f32,
    recompute: bool,
}

impl MaxTracker {
    fn new(max: f32) -> Self {
        MaxTracker { old: max, new: f32::NEG_INFINITY, recompute: false }
    }

    fn set(&mut self, slot: &mut f32, y: f32) {
        self.recompute |= *slot == self.old && y < self.old;
        *slot = y;
        self.new = self.new.max(y);
    }

    fn max(self, s: &[f32]) -> f32 {
        if self.recompute {
            max_of(s)
        } else {
            self.old.max(self.new)
        }
    }
}

/// NaN -> -inf, +inf -> f32::MAX (branch-free: `max`/`min` ignore a NaN operand).
#[inline(always)]
#[allow(clippy::manual_clamp)] // `clamp` would keep NaN; `max` maps it to -inf on purpose
fn sanitize(v: f32) -> f32 {
    v.max(f32::NEG_INFINITY).min(f32::MAX)
}

dispatch_avx2! {
    /// `dst = sanitize(src / t)`, returning `max(dst)`.
    fn scale_max(src: &[f32], dst: &mut [f32], t: f32) -> f32 => scale_sanitize_max::<true>
}
dispatch_avx2! {
    /// `dst = sanitize(src)`, returning `max(dst)`.
    fn copy_max(src: &[f32], dst: &mut [f32]) -> f32 => copy_sanitize_max
}

#[inline(always)]
fn copy_sanitize_max(src: &[f32], dst: &mut [f32]) -> f32 {
    scale_sanitize_max::<false>(src, dst, 1.0)
}

/// `dst = sanitize(src / t)` (no division unless `DIV`), returning `max(dst)`.
#[inline(always)]
fn scale_sanitize_max<const DIV: bool>(src: &[f32], dst: &mut [f32], t: f32) -> f32 {
    let (sc, sr) = src.as_chunks::<8>();
    let (dc, dr) = dst.as_chunks_mut::<8>();
    let mut m = [f32::NEG_INFINITY; 8];
    for (q, o) in sc.iter().zip(dc.iter_mut()) {
        for j in 0..8 {
            let v = sanitize(if DIV { q[j] / t } else { q[j] });
            o[j] = v;
            if v > m[j] {
                m[j] = v;
            }
        }
    }
    for (&x, o) in sr.iter().zip(dr.iter_mut()) {
        let v = sanitize(if DIV { x / t } else { x });
        *o = v;
        if v > m[0] {
            m[0] = v;
        }
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

#[inline(always)]
fn chunk_max(c: &[f32]) -> f32 {
    let (ch, rest) = c.as_chunks::<8>();
    let mut m = [f32::NEG_INFINITY; 8];
    for q in ch {
        for j in 0..8 {
            if q[j] > m[j] {
                m[j] = q[j];
            }
        }
    }
    for &x in rest {
        if x > m[0] {
            m[0] = x;
        }
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

dispatch_avx2! {
    fn max_of(s: &[f32]) -> f32 => chunk_max
}

dispatch_avx2! {
    /// Lowest index holding `value` (the argmax when `value` is the maximum); 0 if absent.
    fn first_index_of(s: &[f32], value: f32) -> u32 => first_index_of_impl
}

#[inline(always)]
fn first_index_of_impl(s: &[f32], value: f32) -> u32 {
    for (ci, chunk) in s.chunks(CHUNK).enumerate() {
        if chunk_max(chunk) >= value {
            if let Some(j) = chunk.iter().position(|&x| x == value) {
                return (ci * CHUNK + j) as u32;
            }
        }
    }
    0
}

/// `exp(x)` for `x <= 0` (Cephes `expf` polynomial, branch-free so it vectorizes). Inputs below
/// -87 (including `-inf`) give exactly 0. Max relative error ~2e-7.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LO: f32 = -87.0;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = if x < LO { LO } else { x };
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let nf = t - MAGIC;
    let r = xc - nf * 0.693_359_4 + nf * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        y * scale
    }
}

dispatch_avx2! {
    /// `e = exp(s - max)` over the whole vocabulary; records per-block sums and returns the total.
    fn exp_pass(s: &[f32], max: f32, e: &mut Vec<f32>, block_sums: &mut Vec<f64>) -> f64 => exp_pass_impl
}

#[inline(always)]
fn exp_pass_impl(s: &[f32], max: f32, e: &mut Vec<f32>, block_sums: &mut Vec<f64>) -> f64 {
    e.resize(s.len(), 0.0);
    block_sums.clear();
    let mut z = 0.0f64;
    for (sb, eb) in s.chunks(BLOCK).zip(e.chunks_mut(BLOCK)) {
        // Plain element-wise loop (auto-vectorized), then a lane-parallel sum of the block.
        for (o, &x) in eb.iter_mut().zip(sb) {
            *o = fast_exp(x - max);
        }
        let b = lane_sum(eb);
        block_sums.push(b);
        z += b;
    }
    z
}

dispatch_avx2! {
    /// `sum(exp(s - max))` without keeping the values (one block of scratch on the stack).
    fn exp_sum(s: &[f32], max: f32) -> f64 => exp_sum_impl
}

#[inline(always)]
fn exp_sum_impl(s: &[f32], max: f32) -> f64 {
    let mut buf = [0.0f32; BLOCK];
    let mut z = 0.0f64;
    for sb in s.chunks(BLOCK) {
        let eb = &mut buf[..sb.len()];
        for (o, &x) in eb.iter_mut().zip(sb) {
            *o = fast_exp(x - max);
        }
        z += lane_sum(eb);
    }
    z
}

/// Sum with 8 f64 lanes (f64 so that a 1.0 cannot swallow a tail of tiny probabilities).
#[inline(always)]
fn lane_sum(v: &[f32]) -> f64 {
    let (ch, rest) = v.as_chunks::<8>();
    let mut total = [0.0f64; 8];
    for q in ch {
        for j in 0..8 {
            total[j] += q[j] as f64;
        }
    }
    total.iter().sum::<f64>() + rest.iter().map(|&x| x as f64).sum::<f64>()
}

dispatch_avx2! {
    /// `sum(exp(s - max))` (f64), collecting every token with `s - max >= d0` into `out`.
    fn exp_sum_gather(s: &[f32], max: f32, d0: f32, out: &mut Vec<Cand>) -> f64 => exp_sum_gather_impl
}

#[inline(always)]
fn exp_sum_gather_impl(s: &[f32], max: f32, d0: f32, out: &mut Vec<Cand>) -> f64 {
    let mut buf = [0.0f32; BLOCK];
    let mut z = 0.0f64;
    for (b, sb) in s.chunks(BLOCK).enumerate() {
        let eb = &mut buf[..sb.len()];
        for (o, &x) in eb.iter_mut().zip(sb) {
            *o = fast_exp(x - max);
        }
        z += lane_sum(eb);
        for (ci, (sc, ec)) in sb.chunks(CHUNK).zip(eb.chunks(CHUNK)).enumerate() {
            if chunk_max(sc) - max < d0 {
                continue;
            }
            let base = b * BLOCK + ci * CHUNK;
            for (j, (&x, &e)) in sc.iter().zip(ec).enumerate() {
                if x - max >= d0 {
                    out.push(Cand { idx: (base + j) as u32, s: x, e });
                }
            }
        }
    }
    z
}

dispatch_avx2! {
    /// Indices of the `k` largest values of `s` plus any ties with the k-th value (HF top-k
    /// semantics), in no particular order. Streaming: a running threshold rejects most chunks.
    fn top_k_indices(s: &[f32], k: usize, out: &mut Vec<u32>, vals: &mut Vec<f32>) => top_k_indices_impl
}

#[inline(always)]
fn top_k_indices_impl(s: &[f32], k: usize, out: &mut Vec<u32>, vals: &mut Vec<f32>) {
    out.clear();
    let k = k.max(1);
    if k >= s.len() {
        out.extend(0..s.len() as u32);
        return;
    }
    let mut thr = f32::NEG_INFINITY;
    let mut cap = (4 * k).max(512);
    for (ci, chunk) in s.chunks(CHUNK).enumerate() {
        if chunk_max(chunk) < thr {
            continue;
        }
        let base = ci * CHUNK;
        for (j, &x) in chunk.iter().enumerate() {
            if x >= thr {
                out.push((base + j) as u32);
            }
        }
        if out.len() >= cap {
            thr = kth_largest(s, out, k, vals);
            out.retain(|&i| s[i as usize] >= thr);
            if out.len() * 2 > cap {
                cap *= 2; // many ties at the threshold
            }
        }
    }
    if out.len() > k {
        thr = kth_largest(s, out, k, vals);
        out.retain(|&i| s[i as usize] >= thr);
    }
}

/// The k-th largest of `s[idx]` (requires `idx.len() >= k >= 1`).
fn kth_largest(s: &[f32], idx: &[u32], k: usize, vals: &mut Vec<f32>) -> f32 {
    vals.clear();
    vals.extend(idx.iter().map(|&i| s[i as usize]));
    let (_, kth, _) = vals.select_nth_unstable_by(k - 1, |a, b| b.partial_cmp(a).unwrap_or(Ordering::Equal));
    *kth
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn normal(r: &mut ChaCha8Rng) -> f32 {
        let u1: f64 = r.random::<f64>().max(1e-300);
        let u2: f64 = r.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn random_logits(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| normal(r) * scale).collect()
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, min_p, seed: Some(7), ..SamplingParams::default() }
    }

    /// Brute-force reference: HF penalties + warpers on the full sorted vocabulary, in f64.
    /// Returns the processed logits (f32, same arithmetic as the sampler) and the kept
    /// distribution as (id, prob) with probs summing to 1.
    struct Reference {
        kept: Vec<(u32, f64)>,
        /// For each filter boundary decision, how far (relative) it was from flipping.
        margin: f64,
    }

    fn hf_penalize(logits: &[f32], p: &SamplingParams, prompt: &[u32], generated: &[u32]) -> Vec<f32> {
        let mut x = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::BTreeSet::new();
            for &t in prompt.iter().chain(generated) {
                seen.insert(t as usize);
            }
            for t in seen {
                let v = x[t];
                x[t] = if v < 0.0 { v * p.repetition_penalty } else { v / p.repetition_penalty };
            }
        }
        let mut counts = std::collections::BTreeMap::new();
        for &t in generated {
            *counts.entry(t as usize).or_insert(0u32) += 1;
        }
        for (t, c) in counts {
            x[t] -= p.frequency_penalty * c as f32;
            x[t] -= p.presence_penalty;
        }
        x
    }

    fn reference(logits: &[f32], p: &SamplingParams) -> Reference {
        let s: Vec<f32> = logits.iter().map(|&l| sanitize(l / p.temperature)).collect();
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap_or(Ordering::Equal).then(a.cmp(&b)));
        let max = s[order[0]] as f64;
        let mut margin = f64::INFINITY;
        // top-k: keep >= k-th value.
        let mut n = order.len();
        if p.top_k > 0 && p.top_k < n {
            let kth = s[order[p.top_k - 1]];
            n = order.iter().take_while(|&&i| s[i] >= kth).count();
        }
        let w: Vec<f64> = order[..n].iter().map(|&i| (s[i] as f64 - max).exp()).collect();
        // top-p: keep while mass before < top_p.
        if p.top_p < 1.0 {
            let z: f64 = w.iter().sum();
            let mut cum = 0.0;
            let mut keep = 0;
            let mut last_before = 0.0;
            for (j, &x) in w.iter().enumerate() {
                let before = cum / z;
                if j > 0 && before >= p.top_p as f64 {
                    // Distance of the decisive comparisons (first excluded, last kept) from flipping.
                    margin = margin.min((before - p.top_p as f64).abs() / p.top_p as f64);
                    break;
                }
                last_before = before;
                cum += x;
                keep += 1;
            }
            if keep > 1 {
                margin = margin.min((last_before - p.top_p as f64).abs() / p.top_p as f64);
            }
            n = keep;
        }
        // min-p: keep prob >= min_p * max_prob.
        if p.min_p > 0.0 {
            let mut keep = 0;
            for &x in &w[..n] {
                if x < p.min_p as f64 {
                    margin = margin.min((x - p.min_p as f64).abs() / p.min_p as f64);
                    break;
                }
                if keep > 0 {
                    margin = margin.min((x - p.min_p as f64).abs() / p.min_p as f64);
                }
                keep += 1;
            }
            n = keep.max(1);
        }
        let z: f64 = w[..n].iter().sum();
        let kept = order[..n].iter().zip(&w).map(|(&i, &x)| (i as u32, x / z)).collect();
        Reference { kept, margin }
    }

    #[test]
    fn params_default_greedy_and_serde() {
        let d = SamplingParams::default();
        assert_eq!(d.temperature, 1.0);
        assert!(!d.is_greedy());
        assert!(SamplingParams::greedy().is_greedy());
        assert!(d.validate().is_ok());
        let parsed: SamplingParams = serde_json::from_str(r#"{"temperature":0.5,"top_p":0.9}"#).unwrap();
        assert_eq!(parsed.temperature, 0.5);
        assert_eq!(parsed.top_p, 0.9);
        assert_eq!(parsed.top_k, 0);
        assert_eq!(parsed.repetition_penalty, 1.0);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases: Vec<(SamplingParams, &str, &str)> = vec![
            (SamplingParams { temperature: -0.5, ..Default::default() }, "temperature", "-0.5"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature", "NaN"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p", "0"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p", "1.5"),
            (SamplingParams { min_p: -0.1, ..Default::default() }, "min_p", "-0.1"),
            (SamplingParams { min_p: 1.01, ..Default::default() }, "min_p", "1.01"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty", "0"),
            (SamplingParams { repetition_penalty: -1.0, ..Default::default() }, "repetition_penalty", "-1"),
            (SamplingParams { presence_penalty: f32::INFINITY, ..Default::default() }, "presence_penalty", "inf"),
            (SamplingParams { frequency_penalty: f32::NAN, ..Default::default() }, "frequency_penalty", "NaN"),
        ];
        for (p, field, value) in cases {
            let err = p.validate().expect_err(field);
            let SamplingError::InvalidParam { field: f, .. } = &err;
            assert_eq!(*f, field);
            let msg = err.to_string();
            assert!(msg.contains(field) && msg.contains(value), "{msg}");
            assert!(Sampler::new(p).is_err());
        }
        assert!(SamplingParams { top_p: 1.0, min_p: 1.0, temperature: 0.0, ..Default::default() }.validate().is_ok());
    }

    #[test]
    fn fast_exp_accuracy() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = fast_exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
            x += 0.000_731;
        }
        assert!(worst < 4e-7, "max relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_ties() {
        let mut r = rng(1);
        let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
        for n in [1usize, 7, 64, 65, 1000, 151_936] {
            for case in 0..5 {
                let mut logits = random_logits(&mut r, n, 3.0);
                if n > 10 && case % 2 == 0 {
                    // Plant ties at the maximum.
                    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) + 1.0;
                    let a = r.random_range(0..n);
                    let b = r.random_range(0..n);
                    logits[a] = m;
                    logits[b] = m;
                }
                if n > 10 && case == 3 {
                    logits[r.random_range(0..n)] = f32::NAN;
                }
                let mut best = 0;
                for i in 0..n {
                    let v = if logits[i].is_nan() { f32::NEG_INFINITY } else { logits[i] };
                    let b = if logits[best].is_nan() { f32::NEG_INFINITY } else { logits[best] };
                    if v > b {
                        best = i;
                    }
                }
                assert_eq!(sampler.sample(&logits, &[]), best as u32, "n={n} case={case}");
            }
        }
        assert_eq!(sampler.sample(&[1.0, 3.0, 3.0, 2.0], &[]), 1);
        assert_eq!(sampler.sample(&[5.0, 5.0], &[]), 0);
        // Degenerate input does not panic.
        assert_eq!(sampler.sample(&[], &[]), 0);
        assert_eq!(sampler.sample(&[f32::NAN, f32::NEG_INFINITY], &[]), 0);
    }

    #[test]
    fn greedy_with_penalties_matches_hf() {
        let mut r = rng(2);
        for case in 0..20 {
            let n = 5000;
            let logits = random_logits(&mut r, n, 2.0);
            let prev: Vec<u32> = (0..300).map(|_| r.random_range(0..n as u32 / 10)).collect();
            let prompt_len = 100;
            let p = SamplingParams {
                temperature: 0.0,
                repetition_penalty: [1.3f32, 0.8][case % 2],
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                ..Default::default()
            };
            let want = hf_penalize(&logits, &p, &prev[..prompt_len], &prev[prompt_len..]);
            let mut sampler = Sampler::new(p).unwrap();
            sampler.set_prompt_len(prompt_len);
            let tok = sampler.sample(&logits, &prev);
            assert_eq!(sampler.processed(), &want[..]);
            let best = (0..n).fold(0, |b, i| if want[i] > want[b] { i } else { b });
            assert_eq!(tok, best as u32);
        }
    }

    #[test]
    fn repetition_penalty_hf_formula_once_per_distinct_token() {
        let logits = [2.0f32, -2.0, 0.0, 4.0, -1.0, 3.0];
        let p = SamplingParams { temperature: 0.0, repetition_penalty: 2.0, ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        s.set_prompt_len(3);
        // token 0 three times, token 1 twice, token 2 once; 3..5 never.
        s.sample(&logits, &[0, 1, 0, 0, 2, 1]);
        assert_eq!(s.processed(), &[1.0, -4.0, 0.0, 4.0, -1.0, 3.0]);
        // The count table is reset between calls: a call without history is unpenalized.
        s.sample(&logits, &[]);
        assert_eq!(s.processed(), &logits);
        // Penalty < 1 boosts (HF semantics).
        let mut s =
            Sampler::new(SamplingParams { temperature: 0.0, repetition_penalty: 0.5, ..Default::default() }).unwrap();
        s.sample(&logits, &[0, 1]);
        assert_eq!(&s.processed()[..2], &[4.0, -1.0]);
        // Out-of-range history ids are ignored.
        s.sample(&logits, &[0, 99, u32::MAX]);
        assert_eq!(&s.processed()[..2], &[4.0, -2.0]);
    }

    #[test]
    fn presence_frequency_penalties_count_generated_only() {
        let logits = [1.0f32, 1.0, 1.0, 1.0];
        let p =
            SamplingParams { temperature: 0.0, presence_penalty: 0.5, frequency_penalty: 0.25, ..Default::default() };
        let mut s = Sampler::new(p.clone()).unwrap();
        s.set_prompt_len(2);
        // prompt = [3, 0]; generated = [0, 1, 0]
        s.sample(&logits, &[3, 0, 0, 1, 0]);
        assert_eq!(s.processed(), &[1.0 - 0.5 - 0.5, 1.0 - 0.25 - 0.5, 1.0, 1.0]);
        // prompt_len 0 (default): everything counts as generated.
        let mut s = Sampler::new(p).unwrap();
        s.sample(&logits, &[3, 0, 0, 1, 0]);
        assert_eq!(s.processed(), &[1.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5, 1.0, 1.0 - 0.25 - 0.5]);
        // Combined with repetition penalty and temperature: rep on raw, then -=, then / T.
        let p = SamplingParams {
            temperature: 0.5,
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        let mut s = Sampler::new(p).unwrap();
        s.set_prompt_len(1);
        s.sample(&[3.0, -3.0, 1.0], &[2, 0, 1, 1]);
        assert_eq!(s.processed(), &[(1.5 - 0.25 - 0.5) / 0.5, (-6.0 - 0.5 - 0.5) / 0.5, 0.5 / 0.5]);
    }

    #[test]
    fn logit_bias_comes_before_penalties_and_temperature() {
        let bias = |pairs: &[(u32, f32)]| pairs.iter().copied().collect::<BTreeMap<u32, f32>>();
        // Greedy: +100 forces a token, -100 bans the argmax; a bias makes the choice the host's.
        let p = SamplingParams { logit_bias: bias(&[(4, 100.0), (9, -3.0)]), ..SamplingParams::greedy() };
        assert!(!p.is_plain_argmax());
        let mut s = Sampler::new(p).unwrap();
        let logits = [0.5f32, 3.0, 1.0, -2.0, -1.0];
        assert_eq!(s.sample(&logits, &[]), 4);
        // An id past the vocabulary (9 here; the engine refuses those at submission) changes nothing.
        assert_eq!(s.processed(), &[0.5, 3.0, 1.0, -2.0, 99.0]);
        let mut s =
            Sampler::new(SamplingParams { logit_bias: bias(&[(1, -100.0)]), ..SamplingParams::greedy() }).unwrap();
        assert_eq!(s.sample(&logits, &[]), 2);
        // vLLM's order: bias on the raw logit, then the repetition penalty (on the biased sign),
        // presence and frequency, then temperature; ids outside the history only biased.
        let p = SamplingParams {
            temperature: 0.5,
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: bias(&[(0, -4.0), (1, 1.0), (3, 2.0)]),
            ..Default::default()
        };
        let mut s = Sampler::new(p).unwrap();
        s.set_prompt_len(1);
        s.sample(&[3.0, -3.0, 1.0, 0.25], &[2, 0, 1, 1]);
        let want = [
            ((3.0 - 4.0) * 2.0 - 0.25 - 0.5) / 0.5,
            ((-3.0 + 1.0) * 2.0 - 0.5 - 0.5) / 0.5,
            0.5 / 0.5,
            (0.25 + 2.0) / 0.5,
        ];
        assert_eq!(s.processed(), &want);
        // The logprobs are those of the biased distribution, and the table is clean afterwards.
        let mut s = Sampler::new(SamplingParams { logit_bias: bias(&[(0, 2.0)]), ..SamplingParams::greedy() }).unwrap();
        let got = s.sample_with_logprobs(&[0.0, 1.0], &[], 2);
        assert_eq!(got.token, 0);
        let want = -(1.0f64 + (-1.0f64).exp()).ln();
        assert!((got.logprob as f64 - want).abs() < 1e-6, "{} vs {want}", got.logprob);
        assert_eq!(s.sample(&[0.0, 3.0], &[]), 1);
        assert_eq!(s.processed(), &[2.0, 3.0]);
    }

    #[test]
    fn logit_bias_outside_its_range_is_refused() {
        for bad in [100.5f32, -101.0, f32::NAN, f32::INFINITY] {
            let p = SamplingParams { logit_bias: [(7, bad)].into_iter().collect(), ..Default::default() };
            let err = p.validate().expect_err("out of range");
            let SamplingError::InvalidParam { field, value, .. } = &err;
            assert_eq!(*field, "logit_bias");
            assert!(value.contains("token 7"), "{err}");
        }
        let p = SamplingParams { logit_bias: [(7, -100.0), (8, 100.0)].into_iter().collect(), ..Default::default() };
        assert!(p.validate().is_ok());
        // In JSON a map from the id (a string) to the bias, as OpenAI sends it.
        let parsed: SamplingParams = serde_json::from_str(r#"{"logit_bias": {"7": -100, "12": 2.5}}"#).unwrap();
        assert_eq!(parsed.logit_bias, [(7, -100.0), (12, 2.5)].into_iter().collect());
    }

    fn total_variation(counts: &[u64], kept: &[(u32, f64)], draws: u64) -> f64 {
        let mut want = vec![0.0; counts.len()];
        for &(i, p) in kept {
            want[i as usize] = p;
        }
        0.5 * counts.iter().zip(&want).map(|(&c, &w)| (c as f64 / draws as f64 - w).abs()).sum::<f64>()
    }

    #[test]
    fn sampled_frequencies_match_filtered_softmax() {
        let logits = [1.2f32, -0.3, 2.5, 0.0, 2.4, -1.7, 0.8, 1.9, -3.0, 0.4, 2.5, -0.9];
        let configs = [
            params(1.0, 0, 1.0, 0.0),
            params(0.7, 0, 1.0, 0.0),
            params(1.3, 4, 1.0, 0.0),
            params(0.9, 0, 0.8, 0.0),
            params(1.0, 0, 1.0, 0.15),
            params(1.2, 7, 0.9, 0.1),
            params(2.0, 6, 0.75, 0.02),
        ];
        let draws = 200_000u64;
        for p in configs {
            let reference = reference(&logits, &p);
            assert!(reference.margin > 1e-3, "test logits too close to a boundary for {p:?}");
            let mut sampler = Sampler::new(p.clone()).unwrap();
            let mut counts = vec![0u64; logits.len()];
            for _ in 0..draws {
                counts[sampler.sample(&logits, &[]) as usize] += 1;
            }
            let allowed: Vec<u32> = reference.kept.iter().map(|k| k.0).collect();
            for (i, &c) in counts.iter().enumerate() {
                if !allowed.contains(&(i as u32)) {
                    assert_eq!(c, 0, "filtered token {i} sampled under {p:?}");
                }
            }
            let tv = total_variation(&counts, &reference.kept, draws);
            assert!(tv < 0.01, "TV {tv} for {p:?}");
        }
    }

    #[test]
    fn sampled_frequencies_larger_vocab() {
        // A realistic-size vocabulary exercising the full-vocab paths (threshold band, CDF blocks).
        let mut r = rng(11);
        // (Kept moderate so the test stays fast in debug builds; still many CDF blocks.)
        let n = 12_289;
        let mut logits = random_logits(&mut r, n, 1.0);
        let peaks = [17u32, 4_000, 7_777, 12_288, 10_001];
        for (j, &i) in peaks.iter().enumerate() {
            logits[i as usize] = 12.0 - j as f32 * 0.4;
        }
        let draws = 3_000u64;
        for p in
            [params(1.0, 0, 1.0, 0.0), params(0.8, 0, 0.95, 0.0), params(1.0, 0, 1.0, 0.01), params(0.9, 3, 0.99, 0.0)]
        {
            let reference = reference(&logits, &p);
            let mut sampler = Sampler::new(p.clone()).unwrap();
            let mut counts = vec![0u64; n];
            for _ in 0..draws {
                counts[sampler.sample(&logits, &[]) as usize] += 1;
            }
            let allowed: std::collections::HashSet<u32> = reference.kept.iter().map(|k| k.0).collect();
            for (i, &c) in counts.iter().enumerate() {
                assert!(c == 0 || allowed.contains(&(i as u32)), "token {i} outside kept set for {p:?}");
            }
            // Compare on the peaks + one "rest" bucket (few draws, so coarse buckets).
            let mut got = [0f64; 6];
            let mut want = [0f64; 6];
            for (i, &c) in counts.iter().enumerate() {
                let b = peaks.iter().position(|&q| q as usize == i).unwrap_or(5);
                got[b] += c as f64 / draws as f64;
            }
            for &(i, q) in &reference.kept {
                let b = peaks.iter().position(|&x| x == i).unwrap_or(5);
                want[b] += q;
            }
            let tv = 0.5 * got.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum::<f64>();
            assert!(tv < 0.045, "TV {tv} for {p:?}: got {got:?} want {want:?}");
        }
    }

    /// Checks the sampler's kept set against the brute-force reference; returns false when they
    /// differ only because a boundary decision was within rounding distance.
    fn check_kept(sampler: &mut Sampler, logits: &[f32], p: &SamplingParams, what: &str) -> bool {
        let reference = reference(logits, p);
        let mut want: Vec<u32> = reference.kept.iter().map(|k| k.0).collect();
        want.sort_unstable();
        let got = sampler.kept_ids(logits, &[]);
        if got != want {
            assert!(
                reference.margin < 1e-5,
                "{what}: kept set differs (got {} want {}, margin {:e}) for {p:?}",
                got.len(),
                want.len(),
                reference.margin
            );
            return false;
        }
        true
    }

    #[test]
    fn top_p_keeps_smallest_prefix_random_logits() {
        let mut r = rng(3);
        let mut ambiguous = 0;
        let mut total = 0;
        for seed in 0..300u64 {
            let n = [10usize, 100, 3000, 20_000][seed as usize % 4];
            let scale = [0.5f32, 2.0, 6.0][seed as usize % 3];
            let logits = random_logits(&mut r, n, scale);
            let top_p: f32 = r.random_range(0.01..1.0);
            let t: f32 = r.random_range(0.3..2.0);
            let p = SamplingParams { temperature: t, top_p, seed: Some(seed), ..Default::default() };
            let mut sampler = Sampler::new(p.clone()).unwrap();
            total += 1;
            if !check_kept(&mut sampler, &logits, &p, "top-p") {
                ambiguous += 1;
            }
        }
        assert!(ambiguous <= 3, "{ambiguous}/{total} ambiguous boundaries");
    }

    #[test]
    fn top_p_with_ties_at_boundary() {
        // Heavily quantized logits create large tie groups straddling the boundary; lower ids win.
        let mut r = rng(4);
        for seed in 0..200u64 {
            let n = [8usize, 50, 500, 6000][seed as usize % 4];
            let levels = [1usize, 2, 3, 5][(seed as usize / 4) % 4];
            let logits: Vec<f32> = (0..n).map(|_| r.random_range(0..levels) as f32 * 0.5).collect();
            let top_p: f32 = r.random_range(0.05..0.999);
            let p = SamplingParams { temperature: 1.0, top_p, seed: Some(seed), ..Default::default() };
            let mut sampler = Sampler::new(p.clone()).unwrap();
            check_kept(&mut sampler, &logits, &p, "top-p ties");
        }
        // Hand-checkable: 4 equal tokens, p = 0.5 -> the two lowest ids.
        let p = SamplingParams { top_p: 0.5, seed: Some(1), ..Default::default() };
        let mut sampler = Sampler::new(p).unwrap();
        assert_eq!(sampler.kept_ids(&[0.0, 0.0, 0.0, 0.0], &[]), vec![0, 1]);
        let p = SamplingParams { top_p: 0.51, seed: Some(1), ..Default::default() };
        let mut sampler = Sampler::new(p).unwrap();
        assert_eq!(sampler.kept_ids(&[0.0, 0.0, 0.0, 0.0], &[]), vec![0, 1, 2]);
    }

    #[test]
    fn flat_distribution_forces_band_bisection() {
        // 150k nearly-equal logits: the band search must bisect (band > BAND_MAX) and stay exact.
        let mut r = rng(5);
        for case in 0..4u64 {
            let logits: Vec<f32> = if case == 3 {
                vec![0.25; 151_936]
            } else {
                (0..151_936).map(|_| r.random_range(0..1000) as f32 * 1e-3).collect()
            };
            let p = SamplingParams {
                top_p: [0.3f32, 0.9, 0.999, 0.6][case as usize],
                seed: Some(case),
                ..Default::default()
            };
            let mut sampler = Sampler::new(p.clone()).unwrap();
            check_kept(&mut sampler, &logits, &p, "flat");
        }
    }

    #[test]
    fn top_p_needs_tail_mass_beyond_first_ladder() {
        // One dominant token and a large tail far below it: reaching top_p needs tokens more
        // than e^-16 below the best one (slow ladder rungs), with and without a min-p floor.
        let mut r = rng(12);
        let mut ambiguous = 0;
        for case in 0..12u64 {
            let n = 40_000;
            let mut logits = random_logits(&mut r, n, 1.0);
            logits[r.random_range(0..n)] = [20.0f32, 35.0, 60.0][case as usize % 3];
            let top_p = [0.9999f32, 0.999_99, 0.5][case as usize / 3 % 3];
            let min_p = if case >= 9 { 1e-12 } else { 0.0 };
            let p = SamplingParams { top_p, min_p, seed: Some(case), ..Default::default() };
            let mut sampler = Sampler::new(p.clone()).unwrap();
            if !check_kept(&mut sampler, &logits, &p, "tail") {
                ambiguous += 1;
            }
        }
        assert!(ambiguous <= 1, "{ambiguous} ambiguous");
    }

    #[test]
    fn masked_logits_are_never_kept_or_sampled() {
        let mut r = rng(13);
        let n = 10_000;
        let mut logits = random_logits(&mut r, n, 2.0);
        let mut allowed = vec![false; n];
        for i in 0..n {
            if i % 3 != 0 {
                logits[i] = f32::NEG_INFINITY;
            } else if i % 7 == 0 {
                logits[i] = f32::NAN; // treated as -inf
            } else {
                allowed[i] = true;
            }
        }
        for p in [
            params(1.0, 0, 1.0, 0.0),
            params(1.0, 0, 0.999, 0.0),
            params(2.0, 5000, 1.0, 0.0),
            params(1.0, 0, 1.0, 1e-9),
            params(0.7, 100, 0.9, 0.01),
        ] {
            let mut sampler = Sampler::new(p.clone()).unwrap();
            for _ in 0..500 {
                let t = sampler.sample(&logits, &[]) as usize;
                assert!(allowed[t], "masked token {t} sampled under {p:?}");
            }
            let sanitized: Vec<f32> = logits.iter().map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x }).collect();
            check_kept(&mut sampler, &sanitized, &p, "masked");
        }
    }

    #[test]
    fn portable_kernels_match_dispatched() {
        // The AVX2 and portable builds of each kernel must agree bit for bit.
        let mut r = rng(14);
        let s = random_logits(&mut r, 10_007, 4.0);
        let max = max_of(&s);
        assert_eq!(max, chunk_max(&s));
        let (mut g1, mut g2) = (Vec::new(), Vec::new());
        assert_eq!(exp_sum_gather(&s, max, -6.0, &mut g1), exp_sum_gather_impl(&s, max, -6.0, &mut g2));
        let key = |c: &Cand| (c.idx, c.s.to_bits(), c.e.to_bits());
        assert_eq!(g1.iter().map(key).collect::<Vec<_>>(), g2.iter().map(key).collect::<Vec<_>>());
        let mut g3 = Vec::new();
        gather_ge(&s, max, -6.0, &mut g3);
        assert_eq!(g1.iter().map(key).collect::<Vec<_>>(), g3.iter().map(key).collect::<Vec<_>>());
        assert_eq!(exp_sum(&s, max), exp_sum_impl(&s, max));
        let (mut e1, mut e2, mut b1, mut b2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        assert_eq!(exp_pass(&s, max, &mut e1, &mut b1), exp_pass_impl(&s, max, &mut e2, &mut b2));
        assert_eq!((e1, b1), (e2, b2));
        let (mut d1, mut d2) = (vec![0.0; s.len()], vec![0.0; s.len()]);
        assert_eq!(scale_max(&s, &mut d1, 0.7), scale_sanitize_max::<true>(&s, &mut d2, 0.7));
        assert_eq!(d1, d2);
        let (mut i1, mut i2, mut v) = (Vec::new(), Vec::new(), Vec::new());
        top_k_indices(&s, 37, &mut i1, &mut v);
        top_k_indices_impl(&s, 37, &mut i2, &mut v);
        assert_eq!(i1, i2);
        assert_eq!(i1.len(), 37);
        assert_eq!(first_index_of(&s, max), first_index_of_impl(&s, max));
    }

    #[test]
    fn top_k_min_p_and_combined_match_reference() {
        let mut r = rng(6);
        let mut ambiguous = 0;
        for seed in 0..300u64 {
            let n = [20usize, 700, 5000][seed as usize % 3];
            let quantized = seed % 5 == 0;
            let logits: Vec<f32> = if quantized {
                (0..n).map(|_| r.random_range(0..6) as f32).collect()
            } else {
                random_logits(&mut r, n, 3.0)
            };
            let top_k = [0usize, 1, 5, 50, 2000][seed as usize % 5];
            let top_p = if seed % 3 == 0 { 1.0 } else { r.random_range(0.05..1.0) };
            let min_p = if seed % 4 == 0 { 0.0 } else { r.random_range(0.001..0.5) };
            let p = SamplingParams {
                temperature: r.random_range(0.5..1.5),
                top_k,
                top_p,
                min_p,
                seed: Some(seed),
                ..Default::default()
            };
            let mut sampler = Sampler::new(p.clone()).unwrap();
            if !check_kept(&mut sampler, &logits, &p, "combined") {
                ambiguous += 1;
            }
        }
        assert!(ambiguous <= 3, "{ambiguous} ambiguous boundaries");
        // HF top-k keeps every tie at the k-th value.
        let p = SamplingParams { top_k: 2, seed: Some(1), ..Default::default() };
        let mut sampler = Sampler::new(p).unwrap();
        assert_eq!(sampler.kept_ids(&[1.0, 3.0, 2.0, 2.0, 0.0, 2.0], &[]), vec![1, 2, 3, 5]);
        // min_p = 1 keeps exactly the argmax (and its ties).
        let p = SamplingParams { min_p: 1.0, seed: Some(1), ..Default::default() };
        let mut sampler = Sampler::new(p).unwrap();
        assert_eq!(sampler.kept_ids(&[1.0, 3.0, 2.0, 3.0], &[]), vec![1, 3]);
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let mut r = rng(8);
        let logits = random_logits(&mut r, 20_000, 2.0);
        for base in
            [params(1.0, 0, 1.0, 0.0), params(0.8, 40, 0.9, 0.0), params(1.0, 0, 0.95, 0.0), params(1.0, 0, 1.0, 0.001)]
        {
            let run = |seed: u64| {
                let mut s = Sampler::new(SamplingParams { seed: Some(seed), ..base.clone() }).unwrap();
                (0..32).map(|_| s.sample(&logits, &[])).collect::<Vec<u32>>()
            };
            assert_eq!(run(42), run(42), "{base:?}");
            assert_ne!(run(42), run(43), "{base:?}");
            // reseed restarts the stream.
            let mut s = Sampler::new(SamplingParams { seed: Some(42), ..base.clone() }).unwrap();
            let first: Vec<u32> = (0..16).map(|_| s.sample(&logits, &[])).collect();
            s.reseed(42);
            let again: Vec<u32> = (0..16).map(|_| s.sample(&logits, &[])).collect();
            assert_eq!(first, again);
        }
        // Entropy seeding works.
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert!((s.sample(&logits, &[]) as usize) < logits.len());
    }

    #[test]
    fn logprobs_match_log_softmax_of_processed_logits() {
        let mut r = rng(9);
        let n = 30_000;
        let logits = random_logits(&mut r, n, 3.0);
        let prev: Vec<u32> = (0..200).map(|_| r.random_range(0..n as u32)).collect();
        for p in [
            SamplingParams { temperature: 0.0, repetition_penalty: 1.2, ..Default::default() },
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                repetition_penalty: 1.2,
                frequency_penalty: 0.3,
                seed: Some(1),
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.3,
                top_k: 20,
                min_p: 0.05,
                presence_penalty: 0.4,
                seed: Some(2),
                ..Default::default()
            },
        ] {
            let t = if p.is_greedy() { 1.0 } else { p.temperature } as f64;
            let pen = hf_penalize(&logits, &p, &prev[..50], &prev[50..]);
            let x: Vec<f64> = pen.iter().map(|&v| (v as f64) / t).collect();
            let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let mut sampler = Sampler::new(p.clone()).unwrap();
            sampler.set_prompt_len(50);
            let out = sampler.sample_with_logprobs(&logits, &prev, 5);
            let want = x[out.token as usize] - lse;
            assert!((out.logprob as f64 - want).abs() < 1e-4, "{} vs {want} for {p:?}", out.logprob);
            assert_eq!(out.top_logprobs.len(), 5);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| x[b].partial_cmp(&x[a]).unwrap().then(a.cmp(&b)));
            for (k, tl) in out.top_logprobs.iter().enumerate() {
                assert_eq!(tl.token as usize, order[k]);
                assert!((tl.logprob as f64 - (x[order[k]] - lse)).abs() < 1e-4);
            }
            if p.is_greedy() {
                assert_eq!(out.token as usize, order[0]);
            }
        }
    }

    /// A prompt token's score is the raw log-softmax (f64 reference), its rank counts ties as
    /// ahead (vLLM's), the alternatives come most likely first with ties by id, a NaN logit is
    /// never likely, and a token outside the row gets -inf.
    #[test]
    fn prompt_scores_are_the_raw_log_softmax_with_vllm_ranks() {
        let row = [1.0f32, 3.0, f32::NAN, 3.0, -2.0, 0.5];
        let max = 3.0f64;
        let z: f64 = row.iter().filter(|x| !x.is_nan()).map(|&x| (x as f64 - max).exp()).sum();
        let lp = |x: f32| x as f64 - max - z.ln();
        let mut scorer = PromptScorer::default();
        let s = scorer.score(&row, 0, 3);
        assert!((s.logprob as f64 - lp(1.0)).abs() < 1e-6, "{s:?}");
        assert_eq!(s.rank, 3, "two tokens at 3.0 ahead of it");
        let top: Vec<u32> = s.top_logprobs.iter().map(|t| t.token).collect();
        assert_eq!(top, [1, 3, 0]);
        assert!((s.top_logprobs[0].logprob as f64 - lp(3.0)).abs() < 1e-6);
        assert_eq!(scorer.score(&row, 3, 0).rank, 2, "a tie counts as ahead");
        assert!(scorer.score(&row, 3, 0).top_logprobs.is_empty());
        assert_eq!(scorer.score(&row, 2, 1).logprob, f32::NEG_INFINITY, "NaN is never likely");
        let outside = scorer.score(&row, 6, 2);
        assert_eq!((outside.logprob, outside.rank), (f32::NEG_INFINITY, row.len()));
    }
}
