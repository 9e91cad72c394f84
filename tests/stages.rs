//! Decoders exported in stages (`pio-export --stages`, `--stage-boundaries`) against the same
//! checkpoint exported as one graph, on the CPU in fp32, where the same kernels on the same
//! numbers give the same bits: the stages must give exactly the single graph's logits.
//!
//! - every text fixture in 2 and 3 stages (those with 3 layers or more): the logits of every
//!   prompt position and of decode steps after it, with the stages run one after the other on
//!   the growing cache and on a thread each over the shared buffer, and a batched decode of
//!   three sequences of different lengths cut into micro-batches;
//! - GLM-4.7's shape cut short (3 dense layers, then MoE): boundaries inside the dense layers
//!   and at the dense/MoE transition, fused and unfused norms, and attention from standard ops;
//! - Qwen3-VL with a boundary among the deepstack layers: the engine's greedy tokens with images
//!   equal transformers';
//! - the engine on a staged export gives the single graph's tokens for concurrent requests,
//!   greedy and sampled;
//! - the direct int4 path (random int4 codes drawn at export) in stages equals it in one graph;
//! - bad stage settings are refused, naming the flag.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use pio_export::stages::StageSplit;
use pio_export::synthetic::{write_checkpoint_with, CheckpointContents};
use pio_export::ExportSettingsBuilder;
use pio_models::find_preset;
use pio_runtime::engine::{Engine, EngineConfig};
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::generate::GenerateOptions;
use pio_runtime::model::{DecoderModel, Fetch, KvCache};
use pio_runtime::sampling::SamplingParams;
use pio_runtime::stages::{PipelineMode, StageOptions};
use pio_runtime::step_inputs::StepInputs;

/// The text fixtures (every architecture: Qwen3, Qwen3-MoE, GLM-4-MoE).
const TEXT_FIXTURES: [&str; 8] = [
    "qwen3-tied-hub",
    "qwen3-untied-rp",
    "qwen3-fp16",
    "qwen3-sliding",
    "qwen3moe-a",
    "qwen3moe-b",
    "glm4moe-a",
    "glm4moe-b",
];

fn staged(settings: ExportSettingsBuilder, split: StageSplit) -> ExportSettingsBuilder {
    settings.stages(split)
}

fn load(graphs: &Path, options: StageOptions) -> DecoderModel {
    DecoderModel::load_with(graphs, &ExecutionProvider::default(), &options)
        .unwrap_or_else(|e| panic!("{}: {e:#}", graphs.display()))
}

/// What a model computes for `prompt`: every position's logits (an all-logits export), then
/// the last logits of 3 greedy steps after it, on `cache`.
fn script(model: &mut DecoderModel, cache: &mut KvCache, prompt: &[u32]) -> Vec<Vec<f32>> {
    let prefill = model.forward(prompt, cache).unwrap();
    let mut rows: Vec<Vec<f32>> = (0..prefill.rows).map(|i| prefill.row(i).to_vec()).collect();
    let mut next = argmax(prefill.last()) as u32;
    for _ in 0..3 {
        let l = model.forward(&[next], cache).unwrap();
        next = argmax(l.last()) as u32;
        rows.push(l.last().to_vec());
    }
    rows
}

/// Three sequences of different lengths prefilled into their slots of a shared host buffer,
/// then 3 decode steps of all three at once: each step's logits.
fn batched_decode(model: &mut DecoderModel, vocab: u32) -> Vec<Vec<f32>> {
    let mut cache = model.new_shared_host_cache(3, 64).unwrap();
    let prompts: Vec<Vec<u32>> =
        [5usize, 9, 2].iter().map(|&n| (0..n as u32).map(|i| (i * 37 + n as u32) % vocab).collect()).collect();
    let mut next = Vec::new();
    for (slot, p) in prompts.iter().enumerate() {
        let out =
            model.run_rows(&StepInputs::new(p.clone(), vec![0]).unwrap(), &mut cache, slot, Fetch::Greedy).unwrap();
        next.extend(out.greedy());
    }
    let mut pasts: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut steps = Vec::new();
    for _ in 0..3 {
        let inputs = StepInputs::new(next.clone(), pasts.clone()).unwrap();
        let logits = model.run_rows(&inputs, &mut cache, 0, Fetch::Logits).unwrap().into_logits().unwrap();
        next = (0..3).map(|b| argmax(logits.last_of(b)) as u32).collect();
        pasts.iter_mut().for_each(|p| *p += 1);
        steps.push(logits.data);
    }
    steps
}

