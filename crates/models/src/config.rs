//! Typed Hugging Face `config.json` for the four supported architectures.
//!
//! Real checkpoints come in two styles: the hub's (`rope_theta`, `rope_scaling`,
//! `partial_rotary_factor` at the top level) and transformers 5's (`rope_parameters`). Both are
//! read into one [`RopeConfig`], so no code past this module has to know which style it was.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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

    pub fn from_hf_name(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name).ok_or_else(|| {
            let supported: Vec<_> = Self::ALL.iter().map(|a| a.hf_name()).collect();
            anyhow!("unsupported architecture `{name}`; supported: {}", supported.join(", "))
        })
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

/// The largest integer a config field may hold (token ids are u32, and widths, vocabularies and
/// context lengths are far smaller): products of two fields then stay inside 64 bits.
const MAX_FIELD: u64 = u32::MAX as u64;
/// The most decoder layers a config may have (the largest models have about 130); per-layer
/// lists are allocated from it.
const MAX_LAYERS: usize = 1 << 16;

/// Field access on a JSON object with errors that name the field and the file's section.
struct Fields<'a> {
    obj: &'a serde_json::Map<String, Value>,
    section: &'a str,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, section: &'a str) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| anyhow!("{section} is not a JSON object"))?;
        Ok(Fields { obj, section })
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| anyhow!("missing field `{key}` in {}", self.section))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.integer(key, v)).transpose()
    }
    /// A non-negative integer of at most [`MAX_FIELD`].
    fn integer(&self, key: &str, v: &Value) -> Result<usize> {
        match v.as_u64() {
            Some(n) if n <= MAX_FIELD => Ok(n as usize),
            Some(_) => bail!("field `{key}` in {} is {v}, more than any model has (at most {MAX_FIELD})", self.section),
            None => bail!("field `{key}` in {} must be a non-negative integer, got {v}", self.section),
        }
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| anyhow!("missing field `{key}` in {}", self.section))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("field `{key}` in {} must be a number, got {v}", self.section)),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| anyhow!("field `{key}` in {} must be true or false, got {v}", self.section)),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| anyhow!("field `{key}` in {} must be a string, got {v}", self.section)),
        }
    }
    fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => {
                items.iter().map(|v| self.integer(key, v)).collect::<Result<Vec<_>>>().map(Some)
            }
            Some(v) => bail!("field `{key}` in {} must be a list of integers, got {v}", self.section),
        }
    }
    fn opt_str_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow!("field `{key}` in {} must hold strings, got {v}", self.section))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => bail!("field `{key}` in {} must be a list of strings, got {v}", self.section),
        }
    }
    /// An id or a list of ids (HF writes `eos_token_id` either way).
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(v @ Value::Number(_)) => Ok(vec![self.integer(key, v)? as u32]),
            Some(_) => Ok(self.opt_usize_list(key)?.unwrap_or_default().into_iter().map(|n| n as u32).collect()),
        }
    }
}

