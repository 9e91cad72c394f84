//! Helpers shared by the workspace integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pio_export::{export, ExportRequest, ExportSettings, ExportSettingsBuilder};
use pio_models::size::Precision;
use pio_models::TargetEp;
use serde::Deserialize;

pub mod vl_fixture;

/// The workspace's tests/fixtures (the crates' tests include this file too, from their own
/// manifest folders).
pub fn fixtures_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .map(|dir| dir.join("tests").join("fixtures"))
        .find(|dir| dir.is_dir())
        .unwrap_or_else(|| here.join("tests").join("fixtures"))
}

/// The transformers reference written by scripts/make_fixtures.py.
#[derive(Deserialize)]
pub struct Reference {
    pub prompt_ids: Vec<u32>,
    pub prefill_logits: Vec<Vec<f32>>,
    pub steps: Vec<Step>,
    pub greedy: Greedy,
    pub greedy_token_by_token: Vec<u32>,
}

#[derive(Deserialize)]
pub struct Step {
    pub input_id: u32,
    pub position: usize,
    pub logits: Vec<f32>,
}

#[derive(Deserialize)]
pub struct Greedy {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub generated_ids: Vec<u32>,
}

pub fn load_reference(fixture: &Path) -> Reference {
    let path = fixture.join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn cpu_settings(last_token_logits: bool) -> ExportSettingsBuilder {
    // The CPU takes no q/k norm inside attention, so whether the model has one does not matter.
    ExportSettings::builder(Precision::Fp32, TargetEp::Cpu, 256, false).last_token_logits(last_token_logits)
}

/// A settings knob for the parity checks: attention from standard ONNX ops instead of
/// GroupQueryAttention (`--no-fused-attention`).
pub fn unfused_attention(settings: ExportSettingsBuilder) -> ExportSettingsBuilder {
    settings.fused_attention(false)
}

/// Exports `checkpoint` into `out` with the given settings.
pub fn export_to(checkpoint: &Path, out: &Path, settings: ExportSettingsBuilder) {
    let settings = settings.build().unwrap_or_else(|e| panic!("export settings for {}: {e:#}", checkpoint.display()));
    let request = ExportRequest::builder(checkpoint, out, settings)
        .overwrite(true)
        .source(format!("test {}", checkpoint.display()))
        .build();
    export(&request).unwrap_or_else(|e| panic!("export of {} failed: {e:#}", checkpoint.display()));
}

/// Exports `checkpoint` into `out` with settings that must be refused (when they are built, or checked against
/// the model by the export); returns the error text.
pub fn export_error(checkpoint: &Path, out: &Path, settings: ExportSettingsBuilder) -> String {
    let settings = match settings.build() {
        Ok(settings) => settings,
        Err(e) => return format!("{e:#}"),
    };
    match export(&ExportRequest::builder(checkpoint, out, settings).source("test").build()) {
        Ok(_) => panic!("export of {} should have been refused", checkpoint.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// Writes a small synthetic Qwen3 checkpoint (1 layer, hidden 64) at the real 151,936-token
/// vocabulary with the real Qwen3 tokenizer into `root/checkpoint`, exports it (fp32, CPU, a
/// 256-token context) into `root/graphs` and returns that folder.
pub fn export_real_tokenizer_qwen3(root: &Path, seed: u64) -> PathBuf {
    export_real_tokenizer_qwen3_with_context(root, seed, 256)
}

/// [`export_real_tokenizer_qwen3`] with a context of `context_length` tokens.
pub fn export_real_tokenizer_qwen3_with_context(root: &Path, seed: u64, context_length: usize) -> PathBuf {
    let tokenizer = pio_models::paths::qwen3_tokenizer_dir().unwrap_or_else(|| {
        panic!(
            "the Qwen3 tokenizer is missing (.cache/pio/tokenizers/qwen3/tokenizer.json): run scripts/setup.sh first"
        )
    });
    let shape = pio_export::synthetic::ShapeOverrides {
        layers: Some(1),
        hidden_size: Some(64),
        intermediate_size: Some(128),
        heads: Some(2),
        kv_heads: Some(1),
        head_dim: Some(32),
        ..Default::default()
    };
    let preset = pio_models::presets::find_preset("qwen3-4b-instruct-2507").unwrap();
    // `root` outlives test runs (CARGO_TARGET_TMPDIR); a checkpoint from before synthetic
    // checkpoints carried their marker would be refused as "not a synthetic checkpoint".
    let _ = std::fs::remove_dir_all(root.join("checkpoint"));
    let checkpoint =
        pio_export::synthetic::write_checkpoint(preset, &shape, seed, Some(&tokenizer), &root.join("checkpoint"))
            .unwrap_or_else(|e| panic!("synthetic checkpoint: {e:#}"));
    let graphs = root.join("graphs");
    export_to(&checkpoint, &graphs, cpu_settings(true).context_length(context_length));
    graphs
}

/// A preset's shape shrunk for CPU tests: `layers` layers of width 64 (4 heads, 2 KV heads of 32),
/// a 256-token vocabulary and, for MoE presets, `experts` experts of width 32.
pub fn small_shape(layers: usize, experts: usize) -> pio_export::synthetic::ShapeOverrides {
    pio_export::synthetic::ShapeOverrides {
        layers: Some(layers),
        hidden_size: Some(64),
        intermediate_size: Some(96),
        heads: Some(4),
        kv_heads: Some(2),
        head_dim: Some(32),
        vocab_size: Some(256),
        experts: Some(experts),
        moe_intermediate_size: Some(32),
        ..Default::default()
    }
}

/// The logits of one CPU prefill of `prompt` through the graphs in `graphs`.
pub fn prefill(graphs: &Path, prompt: &[u32]) -> pio_runtime::model::Logits {
    let ep = pio_runtime::ep::ExecutionProvider::default();
    let mut model = pio_runtime::model::DecoderModel::load(graphs, &ep).unwrap();
    let mut cache = model.new_cache().unwrap();
    model.forward(prompt, &mut cache).unwrap()
}

/// The last position's logits of [`prefill`].
pub fn prefill_last(graphs: &Path, prompt: &[u32]) -> Vec<f32> {
    prefill(graphs, prompt).last().to_vec()
}

pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows differ in length");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The parity bar against transformers (fp32 on the CPU): max |logit diff|.
pub const LOGIT_TOLERANCE: f32 = 1e-4;

/// Largest |diff| seen by [`check_logit_parity`].
#[derive(Debug)]
pub struct ParityDiffs {
    pub prefill: f32,
    pub steps: f32,
}

/// Exports fixture `name` (fp32, CPU, every position's logits) and checks the prefill logits
/// at every prompt position and each single-token step through the KV cache against the
/// reference: max |diff| <= [`LOGIT_TOLERANCE`] and the same argmax everywhere.
pub fn check_logit_parity(name: &str) -> ParityDiffs {
    check_logit_parity_with(name, |s| s)
}

/// [`check_logit_parity`] with the export settings changed by `knob`.
pub fn check_logit_parity_with(
    name: &str,
    knob: impl Fn(ExportSettingsBuilder) -> ExportSettingsBuilder,
) -> ParityDiffs {
    use pio_runtime::ep::ExecutionProvider;
    use pio_runtime::model::DecoderModel;

    let fixture = fixtures_dir().join(name);
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join(name);
    export_to(&fixture, &graphs, knob(cpu_settings(false)));
    let mut model = DecoderModel::load(&graphs, &ExecutionProvider::default()).unwrap();

    let mut diffs = ParityDiffs { prefill: 0.0, steps: 0.0 };
    let mut cache = model.new_cache().unwrap();
    let logits = model.forward(&reference.prompt_ids, &mut cache).unwrap();
    assert_eq!(logits.rows, reference.prompt_ids.len());
    for (pos, expected) in reference.prefill_logits.iter().enumerate() {
        let diff = max_abs_diff(logits.row(pos), expected);
        assert!(diff <= LOGIT_TOLERANCE, "{name}: prefill position {pos}: max |diff| {diff}");
        assert_eq!(argmax(logits.row(pos)), argmax(expected), "{name}: prefill position {pos}: argmax");
        diffs.prefill = diffs.prefill.max(diff);
    }
    for (i, step) in reference.steps.iter().enumerate() {
        assert_eq!(cache.len, step.position, "{name}: step {i} position");
        let logits = model.forward(&[step.input_id], &mut cache).unwrap();
        let diff = max_abs_diff(logits.last(), &step.logits);
        assert!(diff <= LOGIT_TOLERANCE, "{name}: cached step {i}: max |diff| {diff}");
        assert_eq!(argmax(logits.last()), argmax(&step.logits), "{name}: cached step {i}: argmax");
        diffs.steps = diffs.steps.max(diff);
    }
    eprintln!("{name}: max |logit diff| prefill {:.2e}, cached steps {:.2e}", diffs.prefill, diffs.steps);
    diffs
}

/// Greedy decoding of `n` tokens after `prompt`, fed as one prefill or token by token.
pub fn greedy(
    model: &mut pio_runtime::model::DecoderModel,
    prompt: &[u32],
    n: usize,
    token_by_token: bool,
) -> Vec<u32> {
    let mut cache = model.new_cache().unwrap();
    let mut last = if token_by_token {
        let mut logits = None;
        for &t in prompt {
            logits = Some(model.forward(&[t], &mut cache).unwrap());
        }
        logits.expect("empty prompt")
    } else {
        model.forward(prompt, &mut cache).unwrap()
    };
    let mut out = Vec::new();
    for _ in 0..n {
        let next = argmax(last.last()) as u32;
        out.push(next);
        last = model.forward(&[next], &mut cache).unwrap();
    }
    out
}

/// Exports fixture `name` the default way (last-position logits) and checks greedy decoding
/// against transformers' `generate`, from one prefill and token by token.
pub fn check_greedy_parity(name: &str) {
    check_greedy_parity_with(name, |s| s)
}

/// [`check_greedy_parity`] with the export settings changed by `knob`.
pub fn check_greedy_parity_with(name: &str, knob: impl Fn(ExportSettingsBuilder) -> ExportSettingsBuilder) {
    use pio_runtime::ep::ExecutionProvider;
    use pio_runtime::model::DecoderModel;

    let fixture = fixtures_dir().join(name);
    let reference = load_reference(&fixture);
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join(name);
    export_to(&fixture, &graphs, knob(cpu_settings(true)));
    let mut model = DecoderModel::load(&graphs, &ExecutionProvider::default()).unwrap();
    let g = &reference.greedy;
    let prefilled = greedy(&mut model, &g.prompt_ids, g.max_new_tokens, false);
    assert_eq!(prefilled, g.generated_ids, "{name}: greedy from one prefill");
    let stepwise = greedy(&mut model, &g.prompt_ids, g.max_new_tokens, true);
    assert_eq!(stepwise, reference.greedy_token_by_token, "{name}: greedy token by token");
}

/// The fixtures (folders with a reference.json) whose names start with `prefix`, sorted.
pub fn fixtures_named(prefix: &str) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("reference.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    found.sort();
    found
}

/// A float32 copy of checkpoint `src` in `dst` whose projection weights (`*_proj*`: attention,
/// dense MLPs, experts, shared experts; not routers, embeddings or the lm_head) are replaced by
/// their int4 round trip at `block`: the weights MatMulNBits and QMoE compute with.
pub fn int4_round_trip_checkpoint(src: &Path, dst: &Path, block: usize) {
    int4_round_trip_checkpoint_where(src, dst, block, |name| name.contains("_proj"))
}

/// [`int4_round_trip_checkpoint`] for the 2-D tensors `quantized(name)` selects.
pub fn int4_round_trip_checkpoint_where(src: &Path, dst: &Path, block: usize, quantized: impl Fn(&str) -> bool) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let ck = pio_export::checkpoint::Checkpoint::open(src).unwrap();
    let names: Vec<String> = ck.tensor_names().map(str::to_string).collect();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .into_iter()
        .map(|name| {
            let t = ck.tensor_any_shape(&name).unwrap();
            let mut values = pio_export::convert::to_f32_vec(&t);
            if t.shape.len() == 2 && quantized(&name) {
                let layout = pio_export::quant::Int4Layout::new(t.shape[0], t.shape[1], block).unwrap();
                let q =
                    pio_export::quant::quantize(&layout, &values, pio_models::manifest::TensorDtype::Float32).unwrap();
                values = pio_export::quant::dequantize(&layout, &q.packed, &q.scales);
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, bytes)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
}

/// An engine over `graphs` on the CPU: `max_seqs` slots of `max_model_len` tokens (None: the
/// graph's context), with or without prefix caching.
pub fn start_engine(
    graphs: &Path,
    max_seqs: usize,
    max_model_len: Option<usize>,
    prefix_caching: bool,
) -> pio_runtime::engine::Engine {
    let mut config =
        pio_runtime::engine::EngineConfig::builder(graphs).max_seqs(max_seqs).prefix_caching(prefix_caching);
    if let Some(n) = max_model_len {
        config = config.max_model_len(n);
    }
    pio_runtime::engine::Engine::start(config.build().unwrap())
        .unwrap_or_else(|e| panic!("cannot start an engine on {}: {e:#}", graphs.display()))
}

/// Runs `request` to the end, collecting its token events and its output.
pub fn generate_collect(
    engine: &pio_runtime::engine::Engine,
    request: pio_runtime::engine::Request,
) -> (pio_runtime::generate::GenerationOutput, Vec<pio_runtime::generate::TokenEvent>) {
    use pio_runtime::engine::Event;
    let mut events = Vec::new();
    let mut prompt_logprobs = None;
    let handle = engine.submit(request).unwrap_or_else(|e| panic!("submit failed: {e:#}"));
    for event in handle {
        match event.unwrap_or_else(|e| panic!("generation failed: {e:#}")) {
            Event::PromptLogprobs(scores) => {
                assert!(events.is_empty(), "the prompt's logprobs came after {} tokens", events.len());
                assert!(prompt_logprobs.replace(scores).is_none(), "the prompt's logprobs came twice");
            }
            Event::Token(t) => events.push(t),
            Event::Finished(output) => {
                assert_eq!(output.prompt_logprobs, prompt_logprobs, "the output's prompt logprobs are the event's");
                return (output, events);
            }
        }
    }
    panic!("the request ended without an output")
}

/// A request for `prompt` ids with `options`.
pub fn ids_request(prompt: &[u32], options: pio_runtime::generate::GenerateOptions) -> pio_runtime::engine::Request {
    pio_runtime::engine::Request::new(pio_runtime::engine::Prompt::Ids(prompt.to_vec())).with_options(options)
}

/// Greedy decoding of `max_tokens`, eos ignored.
pub fn greedy_options(max_tokens: usize) -> pio_runtime::generate::GenerateOptions {
    pio_runtime::generate::GenerateOptions {
        max_tokens: Some(max_tokens),
        sampling: pio_runtime::sampling::SamplingParams::greedy(),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Every position's logits of `prompt`, then of each cached step in `steps`.
pub fn logits_with_steps(graphs: &Path, prompt: &[u32], steps: &[u32]) -> Vec<Vec<f32>> {
    let mut model =
        pio_runtime::model::DecoderModel::load(graphs, &pio_runtime::ep::ExecutionProvider::default()).unwrap();
    let mut cache = model.new_cache().unwrap();
    let prefill = model.forward(prompt, &mut cache).unwrap();
    let mut rows: Vec<Vec<f32>> = (0..prefill.rows).map(|i| prefill.row(i).to_vec()).collect();
    for &t in steps {
        rows.push(model.forward(&[t], &mut cache).unwrap().last().to_vec());
    }
    rows
}

/// Waits until the engine holds no slot and no request waits (the worker notices cancellations
/// within a step; the bound only keeps a broken engine from hanging the test).
pub fn wait_idle(engine: &pio_runtime::engine::Engine) {
    let start = std::time::Instant::now();
    while engine.active_sequences() > 0 || engine.metrics().requests_waiting > 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the engine did not free its slots: {:?}",
            engine.metrics()
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
