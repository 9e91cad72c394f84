//! `pio`: run, chat with and list models exported by pio-export.

mod batch;
mod bench;
mod bench_serve;
mod chat;
mod download;
mod perplexity;
mod preflight;
mod serve;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::builder::TypedValueParser;
use clap::{ArgGroup, Args as ClapArgs, Parser, Subcommand};
use pio_models::cli_args::NumberRange;
use pio_models::presets::PRESETS;
use pio_models::size::{format_bytes, format_params, Precision};
use pio_runtime::chat_template::RenderOptions;
use pio_runtime::engine::{Engine, EngineConfig, EngineConfigBuilder, EngineError, Event, ModelInfo, Prompt, Request};
use pio_runtime::ep::{EpError, ExecutionProvider};
use pio_runtime::generate::{GenerateOptions, GenerationOutput};
use pio_runtime::plugin::PluginMetadata;
use pio_runtime::sampling::{SamplingError, SamplingParams};
use pio_runtime::stages::StageOptions;
use pio_runtime::structured::StructuredOutput;
use pio_runtime::vision::{LocalImageFiles, RemoteImages};
use serde_json::json;

use preflight::{GraphFolder, Refused};

#[derive(Parser)]
#[command(name = "pio", version, about = "Run LLMs exported by pio-export on ONNX Runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt (chat template applied unless --raw).
    Run(RunArgs),
    /// Interactive multi-turn chat in the terminal, streaming tokens as they come.
    Chat(ChatArgs),
    /// An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize.
    Serve(serve::ServeArgs),
    /// The model's perplexity on a text, as llama.cpp's llama-perplexity measures it: windows of
    /// --ctx tokens, each scored on its second half.
    Perplexity(perplexity::PerplexityArgs),
    /// The presets with their sizes computed from their configs.
    Models,
    /// Download a preset's (or any) checkpoint into the Hugging Face cache: only what pio-export reads.
    Download(download::DownloadArgs),
    /// Benchmark graphs on one or more execution providers: time to first token, decode
    /// throughput, memory, power, accuracy, optimization switches, and a transformers baseline.
    /// `pio bench serve`: load `pio serve` with concurrent streams and arrival-rate sweeps.
    Bench(Box<BenchCommand>),
}

#[derive(ClapArgs)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCommand {
    #[command(subcommand)]
    load: Option<BenchLoad>,
    #[command(flatten)]
    args: BenchArgs,
}

#[derive(Subcommand)]
enum BenchLoad {
    /// A load generator for `pio serve` (loopback only, bounded): concurrency levels, a Poisson
    /// arrival-rate sweep, shared-prefix TTFT and latency during a long prefill, with the offline
    /// batched decode of the same graph as the reference.
    Serve(bench_serve::BenchServeArgs),
}

#[derive(ClapArgs)]
struct BenchArgs {
    /// Graph folders to benchmark (repeatable); each is a row per execution provider.
    #[arg(long)]
    graphs: Vec<PathBuf>,
    /// Or a preset with --synthetic: random weights at its real shape, exported and benchmarked.
    #[arg(long, conflicts_with = "graphs", requires = "synthetic")]
    model: Option<String>,
    /// With --model: write a seeded random-weight checkpoint of the preset's shape (pio-export
    /// --synthetic) instead of reading a real one.
    #[arg(long, requires = "model")]
    synthetic: bool,
    /// Shrink the synthetic model's depth (e.g. GLM-4.7's dense layers plus a few MoE layers); at
    /// least 1.
    #[arg(long, requires = "model", value_parser = NumberRange::at_least(1usize))]
    layers: Option<usize>,
    /// Where the synthetic checkpoint goes (default checkpoints/<preset>-synthetic[-shape]); a
    /// RAM disk such as /dev/shm keeps large ones off a small disk.
    #[arg(long, requires = "model")]
    checkpoint_out: Option<PathBuf>,
    /// Where exported graphs go (default graphs/).
    #[arg(long, default_value = "graphs")]
    graphs_dir: PathBuf,
    /// Precisions to export for GPU providers with --model (comma-separated): fp16, bf16, int4.
    #[arg(long, value_delimiter = ',', default_value = "bf16", value_parser = Precision::parse)]
    precision: Vec<Precision>,
    /// Also export and measure the graph switches one by one (fused norms, fused projections,
    /// fused attention, last-token logits, int8 KV cache) with --model.
    #[arg(long)]
    switches: bool,
    /// Execution providers, comma-separated: cpu, cuda, tensorrt. One that cannot start is a
    /// row saying why.
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    ep: Vec<String>,
    /// The GPU the cuda and tensorrt rows run on (>= 0).
    #[arg(long, default_value_t = 0, value_parser = NumberRange::at_least(0i32))]
    device_id: i32,
    /// Execution provider option KEY=VALUE (repeatable), applied to every provider it fits.
    #[arg(long = "ep-option")]
    ep_options: Vec<String>,
    /// CUDA graphs for the decode step: on, off or both (both: a row each).
    #[arg(long, default_value = "both", value_parser = ["on", "off", "both"])]
    cuda_graph: String,
    /// Where greedy tokens are chosen: device (the graph's argmax output; only token ids come
    /// back), host (all logits copied back, argmax on the CPU) or both (a row each).
    #[arg(long, default_value = "device", value_parser = ["device", "host", "both"])]
    argmax: String,
    /// Prompt tokens per forward pass, comma-separated for a row each (0: whole prompts).
    #[arg(long, value_delimiter = ',', default_value = "2048", value_parser = NumberRange::at_least(0usize))]
    prefill_chunk: Vec<usize>,
    /// Compare chunked with whole-prompt prefill logits at the longest prompt length.
    #[arg(long)]
    check_chunked_prefill: bool,
    /// Prompt lengths whose time to first token is measured, comma-separated (each >= 1; those
    /// over the graph's context length are skipped rows).
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048,8192", value_parser = NumberRange::at_least(1usize))]
    prompt_lens: Vec<usize>,
    /// Prompt tokens before the decode measurements (>= 1).
    #[arg(long, default_value_t = 128, value_parser = NumberRange::at_least(1usize))]
    decode_prompt_len: usize,
    /// Greedy decode steps timed per batch size (>= 1).
    #[arg(long, default_value_t = 128, value_parser = NumberRange::at_least(1usize))]
    decode_tokens: usize,
    /// Decode batch sizes, comma-separated (1 to 4096; a batch that does not fit the device is a
    /// skipped row).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = NumberRange::between(1usize, 4096))]
    batches: Vec<usize>,
    /// Timed repetitions of each time-to-first-token measurement, after a warm-up (>= 1; the
    /// median is reported).
    #[arg(long, default_value_t = 3, value_parser = NumberRange::at_least(1usize))]
    repeats: usize,
    /// An fp32 CPU graph of the same checkpoint: each GPU graph's logits are compared with it
    /// over a teacher-forced sequence.
    #[arg(long)]
    accuracy_reference: Option<PathBuf>,
    /// Tokens of the teacher-forced sequence of the accuracy comparison (>= 1).
    #[arg(long, default_value_t = 256, value_parser = NumberRange::at_least(1usize))]
    accuracy_tokens: usize,
    /// Run scripts/hf_baseline.py (transformers, bf16, eager generate) on this checkpoint in the
    /// same run and print our decode speed against it.
    #[arg(long)]
    hf_baseline: Option<PathBuf>,
    /// The transformers baseline script --hf-baseline runs (with $PIO_PYTHON, default python3).
    #[arg(long, default_value = "scripts/hf_baseline.py", requires = "hf_baseline")]
    hf_script: PathBuf,
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
    #[command(flatten)]
    stages: StageArgs,
    /// Seed of the random prompts (and of the synthetic weights with --model).
    #[arg(long, default_value_t = 0, value_parser = NumberRange::<u64>::any())]
    seed: u64,
}

