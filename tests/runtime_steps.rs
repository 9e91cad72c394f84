//! How the runtime drives a graph, checked against transformers: prompts run in chunks through
//! the cache, and greedy tokens taken from the graph's own argmax output instead of host logits.

mod common;

use common::*;
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::model::{DecoderModel, Fetch, ModelError, StepOutput};
use pio_runtime::step_inputs::StepInputs;

/// One dense, one Qwen3-MoE and one GLM-4-MoE fixture.
const FIXTURES: [&str; 3] = ["qwen3-tied-hub", "qwen3moe-a", "glm4moe-a"];

fn load(name: &str, last_token_logits: bool, tmp: &tempfile::TempDir) -> (DecoderModel, Reference) {
    let fixture = fixtures_dir().join(name);
    let graphs = tmp.path().join(name);
    export_to(&fixture, &graphs, cpu_settings(last_token_logits));
    (DecoderModel::load(&graphs, &ExecutionProvider::default()).unwrap(), load_reference(&fixture))
}

#[test]
fn prefill_in_chunks_matches_transformers_at_every_position() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (mut model, reference) = load(name, false, &tmp);
        // 8 prompt tokens in chunks of 3: 3 + 3 + 2, the later ones attending to the cache.
        model.set_prefill_chunk(Some(3));
        let mut cache = model.new_cache().unwrap();
        let logits = model.forward(&reference.prompt_ids, &mut cache).unwrap();
        assert_eq!(logits.rows, reference.prompt_ids.len(), "{name}: one row per prompt token");
        assert_eq!(cache.len, reference.prompt_ids.len());
        for (pos, expected) in reference.prefill_logits.iter().enumerate() {
            let diff = max_abs_diff(logits.row(pos), expected);
            assert!(diff <= LOGIT_TOLERANCE, "{name}: chunked prefill position {pos}: max |diff| {diff}");
            assert_eq!(argmax(logits.row(pos)), argmax(expected), "{name}: chunked prefill position {pos}");
        }
        let step = &reference.steps[0];
        let next = model.forward(&[step.input_id], &mut cache).unwrap();
        let diff = max_abs_diff(next.last(), &step.logits);
        assert!(diff <= LOGIT_TOLERANCE, "{name}: step after a chunked prefill: max |diff| {diff}");
    }
}

#[test]
fn chunked_prefill_greedy_matches_transformers_generate() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let (mut model, reference) = load(name, true, &tmp);
        model.set_prefill_chunk(Some(5));
        let g = &reference.greedy;
        assert_eq!(greedy(&mut model, &g.prompt_ids, g.max_new_tokens, false), g.generated_ids, "{name}");
    }
}

/// Greedy decoding through `Fetch::Greedy` only: no logits come back at all.
fn graph_greedy(model: &mut DecoderModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache().unwrap();
    let mut out = Vec::new();
    let mut next = model.greedy_batch(prompt, 1, &mut cache).unwrap();
    for _ in 0..n {
        out.push(next[0]);
        next = model.greedy_batch(&next, 1, &mut cache).unwrap();
    }
    out
}

#[test]
fn greedy_tokens_output_decodes_like_transformers_generate() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        for last_token_logits in [true, false] {
            let (mut model, reference) = load(name, last_token_logits, &tmp);
            assert!(model.manifest.has_greedy_output(), "{name}: the export has a greedy_tokens output");
            let g = &reference.greedy;
            let got = graph_greedy(&mut model, &g.prompt_ids, g.max_new_tokens);
            assert_eq!(got, g.generated_ids, "{name} (last-token logits {last_token_logits})");
        }
    }
}

