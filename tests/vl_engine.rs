//! Qwen3-VL through the runtime's own path, on the CPU, against transformers (the fixtures of
//! scripts/make_vl_fixtures.py): image FILES in chat messages, decoded and preprocessed by
//! pio-image, the chat template and the tokenizer, the vision graph, the engine's steps.
//!
//! * every case's 32 greedy tokens equal transformers' (one image; two images of different sizes;
//!   text only; the second config with other deepstack indexes and mrope_section), alone, all at
//!   once in one engine (images and text in the same batch), and with prefill chunks cut through
//!   the images;
//! * the same image twice is encoded once (the encoder cache), with the same tokens;
//! * two prompts identical but for the image share no image block in the prefix cache;
//! * bad images, and images a model cannot take, are refused at submission, before any model work;
//! * a batched decode of rows with different lengths and rope deltas equals each row alone (the
//!   rotary table of a step is laid out by cache slot, each row's tokens at its own slots), and
//!   rows at the same slot with different deltas run apart and still equal each alone;
//! * `pio serve`'s server takes OpenAI `image_url` parts (data URIs) and answers transformers'
//!   tokens, and refuses local paths from clients.

mod common;

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use common::vl_fixture::{VlCase, VlExport};
use common::*;
use pio_runtime::engine::{Engine, EngineConfig, EngineError, Prompt, Request};
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::generate::GenerationOutput;
use pio_runtime::model::{DecoderModel, Fetch};
use pio_runtime::step_inputs::StepInputs;
use pio_runtime::vision::ImageFeatures;
use serde_json::json;

const FIXTURES: [&str; 2] = ["qwen3vl-a", "qwen3vl-b"];

/// Each fixture exported once for all the tests of this file.
fn export(name: &str) -> &'static VlExport {
    static EXPORTS: OnceLock<Vec<VlExport>> = OnceLock::new();
    let all = EXPORTS.get_or_init(|| FIXTURES.iter().map(|f| VlExport::new(f)).collect());
    &all[FIXTURES.iter().position(|f| *f == name).unwrap()]
}

fn engine(
    fx: &VlExport,
    configure: impl FnOnce(pio_runtime::engine::EngineConfigBuilder) -> pio_runtime::engine::EngineConfigBuilder,
) -> Engine {
    let config = configure(EngineConfig::builder(&fx.graphs).max_seqs(4));
    Engine::start(config.build().unwrap()).unwrap_or_else(|e| panic!("engine: {e:#}"))
}

fn chat_request(fx: &VlExport, case: &VlCase) -> Request {
    Request::new(Prompt::Chat(vec![fx.message(case)])).with_options(greedy_options(case.greedy.max_new_tokens))
}

fn run(engine: &Engine, request: Request) -> GenerationOutput {
    generate_collect(engine, request).0
}

/// The prompt the engine builds (template, tokenizer, placeholders expanded) is the processor's,
/// and the greedy tokens are transformers'.
fn assert_matches(name: &str, case_name: &str, case: &VlCase, output: &GenerationOutput) {
    assert_eq!(output.prompt_ids, case.input_ids, "{name} {case_name}: prompt ids");
    assert_eq!(output.generated_ids, case.greedy.generated_ids, "{name} {case_name}: greedy tokens");
}

#[test]
fn image_files_to_tokens_equal_transformers_alone_together_and_in_chunks() {
    for name in FIXTURES {
        let fx = export(name);
        let alone = engine(fx, |c| c);
        let template = alone.chat_template().expect("the export's chat_template.json");
        for (case_name, case) in &fx.reference.cases {
            // The template alone renders the processor's text (each image a placeholder).
            let mut placeholders = fx.message(case);
            for part in placeholders["content"].as_array_mut().unwrap() {
                if part["type"] == "image" {
                    *part = json!({"type": "image"});
                }
            }
            let rendered = template.render(&[placeholders], &pio_runtime::chat_template::RenderOptions::generation());
            assert_eq!(rendered.unwrap(), case.prompt_text, "{name} {case_name}: rendered prompt");
            let output = run(&alone, chat_request(fx, case));
            assert_matches(name, case_name, case, &output);
            let images = output.timings.images.as_ref();
            assert_eq!(images.map_or(0, |i| i.images), case.image_files.len(), "{name} {case_name}: timings");
        }
        // Every case at once (images and text in the same decode steps), prefill chunks of 7
        // tokens cut through the images, and no prefix cache: nothing comes from the first engine.
        let together = engine(fx, |c| c.prefill_budget(7).idle_prefill_budget(7).prefix_caching(false));
        let handles: Vec<_> =
            fx.reference.cases.values().map(|case| together.submit(chat_request(fx, case)).unwrap()).collect();
        for ((case_name, case), handle) in fx.reference.cases.iter().zip(handles) {
            let output = handle.wait().unwrap_or_else(|e| panic!("{name} {case_name}: {e:#}"));
            assert_matches(name, case_name, case, &output);
        }
    }
}