#[derive(ClapArgs, Clone)]
pub struct ModelArgs {
    /// A graph folder written by pio-export (holds pio.json).
    #[arg(long)]
    graphs: PathBuf,
    /// Execution provider: cpu, cuda, tensorrt.
    #[arg(long, default_value = "cpu")]
    ep: String,
    /// The GPU to run on with cuda and tensorrt (>= 0; default 0).
    #[arg(long, value_parser = NumberRange::at_least(0i32))]
    device_id: Option<i32>,
    /// CPU intra-op threads, >= 1 (default: ONNX Runtime's choice).
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    threads: Option<usize>,
    /// Execution provider option KEY=VALUE (repeatable): cuda_graph=1, gpu_mem_limit=BYTES,
    /// trt_fp16=1, trt_engine_cache_path=DIR, fallback=cuda, or any ONNX Runtime provider option.
    #[arg(long = "ep-option")]
    ep_options: Vec<String>,
    /// Prompt tokens prefilled per engine step at most while streams decode (>= 1); longer
    /// prompts run in chunks, between the decode steps of running sequences.
    #[arg(
        long,
        alias = "prefill-chunk",
        default_value_t = pio_runtime::engine::DEFAULT_PREFILL_BUDGET,
        value_parser = NumberRange::at_least(1usize)
    )]
    prefill_budget: usize,
    /// Prompt tokens prefilled per engine step at most when no stream decodes (at least
    /// --prefill-budget; default 4096, or --prefill-budget when larger): prompts arriving
    /// together prefill in few batched runs before their streams start.
    #[arg(long, value_name = "TOKENS", value_parser = NumberRange::at_least(1usize))]
    idle_prefill_budget: Option<usize>,
    /// Prompt tokens of one request prefilled per engine step at most while streams decode
    /// (vLLM's option; 0, the default: only --prefill-budget): a long prompt advances this much
    /// a step, so running streams see the latency of a small chunk, while shorter prompts share
    /// the rest of --prefill-budget; while two or more long prompts could prefill, a step gives
    /// the whole --prefill-budget.
    #[arg(long, value_name = "TOKENS", default_value_t = 0, value_parser = NumberRange::at_least(0usize))]
    long_prefill_token_threshold: usize,
    /// Prefill pacing, off by default (0): while streams decode, keep each engine step (their
    /// inter-token latency) within F times a decode-only step by prefilling fewer prompt tokens
    /// per step, from times measured as it runs (at least 16 tokens a step). Smoother streams,
    /// much later first tokens; > 1, or 0 for off (only --prefill-budget limits a step).
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_itl_factor)]
    itl_factor: f64,
    /// Catch-up prefill (TGI's): when the prompts still to prefill are at least F times the
    /// streams decoding, an engine step prefills up to --idle-prefill-budget, so a burst of
    /// requests interrupts running streams once (not with --itl-factor); > 0, or 0 for off
    /// (default 1.2).
    #[arg(long, value_name = "F", default_value_t = pio_runtime::engine::DEFAULT_WAITING_SERVED_RATIO, value_parser = NumberRange::at_least(0.0))]
    waiting_served_ratio: f64,
    /// Sequences the KV pool holds at once, >= 1 (default: what the GPU's free memory holds, at
    /// most 256; 4 on the CPU).
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    max_seqs: Option<usize>,
    /// KV pool size in GiB, > 0 (default: the GPU's free memory times --gpu-memory-utilization,
    /// after the weights and a profiling prefill).
    #[arg(long, value_parser = NumberRange::above(0.0))]
    kv_cache_gb: Option<f64>,
    /// Tokens one sequence can hold, prompt plus generated, >= 1 (default: the graph's context
    /// length, capped on a GPU so that at least 32 sequences fit).
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    max_model_len: Option<usize>,
    /// The share of the GPU's memory the engine may fill, in (0, 1] (default 0.9).
    #[arg(long, value_parser = NumberRange::above_up_to(0.0, 1.0))]
    gpu_memory_utilization: Option<f64>,
    /// Do not reuse KV across requests (prefix caching).
    #[arg(long)]
    no_prefix_cache: bool,
    /// Prefix cache size in GiB, > 0 (default: on a GPU what the KV memory leaves after the
    /// pool, or a quarter of --kv-cache-gb; on the CPU as much as the pool, at most 2 GiB).
    #[arg(long, conflicts_with = "no_prefix_cache", value_parser = NumberRange::above(0.0))]
    prefix_cache_gb: Option<f64>,
    /// Vision-language models: GiB of image encodings kept across requests, >= 0 (0: none;
    /// default 0.5).
    #[arg(long, value_parser = NumberRange::at_least(0.0))]
    encoder_cache_gb: Option<f64>,
    /// Vision-language models: threads that preprocess one image (resampling, normalization,
    /// patches), >= 1 (default: the machine's cores, at most 8).
    #[arg(long, value_name = "N", value_parser = NumberRange::at_least(1usize))]
    image_threads: Option<usize>,
    /// Vision-language models: where local image paths in messages may point: `any`, `none`, or a
    /// folder they must be under (default: `any`; for `pio serve`, `none`, since its clients
    /// must not read the server's files).
    #[arg(long)]
    local_images: Option<String>,
    /// Vision-language models: fetch http(s) image URLs in messages (refused otherwise), each
    /// within this many seconds (>= 1).
    #[arg(long, value_name = "SECONDS", value_parser = NumberRange::at_least(1u64))]
    fetch_remote_images: Option<u64>,
    /// Vision-language models: the most encoded bytes an image file or URL may have (>= 1;
    /// default 64 MiB).
    #[arg(long, value_parser = NumberRange::at_least(1u64))]
    max_image_bytes: Option<u64>,
    /// Vision-language models: the most pixels a decoded image may have (>= 1; default 89,478,485,
    /// Pillow's `MAX_IMAGE_PIXELS`).
    #[arg(long, value_parser = NumberRange::at_least(1u64))]
    max_image_pixels: Option<u64>,
    #[command(flatten)]
    stages: StageArgs,
}

