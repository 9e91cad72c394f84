//! Seeded random-weight checkpoints at a preset's real shape (or shrunk for tests), written in
//! the Hugging Face layout so the exporter reads them through the same code as real ones.
//! Speed does not depend on weight values, so these serve demos, tests and GPU benchmarks.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use half::bf16;
use pio_models::config::ModelConfig;
use pio_models::presets::Preset;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, View};
use serde_json::{json, Value};

use crate::arch;
use crate::error::{fs_error, ExportError};
use crate::scratch::{OutputKind, ScratchDir, SYNTHETIC_MARKER};

type Result<T> = std::result::Result<T, ExportError>;

/// The most tensors a synthetic checkpoint may hold (GLM-4.7 at full size has about 44,000).
pub const MAX_SYNTHETIC_TENSORS: u64 = 1 << 22;
/// The most bytes a synthetic checkpoint may hold: 1 PiB, far beyond any preset at full size.
pub const MAX_SYNTHETIC_BYTES: u64 = 1 << 50;

/// Overrides that shrink a preset for tests (None keeps the real value).
#[derive(Clone, Debug, Default)]
pub struct ShapeOverrides {
    pub layers: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: Option<usize>,
    pub experts: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    /// Vision encoder (Qwen3-VL): blocks, hidden size, MLP width and heads.
    pub vision_layers: Option<usize>,
    pub vision_hidden_size: Option<usize>,
    pub vision_intermediate_size: Option<usize>,
    pub vision_heads: Option<usize>,
}

impl ShapeOverrides {
    pub fn is_empty(&self) -> bool {
        let s = self;
        [
            s.layers,
            s.hidden_size,
            s.intermediate_size,
            s.heads,
            s.kv_heads,
            s.head_dim,
            s.vocab_size,
            s.experts,
            s.moe_intermediate_size,
            s.vision_layers,
            s.vision_hidden_size,
            s.vision_intermediate_size,
            s.vision_heads,
        ]
        .iter()
        .all(Option::is_none)
    }

    /// A short tag for folder names, e.g. `l2-h256`.
    pub fn tag(&self) -> String {
        let parts = [
            ("l", self.layers),
            ("h", self.hidden_size),
            ("i", self.intermediate_size),
            ("a", self.heads),
            ("kv", self.kv_heads),
            ("d", self.head_dim),
            ("v", self.vocab_size),
            ("e", self.experts),
            ("mi", self.moe_intermediate_size),
            ("vl", self.vision_layers),
            ("vh", self.vision_hidden_size),
            ("vi", self.vision_intermediate_size),
            ("va", self.vision_heads),
        ];
        parts.iter().filter_map(|(k, v)| v.map(|v| format!("{k}{v}"))).collect::<Vec<_>>().join("-")
    }
}

/// The preset's config.json with the overrides applied (in whichever object holds the text
/// config), validated by parsing it.
pub fn synthetic_config(preset: &Preset, o: &ShapeOverrides) -> Result<Value> {
    synthetic_model(preset, o).map(|(value, _)| value)
}

/// The shrunk config.json and its parsed form.
fn synthetic_model(preset: &Preset, o: &ShapeOverrides) -> Result<(Value, ModelConfig)> {
    let mut config = preset.config_json()?;
    {
        let text = if config.get("text_config").is_some() { &mut config["text_config"] } else { &mut config };
        set(text, "num_hidden_layers", o.layers);
        set(text, "hidden_size", o.hidden_size);
        set(text, "intermediate_size", o.intermediate_size);
        set(text, "num_attention_heads", o.heads);
        set(text, "num_key_value_heads", o.kv_heads);
        set(text, "head_dim", o.head_dim);
        set(text, "vocab_size", o.vocab_size);
        set(text, "moe_intermediate_size", o.moe_intermediate_size);
        if text.get("n_routed_experts").is_some() {
            set(text, "n_routed_experts", o.experts);
        } else if text.get("num_experts").is_some() {
            set(text, "num_experts", o.experts);
        }
        fit_mrope_section(text);
    }
    if let Some(v) = o.vocab_size {
        config["vocab_size"] = json!(v);
    }
    if let Some(vision) = config.get_mut("vision_config") {
        shrink_vision(vision, o);
    }
    let parsed = ModelConfig::from_value(&config)
        .map_err(|source| ExportError::SyntheticShape { preset: preset.name, source })?;
    Ok((config, parsed))
}

/// Sets `object[key]` to `v` when an override is given.
fn set(object: &mut Value, key: &str, v: Option<usize>) {
    if let Some(v) = v {
        object[key] = json!(v);
    }
}

