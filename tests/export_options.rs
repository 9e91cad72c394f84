//! The export switches on the CPU: each changes the graph and keeps the numbers.
//! - fused q/k/v and gate/up projections: same logits as transformers (1e-4);
//! - int4 weights (MatMulNBits): the graph computes exactly the model whose weights are the
//!   dequantized int4 values (checked against an fp32 export of that dequantized checkpoint);
//! - switches that cannot apply are refused with the reason.

mod common;

use common::*;
use pio_models::size::Precision;
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::model::DecoderModel;

#[test]
fn fused_qkv_and_gate_up_keep_transformers_logits() {
    for name in ["qwen3-tied-hub", "qwen3-untied-rp"] {
        let fixture = fixtures_dir().join(name);
        let reference = load_reference(&fixture);
        let tmp = tempfile::tempdir().unwrap();
        let settings = cpu_settings(true).fused_qkv(true).fused_gate_up(true);
        export_to(&fixture, &tmp.path().join("g"), settings);
        let graph = std::fs::read(tmp.path().join("g/model.onnx")).unwrap();
        let text = String::from_utf8_lossy(&graph);
        assert!(
            text.contains("qkv_proj") && text.contains("gate_up_proj"),
            "{name}: fused projections missing from the graph"
        );
        let got = prefill_last(&tmp.path().join("g"), &reference.prompt_ids);
        let diff = max_abs_diff(&got, reference.prefill_logits.last().unwrap());
        assert!(diff <= 1e-4, "{name}: max |diff| {diff}");
    }
}

#[test]
fn int4_graph_computes_the_dequantized_model() {
    let name = "qwen3-untied-rp";
    let fixture = fixtures_dir().join(name);
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let block = 32;

    let int4 = cpu_settings(true).precision(Precision::Int4).int4_block_size(block).fused_qkv(true);
    export_to(&fixture, &tmp.path().join("int4"), int4);
    let manifest = pio_models::Manifest::load(&tmp.path().join("int4")).unwrap();
    assert_eq!(manifest.precision, Precision::Int4);
    assert_eq!(manifest.options.int4_block_size, Some(block));

    int4_round_trip_checkpoint(&fixture, &tmp.path().join("dq"), block);
    export_to(&tmp.path().join("dq"), &tmp.path().join("dq-fp32"), cpu_settings(true));

    let got = prefill_last(&tmp.path().join("int4"), &reference.prompt_ids);
    let expected = prefill_last(&tmp.path().join("dq-fp32"), &reference.prompt_ids);
    let diff = max_abs_diff(&got, &expected);
    assert!(diff <= 1e-3, "int4 graph vs dequantized fp32 graph: max |diff| {diff}");
    // And int4 stays close to the unquantized model (a loose, quantization-sized bound).
    let to_reference = max_abs_diff(&got, reference.prefill_logits.last().unwrap());
    let spread = reference.prefill_logits.last().unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(to_reference < 0.25 * spread, "int4 vs transformers: {to_reference} (logit scale {spread})");
}

#[test]
fn switches_that_cannot_apply_are_refused_with_the_reason() {
    let fixture = fixtures_dir().join("qwen3-tied-hub");
    let tmp = tempfile::tempdir().unwrap();
    let settings = cpu_settings(true).fused_qk_norm(true);
    let err = export_error(&fixture, &tmp.path().join("g"), settings);
    assert!(err.contains("CPU"), "{err}");
    let settings = cpu_settings(true).int4_lm_head(true);
    let err = export_error(&fixture, &tmp.path().join("g"), settings);
    assert!(err.contains("int4"), "{err}");
    assert!(!tmp.path().join("g").exists());
}

