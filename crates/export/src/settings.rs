//! The export settings: the graph switches chosen at export, their defaults per target, the
//! combinations a target cannot run, and the KV-cache names and dtype they imply.

use pio_models::config::TextConfig;
use pio_models::manifest::{KvCacheSpec, TargetEp, TensorDtype};
use pio_models::size::Precision;

pub use crate::error::SettingsError;

/// The graph switches chosen at export (recorded in the manifest). Build them with
/// [`ExportSettings::builder`]; [`ExportSettingsBuilder::build`] refuses the combinations no target runs, and
/// [`crate::export()`] checks the rest against the model.
#[derive(Clone, Debug)]
pub struct ExportSettings {
    pub(crate) precision: Precision,
    pub(crate) target_ep: TargetEp,
    /// Rotary cache length: the longest prompt + generation the graph can serve.
    pub(crate) context_length: usize,
    pub(crate) last_token_logits: bool,
    pub(crate) fused_norms: bool,
    pub(crate) fused_qk_norm: bool,
    pub(crate) fused_gate_up: bool,
    /// q, k and v projections as one MatMul (fed packed to GroupQueryAttention when no
    /// separate q/k norm sits between them).
    pub(crate) fused_qkv: bool,
    pub(crate) int4_block_size: usize,
    /// With int4: quantize the lm_head too (embeddings stay 16-bit for Gather).
    pub(crate) int4_lm_head: bool,
    /// MatMulNBits accuracy_level (0: default; 4: int8 activations on the CPU).
    pub(crate) int4_accuracy_level: i64,
    /// With int4: the embedding table in int4 too, read by GatherBlockQuantized (and shared
    /// with a tied, int4 lm_head).
    pub(crate) int4_embeddings: bool,
    /// KV cache stored as int8 with per-channel scales (GroupQueryAttention's quantized cache).
    pub(crate) kv_cache_int8: bool,
    /// Sliding-window layers attend within their window; false (`--no-sliding-window`) gives
    /// every layer full attention, which differs from the model once a sequence outgrows the window.
    pub(crate) sliding_window: bool,
    /// Attention as com.microsoft GroupQueryAttention; false (`--no-fused-attention`) builds it
    /// from standard ONNX ops instead, to measure what the fused kernel buys.
    pub(crate) fused_attention: bool,
    /// Inference-PIO's own operators (`--pio-kernels`, the `pio-kernels` crate) instead of ONNX
    /// Runtime's for projections, SwiGLU and int4 experts.
    pub(crate) pio_kernels: crate::pio_ops::PioKernels,
    /// One graph, or the decoder in stages (`--stages`, `--stage-memory-gb`,
    /// `--stage-boundaries`; see `crate::stages`).
    pub(crate) stages: crate::stages::StageSplit,
    /// With int4: the quantized weights drawn as random int4 codes and scales (this seed) at
    /// export, never read from the checkpoint, which then holds only the weights that stay
    /// 16-bit (`--direct-int4` synthetic checkpoints; see `crate::random_int4`).
    pub(crate) random_int4: Option<u64>,
}

pub const PAST_KEY: &str = "past_key_values.{layer}.key";
pub const PAST_VALUE: &str = "past_key_values.{layer}.value";
pub const PRESENT_KEY: &str = "present.{layer}.key";
pub const PRESENT_VALUE: &str = "present.{layer}.value";
/// The most bytes the cos and sin tables may take together (`--context-length` x rotary dim x 4 bytes x 2): 4 GiB,
/// 64 times what Qwen3's 256K context needs.
pub const MAX_ROTARY_TABLE_BYTES: u64 = 1 << 32;
/// Output holding each position's argmax token id (int64, batch x positions).
pub const GREEDY_TOKENS: &str = pio_models::manifest::GREEDY_TOKENS_OUTPUT;

