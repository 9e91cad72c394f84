//! `MoEInt4`: the routed int4 experts of a mixture-of-experts layer (QMoE's semantics with
//! SwiGLU experts). On CUDA: routing, planning, fc1 + SwiGLU, fc2 and the weighted sum, per group
//! of up to 256 tokens; on the CPU: the reference.

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

use super::{
    attr, attr_usize, data_address, device_ordinal, f32s, numel, rows_of, shape_of, stream_of, Placement, MOE_INT4,
};
use crate::driver::Device;
use crate::error::{KernelError, Result};
use crate::gpu::{MoeKernels, MoeShape, MoeTensors, MOE_TOKENS_PER_GROUP};
use crate::layout::Int4Shape;
use crate::reference::{self, ExpertWeights};

/// `MoEInt4` in one placement.
pub struct MoeInt4Op(pub Placement);

const OP: &str = MOE_INT4;

/// Attributes of a node.
#[derive(Clone, Copy, Debug)]
struct Attrs {
    k: usize,
    normalize: bool,
    block_size: usize,
}

/// The inputs of one call, checked against each other.
struct Call<'a> {
    shape: MoeShape,
    tokens: usize,
    out_shape: Vec<i64>,
    values: Vec<ort::value::ValueRef<'a>>,
    router_weights: Option<ort::value::ValueRef<'a>>,
}

impl<'a> Call<'a> {
    fn read(ctx: &'a ComputeContext, a: Attrs) -> Result<Call<'a>> {
        let input = |i: usize| ctx.input(i)?.ok_or_else(|| KernelError::bad_input(OP, format!("input {i} is missing")));
        let values: Vec<_> = (0..6).map(input).collect::<Result<_>>()?;
        let router_weights = if ctx.num_inputs()? > 6 { ctx.input(6)? } else { None };
        let shapes: Vec<Vec<i64>> = values
            .iter()
            .enumerate()
            .map(|(i, v)| shape_of(v, OP, ["input", "router_probs", "fc1", "fc1_scales", "fc2", "fc2_scales"][i]))
            .collect::<Result<_>>()?;
        let bad = |m: String| KernelError::bad_input(OP, m);
        let x = &shapes[0];
        let hidden = x.last().copied().unwrap_or(0).max(0) as usize;
        let tokens = rows_of(x, hidden, OP, "input")?;
        let fc1 = &shapes[2];
        if fc1.len() != 3 || fc1[0] <= 0 || fc1[1] <= 0 {
            return Err(bad(format!("fc1 has shape {fc1:?}, expected (E, 2I, Hp/2)")));
        }
        let (experts, inter) = (fc1[0] as usize, fc1[1] as usize / 2);
        let shape = MoeShape { experts, k: a.k, hidden, inter, block_size: a.block_size };
        shape.validate()?;
        rows_of(&shapes[1], experts, OP, "router_probs")?;
        let s1 = Int4Shape::new(2 * inter, hidden, a.block_size)?;
        let s2 = Int4Shape::new(hidden, inter, a.block_size)?;
        let expect = [
            ("fc1", 2, experts * s1.packed_len()),
            ("fc1_scales", 3, experts * s1.scales_len()),
            ("fc2", 4, experts * s2.packed_len()),
            ("fc2_scales", 5, experts * s2.scales_len()),
        ];
        for (what, i, n) in expect {
            if numel(&shapes[i]) != n {
                return Err(bad(format!("{what} has shape {:?}, {n} elements expected", shapes[i])));
            }
        }
        if let Some(rw) = &router_weights {
            let rs = shape_of(rw, OP, "router_weights")?;
            if rows_of(&rs, experts, OP, "router_weights")? != tokens {
                return Err(bad(format!("router_weights has shape {rs:?}, expected ({tokens}, {experts})")));
            }
        }
        Ok(Call { shape, tokens, out_shape: x.clone(), values, router_weights })
    }

    fn int4_shapes(&self) -> (Int4Shape, Int4Shape) {
        let s = self.shape;
        (
            Int4Shape { n: 2 * s.inter, k: s.hidden, block_size: s.block_size },
            Int4Shape { n: s.hidden, k: s.inter, block_size: s.block_size },
        )
    }
}

impl Operator for MoeInt4Op {
    type Kernel<'attr> = Box<dyn Kernel + 'attr>;

