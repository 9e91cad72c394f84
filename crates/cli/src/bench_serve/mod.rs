//! `pio bench serve`: a load generator for `pio serve`. Bounded and loopback only: it starts a
//! server on 127.0.0.1 (or targets `--url http://127.0.0.1:PORT`), runs a fixed set of
//! requests per section and stops by itself (at the latest after `--max-duration`).
//!
//! Sections, each optional (`--sections`):
//! - `offline`: `pio bench`'s batched decode of the same graph (batch `--offline-batch`), run
//!   first, in the same process, as the reference the serving figures are read against;
//! - `concurrency`: for each level c, c streams at once of `--prompt-len` prompt tokens and
//!   `--max-tokens` new ones;
//! - `prefix`: a `--prefix-len`-token shared prefix (a system prompt), time to first token on
//!   a prefix-cache hit against a cold prefix of the same length;
//! - `long-prefill`: `--long-streams` streams decoding while a `--long-prompt`-token prompt is
//!   prefilled: their inter-token latency during that prefill and outside it;
//! - `sweep` (last): Poisson arrivals at each of `--rates` requests/s for `--sweep-duration`
//!   seconds, prompt lengths drawn uniformly from `--sweep-prompt-lens`.
//!
//! Every request is a streamed, greedy `/v1/completions` request over random token ids (fixed
//! `--seed`), eos ignored, each token's id returned so that each token arrives as a chunk.

mod client;
mod stats;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use futures_util::stream::{FuturesUnordered, StreamExt};
use pio_models::cli_args::NumberRange;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::{self, BenchPlan};
use crate::ModelArgs;
use client::{stream_completion, Ask, Target, Trace};
use stats::{percentile, summarize, Slo};

/// Requests one arrival rate of the sweep sends at most (each holds its prompt until sent).
const MAX_ARRIVALS: usize = 20_000;
#[derive(ClapArgs)]
pub struct BenchServeArgs {
    /// The graph folder (served unless --url is given, and the offline reference either way),
    /// with the engine options `pio serve` takes.
    #[command(flatten)]
    model: ModelArgs,
    /// A running server to load instead of starting one: http://127.0.0.1:PORT (loopback only).
    #[arg(long)]
    url: Option<String>,
    /// The server's API key, if it needs one.
    #[arg(long, env = "PIO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Which sections to run, comma-separated: offline, concurrency, sweep, prefix, long-prefill.
    #[arg(long, value_delimiter = ',', default_value = "offline,concurrency,sweep,prefix,long-prefill")]
    sections: Vec<Section>,
    /// Streams at once, one level each (each >= 1).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64", value_parser = NumberRange::at_least(1usize))]
    concurrency: Vec<usize>,
    /// Prompt tokens of each concurrency-level request (and of the offline reference), >= 1.
    #[arg(long, default_value_t = 128, value_parser = NumberRange::at_least(1usize))]
    prompt_len: usize,
    /// New tokens of each concurrency-level request (and of the offline reference), >= 1.
    #[arg(long, default_value_t = 256, value_parser = NumberRange::at_least(1usize))]
    max_tokens: usize,
    /// Poisson arrival rates, requests per second (each > 0).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64", value_parser = NumberRange::above(0.0))]
    rates: Vec<f64>,
    /// Seconds of arrivals per rate, > 0 (then the requests in flight finish).
    #[arg(long, default_value_t = 10.0, value_parser = NumberRange::above(0.0))]
    sweep_duration: f64,
    /// Prompt lengths of the sweep, drawn uniformly: MIN..MAX tokens.
    #[arg(long, default_value = "64..4096")]
    sweep_prompt_lens: TokenRange,
    /// New tokens of each sweep request (>= 1).
    #[arg(long, default_value_t = 128, value_parser = NumberRange::at_least(1usize))]
    sweep_max_tokens: usize,
    /// Goodput counts the requests whose time to first token is at most this (> 0)...
    #[arg(long, default_value_t = 2000.0, value_parser = NumberRange::above(0.0))]
    slo_ttft_ms: f64,
    /// ...and whose mean inter-token latency is at most this (> 0).
    #[arg(long, default_value_t = 100.0, value_parser = NumberRange::above(0.0))]
    slo_itl_ms: f64,
    /// Tokens of the shared prefix (a system prompt), >= 1.
    #[arg(long, default_value_t = 2048, value_parser = NumberRange::at_least(1usize))]
    prefix_len: usize,
    /// Tokens after the prefix, different in each request (>= 1).
    #[arg(long, default_value_t = 64, value_parser = NumberRange::at_least(1usize))]
    prefix_suffix: usize,
    /// Prefix hits (and as many cold prefixes) measured, >= 1.
    #[arg(long, default_value_t = 5, value_parser = NumberRange::at_least(1usize))]
    prefix_requests: usize,
    /// Tokens of the long prompt prefilled while streams decode (>= 1).
    #[arg(long, default_value_t = 4096, value_parser = NumberRange::at_least(1usize))]
    long_prompt: usize,
    /// Streams decoding meanwhile (prompts of --prompt-len tokens), >= 1.
    #[arg(long, default_value_t = 31, value_parser = NumberRange::at_least(1usize))]
    long_streams: usize,
    /// New tokens of each of those streams (they must outlast the long prefill), >= 1.
    #[arg(long, default_value_t = 256, value_parser = NumberRange::at_least(1usize))]
    long_stream_tokens: usize,
    /// The offline reference's batch (its decode rate and step time), >= 1.
    #[arg(long, default_value_t = 32, value_parser = NumberRange::at_least(1usize))]
    offline_batch: usize,
    /// The whole run stops after this many seconds (> 0), reporting what finished.
    #[arg(long, default_value_t = 900.0, value_parser = NumberRange::above_up_to(0.0, 1e9))]
    max_duration: f64,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0, value_parser = NumberRange::<u64>::any())]
    seed: u64,
    /// Where the JSON report goes.
    #[arg(long, default_value = "serve-bench.json")]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Offline,
    Concurrency,
    Sweep,
    Prefix,
    LongPrefill,
}

