//! The serving engine (`pio_runtime::engine`) with many requests at once, on the CPU, on a small
//! random-weight Qwen3 fixture (qwen3-tied-hub: vocabulary 512, 3 layers, exported with a 4096
//! context):
//! - isolation: 32 concurrent requests (different prompts, lengths, seeds, sampling settings,
//!   logprobs) give exactly the tokens and logprobs each gives alone, and the batched greedy
//!   reference prompt gives transformers' tokens;
//! - batched prefill: prompts of one length submitted together prefill in shared runs (all in
//!   the first step with the idle budget) and answer exactly as alone;
//! - cancellation: dropped handles (streaming or not, running or waiting, blocking or async) end
//!   their requests, and the slots go back to the pool and serve new requests;
//! - prefix reuse across requests: A, an unrelated B, then C sharing A's 2,000-token prefix: C
//!   reuses it and answers as a cold engine does;
//! - admission: FIFO while the pool is full, `Overloaded` when the queue is, refusals at submit;
//! - a graph without GroupQueryAttention (growing cache) serves one sequence at a time;
//! - failed model runs (injected after the run, the `fault-injection` feature): a failed prefill or
//!   decode step ends only the requests in it, with the model's error; their slots go back, the
//!   prefix cache keeps nothing of a failed prefill, and later requests answer as a fresh engine's.
//!
//! The fp32 CPU kernels give the same numbers for a sequence whatever else is in the batch (the
//! tests compare exactly); see the README's "The engine" for what holds on a GPU.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use pio_runtime::engine::faults::FaultPlan;
use pio_runtime::engine::{Engine, EngineConfig, EngineError, Event, Request};
use pio_runtime::generate::{FinishReason, GenerateOptions, GenerationOutput};
use pio_runtime::sampling::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FIXTURE: &str = "qwen3-tied-hub";
const VOCAB: u32 = 512;

/// The fixture exported once per test process with a 4096-token context.
fn graphs() -> &'static Path {
    static GRAPHS: OnceLock<PathBuf> = OnceLock::new();
    GRAPHS.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("engine-qwen3-tied-hub");
        let settings = cpu_settings(true).context_length(4096);
        export_to(&fixtures_dir().join(FIXTURE), &out, settings);
        out
    })
}

fn engine(max_seqs: usize, prefill_budget: usize, prefix_caching: bool) -> Engine {
    let config = EngineConfig::builder(graphs())
        .max_seqs(max_seqs)
        .max_model_len(2304)
        .prefill_budget(prefill_budget)
        .prefix_caching(prefix_caching)
        // 64 MB: 2,700 blocks of 16 tokens of this model; the default (a quarter of the pool)
        // would hold 72.
        .prefix_cache_bytes(64 << 20)
        .build()
        .unwrap();
    Engine::start(config).unwrap_or_else(|e| panic!("{e:#}"))
}

fn random_prompt(rng: &mut ChaCha8Rng, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(0..VOCAB)).collect()
}

/// Sampling settings of request `i`: greedy, hot and filtered samplers, penalties (which need the
/// logits), some with logprobs; each sampler with a seed of its own.
fn options_for(i: usize, max_tokens: usize) -> GenerateOptions {
    let seed = Some(1000 + i as u64);
    let sampling = match i % 4 {
        0 => SamplingParams::greedy(),
        1 => SamplingParams { temperature: 0.8, top_k: 20, seed, ..Default::default() },
        2 => SamplingParams { temperature: 1.3, top_p: 0.9, min_p: 0.02, seed, ..Default::default() },
        _ => SamplingParams { repetition_penalty: 1.3, frequency_penalty: 0.2, ..SamplingParams::greedy() },
    };
    GenerateOptions {
        max_tokens: Some(max_tokens),
        sampling,
        ignore_eos: true,
        logprobs: i.is_multiple_of(5).then_some(3),
        ..Default::default()
    }
}

