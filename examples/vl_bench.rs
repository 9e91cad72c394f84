//! Qwen3-VL through the runtime's own path (`scripts/vl_gpu_bench.sh` runs it on a GPU): image
//! files in chat messages, decoded and preprocessed by pio-image, encoded by the vision graph,
//! prefilled and decoded by the engine, exactly as `pio run --image` and a server request run.
//!
//! One engine (encoder cache and prefix cache off, so every request encodes its image and runs
//! its whole prompt) measures, each the median of `--repeats` after a warm-up:
//!
//! * per image of `--images`: reading and decoding, the image processor, the vision encoder (the
//!   request's `timings.images`), and the time to first token;
//! * with `--ttft-image` and a question of `--question-tokens` tokens: the time to first token
//!   (from submission: decoding, preprocessing, encoding, prefill, first sample) and then decode
//!   tokens/s over `--decode-tokens` greedy tokens (CUDA graphs with `--ep-option cuda_graph=1`).
//!
//! The question's text is in the report, for transformers' baseline (`scripts/hf_vl_baseline.py`)
//! to ask the same.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use pio_runtime::engine::{Engine, EngineConfig, Prompt, Request};
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::generate::{GenerateOptions, GenerationOutput};
use pio_runtime::sampling::SamplingParams;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Qwen3-VL through the engine: vision encode latency, time to first token, decode")]
struct Args {
    /// A Qwen3-VL graph folder (with its tokenizer and chat template).
    #[arg(long)]
    graphs: PathBuf,
    /// Image files whose encode latency is measured, comma-separated.
    #[arg(long, value_delimiter = ',')]
    images: Vec<PathBuf>,
    /// The image of the time-to-first-token and decode measurement.
    #[arg(long)]
    ttft_image: PathBuf,
    #[arg(long, default_value_t = 64)]
    question_tokens: usize,
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Execution provider: cuda (or cpu, for a dry run).
    #[arg(long, default_value = "cuda")]
    ep: String,
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// Execution provider option KEY=VALUE (repeatable), e.g. cuda_graph=1.
    #[arg(long = "ep-option")]
    ep_options: Vec<String>,
    /// Tokens one sequence holds (the KV slot): room for the largest image and the answer.
    #[arg(long, default_value_t = 4096)]
    max_model_len: usize,
    /// Prompt tokens per engine step: the default runs every prompt here in one prefill.
    #[arg(long, default_value_t = 4096)]
    prefill_budget: usize,
    /// Where the JSON report goes.
    #[arg(long)]
    out: PathBuf,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One greedy request: `question` after the image, `max_tokens` tokens (end of sequence ignored).
fn ask(engine: &Engine, image: &Path, question: &str, max_tokens: usize) -> Result<GenerationOutput> {
    let message = json!({"role": "user", "content": [
        {"type": "image", "path": image}, {"type": "text", "text": question}]});
    let options = GenerateOptions {
        max_tokens: Some(max_tokens),
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..Default::default()
    };
    let output = engine.generate(Request::new(Prompt::Chat(vec![message])).with_options(options))?;
    if output.timings.images.is_none() {
        bail!("the request ran without its image");
    }
    Ok(output)
}

/// `repeats` requests after a warm-up.
fn repeated(
    engine: &Engine,
    image: &Path,
    question: &str,
    max_tokens: usize,
    repeats: usize,
) -> Result<Vec<GenerationOutput>> {
    ask(engine, image, question, max_tokens)?;
    (0..repeats).map(|_| ask(engine, image, question, max_tokens)).collect()
}

/// A question of about `tokens` tokens: ordinary words, cut at `tokens` tokens and decoded back.
fn question_of(engine: &Engine, tokens: usize) -> Result<(String, usize)> {
    let tokenizer = engine.tokenizer().context("the graph folder has no tokenizer")?;
    let words = "Describe what this picture shows in detail: the colours, the shapes, where each object sits, \
                 how large it is next to the others, what the light is like, and what might have happened just \
                 before the picture was taken, then say which part of it you would look at first and why.";
    let text = words.repeat(tokens / 40 + 2);
    let ids = tokenizer.encode(&text, false)?;
    let question = tokenizer.decode(&ids[..tokens.min(ids.len())], false)?.trim().to_string();
    let count = tokenizer.encode(&question, false)?.len();
    Ok((question, count))
}

fn main() -> Result<()> {
    pio_models::logging::init();
    let args = Args::parse();
    if args.repeats == 0 || args.decode_tokens < 2 {
        bail!("--repeats must be at least 1 and --decode-tokens at least 2");
    }
    let ep = ExecutionProvider::from_cli(&args.ep, args.device_id, &args.ep_options)?;
    let config = EngineConfig::builder(&args.graphs)
        .ep(ep)
        .max_seqs(1)
        .max_model_len(args.max_model_len)
        .prefill_budget(args.prefill_budget)
        .prefix_caching(false)
        .encoder_cache_bytes(0)
        .build()?;
    let engine = Engine::start(config)?;

    let mut images = Vec::new();
    for image in &args.images {
        let runs = repeated(&engine, image, "Describe the image.", 1, args.repeats)?;
        let stat = |f: &dyn Fn(&GenerationOutput) -> f64| median(runs.iter().map(f).collect());
        let of = |f: fn(&pio_runtime::generate::ImageTimings) -> f64| {
            stat(&|o: &GenerationOutput| o.timings.images.as_ref().map_or(f64::NAN, f))
        };
        let timings = runs[0].timings.images.clone().unwrap_or_default();
        let row = json!({
            "image": image,
            "image_tokens": timings.image_tokens,
            "prompt_tokens": runs[0].prompt_ids.len(),
            "decode_ms": of(|t| t.decode_ms),
            "preprocess_ms": of(|t| t.preprocess_ms),
            "encode_ms": of(|t| t.encode_ms),
            "ttft_ms": stat(&|o| o.timings.time_to_first_token_ms),
        });
        eprintln!("{row}");
        images.push(row);
    }

    let (question, question_tokens) = question_of(&engine, args.question_tokens)?;
    let first = repeated(&engine, &args.ttft_image, &question, 1, args.repeats)?;
    let long = repeated(&engine, &args.ttft_image, &question, args.decode_tokens, args.repeats.min(3))?;
    let image_timings = |o: &GenerationOutput| o.timings.images.clone().unwrap_or_default();
    let ttft = json!({
        "image": args.ttft_image,
        "question": question,
        "question_tokens": question_tokens,
        "prompt_tokens": first[0].prompt_ids.len(),
        "image_tokens": image_timings(&first[0]).image_tokens,
        "ttft_ms": median(first.iter().map(|o| o.timings.time_to_first_token_ms).collect()),
        "image_decode_ms": median(first.iter().map(|o| image_timings(o).decode_ms).collect()),
        "preprocess_ms": median(first.iter().map(|o| image_timings(o).preprocess_ms).collect()),
        "encode_ms": median(first.iter().map(|o| image_timings(o).encode_ms).collect()),
        "decode_tokens": args.decode_tokens,
        "decode_tokens_per_s": median(long.iter().map(|o| o.timings.decode_tokens_per_s).collect()),
        "generated_ids": long[0].generated_ids,
    });
    eprintln!("{ttft}");
    let info = engine.model_info();
    let report: Value = json!({
        "graphs": args.graphs,
        "prefill_budget": args.prefill_budget,
        "ep": info.execution_provider,
        "precision": info.precision,
        "cuda_graph_batch_sizes": info.cuda_graph_batch_sizes,
        "repeats": args.repeats,
        "images": images,
        "ttft": ttft,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(())
}