fn assert_same(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(max_abs_diff(g, w), 0.0, "{what}: row {i} differs from the single graph");
    }
}

/// `fixture` (or a checkpoint) exported with `settings` as one graph and as each split, checked
/// to compute the same logits every way it can run. Micro-batches change which rows run
/// together, which changes the last bits of kernels that depend on the batch (MoE experts, int4
/// MatMulNBits) for any graph: a micro-batched staged model is compared with the single graph cut
/// into the same micro-batches.
fn check_stages(name: &str, checkpoint: &Path, settings: ExportSettingsBuilder, splits: &[StageSplit]) {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    export_to(checkpoint, &single, settings.clone());
    let shared = settings.clone().build().unwrap().fused_attention();
    let mut model = load(&single, StageOptions::new());
    let vocab = model.vocab_size() as u32;
    let prompt: Vec<u32> = (0..11).map(|i| (i * 53 + 7) % vocab).collect();
    let mut cache = model.new_cache().unwrap();
    let want = script(&mut model, &mut cache, &prompt);
    let mut want_batched = Vec::new();
    for micro in [1, 2] {
        model.set_micro_batches(micro);
        want_batched.push(if shared { batched_decode(&mut model, vocab) } else { Vec::new() });
    }
    for (i, split) in splits.iter().enumerate() {
        let out = tmp.path().join(format!("staged-{i}"));
        export_to(checkpoint, &out, staged(settings.clone(), split.clone()));
        let manifest = pio_models::Manifest::load(&out).unwrap();
        let what = format!("{name} {split:?}");
        assert!(manifest.stages.len() > 1, "{what}: not staged");
        // One after the other on the caller's thread, and a thread per stage.
        for (mode, micro) in [(PipelineMode::Sequential, 1), (PipelineMode::PerStage, 1), (PipelineMode::PerStage, 2)] {
            let mut model = load(&out, StageOptions::new().with_pipeline(mode).with_micro_batches(micro));
            let what = format!("{what} {mode:?} micro-batches {micro}");
            assert_eq!(model.stage_count(), manifest.stages.len());
            let mut cache = model.new_cache().unwrap();
            assert_same(&format!("{what} growing cache"), &script(&mut model, &mut cache, &prompt), &want);
            if shared {
                let mut cache = model.new_shared_host_cache(1, 64).unwrap();
                assert_same(&format!("{what} shared buffer"), &script(&mut model, &mut cache, &prompt), &want);
                let batched = batched_decode(&mut model, vocab);
                assert_same(&format!("{what} batched decode"), &batched, &want_batched[micro - 1]);
            }
            let timings = model.stage_timings();
            assert!(timings.busy.iter().all(|b| !b.is_zero()), "{what}: every stage ran: {timings:?}");
        }
    }
}

#[test]
fn two_and_three_stages_give_the_single_graphs_logits_for_every_text_fixture() {
    for name in TEXT_FIXTURES {
        let fixture = fixtures_dir().join(name);
        let layers = pio_models::ModelConfig::from_file(&fixture.join("config.json")).unwrap().text.num_hidden_layers;
        let splits: Vec<StageSplit> = [2, 3].into_iter().filter(|&n| n <= layers).map(StageSplit::Count).collect();
        check_stages(name, &fixture, cpu_settings(false), &splits);
    }
}

/// GLM-4.7's preset cut to 5 layers of small width: 3 dense layers (first_k_dense_replace), then 2
/// MoE layers with grouped sigmoid routing and a shared expert.
fn glm_checkpoint(root: &Path, contents: CheckpointContents) -> PathBuf {
    let shape = small_shape(5, 8);
    write_checkpoint_with(find_preset("glm-4-7").unwrap(), &shape, 11, None, &root.join("ck"), contents).unwrap()
}

