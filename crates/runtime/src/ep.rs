//! The execution provider a session runs on, with its options.
//!
//! [`ExecutionProvider`] is what the CLI and the runtime pass around: the CPU (with a thread count), the CUDA execution
//! provider ([`CudaOptions`]) or TensorRT ([`TensorRtOptions`], with the CUDA EP registered behind it for the nodes
//! TensorRT does not take). Every typed option maps onto ONNX Runtime's documented provider-option keys
//! ([`CudaOptions::provider_options`], [`TensorRtOptions::provider_options`]); keys this module has no field for go
//! through unchanged in `extra` (the CLI's `--ep-option key=value`, parsed by [`ExecutionProvider::from_cli`]).
//!
//! References (ONNX Runtime 1.31, `ort` 2.0.0-rc.15):
//! - CUDA EP options: <https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#configuration-options>
//!   and `onnxruntime/core/providers/cuda/cuda_execution_provider_info.cc` (the key names; unknown keys are refused
//!   with `Unknown provider option: "..."`).
//! - TensorRT EP options: <https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html#configurations>
//!   (`trt_profile_{min,opt,max}_shapes` take `"input1:d1xd2x...,input2:..."`, like trtexec's `--minShapes`; when
//!   given, every dynamic-shape input must have a profile), and `ort`'s `src/ep/tensorrt.rs` (`trt_bf16_enable`,
//!   `trt_dump_ep_context_model`, `trt_ep_context_file_path` are there for ONNX Runtime 1.31).
//!
//! Before TensorRT is registered, [`ExecutionProvider::configure`] checks that the TensorRT libraries can be loaded
//! (ONNX Runtime's own failure there is obscure), through a [`SystemProbe`] that tests replace. Every failure is an
//! [`EpError`].

mod error;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use error::{EpError, LibraryLoadError, StartHints, TensorRtMissing};
use ort::ep::ArbitrarilyConfigurableExecutionProvider as _;
use ort::session::builder::SessionBuilder;
use pio_models::manifest::Manifest;
use serde::Serialize;

/// ONNX Runtime's name of the CUDA execution provider.
pub const CUDA_EP_NAME: &str = "CUDAExecutionProvider";
/// ONNX Runtime's name of the TensorRT execution provider.
pub const TENSORRT_EP_NAME: &str = "TensorrtExecutionProvider";
/// The TensorRT 10 libraries ONNX Runtime's TensorRT provider links against (its ONNX parser is built in).
pub const TENSORRT_LIBRARIES: &[&str] = &["libnvinfer.so.10", "libnvinfer_plugin.so.10"];

type Result<T, E = EpError> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "ep", rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU kernels; `threads` = intra-op threads (None: ONNX Runtime's default).
    Cpu {
        threads: Option<usize>,
    },
    Cuda(CudaOptions),
    #[serde(rename = "tensorrt")]
    TensorRt(TensorRtOptions),
}

impl Default for ExecutionProvider {
    fn default() -> Self {
        ExecutionProvider::Cpu { threads: None }
    }
}

/// How the CUDA memory arena grows (`arena_extend_strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ArenaExtendStrategy {
    /// `kNextPowerOfTwo` (ONNX Runtime's default): fewer, larger allocations, which can hold far more memory than
    /// an LLM's KV cache needs.
    NextPowerOfTwo,
    /// `kSameAsRequested`: grows by what is asked for; the better choice for LLMs (this module's default).
    SameAsRequested,
}

impl ArenaExtendStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            ArenaExtendStrategy::NextPowerOfTwo => "kNextPowerOfTwo",
            ArenaExtendStrategy::SameAsRequested => "kSameAsRequested",
        }
    }

    fn parse(key: &str, value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "ksameasrequested" | "sameasrequested" | "same" | "1" => Ok(ArenaExtendStrategy::SameAsRequested),
            "knextpoweroftwo" | "nextpoweroftwo" | "pow2" | "0" => Ok(ArenaExtendStrategy::NextPowerOfTwo),
            _ => Err(bad_value(key, value, "kSameAsRequested or kNextPowerOfTwo")),
        }
    }
}

/// Options of the CUDA execution provider (also the one registered behind TensorRT).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CudaOptions {
    /// `device_id`.
    pub device_id: i32,
    /// `enable_cuda_graph`: capture and replay the whole graph. Needs fixed input shapes and addresses (I/O
    /// binding), so it suits a fixed-buffer decode loop, not `DecoderModel::forward`.
    pub cuda_graph: bool,
    /// `gpu_mem_limit`: the arena's limit in bytes (None: no limit).
    pub gpu_mem_limit: Option<usize>,
    /// `arena_extend_strategy` (default [`ArenaExtendStrategy::SameAsRequested`]).
    pub arena_extend_strategy: ArenaExtendStrategy,
    /// `tunable_op_enable` + `tunable_op_tuning_enable`: let ONNX Runtime time and pick GEMM kernels online.
    pub tunable_op: bool,
    /// `prefer_nhwc` (default false; only convolution-heavy graphs gain).
    pub prefer_nhwc: bool,
    /// `use_tf32`: TF32 for fp32 MatMul/Conv (ONNX Runtime's default is on; turn off for fp32 parity checks).
    pub use_tf32: bool,
    /// `do_copy_in_default_stream` (default true; false may race, see ONNX Runtime issue #4829).
    pub copy_in_default_stream: bool,
    /// int4 MatMulNBits through ONNX Runtime's CUTLASS weight-only kernels (from TensorRT-LLM)
    /// instead of its generic ones. Not a provider option: ONNX Runtime reads the
    /// `ORT_FPA_INTB_GEMM` environment variable (and the `ep.cuda.fpa_intb_gemm` session entry)
    /// when it builds the kernels. Its default build covers what `pio-export --precision int4`
    /// writes: fp16 activations, symmetric int4, blocks of 32. None leaves ONNX Runtime's
    /// choice (off unless `ORT_FPA_INTB_GEMM` is set): on an H100 it decodes batches of 8 and 32
    /// faster (+20%, +46%) but batch 1 slower (253 against 301 tokens/s) and prefills slower
    /// (TTFT at 2048 tokens 59 against 40 ms).
    pub fpa_intb_gemm: Option<bool>,
    /// ONNX Runtime's memory pattern (one planned block per input shape, the session default).
    /// Off, activations are allocated tensor by tensor, which a prefill run in chunks of
    /// changing past length can reuse better. A session option, not a provider option.
    pub memory_pattern: bool,
    /// Return the arena's unused memory to the device after each multi-token run (each prefill
    /// chunk; run option `memory.enable_memory_arena_shrinkage`), so a long prompt's activations
    /// do not stay held. Not with `cuda_graph`: a captured graph keeps using its memory.
    pub shrink_arena: bool,
    /// Let ONNX Runtime pick cuDNN's fused attention (SDPA) for GroupQueryAttention's prefill.
    /// ONNX Runtime 1.31 prefers it on SM >= 90 unless the kernels are pinned, and cuDNN builds
    /// an execution plan for every new query length: 0.4 to 0.6 s each on an H100 (measured
    /// through the engine's slow-step log), so a server, whose prompts and prefill chunks come
    /// in every length, stalls on most new requests. Off (the default), the `sdpa_kernel`
    /// provider option pins flash, memory-efficient and unfused attention
    /// ([`SDPA_WITHOUT_CUDNN`]), which take any length at no setup cost; decode keeps its XQA
    /// kernel either way. An `sdpa_kernel` in `extra` overrides both.
    pub cudnn_attention: bool,
    /// Further provider options passed through as given; a key here replaces a typed option's.
    pub extra: Vec<(String, String)>,
}

/// ONNX Runtime's `sdpa_kernel` bits (`AttentionBackend`): flash (1), memory-efficient (2) and
/// the unfused kernel (16), without cuDNN's (8).
pub const SDPA_WITHOUT_CUDNN: u32 = 1 | 2 | 16;

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device_id: 0,
            cuda_graph: false,
            gpu_mem_limit: None,
            arena_extend_strategy: ArenaExtendStrategy::SameAsRequested,
            tunable_op: false,
            prefer_nhwc: false,
            use_tf32: true,
            copy_in_default_stream: true,
            fpa_intb_gemm: None,
            memory_pattern: true,
            shrink_arena: false,
            cudnn_attention: false,
            extra: Vec::new(),
        }
    }
}

impl CudaOptions {
    pub fn new(device_id: i32) -> Self {
        CudaOptions { device_id, ..Default::default() }
    }

    /// The provider options this sets, in the order registered (`extra` keys replace typed ones in place).
    pub fn provider_options(&self) -> Vec<(String, String)> {
        let mut o = Vec::new();
        push(&mut o, "device_id", self.device_id);
        if let Some(limit) = self.gpu_mem_limit {
            push(&mut o, "gpu_mem_limit", limit);
        }
        push(&mut o, "arena_extend_strategy", self.arena_extend_strategy.as_str());
        push(&mut o, "enable_cuda_graph", flag(self.cuda_graph));
        push(&mut o, "tunable_op_enable", flag(self.tunable_op));
        if self.tunable_op {
            push(&mut o, "tunable_op_tuning_enable", "1");
        }
        push(&mut o, "prefer_nhwc", flag(self.prefer_nhwc));
        push(&mut o, "use_tf32", flag(self.use_tf32));
        push(&mut o, "do_copy_in_default_stream", flag(self.copy_in_default_stream));
        if !self.cudnn_attention {
            push(&mut o, "sdpa_kernel", SDPA_WITHOUT_CUDNN);
        }
        merge_extra(o, &self.extra)
    }

    /// Refuses combinations that cannot work together.
    pub fn validate(&self) -> Result<()> {
        if self.shrink_arena && self.cuda_graph {
            return Err(EpError::ShrinkArenaWithCudaGraph);
        }
        Ok(())
    }

