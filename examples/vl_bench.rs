//! GPU measurements and checks of a Qwen3-VL export (`scripts/vl_gpu_bench.sh` runs it), until
//! `pio bench` drives images:
//!
//! * `vision`: vision encoder latency per image (patch rows from `scripts/vl_bench_inputs.py`);
//! * `ttft`: time to first token with one image and a question: the encoder, then the decoder's
//!   prefill over `<|vision_start|>`, the image tokens, `<|vision_end|>` and the question;
//! * `compare`: the multimodal decoder and a text-only Qwen3 export of the same weights on a
//!   text prompt: prefill logits and greedy tokens (they must agree: text positions make MRoPE
//!   plain rotary), with and without a CUDA graph;
//! * `fixture`: a test fixture (tests/fixtures/qwen3vl-*) exported for the GPU against its
//!   transformers reference: image features, prefill logits, greedy tokens.
//!
//! Each writes one JSON report (`--out`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use inference_pio::vl::{rope_index, CacheKind, MultimodalDecoder, VisionEncoder};
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::model::{DecoderModel, Fetch};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Qwen3-VL export measurements on the GPU")]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// Execution provider: cuda (or cpu, for a dry run).
    #[arg(long, default_value = "cuda", global = true)]
    ep: String,
    #[arg(long, default_value_t = 0, global = true)]
    device_id: i32,
    /// Where the JSON report goes.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Vision encoder latency for every image of `--inputs`.
    Vision {
        #[arg(long)]
        graphs: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long, default_value_t = 10)]
        repeats: usize,
    },
    /// Time to first token: one image of `--inputs` and a question of `--question-tokens`.
    Ttft {
        #[arg(long)]
        graphs: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 64)]
        question_tokens: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// The multimodal decoder against a text-only export of the same weights.
    Compare {
        #[arg(long)]
        vl: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        #[arg(long, default_value_t = 32)]
        tokens: usize,
    },
    /// A fixture exported for this device against its transformers reference.
    Fixture {
        #[arg(long)]
        graphs: PathBuf,
        #[arg(long)]
        fixture: PathBuf,
    },
}

/// Patch rows and grids written by `scripts/vl_bench_inputs.py patches`.
struct Inputs {
    images: Vec<(String, Vec<f32>, [i64; 3])>,
}

impl Inputs {
    fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not safetensors", path.display()))?;
        let mut names: Vec<String> =
            st.names().iter().filter_map(|n| n.strip_suffix(".pixel_values").map(str::to_string)).collect();
        names.sort();
        let mut images = Vec::new();
        for name in names {
            let pixels = st.tensor(&format!("{name}.pixel_values"))?;
            let grid = st.tensor(&format!("{name}.image_grid_thw"))?;
            let pixels = pixels.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let grid: Vec<i64> =
                grid.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect();
            let grid: [i64; 3] = grid.try_into().map_err(|g| anyhow::anyhow!("{name}: grid {g:?} is not (t, h, w)"))?;
            images.push((name, pixels, grid));
        }
        if images.is_empty() {
            bail!("no <name>.pixel_values tensors in {}", path.display());
        }
        Ok(Inputs { images })
    }
}

fn median_ms(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2] * 1e3
}

fn argmax(x: &[f32]) -> u32 {
    (0..x.len()).fold(0, |best, i| if x[i] > x[best] { i } else { best }) as u32
}

fn vision(ep: &ExecutionProvider, graphs: &Path, inputs: &Path, repeats: usize) -> Result<Value> {
    let inputs = Inputs::load(inputs)?;
    let mut encoder = VisionEncoder::load(graphs, ep)?;
    let mut rows = Vec::new();
    for (name, pixels, grid) in &inputs.images {
        // Warm-up: kernels and the memory arena for this size.
        encoder.encode(pixels, *grid)?;
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let start = Instant::now();
            encoder.encode(pixels, *grid)?;
            times.push(start.elapsed().as_secs_f64());
        }
        let patches = pixels.len() / encoder.patch_dim;
        let ms = median_ms(times.clone());
        eprintln!("vision {name}: {patches} patches, {ms:.2} ms (median of {repeats})");
        rows.push(json!({"image": name, "grid_thw": grid, "patches": patches, "image_tokens": patches / 4,
            "median_ms": ms, "min_ms": times.iter().copied().fold(f64::MAX, f64::min) * 1e3}));
    }
    Ok(json!({"vision": rows, "graphs": graphs, "repeats": repeats}))
}

