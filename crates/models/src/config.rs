//! Typed Hugging Face `config.json` for the four supported architectures.
//!
//! Real checkpoints come in two styles: the hub's (`rope_theta`, `rope_scaling`,
//! `partial_rotary_factor` at the top level) and transformers 5's (`rope_parameters`). Both are
//! read into one [`RopeConfig`], so no code past this module has to know which style it was.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ConfigError;
use crate::json_fields::{Fields, MAX_FIELD};

type Result<T> = std::result::Result<T, ConfigError>;

/// The architectures the exporter knows, by their `architectures[0]` name in config.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    #[serde(rename = "Qwen3ForCausalLM")]
    Qwen3,
    #[serde(rename = "Qwen3MoeForCausalLM")]
    Qwen3Moe,
    #[serde(rename = "Glm4MoeForCausalLM")]
    Glm4Moe,
    #[serde(rename = "Qwen3VLForConditionalGeneration")]
    Qwen3Vl,
}

impl Architecture {
    pub const ALL: [Architecture; 4] =
        [Architecture::Qwen3, Architecture::Qwen3Moe, Architecture::Glm4Moe, Architecture::Qwen3Vl];

    /// The class name transformers uses, as written in `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Glm4Moe => "Glm4MoeForCausalLM",
            Architecture::Qwen3Vl => "Qwen3VLForConditionalGeneration",
        }
    }

    /// The architecture transformers names `name`, if it is one of [`Architecture::ALL`].
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }
}

/// Rotary position embedding settings, normalized from either config style.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    pub theta: f64,
    /// `default`, `linear`, ... (`rope_type` in transformers). Only `default` is exported today.
    pub rope_type: String,
    /// Linear scaling factor when `rope_type` is `linear`.
    pub factor: Option<f64>,
    /// Fraction of head_dim that is rotated (GLM: 0.5); 1.0 for full rotary.
    pub partial_rotary_factor: f64,
    /// Qwen3-VL's multimodal rotary split of head_dim/2 frequencies over (t, h, w).
    pub mrope_section: Option<Vec<usize>>,
    pub mrope_interleaved: bool,
}

/// MoE settings shared by Qwen3-MoE and GLM-4 MoE (fields absent in one family are `None`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    /// Qwen3-MoE: a layer is sparse when (idx + 1) % step == 0 and idx is not in `mlp_only_layers`.
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    /// GLM-4 MoE: the first k layers are dense.
    pub first_k_dense_replace: usize,
    pub n_shared_experts: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
    /// GLM routes by sigmoid (with a correction bias for choice); Qwen3-MoE by softmax.
    pub scoring: RouterScoring,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterScoring {
    Softmax,
    SigmoidGrouped,
}

/// The attention of one decoder layer, named as transformers' `layer_types` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerAttention {
    FullAttention,
    /// Attends to the last `sliding_window` positions, its own included.
    SlidingAttention,
}

/// The decoder (text) part of any supported architecture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (GLM `attention_bias`); o_proj never does.
    pub attention_bias: bool,
    /// Per-head RMSNorm on q and k before rotary (Qwen3 always; GLM when `use_qk_norm`).
    pub qk_norm: bool,
    pub hidden_act: String,
    pub rope: RopeConfig,
    /// The window of sliding layers; set only when `use_sliding_window` is on.
    pub sliding_window: Option<usize>,
    /// Each decoder layer's attention: config.json's `layer_types`, or what transformers derives
    /// without it (see `parse_layer_types`). Empty in manifests written before it existed, whose
    /// layers all had full attention.
    #[serde(default)]
    pub layer_types: Vec<LayerAttention>,
    pub moe: Option<MoeConfig>,
    /// GLM multi-token-prediction layers stored after the decoder layers; skipped on load.
    pub num_nextn_predict_layers: usize,
}

