//! What a set of requests measured: throughput, goodput, time to first token and inter-token
//! latency percentiles, and the steady decode rate while every stream of a level runs.

use std::time::Instant;

use serde::Serialize;

use super::client::Trace;

/// Service-level objectives a request must meet to count towards goodput.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Slo {
    pub ttft_ms: f64,
    /// Mean inter-token latency of the request (its time per output token).
    pub itl_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub failed: usize,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    pub duration_s: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Requests per second that completed within the SLOs.
    pub goodput_requests_per_s: f64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub itl_p50_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    /// Tokens per second over all streams while every one of them was decoding (between the
    /// last first token and the first last token); None if they never all ran at once.
    pub steady_decode_tokens_per_s: Option<f64>,
}

/// The `q`-quantile (0..1) by nearest rank.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

pub fn summarize(traces: &[Trace], started: Instant, slo: Slo) -> Summary {
    let ok: Vec<&Trace> = traces.iter().filter(|t| t.error.is_none()).collect();
    let end = traces.iter().filter_map(|t| t.tokens.last()).max().copied().unwrap_or(started);
    let duration_s = (end - started).as_secs_f64().max(1e-9);
    let ttfts: Vec<f64> = ok.iter().filter_map(|t| t.ttft_s()).map(|s| s * 1e3).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|t| t.itls_s()).map(|s| s * 1e3).collect();
    let good = ok
        .iter()
        .filter(|t| {
            let ttft_ok = t.ttft_s().is_some_and(|s| s * 1e3 <= slo.ttft_ms);
            let n = t.tokens.len();
            let tpot_ok = n < 2 || (t.tokens[n - 1] - t.tokens[0]).as_secs_f64() * 1e3 / (n - 1) as f64 <= slo.itl_ms;
            ttft_ok && tpot_ok
        })
        .count();
    let output_tokens = ok.iter().map(|t| t.tokens.len()).sum();
    Summary {
        requests: traces.len(),
        failed: traces.len() - ok.len(),
        first_error: traces.iter().find_map(|t| t.error.clone()),
        duration_s,
        prompt_tokens: ok.iter().map(|t| t.prompt_tokens).sum(),
        output_tokens,
        cached_prompt_tokens: ok.iter().map(|t| t.cached_tokens).sum(),
        requests_per_s: ok.len() as f64 / duration_s,
        output_tokens_per_s: output_tokens as f64 / duration_s,
        goodput_requests_per_s: good as f64 / duration_s,
        ttft_p50_ms: percentile(&ttfts, 0.5),
        ttft_p99_ms: percentile(&ttfts, 0.99),
        itl_p50_ms: percentile(&itls, 0.5),
        itl_p99_ms: percentile(&itls, 0.99),
        steady_decode_tokens_per_s: steady_decode_rate(&ok),
    }
}

/// Tokens per second, over all `traces`, between the moment the last of them got its first
/// token and the moment the first of them got its last.
fn steady_decode_rate(traces: &[&Trace]) -> Option<f64> {
    let firsts: Option<Vec<Instant>> = traces.iter().map(|t| t.tokens.first().copied()).collect();
    let lasts: Option<Vec<Instant>> = traces.iter().map(|t| t.tokens.last().copied()).collect();
    let from = firsts?.into_iter().max()?;
    let to = lasts?.into_iter().min()?;
    let span = to.checked_duration_since(from)?.as_secs_f64();
    if span <= 0.0 {
        return None;
    }
    let tokens = traces.iter().flat_map(|t| &t.tokens).filter(|&&t| t > from && t <= to).count();
    Some(tokens as f64 / span)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn trace(start: Instant, first_ms: u64, every_ms: u64, n: usize) -> Trace {
        let tokens = (0..n as u64).map(|i| start + Duration::from_millis(first_ms + i * every_ms)).collect();
        Trace { prompt_tokens: 10, sent: start, tokens, cached_tokens: 0, error: None }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn two_streams_in_step_decode_at_twice_one_rate() {
        let start = Instant::now();
        // Both get a token every 10 ms from 100 ms on: 200 tokens/s together.
        let traces = [trace(start, 100, 10, 51), trace(start, 100, 10, 51)];
        let s = summarize(&traces, start, Slo { ttft_ms: 150.0, itl_ms: 20.0 });
        let rate = s.steady_decode_tokens_per_s.unwrap();
        assert!((rate - 200.0).abs() < 1.0, "{rate}");
        assert_eq!((s.ttft_p50_ms.unwrap().round(), s.itl_p99_ms.unwrap().round()), (100.0, 10.0));
        assert_eq!(s.output_tokens, 102);
        // Both meet the SLOs: 2 requests in 0.6 s.
        assert!((s.goodput_requests_per_s - 2.0 / 0.6).abs() < 0.01, "{}", s.goodput_requests_per_s);
        let strict = summarize(&traces, start, Slo { ttft_ms: 50.0, itl_ms: 20.0 });
        assert_eq!(strict.goodput_requests_per_s, 0.0);
    }
}
