//! A driver of a Qwen3-VL export's multimodal decoder graph for the parity tests: one step of
//! batch 1 over a KV cache (growing, or one shared buffer as on the GPU, with the mask as long as
//! the sequence or the whole capacity as CUDA-graph decode binds it), fed positions and image rows
//! directly, so the graph is checked against transformers apart from the engine. The vision
//! encoder and the rope index are the runtime's (`pio_runtime::vision`).
//!
//! IO as `pio_models::manifest::VisionSpec` describes it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensorValueType, DynValue, Tensor};
use pio_models::manifest::{KvCacheSpec, Manifest, TensorDtype};
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::vision::to_f32_vec;

fn session(path: &Path, ep: &ExecutionProvider) -> Result<Session> {
    let env = pio_runtime::ort_lib::environment()?;
    let mut builder = ep.configure(Session::builder(env)?)?;
    builder.commit_from_file(path).with_context(|| format!("cannot load {}", path.display()))
}

/// Where a session's outputs and the KV buffers live.
fn device_memory(ep: &ExecutionProvider) -> Result<MemoryInfo<'static>> {
    match ep.device_id() {
        Some(id) => Ok(MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)?),
        None => Ok(MemoryInfo::default()),
    }
}

/// A host tensor of `data` (float32) in the graph dtype `dtype`.
pub fn host_tensor(dtype: TensorDtype, shape: &[usize], data: &[f32]) -> Result<DynValue> {
    let shape = shape.to_vec();
    Ok(match dtype {
        TensorDtype::Float32 => Tensor::from_array((shape, data.to_vec()))?.into_dyn(),
        TensorDtype::Float16 => {
            Tensor::from_array((shape, data.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()))?.into_dyn()
        }
        TensorDtype::Bfloat16 => {
            Tensor::from_array((shape, data.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()))?.into_dyn()
        }
        other => bail!("no float tensors of {other:?}"),
    })
}

fn i64_tensor(shape: &[usize], data: Vec<i64>) -> Result<DynValue> {
    Ok(Tensor::from_array((shape.to_vec(), data))?.into_dyn())
}

/// How the decoder's KV cache is kept between steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKind {
    /// Each step's present is the next step's past (the CPU runtime's default).
    Growing,
    /// One (1, kv_heads, capacity, head_dim) buffer per layer bound as past and present
    /// (GroupQueryAttention's shared buffer, the GPU's), the mask as long as the sequence.
    Shared,
    /// The shared buffer with a mask spanning the whole capacity, zeros past the sequence
    /// (what CUDA-graph decode binds).
    SharedFullMask,
}

pub struct Cache {
    keys: Vec<DynValue>,
    values: Vec<DynValue>,
    pub len: usize,
    kind: CacheKind,
    capacity: usize,
}

/// The image rows of one step: (M, hidden) embeddings and (deepstack, M, hidden) features.
pub struct ImageRows {
    pub embeds: DynValue,
    pub deepstack: DynValue,
}

/// The multimodal decoder graph.
pub struct MultimodalDecoder {
    session: Session,
    memory: MemoryInfo<'static>,
    allocator: Option<Allocator>,
    pub manifest: Manifest,
    pub dir: PathBuf,
}

impl MultimodalDecoder {
    pub fn load(graphs: &Path, ep: &ExecutionProvider) -> Result<Self> {
        let manifest = Manifest::load(graphs)?;
        if manifest.vision.is_none() {
            bail!("{} is not a vision-language export", graphs.display());
        }
        let session = session(&graphs.join(&manifest.decoder), ep)?;
        let memory = device_memory(ep)?;
        let allocator = match ep.device_id() {
            Some(_) => Some(Allocator::new(&session, memory.clone())?),
            None => None,
        };
        Ok(MultimodalDecoder { session, memory, allocator, manifest, dir: graphs.to_path_buf() })
    }

    pub fn hidden(&self) -> usize {
        self.manifest.dims.hidden_size
    }
    pub fn vocab(&self) -> usize {
        self.manifest.dims.vocab_size
    }
    pub fn deepstack(&self) -> usize {
        self.manifest.vision.as_ref().map_or(0, |v| v.deepstack_visual_indexes.len())
    }
    pub fn image_token(&self) -> u32 {
        self.manifest.vision.as_ref().map_or(u32::MAX, |v| v.image_token_id)
    }
    /// The dtype of the image inputs and the KV cache.
    pub fn dtype(&self) -> TensorDtype {
        self.manifest.kv_cache.dtype
    }

    /// Image rows from host float32 vectors, in the graph dtype.
    pub fn image_rows(&self, embeds: &[f32], deepstack: &[f32]) -> Result<ImageRows> {
        let (h, n) = (self.hidden(), self.deepstack());
        let rows = embeds.len() / h;
        Ok(ImageRows {
            embeds: host_tensor(self.dtype(), &[rows, h], embeds)?,
            deepstack: host_tensor(self.dtype(), &[n, rows, h], deepstack)?,
        })
    }

