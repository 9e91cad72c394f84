//! `pio.json`: what the exporter wrote and how the runtime must drive it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{Architecture, ModelConfig};
use crate::error::{ManifestError, UnknownNameError};
use crate::size::Precision;

pub const MANIFEST_FILE: &str = "pio.json";
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
/// The decoder output with the argmax token id of every logits row (graphs exported since it
/// was added; older graphs lack it and the runtime takes the argmax on the host).
pub const GREEDY_TOKENS_OUTPUT: &str = "greedy_tokens";

/// Execution provider a graph is built for (it decides operator choices and dtypes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetEp {
    Cpu,
    Cuda,
    Tensorrt,
}

impl TargetEp {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetEp::Cpu => "cpu",
            TargetEp::Cuda => "cuda",
            TargetEp::Tensorrt => "tensorrt",
        }
    }
    pub fn parse(s: &str) -> Result<Self, UnknownNameError> {
        match s {
            "cpu" => Ok(TargetEp::Cpu),
            "cuda" => Ok(TargetEp::Cuda),
            "tensorrt" | "trt" => Ok(TargetEp::Tensorrt),
            _ => Err(UnknownNameError {
                what: "execution provider",
                value: s.to_string(),
                expected: "cpu, cuda or tensorrt",
            }),
        }
    }
}

/// ONNX element types that cross the graph boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDtype {
    Float32,
    Float16,
    Bfloat16,
    Int64,
    Int32,
    Uint8,
    Int8,
}

impl TensorDtype {
    pub fn size_bytes(self) -> usize {
        match self {
            TensorDtype::Float32 | TensorDtype::Int32 => 4,
            TensorDtype::Float16 | TensorDtype::Bfloat16 => 2,
            TensorDtype::Int64 => 8,
            TensorDtype::Uint8 | TensorDtype::Int8 => 1,
        }
    }
}

/// A graph input or output: name, dtype and shape (symbolic dims as strings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IoSpec {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dimensions {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Longest sequence (prompt + generated) the graph supports: the rotary cache length.
    pub context_length: usize,
}