    /// Applies one well-known `key=value` (the CLI names and ONNX Runtime's); false if the key is not one of them.
    fn apply(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "device_id" => self.device_id = parse_device_id(key, value)?,
            "cuda_graph" | "enable_cuda_graph" => self.cuda_graph = parse_bool(key, value)?,
            "gpu_mem_limit" | "mem_limit" => self.gpu_mem_limit = parse_bytes(key, value)?,
            "arena_extend_strategy" | "arena" => self.arena_extend_strategy = ArenaExtendStrategy::parse(key, value)?,
            "tunable_op" | "tunable_op_enable" => self.tunable_op = parse_bool(key, value)?,
            "prefer_nhwc" => self.prefer_nhwc = parse_bool(key, value)?,
            "use_tf32" | "tf32" => self.use_tf32 = parse_bool(key, value)?,
            "copy_in_default_stream" | "do_copy_in_default_stream" => {
                self.copy_in_default_stream = parse_bool(key, value)?
            }
            "fpa_intb_gemm" | "int4_cutlass" => self.fpa_intb_gemm = Some(parse_bool(key, value)?),
            "memory_pattern" | "mem_pattern" => self.memory_pattern = parse_bool(key, value)?,
            "shrink_arena" | "arena_shrinkage" => self.shrink_arena = parse_bool(key, value)?,
            "cudnn_attention" | "cudnn_sdpa" => self.cudnn_attention = parse_bool(key, value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Options of the TensorRT execution provider. The CUDA EP ([`TensorRtOptions::cuda`], on the same device) is
/// registered behind it and runs the nodes TensorRT does not take. The defaults are ONNX Runtime's (fp32, no caches,
/// no explicit profiles), on device 0, with no fallback.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TensorRtOptions {
    /// `device_id` (also the CUDA EP's: `cuda.device_id` is ignored).
    pub device_id: i32,
    /// `trt_fp16_enable`.
    pub fp16: bool,
    /// `trt_bf16_enable` (set only when true).
    pub bf16: bool,
    /// `trt_int8_enable`.
    pub int8: bool,
    /// `trt_cuda_graph_enable`.
    pub cuda_graph: bool,
    /// `trt_engine_cache_enable=1` + `trt_engine_cache_path`: a folder, created if missing.
    pub engine_cache_dir: Option<PathBuf>,
    /// `trt_timing_cache_enable=1` + `trt_timing_cache_path`: a folder, created if missing.
    pub timing_cache_dir: Option<PathBuf>,
    /// `trt_dump_ep_context_model=1` + `trt_ep_context_file_path`: where the EP-context model (the graph with the
    /// built engine) is written; its parent folder is created if missing.
    pub ep_context_dump: Option<PathBuf>,
    /// `trt_max_workspace_size` in bytes (None: ONNX Runtime's default, the device's memory).
    pub max_workspace_size: Option<usize>,
    /// `trt_builder_optimization_level`, 0..=5 (None: TensorRT's default, 3).
    pub builder_optimization_level: Option<u8>,
    /// `trt_profile_min_shapes` / `_opt_` / `_max_`: all three or none (see [`trt_profile_shapes`]).
    pub profile_min_shapes: Option<String>,
    pub profile_opt_shapes: Option<String>,
    pub profile_max_shapes: Option<String>,
    /// When the TensorRT libraries cannot be loaded (or the provider fails to start), warn and run on the CUDA EP
    /// alone instead of failing.
    pub fallback_to_cuda: bool,
    /// The CUDA EP registered behind TensorRT.
    pub cuda: CudaOptions,
    /// Further TensorRT provider options passed through as given; a key here replaces a typed option's.
    pub extra: Vec<(String, String)>,
}

impl TensorRtOptions {
    pub fn new(device_id: i32) -> Self {
        TensorRtOptions { device_id, cuda: CudaOptions::new(device_id), ..Default::default() }
    }

    /// Sets the three optimization-profile strings (e.g. from [`trt_profile_shapes`]).
    pub fn with_profile_shapes(mut self, (min, opt, max): (String, String, String)) -> Self {
        self.profile_min_shapes = Some(min);
        self.profile_opt_shapes = Some(opt);
        self.profile_max_shapes = Some(max);
        self
    }

    /// The TensorRT provider options this sets, in the order registered (`extra` keys replace typed ones in place).
    /// Paths are passed as given (relative ones resolve against the working directory).
    pub fn provider_options(&self) -> Vec<(String, String)> {
        let mut o = Vec::new();
        push(&mut o, "device_id", self.device_id);
        push(&mut o, "trt_fp16_enable", flag(self.fp16));
        if self.bf16 {
            push(&mut o, "trt_bf16_enable", "1");
        }
        push(&mut o, "trt_int8_enable", flag(self.int8));
        if self.cuda_graph {
            push(&mut o, "trt_cuda_graph_enable", "1");
        }
        if let Some(size) = self.max_workspace_size {
            push(&mut o, "trt_max_workspace_size", size);
        }
        if let Some(level) = self.builder_optimization_level {
            push(&mut o, "trt_builder_optimization_level", level);
        }
        if let Some(dir) = &self.engine_cache_dir {
            push(&mut o, "trt_engine_cache_enable", "1");
            push(&mut o, "trt_engine_cache_path", dir.display());
        }
        if let Some(dir) = &self.timing_cache_dir {
            push(&mut o, "trt_timing_cache_enable", "1");
            push(&mut o, "trt_timing_cache_path", dir.display());
        }
        if let Some(path) = &self.ep_context_dump {
            push(&mut o, "trt_dump_ep_context_model", "1");
            push(&mut o, "trt_ep_context_file_path", path.display());
        }
        for (key, value) in [
            ("trt_profile_min_shapes", &self.profile_min_shapes),
            ("trt_profile_opt_shapes", &self.profile_opt_shapes),
            ("trt_profile_max_shapes", &self.profile_max_shapes),
        ] {
            if let Some(v) = value {
                push(&mut o, key, v);
            }
        }
        merge_extra(o, &self.extra)
    }

    /// The CUDA EP's options: [`TensorRtOptions::cuda`] on TensorRT's device.
    pub fn cuda_options(&self) -> CudaOptions {
        CudaOptions { device_id: self.device_id, ..self.cuda.clone() }
    }

    /// Checks what ONNX Runtime would otherwise reject obscurely: the profile strings (all three or none, each
    /// `name:d1xd2,...`, the same inputs and ranks, min <= opt <= max), the optimization level and paths.
    pub fn validate(&self) -> Result<()> {
        if let Some(level) = self.builder_optimization_level {
            if level > 5 {
                return Err(EpError::OptimizationLevel(level));
            }
        }
        match (&self.profile_min_shapes, &self.profile_opt_shapes, &self.profile_max_shapes) {
            (None, None, None) => {}
            (Some(min), Some(opt), Some(max)) => {
                let min_p = parse_profile_shapes("trt_profile_min_shapes", min)?;
                let opt_p = parse_profile_shapes("trt_profile_opt_shapes", opt)?;
                let max_p = parse_profile_shapes("trt_profile_max_shapes", max)?;
                for (name, min_dims) in &min_p {
                    let find = |p: &[(String, Vec<i64>)], which: &'static str| -> Result<Vec<i64>> {
                        p.iter()
                            .find(|(n, _)| n == name)
                            .map(|(_, d)| d.clone())
                            .ok_or_else(|| EpError::ProfileMissingShape { input: name.clone(), which })
                    };
                    let opt_dims = find(&opt_p, "opt")?;
                    let max_dims = find(&max_p, "max")?;
                    if opt_dims.len() != min_dims.len() || max_dims.len() != min_dims.len() {
                        return Err(EpError::ProfileRanks { input: name.clone() });
                    }
                    for i in 0..min_dims.len() {
                        if !(min_dims[i] <= opt_dims[i] && opt_dims[i] <= max_dims[i]) {
                            return Err(EpError::ProfileOrder {
                                input: name.clone(),
                                dim: i,
                                min: min_dims[i],
                                opt: opt_dims[i],
                                max: max_dims[i],
                            });
                        }
                    }
                }
                if opt_p.len() != min_p.len() || max_p.len() != min_p.len() {
                    return Err(EpError::ProfileInputsDiffer);
                }
            }
            _ => return Err(EpError::ProfileIncomplete),
        }
        for (what, path) in [
            ("trt_engine_cache_path", &self.engine_cache_dir),
            ("trt_timing_cache_path", &self.timing_cache_dir),
            ("trt_ep_context_file_path", &self.ep_context_dump),
        ] {
            if let Some(p) = path {
                if p.as_os_str().is_empty() {
                    return Err(EpError::EmptyPath { key: what });
                }
                if p.to_str().is_none() {
                    return Err(EpError::NonUtf8Path { key: what, path: p.clone() });
                }
            }
        }
        Ok(())
    }

    /// Creates the engine-cache and timing-cache folders and the EP-context file's folder when missing; fails when
    /// one of them is a file.
    pub fn prepare_dirs(&self) -> Result<()> {
        if let Some(dir) = &self.engine_cache_dir {
            ensure_dir(dir, "TensorRT engine cache (trt_engine_cache_path)")?;
        }
        if let Some(dir) = &self.timing_cache_dir {
            ensure_dir(dir, "TensorRT timing cache (trt_timing_cache_path)")?;
        }
        if let Some(path) = &self.ep_context_dump {
            let folder_like = path.is_dir() || path.to_str().is_some_and(|s| s.ends_with('/'));
            let dir = if folder_like { Some(path.as_path()) } else { path.parent() };
            if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) {
                ensure_dir(dir, "TensorRT EP-context model folder (trt_ep_context_file_path)")?;
            }
        }
        Ok(())
    }