    /// No image rows: a step without image-pad tokens.
    pub fn no_image_rows(&self) -> Result<ImageRows> {
        self.image_rows(&[], &[])
    }

    pub fn new_cache(&self, kind: CacheKind, capacity: usize) -> Result<Cache> {
        let d = &self.manifest.dims;
        let dtype = self.dtype();
        let buffer = || -> Result<DynValue> {
            if kind == CacheKind::Growing {
                return host_tensor(dtype, &[1, d.num_kv_heads, 0, d.head_dim], &[]);
            }
            // Bound as an output too: ONNX Runtime takes only tensors it allocated.
            let shape = [1, d.num_kv_heads, capacity, d.head_dim];
            let alloc = match &self.allocator {
                Some(a) => a,
                None => &Allocator::default(),
            };
            Ok(match dtype {
                TensorDtype::Float32 => Tensor::<f32>::new(alloc, shape)?.into_dyn(),
                TensorDtype::Float16 => Tensor::<f16>::new(alloc, shape)?.into_dyn(),
                TensorDtype::Bfloat16 => Tensor::<bf16>::new(alloc, shape)?.into_dyn(),
                other => bail!("no KV cache of {other:?} here"),
            })
        };
        Ok(Cache {
            keys: (0..d.num_layers).map(|_| buffer()).collect::<Result<_>>()?,
            values: (0..d.num_layers).map(|_| buffer()).collect::<Result<_>>()?,
            len: 0,
            kind,
            capacity,
        })
    }

    /// Runs `ids` (batch 1) after what `cache` holds, at `positions` (3 rows of ids.len()), with
    /// this step's image rows. Returns the logits (every position's or the last one's, as
    /// exported) and the graph's greedy tokens.
    pub fn step(
        &mut self,
        cache: &mut Cache,
        ids: &[u32],
        positions: &[Vec<i64>],
        image: &ImageRows,
    ) -> Result<(Vec<f32>, Vec<i64>)> {
        let s = ids.len();
        let total = cache.len + s;
        if total > cache.capacity {
            bail!("{total} tokens do not fit the cache of {}", cache.capacity);
        }
        if positions.len() != 3 || positions.iter().any(|p| p.len() != s) {
            bail!("positions must be 3 rows of {s}");
        }
        let mask_len = if cache.kind == CacheKind::SharedFullMask { cache.capacity } else { total };
        let mask = (0..mask_len).map(|i| (i < total) as i64).collect();
        let input_ids = i64_tensor(&[1, s], ids.iter().map(|&t| t as i64).collect())?;
        let attention_mask = i64_tensor(&[1, mask_len], mask)?;
        let position_ids = i64_tensor(&[3, 1, s], positions.iter().flatten().copied().collect())?;
        let host = MemoryInfo::default();
        let kv = self.manifest.kv_cache.clone();
        let mut binding = self.session.create_binding()?;
        binding.bind_input("input_ids", &input_ids)?;
        binding.bind_input("attention_mask", &attention_mask)?;
        binding.bind_input("position_ids", &position_ids)?;
        binding.bind_input("image_embeds", &image.embeds)?;
        if self.deepstack() > 0 {
            binding.bind_input("deepstack_embeds", &image.deepstack)?;
        }
        let names = |layer| {
            [&kv.past_key, &kv.past_value, &kv.present_key, &kv.present_value].map(|t| KvCacheSpec::name(t, layer))
        };
        for layer in 0..cache.keys.len() {
            let [pk, pv, k, v] = names(layer);
            binding.bind_input(pk, &cache.keys[layer])?;
            binding.bind_input(pv, &cache.values[layer])?;
            if cache.kind == CacheKind::Growing {
                binding.bind_output_to_device(k, &self.memory)?;
                binding.bind_output_to_device(v, &self.memory)?;
            } else {
                binding.bind_output(k, &mut cache.keys[layer])?;
                binding.bind_output(v, &mut cache.values[layer])?;
            }
        }
        binding.bind_output_to_device("logits", &host)?;
        binding.bind_output_to_device("greedy_tokens", &host)?;
        let mut out = self.session.run_binding(&binding).context("the decoder step failed")?;
        let logits = out.remove("logits").context("no logits output")?.downcast::<DynTensorValueType>()?;
        let logits = to_f32_vec(&logits)?;
        let greedy = out.remove("greedy_tokens").context("no greedy_tokens output")?;
        let greedy = greedy.try_extract_tensor::<i64>()?.1.to_vec();
        if cache.kind == CacheKind::Growing {
            for layer in 0..cache.keys.len() {
                let [_, _, k, v] = names(layer);
                cache.keys[layer] = out.remove(&k).with_context(|| format!("no output {k}"))?;
                cache.values[layer] = out.remove(&v).with_context(|| format!("no output {v}"))?;
            }
        }
        cache.len = total;
        Ok((logits, greedy))
    }
}
