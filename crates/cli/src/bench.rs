//! `pio bench`: time to first token, decode throughput (batch 1 and larger), memory, power and
//! accuracy, for every requested execution provider and graph variant in one run, printed as a
//! table and written as JSON.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::gpu_monitor::{host_peak_rss_bytes, GpuMonitor};
use pio_runtime::model::{argmax, DecoderModel, Fetch, KvCache};
use pio_runtime::stages::{PipelineMode, StageOptions, StageTimings};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// What to measure.
#[derive(Clone, Debug, Serialize)]
pub struct BenchPlan {
    pub prompt_lens: Vec<usize>,
    /// Prompt length before the decode measurements.
    pub decode_prompt_len: usize,
    pub decode_tokens: usize,
    pub batches: Vec<usize>,
    /// Timed repetitions of each time-to-first-token measurement (the median is reported).
    pub repeats: usize,
    /// Replay the decode step from a captured CUDA graph (CUDA only).
    pub cuda_graph: bool,
    /// Greedy tokens from the logits on the host (the whole batch x vocab copied back each step)
    /// instead of the graph's own argmax output.
    pub host_argmax: bool,
    /// Prompt tokens per forward pass (None: a whole prompt at once).
    pub prefill_chunk: Option<usize>,
    /// Also compare chunked with whole-prompt prefill logits at the longest prompt length.
    pub check_chunked_prefill: bool,
    pub seed: u64,
    /// Where a staged export's stages run (`--devices`, `--micro-batches`).
    pub stages: StageOptions,
}

#[derive(Clone, Debug, Serialize)]
pub struct TtftRow {
    pub prompt_len: usize,
    pub ms: f64,
    pub prefill_tokens_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecodeRow {
    pub batch: usize,
    /// Output tokens per second over all sequences.
    pub tokens_per_s: f64,
    pub ms_per_step: f64,
    pub avg_power_w: Option<f64>,
    pub tokens_per_joule: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SkipRow {
    pub what: String,
    pub reason: String,
}

/// One (graph, execution provider, runtime switches) combination.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRun {
    pub graphs: PathBuf,
    pub label: String,
    pub ep: String,
    pub precision: String,
    pub options: serde_json::Value,
    pub cuda_graph: bool,
    pub host_argmax: bool,
    pub prefill_chunk: Option<usize>,
    /// The one-token kernel a `--pio-kernels` graph ran on: the value of `PIO_ONE_TOKEN_KERNEL`
    /// (None: unset, each weight format's default: the GEMV for 16-bit weights, the tiles for
    /// int4), so that runs of one build with different values can be told apart in their results.
    pub pio_one_token_kernel: Option<String>,
    /// None when the run worked; otherwise why it could not start or stopped.
    pub error: Option<String>,
    pub load_s: f64,
    pub ttft: Vec<TtftRow>,
    pub decode: Vec<DecodeRow>,
    pub skipped: Vec<SkipRow>,
    pub gpu_peak_memory_bytes: Option<u64>,
    /// GPU memory in use once the session is loaded, before any step: the weights, the CUDA
    /// context and libraries' workspaces.
    pub gpu_memory_after_load_bytes: Option<u64>,
    pub host_peak_rss_bytes: Option<u64>,
    pub weight_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub chunked_prefill_check: Option<ChunkCheck>,
    /// With CUDA graphs: the greedy tokens of replayed steps against the same steps run without
    /// the graph, from the same prompt.
    pub cuda_graph_check: Option<GraphCheck>,
    /// A staged export: its stages, and each measurement with the stages overlapped and run one
    /// after the other.
    pub pipeline: Option<PipelineReport>,
}

/// A staged export's pipeline: where its stages ran and what overlapping them bought.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineReport {
    pub stages: usize,
    pub stage_layers: Vec<std::ops::Range<usize>>,
    pub stage_devices: Vec<Option<i32>>,
    pub micro_batches: usize,
    pub rows: Vec<PipelineRow>,
}

/// One measurement of a staged export under one pipeline mode.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineRow {
    /// `decode b8`, `prefill 2048`.
    pub what: String,
    pub mode: PipelineMode,
    /// Pipeline threads.
    pub threads: usize,
    /// Wall time per decode step, or of the prefill.
    pub ms: f64,
    pub tokens_per_s: f64,
    /// Each stage's busy time over the measurement (session runs and the copies into them).
    pub stage_busy_ms: Vec<f64>,
    /// The share of the devices' time idle: 1 - their busy time / (devices x wall time).
    pub bubble: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GraphCheck {
    pub batch: usize,
    pub steps: usize,
    pub same_tokens: bool,
}

