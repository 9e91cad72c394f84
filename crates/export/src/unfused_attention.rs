//! Attention from standard ONNX ops (`--no-fused-attention`), built the way an exporter without
//! contrib ops does it, after transformers' eager attention: it computes what
//! GroupQueryAttention does in one kernel, so the two graphs measure what that kernel buys. The
//! graph inputs and outputs are the fused graph's (past and present BNSH, same names and dtypes),
//! but the present cache is Concat(past, new): it grows every step and is never a shared buffer.
//!
//! Per layer: q/k/v projections, heads split, per-head q/k RMSNorm, rotary from each token's
//! cos/sin rows (half-split rotate_half on the first rotary_dim channels, the rest passed
//! through), present = Concat(past, new), each kv head's query heads grouped as rows,
//! scores = q kᵀ cast to float32 and scaled, + an additive mask, Softmax, back to the graph dtype,
//! · v, heads merged. The values every layer shares are in [`crate::unfused_inputs`].

use pio_models::manifest::TensorDtype;

use crate::decoder::DecoderBuilder;
use crate::error::BuildResult as Result;
use crate::unfused_inputs::UnfusedInputs;

impl DecoderBuilder<'_> {
    /// Self-attention of decoder layer `layer` from standard ops (see the module docs); returns
    /// its output, (B, S, heads * D), before o_proj.
    pub(crate) fn unfused_attention(
        &mut self,
        inputs: &UnfusedInputs,
        layer: usize,
        prefix: &str,
        h: &str,
    ) -> Result<String> {
        let t = self.text;
        let (heads, kv_heads, d) = (t.num_attention_heads, t.num_key_value_heads, t.head_dim);
        let (q, k, v) = self.qkv_projections(prefix, h, false)?;
        let mut q = self.split_heads(&q, heads, &format!("{prefix}.q"))?;
        let mut k = self.split_heads(&k, kv_heads, &format!("{prefix}.k"))?;
        let v = self.split_heads(&v, kv_heads, &format!("{prefix}.v"))?;
        if t.qk_norm {
            q = self.rms_norm(&q, &format!("{prefix}.q_norm.weight"), d)?;
            k = self.rms_norm(&k, &format!("{prefix}.k_norm.weight"), d)?;
        }
        let q = self.transpose(&q, &[0, 2, 1, 3], &format!("{prefix}.q_bnsd"));
        let q = self.rotate(inputs, &q, &format!("{prefix}.q_rotary"))?;
        let k = self.transpose(&k, &[0, 2, 1, 3], &format!("{prefix}.k_bnsd"));
        let k = self.rotate(inputs, &k, &format!("{prefix}.k_rotary"))?;
        let v = self.transpose(&v, &[0, 2, 1, 3], &format!("{prefix}.v_bnsd"));

        let [past_k, past_v, present_k, present_v] = self.cache_io(layer);
        self.g
            .node("Concat", &format!("{prefix}.key_cache"))
            .inputs(&[&past_k, &k])
            .attr("axis", 2i64)
            .named_outs(&[&present_k]);
        self.g
            .node("Concat", &format!("{prefix}.value_cache"))
            .inputs(&[&past_v, &v])
            .attr("axis", 2i64)
            .named_outs(&[&present_v]);

        // A kv head's query heads stacked as rows, (B, kv_heads, rep * S, D): one MatMul per kv
        // head reads its keys and values once, without repeat_kv copies of the cache.
        let grouped = heads > kv_heads;
        let q = if grouped {
            self.g.node("Reshape", &format!("{prefix}.q_grouped")).inputs(&[&q, &inputs.grouped_shape]).out()
        } else {
            q
        };
        let keys_t = self.transpose(&present_k, &[0, 1, 3, 2], &format!("{prefix}.keys_t"));
        let scores = self.g.node("MatMul", &format!("{prefix}.scores")).inputs(&[&q, &keys_t]).out();
        // Scaled, masked and normalized in float32 (transformers' eager attention upcasts for the
        // softmax), so 16-bit graphs keep their scores' precision.
        let dtype = self.dtype;
        let scores = self.cast(&scores, dtype, TensorDtype::Float32, &format!("{prefix}.scores_f32"));
        let scores = self.g.node("Mul", &format!("{prefix}.scores_scaled")).inputs(&[&scores, &inputs.scale]).out();
        let window = self.settings.layer_window(t, layer);
        let scores = self
            .g
            .node("Add", &format!("{prefix}.scores_masked"))
            .inputs(&[scores.as_str(), inputs.mask(window)?])
            .out();
        let probs = self.g.node("Softmax", &format!("{prefix}.probs")).inputs(&[&scores]).attr("axis", -1i64).out();
        let probs = self.cast(&probs, TensorDtype::Float32, dtype, &format!("{prefix}.probs_cast"));
        let context = self.g.node("MatMul", &format!("{prefix}.context")).inputs(&[&probs, &present_v]).out();
        let context = if grouped {
            self.g.node("Reshape", &format!("{prefix}.context_heads")).inputs(&[&context, &inputs.heads_shape]).out()
        } else {
            context
        };
        let context = self.transpose(&context, &[0, 2, 1, 3], &format!("{prefix}.context_bsnd"));
        Ok(self.g.node("Reshape", &format!("{prefix}.context_merged")).inputs(&[&context, &inputs.merged_shape]).out())
    }

    fn transpose(&mut self, x: &str, perm: &[i64], name: &str) -> String {
        self.g.node("Transpose", name).inputs(&[x]).attr("perm", perm.to_vec()).out()
    }

    /// Rotary embedding of x (B, N, S, D) in transformers' half-split layout: with x1, x2 the
    /// halves of the first rotary_dim channels, x * cos + rotate_half(x) * sin is
    /// (x1 cos - x2 sin, x2 cos + x1 sin); the other channels pass through (GLM's partial rotary).
    fn rotate(&mut self, inputs: &UnfusedInputs, x: &str, name: &str) -> Result<String> {
        let parts = if self.text.rotary_dim() < self.text.head_dim { 3 } else { 2 };
        let parts = self
            .g
            .node("Split", &format!("{name}.split"))
            .inputs(&[x, &inputs.rotary_split])
            .attr("axis", -1i64)
            .outs(parts);
        let product =
            |b: &mut Self, a: &str, c: &str, n: &str| b.g.node("Mul", &format!("{name}.{n}")).inputs(&[a, c]).out();
        let (x1_cos, x2_sin) =
            (product(self, &parts[0], &inputs.cos, "x1_cos"), product(self, &parts[1], &inputs.sin, "x2_sin"));
        let (x2_cos, x1_sin) =
            (product(self, &parts[1], &inputs.cos, "x2_cos"), product(self, &parts[0], &inputs.sin, "x1_sin"));
        let mut halves = vec![
            self.g.node("Sub", &format!("{name}.first_half")).inputs(&[&x1_cos, &x2_sin]).out(),
            self.g.node("Add", &format!("{name}.second_half")).inputs(&[&x2_cos, &x1_sin]).out(),
        ];
        halves.extend(parts.get(2).cloned());
        Ok(self.g.node("Concat", name).inputs(&halves).attr("axis", -1i64).out())
    }
}