/// `<|vision_start|>`, the image's pad tokens, `<|vision_end|>`, then `question` seeded ids.
fn image_prompt(decoder: &MultimodalDecoder, grid: [i64; 3], question: usize) -> Result<Vec<u32>> {
    let v = decoder.manifest.vision.as_ref().context("not a vision-language export")?;
    let tokens = (grid[0] * grid[1] * grid[2]) as usize / (v.spatial_merge_size * v.spatial_merge_size);
    let mut ids = vec![v.vision_start_token_id];
    ids.extend(std::iter::repeat_n(v.image_token_id, tokens));
    ids.push(v.vision_end_token_id);
    let mut state = 0x9E37_79B9u64;
    ids.extend((0..question).map(|_| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) % 100_000) as u32 + 1000
    }));
    Ok(ids)
}

fn ttft(
    ep: &ExecutionProvider,
    graphs: &Path,
    inputs: &Path,
    image: &str,
    question: usize,
    repeats: usize,
) -> Result<Value> {
    let inputs = Inputs::load(inputs)?;
    let (_, pixels, grid) =
        inputs.images.iter().find(|(n, _, _)| n == image).with_context(|| format!("no image {image} in the inputs"))?;
    let mut encoder = VisionEncoder::load(graphs, ep)?;
    let mut decoder = MultimodalDecoder::load(graphs, ep)?;
    let merge = decoder.manifest.vision.as_ref().map_or(2, |v| v.spatial_merge_size) as i64;
    let ids = image_prompt(&decoder, *grid, question)?;
    let (positions, _) = rope_index(&ids, decoder.image_token(), &[*grid], merge)?;
    let mut run = || -> Result<(f64, f64, f64)> {
        let start = Instant::now();
        let (embeds, deepstack) = encoder.encode(pixels, *grid)?;
        let encoded = start.elapsed().as_secs_f64();
        let mut cache = decoder.new_cache(CacheKind::Shared, ids.len() + 1)?;
        let rows = inference_pio::vl::ImageRows { embeds, deepstack };
        let (_, greedy) = decoder.step(&mut cache, &ids, &positions, &rows)?;
        let total = start.elapsed().as_secs_f64();
        if greedy.is_empty() {
            bail!("no greedy token");
        }
        Ok((total, encoded, total - encoded))
    };
    run()?;
    let runs: Vec<(f64, f64, f64)> = (0..repeats).map(|_| run()).collect::<Result<_>>()?;
    let pick = |f: fn(&(f64, f64, f64)) -> f64| median_ms(runs.iter().map(f).collect());
    let (total, vision, prefill) = (pick(|r| r.0), pick(|r| r.1), pick(|r| r.2));
    eprintln!(
        "ttft {image} + {question} tokens ({} in all): {total:.1} ms (vision {vision:.1}, prefill {prefill:.1})",
        ids.len()
    );
    Ok(json!({"ttft_ms": total, "vision_ms": vision, "prefill_ms": prefill, "prompt_tokens": ids.len(),
        "image": image, "grid_thw": grid, "question_tokens": question, "repeats": repeats, "graphs": graphs}))
}

fn compare(ep: &ExecutionProvider, vl: &Path, text: &Path, prompt_len: usize, tokens: usize) -> Result<Value> {
    let mut state = 7u64;
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) % 100_000) as u32 + 1000
        })
        .collect();
    let mut report = serde_json::Map::new();
    let graph_modes: Vec<bool> = if matches!(ep, ExecutionProvider::Cuda(_)) { vec![false, true] } else { vec![false] };
    for graph in graph_modes {
        let mut ep = ep.clone();
        ep.set_cuda_graph(graph);
        let mut runs = Vec::new();
        for dir in [vl, text] {
            let mut model = DecoderModel::load(dir, &ep)?;
            let mut cache = model.new_cache()?;
            let logits = model.forward(&prompt, &mut cache)?.last().to_vec();
            let mut next = argmax(&logits);
            let mut generated = vec![next];
            for _ in 1..tokens {
                let out = if graph {
                    model.decode_step_graph(&[next], &mut cache, Fetch::Greedy)?.greedy()
                } else {
                    model.greedy_batch(&[next], 1, &mut cache)?
                };
                next = out[0];
                generated.push(next);
            }
            runs.push((logits, generated));
        }
        let diff = runs[0].0.iter().zip(&runs[1].0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let same = runs[0].1.iter().zip(&runs[1].1).take_while(|(a, b)| a == b).count();
        eprintln!("compare (cuda graph {graph}): last-position logits max |diff| {diff:.3e}, {same}/{tokens} greedy tokens agree");
        report.insert(
            format!("cuda_graph_{graph}"),
            json!({"prefill_logits_max_abs_diff": diff, "greedy_tokens_agreeing": same, "tokens": tokens,
                "multimodal_tokens": runs[0].1, "text_tokens": runs[1].1}),
        );
    }
    Ok(json!({"compare": report, "prompt_len": prompt_len, "vl": vl, "text": text}))
}

