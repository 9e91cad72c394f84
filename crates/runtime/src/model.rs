//! A loaded graph folder: the manifest, the ONNX Runtime sessions over the decoder (one, or
//! one per stage of a decoder exported in stages: `crate::stages`), and the forward step
//! through the KV cache.
//!
//! Two cache layouts, chosen by the graph and where the sessions run ([`crate::kv_cache`]):
//! - growing: each step's `present.*` outputs become the next step's `past_key_values.*` (the
//!   attention concatenates, so the past grows by the new tokens). The outputs stay where the
//!   session made them: host memory on the CPU, device memory on a GPU. CPU graphs and graphs
//!   exported without fused attention use it;
//! - shared (CUDA, TensorRT with GroupQueryAttention): one fixed (batch, kv_heads, capacity,
//!   head_dim) buffer per layer and direction, bound through I/O binding as both past and
//!   present, which GroupQueryAttention updates in place (its shared-buffer mode, the one its
//!   fast decode kernels need).
//!
//! Either way the cache never leaves the GPU (each layer's on the device of its stage); a step
//! brings back the logits, or with [`Fetch::Greedy`] only each sequence's argmax token (the
//! graph's `greedy_tokens` output), which is what keeps large-batch greedy decode off the host.
//! Long prompts are run in chunks of [`DecoderModel::prefill_chunk`] tokens, which bounds the
//! activation memory of a prefill.
//!
//! The rows of a shared buffer can also run with lengths of their own ([`DecoderModel::run_rows`]:
//! each row's mask row and positions say where its new tokens go), which is what the serving
//! engine's slots are (`crate::engine`).
//!
//! A step is run as micro-steps (its prefill chunks, its sequences when GroupQueryAttention
//! takes them one at a time, and, with several pipeline threads, row groups of a batched decode)
//! through the stages by `crate::stages`; a staged model presents the same steps as one graph.

use std::ops::Range;
use std::path::{Path, PathBuf};

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::RunOptions;
use ort::value::{DynValue, Tensor};
use pio_models::manifest::{IoSpec, Manifest, TensorDtype};

use crate::cuda_rt::CudaRuntime;
use crate::ep::ExecutionProvider;
use crate::kv_cache::KvStore;
pub use crate::kv_cache::{bind_input_in_place, KvBuffer, KvCache, SharedLayout};
pub(crate) use crate::kv_cache::{bind_rows, device_tensor, empty_host_tensor};
pub use crate::model_error::ModelError;
use crate::model_error::Result;
use crate::stages::{execute, lanes, stage_eps, MicroStep, PipelineMode, StageOptions, StageSession, StageTimings};
use crate::step_inputs::StepInputs;

/// Logits of one forward step: per sequence, `rows` positions (the last one only, or every new
/// token) by `vocab`.
pub struct Logits {
    pub data: Vec<f32>,
    pub batch: usize,
    pub rows: usize,
    pub vocab: usize,
}

impl Logits {
    /// Row `i` of sequence 0.
    pub fn row(&self, i: usize) -> &[f32] {
        self.row_of(0, i)
    }
    pub fn row_of(&self, seq: usize, i: usize) -> &[f32] {
        let start = (seq * self.rows + i) * self.vocab;
        &self.data[start..start + self.vocab]
    }
    /// The last row of sequence 0.
    pub fn last(&self) -> &[f32] {
        self.row(self.rows - 1)
    }
    pub fn last_of(&self, seq: usize) -> &[f32] {
        self.row_of(seq, self.rows - 1)
    }
}

/// What a step brings back to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Every logits row the graph emits (the last position, or all new positions).
    Logits,
    /// Each sequence's argmax token at its last position. From the graph's `greedy_tokens`
    /// output when it has one (the logits stay on the device), else from host logits.
    Greedy,
}

/// The result of a step: logits, or greedy tokens when those were fetched.
pub enum StepOutput {
    Logits(Logits),
    Greedy(Vec<u32>),
}

impl StepOutput {
    /// Each sequence's greedy token: the argmax of its last logits row.
    pub fn greedy(&self) -> Vec<u32> {
        match self {
            StepOutput::Greedy(tokens) => tokens.clone(),
            StepOutput::Logits(l) => (0..l.batch).map(|b| argmax(l.last_of(b))).collect(),
        }
    }

    pub fn into_logits(self) -> Result<Logits> {
        match self {
            StepOutput::Logits(l) => Ok(l),
            StepOutput::Greedy(_) => Err(ModelError::Output("this step fetched greedy tokens, not logits".into())),
        }
    }
}

/// Index of the first largest value (ONNX ArgMax's choice among equal maxima).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// The decoder input of a step's image rows, (M, hidden).
pub const IMAGE_EMBEDS_INPUT: &str = "image_embeds";
/// The decoder input of a step's deepstack features, (n, M, hidden).
pub const DEEPSTACK_EMBEDS_INPUT: &str = "deepstack_embeds";

