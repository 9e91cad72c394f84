//! The serving engine: many requests at once over one model, with continuous batching, a KV
//! pool of fixed slots, and KV reuse across requests.
//!
//! [`Engine`] is a cheap, `Send + Sync` handle (clone it freely); the model lives on one worker
//! thread. [`Engine::submit`] checks and tokenizes a [`Request`] on the caller's thread (a bad
//! request, or one that cannot fit a sequence, is refused there with a typed [`EngineError`]),
//! then queues it; the [`RequestHandle`] it returns streams [`Event`]s, async or blocking, and
//! cancels the request when dropped.
//!
//! Each engine step decodes every running sequence in one batched run over the KV pool's first
//! slots, each row with its own length, and prefills new prompts in chunks under a per-step
//! token budget (see [`scheduler`] for the rules and [`worker`] for the step). The modules:
//! `kv_pool` (the slots and their sizing), `prefix_cache` (block-hash index of reusable KV),
//! `runner` (running steps and KV copies on the model), `sequence` (one request's sampling,
//! detokenizing and stop conditions), `prepare` (prompts to tokens and images at submission),
//! `images` (a request's images and the worker's vision encoder), `decode_rows` (which rows of a
//! decode step run together).
//!
//! A vision-language model (Qwen3-VL) takes images in chat messages (OpenAI `image_url` and
//! transformers `image` content parts): they are decoded at submission, encoded on the worker
//! before the prefill chunk that needs them (once per image content: the encoder cache), and
//! requests with and without images share every step.

mod decode_rows;
mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
mod handle;
mod images;
mod kv_pool;
mod metrics;
mod pacing;
mod prefix_cache;
mod prepare;
mod request;
mod runner;
pub mod scheduler;
mod sequence;
mod stop_matcher;
mod token_rules;
mod worker;

use token_rules::TokenRules;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use pio_models::manifest::Manifest;

use pio_image::{DecodeLimits, ImageProcessor};

use crate::chat_template::{ChatTemplate, RenderOptions};
use crate::ep::ExecutionProvider;
use crate::generate::GenerationOutput;
use crate::model::DecoderModel;
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::stages::StageOptions;
use crate::structured::{Constraint, Guidance, SharedGuidance, StructuredOutput};
use crate::tokenizer::Tokenizer;
use crate::vision::{ImageSettings, LocalImageFiles, RemoteImages, VisionEncoder};

pub use error::{EngineError, ModelFailure};
pub use handle::{BlockingEvents, RequestHandle};
pub use kv_pool::{plan_pool, PoolLimits, PoolPlan, PoolSettings};
pub use metrics::{
    FinishedRequests, Histogram, MetricsSnapshot, INTER_TOKEN_LATENCY_BUCKETS, TIME_TO_FIRST_TOKEN_BUCKETS,
};
pub use prefix_cache::BLOCK_TOKENS as PREFIX_BLOCK_TOKENS;
pub use request::{Event, ModelInfo, Prompt, Request};

use images::{SequenceImages, VisionRuntime};
use pacing::PrefillPacer;
use prepare::Preparer;
use runner::Runner;
use sequence::{Admitted, Sequence};
use worker::{Command, Shared};

/// Prompt tokens prefilled per engine step unless configured: one step then costs one decode
/// plus at most this much prefill, which bounds what a long prompt adds to running streams'
/// inter-token latency (on an H100, about 9 ms for Qwen3-4B bf16).
pub const DEFAULT_PREFILL_BUDGET: usize = 512;
/// Prompt tokens a step may prefill when no sequence decodes, unless configured (and at least
/// the prefill budget): no stream's inter-token latency is at stake then, and prompts that
/// arrive together prefill in fewer, batched runs, so their streams start together instead of
/// stalling one another (32 prompts of 128 tokens queued at an idle engine: one step and one
/// batched run, instead of eight steps beside the first ones' decodes).
pub const DEFAULT_IDLE_PREFILL_BUDGET: usize = 4096;
/// Prompts to prefill, at or above this times the sequences decoding, make a step prefill up to
/// the idle budget: TGI's `waiting_served_ratio` and its default.
pub const DEFAULT_WAITING_SERVED_RATIO: f64 = 1.2;
/// Requests that may wait for a slot before `submit` answers `Overloaded`, unless configured.
pub const DEFAULT_MAX_WAITING: usize = 1024;
/// The share of the GPU's memory the engine may fill (weights, activations and KV), as vLLM's
/// `gpu_memory_utilization`.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;
/// Top logprobs a request may ask for at most (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// On a GPU, a default slot capacity leaves room for at least this many sequences.
const GPU_MIN_SLOTS: usize = 32;
/// On the CPU, without settings: this many slots of the whole context (host memory is
/// committed only as sequences fill it).
const CPU_DEFAULT_SLOTS: usize = 4;
/// Slots at most unless `max_seqs` says otherwise (vLLM's `max_num_seqs`).
const MAX_DEFAULT_SLOTS: usize = 256;
/// The prefix cache's default size on the CPU at most.
const CPU_PREFIX_CACHE_CAP: u64 = 2 << 30;
/// Bytes of vision encodings kept unless configured: 32 images of 1024x1024 for Qwen3-VL-2B in
/// bf16 (1024 tokens of 4 x 2048 features each).
pub const DEFAULT_ENCODER_CACHE_BYTES: u64 = 512 << 20;
/// The most threads that preprocess an image by default (the machine's cores when fewer): past
/// that, writing `pixel_values` is bound by memory, not by the cores.
pub const DEFAULT_MAX_IMAGE_THREADS: usize = 8;

