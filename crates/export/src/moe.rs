//! Mixture-of-experts blocks on the decoder core, shared by the MoE architecture files
//! (`arch/qwen3_moe.rs`, `arch/glm4_moe.rs`): the router projection, the expert op
//! (com.microsoft `MoE`, or `QMoE` with int4 experts), the sigmoid + group-limited routing of
//! GLM / DeepSeek-V3 in standard ops, and the decoder skeleton with dense and sparse layers.
//!
//! What the ONNX Runtime 1.31.1 ops compute (measured, research/moe/FINDINGS.md):
//! * `router_probs` takes logits: the op applies softmax over all experts, takes the top k and,
//!   with `normalize_routing_weights`, renormalizes the k weights to sum 1. That is Qwen3-MoE's
//!   routing exactly.
//! * SwiGLU experts run on the CPU only with `swiglu_fusion = 1`: fc1 `(E, 2I, H)` holds the
//!   gate and up rows interleaved (row 2j = gate_j, row 2j+1 = up_j); fc2 is `(E, H, I)`. Both
//!   keep the Hugging Face `(out, in)` layout.
//! * `MoE` has no `router_weights` input, so a routing chosen outside the op travels as
//!   log-weights: `log(w)` at the chosen experts and -inf elsewhere; the op's softmax turns
//!   them back into `w / sum(w)` and its top-k picks exactly those experts. `QMoE` takes the
//!   mixing weights directly (input 14, `router_weights`).
//! * `QMoE` int4 weights are `(E, N, K/2)` uint8 with MatMulNBits' nibble order and default
//!   zero point 8, block-wise scales `(E, N, K/block)` in the activations' dtype.

use pio_models::config::{MoeConfig, TextConfig};
use pio_models::manifest::TensorDtype;
use pio_models::size::Precision;

use crate::checkpoint::{attention_tensors, lm_head_weight, mlp_tensors, TensorList, TensorRef};
use crate::convert::{push_f32, write_transposed};
use crate::decoder::DecoderBuilder;
use crate::error::{BuildError, BuildResult as Result};
use crate::onnx::graph::{onnx_type, Attr};
use crate::onnx::proto::TensorProto;
use crate::quant::{self, Int4Layout};

/// How the expert op picks experts for each token and weighs their outputs.
pub enum Routing {
    /// Softmax over `logits` (T, E) in the graph dtype, top-k, renormalized over the k when
    /// `normalize` (Qwen3-MoE).
    Softmax { logits: String, normalize: bool },
    /// The top k of `choice` (T, E; excluded experts at -inf), each weighted by its entry in
    /// `weights` (T, E), renormalized to sum 1 when `normalize`. Both float32 (GLM).
    Chosen { choice: String, weights: String, normalize: bool },
}

/// Where Hugging Face decoders keep layer `i`.
pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// The MoE settings of a config that the caller knows to be MoE.
pub fn moe_config(text: &TextConfig) -> Result<MoeConfig> {
    text.moe.clone().ok_or_else(|| BuildError::Internal("a MoE layer of a config without MoE settings".into()))
}

/// A Hugging Face MoE decoder: `model.embed_tokens`, `model.layers.N` (dense layers with the
/// SwiGLU MLP of `intermediate_size`, sparse ones per [`TextConfig::is_moe_layer`] with
/// `sparse_block(builder, mlp_prefix, normed_hidden)`), `model.norm`, and `lm_head` unless tied.
/// Layers at index >= num_hidden_layers (GLM's multi-token-prediction layer) are never read.
pub fn build_decoder(
    b: &mut DecoderBuilder,
    sparse_block: &mut dyn FnMut(&mut DecoderBuilder, &str, &str) -> Result<String>,
) -> Result<()> {
    let x = b.embed_in_first_stage("model.embed_tokens.weight")?;
    let intermediate = b.text.intermediate_size;
    let h = b.decoder_stack(x.as_deref(), &layer_prefix, "model.norm.weight", &mut |b, i, h| {
        let mlp = format!("{}.mlp", layer_prefix(i));
        if b.text.is_moe_layer(i) {
            sparse_block(b, &mlp, h)
        } else {
            b.swiglu_mlp(&mlp, h, intermediate)
        }
    })?;
    b.logits_in_last_stage(h, lm_head_weight(b.text), "model.embed_tokens.weight")
}

