//! `GroupQueryAttention` (domain ai.pio): com.microsoft GroupQueryAttention's inputs, outputs and
//! attributes, with one-token steps on the shared KV buffer (every decode step, batched or not)
//! run by Inference-PIO's decode kernel, and every other call (prompts, chunks, a cache that is
//! not shared) handed to ONNX Runtime's own GroupQueryAttention in a session of one node on the
//! same device ([`super::nested`]), on the same tensors. On the CPU the one-token path is the f32
//! reference.

use std::sync::Arc;

use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::sys::OrtValue;
use ort::value::{TensorElementType, ValueRef, ValueRefMut};
use ort::AsPointer;

use super::nested::{AttrValue, NestedGqa, NestedSpec};
use super::{attr, data_address, device_ordinal, f32s, shape_of, stream_of, Placement, GROUP_QUERY_ATTENTION};
use crate::driver::{Device, DeviceBuffer, Stream};
use crate::error::{KernelError, Result};
use crate::gpu::{DecodeAttentionKernels, DecodeAttentionShape, DecodeAttentionTensors};
use crate::reference::{self, DecodeAttentionInputs};
use crate::source::ATTENTION_HEAD_DIM;

/// `GroupQueryAttention` in one placement; the environment builds the nested sessions.
pub struct GroupQueryAttentionOp(pub Placement, pub &'static Environment);

const OP: &str = GROUP_QUERY_ATTENTION;
/// com.microsoft GroupQueryAttention's inputs.
const INPUTS: usize = 16;
/// (batch x KV heads) counters of the split merge: the most rows one decode step may have.
const MAX_COUNTERS: usize = 1 << 16;

/// Attributes of a node, and whether the one-token kernel applies to them.
#[derive(Clone, Debug)]
struct Attrs {
    heads: usize,
    kv_heads: usize,
    /// The node's scale (0: 1 / sqrt(head size)).
    scale: f32,
    window: usize,
    eps: f32,
    /// Why one-token steps also go to ONNX Runtime's operator, or None.
    native_only: Option<String>,
    /// Every attribute the node has, for ONNX Runtime's operator.
    pass_through: Vec<(&'static str, AttrValue)>,
}

impl Attrs {
    fn read(kctx: &KernelContext<'_>) -> Result<Attrs> {
        let heads = usize::try_from(attr(kctx, OP, "num_heads")?)
            .map_err(|_| KernelError::bad_input(OP, "num_heads is negative"))?;
        let kv_heads = usize::try_from(attr(kctx, OP, "kv_num_heads")?)
            .map_err(|_| KernelError::bad_input(OP, "kv_num_heads is negative"))?;
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(KernelError::bad_input(OP, format!("{heads} heads over {kv_heads} KV heads")));
        }
        let mut pass_through =
            vec![("num_heads", AttrValue::Int(heads as i64)), ("kv_num_heads", AttrValue::Int(kv_heads as i64))];
        let mut native_only = Vec::new();
        for name in ["do_rotary", "rotary_interleaved", "local_window_size", "smooth_softmax", "kv_cache_bit_width"] {
            if let Some(v) = kctx.get::<i64>(name) {
                pass_through.push((name, AttrValue::Int(v)));
            }
        }
        for name in ["scale", "softcap", "qk_norm_epsilon"] {
            if let Some(v) = kctx.get::<f32>(name) {
                pass_through.push((name, AttrValue::Float(v)));
            }
        }
        for name in ["k_quant_type", "v_quant_type"] {
            if let Some(v) = kctx.get::<String>(name) {
                if v != "NONE" {
                    native_only.push(format!("{name} {v}"));
                }
                pass_through.push((name, AttrValue::Str(v)));
            }
        }
        if kctx.get::<i64>("rotary_interleaved").unwrap_or(0) != 0 {
            native_only.push("interleaved rotary".into());
        }
        if kctx.get::<f32>("softcap").unwrap_or(0.0) != 0.0 {
            native_only.push("softcap".into());
        }
        if kctx.get::<i64>("smooth_softmax").unwrap_or(0) != 0 {
            native_only.push("smooth softmax".into());
        }
        let window = kctx.get::<i64>("local_window_size").unwrap_or(-1).max(0) as usize;
        let scale = kctx.get::<f32>("scale").unwrap_or(0.0);
        Ok(Attrs {
            heads,
            kv_heads,
            scale,
            window,
            eps: kctx.get::<f32>("qk_norm_epsilon").unwrap_or(1e-6),
            native_only: (!native_only.is_empty()).then(|| native_only.join(", ")),
            pass_through,
        })
    }
}

/// The inputs of one call and the output shapes, checked.
struct Call<'a> {
    inputs: Vec<Option<ValueRef<'a>>>,
    batch: usize,
    seq: usize,
    head_dim: usize,
    /// The query input holds q, k and v packed.
    packed: bool,
    out_shape: Vec<i64>,
    /// present_key's and present_value's: past's with room for the total length, or (B,
    /// kv_heads, total, D) without a past (GroupQueryAttention's rule).
    present_shape: Vec<i64>,
}

