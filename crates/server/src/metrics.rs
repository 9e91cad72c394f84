//! `/metrics`: the engine's gauges, counters and histograms as Prometheus text (format 0.0.4).
//!
//! The three the Gateway API Inference Extension's model-server protocol asks for (gauges:
//! queued requests, running requests, KV-cache utilization from 0 to 1) are also written under
//! vLLM's names, so an inference gateway balances `pio serve` replicas as it does vLLM's.

use std::fmt::Write as _;

use pio_runtime::engine::{Histogram, MetricsSnapshot, ModelInfo, PREFIX_BLOCK_TOKENS};

/// The content type of the exposition.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition of `metrics` for the model `info` describes.
pub(crate) fn render(metrics: &MetricsSnapshot, info: &ModelInfo) -> String {
    let mut out = Exposition { text: String::new(), model: escape(&info.served_name) };
    let running = metrics.requests_running as f64;
    let waiting = metrics.requests_waiting as f64;
    let usage = metrics.kv_cache_usage;
    let running_help = "Requests holding a sequence slot (prefilling or decoding)";
    let waiting_help = "Requests waiting for a sequence slot";
    let usage_help = "KV-cache utilization, 0 to 1: sequence slots in use over all slots";
    out.gauge("pio_num_requests_running", running_help, running);
    out.gauge("pio_num_requests_waiting", waiting_help, waiting);
    out.gauge("pio_kv_cache_usage_ratio", usage_help, usage);
    out.gauge("vllm:num_requests_running", running_help, running);
    out.gauge("vllm:num_requests_waiting", waiting_help, waiting);
    out.gauge("vllm:kv_cache_usage_perc", usage_help, usage);
    // The name vLLM used before 0.10 (and the protocol's first version): older gateways read it.
    out.gauge("vllm:gpu_cache_usage_perc", usage_help, usage);

    // The cache's layout, as an info gauge (the protocol's optional BlockSize): prefix-cache
    // blocks of 16 tokens, and the KV pool's capacity in such blocks.
    let blocks = info.max_seqs * info.max_model_len / PREFIX_BLOCK_TOKENS;
    let config = [("block_size", PREFIX_BLOCK_TOKENS.to_string()), ("num_gpu_blocks", blocks.to_string())];
    for name in ["pio_cache_config_info", "vllm:cache_config_info"] {
        out.labeled(name, "gauge", "The KV cache's block size and capacity in blocks", &[(config.as_slice(), 1.0)]);
    }

    out.gauge("pio_prefix_cache_bytes", "Bytes the prefix cache holds", metrics.prefix_cache_bytes as f64);
    out.counter("pio_prompt_tokens_total", "Prompt tokens of admitted requests", metrics.prompt_tokens);
    out.counter("pio_generation_tokens_total", "Generated tokens", metrics.generation_tokens);
    out.counter(
        "pio_prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache",
        metrics.prefix_cache_queried_tokens,
    );
    out.counter(
        "pio_prefix_cache_hits_total",
        "Prompt tokens found in the prefix cache (their KV was reused)",
        metrics.prefix_cache_hit_tokens,
    );
    let f = &metrics.finished;
    let reasons = [
        ("stop", f.stop),
        ("length", f.length),
        ("context_length", f.context_length),
        ("cancelled", f.cancelled),
        ("error", f.error),
    ];
    let by_reason: Vec<[(&str, String); 1]> =
        reasons.iter().map(|(r, _)| [("finished_reason", r.to_string())]).collect();
    let samples: Vec<(&[(&str, String)], f64)> =
        by_reason.iter().zip(&reasons).map(|(labels, (_, n))| (labels.as_slice(), *n as f64)).collect();
    out.labeled("pio_requests_finished_total", "counter", "Requests that ended, by how", &samples);
    out.counter("pio_engine_steps_total", "Engine steps (one batched decode and prefill chunks each)", metrics.steps);
    out.histogram(
        "pio_time_to_first_token_seconds",
        "Seconds from a request's submission to its first token",
        &metrics.time_to_first_token,
    );
    out.histogram(
        "pio_inter_token_latency_seconds",
        "Seconds between consecutive tokens of a request",
        &metrics.inter_token_latency,
    );
    out.text
}

struct Exposition {
    text: String,
    /// The `model_name` label's value, escaped.
    model: String,
}

impl Exposition {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: f64) {
        let _ = write!(self.text, "{name}{{model_name=\"{}\"", self.model);
        for (key, v) in labels {
            let _ = write!(self.text, ",{key}=\"{}\"", escape(v));
        }
        let _ = writeln!(self.text, "}} {}", number(value));
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.head(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.head(name, "counter", help);
        self.sample(name, &[], value as f64);
    }

    fn labeled(&mut self, name: &str, kind: &str, help: &str, samples: &[(&[(&str, String)], f64)]) {
        self.head(name, kind, help);
        for (labels, value) in samples {
            self.sample(name, labels, *value);
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.head(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in h.bounds.iter().zip(h.cumulative()) {
            self.sample(&bucket, &[("le", number(*bound))], count as f64);
        }
        self.sample(&bucket, &[("le", "+Inf".into())], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(2560.0), "2560");
        assert_eq!(number(f64::INFINITY), "+Inf");
    }
}