/// Chunked against whole-prompt prefill: the same prompt's last logits both ways.
#[derive(Clone, Debug, Serialize)]
pub struct ChunkCheck {
    pub prompt_len: usize,
    pub chunk: usize,
    pub max_abs_diff: f32,
    pub same_argmax: bool,
}

pub(crate) fn random_tokens(rng: &mut ChaCha8Rng, n: usize, vocab: usize) -> Vec<u32> {
    // Avoid the special-token range at the top of real vocabularies.
    let hi = (vocab * 9 / 10).max(2) as u32;
    (0..n).map(|_| rng.random_range(1..hi)).collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| it.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

struct Runner<'a> {
    model: DecoderModel,
    plan: &'a BenchPlan,
    rng: ChaCha8Rng,
    gpu_index: Option<u32>,
}

impl Runner<'_> {
    fn fetch(&self) -> Fetch {
        if self.plan.host_argmax {
            Fetch::Logits
        } else {
            Fetch::Greedy
        }
    }

    /// One step; each sequence's greedy next token.
    fn step(&mut self, tokens: &[u32], cache: &mut KvCache, graph: bool) -> Result<Vec<u32>> {
        let fetch = self.fetch();
        let out = if graph && tokens.len() == cache.batch && cache.len > 0 {
            self.model.decode_step_graph(tokens, cache, fetch)?
        } else {
            self.model.step(tokens, cache.batch, cache, fetch)?
        };
        Ok(out.greedy())
    }

    /// Prefill of `len` tokens then the first greedy token: the time a user waits.
    fn ttft(&mut self, len: usize) -> Result<TtftRow> {
        let vocab = self.model.vocab_size();
        let mut times = Vec::new();
        for rep in 0..=self.plan.repeats {
            let prompt = random_tokens(&mut self.rng, len, vocab);
            let mut cache = self.model.new_batch_cache(1, len + 1)?;
            let start = Instant::now();
            std::hint::black_box(self.step(&prompt, &mut cache, false)?);
            let t = start.elapsed().as_secs_f64();
            if rep > 0 {
                times.push(t); // the first run warms up kernels and allocations
            }
        }
        let s = median(times);
        Ok(TtftRow { prompt_len: len, ms: s * 1e3, prefill_tokens_per_s: len as f64 / s })
    }

    /// `decode_tokens` greedy steps for `batch` sequences after a prompt of `decode_prompt_len`.
    fn decode(&mut self, batch: usize) -> Result<DecodeRow> {
        let vocab = self.model.vocab_size();
        let p = self.plan.decode_prompt_len;
        let n = self.plan.decode_tokens;
        let graph = self.plan.cuda_graph;
        let prompt = random_tokens(&mut self.rng, batch * p, vocab);
        // Warm-up pass (captures the CUDA graph when on), then the timed pass.
        let mut result = None;
        // One cache for both passes: the CUDA graph captured in the warm-up holds its addresses.
        let mut cache = self.model.new_batch_cache(batch, p + n + 1)?;
        for timed in [false, true] {
            if cache.truncate(0).is_err() {
                cache = self.model.new_batch_cache(batch, p + n + 1)?; // a growing cache starts over
            }
            let mut next = self.step(&prompt, &mut cache, false)?;
            let steps = if timed { n } else { n.min(4) };
            let monitor = match (timed, self.gpu_index) {
                (true, Some(i)) => GpuMonitor::start(i, Duration::from_millis(20)).ok(),
                _ => None,
            };
            let start = Instant::now();
            for _ in 0..steps {
                next = self.step(&next, &mut cache, graph)?;
            }
            let secs = start.elapsed().as_secs_f64();
            if timed {
                let stats = monitor.map(|m| m.stop());
                let tokens = (batch * steps) as f64;
                let energy = stats.as_ref().map(|s| s.energy_joules).filter(|e| *e > 0.0);
                result = Some(DecodeRow {
                    batch,
                    tokens_per_s: tokens / secs,
                    ms_per_step: secs * 1e3 / steps as f64,
                    avg_power_w: stats.as_ref().map(|s| s.avg_power_w),
                    tokens_per_joule: energy.map(|e| tokens / e),
                });
            }
        }
        result.ok_or_else(|| anyhow!("no decode measurement"))
    }

    /// `steps` greedy steps for `batch` sequences replayed from the CUDA graph, and the same
    /// steps run without it: the replay must choose the same tokens.
    fn check_cuda_graph(&mut self, batch: usize, steps: usize) -> Result<GraphCheck> {
        let prompt = random_tokens(&mut self.rng, batch * 16, self.model.vocab_size());
        let mut runs = Vec::new();
        for graph in [true, false] {
            let mut cache = self.model.new_batch_cache(batch, 16 + steps + 1)?;
            let mut next = self.step(&prompt, &mut cache, false)?;
            let mut tokens = next.clone();
            for _ in 0..steps {
                next = self.step(&next, &mut cache, graph)?;
                tokens.extend_from_slice(&next);
            }
            runs.push(tokens);
        }
        Ok(GraphCheck { batch, steps, same_tokens: runs[0] == runs[1] })
    }

    /// One measurement's row from the stage timings it left.
    fn pipeline_row(&self, what: String, secs: f64, tokens: usize, per: usize) -> PipelineRow {
        let t: &StageTimings = self.model.stage_timings();
        let (mode, threads) = self.model.pipeline();
        PipelineRow {
            what,
            mode,
            threads,
            ms: secs * 1e3 / per.max(1) as f64,
            tokens_per_s: tokens as f64 / secs,
            stage_busy_ms: t.busy.iter().map(|b| b.as_secs_f64() * 1e3).collect(),
            bubble: t.bubble(),
        }
    }

    /// A staged export's decode (each batch) and prefill (the longest prompt) with the stages
    /// run one after the other and overlapped (`mode`), with each stage's busy time.
    fn pipeline(&mut self, mode: PipelineMode) -> Result<PipelineReport> {
        let vocab = self.model.vocab_size();
        let (p, n) = (self.plan.decode_prompt_len, self.plan.decode_tokens.max(1));
        let context = self.model.context_length();
        let mut rows = Vec::new();
        for m in [PipelineMode::Sequential, mode] {
            self.model.set_pipeline(m);
            for &batch in &self.plan.batches {
                let prompt = random_tokens(&mut self.rng, batch * p, vocab);
                let mut cache = self.model.new_batch_cache(batch, p + n + 3)?;
                let mut next = self.step(&prompt, &mut cache, false)?;
                for _ in 0..2 {
                    next = self.step(&next, &mut cache, self.plan.cuda_graph)?; // warm-up (and capture)
                }
                self.model.reset_stage_timings();
                let start = Instant::now();
                for _ in 0..n {
                    next = self.step(&next, &mut cache, self.plan.cuda_graph)?;
                }
                let secs = start.elapsed().as_secs_f64();
                rows.push(self.pipeline_row(format!("decode b{batch}"), secs, batch * n, n));
            }
            if let Some(len) = self.plan.prompt_lens.iter().copied().filter(|&l| l < context).max() {
                let prompt = random_tokens(&mut self.rng, len, vocab);
                let mut cache = self.model.new_batch_cache(1, len + 1)?;
                self.step(&prompt, &mut cache, false)?; // warm-up
                cache = self.model.new_batch_cache(1, len + 1)?;
                self.model.reset_stage_timings();
                let start = Instant::now();
                self.step(&prompt, &mut cache, false)?;
                let secs = start.elapsed().as_secs_f64();
                rows.push(self.pipeline_row(format!("prefill {len}"), secs, len, 1));
            }
        }
        self.model.set_pipeline(mode);
        Ok(PipelineReport {
            stages: self.model.stage_count(),
            stage_layers: self.model.stage_layers(),
            stage_devices: self.model.stage_devices(),
            micro_batches: self.model.micro_batches(),
            rows,
        })
    }

    /// The last logits of one prompt prefilled in chunks and whole.
    fn check_chunked_prefill(&mut self, len: usize, chunk: usize) -> Result<ChunkCheck> {
        let prompt = random_tokens(&mut self.rng, len, self.model.vocab_size());
        let mut last = Vec::new();
        for chunking in [Some(chunk), None] {
            self.model.set_prefill_chunk(chunking);
            let mut cache = self.model.new_batch_cache(1, len)?;
            let logits = self.model.forward(&prompt, &mut cache)?;
            last.push(logits.last().to_vec());
        }
        self.model.set_prefill_chunk(self.plan.prefill_chunk);
        let max_abs_diff = last[0].iter().zip(&last[1]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        Ok(ChunkCheck { prompt_len: len, chunk, max_abs_diff, same_argmax: argmax(&last[0]) == argmax(&last[1]) })
    }
}

