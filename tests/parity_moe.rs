//! The mixture-of-experts architectures against Hugging Face transformers, on the small
//! random-weight checkpoints in tests/fixtures (scripts/make_fixtures.py): Qwen3-MoE
//! (`qwen3moe-*`) and GLM-4-MoE (`glm4moe-*`, sigmoid + group-limited routing, shared experts,
//! partial rotary, an MTP layer on disk). The bar of the dense models: fp32 on the CPU, max
//! |logit diff| <= 1e-4 at every prefill position and cached step, argmax equal everywhere,
//! greedy 32 tokens equal to `generate` (one prefill and token by token). Also: int4 (QMoE)
//! graphs compute exactly their dequantized model, and the two MoE presets export
//! synthetically at a shrunk shape and run.

mod common;

use common::*;
use pio_export::checkpoint::Checkpoint;
use pio_export::onnx::proto::ModelProto;
use pio_export::synthetic::write_checkpoint;
use pio_models::config::{Architecture, ModelConfig};
use pio_models::presets::find_preset;
use pio_models::size::Precision;
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::model::DecoderModel;
use prost::Message;

const FIXTURES: &[&str] = &["qwen3moe-a", "qwen3moe-b", "glm4moe-a", "glm4moe-b"];

#[test]
fn fixtures_are_all_covered() {
    let mut found = fixtures_named("qwen3moe-");
    found.extend(fixtures_named("glm4moe-"));
    found.sort();
    let mut expected = FIXTURES.to_vec();
    expected.sort();
    assert_eq!(found, expected, "a MoE fixture without a parity test (or the reverse)");
}

#[test]
fn qwen3moe_a_normalized_topk_bf16_logits_match_transformers() {
    check_logit_parity("qwen3moe-a");
}

#[test]
fn qwen3moe_b_unnormalized_sparse_step_tied_sharded_logits_match_transformers() {
    check_logit_parity("qwen3moe-b");
}

#[test]
fn glm4moe_a_grouped_routing_partial_rotary_bias_qk_norm_logits_match_transformers() {
    check_logit_parity("glm4moe-a");
}

#[test]
fn glm4moe_b_unnormalized_two_shared_experts_gqa_logits_match_transformers() {
    check_logit_parity("glm4moe-b");
}

#[test]
fn qwen3moe_greedy_32_tokens_match_transformers_generate() {
    check_greedy_parity("qwen3moe-a");
    check_greedy_parity("qwen3moe-b");
}

#[test]
fn glm4moe_greedy_32_tokens_match_transformers_generate() {
    check_greedy_parity("glm4moe-a");
    check_greedy_parity("glm4moe-b");
}

/// The same bar with attention from standard ONNX ops (`--no-fused-attention`), GLM's partial
/// rotary and q/k/v bias included.
#[test]
fn unfused_attention_matches_transformers() {
    for name in FIXTURES {
        check_logit_parity_with(name, unfused_attention);
        check_greedy_parity_with(name, unfused_attention);
    }
}

/// The export switches (fused q/k/v with bias and q/k norm, fused gate/up in dense and shared
/// experts, unfused norms) keep the MoE models' logits.
#[test]
fn export_switches_keep_moe_logits() {
    for name in ["qwen3moe-a", "glm4moe-a"] {
        let fixture = fixtures_dir().join(name);
        let reference = load_reference(&fixture);
        let tmp = tempfile::tempdir().unwrap();
        let settings = cpu_settings(true).fused_qkv(true).fused_gate_up(true).fused_norms(false);
        export_to(&fixture, &tmp.path().join("g"), settings);
        let logits = prefill(&tmp.path().join("g"), &reference.prompt_ids);
        let diff = max_abs_diff(logits.last(), reference.prefill_logits.last().unwrap());
        assert!(diff <= LOGIT_TOLERANCE, "{name}: max |diff| {diff}");
    }
}

/// The checkpoint stores an MTP layer as `model.layers.4.*` (num_hidden_layers = 4): it is
/// not part of the decoder, the export skips it and the graph has 4 layers.
#[test]
fn glm4moe_mtp_layer_on_disk_is_skipped() {
    let fixture = fixtures_dir().join("glm4moe-a");
    let ck = Checkpoint::open(&fixture).unwrap();
    assert_eq!(ck.config.text.num_hidden_layers, 4);
    assert_eq!(ck.config.text.num_nextn_predict_layers, 1);
    let mtp: Vec<&str> = ck.tensor_names().filter(|n| n.starts_with("model.layers.4.")).collect();
    assert!(
        mtp.iter().any(|n| n.ends_with("eh_proj.weight")) && mtp.len() > 20,
        "fixture lacks its MTP layer: {mtp:?}"
    );

    let tmp = tempfile::tempdir().unwrap();
    export_to(&fixture, &tmp.path().join("g"), cpu_settings(true));
    let manifest = pio_models::Manifest::load(&tmp.path().join("g")).unwrap();
    assert_eq!(manifest.dims.num_layers, 4);
    let graph = std::fs::read(tmp.path().join("g/model.onnx")).unwrap();
    let text = String::from_utf8_lossy(&graph);
    assert!(
        text.contains("model.layers.3.mlp.experts") && !text.contains("model.layers.4."),
        "the graph reads the MTP layer"
    );
}