impl ExportSettings {
    /// Settings for a target, starting from `pio-export`'s defaults without flags: last-token logits,
    /// fused norms, the model's sliding windows and GroupQueryAttention everywhere; for the GPU also
    /// fused q/k/v and gate/up projections, and the q/k norm inside GroupQueryAttention when the
    /// model has one (`model_has_qk_norm`); int4 in blocks of 32 with the lm_head and embeddings
    /// kept 16-bit; no Inference-PIO operators; one graph.
    pub fn builder(
        precision: Precision,
        target_ep: TargetEp,
        context_length: usize,
        model_has_qk_norm: bool,
    ) -> ExportSettingsBuilder {
        let gpu = target_ep != TargetEp::Cpu;
        ExportSettingsBuilder {
            settings: ExportSettings {
                precision,
                target_ep,
                context_length,
                last_token_logits: true,
                fused_norms: true,
                fused_qk_norm: gpu && model_has_qk_norm,
                fused_gate_up: gpu,
                fused_qkv: gpu,
                int4_block_size: 32,
                int4_lm_head: false,
                int4_accuracy_level: 0,
                int4_embeddings: false,
                kv_cache_int8: false,
                sliding_window: true,
                fused_attention: true,
                pio_kernels: crate::pio_ops::PioKernels::none(),
                stages: crate::stages::StageSplit::Single,
                random_int4: None,
            },
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }
    pub fn target_ep(&self) -> TargetEp {
        self.target_ep
    }
    /// Rotary cache length: the longest prompt + generation the graph can serve.
    pub fn context_length(&self) -> usize {
        self.context_length
    }
    pub fn last_token_logits(&self) -> bool {
        self.last_token_logits
    }
    pub fn fused_norms(&self) -> bool {
        self.fused_norms
    }
    pub fn fused_qk_norm(&self) -> bool {
        self.fused_qk_norm
    }
    pub fn fused_gate_up(&self) -> bool {
        self.fused_gate_up
    }
    pub fn fused_qkv(&self) -> bool {
        self.fused_qkv
    }
    pub fn int4_block_size(&self) -> usize {
        self.int4_block_size
    }
    pub fn int4_lm_head(&self) -> bool {
        self.int4_lm_head
    }
    pub fn int4_accuracy_level(&self) -> i64 {
        self.int4_accuracy_level
    }
    pub fn int4_embeddings(&self) -> bool {
        self.int4_embeddings
    }
    pub fn kv_cache_int8(&self) -> bool {
        self.kv_cache_int8
    }
    pub fn sliding_window(&self) -> bool {
        self.sliding_window
    }
    pub fn fused_attention(&self) -> bool {
        self.fused_attention
    }
    pub fn pio_kernels(&self) -> crate::pio_ops::PioKernels {
        self.pio_kernels
    }
    pub fn stages(&self) -> &crate::stages::StageSplit {
        &self.stages
    }
    pub fn random_int4(&self) -> Option<u64> {
        self.random_int4
    }

    /// The dtype of activations, weights and the KV cache.
    pub fn compute_dtype(&self) -> TensorDtype {
        match self.precision {
            Precision::Fp32 => TensorDtype::Float32,
            Precision::Fp16 => TensorDtype::Float16,
            Precision::Bf16 => TensorDtype::Bfloat16,
            // int4 graphs keep fp16 activations on the GPU (MatMulNBits' fastest CUDA path)
            // and fp32 on the CPU (its GroupQueryAttention kernel we test against is fp32).
            Precision::Int4 if self.target_ep == TargetEp::Cpu => TensorDtype::Float32,
            Precision::Int4 => TensorDtype::Float16,
        }
    }

    /// The attention window of decoder layer `layer` in the graph (None: full attention).
    pub fn layer_window(&self, text: &TextConfig, layer: usize) -> Option<usize> {
        text.layer_window(layer).filter(|_| self.sliding_window)
    }

    pub fn layer_windows(&self, text: &TextConfig) -> Vec<Option<usize>> {
        (0..text.num_hidden_layers).map(|i| self.layer_window(text, i)).collect()
    }

    /// Refuses settings that do not fit the model `text` (`model` names the checkpoint): block sizes that do not
    /// divide its widths, a q/k norm it lacks, rotary and head widths GroupQueryAttention cannot take, a rotary
    /// table too large for the context length, `--no-sliding-window` without sliding layers, stages it cannot be
    /// cut into, a rope type the graphs do not build. The rules that need no model ran in
    /// [`ExportSettingsBuilder::build`].
    pub fn check_model(&self, model: &str, text: &TextConfig) -> Result<(), SettingsError> {
        use SettingsError as E;
        let int4 = self.precision == Precision::Int4;
        if self.int4_embeddings {
            if !text.hidden_size.is_multiple_of(self.int4_block_size) {
                return Err(E::Int4EmbeddingsBlock { hidden_size: text.hidden_size, block_size: self.int4_block_size });
            }
            if text.tie_word_embeddings && !self.int4_lm_head {
                return Err(E::Int4EmbeddingsTied);
            }
        }
        if let (true, Some(m)) = (int4, &text.moe) {
            // The experts' int4 weights (QMoE, MoEInt4) have no padded last block.
            let bs = self.int4_block_size;
            if !text.hidden_size.is_multiple_of(bs) || !m.moe_intermediate_size.is_multiple_of(bs) {
                return Err(E::Int4ExpertBlock {
                    block_size: bs,
                    hidden_size: text.hidden_size,
                    moe_intermediate_size: m.moe_intermediate_size,
                });
            }
        }
        if self.fused_qk_norm && !text.qk_norm {
            return Err(E::NoQkNorm);
        }
        let rotary_dim = text.rotary_dim();
        let rotary = |requirement| E::RotaryDim {
            rotary_dim,
            head_dim: text.head_dim,
            partial_rotary_factor: text.rope.partial_rotary_factor,
            requirement,
        };
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(rotary("positive and even"));
        }
        // The unfused attention rotates any even width; GroupQueryAttention's kernels need these.
        if self.fused_attention && !text.head_dim.is_multiple_of(16) {
            return Err(E::HeadDim { head_dim: text.head_dim });
        }
        if self.fused_attention && !rotary_dim.is_multiple_of(16) {
            return Err(rotary("a multiple of 16 for GroupQueryAttention"));
        }
        // cos and sin: (context_length, rotary_dim / 2) each, at most 4 bytes an element.
        let table_bytes = (self.context_length as u64).saturating_mul(rotary_dim as u64).saturating_mul(4);
        if table_bytes > MAX_ROTARY_TABLE_BYTES {
            return Err(E::ContextTooLong {
                context_length: self.context_length,
                bytes: table_bytes,
                max: MAX_ROTARY_TABLE_BYTES,
            });
        }
        if !self.sliding_window && !text.has_sliding_layers() {
            let why = match text.sliding_window {
                None => "use_sliding_window is false".to_string(),
                Some(w) => format!("window {w}, but every layer is full_attention"),
            };
            return Err(E::NoSlidingLayers { model: model.to_string(), why });
        }
        self.stages.validate(text.num_hidden_layers)?;
        if text.rope.rope_type != "default" && text.rope.rope_type != "linear" {
            return Err(E::UnsupportedRope { rope_type: text.rope.rope_type.clone() });
        }
        Ok(())
    }

