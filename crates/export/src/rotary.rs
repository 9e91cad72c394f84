//! Rotary position tables. Text models read static cos/sin caches indexed by position; Qwen3-VL
//! reads each token's rows once per step at its (t, h, w) positions (interleaved MRoPE) and hands
//! GroupQueryAttention a table indexed by cache slot, so the rotary stays fused inside the
//! attention kernel and no layer pays for the three position axes.
//!
//! Why by cache slot and not through GroupQueryAttention's `position_ids` input (a table of the
//! step's rows and position_ids = row indices): ONNX Runtime's CUDA kernels do not read
//! `position_ids` on every path. Flash decoding rotates inside the flash kernel at the cache slot,
//! and outside the fused unpack kernel the query is rotated at the slot while the key follows
//! `position_ids`; every path agrees on the slot. The CPU kernel was checked both ways.

use crate::error::{BuildError, BuildResult as Result};
use pio_models::config::TextConfig;
use pio_models::manifest::TensorDtype;

use crate::convert::push_f32;
use crate::onnx::graph::Graph;

/// inv_freq[i] = 1 / theta^(2i / rotary_dim), i < rotary_dim / 2, as transformers' default rope.
pub fn inv_freq(theta: f64, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim / 2).map(|i| (1.0 / theta.powf((2 * i) as f64 / rotary_dim as f64)) as f32).collect()
}

/// cos/sin tables of shape (context_length, rotary_dim / 2), as transformers computes them:
/// angle = position * inv_freq in float32 (the position divided by the factor for linear scaling).
pub fn static_caches(
    g: &mut Graph,
    text: &TextConfig,
    context_length: usize,
    dtype: TensorDtype,
) -> Result<(String, String)> {
    let rotary_dim = text.rotary_dim();
    let half = rotary_dim / 2;
    let scale = if text.rope.rope_type == "linear" { text.rope.factor.unwrap_or(1.0) } else { 1.0 };
    let inv_freq = inv_freq(text.rope.theta, rotary_dim);
    let mut cos = Vec::with_capacity(context_length * half * dtype.size_bytes());
    let mut sin = Vec::with_capacity(cos.capacity());
    for pos in 0..context_length {
        let p = (pos as f32) / scale as f32;
        for &f in &inv_freq {
            let angle = p * f;
            push_f32(dtype, angle.cos(), &mut cos);
            push_f32(dtype, angle.sin(), &mut sin);
        }
    }
    let c = g.initializer("cos_cache", dtype, &[context_length, half], &cos)?;
    let sn = g.initializer("sin_cache", dtype, &[context_length, half], &sin)?;
    Ok((c, sn))
}

/// The position axis (0: t, 1: h, 2: w) each of the `half` rotary frequencies reads, as
/// transformers' Qwen3-VL `apply_interleaved_mrope`: t everywhere, then h at every third index
/// from 1 below 3 * section[1], and w at every third index from 2 below 3 * section[2].
pub fn interleaved_mrope_axes(section: &[usize], half: usize) -> Result<Vec<i64>> {
    let [_, h, w] = section else {
        // The config reader refuses any other length, naming the field.
        return Err(BuildError::Internal(format!("mrope_section must hold 3 numbers (t, h, w), got {section:?}")));
    };
    Ok((0..half)
        .map(|i| match i % 3 {
            1 if i < 3 * h => 1,
            2 if i < 3 * w => 2,
            _ => 0,
        })
        .collect())
}

/// Each token's position for each rotary frequency, (batch, sequence, rotary_dim / 2) int64,
/// from the graph input `position_ids` (3, batch, sequence): frequency i reads the axis
/// `interleaved_mrope_axes[i]`.
pub fn mrope_positions(g: &mut Graph, text: &TextConfig) -> Result<String> {
    let section = text.rope.mrope_section.as_deref().unwrap_or_default();
    let axes = interleaved_mrope_axes(section, text.rotary_dim() / 2)?;
    let axes = g.const_i64("mrope.axis_of_frequency", &axes)?;
    let per_token =
        g.node("Transpose", "mrope.positions_per_token").inputs(&["position_ids"]).attr("perm", vec![1i64, 2, 0]).out();
    Ok(g.node("Gather", "mrope.position_per_frequency").inputs(&[&per_token, &axes]).attr("axis", 2i64).out())
}

/// Each token's cos and sin rows, (batch, sequence, rotary_dim / 2), read from the static caches
/// at each frequency's position (`mrope_positions`): cos(position[i] * inv_freq[i]) is entry
/// (position[i], i) of the text models' table.
pub fn mrope_token_rows(
    g: &mut Graph,
    text: &TextConfig,
    positions: &str,
    caches: &(String, String),
) -> Result<(String, String)> {
    // GatherElements reads a table of its own rank: the positions as rows of rotary_dim / 2.
    let shape = g.node("Shape", "mrope.positions_shape").inputs(&[positions]).out();
    let rows_shape = g.const_i64("mrope.positions_rows_shape", &[-1, (text.rotary_dim() / 2) as i64])?;
    let rows = g.node("Reshape", "mrope.positions_rows").inputs(&[positions, &rows_shape]).out();
    let [cos, sin] = table_entries(g, caches, &rows, "rows");
    let cos = g.node("Reshape", "mrope.cos_token_rows").inputs(&[&cos, &shape]).out();
    let sin = g.node("Reshape", "mrope.sin_token_rows").inputs(&[&sin, &shape]).out();
    Ok((cos, sin))
}