impl Dimensions {
    pub fn of(text: &crate::config::TextConfig, context_length: usize) -> Self {
        Dimensions {
            vocab_size: text.vocab_size,
            hidden_size: text.hidden_size,
            num_layers: text.num_hidden_layers,
            num_attention_heads: text.num_attention_heads,
            num_kv_heads: text.num_key_value_heads,
            head_dim: text.head_dim,
            context_length,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheSpec {
    /// `past_key_values.{layer}.key` with `{layer}` replaced.
    pub past_key: String,
    pub past_value: String,
    pub present_key: String,
    pub present_value: String,
    pub dtype: TensorDtype,
    /// Always `BNSH`: (batch, kv heads, sequence, head_dim).
    pub layout: String,
    /// Past and present may share one fixed-length buffer updated in place (GroupQueryAttention;
    /// the runtime binds one on the GPU, for the fast decode kernels). False when the graph's
    /// present is Concat(past, new): each step's present, one longer, is the next step's past.
    pub shared_buffer: bool,
}

impl KvCacheSpec {
    pub fn name(template: &str, layer: usize) -> String {
        template.replace("{layer}", &layer.to_string())
    }
}

/// The switches an export was made with, recorded so benchmarks and the runtime can tell.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportOptions {
    /// Emit logits for the last position only.
    pub last_token_logits: bool,
    /// Residual add + RMSNorm as one SkipSimplifiedLayerNormalization.
    pub fused_norms: bool,
    /// Per-head q/k RMSNorm passed into GroupQueryAttention (GPU) instead of separate nodes.
    pub fused_qk_norm: bool,
    /// Gate and up projections as one MatMul.
    pub fused_gate_up: bool,
    /// int4 block size when precision is int4.
    pub int4_block_size: Option<usize>,
    /// KV cache in int8 with per-channel scales inside the graph.
    #[serde(default)]
    pub kv_cache_int8: bool,
    /// int4 graphs: the lm_head and the embedding table quantized too.
    #[serde(default)]
    pub int4_lm_head: bool,
    #[serde(default)]
    pub int4_embeddings: bool,
    /// Each layer's attention window as exported (null: full attention). Empty in manifests
    /// written before sliding windows were exported, when every layer had full attention.
    #[serde(default)]
    pub layer_windows: Vec<Option<usize>>,
    /// Attention as com.microsoft GroupQueryAttention; false: built from standard ONNX ops
    /// (`--no-fused-attention`), whose present cache is Concat(past, new).
    #[serde(default = "default_true")]
    pub fused_attention: bool,
    /// Families of Inference-PIO's own operators (domain `ai.pio`) the graph uses: `linear`,
    /// `lm_head`, `swiglu`, `moe`. Non-empty: the runtime registers the domain (pio-kernels) when it loads
    /// the graph. Empty in graphs of ONNX Runtime's operators only.
    #[serde(default)]
    pub pio_kernels: Vec<String>,
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationSettings {
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    /// Tokenizer files copied next to the graph (tokenizer.json, tokenizer_config.json, ...).
    pub files: Vec<String>,
    /// Where the chat template came from (`tokenizer_config.json`, `chat_template.jinja`), if any.
    pub chat_template_source: Option<String>,
}

/// The vision encoder of a vision-language export (Qwen3-VL) and what the runtime needs to drive
/// it and the decoder's image inputs. The IO contract (README "Qwen3-VL"):
///
/// * the encoder runs once per image: `pixel_values` (patches, patch_dim) float32 rows in the
///   processor's order and `image_grid_thw` (1, 3) int64 in; `image_embeds`
///   (patches / merge^2, hidden) and `deepstack_embeds` (deepstack, patches / merge^2, hidden) out,
///   in the decoder's dtype;
/// * the decoder takes `position_ids` (3, batch, sequence): the t, h, w rope positions of each
///   token; `image_embeds` (M, hidden) and `deepstack_embeds` (deepstack, M, hidden): the rows of
///   the M image-pad tokens of this step, in order (0 rows when the step has none). Its rotary
///   table is built once per step and indexed by cache slot, so rows of a batched step that
///   share a slot must have the same positions there; GroupQueryAttention's KV cache IO is the
///   text models' own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionSpec {
    /// The encoder graph file, relative to the manifest.
    pub encoder: String,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    /// Images per encoder run (the graph's attention spans one image: the runtime loops).
    pub images_per_run: usize,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub in_channels: usize,
    /// Values per `pixel_values` row: in_channels x temporal_patch_size x patch_size^2.
    pub patch_dim: usize,
    /// Vision blocks whose output feeds a deepstack merger, in order.
    pub deepstack_visual_indexes: Vec<usize>,
    /// Decoder layers after which the deepstack features are added (the first n of them).
    pub deepstack_decoder_layers: Vec<usize>,
    /// The text rotary's split of head_dim / 2 frequencies over (t, h, w), interleaved.
    pub mrope_section: Vec<usize>,
    /// Image processor files copied from the checkpoint (preprocessor_config.json, ...).
    pub preprocessor_files: Vec<String>,
}

/// One stage of a decoder exported in stages (`pio-export --stages N`): a graph over the
/// contiguous decoder layers `layers`, run in a session of its own (on a device of its own).
///
/// Its inputs are the step's (`input_ids` in the first stage only, `attention_mask`,
/// `position_ids`, a vision-language decoder's image rows in the first stage), the KV cache of
/// its layers (named as in an unstaged graph), and values an earlier stage outputs (the
/// hidden states between stages: [`stage_hidden_states`], with fused norms
/// [`stage_hidden_states_normed`]; Qwen3-VL's deepstack features for layers past the first
/// stage). The last stage outputs the logits and the greedy tokens; every stage outputs its
/// layers' present KV.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    /// The stage's graph file, relative to the manifest (its weights beside it, `<file>.data`).
    pub file: String,
    /// The decoder layers the stage holds, `start..end`.
    pub layers: std::ops::Range<usize>,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    /// Bytes of the stage's weights (its external data file).
    pub weight_bytes: u64,
}

/// The residual stream between two stages as it enters decoder layer `layer` (the next
/// stage's first), before its input norm: `hidden_states.{layer}`, (batch, sequence, hidden) in
/// the graph's dtype. Named by layer so that a middle stage's input and output differ.
pub fn stage_hidden_states(layer: usize) -> String {
    format!("hidden_states.{layer}")
}

/// With fused norms: that stream through layer `layer`'s input norm, computed with the residual
/// add in one SkipSimplifiedLayerNormalization (recomputing it from the rounded stream would
/// differ in 16-bit graphs): `hidden_states_normed.{layer}`.
pub fn stage_hidden_states_normed(layer: usize) -> String {
    format!("hidden_states_normed.{layer}")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub architecture: Architecture,
    pub model_type: String,
    pub precision: Precision,
    pub target_ep: TargetEp,
    /// The decoder graph file, relative to the manifest.
    pub decoder: String,
    pub dims: Dimensions,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    pub kv_cache: KvCacheSpec,
    pub options: ExportOptions,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub generation: GenerationSettings,
    pub tokenizer: Option<TokenizerSpec>,
    /// The config.json the graph was exported from, for the runtime and for reports.
    pub config: ModelConfig,
    /// The vision encoder of a vision-language export; absent for text models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionSpec>,
    /// A decoder exported in stages: their graphs in order (empty: one graph, `decoder`).
    /// `decoder` then names the first stage, and `inputs` / `outputs` are the whole decoder's
    /// (the stages' together, without what passes between them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageSpec>,
    pub exported_by: String,
    pub source: String,
}

impl Manifest {
    /// Whether the decoder emits [`GREEDY_TOKENS_OUTPUT`].
    pub fn has_greedy_output(&self) -> bool {
        self.outputs.iter().any(|o| o.name == GREEDY_TOKENS_OUTPUT)
    }