/// Where a staged export's stages run (`pio-export --stages N`).
#[derive(ClapArgs, Clone)]
struct StageArgs {
    /// A staged export's GPUs, comma-separated ids >= 0 (0,1): with as many as stages one each, with
    /// fewer consecutive stages share one. Default: every stage on --device-id.
    #[arg(long, value_delimiter = ',', value_name = "IDS", value_parser = NumberRange::at_least(0i32))]
    devices: Vec<i32>,
    /// Micro-batches a batched decode step is cut into, >= 1, so that stages on different GPUs work
    /// at once (default: one per GPU the stages use; 1 turns micro-batching off).
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    micro_batches: Option<usize>,
}

impl StageArgs {
    fn options(&self) -> StageOptions {
        let options = StageOptions::new().with_devices(self.devices.clone());
        match self.micro_batches {
            Some(n) => options.with_micro_batches(n),
            None => options,
        }
    }
}

/// `--itl-factor`: 0 (prefill pacing off) or a finite number > 1.
fn parse_itl_factor(value: &str) -> std::result::Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(f) if f == 0.0 || (f > 1.0 && f.is_finite()) => Ok(f),
        _ => Err("must be 0 (off) or a finite number > 1".into()),
    }
}

/// GiB as bytes (the flags' parsers keep the values finite and >= 0).
fn gib(value: f64) -> u64 {
    (value * (1u64 << 30) as f64) as u64
}

impl ModelArgs {
    /// Starts the engine over the graph folder.
    fn start(&self) -> Result<Engine> {
        Ok(Engine::start(self.config()?.build()?)?)
    }

    /// Refuses a flag that would do nothing with this graph folder and execution provider: a
    /// GPU's flags on the CPU, a staged export's without stages, images' for a model that
    /// takes none.
    pub(crate) fn check_applies_to(&self, graphs: &GraphFolder) -> Result<()> {
        // The first flag of a group that was given, refused with the group's reason.
        let refuse_given = |flags: &[(&str, bool)], why: &dyn Fn() -> String| match flags.iter().find(|f| f.1) {
            Some((flag, _)) => Err(anyhow::Error::from(Refused::new(*flag, why()))),
            None => Ok(()),
        };
        if matches!(self.ep()?, ExecutionProvider::Cpu { .. }) {
            let gpu_flags = [
                ("--device-id", self.device_id.is_some()),
                ("--gpu-memory-utilization", self.gpu_memory_utilization.is_some()),
            ];
            refuse_given(&gpu_flags, &|| "applies to a GPU (--ep cuda or tensorrt); this runs on the CPU".into())?;
        }
        if !graphs.is_staged() {
            let stage_flags = [
                ("--devices", !self.stages.devices.is_empty()),
                ("--micro-batches", self.stages.micro_batches.is_some()),
            ];
            refuse_given(&stage_flags, &|| {
                format!("{} is not a staged export (pio-export --stages N)", graphs.dir().display())
            })?;
        }
        if !graphs.takes_images() {
            let image_flags = [
                ("--encoder-cache-gb", self.encoder_cache_gb.is_some()),
                ("--image-threads", self.image_threads.is_some()),
                ("--local-images", self.local_images.is_some()),
                ("--fetch-remote-images", self.fetch_remote_images.is_some()),
                ("--max-image-bytes", self.max_image_bytes.is_some()),
                ("--max-image-pixels", self.max_image_pixels.is_some()),
            ];
            refuse_given(&image_flags, &|| graphs.takes_no_images())?;
        }
        Ok(())
    }

    /// What an image may be: `--max-image-bytes`, `--max-image-pixels`.
    fn image_limits(&self) -> pio_image::DecodeLimits {
        pio_image::DecodeLimits::default()
            .with_max_input_bytes(self.max_image_bytes.unwrap_or(pio_image::DEFAULT_MAX_INPUT_BYTES))
            .with_max_pixels(self.max_image_pixels.unwrap_or(pio_image::DEFAULT_MAX_PIXELS))
    }

    /// The execution provider these options give.
    pub fn ep(&self) -> Result<ExecutionProvider> {
        let mut ep = ExecutionProvider::from_cli(&self.ep, self.device_id.unwrap_or(0), &self.ep_options)?;
        if let (ExecutionProvider::Cpu { threads }, Some(n)) = (&mut ep, self.threads) {
            *threads = Some(n);
        }
        Ok(ep)
    }

