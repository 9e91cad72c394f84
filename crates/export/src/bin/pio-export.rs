//! `pio-export`: Hugging Face checkpoint (or a preset, optionally with synthetic weights) to an
//! ONNX graph folder with a `pio.json` manifest.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use pio_export::stages::StageSplit;
use pio_export::synthetic::{self, CheckpointContents, ShapeOverrides};
use pio_export::{export, ExportRequest, ExportSettings};
use pio_models::cli_args::NumberRange;
use pio_models::presets::{find_preset, Preset, TokenizerFamily};
use pio_models::size::Precision;
use pio_models::TargetEp;

#[derive(Parser, Debug)]
#[command(name = "pio-export", version, about = "Export a Hugging Face checkpoint to ONNX graphs for ONNX Runtime")]
struct Args {
    /// A Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files).
    #[arg(long, conflicts_with = "model")]
    checkpoint: Option<PathBuf>,
    /// A preset: qwen3-4b-instruct-2507, qwen3-coder-30b, qwen3-vl-2b, glm-4-7.
    #[arg(long)]
    model: Option<String>,
    /// With --model: write a seeded random-weight checkpoint of the preset's shape and export it.
    #[arg(long, requires = "model")]
    synthetic: bool,
    /// With --synthetic: write the checkpoint and stop (no export).
    #[arg(long, requires = "synthetic")]
    checkpoint_only: bool,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0, value_parser = NumberRange::<u64>::any(), requires = "synthetic")]
    seed: u64,
    /// Where the synthetic checkpoint goes (default: checkpoints/<preset>-synthetic[-shape]).
    #[arg(long, requires = "synthetic")]
    checkpoint_out: Option<PathBuf>,
    /// Tokenizer folder copied into a synthetic checkpoint (default: the Qwen3 tokenizer fetched
    /// by scripts/setup.sh, for Qwen3-family presets at their real vocabulary).
    #[arg(long, requires = "synthetic")]
    tokenizer: Option<PathBuf>,
    /// Shrink a synthetic checkpoint: number of decoder layers (>= 1, as every shape flag).
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    layers: Option<usize>,
    /// Shrink a synthetic checkpoint: hidden size.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    hidden_size: Option<usize>,
    /// Shrink a synthetic checkpoint: the dense MLP's intermediate size.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    intermediate_size: Option<usize>,
    /// Shrink a synthetic checkpoint: attention heads (a multiple of --kv-heads).
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    heads: Option<usize>,
    /// Shrink a synthetic checkpoint: key/value heads.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    kv_heads: Option<usize>,
    /// Shrink a synthetic checkpoint: the size of one attention head.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    head_dim: Option<usize>,
    /// Shrink a synthetic checkpoint: vocabulary size (the real tokenizer is then left out).
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    vocab_size: Option<usize>,
    /// Shrink a synthetic mixture-of-experts checkpoint: routed experts per layer.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    experts: Option<usize>,
    /// Shrink a synthetic mixture-of-experts checkpoint: each expert's intermediate size.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    moe_intermediate_size: Option<usize>,
    /// Shrink a synthetic vision-language checkpoint's vision encoder: number of blocks (the
    /// deepstack mergers spread over them).
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    vision_layers: Option<usize>,
    /// Shrink a synthetic vision-language checkpoint's vision encoder: hidden size.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    vision_hidden_size: Option<usize>,
    /// Shrink a synthetic vision-language checkpoint's vision encoder: MLP intermediate size.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    vision_intermediate_size: Option<usize>,
    /// Shrink a synthetic vision-language checkpoint's vision encoder: attention heads.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    vision_heads: Option<usize>,

    /// Output folder (default: graphs/<name>-<precision>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Weight and activation precision: fp32 (CPU), fp16 / bf16 (CUDA), int4.
    #[arg(long)]
    precision: Option<String>,
    /// Execution provider the graph targets: cpu, cuda, tensorrt.
    #[arg(long, default_value = "cpu")]
    ep: String,
    /// Longest prompt + generation the graph serves (rotary table length), >= 1. Default: the
    /// model's max_position_embeddings, capped at 32768.
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    context_length: Option<usize>,
    /// Emit logits for every position instead of the last one only.
    #[arg(long)]
    all_logits: bool,
    /// Keep residual add and RMSNorm as separate nodes (instead of SkipSimplifiedLayerNormalization).
    #[arg(long)]
    no_fused_norms: bool,
    /// Pass the q/k norm weights into GroupQueryAttention (CUDA only). Default: on for
    /// cuda/tensorrt graphs of models with q/k norm, unless --no-fused-attention.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    fused_qk_norm: Option<bool>,
    /// q, k and v projections as one MatMul. Default: on for cuda/tensorrt.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    fused_qkv: Option<bool>,
    /// Gate and up projections as one MatMul. Default: on for cuda/tensorrt.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    fused_gate_up: Option<bool>,
    /// int4 quantization block size (power of two >= 16; default 32), with --precision int4.
    #[arg(long, value_parser = int4_block_size)]
    int4_block_size: Option<usize>,
    /// With --precision int4: quantize the lm_head too (embeddings stay 16-bit).
    #[arg(long)]
    int4_lm_head: bool,
    /// MatMulNBits accuracy_level, 0 to 4 (4 = int8 activations on CPU, faster, less exact;
    /// default 0), with --precision int4.
    #[arg(long, value_parser = NumberRange::between(0i64, 4))]
    int4_accuracy_level: Option<i64>,
    /// Store the KV cache as int8 with per-channel scales (GroupQueryAttention's quantized
    /// cache): half the cache memory of bf16; scales estimated from the weights.
    #[arg(long)]
    kv_cache_int8: bool,
    /// With --precision int4: the embedding table in int4 too (GatherBlockQuantized); a tied
    /// model also needs --int4-lm-head, and the two then share one table.
    #[arg(long)]
    int4_embeddings: bool,
    /// Attention from standard ONNX ops instead of GroupQueryAttention (slower; measures what
    /// the fused kernel buys). Not with --kv-cache-int8 or --fused-qk-norm.
    #[arg(long)]
    no_fused_attention: bool,
    /// Full attention on every layer of a model with sliding-window layers (outputs then differ
    /// from the model's once a sequence outgrows the window).
    #[arg(long)]
    no_sliding_window: bool,
    /// Inference-PIO's own kernels (custom operators of domain ai.pio, compiled for the GPU when
    /// the graph loads): `all` (the default when the flag has no value) or a comma-separated list
    /// of linear (the layers' projections), lm_head, swiglu (gate/up with the SwiGLU in the kernel's
    /// epilogue), moe (int4 experts), attention (one-token GroupQueryAttention steps in one kernel;
    /// not part of `all` yet: `all,attention`). The graph then needs pio to run.
    #[arg(long, num_args = 0..=1, default_missing_value = "all")]
    pio_kernels: Option<String>,
    /// Replace the output folder if it exists.
    #[arg(long)]
    force: bool,
    /// Write the decoder as N stage graphs over contiguous layer ranges, balanced by the bytes
    /// of their weights (MoE layers weigh more), for running over several GPUs (`pio --devices`);
    /// N >= 1.
    #[arg(long, conflicts_with_all = ["stage_memory_gb", "stage_boundaries"], value_parser = NumberRange::at_least(1usize))]
    stages: Option<usize>,
    /// Stages sized by a per-device budget: as few as keep each stage's weights within this many
    /// GiB, > 0 (leave room for the KV cache and activations), balanced.
    #[arg(long, conflicts_with = "stage_boundaries", value_parser = NumberRange::above(0.0f64))]
    stage_memory_gb: Option<f64>,
    /// Stages cut where you say: the first layer of each stage after the first, comma-separated
    /// layer numbers >= 1 (e.g. 3,47 for layers 0-2, 3-46 and 47 to the last).
    #[arg(long, value_delimiter = ',', value_parser = NumberRange::at_least(1usize))]
    stage_boundaries: Vec<usize>,
    /// With --synthetic --precision int4: draw the quantized weights (the decoder's projections
    /// and experts) as random int4 codes and scales while exporting, instead of writing them in
    /// bf16 and quantizing; the synthetic checkpoint then holds only the weights that stay 16-bit.
    #[arg(long, requires = "synthetic")]
    direct_int4: bool,
}