impl TextConfig {
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
    /// Number of leading head dims that are rotated.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.rope.partial_rotary_factor).round() as usize
    }
    /// The attention window of decoder layer `idx` (None: full attention).
    pub fn layer_window(&self, idx: usize) -> Option<usize> {
        match self.layer_types.get(idx) {
            Some(LayerAttention::SlidingAttention) => self.sliding_window,
            _ => None,
        }
    }
    pub fn has_sliding_layers(&self) -> bool {
        (0..self.num_hidden_layers).any(|i| self.layer_window(i).is_some())
    }
    /// Whether decoder layer `idx` has a sparse MoE block rather than a dense MLP.
    pub fn is_moe_layer(&self, idx: usize) -> bool {
        match &self.moe {
            None => false,
            Some(m) => match m.scoring {
                RouterScoring::Softmax => {
                    m.num_experts > 0
                        && !m.mlp_only_layers.contains(&idx)
                        && (idx + 1).is_multiple_of(m.decoder_sparse_step.max(1))
                }
                RouterScoring::SigmoidGrouped => idx >= m.first_k_dense_replace,
            },
        }
    }
}

/// Qwen3-VL's vision encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub out_hidden_size: usize,
    pub num_position_embeddings: usize,
    pub deepstack_visual_indexes: Vec<usize>,
    pub hidden_act: String,
    /// Theta of the 2D rotary over patch rows and columns (`rope_parameters.rope_theta` or
    /// `rope_theta` in vision_config; transformers' default 10000).
    #[serde(default = "default_vision_rope_theta")]
    pub rope_theta: f64,
}

fn default_vision_rope_theta() -> f64 {
    10000.0
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Values of one flattened patch row: channels x temporal patch x patch x patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
    /// Width of a merged token before the merger MLP: hidden x merge^2.
    pub fn merged_dim(&self) -> usize {
        self.hidden_size * self.spatial_merge_size * self.spatial_merge_size
    }
    /// Side of the square learned position table (48 for 2304 entries).
    pub fn position_grid_side(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }
}

/// Token ids of Qwen3-VL's image placeholders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VisionTokens {
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

/// A parsed, validated config.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub model_type: String,
    pub text: TextConfig,
    pub vision: Option<VisionConfig>,
    pub vision_tokens: Option<VisionTokens>,
    /// The checkpoint's stored dtype (`torch_dtype` / `dtype`), if stated.
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// The most decoder layers a config may have (the largest models have about 130); per-layer
/// lists are allocated from it.
const MAX_LAYERS: usize = 1 << 16;

fn parse_rope(f: &Fields, default_theta: f64, default_partial_rotary_factor: f64) -> Result<RopeConfig> {
    // transformers 5 writes `rope_parameters`; the hub's configs use top-level keys and
    // `rope_scaling`. Values inside rope_parameters win over top-level ones.
    let nested = match f.section("rope_parameters")? {
        Some(n) => Some(n),
        None => f.section("rope_scaling")?,
    };
    let pick_f64 = |key: &str| -> Result<Option<(f64, &Fields)>> {
        if let Some(n) = &nested {
            if let Some(v) = n.opt_f64(key)? {
                return Ok(Some((v, n)));
            }
        }
        Ok(f.opt_f64(key)?.map(|v| (v, f)))
    };
    // A theta or factor of 0, below 0 or not finite fills the rotary tables with NaN.
    let theta = match pick_f64("rope_theta")? {
        Some((v, from)) => from.positive_f64("rope_theta", v)?,
        None => default_theta,
    };
    let partial_rotary_factor = match pick_f64("partial_rotary_factor")? {
        Some((v, _)) if v > 0.0 && v <= 1.0 => v,
        Some((v, from)) => return Err(from.invalid("partial_rotary_factor", v, "must be in (0, 1]")),
        None => default_partial_rotary_factor,
    };
    let (rope_type, factor, mrope_section, mrope_interleaved) = match &nested {
        Some(n) => (
            n.opt_str("rope_type")?.or(n.opt_str("type")?).unwrap_or_else(|| "default".into()),
            n.opt_f64("factor")?,
            n.opt_usize_list("mrope_section")?,
            n.opt_bool("mrope_interleaved")?.unwrap_or(false),
        ),
        None => ("default".to_string(), None, None, false),
    };
    if let Some(n) = &nested {
        match factor {
            Some(factor) => {
                n.positive_f64("factor", factor)?;
            }
            None if rope_type == "linear" => return Err(n.missing("factor")),
            None => {}
        }
    }
    if let (Some(section), Some(n)) = (&mrope_section, &nested) {
        if section.len() != 3 {
            return Err(n.invalid("mrope_section", format!("{section:?}"), "must hold 3 numbers (t, h, w)"));
        }
    }
    Ok(RopeConfig { theta, rope_type, factor, partial_rotary_factor, mrope_section, mrope_interleaved })
}

