//! `LinearInt4` and `Linear`: y = x W^T, optionally with the SwiGLU of grouped gate/up rows.
//! On CUDA, up to 32 tokens go through the tile kernels (one read of W); more (a prefill) through
//! cuBLAS (int4 weights dequantized into a scratch buffer first, as ONNX Runtime's MatMulNBits
//! does), or, when ONNX Runtime's cuBLAS is not reachable, through the tile kernels 32 tokens at a
//! time.

use std::sync::Mutex;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

use super::{
    attr_usize, data_address, device_ordinal, numel, par_rows, rows_of, shape_of, stream_of, Placement,
    ACTIVATION_NONE, ACTIVATION_SWIGLU, LINEAR, LINEAR_INT4,
};
use crate::cublas::Cublas;
use crate::driver::{Device, Stream};
use crate::error::{KernelError, Result};
use crate::gpu::{default_warps, LinearKernels, WeightFormat, MAX_TOKENS};
use crate::layout::{unsupported_reason, Int4Shape};
use crate::reference;
use crate::source::ActDtype;

/// `LinearInt4` in one placement.
pub struct LinearInt4Op(pub Placement);
/// `Linear` (16-bit weights on CUDA, f32 on the CPU) in one placement.
pub struct LinearOp(pub Placement);

/// What a node computes, from its attributes.
#[derive(Clone, Copy, Debug)]
struct Spec {
    op: &'static str,
    format: WeightFormat,
    n: usize,
    k: usize,
    swiglu: bool,
}

impl Spec {
    fn read(kctx: &KernelContext<'_>, op: &'static str, int4: bool) -> Result<Spec> {
        let (n, k) = (attr_usize(kctx, op, "N")?, attr_usize(kctx, op, "K")?);
        if let Some(why) = unsupported_reason(n, k) {
            return Err(KernelError::bad_input(op, why));
        }
        let format = if int4 {
            let block_size = attr_usize(kctx, op, "block_size")?;
            Int4Shape::new(n, k, block_size)?;
            WeightFormat::Int4 { block_size }
        } else {
            WeightFormat::Dense
        };
        let swiglu = match kctx.get::<i64>("activation").unwrap_or(ACTIVATION_NONE) {
            ACTIVATION_NONE => false,
            ACTIVATION_SWIGLU => true,
            other => {
                return Err(KernelError::bad_input(op, format!("activation {other} is not 0 (none) or 1 (SwiGLU)")))
            }
        };
        if swiglu && !n.is_multiple_of(16) {
            return Err(KernelError::bad_input(op, format!("SwiGLU needs N ({n}) in groups of 16 rows")));
        }
        Ok(Spec { op, format, n, k, swiglu })
    }

    fn out_features(&self) -> usize {
        if self.swiglu {
            self.n / 2
        } else {
            self.n
        }
    }

    fn int4_shape(&self) -> Option<Int4Shape> {
        match self.format {
            WeightFormat::Int4 { block_size } => Some(Int4Shape { n: self.n, k: self.k, block_size }),
            WeightFormat::Dense => None,
        }
    }

    /// Checks the weight inputs' sizes (a wrong graph must not read out of bounds).
    fn check_weights(&self, w: &[i64], scales: Option<&[i64]>) -> Result<()> {
        let expected = match self.int4_shape() {
            Some(s) => s.packed_len(),
            None => self.n * self.k,
        };
        if numel(w) != expected {
            return Err(KernelError::bad_input(
                self.op,
                format!("weight has shape {w:?}, {expected} elements expected"),
            ));
        }
        if let (Some(s), Some(shape)) = (self.int4_shape(), scales) {
            if numel(shape) != s.scales_len() {
                return Err(KernelError::bad_input(
                    self.op,
                    format!("scales have shape {shape:?}, {} elements expected", s.scales_len()),
                ));
            }
        }
        Ok(())
    }

    /// The output shape for input shape `x`, and the token count.
    fn output_shape(&self, x: &[i64]) -> Result<(Vec<i64>, usize)> {
        let m = rows_of(x, self.k, self.op, "input A")?;
        let mut out = x.to_vec();
        if let Some(last) = out.last_mut() {
            *last = self.out_features() as i64;
        }
        Ok((out, m))
    }
}

fn inputs(p: Placement, int4: bool) -> Vec<OperatorInput> {
    let t = p.element_type();
    if int4 {
        vec![OperatorInput::required(t), OperatorInput::required(TensorElementType::Uint8), OperatorInput::required(t)]
    } else {
        vec![OperatorInput::required(t), OperatorInput::required(t)]
    }
}

