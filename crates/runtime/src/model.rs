//! A loaded graph folder: the manifest, one ONNX Runtime session over the decoder, and the
//! forward step through the KV cache.
//!
//! Two cache layouts, chosen by the graph and where the session runs:
//! - growing: each step's `present.*` outputs become the next step's `past_key_values.*` (the
//!   attention concatenates, so the past grows by the new tokens). The outputs stay where the
//!   session made them: host memory on the CPU, device memory on a GPU. CPU graphs and graphs
//!   exported without fused attention use it;
//! - shared (CUDA, TensorRT with GroupQueryAttention): one fixed (batch, kv_heads, capacity,
//!   head_dim) buffer per layer and direction, bound through I/O binding as both past and
//!   present, which GroupQueryAttention updates in place (its shared-buffer mode, the one its
//!   fast decode kernels need).
//!
//! Either way the cache never leaves the GPU; a step brings back the logits, or with
//! [`Fetch::Greedy`] only each sequence's argmax token (the graph's `greedy_tokens` output),
//! which is what keeps large-batch greedy decode off the host. Long prompts are run in chunks
//! of [`DecoderModel::prefill_chunk`] tokens, which bounds the activation memory of a prefill.
//!
//! The rows of a shared buffer can also run with lengths of their own ([`DecoderModel::run_rows`]:
//! each row's mask row and positions say where its new tokens go), which is what the serving
//! engine's slots are (`crate::engine`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, Tensor};
use pio_models::manifest::{KvCacheSpec, Manifest, TensorDtype, GREEDY_TOKENS_OUTPUT};

use crate::cuda_rt::CudaRuntime;
use crate::ep::ExecutionProvider;
use crate::step_inputs::StepInputs;

enum KvStore {
    /// Each layer's last `present` (dynamic length), on the host or the device.
    Growing { keys: Vec<DynValue>, values: Vec<DynValue> },
    /// Fixed-capacity buffers, past and present at once (GroupQueryAttention's shared buffer),
    /// with each buffer's data address for views of some of its sequences.
    Device {
        // Owned here; bound through views at `addrs`.
        _keys: Vec<DynValue>,
        _values: Vec<DynValue>,
        layout: SharedLayout,
        memory: MemoryInfo<'static>,
    },
}

/// Where a shared buffer's rows live: per layer a key and a value buffer of (rows, kv_heads,
/// capacity, head_dim) elements. Row r, head h, position p is element ((r * kv_heads + h) *
/// capacity + p) * head_dim, so one row's positions of one head are contiguous, and a range of
/// positions of one row is `kv_heads` runs `capacity * head_dim` elements apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedLayout {
    /// Each layer's key and value buffer data addresses.
    pub layers: Vec<(usize, usize)>,
    pub rows: usize,
    pub kv_heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
    pub element_bytes: usize,
    /// None: host memory; Some(id): memory of that CUDA device.
    pub device: Option<i32>,
}

impl SharedLayout {
    /// Bytes of one position of one head.
    pub fn position_bytes(&self) -> usize {
        self.head_dim * self.element_bytes
    }

    /// Bytes between one head's runs (and between the heads of consecutive rows).
    pub fn head_pitch(&self) -> usize {
        self.capacity * self.position_bytes()
    }

    /// Address of `row`'s head 0 at `position` in a buffer at `base`.
    pub fn address(&self, base: usize, row: usize, position: usize) -> usize {
        base + (row * self.kv_heads * self.capacity + position) * self.position_bytes()
    }

    /// Bytes of the keys and values of one position, all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.kv_heads * self.position_bytes()
    }
}

/// The KV cache of `batch` sequences of equal length.
pub struct KvCache {
    store: KvStore,
    pub batch: usize,
    /// Tokens each sequence holds.
    pub len: usize,
}

impl KvCache {
    /// How many tokens the cache can hold (None: grows as needed).
    pub fn capacity(&self) -> Option<usize> {
        self.shared_layout().map(|l| l.capacity)
    }
    /// Whether the cache is GroupQueryAttention's fixed-capacity shared buffer.
    pub fn is_shared_buffer(&self) -> bool {
        matches!(self.store, KvStore::Device { .. })
    }

    /// Where a shared buffer's rows live (None for a growing cache).
    pub fn shared_layout(&self) -> Option<&SharedLayout> {
        match &self.store {
            KvStore::Growing { .. } => None,
            KvStore::Device { layout, .. } => Some(layout),
        }
    }

    /// Keeps the first `len` tokens of each sequence: the next step writes from there. Only a
    /// shared buffer can drop tokens (the attention mask hides what lies beyond `len`); a
    /// growing cache's tensors are exactly as long as what they hold.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            bail!("cannot truncate a cache of {} tokens to {len}", self.len);
        }
        if len < self.len && !self.is_shared_buffer() {
            bail!("a growing cache cannot drop tokens (only GroupQueryAttention's shared buffer can)");
        }
        self.len = len;
        Ok(())
    }
}

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
            StepOutput::Greedy(_) => bail!("this step fetched greedy tokens, not logits"),
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

