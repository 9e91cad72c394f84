//! Qwen3-VL parity with transformers on the small random-weight checkpoints in tests/fixtures
//! (made by scripts/make_vl_fixtures.py with transformers' real processor and chat template):
//! fp32 on the CPU,
//! * the vision graph on the processor's pixel_values: image embeddings and deepstack features
//!   within 1e-4 (and a two-frame grid: attention stays within each frame);
//! * the decoder on the reference input_ids and 3D positions with transformers' image features:
//!   every position's logits within 1e-4, the same argmax;
//! * a prefill in chunks (each chunk given only its own image rows) equal to the whole prefill,
//!   through a growing cache and through a fixed shared buffer;
//! * vision graph -> decoder -> 32 greedy tokens equal to transformers' `generate`, decode steps
//!   at position cache length + rope delta on all three axes (both cache kinds, and the
//!   whole-capacity mask of CUDA-graph decode).
//!
//! The decoder runs through the small driver of `inference_pio::vl` (positions and image rows fed
//! directly); the vision encoder and the rope index are the runtime's. The engine's own path
//! (image files, chat template, preprocessing, the engine's steps) is `tests/vl_engine.rs`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use common::*;
use inference_pio::vl::{Cache, CacheKind, MultimodalDecoder};
use ort::session::Session;
use pio_export::ExportSettingsBuilder;
use pio_models::manifest::Manifest;
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::vision::{rope_index, VisionEncoder};
use serde::Deserialize;

const FIXTURES: &[&str] = &["qwen3vl-a", "qwen3vl-b"];
const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    cases: BTreeMap<String, Case>,
    frames: Option<Frames>,
}

#[derive(Deserialize)]
struct Case {
    input_ids: Vec<u32>,
    image_grid_thw: Vec<[i64; 3]>,
    /// (3, sequence): t, h and w positions of every prompt token.
    position_ids: Vec<Vec<i64>>,
    rope_delta: i64,
    greedy: GreedyReference,
}

#[derive(Deserialize)]
struct GreedyReference {
    max_new_tokens: usize,
    generated_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Frames {
    image_grid_thw: Vec<[i64; 3]>,
}

/// A fixture: its reference and the float tensors of reference.safetensors.
struct Fixture {
    dir: std::path::PathBuf,
    reference: Reference,
    floats: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Fixture {
    fn load(name: &str) -> Self {
        let dir = fixtures_dir().join(name);
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        let reference: Reference = serde_json::from_str(&text).unwrap();
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let floats = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                let data = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                (k, (v.shape().to_vec(), data))
            })
            .collect();
        Fixture { dir, reference, floats }
    }

    fn floats(&self, key: &str) -> &[f32] {
        &self.floats.get(key).unwrap_or_else(|| panic!("{}: no {key} in reference.safetensors", self.dir.display())).1
    }

    /// The transformers image features of a case, concatenated over its images.
    fn image_features(&self, case: &str, images: usize) -> (Vec<f32>, Vec<f32>) {
        let embeds = (0..images).flat_map(|i| self.floats(&format!("{case}.image_embeds.{i}")).to_vec()).collect();
        let per_image: Vec<_> = (0..images).map(|i| self.floats(&format!("{case}.deepstack_embeds.{i}"))).collect();
        (embeds, concat_deepstack(&per_image, self.deepstack_count(case)))
    }

    fn deepstack_count(&self, case: &str) -> usize {
        self.floats.get(&format!("{case}.deepstack_embeds.0")).map_or(0, |(shape, _)| shape[0])
    }

    fn export(&self, out: &Path, settings: ExportSettingsBuilder) {
        export_to(&self.dir, out, settings);
    }
}

/// (n, M_i, H) features of several images as one (n, sum M_i, H).
fn concat_deepstack(per_image: &[&[f32]], n: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for layer in 0..n {
        for d in per_image {
            let rows = d.len() / n;
            out.extend_from_slice(&d[layer * rows..(layer + 1) * rows]);
        }
    }
    out
}

/// One image's features through the vision graph, as float32 host vectors.
fn encode_host(vision: &mut VisionEncoder, pixels: &[f32], grid: [i64; 3]) -> (Vec<f32>, Vec<f32>) {
    let [t, h, w] = grid.map(|d| u32::try_from(d).unwrap());
    vision.encode(pixels, pio_image::GridThw { t, h, w }).unwrap().to_host().unwrap()
}