    fn name(&self) -> &str {
        OP
    }
    fn execution_provider_type(&self) -> Option<&str> {
        self.0.execution_provider()
    }
    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let t = self.0.element_type();
        let u8t = TensorElementType::Uint8;
        [
            OperatorInput::required(t),
            OperatorInput::required(t),
            OperatorInput::required(u8t),
            OperatorInput::required(t),
            OperatorInput::required(u8t),
            OperatorInput::required(t),
            OperatorInput::optional(t),
        ]
    }
    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(self.0.element_type())]
    }
    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let read = || -> Result<Attrs> {
            let block_size = attr_usize(kctx, OP, "block_size")?;
            if !crate::source::INT4_BLOCK_SIZES.contains(&block_size) {
                return Err(KernelError::bad_input(OP, format!("block_size {block_size} is not 32, 64 or 128")));
            }
            Ok(Attrs {
                k: attr_usize(kctx, OP, "k")?,
                normalize: attr(kctx, OP, "normalize_routing_weights")? != 0,
                block_size,
            })
        };
        let attrs = read().map_err(ort::Error::wrap)?;
        Ok(match self.0 {
            Placement::Cpu => Box::new(CpuMoe { attrs }),
            Placement::Cuda(dtype) => {
                let device = Device::get(device_ordinal(kctx)).map_err(ort::Error::wrap)?;
                let kernels = MoeKernels::new(device, dtype, attrs.block_size).map_err(ort::Error::wrap)?;
                Box::new(CudaMoe { attrs, device, kernels })
            }
        })
    }
}

struct CpuMoe {
    attrs: Attrs,
}

impl CpuMoe {
    fn run(&self, ctx: &ComputeContext) -> Result<()> {
        let call = Call::read(ctx, self.attrs)?;
        let v = &call.values;
        let s = call.shape;
        let rw = call.router_weights.as_ref().map(|r| f32s(r, OP, "router_weights")).transpose()?;
        let routing =
            reference::route(f32s(&v[1], OP, "router_probs")?, rw, call.tokens, s.experts, s.k, self.attrs.normalize);
        let (s1, s2) = call.int4_shapes();
        let fc1 = ExpertWeights {
            shape: s1,
            packed: v[2].try_extract_tensor::<u8>()?.1,
            scales: f32s(&v[3], OP, "fc1_scales")?,
        };
        let fc2 = ExpertWeights {
            shape: s2,
            packed: v[4].try_extract_tensor::<u8>()?.1,
            scales: f32s(&v[5], OP, "fc2_scales")?,
        };
        let y = reference::moe_int4(
            f32s(&v[0], OP, "input")?,
            call.tokens,
            &fc1,
            &fc2,
            (&routing.0, &routing.1),
            s.k,
            |x| x,
        );
        let mut out = ctx.output(0, call.out_shape)?.ok_or_else(|| KernelError::bad_input(OP, "no output"))?;
        out.try_extract_tensor_mut::<f32>()?.1.copy_from_slice(&y);
        Ok(())
    }
}

struct CudaMoe {
    attrs: Attrs,
    device: &'static Device,
    kernels: MoeKernels,
}

impl CudaMoe {
    fn run(&self, ctx: &ComputeContext) -> Result<()> {
        let call = Call::read(ctx, self.attrs)?;
        let s = call.shape;
        let out = ctx.output(0, call.out_shape.clone())?.ok_or_else(|| KernelError::bad_input(OP, "no output"))?;
        if call.tokens == 0 {
            return Ok(());
        }
        let v = &call.values;
        let base = MoeTensors {
            x: data_address(&v[0])?,
            probs: data_address(&v[1])?,
            router_weights: call.router_weights.as_ref().map(|r| data_address(r)).transpose()?.unwrap_or(0),
            fc1: data_address(&v[2])?,
            fc1_scales: data_address(&v[3])?,
            fc2: data_address(&v[4])?,
            fc2_scales: data_address(&v[5])?,
            y: data_address(&out)?,
        };
        let stream = stream_of(ctx, OP)?;
        self.device.make_current()?;
        let group = call.tokens.min(MOE_TOKENS_PER_GROUP);
        let dtype_bytes = 2;
        let (bytes, _) = s.scratch_layout(group, dtype_bytes);
        let info =
            MemoryInfo::new(AllocationDevice::CUDA, self.device.ordinal, AllocatorType::Device, MemoryType::Default)?;
        let allocator = ctx.allocator(&info)?;
        // Freed when the call returns: later users of the memory are ordered after this work on the stream.
        let block = allocator.alloc::<u8>(bytes)?;
        for start in (0..call.tokens).step_by(MOE_TOKENS_PER_GROUP) {
            let tokens = MOE_TOKENS_PER_GROUP.min(call.tokens - start);
            let (row_h, row_e) = ((start * s.hidden * dtype_bytes) as u64, (start * s.experts * dtype_bytes) as u64);
            let t = MoeTensors {
                x: base.x + row_h,
                probs: base.probs + row_e,
                router_weights: if base.router_weights == 0 { 0 } else { base.router_weights + row_e },
                y: base.y + row_h,
                ..base
            };
            let scratch = s.scratch_at(block.as_ptr() as u64, tokens, dtype_bytes);
            // SAFETY: ONNX Runtime's tensors of the checked sizes and a scratch block laid out for
            // `tokens`, all alive until this call returns; the launches are ordered on the stream.
            unsafe { self.kernels.launch(stream, &s, &t, &scratch, tokens, self.attrs.normalize)? };
        }
        drop(block);
        Ok(())
    }
}

kernel_through_run!(CpuMoe, CudaMoe);