/// The tensors [`build_decoder`] reads; `sparse_tensors(text, mlp_prefix, out)` lists a sparse
/// layer's MLP tensors.
pub fn checkpoint_tensors(t: &TextConfig, sparse_tensors: &dyn Fn(&TextConfig, &str, &mut TensorList)) -> TensorList {
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![t.vocab_size, t.hidden_size])];
    for i in 0..t.num_hidden_layers {
        let p = layer_prefix(i);
        attention_tensors(t, &p, &mut out);
        let mlp = format!("{p}.mlp");
        if t.is_moe_layer(i) {
            sparse_tensors(t, &mlp, &mut out);
        } else {
            mlp_tensors(t.hidden_size, t.intermediate_size, &mlp, &mut out);
        }
    }
    out.push(("model.norm.weight".to_string(), vec![t.hidden_size]));
    if !t.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![t.vocab_size, t.hidden_size]));
    }
    out
}

/// The router `{mlp}.gate.weight` (E, H) and the routed experts
/// `{mlp}.experts.{e}.{gate,up,down}_proj.weight` (the Hub's per-expert layout).
pub fn routed_experts_tensors(t: &TextConfig, m: &MoeConfig, mlp: &str, out: &mut TensorList) {
    out.push((format!("{mlp}.gate.weight"), vec![m.num_experts, t.hidden_size]));
    for e in 0..m.num_experts {
        mlp_tensors(t.hidden_size, m.moe_intermediate_size, &format!("{mlp}.experts.{e}"), out);
    }
}

/// A one-element tensor attribute (ConstantOfShape's `value`).
fn f32_value(v: f32) -> Attr {
    Attr::Tensor(TensorProto {
        dims: vec![1],
        data_type: onnx_type(TensorDtype::Float32),
        raw_data: v.to_le_bytes().to_vec(),
        ..Default::default()
    })
}

