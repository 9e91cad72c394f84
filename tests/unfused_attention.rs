//! `--no-fused-attention`: attention from standard ONNX ops instead of GroupQueryAttention.
//! Parity with transformers for every fixture is in parity_qwen3.rs and parity_moe.rs (the
//! `unfused_attention` knob); here: the graph holds no GroupQueryAttention and keeps the fused
//! graph's inputs and outputs, batches of different sequences, the attention mask, 16-bit graphs,
//! and the switches it cannot take.

mod common;

use std::path::Path;

use common::*;
use half::f16;
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use pio_export::onnx::proto::ModelProto;
use pio_models::manifest::TensorDtype;
use pio_models::size::Precision;
use pio_models::{Manifest, TargetEp};
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::model::DecoderModel;
use prost::Message;

fn op_types(graphs: &Path) -> Vec<String> {
    let bytes = std::fs::read(graphs.join("model.onnx")).unwrap();
    let model = ModelProto::decode(bytes.as_slice()).unwrap();
    model.graph.unwrap().node.into_iter().map(|n| n.op_type).collect()
}

fn unfused_settings(last_token_logits: bool) -> pio_export::ExportSettingsBuilder {
    unfused_attention(cpu_settings(last_token_logits))
}

#[test]
fn graph_has_no_group_query_attention_and_the_same_io() {
    for name in ["qwen3-sliding", "glm4moe-a"] {
        let fixture = fixtures_dir().join(name);
        let tmp = tempfile::tempdir().unwrap();
        export_to(&fixture, &tmp.path().join("fused"), cpu_settings(true));
        export_to(&fixture, &tmp.path().join("unfused"), unfused_settings(true));
        let fused_ops = op_types(&tmp.path().join("fused"));
        let unfused_ops = op_types(&tmp.path().join("unfused"));
        let layers = Manifest::load(&tmp.path().join("fused")).unwrap().dims.num_layers;
        assert_eq!(fused_ops.iter().filter(|op| *op == "GroupQueryAttention").count(), layers, "{name}");
        assert!(!unfused_ops.iter().any(|op| op == "GroupQueryAttention"), "{name}: {unfused_ops:?}");
        assert_eq!(unfused_ops.iter().filter(|op| *op == "Softmax").count(), layers, "{name}");

        let fused = Manifest::load(&tmp.path().join("fused")).unwrap();
        let unfused = Manifest::load(&tmp.path().join("unfused")).unwrap();
        assert_eq!(unfused.inputs, fused.inputs, "{name}: graph inputs");
        assert_eq!(unfused.outputs, fused.outputs, "{name}: graph outputs");
        assert!(fused.options.fused_attention && fused.kv_cache.shared_buffer);
        assert!(!unfused.options.fused_attention && !unfused.kv_cache.shared_buffer);
    }
}

/// Two different sequences in one batch (prefill, then cached steps) give each sequence's own
/// logits: the first is the fixture's prompt, checked against transformers.
#[test]
fn a_batch_of_two_sequences_matches_each_alone() {
    for name in ["qwen3-tied-hub", "glm4moe-b"] {
        let fixture = fixtures_dir().join(name);
        let reference = load_reference(&fixture);
        let tmp = tempfile::tempdir().unwrap();
        let graphs = tmp.path().join("g");
        export_to(&fixture, &graphs, unfused_settings(true));
        let mut model = DecoderModel::load(&graphs, &ExecutionProvider::default()).unwrap();
        let first = reference.prompt_ids.clone();
        let second: Vec<u32> = first.iter().rev().map(|t| (t + 7) % model.vocab_size() as u32).collect();

        let mut alone = model.new_cache().unwrap();
        let second_prefill = model.forward(&second, &mut alone).unwrap().last().to_vec();
        let mut cache = model.new_batch_cache(2, 64).unwrap();
        let batch = model.forward_batch(&[first.clone(), second.clone()].concat(), 2, &mut cache).unwrap();
        let to_reference = max_abs_diff(batch.last_of(0), reference.prefill_logits.last().unwrap());
        assert!(to_reference <= LOGIT_TOLERANCE, "{name}: sequence 0 vs transformers: {to_reference}");
        assert!(max_abs_diff(batch.last_of(1), &second_prefill) <= 1e-5, "{name}: sequence 1 vs alone");

        let mut next_second = argmax(batch.last_of(1)) as u32;
        for step in &reference.steps {
            let alone_logits = model.forward(&[next_second], &mut alone).unwrap().last().to_vec();
            let batch = model.forward_batch(&[step.input_id, next_second], 2, &mut cache).unwrap();
            let to_reference = max_abs_diff(batch.last_of(0), &step.logits);
            assert!(
                to_reference <= LOGIT_TOLERANCE,
                "{name}: step at {}: sequence 0 vs transformers: {to_reference}",
                step.position
            );
            assert!(
                max_abs_diff(batch.last_of(1), &alone_logits) <= 1e-5,
                "{name}: step at {}: sequence 1",
                step.position
            );
            next_second = argmax(batch.last_of(1)) as u32;
        }
    }
}

