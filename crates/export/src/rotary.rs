//! Rotary position tables. Text models read static cos/sin caches indexed by position; Qwen3-VL
//! computes each token's rows once per step from its (t, h, w) positions (interleaved MRoPE) and
//! hands GroupQueryAttention a table indexed by cache slot, so the rotary stays fused inside the
//! attention kernel and no layer pays for the three position axes.

use anyhow::{bail, Result};
use pio_models::config::TextConfig;
use pio_models::manifest::TensorDtype;

use crate::convert::push_f32;
use crate::onnx::graph::{onnx_type, Graph};

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
        bail!("mrope_section must hold 3 numbers (t, h, w), got {section:?}");
    };
    Ok((0..half)
        .map(|i| match i % 3 {
            1 if i < 3 * h => 1,
            2 if i < 3 * w => 2,
            _ => 0,
        })
        .collect())
}

/// Each token's cos and sin rows, (batch, sequence, rotary_dim / 2) in `dtype`, from the graph
/// input `position_ids` (3, batch, sequence): frequency i of a token rotates by its position on
/// axis `interleaved_mrope_axes[i]` times inv_freq[i], the angle taken in float32 as transformers
/// does.
pub fn mrope_token_rows(g: &mut Graph, text: &TextConfig, dtype: TensorDtype) -> Result<(String, String)> {
    let section = text.rope.mrope_section.as_deref().unwrap_or_default();
    let rotary_dim = text.rotary_dim();
    let half = rotary_dim / 2;
    let axes = interleaved_mrope_axes(section, half)?;
    let axes = g.const_i64("mrope.axis_of_frequency", &axes)?;
    let freqs = g.const_f32("mrope.inv_freq", &[half], &inv_freq(text.rope.theta, rotary_dim))?;
    let per_token =
        g.node("Transpose", "mrope.positions_per_token").inputs(&["position_ids"]).attr("perm", vec![1i64, 2, 0]).out();
    let chosen = g.node("Gather", "mrope.position_per_frequency").inputs(&[&per_token, &axes]).attr("axis", 2i64).out();
    let chosen = g
        .node("Cast", "mrope.position_f32")
        .inputs(&[&chosen])
        .attr("to", onnx_type(TensorDtype::Float32) as i64)
        .out();
    let angle = g.node("Mul", "mrope.angle").inputs(&[&chosen, &freqs]).out();
    let mut rows = Vec::with_capacity(2);
    for op in ["Cos", "Sin"] {
        let name = format!("mrope.{}", op.to_lowercase());
        let r = g.node(op, &name).inputs(&[&angle]).out();
        rows.push(if dtype == TensorDtype::Float32 {
            r
        } else {
            g.node("Cast", &format!("{name}.cast")).inputs(&[&r]).attr("to", onnx_type(dtype) as i64).out()
        });
    }
    Ok((rows[0].clone(), rows[1].clone()))
}

/// GroupQueryAttention's cos/sin caches for one step of a multimodal decoder: (context_length,
/// rotary_dim / 2) tables whose rows past..past+S hold the step's S tokens' rows (of the first
/// sequence), `past` being the cache length before the step. GroupQueryAttention rotates the
/// token at cache slot past + s with row past + s in every kernel path (first prompt, later
/// chunks, decode), so the table works whether or not a kernel reads `position_ids`. Rows
/// outside the step repeat its first or last row and are never read.
///
/// `last_slot` is each sequence's total length - 1 (int64, (batch,)). Built from constants and
/// device tensors only (no shape-dependent host copies), so a captured CUDA graph replays it.
pub fn slot_tables(
    g: &mut Graph,
    token_cos: &str,
    token_sin: &str,
    last_slot: &str,
    step_length: &str,
    context_length: usize,
) -> Result<(String, String)> {
    let first = g.scalar_i64("mrope.first_sequence", 0)?;
    let slot = g.node("Gather", "mrope.last_slot").inputs(&[last_slot, &first]).attr("axis", 0i64).out();
    let rows: Vec<i64> = (0..context_length as i64).collect();
    let rows = g.const_i64("mrope.table_rows", &rows)?;
    // Row r holds the token s = r - past; counted from the step's last token, j = last - r,
    // which indexes the step's rows reversed.
    let from_last = g.node("Sub", "mrope.rows_from_last").inputs(&[&slot, &rows]).out();
    let zero = g.scalar_i64("mrope.zero", 0)?;
    let one = g.scalar_i64("mrope.one", 1)?;
    let last_index = g.node("Sub", "mrope.step_last_index").inputs(&[step_length, &one]).out();
    let index = g.node("Clip", "mrope.row_index").inputs(&[&from_last, &zero, &last_index]).out();
    let starts = g.const_i64("mrope.reverse_starts", &[-1])?;
    let ends = g.const_i64("mrope.reverse_ends", &[i64::MIN])?;
    let axes = g.const_i64("mrope.reverse_axes", &[0])?;
    let steps = g.const_i64("mrope.reverse_steps", &[-1])?;
    let mut tables = Vec::with_capacity(2);
    for (rows_in, name) in [(token_cos, "cos"), (token_sin, "sin")] {
        let seq0 = g
            .node("Gather", &format!("mrope.{name}_first_sequence"))
            .inputs(&[rows_in, &first])
            .attr("axis", 0i64)
            .out();
        let reversed =
            g.node("Slice", &format!("mrope.{name}_reversed")).inputs(&[&seq0, &starts, &ends, &axes, &steps]).out();
        tables.push(
            g.node("Gather", &format!("mrope.{name}_cache")).inputs(&[&reversed, &index]).attr("axis", 0i64).out(),
        );
    }
    Ok((tables[0].clone(), tables[1].clone()))
}