    /// Applies one well-known `key=value`; false if the key is not one of them.
    fn apply(&mut self, key: &str, value: &str, state: &mut TrtParseState) -> Result<bool> {
        let path = |v: &str| -> Result<PathBuf> {
            if v.trim().is_empty() {
                Err(bad_value(key, v, "a path"))
            } else {
                Ok(PathBuf::from(v))
            }
        };
        match key {
            "device_id" => {
                self.device_id = parse_device_id(key, value)?;
                self.cuda.device_id = self.device_id;
            }
            "trt_fp16" | "trt_fp16_enable" | "fp16" => self.fp16 = parse_bool(key, value)?,
            "trt_bf16" | "trt_bf16_enable" | "bf16" => self.bf16 = parse_bool(key, value)?,
            "trt_int8" | "trt_int8_enable" | "int8" => self.int8 = parse_bool(key, value)?,
            // TensorRT's CUDA graph (the CUDA EP's behind it: `cuda.enable_cuda_graph`).
            "cuda_graph" | "enable_cuda_graph" | "trt_cuda_graph" | "trt_cuda_graph_enable" => {
                self.cuda_graph = parse_bool(key, value)?
            }
            "trt_engine_cache_path" | "engine_cache" | "engine_cache_dir" => self.engine_cache_dir = Some(path(value)?),
            "trt_engine_cache_enable" => state.engine_cache_enable = Some(parse_bool(key, value)?),
            "trt_timing_cache_path" | "timing_cache" | "timing_cache_dir" => self.timing_cache_dir = Some(path(value)?),
            "trt_timing_cache_enable" => state.timing_cache_enable = Some(parse_bool(key, value)?),
            "trt_ep_context_file_path" | "ep_context" | "ep_context_file" => self.ep_context_dump = Some(path(value)?),
            "trt_dump_ep_context_model" => state.dump_ep_context = Some(parse_bool(key, value)?),
            "trt_max_workspace_size" | "max_workspace_size" | "workspace" => {
                self.max_workspace_size = parse_bytes(key, value)?
            }
            "trt_builder_optimization_level" | "builder_optimization_level" | "opt_level" => {
                let level: u8 = value.trim().parse().map_err(|_| bad_value(key, value, "an integer 0..=5"))?;
                if level > 5 {
                    return Err(bad_value(key, value, "an integer 0..=5"));
                }
                self.builder_optimization_level = Some(level);
            }
            "trt_profile_min_shapes" | "profile_min_shapes" => self.profile_min_shapes = Some(value.to_string()),
            "trt_profile_opt_shapes" | "profile_opt_shapes" => self.profile_opt_shapes = Some(value.to_string()),
            "trt_profile_max_shapes" | "profile_max_shapes" => self.profile_max_shapes = Some(value.to_string()),
            "fallback" | "trt_fallback" => {
                self.fallback_to_cuda = match value.trim().to_ascii_lowercase().as_str() {
                    "cuda" | "1" | "true" | "yes" | "on" => true,
                    "none" | "error" | "0" | "false" | "no" | "off" => false,
                    _ => return Err(bad_value(key, value, "cuda or none")),
                }
            }
            _ => {
                if let Some(cuda_key) = key.strip_prefix("cuda.") {
                    if !self.cuda.apply(cuda_key, value)? {
                        tracing::debug!(key = cuda_key, value, "passing an unknown option through to the CUDA EP");
                        self.cuda.extra.push((cuda_key.to_string(), value.to_string()));
                    }
                    return Ok(true);
                }
                // The CUDA EP's own options (its graph flag and device are TensorRT's, matched above).
                if !self.cuda.apply(key, value)? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// What `--ep-option` flags set that only make sense together; resolved after all flags are read.
#[derive(Default)]
struct TrtParseState {
    engine_cache_enable: Option<bool>,
    timing_cache_enable: Option<bool>,
    dump_ep_context: Option<bool>,
}

impl TrtParseState {
    fn resolve(self, o: &mut TensorRtOptions) -> Result<()> {
        let resolve =
            |enable: Option<bool>, path: &mut Option<PathBuf>, enable_key: &'static str, path_key: &'static str| {
                match enable {
                    Some(false) => *path = None,
                    Some(true) if path.is_none() => return Err(EpError::EnabledWithoutPath { enable_key, path_key }),
                    _ => {}
                }
                Ok(())
            };
        resolve(self.engine_cache_enable, &mut o.engine_cache_dir, "trt_engine_cache_enable", "trt_engine_cache_path")?;
        resolve(self.timing_cache_enable, &mut o.timing_cache_dir, "trt_timing_cache_enable", "trt_timing_cache_path")?;
        resolve(self.dump_ep_context, &mut o.ep_context_dump, "trt_dump_ep_context_model", "trt_ep_context_file_path")?;
        Ok(())
    }
}

/// Which GPU execution provider a [`ProviderSpec`] registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuProvider {
    Cuda,
    TensorRt,
}

impl GpuProvider {
    pub fn ort_name(self) -> &'static str {
        match self {
            GpuProvider::Cuda => CUDA_EP_NAME,
            GpuProvider::TensorRt => TENSORRT_EP_NAME,
        }
    }
}

/// One provider to register, with the exact options passed to ONNX Runtime.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderSpec {
    pub provider: GpuProvider,
    pub options: Vec<(String, String)>,
}

/// What [`ExecutionProvider::configure`] does, decided before anything touches the session builder.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ProviderPlan {
    /// Intra-op threads (CPU).
    pub intra_threads: Option<usize>,
    /// Providers in priority order (TensorRT before the CUDA EP behind it).
    pub providers: Vec<ProviderSpec>,
    /// When TensorRT's registration fails, warn and register the CUDA EP alone.
    pub fallback_to_cuda: bool,
    /// Warnings to log (e.g. the TensorRT -> CUDA fallback).
    pub warnings: Vec<String>,
    /// Session configuration entries (`key`, `value`).
    pub session_config: Vec<(String, String)>,
    /// Environment variables ONNX Runtime's kernels read when the session is built.
    pub env: Vec<(String, String)>,
    /// Session memory pattern (None: ONNX Runtime's default, on).
    pub memory_pattern: Option<bool>,
}

/// What [`ExecutionProvider::configure`] asks of the machine; tests substitute their own.
pub trait SystemProbe {
    /// Whether the loaded ONNX Runtime was built with the provider (`CUDAExecutionProvider`, ...). True does not
    /// mean it can start: that needs CUDA, cuDNN (and TensorRT) libraries and a GPU.
    fn provider_compiled_in(&self, ort_name: &str) -> Result<bool>;
    /// Tries to load a shared library by file name; `Err` holds the loader's error.
    fn load_library(&self, name: &str) -> Result<(), LibraryLoadError>;
}

/// The real machine: ONNX Runtime's provider list and `dlopen`.
pub struct LiveSystem;

impl SystemProbe for LiveSystem {
    fn provider_compiled_in(&self, ort_name: &str) -> Result<bool> {
        use ort::ep::ExecutionProvider as _;
        let r = match ort_name {
            CUDA_EP_NAME => ort::ep::CUDA::is_available(),
            TENSORRT_EP_NAME => ort::ep::TensorRT::is_available(),
            other => return Err(EpError::UnknownOrtProvider(other.to_string())),
        };
        r.map_err(EpError::ListProviders)
    }

    /// Loads `name` through the system loader, then from the folder of the loaded `libonnxruntime.so` (where ONNX
    /// Runtime's provider libraries, whose RUNPATH is `$ORIGIN`, would find it). A library found stays loaded, so the
    /// provider's own load finds the same one.
    fn load_library(&self, name: &str) -> Result<(), LibraryLoadError> {
        // SAFETY: loading runs the library's initializers; these are NVIDIA's CUDA/TensorRT libraries, which ONNX
        // Runtime's provider would load into this process anyway.
        let load = |path: &Path| unsafe { libloading::Library::new(path) }.map(std::mem::forget);
        // The system loader's error is the one reported: it names the library as the user would look for it.
        let Err(first) = load(Path::new(name)) else { return Ok(()) };
        if let Some(dir) = crate::ort_lib::loaded_library_path().and_then(Path::parent) {
            if load(&dir.join(name)).is_ok() {
                return Ok(());
            }
        }
        Err(LibraryLoadError { name: name.to_string(), source: Box::new(first) })
    }
}