fn parse_rope(f: &Fields, default_theta: f64, default_partial_rotary_factor: f64) -> Result<RopeConfig> {
    // transformers 5 writes `rope_parameters`; the hub's configs use top-level keys and
    // `rope_scaling`. Values inside rope_parameters win over top-level ones.
    let params = f.get("rope_parameters").or_else(|| f.get("rope_scaling"));
    let section_name = if f.get("rope_parameters").is_some() { "rope_parameters" } else { "rope_scaling" };
    let section = format!("{}.{section_name}", f.section);
    let nested = match params {
        Some(v) => Some(Fields::new(v, &section)?),
        None => None,
    };
    let pick_f64 = |key: &str| -> Result<Option<f64>> {
        if let Some(n) = &nested {
            if let Some(v) = n.opt_f64(key)? {
                return Ok(Some(v));
            }
        }
        f.opt_f64(key)
    };
    let theta = pick_f64("rope_theta")?.unwrap_or(default_theta);
    let partial_rotary_factor = pick_f64("partial_rotary_factor")?.unwrap_or(default_partial_rotary_factor);
    if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
        bail!("field `partial_rotary_factor` in {} must be in (0, 1], got {partial_rotary_factor}", f.section);
    }
    let (rope_type, factor, mrope_section, mrope_interleaved) = match &nested {
        Some(n) => (
            n.opt_str("rope_type")?.or(n.opt_str("type")?).unwrap_or_else(|| "default".into()),
            n.opt_f64("factor")?,
            n.opt_usize_list("mrope_section")?,
            n.opt_bool("mrope_interleaved")?.unwrap_or(false),
        ),
        None => ("default".to_string(), None, None, false),
    };
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
        bail!("field `sliding_window` in {} must be positive", f.section);
    }
    let types = match (arch, f.opt_str_list("layer_types")?) {
        (Architecture::Qwen3, Some(names)) => {
            if names.len() != layers {
                bail!(
                    "field `layer_types` in {} lists {} layers, but `num_hidden_layers` is {layers}",
                    f.section,
                    names.len()
                );
            }
            names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    serde_json::from_value::<LayerAttention>(Value::from(n.as_str())).map_err(|_| {
                        anyhow!(
                            "field `layer_types` in {}: layer {i} is `{n}`; supported: full_attention, sliding_attention",
                            f.section
                        )
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
            bail!(
                "field `layer_types` in {} makes layer {i} sliding_attention, but there is no window \
                 (use_sliding_window is false or sliding_window is unset)",
                f.section
            );
        }
    }
    Ok((window, types))
}

fn parse_text(f: &Fields, arch: Architecture) -> Result<TextConfig> {
    let hidden_size = f.usize("hidden_size")?;
    let num_attention_heads = f.usize("num_attention_heads")?;
    if num_attention_heads == 0 || hidden_size == 0 {
        bail!("`hidden_size` and `num_attention_heads` in {} must be positive", f.section);
    }
    let num_key_value_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        bail!(
            "`num_attention_heads` ({num_attention_heads}) in {} must be a multiple of `num_key_value_heads` ({num_key_value_heads})",
            f.section
        );
    }
    let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads);
    let moe = match arch {
        Architecture::Qwen3Moe => Some(MoeConfig {
            // transformers 5 writes `num_local_experts` (the attribute_map target) instead.
            num_experts: f
                .opt_usize("num_experts")?
                .or(f.opt_usize("num_local_experts")?)
                .ok_or_else(|| anyhow!("missing field `num_experts` (or `num_local_experts`) in {}", f.section))?,
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
        }),
        Architecture::Glm4Moe => Some(MoeConfig {
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
        }),
        _ => None,
    };
    if let Some(m) = &moe {
        if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_experts {
            bail!(
                "`num_experts_per_tok` ({}) in {} must be between 1 and the number of experts ({})",
                m.num_experts_per_tok,
                f.section,
                m.num_experts
            );
        }
        if m.n_group == 0 || m.num_experts % m.n_group != 0 || m.topk_group > m.n_group {
            bail!(
                "`n_group` ({}) / `topk_group` ({}) in {} do not divide {} experts",
                m.n_group,
                m.topk_group,
                f.section,
                m.num_experts
            );
        }
    }
    let num_hidden_layers = f.usize("num_hidden_layers")?;
    if num_hidden_layers > MAX_LAYERS {
        bail!("`num_hidden_layers` ({num_hidden_layers}) in {} is more than {MAX_LAYERS}", f.section);
    }
    let (sliding_window, layer_types) = parse_layer_types(f, arch, num_hidden_layers)?;
    let text = TextConfig {
        vocab_size: f.usize("vocab_size")?,
        hidden_size,
        intermediate_size: f.usize("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f.f64("rms_norm_eps")?,
        max_position_embeddings: f.usize("max_position_embeddings")?,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        attention_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
        qk_norm: match arch {
            Architecture::Glm4Moe => f.opt_bool("use_qk_norm")?.unwrap_or(false),
            _ => true,
        },
        hidden_act: f.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into()),
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
    };
    if text.head_dim == 0 || text.num_hidden_layers == 0 || text.vocab_size == 0 {
        bail!("`head_dim`, `num_hidden_layers` and `vocab_size` in {} must be positive", f.section);
    }
    if text.hidden_act != "silu" {
        bail!("field `hidden_act` in {} is `{}`; only `silu` is supported for the decoder", f.section, text.hidden_act);
    }
    Ok(text)
}

fn parse_vision(f: &Fields) -> Result<VisionConfig> {
    let rope_theta = match f.get("rope_parameters") {
        Some(v) => Fields::new(v, "config.json vision_config.rope_parameters")?.opt_f64("rope_theta")?,
        None => None,
    };
    let v = VisionConfig {
        depth: f.usize("depth")?,
        hidden_size: f.usize("hidden_size")?,
        intermediate_size: f.usize("intermediate_size")?,
        num_heads: f.usize("num_heads")?,
        in_channels: f.opt_usize("in_channels")?.unwrap_or(3),
        patch_size: f.usize("patch_size")?,
        temporal_patch_size: f.opt_usize("temporal_patch_size")?.unwrap_or(2),
        spatial_merge_size: f.opt_usize("spatial_merge_size")?.unwrap_or(2),
        out_hidden_size: f.usize("out_hidden_size")?,
        num_position_embeddings: f.usize("num_position_embeddings")?,
        deepstack_visual_indexes: f.opt_usize_list("deepstack_visual_indexes")?.unwrap_or_default(),
        hidden_act: f.opt_str("hidden_act")?.unwrap_or_else(|| "gelu_pytorch_tanh".into()),
        rope_theta: rope_theta.or(f.opt_f64("rope_theta")?).unwrap_or_else(default_vision_rope_theta),
    };
    let section = f.section;
    if v.depth == 0 || v.hidden_size == 0 || v.num_heads == 0 || v.patch_size == 0 || v.in_channels == 0 {
        bail!("`depth`, `hidden_size`, `num_heads`, `patch_size` and `in_channels` in {section} must be positive");
    }
    if v.temporal_patch_size == 0 || v.spatial_merge_size == 0 {
        bail!("`temporal_patch_size` and `spatial_merge_size` in {section} must be positive");
    }
    // The 2D rotary splits head_dim / 2 frequencies between rows and columns.
    if !v.hidden_size.is_multiple_of(v.num_heads) || !v.head_dim().is_multiple_of(4) {
        bail!(
            "`hidden_size` ({}) in {section} must be `num_heads` ({}) times a head size divisible by 4",
            v.hidden_size,
            v.num_heads
        );
    }
    let side = v.position_grid_side();
    if side * side != v.num_position_embeddings {
        bail!(
            "`num_position_embeddings` ({}) in {section} must be a square (the learned position grid)",
            v.num_position_embeddings
        );
    }
    if let Some(&bad) = v.deepstack_visual_indexes.iter().find(|&&i| i >= v.depth) {
        bail!("`deepstack_visual_indexes` in {section} holds block {bad}, but `depth` is {}", v.depth);
    }
    Ok(v)
}

