//! `pio-kernels-check`: the GPU check of Inference-PIO's kernels (scripts/kernels_gpu_check.sh
//! runs it on the GPU host). Each subcommand writes one JSON report, saved after every section.
//!
//! * `probe`: the device, its read bandwidth, int4 dequantization bit for bit and timed, and the tile
//!   kernels timed directly on every projection shape of the presets (warps per CTA swept),
//!   checked against the CPU reference;
//! * `ops`: each operator against its ONNX Runtime counterpart inside ONNX Runtime (CUDA graphs):
//!   max relative error, µs per op, TB/s, speed-up;
//! * `attention`: the one-token decode-attention kernel against its f32 reference, and timed;
//! * `greedy`: a `--pio-kernels` graph against the stock graph of the same checkpoint: greedy
//!   tokens and teacher-forced logits.

mod attention;
mod data;
mod greedy;
mod ortbench;
mod probe;
mod report;
mod shapes;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pio-kernels-check", about = "GPU check of Inference-PIO's kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Device, bandwidth, dequantization exactness and speed, direct kernel timings.
    Probe {
        #[arg(long)]
        out: PathBuf,
        /// Token counts (M) of the kernel timings.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        tokens: Vec<usize>,
        /// Presets whose projections are timed (`all` or preset names).
        #[arg(long, value_delimiter = ',', default_value = "all")]
        presets: Vec<String>,
        /// Projections timed (`all` or names: qkv, o, gate_up, down, lm_head, ...).
        #[arg(long, value_delimiter = ',', default_value = "all")]
        projections: Vec<String>,
        /// Weight formats timed: int4, dense, or all.
        #[arg(long, value_delimiter = ',', default_value = "int4,dense")]
        formats: Vec<String>,
        /// Time the tiles at the default warps per CTA only (no sweep): one tile kernel per case, as a
        /// profiler wants (the GEMVs at one token are still timed).
        #[arg(long)]
        default_warps: bool,
        /// Skip the int4 dequantization's checks and timing (the bandwidth and the kernel timings
        /// only): for builds of different kernel sources timed in turn.
        #[arg(long)]
        kernels_only: bool,
    },
    /// Each operator against ONNX Runtime's counterpart.
    Ops {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "all")]
        presets: Vec<String>,
        /// Token counts for Qwen3-4B (the first preset) and for every MoE layer.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        tokens: Vec<usize>,
        /// Token counts for the other presets.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        other_tokens: Vec<usize>,
        /// GiB of device memory for the weight copies of the timing graphs.
        #[arg(long, default_value_t = 4.5)]
        pool_gib: f64,
    },
    /// The decode-attention kernel against its CPU reference on random inputs, and timed.
    Attention {
        #[arg(long)]
        out: PathBuf,
    },
    /// Greedy tokens and teacher-forced logits of a --pio-kernels graph against the stock one.
    Greedy {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        stock: PathBuf,
        #[arg(long)]
        pio: PathBuf,
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        #[arg(long, default_value_t = 32)]
        prompt_tokens: usize,
    },
}

fn main() -> ExitCode {
    pio_models::logging::init();
    let result: Result<()> = match Cli::parse().command {
        Command::Probe { out, tokens, presets, projections, formats, default_warps, kernels_only } => {
            let select = probe::Selection {
                presets,
                projections,
                formats,
                default_warps_only: default_warps,
                with_dequant: !kernels_only,
            };
            probe::run(&out, &tokens, &select)
        }
        Command::Ops { out, presets, tokens, other_tokens, pool_gib } => {
            ortbench::run(&out, &presets, &tokens, &other_tokens, pool_gib)
        }
        Command::Attention { out } => attention::run(&out),
        Command::Greedy { out, stock, pio, tokens, prompt_tokens } => {
            greedy::run(&out, &stock, &pio, tokens, prompt_tokens)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pio-kernels-check: {e:#}");
            ExitCode::FAILURE
        }
    }
}
