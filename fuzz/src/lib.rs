//! The fuzzing entry points over the parsers of untrusted input. Each takes raw bytes and must
//! end with a result (a value or an error naming the file and field), never a panic, a hang or
//! an unbounded allocation; the assertions check what callers then rely on.
//!
//! libFuzzer drives them from `fuzz/fuzz_targets/` (`cargo +nightly fuzz run TARGET`); the
//! bounded harness `tests/fuzz_inputs.rs` (CI) runs them over mutated seeds and replays every
//! crash input kept under `fuzz/regressions/`. This file is shared by both (the harness
//! includes it with `#[path]`), so it is one module without submodules.

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use pio_image::{decode, DecodeLimits, ImageError, ImageInput, ImageProcessor, ImageProcessorConfig};
use pio_models::size::Precision;
use pio_models::TargetEp;
use pio_runtime::chat_template::{ChatTemplate, RenderOptions};
use pio_runtime::engine::MAX_TOP_LOGPROBS;
use pio_runtime::sampling::SamplingParams;
use pio_server::parse::{parse_chat_completion, parse_completion};
use pio_server::protocol::request::GenerationParams;
use pio_server::ApiError;
use serde_json::{json, Map, Value};

/// A safetensors file as pio-export reads each shard: the header checked against the data.
pub fn safetensors_file(data: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    let Ok(tensors) = pio_export::checkpoint::read_tensor_entries(data, path) else { return };
    for t in &tensors {
        // The exporter slices the file with these ranges and reads them element by element.
        assert!(t.range.start <= t.range.end && t.range.end <= data.len(), "{t:?} outside {} bytes", data.len());
        let bits = t.shape.iter().try_fold(t.dtype.bitsize(), |acc, &d| acc.checked_mul(d));
        assert_eq!(bits.map(|b| b.div_ceil(8)), Some(t.range.len()), "{t:?}: size does not match dtype and shape");
    }
}