/// The sliding window and each layer's attention, as transformers resolves them:
/// * Qwen3: the window applies when `use_sliding_window` is on; an explicit `layer_types` list
///   says which layers slide, otherwise layers from `max_window_layers` (default 28) on do;
/// * Qwen3-MoE: with `use_sliding_window` every layer slides (its modeling code reads neither
///   `max_window_layers` nor `layer_types`);
/// * GLM-4-MoE and Qwen3-VL have no sliding window.
fn parse_layer_types(f: &Fields, arch: Architecture, layers: usize) -> Result<(Option<usize>, Vec<LayerAttention>)> {
    use LayerAttention::{FullAttention, SlidingAttention};
    let window = match arch {
        Architecture::Qwen3 | Architecture::Qwen3Moe if f.opt_bool("use_sliding_window")?.unwrap_or(false) => {
            f.opt_usize("sliding_window")?
        }
        _ => None,
    };
    if window == Some(0) {
        return Err(f.invalid("sliding_window", 0, "must be positive"));
    }
    let types = match (arch, f.opt_str_list("layer_types")?) {
        (Architecture::Qwen3, Some(names)) => {
            if names.len() != layers {
                return Err(f.invalid(
                    "layer_types",
                    format!("a list of {} layers", names.len()),
                    format!("must list `num_hidden_layers` ({layers}) layers"),
                ));
            }
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    serde_json::from_value::<LayerAttention>(Value::from(name.as_str())).map_err(|_| {
                        f.unsupported(&format!("layer_types[{i}]"), name, "full_attention, sliding_attention")
                    })
                })
                .collect::<Result<Vec<_>>>()?
        }
        (Architecture::Qwen3, None) => {
            let first = f.opt_usize("max_window_layers")?.unwrap_or(28);
            (0..layers).map(|i| if window.is_some() && i >= first { SlidingAttention } else { FullAttention }).collect()
        }
        (Architecture::Qwen3Moe, _) if window.is_some() => vec![SlidingAttention; layers],
        _ => vec![FullAttention; layers],
    };
    if window.is_none() {
        if let Some(i) = types.iter().position(|t| *t == SlidingAttention) {
            return Err(f.invalid(
                &format!("layer_types[{i}]"),
                "sliding_attention",
                "needs a window, and there is none (use_sliding_window is false or sliding_window is unset)",
            ));
        }
    }
    Ok((window, types))
}

fn parse_moe(f: &Fields, arch: Architecture) -> Result<Option<MoeConfig>> {
    let moe = match arch {
        Architecture::Qwen3Moe => MoeConfig {
            // transformers 5 writes `num_local_experts` (the attribute_map target) instead.
            num_experts: match f.opt_usize("num_experts")? {
                Some(n) => n,
                None => f.opt_usize("num_local_experts")?.ok_or_else(|| f.missing("num_experts"))?,
            },
            num_experts_per_tok: f.usize("num_experts_per_tok")?,
            moe_intermediate_size: f.usize("moe_intermediate_size")?,
            norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(false),
            decoder_sparse_step: f.opt_usize("decoder_sparse_step")?.unwrap_or(1),
            mlp_only_layers: f.opt_usize_list("mlp_only_layers")?.unwrap_or_default(),
            first_k_dense_replace: 0,
            n_shared_experts: 0,
            n_group: 1,
            topk_group: 1,
            routed_scaling_factor: 1.0,
            scoring: RouterScoring::Softmax,
        },
        Architecture::Glm4Moe => MoeConfig {
            num_experts: f.usize("n_routed_experts")?,
            num_experts_per_tok: f.usize("num_experts_per_tok")?,
            moe_intermediate_size: f.usize("moe_intermediate_size")?,
            norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(true),
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
            first_k_dense_replace: f.opt_usize("first_k_dense_replace")?.unwrap_or(0),
            n_shared_experts: f.opt_usize("n_shared_experts")?.unwrap_or(0),
            n_group: f.opt_usize("n_group")?.unwrap_or(1),
            topk_group: f.opt_usize("topk_group")?.unwrap_or(1),
            routed_scaling_factor: f.opt_f64("routed_scaling_factor")?.unwrap_or(1.0),
            scoring: RouterScoring::SigmoidGrouped,
        },
        _ => return Ok(None),
    };
    let m = &moe;
    if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_experts {
        let requirement = format!("must be between 1 and the number of experts ({})", m.num_experts);
        return Err(f.invalid("num_experts_per_tok", m.num_experts_per_tok, requirement));
    }
    if m.n_group == 0 || !m.num_experts.is_multiple_of(m.n_group) {
        return Err(f.invalid("n_group", m.n_group, format!("must divide the {} experts", m.num_experts)));
    }
    if m.topk_group == 0 || m.topk_group > m.n_group {
        return Err(f.invalid("topk_group", m.topk_group, format!("must be between 1 and `n_group` ({})", m.n_group)));
    }
    // Group-limited routing scores a group by the sum of its best two experts.
    if m.n_group > 1 && m.topk_group < m.n_group && m.num_experts / m.n_group < 2 {
        let requirement = format!("leaves fewer than 2 of the {} experts per group", m.num_experts);
        return Err(f.invalid("n_group", m.n_group, requirement));
    }
    Ok(Some(moe))
}