/// Feeds the decoder graph in `graphs` directly, on the CPU (the runtime passes a mask of ones
/// and runs no 16-bit graph there): one prefill of `ids` (batch 1) with `mask` and `positions`
/// after an empty float32 or float16 cache; returns the logits and the shape of layer 0's present key.
fn prefill(graphs: &Path, ids: &[i64], mask: &[i64], positions: &[i64]) -> (Vec<f32>, Vec<i64>) {
    let manifest = Manifest::load(graphs).unwrap();
    let d = &manifest.dims;
    let env = pio_runtime::ort_lib::environment().unwrap();
    let mut session = Session::builder(env).unwrap().commit_from_file(graphs.join("model.onnx")).unwrap();
    let n = ids.len() as i64;
    let empty_past = || {
        let shape = vec![1, d.num_kv_heads as i64, 0, d.head_dim as i64];
        match manifest.kv_cache.dtype {
            TensorDtype::Float16 => Tensor::from_array((shape, Vec::<f16>::new())).unwrap().into_dyn(),
            _ => Tensor::from_array((shape, Vec::<f32>::new())).unwrap().into_dyn(),
        }
    };
    let mut inputs: Vec<(String, DynValue)> = vec![
        ("input_ids".into(), Tensor::from_array((vec![1, n], ids.to_vec())).unwrap().into_dyn()),
        ("attention_mask".into(), Tensor::from_array((vec![1, n], mask.to_vec())).unwrap().into_dyn()),
        ("position_ids".into(), Tensor::from_array((vec![1, n], positions.to_vec())).unwrap().into_dyn()),
    ];
    for layer in 0..d.num_layers {
        for kind in ["key", "value"] {
            inputs.push((format!("past_key_values.{layer}.{kind}"), empty_past()));
        }
    }
    let outputs = session.run(inputs).unwrap();
    let (_, logits) = outputs["logits"].try_extract_tensor::<f32>().unwrap();
    (logits.to_vec(), outputs["present.0.key"].shape().to_vec())
}

/// The mask built from attention_mask hides padding: a left-padded prompt (positions counted
/// from its first real token, as transformers' generate does) gives the unpadded logits at the
/// real tokens, and the padding rows, which see nothing, stay finite.
#[test]
fn attention_mask_hides_left_padding() {
    let fixture = fixtures_dir().join("qwen3-sliding");
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join("g");
    export_to(&fixture, &graphs, unfused_settings(false));
    let vocab = reference.prefill_logits[0].len();
    let prompt: Vec<i64> = reference.prompt_ids.iter().map(|&t| t as i64).collect();
    let pad = 3;
    let ids = [vec![0; pad], prompt.clone()].concat();
    let mask = [vec![0; pad], vec![1; prompt.len()]].concat();
    let positions = [vec![0; pad], (0..prompt.len() as i64).collect()].concat();
    let (logits, present_shape) = prefill(&graphs, &ids, &mask, &positions);
    assert_eq!(present_shape[2], ids.len() as i64, "the cache keeps the padding positions");
    assert!(logits.iter().all(|v| v.is_finite()), "non-finite logits with a padded prompt");
    for (pos, expected) in reference.prefill_logits.iter().enumerate() {
        let row = &logits[(pad + pos) * vocab..(pad + pos + 1) * vocab];
        let diff = max_abs_diff(row, expected);
        assert!(diff <= LOGIT_TOLERANCE, "prompt position {pos} after {pad} padding tokens: max |diff| {diff}");
    }
}

