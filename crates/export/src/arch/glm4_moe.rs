//! GLM-4-MoE (`Glm4MoeForCausalLM`: GLM-4.5, GLM-4.6, GLM-4.7). Attention is the shared core's:
//! q/k/v bias when `attention_bias`, per-head q/k RMSNorm when `use_qk_norm`, and half-split
//! rotary on the first `partial_rotary_factor * head_dim` dims (GroupQueryAttention with
//! `rotary_interleaved = 0` and a narrower cos/sin cache; the dense GLM-4 is the interleaved
//! one). The first `first_k_dense_replace` layers are dense.
//!
//! Sparse layers, as transformers' `Glm4MoeMoE`: float32 router logits, sigmoid scores, the
//! experts chosen by score + `e_score_correction_bias` within the `topk_group` best of
//! `n_group` groups, weighted by the unbiased scores (renormalized when `norm_topk_prob`),
//! times `routed_scaling_factor`; plus one shared SwiGLU MLP of width
//! `moe_intermediate_size * n_shared_experts`, unweighted. The multi-token-prediction layer
//! stored as `model.layers.{num_hidden_layers}.*` is not part of the decoder and is never read.

use pio_models::config::TextConfig;
use pio_models::manifest::TensorDtype;

use crate::checkpoint::mlp_tensors;
use crate::checkpoint::TensorList;
use crate::decoder::DecoderBuilder;
use crate::error::BuildResult as Result;
use crate::moe::{self, Routing};

pub fn build_decoder(b: &mut DecoderBuilder) -> Result<()> {
    moe::build_decoder(b, &mut sparse_block)
}

fn sparse_block(b: &mut DecoderBuilder, mlp: &str, h: &str) -> Result<String> {
    let m = moe::moe_config(b.text)?;
    let tokens = b.flatten_tokens(h, mlp)?;
    // `_keep_in_fp32_modules_strict`: the router runs in float32 whatever the model dtype.
    let logits = b.router_logits(&tokens, mlp, TensorDtype::Float32)?;
    let (choice, weights) = b.grouped_sigmoid_scores(&logits, mlp)?;
    let routed = b.routed_experts(&tokens, mlp, Routing::Chosen { choice, weights, normalize: m.norm_topk_prob })?;
    let mut y = b.scale_by(&routed, m.routed_scaling_factor, &format!("{mlp}.experts.routed_scaling"))?;
    if m.n_shared_experts > 0 {
        let shared_prefix = format!("{mlp}.shared_experts");
        let shared = b.swiglu_mlp(&shared_prefix, &tokens, m.moe_intermediate_size * m.n_shared_experts)?;
        y = b.g.node("Add", &format!("{mlp}.add_shared_experts")).inputs(&[&y, &shared]).out();
    }
    Ok(b.unflatten_tokens(&y, h, mlp))
}

pub fn checkpoint_tensors(t: &TextConfig) -> TensorList {
    moe::checkpoint_tensors(t, &|t, mlp, out| {
        if let Some(m) = &t.moe {
            moe::routed_experts_tensors(t, m, mlp, out);
            out.push((format!("{mlp}.gate.e_score_correction_bias"), vec![m.num_experts]));
            if m.n_shared_experts > 0 {
                mlp_tensors(
                    t.hidden_size,
                    m.moe_intermediate_size * m.n_shared_experts,
                    &format!("{mlp}.shared_experts"),
                    out,
                );
            }
        }
    })
}
