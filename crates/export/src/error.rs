//! The errors of pio-export. Each names the file or folder it is about, and the tensor, field or flag where one is
//! involved; causes (I/O, JSON, safetensors, config errors) are kept as sources.

use std::path::{Path, PathBuf};

use pio_models::error::{ConfigError, ManifestError, PresetError};
use pio_models::files::IndexError;
use pio_models::manifest::TensorDtype;
use pio_models::size::{format_bytes, Precision};
use safetensors::{Dtype, SafeTensorError};

/// A filesystem operation on `path` that failed ("cannot copy ...", "cannot create folder ..."); the io::Error is
/// the source.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", path.display())]
pub struct FsError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The error of `action` on `path`, for `map_err`: `fs::copy(from, to).map_err(fs_error("copy", from))?` (the
/// path is copied only when there is an error).
pub(crate) fn fs_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FsError + 'a {
    move |source| FsError { action, path: path.to_path_buf(), source }
}

/// What [`crate::export()`] and [`crate::synthetic::write_checkpoint`] can run into. An error leaves no output
/// folder behind (see [`crate::scratch`]).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Preset(#[from] PresetError),
    /// Writing the graph folder's `pio.json`.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Building a graph failed after the checkpoint and the settings were accepted.
    #[error("cannot build {}", graph.display())]
    Build {
        graph: PathBuf,
        #[source]
        source: Box<BuildError>,
    },
    /// The shape flags of a synthetic checkpoint make its config.json invalid (e.g. heads that do not divide).
    #[error("the shape flags make the config.json of preset {preset} invalid")]
    SyntheticShape {
        preset: &'static str,
        #[source]
        source: ConfigError,
    },
    /// The shape flags make a synthetic checkpoint larger than pio-export writes. `bytes` is 0 when the tensor
    /// count alone was refused, before the sizes were computed.
    #[error(
        "a synthetic checkpoint of preset {preset} with these shape flags would hold {tensors} tensors{}, more than \
         pio-export writes (at most {} tensors and 1 PiB)",
        if *bytes > 0 { format!(" of {} in all", format_bytes(*bytes)) } else { " or more".to_string() },
        crate::synthetic::MAX_SYNTHETIC_TENSORS
    )]
    SyntheticTooLarge { preset: &'static str, tensors: u64, bytes: u64 },
    #[error("no tokenizer files (tokenizer.json, tokenizer_config.json) in {}", dir.display())]
    NoTokenizerFiles { dir: PathBuf },
    #[error("cannot write {}", file.display())]
    WriteSafetensors {
        file: PathBuf,
        #[source]
        source: SafeTensorError,
    },
    #[error("cannot serialize {}", file.display())]
    SerializeJson {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Io(#[from] FsError),
}

impl ExportError {
    /// A build error of `graph`, with a checkpoint error (a tensor missing, of the wrong shape or dtype) lifted
    /// out: it is about the input, whichever graph found it.
    pub(crate) fn build(graph: impl Into<PathBuf>) -> impl FnOnce(BuildError) -> ExportError {
        let graph = graph.into();
        move |source| match source {
            BuildError::Checkpoint(error) => ExportError::Checkpoint(error),
            source => ExportError::Build { graph, source: Box::new(source) },
        }
    }
}

/// What is wrong with a checkpoint folder. Every variant names the file (or folder), and the tensor where one is
/// involved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint folder {} does not exist", dir.display())]
    NoFolder { dir: PathBuf },
    /// `config.json` or `generation_config.json` (the error names the file and the field).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `model.safetensors.index.json` (the error names the file and the entry).
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("missing shard {} (listed in {})", shard.display(), index.display())]
    MissingShard { shard: PathBuf, index: PathBuf },
    #[error("no weights in {}: expected {} or {}", dir.display(), crate::checkpoint::SINGLE_FILE, crate::checkpoint::INDEX_FILE)]
    NoWeights { dir: PathBuf },
    #[error(transparent)]
    Io(#[from] FsError),
    /// A header that does not parse or does not fit the file (the safetensors error says which).
    #[error("{} is not a valid safetensors file (truncated or corrupt?)", file.display())]
    Safetensors {
        file: PathBuf,
        #[source]
        source: SafeTensorError,
    },
    #[error("tensor {tensor} is in both {} and {}", first.display(), second.display())]
    DuplicateTensor { tensor: String, first: PathBuf, second: PathBuf },
    #[error("tensor {tensor} is missing from the checkpoint in {}", dir.display())]
    MissingTensor { tensor: String, dir: PathBuf },
    #[error("tensor {tensor} in {} has dtype {dtype}; supported: F32, F16, BF16", file.display())]
    UnsupportedDtype { tensor: String, file: PathBuf, dtype: Dtype },
    #[error("tensor {tensor} in {} has shape {shape:?}, but config.json implies {expected:?}", file.display())]
    WrongShape { tensor: String, file: PathBuf, shape: Vec<usize>, expected: Vec<usize> },
    /// config.json describes more layers (or experts) than the checkpoint has tensors for.
    #[error(
        "config.json in {} describes at least {needed} tensors ({layers} layers{}), but the checkpoint holds {held}",
        dir.display(), if *experts > 0 { format!(", {experts} experts") } else { String::new() }
    )]
    TooFewTensors { dir: PathBuf, needed: u64, layers: usize, experts: usize, held: usize },
    /// A Qwen3-VL config without its vision part (possible only for a config built in code).
    #[error("config.json of a {architecture} checkpoint has no vision_config")]
    NoVisionConfig { architecture: &'static str },
    /// A synthetic checkpoint written for `--direct-int4` (without the decoder's projections) exported without it.
    #[error(
        "{} was written for --direct-int4 (its {} says it omits the decoder's projections): export it with \
         --precision int4 --direct-int4, or write a full synthetic checkpoint",
        dir.display(), crate::scratch::SYNTHETIC_MARKER
    )]
    OmitsQuantizedWeights { dir: PathBuf },
}

