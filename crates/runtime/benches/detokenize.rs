//! Streaming detokenization cost per generated token, with the real Qwen3 tokenizer
//! (`scripts/setup.sh` fetches it into `.cache/pio/tokenizers/qwen3`).
//!
//! `cargo bench -p pio-runtime --bench detokenize`
//!
//! * `incremental_decoder`: [`IncrementalDecoder::push`] for each of ~500 ids of mixed English/Chinese text
//!   (plus the final flush); throughput is reported per token.
//! * `tokenizers_decode_stream`: the `tokenizers` crate's own `DecodeStream`, for comparison.
//! * `full_decode_per_token`: the naive approach, decoding the whole prefix after every token (quadratic).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pio_runtime::tokenizer::{qwen3_test_tokenizer_dir, Tokenizer};

const PARAGRAPH: &str = "Inference-PIO exports large language models to ONNX and runs them with ONNX Runtime. \
大语言模型的推理包括预填充和解码两个阶段，解码阶段每次只生成一个词元。 \
Streaming detokenization must never split a UTF-8 character: 中文字符、emoji 🚀🎉 and accents like café \
often span several byte-level tokens. 我们在每一步只解码最近的几个词元，而不是整个序列。 ";

fn build_text(tokenizer: &Tokenizer, target_tokens: usize) -> Vec<u32> {
    let mut text = String::new();
    loop {
        text.push_str(PARAGRAPH);
        let ids = tokenizer.encode(&text, false).unwrap_or_else(|e| panic!("encode: {e}"));
        if ids.len() >= target_tokens {
            return ids[..target_tokens].to_vec();
        }
    }
}

fn bench(c: &mut Criterion) {
    let dir = qwen3_test_tokenizer_dir().unwrap_or_else(|msg| panic!("{msg}"));
    let tokenizer = Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let ids = build_text(&tokenizer, 500);

    let mut group = c.benchmark_group("detokenize_500_tokens");
    group.throughput(Throughput::Elements(ids.len() as u64));

    group.bench_function("incremental_decoder", |b| {
        b.iter(|| {
            let mut decoder = tokenizer.incremental_decoder(true);
            let mut bytes = 0usize;
            for &id in &ids {
                if let Some(delta) = decoder.push(black_box(id)).unwrap_or_else(|e| panic!("{e}")) {
                    bytes += delta.len();
                }
            }
            bytes += decoder.flush().unwrap_or_else(|e| panic!("{e}")).len();
            black_box(bytes)
        })
    });

    group.bench_function("tokenizers_decode_stream", |b| {
        b.iter(|| {
            let mut stream = tokenizer.inner().decode_stream(true);
            let mut bytes = 0usize;
            for &id in &ids {
                if let Some(delta) = stream.step(black_box(id)).unwrap_or_else(|e| panic!("{e}")) {
                    bytes += delta.len();
                }
            }
            black_box(bytes)
        })
    });

    group.bench_function("full_decode_per_token", |b| {
        b.iter(|| {
            let mut len = 0usize;
            for n in 1..=ids.len() {
                len = tokenizer.decode(black_box(&ids[..n]), true).unwrap_or_else(|e| panic!("{e}")).len();
            }
            black_box(len)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