/// The stage split the flags ask for (their parsers keep the values in range).
fn stage_split(args: &Args) -> StageSplit {
    match (args.stages, args.stage_memory_gb, args.stage_boundaries.as_slice()) {
        (Some(n), ..) => StageSplit::Count(n),
        (None, Some(gb), _) => StageSplit::MemoryBudget((gb * (1u64 << 30) as f64) as u64),
        (None, None, []) => StageSplit::Single,
        (None, None, boundaries) => StageSplit::Boundaries(boundaries.to_vec()),
    }
}

/// `--int4-block-size`: MatMulNBits takes power-of-two blocks of 16 or more.
fn int4_block_size(text: &str) -> Result<usize, String> {
    match NumberRange::at_least(16usize).parse(text) {
        Ok(n) if n.is_power_of_two() => Ok(n),
        _ => Err("must be a power of two >= 16".to_string()),
    }
}

impl Args {
    fn overrides(&self) -> ShapeOverrides {
        ShapeOverrides {
            layers: self.layers,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab_size,
            experts: self.experts,
            moe_intermediate_size: self.moe_intermediate_size,
            vision_layers: self.vision_layers,
            vision_hidden_size: self.vision_hidden_size,
            vision_intermediate_size: self.vision_intermediate_size,
            vision_heads: self.vision_heads,
        }
    }
}