    /// Position axes per token: 3 for a multimodal rotary (Qwen3-VL's t, h, w `position_ids`
    /// of shape (3, batch, sequence)), else 1.
    pub fn position_axes(&self) -> usize {
        match self.inputs.iter().find(|i| i.name == "position_ids") {
            Some(io) if io.shape.len() == 3 => 3,
            _ => 1,
        }
    }

    /// Reads `pio.json` from a graph folder. A manifest of another format version is refused before its fields
    /// are read (they may have changed), with the advice to export again.
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        let file = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
            file: file.clone(),
            dir: dir.to_path_buf(),
            source,
        })?;
        let parse_error = |source| ManifestError::Parse { file: file.clone(), source };
        let version: FormatVersion = serde_json::from_str(&text).map_err(parse_error)?;
        if version.format_version != u64::from(MANIFEST_FORMAT_VERSION) {
            return Err(ManifestError::UnsupportedVersion {
                file,
                found: version.format_version,
                supported: MANIFEST_FORMAT_VERSION,
            });
        }
        let manifest: Manifest = serde_json::from_str(&text).map_err(parse_error)?;
        manifest.check_file_names(&file)?;
        Ok(manifest)
    }

    /// The graph and tokenizer files a manifest names are read from its folder: each must be a
    /// plain file name there, so that an edited or hostile `pio.json` cannot point the runtime at
    /// `../../elsewhere` or an absolute path.
    fn check_file_names(&self, file: &Path) -> Result<(), ManifestError> {
        let mut names: Vec<(String, &str)> = vec![("decoder".into(), self.decoder.as_str())];
        names.extend(self.stages.iter().enumerate().map(|(i, s)| (format!("stages[{i}].file"), s.file.as_str())));
        if let Some(vision) = &self.vision {
            names.push(("vision.encoder".into(), vision.encoder.as_str()));
        }
        if let Some(tokenizer) = &self.tokenizer {
            names
                .extend(tokenizer.files.iter().enumerate().map(|(i, f)| (format!("tokenizer.files[{i}]"), f.as_str())));
        }
        match names.into_iter().find(|(_, name)| !is_plain_file_name(name)) {
            Some((field, name)) => {
                Err(ManifestError::FileName { file: file.to_path_buf(), field, name: name.to_string() })
            }
            None => Ok(()),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), ManifestError> {
        let file = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self)
            .map_err(|source| ManifestError::Serialize { file: file.clone(), source })?;
        std::fs::write(&file, text).map_err(|source| ManifestError::Write { file, source })
    }
}

/// A name of a file in the manifest's own folder: not empty, no path separator, not `.` or `..`,
/// no NUL.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// The one field every manifest format has.
#[derive(Deserialize)]
struct FormatVersion {
    format_version: u64,
}