impl ModelConfig {
    /// Reads and validates `config.json`; every error names the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_value(&value).with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_value(value: &Value) -> Result<Self> {
        let f = Fields::new(value, "config.json")?;
        let arch_name = match f.get("architectures") {
            Some(Value::Array(a)) if !a.is_empty() => {
                a[0].as_str().ok_or_else(|| anyhow!("`architectures` in config.json must hold strings"))?.to_string()
            }
            _ => bail!(
                "missing field `architectures` in config.json (expected one of: {})",
                Architecture::ALL.iter().map(|a| a.hf_name()).collect::<Vec<_>>().join(", ")
            ),
        };
        let architecture = Architecture::from_hf_name(&arch_name)?;
        let model_type = f.opt_str("model_type")?.unwrap_or_default();
        let torch_dtype = f.opt_str("torch_dtype")?.or(f.opt_str("dtype")?);
        let (text, vision, vision_tokens, ids_from) = if architecture == Architecture::Qwen3Vl {
            let tv = f.get("text_config").ok_or_else(|| anyhow!("missing field `text_config` in config.json"))?;
            let vv = f.get("vision_config").ok_or_else(|| anyhow!("missing field `vision_config` in config.json"))?;
            let tf = Fields::new(tv, "config.json text_config")?;
            let vf = Fields::new(vv, "config.json vision_config")?;
            let mut text = parse_text(&tf, architecture)?;
            // Qwen3-VL stores `tie_word_embeddings` at the top level in some exports.
            if let Some(t) = f.opt_bool("tie_word_embeddings")? {
                text.tie_word_embeddings = t;
            }
            let tokens = VisionTokens {
                image_token_id: f.usize("image_token_id")? as u32,
                video_token_id: f.opt_usize("video_token_id")?.unwrap_or(0) as u32,
                vision_start_token_id: f.usize("vision_start_token_id")? as u32,
                vision_end_token_id: f.usize("vision_end_token_id")? as u32,
            };
            let vision = parse_vision(&vf)?;
            // Qwen3VLTextRotaryEmbedding falls back to [24, 20, 20] when the section is absent.
            let section = text.rope.mrope_section.get_or_insert_with(|| vec![24, 20, 20]);
            if section.len() != 3 {
                bail!("`mrope_section` in config.json text_config must hold 3 numbers (t, h, w), got {section:?}");
            }
            if vision.out_hidden_size != text.hidden_size {
                bail!(
                    "`out_hidden_size` ({}) in config.json vision_config must equal text_config `hidden_size` ({}): \
                     image embeddings replace token embeddings",
                    vision.out_hidden_size,
                    text.hidden_size
                );
            }
            (text, Some(vision), Some(tokens), tv)
        } else {
            (parse_text(&f, architecture)?, None, None, value)
        };
        let idf = Fields::new(ids_from, "config.json")?;
        let mut eos_token_ids = idf.ids("eos_token_id")?;
        if eos_token_ids.is_empty() {
            eos_token_ids = f.ids("eos_token_id")?;
        }
        let bos_token_id = idf.ids("bos_token_id")?.first().copied().or(f.ids("bos_token_id")?.first().copied());
        let pad_token_id = idf.ids("pad_token_id")?.first().copied().or(f.ids("pad_token_id")?.first().copied());
        Ok(ModelConfig {
            architecture,
            model_type,
            text,
            vision,
            vision_tokens,
            torch_dtype,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
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
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let f = Fields::new(&value, "generation_config.json").with_context(|| path.display().to_string())?;
        let parse = || -> Result<Self> {
            Ok(GenerationDefaults {
                do_sample: f.opt_bool("do_sample")?,
                temperature: f.opt_f64("temperature")?,
                top_p: f.opt_f64("top_p")?,
                top_k: f.opt_usize("top_k")?,
                min_p: f.opt_f64("min_p")?,
                repetition_penalty: f.opt_f64("repetition_penalty")?,
                eos_token_ids: f.ids("eos_token_id")?,
                bos_token_id: f.ids("bos_token_id")?.first().copied(),
                pad_token_id: f.ids("pad_token_id")?.first().copied(),
            })
        };
        parse().with_context(|| format!("invalid generation config {}", path.display()))
    }
}
