//! Parameter counts and memory needs, computed from a config (never typed in).

use serde::Serialize;

use crate::config::{ModelConfig, TextConfig};

/// Weight storage precisions the exporter writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
    Int4,
}

impl Precision {
    pub const ALL: [Precision; 4] = [Precision::Fp32, Precision::Fp16, Precision::Bf16, Precision::Int4];
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Int4 => "int4",
        }
    }
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown precision `{s}`; expected one of fp32, fp16, bf16, int4"))
    }
}

/// Parameter counts by where they live; MoE models also report the parameters one token uses.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ParameterCount {
    /// Token embedding table plus an untied lm_head.
    pub embedding: u64,
    /// Linear weights of the decoder layers (attention, dense MLPs, experts, routers).
    pub decoder_linear: u64,
    /// Norm weights and biases: small, always kept at 16 or 32 bit.
    pub decoder_other: u64,
    pub vision: u64,
    pub total: u64,
    /// Parameters touched per token (top-k experts instead of all); equals total for dense models.
    pub active: u64,
}

/// Block size assumed for int4 memory estimates (one 16-bit scale per block).
pub const INT4_ESTIMATE_BLOCK: u64 = 32;

impl ParameterCount {
    pub fn of(config: &ModelConfig) -> Self {
        let t = &config.text;
        let (linear, linear_active, other) = decoder_params(t);
        let embedding = t.vocab_size as u64 * t.hidden_size as u64 * if t.tie_word_embeddings { 1 } else { 2 };
        let vision = config.vision.as_ref().map(vision_params).unwrap_or(0);
        let final_norm = t.hidden_size as u64;
        let total = embedding + linear + other + vision + final_norm;
        let active = embedding + linear_active + other + vision + final_norm;
        ParameterCount { embedding, decoder_linear: linear, decoder_other: other + final_norm, vision, total, active }
    }

    /// Bytes of weights at a precision. int4 quantizes the decoder's linear weights (4 bits plus
    /// a 16-bit scale per block of 32); embeddings, lm_head, norms and vision stay 16-bit.
    pub fn weight_bytes(&self, precision: Precision) -> u64 {
        let rest = self.embedding + self.decoder_other + self.vision;
        match precision {
            Precision::Fp32 => self.total * 4,
            Precision::Fp16 | Precision::Bf16 => self.total * 2,
            Precision::Int4 => self.decoder_linear / 2 + self.decoder_linear / INT4_ESTIMATE_BLOCK * 2 + rest * 2,
        }
    }
}

/// (linear weights, linear weights one token touches, norms and biases) over the decoder layers.
fn decoder_params(t: &TextConfig) -> (u64, u64, u64) {
    let h = t.hidden_size as u64;
    let q = t.q_width() as u64;
    let kv = t.kv_width() as u64;
    let attn_linear = h * q + 2 * h * kv + q * h;
    let attn_other =
        if t.attention_bias { q + 2 * kv } else { 0 } + if t.qk_norm { 2 * t.head_dim as u64 } else { 0 } + 2 * h; // input and post-attention norms
    let (mut linear, mut active, mut other) = (0u64, 0u64, 0u64);
    for idx in 0..t.num_hidden_layers {
        linear += attn_linear;
        active += attn_linear;
        other += attn_other;
        match (&t.moe, t.is_moe_layer(idx)) {
            (Some(m), true) => {
                let expert = 3 * h * m.moe_intermediate_size as u64;
                let router = m.num_experts as u64 * h;
                let shared = expert * m.n_shared_experts as u64;
                linear += expert * m.num_experts as u64 + router + shared;
                active += expert * m.num_experts_per_tok as u64 + router + shared;
                if m.scoring == crate::config::RouterScoring::SigmoidGrouped {
                    other += m.num_experts as u64; // e_score_correction_bias
                }
            }
            _ => {
                let mlp = 3 * h * t.intermediate_size as u64;
                linear += mlp;
                active += mlp;
            }
        }
    }
    (linear, active, other)
}

fn vision_params(v: &crate::config::VisionConfig) -> u64 {
    let hv = v.hidden_size as u64;
    let iv = v.intermediate_size as u64;
    let out = v.out_hidden_size as u64;
    let patch_in = (v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size) as u64;
    let merged = hv * (v.spatial_merge_size * v.spatial_merge_size) as u64;
    let block = (3 * hv * hv + 3 * hv) + (hv * hv + hv) + (hv * iv + iv) + (iv * hv + hv) + 4 * hv;
    let merger_mlp = merged * merged + merged + merged * out + out;
    let merger = 2 * hv + merger_mlp;
    let deepstack = (2 * merged + merger_mlp) * v.deepstack_visual_indexes.len() as u64;
    patch_in * hv + hv + v.num_position_embeddings as u64 * hv + v.depth as u64 * block + merger + deepstack
}

/// Bytes of KV cache per token of context (all layers, keys and values).
pub fn kv_bytes_per_token(t: &TextConfig, bytes_per_element: u64) -> u64 {
    2 * t.num_hidden_layers as u64 * t.kv_width() as u64 * bytes_per_element
}

/// Human-readable byte count (GB = 1e9 bytes, as model cards count).
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} KB", b / 1e3)
    }
}

/// Human-readable parameter count (4.02B, 30.5B, 355M).
pub fn format_params(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else {
        format!("{:.1}K", x / 1e3)
    }
}