impl FromStr for Section {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "offline" => Section::Offline,
            "concurrency" => Section::Concurrency,
            "sweep" => Section::Sweep,
            "prefix" => Section::Prefix,
            "long-prefill" => Section::LongPrefill,
            _ => return Err(format!("unknown section `{s}` (offline, concurrency, sweep, prefix, long-prefill)")),
        })
    }
}

/// A range of token counts, `MIN..MAX` (both included).
#[derive(Clone, Copy, Debug, Serialize)]
struct TokenRange {
    min: usize,
    max: usize,
}

impl FromStr for TokenRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once("..").ok_or_else(|| format!("`{s}` is not MIN..MAX"))?;
        let parse = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("`{v}` in `{s}`: {e}"));
        let (min, max) = (parse(a)?, parse(b)?);
        if min == 0 || min > max {
            return Err(format!("`{s}`: need 1 <= MIN <= MAX"));
        }
        Ok(TokenRange { min, max })
    }
}

impl BenchServeArgs {
    fn wants(&self, section: Section) -> bool {
        self.sections.contains(&section)
    }

    /// The longest sequence (prompt and new tokens) the chosen sections send.
    fn longest_sequence(&self) -> usize {
        let mut longest = 0;
        for (section, len) in [
            (Section::Concurrency, self.prompt_len + self.max_tokens),
            (Section::Sweep, self.sweep_prompt_lens.max + self.sweep_max_tokens),
            (Section::Prefix, self.prefix_len + self.prefix_suffix + 1),
            (Section::LongPrefill, (self.long_prompt + 1).max(self.prompt_len + self.long_stream_tokens)),
        ] {
            if self.wants(section) {
                longest = longest.max(len);
            }
        }
        longest
    }
}

