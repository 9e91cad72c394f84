use serde_json::json;

use crate::config::{Architecture, GenerationDefaults, ModelConfig};
use crate::error::{ConfigError, PresetError};
use crate::presets::{find_preset, PRESETS};
use crate::size::{ParameterCount, Precision};

fn qwen3_hub_style() -> serde_json::Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 1024, "tie_word_embeddings": true,
        "rope_theta": 1000000.0, "rope_scaling": null, "eos_token_id": 3
    })
}

#[test]
fn hub_and_transformers5_rope_styles_parse_to_the_same_config() {
    let hub = ModelConfig::from_value(&qwen3_hub_style()).unwrap();
    let mut v5 = qwen3_hub_style();
    let obj = v5.as_object_mut().unwrap();
    obj.remove("rope_theta");
    obj.remove("rope_scaling");
    obj.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": 1000000.0}));
    let tf5 = ModelConfig::from_value(&v5).unwrap();
    assert_eq!(hub, tf5);
    assert_eq!(hub.text.rope.theta, 1e6);
    assert_eq!(hub.eos_token_ids, vec![3]);
}

#[test]
fn partial_rotary_factor_read_from_either_place() {
    let mut top = qwen3_hub_style();
    top["partial_rotary_factor"] = json!(0.5);
    let mut nested = qwen3_hub_style();
    nested.as_object_mut().unwrap().remove("rope_theta");
    nested["rope_parameters"] = json!({"rope_theta": 1e6, "partial_rotary_factor": 0.5, "rope_type": "default"});
    let a = ModelConfig::from_value(&top).unwrap();
    let b = ModelConfig::from_value(&nested).unwrap();
    assert_eq!(a.text.rotary_dim(), 16);
    assert_eq!(b.text.rotary_dim(), 16);
}

#[test]
fn unknown_architecture_lists_supported_ones() {
    let mut v = qwen3_hub_style();
    v["architectures"] = json!(["LlamaForCausalLM"]);
    let err = ModelConfig::from_value(&v).unwrap_err().to_string();
    assert!(err.contains("LlamaForCausalLM"), "{err}");
    for a in Architecture::ALL {
        assert!(err.contains(a.hf_name()), "{err}");
    }
}

#[test]
fn missing_and_mistyped_fields_are_named() {
    let mut v = qwen3_hub_style();
    v.as_object_mut().unwrap().remove("hidden_size");
    let err = ModelConfig::from_value(&v).unwrap_err();
    assert!(matches!(&err, ConfigError::MissingField { field, .. } if field == "hidden_size"), "{err:?}");
    assert_eq!(err.to_string(), "config.json: missing field `hidden_size`");
    let mut v = qwen3_hub_style();
    v["num_hidden_layers"] = json!("two");
    let err = ModelConfig::from_value(&v).unwrap_err();
    assert!(matches!(&err, ConfigError::WrongType { field, .. } if field == "num_hidden_layers"), "{err:?}");
    assert_eq!(err.to_string(), r#"config.json: field `num_hidden_layers` must be a non-negative integer, got "two""#);
    let mut v = qwen3_hub_style();
    v["num_key_value_heads"] = json!(3);
    let err = ModelConfig::from_value(&v).unwrap_err();
    assert_eq!(err.field(), Some("num_key_value_heads"));
    assert_eq!(
        err.to_string(),
        "config.json: field `num_key_value_heads` is 3, but it must divide `num_attention_heads` (4)"
    );
}

#[test]
fn values_that_would_break_the_rotary_tables_or_norms_are_refused() {
    // Each of these exported before and gave NaN cos/sin tables (or an ONNX Runtime error at load
    // that did not name config.json).
    let error = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = qwen3_hub_style();
        edit(&mut v);
        ModelConfig::from_value(&v).unwrap_err().to_string()
    };
    for theta in [json!(0), json!(-10000.0)] {
        let e = error(&|v| v["rope_theta"] = theta.clone());
        assert!(e.contains("`rope_theta`") && e.contains("must be positive"), "{e}");
    }
    let e = error(&|v| v["rope_scaling"] = json!({"rope_type": "linear", "factor": 0.0}));
    assert!(e.contains("`rope_scaling.factor`") && e.contains("must be positive"), "{e}");
    let e = error(&|v| v["rope_scaling"] = json!({"rope_type": "linear", "factor": -2.0}));
    assert!(e.contains("`rope_scaling.factor`"), "{e}");
    let e = error(&|v| v["rope_scaling"] = json!({"type": "linear"}));
    assert!(e.contains("missing field `rope_scaling.factor`"), "{e}");
    let e = error(&|v| v["rms_norm_eps"] = json!(-1.0));
    assert!(e.contains("`rms_norm_eps`") && e.contains("must be positive"), "{e}");
    let e = error(&|v| v["max_position_embeddings"] = json!(0));
    assert!(e.contains("`max_position_embeddings`") && e.contains("must be positive"), "{e}");
}