#[test]
fn concurrent_requests_give_exactly_what_each_gives_alone() {
    let reference = load_reference(&fixtures_dir().join(FIXTURE)).greedy;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let requests: Vec<Request> = (0..32)
        .map(|i| {
            if i == 0 {
                return ids_request(&reference.prompt_ids, greedy_options(reference.max_new_tokens));
            }
            // 2 to 61 prompt tokens (a prefill budget of 24 splits the longer ones), 3 to 26 new.
            let prompt = random_prompt(&mut rng, 2 + (i * 7) % 60);
            ids_request(&prompt, options_for(i, 3 + (i * 5) % 24))
        })
        .collect();

    // 8 slots for 32 requests: they wait, get slots as others finish, and prefill in chunks of
    // at most 24 tokens per step beside the running decodes.
    let batched = engine(8, 24, false);
    let handles: Vec<_> = requests.iter().map(|r| batched.submit(r.clone()).unwrap()).collect();
    let together: Vec<GenerationOutput> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
    // The metrics are published after each step: once the slots are free, they count everything.
    wait_idle(&batched);
    let metrics = batched.metrics();

    let alone_engine = engine(1, 24, false);
    for (i, (request, got)) in requests.iter().zip(&together).enumerate() {
        let alone = alone_engine.generate(request.clone()).unwrap();
        assert_eq!(got.generated_ids, alone.generated_ids, "request {i}: batched tokens differ from alone");
        assert_eq!(got.logprobs, alone.logprobs, "request {i}: batched logprobs differ from alone");
        assert_eq!(got.finish_reason, FinishReason::Length, "request {i}");
        assert_eq!(Some(got.generated_ids.len()), request.options.max_tokens, "request {i}");
        if request.options.logprobs.is_some() {
            assert!(got.logprobs.iter().all(Option::is_some), "request {i}: a token without its logprob");
        }
    }
    assert_eq!(together[0].generated_ids, reference.generated_ids, "the batched reference prompt vs transformers");
    // Seeds matter: the same sampled request with another seed differs.
    let mut other_seed = requests[2].clone();
    other_seed.options.sampling.seed = Some(1);
    assert_ne!(alone_engine.generate(other_seed).unwrap().generated_ids, together[2].generated_ids);

    // It was batched: far fewer steps than tokens, and the counters add up.
    let generated: u64 = together.iter().map(|o| o.generated_ids.len() as u64).sum();
    let prompt_tokens: u64 = together.iter().map(|o| o.prompt_ids.len() as u64).sum();
    assert!(metrics.steps < generated / 2, "{} steps for {generated} tokens", metrics.steps);
    assert_eq!(metrics.generation_tokens, generated);
    assert_eq!(metrics.prompt_tokens, prompt_tokens);
    assert_eq!(metrics.finished.length, 32);
    assert_eq!(metrics.time_to_first_token.count, 32);
    assert_eq!(metrics.inter_token_latency.count, generated - 32);
    assert_eq!(metrics.requests_running + metrics.requests_waiting, 0);
}

#[test]
fn prompts_of_one_length_prefill_in_shared_runs_and_answer_as_alone() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Eight prompts of 40 tokens, queued together. Most requests sample, some ask for logprobs:
    // runs that fetch logits.
    let requests: Vec<Request> = (0..8).map(|i| ids_request(&random_prompt(&mut rng, 40), options_for(i, 6))).collect();
    let run_together = |engine: &Engine| {
        let handles = engine.submit_batch(requests.clone()).unwrap();
        let outputs: Vec<GenerationOutput> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
        wait_idle(engine);
        (outputs, engine.metrics())
    };
    // Nothing decodes yet: the idle budget (4096 by default) takes all eight in the first step,
    // in one run.
    let (idle_budget, metrics) = run_together(&engine(8, 100, false));
    assert_eq!((metrics.prefill_chunks, metrics.prefill_runs), (8, 1));
    // An idle budget of 100 too: the first step runs two chunks of 40 (one run) and one of 20
    // (another length: a run of its own), the next the rest of that prompt (alone: it does not
    // start its prompt) and two more of 40 together, and so on.
    let config = EngineConfig::builder(graphs()).max_seqs(8).max_model_len(2304).prefill_budget(100);
    let small = Engine::start(config.idle_prefill_budget(100).prefix_caching(false).build().unwrap()).unwrap();
    let (small_budget, metrics) = run_together(&small);
    assert!(metrics.prefill_chunks > 8, "{} chunks: no prompt was split", metrics.prefill_chunks);
    assert!(
        metrics.prefill_runs < metrics.prefill_chunks,
        "{} chunks in {} runs: none shared a run",
        metrics.prefill_chunks,
        metrics.prefill_runs
    );
    let alone_engine = engine(1, 100, false);
    for (i, request) in requests.iter().enumerate() {
        let alone = alone_engine.generate(request.clone()).unwrap();
        for (what, got) in [("idle budget", &idle_budget[i]), ("small budget", &small_budget[i])] {
            assert_eq!(got.generated_ids, alone.generated_ids, "request {i} ({what}): batched prefill tokens differ");
            assert_eq!(got.logprobs, alone.logprobs, "request {i} ({what}): batched prefill logprobs differ");
        }
    }
    let alone_metrics = alone_engine.metrics();
    assert_eq!(alone_metrics.prefill_runs, alone_metrics.prefill_chunks, "one slot: every chunk runs alone");
}

/// Starts an engine with `config`, lets `stream` decode, then runs `work` beside it: the prefill
/// chunks the engine ran meanwhile, and what `work` returned. The stream decodes two tokens first:
/// the metrics are published after each step, so the second token's step comes after the one that
/// counted the stream's own prefill chunk was published.
fn prefill_chunks_beside_a_stream<T>(
    config: EngineConfig,
    stream: &Request,
    work: impl FnOnce(&Engine) -> T,
) -> (u64, T) {
    let engine = Engine::start(config).unwrap_or_else(|e| panic!("{e:#}"));
    let mut decoding = engine.submit(stream.clone()).unwrap();
    for _ in 0..2 {
        assert!(matches!(decoding.blocking_next(), Some(Ok(Event::Token(_)))));
    }
    let before = engine.metrics().prefill_chunks;
    let done = work(&engine);
    let chunks = engine.metrics().prefill_chunks - before;
    drop(decoding);
    (chunks, done)
}

