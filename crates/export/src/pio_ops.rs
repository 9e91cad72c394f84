//! Nodes for Inference-PIO's own operators (domain `ai.pio`, implemented by the `pio-kernels`
//! crate), chosen at export with `--pio-kernels`:
//!
//! * `linear`: the decoder layers' projections (q/k/v, o, down, and gate/up when `swiglu` is off)
//!   as `ai.pio.LinearInt4` (int4, the kernels' layout) or `ai.pio.Linear` (16-bit, the weight as
//!   the checkpoint stores it, (out, in));
//! * `lm_head`: the lm_head likewise (16-bit unless `--int4-lm-head`; a tied one reads the
//!   embedding table itself);
//! * `swiglu`: gate and up as one such node whose epilogue is `silu(gate) * up` (rows grouped by
//!   16), replacing MatMul + Split + Sigmoid + Mul + Mul;
//! * `moe`: the routed int4 experts as `ai.pio.MoEInt4` instead of com.microsoft QMoE;
//! * `attention`: GroupQueryAttention as `ai.pio.GroupQueryAttention` (the same inputs and
//!   attributes): one-token steps run Inference-PIO's decode kernel (q/k norm, rotary, cache
//!   append and attention in one launch), everything else ONNX Runtime's own operator.
//!
//! int4 weights are quantized exactly as for MatMulNBits (the same codes and scales) and then
//! reordered, so the two graphs hold the same dequantized weights. A projection whose shape the
//! kernels do not take (N not a multiple of 16, K not of 32) keeps ONNX Runtime's op, with a
//! warning naming it.

use std::collections::BTreeSet;

use pio_kernels::gpu::MoeShape;
use pio_kernels::layout::{self, swiglu_row_source, GateUp, Int4Shape};
use pio_kernels::ops;
use pio_models::manifest::{TargetEp, TensorDtype};
use pio_models::size::Precision;

use crate::checkpoint::TensorRef;
use crate::convert::push_f32;
use crate::error::{BuildError, BuildResult as Result, SettingsError};
use crate::onnx::graph::Graph;
use crate::quant::{self, Int4Layout};

/// Which families of Inference-PIO kernels a graph uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PioKernels {
    pub linear: bool,
    pub lm_head: bool,
    pub swiglu: bool,
    pub moe: bool,
    pub attention: bool,
}

pub const LINEAR: &str = "linear";
pub const LM_HEAD: &str = "lm_head";
pub const SWIGLU: &str = "swiglu";
pub const MOE: &str = "moe";
pub const ATTENTION: &str = "attention";

impl PioKernels {
    pub fn none() -> Self {
        PioKernels::default()
    }

    /// Every measured family that applies to `precision` (MoEInt4 is int4 only). `attention` is
    /// asked for by name (`--pio-kernels all,attention`) until a GPU run shows it wins: its first
    /// kernel lost to ONNX Runtime's (README, "One-token attention in one kernel").
    pub fn all_for(precision: Precision) -> Self {
        PioKernels { linear: true, lm_head: true, swiglu: true, moe: precision == Precision::Int4, attention: false }
    }

    /// `all`, or a comma-separated list of `linear`, `lm_head`, `swiglu`, `moe`, `attention`.
    pub fn parse(list: &str, precision: Precision) -> std::result::Result<Self, SettingsError> {
        let mut k = PioKernels::none();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item {
                "all" => k = PioKernels::all_for(precision),
                LINEAR => k.linear = true,
                LM_HEAD => k.lm_head = true,
                SWIGLU => k.swiglu = true,
                MOE => k.moe = true,
                ATTENTION => k.attention = true,
                other => return Err(SettingsError::UnknownPioKernel { family: other.to_string() }),
            }
        }
        Ok(k)
    }

    pub fn any(&self) -> bool {
        self.linear || self.lm_head || self.swiglu || self.moe || self.attention
    }

    /// Refuses what the kernels cannot serve.
    pub fn validate(
        &self,
        precision: Precision,
        target: TargetEp,
        block_size: usize,
    ) -> std::result::Result<(), SettingsError> {
        if !self.any() {
            return Ok(());
        }
        if target == TargetEp::Tensorrt {
            return Err(SettingsError::PioKernelsOnTensorrt);
        }
        if target == TargetEp::Cuda && precision == Precision::Fp32 {
            return Err(SettingsError::PioKernelsNeedHalf);
        }
        if self.moe && precision != Precision::Int4 {
            return Err(SettingsError::PioMoeNeedsInt4);
        }
        if precision == Precision::Int4 && !pio_kernels::source::INT4_BLOCK_SIZES.contains(&block_size) {
            return Err(SettingsError::PioKernelsBlockSize { block_size });
        }
        Ok(())
    }
}

