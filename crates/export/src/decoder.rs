//! The shared decoder-graph core: embeddings, GroupQueryAttention with rotary inside (or the
//! standard-op attention of [`crate::unfused_attention`]), RMSNorms (fused with the residual add
//! or not), SwiGLU MLPs, the lm_head and the KV-cache IO.
//! Architecture files (`arch/*.rs`) name their tensors and choose their feed-forward blocks;
//! everything they share is here.
//!
//! A builder writes one graph over the layers of its [`StageScope`]: the whole decoder, or one
//! stage of a decoder exported in stages (`crate::stages`), which starts from the previous
//! stage's hidden states instead of the embeddings and, unless it is the last, ends with its
//! hidden states instead of the logits.

use indicatif::ProgressBar;
use pio_models::config::TextConfig;
use pio_models::manifest::{stage_hidden_states, stage_hidden_states_normed, KvCacheSpec, TensorDtype};
use pio_models::size::Precision;

use crate::checkpoint::Checkpoint;
use crate::convert::to_f32_vec;
use crate::error::{BuildError, BuildResult as Result};
use crate::onnx::graph::{Dim, Graph};
use crate::rotary;
use crate::settings::{ExportSettings, GREEDY_TOKENS, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE};
use crate::stages::StageScope;
use crate::unfused_inputs::UnfusedInputs;
use crate::weights::WeightSource;

/// Standard deviations covered by an int8 KV scale: values beyond clip (about 6e-5 of a
/// Gaussian channel).
const KV_SCALE_SIGMAS: f32 = 4.0;

/// What every layer's attention reads, built once per graph.
#[derive(Clone)]
enum AttentionInputs {
    /// GroupQueryAttention's mask lengths and the cos/sin caches it rotates q and k from, with
    /// the positions that index them (None: the cache slots, GroupQueryAttention's default).
    Fused {
        seqlens_k: String,
        total_seq_len: String,
        cos_cache: String,
        sin_cache: String,
        position_ids: Option<String>,
    },
    Unfused(UnfusedInputs),
}

/// Builds one decoder graph. Holds the graph-wide values every layer reads.
pub struct DecoderBuilder<'a> {
    pub g: Graph,
    pub ck: &'a Checkpoint,
    pub text: &'a TextConfig,
    pub settings: &'a ExportSettings,
    pub dtype: TensorDtype,
    progress: &'a ProgressBar,
    attention_inputs: AttentionInputs,
    /// The int4 embedding table's (packed, scales) initializers, for a tied int4 lm_head.
    int4_embedding: Option<(String, String)>,
    /// The `--pio-kernels` families that produced nodes (for the manifest).
    pub pio_usage: crate::pio_ops::PioUsage,
    /// `--pio-kernels attention` was refused for this model (warned once).
    pub(crate) pio_attention_warned: bool,
    /// The layers this graph holds, and whether it starts from the embeddings and ends with
    /// the logits.
    pub scope: StageScope,
    /// The embedding table's initializer, when this graph holds it (a tied lm_head reads it).
    embed_table: Option<String>,
}