impl<'a> Call<'a> {
    fn read(ctx: &'a ComputeContext, a: &Attrs) -> Result<Call<'a>> {
        let n = ctx.num_inputs()?.min(INPUTS);
        let inputs: Vec<Option<ValueRef<'a>>> =
            (0..INPUTS).map(|i| if i < n { ctx.input(i) } else { Ok(None) }).collect::<ort::Result<_>>()?;
        let bad = |m: String| KernelError::bad_input(OP, m);
        let query = inputs[0].as_ref().ok_or_else(|| bad("input 0 (query) is missing".into()))?;
        let qs = shape_of(query, OP, "query")?;
        let [b, s, w] = qs[..] else { return Err(bad(format!("query has shape {qs:?}, expected (B, S, width)"))) };
        let (batch, seq, width) = (b.max(0) as usize, s.max(0) as usize, w.max(0) as usize);
        let packed = inputs[1].is_none();
        let per_token_heads = if packed { a.heads + 2 * a.kv_heads } else { a.heads };
        if !width.is_multiple_of(per_token_heads) {
            return Err(bad(format!("query width {width} over {per_token_heads} heads")));
        }
        let head_dim = width / per_token_heads;
        let total = inputs[6].as_ref().ok_or_else(|| bad("input 6 (total_sequence_length) is missing".into()))?;
        let total = *total
            .try_extract_tensor::<i32>()?
            .1
            .first()
            .ok_or_else(|| bad("total_sequence_length is empty".into()))?;
        let present_shape = match &inputs[3] {
            Some(past) => {
                let ps = shape_of(past, OP, "past_key")?;
                if ps.len() != 4 {
                    return Err(bad(format!("past_key has shape {ps:?}, expected (B, kv_heads, S, D)")));
                }
                vec![ps[0], ps[1], ps[2].max(total as i64), ps[3]]
            }
            None => vec![b, a.kv_heads as i64, total as i64, head_dim as i64],
        };
        Ok(Call {
            inputs,
            batch,
            seq,
            head_dim,
            packed,
            out_shape: vec![b, s, (a.heads * head_dim) as i64],
            present_shape,
        })
    }

    fn value(&self, i: usize) -> Option<&ValueRef<'a>> {
        self.inputs[i].as_ref()
    }

    fn input_ptrs(&self) -> Vec<*const OrtValue> {
        self.inputs.iter().map(|v| v.as_ref().map_or(std::ptr::null(), |v| v.ptr())).collect()
    }
}

/// The call's outputs: attention output and the present key and value.
struct Outputs<'a> {
    out: ValueRefMut<'a>,
    present_k: ValueRefMut<'a>,
    present_v: ValueRefMut<'a>,
}

impl<'a> Outputs<'a> {
    fn get(ctx: &'a ComputeContext, call: &Call<'_>) -> Result<Outputs<'a>> {
        let missing = |i: usize| KernelError::bad_input(OP, format!("output {i} is missing"));
        Ok(Outputs {
            out: ctx.output(0, call.out_shape.clone())?.ok_or_else(|| missing(0))?,
            present_k: ctx.output(1, call.present_shape.clone())?.ok_or_else(|| missing(1))?,
            present_v: ctx.output(2, call.present_shape.clone())?.ok_or_else(|| missing(2))?,
        })
    }

    fn ptrs(&self) -> [*mut OrtValue; 3] {
        [self.out.ptr().cast_mut(), self.present_k.ptr().cast_mut(), self.present_v.ptr().cast_mut()]
    }
}