impl ExecutionProvider {
    pub fn name(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu { .. } => "cpu",
            ExecutionProvider::Cuda(_) => "cuda",
            ExecutionProvider::TensorRt(_) => "tensorrt",
        }
    }

    /// The GPU a session runs on (None on the CPU).
    pub fn device_id(&self) -> Option<i32> {
        match self {
            ExecutionProvider::Cpu { .. } => None,
            ExecutionProvider::Cuda(o) => Some(o.device_id),
            ExecutionProvider::TensorRt(o) => Some(o.device_id),
        }
    }

    /// Whether the provider captures and replays CUDA graphs (`enable_cuda_graph` / `trt_cuda_graph_enable`).
    pub fn cuda_graph(&self) -> bool {
        match self {
            ExecutionProvider::Cpu { .. } => false,
            ExecutionProvider::Cuda(o) => o.cuda_graph,
            ExecutionProvider::TensorRt(o) => o.cuda_graph,
        }
    }

    /// The CUDA EP's options (also TensorRT's fallback EP); None on the CPU.
    pub fn cuda_options(&self) -> Option<CudaOptions> {
        match self {
            ExecutionProvider::Cpu { .. } => None,
            ExecutionProvider::Cuda(o) => Some(o.clone()),
            ExecutionProvider::TensorRt(o) => Some(o.cuda_options()),
        }
    }

    /// Turns CUDA graphs on or off (`enable_cuda_graph` for CUDA, `trt_cuda_graph_enable` for TensorRT); nothing on
    /// the CPU.
    pub fn set_cuda_graph(&mut self, on: bool) {
        match self {
            ExecutionProvider::Cpu { .. } => {}
            ExecutionProvider::Cuda(o) => o.cuda_graph = on,
            ExecutionProvider::TensorRt(o) => o.cuda_graph = on,
        }
    }

    /// `cpu`, `cuda` or `tensorrt` (`trt`) with default options on `device_id`.
    pub fn parse(name: &str, device_id: i32) -> Result<Self> {
        Self::from_cli(name, device_id, &[])
    }

    /// The provider named `name` on `device_id`, with `options` (`key=value`, the CLI's `--ep-option`) applied.
    ///
    /// Well-known keys set typed options, under ONNX Runtime's names or short ones: for `cuda`, `cuda_graph`
    /// (`enable_cuda_graph`), `gpu_mem_limit` (bytes; `8G`, `512MiB` accepted), `arena_extend_strategy`,
    /// `tunable_op`, `prefer_nhwc`, `use_tf32`, `do_copy_in_default_stream`, `cudnn_attention`, `device_id`; for
    /// `tensorrt`, `trt_fp16`,
    /// `trt_bf16`, `trt_int8`, `trt_cuda_graph_enable` (`cuda_graph`), `trt_engine_cache_path=DIR`,
    /// `trt_timing_cache_path=DIR`, `trt_ep_context_file_path=FILE` (implies `trt_dump_ep_context_model=1`),
    /// `trt_max_workspace_size`, `trt_builder_optimization_level`, `trt_profile_{min,opt,max}_shapes`,
    /// `fallback=cuda`, the CUDA keys above for the CUDA EP behind TensorRT, and `cuda.KEY=VALUE` for any CUDA EP
    /// option; for `cpu`, `threads=N`. Other keys are passed to the provider unchanged (`extra`; ONNX Runtime refuses
    /// keys it does not know when the session is created). Bad values are errors naming the key and the value.
    pub fn from_cli(name: &str, device_id: i32, options: &[String]) -> Result<Self> {
        let mut pairs = Vec::with_capacity(options.len());
        for o in options {
            let (k, v) = o.split_once('=').ok_or_else(|| EpError::NotKeyValue { option: o.clone() })?;
            let k = k.trim();
            if k.is_empty() {
                return Err(EpError::EmptyKey { option: o.clone() });
            }
            pairs.push((k.to_string(), v.trim().to_string()));
        }
        let name = name.trim().to_ascii_lowercase();
        if device_id < 0 && name != "cpu" {
            return Err(EpError::NegativeDeviceId(device_id));
        }
        match name.as_str() {
            "cpu" => {
                let mut threads = None;
                for (k, v) in &pairs {
                    match k.as_str() {
                        "threads" | "intra_op_num_threads" => {
                            let n: usize = v.parse().map_err(|_| bad_value(k, v, "a positive integer"))?;
                            if n == 0 {
                                return Err(bad_value(k, v, "a positive integer"));
                            }
                            threads = Some(n);
                        }
                        _ => return Err(EpError::NotACpuOption { key: k.clone(), value: v.clone() }),
                    }
                }
                Ok(ExecutionProvider::Cpu { threads })
            }
            "cuda" => {
                let mut o = CudaOptions::new(device_id);
                for (k, v) in pairs {
                    if k.starts_with("trt_") || k == "fallback" {
                        return Err(EpError::TensorRtOptionOnCuda { key: k, value: v });
                    }
                    let k = k.strip_prefix("cuda.").unwrap_or(&k).to_string();
                    if !o.apply(&k, &v)? {
                        tracing::debug!(key = %k, value = %v, "passing an unknown option through to the CUDA EP");
                        o.extra.push((k, v));
                    }
                }
                Ok(ExecutionProvider::Cuda(o))
            }
            "tensorrt" | "trt" => {
                let mut o = TensorRtOptions::new(device_id);
                let mut state = TrtParseState::default();
                for (k, v) in pairs {
                    if !o.apply(&k, &v, &mut state)? {
                        tracing::debug!(key = %k, value = %v, "passing an unknown option through to the TensorRT EP");
                        o.extra.push((k, v));
                    }
                }
                state.resolve(&mut o)?;
                o.validate()?;
                Ok(ExecutionProvider::TensorRt(o))
            }
            other => Err(EpError::UnknownProvider(other.to_string())),
        }
    }

    /// The options of the provider itself (for TensorRT, not those of the CUDA EP behind it); empty for the CPU.
    pub fn provider_options(&self) -> Vec<(String, String)> {
        match self {
            ExecutionProvider::Cpu { .. } => Vec::new(),
            ExecutionProvider::Cuda(o) => o.provider_options(),
            ExecutionProvider::TensorRt(o) => o.provider_options(),
        }
    }

    /// One line for logs and reports: the providers and every option set.
    pub fn describe(&self) -> String {
        let fmt = |name: &str, opts: &[(String, String)]| {
            let mut s = format!("{name}(");
            for (i, (k, v)) in opts.iter().enumerate() {
                let _ = write!(s, "{}{k}={v}", if i > 0 { ", " } else { "" });
            }
            s.push(')');
            s
        };
        match self {
            ExecutionProvider::Cpu { threads: Some(n) } => format!("cpu(threads={n})"),
            ExecutionProvider::Cpu { threads: None } => "cpu".to_string(),
            ExecutionProvider::Cuda(o) => fmt("cuda", &o.provider_options()),
            ExecutionProvider::TensorRt(o) => format!(
                "{} + {}{}",
                fmt("tensorrt", &o.provider_options()),
                fmt("cuda", &o.cuda_options().provider_options()),
                if o.fallback_to_cuda { " (fallback to cuda)" } else { "" }
            ),
        }
    }

    /// Decides what to register: checks that the loaded ONNX Runtime has the provider, that TensorRT's libraries
    /// load (else an error, or with `fallback_to_cuda` a warning and the CUDA EP alone), and creates the TensorRT
    /// cache folders. Touches no session builder, so it can be tested without ONNX Runtime.
    pub fn plan(&self, probe: &dyn SystemProbe) -> Result<ProviderPlan> {
        match self {
            ExecutionProvider::Cpu { threads } => Ok(ProviderPlan { intra_threads: *threads, ..Default::default() }),
            ExecutionProvider::Cuda(o) => {
                o.validate()?;
                require_compiled_in(probe, GpuProvider::Cuda)?;
                Ok(ProviderPlan {
                    providers: vec![ProviderSpec { provider: GpuProvider::Cuda, options: o.provider_options() }],
                    ..Default::default()
                }
                .with_kernel_switches(o))
            }
            ExecutionProvider::TensorRt(o) => {
                o.validate()?;
                o.cuda_options().validate()?;
                let cuda = ProviderSpec { provider: GpuProvider::Cuda, options: o.cuda_options().provider_options() };
                let trt_missing = if !probe.provider_compiled_in(TENSORRT_EP_NAME)? {
                    Some(TensorRtMissing::NotCompiledIn { library: loaded_library() })
                } else {
                    let missing: Vec<LibraryLoadError> =
                        TENSORRT_LIBRARIES.iter().filter_map(|l| probe.load_library(l).err()).collect();
                    (!missing.is_empty()).then_some(TensorRtMissing::Libraries { missing })
                };
                if let Some(why) = trt_missing {
                    if !o.fallback_to_cuda {
                        return Err(EpError::TensorRtUnavailable(why));
                    }
                    require_compiled_in(probe, GpuProvider::Cuda)?;
                    return Ok(ProviderPlan {
                        providers: vec![cuda],
                        warnings: vec![format!("{why}; falling back to the CUDA execution provider (fallback=cuda)")],
                        ..Default::default()
                    }
                    .with_kernel_switches(&o.cuda_options()));
                }
                o.prepare_dirs()?;
                Ok(ProviderPlan {
                    providers: vec![
                        ProviderSpec { provider: GpuProvider::TensorRt, options: o.provider_options() },
                        cuda,
                    ],
                    fallback_to_cuda: o.fallback_to_cuda,
                    ..Default::default()
                }
                .with_kernel_switches(&o.cuda_options()))
            }
        }
    }

    /// Registers this provider on a session builder; fails (rather than silently falling back to the CPU) when the
    /// provider cannot be registered.
    pub fn configure(&self, builder: SessionBuilder) -> Result<SessionBuilder> {
        self.configure_with(builder, &LiveSystem)
    }

    /// [`configure`](Self::configure) with the machine checks made through `probe`.
    pub fn configure_with(&self, builder: SessionBuilder, probe: &dyn SystemProbe) -> Result<SessionBuilder> {
        let plan = self.plan(probe)?;
        for w in &plan.warnings {
            tracing::warn!("{w}");
        }
        plan.apply(builder, probe)
    }
}

impl ProviderPlan {
    /// The CUDA kernel choices ONNX Runtime takes from the environment and session entries.
    fn with_kernel_switches(mut self, cuda: &CudaOptions) -> Self {
        if let Some(on) = cuda.fpa_intb_gemm {
            self.env.push(("ORT_FPA_INTB_GEMM".into(), flag(on).to_string()));
            self.session_config.push(("ep.cuda.fpa_intb_gemm".into(), flag(on).to_string()));
        }
        self.memory_pattern = (!cuda.memory_pattern).then_some(false);
        self
    }

    /// Applies the plan: threads, kernel switches, then each provider in order with `error_on_failure`.
    pub fn apply(&self, mut builder: SessionBuilder, probe: &dyn SystemProbe) -> Result<SessionBuilder> {
        if let Some(n) = self.intra_threads {
            builder =
                builder.with_intra_threads(n).map_err(|e| EpError::IntraThreads { threads: n, source: e.into() })?;
        }
        for (key, value) in &self.env {
            // Read by ONNX Runtime while it builds this session's kernels, on this thread; set
            // only when asked for (`fpa_intb_gemm=...`), so a user's own setting stands otherwise.
            if std::env::var(key).ok().as_deref() != Some(value) {
                std::env::set_var(key, value);
            }
        }
        if let Some(on) = self.memory_pattern {
            builder = builder.with_memory_pattern(on).map_err(|e| EpError::MemoryPattern(e.into()))?;
        }
        for (key, value) in &self.session_config {
            builder = builder.with_config_entry(key, value).map_err(|e| EpError::SessionEntry {
                key: key.clone(),
                value: value.clone(),
                source: e.into(),
            })?;
        }
        let has_cuda_after = |i: usize| self.providers[i + 1..].iter().any(|p| p.provider == GpuProvider::Cuda);
        for (i, spec) in self.providers.iter().enumerate() {
            let dispatch = match spec.provider {
                GpuProvider::Cuda => {
                    let mut ep = ort::ep::CUDA::default();
                    for (k, v) in &spec.options {
                        ep = ep.with_arbitrary_config(k, v);
                    }
                    ep.build().error_on_failure()
                }
                GpuProvider::TensorRt => {
                    let mut ep = ort::ep::TensorRT::default();
                    for (k, v) in &spec.options {
                        ep = ep.with_arbitrary_config(k, v);
                    }
                    ep.build().error_on_failure()
                }
            };
            builder = match builder.with_execution_providers([dispatch]) {
                Ok(b) => b,
                Err(e) if spec.provider == GpuProvider::TensorRt && self.fallback_to_cuda && has_cuda_after(i) => {
                    tracing::warn!(
                        "cannot start the TensorRT execution provider ({e}); falling back to the CUDA execution provider \
                         (fallback=cuda)"
                    );
                    e.recover()
                }
                Err(e) => {
                    return Err(EpError::StartProvider {
                        provider: spec.provider,
                        hints: diagnose(spec.provider, probe),
                        source: e.into(),
                    });
                }
            };
        }
        Ok(builder)
    }
}