/// Benchmarks one graph folder on one execution provider. Failures become the row's `error`.
pub fn bench_one(graphs: &Path, label: &str, ep: &ExecutionProvider, plan: &BenchPlan) -> BenchRun {
    let manifest = pio_models::Manifest::load(graphs).ok();
    let mut run = BenchRun {
        graphs: graphs.to_path_buf(),
        label: label.to_string(),
        ep: ep.name().to_string(),
        precision: manifest.as_ref().map(|m| m.precision.as_str().to_string()).unwrap_or_default(),
        options: manifest.as_ref().and_then(|m| serde_json::to_value(&m.options).ok()).unwrap_or_default(),
        cuda_graph: plan.cuda_graph,
        host_argmax: plan.host_argmax,
        prefill_chunk: plan.prefill_chunk,
        pio_one_token_kernel: std::env::var(pio_kernels::gpu::ONE_TOKEN_KERNEL_VAR).ok(),
        error: None,
        load_s: 0.0,
        ttft: vec![],
        decode: vec![],
        skipped: vec![],
        gpu_peak_memory_bytes: None,
        gpu_memory_after_load_bytes: None,
        host_peak_rss_bytes: None,
        weight_bytes: dir_bytes(graphs),
        kv_bytes_per_token: manifest
            .as_ref()
            .map(|m| {
                2 * (m.dims.num_layers * m.dims.num_kv_heads * m.dims.head_dim * m.kv_cache.dtype.size_bytes()) as u64
            })
            .unwrap_or(0),
        chunked_prefill_check: None,
        cuda_graph_check: None,
        pipeline: None,
    };
    let gpu_index = ep.device_id().map(|d| d.max(0) as u32);
    // One monitor over the whole run gives the peak GPU memory.
    let whole_run = gpu_index.and_then(|i| GpuMonitor::start(i, Duration::from_millis(50)).ok());
    if let Err(e) = bench_into(&mut run, graphs, ep, plan, gpu_index) {
        run.error = Some(format!("{e:#}"));
    }
    if let Some(m) = whole_run {
        run.gpu_peak_memory_bytes = Some(m.stop().peak_memory_bytes);
    }
    run.host_peak_rss_bytes = host_peak_rss_bytes();
    run
}

