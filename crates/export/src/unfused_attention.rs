//! Attention from standard ONNX ops (`--no-fused-attention`), built the way an exporter without
//! contrib ops does it, after transformers' eager attention: it computes what
//! GroupQueryAttention does in one kernel, so the two graphs measure what that kernel buys. The
//! graph inputs and outputs are the fused graph's (past and present BNSH, same names and dtypes),
//! but the present cache is Concat(past, new): it grows every step and is never a shared buffer.
//!
//! Per layer: q/k/v projections, heads split, per-head q/k RMSNorm, rotary from the cos/sin rows
//! gathered at position_ids (half-split rotate_half on the first rotary_dim channels, the rest
//! passed through), present = Concat(past, new), each kv head's query heads grouped as rows,
//! scores = q kᵀ cast to float32 and scaled, + an additive mask, Softmax, back to the graph dtype,
//! · v, heads merged.

use anyhow::{anyhow, Result};
use pio_models::config::TextConfig;
use pio_models::manifest::TensorDtype;

use crate::decoder::{DecoderBuilder, ExportSettings};
use crate::onnx::graph::Graph;

/// ONNX's BOOL element type, for Cast.
const ONNX_BOOL: i64 = 9;

/// The values every unfused layer reads, built once per graph.
#[derive(Clone)]
pub struct UnfusedInputs {
    /// cos and sin at each token's position, (B, 1, S, rotary_dim / 2): broadcast over heads.
    cos: String,
    sin: String,
    /// head_dim split for rotary: the two rotated halves, then the channels passed through.
    rotary_split: String,
    /// 1 / sqrt(head_dim) in float32.
    scale: String,
    /// (B, H, S, D) <-> (B, kv_heads, rep * S, D), and (B, S, H, D) -> (B, S, H * D).
    grouped_shape: String,
    heads_shape: String,
    merged_shape: String,
    /// The additive float32 mask of each window in the graph (None: full attention),
    /// (B, 1, rep * S, T) with rep = heads / kv_heads.
    masks: Vec<(Option<usize>, String)>,
}

impl UnfusedInputs {
    /// `mask` is the attention_mask input, `total` its length T (a scalar).
    pub fn new(
        g: &mut Graph,
        text: &TextConfig,
        settings: &ExportSettings,
        mask: &str,
        total: &str,
        cos_cache: &str,
        sin_cache: &str,
    ) -> Result<Self> {
        let (heads, kv_heads, d) =
            (text.num_attention_heads as i64, text.num_key_value_heads as i64, text.head_dim as i64);
        let axis1 = g.const_i64("unfused.axes_1", &[1])?;
        let rows_at_positions = |g: &mut Graph, table: &str, name: &str| {
            let rows = g.node("Gather", name).inputs(&[table, "position_ids"]).out();
            g.node("Unsqueeze", &format!("{name}.per_head")).inputs(&[&rows, &axis1]).out()
        };
        let cos = rows_at_positions(g, cos_cache, "rotary_cos");
        let sin = rows_at_positions(g, sin_cache, "rotary_sin");
        let half = (text.rotary_dim() / 2) as i64;
        let mut sizes = vec![half, half];
        if text.rotary_dim() < text.head_dim {
            sizes.push(d - 2 * half);
        }
        let mut windows = settings.layer_windows(text);
        windows.sort();
        windows.dedup();
        Ok(UnfusedInputs {
            cos,
            sin,
            rotary_split: g.const_i64("rotary_split_sizes", &sizes)?,
            scale: g.const_f32("attention_scale", &[], &[1.0 / (text.head_dim as f32).sqrt()])?,
            grouped_shape: g.const_i64("attention_grouped_shape", &[0, kv_heads, -1, d])?,
            heads_shape: g.const_i64("attention_heads_shape", &[0, heads, -1, d])?,
            merged_shape: g.const_i64("attention_merged_shape", &[0, 0, heads * d])?,
            masks: Self::masks(g, text, &windows, mask, total, &axis1)?,
        })
    }