    /// The engine settings these options give (local image files: `any` unless
    /// `--local-images` says otherwise).
    pub fn config(&self) -> Result<EngineConfigBuilder> {
        self.config_with_local_images("any")
    }

    /// Every engine setting but where local image files may be read from.
    fn base_config(&self) -> Result<EngineConfigBuilder> {
        // The parser lets through 0 (off) and factors > 1 only.
        let itl_factor = Some(self.itl_factor).filter(|&f| f != 0.0);
        let mut config = EngineConfig::builder(&self.graphs)
            .ep(self.ep()?)
            .prefill_budget(self.prefill_budget)
            .long_prefill_token_threshold(Some(self.long_prefill_token_threshold).filter(|&n| n > 0))
            .itl_factor(itl_factor)
            .waiting_served_ratio(Some(self.waiting_served_ratio).filter(|&r| r > 0.0))
            .gpu_memory_utilization(
                self.gpu_memory_utilization.unwrap_or(pio_runtime::engine::DEFAULT_GPU_MEMORY_UTILIZATION),
            )
            .prefix_caching(!self.no_prefix_cache)
            .stages(self.stages.options());
        if let Some(n) = self.idle_prefill_budget {
            config = config.idle_prefill_budget(n);
        }
        if let Some(n) = self.max_seqs {
            config = config.max_seqs(n);
        }
        if let Some(gb) = self.kv_cache_gb {
            config = config.kv_cache_bytes(gib(gb));
        }
        if let Some(n) = self.max_model_len {
            config = config.max_model_len(n);
        }
        if let Some(gb) = self.prefix_cache_gb {
            config = config.prefix_cache_bytes(gib(gb));
        }
        if let Some(gb) = self.encoder_cache_gb {
            config = config.encoder_cache_bytes(gib(gb));
        }
        if let Some(threads) = self.image_threads.and_then(std::num::NonZeroUsize::new) {
            config = config.image_threads(threads);
        }
        Ok(config)
    }

    /// [`config`](Self::config) with `default_local_images` when `--local-images` is not given.
    pub fn config_with_local_images(&self, default_local_images: &str) -> Result<EngineConfigBuilder> {
        let mut config = self.base_config()?;
        let local = match self.local_images.as_deref().unwrap_or(default_local_images) {
            "any" => LocalImageFiles::Any,
            "none" => LocalImageFiles::Refused,
            dir if std::path::Path::new(dir).is_dir() => LocalImageFiles::Under(dir.into()),
            other => bail!("--local-images {other}: not `any`, `none` or a folder"),
        };
        config = config.local_image_files(local).image_limits(self.image_limits());
        if let Some(secs) = self.fetch_remote_images {
            config = config.remote_images(RemoteImages::Fetch { timeout: std::time::Duration::from_secs(secs) });
        }
        Ok(config)
    }
}

#[derive(ClapArgs, Clone)]
struct SamplingArgs {
    /// Greedy decoding (argmax); refused with temperature, top-k, top-p and min-p, which it
    /// would override.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "min_p"])]
    greedy: bool,
    /// Logits / T, >= 0 (0: greedy). Each sampling option defaults to the checkpoint's
    /// generation_config.json.
    #[arg(long, value_parser = sampling_value(|p, v| p.temperature = v))]
    temperature: Option<f32>,
    /// Keep the K most likely tokens, >= 0 (0: off).
    #[arg(long, value_parser = NumberRange::at_least(0usize))]
    top_k: Option<usize>,
    /// Keep the most likely tokens whose probabilities add up to P, in (0, 1] (1: off).
    #[arg(long, value_parser = sampling_value(|p, v| p.top_p = v))]
    top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one, in [0, 1] (0: off).
    #[arg(long, value_parser = sampling_value(|p, v| p.min_p = v))]
    min_p: Option<f32>,
    /// Hugging Face's repetition penalty over prompt and output, > 0 (1: off).
    #[arg(long, value_parser = sampling_value(|p, v| p.repetition_penalty = v))]
    repetition_penalty: Option<f32>,
    /// Subtract X from the logits of tokens generated at least once, finite (0: off).
    #[arg(long, value_parser = sampling_value(|p, v| p.presence_penalty = v))]
    presence_penalty: Option<f32>,
    /// Subtract X times each token's count in the output, finite (0: off).
    #[arg(long, value_parser = sampling_value(|p, v| p.frequency_penalty = v))]
    frequency_penalty: Option<f32>,
    /// Seed for reproducible sampling (a whole number >= 0; default: from the OS).
    #[arg(long, value_parser = NumberRange::<u64>::any())]
    seed: Option<u64>,
    /// Add BIAS, in [-100, 100], to token ID's logit before sampling, as OpenAI's `logit_bias`
    /// (repeatable; -100 bans a token, greedy included): `--logit-bias 151645=-100`.
    #[arg(long, value_name = "ID=BIAS", value_parser = parse_logit_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// Maximum tokens to generate (>= 1).
    #[arg(long, default_value_t = 256, value_parser = NumberRange::at_least(1usize))]
    max_tokens: usize,
    /// Stop when the output contains this string (repeatable; needs a tokenizer).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Report each generated token's logprob (`logprobs` in the --json output), computed with
    /// this many alternatives (0 to 20).
    #[arg(long, value_parser = NumberRange::between(0, pio_runtime::engine::MAX_TOP_LOGPROBS))]
    logprobs: Option<usize>,
    /// Constrain the output to JSON valid against the JSON schema in FILE (needs a tokenizer).
    #[arg(long, value_name = "FILE", group = "structured")]
    json_schema: Option<PathBuf>,
    /// Constrain the output to a JSON object, any (`--json` is the output format).
    #[arg(long, group = "structured")]
    json_object: bool,
    /// Constrain the output to text the whole of which matches RE (Rust regex syntax).
    #[arg(long, value_name = "RE", group = "structured")]
    regex: Option<String>,
    /// Constrain the output to one of these texts (repeatable: `--choice yes --choice no`).
    #[arg(long, value_name = "TEXT", group = "structured")]
    choice: Vec<String>,
}