fn cpu() -> ExecutionProvider {
    ExecutionProvider::default()
}

/// A prefill of `case` in chunks ending at `cuts` (and the prompt's end), each chunk given the
/// image rows of its own pad tokens; returns every chunk's logits rows, concatenated.
fn prefill(
    decoder: &mut MultimodalDecoder,
    cache: &mut Cache,
    case: &Case,
    image: &[f32],
    deepstack: &[f32],
    cuts: &[usize],
) -> Vec<f32> {
    let (hidden, layers) = (decoder.hidden(), decoder.deepstack());
    let token = decoder.image_token();
    let n = case.input_ids.len();
    let total_rows = image.len() / hidden;
    let mut ends: Vec<usize> = cuts.iter().copied().filter(|&c| c > 0 && c < n).collect();
    ends.push(n);
    let (mut start, mut row) = (0, 0);
    let mut logits = Vec::new();
    for end in ends {
        let ids = &case.input_ids[start..end];
        let pads = ids.iter().filter(|&&t| t == token).count();
        let chunk_image = &image[row * hidden..(row + pads) * hidden];
        let chunk_deepstack: Vec<f32> = (0..layers)
            .flat_map(|l| {
                let base = l * total_rows * hidden;
                deepstack[base + row * hidden..base + (row + pads) * hidden].to_vec()
            })
            .collect();
        let positions: Vec<Vec<i64>> = case.position_ids.iter().map(|axis| axis[start..end].to_vec()).collect();
        let rows = decoder.image_rows(chunk_image, &chunk_deepstack).unwrap();
        logits.extend(decoder.step(cache, ids, &positions, &rows).unwrap().0);
        start = end;
        row += pads;
    }
    logits
}

/// 32 greedy tokens after `case`'s prompt: decode steps at cache length + rope delta on all
/// three axes, with no image rows; the graph's greedy_tokens output must be the logits' argmax.
fn greedy_tokens(
    decoder: &mut MultimodalDecoder,
    kind: CacheKind,
    case: &Case,
    image: &[f32],
    deepstack: &[f32],
) -> Vec<u32> {
    let n = case.input_ids.len();
    let vocab = decoder.vocab();
    let mut cache = decoder.new_cache(kind, n + case.greedy.max_new_tokens).unwrap();
    let logits = prefill(decoder, &mut cache, case, image, deepstack, &[]);
    let mut next = argmax(&logits[logits.len() - vocab..]) as u32;
    let mut out = vec![next];
    let none = decoder.no_image_rows().unwrap();
    for _ in 1..case.greedy.max_new_tokens {
        let p = cache.len as i64 + case.rope_delta;
        let (logits, greedy) = decoder.step(&mut cache, &[next], &[vec![p], vec![p], vec![p]], &none).unwrap();
        next = argmax(&logits) as u32;
        assert_eq!(greedy, vec![next as i64], "greedy_tokens output differs from the logits' argmax");
        out.push(next);
    }
    out
}

fn image_token(fixture: &Fixture) -> u32 {
    let config = pio_models::ModelConfig::from_file(&fixture.dir.join("config.json")).unwrap();
    config.vision_tokens.unwrap().image_token_id
}

/// The harness's rope index (what the runtime will compute) reproduces transformers' positions
/// and rope delta for every prompt.
#[test]
fn rope_index_matches_transformers() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let token = image_token(&fixture);
        for (case_name, case) in &fixture.reference.cases {
            let index = rope_index(&case.input_ids, token, &case.image_grid_thw, 2).unwrap();
            assert_eq!(index.positions.to_vec(), case.position_ids, "{name} {case_name}: positions");
            assert_eq!(index.delta, case.rope_delta, "{name} {case_name}: rope delta");
        }
    }
}

#[test]
fn fixtures_are_all_covered() {
    let mut expected: Vec<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        fixtures_named("qwen3vl-"),
        expected,
        "a Qwen3-VL fixture exists without a parity test (or the reverse)"
    );
}