/// The int8 KV cache (GroupQueryAttention's quantized cache, per-channel scales estimated from
/// the weights): the cache crosses the graph boundary as int8 and the logits stay close to
/// transformers' through the prefill and the cached steps.
#[test]
fn int8_kv_cache_stays_close_to_transformers() {
    for name in ["qwen3-tied-hub", "glm4moe-a"] {
        let fixture = fixtures_dir().join(name);
        let reference = load_reference(&fixture);
        let tmp = tempfile::tempdir().unwrap();
        let settings = cpu_settings(true).kv_cache_int8(true);
        export_to(&fixture, &tmp.path().join("g"), settings);
        let manifest = pio_models::Manifest::load(&tmp.path().join("g")).unwrap();
        assert_eq!(manifest.kv_cache.dtype, pio_models::manifest::TensorDtype::Int8);
        assert!(manifest.options.kv_cache_int8);
        let present = manifest.outputs.iter().find(|o| o.name == "present.0.key").unwrap();
        assert_eq!(present.dtype, pio_models::manifest::TensorDtype::Int8);

        let mut model = DecoderModel::load(&tmp.path().join("g"), &ExecutionProvider::default()).unwrap();
        let mut cache = model.new_cache().unwrap();
        let spread = reference.prefill_logits.last().unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut diffs = vec![max_abs_diff(
            model.forward(&reference.prompt_ids, &mut cache).unwrap().last(),
            reference.prefill_logits.last().unwrap(),
        )];
        for step in &reference.steps {
            diffs.push(max_abs_diff(model.forward(&[step.input_id], &mut cache).unwrap().last(), &step.logits));
        }
        let worst = diffs.iter().fold(0f32, |m, &d| m.max(d));
        eprintln!("{name}: int8 KV cache, max |diff| per position {diffs:?} (logit scale {spread})");
        // Quantization-sized, not parity-sized: a few percent of the logit scale.
        assert!(worst < 0.1 * spread, "{name}: int8 KV cache max |diff| {worst} (logit scale {spread})");
        assert!(worst > 0.0, "{name}: an int8 cache that changes nothing was not quantized");
    }
}

/// int4 embeddings (GatherBlockQuantized) with a tied int4 lm_head: one quantized table serves
/// both, and the graph computes exactly the model whose projections and embedding table are
/// their int4 round trip.
#[test]
fn int4_embeddings_share_one_table_with_a_tied_lm_head() {
    let name = "qwen3-tied-hub";
    let fixture = fixtures_dir().join(name);
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let block = 32;
    let int4 =
        cpu_settings(true).precision(Precision::Int4).int4_block_size(block).int4_lm_head(true).int4_embeddings(true);
    export_to(&fixture, &tmp.path().join("int4"), int4.clone());
    let graph = std::fs::read(tmp.path().join("int4/model.onnx")).unwrap();
    let text = String::from_utf8_lossy(&graph);
    assert!(text.contains("GatherBlockQuantized"), "no quantized embedding lookup in the graph");
    // The name appears three times: the initializer, the lookup's reshape input, the lm_head's input.
    assert_eq!(text.matches("embed_tokens.weight_q4").count(), 3, "one int4 table for the lookup and the lm_head");
    assert!(!text.contains("lm_head.weight_q4"), "a tied lm_head must reuse the embedding table");

    int4_round_trip_checkpoint_where(&fixture, &tmp.path().join("dq"), block, |n| {
        n.contains("_proj") || n.contains("embed_tokens")
    });
    export_to(&tmp.path().join("dq"), &tmp.path().join("dq-fp32"), cpu_settings(true));
    let got = prefill_last(&tmp.path().join("int4"), &reference.prompt_ids);
    let expected = prefill_last(&tmp.path().join("dq-fp32"), &reference.prompt_ids);
    let diff = max_abs_diff(&got, &expected);
    assert!(diff <= 1e-3, "int4 graph (embeddings + lm_head) vs dequantized fp32 graph: max |diff| {diff}");

    // Tied embeddings in int4 without an int4 lm_head would need a second table: refused.
    let err = export_error(&fixture, &tmp.path().join("refused"), int4.int4_lm_head(false));
    assert!(err.contains("--int4-lm-head"), "{err}");
}

