//! cuBLAS for projections above the tile kernels' token limit (more than 32 tokens for int4
//! weights, where a tensor-core GEMM beats reading the weights once per 32 tokens; more than one
//! for 16-bit weights, where cuBLAS was measured faster): the library ONNX Runtime's CUDA
//! provider already loaded (found with `RTLD_NOLOAD`, never loaded anew, so it is the same cuBLAS
//! as the handle's), called with ONNX Runtime's own per-stream handle.

use std::ffi::c_void;
use std::sync::OnceLock;

use crate::error::{KernelError, Result};
use crate::source::ActDtype;

type GemmExFn = unsafe extern "C" fn(
    handle: *mut c_void,
    transa: i32,
    transb: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: *const c_void,
    a: *const c_void,
    a_type: i32,
    lda: i32,
    b: *const c_void,
    b_type: i32,
    ldb: i32,
    beta: *const c_void,
    c: *mut c_void,
    c_type: i32,
    ldc: i32,
    compute_type: i32,
    algo: i32,
) -> i32;
type GetStreamFn = unsafe extern "C" fn(handle: *mut c_void, stream: *mut *mut c_void) -> i32;

const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;
const CUDA_R_16F: i32 = 2;
const CUDA_R_16BF: i32 = 14;
const CUBLAS_COMPUTE_32F: i32 = 68;
const CUBLAS_GEMM_DEFAULT: i32 = -1;

const SONAMES: &[&str] = &["libcublas.so.13", "libcublas.so.12"];

pub struct Cublas {
    gemm_ex: GemmExFn,
    get_stream: GetStreamFn,
    _lib: libloading::Library,
}

impl Cublas {
    /// The cuBLAS already in the process, or why there is none.
    pub fn get() -> Result<&'static Cublas> {
        static LIB: OnceLock<std::result::Result<Cublas, String>> = OnceLock::new();
        LIB.get_or_init(|| {
            let mut why = Vec::new();
            for name in SONAMES {
                match Self::open(name) {
                    Ok(c) => return Ok(c),
                    Err(e) => why.push(format!("{name}: {e}")),
                }
            }
            Err(format!("no cuBLAS loaded by ONNX Runtime ({})", why.join("; ")))
        })
        .as_ref()
        .map_err(|e| KernelError::Cublas(e.clone()))
    }

    fn open(name: &str) -> std::result::Result<Cublas, libloading::Error> {
        use libloading::os::unix::{Library, RTLD_NOW};
        const RTLD_NOLOAD: i32 = 0x4;
        // SAFETY: with RTLD_NOLOAD nothing is loaded or initialized; this only references the
        // library ONNX Runtime's provider loaded.
        let lib: libloading::Library = unsafe { Library::open(Some(name), RTLD_NOW | RTLD_NOLOAD)? }.into();
        // SAFETY: the signatures are cuBLAS's (v2 API).
        let (gemm_ex, get_stream) =
            unsafe { (*lib.get::<GemmExFn>(b"cublasGemmEx\0")?, *lib.get::<GetStreamFn>(b"cublasGetStream_v2\0")?) };
        Ok(Cublas { gemm_ex, get_stream, _lib: lib })
    }

    /// Whether `handle` issues its work on `stream` (checked before anything is enqueued).
    ///
    /// # Safety
    /// `handle` must be a live cuBLAS handle of this library.
    pub unsafe fn check_stream(&self, handle: *mut c_void, stream: *mut c_void) -> Result<()> {
        let mut bound = std::ptr::null_mut();
        let r = (self.get_stream)(handle, &mut bound);
        if r != 0 || bound != stream {
            return Err(KernelError::Cublas(format!(
                "ONNX Runtime's cuBLAS handle is not bound to the kernel's stream (status {r})"
            )));
        }
        Ok(())
    }

    /// y (M, N) = x (M, K) W^T with W (N, K) row-major, all in `dtype`, f32 accumulation, on the
    /// handle's stream, which must be `stream` (checked).
    ///
    /// # Safety
    /// `handle` must be a live cuBLAS handle of this library; the pointers device memory of the
    /// sizes implied, valid until the work has run on the stream.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn linear(
        &self,
        handle: *mut c_void,
        stream: *mut c_void,
        dtype: ActDtype,
        x: *const c_void,
        w: *const c_void,
        y: *mut c_void,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        self.check_stream(handle, stream)?;
        let ty = match dtype {
            ActDtype::F16 => CUDA_R_16F,
            ActDtype::Bf16 => CUDA_R_16BF,
        };
        let to_i32 = |v: usize| i32::try_from(v).map_err(|_| KernelError::Cublas(format!("dimension {v} too large")));
        let (m, n, k) = (to_i32(m)?, to_i32(n)?, to_i32(k)?);
        let (alpha, beta) = (1f32, 0f32);
        // Column-major: Y^T (N, M) = W^T... i.e. op(A) = A^T with A = W stored (K, N) column-major,
        // B = x stored (K, M) column-major, C = Y^T (N, M) column-major = Y row-major.
        let status = (self.gemm_ex)(
            handle,
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            n,
            m,
            k,
            (&alpha as *const f32).cast(),
            w,
            ty,
            k,
            x,
            ty,
            k,
            (&beta as *const f32).cast(),
            y,
            ty,
            n,
            CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT,
        );
        if status != 0 {
            return Err(KernelError::Cublas(format!("cublasGemmEx failed with status {status}")));
        }
        Ok(())
    }
}
