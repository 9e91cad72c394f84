//! The custom operators (domain [`DOMAIN`]) for ONNX Runtime, each registered for the CUDA
//! execution provider (float16 and bfloat16: the kernels, on the provider's stream, tensors on
//! the GPU) and for the CPU (float32: the Rust reference). ONNX Runtime picks by provider and
//! element type, so a CUDA session runs the kernels and a CPU session the reference; a graph
//! with these ops fails to load in an ONNX Runtime session that did not register the domain
//! ("ai.pio:LinearInt4(-1) is not a registered function/op").
//!
//! | op | inputs | attributes | output |
//! |---|---|---|---|
//! | `LinearInt4` | A (…, K), B uint8 (N, Kp/2) in [`crate::layout`]'s order, scales (N, Kp/block) | `K`, `N`, `block_size`, `activation` (0, or 1: SwiGLU of gate/up rows grouped by 16) | (…, N) or (…, N/2) |
//! | `Linear` | A (…, K), W (N, K) | `K`, `N`, `activation` | (…, N) or (…, N/2) |
//! | `MoEInt4` | input (…, H), router_probs (…, E), fc1 uint8 (E, 2I, Hp/2), fc1_scales, fc2 uint8 (E, H, Ip/2), fc2_scales, router_weights (…, E, optional) | `k`, `normalize_routing_weights`, `block_size` | (…, H) |
//!
//! | `GroupQueryAttention` | com.microsoft GroupQueryAttention's 16 | its attributes | its 3 |
//!
//! `GroupQueryAttention` runs one-token steps on the shared KV buffer with the decode kernel (on
//! the CPU the f32 reference) and hands every other call to ONNX Runtime's own
//! GroupQueryAttention in a session of one node ([`nested`]).
//!
//! `MoEInt4` computes what com.microsoft QMoE does with SwiGLU experts (`swiglu_fusion`, top-k
//! routing by `router_probs`, mixing by its softmax or by `router_weights`), with fc1's rows
//! grouped as for `LinearInt4`'s SwiGLU.

/// ONNX Runtime's [`ort::operator::Kernel`] for each kernel type through its own
/// `run(&mut self, ctx) -> crate::error::Result<()>`: the [`KernelError`] reaches ONNX Runtime
/// wrapped with its source chain, never as text.
macro_rules! kernel_through_run {
    ($($kernel:ty),+ $(,)?) => {$(
        impl ort::operator::Kernel for $kernel {
            fn compute(&mut self, ctx: &ort::operator::ComputeContext) -> ort::Result<()> {
                self.run(ctx).map_err(ort::Error::wrap)
            }
        }
    )+};
}

mod attention;
mod linear;
mod moe;
pub mod nested;

use std::ffi::c_void;

use ort::operator::{KernelContext, OperatorDomain};
use ort::value::{TensorElementType, ValueType};
use ort::AsPointer;

use crate::error::{KernelError, Result};
use crate::source::ActDtype;

pub use attention::{GroupQueryAttentionOp, NATIVE_ONLY_VAR};
pub use linear::{LinearInt4Op, LinearOp};
pub use moe::MoeInt4Op;

/// The operator domain of the graphs that use these kernels.
pub const DOMAIN: &str = "ai.pio";
/// Operator names.
pub const LINEAR_INT4: &str = "LinearInt4";
pub const LINEAR: &str = "Linear";
pub const MOE_INT4: &str = "MoEInt4";
pub const GROUP_QUERY_ATTENTION: &str = "GroupQueryAttention";
/// `activation` attribute values.
pub const ACTIVATION_NONE: i64 = 0;
pub const ACTIVATION_SWIGLU: i64 = 1;

const CUDA_EP: &str = "CUDAExecutionProvider";

/// Where a registered variant runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The CPU provider, float32.
    Cpu,
    /// The CUDA provider, with this activation dtype.
    Cuda(ActDtype),
}

impl Placement {
    fn element_type(self) -> TensorElementType {
        match self {
            Placement::Cpu => TensorElementType::Float32,
            Placement::Cuda(ActDtype::F16) => TensorElementType::Float16,
            Placement::Cuda(ActDtype::Bf16) => TensorElementType::Bfloat16,
        }
    }
    fn execution_provider(self) -> Option<&'static str> {
        match self {
            Placement::Cpu => None,
            Placement::Cuda(_) => Some(CUDA_EP),
        }
    }
    const ALL: [Placement; 3] = [Placement::Cpu, Placement::Cuda(ActDtype::F16), Placement::Cuda(ActDtype::Bf16)];
}