/// Scales a multimodal rotary section (`mrope_section` in `rope_scaling` or `rope_parameters`)
/// to a changed head_dim so it still covers head_dim / 2 frequencies: h and w keep their share,
/// t takes the rest.
fn fit_mrope_section(text: &mut Value) {
    let heads = text["num_attention_heads"].as_u64().unwrap_or(1).max(1);
    let head_dim = text["head_dim"].as_u64().unwrap_or(text["hidden_size"].as_u64().unwrap_or(0) / heads);
    let half = head_dim / 2;
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(section) = text.get_mut(key).and_then(|r| r.get_mut("mrope_section")) else { continue };
        let parts: Vec<u64> =
            section.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
        let sum: u64 = parts.iter().sum();
        if parts.len() == 3 && sum != half && sum > 0 {
            // parts[1] + parts[2] <= sum, so h + w <= half; in u128 the products cannot overflow.
            let share = |p: u64| (u128::from(p) * u128::from(half) / u128::from(sum)) as u64;
            let (h, w) = (share(parts[1]), share(parts[2]));
            *section = json!([half - h - w, h, w]);
        }
    }
}

/// Applies the vision overrides to a Qwen3-VL `vision_config`; its output width follows the
/// text hidden size. With `vision_layers` the deepstack mergers, min(their number, layers) of
/// them, move to blocks k * layers / n (k < n), spread over the shorter stack.
fn shrink_vision(vision: &mut Value, o: &ShapeOverrides) {
    set(vision, "depth", o.vision_layers);
    set(vision, "hidden_size", o.vision_hidden_size);
    set(vision, "intermediate_size", o.vision_intermediate_size);
    set(vision, "num_heads", o.vision_heads);
    set(vision, "out_hidden_size", o.hidden_size);
    if let Some(layers) = o.vision_layers {
        let count = vision["deepstack_visual_indexes"].as_array().map_or(0, Vec::len).min(layers);
        // k < count <= layers: k * layers / count < layers, computed without overflow.
        let spread: Vec<u64> = (0..count).map(|k| (k as u128 * layers as u128 / count as u128) as u64).collect();
        vision["deepstack_visual_indexes"] = json!(spread);
    }
}

/// Whether a checkpoint tensor is a norm's scale (drawn around 1): `*norm*.weight`, as in
/// `input_layernorm`, `q_norm`, the vision blocks' `norm1`/`norm2` and the mergers' `norm`.
fn is_norm_scale(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    parts.next() == Some("weight") && parts.next().is_some_and(|module| module.contains("norm"))
}

/// A tensor whose bytes are generated when the safetensors writer asks for them, so writing a
/// checkpoint holds one tensor in memory at a time.
struct RandomTensor {
    shape: Vec<usize>,
    seed: u64,
    /// Norm weights are drawn around 1, everything else around 0.
    around_one: bool,
    scale: f32,
}