/// A combination of export settings the target or the model cannot run; the message names the flag.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SettingsError {
    #[error("--precision {} needs --ep cuda or tensorrt: CPU graphs are fp32 (or int4 weights with fp32 activations)", precision.as_str())]
    PrecisionNeedsGpu { precision: Precision },
    #[error("--int4-block-size {block_size} must be a power of two >= 16")]
    Int4BlockSize { block_size: usize },
    #[error("--int4-accuracy-level {level} must be between 0 and 4")]
    Int4AccuracyLevel { level: i64 },
    /// `flag` (--int4-lm-head, --int4-embeddings) only applies to int4 graphs.
    #[error("{flag} only applies with --precision int4")]
    NeedsInt4 { flag: &'static str },
    #[error(
        "--int4-embeddings needs hidden_size ({hidden_size}) to be a multiple of --int4-block-size ({block_size})"
    )]
    Int4EmbeddingsBlock { hidden_size: usize, block_size: usize },
    #[error("--int4-embeddings on a model with tied embeddings needs --int4-lm-head: the two share one table")]
    Int4EmbeddingsTied,
    #[error(
        "--int4-block-size {block_size} must divide hidden_size ({hidden_size}) and moe_intermediate_size \
         ({moe_intermediate_size}): the int4 experts are quantized in whole blocks"
    )]
    Int4ExpertBlock { block_size: usize, hidden_size: usize, moe_intermediate_size: usize },
    /// `flag` (--kv-cache-int8, --fused-qk-norm) is a feature of GroupQueryAttention.
    #[error("{flag} needs GroupQueryAttention ({why}), which --no-fused-attention replaces")]
    NeedsFusedAttention { flag: &'static str, why: &'static str },
    #[error("--fused-qk-norm needs --ep cuda: the CPU GroupQueryAttention kernel rejects q/k norm inputs")]
    FusedQkNormOnCpu,
    #[error("--fused-qk-norm does not apply: this model has no q/k norm")]
    NoQkNorm,
    #[error("--context-length must be positive")]
    ZeroContextLength,
    #[error(
        "--context-length {context_length} makes rotary tables of {bytes} bytes (more than {max}); \
         pass a smaller --context-length"
    )]
    ContextTooLong { context_length: usize, bytes: u64, max: u64 },
    #[error(
        "rotary dim {rotary_dim} (head_dim {head_dim} x partial_rotary_factor {partial_rotary_factor}) must be \
         {requirement}"
    )]
    RotaryDim { rotary_dim: usize, head_dim: usize, partial_rotary_factor: f64, requirement: &'static str },
    #[error("head_dim {head_dim} is not a multiple of 16, which GroupQueryAttention's rotary needs")]
    HeadDim { head_dim: usize },
    #[error("--no-sliding-window does not apply: {model} has no sliding-window layers ({why})")]
    NoSlidingLayers { model: String, why: String },
    #[error(
        "config.json: rope type `{rope_type}` (`rope_scaling.rope_type` or `rope_parameters.rope_type`) is not \
         supported yet (supported: default, linear)"
    )]
    UnsupportedRope { rope_type: String },
    #[error("unknown --pio-kernels family `{family}`; known: all, linear, lm_head, swiglu, moe, attention")]
    UnknownPioKernel { family: String },
    #[error("--pio-kernels needs --ep cuda (or cpu): TensorRT does not run ONNX Runtime custom operators")]
    PioKernelsOnTensorrt,
    #[error("--pio-kernels on CUDA needs --precision bf16, fp16 or int4 (the kernels are 16-bit)")]
    PioKernelsNeedHalf,
    #[error("--pio-kernels moe needs --precision int4 (MoEInt4 runs int4 experts)")]
    PioMoeNeedsInt4,
    #[error(
        "--pio-kernels with int4 needs --int4-block-size 32, 64 or 128 (got {block_size}); the kernels read one \
         scale per 32-wide sub-block"
    )]
    PioKernelsBlockSize { block_size: usize },
    #[error("--stages 0: a decoder needs at least one stage")]
    ZeroStages,
    #[error("--stages {stages}: the decoder has {layers} layers, and each stage holds at least one")]
    MoreStagesThanLayers { stages: usize, layers: usize },
    #[error("--stage-memory-gb must be more than 0")]
    ZeroStageMemory,
    #[error("--stage-boundaries needs at least one layer (the first layer of the second stage)")]
    NoStageBoundaries,
    #[error(
        "--stage-boundaries {}: each boundary is the first layer of a stage, increasing, within 1..{layers} (the \
         decoder has {layers} layers); {layer} is not",
        boundaries.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    )]
    StageBoundary { boundaries: Vec<usize>, layer: usize, layers: usize },
    /// No split fits the budget: `layer`'s stage, with what it holds besides (embeddings, lm_head), weighs `bytes`.
    #[error(
        "--stage-memory-gb {}: even one layer per stage does not fit: layer {layer} with what its stage holds \
         besides (embeddings, lm_head) weighs {}",
        format_bytes(*budget), format_bytes(*bytes)
    )]
    StageMemoryTooSmall { budget: u64, layer: usize, bytes: u64 },
    #[error("--direct-int4 draws int4 weights: it needs --precision int4, not {}", precision.as_str())]
    DirectInt4Precision { precision: Precision },
    /// `flag` (--pio-kernels, --kv-cache-int8) reads checkpoint values that --direct-int4 never has; `why` says which.
    #[error("--direct-int4 does not apply with {flag} ({why})")]
    DirectInt4Conflict { flag: &'static str, why: &'static str },
}