/// Every operator in every placement, ready for `SessionBuilder::with_operators`; `env` (the
/// session's environment) builds the sessions `GroupQueryAttention` hands prompts to.
pub fn operator_domain(env: &'static ort::environment::Environment) -> ort::Result<OperatorDomain> {
    let mut domain = OperatorDomain::new(DOMAIN)?;
    for p in Placement::ALL {
        domain =
            domain.add(LinearInt4Op(p))?.add(LinearOp(p))?.add(MoeInt4Op(p))?.add(GroupQueryAttentionOp(p, env))?;
    }
    Ok(domain)
}

/// A required integer attribute.
fn attr(kctx: &KernelContext<'_>, op: &'static str, name: &str) -> Result<i64> {
    kctx.get::<i64>(name).ok_or_else(|| KernelError::bad_input(op, format!("attribute `{name}` is missing")))
}

/// A non-negative integer attribute as usize.
fn attr_usize(kctx: &KernelContext<'_>, op: &'static str, name: &str) -> Result<usize> {
    let v = attr(kctx, op, name)?;
    usize::try_from(v).map_err(|_| KernelError::bad_input(op, format!("attribute `{name}` = {v} is negative")))
}

/// The shape of a tensor value.
fn shape_of(v: &ort::value::DynValue, op: &'static str, what: &str) -> Result<Vec<i64>> {
    match v.dtype() {
        ValueType::Tensor { shape, .. } => Ok(shape.to_vec()),
        other => Err(KernelError::bad_input(op, format!("{what} is not a tensor ({other:?})"))),
    }
}

/// Rows of an (…, width) tensor: the product of the leading dims, after checking the last.
fn rows_of(shape: &[i64], width: usize, op: &'static str, what: &str) -> Result<usize> {
    match shape.split_last() {
        Some((&last, lead)) if last >= 0 && last as usize == width => {
            Ok(lead.iter().map(|&d| d.max(0) as usize).product())
        }
        _ => Err(KernelError::bad_input(op, format!("{what} has shape {shape:?}, expected (…, {width})"))),
    }
}

/// The f32 data of a CPU operator's tensor, an error naming the operator and the tensor otherwise.
fn f32s<'v>(v: &'v ort::value::DynValue, op: &'static str, what: &str) -> Result<&'v [f32]> {
    v.try_extract_tensor::<f32>().map(|(_, d)| d).map_err(|e| KernelError::bad_input(op, format!("{what}: {e}")))
}

/// The number of elements a shape holds.
fn numel(shape: &[i64]) -> usize {
    shape.iter().map(|&d| d.max(0) as usize).product()
}

/// The data address of a tensor (device memory for CUDA kernels).
fn data_address(v: &ort::value::DynValue) -> Result<u64> {
    let mut out: *mut c_void = std::ptr::null_mut();
    let api = ort::api();
    // SAFETY: a live tensor value; ONNX Runtime writes its data pointer.
    let status = unsafe { (api.GetTensorMutableData)(v.ptr().cast_mut(), &mut out) };
    if !status.0.is_null() {
        // SAFETY: a non-null status is released once.
        unsafe { (api.ReleaseStatus)(status.0) };
        return Err(KernelError::bad_input("custom op", "cannot read a tensor's data address"));
    }
    Ok(out as u64)
}

/// The device a CUDA kernel runs on: the device of its provider's allocator.
fn device_ordinal(kctx: &KernelContext<'_>) -> i32 {
    match kctx.allocator(ort::memory::MemoryType::Default) {
        Ok(a) => a.memory_info().device_id(),
        Err(e) => {
            tracing::debug!("no allocator in the kernel info ({e}); using CUDA device 0");
            0
        }
    }
}

/// The CUDA stream of a compute call.
fn stream_of(ctx: &ort::operator::ComputeContext, op: &'static str) -> Result<crate::driver::Stream> {
    let s = ctx.stream()?.ok_or_else(|| KernelError::bad_input(op, "the CUDA provider gave no compute stream"))?;
    Ok(s.as_ptr().cast())
}

/// Runs `f` on row ranges of `0..n` split over the CPU's cores (the CPU references are per-row).
fn par_rows(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1).min(n.max(1));
    if threads <= 1 {
        f(0..n);
        return;
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for start in (0..n).step_by(per) {
            let f = &f;
            s.spawn(move || f(start..(start + per).min(n)));
        }
    });
}
