//! The projection and expert shapes of the four presets (from their built-in configs).

use anyhow::Result;
use pio_models::presets::find_preset;
use serde::Serialize;

/// The presets the check covers, with a short label.
pub const PRESETS: &[(&str, &str)] = &[
    ("qwen3-4b-instruct-2507", "qwen3-4b"),
    ("qwen3-coder-30b", "qwen3-coder-30b-a3b"),
    ("qwen3-vl-2b", "qwen3-vl-2b-text"),
    ("glm-4-7", "glm-4.7"),
];

/// One projection: y (M, N) = x (M, K) W^T, or with `swiglu` a gate/up pair of N/2 features.
#[derive(Clone, Debug, Serialize)]
pub struct Projection {
    pub preset: &'static str,
    pub name: String,
    pub n: usize,
    pub k: usize,
    pub swiglu: bool,
}

/// One MoE layer's routed experts.
#[derive(Clone, Debug, Serialize)]
pub struct MoeLayer {
    pub preset: &'static str,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub inter: usize,
}

/// The projections of a preset: q/k/v fused, o, the dense SwiGLU MLP (when some layer is
/// dense) or the shared experts' (GLM), down, the lm_head.
pub fn projections(preset: &str) -> Result<Vec<Projection>> {
    let label = label(preset);
    let t = find_preset(preset)?.config()?.text;
    let (h, q, kv) = (t.hidden_size, t.q_width(), t.kv_width());
    let p = |name: &str, n: usize, k: usize, swiglu: bool| Projection {
        preset: label,
        name: name.to_string(),
        n,
        k,
        swiglu,
    };
    let mut out = vec![p("qkv", q + 2 * kv, h, false), p("o", h, q, false)];
    if (0..t.num_hidden_layers).any(|i| !t.is_moe_layer(i)) {
        out.push(p("gate_up", 2 * t.intermediate_size, h, true));
        out.push(p("down", h, t.intermediate_size, false));
    }
    if let Some(m) = &t.moe {
        if m.n_shared_experts > 0 {
            let w = m.moe_intermediate_size * m.n_shared_experts;
            out.push(p("shared_gate_up", 2 * w, h, true));
            out.push(p("shared_down", h, w, false));
        }
    }
    out.push(p("lm_head", t.vocab_size, h, false));
    Ok(out)
}

pub fn moe_layer(preset: &str) -> Result<Option<MoeLayer>> {
    let t = find_preset(preset)?.config()?.text;
    Ok(t.moe.as_ref().map(|m| MoeLayer {
        preset: label(preset),
        experts: m.num_experts,
        top_k: m.num_experts_per_tok,
        hidden: t.hidden_size,
        inter: m.moe_intermediate_size,
    }))
}

fn label(preset: &str) -> &'static str {
    PRESETS.iter().find(|(p, _)| *p == preset).map(|(_, l)| *l).unwrap_or("unknown")
}