fn bench_into(
    run: &mut BenchRun,
    graphs: &Path,
    ep: &ExecutionProvider,
    plan: &BenchPlan,
    gpu_index: Option<u32>,
) -> Result<()> {
    if plan.cuda_graph && !matches!(ep, ExecutionProvider::Cuda { .. }) {
        bail!("CUDA graphs apply to the CUDA execution provider only");
    }
    let start = Instant::now();
    let mut model = DecoderModel::load_with(graphs, ep, &plan.stages)?;
    model.set_prefill_chunk(plan.prefill_chunk);
    run.load_s = start.elapsed().as_secs_f64();
    run.gpu_memory_after_load_bytes =
        gpu_index.and_then(|i| pio_runtime::gpu_monitor::device_memory(i).ok()).map(|(used, _, _)| used);
    let context = model.context_length();
    let mut runner = Runner { model, plan, rng: ChaCha8Rng::seed_from_u64(plan.seed), gpu_index };
    for &len in &plan.prompt_lens {
        if len + 1 > context {
            run.skipped.push(SkipRow {
                what: format!("ttft {len}"),
                reason: format!("over the graph's context length {context}"),
            });
            continue;
        }
        let row = runner.ttft(len).with_context(|| format!("time to first token at {len} tokens"))?;
        tracing::info!("{} {}: ttft {len} tokens: {:.1} ms", run.label, run.ep, row.ms);
        run.ttft.push(row);
    }
    let decode_len = plan.decode_prompt_len + plan.decode_tokens + 1;
    for &batch in &plan.batches {
        // Checked before the prompts are made: batch x prompt tokens can be more than memory holds.
        if decode_len > context {
            run.skipped.push(SkipRow {
                what: format!("decode batch {batch}"),
                reason: format!(
                    "a {}-token prompt and {} steps are over the graph's context length {context}",
                    plan.decode_prompt_len, plan.decode_tokens
                ),
            });
            continue;
        }
        match runner.decode(batch) {
            Ok(row) => {
                tracing::info!("{} {}: decode batch {batch}: {:.1} tokens/s", run.label, run.ep, row.tokens_per_s);
                run.decode.push(row);
            }
            // A batch that does not fit is a row saying why, not the end of the run.
            Err(e) => run.skipped.push(SkipRow { what: format!("decode batch {batch}"), reason: format!("{e:#}") }),
        }
    }
    if plan.cuda_graph {
        let batch = plan.batches.iter().copied().max().unwrap_or(1);
        let check = runner.check_cuda_graph(batch, 16).context("CUDA-graph check")?;
        if !check.same_tokens {
            tracing::warn!(
                "{} {}: CUDA-graph replay chose other tokens than the same steps without it",
                run.label,
                run.ep
            );
        }
        run.cuda_graph_check = Some(check);
    }
    if runner.model.stage_count() > 1 {
        let mode = plan.stages.pipeline();
        let report = runner.pipeline(mode).context("pipeline measurement")?;
        for r in &report.rows {
            tracing::info!(
                "{} {}: {} {:?}: {:.2} ms, bubble {:.0}%",
                run.label,
                run.ep,
                r.what,
                r.mode,
                r.ms,
                r.bubble * 100.0
            );
        }
        run.pipeline = Some(report);
    }
    // Last: a whole-prompt prefill may raise the peak memory the chunked rows were measured at.
    let longest = plan.prompt_lens.iter().copied().filter(|&l| l < context).max();
    if let (true, Some(chunk), Some(len)) = (plan.check_chunked_prefill, plan.prefill_chunk, longest) {
        if len > chunk {
            let check = runner.check_chunked_prefill(len, chunk).context("chunked prefill check")?;
            tracing::info!(
                "{} {}: chunked vs whole prefill of {len} tokens: max |diff| {}",
                run.label,
                run.ep,
                check.max_abs_diff
            );
            run.chunked_prefill_check = Some(check);
        }
    }
    Ok(())
}