/// A preset's real checkpoint: `checkpoints/<preset>` if it is there, else the Hugging Face
/// cache, downloading what is missing (unless HF_HUB_OFFLINE is set).
fn preset_checkpoint(preset: &Preset) -> Result<PathBuf> {
    let local = PathBuf::from("checkpoints").join(preset.name);
    if local.join("config.json").is_file() {
        return Ok(local);
    }
    let hub = pio_hub::HubBuilder::from_env()?.progress(true).build()?;
    let snapshot = hub.snapshot(preset.hf_repo, "main").with_context(|| {
        format!(
            "preset {name} reads {repo} from checkpoints/{name} or the Hugging Face cache (pass --checkpoint DIR \
             for another folder, or --synthetic for random weights at its real shape)",
            name = preset.name,
            repo = preset.hf_repo
        )
    })?;
    Ok(snapshot.dir)
}

fn synthetic_checkpoint(args: &Args, preset: &Preset) -> Result<PathBuf> {
    let overrides = args.overrides();
    let dir = args.checkpoint_out.clone().unwrap_or_else(|| {
        let mut tag = overrides.tag();
        if args.direct_int4 {
            // Not a full checkpoint: kept apart from one.
            tag = if tag.is_empty() { "direct-int4".into() } else { format!("{tag}-direct-int4") };
        }
        let name = if tag.is_empty() {
            format!("{}-synthetic", preset.name)
        } else {
            format!("{}-synthetic-{tag}", preset.name)
        };
        PathBuf::from("checkpoints").join(name)
    });
    let tokenizer = match &args.tokenizer {
        Some(t) => Some(t.clone()),
        // The real tokenizer only fits when the vocabulary is the preset's.
        None if preset.tokenizer_family == TokenizerFamily::Qwen3 && args.vocab_size.is_none() => {
            let found = pio_models::paths::qwen3_tokenizer_dir();
            if found.is_none() {
                tracing::warn!("Qwen3 tokenizer not found (run scripts/setup.sh); the synthetic checkpoint has none");
            }
            found
        }
        None => None,
    };
    tracing::info!("writing synthetic checkpoint {} (seed {})", dir.display(), args.seed);
    let contents = if args.direct_int4 { CheckpointContents::WithoutQuantized } else { CheckpointContents::All };
    Ok(synthetic::write_checkpoint_with(preset, &overrides, args.seed, tokenizer.as_deref(), &dir, contents)?)
}