/// `--logit-bias ID=BIAS`, the bias checked by the runtime's own rule.
fn parse_logit_bias(text: &str) -> Result<(u32, f32), String> {
    let (id, bias) = text.split_once('=').ok_or("must be ID=BIAS, e.g. 151645=-100")?;
    let id: u32 = id.trim().parse().map_err(|_| format!("the token id `{id}` is not a whole number >= 0"))?;
    let bias: f32 = bias.trim().parse().map_err(|_| format!("the bias `{bias}` is not a number"))?;
    let params = SamplingParams { logit_bias: [(id, bias)].into(), ..SamplingParams::default() };
    match params.validate() {
        Ok(()) => Ok((id, bias)),
        Err(SamplingError::InvalidParam { expected, .. }) => Err(expected.to_string()),
    }
}

/// A sampling flag's value, checked by the runtime's own rule for it: the message gives the
/// range and the value that turns it off (`must be in (0, 1] (1 = off)`).
fn sampling_value(set: fn(&mut SamplingParams, f32)) -> impl TypedValueParser<Value = f32> {
    move |text: &str| -> Result<f32, String> {
        let value: f32 = text.trim().parse().map_err(|_| "must be a number".to_string())?;
        let mut params = SamplingParams::default();
        set(&mut params, value);
        match params.validate() {
            Ok(()) => Ok(value),
            Err(SamplingError::InvalidParam { expected, .. }) => Err(expected.to_string()),
        }
    }
}

impl SamplingArgs {
    fn options(&self, model: &ModelInfo) -> Result<GenerateOptions> {
        let mut p = if self.greedy { SamplingParams::greedy() } else { model.default_sampling.clone() };
        if !self.greedy {
            if let Some(t) = self.temperature {
                p.temperature = t;
            }
            if let Some(k) = self.top_k {
                p.top_k = k;
            }
            if let Some(v) = self.top_p {
                p.top_p = v;
            }
            if let Some(v) = self.min_p {
                p.min_p = v;
            }
        }
        if let Some(v) = self.repetition_penalty {
            p.repetition_penalty = v;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = v;
        }
        p.seed = self.seed;
        p.logit_bias = self.logit_bias.iter().copied().collect();
        p.validate()?;
        Ok(GenerateOptions {
            max_tokens: Some(self.max_tokens),
            sampling: p,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            structured_output: self.structured_output()?.map(|(output, _)| output),
            ..Default::default()
        })
    }

    /// The constraint of --json-schema, --json-object, --regex or --choice (clap lets at most one
    /// through), and its flag.
    fn structured_output(&self) -> Result<Option<(StructuredOutput, &'static str)>> {
        if let Some(file) = &self.json_schema {
            let refused = |why: &str| Refused::new("--json-schema", format!("{}: {why}", file.display()));
            let text =
                std::fs::read_to_string(file).map_err(|e| anyhow::Error::from(e).context(refused("cannot read it")))?;
            let schema: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| anyhow::Error::from(e).context(refused("is not JSON")))?;
            return Ok(Some((StructuredOutput::Json(schema), "--json-schema")));
        }
        Ok(if self.json_object {
            Some((StructuredOutput::JsonObject, "--json-object"))
        } else if let Some(rx) = &self.regex {
            Some((StructuredOutput::Regex(rx.clone()), "--regex"))
        } else if !self.choice.is_empty() {
            Some((StructuredOutput::Choice(self.choice.clone()), "--choice"))
        } else {
            None
        })
    }

    /// [`options`](Self::options) for `engine`, whose compiler checks the constraint once, before
    /// anything is generated; a constraint it refuses is its flag's error.
    fn engine_options(&self, engine: &Engine) -> Result<GenerateOptions> {
        let options = self.options(engine.model_info())?;
        if let (Some(output), Some((_, flag))) = (&options.structured_output, self.structured_output()?) {
            engine
                .check_structured_output(output)
                .map_err(|e| anyhow::Error::from(e).context(Refused::new(flag, "the engine cannot follow it")))?;
        }
        Ok(options)
    }
}

#[derive(ClapArgs)]
#[command(group(ArgGroup::new("input").required(true).args(["prompt", "prompt_ids", "batch"])))]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt (a user message, unless --raw).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Comma-separated token ids (needs no tokenizer).
    #[arg(long, value_delimiter = ',', value_parser = NumberRange::<u32>::any())]
    prompt_ids: Option<Vec<u32>>,
    /// Use the prompt as is, without the chat template.
    #[arg(long, conflicts_with = "prompt_ids")]
    raw: bool,
    /// An image file for a vision-language model (repeatable): the user message holds the
    /// images, in order, then the prompt.
    #[arg(long = "image", value_name = "PATH", conflicts_with_all = ["prompt_ids", "raw", "batch"])]
    images: Vec<PathBuf>,
    /// A system message for the chat template.
    #[arg(long, conflicts_with_all = ["prompt_ids", "raw"])]
    system: Option<String>,
    /// Qwen3 templates: `enable_thinking` (true/false); default: the template's own.
    #[arg(long, conflicts_with_all = ["prompt_ids", "raw"])]
    thinking: Option<bool>,
    /// Print one JSON object (prompt_ids, generated_ids, text, finish_reason, timings) instead of streaming.
    #[arg(long)]
    json: bool,
    /// Run the prompts of a JSON-lines file together, batched by the engine: one object per line
    /// with `prompt_ids`, `prompt` (a user message unless --raw) or `messages`, and optionally
    /// `max_tokens` and `seed` (over the options given here). Prints one JSON object per line, in
    /// the file's order.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_ids"])]
    batch: Option<PathBuf>,
}

#[derive(ClapArgs)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message, kept through /reset.
    #[arg(long)]
    system: Option<String>,
    /// Qwen3 templates: `enable_thinking` (true/false); default: the template's own.
    #[arg(long)]
    thinking: Option<bool>,
}