macro_rules! linear_operator {
    ($ty:ident, $name:expr, $int4:expr) => {
        impl Operator for $ty {
            type Kernel<'attr> = Box<dyn Kernel + 'attr>;

            fn name(&self) -> &str {
                $name
            }
            fn execution_provider_type(&self) -> Option<&str> {
                self.0.execution_provider()
            }
            fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
                inputs(self.0, $int4)
            }
            fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
                [OperatorOutput::required(self.0.element_type())]
            }
            fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
                let spec = Spec::read(kctx, $name, $int4).map_err(ort::Error::wrap)?;
                Ok(match self.0 {
                    Placement::Cpu => Box::new(CpuLinear { spec }),
                    Placement::Cuda(dtype) => {
                        Box::new(CudaLinear::new(spec, dtype, device_ordinal(kctx)).map_err(ort::Error::wrap)?)
                    }
                })
            }
        }
    };
}

linear_operator!(LinearInt4Op, LINEAR_INT4, true);
linear_operator!(LinearOp, LINEAR, false);

/// The CPU implementation: the reference, rows split over the cores.
struct CpuLinear {
    spec: Spec,
}

impl CpuLinear {
    fn run(&self, ctx: &ComputeContext) -> Result<()> {
        let s = self.spec;
        let input =
            |i: usize| ctx.input(i)?.ok_or_else(|| KernelError::bad_input(s.op, format!("input {i} is missing")));
        let x = input(0)?;
        let w = input(1)?;
        let (out_shape, m) = s.output_shape(&shape_of(&x, s.op, "input A")?)?;
        let (_, xv) = x.try_extract_tensor::<f32>()?;
        let gu = Mutex::new(vec![0f32; m * s.n]);
        match s.int4_shape() {
            Some(shape) => {
                let scales = input(2)?;
                s.check_weights(&shape_of(&w, s.op, "B")?, Some(&shape_of(&scales, s.op, "scales")?))?;
                let (_, packed) = w.try_extract_tensor::<u8>()?;
                let (_, sv) = scales.try_extract_tensor::<f32>()?;
                let (rb, sc) = (shape.row_bytes(), shape.scale_cols());
                par_rows(s.n, |rows| {
                    let sub = Int4Shape { n: rows.len(), ..shape };
                    let part = reference::linear_int4(
                        xv,
                        m,
                        &sub,
                        &packed[rows.start * rb..rows.end * rb],
                        &sv[rows.start * sc..rows.end * sc],
                    );
                    scatter_columns(&gu, &part, m, s.n, rows);
                });
            }
            None => {
                s.check_weights(&shape_of(&w, s.op, "W")?, None)?;
                let (_, wv) = w.try_extract_tensor::<f32>()?;
                par_rows(s.n, |rows| {
                    let part = reference::linear_dense(xv, m, rows.len(), s.k, &wv[rows.start * s.k..rows.end * s.k]);
                    scatter_columns(&gu, &part, m, s.n, rows);
                });
            }
        }
        let gu = gu.into_inner().unwrap_or_else(|p| p.into_inner());
        let y = if s.swiglu { reference::swiglu_grouped(&gu, m, s.n) } else { gu };
        let mut out = ctx.output(0, out_shape)?.ok_or_else(|| KernelError::bad_input(s.op, "no output"))?;
        let (_, dst) = out.try_extract_tensor_mut::<f32>()?;
        dst.copy_from_slice(&y);
        Ok(())
    }
}

/// Writes the (m, rows.len()) block `part` into columns `rows` of the (m, n) matrix.
fn scatter_columns(out: &Mutex<Vec<f32>>, part: &[f32], m: usize, n: usize, rows: std::ops::Range<usize>) {
    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
    let w = rows.len();
    for t in 0..m {
        out[t * n + rows.start..t * n + rows.end].copy_from_slice(&part[t * w..(t + 1) * w]);
    }
}

impl Kernel for CpuLinear {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        self.run(ctx).map_err(ort::Error::wrap)
    }
}

/// The CUDA implementation.
struct CudaLinear {
    spec: Spec,
    device: &'static Device,
    kernels: LinearKernels,
    warps: u32,
    /// Set once the cuBLAS path failed and the tile kernels took over (logged once).
    cublas_unavailable: bool,
}

impl CudaLinear {
    fn new(spec: Spec, dtype: ActDtype, ordinal: i32) -> Result<Self> {
        let device = Device::get(ordinal)?;
        let kernels = LinearKernels::new(device, spec.format, dtype)?;
        Ok(CudaLinear { spec, device, kernels, warps: default_warps(spec.format, spec.k), cublas_unavailable: false })
    }

