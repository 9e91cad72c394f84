//! Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-Coder-30B-A3B): the Qwen3 decoder (per-head
//! q/k RMSNorm, half-split rotary, no biases) whose sparse layers (`decoder_sparse_step`,
//! `mlp_only_layers`) route each token by softmax over all experts, top-k, renormalized over
//! the k when `norm_topk_prob`: exactly what com.microsoft MoE does with the router logits.
//! No shared expert, no scaling factor.

use pio_models::config::TextConfig;

use crate::checkpoint::TensorList;
use crate::decoder::DecoderBuilder;
use crate::error::BuildResult as Result;
use crate::moe::{self, Routing};

pub fn build_decoder(b: &mut DecoderBuilder) -> Result<()> {
    moe::build_decoder(b, &mut sparse_block)
}

/// `router → MoE`, on token rows. transformers computes the logits in the model dtype (the op
/// does the softmax in float).
fn sparse_block(b: &mut DecoderBuilder, mlp: &str, h: &str) -> Result<String> {
    let normalize = moe::moe_config(b.text)?.norm_topk_prob;
    let tokens = b.flatten_tokens(h, mlp)?;
    let logits = b.router_logits(&tokens, mlp, b.dtype)?;
    let y = b.routed_experts(&tokens, mlp, Routing::Softmax { logits, normalize })?;
    Ok(b.unflatten_tokens(&y, h, mlp))
}

pub fn checkpoint_tensors(t: &TextConfig) -> TensorList {
    moe::checkpoint_tensors(t, &|t, mlp, out| {
        if let Some(m) = &t.moe {
            moe::routed_experts_tensors(t, m, mlp, out);
        }
    })
}