fn render_options(thinking: Option<bool>) -> RenderOptions {
    RenderOptions { enable_thinking: thinking, ..RenderOptions::generation() }
}

/// Submits `request` and streams its text to stdout as it comes (when `stream`).
fn generate_streaming(engine: &Engine, request: Request, stream: bool) -> Result<GenerationOutput> {
    let mut stdout = std::io::stdout().lock();
    for event in engine.submit(request)? {
        match event? {
            Event::Token(token) if stream => {
                stdout.write_all(token.text.as_bytes())?;
                stdout.flush()?;
            }
            Event::Token(_) | Event::PromptLogprobs(_) => {}
            Event::Finished(output) => return Ok(output),
        }
    }
    Err(EngineError::Shutdown.into())
}

/// A user message: `text` alone, or the images (transformers' `image` parts, by path) then the
/// text.
fn user_message(text: &str, images: &[PathBuf]) -> serde_json::Value {
    if images.is_empty() {
        return json!({"role": "user", "content": text});
    }
    let mut content: Vec<serde_json::Value> = images.iter().map(|p| json!({"type": "image", "path": p})).collect();
    content.push(json!({"type": "text", "text": text}));
    json!({"role": "user", "content": content})
}

/// What `pio run --json` prints for one generation.
fn output_json(output: &GenerationOutput) -> serde_json::Value {
    let mut value = json!({
        "prompt_ids": output.prompt_ids,
        "generated_ids": output.generated_ids,
        "text": output.text,
        "finish_reason": output.finish_reason,
        "timings": output.timings,
    });
    if output.logprobs.iter().any(Option::is_some) {
        value["logprobs"] = json!(output.logprobs);
    }
    value
}

fn run(args: RunArgs) -> Result<()> {
    // Everything the command line gets wrong is refused before the model loads.
    if args.sampling.logprobs.is_some() && !args.json && args.batch.is_none() {
        return Err(Refused::new("--logprobs", "logprobs are printed in the --json output: add --json").into());
    }
    let graphs = GraphFolder::inspect(&args.model.graphs)?;
    args.model.check_applies_to(&graphs)?;
    graphs.check_stop(&args.sampling.stop)?;
    let (max_tokens, max_model_len) = (args.sampling.max_tokens, args.model.max_model_len);
    if let Some(file) = &args.batch {
        let lines = batch::read(file, args.raw, args.system.as_deref())?;
        batch::check_chat_flags(file, &lines, args.system.is_some(), args.thinking.is_some())?;
        batch::check(file, &lines, &graphs, max_tokens, max_model_len)?;
        // Every line is queued at once.
        let engine = Engine::start(args.model.config()?.max_waiting(lines.len().max(1)).build()?)?;
        let options = args.sampling.engine_options(&engine)?;
        return batch::run(&engine, lines, &options, &render_options(args.thinking));
    }
    let (prompt, flag) = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => (Prompt::Ids(ids.clone()), "--prompt-ids"),
        (Some(text), None) if args.raw => (Prompt::Text(text.clone()), "--prompt"),
        (Some(text), None) => {
            let mut messages = Vec::new();
            if let Some(s) = &args.system {
                messages.push(json!({"role": "system", "content": s}));
            }
            messages.push(user_message(text, &args.images));
            (Prompt::Chat(messages), "--prompt")
        }
        // clap requires one of --prompt, --prompt-ids and --batch.
        (None, None) => bail!("pass --prompt TEXT or --prompt-ids 1,2,3"),
    };
    graphs.check_prompt(&prompt, flag, max_tokens, max_model_len)?;
    graphs.check_images(&args.images, &args.model.image_limits())?;
    let engine = args.model.start()?;
    let options = args.sampling.engine_options(&engine)?;
    let request = Request::new(prompt).with_options(options).with_render(render_options(args.thinking));
    let streaming = !args.json && engine.tokenizer().is_some();
    let output = generate_streaming(&engine, request, streaming)?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&output_json(&output))?)?;
    } else if streaming {
        writeln!(stdout)?;
    } else {
        let ids: Vec<String> = output.generated_ids.iter().map(u32::to_string).collect();
        writeln!(stdout, "{}", ids.join(","))?;
    }
    let t = &output.timings;
    tracing::info!(
        "{} prompt tokens, {} generated ({:?}); first token {:.1} ms, decode {:.1} tokens/s",
        t.prompt_tokens,
        t.generated_tokens,
        output.finish_reason,
        t.time_to_first_token_ms,
        t.decode_tokens_per_s
    );
    Ok(())
}

fn models() -> Result<()> {
    println!(
        "{:<24} {:<36} {:>9} {:>9} {:>10} {:>10} {:>10}  fits one 80 GB GPU",
        "preset", "hugging face repo", "params", "active", "bf16", "int4", "kv/token"
    );
    for preset in PRESETS {
        let meta = PluginMetadata::of(preset).with_context(|| format!("preset {}", preset.name))?;
        let bytes = |p: Precision| meta.memory.iter().find(|m| m.precision == p).map(|m| m.weight_bytes).unwrap_or(0);
        let (bf16, int4) = (bytes(Precision::Bf16), bytes(Precision::Int4));
        let fits = if bf16 < 70_000_000_000 {
            "yes (bf16)".to_string()
        } else if int4 < 70_000_000_000 {
            "int4 only".to_string()
        } else {
            let gpus = (int4 as f64 / 70e9).ceil() as u64;
            format!("no: int4 in {gpus}+ stages on GPUs of 80 GB (pio-export --stages {gpus}, pio --devices)")
        };
        println!(
            "{:<24} {:<36} {:>9} {:>9} {:>10} {:>10} {:>10}  {}",
            meta.name,
            meta.hf_repo,
            format_params(meta.parameters.total),
            format_params(meta.parameters.active),
            format_bytes(bf16),
            format_bytes(int4),
            format_bytes(meta.kv_bytes_per_token_bf16),
            fits
        );
    }
    Ok(())
}