/// What the builder emitted, for the manifest: the families that produced at least one node.
#[derive(Default)]
pub struct PioUsage(BTreeSet<&'static str>);

impl PioUsage {
    pub fn used(&mut self, family: &'static str) {
        self.0.insert(family);
    }
    pub fn families(&self) -> Vec<String> {
        self.0.iter().map(|s| s.to_string()).collect()
    }
}

/// Why an (n, k) projection stays on ONNX Runtime's op (logged), or None.
pub fn fallback_reason(node: &str, n: usize, k: usize) -> Option<String> {
    layout::unsupported_reason(n, k).map(|why| format!("{node}: {why}; it keeps ONNX Runtime's op"))
}

/// A row reader over one or more (rows_i, K) weights stacked along the rows.
pub fn stacked_rows<'t>(parts: &'t [TensorRef<'t>]) -> impl FnMut(usize, &mut [f32]) -> Result<()> + 't {
    let mut starts = Vec::with_capacity(parts.len());
    let mut acc = 0;
    for t in parts {
        starts.push(acc);
        acc += t.shape[0];
    }
    move |row, buf| {
        let p = starts.partition_point(|&s| s <= row) - 1;
        quant::read_row_f32(&parts[p], row - starts[p], buf)
    }
}

/// A row reader for a fused gate/up weight in the SwiGLU epilogue's order (groups of 8 gate rows
/// then their 8 up rows).
pub fn swiglu_rows<'t>(
    gate: &'t TensorRef<'t>,
    up: &'t TensorRef<'t>,
) -> impl FnMut(usize, &mut [f32]) -> Result<()> + 't {
    move |row, buf| match swiglu_row_source(row) {
        (GateUp::Gate, i) => quant::read_row_f32(gate, i, buf),
        (GateUp::Up, i) => quant::read_row_f32(up, i, buf),
    }
}

/// Quantizes an (n, k) weight given row by row (rows `0..n` of `read_row`, MatMulNBits' scheme)
/// into the kernels' layout: `<name>.weight_pio4` uint8 `lead ++ [rows, Kp/2]` and `<name>.scales`
/// `lead ++ [rows, Kp/block]` in `dtype`, where the matrix is `lead` stacked matrices of `rows`.
pub fn int4_initializers(
    g: &mut Graph,
    name: &str,
    (lead, rows, k): (&[usize], usize, usize),
    block_size: usize,
    dtype: TensorDtype,
    read_row: impl FnMut(usize, &mut [f32]) -> Result<()>,
) -> Result<(String, String)> {
    let n = lead.iter().product::<usize>() * rows;
    let shape = Int4Shape { n, k, block_size };
    let mnb = Int4Layout::new(n, k, block_size).map_err(BuildError::quantize(name))?;
    let (mnb_row, our_row) = (shape.matmulnbits_row_bytes(), shape.row_bytes());
    if mnb.row_bytes() != mnb_row {
        return Err(BuildError::Internal(format!("{name}: MatMulNBits row length {} != {mnb_row}", mnb.row_bytes())));
    }
    let mut scales = Vec::new();
    let packed_dims: Vec<usize> = lead.iter().copied().chain([rows, our_row]).collect();
    let b = g.initializer_with(&format!("{name}.weight_pio4"), TensorDtype::Uint8, &packed_dims, |sink| {
        let mut row = vec![0u8; our_row];
        scales = quant::quantize_rows(name, &mnb, dtype, read_row, |bytes| {
            for mnb_bytes in bytes.chunks_exact(mnb_row) {
                layout::repack_matmulnbits_row(&shape, mnb_bytes, &mut row);
                sink.write(&row)?;
            }
            Ok(())
        })?;
        Ok(())
    })?;
    let (real, cols) = (shape.matmulnbits_blocks(), shape.scale_cols());
    let mut padded = Vec::with_capacity(n * cols);
    for row in scales.chunks_exact(real) {
        padded.extend_from_slice(row);
        padded.extend(std::iter::repeat_n(0.0, cols - real));
    }
    let scale_dims: Vec<usize> = lead.iter().copied().chain([rows, cols]).collect();
    let scale_bytes = quant::scales_bytes(&padded, dtype).map_err(BuildError::quantize(name))?;
    let s = g.initializer(&format!("{name}.scales"), dtype, &scale_dims, &scale_bytes)?;
    Ok((b, s))
}

