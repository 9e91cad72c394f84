//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong finding NVRTC, compiling or launching a kernel, or checking an operator's inputs.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "libnvrtc (CUDA's runtime compiler, needed to build Inference-PIO's kernels) was not found; searched: {searched}. \
         Install the CUDA toolkit (/usr/local/cuda/lib64), `pip install nvidia-cuda-nvrtc`, run scripts/setup.sh, \
         or point {env} at the library or its folder"
    )]
    NvrtcNotFound { searched: String, env: &'static str },
    #[error("cannot load {path}: {source}")]
    LoadLibrary {
        path: PathBuf,
        #[source]
        source: libloading::Error,
    },
    #[error(
        "the NVRTC that answered ({answered}) is not the one found at {path} ({expected}): another libnvrtc is earlier \
         on the loader path; set {env} to the one to use"
    )]
    NvrtcMismatch { path: PathBuf, expected: String, answered: String, env: &'static str },
    #[error("NVRTC {call} failed: {code}")]
    Nvrtc { call: &'static str, code: String },
    #[error("NVRTC could not compile the {family} kernels for {arch}:\n{log}")]
    Compile { family: String, arch: String, log: String },
    #[error("NVRTC {version} cannot compile for {arch} (it supports {supported})")]
    UnsupportedArch { version: String, arch: String, supported: String },
    #[error("no CUDA driver (libcuda.so.1) could be loaded: custom CUDA kernels need an NVIDIA driver")]
    NoDriver,
    #[error("CUDA driver call {call} failed: {code}")]
    Driver { call: &'static str, code: String },
    #[error("kernel {name} is not in the compiled module")]
    MissingKernel { name: String },
    #[error("{op}: {message}")]
    BadInput { op: &'static str, message: String },
    #[error("cuBLAS: {0}")]
    Cublas(String),
    #[error("cannot write the kernel cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the CUDA source {path} that {var} names: {source}")]
    KernelSource {
        path: PathBuf,
        var: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("ONNX Runtime's {call} for {op} failed: {message}")]
    NativeOp { call: &'static str, op: String, message: String },
    #[error(transparent)]
    Ort(#[from] ort::Error),
}

impl KernelError {
    pub(crate) fn bad_input(op: &'static str, message: impl Into<String>) -> Self {
        KernelError::BadInput { op, message: message.into() }
    }
}

pub type Result<T> = std::result::Result<T, KernelError>;
