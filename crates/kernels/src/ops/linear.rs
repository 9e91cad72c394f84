//! `LinearInt4` and `Linear`: y = x W^T, optionally with the SwiGLU of grouped gate/up rows.
//! On CUDA the token count of a call picks the path (see `CudaLinear::run`): up to
//! [`WeightFormat::max_tile_tokens`] (32 for int4, 1 for 16-bit weights) the tile kernels (one
//! read of W); more through cuBLAS (int4 weights dequantized into a scratch buffer first, as ONNX
//! Runtime's MatMulNBits does), or, when ONNX Runtime's cuBLAS is not reachable, through the tile
//! kernels 32 tokens at a time.

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
use crate::gpu::{LinearKernels, WeightFormat, MAX_TOKENS};
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

/// How a CUDA call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// One launch of the tile kernels.
    Tiles,
    /// cuBLAS (int4: after dequantizing the weight).
    Cublas,
    /// The tile kernels 32 tokens at a time (no cuBLAS).
    TileGroups,
}

/// The path of a call of `m` tokens: the tile kernels up to the format's limit (int4 32, 16-bit
/// 1: [`WeightFormat::max_tile_tokens`] says why), cuBLAS above, or the tile kernels in groups
/// when cuBLAS is unavailable (16-bit weights included: they run at every token count).
fn path(format: WeightFormat, m: usize, cublas_unavailable: bool) -> Path {
    if m <= format.max_tile_tokens() {
        Path::Tiles
    } else if cublas_unavailable {
        Path::TileGroups
    } else {
        Path::Cublas
    }
}

/// The CUDA implementation.
struct CudaLinear {
    spec: Spec,
    device: &'static Device,
    kernels: LinearKernels,
    /// Set once cuBLAS itself failed (not loaded, no handle, another stream, a GEMM error): from
    /// then on the tile kernels take every call (logged once).
    cublas_unavailable: bool,
    /// Whether a call that fell back to the tile kernels for another reason was logged.
    fallback_logged: bool,
}

impl CudaLinear {
    fn new(spec: Spec, dtype: ActDtype, ordinal: i32) -> Result<Self> {
        let device = Device::get(ordinal)?;
        let kernels = LinearKernels::new(device, spec.format, dtype)?;
        Ok(CudaLinear { spec, device, kernels, cublas_unavailable: false, fallback_logged: false })
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
        // Both paths are CUDA-graph safe: the launches and the GEMM are enqueued on ONNX Runtime's
        // stream with its handle, and the scratch comes from its allocator (see `run_cublas`).
        if path(s.format, m, self.cublas_unavailable) == Path::Tiles {
            // SAFETY: the pointers are ONNX Runtime's tensors of the checked sizes, alive for the call;
            // the launch is ordered on the provider's stream.
            return unsafe { self.kernels.launch(stream, ptrs, (m, s.n, s.k), s.swiglu) };
        }
        if !self.cublas_unavailable {
            match self.run_cublas(ctx, stream, ptrs, m) {
                Ok(()) => return Ok(()),
                Err(e @ KernelError::Cublas(_)) => {
                    tracing::warn!(
                        "{}: {e}; more than {} tokens go through the tile kernels ({MAX_TOKENS} at a time) instead",
                        s.op,
                        s.format.max_tile_tokens()
                    );
                    self.cublas_unavailable = true;
                }
                // Anything else (say, no memory for the scratch): this call only.
                Err(e) => {
                    if !self.fallback_logged {
                        tracing::warn!(
                            "{}: the cuBLAS path failed at {m} tokens ({e}); the tile kernels take the call",
                            s.op
                        );
                        self.fallback_logged = true;
                    } else {
                        tracing::debug!("{}: the cuBLAS path failed at {m} tokens ({e})", s.op);
                    }
                }
            }
        }
        self.run_tiles_in_groups(stream, ptrs, m)
    }

    /// Without cuBLAS: the tile kernels on 32 tokens at a time (one launch up to 32 tokens: dense
    /// weights still run everywhere).
    fn run_tiles_in_groups(&self, stream: Stream, (x, w, scales, y): (u64, u64, u64, u64), m: usize) -> Result<()> {
        let s = self.spec;
        let bytes = 2u64;
        for start in (0..m).step_by(MAX_TOKENS) {
            let rows = MAX_TOKENS.min(m - start);
            let xs = x + (start * s.k) as u64 * bytes;
            let ys = y + (start * s.out_features()) as u64 * bytes;
            // SAFETY: as in `run`, offset within the same tensors.
            unsafe { self.kernels.launch(stream, (xs, w, scales, ys), (rows, s.n, s.k), s.swiglu)? };
        }
        Ok(())
    }