impl DecoderBuilder<'_> {
    /// (B, S, H) -> (T, H): the expert ops and the routing work on token rows.
    pub fn flatten_tokens(&mut self, h: &str, prefix: &str) -> Result<String> {
        let shape = self.g.const_i64(&format!("{prefix}.tokens_shape"), &[-1, self.text.hidden_size as i64])?;
        Ok(self.g.node("Reshape", &format!("{prefix}.flatten_tokens")).inputs(&[h, &shape]).out())
    }

    /// (T, H) back to the shape of `like` (B, S, H).
    pub fn unflatten_tokens(&mut self, y: &str, like: &str, prefix: &str) -> String {
        let shape = self.g.node("Shape", &format!("{prefix}.hidden_shape")).inputs(&[like]).out();
        self.g.node("Reshape", &format!("{prefix}.unflatten_tokens")).inputs(&[y, &shape]).out()
    }

    /// `x` cast to `to` (nothing when it already is; `from` is its dtype).
    pub fn cast(&mut self, x: &str, from: TensorDtype, to: TensorDtype, name: &str) -> String {
        if from == to {
            return x.to_string();
        }
        self.g.node("Cast", name).inputs(&[x]).attr("to", onnx_type(to) as i64).out()
    }

    /// A scalar constant in the graph dtype.
    fn scalar(&mut self, name: &str, v: f32) -> Result<String> {
        let mut bytes = Vec::new();
        push_f32(self.dtype, v, &mut bytes);
        self.g.initializer(name, self.dtype, &[], &bytes)
    }

    /// `x * factor` (a per-graph constant), or `x` when the factor is 1.
    pub fn scale_by(&mut self, x: &str, factor: f64, name: &str) -> Result<String> {
        if factor == 1.0 {
            return Ok(x.to_string());
        }
        let c = self.scalar(&format!("{name}.factor"), factor as f32)?;
        Ok(self.g.node("Mul", name).inputs(&[x, &c]).out())
    }

    /// Router logits (T, E) = tokens @ `{mlp}.gate.weight`^T, computed in `dtype` (the tokens
    /// are cast to it). Never quantized: int4 noise here would flip expert choices.
    pub fn router_logits(&mut self, tokens: &str, mlp: &str, dtype: TensorDtype) -> Result<String> {
        let m = moe_config(self.text)?;
        let (e, hidden) = (m.num_experts, self.text.hidden_size);
        let name = format!("{mlp}.gate.weight");
        let t = self.ck.tensor(&name, &[e, hidden])?;
        let read = t.data.len();
        let w = self.g.initializer_with(&format!("{mlp}.router.weight"), dtype, &[hidden, e], |sink| {
            write_transposed(&t, dtype, sink)
        })?;
        self.ck.release(&name);
        self.advance(read);
        let x = self.cast(tokens, self.dtype, dtype, &format!("{mlp}.router.cast_in"));
        Ok(self.g.node("MatMul", &format!("{mlp}.router")).inputs(&[&x, &w]).out())
    }

    /// DeepSeek-V3 / GLM-4-MoE "noaux_tc" scores from float32 router logits (T, E), as
    /// transformers' `Glm4MoeTopkRouter`: `s = sigmoid(logits)`, the choice score
    /// `s + {mlp}.gate.e_score_correction_bias`; experts form `n_group` contiguous groups, each
    /// scored by the sum of its 2 best choice scores, and experts outside the `topk_group` best
    /// groups get -inf. Returns (choice, s): choose by the first, weigh by the second (unbiased).
    pub fn grouped_sigmoid_scores(&mut self, logits: &str, mlp: &str) -> Result<(String, String)> {
        let m = moe_config(self.text)?;
        let e = m.num_experts;
        let scores = self.g.node("Sigmoid", &format!("{mlp}.router.sigmoid")).inputs(&[logits]).out();
        let bias_name = format!("{mlp}.gate.e_score_correction_bias");
        let bias_t = self.ck.tensor(&bias_name, &[e])?;
        let bias_bytes: Vec<u8> = crate::convert::to_f32_vec(&bias_t).iter().flat_map(|v| v.to_le_bytes()).collect();
        self.advance(bias_t.data.len());
        let bias = self.g.initializer(&bias_name, TensorDtype::Float32, &[e], &bias_bytes)?;
        let biased = self.g.node("Add", &format!("{mlp}.router.add_correction_bias")).inputs(&[&scores, &bias]).out();
        if m.n_group <= 1 || m.topk_group >= m.n_group {
            return Ok((biased, scores)); // every group is kept: no masking
        }
        let (groups, per_group) = (m.n_group, e / m.n_group);
        if per_group < 2 {
            // pio_models::config refuses such a config.
            let problem = format!("{e} experts in {groups} groups: a group's score is the sum of its best 2 experts");
            return Err(BuildError::Internal(problem));
        }
        let p = format!("{mlp}.router.group");
        let grouped_shape = self.g.const_i64(&format!("{p}_shape"), &[-1, groups as i64, per_group as i64])?;
        let grouped = self.g.node("Reshape", &format!("{p}_split")).inputs(&[&biased, &grouped_shape]).out();
        let two = self.g.const_i64(&format!("{p}_top2_k"), &[2])?;
        let best_two = self.g.node("TopK", &format!("{p}_top2")).inputs(&[&grouped, &two]).attr("axis", -1i64).outs(2);
        let last_axis = self.g.const_i64(&format!("{p}_sum_axes"), &[-1])?;
        let group_scores = self
            .g
            .node("ReduceSum", &format!("{p}_scores"))
            .inputs(&[&best_two[0], &last_axis])
            .attr("keepdims", 0i64)
            .out();
        let kg = self.g.const_i64(&format!("{p}_topk_k"), &[m.topk_group as i64])?;
        let kept = self.g.node("TopK", &format!("{p}_topk")).inputs(&[&group_scores, &kg]).attr("axis", -1i64).outs(2);
        // Group mask (T, G): ones scattered at the kept groups into zeros (ConstantOfShape,
        // not x * 0, which is NaN at infinite scores).
        let gs_shape = self.g.node("Shape", &format!("{p}_scores_shape")).inputs(&[&group_scores]).out();
        let zeros = self
            .g
            .node("ConstantOfShape", &format!("{p}_zeros"))
            .inputs(&[&gs_shape])
            .attr("value", f32_value(0.0))
            .out();
        let kept_shape = self.g.node("Shape", &format!("{p}_kept_shape")).inputs(&[&kept[1]]).out();
        let ones = self
            .g
            .node("ConstantOfShape", &format!("{p}_ones"))
            .inputs(&[&kept_shape])
            .attr("value", f32_value(1.0))
            .out();
        let group_mask = self
            .g
            .node("ScatterElements", &format!("{p}_mask"))
            .inputs(&[&zeros, &kept[1], &ones])
            .attr("axis", 1i64)
            .out();
        // (T, G) -> (T, G, 1) -> (T, G, E/G) -> (T, E): each expert takes its group's flag.
        let axes = self.g.const_i64(&format!("{p}_mask_axes"), &[-1])?;
        let mask3 = self.g.node("Unsqueeze", &format!("{p}_mask_unsqueeze")).inputs(&[&group_mask, &axes]).out();
        let expand_shape = self.g.const_i64(&format!("{p}_mask_expand_shape"), &[1, 1, per_group as i64])?;
        let expanded = self.g.node("Expand", &format!("{p}_mask_expand")).inputs(&[&mask3, &expand_shape]).out();
        let flat_shape = self.g.const_i64(&format!("{p}_mask_flat_shape"), &[-1, e as i64])?;
        let expert_mask = self.g.node("Reshape", &format!("{p}_mask_experts")).inputs(&[&expanded, &flat_shape]).out();
        let keep = self.g.node("Cast", &format!("{p}_mask_bool")).inputs(&[&expert_mask]).attr("to", 9i64).out();
        let neg_inf = self.g.const_f32(&format!("{p}_neg_inf"), &[], &[f32::NEG_INFINITY])?;
        let choice = self.g.node("Where", &format!("{p}_masked")).inputs(&[&keep, &biased, &neg_inf]).out();
        Ok((choice, scores))
    }

    /// The routed experts of `{mlp}` on token rows (T, H): one `MoE` (float), `QMoE` (int4) or
    /// `ai.pio.MoEInt4` (int4 with `--pio-kernels moe`) node. Returns (T, H) in the graph dtype.
    pub fn routed_experts(&mut self, tokens: &str, mlp: &str, routing: Routing) -> Result<String> {
        let m = moe_config(self.text)?;
        let name = format!("{mlp}.experts");
        let op = match self.settings.precision {
            Precision::Int4 => self.pio_moe_shape(&name)?.map_or(ExpertOp::QMoe, ExpertOp::PioMoe),
            _ => ExpertOp::Moe,
        };
        let r = self.op_routing(routing, &name, m.num_experts_per_tok, op)?;
        let y = if let ExpertOp::PioMoe(shape) = op {
            self.pio_routed_experts(tokens, mlp, &name, shape, (&r.probs, r.router_weights.as_deref(), r.normalize))?
        } else {
            let quantized = op == ExpertOp::QMoe;
            let weights = self.expert_weights(mlp, &name, &m, quantized)?;
            let mut inputs = vec![tokens.to_string(), r.probs];
            inputs.extend(weights);
            let mut node = self
                .g
                .node(if quantized { "QMoE" } else { "MoE" }, &name)
                .ms()
                .inputs(&inputs)
                .attr("k", m.num_experts_per_tok)
                .attr("activation_type", "swiglu")
                .attr("activation_alpha", 1.0f32)
                .attr("activation_beta", 0.0f32)
                .attr("swiglu_fusion", 1i64)
                .attr("normalize_routing_weights", r.normalize as i64);
            if quantized {
                // weights_prepacked = 0: the int4 initializers are raw (E, N, K/2) MatMulNBits rows.
                // ONNX Runtime 1.31's CUDA QMoE otherwise (the default, -1) takes them as already
                // rearranged for its CUTLASS kernel and computes garbage without an error; with 0
                // it rearranges them itself when the session loads (prepacking, which needs them
                // as initializers, as they are). The CPU kernel reads raw rows either way.
                node = node
                    .attr("expert_weight_bits", quant::BITS)
                    .attr("block_size", self.settings.int4_block_size)
                    .attr("weights_prepacked", 0i64);
                if self.settings.int4_accuracy_level != 0 {
                    node = node.attr("accuracy_level", self.settings.int4_accuracy_level);
                }
            }
            node.out()
        };
        Ok(match r.rescale {
            Some(s) => self.g.node("Mul", &format!("{name}.times_weight_sum")).inputs(&[&y, &s]).out(),
            None => y,
        })
    }

    /// Turns a [`Routing`] into the expert op's inputs and attribute.
    ///
    /// QMoE's input 14 (`router_weights`, the mixing weights) is never used: ONNX Runtime 1.31's
    /// CUDA kernel ignores it (and mixes with the softmax of `router_probs`), and its CPU kernel
    /// renormalizes the k weights whenever it is absent (normalize_routing_weights = 0 is ignored
    /// there, measured). So QMoE, like MoE, gets routing the op's own softmax reproduces: the
    /// log-weight trick for chosen experts, and a rescale by the k weights' sum where transformers
    /// does not renormalize. Only our MoEInt4 takes the weights directly.
    fn op_routing(&mut self, routing: Routing, name: &str, k: usize, op: ExpertOp) -> Result<OpRouting> {
        let (dtype, f32) = (self.dtype, TensorDtype::Float32);
        Ok(match routing {
            Routing::Softmax { logits, normalize: false } if matches!(op, ExpertOp::PioMoe(_)) => {
                // The softmax to mix with.
                let p = self.routing_softmax(&logits, name);
                let w = self.cast(&p, f32, dtype, &format!("{name}.softmax_cast"));
                OpRouting { probs: logits, router_weights: Some(w), normalize: false, rescale: None }
            }
            Routing::Softmax { logits, normalize: false } if op == ExpertOp::QMoe => {
                // The op mixes with the k softmax weights renormalized; their sum goes back in.
                let p = self.routing_softmax(&logits, name);
                let kk = self.g.const_i64(&format!("{name}.topk_k"), &[k as i64])?;
                let top = self.g.node("TopK", &format!("{name}.topk")).inputs(&[&p, &kk]).attr("axis", -1i64).outs(2);
                let rescale = self.weight_sum(&top[0], name)?;
                OpRouting { probs: logits, router_weights: None, normalize: true, rescale: Some(rescale) }
            }
            Routing::Softmax { logits, normalize } => {
                OpRouting { probs: logits, router_weights: None, normalize, rescale: None }
            }
            Routing::Chosen { choice, weights, normalize } if matches!(op, ExpertOp::PioMoe(_)) => OpRouting {
                probs: self.cast(&choice, f32, dtype, &format!("{name}.choice_cast")),
                router_weights: Some(self.cast(&weights, f32, dtype, &format!("{name}.weights_cast"))),
                normalize,
                rescale: None,
            },
            Routing::Chosen { choice, weights, normalize } => {
                // The log-weight trick: log(w) at the k chosen experts, -inf elsewhere.
                let kk = self.g.const_i64(&format!("{name}.topk_k"), &[k as i64])?;
                let top =
                    self.g.node("TopK", &format!("{name}.topk")).inputs(&[&choice, &kk]).attr("axis", -1i64).outs(2);
                let chosen = &top[1];
                let w = self
                    .g
                    .node("GatherElements", &format!("{name}.chosen_weights"))
                    .inputs(&[&weights, chosen])
                    .attr("axis", 1i64)
                    .out();
                let log_w = self.g.node("Log", &format!("{name}.log_weights")).inputs(&[&w]).out();
                let shape = self.g.node("Shape", &format!("{name}.scores_shape")).inputs(&[&choice]).out();
                let fill = self
                    .g
                    .node("ConstantOfShape", &format!("{name}.neg_inf"))
                    .inputs(&[&shape])
                    .attr("value", f32_value(f32::NEG_INFINITY))
                    .out();
                let probs = self
                    .g
                    .node("ScatterElements", &format!("{name}.log_probs"))
                    .inputs(&[&fill, chosen, &log_w])
                    .attr("axis", 1i64)
                    .out();
                // The op always mixes with w / sum(w): without normalization, sum(w) goes back in.
                let rescale = if normalize { None } else { Some(self.weight_sum(&w, name)?) };
                let probs = self.cast(&probs, f32, dtype, &format!("{name}.log_probs_cast"));
                OpRouting { probs, router_weights: None, normalize: true, rescale }
            }
        })
    }

    /// The softmax over the experts of the router's `logits` (graph dtype), in float32 as
    /// transformers computes it.
    fn routing_softmax(&mut self, logits: &str, name: &str) -> String {
        let l = self.cast(logits, self.dtype, TensorDtype::Float32, &format!("{name}.logits_cast"));
        self.g.node("Softmax", &format!("{name}.softmax")).inputs(&[&l]).attr("axis", -1i64).out()
    }

    /// The sum of each token's k mixing weights `w` (T, k, float32) as (T, 1) in the graph dtype.
    fn weight_sum(&mut self, w: &str, name: &str) -> Result<String> {
        let axes = self.g.const_i64(&format!("{name}.weight_sum_axes"), &[1])?;
        let sum =
            self.g.node("ReduceSum", &format!("{name}.weight_sum")).inputs(&[w, &axes]).attr("keepdims", 1i64).out();
        Ok(self.cast(&sum, TensorDtype::Float32, self.dtype, &format!("{name}.weight_sum_cast")))
    }

    /// The expert weights as the op's inputs 2.. : `fc1, "", fc2` (MoE) or
    /// `fc1, fc1_scales, "", fc2, fc2_scales` (QMoE), from the checkpoint's per-expert
    /// `{mlp}.experts.{e}.{gate,up}_proj` (I, H) and `down_proj` (H, I).
    fn expert_weights(&mut self, mlp: &str, name: &str, m: &MoeConfig, quantized: bool) -> Result<Vec<String>> {
        let (e, hidden, inter) = (m.num_experts, self.text.hidden_size, m.moe_intermediate_size);
        if let (true, Some(seed)) = (quantized, self.settings.random_int4) {
            // Drawn as int4 codes, never read (`--direct-int4`).
            // Settings validation has checked that the block size divides both (SettingsError::Int4ExpertBlock).
            let (fc1, fc2) = (format!("{name}.fc1"), format!("{name}.fc2"));
            let s = self.settings;
            let (fc1_q, fc1_scales) =
                crate::random_int4::expert_initializers(&mut self.g, &fc1, (e, 2 * inter, hidden), s, seed)?;
            let (fc2_q, fc2_scales) =
                crate::random_int4::expert_initializers(&mut self.g, &fc2, (e, hidden, inter), s, seed)?;
            return Ok(vec![fc1_q, fc1_scales, String::new(), fc2_q, fc2_scales]);
        }
        let names = |proj: &str| (0..e).map(|i| format!("{mlp}.experts.{i}.{proj}.weight")).collect::<Vec<_>>();
        let (gate_names, up_names, down_names) = (names("gate_proj"), names("up_proj"), names("down_proj"));
        let ck = self.ck;
        let fetch = |names: &[String], shape: &[usize]| {
            names.iter().map(|n| Ok(ck.tensor(n, shape)?)).collect::<Result<Vec<_>>>()
        };
        let gates = fetch(&gate_names, &[inter, hidden])?;
        let ups = fetch(&up_names, &[inter, hidden])?;
        let downs = fetch(&down_names, &[hidden, inter])?;
        // fc1 row 2j = gate row j, row 2j+1 = up row j (swiglu_fusion = 1); fc2 = down as stored.
        let fc1_row = |e: usize, r: usize| (if r.is_multiple_of(2) { &gates[e] } else { &ups[e] }, r / 2);
        let fc2_row = |e: usize, r: usize| (&downs[e], r);
        let (fc1, fc2) = (format!("{name}.fc1"), format!("{name}.fc2"));
        let inputs = if quantized {
            let bs = self.settings.int4_block_size;
            if hidden % bs != 0 || inter % bs != 0 {
                // ExportSettings::validate refuses such a block size.
                let problem =
                    format!("int4 block {bs} does not divide hidden_size {hidden} and moe_intermediate_size {inter}");
                return Err(BuildError::Internal(problem));
            }
            let (fc1_q, fc1_scales) = self.int4_expert_weights(&fc1, e, 2 * inter, hidden, &fc1_row)?;
            let (fc2_q, fc2_scales) = self.int4_expert_weights(&fc2, e, hidden, inter, &fc2_row)?;
            vec![fc1_q, fc1_scales, String::new(), fc2_q, fc2_scales]
        } else {
            let fc1 = self.float_expert_weights(&fc1, e, 2 * inter, hidden, &fc1_row)?;
            let fc2 = self.float_expert_weights(&fc2, e, hidden, inter, &fc2_row)?;
            vec![fc1, String::new(), fc2]
        };
        for n in gate_names.iter().chain(&up_names).chain(&down_names) {
            self.ck.release(n);
        }
        self.advance(gates.iter().chain(&ups).chain(&downs).map(|t| t.data.len()).sum());
        Ok(inputs)
    }

    /// An (E, rows, cols) expert weight in the graph dtype; `row(e, r)` says which checkpoint
    /// tensor row is row r of expert e. Streams one row at a time.
    fn float_expert_weights<'t>(
        &mut self,
        name: &str,
        experts: usize,
        rows: usize,
        cols: usize,
        row: &dyn Fn(usize, usize) -> (&'t TensorRef<'t>, usize),
    ) -> Result<String> {
        let dtype = self.dtype;
        self.g.initializer_with(name, dtype, &[experts, rows, cols], |sink| {
            let mut values = vec![0f32; cols];
            let mut bytes = Vec::with_capacity(cols * dtype.size_bytes());
            for e in 0..experts {
                for r in 0..rows {
                    let (t, i) = row(e, r);
                    quant::read_row_f32(t, i, &mut values)?;
                    bytes.clear();
                    values.iter().for_each(|&v| push_f32(dtype, v, &mut bytes));
                    sink.write(&bytes)?;
                }
            }
            Ok(())
        })
    }

    /// The same as int4 for QMoE: `{name}.weight_q4` (E, rows, cols/2) uint8 and
    /// `{name}.scales` (E, rows, cols/block) in the graph dtype, quantized as MatMulNBits'
    /// weights are (all experts' rows stacked form one (E*rows, cols) matrix).
    fn int4_expert_weights<'t>(
        &mut self,
        name: &str,
        experts: usize,
        rows: usize,
        cols: usize,
        row: &dyn Fn(usize, usize) -> (&'t TensorRef<'t>, usize),
    ) -> Result<(String, String)> {
        let (dtype, bs) = (self.dtype, self.settings.int4_block_size);
        let layout = Int4Layout::new(experts * rows, cols, bs).map_err(BuildError::quantize(name))?;
        let mut scales = Vec::new();
        let q_shape = [experts, rows, cols / 2];
        let q = self.g.initializer_with(&format!("{name}.weight_q4"), TensorDtype::Uint8, &q_shape, |sink| {
            let read_row = |n: usize, buf: &mut [f32]| {
                let (t, i) = row(n / rows, n % rows);
                quant::read_row_f32(t, i, buf)
            };
            scales = quant::quantize_rows(name, &layout, dtype, read_row, |bytes| sink.write(bytes))?;
            Ok(())
        })?;
        let scales = quant::scales_bytes(&scales, dtype).map_err(BuildError::quantize(name))?;
        let s = self.g.initializer(&format!("{name}.scales"), dtype, &[experts, rows, cols / bs], &scales)?;
        Ok((q, s))
    }
}

/// Which operator computes the routed experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExpertOp {
    /// com.microsoft `MoE` (16-bit or float32 experts).
    Moe,
    /// com.microsoft `QMoE` (int4 experts).
    QMoe,
    /// `ai.pio.MoEInt4` (`--pio-kernels moe`) at this shape.
    PioMoe(pio_kernels::gpu::MoeShape),
}

/// What the expert op is handed for one [`Routing`].
struct OpRouting {
    /// Input 1, `router_probs` (T, E), graph dtype.
    probs: String,
    /// MoEInt4's mixing weights at the chosen experts (QMoE's input 14, which QMoE is never given).
    router_weights: Option<String>,
    normalize: bool,
    /// A per-token factor (T, 1) for the op's output.
    rescale: Option<String>,
}