/// An output folder that cannot be written or replaced; it is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output folder {} already exists (pass --force to replace it)", dest.display())]
    Exists { dest: PathBuf },
    #[error(
        "--force replaces only an earlier pio-export output (a folder with pio.json); {} is not one and was left \
         as it is: remove it yourself or choose another --out",
        dest.display()
    )]
    NotAnExport { dest: PathBuf },
    #[error(
        "{} exists and is not a synthetic checkpoint written by pio-export (no {}); it was left as it is: remove \
         it yourself or choose another --checkpoint-out",
        dest.display(), crate::scratch::SYNTHETIC_MARKER
    )]
    NotASyntheticCheckpoint { dest: PathBuf },
    #[error(
        "{} is a mount point (another filesystem than its parent): the output is written beside it and renamed into          place, which cannot replace a mount point; pass a folder inside it, such as {}",
        dest.display(), dest.join("model").display()
    )]
    MountPoint { dest: PathBuf },
    #[error(transparent)]
    Io(#[from] FsError),
    #[error("cannot move {} to {}", from.display(), to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers that remove scratch folders")]
    Signals(#[source] std::io::Error),
}

/// What the graph builder's functions return.
pub type BuildResult<T> = std::result::Result<T, BuildError>;

/// Why building a graph failed once the checkpoint and the settings were accepted.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A tensor the graph reads is missing, or not of the shape or dtype the config implies.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Writing the graph or its weight file.
    #[error(transparent)]
    Io(#[from] FsError),
    /// A weight that cannot be stored as int4; `weight` names the tensor (or the fused node it feeds).
    #[error("cannot quantize {weight} to int4")]
    Quantize {
        weight: String,
        #[source]
        source: QuantError,
    },
    /// A finite weight beyond float16's range (65504), which would be stored as infinity.
    #[error(
        "tensor {tensor} in {}: element {index} is {value}, beyond float16's range (±65504); export with --precision bf16 or fp32",
        file.display()
    )]
    Float16Overflow { tensor: String, file: PathBuf, index: usize, value: f32 },
    /// A broken invariant of the graph builder itself: a bug, not a problem of the input.
    #[error("graph builder bug: {0}")]
    Internal(String),
}

impl BuildError {
    pub(crate) fn quantize(weight: impl Into<String>) -> impl FnOnce(QuantError) -> BuildError {
        let weight = weight.into();
        move |source| BuildError::Quantize { weight, source }
    }
}

/// Why a weight cannot be quantized to int4.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error("an int4 weight needs rows and columns, got {n} x {k}")]
    Empty { n: usize, k: usize },
    #[error("the block size {block_size} is not a power of two >= 16")]
    BlockSize { block_size: usize },
    #[error("row {row}: the weight in column {column} is {value}, not a finite number")]
    NotFinite { row: usize, column: usize, value: f32 },
    #[error("row {row}: the scale of block {block} overflows {dtype:?}")]
    ScaleOverflow { row: usize, block: usize, dtype: TensorDtype },
    #[error("the scales must be float32, float16 or bfloat16 (the activations' dtype), got {dtype:?}")]
    ScaleDtype { dtype: TensorDtype },
    /// A buffer of the wrong length for the layout (a caller's bug).
    #[error("{what} has {got} values, the layout needs {expected}")]
    Length { what: &'static str, got: usize, expected: usize },
    #[error("a quantization thread panicked")]
    ThreadPanicked,
}