/// Whether a call is a one-token step on the shared buffer that the decode path takes
/// (`any_head_dim`: the CPU reference; the kernel takes heads of [`ATTENTION_HEAD_DIM`]).
fn one_token_step(a: &Attrs, call: &Call<'_>, outs: &Outputs<'_>, any_head_dim: bool) -> Result<bool> {
    if a.native_only.is_some() || call.seq != 1 || !(any_head_dim || call.head_dim == ATTENTION_HEAD_DIM) {
        return Ok(false);
    }
    // Inputs the kernel does not read: attention_bias, head_sink, the int8 cache's scales.
    if (10..14).any(|i| call.value(i).is_some()) {
        return Ok(false);
    }
    let (Some(pk), Some(pv)) = (call.value(3), call.value(4)) else { return Ok(false) };
    let shared =
        data_address(pk)? == data_address(&outs.present_k)? && data_address(pv)? == data_address(&outs.present_v)?;
    Ok(shared)
}

/// The decode kernel's shape of a one-token step (whose present buffer is past's, shared).
fn decode_shape(a: &Attrs, call: &Call<'_>) -> Result<DecodeAttentionShape> {
    let (rot_half, cos_rows) = match call.value(7) {
        Some(cos) => {
            let cs = shape_of(cos, OP, "cos_cache")?;
            (cs.get(1).copied().unwrap_or(0).max(0) as usize, cs.first().copied().unwrap_or(0).max(0) as usize)
        }
        None => (0, 0),
    };
    Ok(DecodeAttentionShape {
        batch: call.batch,
        head_dim: call.head_dim,
        heads: a.heads,
        kv_heads: a.kv_heads,
        capacity: call.present_shape[2].max(0) as usize,
        rot_half,
        cos_rows,
        window: a.window,
        scale: if a.scale == 0.0 { 1.0 / (call.head_dim as f32).sqrt() } else { a.scale },
        eps: a.eps,
    })
}

impl Operator for GroupQueryAttentionOp {
    type Kernel<'attr> = Box<dyn Kernel + 'attr>;

    fn name(&self) -> &str {
        OP
    }
    fn execution_provider_type(&self) -> Option<&str> {
        self.0.execution_provider()
    }
    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let t = self.0.element_type();
        let (i32t, i64t, f32t) = (TensorElementType::Int32, TensorElementType::Int64, TensorElementType::Float32);
        [
            OperatorInput::required(t),
            OperatorInput::optional(t),
            OperatorInput::optional(t),
            OperatorInput::optional(t),
            OperatorInput::optional(t),
            OperatorInput::required(i32t),
            // ONNX Runtime's operator reads it on the host.
            OperatorInput::required(i32t).memory_type(MemoryType::CPUInput),
            OperatorInput::optional(t),
            OperatorInput::optional(t),
            OperatorInput::optional(i64t),
            OperatorInput::optional(t),
            OperatorInput::optional(t),
            OperatorInput::optional(f32t),
            OperatorInput::optional(f32t),
            OperatorInput::optional(t),
            OperatorInput::optional(t),
        ]
    }
    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        let t = self.0.element_type();
        [OperatorOutput::required(t), OperatorOutput::required(t), OperatorOutput::required(t)]
    }
    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let attrs = Attrs::read(kctx).map_err(ort::Error::wrap)?;
        let device = match self.0 {
            Placement::Cpu => None,
            Placement::Cuda(_) => Some(device_ordinal(kctx)),
        };
        let native = Native { env: self.1, device, element: self.0.element_type(), current: None };
        if let Some(why) = &attrs.native_only {
            tracing::info!("{OP}: every call runs ONNX Runtime's GroupQueryAttention ({why})");
        }
        Ok(match self.0 {
            Placement::Cpu => Box::new(CpuAttention { attrs, native }),
            Placement::Cuda(dtype) => {
                let device = Device::get(device_ordinal(kctx)).map_err(ort::Error::wrap)?;
                let kernels = DecodeAttentionKernels::new(device, dtype).map_err(ort::Error::wrap)?;
                let counters = device
                    .with_context(|| {
                        let c = DeviceBuffer::new(MAX_COUNTERS * 4)?;
                        c.zero()?;
                        Ok(c)
                    })
                    .map_err(ort::Error::wrap)?;
                let forced_native = std::env::var_os(NATIVE_ONLY_VAR).is_some();
                Box::new(CudaAttention { attrs, native, device, kernels, counters: Some(counters), forced_native })
            }
        })
    }
}