/// Prompt tokens per forward pass when a prefill is split (llama.cpp's default batch, vLLM's
/// chunked-prefill budget): long prompts then cost the activation memory of 2048 tokens.
pub const DEFAULT_PREFILL_CHUNK: usize = 2048;

pub struct DecoderModel {
    pub manifest: Manifest,
    pub dir: PathBuf,
    /// The execution provider (of the first stage, for a staged model on several devices).
    pub ep: ExecutionProvider,
    /// The graph's sessions: one per stage (one for an unstaged graph), in layer order.
    stages: Vec<StageSession>,
    /// The pipeline's threads: the stages each runs.
    lanes: Vec<Range<usize>>,
    pipeline: PipelineMode,
    /// Row groups a batched decode step is cut into when the pipeline has several threads.
    micro_batches: usize,
    /// Longest piece [`DecoderModel::step`] runs a prompt in (None: the whole prompt in one pass).
    prefill_chunk: Option<usize>,
    timings: StageTimings,
}

/// An ONNX Runtime error as the model layer's.
pub(crate) fn ort_err(e: ort::Error) -> ModelError {
    ModelError::Ort(e)
}

/// A session builder's error without the builder it carries back (which is not `Send`): the
/// same ONNX Runtime code and message.
pub(crate) fn builder_err(e: ort::Error<ort::session::builder::SessionBuilder>) -> ModelError {
    ort_err(ort::Error::new_with_code(e.code(), e.message()))
}

/// Where outputs that stay with a session are kept: on its device (None: host memory).
pub(crate) fn cache_memory(device_id: Option<i32>) -> Result<MemoryInfo<'static>> {
    match device_id {
        Some(id) => Ok(MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)?),
        None => Ok(MemoryInfo::default()),
    }
}

/// Run options that keep a step out of CUDA-graph capture (shapes vary between prefills).
pub(crate) fn no_graph_options() -> Result<RunOptions> {
    let mut options = RunOptions::new().map_err(ort_err)?;
    options.set("gpu_graph_id", "-1").map_err(ort_err)?;
    Ok(options)
}

pub(crate) fn read_logits(value: Option<DynValue>, vocab: usize) -> Result<Logits> {
    let value = value.ok_or_else(|| ModelError::Output("the graph has no `logits` output".into()))?;
    let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_err)?;
    let batch = shape.first().copied().unwrap_or(1).max(1) as usize;
    let rows = shape.get(1).copied().unwrap_or(1).max(1) as usize;
    if data.len() != batch * rows * vocab {
        return Err(ModelError::Output(format!("logits of shape {shape:?} do not match vocabulary {vocab}")));
    }
    Ok(Logits { data: data.to_vec(), batch, rows, vocab })
}

/// The last position's token of each sequence from a (batch, rows) `greedy_tokens` output.
pub(crate) fn read_greedy(value: Option<DynValue>) -> Result<Vec<u32>> {
    let value = value.ok_or_else(|| {
        ModelError::Output(format!("the graph has no `{}` output", pio_models::manifest::GREEDY_TOKENS_OUTPUT))
    })?;
    let (shape, data) = value.try_extract_tensor::<i64>().map_err(ort_err)?;
    let rows = shape.get(1).copied().unwrap_or(1).max(1) as usize;
    Ok(data.chunks(rows).filter_map(|row| row.last()).map(|&t| t as u32).collect())
}

/// Copies a whole device tensor into `dst` (its length).
pub(crate) fn copy_to_host<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug>(
    device: i32,
    src: &Tensor<T>,
    dst: &mut [T],
) -> Result<()> {
    if let Some(rt) = CudaRuntime::get() {
        // SAFETY: `src` is a device tensor of dst.len() elements.
        return Ok(unsafe { rt.device_to_host(device, dst, src.data_ptr()) }?);
    }
    let shape: Vec<usize> = src.shape().iter().map(|&d| d as usize).collect();
    let mut host = Tensor::<T>::new(&Allocator::default(), shape).map_err(ort_err)?;
    src.copy_into(&mut host).map_err(ort_err)?;
    let (_, data) = host.try_extract_tensor::<T>().map_err(ort_err)?;
    dst.copy_from_slice(data);
    Ok(())
}

