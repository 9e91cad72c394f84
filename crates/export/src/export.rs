//! The export driver: checkpoint in, graph folder out (written to a temporary folder and renamed
//! at the end, so a failed export leaves nothing behind).

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use pio_models::manifest::{
    Dimensions, ExportOptions, GenerationSettings, Manifest, TokenizerSpec, MANIFEST_FORMAT_VERSION,
};
use pio_models::size::Precision;
use pio_models::ModelConfig;

use crate::checkpoint::Checkpoint;
use crate::error::{fs_error, ExportError};
use crate::scratch::{OutputKind, ScratchDir};
use crate::settings::ExportSettings;
use crate::stages::write_decoder;
use crate::vision_export::{write_vision, VISION_FILE};
use crate::weights::WeightSource;

type Result<T> = std::result::Result<T, ExportError>;

pub const MODEL_FILE: &str = "model.onnx";
pub const WEIGHTS_FILE: &str = "model.onnx.data";

/// What [`export()`] writes: a checkpoint, the output folder and the settings. Build it with
/// [`ExportRequest::builder`].
#[derive(Clone, Debug)]
pub struct ExportRequest {
    checkpoint: PathBuf,
    out_dir: PathBuf,
    settings: ExportSettings,
    overwrite: bool,
    source: String,
    progress: bool,
}

impl ExportRequest {
    /// Export `checkpoint` to `out_dir` with `settings`; by default an existing output folder is refused, the
    /// manifest names the source `checkpoint DIR`, and no progress bar is shown.
    pub fn builder(
        checkpoint: impl Into<PathBuf>,
        out_dir: impl Into<PathBuf>,
        settings: ExportSettings,
    ) -> ExportRequestBuilder {
        let checkpoint = checkpoint.into();
        let source = format!("checkpoint {}", checkpoint.display());
        ExportRequestBuilder {
            request: ExportRequest {
                checkpoint,
                out_dir: out_dir.into(),
                settings,
                overwrite: false,
                source,
                progress: false,
            },
        }
    }

    pub fn checkpoint(&self) -> &Path {
        &self.checkpoint
    }
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }
    pub fn settings(&self) -> &ExportSettings {
        &self.settings
    }
    pub fn overwrite(&self) -> bool {
        self.overwrite
    }
    pub fn source(&self) -> &str {
        &self.source
    }
    pub fn progress(&self) -> bool {
        self.progress
    }
}

/// Builds an [`ExportRequest`]. Its settings were checked when they were built and the checkpoint is checked
/// by [`export()`], so [`build`](Self::build) has nothing left to refuse.
#[derive(Clone, Debug)]
pub struct ExportRequestBuilder {
    request: ExportRequest,
}

impl ExportRequestBuilder {
    /// Replace an existing output folder, if it is an earlier export (it has `pio.json`) (`--force`).
    pub fn overwrite(mut self, on: bool) -> Self {
        self.request.overwrite = on;
        self
    }
    /// Where the checkpoint came from, for the manifest (`checkpoint DIR`, `preset X (synthetic)`).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.request.source = source.into();
        self
    }
    /// Show a progress bar (on a terminal).
    pub fn progress(mut self, on: bool) -> Self {
        self.request.progress = on;
        self
    }
    pub fn build(self) -> ExportRequest {
        self.request
    }
}

#[derive(Debug)]
pub struct ExportSummary {
    pub out_dir: PathBuf,
    pub model_bytes: u64,
    pub weight_bytes: u64,
    pub seconds: f64,
    pub had_tokenizer: bool,
}

/// Copies `sources` into `dir`; returns their file names.
fn copy_files(sources: &[PathBuf], dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::with_capacity(sources.len());
    for src in sources {
        let file_name = src.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        std::fs::copy(src, dir.join(&file_name)).map_err(fs_error("copy", src))?;
        names.push(file_name);
    }
    Ok(names)
}