/// Exports (or reuses) a graph of `checkpoint` for a target; returns its folder.
fn export_for_bench(
    checkpoint: &std::path::Path,
    out: PathBuf,
    precision: Precision,
    ep: pio_models::TargetEp,
    variant: &str,
) -> Result<PathBuf> {
    if out.join("pio.json").is_file() {
        tracing::info!("reusing {}", out.display());
        return Ok(out);
    }
    let config = pio_models::ModelConfig::from_file(&checkpoint.join("config.json"))?;
    // pio-export's defaults for the target, with room for the longest TTFT prompt (8192).
    let context_length = config.text.max_position_embeddings.min(8192 + 512);
    let settings = pio_export::ExportSettings::builder(precision, ep, context_length, config.text.qk_norm);
    let settings = match variant {
        "default" => settings,
        "no-fused-norms" => settings.fused_norms(false),
        "unfused-projections" => settings.fused_qkv(false).fused_gate_up(false).fused_qk_norm(false),
        "all-logits" => settings.last_token_logits(false),
        "kv-int8" => settings.kv_cache_int8(true),
        // Attention from standard ops; its q/k norm cannot go into GroupQueryAttention.
        "unfused-attention" => settings.fused_attention(false).fused_qk_norm(false),
        other => bail!("unknown graph variant {other}"),
    };
    let request = pio_export::ExportRequest::builder(checkpoint, &out, settings.build()?)
        .overwrite(true)
        .source(format!("pio bench ({variant})"))
        .progress(true)
        .build();
    pio_export::export(&request)?;
    Ok(out)
}

