//! The KV cache of a [`DecoderModel`](crate::model::DecoderModel) and the device tensors around
//! it: GroupQueryAttention's shared buffer (one fixed buffer per layer and direction, bound as
//! past and present through views of some of its rows) or the growing cache, each layer on the
//! device of the stage that holds it; and the byte buffers the engine's prefix cache keeps KV in.

use std::ops::Range;

use half::{bf16, f16};
use ort::memory::{Allocator, MemoryInfo};
use ort::value::{DynValue, Tensor};
use pio_models::manifest::{KvCacheSpec, TensorDtype};

use crate::model::ort_err;
use crate::model_error::{ModelError, Result};
use crate::stages::StageKv;

pub(crate) enum KvStore {
    /// Each layer's last `present` (dynamic length), on the host or the device.
    Growing { keys: Vec<DynValue>, values: Vec<DynValue> },
    /// Fixed-capacity buffers, past and present at once (GroupQueryAttention's shared buffer),
    /// with each buffer's data address for views of some of its sequences, and each layer's
    /// memory (its stage's device).
    Device {
        // Owned here; bound through views at `layout.layers`.
        _keys: Vec<DynValue>,
        _values: Vec<DynValue>,
        layout: SharedLayout,
        memories: Vec<MemoryInfo<'static>>,
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
    /// Each layer's memory: None for host memory, Some(id) for CUDA device `id` (a staged
    /// model's layers live on their stages' devices).
    pub devices: Vec<Option<i32>>,
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
    pub(crate) store: KvStore,
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
            return Err(ModelError::Cache(format!("cannot truncate a cache of {} tokens to {len}", self.len)));
        }
        if len < self.len && !self.is_shared_buffer() {
            return Err(ModelError::Cache(
                "a growing cache cannot drop tokens (only GroupQueryAttention's shared buffer can)".into(),
            ));
        }
        self.len = len;
        Ok(())
    }

    /// Each stage's part of the cache (stages over the consecutive layer ranges `stages`).
    pub(crate) fn stage_views(&mut self, stages: &[Range<usize>]) -> Vec<StageKv<'_>> {
        match &mut self.store {
            KvStore::Device { layout, memories, .. } => {
                let (layout, memories) = (&*layout, memories.as_slice());
                stages.iter().map(|_| StageKv::Shared { layout, memories }).collect()
            }
            KvStore::Growing { keys, values } => {
                let (mut keys, mut values) = (keys.as_mut_slice(), values.as_mut_slice());
                let mut views = Vec::with_capacity(stages.len());
                for layers in stages {
                    let (k, rest_k) = std::mem::take(&mut keys).split_at_mut(layers.len());
                    let (v, rest_v) = std::mem::take(&mut values).split_at_mut(layers.len());
                    keys = rest_k;
                    values = rest_v;
                    views.push(StageKv::Growing { keys: k, values: v });
                }
                views
            }
        }
    }
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
            other => return Err(ModelError::Graph(format!("no KV cache tensors of {other:?}"))),
        }
    };
}

/// An uninitialized tensor of a KV (or hidden-state) dtype from `alloc`, and its data address.
pub(crate) fn device_tensor(alloc: &Allocator, dtype: TensorDtype, shape: &[usize]) -> Result<(DynValue, usize)> {
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
    let c_name =
        std::ffi::CString::new(name).map_err(|_| ModelError::Step(format!("input name {name:?} has a NUL byte")))?;
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
    Err(ModelError::Bind { name: name.to_string(), source: ort::Error::new(message) })
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

/// Binds rows `first..first + rows` of the shared buffer of each layer in `layers` as both
/// past and present (GroupQueryAttention's shared buffer, updated in place). Returns the input
/// views, which must outlive the run.
pub(crate) fn bind_rows<'a>(
    binding: &mut ort::session::IoBinding,
    kv: &KvCacheSpec,
    layout: &SharedLayout,
    memories: &[MemoryInfo<'static>],
    layers: Range<usize>,
    first: usize,
    rows: usize,
) -> Result<Vec<ort::value::DynValueRefMut<'a>>> {
    if first + rows > layout.rows {
        return Err(ModelError::Cache(format!(
            "rows {first}..{} of a cache of {} sequences",
            first + rows,
            layout.rows
        )));
    }
    let mut held = Vec::with_capacity(2 * layers.len());
    for layer in layers {
        let ((k_addr, v_addr), memory) = (layout.layers[layer], &memories[layer]);
        // SAFETY: the addresses are the data of the cache's buffers, alive while the cache is
        // borrowed for the run, of this layout and dtype in `memory`; the views live until it ends.
        let view = |addr| unsafe { rows_view(memory, kv.dtype, layout, addr, first, rows) };
        for (name, addr) in [(&kv.past_key, k_addr), (&kv.past_value, v_addr)] {
            let input = view(addr)?;
            bind_input_in_place(binding, &KvCacheSpec::name(name, layer), &input)?;
            held.push(input);
        }
        for (name, addr) in [(&kv.present_key, k_addr), (&kv.present_value, v_addr)] {
            let name = KvCacheSpec::name(name, layer);
            binding.bind_output(&name, view(addr)?).map_err(ModelError::bind(&name))?;
        }
    }
    Ok(held)
}

/// An empty host tensor (zero-length past, zero image rows) of a KV or hidden-state dtype.
pub(crate) fn empty_host_tensor(dtype: TensorDtype, shape: Vec<i64>) -> Result<DynValue> {
    Ok(with_kv_element!(dtype, T => Tensor::from_array((shape, Vec::<T>::new())).map_err(ort_err)?.into_dyn()))
}

/// One allocation of a [`KvBuffer`]: bytes `start..start + len` of it, at `addr` on `device`.
struct KvBufferPart {
    _value: Tensor<u8>,
    addr: usize,
    start: usize,
    len: usize,
}

/// An uninitialized byte buffer where the model keeps its KV cache (device memory on a GPU,
/// host memory on the CPU): the engine's prefix cache stores KV there. Laid out per layer (the
/// layers' regions in order, each the same size), it is one allocation per stage on that
/// stage's device: a byte offset inside a layer's region maps to the stage holding the layer.
pub struct KvBuffer {
    parts: Vec<KvBufferPart>,
    bytes: usize,
}

impl KvBuffer {
    /// A buffer of `bytes` split over `stages` (each stage's layer range, its allocator) for a
    /// model of `layers` layers.
    pub(crate) fn allocate(bytes: usize, layers: usize, stages: &[(Range<usize>, &Allocator)]) -> Result<Self> {
        let mut parts = Vec::with_capacity(stages.len());
        for (range, alloc) in stages {
            let (start, end) = (bytes * range.start / layers.max(1), bytes * range.end / layers.max(1));
            let mut value = Tensor::<u8>::new(alloc, [(end - start).max(1)])
                .map_err(|e| ModelError::ort(format!("cannot allocate {} bytes for the KV cache", end - start), e))?;
            let addr = value.data_ptr_mut() as usize;
            parts.push(KvBufferPart { _value: value, addr, start, len: end - start });
        }
        Ok(KvBuffer { parts, bytes })
    }

    /// The address of byte `offset` of the buffer (in the part holding its layer).
    pub fn address(&self, offset: usize) -> usize {
        let part = self.parts.iter().rev().find(|p| p.start <= offset).unwrap_or(&self.parts[0]);
        part.addr + (offset - part.start.min(offset))
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Its allocations: (address, bytes).
    pub fn parts(&self) -> Vec<(usize, usize)> {
        self.parts.iter().map(|p| (p.addr, p.len)).collect()
    }
}
