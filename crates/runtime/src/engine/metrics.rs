//! The engine's counters, gauges and latency histograms, as a snapshot a server renders (for
//! example as Prometheus text with vLLM's metric names).

use serde::Serialize;

use crate::generate::FinishReason;

/// Upper bounds (seconds) of the time-to-first-token buckets (vLLM's, with finer ones below 20 ms).
pub const TIME_TO_FIRST_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];

/// Upper bounds (seconds) of the inter-token-latency buckets (vLLM's, with finer ones below 10 ms).
pub const INTER_TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
];

/// A histogram over fixed buckets: `counts[i]` observations were at most `bounds[i]` and above
/// `bounds[i - 1]`; `counts[bounds.len()]` were above the last bound. (Prometheus' `le` buckets
/// are the running sums.)
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], count: 0, sum: 0.0 }
    }

    pub fn observe(&mut self, value: f64) {
        let bucket = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.count += 1;
        self.sum += value;
    }

    /// Adds `other`'s observations (over the same bounds).
    pub(crate) fn absorb(&mut self, other: &Histogram) {
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c += o;
        }
        self.count += other.count;
        self.sum += other.sum;
    }

    /// Observations at most each bound, in order (Prometheus' `_bucket{le=...}`), then all.
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |total, &c| {
                *total += c;
                Some(*total)
            })
            .collect()
    }
}

/// Requests that finished, by how.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FinishedRequests {
    pub stop: u64,
    pub length: u64,
    pub context_length: u64,
    pub cancelled: u64,
    /// Ended by a model failure or a shutdown.
    pub error: u64,
}

impl FinishedRequests {
    pub(crate) fn count(&mut self, reason: FinishReason) {
        match reason {
            FinishReason::Stop => self.stop += 1,
            FinishReason::Length => self.length += 1,
            FinishReason::ContextLength => self.context_length += 1,
            FinishReason::Cancelled => self.cancelled += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.stop + self.length + self.context_length + self.cancelled + self.error
    }

    fn absorb(&mut self, other: &FinishedRequests) {
        self.stop += other.stop;
        self.length += other.length;
        self.context_length += other.context_length;
        self.cancelled += other.cancelled;
        self.error += other.error;
    }
}

/// The engine's state and counters at one moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    /// Sequences holding a slot (prefilling or decoding).
    pub requests_running: usize,
    /// Requests waiting for a slot.
    pub requests_waiting: usize,
    /// Slots in use over all slots, 0 to 1. (A slot holds its sequence's whole capacity from
    /// admission on, so this is how full the KV pool is for admitting new requests.)
    pub kv_cache_usage: f64,
    /// Bytes the prefix cache holds.
    pub prefix_cache_bytes: u64,
    /// Bytes of vision encodings the encoder cache holds.
    pub encoder_cache_bytes: u64,
    /// Prompt tokens of admitted requests, and generated tokens.
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// Prompt tokens looked up in the prefix cache, and those found there (vLLM's
    /// `prefix_cache_queries` / `prefix_cache_hits`).
    pub prefix_cache_queried_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    /// Images the vision encoder ran for, and images whose encoding came from the encoder cache.
    pub images_encoded: u64,
    pub encoder_cache_hits: u64,
    /// Decoding rows run apart from their step's batch: their (t, h, w) position clashed with
    /// another row's at the same cache slot (rope deltas of prompts with images; see the engine's
    /// `decode_rows`).
    pub decode_rows_run_apart: u64,
    /// Prompt chunks prefilled, and the batched runs they took (chunks of one length in
    /// consecutive slots share a run).
    pub prefill_chunks: u64,
    pub prefill_runs: u64,
    pub finished: FinishedRequests,
    /// Engine steps run (each: one batched decode and up to the prefill budget of prompt tokens).
    pub steps: u64,
    /// Seconds from submission to the first token.
    pub time_to_first_token: Histogram,
    /// Seconds between consecutive tokens of a request.
    pub inter_token_latency: Histogram,
}

impl MetricsSnapshot {
    pub(crate) fn new() -> Self {
        MetricsSnapshot {
            requests_running: 0,
            requests_waiting: 0,
            kv_cache_usage: 0.0,
            prefix_cache_bytes: 0,
            encoder_cache_bytes: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            prefix_cache_queried_tokens: 0,
            prefix_cache_hit_tokens: 0,
            images_encoded: 0,
            encoder_cache_hits: 0,
            decode_rows_run_apart: 0,
            prefill_chunks: 0,
            prefill_runs: 0,
            finished: FinishedRequests::default(),
            steps: 0,
            time_to_first_token: Histogram::new(TIME_TO_FIRST_TOKEN_BUCKETS),
            inter_token_latency: Histogram::new(INTER_TOKEN_LATENCY_BUCKETS),
        }
    }

    /// Adds the counters and histograms of `other` (what part of a step recorded apart).
    pub(crate) fn absorb(&mut self, other: &MetricsSnapshot) {
        self.prompt_tokens += other.prompt_tokens;
        self.generation_tokens += other.generation_tokens;
        self.prefix_cache_queried_tokens += other.prefix_cache_queried_tokens;
        self.prefix_cache_hit_tokens += other.prefix_cache_hit_tokens;
        self.images_encoded += other.images_encoded;
        self.encoder_cache_hits += other.encoder_cache_hits;
        self.decode_rows_run_apart += other.decode_rows_run_apart;
        self.prefill_chunks += other.prefill_chunks;
        self.prefill_runs += other.prefill_runs;
        self.finished.absorb(&other.finished);
        self.time_to_first_token.absorb(&other.time_to_first_token);
        self.inter_token_latency.absorb(&other.inter_token_latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_add_up() {
        let mut h = Histogram::new(&[0.01, 0.1, 1.0]);
        for v in [0.005, 0.01, 0.05, 2.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, [2, 1, 0, 1]);
        assert_eq!(h.cumulative(), [2, 3, 3, 4]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 2.065).abs() < 1e-12);
    }
}