/// Joins the outputs of a step's row groups (in row order) into the step's.
fn join_rows(parts: Vec<StepOutput>) -> Result<StepOutput> {
    if parts.len() == 1 {
        return parts.into_iter().next().ok_or_else(|| ModelError::Output("a step without output".into()));
    }
    if parts.iter().all(|o| matches!(o, StepOutput::Greedy(_))) {
        return Ok(StepOutput::Greedy(parts.iter().flat_map(StepOutput::greedy).collect()));
    }
    let parts = parts.into_iter().map(StepOutput::into_logits).collect::<Result<Vec<_>>>()?;
    let (rows, vocab) = (parts[0].rows, parts[0].vocab);
    if parts.iter().any(|p| p.rows != rows || p.vocab != vocab) {
        return Err(ModelError::Output("row groups of a step brought back logits of different shapes".into()));
    }
    let batch = parts.iter().map(|p| p.batch).sum();
    let data = parts.into_iter().flat_map(|p| p.data).collect();
    Ok(StepOutput::Logits(Logits { data, batch, rows, vocab }))
}

/// `rows` rows cut into `groups` contiguous groups of near-equal size.
fn row_groups(rows: usize, groups: usize) -> Vec<Range<usize>> {
    let groups = groups.clamp(1, rows.max(1));
    (0..groups).map(|g| rows * g / groups..rows * (g + 1) / groups).collect()
}

/// A stage of the manifest: its file, layers and IO (an unstaged graph is one).
struct StagePlan {
    file: String,
    layers: Range<usize>,
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

fn stage_plans(manifest: &Manifest, dir: &Path) -> Result<Vec<StagePlan>> {
    let layers = manifest.dims.num_layers;
    if manifest.stages.is_empty() {
        return Ok(vec![StagePlan {
            file: manifest.decoder.clone(),
            layers: 0..layers,
            inputs: manifest.inputs.clone(),
            outputs: manifest.outputs.clone(),
        }]);
    }
    let mut next = 0;
    for s in &manifest.stages {
        if s.layers.start != next || s.layers.end <= s.layers.start {
            return Err(ModelError::Graph(format!(
                "{}: stage {} holds layers {:?}, but the stages must cover the decoder's layers in order from {next}",
                dir.join("pio.json").display(),
                s.file,
                s.layers
            )));
        }
        next = s.layers.end;
    }
    if next != layers {
        return Err(ModelError::Graph(format!(
            "{}: the stages end at layer {next}, the decoder has {layers}",
            dir.join("pio.json").display()
        )));
    }
    Ok(manifest
        .stages
        .iter()
        .map(|s| StagePlan {
            file: s.file.clone(),
            layers: s.layers.clone(),
            inputs: s.inputs.clone(),
            outputs: s.outputs.clone(),
        })
        .collect())
}

impl DecoderModel {
    /// Loads `dir/pio.json` and creates the decoder session(s) on `ep` (every stage of a staged
    /// export on its one device).
    pub fn load(dir: &Path, ep: &ExecutionProvider) -> Result<Self> {
        Self::load_with(dir, ep, &StageOptions::default())
    }

    /// Loads `dir/pio.json` with the stages placed and overlapped as `options` say.
    pub fn load_with(dir: &Path, ep: &ExecutionProvider, options: &StageOptions) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let on_cpu = matches!(ep, ExecutionProvider::Cpu { .. });
        if matches!(manifest.precision, pio_models::Precision::Fp16 | pio_models::Precision::Bf16) && on_cpu {
            return Err(ModelError::Graph(format!(
                "{} is a {} graph built for {}; on the CPU use an fp32 export (pio-export --precision fp32 --ep cpu)",
                dir.display(),
                manifest.precision.as_str(),
                manifest.target_ep.as_str()
            )));
        }
        let plans = stage_plans(&manifest, dir)?;
        let eps = stage_eps(ep, options.devices(), plans.len())?;
        let mut stages = Vec::with_capacity(plans.len());
        for (plan, ep) in plans.iter().zip(&eps) {
            let stage =
                StageSession::load(dir, &plan.file, plan.layers.clone(), (&plan.inputs, &plan.outputs), &manifest, ep)?;
            stages.push(stage);
        }
        Self::link_stages(&mut stages, dir)?;
        Self::enable_peer_access(&stages);
        let lanes = lanes(&eps, options.pipeline());
        let micro_batches = options.micro_batches().unwrap_or(lanes.len()).max(1);
        let timings = StageTimings::new(stages.iter().map(StageSession::device).collect());
        if stages.len() > 1 {
            tracing::info!(
                "{} stages on {:?}; {} pipeline thread(s), {micro_batches} micro-batch(es) per batched decode",
                stages.len(),
                stages.iter().map(|s| s.ep.device_id()).collect::<Vec<_>>(),
                lanes.len()
            );
        }
        Ok(DecoderModel {
            ep: eps[0].clone(),
            manifest,
            dir: dir.to_path_buf(),
            stages,
            lanes,
            pipeline: options.pipeline(),
            micro_batches,
            prefill_chunk: Some(DEFAULT_PREFILL_CHUNK),
            timings,
        })
    }

