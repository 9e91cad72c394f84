//! The Qwen3-VL fixtures (scripts/make_vl_fixtures.py) ready for the runtime's own path: exported
//! for the CPU, with a tokenizer that turns the rendered chat into the fixture's token ids.
//!
//! A fixture's model has a vocabulary of 256 ids, onto which the script mapped the Qwen3 ids its
//! prompts use (`token_map` in reference.json). The Qwen3 tokenizer (scripts/setup.sh) with its
//! ids permuted by that map (the mapped ids first, then every other id in order) tokenizes the
//! same text into the same tokens, now numbered as the fixture's model knows them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::{cpu_settings, export_to, fixtures_dir};

#[derive(Clone, Debug, Deserialize)]
pub struct VlCase {
    /// The fixture's ids of the processor's prompt (placeholders expanded).
    pub input_ids: Vec<u32>,
    /// The chat template's output, before the placeholders are expanded.
    pub prompt_text: String,
    pub image_files: Vec<String>,
    pub text: String,
    pub image_grid_thw: Vec<[i64; 3]>,
    pub position_ids: Vec<Vec<i64>>,
    pub rope_delta: i64,
    pub greedy: VlGreedy,
}

#[derive(Clone, Debug, Deserialize)]
pub struct VlGreedy {
    pub max_new_tokens: usize,
    pub generated_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct VlReference {
    pub cases: BTreeMap<String, VlCase>,
    pub token_map: BTreeMap<String, u32>,
    pub special_tokens: BTreeMap<String, u32>,
}

/// A fixture exported for the CPU (fp32, last-token logits) with its permuted tokenizer.
pub struct VlExport {
    pub fixture: PathBuf,
    pub graphs: PathBuf,
    pub reference: VlReference,
    _dir: tempfile::TempDir,
}

impl VlExport {
    pub fn new(name: &str) -> Self {
        Self::with_settings(name, cpu_settings(true))
    }

    /// The fixture exported with `settings` (CPU ones) and its permuted tokenizer.
    pub fn with_settings(name: &str, settings: pio_export::ExportSettingsBuilder) -> Self {
        let fixture = fixtures_dir().join(name);
        let text = std::fs::read_to_string(fixture.join("reference.json")).unwrap();
        let reference: VlReference = serde_json::from_str(&text).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let graphs = dir.path().join("graphs");
        export_to(&fixture, &graphs, settings);
        write_permuted_tokenizer(&reference.token_map, &graphs);
        VlExport { fixture, graphs, reference, _dir: dir }
    }

    pub fn case(&self, name: &str) -> &VlCase {
        &self.reference.cases[name]
    }

    /// The user message of `case`: its image files (as transformers' `image` parts with a path),
    /// then its text.
    pub fn message(&self, case: &VlCase) -> Value {
        let mut content: Vec<Value> = case
            .image_files
            .iter()
            .map(|f| serde_json::json!({"type": "image", "image": self.fixture.join(f)}))
            .collect();
        content.push(serde_json::json!({"type": "text", "text": case.text}));
        serde_json::json!({"role": "user", "content": content})
    }

    pub fn image_token(&self) -> u32 {
        self.reference.special_tokens["<|image_pad|>"]
    }
}

/// Writes the Qwen3 tokenizer (tokenizer.json, tokenizer_config.json) into `out` with its ids
/// permuted: `token_map`'s (Qwen3 id -> fixture id) first, every other id after them in order.
pub fn write_permuted_tokenizer(token_map: &BTreeMap<String, u32>, out: &Path) {
    let source = pio_models::paths::qwen3_tokenizer_dir().unwrap_or_else(|| {
        panic!("the Qwen3 tokenizer is missing (.cache/pio/tokenizers/qwen3): run scripts/setup.sh")
    });
    let mapped: HashMap<u64, u64> = token_map.iter().map(|(k, &v)| (k.parse().unwrap(), v as u64)).collect();
    let read =
        |file: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(source.join(file)).unwrap()).unwrap() };
    let mut tokenizer = read("tokenizer.json");
    let mut all: Vec<u64> =
        tokenizer["model"]["vocab"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).collect();
    all.extend(tokenizer["added_tokens"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()));
    all.sort_unstable();
    let mut next = mapped.len() as u64;
    let permutation: HashMap<u64, u64> = all
        .into_iter()
        .map(|id| {
            let to = mapped.get(&id).copied().unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            (id, to)
        })
        .collect();
    let new_id = |id: &Value| Value::from(permutation[&id.as_u64().unwrap()]);
    for v in tokenizer["model"]["vocab"].as_object_mut().unwrap().values_mut() {
        *v = new_id(v);
    }
    // tokenizers gives an added token the model's id for its text when the model has one, else
    // the next id after the model's vocabulary, whatever the file says: the model's vocabulary
    // holds them too, at their new ids.
    let mut added = Vec::new();
    for t in tokenizer["added_tokens"].as_array_mut().unwrap() {
        t["id"] = new_id(&t["id"]);
        added.push((t["content"].as_str().unwrap().to_string(), t["id"].clone()));
    }
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    for (content, id) in added {
        vocab.insert(content, id);
    }
    let mut config = read("tokenizer_config.json");
    if let Some(decoder) = config.get_mut("added_tokens_decoder").and_then(Value::as_object_mut) {
        let entries: Vec<(String, Value)> = std::mem::take(decoder).into_iter().collect();
        for (id, entry) in entries {
            decoder.insert(permutation[&id.parse::<u64>().unwrap()].to_string(), entry);
        }
    }
    std::fs::write(out.join("tokenizer.json"), serde_json::to_string(&tokenizer).unwrap()).unwrap();
    std::fs::write(out.join("tokenizer_config.json"), serde_json::to_string(&config).unwrap()).unwrap();
}