#[test]
fn vision_embeddings_match_transformers() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let tmp = tempfile::tempdir().unwrap();
        fixture.export(tmp.path(), cpu_settings(true));
        let mut vision = VisionEncoder::load(tmp.path(), &cpu()).unwrap();
        let mut checked = 0;
        let mut worst = 0f32;
        for (case_name, case) in &fixture.reference.cases {
            for (i, grid) in case.image_grid_thw.iter().enumerate() {
                let key = format!("{case_name}.%.{i}");
                let (embeds, deepstack) =
                    encode_host(&mut vision, fixture.floats(&key.replace('%', "pixel_values")), *grid);
                for (got, what) in [(&embeds, "image_embeds"), (&deepstack, "deepstack_embeds")] {
                    let diff = max_abs_diff(got, fixture.floats(&key.replace('%', what)));
                    assert!(diff <= TOLERANCE, "{name} {case_name} image {i} {what}: max |diff| {diff}");
                    worst = worst.max(diff);
                }
                checked += 1;
            }
        }
        if let Some(frames) = &fixture.reference.frames {
            let (embeds, deepstack) =
                encode_host(&mut vision, fixture.floats("frames.pixel_values"), frames.image_grid_thw[0]);
            for (got, what) in [(&embeds, "image_embeds"), (&deepstack, "deepstack_embeds")] {
                let diff = max_abs_diff(got, fixture.floats(&format!("frames.{what}")));
                assert!(diff <= TOLERANCE, "{name} two frames {what}: max |diff| {diff}");
                worst = worst.max(diff);
            }
        }
        assert!(checked >= 2, "{name}: only {checked} images checked");
        eprintln!("{name}: vision max |diff| {worst:.2e} over {checked} images");
    }
}

/// Every position's logits of a whole-prompt prefill fed transformers' image features.
fn check_prefill_logits(name: &str, settings: ExportSettingsBuilder) {
    let fixture = Fixture::load(name);
    let tmp = tempfile::tempdir().unwrap();
    fixture.export(tmp.path(), settings);
    let mut decoder = MultimodalDecoder::load(tmp.path(), &cpu()).unwrap();
    let mut worst = 0f32;
    for (case_name, case) in &fixture.reference.cases {
        let (image, deepstack) = fixture.image_features(case_name, case.image_grid_thw.len());
        let mut cache = decoder.new_cache(CacheKind::Growing, case.input_ids.len()).unwrap();
        let logits = prefill(&mut decoder, &mut cache, case, &image, &deepstack, &[]);
        let expected = fixture.floats(&format!("{case_name}.prefill_logits"));
        let vocab = decoder.vocab();
        assert_eq!(logits.len(), expected.len(), "{name} {case_name}: logits rows");
        for (pos, (got, want)) in logits.chunks(vocab).zip(expected.chunks(vocab)).enumerate() {
            let diff = max_abs_diff(got, want);
            assert!(diff <= TOLERANCE, "{name} {case_name}: position {pos}: max |diff| {diff}");
            assert_eq!(argmax(got), argmax(want), "{name} {case_name}: position {pos}: argmax");
            worst = worst.max(diff);
        }
    }
    eprintln!("{name}: prefill logits max |diff| {worst:.2e}");
}

#[test]
fn decoder_prefill_logits_match_transformers() {
    for name in FIXTURES {
        check_prefill_logits(name, cpu_settings(false));
    }
}

/// The same with attention from standard ONNX ops: each token's MRoPE rows rotate q and k
/// directly (no slot-indexed table).
#[test]
fn unfused_attention_decoder_matches_transformers() {
    for name in FIXTURES {
        let settings = unfused_attention(cpu_settings(false));
        check_prefill_logits(name, settings);
    }
}