    /// Checks that each stage's carried inputs come from earlier stages and that the last one
    /// gives the logits; records what each stage must hand on.
    fn link_stages(stages: &mut [StageSession], dir: &Path) -> Result<()> {
        for (i, stage) in stages.iter().enumerate() {
            for io in &stage.carried_in {
                if !stages[..i].iter().any(|s| s.carried_out.iter().any(|o| o.name == io.name)) {
                    return Err(ModelError::Graph(format!(
                        "{}: the stage over layers {:?} takes `{}`, which no earlier stage outputs",
                        dir.display(),
                        stage.layers,
                        io.name
                    )));
                }
            }
        }
        for i in 0..stages.len() {
            let later: Vec<String> =
                stages[i + 1..].iter().flat_map(|s| s.carried_in.iter().map(|io| io.name.clone())).collect();
            stages[i].keep_after = later;
        }
        Ok(())
    }

    /// Lets every pair of the stages' GPUs copy to each other directly, where they can.
    fn enable_peer_access(stages: &[StageSession]) {
        let mut devices: Vec<i32> = stages.iter().filter_map(StageSession::device).collect();
        devices.dedup();
        if devices.len() < 2 {
            return;
        }
        let Some(rt) = CudaRuntime::get() else {
            tracing::warn!("the CUDA runtime is not loaded: hidden states cannot be copied between GPUs");
            return;
        };
        for &a in &devices {
            for &b in devices.iter().filter(|&&b| b != a) {
                match rt.enable_peer_access(a, b) {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(
                        "GPU {a} cannot access GPU {b} directly: hidden states between them are staged by the driver"
                    ),
                    Err(e) => tracing::warn!("peer access from GPU {a} to GPU {b}: {e:#}"),
                }
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.manifest.dims.vocab_size
    }

    pub fn context_length(&self) -> usize {
        self.manifest.dims.context_length
    }

    /// Longest piece [`step`](Self::step) runs a prompt in (None: whole prompts).
    pub fn prefill_chunk(&self) -> Option<usize> {
        self.prefill_chunk
    }

    /// Sets the longest piece [`step`](Self::step) runs a prompt in (None or 0: whole prompts).
    pub fn set_prefill_chunk(&mut self, chunk: Option<usize>) {
        self.prefill_chunk = chunk.filter(|&c| c > 0);
    }

    /// The CUDA device the (first) session runs on (None on the CPU).
    pub fn device_id(&self) -> Option<i32> {
        self.stages[0].device()
    }

    /// Stages of the graph (1 for an unstaged export).
    pub fn stage_count(&self) -> usize {
        self.stages.len()
    }

    /// Each stage's decoder layers.
    pub fn stage_layers(&self) -> Vec<Range<usize>> {
        self.stages.iter().map(|s| s.layers.clone()).collect()
    }

    /// Each stage's CUDA device (None: the CPU).
    pub fn stage_devices(&self) -> Vec<Option<i32>> {
        self.stages.iter().map(StageSession::device).collect()
    }

    /// The execution provider each stage runs on.
    pub fn stage_eps(&self) -> Vec<ExecutionProvider> {
        self.stages.iter().map(|s| s.ep.clone()).collect()
    }

    /// How the stages overlap, and the pipeline's threads.
    pub fn pipeline(&self) -> (PipelineMode, usize) {
        (self.pipeline, self.lanes.len())
    }

    /// Changes how the stages overlap (for `pio bench`: the same steps with and without overlap).
    pub fn set_pipeline(&mut self, mode: PipelineMode) {
        let eps = self.stage_eps();
        self.lanes = lanes(&eps, mode);
        self.pipeline = mode;
    }

    /// Row groups a batched decode step is cut into when the pipeline has several threads.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    pub fn set_micro_batches(&mut self, n: usize) {
        self.micro_batches = n.max(1);
    }

    /// Where the stages' time went since the last [`reset_stage_timings`](Self::reset_stage_timings).
    pub fn stage_timings(&self) -> &StageTimings {
        &self.timings
    }

    pub fn reset_stage_timings(&mut self) {
        self.timings = StageTimings::new(self.stage_devices());
    }

    /// Whether this graph's cache is GroupQueryAttention's fixed-capacity shared buffer (else it
    /// grows step by step: `--no-fused-attention` exports).
    pub fn has_shared_buffer(&self) -> bool {
        self.manifest.options.fused_attention
    }

    /// Bytes of the keys and values of one token, all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        let d = &self.manifest.dims;
        2 * d.num_layers * d.num_kv_heads * d.head_dim * self.manifest.kv_cache.dtype.size_bytes()
    }