/// Config resolution transformers does and the fixtures rely on.
#[test]
fn moe_config_aliases_and_defaults() {
    // transformers 5 writes `num_local_experts` for Qwen3-MoE.
    let b = Checkpoint::open(&fixtures_dir().join("qwen3moe-b")).unwrap().config;
    assert_eq!(b.architecture, Architecture::Qwen3Moe);
    assert_eq!(b.text.moe.as_ref().unwrap().num_experts, 6);
    let sparse: Vec<bool> = (0..4).map(|i| b.text.is_moe_layer(i)).collect();
    assert_eq!(sparse, [false, true, false, true]);
    let a = Checkpoint::open(&fixtures_dir().join("qwen3moe-a")).unwrap().config;
    assert_eq!((0..3).map(|i| a.text.is_moe_layer(i)).collect::<Vec<_>>(), [true, false, true]);

    // Glm4MoeConfig's partial_rotary_factor is 0.5 when the file has none.
    let text = std::fs::read_to_string(fixtures_dir().join("glm4moe-a/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("partial_rotary_factor");
    let glm = ModelConfig::from_value(&v).unwrap();
    assert_eq!(glm.text.rope.partial_rotary_factor, 0.5);
    assert_eq!(glm.text.rotary_dim(), 16);
    let glm_b = Checkpoint::open(&fixtures_dir().join("glm4moe-b")).unwrap().config;
    assert_eq!(glm_b.text.rope.partial_rotary_factor, 1.0);
    // ... and other architectures keep 1.0.
    let mut q = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(fixtures_dir().join("qwen3moe-a/config.json")).unwrap(),
    )
    .unwrap();
    q.as_object_mut().unwrap().remove("partial_rotary_factor");
    assert_eq!(ModelConfig::from_value(&q).unwrap().text.rope.partial_rotary_factor, 1.0);
}

/// QMoE (int4 experts) computes exactly the model whose weights are the dequantized int4 values:
/// an int4 export against an fp32 export of that dequantized checkpoint, for every routing
/// (softmax renormalized or not, GLM's chosen experts renormalized or not). Every QMoE node is
/// in the form ONNX Runtime's CUDA kernel computes the same thing from: raw weights
/// (`weights_prepacked` = 0) and no `router_weights` (input 14, which the CUDA kernel ignores).
#[test]
fn int4_qmoe_graph_computes_the_dequantized_model() {
    let block = 32;
    for name in FIXTURES {
        let fixture = fixtures_dir().join(name);
        let reference = load_reference(&fixture);
        let tmp = tempfile::tempdir().unwrap();
        let int4 = cpu_settings(false).precision(Precision::Int4).int4_block_size(block);
        export_to(&fixture, &tmp.path().join("int4"), int4);
        let graph = std::fs::read(tmp.path().join("int4/model.onnx")).unwrap();
        let nodes = ModelProto::decode(graph.as_slice()).unwrap().graph.unwrap().node;
        let qmoe: Vec<_> = nodes.iter().filter(|n| n.op_type == "QMoE").collect();
        assert!(!qmoe.is_empty(), "{name}: no QMoE node");
        for node in qmoe {
            let prepacked = node.attribute.iter().find(|a| a.name == "weights_prepacked").map(|a| a.i);
            assert_eq!(prepacked, Some(0), "{name}: {}: weights_prepacked", node.name);
            assert!(node.input.len() <= 7, "{name}: {}: inputs {:?}", node.name, node.input);
        }

        int4_round_trip_checkpoint(&fixture, &tmp.path().join("dq"), block);
        export_to(&tmp.path().join("dq"), &tmp.path().join("dq-fp32"), cpu_settings(false));

        let steps: Vec<u32> = reference.steps.iter().map(|s| s.input_id).collect();
        let got = logits_with_steps(&tmp.path().join("int4"), &reference.prompt_ids, &steps);
        let expected = logits_with_steps(&tmp.path().join("dq-fp32"), &reference.prompt_ids, &steps);
        let diff = got.iter().zip(&expected).map(|(a, b)| max_abs_diff(a, b)).fold(0f32, f32::max);
        eprintln!("{name}: int4 graph vs dequantized fp32 graph: max |diff| {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: int4 graph vs dequantized fp32 graph: max |diff| {diff}");
    }
}

/// `pio-export --model <preset> --synthetic` at a shrunk shape: the synthetic writer lists
/// the architecture's tensors, the export reads them, and the graph runs (fp32 and int4).
fn synthetic_preset_runs(preset: &str, layers: usize) {
    let overrides = small_shape(layers, 16);
    let tmp = tempfile::tempdir().unwrap();
    let ck = write_checkpoint(find_preset(preset).unwrap(), &overrides, 7, None, &tmp.path().join("ck")).unwrap();
    let config = Checkpoint::open(&ck).unwrap().config;
    assert!((0..layers).any(|i| config.text.is_moe_layer(i)), "{preset}: no sparse layer at {layers} layers");
    let prompt = [5u32, 17, 42, 99, 3, 250];
    for precision in [Precision::Fp32, Precision::Int4] {
        let settings = cpu_settings(true).precision(precision);
        let out = tmp.path().join(precision.as_str());
        export_to(&ck, &out, settings);
        let mut model = DecoderModel::load(&out, &ExecutionProvider::default()).unwrap();
        let mut cache = model.new_cache().unwrap();
        let prefill = model.forward(&prompt, &mut cache).unwrap();
        let step = model.forward(&[argmax(prefill.last()) as u32], &mut cache).unwrap();
        for row in [prefill.last(), step.last()] {
            assert_eq!(row.len(), 256);
            assert!(row.iter().all(|v| v.is_finite()), "{preset} {precision:?}: non-finite logits");
            assert!(row.iter().any(|&v| v != row[0]), "{preset} {precision:?}: constant logits");
        }
    }
}

#[test]
fn qwen3_coder_30b_synthetic_export_runs() {
    synthetic_preset_runs("qwen3-coder-30b", 2);
}

#[test]
fn glm_4_7_synthetic_export_runs() {
    // first_k_dense_replace is 3: layer 3 is the first sparse one.
    synthetic_preset_runs("glm-4-7", 4);
}