pub fn run(args: BenchServeArgs) -> Result<()> {
    let remote = args.url.as_deref().map(|url| Target::from_url(url, args.api_key.clone())).transpose()?;
    let manifest = pio_models::Manifest::load(&args.model.graphs)?;
    let vocab = manifest.dims.vocab_size;
    let slo = Slo { ttft_ms: args.slo_ttft_ms, itl_ms: args.slo_itl_ms };
    let deadline = Instant::now() + Duration::from_secs_f64(args.max_duration);
    let mut report = json!({
        "machine": crate::machine_description(),
        "date": crate::chrono_like_now(),
        "graphs": args.model.graphs,
        "settings": {
            "concurrency": args.concurrency, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
            "rates": args.rates, "sweep_duration_s": args.sweep_duration, "sweep_prompt_lens": args.sweep_prompt_lens,
            "sweep_max_tokens": args.sweep_max_tokens, "slo": slo, "prefix_len": args.prefix_len,
            "prefix_suffix": args.prefix_suffix, "long_prompt": args.long_prompt, "long_streams": args.long_streams,
            "offline_batch": args.offline_batch, "seed": args.seed,
            "ep": args.model.ep, "ep_options": args.model.ep_options,
        },
    });
    // The engine's settings are this command's only when it starts the server: a server at --url
    // has its own, which the report does not claim to know.
    report["settings"]["engine"] = match &args.url {
        Some(url) => json!({"remote": url}),
        None => json!({
            "max_seqs": args.model.max_seqs,
            "prefill_budget": args.model.prefill_budget,
            "idle_prefill_budget": args.model.idle_prefill_budget,
            "long_prefill_token_threshold": args.model.long_prefill_token_threshold,
            "itl_factor": args.model.itl_factor,
        }),
    };

    // First, alone on the device: the offline reference of the same graph.
    let mut offline_step = None;
    if args.wants(Section::Offline) {
        let ep = args.model.ep()?;
        let plan = BenchPlan {
            prompt_lens: vec![],
            decode_prompt_len: args.prompt_len,
            decode_tokens: args.max_tokens,
            batches: vec![args.offline_batch],
            repeats: 1,
            cuda_graph: ep.cuda_graph(),
            host_argmax: false,
            prefill_chunk: None,
            check_chunked_prefill: false,
            seed: args.seed,
            stages: args.model.stages.options(),
        };
        tracing::info!("offline reference: pio bench's decode at batch {}", args.offline_batch);
        let run = bench::bench_one(&args.model.graphs, "offline", &ep, &plan);
        if let Some(e) = &run.error {
            bail!("the offline reference failed: {e}");
        }
        let row = run.decode.iter().find(|d| d.batch == args.offline_batch).with_context(|| {
            format!("the offline reference has no decode at batch {} ({:?})", args.offline_batch, run.skipped)
        })?;
        offline_step = Some((row.tokens_per_s, row.ms_per_step));
        report["offline"] =
            json!({"batch": row.batch, "tokens_per_s": row.tokens_per_s, "ms_per_step": row.ms_per_step});
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let (target, server) = match remote {
            Some(target) => (target, None),
            None => {
                let (target, server) = start_server(&args.model).await?;
                (target, Some(server))
            }
        };
        let limit = client::max_model_len(&target).await?;
        if args.longest_sequence() > limit {
            bail!(
                "the sections send sequences of up to {} tokens, but the server holds {limit} per sequence \
                 (raise --max-model-len, or shorten the prompts)",
                args.longest_sequence()
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        let mut random = move |n: usize| bench::random_tokens(&mut rng, n, vocab);
        let load = Load { target, slo, deadline };
        let sections = run_sections(&args, &load, &mut random).await;
        if let Some(server) = server {
            server.stop().await;
        }
        for (key, value) in sections {
            report[key] = value;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    add_checks(&mut report, offline_step, args.offline_batch);
    print_report(&report);
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The server the load generator started, in this process.
struct LocalServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), pio_server::ServerError>>,
}

impl LocalServer {
    async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Err(e)) => tracing::warn!("the server stopped with an error: {e}"),
            Err(e) => tracing::warn!("the server task failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

async fn start_server(model: &ModelArgs) -> Result<(Target, LocalServer)> {
    // The sweep may queue many requests: none is refused for a full queue.
    let config = model.config()?.max_waiting(1 << 20).build()?;
    let engine = tokio::task::spawn_blocking(move || pio_runtime::engine::Engine::start(config)).await??;
    let server_config = pio_server::ServerConfig::builder().host("127.0.0.1").port(0).request_timeout(None).build()?;
    let server = pio_server::Server::bind(engine, &server_config).await?;
    let target = Target { address: server.local_addr(), api_key: None };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Ok((target, LocalServer { stop, task }))
}

/// Where the load goes and its bounds.
struct Load {
    target: Target,
    slo: Slo,
    deadline: Instant,
}

impl Load {
    /// Runs `requests` (each waiting `delay` first) together; a request still running at the
    /// deadline is dropped (its connection closes, which cancels it) and reported as failed.
    async fn run(&self, requests: Vec<(Duration, Ask, Option<Arc<AtomicUsize>>)>) -> Vec<Trace> {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let mut pending: FuturesUnordered<_> = requests
            .into_iter()
            .map(|(delay, ask, progress)| async move {
                tokio::time::sleep(delay).await;
                let prompt_tokens = ask.prompt.len();
                let sent = Instant::now();
                match tokio::time::timeout_at(deadline, stream_completion(&self.target, &ask, progress)).await {
                    Ok(trace) => trace,
                    Err(_) => Trace {
                        prompt_tokens,
                        sent,
                        tokens: vec![],
                        cached_tokens: 0,
                        error: Some("stopped at --max-duration".into()),
                    },
                }
            })
            .collect();
        let mut traces = Vec::new();
        while let Some(trace) = pending.next().await {
            traces.push(trace);
        }
        traces
    }

    fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The time --max-duration leaves.
    fn time_left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

type Sections = Vec<(&'static str, Value)>;

async fn run_sections(args: &BenchServeArgs, load: &Load, random: &mut impl FnMut(usize) -> Vec<u32>) -> Sections {
    let mut out: Sections = Vec::new();
    if args.wants(Section::Concurrency) {
        let mut levels = Vec::new();
        for &c in &args.concurrency {
            if load.past_deadline() {
                break;
            }
            tracing::info!("concurrency {c}: {c} streams of {} + {} tokens", args.prompt_len, args.max_tokens);
            let asks = (0..c)
                .map(|_| (Duration::ZERO, Ask { prompt: random(args.prompt_len), max_tokens: args.max_tokens }, None))
                .collect();
            let started = Instant::now();
            let traces = load.run(asks).await;
            levels.push(json!({"concurrency": c, "summary": summarize(&traces, started, load.slo)}));
        }
        out.push(("concurrency", json!(levels)));
    }
    if args.wants(Section::Prefix) && !load.past_deadline() {
        out.push(("shared_prefix", shared_prefix(args, load, random).await));
    }
    if args.wants(Section::LongPrefill) && !load.past_deadline() {
        out.push(("long_prefill", long_prefill(args, load, random).await));
    }
    // The sweep last: its highest rates may queue past --max-duration.
    if args.wants(Section::Sweep) {
        let mut rates = Vec::new();
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
        for &rate in &args.rates {
            if load.past_deadline() {
                break;
            }
            let mut asks = Vec::new();
            let mut at = 0.0;
            // Arrivals past --max-duration would never be sent: they are not made either (a high
            // rate over a long sweep is more requests than memory holds).
            let horizon = args.sweep_duration.min(load.time_left().as_secs_f64());
            loop {
                // Exponential gaps between arrivals: a Poisson process of `rate` per second.
                at += -(1.0 - rng.random::<f64>()).ln() / rate;
                if at >= horizon {
                    break;
                }
                if asks.len() == MAX_ARRIVALS {
                    tracing::warn!("arrival rate {rate}/s: only the first {MAX_ARRIVALS} requests are sent");
                    break;
                }
                let len = rng.random_range(args.sweep_prompt_lens.min..=args.sweep_prompt_lens.max);
                asks.push((
                    Duration::from_secs_f64(at),
                    Ask { prompt: random(len), max_tokens: args.sweep_max_tokens },
                    None,
                ));
            }
            tracing::info!("arrival rate {rate}/s: {} requests over {} s", asks.len(), args.sweep_duration);
            let started = Instant::now();
            let traces = load.run(asks).await;
            rates.push(json!({"rate": rate, "summary": summarize(&traces, started, load.slo)}));
        }
        out.push(("sweep", json!(rates)));
    }
    out
}

/// Time to first token with a shared prefix from the cache, against a cold prefix of the same
/// length; one request at a time.
async fn shared_prefix(args: &BenchServeArgs, load: &Load, random: &mut impl FnMut(usize) -> Vec<u32>) -> Value {
    tracing::info!(
        "shared prefix of {} tokens: {} hits and {} cold",
        args.prefix_len,
        args.prefix_requests,
        args.prefix_requests
    );
    let prefix = random(args.prefix_len);
    let with = |head: &[u32], tail: Vec<u32>| Ask { prompt: [head, &tail].concat(), max_tokens: 1 };
    let one = |ask: Ask| async move { load.run(vec![(Duration::ZERO, ask, None)]).await.remove(0) };
    // The first request with the prefix puts it in the cache.
    let warm = one(with(&prefix, random(args.prefix_suffix))).await;
    let (mut hits, mut colds) = (Vec::new(), Vec::new());
    for _ in 0..args.prefix_requests {
        colds.push(one(with(&random(args.prefix_len), random(args.prefix_suffix))).await);
        hits.push(one(with(&prefix, random(args.prefix_suffix))).await);
    }
    let ttfts = |ts: &[Trace]| ts.iter().filter_map(|t| t.ttft_s()).map(|s| s * 1e3).collect::<Vec<_>>();
    let (hit, cold) = (ttfts(&hits), ttfts(&colds));
    let errors: Vec<&String> =
        [&warm].into_iter().chain(&hits).chain(&colds).filter_map(|t| t.error.as_ref()).collect();
    let (hit_p50, cold_p50) = (percentile(&hit, 0.5), percentile(&cold, 0.5));
    json!({
        "prefix_tokens": args.prefix_len,
        "suffix_tokens": args.prefix_suffix,
        "hit_cached_tokens": hits.iter().map(|t| t.cached_tokens).collect::<Vec<_>>(),
        "cold_cached_tokens": colds.iter().map(|t| t.cached_tokens).collect::<Vec<_>>(),
        "hit_ttft_ms": hit,
        "cold_ttft_ms": cold,
        "hit_ttft_p50_ms": hit_p50,
        "cold_ttft_p50_ms": cold_p50,
        "hit_over_cold": hit_p50.zip(cold_p50).map(|(h, c)| h / c),
        "errors": errors,
    })
}

/// Streams decoding while a long prompt is prefilled: their inter-token latency during the
/// prefill (from the long request's submission to its first token) and outside it.
async fn long_prefill(args: &BenchServeArgs, load: &Load, random: &mut impl FnMut(usize) -> Vec<u32>) -> Value {
    tracing::info!("{} streams decoding while a {}-token prompt is prefilled", args.long_streams, args.long_prompt);
    let progress: Vec<Arc<AtomicUsize>> = (0..args.long_streams).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let streams: Vec<_> = progress
        .iter()
        .map(|p| {
            (
                Duration::ZERO,
                Ask { prompt: random(args.prompt_len), max_tokens: args.long_stream_tokens },
                Some(p.clone()),
            )
        })
        .collect();
    let long_prompt = random(args.long_prompt);
    let background = load.run(streams);
    let probe = async {
        // Once every stream decodes (a few tokens each), the long prompt comes.
        while progress.iter().any(|p| p.load(Ordering::Relaxed) < 4) && !load.past_deadline() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        load.run(vec![(Duration::ZERO, Ask { prompt: long_prompt, max_tokens: 1 }, None)]).await.remove(0)
    };
    let (background, long) = tokio::join!(background, probe);
    let window = long.tokens.first().map(|first| (long.sent, *first));
    let (mut during, mut outside) = (Vec::new(), Vec::new());
    for t in background.iter().filter(|t| t.error.is_none()) {
        for w in t.tokens.windows(2) {
            let gap = (w[1] - w[0]).as_secs_f64() * 1e3;
            match window {
                // A gap that overlaps the prefill.
                Some((from, to)) if w[1] > from && w[0] < to => during.push(gap),
                _ => outside.push(gap),
            }
        }
    }
    // Every stream sees the same engine steps: one stream's slowest gaps in the window, each with
    // when it ended after the long prompt was sent, tell a step that stands out (the first chunk, the
    // last, one run of a new shape) from a uniformly slower stretch.
    let slowest: Vec<Value> = match (window, background.iter().find(|t| t.error.is_none())) {
        (Some((from, to)), Some(stream)) => {
            let mut gaps: Vec<(f64, f64)> = stream
                .tokens
                .windows(2)
                .filter(|w| w[1] > from && w[0] < to)
                .map(|w| ((w[1] - w[0]).as_secs_f64() * 1e3, w[1].saturating_duration_since(from).as_secs_f64() * 1e3))
                .collect();
            gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
            gaps.iter().take(5).map(|&(gap, at)| json!({"gap_ms": gap, "ended_ms_after_sent": at})).collect()
        }
        _ => Vec::new(),
    };
    let errors: Vec<&String> = background.iter().chain([&long]).filter_map(|t| t.error.as_ref()).collect();
    json!({
        "one_streams_slowest_gaps_during_prefill": slowest,
        "long_prompt_tokens": args.long_prompt,
        "streams": args.long_streams,
        "long_ttft_ms": long.ttft_s().map(|s| s * 1e3),
        "gaps_during_prefill": during.len(),
        "itl_during_prefill_p50_ms": percentile(&during, 0.5),
        "itl_during_prefill_p99_ms": percentile(&during, 0.99),
        "itl_outside_p50_ms": percentile(&outside, 0.5),
        "itl_outside_p99_ms": percentile(&outside, 0.99),
        "errors": errors,
    })
}

/// The targets, read off this run: decode at the offline batch against the offline
/// rate, p99 inter-token latency against the offline step, prefix hit against cold, and
/// latency during a long prefill against the step.
fn add_checks(report: &mut Value, offline: Option<(f64, f64)>, batch: usize) {
    let level = report["concurrency"]
        .as_array()
        .and_then(|levels| levels.iter().find(|l| l["concurrency"] == batch))
        .map(|l| l["summary"].clone());
    let number = |v: &Value| v.as_f64();
    let mut checks = json!({});
    if let (Some((rate, step)), Some(level)) = (offline, &level) {
        checks["decode_over_offline"] = json!(number(&level["steady_decode_tokens_per_s"]).map(|d| d / rate));
        checks["itl_p99_over_offline_step"] = json!(number(&level["itl_p99_ms"]).map(|i| i / step));
    }
    checks["prefix_hit_over_cold"] = report["shared_prefix"]["hit_over_cold"].clone();
    let during = number(&report["long_prefill"]["itl_during_prefill_p99_ms"]);
    if let (Some(during), Some((_, step))) = (during, offline) {
        checks["long_prefill_itl_p99_over_offline_step"] = json!(during / step);
    }
    if let (Some(during), Some(outside)) = (during, number(&report["long_prefill"]["itl_outside_p50_ms"])) {
        checks["long_prefill_itl_p99_over_decode_p50"] = json!(during / outside);
    }
    checks["targets"] = json!({
        "decode_over_offline": ">= 0.85", "itl_p99_over_offline_step": "<= 2",
        "prefix_hit_over_cold": "<= 0.25", "long_prefill_itl_p99_over_offline_step": "< 3",
    });
    report["checks"] = checks;
}

fn print_report(report: &Value) {
    let ms = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    if let Some(o) = report.get("offline") {
        println!(
            "offline (pio bench) batch {}: {} tokens/s decode, {} ms per step",
            o["batch"],
            ms(&o["tokens_per_s"]),
            ms(&o["ms_per_step"])
        );
    }
    let row = |label: String, s: &Value| {
        println!(
            "{label:>13} {:>5} {:>5} {:>11} {:>11} {:>8} {:>9} {:>9} {:>8} {:>8}",
            s["requests"].to_string(),
            s["failed"].to_string(),
            ms(&s["output_tokens_per_s"]),
            ms(&s["steady_decode_tokens_per_s"]),
            ms(&s["goodput_requests_per_s"]),
            ms(&s["ttft_p50_ms"]),
            ms(&s["ttft_p99_ms"]),
            ms(&s["itl_p50_ms"]),
            ms(&s["itl_p99_ms"])
        );
    };
    let header = || {
        println!(
            "{:>13} {:>5} {:>5} {:>11} {:>11} {:>8} {:>9} {:>9} {:>8} {:>8}",
            "", "reqs", "fail", "out tok/s", "steady t/s", "goodput", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"
        )
    };
    if let Some(levels) = report["concurrency"].as_array() {
        header();
        for l in levels {
            row(format!("{} streams", l["concurrency"]), &l["summary"]);
        }
    }
    if let Some(rates) = report["sweep"].as_array() {
        header();
        for r in rates {
            row(format!("{} req/s", r["rate"]), &r["summary"]);
        }
    }
    if let Some(p) = report.get("shared_prefix") {
        println!(
            "shared prefix of {} tokens: TTFT hit {} ms, cold {} ms (hit/cold {})",
            p["prefix_tokens"],
            ms(&p["hit_ttft_p50_ms"]),
            ms(&p["cold_ttft_p50_ms"]),
            p["hit_over_cold"].as_f64().map_or("-".into(), |x| format!("{x:.2}"))
        );
    }
    if let Some(l) = report.get("long_prefill") {
        println!(
            "{} streams while a {}-token prompt prefills: ITL p50/p99 {}/{} ms during, {}/{} ms outside; its TTFT {} ms",
            l["streams"],
            l["long_prompt_tokens"],
            ms(&l["itl_during_prefill_p50_ms"]),
            ms(&l["itl_during_prefill_p99_ms"]),
            ms(&l["itl_outside_p50_ms"]),
            ms(&l["itl_outside_p99_ms"]),
            ms(&l["long_ttft_ms"])
        );
        if let Some(gaps) = l["one_streams_slowest_gaps_during_prefill"].as_array().filter(|g| !g.is_empty()) {
            let list: Vec<String> = gaps
                .iter()
                .map(|g| format!("{} ms at +{} ms", ms(&g["gap_ms"]), ms(&g["ended_ms_after_sent"])))
                .collect();
            println!("  one stream's slowest gaps during it: {}", list.join(", "));
        }
    }
    println!("checks: {}", report["checks"]);
}