    /// cuBLAS with ONNX Runtime's handle on its stream. Scratch (int4: the dequantized weight,
    /// N x K; SwiGLU: the gate/up product, M x N; dense without SwiGLU: none) comes from the
    /// provider's allocator for this call and goes back when it returns: later users of that
    /// memory are ordered after this work on the same stream.
    ///
    /// Under CUDA-graph capture (ONNX Runtime captures the decode step, where 16-bit weights now
    /// take this path from 2 tokens) this is what ONNX Runtime's own kernels do: its MatMulNBits
    /// takes its N x K_padded dequantization buffer with `GetScratchBuffer` inside `ComputeInternal`
    /// (contrib_ops/cuda/quantization/matmul_nbits.cc), from the same arena. No device memory
    /// may be allocated while a stream is captured, so the provider captures only after regular
    /// runs, "required min regular runs before graph capture for the necessary memory
    /// allocations" (cuda_execution_provider.h, `min_num_runs_before_cuda_graph_capture_`): the
    /// arena then serves the captured run's requests from memory it holds. Our sizes depend only
    /// on M, N and K, the same in the warm-up and captured runs, and the replay writes the
    /// addresses the capture recorded, which the arena keeps (it does not hand device memory
    /// back). A scratch of our own kept across calls would be worse: a dequantized copy per node
    /// is N x K x 2 bytes (the whole model again in 16 bits), growing it would free memory an
    /// earlier captured graph still writes, and one kernel instance serves concurrent runs of a
    /// session. (One difference: ONNX Runtime's kernels ask the arena with their stream, this
    /// custom-op allocator without one; the requests are still the same in every run.)
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
        // SAFETY: ONNX Runtime's live handle of this cuBLAS (checked before anything is enqueued).
        unsafe { cublas.check_stream(handle as *mut _, stream.cast())? };
        let dequant_bytes = if s.int4_shape().is_some() { s.n * s.k * 2 } else { 0 };
        let gu_offset = dequant_bytes.div_ceil(256) * 256;
        let gu_bytes = if s.swiglu { m * s.n * 2 } else { 0 };
        let allocator = if gu_offset + gu_bytes > 0 {
            let info = MemoryInfo::new(
                AllocationDevice::CUDA,
                self.device.ordinal,
                AllocatorType::Device,
                MemoryType::Default,
            )?;
            Some(ctx.allocator(&info)?)
        } else {
            None
        };
        let scratch = allocator.as_ref().map(|a| a.alloc::<u8>(gu_offset + gu_bytes)).transpose()?;
        let base = scratch.as_ref().map(|b| b.as_ptr() as u64).unwrap_or(0);
        let weight = if dequant_bytes > 0 {
            // SAFETY: `base` holds N x K elements of the dtype.
            unsafe { self.kernels.launch_dequant(stream, (w, scales, base), (s.n, s.k))? };
            base
        } else {
            w
        };
        let gemm_out = if s.swiglu { base + gu_offset as u64 } else { y };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_keeps_the_tiles_to_32_tokens_and_16_bit_weights_to_one() {
        let int4 = WeightFormat::Int4 { block_size: 32 };
        for (m, expected) in [(1, Path::Tiles), (8, Path::Tiles), (32, Path::Tiles), (33, Path::Cublas)] {
            assert_eq!(path(int4, m, false), expected, "int4, {m} tokens");
        }
        for (m, expected) in [(1, Path::Tiles), (2, Path::Cublas), (8, Path::Cublas), (32, Path::Cublas)] {
            assert_eq!(path(WeightFormat::Dense, m, false), expected, "16-bit, {m} tokens");
        }
        assert_eq!(path(WeightFormat::Dense, 128, false), Path::Cublas);
        // Without cuBLAS every token count still runs, on the tile kernels.
        assert_eq!(path(WeightFormat::Dense, 1, true), Path::Tiles);
        assert_eq!(path(WeightFormat::Dense, 8, true), Path::TileGroups);
        assert_eq!(path(int4, 32, true), Path::Tiles);
        assert_eq!(path(int4, 128, true), Path::TileGroups);
    }
}

kernel_through_run!(CpuLinear, CudaLinear);