#[test]
fn greedy_fetch_brings_back_tokens_not_logits_and_agrees_per_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut model, reference) = load("qwen3moe-a", false, &tmp);
    let prompt = &reference.prompt_ids;
    // Two different sequences in one batch.
    let mut second: Vec<u32> = prompt.clone();
    second.reverse();
    let tokens: Vec<u32> = prompt.iter().chain(&second).copied().collect();
    let mut cache = model.new_batch_cache(2, 64).unwrap();
    let out = model.step(&tokens, 2, &mut cache, Fetch::Greedy).unwrap();
    let StepOutput::Greedy(greedy) = out else { panic!("a graph with greedy_tokens returns tokens") };
    let mut cache = model.new_batch_cache(2, 64).unwrap();
    let logits = model.forward_batch(&tokens, 2, &mut cache).unwrap();
    let expected: Vec<u32> = (0..2).map(|b| argmax(logits.last_of(b)) as u32).collect();
    assert_eq!(greedy, expected);
    assert_eq!(
        expected[0],
        argmax(reference.prefill_logits.last().unwrap()) as u32,
        "sequence 0 is the reference prompt"
    );
}

#[test]
fn graphs_without_a_greedy_output_fall_back_to_host_argmax() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, reference) = load("qwen3-tied-hub", true, &tmp);
    // A graph exported before the output existed: drop it from the manifest.
    let dir = model.dir.clone();
    drop(model);
    let mut manifest = pio_models::Manifest::load(&dir).unwrap();
    manifest.outputs.retain(|o| o.name != pio_models::manifest::GREEDY_TOKENS_OUTPUT);
    manifest.save(&dir).unwrap();
    let mut model = DecoderModel::load(&dir, &ExecutionProvider::default()).unwrap();
    assert!(!model.manifest.has_greedy_output());
    let mut cache = model.new_cache().unwrap();
    let out = model.step(&reference.greedy.prompt_ids, 1, &mut cache, Fetch::Greedy).unwrap();
    assert!(matches!(out, StepOutput::Logits(_)), "without the output the logits come back");
    let g = &reference.greedy;
    assert_eq!(graph_greedy(&mut model, &g.prompt_ids, g.max_new_tokens), g.generated_ids);
}

/// Logits of the last position of each sequence, run alone from an empty cache.
fn alone(model: &mut DecoderModel, prompts: &[Vec<u32>], then: &[u32]) -> Vec<(Vec<f32>, Vec<f32>)> {
    prompts
        .iter()
        .zip(then)
        .map(|(p, &t)| {
            let mut cache = model.new_cache().unwrap();
            let first = model.forward(p, &mut cache).unwrap().last().to_vec();
            let next = model.forward(&[t], &mut cache).unwrap().last().to_vec();
            (first, next)
        })
        .collect()
}