/// Where the chat template lives among the copied tokenizer files, if anywhere: a processor's
/// own template (chat_template.jinja or chat_template.json, as vision-language checkpoints ship
/// it) before the tokenizer's.
fn chat_template_source(dir: &Path) -> Option<String> {
    for file in ["chat_template.jinja", "chat_template.json"] {
        if dir.join(file).is_file() {
            return Some(file.into());
        }
    }
    let cfg = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&cfg).ok()?;
    v.get("chat_template").filter(|t| !t.is_null()).map(|_| "tokenizer_config.json".into())
}

/// How errors name the model: the checkpoint folder and its architecture.
fn model_name(checkpoint: &Path, config: &ModelConfig) -> String {
    let dir = checkpoint.canonicalize().unwrap_or_else(|_| checkpoint.to_path_buf());
    let folder = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "the model".into());
    format!("{folder} ({})", config.architecture.hf_name())
}

/// Exports a checkpoint: opens and checks it (config, shards, every tensor the graphs read, with its shape and
/// dtype) and the settings against it before anything is written, then writes the graphs, the weights, the
/// copied files and `pio.json` to a scratch folder that is renamed to `req.out_dir` at the end. On an error
/// nothing is left behind; the error names the file and the field, tensor or flag.
///
/// ```no_run
/// use pio_export::{export, CheckpointError, ExportError, ExportRequest, ExportSettings};
/// use pio_models::{size::Precision, TargetEp};
///
/// // The target's defaults, changed by one method per pio-export flag; build() refuses combinations no target runs
/// // (fp16 on the CPU, --int4-lm-head without int4, ...), naming the flag.
/// let settings = match ExportSettings::builder(Precision::Fp32, TargetEp::Cpu, 4096, true).fused_norms(false).build() {
///     Ok(settings) => settings,
///     Err(e) => {
///         eprintln!("{e}");
///         return;
///     }
/// };
/// let request = ExportRequest::builder("checkpoints/my-model", "graphs/my-model-fp32", settings).build();
/// match export(&request) {
///     Ok(summary) => println!("{}", summary.out_dir.display()),
///     Err(ExportError::Checkpoint(CheckpointError::MissingTensor { tensor, dir })) => {
///         eprintln!("{} lacks {tensor}", dir.display())
///     }
///     // The message names the file and the field, tensor or flag; each source() adds a cause (an io::Error, a
///     // serde_json::Error, a safetensors error, ...).
///     Err(other) => eprintln!("{other}"),
/// }
/// ```
pub fn export(req: &ExportRequest) -> Result<ExportSummary> {
    let start = Instant::now();
    let ck = Checkpoint::open(&req.checkpoint)?;
    crate::random_int4::check_checkpoint(&req.checkpoint, &req.settings)?;
    let config = ck.config.clone();
    req.settings.check_model(&model_name(&req.checkpoint, &config), &config.text)?;
    let (needed, read_tensors) = crate::random_int4::read_tensors(&config, &req.settings);
    ck.check_tensors(needed, read_tensors)?;
    if let (false, Some(w)) = (req.settings.sliding_window, config.text.sliding_window) {
        tracing::warn!(
            "--no-sliding-window: every layer attends to the whole sequence, so outputs differ from the model's \
             once a sequence is longer than its {w}-token window"
        );
    }
    OutputKind::Export.check_destination(&req.out_dir, req.overwrite)?;
    let parent = req.out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = ScratchDir::new_in(parent, OutputKind::Export)?;
    let name =
        req.out_dir.file_name().and_then(|n| n.to_str()).map(str::to_string).unwrap_or_else(|| "model".to_string());

    let progress = if req.progress { ProgressBar::new(ck.total_bytes()) } else { ProgressBar::hidden() };
    progress.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_message(format!("exporting {name}"));

    let metadata =
        vec![("pio.architecture", config.architecture.hf_name().to_string()), ("pio.source", req.source.clone())];
    let decoder = write_decoder(tmp.path(), &req.out_dir, &name, &ck, &config, &req.settings, &progress, &metadata)?;
    let (mut weight_bytes, mut model_bytes) = (decoder.weight_bytes, decoder.model_bytes);
    let weights =
        WeightSource { ck: &ck, dtype: req.settings.compute_dtype(), settings: &req.settings, progress: &progress };
    let vision = if config.vision.is_some() {
        let processor_files = copy_files(&ck.processor_files(), tmp.path())?;
        let v = write_vision(tmp.path(), &name, &config, weights, &metadata, processor_files)
            .map_err(ExportError::build(req.out_dir.join(VISION_FILE)))?;
        weight_bytes += v.weight_bytes;
        model_bytes += v.model_bytes;
        Some(v.spec)
    } else {
        None
    };
    progress.finish_and_clear();

    // Tokenizer files travel with the graph; without them the runtime takes token ids only.
    let files = copy_files(&ck.tokenizer_files(), tmp.path())?;
    let had_tokenizer = files.iter().any(|f| f == "tokenizer.json");
    if !had_tokenizer {
        tracing::warn!(
            "no tokenizer.json in {}: the export works, but the runtime will take token ids only",
            req.checkpoint.display()
        );
    }
    for f in ["config.json", "generation_config.json"] {
        let src = req.checkpoint.join(f);
        if src.is_file() {
            std::fs::copy(&src, tmp.path().join(f)).map_err(fs_error("copy", &src))?;
        }
    }
    let gen = ck.generation.clone().unwrap_or_default();
    let mut eos = gen.eos_token_ids.clone();
    for id in &config.eos_token_ids {
        if !eos.contains(id) {
            eos.push(*id);
        }
    }
    let t = &config.text;
    let manifest = Manifest {
        format_version: MANIFEST_FORMAT_VERSION,
        name: name.clone(),
        architecture: config.architecture,
        model_type: config.model_type.clone(),
        precision: req.settings.precision,
        target_ep: req.settings.target_ep,
        decoder: decoder.decoder,
        dims: Dimensions::of(t, req.settings.context_length),
        inputs: decoder.inputs,
        outputs: decoder.outputs,
        kv_cache: req.settings.kv_cache_spec(),
        options: ExportOptions {
            last_token_logits: req.settings.last_token_logits,
            fused_norms: req.settings.fused_norms,
            fused_qk_norm: req.settings.fused_qk_norm,
            fused_gate_up: req.settings.fused_gate_up,
            int4_block_size: (req.settings.precision == Precision::Int4).then_some(req.settings.int4_block_size),
            kv_cache_int8: req.settings.kv_cache_int8,
            int4_lm_head: req.settings.int4_lm_head,
            int4_embeddings: req.settings.int4_embeddings,
            layer_windows: req.settings.layer_windows(t),
            fused_attention: req.settings.fused_attention,
            pio_kernels: decoder.pio_families,
        },
        bos_token_id: gen.bos_token_id.or(config.bos_token_id),
        eos_token_ids: eos,
        pad_token_id: gen.pad_token_id.or(config.pad_token_id),
        generation: GenerationSettings {
            do_sample: gen.do_sample.unwrap_or(false),
            temperature: gen.temperature,
            top_p: gen.top_p,
            top_k: gen.top_k,
            min_p: gen.min_p,
            repetition_penalty: gen.repetition_penalty,
        },
        tokenizer: had_tokenizer
            .then(|| TokenizerSpec { files: files.clone(), chat_template_source: chat_template_source(tmp.path()) }),
        config,
        vision,
        stages: decoder.stages,
        exported_by: format!("pio-export {}", env!("CARGO_PKG_VERSION")),
        source: req.source.clone(),
    };
    manifest.save(tmp.path())?;
    tmp.persist(&req.out_dir, req.overwrite)?;
    Ok(ExportSummary {
        out_dir: req.out_dir.clone(),
        model_bytes,
        weight_bytes,
        seconds: start.elapsed().as_secs_f64(),
        had_tokenizer,
    })
}