    /// One (B, 1, rep * S, T) mask per window. Query s is the token at position past + s
    /// (past = T - S, what the cache holds); it sees key t when t <= past + s, with a window W
    /// also t > past + s - W, and when attention_mask[b, t] is 1. Hidden keys get float32's
    /// lowest value rather than -inf, so a fully masked row softmaxes to a uniform row, not NaN.
    fn masks(
        g: &mut Graph,
        text: &TextConfig,
        windows: &[Option<usize>],
        mask: &str,
        total: &str,
        axis1: &str,
    ) -> Result<Vec<(Option<usize>, String)>> {
        let ids_shape = g.node("Shape", "input_ids_shape").inputs(&["input_ids"]).out();
        let idx1 = g.scalar_i64("unfused.index_1", 1)?;
        let seq = g.node("Gather", "sequence_length").inputs(&[&ids_shape, &idx1]).attr("axis", 0i64).out();
        let past = g.node("Sub", "past_sequence_length").inputs(&[total, &seq]).out();
        let (zero, one) = (g.scalar_i64("unfused.zero", 0)?, g.scalar_i64("unfused.one", 1)?);
        let query_pos = g.node("Range", "query_positions").inputs(&[&past, total, &one]).out();
        let key_pos = g.node("Range", "key_positions").inputs(&[&zero, total, &one]).out();
        let axis0 = g.const_i64("unfused.axes_0", &[0])?;
        let query_col = g.node("Unsqueeze", "query_positions.column").inputs(&[&query_pos, axis1]).out();
        let key_row = g.node("Unsqueeze", "key_positions.row").inputs(&[&key_pos, &axis0]).out();
        // (S, T): how many positions key t lies before query s.
        let distance = g.node("Sub", "key_distance").inputs(&[&query_col, &key_row]).out();
        let causal = g.node("GreaterOrEqual", "causal").inputs(&[&distance, &zero]).out();
        let valid = g.node("Cast", "attention_mask.valid").inputs(&[mask]).attr("to", ONNX_BOOL).out();
        let axes12 = g.const_i64("unfused.axes_1_2", &[1, 2])?;
        let valid = g.node("Unsqueeze", "attention_mask.per_query").inputs(&[&valid, &axes12]).out();
        let axes01 = g.const_i64("unfused.axes_0_1", &[0, 1])?;
        let (open, closed) = (g.const_f32("mask.open", &[], &[0.0])?, g.const_f32("mask.closed", &[], &[f32::MIN])?);
        let rep = (text.num_attention_heads / text.num_key_value_heads) as i64;
        let repeats = g.const_i64("mask.group_repeats", &[1, 1, rep, 1])?;
        let mut masks = Vec::with_capacity(windows.len());
        for &window in windows {
            let name = match window {
                None => "mask.full".to_string(),
                Some(w) => format!("mask.window_{w}"),
            };
            let seen = match window {
                None => causal.clone(),
                Some(w) => {
                    let limit = g.scalar_i64(&format!("{name}.size"), w as i64)?;
                    let inside = g.node("Less", &format!("{name}.inside")).inputs(&[&distance, &limit]).out();
                    g.node("And", &format!("{name}.causal")).inputs(&[&causal, &inside]).out()
                }
            };
            let seen = g.node("Unsqueeze", &format!("{name}.per_batch")).inputs(&[&seen, &axes01]).out();
            let seen = g.node("And", &format!("{name}.valid")).inputs(&[&seen, &valid]).out();
            let mut additive = g.node("Where", &name).inputs(&[&seen, &open, &closed]).out();
            // One row block per query head of a kv head group (see `grouped_shape`).
            if rep > 1 {
                additive = g.node("Tile", &format!("{name}.grouped")).inputs(&[&additive, &repeats]).out();
            }
            masks.push((window, additive));
        }
        Ok(masks)
    }

    fn mask(&self, window: Option<usize>) -> Result<&str> {
        self.masks
            .iter()
            .find(|(w, _)| *w == window)
            .map(|(_, m)| m.as_str())
            .ok_or_else(|| anyhow!("no attention mask was built for window {window:?}"))
    }
}

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
