//! What can go wrong choosing and starting an execution provider: a bad `--ep-option` (named with its key and
//! value), options that cannot work together, a TensorRT profile that does not fit the graph, a machine without the
//! provider, and ONNX Runtime refusing a session setting (its error kept as the source).

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::GpuProvider;

/// Errors of [`ExecutionProvider`](super::ExecutionProvider)'s parsing, planning and configuring.
#[derive(Debug, thiserror::Error)]
pub enum EpError {
    /// An `--ep-option` without `=`.
    #[error("--ep-option `{option}` is not key=value")]
    NotKeyValue { option: String },
    /// An `--ep-option` such as `=1`.
    #[error("--ep-option `{option}` has an empty key")]
    EmptyKey { option: String },
    /// A value the key does not take; `expected` says what it does.
    #[error("invalid --ep-option {key}={value}: expected {expected}")]
    InvalidValue { key: String, value: String, expected: &'static str },
    /// The CPU takes only a thread count.
    #[error("--ep-option {key}={value}: the cpu execution provider takes only threads=N")]
    NotACpuOption { key: String, value: String },
    /// A TensorRT option given with `--ep cuda`.
    #[error("--ep-option {key}={value} is a TensorRT option; use --ep tensorrt")]
    TensorRtOptionOnCuda { key: String, value: String },
    /// `trt_engine_cache_enable=1` (and the like) without the folder it needs.
    #[error("{enable_key}=1 needs a folder: add --ep-option {path_key}=DIR")]
    EnabledWithoutPath { enable_key: &'static str, path_key: &'static str },
    #[error("device id {0} is negative")]
    NegativeDeviceId(i32),
    /// Not `cpu`, `cuda` or `tensorrt`.
    #[error("unknown execution provider `{0}`; expected cpu, cuda or tensorrt")]
    UnknownProvider(String),
    #[error(
        "shrink_arena=1 cannot be combined with cuda_graph=1: a captured CUDA graph keeps using memory the shrinking \
         would free"
    )]
    ShrinkArenaWithCudaGraph,
    #[error("trt_builder_optimization_level must be 0..=5, not {0}")]
    OptimizationLevel(u8),
    /// One of `trt_engine_cache_path`, `trt_timing_cache_path`, `trt_ep_context_file_path` is empty.
    #[error("{key} is empty")]
    EmptyPath { key: &'static str },
    /// ONNX Runtime takes provider options as UTF-8 strings.
    #[error("{key} '{}' is not valid UTF-8", path.display())]
    NonUtf8Path { key: &'static str, path: PathBuf },
    /// A cache folder that is a file.
    #[error("{what} '{}' is a file, not a folder", path.display())]
    NotAFolder { what: &'static str, path: PathBuf },
    #[error("cannot create the {what} folder '{}'", path.display())]
    CreateFolder {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `trt_profile_min_shapes` names an input the opt (or max) shapes do not.
    #[error("input `{input}` has a min profile shape but no {which} shape")]
    ProfileMissingShape { input: String, which: &'static str },
    #[error("input `{input}`: the min, opt and max profile shapes have different ranks")]
    ProfileRanks { input: String },
    #[error("input `{input}`, dimension {dim}: profile shapes need min <= opt <= max, got {min} / {opt} / {max}")]
    ProfileOrder { input: String, dim: usize, min: i64, opt: i64, max: i64 },
    #[error("trt_profile_min/opt/max_shapes must name the same inputs")]
    ProfileInputsDiffer,
    #[error("trt_profile_min_shapes, trt_profile_opt_shapes and trt_profile_max_shapes must be given together")]
    ProfileIncomplete,
    /// A profile entry such as `input_ids:1xq`.
    #[error("--ep-option {key}: `{entry}` has a dimension that is not a non-negative integer")]
    ProfileDimension { key: String, entry: String },
    /// ONNX Runtime reads a repeated input as a further profile; only one profile is supported.
    #[error("--ep-option {key}: input `{input}` appears twice (only one optimization profile is supported)")]
    ProfileInputTwice { key: String, input: String },
    /// A batch or sequence range for [`trt_profile_shapes`](super::trt_profile_shapes) out of order.
    #[error("{what} range ({min}, {opt}, {max}) must satisfy 1 <= min <= opt <= max")]
    ProfileRange { what: &'static str, min: usize, opt: usize, max: usize },
    #[error("the maximum sequence length {max} exceeds the graph's context length {context_length}")]
    ProfileBeyondContext { max: usize, context_length: usize },
    #[error("input name `{input}` cannot be written in a TensorRT profile string")]
    ProfileInputName { input: String },
    #[error("input `{input}` axis {axis}: fixed dimension {value} is not a non-negative integer")]
    ProfileFixedDimension { input: String, axis: usize, value: serde_json::Number },
    #[error(
        "input `{input}` axis {axis}: unknown symbolic dimension `{symbol}` (known: batch_size, sequence_length, \
         total_sequence_length, past_sequence_length, max_sequence_length)"
    )]
    ProfileUnknownSymbol { input: String, axis: usize, symbol: String },
    #[error("input `{input}` axis {axis}: dimension {value} is neither a number nor a name")]
    ProfileBadDimension { input: String, axis: usize, value: serde_json::Value },
    /// [`LiveSystem`](super::LiveSystem) knows the CUDA and TensorRT providers only.
    #[error("unknown execution provider {0}")]
    UnknownOrtProvider(String),
    #[error("cannot list ONNX Runtime's execution providers")]
    ListProviders(#[source] ort::Error),
    /// The loaded ONNX Runtime (`library`, when known) is a build without the provider.
    #[error(
        "the loaded ONNX Runtime{} was built without the {} execution provider: use the GPU build \
         (scripts/setup.sh --gpu, or PIO_ORT_FLAVOR=gpu / ORT_DYLIB_PATH pointing at onnxruntime-gpu's \
         libonnxruntime.so)",
        library_note(library.as_deref()),
        provider.label()
    )]
    NotCompiledIn { provider: GpuProvider, library: Option<PathBuf> },
    /// TensorRT was asked for without `fallback=cuda`, and cannot run here.
    #[error(transparent)]
    TensorRtUnavailable(TensorRtMissing),
    #[error("cannot set {threads} intra-op threads")]
    IntraThreads {
        threads: usize,
        #[source]
        source: ort::Error,
    },
    #[error("cannot set the memory pattern")]
    MemoryPattern(#[source] ort::Error),
    #[error("cannot set session entry {key}={value}")]
    SessionEntry {
        key: String,
        value: String,
        #[source]
        source: ort::Error,
    },
    /// ONNX Runtime could not register the provider; `hints` names what is missing on this machine.
    #[error("cannot start the {} execution provider{}", provider.label(), hints)]
    StartProvider {
        provider: GpuProvider,
        hints: StartHints,
        #[source]
        source: ort::Error,
    },
}

/// Why TensorRT cannot run here (an error, or with `fallback=cuda` a warning before the CUDA EP runs alone).
#[derive(Debug, thiserror::Error)]
pub enum TensorRtMissing {
    /// The loaded ONNX Runtime (`library`, when known) has no TensorRT provider.
    #[error(
        "the loaded ONNX Runtime{} was built without the TensorRT execution provider",
        library_note(library.as_deref())
    )]
    NotCompiledIn { library: Option<PathBuf> },
    /// TensorRT's libraries do not load, each with the loader's error.
    #[error("{}", missing_libraries(missing))]
    Libraries { missing: Vec<LibraryLoadError> },
}

/// A shared library that does not load ([`SystemProbe::load_library`](super::SystemProbe::load_library)): its file
/// name and the loader's error.
#[derive(Debug, thiserror::Error)]
#[error("{name} cannot be loaded")]
pub struct LibraryLoadError {
    pub name: String,
    #[source]
    pub source: Box<dyn StdError + Send + Sync + 'static>,
}

impl LibraryLoadError {
    /// The loader's own words (`libnvinfer.so.10: cannot open shared object file: ...`): the innermost cause, as
    /// `libloading` puts `dlerror`'s text under a plain "dlopen failed".
    pub fn loader_message(&self) -> String {
        let mut innermost: &(dyn StdError + 'static) = &*self.source;
        while let Some(next) = innermost.source() {
            innermost = next;
        }
        innermost.to_string()
    }
}

/// What is missing for a GPU provider that failed to start: libraries that do not load, and the provider library
/// when it is not next to the loaded ONNX Runtime. Displayed as ` (...)`, or nothing when nothing was found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StartHints {
    pub unloadable_libraries: Vec<String>,
    /// The provider library's file name and the folder of the loaded ONNX Runtime it is missing from.
    pub provider_library_missing: Option<(String, PathBuf)>,
}

impl std::fmt::Display for StartHints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.unloadable_libraries.is_empty() {
            parts.push(format!("these libraries cannot be loaded: {}", self.unloadable_libraries.join(", ")));
        }
        if let Some((lib, dir)) = &self.provider_library_missing {
            parts.push(format!("{lib} is not next to the loaded ONNX Runtime in {}", dir.display()));
        }
        if parts.is_empty() {
            return Ok(());
        }
        write!(f, " ({})", parts.join("; "))
    }
}

impl GpuProvider {
    /// `CUDA` or `TensorRT`, as messages name them.
    fn label(self) -> &'static str {
        match self {
            GpuProvider::Cuda => "CUDA",
            GpuProvider::TensorRt => "TensorRT",
        }
    }
}

fn library_note(library: Option<&Path>) -> String {
    library.map(|p| format!(" ({})", p.display())).unwrap_or_default()
}

fn missing_libraries(missing: &[LibraryLoadError]) -> String {
    let names: Vec<&str> = missing.iter().map(|e| e.name.as_str()).collect();
    let mut text = format!(
        "TensorRT libraries ({}) not found: install TensorRT 10 for CUDA 13 or use --ep cuda",
        names.join(", ")
    );
    // The loader's words: a library present but missing a dependency reads differently.
    for error in missing {
        let _ = write!(text, "\n  {}", error.loader_message());
    }
    text
}