    fn run(&mut self, ctx: &ComputeContext) -> Result<()> {
        let s = self.spec;
        let input =
            |i: usize| ctx.input(i)?.ok_or_else(|| KernelError::bad_input(s.op, format!("input {i} is missing")));
        let x = input(0)?;
        let w = input(1)?;
        let scales = if s.int4_shape().is_some() { Some(input(2)?) } else { None };
        let scale_shape = scales.as_ref().map(|v| shape_of(v, s.op, "scales")).transpose()?;
        s.check_weights(&shape_of(&w, s.op, "weight")?, scale_shape.as_deref())?;
        let (out_shape, m) = s.output_shape(&shape_of(&x, s.op, "input A")?)?;
        let out = ctx.output(0, out_shape)?.ok_or_else(|| KernelError::bad_input(s.op, "no output"))?;
        if m == 0 {
            return Ok(());
        }
        let ptrs = (
            data_address(&x)?,
            data_address(&w)?,
            scales.as_ref().map(|v| data_address(v)).transpose()?.unwrap_or(0),
            data_address(&out)?,
        );
        let stream = stream_of(ctx, s.op)?;
        self.device.make_current()?;
        if m <= MAX_TOKENS {
            // SAFETY: the pointers are ONNX Runtime's tensors of the checked sizes, alive for the call;
            // the launch is ordered on the provider's stream.
            return unsafe { self.kernels.launch_tiles(stream, ptrs, (m, s.n, s.k), s.swiglu, self.warps) };
        }
        if !self.cublas_unavailable {
            match self.run_cublas(ctx, stream, ptrs, m) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!("{}: {e}; more than {MAX_TOKENS} tokens go through the tile kernels instead", s.op);
                    self.cublas_unavailable = true;
                }
            }
        }
        self.run_tiles_in_groups(stream, ptrs, m)
    }

    /// More than 32 tokens without cuBLAS: the tile kernels on 32 tokens at a time.
    fn run_tiles_in_groups(&self, stream: Stream, (x, w, scales, y): (u64, u64, u64, u64), m: usize) -> Result<()> {
        let s = self.spec;
        let bytes = 2u64;
        for start in (0..m).step_by(MAX_TOKENS) {
            let rows = MAX_TOKENS.min(m - start);
            let xs = x + (start * s.k) as u64 * bytes;
            let ys = y + (start * s.out_features()) as u64 * bytes;
            // SAFETY: as in `run`, offset within the same tensors.
            unsafe { self.kernels.launch_tiles(stream, (xs, w, scales, ys), (rows, s.n, s.k), s.swiglu, self.warps)? };
        }
        Ok(())
    }

    /// cuBLAS with ONNX Runtime's handle; scratch from the provider's allocator (freed when the
    /// call returns: later users of that memory are ordered after this work on the same stream).
    fn run_cublas(
        &self,
        ctx: &ComputeContext,
        stream: Stream,
        (x, w, scales, y): (u64, u64, u64, u64),
        m: usize,
    ) -> Result<()> {
        let s = self.spec;
        let cublas = Cublas::get()?;
        let handle = ctx.resource(ort::ep::cuda::resource::CuBLASHandle)?;
        if handle.is_null() {
            return Err(KernelError::Cublas("ONNX Runtime gave no cuBLAS handle".into()));
        }
        let dequant_bytes = if s.int4_shape().is_some() { s.n * s.k * 2 } else { 0 };
        let gu_bytes = if s.swiglu { m * s.n * 2 } else { 0 };
        let info =
            MemoryInfo::new(AllocationDevice::CUDA, self.device.ordinal, AllocatorType::Device, MemoryType::Default)?;
        let allocator = ctx.allocator(&info)?;
        let scratch = if dequant_bytes + gu_bytes > 0 {
            Some(allocator.alloc::<u8>(dequant_bytes.div_ceil(256) * 256 + gu_bytes)?)
        } else {
            None
        };
        let base = scratch.as_ref().map(|b| b.as_ptr() as u64).unwrap_or(0);
        let weight = if dequant_bytes > 0 {
            // SAFETY: `base` holds N x K elements of the dtype.
            unsafe { self.kernels.launch_dequant(stream, (w, scales, base), (s.n, s.k))? };
            base
        } else {
            w
        };
        let gemm_out = if s.swiglu { base + (dequant_bytes.div_ceil(256) * 256) as u64 } else { y };
        // SAFETY: the handle is ONNX Runtime's live per-stream handle of this cuBLAS; sizes as checked.
        unsafe {
            cublas.linear(
                handle as *mut _,
                stream.cast(),
                self.kernels.dtype,
                x as *const _,
                weight as *const _,
                gemm_out as *mut _,
                (m, s.n, s.k),
            )?;
            if s.swiglu {
                self.kernels.launch_swiglu_rows(stream, (gemm_out, y), (m, s.n))?;
            }
        }
        drop(scratch);
        Ok(())
    }
}

impl Kernel for CudaLinear {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        self.run(ctx).map_err(ort::Error::wrap)
    }
}