#[test]
fn the_same_image_twice_is_encoded_once() {
    let fx = export("qwen3vl-a");
    let case = fx.case("one_image");
    // No prefix cache: the second request runs its whole prompt, with the cached encoding.
    let engine = engine(fx, |c| c.prefix_caching(false));
    let first = run(&engine, chat_request(fx, case));
    let second = run(&engine, chat_request(fx, case));
    assert_eq!(first.generated_ids, case.greedy.generated_ids);
    assert_eq!(second.generated_ids, case.greedy.generated_ids);
    let (a, b) = (first.timings.images.unwrap(), second.timings.images.unwrap());
    assert_eq!((a.encoded, a.encoder_cache_hits), (1, 0));
    assert_eq!((b.encoded, b.encoder_cache_hits), (0, 1));
    // The same file as bytes in a data URI, twice in one message: one encoding, the cached one.
    let bytes = std::fs::read(fx.fixture.join(&case.image_files[0])).unwrap();
    let uri = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes));
    let twice = json!({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}},
        {"type": "image", "image": fx.fixture.join(&case.image_files[0])},
        {"type": "text", "text": case.text},
    ]});
    let output = run(&engine, Request::new(Prompt::Chat(vec![twice])).with_options(greedy_options(4)));
    let t = output.timings.images.unwrap();
    assert_eq!((t.images, t.encoded, t.encoder_cache_hits), (2, 0, 2));
    let metrics = engine.metrics();
    assert_eq!((metrics.images_encoded, metrics.encoder_cache_hits), (1, 3));
    assert!(metrics.encoder_cache_bytes > 0);
    // With the encoder cache off, every request encodes.
    let uncached = self::engine(fx, |c| c.prefix_caching(false).encoder_cache_bytes(0));
    run(&uncached, chat_request(fx, case));
    run(&uncached, chat_request(fx, case));
    assert_eq!(uncached.metrics().images_encoded, 2);
}

#[test]
fn prompts_that_differ_only_in_the_image_share_no_image_block() {
    let fx = export("qwen3vl-a");
    let case = fx.case("one_image");
    // Another picture of the same size: the same tokens, another content hash.
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other.png");
    let mut pixels = pio_image::decode(
        &pio_image::ImageInput::Path(fx.fixture.join(&case.image_files[0])),
        &pio_image::DecodeLimits::default(),
    )
    .unwrap();
    for p in pixels.pixels_mut() {
        p.0 = [255 - p.0[0], p.0[2], p.0[1]];
    }
    pixels.save(&other).unwrap();
    let other_message = json!({"role": "user", "content": [
        {"type": "image", "image": other}, {"type": "text", "text": case.text}]});
    let other_request = || Request::new(Prompt::Chat(vec![other_message.clone()])).with_options(greedy_options(32));
    let cold = run(&engine(fx, |c| c.prefix_caching(false)), other_request());

    let engine = engine(fx, |c| c);
    let first = run(&engine, chat_request(fx, case));
    let again = run(&engine, chat_request(fx, case));
    assert_eq!(again.timings.cached_prompt_tokens, 16, "the same prompt hits its first block");
    let other_output = run(&engine, other_request());
    assert_eq!(other_output.prompt_ids, first.prompt_ids, "the same tokens");
    assert_eq!(other_output.timings.cached_prompt_tokens, 0, "the block holding the image is not shared");
    assert_eq!(other_output.generated_ids, cold.generated_ids, "and the answer is the other image's own");
    assert_ne!(other_output.generated_ids, first.generated_ids, "the images give different answers");
    assert_eq!(first.generated_ids, case.greedy.generated_ids);
}

