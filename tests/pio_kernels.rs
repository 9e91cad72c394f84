//! Graphs exported with `--pio-kernels` (Inference-PIO's own operators, domain ai.pio), run on
//! the CPU, where each operator is its Rust reference:
//! * fp32 (`linear`, `lm_head`, `swiglu`: every projection, the fused SwiGLU MLPs, the tied lm_head
//!   over the embedding table): logits within 1e-4 of transformers at every prefill position and cached
//!   step, and greedy 32 tokens equal to `generate`, on Qwen3 and both MoE architectures;
//! * int4 (`linear`, `lm_head`, `swiglu`, `moe`: the kernels' int4 layout, the 16-bit lm_head,
//!   MoEInt4 for the experts): the
//!   same logits as ONNX Runtime's MatMulNBits / QMoE graph of the same checkpoint (both compute
//!   the same dequantized weights), and the same greedy tokens;
//! * such a graph names its operators in the manifest, and an ONNX Runtime session that did not
//!   register the domain refuses it, naming the operator.

mod common;

use std::path::Path;

use common::*;
use pio_export::{ExportSettingsBuilder, PioKernels};
use pio_models::manifest::Manifest;
use pio_models::size::Precision;
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::model::DecoderModel;

/// A settings knob: every pio kernel family that `precision` (the settings' precision) takes,
/// `attention` included (it is not in `all` yet).
fn with_pio(precision: Precision) -> impl Fn(ExportSettingsBuilder) -> ExportSettingsBuilder {
    move |settings| settings.pio_kernels(PioKernels { attention: true, ..PioKernels::all_for(precision) })
}

fn families(graphs: &Path) -> Vec<String> {
    Manifest::load(graphs).unwrap().options.pio_kernels
}

#[test]
fn fp32_graphs_with_pio_kernels_match_transformers() {
    for name in ["qwen3-tied-hub", "qwen3-untied-rp", "qwen3moe-a", "glm4moe-a"] {
        check_logit_parity_with(name, with_pio(Precision::Fp32));
    }
    for name in ["qwen3-tied-hub", "glm4moe-b"] {
        check_greedy_parity_with(name, with_pio(Precision::Fp32));
    }
}

fn int4_settings(pio: bool) -> ExportSettingsBuilder {
    let s = cpu_settings(false).precision(Precision::Int4).int4_block_size(32);
    if pio {
        with_pio(Precision::Int4)(s)
    } else {
        s
    }
}

/// Greedy tokens of a graph folder from one prefill.
fn greedy_of(graphs: &Path, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut model = DecoderModel::load(graphs, &ExecutionProvider::default()).unwrap();
    greedy(&mut model, prompt, n, false)
}

#[test]
fn int4_graphs_with_pio_kernels_match_onnx_runtime_int4() {
    for name in ["qwen3-tied-hub", "qwen3-untied-rp", "qwen3moe-a", "qwen3moe-b", "glm4moe-a", "glm4moe-b"] {
        let fixture = fixtures_dir().join(name);
        let reference = load_reference(&fixture);
        let tmp = tempfile::tempdir().unwrap();
        let (stock, pio) = (tmp.path().join("stock"), tmp.path().join("pio"));
        export_to(&fixture, &stock, int4_settings(false));
        export_to(&fixture, &pio, int4_settings(true));
        let moe = name.contains("moe");
        let expected_families = if moe {
            vec!["attention", "linear", "lm_head", "moe", "swiglu"]
        } else {
            vec!["attention", "linear", "lm_head", "swiglu"]
        };
        assert_eq!(families(&pio), expected_families, "{name}: families in the manifest");
        assert!(families(&stock).is_empty(), "{name}: the stock graph uses no pio kernels");
        let graph = String::from_utf8_lossy(&std::fs::read(pio.join("model.onnx")).unwrap()).into_owned();
        assert!(graph.contains("LinearInt4") && graph.contains("ai.pio"), "{name}: no LinearInt4 node");
        assert!(!graph.contains("MatMulNBits"), "{name}: a projection kept MatMulNBits");
        assert_eq!(graph.contains("MoEInt4"), moe, "{name}: MoEInt4 node");
        assert!(!graph.contains("QMoE"), "{name}: QMoE left in the pio graph");

        let steps: Vec<u32> = reference.steps.iter().map(|s| s.input_id).collect();
        let got = logits_with_steps(&pio, &reference.prompt_ids, &steps);
        let expected = logits_with_steps(&stock, &reference.prompt_ids, &steps);
        let diff = got.iter().zip(&expected).map(|(a, b)| max_abs_diff(a, b)).fold(0f32, f32::max);
        eprintln!("{name}: pio int4 graph vs ONNX Runtime int4 graph: max |logit diff| {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: max |logit diff| {diff}");
        let prompt = &reference.greedy.prompt_ids;
        assert_eq!(greedy_of(&pio, prompt, 16), greedy_of(&stock, prompt, 16), "{name}: greedy tokens");
    }
}