#[test]
fn a_burst_of_prompts_beside_a_decoding_stream_catches_up_in_one_step() {
    // One stream decodes; four prompts of 40 tokens arrive together. With catch-up (TGI's
    // waiting_served_ratio, 1.2 by default: 4 prompts >= 1.2 x 1 stream) the next step prefills
    // them whole at the idle budget: 4 chunks. Without it the 16-token budget cuts each in 3.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let long = ids_request(&random_prompt(&mut rng, 10), greedy_options(200));
    let burst: Vec<Request> = (0..4).map(|_| ids_request(&random_prompt(&mut rng, 40), greedy_options(4))).collect();
    let chunks_of_the_burst = |ratio: Option<f64>| {
        let config = EngineConfig::builder(graphs())
            .max_seqs(5)
            .max_model_len(2304)
            .prefill_budget(16)
            .waiting_served_ratio(ratio)
            .prefix_caching(false)
            .build()
            .unwrap();
        prefill_chunks_beside_a_stream(config, &long, |engine| {
            assert_eq!(engine.model_info().waiting_served_ratio, ratio);
            let outputs: Vec<GenerationOutput> =
                engine.submit_batch(burst.clone()).unwrap().into_iter().map(|h| h.wait().unwrap()).collect();
            outputs
        })
    };
    let (caught_up, with) = chunks_of_the_burst(Some(1.2));
    let (chunked, without) = chunks_of_the_burst(None);
    assert_eq!(caught_up, 4, "the burst was not prefilled in one step at the idle budget");
    assert_eq!(chunked, 12, "the burst was not chunked at the prefill budget");
    for (i, (a, b)) in with.iter().zip(&without).enumerate() {
        assert_eq!(a.generated_ids, b.generated_ids, "request {i}: catch-up changed what it answers");
    }
}

/// `max_seqs` slots, a 64-token prefill budget, the long-prompt `threshold`, no catch-up (so
/// that a lone prompt is chunked either way) and no prefix cache.
fn budget_64_with_threshold(max_seqs: usize, threshold: Option<usize>) -> EngineConfig {
    EngineConfig::builder(graphs())
        .max_seqs(max_seqs)
        .max_model_len(2304)
        .prefill_budget(64)
        .long_prefill_token_threshold(threshold)
        .waiting_served_ratio(None)
        .prefix_caching(false)
        .build()
        .unwrap()
}

#[test]
fn a_long_prompt_beside_a_decoding_stream_advances_by_the_per_request_threshold() {
    // One stream decodes; a 200-token prompt arrives. With a 64-token budget it takes 4 chunks;
    // with long_prefill_token_threshold 16 it advances 16 tokens a step: 13 chunks, and the same
    // tokens. Catch-up is off so that the lone prompt is chunked either way.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let stream = ids_request(&random_prompt(&mut rng, 10), greedy_options(400));
    let long = ids_request(&random_prompt(&mut rng, 200), greedy_options(5));
    let chunks_of_the_long_prompt = |threshold: Option<usize>| {
        let config = budget_64_with_threshold(2, threshold);
        assert_eq!(config.long_prefill_token_threshold(), threshold);
        prefill_chunks_beside_a_stream(config, &stream, |engine| engine.submit(long.clone()).unwrap().wait().unwrap())
    };
    let (capped, with) = chunks_of_the_long_prompt(Some(16));
    let (budgeted, without) = chunks_of_the_long_prompt(None);
    assert_eq!(capped, 13, "the long prompt did not advance 16 tokens a step");
    assert_eq!(budgeted, 4, "the long prompt was not chunked at the prefill budget");
    assert_eq!(with.generated_ids, without.generated_ids, "the threshold changed what the prompt answers");
}

#[test]
fn the_per_request_threshold_is_lifted_while_two_long_prompts_could_prefill() {
    // One stream decodes (budget 64, threshold 16). Two 200-token prompts arrive together: while
    // both are long the first gets the whole budget (64, 64, 64: 3 chunks); with 8 tokens left
    // it is not long, so the cap holds again: its last 8 beside the second's first 16, then the
    // second alone at 16 a step (184 tokens, 12 chunks). 17 in all, where the cap on every step
    // would take 13 + 13. A 200-token prompt with a 10-token one keeps the cap, and the short one
    // shares the first step: 13 + 1. (Each prompt generates 3 tokens, so that its last prefill
    // step is counted before it finishes.)
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let stream = ids_request(&random_prompt(&mut rng, 10), greedy_options(400));
    let long = || ids_request(&random_prompt(&mut ChaCha8Rng::seed_from_u64(11), 200), greedy_options(3));
    let short = ids_request(&random_prompt(&mut rng, 10), greedy_options(3));
    let chunks_of = |requests: Vec<Request>| {
        prefill_chunks_beside_a_stream(budget_64_with_threshold(3, Some(16)), &stream, |engine| {
            let handles = engine.submit_batch(requests).unwrap();
            handles.into_iter().map(|h| h.wait().unwrap()).collect::<Vec<GenerationOutput>>()
        })
    };
    let (two_long, outputs) = chunks_of(vec![long(), long()]);
    assert_eq!(two_long, 17, "the threshold was not lifted while two long prompts could prefill");
    assert_eq!(outputs[0].generated_ids, outputs[1].generated_ids, "the same prompt answered differently");
    let (long_and_short, _) = chunks_of(vec![long(), short]);
    assert_eq!(long_and_short, 14, "a short prompt lifted the threshold");
}