/// 16-bit graphs (the GPU path; CUDA cannot run here). fp16 runs on the CPU, which computes
/// the fp16 nodes it has no kernel for in float32 (it inserts Casts), so this checks that the
/// graph type-checks and runs and its logits agree with the fused fp16 graph's and, within fp16
/// weight rounding, transformers' -- not fp16 numerics. bf16 cannot run (no bf16 MatMul on the
/// CPU), but ONNX Runtime resolves the graph (type and shape inference) before it looks for
/// kernels, so a missing-kernel error proves that the graph type-checks.
#[test]
fn sixteen_bit_graphs_type_check_and_fp16_runs() {
    let fixture = fixtures_dir().join("glm4moe-a");
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let export_16 = |precision: Precision, fused: bool| {
        let settings = cpu_settings(false).precision(precision).target_ep(TargetEp::Cuda).fused_attention(fused);
        let graphs = tmp.path().join(format!("{}-{fused}", precision.as_str()));
        export_to(&fixture, &graphs, settings);
        graphs
    };

    let prompt: Vec<i64> = reference.prompt_ids.iter().map(|&t| t as i64).collect();
    let positions: Vec<i64> = (0..prompt.len() as i64).collect();
    let ones = vec![1; prompt.len()];
    let (unfused, _) = prefill(&export_16(Precision::Fp16, false), &prompt, &ones, &positions);
    let (fused, _) = prefill(&export_16(Precision::Fp16, true), &prompt, &ones, &positions);
    let expected: Vec<f32> = reference.prefill_logits.concat();
    let spread = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (to_fused, to_reference) = (max_abs_diff(&unfused, &fused), max_abs_diff(&unfused, &expected));
    eprintln!("fp16 unfused attention: max |diff| {to_fused:.2e} to fused fp16, {to_reference:.2e} to transformers fp32 (logit scale {spread:.1})");
    assert!(
        to_fused < 0.02 * spread && to_reference < 0.05 * spread,
        "fp16: {to_fused} to fused, {to_reference} to transformers"
    );

    let graphs = export_16(Precision::Bf16, false);
    let manifest = Manifest::load(&graphs).unwrap();
    assert_eq!(manifest.kv_cache.dtype, TensorDtype::Bfloat16);
    let kv_io = manifest
        .inputs
        .iter()
        .chain(&manifest.outputs)
        .filter(|io| io.name.contains("key") || io.name.contains("value"));
    assert!(kv_io.into_iter().all(|io| io.dtype == TensorDtype::Bfloat16));
    let env = pio_runtime::ort_lib::environment().unwrap();
    match Session::builder(env).unwrap().commit_from_file(graphs.join("model.onnx")) {
        Ok(_) => eprintln!("bf16 unfused attention: loads on the CPU"),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("Could not find an implementation"), "bf16: {e}");
            eprintln!("bf16 unfused attention: type-checks (no CPU kernel: {e})");
        }
    }
}

#[test]
fn switches_that_need_group_query_attention_are_refused() {
    let fixture = fixtures_dir().join("qwen3-tied-hub");
    let tmp = tempfile::tempdir().unwrap();
    let settings = unfused_settings(true).kv_cache_int8(true);
    let err = export_error(&fixture, &tmp.path().join("g"), settings);
    assert!(err.contains("--kv-cache-int8") && err.contains("--no-fused-attention"), "{err}");
    let settings = unfused_settings(true).target_ep(TargetEp::Cuda).precision(Precision::Bf16).fused_qk_norm(true);
    let err = export_error(&fixture, &tmp.path().join("g"), settings);
    assert!(err.contains("--fused-qk-norm") && err.contains("--no-fused-attention"), "{err}");
    assert!(!tmp.path().join("g").exists());
}

/// The other switches combine with it: one q/k/v MatMul (split again for the heads, with GLM's
/// bias), fused gate/up, unfused norms keep transformers' logits; int4 weights give the fused
/// int4 graph's logits.
#[test]
fn other_switches_combine_with_unfused_attention() {
    for name in ["qwen3-untied-rp", "glm4moe-a"] {
        let fixture = fixtures_dir().join(name);
        let reference = load_reference(&fixture);
        let tmp = tempfile::tempdir().unwrap();
        let settings = unfused_settings(true).fused_qkv(true).fused_gate_up(true).fused_norms(false);
        export_to(&fixture, &tmp.path().join("switches"), settings);
        assert!(op_types(&tmp.path().join("switches")).contains(&"Split".to_string()));
        let prompt = &reference.prompt_ids;
        let diff =
            max_abs_diff(&prefill_last(&tmp.path().join("switches"), prompt), reference.prefill_logits.last().unwrap());
        assert!(diff <= LOGIT_TOLERANCE, "{name}: fused q/k/v and gate/up, unfused norms: max |diff| {diff}");

        for fused in [true, false] {
            let settings = cpu_settings(true).precision(Precision::Int4).fused_attention(fused);
            export_to(&fixture, &tmp.path().join(format!("int4-{fused}")), settings);
        }
        let diff = max_abs_diff(
            &prefill_last(&tmp.path().join("int4-false"), prompt),
            &prefill_last(&tmp.path().join("int4-true"), prompt),
        );
        assert!(diff <= LOGIT_TOLERANCE, "{name}: int4 with unfused vs fused attention: max |diff| {diff}");
    }
}