fn run(args: Args) -> Result<()> {
    let target_ep = TargetEp::parse(&args.ep)?;
    let precision = match &args.precision {
        Some(p) => Precision::parse(p)?,
        None if target_ep == TargetEp::Cpu => Precision::Fp32,
        None => Precision::Bf16,
    };
    if !args.synthetic && !args.overrides().is_empty() {
        return Err(Usage("--layers, --hidden-size and the other shape flags only apply with --synthetic").into());
    }
    let (checkpoint, base_name, source) = match (&args.checkpoint, &args.model) {
        (Some(dir), None) => {
            let name = dir
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "model".into());
            (dir.clone(), name, format!("checkpoint {}", dir.display()))
        }
        (None, Some(model)) => {
            let preset = find_preset(model)?;
            if args.synthetic {
                let dir = synthetic_checkpoint(&args, preset)?;
                if args.checkpoint_only {
                    println!("{}", dir.display());
                    return Ok(());
                }
                let name =
                    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| preset.name.into());
                (dir, name, format!("preset {} (synthetic, seed {})", preset.name, args.seed))
            } else {
                let dir = preset_checkpoint(preset)?;
                (dir, preset.name.to_string(), format!("preset {} ({})", preset.name, preset.hf_repo))
            }
        }
        _ => return Err(Usage("pass --checkpoint DIR or --model PRESET").into()),
    };
    // The int4 settings only mean something for int4 weights: given for another precision they
    // would be recorded nowhere and change nothing.
    for (flag, given) in [
        ("--int4-block-size", args.int4_block_size.is_some()),
        ("--int4-accuracy-level", args.int4_accuracy_level.is_some()),
    ] {
        if given && precision != Precision::Int4 {
            return Err(pio_export::SettingsError::NeedsInt4 { flag }.into());
        }
    }
    let config = pio_models::ModelConfig::from_file(&checkpoint.join("config.json"))?;
    let context_length = args.context_length.unwrap_or(config.text.max_position_embeddings.min(32768));
    let pio_kernels = match &args.pio_kernels {
        Some(list) => pio_export::PioKernels::parse(list, precision)?,
        None => pio_export::PioKernels::none(),
    };
    // Flags override the target's defaults; the q/k norm cannot go into attention that is not
    // GroupQueryAttention.
    let mut settings =
        ExportSettings::builder(precision, target_ep, context_length, config.text.qk_norm && !args.no_fused_attention)
            .last_token_logits(!args.all_logits)
            .fused_norms(!args.no_fused_norms)
            .int4_block_size(args.int4_block_size.unwrap_or(32))
            .int4_lm_head(args.int4_lm_head)
            .int4_accuracy_level(args.int4_accuracy_level.unwrap_or(0))
            .kv_cache_int8(args.kv_cache_int8)
            .int4_embeddings(args.int4_embeddings)
            .sliding_window(!args.no_sliding_window)
            .fused_attention(!args.no_fused_attention)
            .pio_kernels(pio_kernels)
            .stages(stage_split(&args))
            .random_int4(args.direct_int4.then_some(args.seed));
    if let Some(on) = args.fused_qk_norm {
        settings = settings.fused_qk_norm(on);
    }
    if let Some(on) = args.fused_qkv {
        settings = settings.fused_qkv(on);
    }
    if let Some(on) = args.fused_gate_up {
        settings = settings.fused_gate_up(on);
    }
    let out_dir =
        args.out.clone().unwrap_or_else(|| Path::new("graphs").join(format!("{base_name}-{}", precision.as_str())));
    let request = ExportRequest::builder(checkpoint, out_dir, settings.build()?)
        .overwrite(args.force)
        .source(source)
        .progress(true)
        .build();
    let summary = export(&request)?;
    tracing::info!(
        "wrote {} ({:.1} MB graph, {:.1} MB weights) in {:.1}s",
        summary.out_dir.display(),
        summary.model_bytes as f64 / 1e6,
        summary.weight_bytes as f64 / 1e6,
        summary.seconds
    );
    println!("{}", summary.out_dir.display());
    Ok(())
}

/// A command line that cannot work as written (exit code 2, as clap's own errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(&'static str);

/// 2 for what the command line got wrong (a flag, a preset, an output folder in the way), 1 for
/// the rest (a checkpoint that is not usable, a failed write).
fn exit_code(error: &anyhow::Error) -> ExitCode {
    use pio_export::error::{ExportError, OutputError, SettingsError};
    let output_in_the_way = |e: &OutputError| {
        matches!(
            e,
            OutputError::Exists { .. }
                | OutputError::NotAnExport { .. }
                | OutputError::NotASyntheticCheckpoint { .. }
                | OutputError::MountPoint { .. }
        )
    };
    let usage = error.downcast_ref::<Usage>().is_some()
        || error.downcast_ref::<pio_models::PresetError>().is_some()
        || error.downcast_ref::<pio_models::UnknownNameError>().is_some()
        || error.downcast_ref::<SettingsError>().is_some()
        || error.downcast_ref::<OutputError>().is_some_and(output_in_the_way)
        || match error.downcast_ref::<ExportError>() {
            Some(ExportError::Settings(_) | ExportError::Preset(_)) => true,
            Some(ExportError::Output(e)) => output_in_the_way(e),
            _ => false,
        };
    if usage {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    pio_models::logging::init();
    if let Err(e) = pio_export::scratch::clean_up_on_signals() {
        tracing::warn!("{e:#}: an interrupted export may leave a hidden .pio-export-* folder behind");
    }
    match run(pio_models::cli_args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            exit_code(&e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag has help text, and every numeric flag answers `-1` with the range it takes.
    #[test]
    fn every_flag_is_documented_and_names_its_range() {
        let problems = pio_models::cli_args::lint(pio_models::cli_args::command::<Args>());
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