#[test]
fn prefill_pacing_changes_when_prompts_run_not_what_they_answer() {
    // Pacing sizes chunks from measured times, so its steps differ run to run; each request's
    // greedy tokens must not (on the CPU in fp32 other chunk sizes leave the logits within
    // float rounding, far below this random model's top-2 gaps at these prompts).
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let requests: Vec<Request> =
        (0..12).map(|i| ids_request(&random_prompt(&mut rng, 40 + 23 * i), greedy_options(6 + i % 5))).collect();
    let config = EngineConfig::builder(graphs())
        .max_seqs(4)
        .max_model_len(2304)
        .prefill_budget(128)
        .itl_factor(Some(1.5))
        .prefix_caching(false)
        .build()
        .unwrap();
    assert_eq!(config.itl_factor(), Some(1.5));
    let paced = Engine::start(config).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(paced.model_info().itl_factor, Some(1.5));
    let handles: Vec<_> = requests.iter().map(|r| paced.submit(r.clone()).unwrap()).collect();
    let alone_engine = engine(1, 128, false);
    assert_eq!(alone_engine.model_info().itl_factor, None, "pacing is off by default");
    for (i, (request, handle)) in requests.iter().zip(handles).enumerate() {
        let got = handle.wait().unwrap();
        let alone = alone_engine.generate(request.clone()).unwrap();
        assert_eq!(got.generated_ids, alone.generated_ids, "request {i}");
    }
}

#[test]
fn dropped_handles_cancel_their_requests_and_free_their_slots() {
    let engine = engine(4, 512, true);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let long = |rng: &mut ChaCha8Rng| ids_request(&random_prompt(rng, 10), greedy_options(2000));
    // Four running (the pool is full), two waiting.
    let mut streaming = engine.submit(long(&mut rng)).unwrap();
    let not_streaming = engine.submit(long(&mut rng)).unwrap();
    let mut cancelled = engine.submit(long(&mut rng)).unwrap();
    let finishing = engine.submit(ids_request(&random_prompt(&mut rng, 10), greedy_options(40))).unwrap();
    let waiting: Vec<_> = (0..2).map(|_| engine.submit(long(&mut rng)).unwrap()).collect();

    for _ in 0..3 {
        assert!(matches!(streaming.blocking_next(), Some(Ok(Event::Token(_)))));
    }
    drop(streaming);
    drop(not_streaming);
    drop(waiting);
    assert!(matches!(cancelled.blocking_next(), Some(Ok(Event::Token(_)))));
    cancelled.cancel();
    // What was sent can still be read; then the handle says it was cancelled.
    let rest: Vec<_> = std::iter::from_fn(|| cancelled.blocking_next()).collect();
    assert!(matches!(rest.last(), Some(Err(EngineError::Cancelled))), "{:?}", rest.last());
    assert!(rest[..rest.len() - 1].iter().all(|e| matches!(e, Ok(Event::Token(_)))));
    assert!(cancelled.blocking_next().is_none());
    // The one kept finishes normally.
    let out = finishing.wait().unwrap();
    assert_eq!((out.finish_reason, out.generated_ids.len()), (FinishReason::Length, 40));

    wait_idle(&engine);
    let metrics = engine.metrics();
    assert_eq!(metrics.finished.cancelled, 5, "{:?}", metrics.finished);
    assert_eq!(metrics.kv_cache_usage, 0.0);

    serves_every_slot_as_fresh(&engine, &self::engine(4, 512, false), &mut rng);
    wait_idle(&engine);
}

/// Four requests at once (every slot of a 4-slot engine) answer as on `fresh`.
fn serves_every_slot_as_fresh(engine: &Engine, fresh: &Engine, rng: &mut ChaCha8Rng) {
    let prompts: Vec<Vec<u32>> = (0..4).map(|_| random_prompt(rng, 12)).collect();
    let handles: Vec<_> = prompts.iter().map(|p| engine.submit(ids_request(p, greedy_options(16))).unwrap()).collect();
    for (p, h) in prompts.iter().zip(handles) {
        let want = fresh.generate(ids_request(p, greedy_options(16))).unwrap();
        assert_eq!(h.wait().unwrap().generated_ids, want.generated_ids, "a slot answers otherwise than a fresh engine");
    }
}