/// A 16-bit (or f32) weight written (n, k) as given row by row, in `dtype`.
pub fn dense_initializer(
    g: &mut Graph,
    name: &str,
    (n, k): (usize, usize),
    dtype: TensorDtype,
    mut read_row: impl FnMut(usize, &mut [f32]) -> Result<()>,
) -> Result<String> {
    g.initializer_with(&format!("{name}.weight"), dtype, &[n, k], |sink| {
        let mut values = vec![0f32; k];
        let mut bytes = Vec::with_capacity(k * dtype.size_bytes());
        for r in 0..n {
            read_row(r, &mut values)?;
            bytes.clear();
            values.iter().for_each(|&v| push_f32(dtype, v, &mut bytes));
            sink.write(&bytes)?;
        }
        Ok(())
    })
}

/// `ai.pio.LinearInt4` over initializers from [`int4_initializers`].
pub fn linear_int4_node(
    g: &mut Graph,
    x: &str,
    name: &str,
    (b, s): (&str, &str),
    (n, k, bs): (usize, usize, usize),
    swiglu: bool,
) -> String {
    g.node(ops::LINEAR_INT4, name)
        .domain(ops::DOMAIN)
        .inputs(&[x, b, s])
        .attr("K", k)
        .attr("N", n)
        .attr("block_size", bs)
        .attr("activation", activation(swiglu))
        .out()
}

/// `ai.pio.Linear` over an (n, k) weight.
pub fn linear_node(g: &mut Graph, x: &str, name: &str, w: &str, (n, k): (usize, usize), swiglu: bool) -> String {
    g.node(ops::LINEAR, name)
        .domain(ops::DOMAIN)
        .inputs(&[x, w])
        .attr("K", k)
        .attr("N", n)
        .attr("activation", activation(swiglu))
        .out()
}

fn activation(swiglu: bool) -> i64 {
    if swiglu {
        ops::ACTIVATION_SWIGLU
    } else {
        ops::ACTIVATION_NONE
    }
}

/// `ai.pio.MoEInt4`: inputs as QMoE's 0, 1, 2, 3, 5, 6 and (optional) 14.
#[allow(clippy::too_many_arguments)]
pub fn moe_node(
    g: &mut Graph,
    name: &str,
    tokens: &str,
    probs: &str,
    (fc1, fc1_scales, fc2, fc2_scales): (&str, &str, &str, &str),
    router_weights: Option<&str>,
    (k, normalize, block_size): (usize, bool, usize),
) -> String {
    let mut inputs = vec![tokens, probs, fc1, fc1_scales, fc2, fc2_scales];
    if let Some(w) = router_weights {
        inputs.push(w);
    }
    g.node(ops::MOE_INT4, name)
        .domain(ops::DOMAIN)
        .inputs(&inputs)
        .attr("k", k)
        .attr("normalize_routing_weights", normalize as i64)
        .attr("block_size", block_size)
        .out()
}

/// A projection as an `ai.pio` node when `--pio-kernels linear` (or `lm_head`, for the node
/// named `lm_head`) applies to it (None: the caller writes ONNX Runtime's MatMul /
/// MatMulNBits). `tensors` are the (out_i, in) parts.
#[allow(clippy::too_many_arguments)]
pub(crate) fn projection(
    g: &mut Graph,
    settings: &crate::settings::ExportSettings,
    usage: &mut PioUsage,
    x: &str,
    node_name: &str,
    tensors: &[TensorRef],
    (in_dim, total_out): (usize, usize),
    quantize: bool,
) -> Result<Option<String>> {
    let (wanted, family) = if node_name == "lm_head" {
        (settings.pio_kernels.lm_head, LM_HEAD)
    } else {
        (settings.pio_kernels.linear, LINEAR)
    };
    if !wanted {
        return Ok(None);
    }
    if let Some(why) = fallback_reason(node_name, total_out, in_dim) {
        tracing::warn!("--pio-kernels {family}: {why}");
        return Ok(None);
    }
    let (dtype, bs) = (settings.compute_dtype(), settings.int4_block_size);
    let y = if quantize {
        let w = int4_initializers(g, node_name, (&[], total_out, in_dim), bs, dtype, stacked_rows(tensors))?;
        linear_int4_node(g, x, node_name, (&w.0, &w.1), (total_out, in_dim, bs), false)
    } else {
        let w = dense_initializer(g, node_name, (total_out, in_dim), dtype, stacked_rows(tensors))?;
        linear_node(g, x, node_name, &w, (total_out, in_dim), false)
    };
    usage.used(family);
    Ok(Some(y))
}