/// Chunks cut through image-pad runs, each chunk given only its own image rows, give the whole
/// prefill's logits at every position, through a growing cache and a shared buffer.
#[test]
fn chunked_prefill_equals_the_whole_prefill() {
    let fixture = Fixture::load("qwen3vl-a");
    let token = image_token(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    fixture.export(tmp.path(), cpu_settings(false));
    let mut decoder = MultimodalDecoder::load(tmp.path(), &cpu()).unwrap();
    let case = &fixture.reference.cases["two_images"];
    let (image, deepstack) = fixture.image_features("two_images", case.image_grid_thw.len());
    let pads: Vec<usize> = case.input_ids.iter().enumerate().filter(|(_, &t)| t == token).map(|(i, _)| i).collect();
    // Inside the first image's run, between the images, inside the second image's run.
    let cuts = [pads[3], pads[12] - 1, pads[17]];
    let mut whole_cache = decoder.new_cache(CacheKind::Growing, case.input_ids.len()).unwrap();
    let whole = prefill(&mut decoder, &mut whole_cache, case, &image, &deepstack, &[]);
    for kind in [CacheKind::Growing, CacheKind::Shared] {
        let mut cache = decoder.new_cache(kind, case.input_ids.len() + 4).unwrap();
        let chunked = prefill(&mut decoder, &mut cache, case, &image, &deepstack, &cuts);
        let diff = max_abs_diff(&chunked, &whole);
        assert!(diff <= 1e-5, "{kind:?}: chunked prefill differs from the whole one by {diff}");
    }
}

/// The vision graph's embeddings feed the decoder: 32 greedy tokens equal transformers'
/// `generate`, through every cache kind.
#[test]
fn greedy_32_tokens_match_transformers_generate() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let tmp = tempfile::tempdir().unwrap();
        fixture.export(tmp.path(), cpu_settings(true));
        let mut vision = VisionEncoder::load(tmp.path(), &cpu()).unwrap();
        let mut decoder = MultimodalDecoder::load(tmp.path(), &cpu()).unwrap();
        for (case_name, case) in &fixture.reference.cases {
            let encoded: Vec<(Vec<f32>, Vec<f32>)> = case
                .image_grid_thw
                .iter()
                .enumerate()
                .map(|(i, grid)| {
                    encode_host(&mut vision, fixture.floats(&format!("{case_name}.pixel_values.{i}")), *grid)
                })
                .collect();
            let image: Vec<f32> = encoded.iter().flat_map(|(e, _)| e.clone()).collect();
            let per_image: Vec<&[f32]> = encoded.iter().map(|(_, d)| d.as_slice()).collect();
            let deepstack = concat_deepstack(&per_image, decoder.deepstack());
            for kind in [CacheKind::Growing, CacheKind::Shared, CacheKind::SharedFullMask] {
                let got = greedy_tokens(&mut decoder, kind, case, &image, &deepstack);
                assert_eq!(got, case.greedy.generated_ids, "{name} {case_name} ({kind:?}): greedy tokens");
            }
        }
    }
}

/// The multimodal decoder's layers have the text Qwen3 layers' nodes (MRoPE is computed once
/// per step, outside them); the layers receiving deepstack features add one Add.
#[test]
fn decoder_layers_cost_what_text_layers_cost() {
    use prost::Message;
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::load("qwen3vl-a");
    let gpu = pio_export::ExportSettings::builder(pio_models::Precision::Bf16, pio_models::TargetEp::Cuda, 256, true);
    fixture.export(&tmp.path().join("vl"), gpu.clone());
    export_to(&fixtures_dir().join("qwen3-tied-hub"), &tmp.path().join("text"), gpu);
    let ops = |dir: &Path, prefix: &str| -> Vec<String> {
        let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
        let model = pio_export::onnx::proto::ModelProto::decode(bytes.as_slice()).unwrap();
        let mut ops: Vec<String> =
            model.graph.unwrap().node.into_iter().filter(|n| n.name.starts_with(prefix)).map(|n| n.op_type).collect();
        ops.sort();
        ops
    };
    let text = ops(&tmp.path().join("text"), "model.layers.1.");
    // qwen3vl-a's 3 layers all receive deepstack features; layer 1 of each graph compared.
    let mut vl = ops(&tmp.path().join("vl"), "model.language_model.layers.1.");
    let addend = vl.iter().position(|op| op == "Add").expect("the deepstack Add");
    vl.remove(addend);
    assert_eq!(vl, text, "a multimodal decoder layer's nodes differ from a text layer's");
    // Outside the layers: the per-step MRoPE table and the image rows' gather (2 of its nodes,
    // scalar ones, carry the image rows' count to the device: `cuda_decoders_need_no_host_to_device_copy`).
    let outside = |dir: &Path, prefix: &str| ops(dir, "").len() - ops(dir, prefix).len();
    let (vl_outside, text_outside) = (
        outside(&tmp.path().join("vl"), "model.language_model.layers."),
        outside(&tmp.path().join("text"), "model.layers."),
    );
    eprintln!("nodes outside the layers: multimodal {vl_outside}, text {text_outside}");
    assert!(vl_outside <= text_outside + 42, "{vl_outside} nodes outside the layers (text: {text_outside})");
}

