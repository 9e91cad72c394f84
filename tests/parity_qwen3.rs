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

/// vLLM's `prompt_logprobs` through the engine are transformers' log-softmax at every prompt
/// position, both ways the engine gets them: inside the prefill from an every-position export
/// (in chunks of 6 tokens), and one token per run from a last-position export. An earlier
/// request left the prompt's first block in the prefix cache: the scored prompt must not use it
/// (a hit would skip its positions), and its generated tokens stay transformers' greedy ones.
#[test]
fn prompt_logprobs_are_transformers_log_softmax_from_either_export() {
    use pio_runtime::engine::{Engine, EngineConfig};
    use pio_runtime::generate::GenerateOptions;

    const TOP: usize = 3;
    let name = "qwen3-sliding";
    let fixture = fixtures_dir().join(name);
    let reference = load_reference(&fixture);
    let prompt = &reference.prompt_ids;
    assert!(prompt.len() > pio_runtime::engine::PREFIX_BLOCK_TOKENS, "the prompt must fill a prefix-cache block");
    let log_softmax = |row: &[f32]| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        row.iter().map(|&x| x as f64 - max - z.ln()).collect::<Vec<f64>>()
    };
    let tmp = tempfile::tempdir().unwrap();
    for last_token_logits in [false, true] {
        let graphs = tmp.path().join(format!("last-token-{last_token_logits}"));
        export_to(&fixture, &graphs, cpu_settings(last_token_logits));
        let config = EngineConfig::builder(&graphs).max_seqs(2).prefill_budget(6).prefix_caching(true).build().unwrap();
        let engine = Engine::start(config).unwrap();
        let n = reference.greedy.max_new_tokens;
        let (warm, _) = generate_collect(&engine, ids_request(prompt, greedy_options(n)));
        assert_eq!(warm.prompt_logprobs, None, "not asked for");
        let options = GenerateOptions { prompt_logprobs: Some(TOP), ..greedy_options(n) };
        let (scored, _) = generate_collect(&engine, ids_request(prompt, options));
        let at = format!("{name}, last-token logits {last_token_logits}");
        assert_eq!(scored.timings.cached_prompt_tokens, 0, "{at}: a scored prompt skips the prefix cache");
        assert_eq!(scored.generated_ids, reference.greedy.generated_ids, "{at}: greedy tokens");
        let positions = scored.prompt_logprobs.unwrap_or_else(|| panic!("{at}: no prompt logprobs"));
        assert_eq!(positions.len(), prompt.len(), "{at}: one entry per prompt token");
        assert!(positions[0].is_none(), "{at}: nothing predicts the first token");
        for (p, got) in positions.iter().enumerate().skip(1) {
            let got = got.as_ref().unwrap_or_else(|| panic!("{at}: position {p} unscored"));
            let expected = log_softmax(&reference.prefill_logits[p - 1]);
            let token = prompt[p] as usize;
            assert_eq!(got.token, prompt[p], "{at}: position {p}");
            assert!(
                (got.logprob as f64 - expected[token]).abs() < 1e-4,
                "{at}: position {p}: {} against {}",
                got.logprob,
                expected[token]
            );
            let rank = expected.iter().filter(|&&x| x >= expected[token]).count();
            assert_eq!(got.rank, rank, "{at}: position {p}: rank");
            let mut order: Vec<usize> = (0..expected.len()).collect();
            order.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]));
            let top: Vec<u32> = got.top_logprobs.iter().map(|t| t.token).collect();
            let want: Vec<u32> = order[..TOP].iter().map(|&i| i as u32).collect();
            assert_eq!(top, want, "{at}: position {p}: top {TOP}");
            for t in &got.top_logprobs {
                assert!(
                    (t.logprob as f64 - expected[t.token as usize]).abs() < 1e-4,
                    "{at}: position {p}: token {}",
                    t.token
                );
            }
        }
        // The prefix was there to take: an unscored run of the prompt takes it.
        let (again, _) = generate_collect(&engine, ids_request(prompt, greedy_options(n)));
        assert!(again.timings.cached_prompt_tokens > 0, "{at}: the prefix cache held the prompt's first block");
        engine.shutdown();
    }
}