fn parse_text(f: &Fields, arch: Architecture) -> Result<TextConfig> {
    let positive = |key: &str| f.positive(key, None);
    let hidden_size = positive("hidden_size")?;
    let num_attention_heads = positive("num_attention_heads")?;
    let num_key_value_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(f.invalid(
            "num_key_value_heads",
            num_key_value_heads,
            format!("must divide `num_attention_heads` ({num_attention_heads})"),
        ));
    }
    let head_dim = match f.opt_usize("head_dim")? {
        Some(0) => return Err(f.invalid("head_dim", 0, "must be positive")),
        Some(d) => d,
        None if hidden_size >= num_attention_heads => hidden_size / num_attention_heads,
        None => {
            let requirement =
                format!("must be at least `num_attention_heads` ({num_attention_heads}) without `head_dim`");
            return Err(f.invalid("hidden_size", hidden_size, requirement));
        }
    };
    let moe = parse_moe(f, arch)?;
    let num_hidden_layers = positive("num_hidden_layers")?;
    if num_hidden_layers > MAX_LAYERS {
        return Err(f.too_large("num_hidden_layers", num_hidden_layers as u64, MAX_LAYERS as u64));
    }
    let (sliding_window, layer_types) = parse_layer_types(f, arch, num_hidden_layers)?;
    let hidden_act = f.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into());
    if hidden_act != "silu" {
        return Err(f.unsupported("hidden_act", &hidden_act, "silu (the decoder's SwiGLU)"));
    }
    Ok(TextConfig {
        vocab_size: positive("vocab_size")?,
        hidden_size,
        intermediate_size: f.usize("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f.positive_f64("rms_norm_eps", f.f64("rms_norm_eps")?)?,
        max_position_embeddings: positive("max_position_embeddings")?,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        attention_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
        qk_norm: match arch {
            Architecture::Glm4Moe => f.opt_bool("use_qk_norm")?.unwrap_or(false),
            _ => true,
        },
        hidden_act,
        // Glm4MoeConfig defaults partial_rotary_factor to 0.5; everything else rotates all dims.
        // Qwen3VLTextConfig's default theta is 500000, the others' 10000.
        rope: parse_rope(
            f,
            if arch == Architecture::Qwen3Vl { 500000.0 } else { 10000.0 },
            if arch == Architecture::Glm4Moe { 0.5 } else { 1.0 },
        )?,
        sliding_window,
        layer_types,
        moe,
        num_nextn_predict_layers: f.opt_usize("num_nextn_predict_layers")?.unwrap_or(0),
    })
}

/// The vision MLP activations the exporter implements (FastGelu for the tanh forms, BiasGelu for the exact one).
pub const VISION_ACTIVATIONS: &[&str] = &["gelu_pytorch_tanh", "gelu_new", "gelu"];