    /// An empty cache for one sequence (see [`DecoderModel::new_batch_cache`]).
    pub fn new_cache(&self) -> Result<KvCache> {
        self.new_batch_cache(1, self.context_length())
    }

    /// An empty cache for `batch` sequences. For a GroupQueryAttention graph on a GPU it holds
    /// `capacity` tokens per sequence (at most the context length), allocated once on the
    /// devices; otherwise it grows with each step.
    pub fn new_batch_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        // GroupQueryAttention graphs take the shared buffer (graphs exported before the
        // manifest said so have `shared_buffer` false, hence the attention switch here).
        if self.device_id().is_some() && self.has_shared_buffer() {
            return self.shared_cache(false, batch, capacity);
        }
        self.growing_cache(batch)
    }

    /// GroupQueryAttention's fixed-capacity shared buffer wherever the sessions run: on the
    /// devices of GPU sessions, in host memory on the CPU (where GroupQueryAttention updates it
    /// in place too; [`new_batch_cache`](Self::new_batch_cache) gives the CPU a growing cache).
    pub fn new_shared_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        self.require_shared_buffer()?;
        self.shared_cache(false, batch, capacity)
    }

    /// GroupQueryAttention's fixed-capacity shared-buffer cache in host memory: what a GPU
    /// session uses, on the CPU (whose default is the growing cache), for tests of that path.
    pub fn new_shared_host_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        self.require_shared_buffer()?;
        self.shared_cache(true, batch, capacity)
    }

    fn require_shared_buffer(&self) -> Result<()> {
        if !self.has_shared_buffer() {
            return Err(ModelError::Graph(format!(
                "{} has no GroupQueryAttention (exported with --no-fused-attention): its cache grows",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// An uninitialized buffer of `bytes` where the model's KV cache lives (see [`KvBuffer`]):
    /// a part per stage, on its device.
    pub fn new_kv_buffer(&self, bytes: usize) -> Result<KvBuffer> {
        let host = Allocator::default();
        let stages: Vec<(Range<usize>, &Allocator)> =
            self.stages.iter().map(|s| (s.layers.clone(), s.allocator().unwrap_or(&host))).collect();
        KvBuffer::allocate(bytes, self.manifest.dims.num_layers, &stages)
    }

    /// The shared buffer of every layer on its stage's device (`host`: all in host memory).
    fn shared_cache(&self, host: bool, batch: usize, capacity: usize) -> Result<KvCache> {
        let d = &self.manifest.dims;
        let dtype = self.manifest.kv_cache.dtype;
        let capacity = capacity.min(self.context_length());
        let shape = [batch, d.num_kv_heads, capacity, d.head_dim];
        let host_alloc = Allocator::default();
        let (mut keys, mut values, mut layers, mut memories, mut devices) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for stage in &self.stages {
            let (alloc, device) = match (host, stage.allocator()) {
                (false, Some(alloc)) => (alloc, stage.device()),
                _ => (&host_alloc, None),
            };
            let memory = cache_memory(device)?;
            for _ in stage.layers.clone() {
                let (k, k_addr) = device_tensor(alloc, dtype, &shape)?;
                let (v, v_addr) = device_tensor(alloc, dtype, &shape)?;
                keys.push(k);
                values.push(v);
                layers.push((k_addr, v_addr));
                memories.push(memory.clone());
                devices.push(device);
            }
        }
        let layout = SharedLayout {
            layers,
            rows: batch,
            kv_heads: d.num_kv_heads,
            capacity,
            head_dim: d.head_dim,
            element_bytes: dtype.size_bytes(),
            devices,
        };
        Ok(KvCache { store: KvStore::Device { _keys: keys, _values: values, layout, memories }, batch, len: 0 })
    }

    fn growing_cache(&self, batch: usize) -> Result<KvCache> {
        let d = &self.manifest.dims;
        let dtype = self.manifest.kv_cache.dtype;
        // A zero-length past; ONNX Runtime moves it to the device if the session runs there.
        let shape = vec![batch as i64, d.num_kv_heads as i64, 0, d.head_dim as i64];
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for _ in 0..d.num_layers {
            keys.push(empty_host_tensor(dtype, shape.clone())?);
            values.push(empty_host_tensor(dtype, shape.clone())?);
        }
        Ok(KvCache { store: KvStore::Growing { keys, values }, batch, len: 0 })
    }

    /// Runs `tokens` (batch 1) after what `cache` holds, at positions cache.len.., and moves
    /// the cache forward. Returns logits of the last position (or all new positions when the
    /// graph was exported with all logits).
    pub fn forward(&mut self, tokens: &[u32], cache: &mut KvCache) -> Result<Logits> {
        self.forward_batch(tokens, 1, cache)
    }

    /// `batch` sequences of equal length, `tokens` row-major (batch, s), all after `cache.len`.
    pub fn forward_batch(&mut self, tokens: &[u32], batch: usize, cache: &mut KvCache) -> Result<Logits> {
        self.step(tokens, batch, cache, Fetch::Logits)?.into_logits()
    }

    /// Like [`forward_batch`](Self::forward_batch), returning each sequence's greedy next token.
    pub fn greedy_batch(&mut self, tokens: &[u32], batch: usize, cache: &mut KvCache) -> Result<Vec<u32>> {
        Ok(self.step(tokens, batch, cache, Fetch::Greedy)?.greedy())
    }

    /// One forward pass of `batch` sequences over `tokens` (row-major (batch, s)); prompts longer
    /// than [`prefill_chunk`](Self::prefill_chunk) run as consecutive chunks through the cache.
    ///
    /// GroupQueryAttention takes several new tokens of several sequences only into an empty
    /// cache ("batch_size must be 1 when sequence_length > 1 and past context is given"), so a
    /// batch whose step has a past (a later chunk, or a step of several tokens after a prefill)
    /// runs one sequence at a time through batch-1 views of the shared buffer.
    ///
    /// The chunks (and sequences) are micro-steps: on a staged model over several devices a
    /// chunk enters the first stage while the one before it runs in the next.
    pub fn step(&mut self, tokens: &[u32], batch: usize, cache: &mut KvCache, fetch: Fetch) -> Result<StepOutput> {
        let whole = StepInputs::uniform(tokens.to_vec(), batch, cache.len)?;
        self.check_rows(&whole, cache, 0)?;
        let s = whole.seq_len();
        let chunked = self.prefill_chunk.is_some_and(|c| s > c);
        let gqa_needs_one_sequence = batch > 1 && s > 1 && self.has_shared_buffer() && (cache.len > 0 || chunked);
        let start = cache.len;
        if gqa_needs_one_sequence && !cache.is_shared_buffer() {
            if cache.len > 0 {
                return Err(ModelError::Step(format!(
                    "GroupQueryAttention takes {s} new tokens for each of {batch} sequences only into an empty cache; \
                     step the sequences one token at a time, or one sequence at a time"
                )));
            }
            // A growing (host) cache has no per-sequence views: the prompt runs whole.
            let out = self.run_steps(vec![MicroStep { inputs: whole, first: 0, fetch }], cache, false)?;
            cache.len = start + s;
            return join_rows(out);
        }
        // Groups of rows run together: every sequence at once, or one at a time.
        let groups: Vec<(usize, usize)> =
            if gqa_needs_one_sequence { (0..batch).map(|b| (b, 1)).collect() } else { vec![(0, batch)] };
        let all_rows = !self.manifest.options.last_token_logits && fetch == Fetch::Logits;
        let chunk = self.prefill_chunk.filter(|&c| s > c).unwrap_or(s);
        let pieces: Vec<Range<usize>> = (0..s).step_by(chunk).map(|a| a..(a + chunk).min(s)).collect();
        let mut steps = Vec::with_capacity(groups.len() * pieces.len());
        for &(first, rows) in &groups {
            for piece in &pieces {
                let part: Vec<u32> = (first..first + rows)
                    .flat_map(|b| tokens[b * s + piece.start..b * s + piece.end].iter().copied())
                    .collect();
                // Only the last chunk's output is the answer, unless every row was asked for.
                let want = if piece.end == s || all_rows { fetch } else { Fetch::Greedy };
                steps.push(MicroStep {
                    inputs: StepInputs::uniform(part, rows, start + piece.start)?,
                    first,
                    fetch: want,
                });
            }
        }
        let mut outputs = self.run_steps(steps, cache, false)?.into_iter();
        cache.len = start + s;
        let mut per_group = Vec::with_capacity(groups.len());
        for &(_, rows) in &groups {
            let group: Vec<StepOutput> = outputs.by_ref().take(pieces.len()).collect();
            per_group.push(self.join_chunks(group, rows, s, all_rows)?);
        }
        join_rows(per_group)
    }

    /// A group's output from its chunks' (in order): the last chunk's, or every chunk's rows
    /// side by side per sequence when all rows were asked for.
    fn join_chunks(&self, mut chunks: Vec<StepOutput>, rows: usize, s: usize, all_rows: bool) -> Result<StepOutput> {
        if !all_rows || chunks.len() == 1 {
            return chunks.pop().ok_or_else(|| ModelError::Output(format!("a prefill of {s} tokens ran no chunk")));
        }
        let chunks = chunks.into_iter().map(StepOutput::into_logits).collect::<Result<Vec<_>>>()?;
        let vocab = self.vocab_size();
        let mut data = Vec::with_capacity(rows * s * vocab);
        for b in 0..rows {
            for p in &chunks {
                data.extend_from_slice(&p.data[b * p.rows * vocab..(b + 1) * p.rows * vocab]);
            }
        }
        Ok(StepOutput::Logits(Logits { data, batch: rows, rows: s, vocab }))
    }

    /// Runs `steps` through the stages (CUDA-graph replays with `graph`), cutting batched
    /// decode steps into row groups when the pipeline has several threads; each step's output.
    fn run_steps(&mut self, steps: Vec<MicroStep>, cache: &mut KvCache, graph: bool) -> Result<Vec<StepOutput>> {
        let split = self.micro_batches > 1 && cache.is_shared_buffer();
        let mut micro = Vec::with_capacity(steps.len());
        let mut counts = Vec::with_capacity(steps.len());
        for step in steps {
            let rows = step.inputs.rows();
            let separable = step.inputs.images().is_none()
                && (step.inputs.seq_len() == 1 || step.inputs.past_lens().iter().all(|&p| p == 0));
            if !split || rows < 2 || !separable {
                counts.push(1);
                micro.push(step);
                continue;
            }
            let groups = row_groups(rows, self.micro_batches);
            counts.push(groups.len());
            for g in groups {
                let inputs = step.inputs.select_rows(g.clone())?;
                micro.push(MicroStep { inputs, first: step.first + g.start, fetch: step.fetch });
            }
        }
        let views = cache.stage_views(&self.stage_layers());
        let outputs = execute(&mut self.stages, &self.lanes, views, &micro, graph, &mut self.timings)?;
        let mut outputs = outputs.into_iter();
        counts.into_iter().map(|n| join_rows(outputs.by_ref().take(n).collect())).collect()
    }

    /// Checks a step over rows `first..first + inputs.rows()` of `cache`.
    fn check_rows(&self, inputs: &StepInputs, cache: &KvCache, first: usize) -> Result<()> {
        let rows = inputs.rows();
        match cache.shared_layout() {
            Some(layout) if first + rows > layout.rows => {
                return Err(ModelError::Step(format!(
                    "rows {first}..{} of a cache of {} sequences",
                    first + rows,
                    layout.rows
                )))
            }
            None if first != 0 || rows != cache.batch => {
                return Err(ModelError::Step(format!(
                    "the cache holds {} sequences, the step has {rows} (from row {first})",
                    cache.batch
                )))
            }
            None if inputs.past_lens().iter().any(|&p| p != cache.len) => {
                return Err(ModelError::Step(format!(
                    "a growing cache holds {} tokens for every sequence; the step says {:?}",
                    cache.len,
                    inputs.past_lens()
                )))
            }
            _ => {}
        }
        let total = inputs.total_len();
        let limit = cache.capacity().unwrap_or(usize::MAX).min(self.context_length());
        if total > limit {
            return Err(ModelError::Step(format!(
                "sequence of {total} tokens exceeds the context length {limit} (graph context {}; export with a larger --context-length)",
                self.context_length()
            )));
        }
        let vocab = self.vocab_size();
        if let Some(&bad) = inputs.tokens().iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Step(format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        let multimodal = self.manifest.position_axes() == 3;
        if !multimodal && !inputs.has_plain_positions() {
            return Err(ModelError::Step(format!(
                "{} has a one-axis rotary: its steps take no rope deltas or (t, h, w) positions",
                self.dir.display()
            )));
        }
        if let Some(images) = inputs.images() {
            let Some(vision) = self.manifest.vision.as_ref().filter(|_| self.takes_images()) else {
                return Err(ModelError::Step(format!(
                    "{} takes no image rows (it is not a vision-language decoder)",
                    self.dir.display()
                )));
            };
            let pads = inputs.tokens().iter().filter(|&&t| t == vision.image_token_id).count();
            if pads != images.tokens() {
                return Err(ModelError::Step(format!(
                    "the step has {pads} image tokens but {} image rows",
                    images.tokens()
                )));
            }
        }
        // The fused attention's rotary table is indexed by cache slot (see the export's rotary.rs).
        if multimodal && self.has_shared_buffer() {
            if let Some((a, b, slot)) = inputs.slot_conflict() {
                return Err(ModelError::Step(format!(
                    "rows {a} and {b} of the step put different (t, h, w) positions at cache slot {slot}; \
                     the rotary table holds one per slot: run them in separate steps"
                )));
            }
        }
        Ok(())
    }

    /// One session run of `inputs` (no chunking) over rows `first..first + inputs.rows()` of
    /// `cache`, each row writing its new tokens after its own past.
    ///
    /// A shared buffer is bound through a view of those rows (rows are its outermost axis, so
    /// the view is a pointer and a shape; no copy), past and present at once; its `len` is left
    /// alone (each row has a length of its own). A growing cache runs whole at its one length
    /// and grows by the step's tokens (`len` follows).
    ///
    /// GroupQueryAttention takes several new tokens per row after a past only for one row; a
    /// decode step (one token per row) takes any rows.
    pub fn run_rows(
        &mut self,
        inputs: &StepInputs,
        cache: &mut KvCache,
        first: usize,
        fetch: Fetch,
    ) -> Result<StepOutput> {
        self.check_rows(inputs, cache, first)?;
        let out = self.run_steps(vec![MicroStep { inputs: inputs.clone(), first, fetch }], cache, false)?;
        if !cache.is_shared_buffer() {
            cache.len += inputs.seq_len();
        }
        join_rows(out)
    }

    /// Whether the decoder takes image rows (`image_embeds`): a vision-language decoder.
    pub fn takes_images(&self) -> bool {
        self.manifest.inputs.iter().any(|io| io.name == IMAGE_EMBEDS_INPUT)
    }

    /// An uninitialized tensor of `dtype` (a float or KV dtype) where the image rows are read
    /// (the device of the stage taking them, else host memory), and its data address: a step's
    /// image rows.
    pub fn new_tensor(&self, dtype: TensorDtype, shape: &[usize]) -> Result<(DynValue, usize)> {
        let stage = self.stages.iter().find(|s| s.takes_images()).unwrap_or(&self.stages[0]);
        match stage.allocator() {
            Some(alloc) => device_tensor(alloc, dtype, shape),
            None => device_tensor(&Allocator::default(), dtype, shape),
        }
    }

    /// The execution provider of the stage that takes image rows (a vision encoder's place).
    pub fn image_ep(&self) -> &ExecutionProvider {
        &self.stages.iter().find(|s| s.takes_images()).unwrap_or(&self.stages[0]).ep
    }

    /// Whether decode steps can replay captured CUDA graphs: every stage on the CUDA execution
    /// provider with `cuda_graph` on, GroupQueryAttention's shared buffer, and, with several
    /// stages, the CUDA runtime to hand hidden states between their fixed buffers.
    pub fn can_replay_graphs(&self) -> bool {
        self.stages
            .iter()
            .all(|s| matches!(s.ep, ExecutionProvider::Cuda(_)) && s.ep.cuda_graph() && s.device().is_some())
            && self.has_shared_buffer()
            && (self.stages.len() == 1 || CudaRuntime::get().is_some())
    }

    /// One decode step (one token per sequence, all at `cache.len`) replayed from a captured
    /// CUDA graph; see [`run_rows_graph`](Self::run_rows_graph).
    pub fn decode_step_graph(&mut self, tokens: &[u32], cache: &mut KvCache, fetch: Fetch) -> Result<StepOutput> {
        if tokens.len() != cache.batch {
            return Err(ModelError::Step(format!(
                "a decode step takes one token per sequence ({}), got {}",
                cache.batch,
                tokens.len()
            )));
        }
        let past = cache.len;
        let inputs = StepInputs::uniform(tokens.to_vec(), cache.batch, past)?;
        let out = self.run_rows_graph(&inputs, cache, fetch)?;
        cache.len = past + 1;
        Ok(out)
    }

    /// One decode step (one token per row, each after its own past) over rows 0..inputs.rows()
    /// of a shared-buffer cache, replayed from captured CUDA graphs (one per stage and
    /// micro-batch). Needs [`can_replay_graphs`](Self::can_replay_graphs); every input and
    /// output lives at a fixed device address (the attention mask spans the whole capacity),
    /// so ONNX Runtime captures the step once per cache and rows and replays it. Leaves
    /// `cache.len` alone.
    pub fn run_rows_graph(&mut self, inputs: &StepInputs, cache: &mut KvCache, fetch: Fetch) -> Result<StepOutput> {
        if inputs.seq_len() != 1 {
            return Err(ModelError::Step(format!(
                "a CUDA-graph step decodes one token per sequence, got {}",
                inputs.seq_len()
            )));
        }
        if inputs.images().is_some() {
            return Err(ModelError::Step("a CUDA-graph decode step takes no image rows".into()));
        }
        self.check_rows(inputs, cache, 0)?;
        if !self.can_replay_graphs() {
            return Err(ModelError::Graph(
                "CUDA-graph decode needs the CUDA execution provider with cuda_graph=1 on every stage".into(),
            ));
        }
        if !cache.is_shared_buffer() {
            return Err(ModelError::Graph(format!(
                "CUDA-graph decode needs GroupQueryAttention's fixed-size cache; {} was exported without fused attention",
                self.dir.display()
            )));
        }
        let out = self.run_steps(vec![MicroStep { inputs: inputs.clone(), first: 0, fetch }], cache, true)?;
        join_rows(out)
    }
}