/// How to start an [`Engine`]. Build it with [`EngineConfig::builder`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    graphs: PathBuf,
    ep: ExecutionProvider,
    served_model_name: Option<String>,
    pool: PoolSettings,
    gpu_memory_utilization: f64,
    prefill_budget: usize,
    idle_prefill_budget: Option<usize>,
    long_prefill_token_threshold: Option<usize>,
    itl_factor: Option<f64>,
    waiting_served_ratio: Option<f64>,
    prefix_caching: bool,
    prefix_cache_bytes: Option<u64>,
    max_waiting: usize,
    images: ImageSettings,
    stages: StageOptions,
    #[cfg(feature = "fault-injection")]
    faults: faults::FaultPlan,
}

impl EngineConfig {
    /// Settings for the graph folder `graphs` (written by pio-export), with the defaults: the
    /// CPU, the KV pool sized automatically, [`DEFAULT_PREFILL_BUDGET`], prefix caching on.
    pub fn builder(graphs: impl Into<PathBuf>) -> EngineConfigBuilder {
        EngineConfigBuilder {
            config: EngineConfig {
                graphs: graphs.into(),
                ep: ExecutionProvider::default(),
                served_model_name: None,
                pool: PoolSettings::default(),
                gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
                prefill_budget: DEFAULT_PREFILL_BUDGET,
                idle_prefill_budget: None,
                long_prefill_token_threshold: None,
                itl_factor: None,
                waiting_served_ratio: Some(DEFAULT_WAITING_SERVED_RATIO),
                prefix_caching: true,
                prefix_cache_bytes: None,
                max_waiting: DEFAULT_MAX_WAITING,
                images: ImageSettings::default(),
                stages: StageOptions::default(),
                #[cfg(feature = "fault-injection")]
                faults: faults::FaultPlan::default(),
            },
        }
    }

    pub fn graphs(&self) -> &Path {
        &self.graphs
    }
    pub fn ep(&self) -> &ExecutionProvider {
        &self.ep
    }
    pub fn pool(&self) -> PoolSettings {
        self.pool
    }
    pub fn prefill_budget(&self) -> usize {
        self.prefill_budget
    }
    /// Prompt tokens a step prefills at most when no sequence decodes: as configured, else
    /// [`DEFAULT_IDLE_PREFILL_BUDGET`] or the prefill budget, whichever is larger.
    pub fn idle_prefill_budget(&self) -> usize {
        self.idle_prefill_budget.unwrap_or(DEFAULT_IDLE_PREFILL_BUDGET.max(self.prefill_budget))
    }
    /// Prompt tokens of one sequence prefilled per step at most while sequences decode (None: only
    /// the prefill budget).
    pub fn long_prefill_token_threshold(&self) -> Option<usize> {
        self.long_prefill_token_threshold
    }
    pub fn itl_factor(&self) -> Option<f64> {
        self.itl_factor
    }
    pub fn waiting_served_ratio(&self) -> Option<f64> {
        self.waiting_served_ratio
    }
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }
    pub fn max_waiting(&self) -> usize {
        self.max_waiting
    }
    pub fn images(&self) -> &ImageSettings {
        &self.images
    }
    pub fn stages(&self) -> &StageOptions {
        &self.stages
    }
}

/// Builds an [`EngineConfig`]; [`build`](Self::build) checks the values.
#[derive(Clone, Debug)]
pub struct EngineConfigBuilder {
    config: EngineConfig,
}