impl<'a> DecoderBuilder<'a> {
    /// Declares the graph inputs and the values derived from them once for all layers of
    /// `scope`. `position_ids` is (batch, sequence), or (3, batch, sequence) for a config with an
    /// `mrope_section` (Qwen3-VL's t, h, w positions). The first stage takes `input_ids`, later
    /// ones the previous stage's hidden states.
    pub fn new(
        mut g: Graph,
        ck: &'a Checkpoint,
        text: &'a TextConfig,
        settings: &'a ExportSettings,
        progress: &'a ProgressBar,
        scope: StageScope,
    ) -> Result<Self> {
        let dtype = settings.compute_dtype();
        let multimodal = text.rope.mrope_section.is_some();
        let hidden_shape = [Dim::Sym("batch_size"), Dim::Sym("sequence_length"), Dim::Fixed(text.hidden_size as i64)];
        // A (batch, sequence, ...) input whose shape gives the step's length.
        let ids = if scope.is_first() {
            g.input("input_ids", TensorDtype::Int64, &[Dim::Sym("batch_size"), Dim::Sym("sequence_length")])
        } else {
            let stream = g.input(&stage_hidden_states(scope.layers.start), dtype, &hidden_shape);
            if settings.fused_norms {
                g.input(&stage_hidden_states_normed(scope.layers.start), dtype, &hidden_shape);
            }
            stream
        };
        let mask =
            g.input("attention_mask", TensorDtype::Int64, &[Dim::Sym("batch_size"), Dim::Sym("total_sequence_length")]);
        let mut position_shape = vec![Dim::Sym("batch_size"), Dim::Sym("sequence_length")];
        if multimodal {
            position_shape.insert(0, Dim::Fixed(3));
        }
        let positions = g.input("position_ids", TensorDtype::Int64, &position_shape);
        let kv_shape_past = [
            Dim::Sym("batch_size"),
            Dim::Fixed(text.num_key_value_heads as i64),
            Dim::Sym("past_sequence_length"),
            Dim::Fixed(text.head_dim as i64),
        ];
        for layer in scope.layers.clone() {
            g.input(&KvCacheSpec::name(PAST_KEY, layer), settings.kv_dtype(), &kv_shape_past);
            g.input(&KvCacheSpec::name(PAST_VALUE, layer), settings.kv_dtype(), &kv_shape_past);
        }

        let shape = g.node("Shape", "mask_shape").inputs(&[&mask]).out();
        let idx1 = g.scalar_i64("const_scalar_1", 1)?;
        let total = g.node("Gather", "mask_total_length").inputs(&[&shape, &idx1]).attr("axis", 0i64).out();
        // Rotary tables indexed by position, (context_length, rotary_dim / 2). Text models read
        // them at `position_ids`; a multimodal decoder reads each frequency at the position of
        // its axis (interleaved MRoPE).
        let caches = rotary::static_caches(&mut g, text, settings.context_length, dtype)?;
        let mrope_positions = if multimodal { Some(rotary::mrope_positions(&mut g, text)?) } else { None };
        // Each token's rotary rows, (batch, sequence, rotary_dim / 2).
        let token_rows = |g: &mut Graph| -> Result<(String, String)> {
            match &mrope_positions {
                Some(p) => rotary::mrope_token_rows(g, text, p, &caches),
                None => Ok((
                    g.node("Gather", "rotary_cos").inputs(&[&caches.0, &positions]).out(),
                    g.node("Gather", "rotary_sin").inputs(&[&caches.1, &positions]).out(),
                )),
            }
        };
        let attention_inputs = if settings.fused_attention {
            // GroupQueryAttention's view of the mask: per-row valid length - 1, and the total length.
            let one = g.const_i64("const_1", &[1])?;
            let axis1 = g.const_i64("const_axis_1", &[1])?;
            let sum = g.node("ReduceSum", "mask_lengths").inputs(&[&mask, &axis1]).attr("keepdims", 0i64).out();
            let last_slot = g.node("Sub", "mask_lengths_minus_1").inputs(&[&sum, &one]).out();
            let seqlens_k = g.node("Cast", "seqlens_k").inputs(&[&last_slot]).attr("to", 6i64).out();
            let total_seq_len = g.node("Cast", "total_sequence_length").inputs(&[&total]).attr("to", 6i64).out();
            let (cos_cache, sin_cache, position_ids) = match &mrope_positions {
                // position_ids (input 9): ONNX Runtime honours it element-wise in decode and as an
                // offset (its first element) in a first prefill, where positions run from there.
                None => (caches.0.clone(), caches.1.clone(), Some(positions.clone())),
                Some(p) => {
                    let ids_shape = g.node("Shape", "input_ids_shape").inputs(&[&ids]).out();
                    let step = g.node("Gather", "step_length").inputs(&[&ids_shape, &idx1]).attr("axis", 0i64).out();
                    let (c, s) = rotary::slot_tables(&mut g, text, p, &caches, &sum, &step, &total)?;
                    (c, s, None)
                }
            };
            AttentionInputs::Fused { seqlens_k, total_seq_len, cos_cache, sin_cache, position_ids }
        } else {
            let (token_cos, token_sin) = token_rows(&mut g)?;
            AttentionInputs::Unfused(UnfusedInputs::new(
                &mut g, text, settings, &ids, &mask, &total, &token_cos, &token_sin,
            )?)
        };
        Ok(DecoderBuilder {
            g,
            ck,
            text,
            settings,
            dtype,
            progress,
            attention_inputs,
            int4_embedding: None,
            pio_usage: Default::default(),
            pio_attention_warned: false,
            scope,
            embed_table: None,
        })
    }

