//! Logit parity with Hugging Face transformers on the small random-weight Qwen3 checkpoints in
//! tests/fixtures (made by scripts/make_fixtures.py): fp32 on the CPU, max |diff| <= 1e-4 for the
//! prefill and every cached step, argmax equal everywhere, and greedy 32 tokens equal to
//! transformers' `generate`, from one prefill and token by token.

mod common;

use common::*;

const FIXTURES: &[&str] = &["qwen3-tied-hub", "qwen3-untied-rp", "qwen3-fp16", "qwen3-sliding"];

#[test]
fn fixtures_are_all_covered() {
    let found = fixtures_named("qwen3-");
    let mut expected: Vec<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(found, expected, "a Qwen3 fixture exists without a parity test (or the reverse)");
}

#[test]
fn qwen3_tied_hub_style_bf16_logits_match_transformers() {
    check_logit_parity("qwen3-tied-hub");
}

#[test]
fn qwen3_untied_sharded_transformers5_style_logits_match_transformers() {
    check_logit_parity("qwen3-untied-rp");
}

#[test]
fn qwen3_fp16_checkpoint_logits_match_transformers() {
    check_logit_parity("qwen3-fp16");
}

/// Window 8 on layers 1 and 2 (max_window_layers 1) over a 20-token prompt, 4 cached steps and
/// 32 greedy tokens: every part of the reference reaches past the window.
#[test]
fn qwen3_sliding_window_logits_match_transformers() {
    check_logit_parity("qwen3-sliding");
}

#[test]
fn qwen3_greedy_32_tokens_match_transformers_generate() {
    for name in FIXTURES {
        check_greedy_parity(name);
    }
}

/// The same bar with attention from standard ONNX ops (`--no-fused-attention`): every
/// position's logits, the cached steps, greedy from one prefill and token by token.
#[test]
fn unfused_attention_matches_transformers() {
    for name in FIXTURES {
        check_logit_parity_with(name, unfused_attention);
        check_greedy_parity_with(name, unfused_attention);
    }
}

/// The unfused-norm graph (Add + SimplifiedLayerNormalization) computes the same logits.
#[test]
fn unfused_norms_give_the_same_logits() {
    let name = "qwen3-tied-hub";
    let fixture = fixtures_dir().join(name);
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let settings = cpu_settings(true).fused_norms(false).fused_gate_up(true);
    export_to(&fixture, &tmp.path().join("g"), settings);
    let logits = prefill(&tmp.path().join("g"), &reference.prompt_ids);
    assert_eq!(logits.rows, 1);
    let expected = reference.prefill_logits.last().unwrap();
    let diff = max_abs_diff(logits.last(), expected);
    assert!(diff <= LOGIT_TOLERANCE, "max |diff| {diff}");
}