/// Inputs and outputs of a CUDA-graph decode step, kept at fixed device addresses between steps.
/// A captured graph also holds the addresses of the cache rows it ran on, so each cache and each
/// number of rows gets its own capture (`graph_id`); [`KvCache::truncate`] lets one cache serve
/// many generations, and the engine's slots one capture per padded batch size.
struct GraphDecodeState {
    /// Every layer's key and value buffer, the rows and the capacity: the cache the graph was
    /// captured on. (A new cache at exactly these addresses is the same memory, so the capture
    /// serves it too.)
    cache: (Vec<(usize, usize)>, usize, usize),
    graph_id: usize,
    input_ids: Tensor<i64>,
    position_ids: Tensor<i64>,
    attention_mask: Tensor<i64>,
    logits: Tensor<f32>,
    greedy: Option<Tensor<i64>>,
}

pub struct DecoderModel {
    pub manifest: Manifest,
    pub dir: PathBuf,
    session: Session,
    pub ep: ExecutionProvider,
    device_allocator: Option<Allocator>,
    /// One captured decode step per cache (and number of rows) it ran on (ONNX Runtime keeps
    /// every capture).
    graph_states: Vec<GraphDecodeState>,
    /// Longest piece [`DecoderModel::step`] runs a prompt in (None: the whole prompt in one pass).
    prefill_chunk: Option<usize>,
}

/// An ONNX Runtime error, kept as the source of an anyhow chain.
fn ort_err(e: ort::Error) -> anyhow::Error {
    anyhow::Error::new(e)
}

/// A session builder's error without the builder it carries back (which is not `Send`): the
/// same ONNX Runtime code and message.
fn builder_err(e: ort::Error<ort::session::builder::SessionBuilder>) -> anyhow::Error {
    ort_err(ort::Error::new_with_code(e.code(), e.message()))
}

/// `$body` with `$t` standing for the Rust element type of a KV cache dtype.
macro_rules! with_kv_element {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            TensorDtype::Float32 => {
                type $t = f32;
                $body
            }
            TensorDtype::Float16 => {
                type $t = f16;
                $body
            }
            TensorDtype::Bfloat16 => {
                type $t = bf16;
                $body
            }
            TensorDtype::Int8 => {
                type $t = i8;
                $body
            }
            other => bail!("no KV cache tensors of {other:?}"),
        }
    };
}

/// An uninitialized tensor of the graph's KV dtype from `alloc`, and its data address.
fn device_tensor(alloc: &Allocator, dtype: TensorDtype, shape: &[usize]) -> Result<(DynValue, usize)> {
    Ok(with_kv_element!(dtype, T => {
        let mut t = Tensor::<T>::new(alloc, shape.to_vec()).map_err(ort_err)?;
        let addr = t.data_ptr_mut() as usize;
        (t.into_dyn(), addr)
    }))
}

/// Binds `value` as input `name` without a copy. (`IoBinding::bind_input` copies any tensor it
/// does not own, such as a view, since the binding could outlive it; the caller keeps `value`
/// alive until the run is over.)
pub fn bind_input_in_place(
    binding: &mut ort::session::IoBinding,
    name: &str,
    value: &ort::value::DynValueRefMut<'_>,
) -> Result<()> {
    use ort::AsPointer;
    let c_name = std::ffi::CString::new(name).map_err(|_| anyhow!("input name {name:?} has a NUL byte"))?;
    let api = ort::api();
    // SAFETY: both pointers are live ONNX Runtime objects; ONNX Runtime copies the name.
    let status = unsafe { (api.BindInput)(binding.ptr_mut(), c_name.as_ptr(), value.ptr()) };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status holds a message and must be released once.
    let message = unsafe {
        let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0)).to_string_lossy().into_owned();
        (api.ReleaseStatus)(status.0);
        text
    };
    bail!("cannot bind the cache view {name}: {message}")
}

/// A (rows, kv_heads, capacity, head_dim) view of rows `first..first + rows` of the shared buffer
/// at `base` (rows are the outermost axis, so consecutive rows are one contiguous block).
///
/// # Safety
/// `base` must be the data of a live (>= first + rows, kv_heads, capacity, head_dim) tensor of
/// `dtype` in `memory`, which must outlive the view.
unsafe fn rows_view<'a>(
    memory: &MemoryInfo<'static>,
    dtype: TensorDtype,
    layout: &SharedLayout,
    base: usize,
    first: usize,
    rows: usize,
) -> Result<ort::value::DynValueRefMut<'a>> {
    let ptr = layout.address(base, first, 0) as *mut std::ffi::c_void;
    let shape =
        ort::value::Shape::new([rows as i64, layout.kv_heads as i64, layout.capacity as i64, layout.head_dim as i64]);
    Ok(
        with_kv_element!(dtype, T => ort::value::TensorRefMut::<T>::from_raw(memory.clone(), ptr, shape).map_err(ort_err)?.into_dyn()),
    )
}

/// An empty host tensor (zero-length past) of the graph's KV dtype.
fn empty_host_tensor(dtype: TensorDtype, shape: Vec<i64>) -> Result<DynValue> {
    Ok(with_kv_element!(dtype, T => Tensor::from_array((shape, Vec::<T>::new())).map_err(ort_err)?.into_dyn()))
}

