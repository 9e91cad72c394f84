//! config.json is input: absurd sizes are refused naming the field, and sizes computed from
//! large-but-allowed ones saturate instead of overflowing (found by fuzzing; the inputs are
//! kept in fuzz/regressions/model_config/).

use pio_models::size::{kv_bytes_per_token, ParameterCount, Precision};
use pio_models::ModelConfig;
use serde_json::{json, Value};

fn qwen3(overrides: Value) -> Value {
    let mut config = json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_hidden_layers": 2, "vocab_size": 100, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
        "eos_token_id": 1
    });
    for (k, v) in overrides.as_object().unwrap() {
        config[k] = v.clone();
    }
    config
}

fn error(overrides: Value) -> String {
    ModelConfig::from_value(&qwen3(overrides)).unwrap_err().to_string()
}

#[test]
fn absurd_sizes_are_refused_naming_the_field() {
    let e = error(json!({"num_attention_heads": 1u64 << 40}));
    assert!(e.contains("`num_attention_heads`") && e.contains("at most 4294967295"), "{e}");
    let e = error(json!({"num_hidden_layers": 100_000}));
    assert!(e.contains("`num_hidden_layers` is 100000") && e.contains("at most 65536"), "{e}");
    let e = error(json!({"eos_token_id": 1u64 << 33}));
    assert!(e.contains("`eos_token_id`"), "a token id that does not fit u32 is refused, not truncated: {e}");
    let e = error(json!({"eos_token_id": [1, -2]}));
    assert!(e.contains("`eos_token_id`") && e.contains("non-negative integer"), "{e}");
}

#[test]
fn sizes_of_huge_configs_saturate() {
    let max = u32::MAX as u64;
    let config = ModelConfig::from_value(&qwen3(json!({
        "hidden_size": max, "intermediate_size": max, "vocab_size": max,
        "num_attention_heads": max, "num_key_value_heads": max, "head_dim": max, "num_hidden_layers": 65536
    })))
    .unwrap();
    let count = ParameterCount::of(&config);
    assert_eq!(count.total, u64::MAX);
    assert_eq!(count.weight_bytes(Precision::Fp32), u64::MAX);
    assert_eq!(kv_bytes_per_token(&config.text, 2), u64::MAX);
}

/// The vision encoder's widths multiply several fields (a merged token is `hidden_size` x
/// `spatial_merge_size`^2 values): each field within its limit could still overflow the product,
/// which the exporter's tensor list computed with a panic (fuzz/regressions/model_config/
/// vision-merge-size-overflow.json).
#[test]
fn vision_widths_that_overflow_are_refused_naming_the_field() {
    let preset = pio_models::find_preset("qwen3-vl-2b").unwrap();
    let mut config = preset.config_json().unwrap();
    config["vision_config"]["spatial_merge_size"] = json!(u32::MAX);
    let e = ModelConfig::from_value(&config).unwrap_err();
    assert_eq!(e.field(), Some("vision_config.spatial_merge_size"), "{e}");
    assert!(e.to_string().contains("hidden_size` x `spatial_merge_size`^2"), "{e}");
    let mut config = preset.config_json().unwrap();
    config["vision_config"]["patch_size"] = json!(1u64 << 31);
    let e = ModelConfig::from_value(&config).unwrap_err();
    assert_eq!(e.field(), Some("vision_config.patch_size"), "{e}");
}