    /// The dtype of the KV cache tensors.
    pub fn kv_dtype(&self) -> TensorDtype {
        if self.kv_cache_int8 {
            TensorDtype::Int8
        } else {
            self.compute_dtype()
        }
    }

    pub fn kv_cache_spec(&self) -> KvCacheSpec {
        KvCacheSpec {
            past_key: PAST_KEY.into(),
            past_value: PAST_VALUE.into(),
            present_key: PRESENT_KEY.into(),
            present_value: PRESENT_VALUE.into(),
            dtype: self.kv_dtype(),
            layout: "BNSH".into(),
            // GroupQueryAttention can update one fixed buffer in place; the unfused graph's
            // present is Concat(past, new), a cache that grows every step.
            shared_buffer: self.fused_attention,
        }
    }
}

/// Builds [`ExportSettings`], one method per `pio-export` flag; [`build`](Self::build) refuses the combinations no
/// target runs.
#[derive(Clone, Debug)]
pub struct ExportSettingsBuilder {
    settings: ExportSettings,
}

impl ExportSettingsBuilder {
    /// Weight and activation precision (`--precision`).
    pub fn precision(mut self, precision: Precision) -> Self {
        self.settings.precision = precision;
        self
    }
    /// The execution provider the graph is built for (`--target`).
    pub fn target_ep(mut self, target_ep: TargetEp) -> Self {
        self.settings.target_ep = target_ep;
        self
    }
    /// Rotary cache length: the longest prompt + generation the graph can serve (`--context-length`).
    pub fn context_length(mut self, tokens: usize) -> Self {
        self.settings.context_length = tokens;
        self
    }
    /// Logits of the last position only; false (`--all-logits`) returns every position's.
    pub fn last_token_logits(mut self, on: bool) -> Self {
        self.settings.last_token_logits = on;
        self
    }
    /// RMSNorms as com.microsoft SimplifiedLayerNormalization; false (`--no-fused-norms`) builds them from
    /// standard ops.
    pub fn fused_norms(mut self, on: bool) -> Self {
        self.settings.fused_norms = on;
        self
    }
    /// The q/k norm inside GroupQueryAttention (`--fused-qk-norm`).
    pub fn fused_qk_norm(mut self, on: bool) -> Self {
        self.settings.fused_qk_norm = on;
        self
    }
    /// Gate and up projections as one MatMul (`--fused-gate-up`).
    pub fn fused_gate_up(mut self, on: bool) -> Self {
        self.settings.fused_gate_up = on;
        self
    }
    /// q, k and v projections as one MatMul, fed packed to GroupQueryAttention when no separate q/k norm sits
    /// between them (`--fused-qkv`).
    pub fn fused_qkv(mut self, on: bool) -> Self {
        self.settings.fused_qkv = on;
        self
    }
    /// With int4: weights quantized in blocks of this many values, a power of two of at least 16
    /// (`--int4-block-size`).
    pub fn int4_block_size(mut self, block_size: usize) -> Self {
        self.settings.int4_block_size = block_size;
        self
    }
    /// With int4: quantize the lm_head too; embeddings stay 16-bit for Gather (`--int4-lm-head`).
    pub fn int4_lm_head(mut self, on: bool) -> Self {
        self.settings.int4_lm_head = on;
        self
    }
    /// MatMulNBits accuracy_level, 0 to 4 (0: default; 4: int8 activations on the CPU) (`--int4-accuracy-level`).
    pub fn int4_accuracy_level(mut self, level: i64) -> Self {
        self.settings.int4_accuracy_level = level;
        self
    }
    /// With int4: the embedding table in int4 too, read by GatherBlockQuantized and shared with a tied, int4
    /// lm_head (`--int4-embeddings`).
    pub fn int4_embeddings(mut self, on: bool) -> Self {
        self.settings.int4_embeddings = on;
        self
    }
    /// KV cache stored as int8 with per-channel scales, GroupQueryAttention's quantized cache (`--kv-cache-int8`).
    pub fn kv_cache_int8(mut self, on: bool) -> Self {
        self.settings.kv_cache_int8 = on;
        self
    }
    /// Sliding-window layers attend within their window; false (`--no-sliding-window`) gives every layer full
    /// attention, which differs from the model once a sequence outgrows the window.
    pub fn sliding_window(mut self, on: bool) -> Self {
        self.settings.sliding_window = on;
        self
    }
    /// Attention as com.microsoft GroupQueryAttention; false (`--no-fused-attention`) builds it from standard
    /// ONNX ops instead, to measure what the fused kernel buys.
    pub fn fused_attention(mut self, on: bool) -> Self {
        self.settings.fused_attention = on;
        self
    }
    /// Inference-PIO's own operators (`--pio-kernels`, the `pio-kernels` crate) instead of ONNX Runtime's for
    /// projections, SwiGLU and int4 experts.
    pub fn pio_kernels(mut self, kernels: crate::pio_ops::PioKernels) -> Self {
        self.settings.pio_kernels = kernels;
        self
    }
    /// One graph, or the decoder in stages (`--stages`, `--stage-memory-gb`, `--stage-boundaries`; see
    /// `crate::stages`).
    pub fn stages(mut self, split: crate::stages::StageSplit) -> Self {
        self.settings.stages = split;
        self
    }
    /// With int4: the quantized weights drawn as random int4 codes and scales (this seed) at export, never read
    /// from the checkpoint, which then holds only the weights that stay 16-bit (`--direct-int4` synthetic
    /// checkpoints; see `crate::random_int4`). None: read from the checkpoint.
    pub fn random_int4(mut self, seed: Option<u64>) -> Self {
        self.settings.random_int4 = seed;
        self
    }