/// Teacher-forced comparison of two graphs of the same checkpoint (e.g. bf16 on CUDA against
/// fp32 on the CPU): the same token sequence through both, position by position.
#[derive(Clone, Debug, Serialize)]
pub struct AccuracyReport {
    pub reference: PathBuf,
    pub candidate: PathBuf,
    pub tokens: usize,
    pub max_abs_diff: f32,
    pub top1_agreement: f64,
    pub mean_kl: f64,
}

/// Logits for every position of `tokens`: one prefill when the graph emits all logits,
/// else one step per token.
fn all_position_logits(model: &mut DecoderModel, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let mut cache = model.new_batch_cache(1, tokens.len() + 1)?;
    if !model.manifest.options.last_token_logits {
        let l = model.forward(tokens, &mut cache)?;
        return Ok((0..l.rows).map(|i| l.row(i).to_vec()).collect());
    }
    tokens.iter().map(|&t| Ok(model.forward(&[t], &mut cache)?.last().to_vec())).collect()
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| v as f64 - lse).collect()
}

pub fn accuracy(
    reference: &Path,
    reference_ep: &ExecutionProvider,
    candidate: &Path,
    candidate_ep: &ExecutionProvider,
    tokens: usize,
    seed: u64,
) -> Result<AccuracyReport> {
    let mut cand = DecoderModel::load(candidate, candidate_ep)?;
    let vocab = cand.vocab_size();
    let seq = random_tokens(&mut ChaCha8Rng::seed_from_u64(seed), tokens, vocab);
    let got = all_position_logits(&mut cand, &seq)?;
    drop(cand);
    let mut refm = DecoderModel::load(reference, reference_ep)?;
    if refm.vocab_size() != vocab {
        bail!("the two graphs have different vocabularies ({} and {vocab})", refm.vocab_size());
    }
    let want = all_position_logits(&mut refm, &seq)?;
    let (mut max_abs, mut agree, mut kl) = (0f32, 0usize, 0f64);
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            max_abs = max_abs.max((a - b).abs());
        }
        agree += (argmax(g) == argmax(w)) as usize;
        let (lp, lq) = (log_softmax(w), log_softmax(g));
        kl += lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum::<f64>();
    }
    let n = got.len().max(1);
    Ok(AccuracyReport {
        reference: reference.to_path_buf(),
        candidate: candidate.to_path_buf(),
        tokens,
        max_abs_diff: max_abs,
        top1_agreement: agree as f64 / n as f64,
        mean_kl: kl / n as f64,
    })
}