/// Decoders exported for CUDA make ONNX Runtime copy nothing from host to device memory: a
/// Memcpy node rules out CUDA graph capture. The multimodal decoder once compared the image
/// rows' count, read off a shape on the host, with device data; the text decoder is held to the
/// same rule.
#[test]
fn cuda_decoders_need_no_host_to_device_copy() {
    use pio_export::onnx::cuda_placement::host_to_device_copies;
    use pio_models::{Precision, TargetEp};
    use prost::Message;
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::load("qwen3vl-a");
    for (what, precision, fused_attention) in
        [("bf16", Precision::Bf16, true), ("int4", Precision::Int4, true), ("bf16-unfused", Precision::Bf16, false)]
    {
        let settings = pio_export::ExportSettings::builder(precision, TargetEp::Cuda, 256, true)
            .fused_attention(fused_attention)
            .fused_qk_norm(fused_attention);
        let (vl, text) = (tmp.path().join(format!("vl-{what}")), tmp.path().join(format!("text-{what}")));
        fixture.export(&vl, settings.clone());
        export_to(&fixtures_dir().join("qwen3-tied-hub"), &text, settings);
        for dir in [vl, text] {
            let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
            let graph = pio_export::onnx::proto::ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap();
            let copies = host_to_device_copies(&graph.node, &graph.initializer, &graph.input);
            let copies: Vec<String> = copies.iter().map(ToString::to_string).collect();
            assert!(copies.is_empty(), "{}: {}", dir.display(), copies.join("; "));
        }
    }
}

/// A bf16 vision encoder runs its attention in float16 (ONNX Runtime's bf16 MultiHeadAttention
/// was the slow part of a bf16 encode on an H100): each MultiHeadAttention reads q, k and v
/// through a Cast to float16 and its output is cast back to bfloat16. Graphs in float16 or
/// float32 have no such casts.
#[test]
fn bf16_vision_attention_runs_in_float16() {
    use pio_export::onnx::proto::{ModelProto, NodeProto};
    use pio_models::{Precision, TargetEp};
    use prost::Message;
    const FLOAT16: i64 = 10;
    const BFLOAT16: i64 = 16;
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Fixture::load("qwen3vl-a");
    for (precision, casts) in [(Precision::Bf16, true), (Precision::Fp16, false)] {
        let dir = tmp.path().join(format!("{precision:?}"));
        fixture.export(&dir, pio_export::ExportSettings::builder(precision, TargetEp::Cuda, 256, true));
        let bytes = std::fs::read(dir.join("vision.onnx")).unwrap();
        let nodes = ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap().node;
        let producer = |name: &str| nodes.iter().find(|n| n.output.iter().any(|o| o == name));
        let cast_to = |node: Option<&NodeProto>| {
            node.filter(|n| n.op_type == "Cast").and_then(|n| n.attribute.iter().find(|a| a.name == "to")).map(|a| a.i)
        };
        let attentions: Vec<&NodeProto> = nodes.iter().filter(|n| n.op_type == "MultiHeadAttention").collect();
        assert!(!attentions.is_empty(), "{precision:?}: no MultiHeadAttention in vision.onnx");
        for attention in attentions {
            let inputs: Vec<Option<i64>> = attention.input.iter().map(|i| cast_to(producer(i))).collect();
            let output = &attention.output[0];
            let consumer = nodes.iter().find(|n| n.input.iter().any(|i| i == output));
            if casts {
                assert_eq!(inputs, vec![Some(FLOAT16); 3], "{}: q, k, v not cast to float16", attention.name);
                assert_eq!(cast_to(consumer), Some(BFLOAT16), "{}: output not cast back", attention.name);
            } else {
                assert_eq!(inputs, vec![None; 3], "{precision:?} {}: casts around the attention", attention.name);
            }
        }
    }
}