/// Entry (positions[r, i], i) of the cos and of the sin table for every (r, i): each row of
/// `positions` (rows, rotary_dim / 2) read frequency by frequency.
fn table_entries(g: &mut Graph, caches: &(String, String), positions: &str, what: &str) -> [String; 2] {
    [(&caches.0, "cos"), (&caches.1, "sin")].map(|(table, name)| {
        g.node("GatherElements", &format!("mrope.{name}_{what}"))
            .inputs(&[table.as_str(), positions])
            .attr("axis", 0i64)
            .out()
    })
}

/// GroupQueryAttention's cos/sin caches for one step of a multimodal decoder: (T, rotary_dim / 2)
/// tables, T the attention mask's length (GroupQueryAttention wants at least total_sequence_length
/// rows), indexed by cache slot. GroupQueryAttention rotates row b's token s, which lands at cache
/// slot past_b + s, with table row past_b + s in every kernel path (first prompt, later chunks,
/// decode), whether or not a kernel reads `position_ids`. So the table starts as the static
/// table's first T rows (what a text token at slot p has: position p on all three axes) and each
/// (b, s) token's MRoPE rows are scattered to slot past_b + s, past_b being row b's cache length
/// before the step (its mask length - S).
///
/// Rows of a batch that share a slot (different lengths are the rule in a batched decode; equal
/// lengths put every row at the same slot) must carry identical rows there: ScatterND leaves the
/// order of duplicate writes undefined. The runtime sees to it (`pio_runtime::model` checks every
/// step; its engine gives idle rows the position the table holds at their slot, and runs a
/// decoding row alone when it shares a slot with another at a different position).
///
/// `positions` is [`mrope_positions`]' output, `caches` the static (context_length, half)
/// tables, `lengths` each sequence's total length after the step (int64, (batch,)), `step_length` S and
/// `mask_length` T scalars from the inputs' shapes. The shapes only set kernel sizes (read on the
/// host, as Range and Slice take them); the values come from device tensors, so a captured CUDA
/// graph replays the step.
pub fn slot_tables(
    g: &mut Graph,
    text: &TextConfig,
    positions: &str,
    caches: &(String, String),
    lengths: &str,
    step_length: &str,
    mask_length: &str,
) -> Result<(String, String)> {
    // The step's tokens' rows, (batch * S, half), in (b, s) order.
    let rows_shape = g.const_i64("mrope.step_rows_shape", &[-1, (text.rotary_dim() / 2) as i64])?;
    let rows = g.node("Reshape", "mrope.step_positions_rows").inputs(&[positions, &rows_shape]).out();
    let [cos_rows, sin_rows] = table_entries(g, caches, &rows, "step_rows");
    // Slot of token (b, s): length[b] - (S - s), as (batch * S, 1) ScatterND indices.
    let zero = g.scalar_i64("mrope.zero", 0)?;
    let minus_one = g.scalar_i64("mrope.minus_one", -1)?;
    let back = g.node("Range", "mrope.step_offsets_from_end").inputs(&[step_length, &zero, &minus_one]).out();
    let column = g.const_i64("mrope.axes_1", &[1])?;
    let lengths = g.node("Unsqueeze", "mrope.lengths_column").inputs(&[lengths, &column]).out();
    let slots = g.node("Sub", "mrope.token_slots").inputs(&[&lengths, &back]).out();
    let index_shape = g.const_i64("mrope.slot_index_shape", &[-1, 1])?;
    let indices = g.node("Reshape", "mrope.slot_indices").inputs(&[&slots, &index_shape]).out();
    // The static table's first T rows, with the step's rows scattered over their slots.
    let axes0 = g.const_i64("mrope.axes_0", &[0])?;
    let starts = g.const_i64("mrope.table_start", &[0])?;
    let ends = g.node("Unsqueeze", "mrope.table_end").inputs(&[mask_length, &axes0]).out();
    let table = |g: &mut Graph, cache: &str, rows: &str, name: &str| {
        let base = g.node("Slice", &format!("mrope.{name}_static_rows")).inputs(&[cache, &starts, &ends, &axes0]).out();
        g.node("ScatterND", &format!("mrope.{name}_cache")).inputs(&[&base, &indices, rows]).out()
    };
    Ok((table(g, &caches.0, &cos_rows, "cos"), table(g, &caches.1, &sin_rows, "sin")))
}
