//! Qwen3 dense (`Qwen3ForCausalLM`): pre-norm decoder, GQA with per-head q/k RMSNorm before
//! half-split rotary, no biases, SwiGLU MLP; the lm_head is tied to the embeddings when
//! `tie_word_embeddings` is set (Qwen3-4B).

use pio_models::config::TextConfig;

use crate::checkpoint::{attention_tensors, lm_head_weight, mlp_tensors, TensorList};
use crate::decoder::DecoderBuilder;
use crate::error::BuildResult as Result;

pub fn build_decoder(b: &mut DecoderBuilder) -> Result<()> {
    let x = b.embed_in_first_stage("model.embed_tokens.weight")?;
    let h = dense_stack(b, "model", x.as_deref(), &mut |_, _| Ok(None))?;
    b.logits_in_last_stage(h, lm_head_weight(b.text), "model.embed_tokens.weight")
}

/// The dense layers under `root` (`{root}.layers.N`, SwiGLU MLPs) of the builder's scope and
/// the final norm `{root}.norm`, from the embeddings `x` (None: a later stage's hidden-state
/// inputs); `addend` as in [`DecoderBuilder::decoder_stack_with_addends`]. Returns the normed
/// hidden states in the last stage.
pub fn dense_stack(
    b: &mut DecoderBuilder,
    root: &str,
    x: Option<&str>,
    addend: &mut dyn FnMut(&mut DecoderBuilder, usize) -> Result<Option<String>>,
) -> Result<Option<String>> {
    let intermediate = b.text.intermediate_size;
    let layer_prefix = |i: usize| format!("{root}.layers.{i}");
    b.decoder_stack_with_addends(
        x,
        &layer_prefix,
        &format!("{root}.norm.weight"),
        &mut |b, i, h| b.swiglu_mlp(&format!("{}.mlp", layer_prefix(i)), h, intermediate),
        addend,
    )
}

/// The dense Qwen3 decoder's tensors under `root` (`model`; Qwen3-VL's `model.language_model`):
/// embeddings, layers, final norm. The lm_head is the caller's.
pub fn decoder_tensors(t: &TextConfig, root: &str, out: &mut TensorList) {
    out.push((format!("{root}.embed_tokens.weight"), vec![t.vocab_size, t.hidden_size]));
    for i in 0..t.num_hidden_layers {
        let p = format!("{root}.layers.{i}");
        attention_tensors(t, &p, out);
        mlp_tensors(t.hidden_size, t.intermediate_size, &format!("{p}.mlp"), out);
    }
    out.push((format!("{root}.norm.weight"), vec![t.hidden_size]));
}

/// `lm_head.weight`, unless the embeddings are tied.
pub fn lm_head_tensors(t: &TextConfig, out: &mut TensorList) {
    if !t.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![t.vocab_size, t.hidden_size]));
    }
}

pub fn checkpoint_tensors(t: &TextConfig) -> TensorList {
    let mut out = TensorList::new();
    decoder_tensors(t, "model", &mut out);
    lm_head_tensors(t, &mut out);
    out
}