#[test]
fn glm_boundaries_inside_the_dense_layers_and_at_the_moe_transition() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = glm_checkpoint(tmp.path(), CheckpointContents::All);
    let config = pio_models::ModelConfig::from_file(&ck.join("config.json")).unwrap();
    assert!((0..3).all(|l| !config.text.is_moe_layer(l)) && (3..5).all(|l| config.text.is_moe_layer(l)));
    // 1: inside the dense layers; 3: where the MoE layers start; 4: between two MoE layers.
    let splits =
        [StageSplit::Boundaries(vec![1, 3]), StageSplit::Boundaries(vec![3]), StageSplit::Boundaries(vec![2, 4])];
    check_stages("glm", &ck, cpu_settings(false), &splits);
    // The unfused norms hand on the residual stream alone; the standard-op attention takes the
    // step's length from the hidden states.
    check_stages("glm unfused norms", &ck, cpu_settings(false).fused_norms(false), &splits[..1]);
    let unfused = unfused_attention(cpu_settings(false));
    check_stages("glm unfused attention", &ck, unfused, &splits[..1]);
}

#[test]
fn direct_int4_weights_in_stages_equal_them_in_one_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = glm_checkpoint(tmp.path(), CheckpointContents::WithoutQuantized);
    let names: Vec<String> =
        pio_export::checkpoint::Checkpoint::open(&ck).unwrap().tensor_names().map(String::from).collect();
    assert!(names.iter().all(|n| !n.ends_with("_proj.weight")), "the projections are not in the checkpoint");
    assert!(names.iter().any(|n| n.ends_with("mlp.gate.weight")), "the routers are");
    let int4 = cpu_settings(false).precision(pio_models::Precision::Int4).random_int4(Some(5));
    check_stages("glm direct int4", &ck, int4.clone(), &[StageSplit::Count(2)]);
    // Its logits are those of a working model: finite, not flat.
    let out = tmp.path().join("g");
    export_to(&ck, &out, int4);
    let logits = prefill_last(&out, &[1, 2, 3, 4]);
    assert!(logits.iter().all(|v| v.is_finite()));
    let spread = logits.iter().fold(f32::MIN, |m, &v| m.max(v)) - logits.iter().fold(f32::MAX, |m, &v| m.min(v));
    assert!(spread > 1e-3, "flat logits: spread {spread}");
    // Without --direct-int4 the checkpoint is refused, naming the reason.
    let err =
        export_error(&ck, &tmp.path().join("refused"), cpu_settings(false).precision(pio_models::Precision::Int4));
    assert!(err.contains("--direct-int4"), "{err}");
}