/// The runtime's decoder runs the text steps of a multimodal export (positions on all three
/// axes, no image rows): a text-only prompt's greedy tokens equal transformers', through the
/// growing cache and the shared buffer.
#[test]
fn runtime_runs_the_text_steps_of_a_multimodal_export() {
    use pio_runtime::ep::ExecutionProvider;
    use pio_runtime::model::DecoderModel;
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let case = &fixture.reference.cases["text_only"];
        assert_eq!(case.rope_delta, 0, "{name}: a text-only prompt has no rope delta");
        let tmp = tempfile::tempdir().unwrap();
        fixture.export(tmp.path(), cpu_settings(true));
        let mut model = DecoderModel::load(tmp.path(), &ExecutionProvider::default()).unwrap();
        for shared in [false, true] {
            let context = model.context_length();
            let mut cache =
                if shared { model.new_shared_host_cache(1, context).unwrap() } else { model.new_cache().unwrap() };
            let mut logits = model.forward(&case.input_ids, &mut cache).unwrap();
            let mut got = Vec::new();
            for _ in 0..case.greedy.max_new_tokens {
                let next = argmax(logits.last()) as u32;
                got.push(next);
                logits = model.forward(&[next], &mut cache).unwrap();
            }
            assert_eq!(got, case.greedy.generated_ids, "{name} (shared buffer {shared}): greedy tokens");
        }
    }
}

/// int4 decoder projections compute the dequantized model; the vision encoder is not
/// quantized (its graph gives the same embeddings as the fp32 export's).
#[test]
fn int4_export_quantizes_the_decoder_only() {
    let fixture = Fixture::load("qwen3vl-a");
    let tmp = tempfile::tempdir().unwrap();
    let block = 32;
    let int4 = cpu_settings(false).precision(pio_models::Precision::Int4).int4_block_size(block);
    fixture.export(&tmp.path().join("int4"), int4);
    let quantized = |name: &str| name.starts_with("model.language_model.layers.") && name.contains("_proj");
    int4_round_trip_checkpoint_where(&fixture.dir, &tmp.path().join("dq"), block, quantized);
    export_to(&tmp.path().join("dq"), &tmp.path().join("dq-fp32"), cpu_settings(false));

    let case = &fixture.reference.cases["one_image"];
    let pixels = fixture.floats("one_image.pixel_values.0");
    let encode =
        |dir: &Path| encode_host(&mut VisionEncoder::load(dir, &cpu()).unwrap(), pixels, case.image_grid_thw[0]);
    let (int4_embeds, _) = encode(&tmp.path().join("int4"));
    let (fp32_embeds, _) = encode(&tmp.path().join("dq-fp32"));
    assert_eq!(int4_embeds, fp32_embeds, "the int4 export's vision graph differs from the fp32 one's");

    let (image, deepstack) = fixture.image_features("one_image", 1);
    let run = |dir: &Path| {
        let mut decoder = MultimodalDecoder::load(dir, &cpu()).unwrap();
        let mut cache = decoder.new_cache(CacheKind::Growing, case.input_ids.len()).unwrap();
        prefill(&mut decoder, &mut cache, case, &image, &deepstack, &[])
    };
    let (got, expected) = (run(&tmp.path().join("int4")), run(&tmp.path().join("dq-fp32")));
    let diff = max_abs_diff(&got, &expected);
    assert!(diff <= 1e-3, "int4 decoder vs the dequantized fp32 decoder: max |diff| {diff}");
}