#[test]
fn the_async_stream_gives_the_iterators_events_and_dropping_it_cancels() {
    use futures_util::StreamExt;

    let engine = engine(2, 512, false);
    let prompt: Vec<u32> = (1..20).collect();
    let request = ids_request(&prompt, options_for(1, 12));
    let blocking: Vec<Event> = engine.submit(request.clone()).unwrap().into_iter().map(Result::unwrap).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let streamed: Vec<Event> = runtime.block_on(async {
        let handle = engine.submit(request.clone()).unwrap();
        handle.map(Result::unwrap).collect().await
    });
    assert_eq!(blocking.len(), streamed.len());
    for (a, b) in blocking.iter().zip(&streamed) {
        match (a, b) {
            (Event::Token(a), Event::Token(b)) => assert_eq!(a, b),
            (Event::Finished(a), Event::Finished(b)) => assert_eq!(a.generated_ids, b.generated_ids),
            _ => panic!("the event kinds differ: {a:?} / {b:?}"),
        }
    }
    let output = runtime.block_on(engine.submit(request.clone()).unwrap().output()).unwrap();
    assert!(matches!(blocking.last(), Some(Event::Finished(o)) if o.generated_ids == output.generated_ids));

    runtime.block_on(async {
        let mut handle = engine.submit(ids_request(&prompt, greedy_options(2000))).unwrap();
        for _ in 0..2 {
            assert!(matches!(handle.next().await, Some(Ok(Event::Token(_)))));
        }
    });
    wait_idle(&engine);
    assert_eq!(engine.metrics().finished.cancelled, 1);
}

#[test]
fn a_prefix_from_an_earlier_request_is_reused_and_answers_as_a_cold_run() {
    let cached = engine(2, 512, true);
    let cold = engine(2, 512, false);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let shared = random_prompt(&mut rng, 2000);
    let with_shared = |rng: &mut ChaCha8Rng, extra: usize| {
        let mut p = shared.clone();
        p.extend(random_prompt(rng, extra));
        p
    };
    let a = with_shared(&mut rng, 20);
    let b = random_prompt(&mut rng, 300);
    let c = with_shared(&mut rng, 30);
    let sampled = GenerateOptions {
        sampling: SamplingParams { temperature: 1.0, seed: Some(5), ..Default::default() },
        ..greedy_options(8)
    };
    // (prompt, options, prompt tokens expected from the cache)
    let run = |prompt: &[u32], options: &GenerateOptions| {
        let got = cached.generate(ids_request(prompt, options.clone())).unwrap();
        let want = cold.generate(ids_request(prompt, options.clone())).unwrap();
        assert_eq!(want.timings.cached_prompt_tokens, 0);
        assert_eq!(got.generated_ids, want.generated_ids, "a prefix hit changed the answer");
        assert_eq!(got.usage().cached_tokens, got.timings.cached_prompt_tokens);
        got
    };
    assert_eq!(run(&a, &greedy_options(8)).timings.cached_prompt_tokens, 0);
    assert_eq!(run(&b, &greedy_options(8)).timings.cached_prompt_tokens, 0, "B shares nothing");
    // C shares A's 2,000 tokens (125 blocks of 16); A's 2,027 cached tokens go on with other ones.
    let out = run(&c, &greedy_options(8));
    assert_eq!(out.timings.cached_prompt_tokens, 2000);
    assert_eq!(run(&c, &sampled).timings.cached_prompt_tokens, c.len() - c.len() % 16, "C's own blocks");
    // A again: all of its full blocks (its last prompt token always runs).
    assert_eq!(run(&a, &sampled).timings.cached_prompt_tokens, 2016);
    // The next chat turn: A, its answer, a new message. The answer's KV was kept too.
    let first = cached.generate(ids_request(&a, greedy_options(40))).unwrap();
    let mut turn = a.clone();
    turn.extend(&first.generated_ids);
    turn.extend(random_prompt(&mut rng, 9));
    let kept = a.len() + first.generated_ids.len() - 1; // the last token's KV was never computed
    assert_eq!(run(&turn, &greedy_options(8)).timings.cached_prompt_tokens, kept - kept % 16);

    let m = cached.metrics();
    assert!(m.prefix_cache_hit_tokens >= 2000 + 2016 && m.prefix_cache_hit_tokens < m.prefix_cache_queried_tokens);
    assert!(m.prefix_cache_bytes > 0);
    assert_eq!(cold.metrics().prefix_cache_hit_tokens, 0);
}

/// vLLM's `cache_salt`: a prompt's cached KV is reused only by requests with the same salt
/// (none with none), and what a salted request answers is what it answers cold.
#[test]
fn a_cache_salt_keeps_prefix_hits_among_requests_with_the_same_salt() {
    let engine = engine(2, 512, true);
    let prompt = random_prompt(&mut ChaCha8Rng::seed_from_u64(8), 100);
    let run = |salt: Option<&str>| {
        let mut request = ids_request(&prompt, greedy_options(6));
        if let Some(salt) = salt {
            request = request.with_cache_salt(salt);
        }
        engine.generate(request).unwrap()
    };
    let first = run(Some("tenant-a"));
    for (salt, cached) in [(Some("tenant-b"), 0), (None, 0), (Some("tenant-a"), 96), (Some("tenant-b"), 96), (None, 96)]
    {
        let out = run(salt);
        assert_eq!(out.timings.cached_prompt_tokens, cached, "salt {salt:?}");
        assert_eq!(out.generated_ids, first.generated_ids, "salt {salt:?}");
    }
    let empty = engine.submit(ids_request(&prompt, greedy_options(1)).with_cache_salt("")).unwrap_err();
    assert!(matches!(empty, EngineError::InvalidRequest { field: "cache_salt", .. }), "{empty:?}");
}