/// `model.safetensors.index.json`: the shard names it yields are opened or downloaded.
pub fn safetensors_index(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(files) = pio_models::files::shard_files(text, Path::new("model.safetensors.index.json")) else { return };
    assert!(!files.is_empty());
    for f in &files {
        assert!(pio_models::files::is_plain_file_name(f) && f.ends_with(".safetensors"), "{f:?}");
    }
    assert!(files.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats: {files:?}");
}

/// `config.json`, then what export and `pio models` compute from it: sizes, the graph's
/// dimensions, the settings checks, the tensor list, and the manifest round trip.
pub fn model_config(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
    let Ok(config) = pio_models::ModelConfig::from_value(&value) else { return };
    let params = pio_models::ParameterCount::of(&config);
    for p in [Precision::Fp32, Precision::Bf16, Precision::Int4] {
        params.weight_bytes(p);
    }
    let text = &config.text;
    pio_models::size::kv_bytes_per_token(text, 2);
    let context = text.max_position_embeddings.min(32768);
    pio_models::manifest::Dimensions::of(text, context);
    for (precision, ep) in [(Precision::Fp32, TargetEp::Cpu), (Precision::Bf16, TargetEp::Cuda)] {
        let Ok(settings) = pio_export::ExportSettings::builder(precision, ep, context, text.qk_norm).build() else {
            continue;
        };
        let _ = settings.check_model("fuzz", text);
        settings.layer_windows(text);
    }
    // The tensor list grows with layers x experts (GLM-4.7: 44k names): built for small ones,
    // so that executions stay fast.
    let experts = text.moe.as_ref().map_or(0, |m| m.num_experts);
    if text.num_hidden_layers.saturating_mul(experts.saturating_add(1)) <= 4096 {
        if let Ok(tensors) = pio_export::arch::checkpoint_tensors(&config) {
            for (_, shape) in &tensors {
                shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            }
        }
    }
    // The manifest stores the config; the runtime must read back what the exporter wrote.
    let stored = serde_json::to_value(&config).expect("a parsed config serializes");
    let read: pio_models::ModelConfig = serde_json::from_value(stored).expect("a stored config reads back");
    assert_eq!(read, config);
}

/// An OpenAI request body as `pio serve` parses one for each endpoint (the functions its handlers
/// call): a typed request that keeps the parser's promises (what the conversion for the engine
/// relies on), or a 4xx error whose OpenAI body (`{"error": {...}}`, what the client gets) has a
/// message. A refused JSON object names the field at fault (`param`, also in the message); only a
/// body that is no JSON object at all (not UTF-8, not JSON, an array...) may be refused as a whole.
pub fn openai_request(data: &[u8]) {
    let is_object = matches!(serde_json::from_slice::<Value>(data), Ok(Value::Object(_)));
    match parse_chat_completion(data) {
        Ok(chat) => {
            assert!(!chat.messages.is_empty(), "a chat without messages");
            check_generation_params(&chat.params);
        }
        Err(e) => check_client_error(&e, is_object),
    }
    match parse_completion(data) {
        Ok(completion) => check_generation_params(&completion.params),
        Err(e) => check_client_error(&e, is_object),
    }
}

fn check_generation_params(p: &GenerationParams) {
    // 0 only for an echoed prompt alone (completions' `echo`).
    assert!(p.max_tokens.is_none_or(|n| n >= 1 || p.echo), "max_tokens {:?} without echo", p.max_tokens);
    assert!(p.logprobs.is_none_or(|n| n <= MAX_TOP_LOGPROBS), "logprobs {:?}", p.logprobs);
    assert!(p.prompt_logprobs.is_none_or(|n| n <= MAX_TOP_LOGPROBS), "prompt_logprobs {:?}", p.prompt_logprobs);
    assert!(p.prompt_logprobs.is_none() || p.stream.is_none(), "prompt_logprobs while streaming");
    assert!(p.cache_salt.as_ref().is_none_or(|s| !s.is_empty()), "an empty cache_salt");
    // The engine's sampler takes every accepted combination (whatever the model's defaults).
    let sampling = p.sampling.apply(SamplingParams::default());
    assert!(sampling.validate().is_ok(), "{sampling:?}");
}

fn check_client_error(e: &ApiError, is_object: bool) {
    assert!(e.status().is_client_error(), "{e}: status {}", e.status());
    let body = serde_json::to_value(e.body(None)).expect("an error body serializes");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    if is_object {
        let param = body["error"]["param"].as_str().unwrap_or_default();
        assert!(!param.is_empty(), "a refused request object names no field: {body}");
        assert!(message.contains(&format!("`{param}`")), "the message does not name `{param}`: {body}");
    }
}

/// The decode budget of the image target: small, so that every execution is quick (the seeds are at most 160 x
/// 120) and the limits themselves are exercised.
pub const IMAGE_MAX_PIXELS: u64 = 1 << 16;
pub const IMAGE_MAX_INPUT_BYTES: u64 = 1 << 20;

/// An image as a chat message carries it: bytes starting with `data:` as a data URI, any others as the encoded
/// file. What decodes goes through the Qwen3-VL and the Qwen2-VL image processors (with small pixel ranges), and
/// the batch must be what the prompt builder and the vision encoder rely on: one grid per image, equal to
/// `grid()`, `grid.num_patches()` rows of `patch_dim` values, every value finite.
pub fn image_decode(data: &[u8]) {
    let input = match std::str::from_utf8(data) {
        Ok(uri) if uri.starts_with("data:") => ImageInput::DataUri(uri.to_string()),
        _ => ImageInput::Bytes(data.to_vec()),
    };
    let limits = DecodeLimits::default().with_max_pixels(IMAGE_MAX_PIXELS).with_max_input_bytes(IMAGE_MAX_INPUT_BYTES);
    let Ok(image) = decode(&input, &limits) else { return };
    let (width, height) = image.dimensions();
    assert!(width > 0 && height > 0, "decoded an empty {width}x{height} image");
    assert!(u64::from(width) * u64::from(height) <= IMAGE_MAX_PIXELS, "{width}x{height} is over the pixel budget");
    let qwen3_vl = ImageProcessorConfig::from_json(
        r#"{"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": 0.5, "image_std": 0.5}"#,
        Path::new("qwen3-vl preprocessor_config.json"),
    )
    .expect("a valid config");
    let processors = [
        ImageProcessor::new(qwen3_vl.with_pixel_range(32 * 32, 32 * 32 * 16)),
        ImageProcessor::new(ImageProcessorConfig::default().with_pixel_range(28 * 28, 28 * 28 * 16)),
    ];
    for processor in &processors {
        let batch = match processor.preprocess(std::slice::from_ref(&image)) {
            Ok(batch) => batch,
            // transformers refuses an aspect ratio over 200 too; nothing else may fail on a decoded image.
            Err(ImageError::AspectRatio { .. }) => continue,
            Err(e) => panic!("{width}x{height}: {e}"),
        };
        let grid = processor.grid(width, height).expect("grid() agrees with preprocess()");
        assert_eq!(batch.grids(), [grid]);
        assert_eq!(batch.cols(), processor.config().patch_dim());
        assert_eq!(batch.rows(), grid.num_patches());
        assert_eq!(batch.pixel_values().len(), batch.rows() * batch.cols());
        assert!(batch.pixel_values().iter().all(|v| v.is_finite()), "non-finite pixel values");
        let merge = processor.config().merge_size() as usize;
        assert_eq!(processor.image_pad_tokens(grid) * merge * merge, grid.num_patches());
    }
}

/// The chat templates rendering is fuzzed with: the real Qwen3 and GLM templates and the
/// quirk templates of the runtime's tests.
pub struct Templates(Vec<(String, ChatTemplate)>);

impl Templates {
    /// From the repository at `root` (Qwen3's template is the one scripts/setup.sh fetches).
    pub fn load(root: &Path) -> Result<Self, String> {
        let dir = |d: &str| {
            ChatTemplate::from_tokenizer_dir(root.join(d)).map_err(|e| format!("{d}: {e} (run scripts/setup.sh)"))
        };
        let mut templates = vec![
            ("qwen3".to_string(), dir(".cache/pio/tokenizers/qwen3")?),
            ("glm4".to_string(), dir("tests/fixtures/glm4moe-a")?),
        ];
        let quirks = root.join("tests/fixtures/chat/template_quirks.json");
        let text = std::fs::read_to_string(&quirks).map_err(|e| format!("{}: {e}", quirks.display()))?;
        let cases: Vec<Value> = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", quirks.display()))?;
        for case in cases {
            if let (Some(name), Some(source)) = (case["name"].as_str(), case["template"].as_str()) {
                if let Ok(t) = ChatTemplate::new(source, Some("<s>"), Some("</s>")) {
                    templates.push((name.to_string(), t));
                }
            }
        }
        Ok(Templates(templates))
    }

    /// How many templates there are.
    pub fn count(&self) -> usize {
        self.0.len()
    }
}

/// Adversarial conversations (odd roles, content of every JSON type, tool calls with broken
/// arguments, deep values) rendered with each template.
pub fn chat_template(templates: &Templates, data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(conversation) = Conversation::arbitrary(&mut u) else { return };
    let Ok(mut json_source) = Unstructured::new(u.take_rest()).arbitrary::<Vec<u8>>() else { return };
    json_source.truncate(4096);
    let mut values = Unstructured::new(&json_source);
    let messages: Vec<Value> = conversation.messages.iter().map(|m| m.to_json(&mut values)).collect();
    let tools = conversation.tools.then(|| vec![json_value(&mut values, 4)]);
    let documents = conversation.documents.then(|| vec![json_value(&mut values, 3)]);
    let opts = RenderOptions {
        add_generation_prompt: conversation.add_generation_prompt,
        tools,
        documents,
        enable_thinking: conversation.enable_thinking,
        ..Default::default()
    };
    let (_, template) = &templates.0[conversation.template as usize % templates.0.len()];
    let _ = template.render(&messages, &opts);
}

#[derive(Arbitrary, Debug)]
struct Conversation {
    template: u8,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    enable_thinking: Option<bool>,
    tools: bool,
    documents: bool,
}

#[derive(Arbitrary, Debug)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Content {
    Text(String),
    Null,
    Missing,
    Parts(Vec<Part>),
    /// Any JSON value, drawn from the second half of the input.
    Value,
}