impl View for RandomTensor {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // Chunks are generated in parallel, each from its own stream, so the bytes depend on
        // the seed alone (not on the thread count) and real-shape checkpoints write quickly.
        const CHUNK: usize = 1 << 20;
        let n: usize = self.shape.iter().product();
        let mut out = vec![0u8; n * 2];
        let offset = if self.around_one { 1.0 } else { 0.0 };
        let fill = |chunk_index: usize, bytes: &mut [u8]| {
            let mut rng =
                ChaCha8Rng::seed_from_u64(self.seed ^ (chunk_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for pair in bytes.chunks_exact_mut(2) {
                let u: f32 = rng.random::<f32>() * 2.0 - 1.0;
                pair.copy_from_slice(&bf16::from_f32(offset + u * self.scale).to_le_bytes());
            }
        };
        let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1);
        let chunks: Vec<(usize, &mut [u8])> = out.chunks_mut(CHUNK * 2).enumerate().collect();
        if threads <= 1 || chunks.len() <= 1 {
            for (i, c) in chunks {
                fill(i, c);
            }
        } else {
            let per_thread = chunks.len().div_ceil(threads);
            let mut groups: Vec<Vec<(usize, &mut [u8])>> = Vec::new();
            let mut it = chunks.into_iter().peekable();
            while it.peek().is_some() {
                groups.push(it.by_ref().take(per_thread).collect());
            }
            std::thread::scope(|scope| {
                for group in groups {
                    scope.spawn(|| {
                        for (i, c) in group {
                            fill(i, c);
                        }
                    });
                }
            });
        }
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

/// FNV-1a, to give each tensor its own stream from one seed.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// Which tensors a synthetic checkpoint holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckpointContents {
    /// Every tensor the architecture reads.
    #[default]
    All,
    /// All but the decoder layers' projections, which an int4 export with `--direct-int4`
    /// draws as int4 codes itself (`crate::random_int4`): a real-shape checkpoint of a few GB
    /// instead of hundreds.
    WithoutQuantized,
}

/// The marker's key recording [`CheckpointContents::WithoutQuantized`].
pub const OMITS_QUANTIZED: &str = "omits_quantized_weights";

/// Writes config.json, generation_config.json, model.safetensors (bf16) and, if given, the
/// tokenizer files, into `dir` (via a temporary folder renamed at the end).
pub fn write_checkpoint(
    preset: &Preset,
    overrides: &ShapeOverrides,
    seed: u64,
    tokenizer_dir: Option<&Path>,
    dir: &Path,
) -> Result<PathBuf> {
    write_checkpoint_with(preset, overrides, seed, tokenizer_dir, dir, CheckpointContents::All)
}

/// [`write_checkpoint`] holding `contents`.
pub fn write_checkpoint_with(
    preset: &Preset,
    overrides: &ShapeOverrides,
    seed: u64,
    tokenizer_dir: Option<&Path>,
    dir: &Path,
    contents: CheckpointContents,
) -> Result<PathBuf> {
    let (config_value, config) = synthetic_model(preset, overrides)?;
    let too_large = |tensors, bytes| ExportError::SyntheticTooLarge { preset: preset.name, tensors, bytes };
    // The tensor list grows with layers x experts: its length is bounded before it is built.
    let at_least = arch::min_tensor_count(&config);
    if at_least > MAX_SYNTHETIC_TENSORS {
        return Err(too_large(at_least, 0));
    }
    let mut tensors = arch::checkpoint_tensors(&config)?;
    let omits = contents == CheckpointContents::WithoutQuantized;
    if omits {
        tensors.retain(|(name, _)| !crate::random_int4::is_drawn(name));
    }
    let bytes = tensors.iter().try_fold(0u64, |total, (_, shape)| {
        let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))?;
        total.checked_add(elements.checked_mul(2)?)
    });
    let bytes = bytes
        .filter(|&b| b <= MAX_SYNTHETIC_BYTES)
        .ok_or_else(|| too_large(tensors.len() as u64, bytes.unwrap_or(u64::MAX)))?;
    tracing::debug!("synthetic checkpoint: {} tensors, {bytes} bytes", tensors.len());
    OutputKind::SyntheticCheckpoint.check_destination(dir, true)?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = ScratchDir::new_in(parent, OutputKind::SyntheticCheckpoint)?;
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let p = tmp.path().join(name);
        let text =
            serde_json::to_string_pretty(v).map_err(|source| ExportError::SerializeJson { file: p.clone(), source })?;
        Ok(std::fs::write(&p, text).map_err(fs_error("write", &p))?)
    };
    write_json("config.json", &config_value)?;
    write_json("generation_config.json", &preset.generation_config_json()?)?;
    write_json(
        SYNTHETIC_MARKER,
        &json!({"preset": preset.name, "seed": seed, "shape": overrides.tag(), OMITS_QUANTIZED: omits}),
    )?;
    let views: Vec<(String, RandomTensor)> = tensors
        .into_iter()
        .map(|(name, shape)| {
            let around_one = is_norm_scale(&name);
            // Scale like a trained model's init so activations stay O(1) through the layers.
            // Embeddings (and a tied lm_head, and the vision position table) get std about
            // 0.02, as transformers initializes them: with a larger table the tied lm_head
            // scores the input token itself so high that an untrained model only repeats its
            // last token. A weight's fan-in is all but its first dimension (a Conv3d's too).
            let fan_in = shape.iter().skip(1).product::<usize>().max(1) as f32;
            let scale = if around_one {
                0.1
            } else if name.contains("embed_tokens") || name.starts_with("lm_head") || name.contains("pos_embed") {
                0.02 * 3f32.sqrt()
            } else if shape.len() == 1 {
                0.02
            } else {
                (3.0 / fan_in).sqrt()
            };
            let seed = seed ^ name_hash(&name);
            (name, RandomTensor { shape, seed, around_one, scale })
        })
        .collect();
    let weights = tmp.path().join("model.safetensors");
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &weights)
        .map_err(|source| ExportError::WriteSafetensors { file: weights.clone(), source })?;
    for (file, content) in preset.processor_files {
        let p = tmp.path().join(file);
        std::fs::write(&p, content).map_err(fs_error("write", &p))?;
    }
    if let Some(tok) = tokenizer_dir {
        let mut copied = 0;
        for f in crate::checkpoint::TOKENIZER_FILES {
            let src = tok.join(f);
            if src.is_file() {
                std::fs::copy(&src, tmp.path().join(f)).map_err(fs_error("copy", &src))?;
                copied += 1;
            }
        }
        if copied == 0 {
            return Err(ExportError::NoTokenizerFiles { dir: tok.to_path_buf() });
        }
    }
    tmp.persist(dir, true)?;
    Ok(dir.to_path_buf())
}