impl EngineConfigBuilder {
    /// Where the model runs (default: the CPU).
    pub fn ep(mut self, ep: ExecutionProvider) -> Self {
        self.config.ep = ep;
        self
    }
    /// The model name clients use (default: the graph's name).
    pub fn served_model_name(mut self, name: impl Into<String>) -> Self {
        self.config.served_model_name = Some(name.into());
        self
    }
    /// Sequences the KV pool holds at once (default: as many as the memory holds, up to 256, on
    /// a GPU; 4 on the CPU).
    pub fn max_seqs(mut self, n: usize) -> Self {
        self.config.pool.max_seqs = Some(n);
        self
    }
    /// Bytes of the KV pool (default: measured free GPU memory; see `gpu_memory_utilization`).
    pub fn kv_cache_bytes(mut self, bytes: u64) -> Self {
        self.config.pool.kv_cache_bytes = Some(bytes);
        self
    }
    /// Tokens one sequence can hold, prompt and generated (default: the graph's context length,
    /// capped so that at least 32 sequences fit in the KV pool on a GPU).
    pub fn max_model_len(mut self, tokens: usize) -> Self {
        self.config.pool.max_model_len = Some(tokens);
        self
    }
    /// The share of the GPU's memory the engine may fill, in (0, 1] (default 0.9).
    pub fn gpu_memory_utilization(mut self, share: f64) -> Self {
        self.config.gpu_memory_utilization = share;
        self
    }
    /// Prompt tokens prefilled per step at most while sequences decode (default
    /// [`DEFAULT_PREFILL_BUDGET`]).
    pub fn prefill_budget(mut self, tokens: usize) -> Self {
        self.config.prefill_budget = tokens;
        self
    }
    /// Prompt tokens prefilled per step at most when no sequence decodes (default
    /// [`DEFAULT_IDLE_PREFILL_BUDGET`], or the prefill budget when that is larger); at least the
    /// prefill budget. The GPU's free memory is measured after a prefill of this many tokens.
    pub fn idle_prefill_budget(mut self, tokens: usize) -> Self {
        self.config.idle_prefill_budget = Some(tokens);
        self
    }
    /// At most `tokens` prompt tokens of one sequence per step while sequences decode (default
    /// `None`: only the prefill budget), as vLLM's `long_prefill_token_threshold`. A long prompt
    /// (more than `tokens` left) among running streams then advances `tokens` a step, so a step
    /// beside them costs what a chunk of that size costs, while shorter prompts share the rest of
    /// the budget; its own first token comes later (it needs `len / tokens` steps). While two or
    /// more long prompts could prefill (prefilling, or waiting with a slot free for them) a step
    /// gives the whole budget instead: capped, they would advance one at a time in small runs,
    /// each prefilling fewer tokens a millisecond than a budget-sized one, and the queue would
    /// wait that much longer. Not applied when no sequence decodes, nor in a catch-up step (see
    /// [`Self::waiting_served_ratio`]: a burst then prefills at the idle budget). At least 1.
    pub fn long_prefill_token_threshold(mut self, tokens: Option<usize>) -> Self {
        self.config.long_prefill_token_threshold = tokens;
        self
    }
    /// Prefill pacing (default off): while sequences decode, a step that also prefills takes at
    /// most `factor` times a decode-only step, both measured as the engine runs: prompt chunks
    /// get smaller, and time to first token much longer, so that running streams'
    /// inter-token latency stays near `factor` of plain decoding. At least 16 prompt tokens run
    /// per step. `None`: only `prefill_budget` limits a step. `factor` must be more than 1.
    ///
    /// Off by default because it costs more than it gives while prefill chunks run apart from
    /// the decode (see the README's engine section: on an H100, factor 2 held p99
    /// inter-token latency at 2.3x the decode step instead of 6x, and multiplied time to first
    /// token by ten).
    pub fn itl_factor(mut self, factor: Option<f64>) -> Self {
        self.config.itl_factor = factor;
        self
    }
    /// Catch-up prefill (default [`DEFAULT_WAITING_SERVED_RATIO`], as TGI): when the prompts still
    /// to prefill are at least `ratio` times the sequences decoding, a step prefills up to the
    /// idle budget instead of the prefill budget. A burst of requests arriving while a few streams
    /// decode then costs those streams one long step instead of a slow step in every few for as
    /// long as the burst takes, and the burst's first tokens come sooner. A long prompt arriving
    /// alone among many streams stays chunked. Inactive while prefill pacing is on (pacing bounds
    /// every step). `None` turns it off; `ratio` must be more than 0.
    pub fn waiting_served_ratio(mut self, ratio: Option<f64>) -> Self {
        self.config.waiting_served_ratio = ratio;
        self
    }
    /// Reuse KV across requests (default on).
    pub fn prefix_caching(mut self, on: bool) -> Self {
        self.config.prefix_caching = on;
        self
    }
    /// Bytes the prefix cache may hold (default: on a GPU, what the measured KV memory leaves
    /// after the pool (a fifth of it when the pool is sized from it), or a quarter of
    /// `kv_cache_bytes` on top of it; on the CPU as much as the pool, at most 2 GiB).
    pub fn prefix_cache_bytes(mut self, bytes: u64) -> Self {
        self.config.prefix_cache_bytes = Some(bytes);
        self
    }
    /// Model runs that fail on purpose (tests of the engine's failure paths).
    #[cfg(feature = "fault-injection")]
    pub fn fault_plan(mut self, plan: faults::FaultPlan) -> Self {
        self.config.faults = plan;
        self
    }
    /// Requests that may wait for a slot before `submit` answers `Overloaded` (default 1024).
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.config.max_waiting = n;
        self
    }
    /// Limits on a request's images: encoded bytes and pixels (default: pio-image's, 64 MiB and
    /// Pillow's 89,478,485 pixels).
    pub fn image_limits(mut self, limits: DecodeLimits) -> Self {
        self.config.images.limits = limits;
        self
    }
    /// Where local image paths in messages may point (default: anywhere the process can read;
    /// a server should restrict them or refuse them).
    pub fn local_image_files(mut self, policy: LocalImageFiles) -> Self {
        self.config.images.local_files = policy;
        self
    }
    /// Whether http(s) image URLs are fetched (default: refused).
    pub fn remote_images(mut self, policy: RemoteImages) -> Self {
        self.config.images.remote = policy;
        self
    }
    /// Bytes of vision encodings kept across requests (default [`DEFAULT_ENCODER_CACHE_BYTES`];
    /// 0: every image is encoded each time).
    pub fn encoder_cache_bytes(mut self, bytes: u64) -> Self {
        self.config.images.encoder_cache_bytes = Some(bytes);
        self
    }
    /// Threads that preprocess one image: resampling, normalization and patches, in bands of rows
    /// (default: the machine's cores, at most [`DEFAULT_MAX_IMAGE_THREADS`]). The pixels are the
    /// same whatever the count; it only sets how soon an image reaches the encoder.
    pub fn image_threads(mut self, threads: std::num::NonZeroUsize) -> Self {
        self.config.images.preprocess_threads = Some(threads);
        self
    }

    /// Where a staged export's stages run and how they overlap (default: every stage on the
    /// execution provider's device; see [`StageOptions`]).
    pub fn stages(mut self, stages: StageOptions) -> Self {
        self.config.stages = stages;
        self
    }

    pub fn build(self) -> Result<EngineConfig, EngineError> {
        let c = self.config;
        if c.prefill_budget == 0 {
            return Err(EngineError::config("prefill_budget", "must be at least 1 token"));
        }
        if let Some(idle) = c.idle_prefill_budget.filter(|&idle| idle < c.prefill_budget) {
            return Err(EngineError::config(
                "idle_prefill_budget",
                format!("{idle} tokens is less than the prefill budget ({})", c.prefill_budget),
            ));
        }
        if c.long_prefill_token_threshold == Some(0) {
            return Err(EngineError::config("long_prefill_token_threshold", "must be at least 1 token"));
        }
        if let Some(factor) = c.itl_factor {
            if !(factor > 1.0 && factor.is_finite()) {
                return Err(EngineError::config("itl_factor", format!("{factor} is not a finite number more than 1")));
            }
        }
        if let Some(ratio) = c.waiting_served_ratio {
            if !(ratio > 0.0 && ratio.is_finite()) {
                return Err(EngineError::config(
                    "waiting_served_ratio",
                    format!("{ratio} is not a finite number more than 0"),
                ));
            }
        }
        if !(c.gpu_memory_utilization > 0.0 && c.gpu_memory_utilization <= 1.0) {
            return Err(EngineError::config(
                "gpu_memory_utilization",
                format!("{} is not in (0, 1]", c.gpu_memory_utilization),
            ));
        }
        if c.pool.max_seqs == Some(0) {
            return Err(EngineError::config("max_seqs", "must be at least 1"));
        }
        if c.stages.micro_batches() == Some(0) {
            return Err(EngineError::config("micro_batches", "must be at least 1"));
        }
        if c.pool.kv_cache_bytes == Some(0) {
            return Err(EngineError::config("kv_cache_bytes", "must be more than 0"));
        }
        if let RemoteImages::Fetch { timeout } = c.images.remote {
            if timeout.is_zero() {
                return Err(EngineError::config("remote_images", "the fetch timeout must be more than 0"));
            }
        }
        Ok(c)
    }
}