/// The element type of input `i` of GroupQueryAttention, whose float tensors are `t`.
fn input_type(i: usize, t: TensorElementType) -> TensorElementType {
    match i {
        5 | 6 => TensorElementType::Int32,
        9 => TensorElementType::Int64,
        12 | 13 => TensorElementType::Float32,
        _ => t,
    }
}

/// ONNX Runtime's GroupQueryAttention for the calls the op hands on: a nested session for this
/// node's attributes and the call's inputs, kept while they stay the same.
struct Native {
    env: &'static Environment,
    device: Option<i32>,
    element: TensorElementType,
    current: Option<(NestedSpec, Arc<NestedGqa>)>,
}

impl Native {
    fn run(&mut self, a: &Attrs, call: &Call<'_>, outs: &Outputs<'_>, caller: Option<Stream>) -> Result<()> {
        let inputs = call
            .inputs
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_ref().map(|v| shape_of(v, OP, "input").map(|s| (input_type(i, self.element), s.len()))).transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let spec = NestedSpec { device: self.device, attrs: a.pass_through.clone(), inputs, output_type: self.element };
        let session = match &self.current {
            Some((s, session)) if *s == spec => Arc::clone(session),
            _ => {
                let session = NestedGqa::get(self.env, &spec)?;
                self.current = Some((spec, Arc::clone(&session)));
                session
            }
        };
        session.run(caller, &call.input_ptrs(), &outs.ptrs())
    }
}

struct CpuAttention {
    attrs: Attrs,
    native: Native,
}

impl CpuAttention {
    fn run(&mut self, ctx: &ComputeContext) -> Result<()> {
        let a = &self.attrs;
        let call = Call::read(ctx, a)?;
        let mut outs = Outputs::get(ctx, &call)?;
        if !one_token_step(a, &call, &outs, true)? {
            return self.native.run(a, &call, &outs, None);
        }
        let shape = decode_shape(a, &call)?;
        let d = call.head_dim;
        let missing = |what: &str| KernelError::bad_input(OP, format!("{what} is missing"));
        let q = f32s(call.value(0).ok_or_else(|| missing("query"))?, OP, "query")?;
        let (k, v, q_row, kv_row) = if call.packed {
            let row = (a.heads + 2 * a.kv_heads) * d;
            (&q[a.heads * d..], &q[(a.heads + a.kv_heads) * d..], row, row)
        } else {
            let k = f32s(call.value(1).ok_or_else(|| missing("key"))?, OP, "key")?;
            let v = f32s(call.value(2).ok_or_else(|| missing("value"))?, OP, "value")?;
            (k, v, a.heads * d, a.kv_heads * d)
        };
        let seqlens = call.value(5).ok_or_else(|| missing("seqlens_k"))?;
        let seqlens = seqlens.try_extract_tensor::<i32>()?.1;
        let position_ids = call.value(9).map(|p| p.try_extract_tensor::<i64>().map(|(_, d)| d)).transpose()?;
        let rotary = match (call.value(7), call.value(8)) {
            (Some(c), Some(s)) => Some((f32s(c, OP, "cos_cache")?, f32s(s, OP, "sin_cache")?)),
            _ => None,
        };
        let norms = match (call.value(14), call.value(15)) {
            (Some(qn), Some(kn)) => Some((f32s(qn, OP, "q_norm")?, f32s(kn, OP, "k_norm")?)),
            _ => None,
        };
        let inputs = DecodeAttentionInputs { q, k, v, q_row, kv_row, seqlens, position_ids, rotary, norms };
        let kc = outs.present_k.try_extract_tensor_mut::<f32>()?.1;
        let vc = outs.present_v.try_extract_tensor_mut::<f32>()?.1;
        let y = reference::decode_attention(&inputs, &shape, kc, vc);
        outs.out.try_extract_tensor_mut::<f32>()?.1.copy_from_slice(&y);
        Ok(())
    }
}

