//! A loaded graph folder: the manifest, one ONNX Runtime session over the decoder, and the
//! forward step through the KV cache.
//!
//! Two cache layouts, chosen by where the session runs:
//! - host (CPU): each step's `present.*` outputs become the next step's `past_key_values.*`
//!   (GroupQueryAttention concatenates, so the past grows by the new tokens);
//! - device (CUDA, TensorRT): one fixed (batch, kv_heads, capacity, head_dim) buffer per layer
//!   and direction, bound through I/O binding as both past and present, which
//!   GroupQueryAttention updates in place (its shared-buffer mode, the one its fast decode
//!   kernels need). The cache never leaves the GPU; only the logits come to the host.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use pio_models::manifest::{KvCacheSpec, Manifest, TensorDtype};

use crate::ep::ExecutionProvider;

enum KvStore {
    /// Each layer's last `present` (dynamic length).
    Host { keys: Vec<DynValue>, values: Vec<DynValue> },
    /// Fixed-capacity device buffers, past and present at once.
    Device { keys: Vec<DynValue>, values: Vec<DynValue>, capacity: usize },
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
        match &self.store {
            KvStore::Host { .. } => None,
            KvStore::Device { capacity, .. } => Some(*capacity),
        }
    }
    pub fn on_device(&self) -> bool {
        matches!(self.store, KvStore::Device { .. })
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

/// Inputs of a CUDA-graph decode step, kept at fixed device addresses between steps.
struct GraphDecodeState {
    input_ids: Tensor<i64>,
    position_ids: Tensor<i64>,
    attention_mask: Tensor<i64>,
    logits: Tensor<f32>,
    batch: usize,
    capacity: usize,
}

pub struct DecoderModel {
    pub manifest: Manifest,
    pub dir: PathBuf,
    session: Session,
    pub ep: ExecutionProvider,
    device_allocator: Option<Allocator>,
    graph_state: Option<GraphDecodeState>,
}

fn ort_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// An uninitialized device tensor of the graph's KV dtype.
fn device_tensor(alloc: &Allocator, dtype: TensorDtype, shape: &[usize]) -> Result<DynValue> {
    let shape = shape.to_vec();
    Ok(match dtype {
        TensorDtype::Float32 => Tensor::<f32>::new(alloc, shape).map_err(ort_err)?.into_dyn(),
        TensorDtype::Float16 => Tensor::<f16>::new(alloc, shape).map_err(ort_err)?.into_dyn(),
        TensorDtype::Bfloat16 => Tensor::<bf16>::new(alloc, shape).map_err(ort_err)?.into_dyn(),
        TensorDtype::Int8 => Tensor::<i8>::new(alloc, shape).map_err(ort_err)?.into_dyn(),
        other => bail!("no device tensors of {other:?}"),
    })
}

/// An empty host tensor (zero-length past) of the graph's KV dtype.
fn empty_host_tensor(dtype: TensorDtype, shape: Vec<i64>) -> Result<DynValue> {
    Ok(match dtype {
        TensorDtype::Float32 => Tensor::from_array((shape, Vec::<f32>::new())).map_err(ort_err)?.into_dyn(),
        TensorDtype::Float16 => Tensor::from_array((shape, Vec::<f16>::new())).map_err(ort_err)?.into_dyn(),
        TensorDtype::Bfloat16 => Tensor::from_array((shape, Vec::<bf16>::new())).map_err(ort_err)?.into_dyn(),
        TensorDtype::Int8 => Tensor::from_array((shape, Vec::<i8>::new())).map_err(ort_err)?.into_dyn(),
        other => bail!("no KV cache of {other:?}"),
    })
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
        let session = builder
            .commit_from_file(&model_path)
            .map_err(|e| anyhow!("cannot load {}: {e}", model_path.display()))?;
        let device_allocator = match ep.device_id() {
            Some(id) => Some(
                Allocator::new(
                    &session,
                    MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default).map_err(ort_err)?,
                )
                .map_err(|e| anyhow!("cannot allocate on CUDA device {id}: {e}"))?,
            ),
            None => None,
        };
        Ok(DecoderModel { manifest, dir: dir.to_path_buf(), session, ep: ep.clone(), device_allocator, graph_state: None })
    }

    pub fn vocab_size(&self) -> usize {
        self.manifest.dims.vocab_size
    }

    pub fn context_length(&self) -> usize {
        self.manifest.dims.context_length
    }

    /// An empty cache for one sequence (see [`DecoderModel::new_batch_cache`]).
    pub fn new_cache(&self) -> Result<KvCache> {
        self.new_batch_cache(1, self.context_length())
    }

    /// An empty cache for `batch` sequences. On a GPU it holds `capacity` tokens per sequence
    /// (at most the context length), allocated once on the device.
    pub fn new_batch_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let d = &self.manifest.dims;
        let dtype = self.manifest.kv_cache.dtype;
        let layers = d.num_layers;
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        let store = match &self.device_allocator {
            Some(alloc) => {
                let capacity = capacity.min(self.context_length());
                let shape = [batch, d.num_kv_heads, capacity, d.head_dim];
                for _ in 0..layers {
                    keys.push(device_tensor(alloc, dtype, &shape)?);
                    values.push(device_tensor(alloc, dtype, &shape)?);
                }
                KvStore::Device { keys, values, capacity }
            }
            None => {
                let shape = vec![batch as i64, d.num_kv_heads as i64, 0, d.head_dim as i64];
                for _ in 0..layers {
                    keys.push(empty_host_tensor(dtype, shape.clone())?);
                    values.push(empty_host_tensor(dtype, shape.clone())?);
                }
                KvStore::Host { keys, values }
            }
        };
        Ok(KvCache { store, batch, len: 0 })
    }

    /// Runs `tokens` (batch 1) after what `cache` holds, at positions cache.len.., and moves
    /// the cache forward. Returns logits of the last position (or all new positions when the
    /// graph was exported with all logits).
    pub fn forward(&mut self, tokens: &[u32], cache: &mut KvCache) -> Result<Logits> {
        self.forward_batch(tokens, 1, cache)
    }

    fn check_step(&self, tokens: &[u32], batch: usize, cache: &KvCache) -> Result<usize> {
        if tokens.is_empty() || batch == 0 || tokens.len() % batch != 0 {
            bail!("a step needs the same positive number of tokens for each of the {batch} sequences");
        }
        if cache.batch != batch {
            bail!("the cache holds {} sequences, the step has {batch}", cache.batch);
        }
        let s = tokens.len() / batch;
        let total = cache.len + s;
        let limit = cache.capacity().unwrap_or(usize::MAX).min(self.context_length());
        if total > limit {
            bail!(
                "sequence of {total} tokens exceeds the context length {limit} (graph context {}; export with a larger --context-length)",
                self.context_length()
            );
        }
        let vocab = self.vocab_size();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary (size {vocab})");
        }
        Ok(s)
    }

    /// `batch` sequences of equal length, `tokens` row-major (batch, s), all after `cache.len`.
    pub fn forward_batch(&mut self, tokens: &[u32], batch: usize, cache: &mut KvCache) -> Result<Logits> {
        let s = self.check_step(tokens, batch, cache)?;
        let total = cache.len + s;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let positions: Vec<i64> = (0..batch).flat_map(|_| cache.len as i64..total as i64).collect();
        let mask = vec![1i64; batch * total];
        let (b, s, t) = (batch as i64, s as i64, total as i64);
        let input_ids = Tensor::from_array((vec![b, s], ids)).map_err(ort_err)?;
        let attention_mask = Tensor::from_array((vec![b, t], mask)).map_err(ort_err)?;
        let position_ids = Tensor::from_array((vec![b, s], positions)).map_err(ort_err)?;
        let kv = self.manifest.kv_cache.clone();
        let layers = self.manifest.dims.num_layers;
        let vocab = self.vocab_size();
        let logits = match &mut cache.store {
            KvStore::Host { keys, values } => {
                let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
                    ("input_ids".into(), input_ids.into()),
                    ("attention_mask".into(), attention_mask.into()),
                    ("position_ids".into(), position_ids.into()),
                ];
                for layer in 0..layers {
                    inputs.push((KvCacheSpec::name(&kv.past_key, layer).into(), (&keys[layer]).into()));
                    inputs.push((KvCacheSpec::name(&kv.past_value, layer).into(), (&values[layer]).into()));
                }
                let mut outputs = self.session.run(inputs).map_err(|e| anyhow!("decoder step failed: {e}"))?;
                let logits = Self::read_logits(outputs.remove("logits"), vocab)?;
                for layer in 0..layers {
                    let name_k = KvCacheSpec::name(&kv.present_key, layer);
                    let name_v = KvCacheSpec::name(&kv.present_value, layer);
                    keys[layer] = outputs.remove(&name_k).with_context(|| format!("missing output {name_k}"))?;
                    values[layer] = outputs.remove(&name_v).with_context(|| format!("missing output {name_v}"))?;
                }
                logits
            }
            KvStore::Device { keys, values, .. } => {
                let mut binding = self.session.create_binding().map_err(ort_err)?;
                binding.bind_input("input_ids", &input_ids).map_err(ort_err)?;
                binding.bind_input("attention_mask", &attention_mask).map_err(ort_err)?;
                binding.bind_input("position_ids", &position_ids).map_err(ort_err)?;
                Self::bind_kv(&mut binding, &kv, keys, values)?;
                // Logits come back to host memory: [batch, 1, vocab] floats, not the cache.
                binding.bind_output_to_device("logits", &MemoryInfo::default()).map_err(ort_err)?;
                let mut outputs = self
                    .session
                    .run_binding_with_options(&binding, &Self::no_graph_options()?)
                    .map_err(|e| anyhow!("decoder step failed: {e}"))?;
                Self::read_logits(outputs.remove("logits"), vocab)?
            }
        };
        cache.len = total;
        Ok(logits)
    }

    /// Binds each layer's device buffer as both past and present (GroupQueryAttention's shared buffer).
    fn bind_kv(binding: &mut ort::session::IoBinding, kv: &KvCacheSpec, keys: &mut [DynValue], values: &mut [DynValue]) -> Result<()> {
        for (layer, (k, v)) in keys.iter_mut().zip(values.iter_mut()).enumerate() {
            binding.bind_input(KvCacheSpec::name(&kv.past_key, layer), &*k).map_err(ort_err)?;
            binding.bind_input(KvCacheSpec::name(&kv.past_value, layer), &*v).map_err(ort_err)?;
            binding.bind_output(KvCacheSpec::name(&kv.present_key, layer), &mut *k).map_err(ort_err)?;
            binding.bind_output(KvCacheSpec::name(&kv.present_value, layer), &mut *v).map_err(ort_err)?;
        }
        Ok(())
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

    /// One decode step (one token per sequence) replayed from a captured CUDA graph. Needs the
    /// CUDA execution provider with `cuda_graph` on and a device cache; every input lives at a
    /// fixed device address (the attention mask spans the whole cache capacity), so ONNX Runtime
    /// captures the step once and replays it.
    pub fn decode_step_graph(&mut self, tokens: &[u32], cache: &mut KvCache) -> Result<Logits> {
        let batch = cache.batch;
        if tokens.len() != batch {
            bail!("a decode step takes one token per sequence ({batch}), got {}", tokens.len());
        }
        self.check_step(tokens, batch, cache)?;
        let alloc = self.device_allocator.as_ref().ok_or_else(|| anyhow!("CUDA-graph decode needs a CUDA session"))?;
        let KvStore::Device { keys, values, capacity } = &mut cache.store else {
            bail!("CUDA-graph decode needs a device cache");
        };
        let capacity = *capacity;
        let vocab = self.manifest.dims.vocab_size;
        let rebuild = self.graph_state.as_ref().is_none_or(|s| s.batch != batch || s.capacity != capacity);
        if rebuild {
            self.graph_state = Some(GraphDecodeState {
                input_ids: Tensor::<i64>::new(alloc, [batch, 1]).map_err(ort_err)?,
                position_ids: Tensor::<i64>::new(alloc, [batch, 1]).map_err(ort_err)?,
                attention_mask: Tensor::<i64>::new(alloc, [batch, capacity]).map_err(ort_err)?,
                logits: Tensor::<f32>::new(alloc, [batch, 1, vocab]).map_err(ort_err)?,
                batch,
                capacity,
            });
        }
        let state = self.graph_state.as_mut().ok_or_else(|| anyhow!("graph state"))?;
        let pos = cache.len as i64;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let mut mask = vec![0i64; batch * capacity];
        for row in 0..batch {
            mask[row * capacity..row * capacity + cache.len + 1].fill(1);
        }
        let host_ids = Tensor::from_array((vec![batch as i64, 1], ids)).map_err(ort_err)?;
        let host_pos = Tensor::from_array((vec![batch as i64, 1], vec![pos; batch])).map_err(ort_err)?;
        let host_mask = Tensor::from_array((vec![batch as i64, capacity as i64], mask)).map_err(ort_err)?;
        host_ids.copy_into(&mut state.input_ids).map_err(ort_err)?;
        host_pos.copy_into(&mut state.position_ids).map_err(ort_err)?;
        host_mask.copy_into(&mut state.attention_mask).map_err(ort_err)?;

        let kv = self.manifest.kv_cache.clone();
        let mut binding = self.session.create_binding().map_err(ort_err)?;
        binding.bind_input("input_ids", &state.input_ids).map_err(ort_err)?;
        binding.bind_input("position_ids", &state.position_ids).map_err(ort_err)?;
        binding.bind_input("attention_mask", &state.attention_mask).map_err(ort_err)?;
        Self::bind_kv(&mut binding, &kv, keys, values)?;
        binding.bind_output("logits", &mut state.logits).map_err(ort_err)?;
        let mut options = RunOptions::new().map_err(ort_err)?;
        options.set("gpu_graph_id", &format!("{}", 1 + batch)).map_err(ort_err)?;
        self.session.run_binding_with_options(&binding, &options).map_err(|e| anyhow!("decode step failed: {e}"))?;
        let mut host_logits = Tensor::<f32>::new(&Allocator::default(), [batch, 1, vocab]).map_err(ort_err)?;
        state.logits.copy_into(&mut host_logits).map_err(ort_err)?;
        let (_, data) = host_logits.try_extract_tensor::<f32>().map_err(ort_err)?;
        cache.len += 1;
        Ok(Logits { data: data.to_vec(), batch, rows: 1, vocab })
    }
}