#[derive(Arbitrary, Debug)]
enum Part {
    Text(String),
    Image,
    Untyped(String),
}

#[derive(Arbitrary, Debug)]
struct ToolCall {
    name: String,
    /// Arguments as a JSON string (as OpenAI clients send them) rather than an object.
    as_string: bool,
}

#[derive(Arbitrary, Debug)]
struct Message {
    role: Role,
    content: Content,
    reasoning_content: Option<String>,
    tool_calls: Option<Vec<ToolCall>>,
    name: Option<String>,
    tool_call_id: Option<String>,
    /// An extra key with a JSON value.
    extra: Option<String>,
}

impl Message {
    fn to_json(&self, values: &mut Unstructured) -> Value {
        let mut m = Map::new();
        let role = match &self.role {
            Role::System => "system".to_string(),
            Role::User => "user".to_string(),
            Role::Assistant => "assistant".to_string(),
            Role::Tool => "tool".to_string(),
            Role::Other(r) => r.clone(),
        };
        m.insert("role".into(), role.into());
        match &self.content {
            Content::Text(t) => {
                m.insert("content".into(), t.clone().into());
            }
            Content::Null => {
                m.insert("content".into(), Value::Null);
            }
            Content::Missing => {}
            Content::Parts(parts) => {
                let parts = parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => json!({"type": "text", "text": t}),
                        Part::Image => json!({"type": "image"}),
                        Part::Untyped(t) => json!({"text": t}),
                    })
                    .collect();
                m.insert("content".into(), Value::Array(parts));
            }
            Content::Value => {
                m.insert("content".into(), json_value(values, 4));
            }
        }
        if let Some(r) = &self.reasoning_content {
            m.insert("reasoning_content".into(), r.clone().into());
        }
        if let Some(calls) = &self.tool_calls {
            let calls = calls
                .iter()
                .map(|c| {
                    let args = json_value(values, 3);
                    let args = if c.as_string { Value::String(args.to_string()) } else { args };
                    json!({"type": "function", "function": {"name": c.name, "arguments": args}})
                })
                .collect();
            m.insert("tool_calls".into(), Value::Array(calls));
        }
        if let Some(n) = &self.name {
            m.insert("name".into(), n.clone().into());
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), id.clone().into());
        }
        if let Some(key) = &self.extra {
            m.insert(key.clone(), json_value(values, 3));
        }
        Value::Object(m)
    }
}

/// A JSON value of at most `depth` levels drawn from `u` (null once `u` runs out).
fn json_value(u: &mut Unstructured, depth: u32) -> Value {
    let kind = if depth == 0 { u.int_in_range(0..=4u8) } else { u.int_in_range(0..=6u8) };
    let Ok(kind) = kind else { return Value::Null };
    match kind {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary().unwrap_or_default()),
        2 => Value::from(u.arbitrary::<i64>().unwrap_or_default()),
        3 => serde_json::Number::from_f64(u.arbitrary().unwrap_or_default()).map(Value::Number).unwrap_or(Value::Null),
        4 => Value::String(u.arbitrary().unwrap_or_default()),
        5 => {
            let n = u.int_in_range(0..=4usize).unwrap_or(0);
            Value::Array((0..n).map(|_| json_value(u, depth - 1)).collect())
        }
        _ => {
            let n = u.int_in_range(0..=4usize).unwrap_or(0);
            Value::Object(
                (0..n).map(|_| (u.arbitrary::<String>().unwrap_or_default(), json_value(u, depth - 1))).collect(),
            )
        }
    }
}