#[test]
fn qwen3_vl_with_a_boundary_among_the_deepstack_layers_gives_transformers_tokens() {
    use common::vl_fixture::VlExport;
    for name in ["qwen3vl-a", "qwen3vl-b"] {
        // Layer 0 in the first stage with the image rows, the other deepstack layers after it.
        let fx = VlExport::with_settings(name, staged(cpu_settings(true), StageSplit::Boundaries(vec![1])));
        assert_eq!(pio_models::Manifest::load(&fx.graphs).unwrap().stages.len(), 2);
        let config = EngineConfig::builder(&fx.graphs)
            .max_seqs(4)
            .prefill_budget(7)
            .idle_prefill_budget(7)
            .stages(StageOptions::new().with_pipeline(PipelineMode::PerStage).with_micro_batches(2));
        let engine = Engine::start(config.build().unwrap()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let handles: Vec<_> = fx
            .reference
            .cases
            .values()
            .map(|case| {
                let request =
                    pio_runtime::engine::Request::new(pio_runtime::engine::Prompt::Chat(vec![fx.message(case)]))
                        .with_options(greedy_options(case.greedy.max_new_tokens));
                engine.submit(request).unwrap()
            })
            .collect();
        for ((case_name, case), handle) in fx.reference.cases.iter().zip(handles) {
            let output = handle.wait().unwrap_or_else(|e| panic!("{name} {case_name}: {e:#}"));
            assert_eq!(output.generated_ids, case.greedy.generated_ids, "{name} {case_name}: greedy tokens");
        }
    }
}

#[test]
fn the_engine_on_stages_answers_concurrent_requests_as_on_one_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = fixtures_dir().join("qwen3moe-b");
    let (single, staged_dir) = (tmp.path().join("single"), tmp.path().join("staged"));
    export_to(&fixture, &single, cpu_settings(true));
    export_to(&fixture, &staged_dir, staged(cpu_settings(true), StageSplit::Count(3)));
    let requests: Vec<(Vec<u32>, GenerateOptions)> = (0..8u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + i * 5).map(|t| (t * 31 + i * 7) % 512).collect();
            let options = if i % 2 == 0 {
                greedy_options(6 + i as usize)
            } else {
                let sampling =
                    SamplingParams { temperature: 0.8, top_k: 40, seed: Some(i as u64), ..Default::default() };
                GenerateOptions {
                    max_tokens: Some(9),
                    sampling,
                    ignore_eos: true,
                    logprobs: Some(2),
                    ..Default::default()
                }
            };
            (prompt, options)
        })
        .collect();
    let run = |graphs: &Path, micro: usize, mode: PipelineMode| {
        let stages = StageOptions::new().with_pipeline(mode).with_micro_batches(micro);
        // Prefill pacing off: it sizes chunks from measured times, and the chunks' shapes change
        // the last bits of the MoE sums, so runs would not batch alike.
        let config = EngineConfig::builder(graphs).max_seqs(4).prefill_budget(16).itl_factor(None).stages(stages);
        let engine = Engine::start(config.build().unwrap()).unwrap_or_else(|e| panic!("{e:#}"));
        // Queued together, so that every run batches the same rows in the same steps.
        let batch = requests.iter().map(|(p, o)| ids_request(p, o.clone())).collect();
        let handles = engine.submit_batch(batch).unwrap();
        handles.into_iter().map(|h| h.wait().unwrap()).map(|o| (o.generated_ids, o.logprobs)).collect::<Vec<_>>()
    };
    // Micro-batches change which rows run together (and so the last bits of the MoE experts'
    // sums): each is compared with the single graph cut the same way.
    for micro in [1, 2] {
        let want = run(&single, micro, PipelineMode::Sequential);
        for mode in [PipelineMode::PerDevice, PipelineMode::PerStage] {
            assert_eq!(run(&staged_dir, micro, mode), want, "{mode:?}, micro-batches {micro}");
        }
    }
}

#[test]
fn bad_stage_settings_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = fixtures_dir().join("qwen3-tied-hub"); // 3 layers
    let refused =
        |split: StageSplit| export_error(&fixture, &tmp.path().join("out"), staged(cpu_settings(true), split));
    assert!(refused(StageSplit::Count(0)).contains("--stages 0"));
    assert!(refused(StageSplit::Count(4)).contains("3 layers"));
    assert!(refused(StageSplit::Boundaries(vec![2, 1])).contains("--stage-boundaries"));
    assert!(refused(StageSplit::Boundaries(vec![3])).contains("--stage-boundaries"));
    assert!(refused(StageSplit::MemoryBudget(1000)).contains("--stage-memory-gb"));
    let direct = cpu_settings(true).random_int4(Some(1));
    assert!(export_error(&fixture, &tmp.path().join("out"), direct).contains("--direct-int4"));
    assert!(!tmp.path().join("out").exists(), "a refused export leaves nothing");
    // The runtime: GPUs for a CPU run, more devices than stages.
    let graphs = tmp.path().join("staged");
    export_to(&fixture, &graphs, staged(cpu_settings(true), StageSplit::Count(2)));
    let err =
        DecoderModel::load_with(&graphs, &ExecutionProvider::default(), &StageOptions::new().with_devices(vec![0, 1]))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
    assert!(err.contains("--devices") && err.contains("--ep cuda"), "{err}");
    let err = EngineConfig::builder(&graphs).stages(StageOptions::new().with_micro_batches(0)).build().unwrap_err();
    assert!(err.to_string().contains("micro_batches"), "{err}");
}
