//! The errors of pio-models' public functions. Each names the file it is about and, for a bad value, the field
//! (as a dotted key: `text_config.num_attention_heads`, `rope_scaling.factor`, `layer_types[3]`) and the value.

use std::path::PathBuf;

use serde_json::Value;

use crate::config::Architecture;

/// What is wrong with a `config.json` or `generation_config.json`. The file is `config.json` when the config was
/// parsed from a JSON value ([`crate::ModelConfig::from_value`]) rather than read from a file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid JSON", file.display())]
    Json {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The file, or a section of it (`text_config`, `rope_scaling`), is not a JSON object.
    #[error("{}: {} must be a JSON object, got {value}", file.display(), section_name(field))]
    NotAnObject { file: PathBuf, field: String, value: String },
    #[error("{}: missing field `{field}`", file.display())]
    MissingField { file: PathBuf, field: String },
    /// A value of the wrong JSON type (`expected` says which: "a non-negative integer", "a list of strings", ...);
    /// `value` is the value as JSON (see [`json_excerpt`]).
    #[error("{}: field `{field}` must be {expected}, got {value}", file.display())]
    WrongType { file: PathBuf, field: String, expected: &'static str, value: String },
    /// An integer larger than any model has: sizes are multiplied together, and token ids are u32.
    #[error("{}: field `{field}` is {value}, more than any model has (at most {max})", file.display())]
    TooLarge { file: PathBuf, field: String, value: u64, max: u64 },
    /// A value of the right type that breaks a rule (`requirement` says which, naming the other fields involved).
    #[error("{}: field `{field}` is {value}, but it {requirement}", file.display())]
    Invalid { file: PathBuf, field: String, value: String, requirement: String },
    /// A value naming a feature the exporter does not implement (an activation, a layer type).
    #[error("{}: field `{field}` is `{value}`; supported: {supported}", file.display())]
    Unsupported { file: PathBuf, field: String, value: String, supported: &'static str },
    #[error("{}: architecture `{name}` is not supported; supported: {}", file.display(), architecture_names())]
    UnsupportedArchitecture { file: PathBuf, name: String },
    #[error("{}: missing field `architectures` (expected one of: {})", file.display(), architecture_names())]
    NoArchitecture { file: PathBuf },
}

impl ConfigError {
    /// The file the error is about.
    pub fn file(&self) -> &std::path::Path {
        match self {
            ConfigError::Read { file, .. }
            | ConfigError::Json { file, .. }
            | ConfigError::NotAnObject { file, .. }
            | ConfigError::MissingField { file, .. }
            | ConfigError::WrongType { file, .. }
            | ConfigError::TooLarge { file, .. }
            | ConfigError::Invalid { file, .. }
            | ConfigError::Unsupported { file, .. }
            | ConfigError::UnsupportedArchitecture { file, .. }
            | ConfigError::NoArchitecture { file } => file,
        }
    }

    /// The field (dotted key) the error is about, if it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::MissingField { field, .. }
            | ConfigError::WrongType { field, .. }
            | ConfigError::TooLarge { field, .. }
            | ConfigError::Invalid { field, .. }
            | ConfigError::Unsupported { field, .. } => Some(field),
            ConfigError::NotAnObject { field, .. } if !field.is_empty() => Some(field),
            ConfigError::UnsupportedArchitecture { .. } | ConfigError::NoArchitecture { .. } => Some("architectures"),
            _ => None,
        }
    }
}

/// The most characters of a value an error quotes.
const EXCERPT_CHARS: usize = 120;

/// `value` as JSON, cut to [`EXCERPT_CHARS`] characters (with `...`) so that an error quoting a large value
/// stays one readable line.
pub fn json_excerpt(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text,
    }
}

fn section_name(field: &str) -> String {
    if field.is_empty() {
        "the file".to_string()
    } else {
        format!("field `{field}`")
    }
}

fn architecture_names() -> String {
    Architecture::ALL.iter().map(|a| a.hf_name()).collect::<Vec<_>>().join(", ")
}

/// What is wrong with a graph folder's `pio.json`.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {} (is {} a folder written by pio-export?)", file.display(), dir.display())]
    Read {
        file: PathBuf,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not JSON, or a field missing or of the wrong type (serde's message, the source, names it and its line).
    #[error("{} is not a valid manifest", file.display())]
    Parse {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: format_version {found} is not supported (this build reads {supported}); export again", file.display())]
    UnsupportedVersion { file: PathBuf, found: u64, supported: u32 },
    /// A graph or tokenizer file that is not a plain file name in the manifest's folder.
    #[error("{}: `{field}` is {name:?}, which is not a plain file name in the manifest's folder; export again", file.display())]
    FileName { file: PathBuf, field: String, name: String },
    #[error("cannot write {}", file.display())]
    Write {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialize the manifest for {}", file.display())]
    Serialize {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A preset name that does not exist, or (in a broken build only) a preset whose built-in files do not parse.
#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    #[error("unknown preset `{name}`; known presets: {}", crate::presets::PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", "))]
    Unknown { name: String },
    #[error("the built-in {file} of preset {preset} is not valid JSON")]
    BuiltInJson {
        preset: &'static str,
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the built-in config.json of preset {preset} is not a valid model config")]
    BuiltInConfig {
        preset: &'static str,
        #[source]
        source: ConfigError,
    },
}

/// A name that is not one of a fixed set (`--precision`, `--ep`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`; expected {expected}")]
pub struct UnknownNameError {
    /// What was being named: "precision", "execution provider".
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}
