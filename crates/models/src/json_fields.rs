//! Typed access to the fields of a JSON config object, with errors that name the file, the field (as a dotted key)
//! and the value: what `config.json` and `generation_config.json` are read with.

use std::fmt::Display;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{json_excerpt, ConfigError};

/// The largest integer a config field may hold (token ids are u32, and widths, vocabularies and context lengths
/// are far smaller): products of two fields then stay inside 64 bits.
pub(crate) const MAX_FIELD: u64 = u32::MAX as u64;

/// One JSON object of a config file: the file itself, or a section of it (`text_config`, `rope_scaling`).
pub(crate) struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: &'a Path,
    /// The dotted key of this section followed by a dot (`text_config.`), empty for the top level.
    prefix: String,
}

type Result<T> = std::result::Result<T, ConfigError>;

impl<'a> Fields<'a> {
    /// The top-level object of `file`.
    pub(crate) fn root(value: &'a Value, file: &'a Path) -> Result<Self> {
        Self::of(value, file, String::new())
    }

    fn of(value: &'a Value, file: &'a Path, prefix: String) -> Result<Self> {
        match value.as_object() {
            Some(obj) => Ok(Fields { obj, file, prefix }),
            None => Err(ConfigError::NotAnObject {
                file: file.to_path_buf(),
                field: prefix.trim_end_matches('.').to_string(),
                value: json_excerpt(value),
            }),
        }
    }

    /// The object under `key`, if present and not null.
    pub(crate) fn section(&self, key: &str) -> Result<Option<Fields<'a>>> {
        self.get(key).map(|v| Self::of(v, self.file, format!("{}.", self.key(key)))).transpose()
    }

    /// The object under `key`, which must be present.
    pub(crate) fn required_section(&self, key: &str) -> Result<Fields<'a>> {
        self.section(key)?.ok_or_else(|| self.missing(key))
    }

    /// The dotted key of `key` in this section.
    pub(crate) fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn missing(&self, key: &str) -> ConfigError {
        ConfigError::MissingField { file: self.file.to_path_buf(), field: self.key(key) }
    }

    fn wrong_type(&self, key: &str, expected: &'static str, value: &Value) -> ConfigError {
        let value = json_excerpt(value);
        ConfigError::WrongType { file: self.file.to_path_buf(), field: self.key(key), expected, value }
    }

    /// `key` holds `value`, which breaks `requirement` ("must be positive", "must be a multiple of ...").
    pub(crate) fn invalid(&self, key: &str, value: impl Display, requirement: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            field: self.key(key),
            value: value.to_string(),
            requirement: requirement.into(),
        }
    }

    pub(crate) fn unsupported(&self, key: &str, value: impl Display, supported: &'static str) -> ConfigError {
        ConfigError::Unsupported {
            file: self.file.to_path_buf(),
            field: self.key(key),
            value: value.to_string(),
            supported,
        }
    }

    pub(crate) fn too_large(&self, key: &str, value: u64, max: u64) -> ConfigError {
        ConfigError::TooLarge { file: self.file.to_path_buf(), field: self.key(key), value, max }
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    /// `value`, read from `key`, if it is a finite number above 0 (a rotary base or scale, an
    /// epsilon: 0, below or not finite, they make NaN or refused graphs).
    pub(crate) fn positive_f64(&self, key: &str, value: f64) -> Result<f64> {
        if value.is_finite() && value > 0.0 {
            Ok(value)
        } else {
            Err(self.invalid(key, value, "must be positive"))
        }
    }

    /// A positive integer; `default` when the field is absent (None: the field is required).
    pub(crate) fn positive(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.opt_usize(key)?.or(default) {
            None => Err(self.missing(key)),
            Some(0) => Err(self.invalid(key, 0, "must be positive")),
            Some(n) => Ok(n),
        }
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.integer(key, v)).transpose()
    }

    /// A non-negative integer of at most [`MAX_FIELD`].
    fn integer(&self, key: &str, v: &Value) -> Result<usize> {
        match v.as_u64() {
            Some(n) if n <= MAX_FIELD => usize::try_from(n).map_err(|_| self.too_large(key, n, MAX_FIELD)),
            Some(n) => Err(self.too_large(key, n, MAX_FIELD)),
            None => Err(self.wrong_type(key, "a non-negative integer", v)),
        }
    }

    pub(crate) fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v))).transpose()
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "true or false", v))).transpose()
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| self.wrong_type(key, "a string", v)))
            .transpose()
    }

    pub(crate) fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items.iter().map(|v| self.integer(key, v)).collect::<Result<_>>().map(Some),
            Some(v) => Err(self.wrong_type(key, "a list of non-negative integers", v)),
        }
    }

    pub(crate) fn opt_str_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| self.wrong_type(key, "a list of strings", v)))
                .collect::<Result<_>>()
                .map(Some),
            Some(v) => Err(self.wrong_type(key, "a list of strings", v)),
        }
    }

    /// Token ids: one id or a list (Hugging Face writes `eos_token_id` either way).
    pub(crate) fn ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(v @ Value::Number(_)) => Ok(vec![self.id(key, v)?]),
            Some(Value::Array(items)) => items.iter().map(|v| self.id(key, v)).collect(),
            Some(v) => Err(self.wrong_type(key, "a token id or a list of token ids", v)),
        }
    }

    /// A token id: it must fit u32 (a larger one is refused rather than truncated).
    fn id(&self, key: &str, v: &Value) -> Result<u32> {
        match v.as_u64() {
            Some(n) => u32::try_from(n).map_err(|_| self.too_large(key, n, u32::MAX.into())),
            None => Err(self.wrong_type(key, "a non-negative integer", v)),
        }
    }

    /// The first id of `key`, if any.
    pub(crate) fn first_id(&self, key: &str) -> Result<Option<u32>> {
        Ok(self.ids(key)?.first().copied())
    }
}