/// Min/opt/max TensorRT profile strings (`trt_profile_{min,opt,max}_shapes`) for every graph input of `manifest`
/// with a symbolic dimension.
///
/// `batch` is the (min, opt, max) batch size; `seq` the (min, opt, max) *total* sequence length, i.e. the tokens in
/// the context after a step (past + new), with `seq.2` at most the graph's context length. Symbolic dimensions map as:
/// `batch_size` -> batch; `total_sequence_length` -> seq; `sequence_length` (new tokens) -> (1, 1, seq.max), the
/// optimum being a decode step; `past_sequence_length` -> (0, seq.opt - 1, seq.max - 1) (TensorRT profiles allow
/// zero-length dimensions; an empty KV cache before the prompt is length 0, as onnxruntime-genai's TensorRT-RTX
/// profiles also use 0 minima); `max_sequence_length` -> seq.max. The opt shapes thus describe one decode step at
/// `seq.opt` tokens of context. Fixed dimensions are copied. Unknown symbolic dimensions are an error.
pub fn trt_profile_shapes(
    manifest: &Manifest,
    batch: (usize, usize, usize),
    seq: (usize, usize, usize),
) -> Result<(String, String, String)> {
    let check = |what: &'static str, (min, opt, max): (usize, usize, usize)| -> Result<()> {
        if min == 0 || min > opt || opt > max {
            return Err(EpError::ProfileRange { what, min, opt, max });
        }
        Ok(())
    };
    check("batch", batch)?;
    check("sequence", seq)?;
    let ctx = manifest.dims.context_length;
    if seq.2 > ctx {
        return Err(EpError::ProfileBeyondContext { max: seq.2, context_length: ctx });
    }
    let (mut min_s, mut opt_s, mut max_s) = (Vec::new(), Vec::new(), Vec::new());
    for input in &manifest.inputs {
        if input.name.contains([',', ':']) || input.name.is_empty() {
            return Err(EpError::ProfileInputName { input: input.name.clone() });
        }
        if input.shape.iter().all(|d| d.is_number()) {
            continue; // static: TensorRT needs no profile
        }
        let mut dims = [Vec::new(), Vec::new(), Vec::new()];
        for (axis, d) in input.shape.iter().enumerate() {
            let range = match d {
                serde_json::Value::Number(n) => {
                    let v = n.as_u64().ok_or_else(|| EpError::ProfileFixedDimension {
                        input: input.name.clone(),
                        axis,
                        value: n.clone(),
                    })? as usize;
                    (v, v, v)
                }
                serde_json::Value::String(sym) => match sym.as_str() {
                    "batch_size" | "batch" => batch,
                    "sequence_length" | "seq_len" => (1, 1, seq.2),
                    "total_sequence_length" | "total_seq_len" => seq,
                    "past_sequence_length" | "past_seq_len" => (0, seq.1 - 1, seq.2 - 1),
                    "max_sequence_length" | "max_seq_len" => (seq.2, seq.2, seq.2),
                    other => {
                        return Err(EpError::ProfileUnknownSymbol {
                            input: input.name.clone(),
                            axis,
                            symbol: other.to_string(),
                        })
                    }
                },
                other => {
                    return Err(EpError::ProfileBadDimension { input: input.name.clone(), axis, value: other.clone() })
                }
            };
            dims[0].push(range.0.to_string());
            dims[1].push(range.1.to_string());
            dims[2].push(range.2.to_string());
        }
        min_s.push(format!("{}:{}", input.name, dims[0].join("x")));
        opt_s.push(format!("{}:{}", input.name, dims[1].join("x")));
        max_s.push(format!("{}:{}", input.name, dims[2].join("x")));
    }
    Ok((min_s.join(","), opt_s.join(","), max_s.join(",")))
}

/// Parses a `trt_profile_*_shapes` string (`name:d1xd2,name2:d1`) as ONNX Runtime's TensorRT EP does, with errors.
pub fn parse_profile_shapes(key: &str, s: &str) -> Result<Vec<(String, Vec<i64>)>> {
    let mut out: Vec<(String, Vec<i64>)> = Vec::new();
    for entry in s.split(',') {
        let (name, dims) = entry
            .split_once(':')
            .filter(|(n, d)| !n.trim().is_empty() && !d.trim().is_empty())
            .ok_or_else(|| bad_value(key, s, "input:d1xd2x...,input2:... (e.g. input_ids:1x1,attention_mask:1x1)"))?;
        let dims = dims
            .split('x')
            .map(|d| d.trim().parse::<i64>().ok().filter(|&v| v >= 0))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| EpError::ProfileDimension { key: key.to_string(), entry: entry.to_string() })?;
        let name = name.trim().to_string();
        if out.iter().any(|(n, _)| *n == name) {
            // ONNX Runtime reads repeated names as further profiles; this module builds one profile.
            return Err(EpError::ProfileInputTwice { key: key.to_string(), input: name });
        }
        out.push((name, dims));
    }
    Ok(out)
}

fn require_compiled_in(probe: &dyn SystemProbe, provider: GpuProvider) -> Result<()> {
    if !probe.provider_compiled_in(provider.ort_name())? {
        return Err(EpError::NotCompiledIn { provider, library: loaded_library() });
    }
    Ok(())
}

fn loaded_library() -> Option<PathBuf> {
    crate::ort_lib::loaded_library_path().map(Path::to_path_buf)
}

/// Hints for a provider that failed to register: libraries that cannot be loaded, a missing provider library.
fn diagnose(provider: GpuProvider, probe: &dyn SystemProbe) -> StartHints {
    let mut wanted: Vec<&str> = ort::ep::cuda::CUDA_DYLIBS.iter().chain(ort::ep::cuda::CUDNN_DYLIBS).copied().collect();
    if provider == GpuProvider::TensorRt {
        wanted.extend(TENSORRT_LIBRARIES);
    }
    let unloadable_libraries =
        wanted.into_iter().filter(|l| probe.load_library(l).is_err()).map(str::to_string).collect();
    let provider_library_missing = crate::ort_lib::loaded_library_path().and_then(Path::parent).and_then(|dir| {
        let lib = match provider {
            GpuProvider::Cuda => "libonnxruntime_providers_cuda.so",
            GpuProvider::TensorRt => "libonnxruntime_providers_tensorrt.so",
        };
        (!dir.join(lib).exists()).then(|| (lib.to_string(), dir.to_path_buf()))
    });
    StartHints { unloadable_libraries, provider_library_missing }
}

fn ensure_dir(dir: &Path, what: &'static str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(EpError::NotAFolder { what, path: dir.to_path_buf() });
    }
    std::fs::create_dir_all(dir).map_err(|source| EpError::CreateFolder { what, path: dir.to_path_buf(), source })
}

fn push(o: &mut Vec<(String, String)>, key: &str, value: impl std::fmt::Display) {
    o.push((key.to_string(), value.to_string()));
}

fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

/// Typed options with `extra` applied: an extra key replaces the typed entry in place, a new one is appended; the
/// last of repeated extra keys wins.
fn merge_extra(mut o: Vec<(String, String)>, extra: &[(String, String)]) -> Vec<(String, String)> {
    for (k, v) in extra {
        match o.iter_mut().find(|(ok, _)| ok == k) {
            Some(entry) => entry.1 = v.clone(),
            None => o.push((k.clone(), v.clone())),
        }
    }
    o
}

fn bad_value(key: &str, value: &str, expected: &'static str) -> EpError {
    EpError::InvalidValue { key: key.to_string(), value: value.to_string(), expected }
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(bad_value(key, value, "1/0 (or true/false)")),
    }
}

fn parse_device_id(key: &str, value: &str) -> Result<i32> {
    value.trim().parse::<i32>().ok().filter(|&d| d >= 0).ok_or_else(|| bad_value(key, value, "a device number >= 0"))
}