    /// The settings, once they pass the rules that need no model (the rest are checked against the checkpoint
    /// by [`crate::export()`], see [`ExportSettings::check_model`]); the error names the flag and the values in
    /// conflict.
    pub fn build(self) -> Result<ExportSettings, SettingsError> {
        use SettingsError as E;
        let s = self.settings;
        let int4 = s.precision == Precision::Int4;
        if s.target_ep == TargetEp::Cpu && matches!(s.precision, Precision::Fp16 | Precision::Bf16) {
            return Err(E::PrecisionNeedsGpu { precision: s.precision });
        }
        if int4 && (s.int4_block_size < 16 || !s.int4_block_size.is_power_of_two()) {
            return Err(E::Int4BlockSize { block_size: s.int4_block_size });
        }
        if !(0..=4).contains(&s.int4_accuracy_level) {
            return Err(E::Int4AccuracyLevel { level: s.int4_accuracy_level });
        }
        if s.int4_lm_head && !int4 {
            return Err(E::NeedsInt4 { flag: "--int4-lm-head" });
        }
        if s.int4_embeddings && !int4 {
            return Err(E::NeedsInt4 { flag: "--int4-embeddings" });
        }
        if !s.fused_attention && s.kv_cache_int8 {
            return Err(E::NeedsFusedAttention { flag: "--kv-cache-int8", why: "the int8 cache is its own" });
        }
        if !s.fused_attention && s.fused_qk_norm {
            return Err(E::NeedsFusedAttention { flag: "--fused-qk-norm", why: "the q/k norm weights are its inputs" });
        }
        if s.target_ep == TargetEp::Cpu && s.fused_qk_norm {
            return Err(E::FusedQkNormOnCpu);
        }
        if s.context_length == 0 {
            return Err(E::ZeroContextLength);
        }
        s.pio_kernels.validate(s.precision, s.target_ep, s.int4_block_size)?;
        crate::random_int4::validate(&s)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_starts_from_the_target_defaults() {
        let cpu = ExportSettings::builder(Precision::Fp32, TargetEp::Cpu, 256, true).build().unwrap();
        assert!(cpu.last_token_logits() && cpu.fused_norms() && cpu.fused_attention() && cpu.sliding_window());
        assert!(!cpu.fused_qkv() && !cpu.fused_gate_up() && !cpu.fused_qk_norm(), "{cpu:?}");
        let gpu = ExportSettings::builder(Precision::Bf16, TargetEp::Cuda, 256, true).build().unwrap();
        assert!(gpu.fused_qkv() && gpu.fused_gate_up() && gpu.fused_qk_norm(), "{gpu:?}");
        let no_qk_norm = ExportSettings::builder(Precision::Bf16, TargetEp::Cuda, 256, false).build().unwrap();
        assert!(!no_qk_norm.fused_qk_norm());
        assert_eq!((gpu.int4_block_size(), gpu.int4_accuracy_level(), gpu.random_int4()), (32, 0, None));
        assert!(!gpu.int4_lm_head() && !gpu.int4_embeddings() && !gpu.kv_cache_int8() && !gpu.pio_kernels().any());
        assert_eq!(gpu.stages(), &crate::stages::StageSplit::Single);
    }

    #[test]
    fn build_refuses_combinations_no_target_runs_naming_the_flag() {
        use SettingsError as E;
        let cpu = ExportSettings::builder(Precision::Fp32, TargetEp::Cpu, 256, false);
        let refused = |b: ExportSettingsBuilder| b.build().err();
        assert_eq!(
            refused(cpu.clone().precision(Precision::Fp16)),
            Some(E::PrecisionNeedsGpu { precision: Precision::Fp16 })
        );
        assert_eq!(refused(cpu.clone().int4_lm_head(true)), Some(E::NeedsInt4 { flag: "--int4-lm-head" }));
        assert_eq!(refused(cpu.clone().int4_embeddings(true)), Some(E::NeedsInt4 { flag: "--int4-embeddings" }));
        assert_eq!(refused(cpu.clone().fused_qk_norm(true)), Some(E::FusedQkNormOnCpu));
        assert_eq!(refused(cpu.clone().context_length(0)), Some(E::ZeroContextLength));
        let unfused_int8 = cpu.clone().fused_attention(false).kv_cache_int8(true);
        assert!(matches!(refused(unfused_int8), Some(E::NeedsFusedAttention { flag: "--kv-cache-int8", .. })));
        assert!(matches!(refused(cpu.random_int4(Some(1))), Some(E::DirectInt4Precision { .. })));
    }
}