    /// Where this graph's weights come from.
    pub fn weights(&self) -> WeightSource<'a> {
        WeightSource { ck: self.ck, dtype: self.dtype, settings: self.settings, progress: self.progress }
    }

    /// Counts checkpoint bytes consumed, for the progress bar.
    pub fn advance(&self, bytes: usize) {
        self.progress.inc(bytes as u64);
    }

    /// A weight stored as in the checkpoint (norms, embeddings, biases), converted to the graph dtype.
    pub fn weight(&mut self, hf_name: &str, shape: &[usize]) -> Result<String> {
        self.weights().weight(&mut self.g, hf_name, shape)
    }

    /// y = x @ W^T (+ b): the weight is transposed at export so the graph runs a plain MatMul
    /// (or MatMulNBits on the (out, in) weight itself with int4).
    pub fn linear(&mut self, x: &str, hf_prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<String> {
        self.linear_parts(x, hf_prefix, &[hf_prefix.to_string()], in_dim, &[out_dim], bias)
    }

    /// One MatMul over several projections of the same input, their output features
    /// concatenated in order (q|k|v, gate|up); biases concatenated likewise. int4 graphs
    /// quantize decoder projections; the lm_head only with `int4_lm_head`.
    pub fn linear_parts(
        &mut self,
        x: &str,
        node_name: &str,
        hf_prefixes: &[String],
        in_dim: usize,
        out_dims: &[usize],
        bias: bool,
    ) -> Result<String> {
        let quantize = self.settings.precision == Precision::Int4;
        self.weights().projection(
            &mut self.g,
            Some(&mut self.pio_usage),
            x,
            node_name,
            hf_prefixes,
            in_dim,
            out_dims,
            bias,
            quantize,
        )
    }

    /// RMSNorm over the last axis.
    pub fn rms_norm(&mut self, x: &str, hf_weight: &str, width: usize) -> Result<String> {
        let w = self.weight(hf_weight, &[width])?;
        Ok(self
            .g
            .node("SimplifiedLayerNormalization", hf_weight.trim_end_matches(".weight"))
            .inputs(&[x, &w])
            .attr("axis", -1i64)
            .attr("epsilon", self.text.rms_norm_eps as f32)
            .attr("stash_type", 1i64)
            .out())
    }

    /// residual' = x + residual; returns (RMSNorm(residual'), residual'), fused into one
    /// SkipSimplifiedLayerNormalization when `fused_norms` is on.
    pub fn add_and_norm(&mut self, x: &str, residual: &str, hf_weight: &str) -> Result<(String, String)> {
        let name = hf_weight.trim_end_matches(".weight");
        if self.settings.fused_norms {
            let w = self.weight(hf_weight, &[self.text.hidden_size])?;
            let outs = self
                .g
                .node("SkipSimplifiedLayerNormalization", name)
                .ms()
                .inputs(&[x, residual, &w])
                .attr("epsilon", self.text.rms_norm_eps as f32)
                .named_outs(&[format!("{name}/out0"), String::new(), String::new(), format!("{name}/out3")]);
            return Ok((outs[0].clone(), outs[3].clone()));
        }
        let sum = self.g.node("Add", &format!("{name}.residual_add")).inputs(&[x, residual]).out();
        let normed = self.rms_norm(&sum, hf_weight, self.text.hidden_size)?;
        Ok((normed, sum))
    }

    /// Token embeddings: Gather from the (vocab, hidden) table.
    pub fn embed(&mut self, hf_name: &str) -> Result<(String, String)> {
        let (vocab, hidden) = (self.text.vocab_size, self.text.hidden_size);
        if !self.settings.int4_embeddings {
            let table = self.weight(hf_name, &[vocab, hidden])?;
            let x = self.g.node("Gather", "embed_tokens").inputs(&[table.as_str(), "input_ids"]).out();
            self.embed_table = Some(table.clone());
            return Ok((x, table));
        }
        // int4 rows, quantized as MatMulNBits stores them: GatherBlockQuantized reads the same
        // bytes viewed as (vocab, hidden/2) with the default zero point 8.
        let layout = crate::quant::Int4Layout::new(vocab, hidden, self.settings.int4_block_size)
            .map_err(BuildError::quantize("embed_tokens"))?;
        let (packed, scales) = match self.settings.random_int4 {
            Some(seed) => {
                let magnitude = crate::random_int4::init_magnitude(1) * 0.02;
                crate::random_int4::int4_initializers(
                    &mut self.g,
                    "embed_tokens",
                    &layout,
                    self.dtype,
                    magnitude,
                    seed,
                )?
            }
            None => {
                let t = self.ck.tensor(hf_name, &[vocab, hidden])?;
                let written =
                    crate::quant::int4_initializers(&mut self.g, "embed_tokens", &layout, self.dtype, |n, row| {
                        crate::quant::read_row_f32(&t, n, row)
                    })?;
                self.advance(t.data.len());
                self.ck.release(hf_name);
                written
            }
        };
        let view = self.g.const_i64("embed_tokens.packed_shape", &[vocab as i64, (hidden / 2) as i64])?;
        let rows = self.g.node("Reshape", "embed_tokens.packed_rows").inputs(&[&packed, &view]).out();
        let x = self
            .g
            .node("GatherBlockQuantized", "embed_tokens")
            .ms()
            .inputs(&[rows.as_str(), "input_ids", scales.as_str()])
            .attr("bits", 4i64)
            .attr("block_size", self.settings.int4_block_size)
            .attr("gather_axis", 0i64)
            .attr("quantize_axis", 1i64)
            .out();
        self.int4_embedding = Some((packed, scales));
        self.embed_table = Some(String::new());
        Ok((x, String::new()))
    }

    /// The token embeddings (`hf_name`) in the graph that holds them, the first stage; None in
    /// later stages, which start from the previous stage's hidden states.
    pub fn embed_in_first_stage(&mut self, hf_name: &str) -> Result<Option<String>> {
        if !self.scope.is_first() {
            return Ok(None);
        }
        Ok(Some(self.embed(hf_name)?.0))
    }

    /// The last stage's logits from its normed hidden states `h` (None in other stages, which
    /// end with their hidden states: nothing to do). `lm_head` is the lm_head's weight, None
    /// when it is tied to `embed_name`: then it reads this graph's embedding table, or in a last
    /// stage of its own a copy of it (or, in int4, the table quantized again).
    pub fn logits_in_last_stage(&mut self, h: Option<String>, lm_head: Option<&str>, embed_name: &str) -> Result<()> {
        let Some(h) = h else { return Ok(()) };
        let table = match (&self.embed_table, lm_head) {
            (Some(table), _) => table.clone(),
            (None, Some(_)) => String::new(),
            // Quantized from the checkpoint's table by name.
            (None, None) if self.settings.int4_lm_head => embed_name.to_string(),
            (None, None) => {
                let (vocab, hidden) = (self.text.vocab_size, self.text.hidden_size);
                self.weight(embed_name, &[vocab, hidden])?
            }
        };
        self.logits(&h, lm_head, &table)
    }

    /// Declares a value an earlier stage outputs as an input of this graph, (batch, sequence,
    /// hidden) in the graph dtype.
    pub fn carried_input(&mut self, name: &str) -> String {
        let shape = [Dim::Sym("batch_size"), Dim::Sym("sequence_length"), Dim::Fixed(self.text.hidden_size as i64)];
        self.g.input(name, self.dtype, &shape)
    }

    /// Makes `value`, (batch, sequence, hidden) in the graph dtype, an output `name` of this
    /// graph for a later stage.
    pub fn carried_output(&mut self, value: &str, name: &str) {
        let shape = [Dim::Sym("batch_size"), Dim::Sym("sequence_length"), Dim::Fixed(self.text.hidden_size as i64)];
        self.g.node("Identity", &format!("{name}.stage_output")).inputs(&[value]).named_outs(&[name]);
        self.g.output(name, self.dtype, &shape);
    }

    /// (B, S, heads * D) -> (B, S, heads, D).
    pub fn split_heads(&mut self, x: &str, heads: usize, name: &str) -> Result<String> {
        let shape =
            self.g.const_i64(&format!("{name}.split_shape"), &[0, 0, heads as i64, self.text.head_dim as i64])?;
        Ok(self.g.node("Reshape", &format!("{name}.split_heads")).inputs(&[x, &shape]).out())
    }

    /// Per-head RMSNorm over head_dim: (B, S, heads*D) -> (B, S, heads, D) -> norm -> back.
    fn head_norm(&mut self, x: &str, hf_weight: &str, heads: usize) -> Result<String> {
        let d = self.text.head_dim;
        let name = hf_weight.trim_end_matches(".weight");
        let x4 = self.split_heads(x, heads, name)?;
        let y4 = self.rms_norm(&x4, hf_weight, d)?;
        let merge = self.g.const_i64(&format!("{name}.merge_shape"), &[0, 0, (heads * d) as i64])?;
        Ok(self.g.node("Reshape", &format!("{name}.merge_heads")).inputs(&[&y4, &merge]).out())
    }

    /// q, k and v of `h` (with bias when the config says so). With `fused_qkv` they come from
    /// one MatMul: left packed in q (k and v empty) when `packed` is allowed, else split.
    pub fn qkv_projections(&mut self, prefix: &str, h: &str, packed: bool) -> Result<(String, String, String)> {
        let t = self.text;
        let (hidden, qw, kvw) = (t.hidden_size, t.q_width(), t.kv_width());
        if !self.settings.fused_qkv {
            return Ok((
                self.linear(h, &format!("{prefix}.q_proj"), hidden, qw, t.attention_bias)?,
                self.linear(h, &format!("{prefix}.k_proj"), hidden, kvw, t.attention_bias)?,
                self.linear(h, &format!("{prefix}.v_proj"), hidden, kvw, t.attention_bias)?,
            ));
        }
        let names = ["q_proj", "k_proj", "v_proj"].map(|n| format!("{prefix}.{n}"));
        let qkv =
            self.linear_parts(h, &format!("{prefix}.qkv_proj"), &names, hidden, &[qw, kvw, kvw], t.attention_bias)?;
        if packed {
            return Ok((qkv, String::new(), String::new()));
        }
        let sizes = self.g.const_i64(&format!("{prefix}.qkv_split_sizes"), &[qw as i64, kvw as i64, kvw as i64])?;
        let parts =
            self.g.node("Split", &format!("{prefix}.qkv_split")).inputs(&[&qkv, &sizes]).attr("axis", -1i64).outs(3);
        Ok((parts[0].clone(), parts[1].clone(), parts[2].clone()))
    }

    /// Layer `layer`'s cache tensors: past key, past value, present key, present value. The
    /// present ones are declared as graph outputs, (batch, kv_heads, total, head_dim).
    pub fn cache_io(&mut self, layer: usize) -> [String; 4] {
        let t = self.text;
        let kv_shape = [
            Dim::Sym("batch_size"),
            Dim::Fixed(t.num_key_value_heads as i64),
            Dim::Sym("total_sequence_length"),
            Dim::Fixed(t.head_dim as i64),
        ];
        let names = [PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE].map(|n| KvCacheSpec::name(n, layer));
        self.g.output(&names[2], self.settings.kv_dtype(), &kv_shape);
        self.g.output(&names[3], self.settings.kv_dtype(), &kv_shape);
        names
    }

    /// Self-attention of decoder layer `layer`, with the KV cache IO, then o_proj.
    pub fn attention(&mut self, layer: usize, prefix: &str, h: &str) -> Result<String> {
        let context = match self.attention_inputs.clone() {
            AttentionInputs::Fused { seqlens_k, total_seq_len, cos_cache, sin_cache, position_ids } => {
                self.fused_attention(layer, prefix, h, [seqlens_k, total_seq_len, cos_cache, sin_cache], position_ids)?
            }
            AttentionInputs::Unfused(inputs) => self.unfused_attention(&inputs, layer, prefix, h)?,
        };
        let (hidden, qw) = (self.text.hidden_size, self.text.q_width());
        self.linear(&context, &format!("{prefix}.o_proj"), qw, hidden, false)
    }

    /// q/k/v projections, per-head q/k RMSNorm (as nodes, or as GroupQueryAttention inputs with
    /// `fused_qk_norm`), GroupQueryAttention with rotary inside (partial rotary through the
    /// cache width). `graph_inputs`: seqlens_k, total_sequence_length, cos_cache, sin_cache
    /// (GroupQueryAttention inputs 5..8); `position_ids` its input 9 (None: the cache slots).
    /// Returns the attention output, (B, S, heads * D).
    fn fused_attention(
        &mut self,
        layer: usize,
        prefix: &str,
        h: &str,
        graph_inputs: [String; 4],
        position_ids: Option<String>,
    ) -> Result<String> {
        let t = self.text;
        let separate_norms = t.qk_norm && !self.settings.fused_qk_norm;
        // GroupQueryAttention inputs 0..2; key and value stay empty when the query input
        // carries all three packed.
        let (mut q, mut k, v) = self.qkv_projections(prefix, h, !separate_norms)?;
        let mut norm_inputs: Option<(String, String)> = None;
        if t.qk_norm {
            let (qn, kn) = (format!("{prefix}.q_norm.weight"), format!("{prefix}.k_norm.weight"));
            if self.settings.fused_qk_norm {
                norm_inputs = Some((self.weight(&qn, &[t.head_dim])?, self.weight(&kn, &[t.head_dim])?));
            } else {
                q = self.head_norm(&q, &qn, t.num_attention_heads)?;
                k = self.head_norm(&k, &kn, t.num_key_value_heads)?;
            }
        }
        let [past_k, past_v, present_k, present_v] = self.cache_io(layer);
        let mut inputs: Vec<String> = vec![q, k, v, past_k, past_v];
        inputs.extend(graph_inputs);
        inputs.push(position_ids.unwrap_or_default());
        // Inputs 10..11 (attention_bias, head_sink) unused; 12..13 the int8 cache's scales.
        let kv_scales = if self.settings.kv_cache_int8 { Some(self.kv_scales(prefix)?) } else { None };
        if kv_scales.is_some() || norm_inputs.is_some() {
            inputs.extend([String::new(), String::new()]);
            let (ks, vs) = kv_scales.clone().unwrap_or_default();
            inputs.extend([ks, vs]);
        }
        if let Some((qn, kn)) = &norm_inputs {
            inputs.push(qn.clone());
            inputs.push(kn.clone());
        }
        // Optional inputs left out at the end are not listed.
        while inputs.last().is_some_and(String::is_empty) {
            inputs.pop();
        }
        let name = format!("{prefix}.gqa");
        let node = if self.pio_attention() {
            self.g.node("GroupQueryAttention", &name).domain(pio_kernels::ops::DOMAIN)
        } else {
            self.g.node("GroupQueryAttention", &name).ms()
        };
        let mut node = node
            .inputs(&inputs)
            .attr("num_heads", t.num_attention_heads)
            .attr("kv_num_heads", t.num_key_value_heads)
            .attr("scale", 1.0 / (t.head_dim as f32).sqrt())
            .attr("do_rotary", 1i64)
            .attr("rotary_interleaved", 0i64);
        if norm_inputs.is_some() {
            node = node.attr("qk_norm_epsilon", t.rms_norm_eps as f32);
        }
        if kv_scales.is_some() {
            node = node
                .attr("k_quant_type", "PER_CHANNEL")
                .attr("v_quant_type", "PER_CHANNEL")
                .attr("kv_cache_bit_width", 8i64);
        }
        // transformers' window W keeps the keys t with pos - W < t <= pos: W keys, the query's
        // own included. ONNX Runtime 1.31's local_window_size counts the same W keys (its CPU
        // kernel softmaxes the last local_window_size scores); older kernels kept
        // local_window_size + 1, for which W - 1 would be right. The qwen3-sliding fixture
        // tells the two apart (W - 1 fails at prompt position W - 1).
        if let Some(w) = self.settings.layer_window(t, layer) {
            node = node.attr("local_window_size", w as i64);
        }
        let outs = node.named_outs(&[format!("{prefix}.gqa/out0"), present_k, present_v]);
        Ok(outs[0].clone())
    }

    /// Per-channel int8 scales of a layer's K and V cache, (kv_heads, 1, head_dim) each, from the
    /// weights alone (no calibration data): the attention input is RMS-normalized, so each of its
    /// elements is about N(0, gamma_c^2), and a projected channel j has standard deviation
    /// sqrt(sum_c (W[j, c] gamma_c)^2) (+ |bias_j|). With a per-head q/k norm, K channel d is
    /// about N(0, k_norm_d^2) instead. Rotary mixes the channel pairs (d, d + rotary/2), so both
    /// take the larger of the two. The scale covers KV_SCALE_SIGMAS deviations.
    fn kv_scales(&mut self, prefix: &str) -> Result<(String, String)> {
        let t = self.text;
        let (h, kvw, d) = (t.hidden_size, t.kv_width(), t.head_dim);
        let layer = prefix.trim_end_matches(".self_attn");
        let gamma = to_f32_vec(&self.ck.tensor(&format!("{layer}.input_layernorm.weight"), &[h])?);
        let projected_std = |b: &Self, name: &str| -> Result<Vec<f32>> {
            let w = to_f32_vec(&b.ck.tensor(&format!("{prefix}.{name}.weight"), &[kvw, h])?);
            let bias = if t.attention_bias {
                to_f32_vec(&b.ck.tensor(&format!("{prefix}.{name}.bias"), &[kvw])?)
            } else {
                vec![0.0; kvw]
            };
            Ok((0..kvw)
                .map(|j| {
                    let var: f32 = (0..h).map(|c| (w[j * h + c] * gamma[c]).powi(2)).sum();
                    var.sqrt() + bias[j].abs()
                })
                .collect())
        };
        let mut k_std = if t.qk_norm {
            let k_norm = to_f32_vec(&self.ck.tensor(&format!("{prefix}.k_norm.weight"), &[d])?);
            (0..kvw).map(|j| k_norm[j % d].abs()).collect()
        } else {
            projected_std(self, "k_proj")?
        };
        let half = t.rotary_dim() / 2;
        for head in 0..t.num_key_value_heads {
            for i in 0..half {
                let (a, b) = (head * d + i, head * d + i + half);
                let m = k_std[a].max(k_std[b]);
                k_std[a] = m;
                k_std[b] = m;
            }
        }
        let v_std = projected_std(self, "v_proj")?;
        let to_scales =
            |std: Vec<f32>| -> Vec<f32> { std.into_iter().map(|s| (KV_SCALE_SIGMAS * s / 127.0).max(1e-8)).collect() };
        let shape = [t.num_key_value_heads, 1, d];
        let ks = self.g.const_f32(&format!("{prefix}.k_cache_scale"), &shape, &to_scales(k_std))?;
        let vs = self.g.const_f32(&format!("{prefix}.v_cache_scale"), &shape, &to_scales(v_std))?;
        Ok((ks, vs))
    }

    /// SwiGLU MLP: down(silu(gate(x)) * up(x)); gate and up as one MatMul when `fused_gate_up`.
    pub fn swiglu_mlp(&mut self, prefix: &str, h: &str, intermediate: usize) -> Result<String> {
        let hidden = self.text.hidden_size;
        if let Some(act) = self.pio_swiglu(prefix, h, intermediate)? {
            return self.linear(&act, &format!("{prefix}.down_proj"), intermediate, hidden, false);
        }
        let (gate, up) = if self.settings.fused_gate_up {
            let names = [format!("{prefix}.gate_proj"), format!("{prefix}.up_proj")];
            let both = self.linear_parts(
                h,
                &format!("{prefix}.gate_up_proj"),
                &names,
                hidden,
                &[intermediate, intermediate],
                false,
            )?;
            let parts = self
                .g
                .node("Split", &format!("{prefix}.gate_up_split"))
                .inputs(&[&both])
                .attr("axis", -1i64)
                .attr("num_outputs", 2i64)
                .outs(2);
            (parts[0].clone(), parts[1].clone())
        } else {
            (
                self.linear(h, &format!("{prefix}.gate_proj"), hidden, intermediate, false)?,
                self.linear(h, &format!("{prefix}.up_proj"), hidden, intermediate, false)?,
            )
        };
        let sig = self.g.node("Sigmoid", &format!("{prefix}.act_sigmoid")).inputs(&[&gate]).out();
        let silu = self.g.node("Mul", &format!("{prefix}.act_silu")).inputs(&[&gate, &sig]).out();
        let prod = self.g.node("Mul", &format!("{prefix}.act_mul_up")).inputs(&[&silu, &up]).out();
        self.linear(&prod, &format!("{prefix}.down_proj"), intermediate, hidden, false)
    }

    /// The standard pre-norm decoder stack over the scope's layers. `ffn(builder, layer,
    /// normed_hidden)` returns the feed-forward output of a layer (dense MLP or MoE, chosen by
    /// the architecture). See [`decoder_stack_with_addends`](Self::decoder_stack_with_addends).
    pub fn decoder_stack(
        &mut self,
        embeddings: Option<&str>,
        layer_prefix: &dyn Fn(usize) -> String,
        final_norm: &str,
        ffn: &mut dyn FnMut(&mut Self, usize, &str) -> Result<String>,
    ) -> Result<Option<String>> {
        self.decoder_stack_with_addends(embeddings, layer_prefix, final_norm, ffn, &mut |_, _| Ok(None))
    }

    /// [`decoder_stack`](Self::decoder_stack) where `addend(builder, layer)` may return a
    /// tensor added to that layer's output hidden states (Qwen3-VL's deepstack features).
    ///
    /// The first stage starts from `embeddings`, a later one from the previous stage's
    /// [`stage_hidden_states`] (and with fused norms [`stage_hidden_states_normed`]). The
    /// last stage returns the final-normed hidden states; any other ends with its residual
    /// stream as an output (with fused norms also that stream through the next stage's first
    /// input norm, computed in the same fused node as in an unstaged graph) and returns None.
    pub fn decoder_stack_with_addends(
        &mut self,
        embeddings: Option<&str>,
        layer_prefix: &dyn Fn(usize) -> String,
        final_norm: &str,
        ffn: &mut dyn FnMut(&mut Self, usize, &str) -> Result<String>,
        addend: &mut dyn FnMut(&mut Self, usize) -> Result<Option<String>>,
    ) -> Result<Option<String>> {
        let hidden = self.text.hidden_size;
        let layers = self.scope.layers.clone();
        let first_norm = format!("{}.input_layernorm.weight", layer_prefix(layers.start));
        let (mut residual, mut h) = match embeddings {
            Some(x) => (x.to_string(), self.rms_norm(x, &first_norm, hidden)?),
            None if self.settings.fused_norms => {
                (stage_hidden_states(layers.start), stage_hidden_states_normed(layers.start))
            }
            None => {
                let stream = stage_hidden_states(layers.start);
                let h = self.rms_norm(&stream, &first_norm, hidden)?;
                (stream, h)
            }
        };
        // The last layer of a stage that hands its hidden states on.
        let stage_end = if self.scope.is_last() { None } else { Some(layers.end - 1) };
        for layer in layers.clone() {
            let p = layer_prefix(layer);
            let attn = self.attention(layer, &format!("{p}.self_attn"), &h)?;
            let (h2, mut r2) = self.add_and_norm(&attn, &residual, &format!("{p}.post_attention_layernorm.weight"))?;
            let mlp = ffn(self, layer, &h2)?;
            // The layer's output is r2 + mlp; an addend joins it before the next norm.
            if let Some(extra) = addend(self, layer)? {
                r2 = self.g.node("Add", &format!("{p}.output_addend")).inputs(&[&r2, &extra]).out();
            }
            if stage_end == Some(layer) && !self.settings.fused_norms {
                // The next stage norms the stream itself, as the unfused graph does after this Add.
                residual = self.g.node("Add", &format!("{p}.stage_output_add")).inputs(&[&mlp, &r2]).out();
                break;
            }
            let next_norm = if layer + 1 < self.text.num_hidden_layers {
                format!("{}.input_layernorm.weight", layer_prefix(layer + 1))
            } else {
                final_norm.to_string()
            };
            let (h3, r3) = self.add_and_norm(&mlp, &r2, &next_norm)?;
            h = h3;
            residual = r3;
        }
        if self.scope.is_last() {
            return Ok(Some(h));
        }
        self.carried_output(&residual, &stage_hidden_states(layers.end));
        if self.settings.fused_norms {
            self.carried_output(&h, &stage_hidden_states_normed(layers.end));
        }
        Ok(None)
    }

    /// logits = lm_head(h) for the last position (or all), as float32 output `logits`.
    /// A tied lm_head reuses the embedding table through Gemm(transB) instead of a second copy.
    pub fn logits(&mut self, h: &str, lm_head: Option<&str>, tied_table: &str) -> Result<()> {
        let (hidden, vocab) = (self.text.hidden_size, self.text.vocab_size);
        let h = if self.settings.last_token_logits {
            let starts = self.g.const_i64("last_token_start", &[-1])?;
            let ends = self.g.const_i64("last_token_end", &[i64::MAX])?;
            let axes = self.g.const_i64("last_token_axes", &[1])?;
            self.g.node("Slice", "last_token").inputs(&[h, &starts, &ends, &axes]).out()
        } else {
            h.to_string()
        };
        // A tied 16-bit lm_head as ai.pio.Linear over the table (`--pio-kernels lm_head`).
        let pio_tied =
            if lm_head.is_none() && !self.settings.int4_lm_head { self.pio_tied_lm_head(&h, tied_table) } else { None };
        let logits = match lm_head {
            // MatMulNBits takes the (vocab, hidden) table as it is stored, tied or not.
            // A tied lm_head reads the int4 embedding table itself: one copy for both.
            None if self.settings.int4_lm_head && self.int4_embedding.is_some() => {
                let (packed, scales) = self.int4_embedding.clone().unwrap_or_default();
                let layout = crate::quant::Int4Layout::new(vocab, hidden, self.settings.int4_block_size)
                    .map_err(BuildError::quantize("lm_head"))?;
                let level = self.settings.int4_accuracy_level;
                crate::quant::matmul_nbits_node(&mut self.g, &h, "lm_head", &layout, &packed, &scales, level, None)?
            }
            _ if self.settings.int4_lm_head => {
                let source = lm_head.unwrap_or(tied_table).trim_end_matches(".weight").to_string();
                self.weights().projection(
                    &mut self.g,
                    Some(&mut self.pio_usage),
                    &h,
                    "lm_head",
                    &[source],
                    hidden,
                    &[vocab],
                    false,
                    true,
                )?
            }
            Some(name) => {
                let prefix = name.trim_end_matches(".weight").to_string();
                self.weights().projection(
                    &mut self.g,
                    Some(&mut self.pio_usage),
                    &h,
                    "lm_head",
                    &[prefix],
                    hidden,
                    &[vocab],
                    false,
                    false,
                )?
            }
            None if pio_tied.is_some() => pio_tied.clone().unwrap_or_default(),
            None => {
                let flat_shape = self.g.const_i64("lm_head_flat_shape", &[-1, hidden as i64])?;
                let flat = self.g.node("Reshape", "lm_head_flatten").inputs(&[&h, &flat_shape]).out();
                let y = self.g.node("Gemm", "lm_head").inputs(&[flat.as_str(), tied_table]).attr("transB", 1i64).out();
                let lead = self
                    .g
                    .node("Shape", "lm_head_lead_shape")
                    .inputs(&[&h])
                    .attr("start", 0i64)
                    .attr("end", 2i64)
                    .out();
                let v = self.g.const_i64("lm_head_vocab", &[vocab as i64])?;
                let shape = self.g.node("Concat", "lm_head_out_shape").inputs(&[&lead, &v]).attr("axis", 0i64).out();
                self.g.node("Reshape", "lm_head_unflatten").inputs(&[&y, &shape]).out()
            }
        };
        let seq = if self.settings.last_token_logits { Dim::Fixed(1) } else { Dim::Sym("sequence_length") };
        let shape = [Dim::Sym("batch_size"), seq, Dim::Fixed(vocab as i64)];
        if self.dtype == TensorDtype::Float32 {
            self.g.node("Identity", "logits_out").inputs(&[&logits]).named_outs(&["logits"]);
        } else {
            self.g.node("Cast", "logits_out").inputs(&[&logits]).attr("to", 1i64).named_outs(&["logits"]);
        }
        self.g.output("logits", TensorDtype::Float32, &shape);
        // The greedy choice computed next to the logits: a greedy decode then brings
        // batch x 1 token ids to the host instead of batch x vocab floats, and the runtime
        // skips a host argmax. ArgMax keeps the first of equal maxima, like the host argmax.
        self.g
            .node("ArgMax", "greedy_tokens_argmax")
            .inputs(&["logits"])
            .attr("axis", -1i64)
            .attr("keepdims", 0i64)
            .named_outs(&[GREEDY_TOKENS]);
        self.g.output(GREEDY_TOKENS, TensorDtype::Int64, &shape[..2]);
        Ok(())
    }
}