impl crate::decoder::DecoderBuilder<'_> {
    /// Whether layer attention is `ai.pio.GroupQueryAttention` (`--pio-kernels attention`, where
    /// the decode kernel takes the shape; otherwise com.microsoft's, with a warning).
    pub(crate) fn pio_attention(&mut self) -> bool {
        if !self.settings.pio_kernels.attention {
            return false;
        }
        let t = self.text;
        let shape = pio_kernels::gpu::DecodeAttentionShape {
            batch: 1,
            head_dim: t.head_dim,
            heads: t.num_attention_heads,
            kv_heads: t.num_key_value_heads,
            capacity: self.settings.context_length(),
            rot_half: 0,
            cos_rows: 0,
            window: 0,
            scale: 1.0,
            eps: 0.0,
        };
        // The CPU runs one-token steps on the f32 reference, which takes any head size.
        let why = if self.settings.kv_cache_int8 {
            Some("the int8 KV cache".to_string())
        } else if self.settings.target_ep() == TargetEp::Cpu {
            None
        } else {
            shape.unsupported_reason()
        };
        if let Some(why) = why {
            if !std::mem::replace(&mut self.pio_attention_warned, true) {
                tracing::warn!("--pio-kernels attention: {why}; GroupQueryAttention stays ONNX Runtime's");
            }
            return false;
        }
        self.pio_usage.used(ATTENTION);
        true
    }

    /// `silu(gate(h)) * up(h)` as one `ai.pio` node when `--pio-kernels swiglu` applies (None:
    /// the caller builds it from MatMul, Split, Sigmoid and Mul).
    pub(crate) fn pio_swiglu(&mut self, prefix: &str, h: &str, intermediate: usize) -> Result<Option<String>> {
        if !self.settings.pio_kernels.swiglu {
            return Ok(None);
        }
        let hidden = self.text.hidden_size;
        let name = format!("{prefix}.gate_up_proj");
        if let Some(why) = layout::swiglu_unsupported_reason(intermediate, hidden) {
            tracing::warn!("--pio-kernels swiglu: {name}: {why}; it keeps the separate nodes");
            return Ok(None);
        }
        let (gn, un) = (format!("{prefix}.gate_proj.weight"), format!("{prefix}.up_proj.weight"));
        let gate = self.ck.tensor(&gn, &[intermediate, hidden])?;
        let up = self.ck.tensor(&un, &[intermediate, hidden])?;
        let (dtype, bs, n) = (self.dtype, self.settings.int4_block_size, 2 * intermediate);
        let y = if self.settings.precision == Precision::Int4 {
            let w = int4_initializers(&mut self.g, &name, (&[], n, hidden), bs, dtype, swiglu_rows(&gate, &up))?;
            linear_int4_node(&mut self.g, h, &name, (&w.0, &w.1), (n, hidden, bs), true)
        } else {
            let w = dense_initializer(&mut self.g, &name, (n, hidden), dtype, swiglu_rows(&gate, &up))?;
            linear_node(&mut self.g, h, &name, &w, (n, hidden), true)
        };
        let read = gate.data.len() + up.data.len();
        self.ck.release(&gn);
        self.ck.release(&un);
        self.advance(read);
        self.pio_usage.used(SWIGLU);
        Ok(Some(y))
    }

    /// The tied 16-bit lm_head as `ai.pio.Linear` over the embedding table itself.
    pub(crate) fn pio_tied_lm_head(&mut self, h: &str, table: &str) -> Option<String> {
        let (hidden, vocab) = (self.text.hidden_size, self.text.vocab_size);
        if !self.settings.pio_kernels.lm_head || table.is_empty() {
            return None;
        }
        if let Some(why) = fallback_reason("lm_head", vocab, hidden) {
            tracing::warn!("--pio-kernels {LM_HEAD}: {why}");
            return None;
        }
        self.pio_usage.used(LM_HEAD);
        Some(linear_node(&mut self.g, h, "lm_head", table, (vocab, hidden), false))
    }

    /// The shape `ai.pio.MoEInt4` runs the int4 experts `name` at, where `--pio-kernels moe`
    /// applies (None: QMoE; a shape the kernel cannot take keeps QMoE, with a warning).
    pub(crate) fn pio_moe_shape(&self, name: &str) -> Result<Option<MoeShape>> {
        if !self.settings.pio_kernels.moe || self.settings.precision != Precision::Int4 {
            return Ok(None);
        }
        let m = crate::moe::moe_config(self.text)?;
        let shape = MoeShape {
            experts: m.num_experts,
            k: m.num_experts_per_tok,
            hidden: self.text.hidden_size,
            inter: m.moe_intermediate_size,
            block_size: self.settings.int4_block_size,
        };
        if let Err(why) = shape.validate() {
            tracing::warn!("--pio-kernels moe: {name}: {why}; it keeps QMoE");
            return Ok(None);
        }
        Ok(Some(shape))
    }

    /// The routed int4 experts of `{mlp}` as `ai.pio.MoEInt4` at `shape` (from
    /// [`Self::pio_moe_shape`]).
    pub(crate) fn pio_routed_experts(
        &mut self,
        tokens: &str,
        mlp: &str,
        name: &str,
        shape: MoeShape,
        (probs, router_weights, normalize): (&str, Option<&str>, bool),
    ) -> Result<String> {
        let MoeShape { experts: e, k, hidden, inter, block_size: bs } = shape;
        let names = |proj: &str| (0..e).map(|i| format!("{mlp}.experts.{i}.{proj}.weight")).collect::<Vec<_>>();
        let (gate_names, up_names, down_names) = (names("gate_proj"), names("up_proj"), names("down_proj"));
        let ck = self.ck;
        let fetch = |n: &[String], s: &[usize]| n.iter().map(|x| Ok(ck.tensor(x, s)?)).collect::<Result<Vec<_>>>();
        let gates = fetch(&gate_names, &[inter, hidden])?;
        let ups = fetch(&up_names, &[inter, hidden])?;
        let downs = fetch(&down_names, &[hidden, inter])?;
        let dtype = self.dtype;
        let rows1 = 2 * inter;
        let fc1 =
            int4_initializers(&mut self.g, &format!("{name}.fc1"), (&[e], rows1, hidden), bs, dtype, |r, buf| {
                let (x, i) = (r / rows1, r % rows1);
                match swiglu_row_source(i) {
                    (GateUp::Gate, j) => quant::read_row_f32(&gates[x], j, buf),
                    (GateUp::Up, j) => quant::read_row_f32(&ups[x], j, buf),
                }
            })?;
        let fc2 =
            int4_initializers(&mut self.g, &format!("{name}.fc2"), (&[e], hidden, inter), bs, dtype, |r, buf| {
                quant::read_row_f32(&downs[r / hidden], r % hidden, buf)
            })?;
        for n in gate_names.iter().chain(&up_names).chain(&down_names) {
            self.ck.release(n);
        }
        self.advance(gates.iter().chain(&ups).chain(&downs).map(|t| t.data.len()).sum());
        let y = moe_node(
            &mut self.g,
            name,
            tokens,
            probs,
            (&fc1.0, &fc1.1, &fc2.0, &fc2.1),
            router_weights,
            (k, normalize, bs),
        );
        self.pio_usage.used(MOE);
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_parse_and_validate() {
        let all = PioKernels::parse("all", Precision::Int4).unwrap();
        assert_eq!(all, PioKernels { linear: true, lm_head: true, swiglu: true, moe: true, attention: false });
        assert!(PioKernels::parse("all,attention", Precision::Bf16).unwrap().attention);
        assert!(!PioKernels::parse("all", Precision::Bf16).unwrap().moe, "MoEInt4 is int4 only");
        assert_eq!(
            PioKernels::parse("linear, moe, attention", Precision::Int4).unwrap(),
            PioKernels { linear: true, lm_head: false, swiglu: false, moe: true, attention: true }
        );
        let e = PioKernels::parse("linear,gemm", Precision::Int4).unwrap_err().to_string();
        assert!(e.contains("`gemm`"), "{e}");
        let moe = PioKernels { moe: true, ..PioKernels::none() };
        assert!(moe.validate(Precision::Bf16, TargetEp::Cuda, 32).is_err());
        assert!(all.validate(Precision::Int4, TargetEp::Tensorrt, 32).is_err());
        assert!(all.validate(Precision::Int4, TargetEp::Cuda, 16).is_err());
        assert!(all.validate(Precision::Fp32, TargetEp::Cuda, 32).is_err());
        assert!(all.validate(Precision::Int4, TargetEp::Cuda, 128).is_ok());
        assert!(PioKernels::all_for(Precision::Fp32).validate(Precision::Fp32, TargetEp::Cpu, 32).is_ok());
        assert!(PioKernels::none().validate(Precision::Fp32, TargetEp::Tensorrt, 16).is_ok());
    }
}