/// An uninitialized byte buffer where the session keeps its KV cache (device memory on a GPU,
/// host memory on the CPU): the engine's prefix cache stores KV there.
pub struct KvBuffer {
    _value: Tensor<u8>,
    addr: usize,
    bytes: usize,
}

impl KvBuffer {
    pub fn addr(&self) -> usize {
        self.addr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl DecoderModel {
    /// Loads `dir/pio.json` and creates the decoder session on `ep`.
    pub fn load(dir: &Path, ep: &ExecutionProvider) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let on_cpu = matches!(ep, ExecutionProvider::Cpu { .. });
        if matches!(manifest.precision, pio_models::Precision::Fp16 | pio_models::Precision::Bf16) && on_cpu {
            bail!(
                "{} is a {} graph built for {}; on the CPU use an fp32 export (pio-export --precision fp32 --ep cpu)",
                dir.display(),
                manifest.precision.as_str(),
                manifest.target_ep.as_str()
            );
        }
        let model_path = dir.join(&manifest.decoder);
        if !model_path.is_file() {
            bail!("{} is missing (listed as the decoder in {})", model_path.display(), dir.join("pio.json").display());
        }
        let env = crate::ort_lib::environment()?;
        let builder = Session::builder(env).map_err(ort_err)?;
        let mut builder = ep.configure(builder)?;
        if !manifest.options.pio_kernels.is_empty() {
            // The graph uses Inference-PIO's own operators (pio-export --pio-kernels): CUDA kernels
            // compiled now for this GPU, or their CPU references.
            let domain = pio_kernels::ops::operator_domain().map_err(ort_err)?;
            builder = builder.with_operators(domain).map_err(builder_err)?;
        }
        let session = builder
            .commit_from_file(&model_path)
            .map_err(ort_err)
            .with_context(|| format!("cannot load {}", model_path.display()))?;
        let device_allocator = match ep.device_id() {
            Some(id) => Some(
                Allocator::new(
                    &session,
                    MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)
                        .map_err(ort_err)?,
                )
                .map_err(ort_err)
                .with_context(|| format!("cannot allocate on CUDA device {id}"))?,
            ),
            None => None,
        };
        Ok(DecoderModel {
            manifest,
            dir: dir.to_path_buf(),
            session,
            ep: ep.clone(),
            device_allocator,
            graph_states: Vec::new(),
            prefill_chunk: Some(DEFAULT_PREFILL_CHUNK),
        })
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

    /// The CUDA device the session runs on (None on the CPU).
    pub fn device_id(&self) -> Option<i32> {
        self.device_allocator.as_ref().and(self.ep.device_id())
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
    /// device; otherwise it grows with each step.
    pub fn new_batch_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        match &self.device_allocator {
            // GroupQueryAttention graphs take the shared buffer (graphs exported before the
            // manifest said so have `shared_buffer` false, hence the attention switch here).
            Some(alloc) if self.has_shared_buffer() => {
                let memory = Self::cache_memory(self.ep.device_id())?;
                self.shared_cache(alloc, memory, self.ep.device_id(), batch, capacity)
            }
            _ => self.growing_cache(batch),
        }
    }

    /// GroupQueryAttention's fixed-capacity shared buffer wherever the session runs: on the
    /// device of a GPU session, in host memory on the CPU (where GroupQueryAttention updates it
    /// in place too; [`new_batch_cache`](Self::new_batch_cache) gives the CPU a growing cache).
    pub fn new_shared_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        if !self.has_shared_buffer() {
            bail!(
                "{} has no GroupQueryAttention (exported with --no-fused-attention): its cache grows",
                self.dir.display()
            );
        }
        match &self.device_allocator {
            Some(alloc) => {
                self.shared_cache(alloc, Self::cache_memory(self.ep.device_id())?, self.ep.device_id(), batch, capacity)
            }
            None => self.new_shared_host_cache(batch, capacity),
        }
    }