#[test]
fn a_batch_prompt_longer_than_a_chunk_runs_each_sequence_through_the_shared_buffer() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen3-tied-hub", "glm4moe-a"] {
        let (mut model, reference) = load(name, true, &tmp);
        let first = reference.prompt_ids.clone();
        let mut second = first.clone();
        second.reverse();
        let prompts = [first, second];
        let then = [7u32, 11];
        let expected = alone(&mut model, &prompts, &then);
        let tokens: Vec<u32> = prompts.concat();
        // GroupQueryAttention refuses several tokens of several sequences after a past, so the
        // 3 + 3 + 2 chunks run per sequence through batch-1 views of the (host) shared buffer.
        model.set_prefill_chunk(Some(3));
        let mut cache = model.new_shared_host_cache(2, 64).unwrap();
        let logits = model.forward_batch(&tokens, 2, &mut cache).unwrap();
        assert_eq!((logits.batch, cache.len), (2, 8));
        let next = model.forward_batch(&then, 2, &mut cache).unwrap();
        for (b, (want_first, want_next)) in expected.iter().enumerate() {
            let d = max_abs_diff(logits.last_of(b), want_first);
            assert!(d <= LOGIT_TOLERANCE, "{name} sequence {b}: chunked batch prefill differs by {d}");
            let d = max_abs_diff(next.last_of(b), want_next);
            assert!(d <= LOGIT_TOLERANCE, "{name} sequence {b}: the batched step after it differs by {d}");
        }
        // Greedy fetches take the same path.
        let mut cache = model.new_shared_host_cache(2, 64).unwrap();
        let tokens_out = model.greedy_batch(&tokens, 2, &mut cache).unwrap();
        let want: Vec<u32> = expected.iter().map(|(f, _)| argmax(f) as u32).collect();
        assert_eq!(tokens_out, want, "{name}");
        // A multi-token step of both sequences after a past, in one go.
        let more = [3u32, 4, 5, 6];
        let out = model.forward_batch(&more, 2, &mut cache).unwrap();
        assert_eq!((out.batch, cache.len), (2, 10));

        // The growing (CPU default) cache runs such a prompt whole, and refuses a multi-token
        // batch step after a past with a message saying what to do instead.
        let mut cache = model.new_batch_cache(2, 64).unwrap();
        let whole = model.forward_batch(&tokens, 2, &mut cache).unwrap();
        for (b, (want_first, _)) in expected.iter().enumerate() {
            assert!(max_abs_diff(whole.last_of(b), want_first) <= LOGIT_TOLERANCE, "{name} sequence {b}");
        }
        let Err(err) = model.forward_batch(&more, 2, &mut cache) else {
            panic!("{name}: a multi-token batch step after a past")
        };
        let err = err.to_string();
        assert!(err.contains("only into an empty cache"), "{err}");
    }
}

/// What the serving engine does with a shared buffer: rows with lengths of their own decode in
/// one run, and rows that are not decoding run a dummy token at their own next position (a free
/// row at 0, a row between prefill chunks where its next chunk starts), which must corrupt
/// nothing: every row's logits equal the same sequence run alone.
#[test]
fn rows_of_different_lengths_decode_together_and_idle_rows_corrupt_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut model, reference) = load("qwen3-tied-hub", true, &tmp);
    let decoding: Vec<u32> = reference.prompt_ids.clone(); // 8 tokens
    let prefilling: Vec<u32> = (20..32).collect(); // 12 tokens, prefilled 5 + 7
    let logits = |out: pio_runtime::model::StepOutput, row: usize| out.into_logits().unwrap().last_of(row).to_vec();
    // Alone: each from an empty one-row cache, the prompt then one token at a time.
    let alone = |model: &mut DecoderModel, prompt: &[u32], then: &[u32]| {
        let mut cache = model.new_shared_host_cache(1, 64).unwrap();
        let mut out = vec![model.forward(prompt, &mut cache).unwrap().last().to_vec()];
        for &t in then {
            out.push(model.forward(&[t], &mut cache).unwrap().last().to_vec());
        }
        out
    };
    let want_decoding = alone(&mut model, &decoding, &[7, 7]);
    let want_prefilling = alone(&mut model, &prefilling, &[9]);

    // Three rows: 0 decodes, 1 is between prefill chunks, 2 is free (holding stale values).
    let mut cache = model.new_shared_host_cache(3, 64).unwrap();
    let run = |model: &mut DecoderModel, cache: &mut _, tokens: Vec<u32>, past: Vec<usize>, first: usize| {
        let inputs = StepInputs::new(tokens, past).unwrap();
        model.run_rows(&inputs, cache, first, Fetch::Logits).unwrap()
    };
    run(&mut model, &mut cache, vec![3; 30], vec![0], 2); // stale contents in the free row
    let first = logits(run(&mut model, &mut cache, decoding.clone(), vec![0], 0), 0);
    assert!(max_abs_diff(&first, &want_decoding[0]) <= LOGIT_TOLERANCE);
    run(&mut model, &mut cache, prefilling[..5].to_vec(), vec![0], 1);
    // The decode: row 0 at 8 tokens, row 1 idle at 5, row 2 idle at 0.
    let out = run(&mut model, &mut cache, vec![7, 0, 0], vec![8, 5, 0], 0);
    let d = max_abs_diff(&logits(out, 0), &want_decoding[1]);
    assert!(d <= LOGIT_TOLERANCE, "the decoding row beside idle rows differs by {d}");
    // Row 1's next chunk overwrites where its idle token went, and it answers as alone.
    let first = logits(run(&mut model, &mut cache, prefilling[5..].to_vec(), vec![5], 1), 0);
    let d = max_abs_diff(&first, &want_prefilling[0]);
    assert!(d <= LOGIT_TOLERANCE, "a prefill after an idle row differs by {d}");
    // Both decode together at different lengths.
    let out = run(&mut model, &mut cache, vec![7, 9], vec![9, 12], 0).into_logits().unwrap();
    assert!(max_abs_diff(out.last_of(0), &want_decoding[2]) <= LOGIT_TOLERANCE);
    assert!(max_abs_diff(out.last_of(1), &want_prefilling[1]) <= LOGIT_TOLERANCE);
}