fn run_bench(args: BenchArgs) -> Result<()> {
    // The inputs of every row, before the first one loads.
    for dir in args.graphs.iter().chain(&args.accuracy_reference) {
        GraphFolder::inspect(dir)?;
    }
    if let Some(checkpoint) = &args.hf_baseline {
        preflight::check_file("--hf-baseline", &checkpoint.join("config.json"))?;
        preflight::check_file("--hf-script", &args.hf_script)?;
    }
    let plan = bench::BenchPlan {
        prompt_lens: args.prompt_lens.clone(),
        decode_prompt_len: args.decode_prompt_len,
        decode_tokens: args.decode_tokens,
        batches: args.batches.clone(),
        repeats: args.repeats,
        cuda_graph: false,
        host_argmax: false,
        prefill_chunk: None,
        check_chunked_prefill: args.check_chunked_prefill,
        seed: args.seed,
        stages: args.stages.options(),
    };
    let argmax_modes: Vec<bool> = match args.argmax.as_str() {
        "device" => vec![false],
        "host" => vec![true],
        "both" => vec![false, true],
        other => bail!("--argmax takes device, host or both, not {other}"),
    };
    let eps: Vec<ExecutionProvider> = args
        .ep
        .iter()
        .map(|e| {
            // CPU takes no provider options; the GPU providers each take what fits them.
            let options: &[String] = if e == "cpu" { &[] } else { &args.ep_options };
            ExecutionProvider::from_cli(e, args.device_id, options)
        })
        .collect::<Result<_, _>>()?;
    // (label, graph folder, the provider it is for or None for any)
    let mut graphs: Vec<(String, PathBuf, Option<String>)> = Vec::new();
    let mut checkpoint = None;
    if let Some(model) = &args.model {
        // Its checkpoint and exports are written in hidden scratch folders: Ctrl-C or SIGTERM must
        // remove them, as pio-export's own handler does.
        if let Err(e) = pio_export::scratch::clean_up_on_signals() {
            tracing::warn!("{e:#}: an interrupted export may leave a hidden .pio-export-* folder behind");
        }
        // clap requires --synthetic with --model (a real checkpoint is exported with pio-export).
        let preset = pio_models::find_preset(model)?;
        let overrides = pio_export::synthetic::ShapeOverrides { layers: args.layers, ..Default::default() };
        let tag = overrides.tag();
        let name = if tag.is_empty() {
            format!("{}-synthetic", preset.name)
        } else {
            format!("{}-synthetic-{tag}", preset.name)
        };
        let ck = args.checkpoint_out.clone().unwrap_or_else(|| PathBuf::from("checkpoints").join(&name));
        if !ck.join("config.json").is_file() {
            tracing::info!("writing synthetic checkpoint {}", ck.display());
            pio_export::synthetic::write_checkpoint(preset, &overrides, args.seed, None, &ck)?;
        }
        for ep in &args.ep {
            let target = pio_models::TargetEp::parse(ep)?;
            let precisions: Vec<Precision> =
                if target == pio_models::TargetEp::Cpu { vec![Precision::Fp32] } else { args.precision.clone() };
            for (i, p) in precisions.iter().enumerate() {
                let mut variants = vec!["default"];
                if args.switches && i == 0 && target != pio_models::TargetEp::Cpu {
                    variants.extend([
                        "no-fused-norms",
                        "unfused-projections",
                        "unfused-attention",
                        "all-logits",
                        "kv-int8",
                    ]);
                }
                for v in variants {
                    let dir = args.graphs_dir.join(format!("{name}-{}-{}-{v}", target.as_str(), p.as_str()));
                    let dir = export_for_bench(&ck, dir, *p, target, v)?;
                    graphs.push((format!("{}-{v}", p.as_str()), dir, Some(ep.clone())));
                }
            }
        }
        checkpoint = Some(ck);
    } else {
        if args.graphs.is_empty() {
            bail!("pass --graphs DIR (repeatable) or --model PRESET --synthetic");
        }
        for g in &args.graphs {
            let label = g.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            graphs.push((label, g.clone(), None));
        }
    }

    let mut runs = Vec::new();
    for ep in &eps {
        for (label, dir, only_for) in &graphs {
            if only_for.as_deref().is_some_and(|o| o != ep.name()) {
                continue;
            }
            let graph_modes: Vec<bool> = match (ep, args.cuda_graph.as_str()) {
                (ExecutionProvider::Cuda { .. }, "both") => vec![false, true],
                (ExecutionProvider::Cuda { .. }, "on") => vec![true],
                (_, "on" | "off" | "both") => vec![false],
                (_, other) => bail!("--cuda-graph takes on, off or both, not {other}"),
            };
            for cuda_graph in graph_modes {
                for &host_argmax in &argmax_modes {
                    for &chunk in &args.prefill_chunk {
                        let mut ep = ep.clone();
                        ep.set_cuda_graph(cuda_graph);
                        let prefill_chunk = (chunk > 0).then_some(chunk);
                        let plan = bench::BenchPlan { cuda_graph, host_argmax, prefill_chunk, ..plan.clone() };
                        tracing::info!(
                            "benchmarking {label} on {} (cuda graph {cuda_graph}, host argmax {host_argmax}, prefill chunk {chunk})",
                            ep.name()
                        );
                        runs.push(bench::bench_one(dir, label, &ep, &plan));
                    }
                }
            }
        }
    }
    // Switches this preset cannot take are rows that say why, not silent omissions.
    let mut refused = Vec::new();
    if let Some((_, dir, _)) = graphs.first() {
        if let Ok(m) = pio_models::Manifest::load(dir) {
            if m.config.text.sliding_window.is_none() {
                refused.push(serde_json::json!({"switch": "sliding-window attention", "reason": format!("{} has no sliding window (use_sliding_window is off)", m.config.architecture.hf_name())}));
            }
        }
    }
    let mut accuracy = Vec::new();
    if let Some(reference) = &args.accuracy_reference {
        for r in runs.iter().filter(|r| r.error.is_none() && !r.cuda_graph && r.ep != "cpu") {
            let ep = ExecutionProvider::parse(&r.ep, args.device_id)?;
            match bench::accuracy(
                reference,
                &ExecutionProvider::default(),
                &r.graphs,
                &ep,
                args.accuracy_tokens,
                args.seed,
            ) {
                Ok(a) => accuracy.push(serde_json::to_value(a)?),
                Err(e) => accuracy.push(serde_json::json!({"candidate": r.graphs, "error": format!("{e:#}")})),
            }
        }
    }
    let baseline = match &args.hf_baseline {
        Some(ck) => {
            let device = if eps.iter().any(|e| e.device_id().is_some()) { "cuda" } else { "cpu" };
            match bench::hf_baseline(&args.hf_script, ck, args.decode_prompt_len, args.decode_tokens, device) {
                Ok(v) => Some(v),
                Err(e) => Some(serde_json::json!({"error": format!("{e:#}")})),
            }
        }
        None => None,
    };
    bench::print_table(&runs, &plan);
    for a in &accuracy {
        println!("accuracy vs fp32 CPU: {a}");
    }
    for r in &refused {
        println!("switch not measured: {} ({})", r["switch"], r["reason"].as_str().unwrap_or_default());
    }
    if let Some(b) = &baseline {
        if let Some(hf) = b.get("tokens_per_s").and_then(|v| v.as_f64()) {
            println!(
                "transformers baseline ({}): {hf:.1} tokens/s decode at batch 1",
                b.get("device_name").and_then(|v| v.as_str()).unwrap_or("?")
            );
            for r in runs.iter().filter(|r| r.error.is_none()) {
                if let Some(d) = r.decode.iter().find(|d| d.batch == 1) {
                    println!(
                        "  {} {} cuda graph {}: {:.2}x the baseline",
                        r.label,
                        r.ep,
                        r.cuda_graph,
                        d.tokens_per_s / hf
                    );
                }
            }
        } else {
            println!("transformers baseline: {b}");
        }
    }
    let report = serde_json::json!({
        "machine": machine_description(),
        "date": chrono_like_now(),
        "plan": plan,
        "checkpoint": checkpoint,
        "runs": runs,
        "accuracy": accuracy,
        "switches_not_measured": refused,
        "hf_baseline": baseline,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// CPU model and GPU name (from NVML when there is one), for the report.
fn machine_description() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    let gpu = pio_runtime::gpu_monitor::device_info(0)
        .ok()
        .map(|(name, mem, driver)| serde_json::json!({"name": name, "memory_bytes": mem, "driver": driver}));
    serde_json::json!({"cpu": cpu, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "gpu": gpu})
}

fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("unix {secs}")
}

/// 2 for what the user can fix in the command (an argument refused before the model loads, a
/// request or setting the engine refuses), 1 for everything else.
fn exit_code(error: &anyhow::Error) -> ExitCode {
    // Anywhere in the chain: a batch line's parse error carries a `Refused` context, a graph
    // folder's error is the --graphs flag's.
    let usage = error.downcast_ref::<Refused>().is_some()
        || error.chain().any(|cause| {
            cause.is::<Refused>()
                || cause.is::<pio_models::error::PresetError>()
                || cause.is::<pio_models::ManifestError>()
                || cause.downcast_ref::<pio_hub::HubError>().is_some_and(pio_hub::HubError::is_usage)
                || cause.downcast_ref::<EpError>().is_some_and(|e| !matches!(e, EpError::CreateFolder { .. }))
                || matches!(cause.downcast_ref::<pio_server::ServerError>(), Some(pio_server::ServerError::Bind { .. }))
        });
    if usage {
        return ExitCode::from(2);
    }
    match error.downcast_ref::<EngineError>() {
        Some(EngineError::InvalidRequest { .. } | EngineError::ContextLength { .. } | EngineError::Config { .. }) => {
            ExitCode::from(2)
        }
        _ => ExitCode::FAILURE,
    }
}

fn main() -> ExitCode {
    pio_models::logging::init();
    let cli: Cli = pio_models::cli_args::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Models => models(),
        Command::Download(a) => download::run(a),
        Command::Bench(bench) => match *bench {
            BenchCommand { load: Some(BenchLoad::Serve(a)), .. } => bench_serve::run(a),
            BenchCommand { load: None, args } => run_bench(args),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`pio run ... | head`): stop quietly, as Unix tools do.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            exit_code(&e)
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of every subcommand has help text, and every numeric flag answers `-1` with the
    /// range it takes.
    #[test]
    fn every_flag_is_documented_and_names_its_range() {
        let problems = pio_models::cli_args::lint(pio_models::cli_args::command::<Cli>());
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