/// An engine on the fixture whose model runs fail as `plan` says.
fn engine_with_faults(plan: FaultPlan) -> Engine {
    let config = EngineConfig::builder(graphs())
        .max_seqs(4)
        .max_model_len(2304)
        .prefix_cache_bytes(64 << 20)
        .fault_plan(plan)
        .build()
        .unwrap();
    Engine::start(config).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The error and its sources, as one line.
fn error_chain(e: &EngineError) -> String {
    std::iter::successors(Some(e as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

#[test]
fn a_failed_prefill_fails_its_request_alone_and_leaves_nothing_in_the_cache() {
    const POISON: u32 = 7;
    let engine = engine_with_faults(FaultPlan::default().fail_prefill_with_token(POISON));
    let fresh = self::engine(4, 512, false);
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut clean =
        |len: usize| -> Vec<u32> { random_prompt(&mut rng, len).into_iter().filter(|&t| t != POISON).collect() };
    // A decodes while B's prefill (64 shared tokens, the poisoned one, 3 more) fails.
    let a = clean(12);
    let mut a_handle = engine.submit(ids_request(&a, greedy_options(48))).unwrap();
    assert!(matches!(a_handle.blocking_next(), Some(Ok(Event::Token(_)))));
    let shared = clean(80)[..64].to_vec();
    let mut b = shared.clone();
    b.push(POISON);
    b.extend(clean(3));
    let err = engine.generate(ids_request(&b, greedy_options(8))).expect_err("the poisoned prefill must fail");
    assert!(matches!(err, EngineError::Model { .. }), "{err:?}");
    assert!(error_chain(&err).contains("injected fault"), "the model's error is lost: {}", error_chain(&err));
    // A goes on as if nothing happened.
    let want = fresh.generate(ids_request(&a, greedy_options(48))).unwrap();
    assert_eq!(a_handle.wait().unwrap().generated_ids, want.generated_ids);
    // C shares B's first 64 tokens: nothing of the failed run was cached, and C answers as fresh.
    let mut c = shared.clone();
    c.extend(clean(24)[..20].to_vec());
    let got = engine.generate(ids_request(&c, greedy_options(8))).unwrap();
    assert_eq!(got.timings.cached_prompt_tokens, 0, "the failed prefill's KV was offered to the prefix cache");
    assert_eq!(got.generated_ids, fresh.generate(ids_request(&c, greedy_options(8))).unwrap().generated_ids);
    // The cache itself still works: C again reuses its own blocks.
    let again = engine.generate(ids_request(&c, greedy_options(8))).unwrap();
    assert_eq!(again.timings.cached_prompt_tokens, c.len() - c.len() % 16);
    assert_eq!(again.generated_ids, got.generated_ids);
    wait_idle(&engine);
    assert_eq!(engine.metrics().kv_cache_usage, 0.0);
}

#[test]
fn a_failed_decode_step_fails_the_sequences_in_it_and_the_engine_serves_on() {
    let engine = engine_with_faults(FaultPlan::default().fail_decode_step(3));
    let fresh = self::engine(4, 512, false);
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let prompts: Vec<Vec<u32>> = (0..2).map(|_| random_prompt(&mut rng, 10)).collect();
    let handles: Vec<_> = prompts.iter().map(|p| engine.submit(ids_request(p, greedy_options(40))).unwrap()).collect();
    // Whichever sequences were in decode step 3 fail (the second may have joined after it).
    let mut failed = 0;
    for (p, h) in prompts.iter().zip(handles) {
        let events: Vec<_> = h.into_iter().collect();
        match events.last() {
            Some(Err(e)) => {
                assert!(matches!(e, EngineError::Model { .. }) && error_chain(e).contains("decode step 3"), "{e:?}");
                // The tokens before the failed step were streamed.
                assert!(events[..events.len() - 1].iter().all(|e| matches!(e, Ok(Event::Token(_)))));
                failed += 1;
            }
            Some(Ok(Event::Finished(out))) => {
                let want = fresh.generate(ids_request(p, greedy_options(40))).unwrap();
                assert_eq!(out.generated_ids, want.generated_ids, "a sequence outside the failed step changed");
            }
            other => panic!("ended with {other:?}"),
        }
    }
    assert!(failed >= 1, "decode step 3 failed no sequence");
    wait_idle(&engine);
    assert_eq!(engine.metrics().kv_cache_usage, 0.0);
    serves_every_slot_as_fresh(&engine, &fresh, &mut rng);
}

#[test]
fn waiting_requests_are_admitted_in_submission_order() {
    let engine = engine(1, 512, false);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // A long request first, then short ones: none of them goes ahead of it or of each other.
    let mut requests = vec![ids_request(&random_prompt(&mut rng, 300), greedy_options(30))];
    requests.extend((0..4).map(|_| ids_request(&random_prompt(&mut rng, 5), greedy_options(3))));
    let handles: Vec<_> = requests.into_iter().map(|r| engine.submit(r).unwrap()).collect();
    let queued: Vec<f64> = handles.into_iter().map(|h| h.wait().unwrap().timings.queue_ms).collect();
    // One slot: each waits for all before it, so the waits grow in submission order.
    assert!(queued.windows(2).all(|w| w[0] < w[1]), "queue times {queued:?}");
}

#[test]
fn a_full_queue_answers_overloaded() {
    let config = EngineConfig::builder(graphs()).max_seqs(1).max_model_len(2304).max_waiting(2).build().unwrap();
    let engine = Engine::start(config).unwrap();
    let long = || ids_request(&[1, 2, 3, 4], greedy_options(2000));
    let running = engine.submit(long()).unwrap();
    let start = Instant::now();
    while engine.active_sequences() == 0 {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    let queued: Vec<_> = (0..2).map(|_| engine.submit(long()).unwrap()).collect();
    let err = engine.submit(long()).unwrap_err();
    assert!(matches!(err, EngineError::Overloaded { waiting: 2, limit: 2 }), "{err:?}");
    assert!(err.to_string().contains("overloaded"), "{err}");
    assert_eq!(engine.metrics().requests_waiting, 2);
    // A slot frees, the head of the queue takes it, and there is room for one more.
    drop(running);
    while engine.metrics().requests_waiting > 1 {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    let another = engine.submit(long()).unwrap();
    drop((queued, another));
    wait_idle(&engine);
}

#[test]
fn requests_are_checked_when_submitted() {
    let config = EngineConfig::builder(graphs()).max_seqs(2).max_model_len(64).build().unwrap();
    let engine = Engine::start(config).unwrap();
    assert_eq!((engine.model_info().max_model_len, engine.model_info().context_length), (64, 4096));
    let prompt: Vec<u32> = (0..60).collect();
    let err = engine.submit(ids_request(&prompt, greedy_options(10))).unwrap_err();
    assert!(
        matches!(err, EngineError::ContextLength { prompt_tokens: 60, max_tokens: Some(10), limit: 64 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("70 tokens in all"), "{err}");
    let field = |options: GenerateOptions, prompt: &[u32]| match engine.submit(ids_request(prompt, options)) {
        Err(EngineError::InvalidRequest { field, .. }) => field,
        other => panic!("expected an invalid request, got {other:?}"),
    };
    let short = [1, 2, 3];
    let with = |sampling: SamplingParams| GenerateOptions { sampling, ..greedy_options(4) };
    assert_eq!(field(with(SamplingParams { temperature: -1.0, ..Default::default() }), &short), "temperature");
    assert_eq!(field(with(SamplingParams { top_p: 0.0, ..Default::default() }), &short), "top_p");
    assert_eq!(field(GenerateOptions { max_tokens: Some(0), ..greedy_options(1) }, &short), "max_tokens");
    assert_eq!(field(GenerateOptions { logprobs: Some(21), ..greedy_options(4) }, &short), "top_logprobs");
    assert_eq!(field(GenerateOptions { stop_token_ids: vec![VOCAB], ..greedy_options(4) }, &short), "stop_token_ids");
    let bias = |id: u32, b: f32| with(SamplingParams { logit_bias: [(id, b)].into(), ..SamplingParams::greedy() });
    assert_eq!(field(bias(VOCAB, 1.0), &short), "logit_bias");
    assert_eq!(field(bias(1, 101.0), &short), "logit_bias");
    assert_eq!(field(greedy_options(4), &[1, VOCAB]), "prompt");
    assert_eq!(field(greedy_options(4), &[]), "prompt");
    // Nothing was queued by the refusals.
    assert_eq!(engine.metrics().requests_waiting, 0);

    // Settings the engine cannot start with name the setting.
    let refused = |b: pio_runtime::engine::EngineConfigBuilder| match b.build().and_then(Engine::start) {
        Err(EngineError::Config { setting, .. }) => setting,
        Err(other) => panic!("expected a settings error, got {other:?}"),
        Ok(_) => panic!("expected a settings error"),
    };
    assert_eq!(refused(EngineConfig::builder(graphs()).max_model_len(5000)), "max_model_len");
    assert_eq!(refused(EngineConfig::builder(graphs()).prefill_budget(0)), "prefill_budget");
    assert_eq!(
        refused(EngineConfig::builder(graphs()).prefill_budget(64).idle_prefill_budget(63)),
        "idle_prefill_budget"
    );
    assert_eq!(
        refused(EngineConfig::builder(graphs()).long_prefill_token_threshold(Some(0))),
        "long_prefill_token_threshold"
    );
    assert_eq!(refused(EngineConfig::builder(graphs()).itl_factor(Some(1.0))), "itl_factor");
    assert_eq!(refused(EngineConfig::builder(graphs()).itl_factor(Some(f64::NAN))), "itl_factor");
    assert_eq!(refused(EngineConfig::builder(graphs()).waiting_served_ratio(Some(0.0))), "waiting_served_ratio");
    assert_eq!(
        refused(EngineConfig::builder(graphs()).waiting_served_ratio(Some(f64::INFINITY))),
        "waiting_served_ratio"
    );
    assert_eq!(refused(EngineConfig::builder(graphs()).max_seqs(0)), "max_seqs");
}

#[test]
fn shutdown_ends_requests_in_flight_and_refuses_new_ones() {
    let engine = engine(1, 512, false);
    let mut running = engine.submit(ids_request(&[1, 2, 3], greedy_options(2000))).unwrap();
    let waiting = engine.submit(ids_request(&[4, 5, 6], greedy_options(10))).unwrap();
    assert!(matches!(running.blocking_next(), Some(Ok(Event::Token(_)))));
    let clone = engine.clone();
    engine.shutdown();
    assert!(matches!(running.into_iter().last(), Some(Err(EngineError::Shutdown))));
    assert!(matches!(waiting.wait(), Err(EngineError::Shutdown)));
    assert!(matches!(clone.submit(ids_request(&[1], greedy_options(1))), Err(EngineError::Shutdown)));
    assert_eq!(clone.active_sequences(), 0);
}

#[test]
fn a_graph_without_group_query_attention_serves_one_sequence_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join("unfused");
    let settings = unfused_attention(cpu_settings(true));
    export_to(&fixtures_dir().join(FIXTURE), &graphs, settings);
    let engine = Engine::start(EngineConfig::builder(&graphs).build().unwrap()).unwrap();
    let info = engine.model_info();
    assert_eq!((info.max_seqs, info.prefix_caching), (1, false), "{info:?}");
    let reference = load_reference(&fixtures_dir().join(FIXTURE)).greedy;
    let requests = [
        ids_request(&reference.prompt_ids, greedy_options(reference.max_new_tokens)),
        ids_request(&[9, 8, 7], options_for(1, 10)),
    ];
    let handles: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    let outputs: Vec<GenerationOutput> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
    assert_eq!(outputs[0].generated_ids, reference.generated_ids);
    assert_eq!(outputs[1].generated_ids, engine.generate(requests[1].clone()).unwrap().generated_ids);
    let err = Engine::start(EngineConfig::builder(&graphs).max_seqs(2).build().unwrap()).err().unwrap();
    assert!(err.to_string().contains("--no-fused-attention"), "{err}");
}

// The example of the README's "The engine" section, verbatim: keep the two in step.
mod readme_example {
    use std::path::Path;

    use pio_runtime::engine::{Engine, EngineConfig, Event, Prompt, Request};
    use pio_runtime::generate::GenerateOptions;
    use pio_runtime::sampling::SamplingParams;

    pub fn four_at_once(graphs: &Path) -> anyhow::Result<()> {
        let engine = Engine::start(EngineConfig::builder(graphs).max_seqs(8).build()?)?; // the CPU; .ep(...) for a GPU
        let info = engine.model_info();
        println!("{}: {} sequences of {} tokens", info.served_name, info.max_seqs, info.max_model_len);

        // Submitting checks and tokenizes here; the engine batches whatever runs at the same time.
        let mut handles = Vec::new();
        for seed in 0..4 {
            let options = GenerateOptions {
                max_tokens: Some(16),
                sampling: SamplingParams { temperature: 0.7, seed: Some(seed), ..Default::default() },
                ..Default::default()
            };
            handles.push(engine.submit(Request::new(Prompt::Ids(vec![1, 2, 3])).with_options(options))?);
        }
        for handle in handles {
            // Blocking; in async code `handle.next_event().await`, or the handle as a Stream.
            for event in handle {
                match event? {
                    Event::Token(token) => print!("{} ", token.token_id),
                    Event::Finished(output) => println!("({:?})", output.finish_reason),
                    // Only when asked for (`prompt_logprobs`).
                    Event::PromptLogprobs(_) => {}
                }
            }
        }
        println!("{:?}", engine.metrics().finished);
        Ok(())
    }
}

#[test]
fn the_readme_engine_example_runs() {
    readme_example::four_at_once(graphs()).unwrap_or_else(|e| panic!("the README example failed: {e:#}"));
    let trimmed = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.trim().replace("pub fn four_at_once(", "fn four_at_once("))
            .filter(|l| !l.is_empty())
            .collect()
    };
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start =
        readme.find("fn four_at_once(graphs: &Path)").expect("the README's engine example is gone: update this test");
    let end = start + readme[start..].find("```").unwrap();
    let source = std::fs::read_to_string(file!()).unwrap();
    let start_src = source.find("pub fn four_at_once(graphs: &Path)").unwrap();
    let end_src = start_src + source[start_src..].find("\n    }\n}\n").unwrap() + "\n    }\n".len();
    assert_eq!(trimmed(&readme[start..end]), trimmed(&source[start_src..end_src]), "README example and test differ");
}