fn refusal(engine: &Engine, content: serde_json::Value) -> (Option<String>, String) {
    let request = Request::new(Prompt::Chat(vec![json!({"role": "user", "content": content})]));
    match engine.submit(request) {
        Err(EngineError::InvalidRequest { field: "messages", part, message, .. }) => (part, message),
        Err(other) => panic!("expected an invalid request, got {other:?}"),
        Ok(_) => panic!("expected an invalid request for {content}"),
    }
}

#[test]
fn bad_images_are_refused_at_submission_naming_their_part() {
    let fx = export("qwen3vl-a");
    let engine = engine(fx, |c| c.image_limits(pio_image::DecodeLimits::default().with_max_pixels(100_000)));
    let tmp = tempfile::tempdir().unwrap();
    let png = std::fs::read(fx.fixture.join("one_image.0.png")).unwrap();
    let truncated = tmp.path().join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    let text_file = tmp.path().join("notes.png");
    std::fs::write(&text_file, "not an image").unwrap();
    let huge = tmp.path().join("huge.png");
    image_of_size(1000, 1000).save(&huge).unwrap();
    let strip = tmp.path().join("strip.png");
    image_of_size(1000, 4).save(&strip).unwrap();
    let text = json!({"type": "text", "text": "What is this?"});
    let cases = [
        (json!([text, {"type": "image", "image": truncated}]), "messages[0].content[1].image", "truncated"),
        (json!([{"type": "image", "image": text_file}]), "messages[0].content[0].image", "not supported"),
        (
            json!([{"type": "image", "image": tmp.path().join("missing.png")}]),
            "messages[0].content[0].image",
            "missing.png",
        ),
        (json!([{"type": "image", "image": huge}]), "messages[0].content[0].image", "over the decode budget"),
        (json!([{"type": "image", "image": strip}]), "messages[0].content[0].image", "aspect ratio"),
        (
            json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]),
            "messages[0].content[0].image_url",
            "base64",
        ),
        (
            json!([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]),
            "messages[0].content[0].image_url",
            "not fetched",
        ),
        (json!([text, {"type": "video", "video": "clip.mp4"}]), "messages[0].content[1]", "videos"),
    ];
    for (content, part, says) in cases {
        let (got_part, message) = refusal(&engine, content);
        assert_eq!(got_part.as_deref(), Some(part), "{message}");
        assert!(message.contains(says), "{part}: {message:?} should say {says:?}");
    }
    // Placeholders without images: written into the text, or in a prompt of ids.
    let (part, message) = refusal(&engine, json!("a literal <|image_pad|> is not an image"));
    assert!(
        part.is_none() && message.contains("1 image placeholder token(s)") && message.contains("0 image(s)"),
        "{message}"
    );
    let ids = vec![fx.image_token(), 5, 6];
    match engine.submit(Request::new(Prompt::Ids(ids))) {
        Err(EngineError::InvalidRequest { field: "prompt", message, .. }) => {
            assert!(message.contains("placeholder"), "{message}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let metrics = engine.metrics();
    assert_eq!((metrics.steps, metrics.prompt_tokens, metrics.images_encoded), (0, 0, 0), "no model work");
}

fn image_of_size(width: u32, height: u32) -> pio_image::RgbImage {
    pio_image::RgbImage::from_fn(width, height, |x, y| [(x % 256) as u8, (y % 256) as u8, 7].into())
}

#[test]
fn a_text_model_refuses_images_naming_the_part() {
    let tmp = tempfile::tempdir().unwrap();
    let graphs = export_real_tokenizer_qwen3(tmp.path(), 3);
    let engine = Engine::start(EngineConfig::builder(&graphs).max_seqs(1).build().unwrap()).unwrap();
    assert!(!engine.model_info().takes_images);
    let png = fixtures_dir().join("qwen3vl-a").join("one_image.0.png");
    let (part, message) = refusal(&engine, json!([{"type": "text", "text": "hi"}, {"type": "image", "image": png}]));
    assert_eq!(part.as_deref(), Some("messages[0].content[1].image"));
    assert!(message.contains("takes no images"), "{message}");
}

/// Transformers' image features of a case as the decoder's rows, per image.
fn reference_features(fx: &VlExport, case_name: &str, images: usize) -> Vec<Arc<ImageFeatures>> {
    let bytes = std::fs::read(fx.fixture.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let floats = |key: String| -> (Vec<usize>, Vec<f32>) {
        let t = st.tensor(&key).unwrap();
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    (0..images)
        .map(|i| {
            let (shape, embeds) = floats(format!("{case_name}.image_embeds.{i}"));
            let (deep_shape, deepstack) = floats(format!("{case_name}.deepstack_embeds.{i}"));
            let grid = pio_image::GridThw { t: 1, h: 0, w: 0 };
            Arc::new(ImageFeatures::from_host_f32(embeds, deepstack, shape[1], deep_shape[0], grid).unwrap())
        })
        .collect()
}

/// Prefills `case` into row `row` of `cache` (its images' rows given in one step), returns the
/// greedy first token.
fn prefill_row(
    model: &mut DecoderModel,
    cache: &mut pio_runtime::model::KvCache,
    fx: &VlExport,
    case_name: &str,
    row: usize,
) -> u32 {
    let case = fx.case(case_name);
    let positions: [Vec<i64>; 3] = std::array::from_fn(|a| case.position_ids[a].clone());
    let mut step = StepInputs::new(case.input_ids.clone(), vec![0]).unwrap().with_axis_positions(positions).unwrap();
    let features = reference_features(fx, case_name, case.image_grid_thw.len());
    if let [one] = features.as_slice() {
        step = step.with_images(Arc::clone(one));
    } else if !features.is_empty() {
        // Several images: their rows one after the other.
        let hidden = features[0].hidden();
        let layers = features[0].deepstack_layers();
        let host: Vec<(Vec<f32>, Vec<f32>)> = features.iter().map(|f| f.to_host().unwrap()).collect();
        let embeds: Vec<f32> = host.iter().flat_map(|(e, _)| e.clone()).collect();
        let tokens = embeds.len() / hidden;
        let mut deepstack = Vec::new();
        for layer in 0..layers {
            for (e, d) in &host {
                let rows = e.len() / hidden;
                deepstack.extend_from_slice(&d[layer * rows * hidden..(layer + 1) * rows * hidden]);
            }
        }
        assert_eq!(deepstack.len(), layers * tokens * hidden);
        let grid = pio_image::GridThw { t: 1, h: 0, w: 0 };
        step =
            step.with_images(Arc::new(ImageFeatures::from_host_f32(embeds, deepstack, hidden, layers, grid).unwrap()));
    }
    model.run_rows(&step, cache, row, Fetch::Greedy).unwrap().greedy()[0]
}

/// Rows of different lengths and rope deltas decode in one step and each equals transformers'
/// tokens (what every sequence alone gives). The graph used to build the step's rotary table from
/// the first row's positions only: rows after it decoded at the wrong positions.
#[test]
fn a_batched_decode_of_rows_with_other_lengths_and_deltas_equals_each_alone() {
    let fx = export("qwen3vl-a");
    let mut model = DecoderModel::load(&fx.graphs, &ExecutionProvider::default()).unwrap();
    // Rows: text only (18 tokens, delta 0), one image (24, -4), two images (41, -14).
    let rows = ["text_only", "one_image", "two_images"];
    let mut cache = model.new_shared_host_cache(rows.len(), 128).unwrap();
    let mut next: Vec<u32> =
        rows.iter().enumerate().map(|(r, c)| prefill_row(&mut model, &mut cache, fx, c, r)).collect();
    let mut past: Vec<usize> = rows.iter().map(|c| fx.case(c).input_ids.len()).collect();
    let deltas: Vec<i64> = rows.iter().map(|c| fx.case(c).rope_delta).collect();
    let mut generated: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
    for _ in 1..32 {
        let step = StepInputs::new(next.clone(), past.clone()).unwrap().with_rope_deltas(deltas.clone()).unwrap();
        next = model.run_rows(&step, &mut cache, 0, Fetch::Greedy).unwrap().greedy();
        for (r, &t) in next.iter().enumerate() {
            generated[r].push(t);
            past[r] += 1;
        }
    }
    for (r, case) in rows.iter().enumerate() {
        assert_eq!(generated[r], fx.case(case).greedy.generated_ids, "row {r} ({case})");
    }
    // Two rows at the same slot with different deltas cannot share a step's table: refused.
    let clash = StepInputs::new(vec![1, 2], vec![30, 30]).unwrap().with_rope_deltas(vec![0, -4]).unwrap();
    let e = model.run_rows(&clash, &mut cache, 0, Fetch::Greedy).err().expect("a slot clash is refused");
    assert!(format!("{e:#}").contains("cache slot 30"), "{e:#}");
}

/// A generated `<|image_pad|>` is fed back in a decode step without image rows: it keeps its token
/// embedding (as in transformers) instead of indexing past the step's zero image rows, which
/// failed the whole batched step before.
#[test]
fn a_generated_image_pad_token_decodes_like_any_token() {
    let fx = export("qwen3vl-a");
    let mut model = DecoderModel::load(&fx.graphs, &ExecutionProvider::default()).unwrap();
    let mut cache = model.new_shared_host_cache(2, 64).unwrap();
    for row in 0..2 {
        prefill_row(&mut model, &mut cache, fx, "text_only", row);
    }
    let past = fx.case("text_only").input_ids.len();
    let pad = fx.image_token();
    let step = StepInputs::new(vec![pad, 5], vec![past, past]).unwrap();
    let logits = model.run_rows(&step, &mut cache, 0, Fetch::Logits).unwrap().into_logits().unwrap();
    assert!(logits.data.iter().all(|x| x.is_finite()));
    assert_ne!(logits.last_of(0), logits.last_of(1), "the pad token is a token of its own");
}

/// A text prompt as long as the one-image prompt decodes at the same slots with another rope
/// delta: the engine runs one of them apart every step; both equal their runs alone.
#[test]
fn rows_clashing_at_a_slot_run_apart_and_equal_each_alone() {
    let fx = export("qwen3vl-a");
    let case = fx.case("one_image");
    let mut text_ids = fx.case("text_only").input_ids.clone();
    text_ids.extend(&text_ids.clone()[..case.input_ids.len() - text_ids.len()]);
    assert_eq!(text_ids.len(), case.input_ids.len());
    let text = || ids_request(&text_ids, greedy_options(32));
    let text_alone = run(&engine(fx, |c| c.prefix_caching(false)), text());
    let engine = engine(fx, |c| c.prefix_caching(false));
    // Queued together, they are admitted and prefilled in one step, and decode at the same slots.
    let mut handles = engine.submit_batch(vec![chat_request(fx, case), text()]).unwrap().into_iter();
    let (image, text) = (handles.next().unwrap().wait().unwrap(), handles.next().unwrap().wait().unwrap());
    assert_eq!(image.generated_ids, case.greedy.generated_ids);
    assert_eq!(text.generated_ids, text_alone.generated_ids);
    // One row apart in every decode step.
    wait_idle(&engine);
    assert_eq!(engine.metrics().decode_rows_run_apart, 31);
}

/// The plugin's `infer_with_images` hands its images to the engine: a path and the same file's
/// bytes are one image (encoded once; the second prompt's image blocks come from the prefix
/// cache).
#[test]
fn the_plugin_infers_with_images() {
    use pio_runtime::plugin::plugin_for_preset;
    let fx = export("qwen3vl-a");
    let case = fx.case("one_image");
    let mut plugin = plugin_for_preset("qwen3-vl-2b").unwrap();
    plugin.initialize(ExecutionProvider::default()).unwrap();
    plugin.load(&fx.graphs).unwrap();
    let file = fx.fixture.join(&case.image_files[0]);
    let by_path = pio_image::ImageInput::Path(file.clone());
    let by_bytes = pio_image::ImageInput::Bytes(std::fs::read(&file).unwrap());
    plugin.infer_with_images(&case.text, &[by_path], 4).unwrap();
    plugin.infer_with_images(&case.text, &[by_bytes], 4).unwrap();
    // The bytes' blocks are the path's: the prefix cache holds them, image included.
    let metrics = plugin.engine().unwrap().metrics();
    assert_eq!(metrics.images_encoded, 1);
    assert!(metrics.prefix_cache_hit_tokens >= 16, "{metrics:?}");
    let bad = pio_image::ImageInput::Bytes(b"GIF89a".to_vec());
    let e = plugin.infer_with_images(&case.text, &[bad], 4).unwrap_err();
    assert!(format!("{e:#}").contains("messages[0].content[0]"), "{e:#}");
}

/// README "Images (Qwen3-VL)": the engine example, as written there.
mod readme_example {
    use pio_runtime::engine::{Engine, EngineConfig, Prompt, Request};
    use pio_runtime::generate::GenerateOptions;
    use pio_runtime::sampling::SamplingParams;
    use serde_json::json;

    pub fn describe(graphs: &std::path::Path, photo: &std::path::Path) -> anyhow::Result<String> {
        let engine = Engine::start(EngineConfig::builder(graphs).build()?)?;
        let message = json!({"role": "user", "content": [
            {"type": "image", "image": photo},
            {"type": "text", "text": "What is in this picture?"},
        ]});
        let options =
            GenerateOptions { max_tokens: Some(32), sampling: SamplingParams::greedy(), ..Default::default() };
        let output = engine.generate(Request::new(Prompt::Chat(vec![message])).with_options(options))?;
        let images = output.timings.images.as_ref().map_or(0, |i| i.images);
        println!("{} prompt tokens, {images} image(s): {}", output.prompt_ids.len(), output.text);
        Ok(output.text)
    }
}

#[test]
fn the_readme_example_describes_a_picture() {
    let fx = export("qwen3vl-a");
    let case = fx.case("one_image");
    assert_eq!(case.text, "What is in this picture?", "the example asks the fixture's question");
    let text = readme_example::describe(&fx.graphs, &fx.fixture.join(&case.image_files[0])).unwrap();
    let tokenizer = pio_runtime::tokenizer::Tokenizer::from_dir(&fx.graphs).unwrap();
    // Greedy until the first eos id (the example does not ignore it): transformers' tokens up to there.
    let eos = [fx.reference.special_tokens["<|im_end|>"], fx.reference.special_tokens["<|endoftext|>"]];
    let until_eos: Vec<u32> = case.greedy.generated_ids.iter().copied().take_while(|t| !eos.contains(t)).collect();
    assert_eq!(text, tokenizer.decode(&until_eos, true).unwrap());
}

/// The OpenAI server over a vision-language engine: an `image_url` part with a data URI answers
/// transformers' tokens; a local file path from a client is refused by name, as `pio serve`
/// configures the engine (`--local-images none`), and the server goes on serving.
#[test]
fn the_server_takes_image_url_parts_and_refuses_client_paths() {
    let fx = export("qwen3vl-a");
    let case = fx.case("one_image");
    let engine = engine(fx, |c| c.local_image_files(pio_runtime::vision::LocalImageFiles::Refused));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let config = pio_server::ServerConfig::builder().port(0).build().unwrap();
    let server = runtime.block_on(pio_server::Server::bind(engine, &config)).unwrap();
    let base = format!("http://{}", server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(server.run(async {
        let _ = stopped.await;
    }));
    let post = |content: serde_json::Value| -> (u16, serde_json::Value) {
        let body = json!({
            "messages": [{"role": "user", "content": content}],
            "max_tokens": case.greedy.max_new_tokens,
            "temperature": 0,
            "ignore_eos": true,
            "return_token_ids": true,
        });
        match ureq::post(&format!("{base}/v1/chat/completions")).send_json(body) {
            Ok(r) => (r.status(), r.into_json().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
            Err(e) => panic!("request failed: {e}"),
        }
    };
    let image = std::fs::read(fx.fixture.join(&case.image_files[0])).unwrap();
    let data_uri = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&image));
    let (status, answer) = post(json!([
        {"type": "image_url", "image_url": {"url": data_uri}},
        {"type": "text", "text": case.text},
    ]));
    assert_eq!(status, 200, "{answer}");
    let ids: Vec<u32> = serde_json::from_value(answer["choices"][0]["token_ids"].clone()).unwrap();
    assert_eq!(ids, case.greedy.generated_ids, "tokens through the server");
    assert_eq!(answer["usage"]["prompt_tokens"], case.input_ids.len(), "{answer}");

    let path = fx.fixture.join(&case.image_files[0]);
    let (status, refused) = post(json!([
        {"type": "image_url", "image_url": {"url": path.to_str().unwrap()}},
        {"type": "text", "text": case.text},
    ]));
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "messages[0].content[0].image_url", "{refused}");
    let (status, _) = post(json!([{"type": "text", "text": case.text}]));
    assert_eq!(status, 200, "the server goes on serving");
    let _ = stop.send(());
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
}
