//! Logit parity with Hugging Face transformers on the small random-weight Qwen3 checkpoints in
//! tests/fixtures (made by scripts/make_fixtures.py): fp32 on the CPU, max |diff| <= 1e-4 for the
//! prefill and every cached step, argmax equal everywhere, and greedy 32 tokens equal to
//! transformers' `generate`, from one prefill and token by token.

mod common;

use common::*;
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::model::DecoderModel;

const TOLERANCE: f32 = 1e-4;
const FIXTURES: &[&str] = &["qwen3-tied-hub", "qwen3-untied-rp", "qwen3-fp16"];

fn check_fixture(name: &str) {
    let fixture = fixtures_dir().join(name);
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join(name);
    export_to(&fixture, &graphs, cpu_settings(false));
    let mut model = DecoderModel::load(&graphs, &ExecutionProvider::default()).unwrap();

    // Prefill: every position's logits.
    let mut cache = model.new_cache().unwrap();
    let logits = model.forward(&reference.prompt_ids, &mut cache).unwrap();
    assert_eq!(logits.rows, reference.prompt_ids.len());
    for (pos, expected) in reference.prefill_logits.iter().enumerate() {
        let diff = max_abs_diff(logits.row(pos), expected);
        assert!(diff <= TOLERANCE, "{name}: prefill position {pos}: max |diff| {diff}");
        assert_eq!(argmax(logits.row(pos)), argmax(expected), "{name}: prefill position {pos}: argmax");
    }
    // Single-token steps through the KV cache.
    for (i, step) in reference.steps.iter().enumerate() {
        assert_eq!(cache.len, step.position, "{name}: step {i} position");
        let logits = model.forward(&[step.input_id], &mut cache).unwrap();
        let diff = max_abs_diff(logits.last(), &step.logits);
        assert!(diff <= TOLERANCE, "{name}: cached step {i}: max |diff| {diff}");
        assert_eq!(argmax(logits.last()), argmax(&step.logits), "{name}: cached step {i}: argmax");
    }
}

fn greedy(model: &mut DecoderModel, prompt: &[u32], n: usize, token_by_token: bool) -> Vec<u32> {
    let mut cache = model.new_cache().unwrap();
    let mut logits = None;
    if token_by_token {
        for &t in prompt {
            logits = Some(model.forward(&[t], &mut cache).unwrap());
        }
    } else {
        logits = Some(model.forward(prompt, &mut cache).unwrap());
    }
    let mut out = Vec::new();
    let mut last = logits.unwrap();
    for _ in 0..n {
        let next = argmax(last.last()) as u32;
        out.push(next);
        last = model.forward(&[next], &mut cache).unwrap();
    }
    out
}

fn check_greedy(name: &str) {
    let fixture = fixtures_dir().join(name);
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join(name);
    // The default export: logits of the last position only.
    export_to(&fixture, &graphs, cpu_settings(true));
    let mut model = DecoderModel::load(&graphs, &ExecutionProvider::default()).unwrap();
    let g = &reference.greedy;
    let prefilled = greedy(&mut model, &g.prompt_ids, g.max_new_tokens, false);
    assert_eq!(prefilled, g.generated_ids, "{name}: greedy from one prefill");
    let stepwise = greedy(&mut model, &g.prompt_ids, g.max_new_tokens, true);
    assert_eq!(stepwise, reference.greedy_token_by_token, "{name}: greedy token by token");
}

#[test]
fn fixtures_are_all_covered() {
    let mut found: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("reference.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("qwen3-"))
        .collect();
    found.sort();
    let mut expected: Vec<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(found, expected, "a Qwen3 fixture exists without a parity test (or the reverse)");
}

#[test]
fn qwen3_tied_hub_style_bf16_logits_match_transformers() {
    check_fixture("qwen3-tied-hub");
}

#[test]
fn qwen3_untied_sharded_transformers5_style_logits_match_transformers() {
    check_fixture("qwen3-untied-rp");
}

#[test]
fn qwen3_fp16_checkpoint_logits_match_transformers() {
    check_fixture("qwen3-fp16");
}

#[test]
fn qwen3_greedy_32_tokens_match_transformers_generate() {
    for name in FIXTURES {
        check_greedy(name);
    }
}

/// The unfused-norm graph (Add + SimplifiedLayerNormalization) computes the same logits.
#[test]
fn unfused_norms_give_the_same_logits() {
    let name = "qwen3-tied-hub";
    let fixture = fixtures_dir().join(name);
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let mut settings = cpu_settings(true);
    settings.fused_norms = false;
    settings.fused_gate_up = true;
    export_to(&fixture, &tmp.path().join("g"), settings);
    let mut model = DecoderModel::load(&tmp.path().join("g"), &ExecutionProvider::default()).unwrap();
    let mut cache = model.new_cache().unwrap();
    let logits = model.forward(&reference.prompt_ids, &mut cache).unwrap();
    assert_eq!(logits.rows, 1);
    let expected = reference.prefill_logits.last().unwrap();
    let diff = max_abs_diff(logits.last(), expected);
    assert!(diff <= TOLERANCE, "max |diff| {diff}");
}