/// 16-bit exports (the GPU's) are well-typed: ONNX Runtime's CPU session resolves both graphs
/// and fails only for want of 16-bit CPU kernels, if at all.
#[test]
fn sixteen_bit_exports_type_check() {
    let fixture = Fixture::load("qwen3vl-b");
    let tmp = tempfile::tempdir().unwrap();
    let env = pio_runtime::ort_lib::environment().unwrap();
    for precision in [pio_models::Precision::Bf16, pio_models::Precision::Fp16, pio_models::Precision::Int4] {
        let settings = pio_export::ExportSettings::builder(precision, pio_models::TargetEp::Cuda, 256, true);
        let dir = tmp.path().join(precision.as_str());
        fixture.export(&dir, settings);
        let manifest = Manifest::load(&dir).unwrap();
        let vision = manifest.vision.as_ref().unwrap();
        let dtype = manifest.kv_cache.dtype;
        let image_input = manifest.inputs.iter().find(|i| i.name == "image_embeds").unwrap();
        assert_eq!(image_input.dtype, dtype, "{precision:?}: decoder image input dtype");
        assert!(vision.outputs.iter().all(|o| o.dtype == dtype), "{precision:?}: vision outputs must be {dtype:?}");
        for file in [manifest.decoder.as_str(), vision.encoder.as_str()] {
            match Session::builder(env).unwrap().commit_from_file(dir.join(file)) {
                Ok(_) => {}
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains("Could not find an implementation"), "{precision:?} {file}: {e}");
                }
            }
        }
    }
}

/// `pio-export --model qwen3-vl-2b --synthetic` at a cut size writes the preset's processor
/// files, and both graphs run (fp32 and int4): embeddings and logits finite and not constant.
#[test]
fn synthetic_qwen3_vl_preset_exports_and_runs() {
    use pio_export::synthetic::{write_checkpoint, ShapeOverrides};
    let overrides = ShapeOverrides {
        layers: Some(2),
        hidden_size: Some(64),
        intermediate_size: Some(96),
        heads: Some(4),
        kv_heads: Some(2),
        head_dim: Some(32),
        vocab_size: Some(512),
        vision_layers: Some(3),
        vision_hidden_size: Some(64),
        vision_intermediate_size: Some(96),
        vision_heads: Some(4),
        ..Default::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    let preset = pio_models::find_preset("qwen3-vl-2b").unwrap();
    let ck = write_checkpoint(preset, &overrides, 3, None, &tmp.path().join("ck")).unwrap();
    for file in ["preprocessor_config.json", "chat_template.json"] {
        assert!(ck.join(file).is_file(), "the synthetic checkpoint has no {file}");
    }
    let config = pio_models::ModelConfig::from_file(&ck.join("config.json")).unwrap();
    let vision = config.vision.as_ref().unwrap();
    assert_eq!(vision.deepstack_visual_indexes, vec![0, 1, 2], "deepstack mergers spread over 3 blocks");
    assert_eq!(config.text.rope.mrope_section.as_deref(), Some(&[6, 5, 5][..]), "mrope_section fit to head_dim 32");
    let grid = [1, 4, 6];
    let pixels: Vec<f32> = (0..24 * vision.patch_dim()).map(|i| ((i % 97) as f32 / 48.0) - 1.0).collect();
    for precision in [pio_models::Precision::Fp32, pio_models::Precision::Int4] {
        let settings = cpu_settings(true).precision(precision);
        let out = tmp.path().join(precision.as_str());
        export_to(&ck, &out, settings);
        let manifest = Manifest::load(&out).unwrap();
        assert_eq!(manifest.vision.as_ref().unwrap().preprocessor_files, vec!["preprocessor_config.json"]);
        let (image, deepstack) = encode_host(&mut VisionEncoder::load(&out, &cpu()).unwrap(), &pixels, grid);
        assert_eq!(image.len(), 6 * 64);
        for v in [&image, &deepstack] {
            assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != v[0]), "{precision:?}: vision output");
        }
        let mut decoder = MultimodalDecoder::load(&out, &cpu()).unwrap();
        // Vocabulary 512: the image token id of the preset (151655) is outside it, so this prompt
        // has no pad tokens; the image rows still take the graph's path with 0 rows.
        let case = Case {
            input_ids: vec![5, 17, 42, 99, 3, 250],
            image_grid_thw: vec![],
            position_ids: (0..3).map(|_| (0..6).collect()).collect(),
            rope_delta: 0,
            greedy: GreedyReference { max_new_tokens: 2, generated_ids: vec![] },
        };
        let mut cache = decoder.new_cache(CacheKind::Growing, 8).unwrap();
        let logits = prefill(&mut decoder, &mut cache, &case, &[], &[], &[]);
        assert!(
            logits.iter().all(|x| x.is_finite()) && logits.iter().any(|&x| x != logits[0]),
            "{precision:?}: logits"
        );
    }
}