fn parse_vision(f: &Fields) -> Result<VisionConfig> {
    let rope_theta = match f.section("rope_parameters")? {
        Some(params) => params.opt_f64("rope_theta")?,
        None => None,
    };
    let positive = |key: &str, default: Option<usize>| f.positive(key, default);
    let v = VisionConfig {
        depth: positive("depth", None)?,
        hidden_size: positive("hidden_size", None)?,
        intermediate_size: f.usize("intermediate_size")?,
        num_heads: positive("num_heads", None)?,
        in_channels: positive("in_channels", Some(3))?,
        patch_size: positive("patch_size", None)?,
        temporal_patch_size: positive("temporal_patch_size", Some(2))?,
        spatial_merge_size: positive("spatial_merge_size", Some(2))?,
        out_hidden_size: f.usize("out_hidden_size")?,
        num_position_embeddings: positive("num_position_embeddings", None)?,
        deepstack_visual_indexes: f.opt_usize_list("deepstack_visual_indexes")?.unwrap_or_default(),
        hidden_act: f.opt_str("hidden_act")?.unwrap_or_else(|| "gelu_pytorch_tanh".into()),
        rope_theta: match rope_theta {
            Some(theta) => theta,
            None => f.opt_f64("rope_theta")?.unwrap_or_else(default_vision_rope_theta),
        },
    };
    f.positive_f64("rope_theta", v.rope_theta)?;
    if !VISION_ACTIVATIONS.contains(&v.hidden_act.as_str()) {
        return Err(f.unsupported("hidden_act", &v.hidden_act, "gelu_pytorch_tanh, gelu_new, gelu"));
    }
    // The 2D rotary splits head_dim / 2 frequencies between rows and columns.
    if !v.hidden_size.is_multiple_of(v.num_heads) || !v.head_dim().is_multiple_of(4) {
        let requirement = format!("must be `num_heads` ({}) times a head size divisible by 4", v.num_heads);
        return Err(f.invalid("hidden_size", v.hidden_size, requirement));
    }
    let side = v.position_grid_side();
    if side * side != v.num_position_embeddings {
        let requirement = "must be a square (the learned position grid)";
        return Err(f.invalid("num_position_embeddings", v.num_position_embeddings, requirement));
    }
    if let Some(&bad) = v.deepstack_visual_indexes.iter().find(|&&i| i >= v.depth) {
        let requirement = format!("holds block {bad}, but `depth` is {}", v.depth);
        return Err(f.invalid("deepstack_visual_indexes", format!("{:?}", v.deepstack_visual_indexes), requirement));
    }
    // Widths derived from several fields (a patch row, a merged token) are tensor dimensions: they must be
    // sizes too, and their products must not overflow.
    let patch_dim = [v.temporal_patch_size, v.patch_size, v.patch_size]
        .into_iter()
        .try_fold(v.in_channels as u64, |acc, d| acc.checked_mul(d as u64));
    if patch_dim.is_none_or(|d| d > MAX_FIELD) {
        let requirement = format!(
            "makes a patch row of `in_channels` x `temporal_patch_size` x `patch_size`^2 = {} x {} x {}^2 values, \
             more than any model has (at most {MAX_FIELD})",
            v.in_channels, v.temporal_patch_size, v.patch_size
        );
        return Err(f.invalid("patch_size", v.patch_size, requirement));
    }
    let merged_dim = (v.hidden_size as u64).checked_mul(v.spatial_merge_size as u64 * v.spatial_merge_size as u64);
    if merged_dim.is_none_or(|d| d > MAX_FIELD) {
        let requirement = format!(
            "makes merged tokens of `hidden_size` x `spatial_merge_size`^2 = {} x {}^2 values, more than any model \
             has (at most {MAX_FIELD})",
            v.hidden_size, v.spatial_merge_size
        );
        return Err(f.invalid("spatial_merge_size", v.spatial_merge_size, requirement));
    }
    Ok(v)
}

/// Reads the whole JSON text of `file`.
fn read_json(file: &Path) -> Result<Value> {
    let text = std::fs::read(file).map_err(|source| ConfigError::Read { file: file.to_path_buf(), source })?;
    serde_json::from_slice(&text).map_err(|source| ConfigError::Json { file: file.to_path_buf(), source })
}