/// The engine's handle: cheap to clone, `Send + Sync`. Dropping the last clone shuts the engine
/// down as [`shutdown`](Engine::shutdown) does (it waits for the worker to finish its step).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    info: ModelInfo,
    preparer: Preparer,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    max_waiting: usize,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// The token trie structured outputs are compiled against: built on the first request that
    /// asks for one (seconds for a 150k vocabulary), then shared.
    guidance: SharedGuidance,
}

/// What the worker reports once the model is loaded and the pool allocated.
struct Started {
    plan: PoolPlan,
    kv_cache_bytes: u64,
    graph_sizes: Vec<usize>,
    prefix_caching: bool,
}

impl Engine {
    /// Loads the graph folder on a worker thread, sizes and allocates the KV pool, and returns
    /// once the engine takes requests.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        let dir = config.graphs.clone();
        let manifest = Manifest::load(&dir)
            .map_err(|e| EngineError::model_failed(format!("cannot load the graphs in {}", dir.display()), e))?;
        let (tokenizer, chat_template) = load_tokenizer(&dir)?;
        let preparer = Preparer::new(dir.clone(), &manifest, tokenizer, chat_template, config.images.clone())?;
        let shared = Arc::new(Shared::new());
        let (commands, receiver) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let worker_shared = Arc::clone(&shared);
        let worker_config = config.clone();
        let processor = preparer.image_processor().cloned();
        let worker = std::thread::Builder::new()
            .name("pio-engine".into())
            .spawn(move || {
                let mut runner = match start_runner(&worker_config, processor) {
                    Ok(runner) => runner,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if !runner.graph_sizes().is_empty() {
                    match runner.capture_decode_graphs() {
                        Ok(took) => tracing::info!(
                            "captured the decode step's CUDA graphs for batches {:?} in {:.2} s",
                            runner.graph_sizes(),
                            took.as_secs_f64()
                        ),
                        Err(e) => {
                            let _ = ready_tx.send(Err(EngineError::model_failed(
                                "cannot capture the decode step's CUDA graphs",
                                e,
                            )));
                            return;
                        }
                    }
                }
                let plan = runner.pool().plan();
                let started = Started {
                    plan,
                    kv_cache_bytes: plan.bytes(runner.model().kv_bytes_per_token()),
                    graph_sizes: runner.graph_sizes().to_vec(),
                    prefix_caching: runner.prefix_caching(),
                };
                if ready_tx.send(Ok(started)).is_ok() {
                    let pacer = PrefillPacer::new(
                        worker_config.prefill_budget,
                        worker_config.idle_prefill_budget(),
                        worker_config.itl_factor,
                        worker_config.waiting_served_ratio,
                    )
                    .with_per_sequence(worker_config.long_prefill_token_threshold);
                    worker::run(runner, receiver, worker_shared, pacer);
                }
            })
            .map_err(|e| EngineError::model_failed("cannot start the engine's thread", e))?;
        let started = match ready_rx.recv() {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => {
                let _ = worker.join();
                return Err(e);
            }
            Err(_) => {
                let _ = worker.join();
                return Err(EngineError::model_failed(
                    "the engine's thread stopped while loading the model",
                    "it panicked (see the log)",
                ));
            }
        };
        let info = ModelInfo {
            served_name: config.served_model_name.clone().unwrap_or_else(|| manifest.name.clone()),
            graphs: dir,
            architecture: manifest.architecture.hf_name().to_string(),
            precision: manifest.precision.as_str().to_string(),
            execution_provider: config.ep.name().to_string(),
            context_length: manifest.dims.context_length,
            max_model_len: started.plan.capacity,
            max_seqs: started.plan.slots,
            kv_cache_bytes: started.kv_cache_bytes,
            prefill_budget: config.prefill_budget,
            idle_prefill_budget: config.idle_prefill_budget(),
            long_prefill_token_threshold: config.long_prefill_token_threshold,
            itl_factor: config.itl_factor,
            waiting_served_ratio: config.waiting_served_ratio,
            prefix_caching: started.prefix_caching,
            cuda_graph_batch_sizes: started.graph_sizes,
            vocab_size: manifest.dims.vocab_size,
            eos_token_ids: manifest.eos_token_ids.clone(),
            default_sampling: SamplingParams::from_generation_config(&manifest.generation),
            has_tokenizer: preparer.tokenizer().is_some(),
            has_chat_template: preparer.chat_template().is_some(),
            takes_images: manifest.vision.is_some(),
        };
        tracing::info!(
            "engine ready: {} on {}, {} sequences of {} tokens ({} of KV), prefill budget {} tokens/step ({} with no stream decoding){}, prefix caching {}{}",
            info.served_name,
            info.execution_provider,
            info.max_seqs,
            info.max_model_len,
            pio_models::size::format_bytes(info.kv_cache_bytes),
            info.prefill_budget,
            info.idle_prefill_budget,
            [
                info.itl_factor.map(|f| format!(" paced to {f}x a decode step while streams decode")),
                info.waiting_served_ratio
                    .map(|r| format!(", the idle budget when prompts to prefill reach {r}x the decoding streams")),
            ]
            .into_iter()
            .flatten()
            .collect::<String>(),
            if info.prefix_caching { "on" } else { "off" },
            if info.cuda_graph_batch_sizes.is_empty() {
                String::new()
            } else {
                format!(", CUDA graphs for decode batches {:?}", info.cuda_graph_batch_sizes)
            }
        );
        Ok(Engine {
            inner: Arc::new(Inner {
                info,
                preparer,
                commands,
                shared,
                worker: Mutex::new(Some(worker)),
                max_waiting: config.max_waiting,
                next_id: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                guidance: SharedGuidance::new(),
            }),
        })
    }