    /// GroupQueryAttention's fixed-capacity shared-buffer cache in host memory: what a GPU
    /// session uses, on the CPU (whose default is the growing cache), for tests of that path.
    pub fn new_shared_host_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        if !self.has_shared_buffer() {
            bail!(
                "{} has no GroupQueryAttention (exported with --no-fused-attention): its cache grows",
                self.dir.display()
            );
        }
        self.shared_cache(&Allocator::default(), MemoryInfo::default(), None, batch, capacity)
    }

    /// An uninitialized buffer of `bytes` where the session's KV cache lives (see [`KvBuffer`]).
    pub fn new_kv_buffer(&self, bytes: usize) -> Result<KvBuffer> {
        let alloc_default;
        let alloc = match &self.device_allocator {
            Some(a) => a,
            None => {
                alloc_default = Allocator::default();
                &alloc_default
            }
        };
        let mut value = Tensor::<u8>::new(alloc, [bytes.max(1)])
            .map_err(ort_err)
            .with_context(|| format!("cannot allocate {bytes} bytes for the KV cache"))?;
        let addr = value.data_ptr_mut() as usize;
        Ok(KvBuffer { _value: value, addr, bytes })
    }

    fn shared_cache(
        &self,
        alloc: &Allocator,
        memory: MemoryInfo<'static>,
        device: Option<i32>,
        batch: usize,
        capacity: usize,
    ) -> Result<KvCache> {
        let d = &self.manifest.dims;
        let dtype = self.manifest.kv_cache.dtype;
        let capacity = capacity.min(self.context_length());
        let shape = [batch, d.num_kv_heads, capacity, d.head_dim];
        let (mut keys, mut values, mut layers) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..d.num_layers {
            let (k, k_addr) = device_tensor(alloc, dtype, &shape)?;
            let (v, v_addr) = device_tensor(alloc, dtype, &shape)?;
            keys.push(k);
            values.push(v);
            layers.push((k_addr, v_addr));
        }
        let layout = SharedLayout {
            layers,
            rows: batch,
            kv_heads: d.num_kv_heads,
            capacity,
            head_dim: d.head_dim,
            element_bytes: dtype.size_bytes(),
            device,
        };
        Ok(KvCache { store: KvStore::Device { _keys: keys, _values: values, layout, memory }, batch, len: 0 })
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
    pub fn step(&mut self, tokens: &[u32], batch: usize, cache: &mut KvCache, fetch: Fetch) -> Result<StepOutput> {
        let whole = StepInputs::uniform(tokens.to_vec(), batch, cache.len)?;
        self.check_rows(&whole, cache, 0)?;
        let s = whole.seq_len();
        let chunked = self.prefill_chunk.is_some_and(|c| s > c);
        let gqa_needs_one_sequence = batch > 1 && s > 1 && self.has_shared_buffer() && (cache.len > 0 || chunked);
        if !gqa_needs_one_sequence {
            return self.run_chunked(tokens, batch, cache, fetch, 0);
        }
        if !cache.is_shared_buffer() {
            if cache.len > 0 {
                bail!(
                    "GroupQueryAttention takes {s} new tokens for each of {batch} sequences only into an empty cache; \
                     step the sequences one token at a time, or one sequence at a time"
                );
            }
            // A growing (host) cache has no per-sequence views: the prompt runs whole.
            return self.run_uniform(tokens, batch, cache, fetch, 0);
        }
        let start_len = cache.len;
        let mut outputs = Vec::with_capacity(batch);
        for seq in 0..batch {
            cache.len = start_len;
            outputs.push(self.run_chunked(&tokens[seq * s..(seq + 1) * s], 1, cache, fetch, seq)?);
        }
        cache.len = start_len + s;
        if outputs.iter().all(|o| matches!(o, StepOutput::Greedy(_))) {
            return Ok(StepOutput::Greedy(outputs.iter().flat_map(StepOutput::greedy).collect()));
        }
        let parts = outputs.into_iter().map(StepOutput::into_logits).collect::<Result<Vec<_>>>()?;
        let (rows, vocab) = (parts[0].rows, parts[0].vocab);
        let data = parts.into_iter().flat_map(|p| p.data).collect();
        Ok(StepOutput::Logits(Logits { data, batch, rows, vocab }))
    }

    /// [`run_uniform`](Self::run_uniform) over chunks of at most `prefill_chunk` tokens per sequence.
    fn run_chunked(
        &mut self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        fetch: Fetch,
        first: usize,
    ) -> Result<StepOutput> {
        let s = tokens.len() / batch;
        let chunk = match self.prefill_chunk {
            Some(c) if s > c => c,
            _ => return self.run_uniform(tokens, batch, cache, fetch, first),
        };
        let all_rows = !self.manifest.options.last_token_logits && fetch == Fetch::Logits;
        let mut pieces = Vec::new();
        for start in (0..s).step_by(chunk) {
            let end = (start + chunk).min(s);
            let piece: Vec<u32> = (0..batch).flat_map(|b| tokens[b * s + start..b * s + end].iter().copied()).collect();
            // Only the last chunk's output is the answer, unless every row was asked for.
            let want = if end == s || all_rows { fetch } else { Fetch::Greedy };
            pieces.push(self.run_uniform(&piece, batch, cache, want, first)?);
        }
        if !all_rows {
            return pieces.pop().ok_or_else(|| anyhow!("a prefill of {s} tokens ran no chunk"));
        }
        let pieces = pieces.into_iter().map(StepOutput::into_logits).collect::<Result<Vec<_>>>()?;
        let vocab = self.vocab_size();
        let mut data = Vec::with_capacity(batch * s * vocab);
        for b in 0..batch {
            for p in &pieces {
                data.extend_from_slice(&p.data[b * p.rows * vocab..(b + 1) * p.rows * vocab]);
            }
        }
        Ok(StepOutput::Logits(Logits { data, batch, rows: s, vocab }))
    }

    /// One run of `batch` rows from row `first`, all at `cache.len`, which then moves forward.
    fn run_uniform(
        &mut self,
        tokens: &[u32],
        batch: usize,
        cache: &mut KvCache,
        fetch: Fetch,
        first: usize,
    ) -> Result<StepOutput> {
        let past = cache.len;
        let inputs = StepInputs::uniform(tokens.to_vec(), batch, past)?;
        let out = self.run_rows(&inputs, cache, first, fetch)?;
        cache.len = past + inputs.seq_len();
        Ok(out)
    }

    /// Checks a step over rows `first..first + inputs.rows()` of `cache`.
    fn check_rows(&self, inputs: &StepInputs, cache: &KvCache, first: usize) -> Result<()> {
        let rows = inputs.rows();
        match cache.shared_layout() {
            Some(layout) if first + rows > layout.rows => {
                bail!("rows {first}..{} of a cache of {} sequences", first + rows, layout.rows)
            }
            None if first != 0 || rows != cache.batch => {
                bail!("the cache holds {} sequences, the step has {rows} (from row {first})", cache.batch)
            }
            None if inputs.past_lens().iter().any(|&p| p != cache.len) => {
                bail!(
                    "a growing cache holds {} tokens for every sequence; the step says {:?}",
                    cache.len,
                    inputs.past_lens()
                )
            }
            _ => {}
        }
        let total = inputs.total_len();
        let limit = cache.capacity().unwrap_or(usize::MAX).min(self.context_length());
        if total > limit {
            bail!(
                "sequence of {total} tokens exceeds the context length {limit} (graph context {}; export with a larger --context-length)",
                self.context_length()
            );
        }
        let vocab = self.vocab_size();
        if let Some(&bad) = inputs.tokens().iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary (size {vocab})");
        }
        let multimodal = self.manifest.position_axes() == 3;
        if !multimodal && !inputs.has_plain_positions() {
            bail!("{} has a one-axis rotary: its steps take no rope deltas or (t, h, w) positions", self.dir.display());
        }
        if let Some(images) = inputs.images() {
            let Some(vision) = self.manifest.vision.as_ref().filter(|_| self.takes_images()) else {
                bail!("{} takes no image rows (it is not a vision-language decoder)", self.dir.display());
            };
            let pads = inputs.tokens().iter().filter(|&&t| t == vision.image_token_id).count();
            if pads != images.tokens() {
                bail!("the step has {pads} image tokens but {} image rows", images.tokens());
            }
        }
        // The fused attention's rotary table is indexed by cache slot (see the export's rotary.rs).
        if multimodal && self.has_shared_buffer() {
            if let Some((a, b, slot)) = inputs.slot_conflict() {
                bail!(
                    "rows {a} and {b} of the step put different (t, h, w) positions at cache slot {slot}; \
                     the rotary table holds one per slot: run them in separate steps"
                );
            }
        }
        Ok(())
    }

    /// Where a growing cache's `present` outputs are kept: on the session's device.
    fn cache_memory(device_id: Option<i32>) -> Result<MemoryInfo<'static>> {
        match device_id {
            Some(id) => {
                MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default).map_err(ort_err)
            }
            None => Ok(MemoryInfo::default()),
        }
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
        let (rows, s) = (inputs.rows() as i64, inputs.seq_len() as i64);
        let width = inputs.total_len();
        let input_ids = Tensor::from_array((vec![rows, s], inputs.input_ids())).map_err(ort_err)?;
        let attention_mask =
            Tensor::from_array((vec![rows, width as i64], inputs.attention_mask(width))).map_err(ort_err)?;
        let position_ids = self.position_tensor(inputs, rows, s)?;
        let image_inputs = match inputs.images() {
            Some(_) => Vec::new(),
            None => self.empty_image_inputs(None)?,
        };
        let kv = self.manifest.kv_cache.clone();
        let vocab = self.vocab_size();
        let host = MemoryInfo::default();
        let device = Self::cache_memory(self.ep.device_id())?;
        let greedy_output = fetch == Fetch::Greedy && self.manifest.has_greedy_output();

        let mut binding = self.session.create_binding().map_err(ort_err)?;
        binding.bind_input("input_ids", &input_ids).map_err(ort_err)?;
        binding.bind_input("attention_mask", &attention_mask).map_err(ort_err)?;
        binding.bind_input("position_ids", &position_ids).map_err(ort_err)?;
        for (name, value) in &image_inputs {
            binding.bind_input(name, value).map_err(ort_err)?;
        }
        if let Some(images) = inputs.images() {
            binding.bind_input(IMAGE_EMBEDS_INPUT, images.embeds()).map_err(ort_err)?;
            if self.takes_deepstack() {
                binding.bind_input(DEEPSTACK_EMBEDS_INPUT, images.deepstack()).map_err(ort_err)?;
            }
        }
        // Cache views bound as inputs: they must outlive the run.
        let mut held_views = Vec::new();
        match &mut cache.store {
            KvStore::Device { layout, memory, .. } => {
                held_views = Self::bind_rows(&mut binding, &kv, layout, memory, first, inputs.rows())?;
            }
            KvStore::Growing { keys, values } => {
                for (layer, (k, v)) in keys.iter().zip(values.iter()).enumerate() {
                    binding.bind_input(KvCacheSpec::name(&kv.past_key, layer), k).map_err(ort_err)?;
                    binding.bind_input(KvCacheSpec::name(&kv.past_value, layer), v).map_err(ort_err)?;
                    binding
                        .bind_output_to_device(KvCacheSpec::name(&kv.present_key, layer), &device)
                        .map_err(ort_err)?;
                    binding
                        .bind_output_to_device(KvCacheSpec::name(&kv.present_value, layer), &device)
                        .map_err(ort_err)?;
                }
            }
        }
        if greedy_output {
            // The logits stay where they were computed; rows x positions token ids come back.
            binding.bind_output_to_device("logits", &device).map_err(ort_err)?;
            binding.bind_output_to_device(GREEDY_TOKENS_OUTPUT, &host).map_err(ort_err)?;
        } else {
            binding.bind_output_to_device("logits", &host).map_err(ort_err)?;
        }
        let mut options = Self::no_graph_options()?;
        let shrink = self.ep.cuda_options().filter(|o| o.shrink_arena && s > 1);
        if let Some(o) = shrink {
            // After a prefill, hand the arena's free regions back to the device.
            options.set("memory.enable_memory_arena_shrinkage", format!("gpu:{}", o.device_id)).map_err(ort_err)?;
        }
        let mut outputs = self
            .session
            .run_binding_with_options(&binding, &options)
            .map_err(ort_err)
            .context("decoder step failed")?;
        let result = if greedy_output {
            StepOutput::Greedy(Self::read_greedy(outputs.remove(GREEDY_TOKENS_OUTPUT))?)
        } else {
            StepOutput::Logits(Self::read_logits(outputs.remove("logits"), vocab)?)
        };
        drop(held_views);
        if let KvStore::Growing { keys, values } = &mut cache.store {
            for layer in 0..keys.len() {
                let name_k = KvCacheSpec::name(&kv.present_key, layer);
                let name_v = KvCacheSpec::name(&kv.present_value, layer);
                keys[layer] = outputs.remove(&name_k).with_context(|| format!("missing output {name_k}"))?;
                values[layer] = outputs.remove(&name_v).with_context(|| format!("missing output {name_v}"))?;
            }
            cache.len += inputs.seq_len();
        }
        Ok(result)
    }

    /// `position_ids` of a step: (batch, s), or for a multimodal rotary (3, batch, s) with each
    /// token's t, h and w positions (see [`StepInputs`]).
    fn position_tensor(&self, inputs: &StepInputs, batch: i64, s: i64) -> Result<Tensor<i64>> {
        let axes = self.manifest.position_axes();
        if axes == 1 {
            return Ok(Tensor::from_array((vec![batch, s], inputs.position_ids()))?);
        }
        Ok(Tensor::from_array((vec![axes as i64, batch, s], inputs.axis_position_ids()))?)
    }

    /// `position_ids`' shape in a decode step of `batch` sequences: (batch, 1), or (3, batch, 1).
    fn decode_position_shape(&self, batch: usize) -> Vec<usize> {
        match self.manifest.position_axes() {
            1 => vec![batch, 1],
            axes => vec![axes, batch, 1],
        }
    }

    /// Whether the decoder takes image rows (`image_embeds`): a vision-language decoder.
    pub fn takes_images(&self) -> bool {
        self.manifest.inputs.iter().any(|io| io.name == IMAGE_EMBEDS_INPUT)
    }

    fn takes_deepstack(&self) -> bool {
        self.manifest.inputs.iter().any(|io| io.name == DEEPSTACK_EMBEDS_INPUT)
    }

    /// An uninitialized tensor of `dtype` (a float or KV dtype) where the session runs (the
    /// device of a GPU session, else host memory), and its data address: a step's image rows.
    pub fn new_tensor(&self, dtype: TensorDtype, shape: &[usize]) -> Result<(DynValue, usize)> {
        match &self.device_allocator {
            Some(alloc) => device_tensor(alloc, dtype, shape),
            None => device_tensor(&Allocator::default(), dtype, shape),
        }
    }

    /// A vision-language decoder's image inputs with no rows: a step without image tokens. Empty
    /// for text models. On the host, or from `device` (a captured CUDA graph takes no host inputs).
    fn empty_image_inputs(&self, device: Option<&Allocator>) -> Result<Vec<(String, DynValue)>> {
        let mut out = Vec::new();
        let image_input =
            |io: &&pio_models::manifest::IoSpec| io.name == IMAGE_EMBEDS_INPUT || io.name == DEEPSTACK_EMBEDS_INPUT;
        for io in self.manifest.inputs.iter().filter(image_input) {
            // The symbolic dimension is the number of image rows: 0.
            let shape: Vec<i64> = io.shape.iter().map(|d| d.as_i64().unwrap_or(0)).collect();
            let value = match device {
                None => empty_host_tensor(io.dtype, shape)?,
                Some(alloc) => {
                    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                    device_tensor(alloc, io.dtype, &shape)?.0
                }
            };
            out.push((io.name.clone(), value));
        }
        Ok(out)
    }

    /// Binds rows `first..first + rows` of every layer's shared buffer as both past and present
    /// (GroupQueryAttention's shared buffer, updated in place). Returns the input views, which
    /// must outlive the run.
    fn bind_rows<'a>(
        binding: &mut ort::session::IoBinding,
        kv: &KvCacheSpec,
        layout: &SharedLayout,
        memory: &MemoryInfo<'static>,
        first: usize,
        rows: usize,
    ) -> Result<Vec<ort::value::DynValueRefMut<'a>>> {
        let mut held = Vec::with_capacity(2 * layout.layers.len());
        for (layer, &(k_addr, v_addr)) in layout.layers.iter().enumerate() {
            // SAFETY: the addresses are the data of the cache's buffers, alive while the cache
            // is borrowed for the run, of this layout and dtype; the views live until it ends.
            let view = |addr| unsafe { rows_view(memory, kv.dtype, layout, addr, first, rows) };
            for (name, addr) in [(&kv.past_key, k_addr), (&kv.past_value, v_addr)] {
                let input = view(addr)?;
                bind_input_in_place(binding, &KvCacheSpec::name(name, layer), &input)?;
                held.push(input);
            }
            binding.bind_output(KvCacheSpec::name(&kv.present_key, layer), view(k_addr)?).map_err(ort_err)?;
            binding.bind_output(KvCacheSpec::name(&kv.present_value, layer), view(v_addr)?).map_err(ort_err)?;
        }
        Ok(held)
    }

    /// Run options that keep a step out of CUDA-graph capture (shapes vary between prefills).
    fn no_graph_options() -> Result<RunOptions> {
        let mut options = RunOptions::new().map_err(ort_err)?;
        options.set("gpu_graph_id", "-1").map_err(ort_err)?;
        Ok(options)
    }

    fn read_logits(value: Option<DynValue>, vocab: usize) -> Result<Logits> {
        let value = value.context("the graph has no `logits` output")?;
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_err)?;
        let batch = shape.first().copied().unwrap_or(1).max(1) as usize;
        let rows = shape.get(1).copied().unwrap_or(1).max(1) as usize;
        if data.len() != batch * rows * vocab {
            bail!("logits of shape {shape:?} do not match vocabulary {vocab}");
        }
        Ok(Logits { data: data.to_vec(), batch, rows, vocab })
    }

    /// The last position's token of each sequence from a (batch, rows) `greedy_tokens` output.
    fn read_greedy(value: Option<DynValue>) -> Result<Vec<u32>> {
        let value = value.with_context(|| format!("the graph has no `{GREEDY_TOKENS_OUTPUT}` output"))?;
        let (shape, data) = value.try_extract_tensor::<i64>().map_err(ort_err)?;
        let rows = shape.get(1).copied().unwrap_or(1).max(1) as usize;
        Ok(data.chunks(rows).filter_map(|row| row.last()).map(|&t| t as u32).collect())
    }

    /// Whether decode steps can replay a captured CUDA graph: the CUDA execution provider with
    /// `cuda_graph` on, and GroupQueryAttention's shared buffer.
    pub fn can_replay_graphs(&self) -> bool {
        matches!(self.ep, ExecutionProvider::Cuda(_))
            && self.ep.cuda_graph()
            && self.device_allocator.is_some()
            && self.has_shared_buffer()
    }

    /// One decode step (one token per sequence, all at `cache.len`) replayed from a captured
    /// CUDA graph; see [`run_rows_graph`](Self::run_rows_graph).
    pub fn decode_step_graph(&mut self, tokens: &[u32], cache: &mut KvCache, fetch: Fetch) -> Result<StepOutput> {
        if tokens.len() != cache.batch {
            bail!("a decode step takes one token per sequence ({}), got {}", cache.batch, tokens.len());
        }
        let past = cache.len;
        let inputs = StepInputs::uniform(tokens.to_vec(), cache.batch, past)?;
        let out = self.run_rows_graph(&inputs, cache, fetch)?;
        cache.len = past + 1;
        Ok(out)
    }

    /// One decode step (one token per row, each after its own past) over rows 0..inputs.rows()
    /// of a shared-buffer cache, replayed from a captured CUDA graph. Needs
    /// [`can_replay_graphs`](Self::can_replay_graphs); every input and output lives at a fixed
    /// device address (the attention mask spans the whole capacity), so ONNX Runtime captures the
    /// step once per cache and number of rows and replays it. Leaves `cache.len` alone.
    pub fn run_rows_graph(&mut self, inputs: &StepInputs, cache: &mut KvCache, fetch: Fetch) -> Result<StepOutput> {
        if inputs.seq_len() != 1 {
            bail!("a CUDA-graph step decodes one token per sequence, got {}", inputs.seq_len());
        }
        if inputs.images().is_some() {
            bail!("a CUDA-graph decode step takes no image rows");
        }
        self.check_rows(inputs, cache, 0)?;
        let rows = inputs.rows();
        let device = self.ep.device_id().unwrap_or(0);
        let alloc = self.device_allocator.as_ref().ok_or_else(|| anyhow!("CUDA-graph decode needs a CUDA session"))?;
        let KvStore::Device { layout, memory, .. } = &mut cache.store else {
            bail!(
                "CUDA-graph decode needs GroupQueryAttention's fixed-size cache; {} was exported without fused attention",
                self.dir.display()
            );
        };
        let capacity = layout.capacity;
        let vocab = self.manifest.dims.vocab_size;
        let has_greedy = self.manifest.has_greedy_output();
        let cache_key = (layout.layers.clone(), rows, capacity);
        let index = match self.graph_states.iter().position(|g| g.cache == cache_key) {
            Some(i) => i,
            None => {
                // New rows or a new cache: new fixed inputs and a new capture. Graph ids start at 1.
                let graph_id = 1 + self.graph_states.iter().map(|g| g.graph_id).max().unwrap_or(0);
                let tensor = |shape: Vec<usize>| Tensor::<i64>::new(alloc, shape).map_err(ort_err);
                self.graph_states.push(GraphDecodeState {
                    cache: cache_key,
                    graph_id,
                    input_ids: tensor(vec![rows, 1])?,
                    position_ids: tensor(self.decode_position_shape(rows))?,
                    attention_mask: tensor(vec![rows, capacity])?,
                    logits: Tensor::<f32>::new(alloc, [rows, 1, vocab]).map_err(ort_err)?,
                    greedy: if has_greedy { Some(tensor(vec![rows, 1])?) } else { None },
                });
                self.graph_states.len() - 1
            }
        };
        let image_inputs = self.empty_image_inputs(Some(alloc))?;
        let position_shape = self.decode_position_shape(rows);
        let state = &mut self.graph_states[index];
        let (ids, mask) = (inputs.input_ids(), inputs.attention_mask(capacity));
        let positions = if position_shape.len() == 3 { inputs.axis_position_ids() } else { inputs.position_ids() };
        match CudaRuntime::get() {
            Some(rt) => {
                // SAFETY: the three tensors are device allocations of exactly these sizes.
                unsafe {
                    rt.host_to_device(device, state.input_ids.data_ptr_mut(), &ids)?;
                    rt.host_to_device(device, state.position_ids.data_ptr_mut(), &positions)?;
                    rt.host_to_device(device, state.attention_mask.data_ptr_mut(), &mask)?;
                }
                rt.synchronize(device)?;
            }
            None => {
                let host = |shape: Vec<i64>, data: Vec<i64>| Tensor::from_array((shape, data)).map_err(ort_err);
                host(vec![rows as i64, 1], ids)?.copy_into(&mut state.input_ids).map_err(ort_err)?;
                let shape = position_shape.iter().map(|&d| d as i64).collect();
                host(shape, positions)?.copy_into(&mut state.position_ids).map_err(ort_err)?;
                host(vec![rows as i64, capacity as i64], mask)?
                    .copy_into(&mut state.attention_mask)
                    .map_err(ort_err)?;
            }
        }

        let kv = self.manifest.kv_cache.clone();
        let mut binding = self.session.create_binding().map_err(ort_err)?;
        binding.bind_input("input_ids", &state.input_ids).map_err(ort_err)?;
        binding.bind_input("position_ids", &state.position_ids).map_err(ort_err)?;
        binding.bind_input("attention_mask", &state.attention_mask).map_err(ort_err)?;
        for (name, value) in &image_inputs {
            binding.bind_input(name, value).map_err(ort_err)?;
        }
        let held_views = Self::bind_rows(&mut binding, &kv, layout, memory, 0, rows)?;
        binding.bind_output("logits", &mut state.logits).map_err(ort_err)?;
        if let Some(greedy) = state.greedy.as_mut() {
            binding.bind_output(GREEDY_TOKENS_OUTPUT, greedy).map_err(ort_err)?;
        }
        let mut options = RunOptions::new().map_err(ort_err)?;
        options.set("gpu_graph_id", state.graph_id.to_string()).map_err(ort_err)?;
        self.session
            .run_binding_with_options(&binding, &options)
            .map_err(ort_err)
            .context("decode step (CUDA graph) failed")?;
        drop(held_views);

        let out = match (&state.greedy, fetch) {
            (Some(greedy), Fetch::Greedy) => {
                let mut tokens = vec![0i64; rows];
                Self::copy_to_host(device, greedy, &mut tokens)?;
                StepOutput::Greedy(tokens.into_iter().map(|t| t as u32).collect())
            }
            _ => {
                let mut data = vec![0f32; rows * vocab];
                Self::copy_to_host(device, &state.logits, &mut data)?;
                StepOutput::Logits(Logits { data, batch: rows, rows: 1, vocab })
            }
        };
        Ok(out)
    }

    /// Copies a whole device tensor into `dst` (its length).
    fn copy_to_host<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug>(
        device: i32,
        src: &Tensor<T>,
        dst: &mut [T],
    ) -> Result<()> {
        if let Some(rt) = CudaRuntime::get() {
            // SAFETY: `src` is a device tensor of dst.len() elements.
            return unsafe { rt.device_to_host(device, dst, src.data_ptr()) };
        }
        let shape: Vec<usize> = src.shape().iter().map(|&d| d as usize).collect();
        let mut host = Tensor::<T>::new(&Allocator::default(), shape).map_err(ort_err)?;
        src.copy_into(&mut host).map_err(ort_err)?;
        let (_, data) = host.try_extract_tensor::<T>().map_err(ort_err)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}