/// Bytes: a plain integer or one with a binary suffix (`K`, `M`, `G`, `T`, optionally followed by `iB` or `B`;
/// all 1024-based), e.g. `8G`, `512MiB`, `1.5G`. `0`, `none` or `unlimited` give None (no limit).
fn parse_bytes(key: &str, value: &str) -> Result<Option<usize>> {
    let v = value.trim();
    let lower = v.to_ascii_lowercase();
    if matches!(lower.as_str(), "none" | "unlimited" | "max") {
        return Ok(None);
    }
    let err = || bad_value(key, value, "a byte count such as 8589934592, 8G or 512MiB");
    let digits_end = lower.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(lower.len());
    let (num, suffix) = lower.split_at(digits_end);
    let mult: u64 = match suffix.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(err()),
    };
    let bytes = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| err())?;
        let b = f * mult as f64;
        if !b.is_finite() || b < 0.0 || b > usize::MAX as f64 {
            return Err(err());
        }
        b.round() as u64
    } else {
        num.parse::<u64>().map_err(|_| err())?.checked_mul(mult).ok_or_else(err)?
    };
    let bytes = usize::try_from(bytes).map_err(|_| err())?;
    Ok((bytes > 0).then_some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pio_models::manifest::{
        Dimensions, ExportOptions, GenerationSettings, IoSpec, KvCacheSpec, TargetEp, TensorDtype,
        MANIFEST_FORMAT_VERSION,
    };
    use pio_models::{ModelConfig, Precision};
    use serde_json::json;
    use std::cell::RefCell;
    use std::collections::HashSet;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn get<'a>(o: &'a [(String, String)], key: &str) -> Option<&'a str> {
        o.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A probe with chosen libraries missing and providers compiled in or not; records what was asked.
    struct FakeProbe {
        missing: HashSet<&'static str>,
        compiled: HashSet<&'static str>,
        asked: RefCell<Vec<String>>,
    }

    impl FakeProbe {
        fn gpu_build(missing: &[&'static str]) -> Self {
            FakeProbe {
                missing: missing.iter().copied().collect(),
                compiled: [CUDA_EP_NAME, TENSORRT_EP_NAME].into_iter().collect(),
                asked: RefCell::default(),
            }
        }
        fn cpu_build() -> Self {
            FakeProbe { missing: HashSet::new(), compiled: HashSet::new(), asked: RefCell::default() }
        }
    }

    impl SystemProbe for FakeProbe {
        fn provider_compiled_in(&self, ort_name: &str) -> Result<bool> {
            Ok(self.compiled.contains(ort_name))
        }
        fn load_library(&self, name: &str) -> Result<(), LibraryLoadError> {
            self.asked.borrow_mut().push(name.to_string());
            if self.missing.contains(name) {
                let message = format!("{name}: cannot open shared object file: No such file or directory");
                Err(LibraryLoadError { name: name.to_string(), source: message.into() })
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn parse_keeps_the_old_names_and_defaults() {
        assert_eq!(ExecutionProvider::parse("cpu", 0).unwrap(), ExecutionProvider::Cpu { threads: None });
        assert_eq!(ExecutionProvider::default(), ExecutionProvider::Cpu { threads: None });
        let ExecutionProvider::Cuda(c) = ExecutionProvider::parse("cuda", 1).unwrap() else { panic!() };
        assert_eq!(c, CudaOptions { device_id: 1, ..CudaOptions::default() });
        let ExecutionProvider::TensorRt(t) = ExecutionProvider::parse("trt", 2).unwrap() else { panic!() };
        assert_eq!(t.device_id, 2);
        assert_eq!(t.cuda_options().device_id, 2);
        assert_eq!(ExecutionProvider::parse("TensorRT", 0).unwrap().name(), "tensorrt");
        assert_eq!(ExecutionProvider::parse("trt", 3).unwrap().device_id(), Some(3));
        assert_eq!(ExecutionProvider::default().device_id(), None);
        for name in ["cpu", "cuda", "tensorrt"] {
            let mut ep = ExecutionProvider::parse(name, 0).unwrap();
            assert!(!ep.cuda_graph());
            ep.set_cuda_graph(true);
            assert_eq!(ep.cuda_graph(), name != "cpu");
        }
        let mut ep = ExecutionProvider::parse("cuda", 0).unwrap();
        ep.set_cuda_graph(true);
        assert_eq!(get(&ep.provider_options(), "enable_cuda_graph"), Some("1"));
        let err = ExecutionProvider::parse("rocm", 0).unwrap_err().to_string();
        assert!(err.contains("unknown execution provider `rocm`"), "{err}");
    }

    #[test]
    fn cuda_provider_options_exact() {
        let o = CudaOptions::default().provider_options();
        assert_eq!(
            o,
            kv(&[
                ("device_id", "0"),
                ("arena_extend_strategy", "kSameAsRequested"),
                ("enable_cuda_graph", "0"),
                ("tunable_op_enable", "0"),
                ("prefer_nhwc", "0"),
                ("use_tf32", "1"),
                ("do_copy_in_default_stream", "1"),
                ("sdpa_kernel", "19"),
            ])
        );
        let o = CudaOptions {
            device_id: 3,
            cuda_graph: true,
            gpu_mem_limit: Some(8 << 30),
            arena_extend_strategy: ArenaExtendStrategy::NextPowerOfTwo,
            tunable_op: true,
            prefer_nhwc: true,
            use_tf32: false,
            copy_in_default_stream: false,
            fpa_intb_gemm: Some(false),
            memory_pattern: false,
            shrink_arena: true,
            cudnn_attention: true,
            extra: kv(&[("cudnn_conv_algo_search", "HEURISTIC"), ("use_tf32", "1")]),
        }
        .provider_options();
        assert_eq!(
            o,
            kv(&[
                ("device_id", "3"),
                ("gpu_mem_limit", "8589934592"),
                ("arena_extend_strategy", "kNextPowerOfTwo"),
                ("enable_cuda_graph", "1"),
                ("tunable_op_enable", "1"),
                ("tunable_op_tuning_enable", "1"),
                ("prefer_nhwc", "1"),
                ("use_tf32", "1"), // replaced in place by extra
                ("do_copy_in_default_stream", "0"),
                ("cudnn_conv_algo_search", "HEURISTIC"),
            ])
        );
    }

    #[test]
    fn cudnn_attention_is_pinned_off_unless_asked_for() {
        let ep = |opts: &[&str]| {
            let opts: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
            ExecutionProvider::from_cli("cuda", 0, &opts).unwrap().provider_options()
        };
        assert_eq!(get(&ep(&[]), "sdpa_kernel"), Some("19"));
        assert_eq!(get(&ep(&["cudnn_attention=1"]), "sdpa_kernel"), None, "ONNX Runtime's own choice");
        // A raw sdpa_kernel wins over the default.
        let raw = ep(&["sdpa_kernel=1"]);
        assert_eq!(raw.iter().filter(|(k, _)| k == "sdpa_kernel").count(), 1);
        assert_eq!(get(&raw, "sdpa_kernel"), Some("1"));
        let err = ExecutionProvider::from_cli("cuda", 0, &["cudnn_attention=maybe".to_string()]).unwrap_err();
        assert!(err.to_string().contains("cudnn_attention"), "{err}");
    }

    #[test]
    fn tensorrt_provider_options_exact() {
        let base = TensorRtOptions::default().provider_options();
        assert_eq!(base, kv(&[("device_id", "0"), ("trt_fp16_enable", "0"), ("trt_int8_enable", "0")]));

        let t = TensorRtOptions {
            device_id: 1,
            fp16: true,
            bf16: true,
            cuda_graph: true,
            engine_cache_dir: Some("/c/engines".into()),
            timing_cache_dir: Some("/c/timing".into()),
            ep_context_dump: Some("/c/ctx/model_ctx.onnx".into()),
            max_workspace_size: Some(1 << 30),
            builder_optimization_level: Some(4),
            extra: kv(&[("trt_min_subgraph_size", "5")]),
            ..Default::default()
        }
        .with_profile_shapes(("a:1x1".into(), "a:1x8".into(), "a:2x16".into()));
        assert_eq!(
            t.provider_options(),
            kv(&[
                ("device_id", "1"),
                ("trt_fp16_enable", "1"),
                ("trt_bf16_enable", "1"),
                ("trt_int8_enable", "0"),
                ("trt_cuda_graph_enable", "1"),
                ("trt_max_workspace_size", "1073741824"),
                ("trt_builder_optimization_level", "4"),
                ("trt_engine_cache_enable", "1"),
                ("trt_engine_cache_path", "/c/engines"),
                ("trt_timing_cache_enable", "1"),
                ("trt_timing_cache_path", "/c/timing"),
                ("trt_dump_ep_context_model", "1"),
                ("trt_ep_context_file_path", "/c/ctx/model_ctx.onnx"),
                ("trt_profile_min_shapes", "a:1x1"),
                ("trt_profile_opt_shapes", "a:1x8"),
                ("trt_profile_max_shapes", "a:2x16"),
                ("trt_min_subgraph_size", "5"),
            ])
        );
        t.validate().unwrap();
        // The CUDA EP behind TensorRT runs on TensorRT's device whatever `cuda.device_id` says.
        assert_eq!(get(&t.cuda_options().provider_options(), "device_id"), Some("1"));
    }

    #[test]
    fn from_cli_maps_well_known_keys() {
        let ep = ExecutionProvider::from_cli(
            "cuda",
            0,
            &opts(&[
                "cuda_graph=1",
                "gpu_mem_limit=8G",
                "arena_extend_strategy=kNextPowerOfTwo",
                "use_tf32=false",
                "tunable_op=on",
                "cudnn_conv_algo_search=DEFAULT",
                "device_id=2",
            ]),
        )
        .unwrap();
        let ExecutionProvider::Cuda(c) = &ep else { panic!() };
        assert!(c.cuda_graph && c.tunable_op && !c.use_tf32);
        assert_eq!(c.gpu_mem_limit, Some(8 << 30));
        assert_eq!(c.device_id, 2);
        assert_eq!(c.arena_extend_strategy, ArenaExtendStrategy::NextPowerOfTwo);
        assert_eq!(c.extra, kv(&[("cudnn_conv_algo_search", "DEFAULT")]));
        assert_eq!(get(&ep.provider_options(), "cudnn_conv_algo_search"), Some("DEFAULT"));

        let ep = ExecutionProvider::from_cli(
            "tensorrt",
            1,
            &opts(&[
                "trt_fp16=1",
                "trt_engine_cache_path=/tmp/e",
                "trt_timing_cache_path=/tmp/t",
                "trt_dump_ep_context_model=1",
                "trt_ep_context_file_path=/tmp/ctx/m.onnx",
                "trt_max_workspace_size=2GiB",
                "trt_builder_optimization_level=5",
                "fallback=cuda",
                "gpu_mem_limit=512MiB",
                "cuda.use_tf32=0",
                "cuda.cudnn_conv_algo_search=HEURISTIC",
                "cuda_graph=1",
                "trt_detailed_build_log=1",
            ]),
        )
        .unwrap();
        let ExecutionProvider::TensorRt(t) = &ep else { panic!() };
        assert!(t.fp16 && t.fallback_to_cuda && t.cuda_graph);
        assert_eq!(t.engine_cache_dir.as_deref(), Some(Path::new("/tmp/e")));
        assert_eq!(t.timing_cache_dir.as_deref(), Some(Path::new("/tmp/t")));
        assert_eq!(t.ep_context_dump.as_deref(), Some(Path::new("/tmp/ctx/m.onnx")));
        assert_eq!(t.max_workspace_size, Some(2 << 30));
        assert_eq!(t.builder_optimization_level, Some(5));
        assert_eq!(t.cuda.gpu_mem_limit, Some(512 << 20));
        assert!(!t.cuda.use_tf32 && !t.cuda.cuda_graph);
        assert_eq!(t.cuda.extra, kv(&[("cudnn_conv_algo_search", "HEURISTIC")]));
        assert_eq!(t.extra, kv(&[("trt_detailed_build_log", "1")]));
        assert_eq!(get(&t.provider_options(), "trt_cuda_graph_enable"), Some("1"));
        assert_eq!(get(&t.cuda_options().provider_options(), "device_id"), Some("1"));
        assert!(ep.describe().starts_with("tensorrt(device_id=1, trt_fp16_enable=1"), "{}", ep.describe());

        let ep = ExecutionProvider::from_cli("cpu", 0, &opts(&["threads=4"])).unwrap();
        assert_eq!(ep, ExecutionProvider::Cpu { threads: Some(4) });
        assert_eq!(ep.describe(), "cpu(threads=4)");
    }

    #[test]
    fn from_cli_errors_name_the_key_and_value() {
        let err = |name: &str, o: &[&str]| ExecutionProvider::from_cli(name, 0, &opts(o)).unwrap_err().to_string();
        let e = err("cuda", &["cuda_graph=maybe"]);
        assert!(e.contains("cuda_graph=maybe") && e.contains("1/0"), "{e}");
        let e = err("cuda", &["gpu_mem_limit=lots"]);
        assert!(e.contains("gpu_mem_limit=lots"), "{e}");
        let e = err("cuda", &["arena_extend_strategy=sometimes"]);
        assert!(e.contains("arena_extend_strategy=sometimes") && e.contains("kSameAsRequested"), "{e}");
        let e = ExecutionProvider::parse("cuda", -1).unwrap_err().to_string();
        assert!(e.contains("device id -1"), "{e}");
        assert!(ExecutionProvider::parse("cpu", -1).is_ok(), "the CPU ignores the device id");
        let e = err("cuda", &["device_id=-1"]);
        assert!(e.contains("device_id=-1"), "{e}");
        let e = err("cuda", &["trt_fp16=1"]);
        assert!(e.contains("TensorRT option"), "{e}");
        let e = err("cuda", &["novalue"]);
        assert!(e.contains("`novalue` is not key=value"), "{e}");
        let e = err("cpu", &["threads=0"]);
        assert!(e.contains("threads=0"), "{e}");
        let e = err("cpu", &["gpu_mem_limit=1G"]);
        assert!(e.contains("only threads=N"), "{e}");
        let e = err("tensorrt", &["trt_builder_optimization_level=9"]);
        assert!(e.contains("trt_builder_optimization_level=9"), "{e}");
        let e = err("tensorrt", &["fallback=cpu"]);
        assert!(e.contains("fallback=cpu") && e.contains("cuda or none"), "{e}");
        let e = err("tensorrt", &["trt_engine_cache_enable=1"]);
        assert!(e.contains("trt_engine_cache_path=DIR"), "{e}");
        let e = err("tensorrt", &["trt_dump_ep_context_model=1"]);
        assert!(e.contains("trt_ep_context_file_path"), "{e}");
        let e = err("tensorrt", &["trt_profile_min_shapes=a:1x1"]);
        assert!(e.contains("together"), "{e}");
        let e = err(
            "tensorrt",
            &["trt_profile_min_shapes=a:1xq", "trt_profile_opt_shapes=a:1x1", "trt_profile_max_shapes=a:1x1"],
        );
        assert!(e.contains("a:1xq"), "{e}");
        let e = err(
            "tensorrt",
            &["trt_profile_min_shapes=a:1x4", "trt_profile_opt_shapes=a:1x2", "trt_profile_max_shapes=a:1x8"],
        );
        assert!(e.contains("min <= opt <= max"), "{e}");
        let e = err("tensorrt", &["trt_engine_cache_path="]);
        assert!(e.contains("trt_engine_cache_path="), "{e}");
        // An explicit 0 turns a cache off again.
        let ExecutionProvider::TensorRt(t) =
            ExecutionProvider::from_cli("trt", 0, &opts(&["trt_engine_cache_path=/x", "trt_engine_cache_enable=0"]))
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(t.engine_cache_dir, None);
    }

    #[test]
    fn ep_option_errors_are_typed_and_keep_the_key_and_value() {
        let err = |name: &str, o: &[&str]| ExecutionProvider::from_cli(name, 0, &opts(o)).unwrap_err();
        assert!(matches!(err("cuda", &["gpu_mem_limit=lots"]), EpError::InvalidValue { key, value, .. }
                if key == "gpu_mem_limit" && value == "lots"));
        assert!(matches!(err("cuda", &["novalue"]), EpError::NotKeyValue { option } if option == "novalue"));
        assert!(matches!(err("cuda", &["=1"]), EpError::EmptyKey { option } if option == "=1"));
        assert!(matches!(err("gpu", &[]), EpError::UnknownProvider(name) if name == "gpu"));
        assert!(
            matches!(err("cpu", &["arena=same"]), EpError::NotACpuOption { key, value } if key == "arena" && value == "same")
        );
        let e = err(
            "tensorrt",
            &["trt_profile_min_shapes=a:1xq", "trt_profile_opt_shapes=a:1x1", "trt_profile_max_shapes=a:1x1"],
        );
        assert!(
            matches!(&e, EpError::ProfileDimension { key, entry } if key == "trt_profile_min_shapes" && entry == "a:1xq"),
            "{e:?}"
        );
    }

    #[test]
    fn a_cache_folder_that_cannot_be_created_keeps_the_io_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let t = TensorRtOptions { timing_cache_dir: Some(file.join("sub")), ..Default::default() };
        let err = t.prepare_dirs().unwrap_err();
        assert!(matches!(&err, EpError::CreateFolder { path, .. } if *path == file.join("sub")), "{err:?}");
        assert!(err.to_string().contains(&file.join("sub").display().to_string()), "{err}");
        let source = std::error::Error::source(&err).expect("the io::Error is kept");
        assert!(source.downcast_ref::<std::io::Error>().is_some(), "{source:?}");
    }

    #[test]
    fn start_hints_name_what_is_missing() {
        assert_eq!(StartHints::default().to_string(), "");
        let hints = StartHints {
            unloadable_libraries: vec!["libcudnn.so.9".into(), "libcublas.so.13".into()],
            provider_library_missing: Some(("libonnxruntime_providers_cuda.so".into(), PathBuf::from("/opt/ort"))),
        };
        assert_eq!(
            hints.to_string(),
            " (these libraries cannot be loaded: libcudnn.so.9, libcublas.so.13; libonnxruntime_providers_cuda.so is \
             not next to the loaded ONNX Runtime in /opt/ort)"
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("k", "1024").unwrap(), Some(1024));
        assert_eq!(parse_bytes("k", "8G").unwrap(), Some(8 << 30));
        assert_eq!(parse_bytes("k", "8gb").unwrap(), Some(8 << 30));
        assert_eq!(parse_bytes("k", "512MiB").unwrap(), Some(512 << 20));
        assert_eq!(parse_bytes("k", "1.5G").unwrap(), Some(3 << 29));
        assert_eq!(parse_bytes("k", "0").unwrap(), None);
        assert_eq!(parse_bytes("k", "none").unwrap(), None);
        assert!(parse_bytes("k", "-1").is_err());
        assert!(parse_bytes("k", "12Q").is_err());
        assert!(parse_bytes("k", "99999999999T").is_err());
    }

    fn test_manifest() -> Manifest {
        let config = ModelConfig::from_value(
            &serde_json::from_str(include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/fixtures/qwen3-tied-hub/config.json"
            )))
            .unwrap(),
        )
        .unwrap();
        let t = &config.text;
        let io = |name: &str, dtype, shape: serde_json::Value| IoSpec {
            name: name.into(),
            dtype,
            shape: shape.as_array().unwrap().clone(),
        };
        let mut inputs = vec![
            io("input_ids", TensorDtype::Int64, json!(["batch_size", "sequence_length"])),
            io("attention_mask", TensorDtype::Int64, json!(["batch_size", "total_sequence_length"])),
            io("position_ids", TensorDtype::Int64, json!(["batch_size", "sequence_length"])),
        ];
        for layer in 0..t.num_hidden_layers {
            for kind in ["key", "value"] {
                inputs.push(io(
                    &format!("past_key_values.{layer}.{kind}"),
                    TensorDtype::Float16,
                    json!(["batch_size", t.num_key_value_heads, "past_sequence_length", t.head_dim]),
                ));
            }
        }
        inputs.push(io("static_input", TensorDtype::Int64, json!([4])));
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            name: "qwen3-tied-hub".into(),
            architecture: config.architecture,
            model_type: config.model_type.clone(),
            precision: Precision::Fp16,
            target_ep: TargetEp::Tensorrt,
            decoder: "model.onnx".into(),
            dims: Dimensions::of(t, 512),
            inputs,
            outputs: vec![],
            kv_cache: KvCacheSpec {
                past_key: "past_key_values.{layer}.key".into(),
                past_value: "past_key_values.{layer}.value".into(),
                present_key: "present.{layer}.key".into(),
                present_value: "present.{layer}.value".into(),
                dtype: TensorDtype::Float16,
                layout: "BNSH".into(),
                shared_buffer: false,
            },
            options: ExportOptions {
                last_token_logits: true,
                fused_norms: false,
                fused_qk_norm: false,
                fused_gate_up: false,
                int4_block_size: None,
                kv_cache_int8: false,
                int4_lm_head: false,
                int4_embeddings: false,
                layer_windows: vec![],
                fused_attention: true,
                pio_kernels: vec![],
            },
            bos_token_id: None,
            eos_token_ids: vec![1],
            pad_token_id: None,
            generation: GenerationSettings {
                do_sample: false,
                temperature: None,
                top_p: None,
                top_k: None,
                min_p: None,
                repetition_penalty: None,
            },
            tokenizer: None,
            config,
            vision: None,
            stages: vec![],
            exported_by: "test".into(),
            source: "test".into(),
        }
    }

    #[test]
    fn trt_profiles_from_a_manifest() {
        let m = test_manifest();
        let (min, opt, max) = trt_profile_shapes(&m, (1, 1, 4), (1, 256, 512)).unwrap();
        let expect = |ids: &str, total: &str, past: &str| {
            let mut s = format!("input_ids:{ids},attention_mask:{total},position_ids:{ids}");
            for layer in 0..3 {
                for kind in ["key", "value"] {
                    let _ = write!(s, ",past_key_values.{layer}.{kind}:{past}");
                }
            }
            s
        };
        // Qwen3 fixture: 2 KV heads, head_dim 32, 3 layers; the static input is left out.
        assert_eq!(min, expect("1x1", "1x1", "1x2x0x32"));
        assert_eq!(opt, expect("1x1", "1x256", "1x2x255x32"));
        assert_eq!(max, expect("4x512", "4x512", "4x2x511x32"));

        // The strings are accepted by the option checks, as one profile.
        let t = TensorRtOptions::default().with_profile_shapes((min, opt, max));
        t.validate().unwrap();
        assert_eq!(parse_profile_shapes("k", t.profile_min_shapes.as_deref().unwrap()).unwrap().len(), 9);

        let err = trt_profile_shapes(&m, (1, 1, 1), (1, 256, 1024)).unwrap_err().to_string();
        assert!(err.contains("context length 512"), "{err}");
        let err = trt_profile_shapes(&m, (1, 2, 1), (1, 1, 8)).unwrap_err().to_string();
        assert!(err.contains("batch range"), "{err}");
        let err = trt_profile_shapes(&m, (1, 1, 1), (0, 1, 8)).unwrap_err().to_string();
        assert!(err.contains("sequence range"), "{err}");
        let mut odd = m.clone();
        odd.inputs[0].shape[1] = json!("num_patches");
        let err = trt_profile_shapes(&odd, (1, 1, 1), (1, 1, 8)).unwrap_err().to_string();
        assert!(err.contains("num_patches") && err.contains("input_ids"), "{err}");
    }

    #[test]
    fn engine_cache_paths_are_created_and_files_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let t = TensorRtOptions {
            engine_cache_dir: Some(tmp.path().join("a/engines")),
            timing_cache_dir: Some(tmp.path().join("b/timing")),
            ep_context_dump: Some(tmp.path().join("c/ctx/model_ctx.onnx")),
            ..Default::default()
        };
        t.prepare_dirs().unwrap();
        assert!(tmp.path().join("a/engines").is_dir());
        assert!(tmp.path().join("b/timing").is_dir());
        assert!(tmp.path().join("c/ctx").is_dir());
        assert!(!tmp.path().join("c/ctx/model_ctx.onnx").exists());
        t.prepare_dirs().unwrap(); // idempotent

        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let t = TensorRtOptions { engine_cache_dir: Some(file.clone()), ..Default::default() };
        let err = t.prepare_dirs().unwrap_err().to_string();
        assert!(err.contains("is a file") && err.contains("not-a-dir"), "{err}");
        let t = TensorRtOptions { timing_cache_dir: Some(file.join("sub")), ..Default::default() };
        assert!(t.prepare_dirs().is_err());

        // The plan prepares them too (libraries present).
        let ep = ExecutionProvider::TensorRt(TensorRtOptions {
            engine_cache_dir: Some(tmp.path().join("plan/engines")),
            ..Default::default()
        });
        ep.plan(&FakeProbe::gpu_build(&[])).unwrap();
        assert!(tmp.path().join("plan/engines").is_dir());
    }

    #[test]
    fn plan_with_tensorrt_present_registers_trt_then_cuda() {
        let t = TensorRtOptions { fp16: true, device_id: 1, ..Default::default() };
        let probe = FakeProbe::gpu_build(&[]);
        let plan = ExecutionProvider::TensorRt(t.clone()).plan(&probe).unwrap();
        assert_eq!(
            plan.providers,
            vec![
                ProviderSpec { provider: GpuProvider::TensorRt, options: t.provider_options() },
                ProviderSpec { provider: GpuProvider::Cuda, options: t.cuda_options().provider_options() },
            ]
        );
        assert!(plan.warnings.is_empty());
        assert!(!plan.fallback_to_cuda);
        assert_eq!(*probe.asked.borrow(), TENSORRT_LIBRARIES.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    }

    #[test]
    fn missing_libnvinfer_is_a_clear_error_or_a_cuda_fallback() {
        let probe = FakeProbe::gpu_build(&["libnvinfer.so.10"]);
        let ep = ExecutionProvider::TensorRt(TensorRtOptions::default());
        let err = ep.plan(&probe).unwrap_err().to_string();
        assert_eq!(
            err,
            "TensorRT libraries (libnvinfer.so.10) not found: install TensorRT 10 for CUDA 13 or use --ep cuda\n  \
             libnvinfer.so.10: cannot open shared object file: No such file or directory"
        );

        let tmp = tempfile::tempdir().unwrap();
        let t = TensorRtOptions {
            fallback_to_cuda: true,
            device_id: 2,
            engine_cache_dir: Some(tmp.path().join("unused")),
            cuda: CudaOptions { gpu_mem_limit: Some(1 << 30), ..Default::default() },
            ..Default::default()
        };
        let plan = ExecutionProvider::TensorRt(t.clone()).plan(&probe).unwrap();
        assert_eq!(
            plan.providers,
            vec![ProviderSpec { provider: GpuProvider::Cuda, options: t.cuda_options().provider_options() }]
        );
        assert_eq!(get(&plan.providers[0].options, "device_id"), Some("2"));
        assert_eq!(get(&plan.providers[0].options, "gpu_mem_limit"), Some("1073741824"));
        assert_eq!(plan.warnings.len(), 1);
        assert!(
            plan.warnings[0].contains("libnvinfer.so.10") && plan.warnings[0].contains("falling back"),
            "{:?}",
            plan.warnings
        );
        assert!(!tmp.path().join("unused").exists(), "no TensorRT cache folder without TensorRT");

        // Both libraries missing: both named.
        let err = ep.plan(&FakeProbe::gpu_build(TENSORRT_LIBRARIES)).unwrap_err().to_string();
        assert!(err.contains("libnvinfer.so.10, libnvinfer_plugin.so.10"), "{err}");
    }

    #[test]
    fn a_cpu_only_onnx_runtime_is_named() {
        let probe = FakeProbe::cpu_build();
        let err = ExecutionProvider::parse("cuda", 0).unwrap().plan(&probe).unwrap_err().to_string();
        assert!(err.contains("built without the CUDA execution provider"), "{err}");
        let err = ExecutionProvider::parse("tensorrt", 0).unwrap().plan(&probe).unwrap_err().to_string();
        assert!(err.contains("built without the TensorRT execution provider"), "{err}");
        // With fallback, a build without TensorRT but with CUDA falls back; without either it still fails.
        let mut probe = FakeProbe::cpu_build();
        probe.compiled.insert(CUDA_EP_NAME);
        let ep = ExecutionProvider::from_cli("tensorrt", 0, &opts(&["fallback=cuda"])).unwrap();
        let plan = ep.plan(&probe).unwrap();
        assert_eq!(plan.providers.len(), 1);
        assert_eq!(plan.providers[0].provider, GpuProvider::Cuda);
        assert!(ep.plan(&FakeProbe::cpu_build()).is_err());
        // The CPU needs nothing.
        let plan = ExecutionProvider::Cpu { threads: Some(2) }.plan(&FakeProbe::cpu_build()).unwrap();
        assert_eq!(plan, ProviderPlan { intra_threads: Some(2), ..Default::default() });
    }

    #[test]
    fn weight_only_int4_kernels_are_switched_through_env_and_session_entry() {
        let probe = FakeProbe::gpu_build(&[]);
        let pairs = |plan: &ProviderPlan| (plan.env.clone(), plan.session_config.clone());
        // By default nothing is set: ONNX Runtime's default (off), or the user's own variable.
        let off = ExecutionProvider::parse("cuda", 0).unwrap().plan(&probe).unwrap();
        assert_eq!(pairs(&off), (vec![], vec![]));
        let off = ExecutionProvider::from_cli("cuda", 0, &opts(&["fpa_intb_gemm=0"])).unwrap().plan(&probe).unwrap();
        assert_eq!(pairs(&off), (kv(&[("ORT_FPA_INTB_GEMM", "0")]), kv(&[("ep.cuda.fpa_intb_gemm", "0")])));
        // Not a provider option: ONNX Runtime's CUDA EP would refuse an unknown key.
        assert!(off.providers[0].options.iter().all(|(k, _)| !k.contains("fpa")));
        let on = ExecutionProvider::from_cli("cuda", 0, &opts(&["fpa_intb_gemm=1"])).unwrap().plan(&probe).unwrap();
        assert_eq!(pairs(&on), (kv(&[("ORT_FPA_INTB_GEMM", "1")]), kv(&[("ep.cuda.fpa_intb_gemm", "1")])));
        // The CUDA EP behind TensorRT gets the same switch.
        let trt = ExecutionProvider::from_cli("tensorrt", 0, &opts(&["fallback=cuda", "fpa_intb_gemm=1"])).unwrap();
        let plan = trt.plan(&FakeProbe::gpu_build(TENSORRT_LIBRARIES)).unwrap();
        assert_eq!(pairs(&plan).0, kv(&[("ORT_FPA_INTB_GEMM", "1")]));
        assert_eq!(off.memory_pattern, None, "ONNX Runtime's default unless asked");
        let lean = ExecutionProvider::from_cli("cuda", 0, &opts(&["memory_pattern=0", "shrink_arena=1"])).unwrap();
        assert_eq!(lean.plan(&probe).unwrap().memory_pattern, Some(false));
        assert!(
            lean.cuda_options().unwrap().shrink_arena
                && !lean.provider_options().iter().any(|(k, _)| k.contains("shrink"))
        );
        let both = ExecutionProvider::from_cli("cuda", 0, &opts(&["shrink_arena=1", "cuda_graph=1"])).unwrap();
        let err = both.plan(&probe).unwrap_err().to_string();
        assert!(err.contains("shrink_arena=1 cannot be combined with cuda_graph=1"), "{err}");
        let err = ExecutionProvider::from_cli("cuda", 0, &opts(&["fpa_intb_gemm=maybe"])).unwrap_err().to_string();
        assert!(err.contains("fpa_intb_gemm=maybe"), "{err}");
    }

    #[test]
    fn live_probe_loads_real_libraries_only() {
        assert!(LiveSystem.load_library("libc.so.6").is_ok());
        let err = LiveSystem.load_library("libpio-no-such-library.so.1").unwrap_err();
        assert_eq!(err.name, "libpio-no-such-library.so.1");
        assert!(err.source.is::<libloading::Error>(), "{err:?}");
        assert!(err.loader_message().contains("libpio-no-such-library.so.1"), "{}", err.loader_message());
    }

    /// With the real ONNX Runtime of this checkout (the CPU build here): the CPU configures; CUDA and TensorRT fail
    /// with an error that names the missing build or libraries rather than falling back to the CPU. Skipped when no
    /// ONNX Runtime library is found.
    #[test]
    fn configure_with_the_real_onnx_runtime() -> anyhow::Result<()> {
        if let Err(e) = crate::ort_lib::find_onnxruntime_library() {
            eprintln!("skipping configure_with_the_real_onnx_runtime: {e}");
            return Ok(());
        }
        let env = crate::ort_lib::environment()?;
        let builder = || ort::session::Session::builder(env);
        ExecutionProvider::Cpu { threads: Some(1) }.configure(builder()?)?;
        let cuda_built = LiveSystem.provider_compiled_in(CUDA_EP_NAME)?;
        let trt_built = LiveSystem.provider_compiled_in(TENSORRT_EP_NAME)?;
        eprintln!("ONNX Runtime has CUDA EP: {cuda_built}, TensorRT EP: {trt_built}");
        if !cuda_built {
            let err = ExecutionProvider::parse("cuda", 0)?
                .configure(builder()?)
                .err()
                .expect("no GPU provider in this build")
                .to_string();
            assert!(err.contains("built without the CUDA execution provider"), "{err}");
        }
        if !trt_built {
            let err = ExecutionProvider::parse("tensorrt", 0)?
                .configure(builder()?)
                .err()
                .expect("no GPU provider in this build")
                .to_string();
            assert!(err.contains("built without the TensorRT execution provider"), "{err}");
        }
        Ok(())
    }
}