    pub fn model_info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The model's tokenizer (None when the export has none: token ids only).
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.inner.preparer.tokenizer()
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.inner.preparer.chat_template()
    }

    /// A vision-language model's image processor (None for text models).
    pub fn image_processor(&self) -> Option<&ImageProcessor> {
        self.inner.preparer.image_processor()
    }

    /// A snapshot of the engine's gauges, counters and histograms.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.shared.snapshot()
    }

    /// Whether the worker thread still runs: false once the engine is shut down or its worker has
    /// stopped (a model failure it could not survive, or a panic), so that a health probe can tell
    /// a server whose engine is gone from one that serves.
    pub fn is_running(&self) -> bool {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return false;
        }
        let worker = match inner.worker.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        worker.as_ref().is_some_and(|w| !w.is_finished())
    }

    /// Sequences holding a KV slot now.
    pub fn active_sequences(&self) -> usize {
        self.inner.shared.active.load(Ordering::Acquire)
    }

    /// The token ids of `prompt`: chat messages through the chat template (`render`), with each
    /// image's placeholder expanded to its token count (its file decoded to know that), text
    /// through the tokenizer, ids as they are.
    pub fn tokenize(&self, prompt: &Prompt, render: &RenderOptions) -> Result<Vec<u32>, EngineError> {
        Ok(self.inner.preparer.prepare(prompt, render)?.ids)
    }

    /// Checks, tokenizes and queues `request`. Refused here: an invalid field
    /// ([`EngineError::InvalidRequest`]; a bad image names its content part), a prompt plus
    /// `max_tokens` over what one sequence holds ([`EngineError::ContextLength`]), a full queue
    /// ([`EngineError::Overloaded`]), a stopped engine ([`EngineError::Shutdown`]).
    ///
    /// A chat with images reads and decodes them here, on the caller's thread (tens of
    /// milliseconds for a large photo): an async server should call it where blocking is fine
    /// (`spawn_blocking`).
    pub fn submit(&self, request: Request) -> Result<RequestHandle, EngineError> {
        let mut handles = self.submit_batch(vec![request])?;
        handles.pop().ok_or(EngineError::Shutdown)
    }

    /// [`submit`](Self::submit) for several requests at once, all or none: each is checked and
    /// tokenized first, then all are queued together, so the engine admits them in the same step
    /// as far as slots and the prefill budget allow (FIFO, in this order).
    pub fn submit_batch(&self, requests: Vec<Request>) -> Result<Vec<RequestHandle>, EngineError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(EngineError::Shutdown);
        }
        let submitted = Instant::now();
        let admitted = requests
            .into_iter()
            .map(|request| {
                let prepared = inner.preparer.prepare(&request.prompt, &request.render)?;
                self.check(prepared.ids, prepared.images, request)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let n = admitted.len();
        let waiting = inner
            .shared
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w + n <= inner.max_waiting).then_some(w + n));
        if let Err(waiting) = waiting {
            return Err(EngineError::Overloaded { waiting, limit: inner.max_waiting });
        }
        let mut sequences = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for admitted in admitted {
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            let prompt_ids: Arc<[u32]> = admitted.prompt.clone().into();
            let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
            sequences.push(Sequence::new(id, admitted, events, submitted));
            handles.push(RequestHandle::new(id, prompt_ids, receiver));
        }
        if inner.commands.send(Command::Submit(sequences)).is_err() {
            inner.shared.waiting.fetch_sub(n, Ordering::AcqRel);
            return Err(EngineError::Shutdown);
        }
        Ok(handles)
    }

    /// Checks `request` as [`submit`](Self::submit) does (tokenizing it, reading its images)
    /// without queueing it: the refusal `submit` would give, if any. A caller whose batch was
    /// refused finds the request at fault with it.
    pub fn check_request(&self, request: &Request) -> Result<(), EngineError> {
        let prepared = self.inner.preparer.prepare(&request.prompt, &request.render)?;
        self.check(prepared.ids, prepared.images, request.clone()).map(|_| ())
    }

    /// [`submit`](Self::submit), then blocks until the output is there.
    pub fn generate(&self, request: Request) -> Result<GenerationOutput, EngineError> {
        self.submit(request)?.wait()
    }

    /// The request's options checked against the model and the pool.
    fn check(
        &self,
        mut prompt: Vec<u32>,
        images: Option<SequenceImages>,
        request: Request,
    ) -> Result<Admitted, EngineError> {
        let info = &self.inner.info;
        let field = request.prompt.field();
        let options = request.options;
        if request.cache_salt.as_deref() == Some("") {
            return Err(EngineError::invalid("cache_salt", "is empty: a salt is a non-empty string"));
        }
        if prompt.is_empty() {
            return Err(EngineError::invalid(field, "the prompt is empty"));
        }
        match options.truncate_prompt_tokens {
            Some(0) => return Err(EngineError::invalid("truncate_prompt_tokens", "must be at least 1")),
            // Cutting a prompt with images could split an image's tokens from its features.
            Some(keep) if prompt.len() > keep && images.is_some() => {
                return Err(EngineError::invalid(
                    "truncate_prompt_tokens",
                    format!("cannot cut a prompt with images ({} tokens) to its last {keep}", prompt.len()),
                ))
            }
            Some(keep) if prompt.len() > keep => {
                prompt.drain(..prompt.len() - keep);
            }
            _ => {}
        }
        in_vocabulary(field, &prompt, info.vocab_size)?;
        if options.max_tokens == Some(0) {
            return Err(EngineError::invalid("max_tokens", "must be at least 1"));
        }
        let limit = info.max_model_len;
        let room = limit.saturating_sub(prompt.len());
        let max_tokens = match options.max_tokens {
            Some(n) if n <= room => n,
            None if room > 0 => room,
            max_tokens => {
                return Err(EngineError::ContextLength { prompt_tokens: prompt.len(), max_tokens, limit });
            }
        };
        if options.min_tokens > max_tokens {
            let what = if options.max_tokens.is_some() { "max_tokens" } else { "the room the prompt leaves" };
            return Err(EngineError::invalid(
                "min_tokens",
                format!("{} is over {what} ({max_tokens})", options.min_tokens),
            ));
        }
        let sampler = Sampler::new(options.sampling.clone()).map_err(|e| {
            let SamplingError::InvalidParam { field, .. } = &e;
            let field = *field;
            EngineError::invalid_because(field, "out of range", e)
        })?;
        if !options.stop.is_empty() && self.tokenizer().is_none() {
            return Err(EngineError::invalid("stop", "stop strings need a tokenizer, and this model has none"));
        }
        for (field, top) in [("top_logprobs", options.logprobs), ("prompt_logprobs", options.prompt_logprobs)] {
            if let Some(n) = top.filter(|&n| n > MAX_TOP_LOGPROBS) {
                return Err(EngineError::invalid(field, format!("{n} is over the limit of {MAX_TOP_LOGPROBS}")));
            }
        }
        in_vocabulary("logit_bias", options.sampling.logit_bias.keys(), info.vocab_size)?;
        in_vocabulary("stop_token_ids", &options.stop_token_ids, info.vocab_size)?;
        in_vocabulary("allowed_token_ids", options.allowed_token_ids.iter().flatten(), info.vocab_size)?;
        let rules = TokenRules::new(options.allowed_token_ids.as_deref(), &options.bad_words, self.tokenizer())?;
        let constraint = match &options.structured_output {
            Some(output) => Some(self.constraint(output)?),
            None => None,
        };
        let mut stop_ids = if options.ignore_eos { vec![] } else { info.eos_token_ids.clone() };
        stop_ids.extend(&options.stop_token_ids);
        let held_back = if options.min_tokens > 0 { stop_ids.as_slice() } else { &[] };
        if !rules.leaves_a_first_token(held_back) {
            return Err(EngineError::invalid(
                "allowed_token_ids",
                "leaves no token to generate: every allowed id is a bad word or, below min_tokens, a stop id",
            ));
        }
        Ok(Admitted {
            prompt,
            options,
            sampler,
            max_tokens,
            stop_ids,
            tokenizer: self.tokenizer().cloned(),
            images,
            constraint,
            rules,
            cache_salt: request.cache_salt,
        })
    }

    /// Compiles `output` as a request's `structured_output` is compiled (the first call builds
    /// the token trie): a caller can refuse a constraint before it submits anything.
    pub fn check_structured_output(&self, output: &StructuredOutput) -> Result<(), EngineError> {
        self.constraint(output).map(|_| ())
    }

    /// `output` compiled against the model's token trie (built on the first call).
    fn constraint(&self, output: &StructuredOutput) -> Result<Constraint, EngineError> {
        const FIELD: &str = "structured_output";
        let Some(tokenizer) = self.tokenizer() else {
            return Err(EngineError::invalid(FIELD, "structured outputs need a tokenizer, and this model has none"));
        };
        let info = &self.inner.info;
        let guidance = self
            .inner
            .guidance
            .get_or_init(|| {
                let started = Instant::now();
                let built = Guidance::new(tokenizer, info.vocab_size, &info.eos_token_ids);
                tracing::info!(
                    "built the token trie for structured outputs in {:.2} s",
                    started.elapsed().as_secs_f64()
                );
                built.map(Arc::new).map_err(Arc::new)
            })
            .as_ref()
            .map_err(|e| {
                EngineError::invalid_because(
                    FIELD,
                    "structured outputs are not available for this model",
                    Arc::clone(e),
                )
            })?;
        // The caller's constraint is at fault: what llguidance says is wrong with it is the cause.
        guidance.compile(output).map_err(|e| EngineError::invalid_because(FIELD, "cannot constrain the output", e))
    }

    /// Stops taking requests, ends those in flight with [`EngineError::Shutdown`], and blocks
    /// until the worker has finished its step and stopped (the model is dropped there). Later
    /// calls do nothing.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

