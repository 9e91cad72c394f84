//! The errors of the model layer (`crate::model`, its KV cache, its steps, the stages of a staged
//! graph) and of the CUDA runtime calls it makes: what could not be loaded or run, with ONNX
//! Runtime's, the manifest's or CUDA's error kept as the [`source`](std::error::Error::source).

use std::path::PathBuf;

use pio_models::ManifestError;

use crate::ep::EpError;
use crate::ort_lib::OrtLibError;

/// The model layer's result.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Errors of loading a graph folder and running steps through it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `pio.json` could not be read or does not describe a graph this build can run.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// ONNX Runtime's library could not be loaded or initialized.
    #[error(transparent)]
    OrtLib(#[from] OrtLibError),
    /// The execution provider could not be set up for a session.
    #[error(transparent)]
    Ep(#[from] EpError),
    /// A graph file the manifest lists is not there.
    #[error("{} is missing (listed in {})", file.display(), manifest.display())]
    MissingFile { file: PathBuf, manifest: PathBuf },
    /// ONNX Runtime could not load a graph file (missing, corrupt, or with operators its
    /// execution provider lacks).
    #[error("cannot load {}", file.display())]
    Load {
        file: PathBuf,
        #[source]
        source: ort::Error,
    },
    /// ONNX Runtime could not bind a step's input or output `name`.
    #[error("cannot bind `{name}`")]
    Bind {
        name: String,
        #[source]
        source: ort::Error,
    },
    /// ONNX Runtime failed to run a step (`what`) of the graph file `graph`.
    #[error("{what} failed ({})", graph.display())]
    Run {
        graph: PathBuf,
        what: &'static str,
        #[source]
        source: ort::Error,
    },
    /// An ONNX Runtime call failed (a session run, a binding, an allocation, a tensor read).
    #[error(transparent)]
    Ort(#[from] ort::Error),
    /// A CUDA runtime call failed.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// A graph folder the runtime cannot run as it is (its stages, precision or inputs); the
    /// message names the folder and what is wrong.
    #[error("{0}")]
    Graph(String),
    /// The stages cannot be placed on the devices asked for (`--devices`).
    #[error("{0}")]
    Placement(String),
    /// The pipeline of stages stopped before every micro-step was run (a thread panicked or a
    /// stage gave nothing).
    #[error("{0}")]
    Pipeline(String),
    /// A step the model cannot take: its tokens, rows, positions or image rows, named with
    /// their values.
    #[error("{0}")]
    Step(String),
    /// A KV cache operation the cache cannot do (its rows, length or layout).
    #[error("{0}")]
    Cache(String),
    /// A step's outputs are not what the graph's manifest promised (a missing output, a shape
    /// that does not fit).
    #[error("{0}")]
    Output(String),
    /// What was being done when `source` failed.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<ModelError>,
    },
}

impl ModelError {
    /// This error as the cause of a failure of `context` (what was being done).
    pub fn context(self, context: impl Into<String>) -> Self {
        ModelError::Context { context: context.into(), source: Box::new(self) }
    }

    /// An ONNX Runtime error as the cause of a failure of `context`.
    pub(crate) fn ort(context: impl Into<String>, source: ort::Error) -> Self {
        ModelError::Ort(source).context(context)
    }

    /// A failure to bind `name`, for `map_err`.
    pub(crate) fn bind(name: &str) -> impl FnOnce(ort::Error) -> Self + '_ {
        move |source| ModelError::Bind { name: name.to_string(), source }
    }
}

/// A CUDA runtime call that failed, or a runtime that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// `call` returned the `cudaError_t` `code`.
    #[error("{call} failed (cudaError {code})")]
    Call { call: &'static str, code: i32 },
    /// A 2D copy whose rows are wider than its pitches.
    #[error("a 2D copy of {width} bytes per row with pitches {dst_pitch} and {src_pitch}")]
    Pitch { width: usize, dst_pitch: usize, src_pitch: usize },
    /// No CUDA runtime is loaded in the process (ONNX Runtime's CUDA provider loads it), and
    /// `needed_for` needs it.
    #[error("{needed_for} needs the CUDA runtime, which is not loaded (ONNX Runtime's CUDA provider loads it)")]
    NotLoaded { needed_for: String },
    /// The CUDA runtime library could not be opened or lacks a symbol.
    #[error("{library}: cannot use the CUDA runtime")]
    Library {
        library: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
