//! Per-token sampling cost over a Qwen3-size vocabulary (151,936 logits).
//!
//! Logits are seeded and roughly realistic: a normal bulk (mean -2, sd 2.5) plus a few dozen
//! "peak" tokens 8..18 nats up, like a language model's next-token distribution. A second,
//! deliberately flat vector (no peaks, high temperature) shows the worst case for top-p.
//!
//! Run: `cargo bench -p pio-runtime --bench sampling -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pio_runtime::sampling::{Sampler, SamplingParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 151_936;

fn normal(r: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = r.random::<f64>().max(1e-300);
    let u2: f64 = r.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn realistic_logits(seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let mut logits: Vec<f32> = (0..VOCAB).map(|_| -2.0 + 2.5 * normal(&mut r)).collect();
    let mut peaks = Vec::new();
    for _ in 0..40 {
        let i = r.random_range(0..VOCAB);
        logits[i] = r.random_range(8.0..18.0);
        peaks.push(i as u32);
    }
    // 1024 previous tokens: half drawn from the peak tokens (repetition), half anywhere.
    let previous: Vec<u32> = (0..1024)
        .map(|j| if j % 2 == 0 { peaks[r.random_range(0..peaks.len())] } else { r.random_range(0..VOCAB as u32) })
        .collect();
    (logits, previous)
}

fn flat_logits(seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..VOCAB).map(|_| normal(&mut r)).collect()
}

fn sampler(p: SamplingParams) -> Sampler {
    match Sampler::new(SamplingParams { seed: Some(1234), ..p }) {
        Ok(s) => s,
        Err(e) => panic!("bench params invalid: {e}"),
    }
}

fn bench_sampling(c: &mut Criterion) {
    let (logits, previous) = realistic_logits(7);
    let flat = flat_logits(8);
    let none: &[u32] = &[];
    let penalties = SamplingParams {
        repetition_penalty: 1.1,
        presence_penalty: 0.5,
        frequency_penalty: 0.2,
        ..SamplingParams::default()
    };

    let mut g = c.benchmark_group("sampling_151936");
    let cases: Vec<(&str, SamplingParams, &[f32], &[u32])> = vec![
        ("greedy", SamplingParams::greedy(), &logits, none),
        ("greedy+penalties_1024", SamplingParams { temperature: 0.0, ..penalties.clone() }, &logits, &previous),
        ("temperature_1.0_full", SamplingParams::default(), &logits, none),
        ("top_k_50", SamplingParams { top_k: 50, ..Default::default() }, &logits, none),
        ("top_p_0.9_t0.7", SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() }, &logits, none),
        (
            "top_p_0.9+top_k_50+penalties_1024",
            SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 50, ..penalties.clone() },
            &logits,
            &previous,
        ),
        (
            "top_p_0.9+penalties_1024",
            SamplingParams { temperature: 0.7, top_p: 0.9, ..penalties.clone() },
            &logits,
            &previous,
        ),
        ("min_p_0.05_t0.7", SamplingParams { temperature: 0.7, min_p: 0.05, ..Default::default() }, &logits, none),
        ("flat_top_p_0.95_t1.5", SamplingParams { temperature: 1.5, top_p: 0.95, ..Default::default() }, &flat, none),
    ];
    for (name, params, l, prev) in cases {
        let mut s = sampler(params);
        s.set_prompt_len(prev.len() / 2);
        g.bench_function(name, |b| b.iter(|| s.sample(black_box(l), black_box(prev))));
    }
    let mut s = sampler(SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() });
    g.bench_function("top_p_0.9_t0.7+logprobs_top5", |b| {
        b.iter(|| s.sample_with_logprobs(black_box(&logits), black_box(none), 5).token)
    });
    g.finish();
}

criterion_group!(benches, bench_sampling);
criterion_main!(benches);