impl ModelConfig {
    /// Reads and validates `config.json`; every error names the file, and past its syntax the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::parse(&read_json(path)?, path)
    }

    /// Validates a parsed `config.json` (errors name the file `config.json`).
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::parse(value, Path::new(crate::files::CONFIG_FILE))
    }

    fn parse(value: &Value, file: &Path) -> Result<Self> {
        let f = Fields::root(value, file)?;
        let arch_name = match f.get("architectures") {
            Some(Value::Array(names)) if !names.is_empty() => match &names[0] {
                Value::String(name) => name.clone(),
                other => {
                    return Err(ConfigError::WrongType {
                        file: file.to_path_buf(),
                        field: "architectures[0]".into(),
                        expected: "a string",
                        value: crate::error::json_excerpt(other),
                    })
                }
            },
            _ => return Err(ConfigError::NoArchitecture { file: file.to_path_buf() }),
        };
        let architecture = Architecture::from_hf_name(&arch_name)
            .ok_or_else(|| ConfigError::UnsupportedArchitecture { file: file.to_path_buf(), name: arch_name })?;
        let model_type = f.opt_str("model_type")?.unwrap_or_default();
        let torch_dtype = match f.opt_str("torch_dtype")? {
            Some(dtype) => Some(dtype),
            None => f.opt_str("dtype")?,
        };
        let (text, vision, vision_tokens, ids_from) = if architecture == Architecture::Qwen3Vl {
            let tf = f.required_section("text_config")?;
            let vf = f.required_section("vision_config")?;
            let mut text = parse_text(&tf, architecture)?;
            // Qwen3-VL stores `tie_word_embeddings` at the top level in some exports.
            if let Some(t) = f.opt_bool("tie_word_embeddings")? {
                text.tie_word_embeddings = t;
            }
            let id = |key: &str| f.first_id(key)?.ok_or_else(|| f.missing(key));
            let tokens = VisionTokens {
                image_token_id: id("image_token_id")?,
                video_token_id: f.first_id("video_token_id")?.unwrap_or(0),
                vision_start_token_id: id("vision_start_token_id")?,
                vision_end_token_id: id("vision_end_token_id")?,
            };
            let vision = parse_vision(&vf)?;
            // Qwen3VLTextRotaryEmbedding falls back to [24, 20, 20] when the section is absent.
            text.rope.mrope_section.get_or_insert_with(|| vec![24, 20, 20]);
            if vision.out_hidden_size != text.hidden_size {
                let requirement = format!(
                    "must equal `text_config.hidden_size` ({}): image embeddings replace token embeddings",
                    text.hidden_size
                );
                return Err(vf.invalid("out_hidden_size", vision.out_hidden_size, requirement));
            }
            (text, Some(vision), Some(tokens), tf)
        } else {
            (parse_text(&f, architecture)?, None, None, Fields::root(value, file)?)
        };
        let mut eos_token_ids = ids_from.ids("eos_token_id")?;
        if eos_token_ids.is_empty() {
            eos_token_ids = f.ids("eos_token_id")?;
        }
        let first_id = |key: &str| -> Result<Option<u32>> {
            match ids_from.first_id(key)? {
                Some(id) => Ok(Some(id)),
                None => f.first_id(key),
            }
        };
        Ok(ModelConfig {
            architecture,
            model_type,
            text,
            vision,
            vision_tokens,
            torch_dtype,
            bos_token_id: first_id("bos_token_id")?,
            eos_token_ids,
            pad_token_id: first_id("pad_token_id")?,
        })
    }
}

/// `generation_config.json`: the checkpoint's own sampling defaults and stop ids.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl GenerationDefaults {
    /// Reads `generation_config.json`; errors name the file and the field. The sampling values
    /// must be in the ranges the runtime's sampler takes (`SamplingParams::validate`): they become
    /// every request's defaults, so one out of range would fail requests that never set it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        let f = Fields::root(&value, path)?;
        let in_range = |key: &str, ok: fn(f64) -> bool, requirement: &str| -> Result<Option<f64>> {
            match f.opt_f64(key)? {
                Some(v) if !ok(v) => Err(f.invalid(key, v, requirement)),
                v => Ok(v),
            }
        };
        Ok(GenerationDefaults {
            do_sample: f.opt_bool("do_sample")?,
            temperature: in_range("temperature", |t| t.is_finite() && t >= 0.0, "must be a finite number >= 0")?,
            top_p: in_range("top_p", |p| p > 0.0 && p <= 1.0, "must be in (0, 1]")?,
            top_k: f.opt_usize("top_k")?,
            min_p: in_range("min_p", |m| (0.0..=1.0).contains(&m), "must be in [0, 1]")?,
            repetition_penalty: in_range(
                "repetition_penalty",
                |r| r.is_finite() && r > 0.0,
                "must be a finite number > 0",
            )?,
            eos_token_ids: f.ids("eos_token_id")?,
            bos_token_id: f.first_id("bos_token_id")?,
            pad_token_id: f.first_id("pad_token_id")?,
        })
    }
}