struct CudaAttention {
    attrs: Attrs,
    native: Native,
    device: &'static Device,
    kernels: DecodeAttentionKernels,
    counters: Option<DeviceBuffer>,
    /// [`NATIVE_ONLY_VAR`] was set when the session loaded: every call on ONNX Runtime's operator.
    forced_native: bool,
}

impl CudaAttention {
    fn run(&mut self, ctx: &ComputeContext) -> Result<()> {
        let a = &self.attrs;
        let call = Call::read(ctx, a)?;
        let outs = Outputs::get(ctx, &call)?;
        let stream = stream_of(ctx, OP)?;
        self.device.make_current()?;
        if self.forced_native || !one_token_step(a, &call, &outs, false)? {
            return self.native.run(a, &call, &outs, Some(stream));
        }
        let shape = decode_shape(a, &call)?;
        if call.batch * a.kv_heads > MAX_COUNTERS {
            return Err(KernelError::bad_input(
                OP,
                format!("{} sequences x {} KV heads: the decode kernel takes {MAX_COUNTERS}", call.batch, a.kv_heads),
            ));
        }
        let d = call.head_dim;
        let elem = 2u64;
        let addr = |i: usize| call.value(i).map(|v| data_address(v)).transpose().map(|o| o.unwrap_or(0));
        let q = addr(0)?;
        let (k, v, q_row, kv_row) = if call.packed {
            let row = (a.heads + 2 * a.kv_heads) * d;
            (q + elem * (a.heads * d) as u64, q + elem * ((a.heads + a.kv_heads) * d) as u64, row, row)
        } else {
            (addr(1)?, addr(2)?, a.heads * d, a.kv_heads * d)
        };
        let (q_norm, k_norm) = match (addr(14)?, addr(15)?) {
            (qn, kn) if qn != 0 && kn != 0 => (qn, kn),
            _ => (0, 0),
        };
        let t = DecodeAttentionTensors {
            q,
            k,
            v,
            q_row,
            kv_row,
            kcache: data_address(&outs.present_k)?,
            vcache: data_address(&outs.present_v)?,
            seqlens: addr(5)?,
            position_ids: addr(9)?,
            cos: if shape.rot_half > 0 { addr(7)? } else { 0 },
            sin: if shape.rot_half > 0 { addr(8)? } else { 0 },
            q_norm,
            k_norm,
            out: data_address(&outs.out)?,
        };
        let info =
            MemoryInfo::new(AllocationDevice::CUDA, self.device.ordinal, AllocatorType::Device, MemoryType::Default)?;
        let allocator = ctx.allocator(&info)?;
        // Freed when the call returns: later users of the memory are ordered after this work on the stream.
        let partial = allocator.alloc::<f32>(self.kernels.partial_len(&shape).max(1))?;
        let counters = self.counters.as_ref().map_or(0, |c| c.ptr);
        // SAFETY: ONNX Runtime's tensors of the checked shapes, a partial block of the kernels'
        // length and the zeroed counters, all alive until the launch has run on the stream.
        unsafe { self.kernels.launch(stream, &shape, &t, partial.as_ptr() as u64, counters)? };
        drop(partial);
        Ok(())
    }
}

/// Set (to anything) to run every call of the op on ONNX Runtime's GroupQueryAttention: an A/B
/// switch for the GPU check, not a setting.
pub const NATIVE_ONLY_VAR: &str = "PIO_ATTENTION_NATIVE_ONLY";

impl Drop for CudaAttention {
    fn drop(&mut self) {
        // The counters are freed in the device's context, which this thread may not have current.
        if let Some(c) = self.counters.take() {
            let _ = self.device.with_context(|| {
                drop(c);
                Ok(())
            });
        }
    }
}

kernel_through_run!(CpuAttention, CudaAttention);