/// `--no-sliding-window` on a model with sliding layers: full attention on every layer, recorded
/// in the manifest, so the logits agree with transformers inside the window and not past it. On
/// a model without sliding layers the switch is refused, naming the model.
#[test]
fn no_sliding_window_gives_full_attention_and_needs_a_window() {
    let fixture = fixtures_dir().join("qwen3-sliding");
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    export_to(&fixture, &tmp.path().join("sliding"), cpu_settings(false));
    let manifest = pio_models::Manifest::load(&tmp.path().join("sliding")).unwrap();
    assert_eq!(manifest.options.layer_windows, [None, Some(8), Some(8)]);

    let settings = cpu_settings(false).sliding_window(false);
    export_to(&fixture, &tmp.path().join("full"), settings);
    let manifest = pio_models::Manifest::load(&tmp.path().join("full")).unwrap();
    assert_eq!(manifest.options.layer_windows, [None, None, None]);
    let logits = prefill(&tmp.path().join("full"), &reference.prompt_ids);
    let diffs: Vec<f32> = (0..logits.rows).map(|p| max_abs_diff(logits.row(p), &reference.prefill_logits[p])).collect();
    assert!(diffs[..8].iter().all(|&d| d <= LOGIT_TOLERANCE), "inside the window: {diffs:?}");
    assert!(diffs[8..].iter().any(|&d| d > 0.1), "full attention past the window changed nothing: {diffs:?}");

    let settings = cpu_settings(true).sliding_window(false);
    let err = export_error(&fixtures_dir().join("qwen3-tied-hub"), &tmp.path().join("refused"), settings);
    let why = "qwen3-tied-hub (Qwen3ForCausalLM) has no sliding-window layers (use_sliding_window is false)";
    assert!(err.contains("--no-sliding-window") && err.contains(why), "{err}");
}

/// Manifests written before the attention options existed load with the values those graphs
/// had: GroupQueryAttention, no per-layer windows recorded, full attention everywhere.
#[test]
fn manifests_without_the_attention_options_still_load() {
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join("g");
    export_to(&fixtures_dir().join("qwen3-tied-hub"), &graphs, cpu_settings(true));
    let path = graphs.join("pio.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (section, key) in [("options", "layer_windows"), ("options", "fused_attention")] {
        assert!(v[section].as_object_mut().unwrap().remove(key).is_some(), "{key} not written");
    }
    assert!(v["config"]["text"].as_object_mut().unwrap().remove("layer_types").is_some());
    std::fs::write(&path, v.to_string()).unwrap();
    let manifest = pio_models::Manifest::load(&graphs).unwrap();
    assert!(manifest.options.fused_attention && manifest.options.layer_windows.is_empty());
    assert!(manifest.config.text.layer_types.is_empty() && !manifest.config.text.has_sliding_layers());
}

/// A manifest's graph and tokenizer files are plain names in its folder: an edited `pio.json`
/// that points elsewhere is refused naming the field and the value, before anything is opened.
#[test]
fn manifest_file_names_that_leave_the_folder_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join("g");
    export_to(&fixtures_dir().join("qwen3-tied-hub"), &graphs, cpu_settings(true));
    let path = graphs.join("pio.json");
    let original = std::fs::read_to_string(&path).unwrap();
    pio_models::Manifest::load(&graphs).unwrap();
    type Edit = dyn Fn(&mut serde_json::Value);
    let cases: [(&str, &Edit); 4] = [
        ("decoder", &|v| v["decoder"] = "../model.onnx".into()),
        ("decoder", &|v| v["decoder"] = "/etc/passwd".into()),
        ("decoder", &|v| v["decoder"] = "..".into()),
        ("tokenizer.files[0]", &|v| {
            v["tokenizer"] = serde_json::json!({"files": ["sub/tokenizer.json"], "chat_template_source": null})
        }),
    ];
    for (field, edit) in cases {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        edit(&mut v);
        std::fs::write(&path, v.to_string()).unwrap();
        let err = pio_models::Manifest::load(&graphs).unwrap_err();
        assert!(matches!(&err, pio_models::ManifestError::FileName { field: f, .. } if f == field), "{field}: {err:?}");
        assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
    }
}
