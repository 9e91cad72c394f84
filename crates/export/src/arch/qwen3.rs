//! Qwen3 dense (`Qwen3ForCausalLM`): pre-norm decoder, GQA with per-head q/k RMSNorm before
//! half-split rotary, no biases, SwiGLU MLP; the lm_head is tied to the embeddings when
//! `tie_word_embeddings` is set (Qwen3-4B).

use anyhow::Result;
use pio_models::config::TextConfig;

use super::TensorList;
use crate::decoder::DecoderBuilder;

fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

pub fn build_decoder(b: &mut DecoderBuilder) -> Result<()> {
    let (x, table) = b.embed("model.embed_tokens.weight")?;
    let intermediate = b.text.intermediate_size;
    let h = b.decoder_stack(&x, &layer_prefix, "model.norm.weight", &mut |b, i, h| {
        b.swiglu_mlp(&format!("{}.mlp", layer_prefix(i)), h, intermediate)
    })?;
    let lm_head = if b.text.tie_word_embeddings { None } else { Some("lm_head.weight") };
    b.logits(&h, lm_head, &table)
}

/// Attention tensors of one layer (shared with the other Qwen3-family and GLM files).
pub fn attention_tensors(t: &TextConfig, prefix: &str, out: &mut TensorList) {
    let (h, q, kv) = (t.hidden_size, t.q_width(), t.kv_width());
    for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
        out.push((format!("{prefix}.self_attn.{name}.weight"), vec![rows, h]));
        if t.attention_bias {
            out.push((format!("{prefix}.self_attn.{name}.bias"), vec![rows]));
        }
    }
    out.push((format!("{prefix}.self_attn.o_proj.weight"), vec![h, q]));
    if t.qk_norm {
        out.push((format!("{prefix}.self_attn.q_norm.weight"), vec![t.head_dim]));
        out.push((format!("{prefix}.self_attn.k_norm.weight"), vec![t.head_dim]));
    }
    out.push((format!("{prefix}.input_layernorm.weight"), vec![h]));
    out.push((format!("{prefix}.post_attention_layernorm.weight"), vec![h]));
}

/// SwiGLU MLP tensors under `prefix` (e.g. `model.layers.0.mlp`).
pub fn mlp_tensors(hidden: usize, intermediate: usize, prefix: &str, out: &mut TensorList) {
    out.push((format!("{prefix}.gate_proj.weight"), vec![intermediate, hidden]));
    out.push((format!("{prefix}.up_proj.weight"), vec![intermediate, hidden]));
    out.push((format!("{prefix}.down_proj.weight"), vec![hidden, intermediate]));
}

pub fn checkpoint_tensors(t: &TextConfig) -> TensorList {
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![t.vocab_size, t.hidden_size])];
    for i in 0..t.num_hidden_layers {
        let p = layer_prefix(i);
        attention_tensors(t, &p, &mut out);
        mlp_tensors(t.hidden_size, t.intermediate_size, &format!("{p}.mlp"), &mut out);
    }
    out.push(("model.norm.weight".to_string(), vec![t.hidden_size]));
    if !t.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![t.vocab_size, t.hidden_size]));
    }
    out
}