/// Refuses a request whose `field` holds a token id outside the model's vocabulary.
fn in_vocabulary<'a>(
    field: &'static str,
    ids: impl IntoIterator<Item = &'a u32>,
    vocab_size: usize,
) -> Result<(), EngineError> {
    match ids.into_iter().find(|&&t| t as usize >= vocab_size) {
        Some(bad) => {
            Err(EngineError::invalid(field, format!("token id {bad} is outside the vocabulary (size {vocab_size})")))
        }
        None => Ok(()),
    }
}

impl Inner {
    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.commands.send(Command::Shutdown);
        let worker = match self.worker.lock() {
            Ok(mut w) => w.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(worker) = worker {
            if worker.join().is_err() {
                tracing::error!("the engine's worker thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The tokenizer and chat template of a graph folder, when it has them.
fn load_tokenizer(dir: &Path) -> Result<(Option<Tokenizer>, Option<ChatTemplate>), EngineError> {
    if !dir.join("tokenizer.json").is_file() {
        return Ok((None, None));
    }
    let failed = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
        EngineError::model_failed(format!("{what} in {}", dir.display()), e)
    };
    let tokenizer = Tokenizer::from_dir(dir).map_err(|e| failed("cannot load the tokenizer", e.into()))?;
    let template = match tokenizer.chat_template_source() {
        Some(_) => Some(
            ChatTemplate::from_config(tokenizer.config())
                .map_err(|e| failed("cannot compile the chat template", e.into()))?,
        ),
        None => None,
    };
    Ok((Some(tokenizer), template))
}

/// Loads the model (and a vision-language model's encoder, with `processor` its image processor)
/// on the worker thread and sizes the pool.
fn start_runner(config: &EngineConfig, processor: Option<ImageProcessor>) -> Result<Runner, EngineError> {
    let mut model = DecoderModel::load_with(&config.graphs, &config.ep, &config.stages)
        .map_err(|e| EngineError::model_failed(format!("cannot load the model in {}", config.graphs.display()), e))?;
    let on_gpu = model.device_id().is_some();
    let measured = if on_gpu && config.pool.kv_cache_bytes.is_none() {
        Runner::measure_free_kv_bytes(&mut model, config.idle_prefill_budget(), config.gpu_memory_utilization).map_err(
            |e| {
                EngineError::model_failed(
                    "cannot measure the GPU memory for the KV cache (set --max-seqs or --kv-cache-gb)",
                    e,
                )
            },
        )?
    } else {
        None
    };
    let pool_sized_by_memory = config.pool.max_seqs.is_none() || config.pool.max_model_len.is_none();
    let prefix_share = config.prefix_caching && config.prefix_cache_bytes.is_none() && pool_sized_by_memory;
    // A pool sized from measured memory leaves a fifth of it to the prefix cache.
    let pool_budget = measured.map(|b| if prefix_share { b / 5 * 4 } else { b });
    let limits = PoolLimits {
        context_length: model.context_length(),
        bytes_per_token: model.kv_bytes_per_token(),
        measured_bytes: pool_budget,
        min_slots: if on_gpu { GPU_MIN_SLOTS } else { CPU_DEFAULT_SLOTS },
        max_slots: MAX_DEFAULT_SLOTS,
        shared_buffer: model.has_shared_buffer(),
    };
    let plan = plan_pool(config.pool, limits)?;
    let vision = match model.manifest.vision {
        None => None,
        Some(_) => {
            // The encoder runs where the decoder takes the image rows (its first stage).
            let loaded = VisionEncoder::load_with(&config.graphs, &model.manifest, model.image_ep())
                .map_err(|e| EngineError::model_failed("cannot load the vision encoder", e))?;
            let processor = processor.ok_or_else(|| {
                EngineError::model_failed("a vision-language model without an image processor", "none was read")
            })?;
            let cache_bytes = config.images.encoder_cache_bytes.unwrap_or(DEFAULT_ENCODER_CACHE_BYTES);
            Some(VisionRuntime::new(loaded, processor, cache_bytes))
        }
    };
    let pool_bytes = plan.bytes(model.kv_bytes_per_token());
    let prefix_bytes = match (config.prefix_caching, config.prefix_cache_bytes, measured) {
        (false, ..) => None,
        (true, Some(bytes), _) => Some(bytes),
        // What the measured KV budget leaves after the pool.
        (true, None, Some(budget)) => Some(budget.saturating_sub(pool_bytes)),
        // The GPU with --kv-cache-gb: a quarter of it, on top.
        (true, None, None) if on_gpu => Some(pool_bytes / 4),
        (true, None, None) => Some(pool_bytes.min(CPU_PREFIX_CACHE_CAP)),
    };
    tracing::info!(
        "KV pool: {} sequences of {} tokens, {} ({} per token){}",
        plan.slots,
        plan.capacity,
        pio_models::size::format_bytes(pool_bytes),
        pio_models::size::format_bytes(model.kv_bytes_per_token() as u64),
        match prefix_bytes {
            Some(b) => format!("; prefix cache up to {}", pio_models::size::format_bytes(b)),
            None => String::new(),
        }
    );
    // The chunk lengths a step plans while streams decode, each warmed up once at start.
    let mut chunk_lengths = vec![config.prefill_budget];
    chunk_lengths.extend(config.long_prefill_token_threshold.filter(|&t| t < config.prefill_budget));
    let runner = Runner::new(model, plan, prefix_bytes, vision, &chunk_lengths);
    #[cfg(feature = "fault-injection")]
    let runner = runner.map(|r| r.with_faults(config.faults.clone()));
    runner.map_err(|e| {
        EngineError::model_failed(
            format!("cannot allocate the KV pool ({} sequences of {} tokens)", plan.slots, plan.capacity),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Engine>();
        send_sync::<EngineError>();
        send::<RequestHandle>();
    }
}
