//! The values every layer of the standard-op attention (`--no-fused-attention`,
//! [`crate::unfused_attention`]) reads, built once per graph: each token's rotary rows broadcast
//! over heads, the reshapes that group query heads by kv head, and one additive mask per window.

use pio_models::config::TextConfig;

use crate::error::{BuildError, BuildResult as Result};
use crate::onnx::graph::Graph;
use crate::settings::ExportSettings;

/// ONNX's BOOL element type, for Cast.
const ONNX_BOOL: i64 = 9;

/// The values every unfused layer reads, built once per graph.
#[derive(Clone)]
pub struct UnfusedInputs {
    /// cos and sin at each token's position, (B, 1, S, rotary_dim / 2): broadcast over heads.
    pub(crate) cos: String,
    pub(crate) sin: String,
    /// head_dim split for rotary: the two rotated halves, then the channels passed through.
    pub(crate) rotary_split: String,
    /// 1 / sqrt(head_dim) in float32.
    pub(crate) scale: String,
    /// (B, H, S, D) <-> (B, kv_heads, rep * S, D), and (B, S, H, D) -> (B, S, H * D).
    pub(crate) grouped_shape: String,
    pub(crate) heads_shape: String,
    pub(crate) merged_shape: String,
    /// The additive float32 mask of each window in the graph (None: full attention),
    /// (B, 1, rep * S, T) with rep = heads / kv_heads.
    masks: Vec<(Option<usize>, String)>,
}

impl UnfusedInputs {
    /// `step` is a (B, S, ...) graph input whose shape gives the step's length S (`input_ids`,
    /// or a later stage's hidden states), `mask` the attention_mask input, `total` its length T
    /// (a scalar); `token_cos` and `token_sin` each token's rotary rows, (B, S, rotary_dim / 2).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        g: &mut Graph,
        text: &TextConfig,
        settings: &ExportSettings,
        step: &str,
        mask: &str,
        total: &str,
        token_cos: &str,
        token_sin: &str,
    ) -> Result<Self> {
        let (heads, kv_heads, d) =
            (text.num_attention_heads as i64, text.num_key_value_heads as i64, text.head_dim as i64);
        let axis1 = g.const_i64("unfused.axes_1", &[1])?;
        let cos = g.node("Unsqueeze", "rotary_cos.per_head").inputs(&[token_cos, &axis1]).out();
        let sin = g.node("Unsqueeze", "rotary_sin.per_head").inputs(&[token_sin, &axis1]).out();
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
            masks: Self::masks(g, text, &windows, step, mask, total, &axis1)?,
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
        step: &str,
        mask: &str,
        total: &str,
        axis1: &str,
    ) -> Result<Vec<(Option<usize>, String)>> {
        let ids_shape = g.node("Shape", "input_ids_shape").inputs(&[step]).out();
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

    pub(crate) fn mask(&self, window: Option<usize>) -> Result<&str> {
        self.masks
            .iter()
            .find(|(w, _)| *w == window)
            .map(|(_, m)| m.as_str())
            .ok_or_else(|| BuildError::Internal(format!("no attention mask was built for window {window:?}")))
    }
}