#[test]
fn a_session_without_the_domain_refuses_the_graph_naming_the_operator() {
    let fixture = fixtures_dir().join("qwen3-tied-hub");
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join("pio");
    export_to(&fixture, &graphs, int4_settings(true));
    let env = pio_runtime::ort_lib::environment().unwrap();
    let err = match ort::session::Session::builder(env).unwrap().commit_from_file(graphs.join("model.onnx")) {
        Ok(_) => panic!("a session without the ai.pio domain loaded a graph that uses it"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("ai.pio") && err.contains("LinearInt4"), "unclear error: {err}");
}

#[test]
fn pio_kernels_are_refused_where_they_cannot_run() {
    let fixture = fixtures_dir().join("qwen3-tied-hub");
    let tmp = tempfile::tempdir().unwrap();
    let s = int4_settings(true).int4_block_size(16);
    let e = export_error(&fixture, &tmp.path().join("a"), s);
    assert!(e.contains("--int4-block-size 32, 64 or 128"), "{e}");
    let s = cpu_settings(true).pio_kernels(PioKernels { moe: true, ..PioKernels::none() });
    let e = export_error(&fixture, &tmp.path().join("b"), s);
    assert!(e.contains("moe needs --precision int4"), "{e}");
}

/// Logits of a prefill and then `steps` one-token steps of `batch` copies of the prompt (each
/// copy's steps shifted by its row, so the rows differ), on GroupQueryAttention's shared buffer
/// in host memory: the cache the engine and the GPU use, on which `ai.pio.GroupQueryAttention`
/// runs one-token steps itself (its f32 reference on the CPU) and hands prompts to ONNX Runtime's.
fn shared_buffer_logits(graphs: &Path, prompt: &[u32], steps: &[u32], batch: usize) -> Vec<Vec<f32>> {
    let mut model = DecoderModel::load(graphs, &ExecutionProvider::default()).unwrap();
    let mut cache = model.new_shared_host_cache(batch, prompt.len() + steps.len() + 1).unwrap();
    let tokens: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
    let prefill = model.forward_batch(&tokens, batch, &mut cache).unwrap();
    let mut rows: Vec<Vec<f32>> = (0..batch).map(|b| prefill.last_of(b).to_vec()).collect();
    let vocab = model.vocab_size() as u32;
    for (i, &t) in steps.iter().enumerate() {
        let step: Vec<u32> = (0..batch).map(|b| (t + (b * i) as u32) % vocab).collect();
        let out = model.forward_batch(&step, batch, &mut cache).unwrap();
        rows.extend((0..batch).map(|b| out.last_of(b).to_vec()));
    }
    rows
}

#[test]
fn one_token_attention_steps_on_the_shared_buffer_match_onnx_runtime() {
    // Query groups of 2 and 4, a sliding window of 8 crossed by the steps, a partial rotary
    // (GLM), heads of 32 and 64.
    for name in ["qwen3-tied-hub", "qwen3-sliding", "qwen3-untied-rp", "glm4moe-a", "qwen3moe-a"] {
        let fixture = fixtures_dir().join(name);
        let reference = load_reference(&fixture);
        let tmp = tempfile::tempdir().unwrap();
        let (stock, pio) = (tmp.path().join("stock"), tmp.path().join("pio"));
        export_to(&fixture, &stock, cpu_settings(true));
        export_to(&fixture, &pio, cpu_settings(true).pio_kernels(PioKernels { attention: true, ..PioKernels::none() }));
        assert_eq!(families(&pio), vec!["attention"], "{name}: families in the manifest");
        let graph = String::from_utf8_lossy(&std::fs::read(pio.join("model.onnx")).unwrap()).into_owned();
        assert!(graph.contains("ai.pio"), "{name}: no ai.pio node");
        let steps: Vec<u32> =
            (0..20).map(|i| reference.prompt_ids[i % reference.prompt_ids.len()] + i as u32).collect();
        for batch in [1, 3] {
            let got = shared_buffer_logits(&pio, &reference.prompt_ids, &steps, batch);
            let expected = shared_buffer_logits(&stock, &reference.prompt_ids, &steps, batch);
            let diff = got.iter().zip(&expected).map(|(a, b)| max_abs_diff(a, b)).fold(0f32, f32::max);
            eprintln!("{name} batch {batch}: ai.pio attention vs ONNX Runtime's: max |logit diff| {diff:.2e}");
            assert!(diff <= 1e-4, "{name} batch {batch}: max |logit diff| {diff}");
        }
    }
}