#[test]
fn errors_of_a_file_name_it_and_keep_their_source() {
    use std::error::Error;
    let dir = std::env::temp_dir().join(format!("pio-models-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(&path, "{\"architectures\": [\"Qwen3ForCausalLM\"], ").unwrap();
    let err = ModelConfig::from_file(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Json { .. }), "{err:?}");
    assert_eq!(err.file(), path);
    assert!(err.source().is_some_and(|s| s.is::<serde_json::Error>()), "the JSON error is kept as the source");
    let mut v = qwen3_hub_style();
    v["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.5});
    std::fs::write(&path, v.to_string()).unwrap();
    let err = ModelConfig::from_file(&path).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("{}: field `rope_scaling.partial_rotary_factor` is 1.5, but it must be in (0, 1]", path.display())
    );
    let err = ModelConfig::from_file(&dir.join("absent.json")).unwrap_err();
    assert!(matches!(&err, ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_preset_config_parses_with_its_architecture() {
    for p in PRESETS {
        let c = p.config().unwrap_or_else(|e| panic!("{}: {e:#}", p.name));
        let count = ParameterCount::of(&c);
        assert!(count.total > 1_000_000_000, "{}: {}", p.name, count.total);
        assert!(count.active <= count.total);
    }
    let err = find_preset("nope").unwrap_err();
    assert!(matches!(&err, PresetError::Unknown { name } if name == "nope"), "{err:?}");
    assert!(err.to_string().contains("glm-4-7"), "{err}");
}

/// Published sizes, from the model cards; our counts come from the config alone.
#[test]
fn parameter_counts_match_the_model_cards() {
    let within = |name: &str, lo: f64, hi: f64, active: bool| {
        let c = find_preset(name).unwrap().config().unwrap();
        let n = ParameterCount::of(&c);
        let x = if active { n.active } else { n.total } as f64 / 1e9;
        assert!(x > lo && x < hi, "{name}: {x}B not in ({lo}, {hi})");
    };
    within("qwen3-4b-instruct-2507", 3.9, 4.1, false); // "4.0B"
    within("qwen3-coder-30b", 30.0, 31.0, false); // "30.5B"
    within("qwen3-coder-30b", 3.0, 3.6, true); // "3.3B activated"
    within("glm-4-7", 345.0, 360.0, false); // "355B" (we skip the MTP layer)
    within("glm-4-7", 30.0, 34.0, true); // "32B active"
    within("qwen3-vl-2b", 1.9, 2.5, false);
}

#[test]
fn bf16_weights_of_qwen3_4b_are_about_8_gb_and_int4_about_a_quarter() {
    let c = find_preset("qwen3-4b-instruct-2507").unwrap().config().unwrap();
    let n = ParameterCount::of(&c);
    let bf16 = n.weight_bytes(Precision::Bf16) as f64 / 1e9;
    assert!((bf16 - 8.04).abs() < 0.1, "{bf16}");
    let int4 = n.weight_bytes(Precision::Int4) as f64 / 1e9;
    assert!(int4 < bf16 / 2.0 && int4 > bf16 / 5.0, "{int4}");
}

#[test]
fn moe_layer_placement_follows_each_family() {
    let glm = find_preset("glm-4-7").unwrap().config().unwrap();
    assert!(!glm.text.is_moe_layer(2) && glm.text.is_moe_layer(3));
    let mut v = find_preset("qwen3-coder-30b").unwrap().config_json().unwrap();
    v["decoder_sparse_step"] = json!(2);
    v["mlp_only_layers"] = json!([3]);
    let c = ModelConfig::from_value(&v).unwrap();
    assert!(!c.text.is_moe_layer(0) && c.text.is_moe_layer(1) && !c.text.is_moe_layer(3) && c.text.is_moe_layer(5));
}

#[test]
fn sliding_layers_follow_transformers_per_architecture() {
    use crate::config::LayerAttention::{FullAttention as F, SlidingAttention as S};
    // Qwen3 without use_sliding_window: no window, whatever sliding_window says.
    let mut v = qwen3_hub_style();
    v["num_hidden_layers"] = json!(3);
    v["sliding_window"] = json!(8);
    v["max_window_layers"] = json!(1);
    let off = ModelConfig::from_value(&v).unwrap().text;
    assert_eq!((off.sliding_window, off.layer_types.as_slice()), (None, [F, F, F].as_slice()));
    assert!(!off.has_sliding_layers());
    // With it, layers from max_window_layers on slide.
    v["use_sliding_window"] = json!(true);
    let on = ModelConfig::from_value(&v).unwrap().text;
    assert_eq!(on.layer_types, [F, S, S]);
    assert_eq!((0..3).map(|i| on.layer_window(i)).collect::<Vec<_>>(), [None, Some(8), Some(8)]);
    // An explicit layer_types list wins over max_window_layers.
    v["layer_types"] = json!(["sliding_attention", "full_attention", "sliding_attention"]);
    assert_eq!(ModelConfig::from_value(&v).unwrap().text.layer_types, [S, F, S]);
    // Qwen3-MoE slides on every layer; GLM-4-MoE never does.
    let mut moe = find_preset("qwen3-coder-30b").unwrap().config_json().unwrap();
    moe["use_sliding_window"] = json!(true);
    moe["sliding_window"] = json!(4096);
    let moe = ModelConfig::from_value(&moe).unwrap().text;
    assert!((0..moe.num_hidden_layers).all(|i| moe.layer_window(i) == Some(4096)));
    let mut glm = find_preset("glm-4-7").unwrap().config_json().unwrap();
    glm["use_sliding_window"] = json!(true);
    glm["sliding_window"] = json!(4096);
    assert!(!ModelConfig::from_value(&glm).unwrap().text.has_sliding_layers());
}

#[test]
fn bad_layer_types_are_named() {
    let mut v = qwen3_hub_style();
    v["use_sliding_window"] = json!(true);
    v["sliding_window"] = json!(8);
    v["layer_types"] = json!(["full_attention", "linear_attention"]);
    let err = ModelConfig::from_value(&v).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Unsupported { field, value, .. } if field == "layer_types[1]" && value == "linear_attention"),
        "{err:?}"
    );
    v["layer_types"] = json!(["full_attention"]);
    let err = ModelConfig::from_value(&v).unwrap_err().to_string();
    assert!(err.contains("layer_types") && err.contains("num_hidden_layers"), "{err}");
    v["layer_types"] = json!(["full_attention", "sliding_attention"]);
    v["use_sliding_window"] = json!(false);
    let err = ModelConfig::from_value(&v).unwrap_err().to_string();
    assert!(err.contains("`layer_types[1]`") && err.contains("use_sliding_window"), "{err}");
    v["use_sliding_window"] = json!(true);
    v["sliding_window"] = json!(0);
    let err = ModelConfig::from_value(&v).unwrap_err().to_string();
    assert!(err.contains("`sliding_window`"), "{err}");
}

fn qwen3_vl_hub_style() -> serde_json::Value {
    find_preset("qwen3-vl-2b").unwrap().config_json().unwrap()
}

#[test]
fn qwen3_vl_hub_and_transformers5_configs_parse_to_the_same_config() {
    let hub = ModelConfig::from_value(&qwen3_vl_hub_style()).unwrap();
    assert_eq!(hub.text.rope.mrope_section.as_deref(), Some(&[24, 20, 20][..]));
    assert_eq!(hub.text.rope.theta, 5e6);
    assert!(hub.text.tie_word_embeddings);
    let vision = hub.vision.as_ref().unwrap();
    assert_eq!(
        (vision.rope_theta, vision.head_dim(), vision.patch_dim(), vision.position_grid_side()),
        (1e4, 64, 1536, 48)
    );
    // transformers 5: rope_parameters in text_config, tie_word_embeddings at the top level only,
    // the vision rope theta in vision_config.rope_parameters.
    let mut v5 = qwen3_vl_hub_style();
    let text = v5["text_config"].as_object_mut().unwrap();
    let scaling = text.remove("rope_scaling").unwrap();
    text.remove("rope_theta");
    text.remove("tie_word_embeddings");
    let mut params = scaling;
    params["rope_theta"] = json!(5000000.0);
    text.insert("rope_parameters".into(), params);
    v5["vision_config"]["rope_parameters"] = json!({"rope_type": "axial", "rope_theta": 10000.0});
    assert_eq!(ModelConfig::from_value(&v5).unwrap(), hub);
}

#[test]
fn qwen3_vl_defaults_and_bad_fields_are_named() {
    // transformers' defaults: mrope_section [24, 20, 20], text rope theta 500000.
    let mut v = qwen3_vl_hub_style();
    v["text_config"].as_object_mut().unwrap().remove("rope_scaling");
    v["text_config"].as_object_mut().unwrap().remove("rope_theta");
    let c = ModelConfig::from_value(&v).unwrap();
    assert_eq!(c.text.rope.mrope_section.as_deref(), Some(&[24, 20, 20][..]));
    assert_eq!(c.text.rope.theta, 500000.0);
    let error = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = qwen3_vl_hub_style();
        edit(&mut v);
        ModelConfig::from_value(&v).unwrap_err().to_string()
    };
    let e = error(&|v| v["text_config"]["rope_scaling"]["mrope_section"] = json!([32, 32]));
    assert!(e.contains("mrope_section"), "{e}");
    let e = error(&|v| v["vision_config"]["out_hidden_size"] = json!(1024));
    assert!(e.contains("out_hidden_size") && e.contains("hidden_size"), "{e}");
    let e = error(&|v| v["vision_config"]["num_position_embeddings"] = json!(2300));
    assert!(e.contains("num_position_embeddings") && e.contains("square"), "{e}");
    let e = error(&|v| v["vision_config"]["num_position_embeddings"] = json!(0));
    assert!(e.contains("vision_config.num_position_embeddings") && e.contains("positive"), "{e}");
    let e = error(&|v| v["vision_config"]["rope_theta"] = json!(-1.0));
    assert!(e.contains("rope_theta") && e.contains("positive"), "{e}");
    let e = error(&|v| v["vision_config"]["deepstack_visual_indexes"] = json!([5, 24]));
    assert!(e.contains("deepstack_visual_indexes") && e.contains("24"), "{e}");
    let e = error(&|v| v["vision_config"]["num_heads"] = json!(12));
    assert!(e.contains("num_heads"), "{e}");
    let e = error(&|v| {
        v.as_object_mut().unwrap().remove("image_token_id");
    });
    assert!(e.contains("image_token_id"), "{e}");
}

#[test]
fn manifest_errors_name_the_file_and_what_to_do() {
    use crate::error::ManifestError;
    use crate::manifest::{Manifest, MANIFEST_FILE};
    let dir = std::env::temp_dir().join(format!("pio-models-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(MANIFEST_FILE);
    let err = Manifest::load(&dir).unwrap_err();
    assert!(matches!(&err, ManifestError::Read { file: f, .. } if *f == file), "{err:?}");
    assert!(err.to_string().contains("a folder written by pio-export?"), "{err}");
    std::fs::write(&file, r#"{"format_version": 2, "name": "from the future"}"#).unwrap();
    let err = Manifest::load(&dir).unwrap_err();
    assert!(matches!(err, ManifestError::UnsupportedVersion { found: 2, supported: 1, .. }), "{err:?}");
    assert!(err.to_string().ends_with("export again"), "{err}");
    std::fs::write(&file, r#"{"format_version": 1, "name": 3}"#).unwrap();
    let err = Manifest::load(&dir).unwrap_err();
    assert!(matches!(err, ManifestError::Parse { .. }), "{err:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn generation_defaults_out_of_the_samplers_ranges_are_named() {
    let dir = std::env::temp_dir().join(format!("pio-models-generation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("generation_config.json");
    for (field, value) in
        [("top_p", json!(1.5)), ("temperature", json!(-1)), ("min_p", json!(2)), ("repetition_penalty", json!(0))]
    {
        std::fs::write(&path, json!({"eos_token_id": 2, field: value}).to_string()).unwrap();
        let e = GenerationDefaults::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("generation_config.json") && e.contains(&format!("`{field}`")), "{e}");
    }
    std::fs::write(&path, json!({"eos_token_id": [1, 2], "top_p": 0.8, "temperature": 0.7}).to_string()).unwrap();
    let d = GenerationDefaults::from_file(&path).unwrap();
    assert_eq!((d.top_p, d.temperature, d.eos_token_ids), (Some(0.8), Some(0.7), vec![1, 2]));
    std::fs::remove_dir_all(&dir).unwrap();
}