fn fixture(ep: &ExecutionProvider, graphs: &Path, fixture: &Path) -> Result<Value> {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("reference.json"))?)?;
    let bytes = std::fs::read(fixture.join("reference.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let floats = |key: &str| -> Result<Vec<f32>> {
        Ok(st.tensor(key)?.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = |a: &[f32]| a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut encoder = VisionEncoder::load(graphs, ep)?;
    let mut decoder = MultimodalDecoder::load(graphs, ep)?;
    let vocab = decoder.vocab();
    let cases = reference["cases"].as_object().context("reference.json has no cases")?;
    let mut report = serde_json::Map::new();
    for (name, case) in cases {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone())?;
        let grids: Vec<[i64; 3]> = serde_json::from_value(case["image_grid_thw"].clone())?;
        let positions: Vec<Vec<i64>> = serde_json::from_value(case["position_ids"].clone())?;
        let delta = case["rope_delta"].as_i64().unwrap_or(0);
        let expected_tokens: Vec<u32> = serde_json::from_value(case["greedy"]["generated_ids"].clone())?;
        let (mut embeds, mut deepstack_parts, mut vision_rel) = (Vec::new(), Vec::new(), 0f32);
        for (i, grid) in grids.iter().enumerate() {
            let (e, d) = encoder.encode_to_host(&floats(&format!("{name}.pixel_values.{i}"))?, *grid)?;
            let want = floats(&format!("{name}.image_embeds.{i}"))?;
            vision_rel = vision_rel.max(max_diff(&e, &want) / scale(&want));
            embeds.extend(e);
            deepstack_parts.push(d);
        }
        let n = decoder.deepstack();
        let mut deepstack = Vec::new();
        for layer in 0..n {
            for d in &deepstack_parts {
                let rows = d.len() / n;
                deepstack.extend_from_slice(&d[layer * rows..(layer + 1) * rows]);
            }
        }
        let mut cache = decoder.new_cache(CacheKind::Shared, ids.len() + expected_tokens.len())?;
        let rows = decoder.image_rows(&embeds, &deepstack)?;
        let (logits, _) = decoder.step(&mut cache, &ids, &positions, &rows)?;
        let want = floats(&format!("{name}.prefill_logits"))?;
        let last = &logits[logits.len() - vocab..];
        let want_last = &want[want.len() - vocab..];
        let logits_rel = max_diff(last, want_last) / scale(want_last);
        let mut next = argmax(last);
        let mut generated = vec![next];
        let none = decoder.no_image_rows()?;
        for _ in 1..expected_tokens.len() {
            let p = cache.len as i64 + delta;
            let (_, greedy) = decoder.step(&mut cache, &[next], &[vec![p], vec![p], vec![p]], &none)?;
            next = greedy[0] as u32;
            generated.push(next);
        }
        let agree = generated.iter().zip(&expected_tokens).take_while(|(a, b)| a == b).count();
        eprintln!(
            "fixture {name}: vision max rel diff {vision_rel:.2e}, last logits max rel diff {logits_rel:.2e}, \
             {agree}/{} greedy tokens agree",
            expected_tokens.len()
        );
        report.insert(
            name.clone(),
            json!({"vision_max_rel_diff": vision_rel, "last_logits_max_rel_diff": logits_rel,
            "greedy_tokens_agreeing": agree, "tokens": expected_tokens.len(), "generated": generated}),
        );
    }
    Ok(json!({"fixture": fixture, "graphs": graphs, "cases": report}))
}

fn main() -> Result<()> {
    pio_models::logging::init();
    let args = Args::parse();
    let ep = ExecutionProvider::parse(&args.ep, args.device_id)?;
    let report = match &args.command {
        Command::Vision { graphs, inputs, repeats } => vision(&ep, graphs, inputs, *repeats)?,
        Command::Ttft { graphs, inputs, image, question_tokens, repeats } => {
            ttft(&ep, graphs, inputs, image, *question_tokens, *repeats)?
        }
        Command::Compare { vl, text, prompt_len, tokens } => compare(&ep, vl, text, *prompt_len, *tokens)?,
        Command::Fixture { graphs, fixture: dir } => fixture(&ep, graphs, dir)?,
    };
    let text = serde_json::to_string_pretty(&json!({"ep": args.ep, "report": report}))?;
    match &args.out {
        Some(path) => std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}
