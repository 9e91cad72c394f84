//! Parameter counts and memory needs, computed from a config (never typed in).

use std::num::Saturating as S;

use serde::Serialize;

use crate::config::{ModelConfig, TextConfig};
use crate::error::UnknownNameError;

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
    pub fn parse(s: &str) -> Result<Self, UnknownNameError> {
        Self::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| UnknownNameError {
            what: "precision",
            value: s.to_string(),
            expected: "one of fp32, fp16, bf16, int4",
        })
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
        let embedding = n(t.vocab_size) * n(t.hidden_size) * S(if t.tie_word_embeddings { 1 } else { 2 });
        let vision = config.vision.as_ref().map(vision_params).unwrap_or(S(0));
        let final_norm = n(t.hidden_size);
        let total = embedding + linear + other + vision + final_norm;
        let active = embedding + linear_active + other + vision + final_norm;
        ParameterCount {
            embedding: embedding.0,
            decoder_linear: linear.0,
            decoder_other: (other + final_norm).0,
            vision: vision.0,
            total: total.0,
            active: active.0,
        }
    }

    /// Bytes of weights at a precision. int4 quantizes the decoder's linear weights (4 bits plus
    /// a 16-bit scale per block of 32); embeddings, lm_head, norms and vision stay 16-bit.
    pub fn weight_bytes(&self, precision: Precision) -> u64 {
        let rest = S(self.embedding) + S(self.decoder_other) + S(self.vision);
        let linear = S(self.decoder_linear);
        let bytes = match precision {
            Precision::Fp32 => S(self.total) * S(4),
            Precision::Fp16 | Precision::Bf16 => S(self.total) * S(2),
            Precision::Int4 => linear / S(2) + linear / S(INT4_ESTIMATE_BLOCK) * S(2) + rest * S(2),
        };
        bytes.0
    }
}

/// Counts saturate instead of overflowing: a config.json is input, and one with absurd sizes
/// must give absurd numbers, not a panic.
type Count = S<u64>;

fn n(x: usize) -> Count {
    S(x as u64)
}

/// (linear weights, linear weights one token touches, norms and biases) over the decoder layers.
fn decoder_params(t: &TextConfig) -> (Count, Count, Count) {
    let h = n(t.hidden_size);
    let q = n(t.q_width());
    let kv = n(t.kv_width());
    let attn_linear = h * q + S(2) * h * kv + q * h;
    let bias = if t.attention_bias { q + S(2) * kv } else { S(0) };
    let qk_norm = if t.qk_norm { S(2) * n(t.head_dim) } else { S(0) };
    let attn_other = bias + qk_norm + S(2) * h; // input and post-attention norms
    let (mut linear, mut active, mut other) = (S(0), S(0), S(0));
    for idx in 0..t.num_hidden_layers {
        linear += attn_linear;
        active += attn_linear;
        other += attn_other;
        match (&t.moe, t.is_moe_layer(idx)) {
            (Some(m), true) => {
                let expert = S(3) * h * n(m.moe_intermediate_size);
                let router = n(m.num_experts) * h;
                let shared = expert * n(m.n_shared_experts);
                linear += expert * n(m.num_experts) + router + shared;
                active += expert * n(m.num_experts_per_tok) + router + shared;
                if m.scoring == crate::config::RouterScoring::SigmoidGrouped {
                    other += n(m.num_experts); // e_score_correction_bias
                }
            }
            _ => {
                let mlp = S(3) * h * n(t.intermediate_size);
                linear += mlp;
                active += mlp;
            }
        }
    }
    (linear, active, other)
}

fn vision_params(v: &crate::config::VisionConfig) -> Count {
    let hv = n(v.hidden_size);
    let iv = n(v.intermediate_size);
    let out = n(v.out_hidden_size);
    let patch_in = n(v.in_channels) * n(v.temporal_patch_size) * n(v.patch_size) * n(v.patch_size);
    let merged = hv * n(v.spatial_merge_size) * n(v.spatial_merge_size);
    let block = (S(3) * hv * hv + S(3) * hv) + (hv * hv + hv) + (hv * iv + iv) + (iv * hv + hv) + S(4) * hv;
    let merger_mlp = merged * merged + merged + merged * out + out;
    let merger = S(2) * hv + merger_mlp;
    let deepstack = (S(2) * merged + merger_mlp) * n(v.deepstack_visual_indexes.len());
    patch_in * hv + hv + n(v.num_position_embeddings) * hv + n(v.depth) * block + merger + deepstack
}

/// Bytes of KV cache per token of context (all layers, keys and values).
pub fn kv_bytes_per_token(t: &TextConfig, bytes_per_element: u64) -> u64 {
    (S(2) * n(t.num_hidden_layers) * n(t.kv_width()) * S(bytes_per_element)).0
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