/// The transformers baseline (scripts/hf_baseline.py), run in the same invocation.
pub fn hf_baseline(
    script: &Path,
    checkpoint: &Path,
    prompt_len: usize,
    new_tokens: usize,
    device: &str,
) -> Result<serde_json::Value> {
    let out = tempfile::NamedTempFile::new()?;
    let dtype = if device == "cpu" { "fp32" } else { "bf16" };
    let status = std::process::Command::new(std::env::var("PIO_PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(script)
        .args(["--checkpoint", &checkpoint.to_string_lossy()])
        .args(["--prompt-len", &prompt_len.to_string(), "--new-tokens", &new_tokens.to_string()])
        .args(["--device", device, "--dtype", dtype, "--out", &out.path().to_string_lossy()])
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    let text = std::fs::read_to_string(out.path())?;
    Ok(serde_json::from_str(&text)?)
}

fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

/// The table printed after a run.
pub fn print_table(runs: &[BenchRun], plan: &BenchPlan) {
    let mut header = format!("{:<28} {:<9} {:<6} {:>6}", "graph", "ep", "prec", "graph");
    for l in &plan.prompt_lens {
        header.push_str(&format!(" {:>10}", format!("ttft@{l}")));
    }
    for b in &plan.batches {
        header.push_str(&format!(" {:>11}", format!("tok/s@b{b}")));
    }
    header.push_str(&format!(" {:>9} {:>8} {:>8}", "gpu mem", "W@b1", "tok/J@b1"));
    println!("{header}");
    for r in runs {
        let mut label = r.label.clone();
        if r.host_argmax {
            label.push_str(" host-argmax");
        }
        if let Some(c) = r.prefill_chunk.filter(|&c| plan.prompt_lens.iter().any(|&l| l > c)) {
            label.push_str(&format!(" chunk{c}"));
        }
        let mut line =
            format!("{:<28} {:<9} {:<6} {:>6}", label, r.ep, r.precision, if r.cuda_graph { "on" } else { "off" });
        if let Some(e) = &r.error {
            println!("{line}  not run: {e}");
            continue;
        }
        for l in &plan.prompt_lens {
            let v = r.ttft.iter().find(|t| t.prompt_len == *l).map(|t| t.ms);
            line.push_str(&format!(" {:>10}", v.map(|v| format!("{v:.1}ms")).unwrap_or_else(|| "-".into())));
        }
        for b in &plan.batches {
            let v = r.decode.iter().find(|d| d.batch == *b).map(|d| d.tokens_per_s);
            line.push_str(&format!(" {:>11}", fmt_opt(v, 1)));
        }
        let b1 = r.decode.iter().find(|d| d.batch == 1);
        line.push_str(&format!(
            " {:>9} {:>8} {:>8}",
            r.gpu_peak_memory_bytes.map(pio_models::size::format_bytes).unwrap_or_else(|| "-".into()),
            fmt_opt(b1.and_then(|d| d.avg_power_w), 0),
            fmt_opt(b1.and_then(|d| d.tokens_per_joule), 2)
        ));
        println!("{line}");
        for s in &r.skipped {
            println!("    skipped {}: {}", s.what, s.reason);
        }
        if let Some(c) = &r.cuda_graph_check {
            println!(
                "    CUDA graph replay vs no graph, batch {}, {} steps: same tokens: {}",
                c.batch, c.steps, c.same_tokens
            );
        }
        if let Some(p) = &r.pipeline {
            println!(
                "    {} stages (layers {:?}) on devices {:?}, {} micro-batch(es):",
                p.stages, p.stage_layers, p.stage_devices, p.micro_batches
            );
            for row in &p.rows {
                let busy: Vec<String> = row.stage_busy_ms.iter().map(|b| format!("{b:.1}")).collect();
                println!(
                    "      {:<14} {:<11} {:>9.2} ms {:>10.1} tok/s  stage busy ms [{}]  bubble {:.0}%",
                    row.what,
                    format!("{:?}", row.mode),
                    row.ms,
                    row.tokens_per_s,
                    busy.join(", "),
                    row.bubble * 100.0
                );
            }
        }
        if let Some(c) = &r.chunked_prefill_check {
            println!(
                "    {}-token prefill in chunks of {} vs whole: max |logit diff| {:.3e}, same argmax: {}",
                c.prompt_len, c.chunk, c.max_abs_diff, c.same_argmax
            );
        }
    }
}