/// A graph folder whose decoder file is gone, or is not an ONNX model: a typed error that names
/// the file, with ONNX Runtime's own error as the cause of the second.
#[test]
fn a_missing_or_corrupt_decoder_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join("graphs");
    export_to(&fixtures_dir().join("qwen3-tied-hub"), &graphs, cpu_settings(true));
    let decoder = graphs.join(pio_models::Manifest::load(&graphs).unwrap().decoder);
    let ep = ExecutionProvider::default();

    std::fs::write(&decoder, b"not an ONNX model").unwrap();
    let Err(err) = DecoderModel::load(&graphs, &ep) else { panic!("a corrupt decoder loaded") };
    let ModelError::Load { file, .. } = &err else { panic!("{err:?}") };
    assert_eq!(file, &decoder);
    assert!(err.to_string().contains(&decoder.display().to_string()), "{err}");
    let source = std::error::Error::source(&err).expect("ONNX Runtime's error as the source");
    assert!(source.downcast_ref::<ort::Error>().is_some(), "{source:?}");

    std::fs::remove_file(&decoder).unwrap();
    let Err(err) = DecoderModel::load(&graphs, &ep) else { panic!("a missing decoder loaded") };
    let ModelError::MissingFile { file, manifest } = &err else { panic!("{err:?}") };
    assert_eq!((file, manifest), (&decoder, &graphs.join("pio.json")));
    assert!(err.to_string().contains(&decoder.display().to_string()), "{err}");
}

/// Steps the model cannot take are refused before they run, naming the value at fault.
#[test]
fn a_step_the_model_cannot_take_names_the_value() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut model, _) = load("qwen3-tied-hub", true, &tmp);
    let vocab = model.vocab_size() as u32;
    let step_error = |err: ModelError, wanted: &str| match err {
        ModelError::Step(message) => assert!(message.contains(wanted), "{message:?} should name {wanted:?}"),
        other => panic!("{other:?}"),
    };

    let mut cache = model.new_shared_host_cache(1, 64).unwrap();
    step_error(model.forward(&[1, vocab + 5], &mut cache).err().unwrap(), &format!("token id {}", vocab + 5));
    let two_rows = StepInputs::new(vec![1, 2], vec![0, 0]).unwrap();
    step_error(model.run_rows(&two_rows, &mut cache, 0, Fetch::Logits).err().unwrap(), "rows 0..2");
    step_error(StepInputs::new(vec![1, 2, 3], vec![0, 0]).err().unwrap(), "each of the 2 sequences");
    step_error(
        StepInputs::uniform(vec![1, 2], 2, 0).unwrap().with_rope_deltas(vec![0]).err().unwrap(),
        "1 rope deltas",
    );
    assert_eq!(cache.len, 0, "refused steps leave the cache alone");

    match cache.truncate(3) {
        Err(ModelError::Cache(message)) => assert!(message.contains("0 tokens to 3"), "{message}"),
        other => panic!("{other:?}"),
    }
}
