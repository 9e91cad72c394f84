//! Hugging Face chat templates rendered with minijinja, matching `tokenizer.apply_chat_template(...,
//! tokenize=False)` of transformers (checked byte for byte against transformers 5.x references in
//! `tests/fixtures/chat/`).
//!
//! What transformers does and this module reproduces:
//!
//! * Jinja environment (`_compile_jinja_template`): `ImmutableSandboxedEnvironment(trim_blocks=True,
//!   lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])`, Jinja's default
//!   `keep_trailing_newline=False`, no autoescaping; globals `raise_exception`, `strftime_now`,
//!   `namespace`, `dict`; HF's own `tojson` filter
//!   (`json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, positional
//!   arguments in that order, no HTML escaping).
//! * `{% generation %}...{% endgeneration %}` (AssistantTracker) renders its body in place.
//! * Python semantics where minijinja's differ: `{{ value }}` prints `str(value)` (`True`, `None`,
//!   `['a', 1]`, `{'k': 'v'}`, float repr like `1e-05`), string methods (`strip`/`split`/... with
//!   Python's whitespace set, `rsplit`, `removeprefix`, ...; the rest from minijinja-contrib's
//!   pycompat), the `trim` and `string` filters.
//! * Inputs (`apply_chat_template` + `render_jinja_template`): an empty conversation is an error;
//!   top-level message keys whose value is null are dropped; reasoning given as `reasoning_content`,
//!   `thinking` or `reasoning` is copied to both `thinking` (first key) and `reasoning_content`;
//!   variables are `messages`, `tools` (none unless given), `documents` (none unless given),
//!   `add_generation_prompt`, the tokenizer's set named special tokens (`bos_token`, `eos_token`,
//!   `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`), then `enable_thinking` and extra
//!   kwargs (which override special tokens).
//! * Several named templates: `options.template_name`, else `tool_use` when tools are given (even an
//!   empty list) and it exists, else `default`.
//!
//! * `continue_final_message`: the rendered prompt ends where the final message's text does
//!   (transformers' cut after rendering, including its handling of whitespace the template trims).
//!
//! Not emulated: assistant-token masks, `sanitize_control_tokens`,
//! `strftime_now` uses UTC (Python uses the local time zone).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{from_args, Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior, Value};
use serde_json::Value as Json;

use crate::tokenizer::{ChatTemplateSource, SpecialTokens, Tokenizer, TokenizerConfig, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{0} has no chat template (no `chat_template` in tokenizer_config.json, no chat_template.jinja)")]
    NoTemplate(String),
    #[error("chat template {name:?} not found; available: {available:?}")]
    UnknownTemplate { name: String, available: Vec<String> },
    #[error("several chat templates and none named `default`; pass a template name (available: {0:?})")]
    NoDefault(Vec<String>),
    #[error("chat template {name:?} does not compile: {message}")]
    Syntax { name: String, message: String },
    #[error("rendering chat template {name:?} failed: {message}")]
    Render { name: String, message: String },
    #[error("invalid chat input: {0}")]
    InvalidInput(String),
}

pub type Result<T, E = ChatTemplateError> = std::result::Result<T, E>;

/// Arguments of `apply_chat_template` besides the messages.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    /// JSON-schema tools (`{"type": "function", "function": {...}}`); `None` renders `tools` as none.
    pub tools: Option<Vec<Json>>,
    /// RAG documents (`documents` variable); `None` renders it as none.
    pub documents: Option<Vec<Json>>,
    /// Qwen3-style `enable_thinking` kwarg; `None` leaves it undefined.
    pub enable_thinking: Option<bool>,
    /// Further template kwargs (e.g. `date_string`, `reasoning_effort`); they override special tokens.
    pub extra: serde_json::Map<String, Json>,
    /// Which of several named templates to use (see the module docs for the default choice).
    pub template_name: Option<String>,
    /// transformers' `continue_final_message`: the prompt ends with the final message's text,
    /// open (no end-of-turn after it), so that generation continues it: an assistant answer
    /// begun by the caller. Not with `add_generation_prompt`.
    pub continue_final_message: bool,
}

impl RenderOptions {
    pub fn generation() -> Self {
        Self { add_generation_prompt: true, ..Default::default() }
    }
}

/// Compiled chat template(s) of a tokenizer plus the special tokens they see.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `None` for a single template (compiled under the name `default`), else the available names.
    named: Option<Vec<String>>,
    special_tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("named", &self.named)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

const SINGLE: &str = "default";

impl ChatTemplate {
    /// One template with the given `bos_token` / `eos_token` (other special tokens unset).
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let special_tokens = SpecialTokens {
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
            ..Default::default()
        };
        Self::from_source(&ChatTemplateSource::Single(source.to_string()), special_tokens)
    }

    /// Template(s) and the special tokens all templates see.
    pub fn from_source(source: &ChatTemplateSource, special_tokens: SpecialTokens) -> Result<Self> {
        let mut env = build_environment();
        let named = match source {
            ChatTemplateSource::Single(src) => {
                add_template(&mut env, SINGLE, src)?;
                None
            }
            ChatTemplateSource::Named(map) => {
                for (name, src) in map {
                    add_template(&mut env, name, src)?;
                }
                Some(map.keys().cloned().collect())
            }
        };
        Ok(Self { env, named, special_tokens })
    }

    /// From `tokenizer_config.json` / `chat_template.jinja` in a tokenizer folder (tokenizer.json is not read).
    pub fn from_tokenizer_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config = TokenizerConfig::from_dir(dir)?;
        Self::from_config(&config).map_err(|e| match e {
            ChatTemplateError::NoTemplate(_) => ChatTemplateError::NoTemplate(dir.display().to_string()),
            e => e,
        })
    }

    pub fn from_config(config: &TokenizerConfig) -> Result<Self> {
        let source =
            config.chat_template.as_ref().ok_or_else(|| ChatTemplateError::NoTemplate("the tokenizer".into()))?;
        Self::from_source(source, config.special_tokens.clone())
    }

    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self> {
        Self::from_config(tokenizer.config()).map_err(|e| match e {
            ChatTemplateError::NoTemplate(_) => ChatTemplateError::NoTemplate(tokenizer.dir().display().to_string()),
            e => e,
        })
    }

    /// Names of the templates when there are several, `None` for a single template.
    pub fn names(&self) -> Option<&[String]> {
        self.named.as_deref()
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// The prompt text for `messages` (JSON objects with `role`, `content`, and optionally
    /// `reasoning_content`, `tool_calls`, `tool_call_id`, `name`, ...).
    pub fn render(&self, messages: &[Json], opts: &RenderOptions) -> Result<String> {
        if opts.continue_final_message && opts.add_generation_prompt {
            return Err(ChatTemplateError::InvalidInput(
                "continue_final_message and add_generation_prompt cannot both be set: one continues the final \
                 message, the other starts a new assistant message"
                    .into(),
            ));
        }
        let rendered = self.render_whole(messages, opts)?;
        if !opts.continue_final_message {
            return Ok(rendered);
        }
        let text = messages.last().and_then(final_text).ok_or_else(|| {
            ChatTemplateError::InvalidInput(
                "continue_final_message is set and the final message has no text to continue".into(),
            )
        })?;
        cut_after_final_message(rendered, &text)
    }

    fn render_whole(&self, messages: &[Json], opts: &RenderOptions) -> Result<String> {
        let name = self.select(opts)?;
        let template = self
            .env
            .get_template(name)
            .map_err(|e| ChatTemplateError::Render { name: name.to_string(), message: error_message(&e) })?;
        let ctx = build_context(messages, opts, &self.special_tokens)?;
        tracing::trace!(template = name, messages = messages.len(), "rendering chat template");
        // A template is input, and minijinja 2.24 can panic on some (a reversed slice of an empty
        // string or list, `x[::-1]`, indexes past the end; fixed in minijinja 3): such a panic is
        // this template's error, not the caller's crash (found by fuzz/fuzz_targets/chat_template.rs).
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| template.render(ctx)));
        let rendered = rendered.map_err(|panic| {
            let what = panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied());
            ChatTemplateError::Render {
                name: name.to_string(),
                message: format!("the template engine failed ({})", what.unwrap_or("a panic")),
            }
        })?;
        rendered.map_err(|e| ChatTemplateError::Render { name: name.to_string(), message: error_message(&e) })
    }

    fn select<'a>(&'a self, opts: &'a RenderOptions) -> Result<&'a str> {
        let Some(names) = &self.named else {
            return Ok(SINGLE);
        };
        let has = |n: &str| names.iter().any(|x| x == n);
        if let Some(name) = &opts.template_name {
            return if has(name) {
                Ok(name)
            } else {
                Err(ChatTemplateError::UnknownTemplate { name: name.clone(), available: names.clone() })
            };
        }
        if opts.tools.is_some() && has("tool_use") {
            Ok("tool_use")
        } else if has("default") {
            Ok("default")
        } else {
            Err(ChatTemplateError::NoDefault(names.clone()))
        }
    }
}

/// The text of `message` that `continue_final_message` continues: its `content` string, or the
/// last part of a list that has a `text` (None: no text).
fn final_text(message: &Json) -> Option<String> {
    match message.get("content") {
        Some(Json::String(text)) => Some(text.clone()),
        Some(Json::Array(parts)) => {
            parts.iter().rev().find_map(|p| p.get("text").and_then(Json::as_str)).map(str::to_string)
        }
        _ => None,
    }
}

/// transformers' cut for `continue_final_message`: the prompt up to the last place the final
/// message's stripped text appears, keeping its trailing whitespace where the template kept it.
fn cut_after_final_message(rendered: String, text: &str) -> Result<String> {
    let stripped = py_strip(text, None, true, true);
    let Some(at) = rendered.rfind(stripped.as_str()) else {
        return Err(ChatTemplateError::InvalidInput(
            "continue_final_message is set and the final message does not appear in the rendered prompt (the \
             chat template changes its text)"
                .into(),
        ));
    };
    let left_stripped = py_strip(text, None, true, false);
    let end = if rendered.get(at..at + left_stripped.len()) == Some(text) {
        // The template kept the text as it is, trailing whitespace and all.
        at + left_stripped.len()
    } else {
        at + stripped.len()
    };
    let mut rendered = rendered;
    rendered.truncate(end);
    Ok(rendered)
}

fn error_message(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    msg
}

fn add_template(env: &mut Environment<'static>, name: &str, source: &str) -> Result<()> {
    env.add_template_owned(name.to_string(), rewrite_generation_tags(source))
        .map_err(|e| ChatTemplateError::Syntax { name: name.to_string(), message: error_message(&e) })
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// Template variables that `apply_chat_template` sets itself, so an extra kwarg may not name them.
pub const RESERVED_KWARGS: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

fn normalize_message(i: usize, message: &Json) -> Result<serde_json::Map<String, Json>> {
    let Json::Object(map) = message else {
        return Err(ChatTemplateError::InvalidInput(format!("messages[{i}] must be a JSON object, got {message}")));
    };
    // `_normalize_chat_messages`: drop keys whose value is None.
    let map: serde_json::Map<String, Json> =
        map.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    // `_alias_reasoning_fields`: {"thinking": r, **message, "reasoning_content": r}.
    let reasoning = REASONING_FIELDS.iter().find_map(|k| map.get(*k)).cloned();
    let Some(reasoning) = reasoning else {
        return Ok(map);
    };
    let mut aliased = serde_json::Map::with_capacity(map.len() + 2);
    aliased.insert("thinking".into(), reasoning.clone());
    for (k, v) in map {
        aliased.insert(k, v);
    }
    aliased.insert("reasoning_content".into(), reasoning);
    Ok(aliased)
}

fn build_context(messages: &[Json], opts: &RenderOptions, special: &SpecialTokens) -> Result<Value> {
    if messages.is_empty() {
        return Err(ChatTemplateError::InvalidInput("cannot apply a chat template to an empty conversation".into()));
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| normalize_message(i, m).map(Json::Object))
        .collect::<Result<Vec<_>>>()?;
    let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
    ctx.insert("messages".into(), Value::from_serialize(&messages));
    ctx.insert("tools".into(), opts.tools.as_ref().map_or(Value::from(()), Value::from_serialize));
    ctx.insert("documents".into(), opts.documents.as_ref().map_or(Value::from(()), Value::from_serialize));
    ctx.insert("add_generation_prompt".into(), Value::from(opts.add_generation_prompt));
    for (name, token) in special.iter() {
        ctx.insert(name.into(), Value::from(token));
    }
    if let Some(enable_thinking) = opts.enable_thinking {
        ctx.insert("enable_thinking".into(), Value::from(enable_thinking));
    }
    for (k, v) in &opts.extra {
        if RESERVED_KWARGS.contains(&k.as_str()) {
            return Err(ChatTemplateError::InvalidInput(format!(
                "`{k}` cannot be an extra template kwarg (apply_chat_template sets it)"
            )));
        }
        ctx.insert(k.clone(), Value::from_serialize(v));
    }
    Ok(Value::from(ctx))
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker) become `{% if true %}` /
/// `{% endif %}` with the same whitespace control, so trim/lstrip behave as around the original tags.
fn rewrite_generation_tags(source: &str) -> String {
    if !source.contains("generation") {
        return source.to_string();
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open_ctl, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (Some(c), &inner[1..]),
            _ => (None, inner),
        };
        let (body, close_ctl) = match body.chars().last() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], Some(c)),
            _ => (body, None),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                if let Some(c) = open_ctl {
                    out.push(c);
                }
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                if let Some(c) = close_ctl {
                    out.push(c);
                }
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Environment

fn build_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_formatter(|out, _state, value| {
        if value.is_undefined() {
            return Ok(());
        }
        match value.as_str() {
            Some(s) if value.kind() == ValueKind::String => out.write_str(s),
            _ => out.write_str(&py_str(value)),
        }
        .map_err(Error::from)
    });
    env.set_unknown_method_callback(python_methods);
    env.add_filter("tojson", tojson_filter);
    env.add_filter("string", |value: &Value| -> Value {
        if value.kind() == ValueKind::String {
            value.clone()
        } else {
            Value::from(py_str(value))
        }
    });
    env.add_filter("trim", |value: &Value, chars: Option<String>| -> Result<Value, Error> {
        let s = py_str(value);
        Ok(Value::from(py_strip(&s, chars.as_deref(), true, true)))
    });
    // Jinja2's Undefined has len() 0.
    let length = |value: &Value| -> Result<Value, Error> {
        if value.is_undefined() {
            return Ok(Value::from(0));
        }
        minijinja::filters::length(value).map(Value::from)
    };
    env.add_filter("length", length);
    env.add_filter("count", length);
    env.add_filter("join", join_filter);
    env.add_filter("round", round_filter);
    env.add_filter("center", |value: &Value, width: Option<usize>| -> Value {
        // Python's str.center.
        let s = py_str(value);
        let len = s.chars().count();
        let width = width.unwrap_or(80);
        if width <= len {
            return Value::from(s);
        }
        let marg = width - len;
        let left = marg / 2 + (marg & width & 1);
        Value::from(format!("{}{s}{}", " ".repeat(left), " ".repeat(marg - left)))
    });
    // Jinja2's `sequence` test is "has len() and []": strings and dicts pass too.
    env.add_test("sequence", |value: &Value| {
        matches!(value.kind(), ValueKind::String | ValueKind::Seq | ValueKind::Map)
    });
    env.add_function("raise_exception", |message: Value| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, format!("template raised an exception: {}", py_str(&message))))
    });
    env.add_function("strftime_now", |format: String| -> Value { Value::from(strftime(&format, SystemTime::now())) });
    env
}

/// Jinja2's `join(value, d='', attribute=None)`: items are converted with Python's `str()`.
fn join_filter(value: &Value, d: Option<String>, kwargs: Kwargs) -> Result<Value, Error> {
    let attribute: Option<Value> = kwargs.get("attribute")?;
    let d = match (d, kwargs.get::<Option<String>>("d")?) {
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => String::new(),
    };
    kwargs.assert_all_used()?;
    if value.is_undefined() || value.is_none() {
        return Ok(Value::from(""));
    }
    if let Some(s) = value.as_str() {
        // Joining a string joins its characters.
        let chars: Vec<String> = s.chars().map(String::from).collect();
        return Ok(Value::from(chars.join(&d)));
    }
    let mut parts = Vec::new();
    for item in value.try_iter()? {
        let item = match &attribute {
            None => item,
            Some(attr) => get_path(&item, attr)?,
        };
        parts.push(py_str(&item));
    }
    Ok(Value::from(parts.join(&d)))
}

/// Jinja2's attribute path lookup (`"a.b"`, integer parts index).
fn get_path(value: &Value, path: &Value) -> Result<Value, Error> {
    if let Some(path) = path.as_str() {
        let mut current = value.clone();
        for part in path.split('.') {
            current = match part.parse::<i64>() {
                Ok(i) => current.get_item(&Value::from(i))?,
                Err(_) => current.get_attr(part)?,
            };
        }
        Ok(current)
    } else {
        value.get_item(path)
    }
}

/// Jinja2's `round(value, precision=0, method='common')`: 'common' is Python's `round` (ties to even on the
/// exact binary value), and the result is a float.
fn round_filter(value: &Value, precision: Option<i32>, method: Option<String>) -> Result<Value, Error> {
    let x = f64::try_from(value.clone())?;
    let precision = precision.unwrap_or(0);
    let factor = 10f64.powi(precision);
    let rounded = match method.as_deref().unwrap_or("common") {
        "common" if precision >= 0 => {
            let text = format!("{:.*}", precision as usize, x);
            text.parse::<f64>().unwrap_or(x)
        }
        "common" => ((x * factor).round_ties_even()) / factor,
        "ceil" => (x * factor).ceil() / factor,
        "floor" => (x * factor).floor() / factor,
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("method must be 'common', 'ceil' or 'floor', not {other:?}"),
            ))
        }
    };
    Ok(Value::from(rounded))
}

// ---------------------------------------------------------------------------------------------
// Python string formatting

/// `str.isspace()` for one character (Rust's `is_whitespace` lacks U+001C..U+001F).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `float.__repr__`: shortest round-trip digits, exponent form outside 1e-4 <= |x| < 1e16.
pub(crate) fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf".into() } else { "inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{sign}{digits}{}.0", "0".repeat((int_len - n) as usize))
            } else {
                let (a, b) = digits.split_at(int_len as usize);
                format!("{sign}{a}.{b}")
            }
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let (a, b) = digits.split_at(1);
        let frac = if b.is_empty() { String::new() } else { format!(".{b}") };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{a}{frac}e{esign}{:02}", exp.abs())
    }
}

fn is_float(value: &Value) -> bool {
    value.kind() == ValueKind::Number && !value.is_integer()
}

fn as_f64(value: &Value) -> f64 {
    f64::try_from(value.clone()).unwrap_or(f64::NAN)
}

/// Rough `str.isprintable()` for repr: control, format, separator (except space), surrogate and
/// private-use characters are escaped.
fn py_printable(c: char) -> bool {
    let u = c as u32;
    !(u < 0x20
        || (0x7f..=0xa0).contains(&u)
        || u == 0xad
        || (0x600..=0x605).contains(&u)
        || u == 0x61c
        || u == 0x6dd
        || u == 0x70f
        || u == 0x1680
        || u == 0x180e
        || (0x2000..=0x200f).contains(&u)
        || (0x2028..=0x202f).contains(&u)
        || (0x205f..=0x206f).contains(&u)
        || u == 0x3000
        || (0xe000..=0xf8ff).contains(&u)
        || u == 0xfeff
        || (0xfff9..=0xfffb).contains(&u)
        || u == 0xfffe
        || u == 0xffff
        || (0xe0000..=0xe007f).contains(&u)
        || u >= 0xf0000)
}

/// Python's `repr(str)`.
fn py_repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if c == ' ' || py_printable(c) => out.push(c),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push(quote);
    out
}

fn py_seq_repr(value: &Value) -> Option<String> {
    let iter = value.try_iter().ok()?;
    let items: Vec<String> = iter.map(|v| py_repr(&v)).collect();
    Some(format!("[{}]", items.join(", ")))
}

fn py_map_repr(value: &Value) -> Option<String> {
    let pairs = value.as_object()?.try_iter_pairs()?;
    let items: Vec<String> = pairs.map(|(k, v)| format!("{}: {}", py_repr(&k), py_repr(&v))).collect();
    Some(format!("{{{}}}", items.join(", ")))
}

/// Python's `repr()` of a template value.
fn py_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => py_repr_str(value.as_str().unwrap_or_default()),
        _ => py_str(value),
    }
}

/// Python's `str()` of a template value (what Jinja2 prints for `{{ value }}`).
pub(crate) fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number if is_float(value) => py_float_repr(as_f64(value)),
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Seq | ValueKind::Iterable => py_seq_repr(value).unwrap_or_else(|| value.to_string()),
        ValueKind::Map => py_map_repr(value).unwrap_or_else(|| value.to_string()),
        _ => value.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// tojson (HF's override: json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False))

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn tojson_filter(value: &Value, args: &[Value]) -> Result<Value, Error> {
    type Args = (Option<Value>, Option<Value>, Option<Value>, Option<Value>, Kwargs);
    let (ensure_ascii, indent, separators, sort_keys, kwargs): Args = from_args(args)?;
    let pick = |positional: Option<Value>, name: &str| -> Result<Option<Value>, Error> {
        let kw: Option<Value> = kwargs.get(name)?;
        match (positional, kw) {
            (Some(_), Some(_)) => Err(Error::new(
                ErrorKind::TooManyArguments,
                format!("tojson() got multiple values for argument '{name}'"),
            )),
            (p, k) => Ok(p.or(k)),
        }
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = pick(indent, "indent")?;
    let separators = pick(separators, "separators")?;
    let sort_keys = pick(sort_keys, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.kind() {
            ValueKind::String => v.as_str().unwrap_or_default().to_string(),
            ValueKind::Bool => if v.is_true() { " " } else { "" }.to_string(),
            ValueKind::Number if v.is_integer() => " ".repeat(v.as_i64().unwrap_or(0).clamp(0, 1 << 16) as usize),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson(): indent must be an int or a string, not {}", v.kind()),
                ))
            }
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.kind() == ValueKind::String && b.kind() == ValueKind::String => {
                    (a.as_str().unwrap_or_default().to_string(), b.as_str().unwrap_or_default().to_string())
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson(): separators must be an (item_separator, key_separator) pair of strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".into(), ": ".into()),
        _ => (", ".into(), ": ".into()),
    };
    let style = JsonStyle { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    write_json(value, &style, 0, &mut out)?;
    Ok(Value::from(out))
}

fn not_serializable(value: &Value) -> Error {
    let ty = match value.kind() {
        ValueKind::Undefined => "Undefined".to_string(),
        k => k.to_string(),
    };
    Error::new(ErrorKind::InvalidOperation, format!("Object of type {ty} is not JSON serializable"))
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x < 0.0 { "-Infinity" } else { "Infinity" }.into()
    } else {
        py_float_repr(x)
    }
}

fn json_key(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::Number if is_float(key) => json_float(as_f64(key)),
        ValueKind::Number => key.to_string(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
        ValueKind::None => "null".into(),
        k => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("keys must be str, int, float, bool or None, not {k}"),
            ))
        }
    })
}

fn write_newline(style: &JsonStyle, level: usize, out: &mut String) {
    if let Some(indent) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

fn write_json(value: &Value, style: &JsonStyle, level: usize, out: &mut String) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if is_float(value) => out.push_str(&json_float(as_f64(value))),
        ValueKind::Number => {
            let _ = write!(out, "{value}");
        }
        ValueKind::String => write_json_str(value.as_str().unwrap_or_default(), style.ensure_ascii, out),
        ValueKind::Bytes => {
            write_json_str(&String::from_utf8_lossy(value.as_bytes().unwrap_or_default()), style.ensure_ascii, out)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                write_newline(style, level + 1, out);
                write_json(item, style, level + 1, out)?;
            }
            write_newline(style, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let pairs = value.as_object().and_then(|o| o.try_iter_pairs()).ok_or_else(|| not_serializable(value))?;
            let mut items = pairs.map(|(k, v)| json_key(&k).map(|k| (k, v))).collect::<Result<Vec<_>, Error>>()?;
            if items.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                items.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (k, v)) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                write_newline(style, level + 1, out);
                write_json_str(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write_json(v, style, level + 1, out)?;
            }
            write_newline(style, level, out);
            out.push('}');
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Python methods on values

fn py_strip(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let set: Option<Vec<char>> = chars.map(|c| c.chars().collect());
    let strip_char = |c: char| match &set {
        Some(set) => set.contains(&c),
        None => py_isspace(c),
    };
    let mut t = s;
    if left {
        t = t.trim_start_matches(strip_char);
    }
    if right {
        t = t.trim_end_matches(strip_char);
    }
    t.to_string()
}

/// `str.split` / `str.rsplit` (CPython's algorithm, including `maxsplit` with whitespace splitting).
fn py_split(s: &str, sep: Option<&str>, maxsplit: i64, from_right: bool) -> Result<Vec<String>, Error> {
    let max = if maxsplit < 0 { usize::MAX } else { maxsplit as usize };
    match sep {
        Some("") => Err(Error::new(ErrorKind::InvalidOperation, "ValueError: empty separator")),
        Some(sep) => Ok(if from_right {
            let mut v: Vec<String> = if max == usize::MAX {
                s.rsplit(sep).map(str::to_string).collect()
            } else {
                s.rsplitn(max.saturating_add(1), sep).map(str::to_string).collect()
            };
            v.reverse();
            v
        } else if max == usize::MAX {
            s.split(sep).map(str::to_string).collect()
        } else {
            s.splitn(max.saturating_add(1), sep).map(str::to_string).collect()
        }),
        None => {
            let chars: Vec<(usize, char)> = s.char_indices().collect();
            let n = chars.len();
            let byte = |i: usize| if i < n { chars[i].0 } else { s.len() };
            let mut out = Vec::new();
            let mut count = max;
            if !from_right {
                let mut i = 0;
                while count > 0 {
                    while i < n && py_isspace(chars[i].1) {
                        i += 1;
                    }
                    if i == n {
                        break;
                    }
                    let j = i;
                    while i < n && !py_isspace(chars[i].1) {
                        i += 1;
                    }
                    out.push(s[byte(j)..byte(i)].to_string());
                    count -= 1;
                }
                while i < n && py_isspace(chars[i].1) {
                    i += 1;
                }
                if i < n {
                    out.push(s[byte(i)..].to_string());
                }
            } else {
                let mut i = n; // exclusive end
                while count > 0 {
                    while i > 0 && py_isspace(chars[i - 1].1) {
                        i -= 1;
                    }
                    if i == 0 {
                        break;
                    }
                    let j = i;
                    while i > 0 && !py_isspace(chars[i - 1].1) {
                        i -= 1;
                    }
                    out.push(s[byte(i)..byte(j)].to_string());
                    count -= 1;
                }
                while i > 0 && py_isspace(chars[i - 1].1) {
                    i -= 1;
                }
                if i > 0 {
                    out.push(s[..byte(i)].to_string());
                }
                out.reverse();
            }
            Ok(out)
        }
    }
}

fn py_splitlines(s: &str, keepends: bool) -> Vec<String> {
    let is_break = |c: char| {
        matches!(
            c,
            '\n' | '\r' | '\u{b}' | '\u{c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}' | '\u{2028}' | '\u{2029}'
        )
    };
    let mut out = Vec::new();
    let mut start = 0;
    let mut iter = s.char_indices().peekable();
    while let Some((i, c)) = iter.next() {
        if is_break(c) {
            let mut end = i + c.len_utf8();
            if c == '\r' {
                if let Some(&(_, '\n')) = iter.peek() {
                    iter.next();
                    end += 1;
                }
            }
            out.push(if keepends { &s[start..end] } else { &s[start..i] }.to_string());
            start = end;
        }
    }
    if start < s.len() {
        out.push(s[start..].to_string());
    }
    out
}

/// Optional string-or-none argument (`None` and a missing argument are the same for Python's methods).
fn opt_str(v: Option<&Value>) -> Result<Option<String>, Error> {
    match v {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| {
            Error::new(ErrorKind::InvalidOperation, format!("expected a string argument, got {}", v.kind()))
        }),
    }
}

fn python_methods(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let (ValueKind::String, Some(s)) = (value.kind(), value.as_str()) {
        match method {
            "strip" | "lstrip" | "rstrip" => {
                let (chars,): (Option<Value>,) = from_args(args)?;
                let chars = opt_str(chars.as_ref())?;
                let (l, r) = match method {
                    "strip" => (true, true),
                    "lstrip" => (true, false),
                    _ => (false, true),
                };
                return Ok(Value::from(py_strip(s, chars.as_deref(), l, r)));
            }
            "split" | "rsplit" => {
                let (sep, maxsplit, kwargs): (Option<Value>, Option<i64>, Kwargs) = from_args(args)?;
                let sep = match kwargs.get::<Option<Value>>("sep")? {
                    Some(v) => opt_str(Some(&v))?,
                    None => opt_str(sep.as_ref())?,
                };
                let maxsplit = kwargs.get::<Option<i64>>("maxsplit")?.or(maxsplit).unwrap_or(-1);
                kwargs.assert_all_used()?;
                let parts = py_split(s, sep.as_deref(), maxsplit, method == "rsplit")?;
                return Ok(Value::from(parts));
            }
            "splitlines" => {
                let (keepends,): (Option<bool>,) = from_args(args)?;
                return Ok(Value::from(py_splitlines(s, keepends.unwrap_or(false))));
            }
            "removeprefix" => {
                let (prefix,): (&str,) = from_args(args)?;
                return Ok(Value::from(s.strip_prefix(prefix).unwrap_or(s)));
            }
            "removesuffix" => {
                let (suffix,): (&str,) = from_args(args)?;
                return Ok(Value::from(s.strip_suffix(suffix).unwrap_or(s)));
            }
            "isspace" => {
                let () = from_args(args)?;
                return Ok(Value::from(!s.is_empty() && s.chars().all(py_isspace)));
            }
            "index" | "rindex" => {
                let (sub,): (&str,) = from_args(args)?;
                let found = if method == "index" { s.find(sub) } else { s.rfind(sub) };
                return match found {
                    Some(b) => Ok(Value::from(s[..b].chars().count())),
                    None => Err(Error::new(ErrorKind::InvalidOperation, "ValueError: substring not found")),
                };
            }
            "find" | "rfind" => {
                // Python counts characters, not bytes.
                let (sub,): (&str,) = from_args(args)?;
                let found = if method == "find" { s.find(sub) } else { s.rfind(sub) };
                return Ok(Value::from(found.map_or(-1, |b| s[..b].chars().count() as i64)));
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

// ---------------------------------------------------------------------------------------------
// strftime_now (UTC)

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// C/Python `strftime` for UTC `now`: %a %A %b %B %c %d %D %e %F %H %I %j %m %M %p %S %T %u %w %x %X %y %Y
/// %z %Z %%, and glibc's `%-d`-style unpadded variants. Unknown directives are kept as written.
pub(crate) fn strftime(format: &str, now: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Monday = 0)
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day as i64 + i64::from(is_leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let s = match d {
            'a' => day_name[..3].to_string(),
            'A' => day_name.to_string(),
            'b' | 'h' => month_name[..3].to_string(),
            'B' => month_name.to_string(),
            'c' => format!(
                "{} {} {:>2} {:02}:{:02}:{:02} {}",
                &day_name[..3],
                &month_name[..3],
                day,
                hour,
                minute,
                second,
                year
            ),
            'd' => num(day.into(), 2),
            'D' => format!("{:02}/{:02}/{:02}", month, day, year.rem_euclid(100)),
            'e' => format!("{day:>2}"),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'H' => num(hour, 2),
            'I' => num(hour12, 2),
            'j' => num(yday, 3),
            'm' => num(month.into(), 2),
            'M' => num(minute, 2),
            'p' => if hour < 12 { "AM" } else { "PM" }.to_string(),
            'S' => num(second, 2),
            'T' | 'X' => format!("{hour:02}:{minute:02}:{second:02}"),
            'u' => (weekday + 1).to_string(),
            'w' => ((weekday + 1) % 7).to_string(),
            'x' => format!("{:02}/{:02}/{:02}", month, day, year.rem_euclid(100)),
            'y' => num(year.rem_euclid(100), 2),
            'Y' => year.to_string(),
            'z' => "+0000".to_string(),
            'Z' => "UTC".to_string(),
            '%' => "%".to_string(),
            other => {
                if unpadded {
                    format!("%-{other}")
                } else {
                    format!("%{other}")
                }
            }
        };
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render_str(src: &str, ctx: Json) -> String {
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).unwrap();
        let Json::Object(extra) = ctx else { panic!() };
        t.render(&[json!({"role": "user", "content": "x"})], &RenderOptions { extra, ..Default::default() }).unwrap()
    }

    #[test]
    fn chat_template_python_float_repr() {
        for (x, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
            (123.456, "123.456"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(py_float_repr(x), s);
        }
    }

    #[test]
    fn chat_template_tojson_like_python() {
        let ctx = json!({"v": {"b": [1, 2.5, "é\"<>&'\n", null, true], "a": {}, "c": []}});
        assert_eq!(
            render_str("{{ v|tojson }}", ctx.clone()),
            r#"{"b": [1, 2.5, "é\"<>&'\n", null, true], "a": {}, "c": []}"#
        );
        assert_eq!(
            render_str("{{ v|tojson(indent=2) }}", ctx.clone()),
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"é\\\"<>&'\\n\",\n    null,\n    true\n  ],\n  \"a\": {},\n  \"c\": []\n}"
        );
        assert_eq!(
            render_str("{{ v|tojson(separators=(',', ':'), sort_keys=true) }}", ctx.clone()),
            r#"{"a":{},"b":[1,2.5,"é\"<>&'\n",null,true],"c":[]}"#
        );
        // HF's tojson takes ensure_ascii first: `tojson(true)` escapes non-ASCII.
        assert_eq!(render_str("{{ 'é😀'|tojson(true) }}", json!({})), r#""\u00e9\ud83d\ude00""#);
        assert_eq!(render_str("{{ v|tojson(indent=0) }}", json!({"v": [1]})), "[\n1\n]");
    }

    #[test]
    fn chat_template_prints_python_str() {
        let ctx = json!({"l": ["a", "it's", 1, 1.0, true, null], "d": {"k": "v", "n": 1e-5}, "f": 1e16});
        assert_eq!(
            render_str("{{ l }}|{{ d }}|{{ f }}|{{ true }}|{{ none }}|{{ undefined_var }}|{{ l|string }}", ctx),
            r#"['a', "it's", 1, 1.0, True, None]|{'k': 'v', 'n': 1e-05}|1e+16|True|None||['a', "it's", 1, 1.0, True, None]"#
        );
    }

    #[test]
    fn chat_template_python_string_methods() {
        let ctx = json!({"s": "\u{1c} a  b\tc \n", "p": "<think>x</think>\n\nanswer"});
        assert_eq!(render_str("[{{ s.strip() }}]", ctx.clone()), "[a  b\tc]");
        assert_eq!(render_str("{{ s.split() }}", ctx.clone()), "['a', 'b', 'c']");
        assert_eq!(render_str("{{ s.split(None, 1) }}", ctx.clone()), "['a', 'b\\tc \\n']");
        assert_eq!(render_str("{{ s.rsplit(maxsplit=1) }}", ctx.clone()), "['\\x1c a  b', 'c']");
        assert_eq!(render_str("{{ 'a,b,c'.rsplit(',', 1) }}", ctx.clone()), "['a,b', 'c']");
        assert_eq!(
            render_str(
                "{{ p.split('</think>')[-1].lstrip('\\n') }}|{{ p.split('</think>')[0].split('<think>')[-1] }}",
                ctx.clone()
            ),
            "answer|x"
        );
        assert_eq!(
            render_str("{{ p.startswith('<think>') }} {{ p.endswith(('x', 'answer')) }}", ctx.clone()),
            "True True"
        );
        assert_eq!(render_str("{{ 'a\\r\\nb\\x0bc'.splitlines() }}", ctx.clone()), "['a', 'b', 'c']");
        assert_eq!(render_str("{{ 'xyz'.removeprefix('x') }}{{ 'éa'.find('a') }}", ctx.clone()), "yz1");
        assert_eq!(
            render_str(
                "{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}{{ {'a': 1}.get('z', 'd') }}",
                ctx
            ),
            "a=1;b=2;d"
        );
    }

    #[test]
    fn chat_template_environment_like_hf() {
        // trim_blocks + lstrip_blocks, keep_trailing_newline=False, loop controls, namespace, raise_exception.
        let src = "{% for m in messages %}\n    {% if m.role == 'skip' %}{% continue %}{% endif %}\n[{{ m.content }}]\n{% endfor %}\n";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let msgs = [json!({"role": "user", "content": "a"}), json!({"role": "skip", "content": "b"})];
        assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "[a]\n");
        let t = ChatTemplate::new("{{ raise_exception('bad role') }}", None, None).unwrap();
        let err = t.render(&msgs, &RenderOptions::default()).unwrap_err().to_string();
        assert!(err.contains("bad role"), "{err}");
        let t = ChatTemplate::new(
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ bos_token }}{{ eos_token }}{{ strftime_now('%Y')|length }}",
            Some("<s>"),
            Some("</s>"),
        )
        .unwrap();
        assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "2<s></s>4");
        // {% generation %} blocks render their body.
        let t = ChatTemplate::new(
            "{% for m in messages %}\n{% generation %}\n{{ m.content }}\n{%- endgeneration %}\n{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "ab");
    }

    #[test]
    fn chat_template_message_normalization() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m|tojson }}|{{ m.content is defined }}\n{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let msgs = [
            json!({"role": "assistant", "content": null, "reasoning": "r", "tool_calls": null}),
            json!({"role": "assistant", "content": "c", "thinking": "t", "reasoning_content": null}),
        ];
        assert_eq!(
            t.render(&msgs, &RenderOptions::default()).unwrap(),
            "{\"thinking\": \"r\", \"role\": \"assistant\", \"reasoning\": \"r\", \"reasoning_content\": \"r\"}|False\n\
             {\"thinking\": \"t\", \"role\": \"assistant\", \"content\": \"c\", \"reasoning_content\": \"t\"}|True\n"
        );
        assert!(t.render(&[], &RenderOptions::default()).is_err());
        assert!(t.render(&[json!("hi")], &RenderOptions::default()).is_err());
    }

    #[test]
    fn chat_template_named_selection() {
        let mut named = BTreeMap::new();
        named.insert("default".to_string(), "D{{ 'none' if tools is none else tools|length }}".to_string());
        named.insert("tool_use".to_string(), "T{{ tools|length }}".to_string());
        let t = ChatTemplate::from_source(&ChatTemplateSource::Named(named), SpecialTokens::default()).unwrap();
        let msgs = [json!({"role": "user", "content": "x"})];
        assert_eq!(t.render(&msgs, &RenderOptions::default()).unwrap(), "Dnone");
        let opts = RenderOptions { tools: Some(vec![]), ..Default::default() };
        assert_eq!(t.render(&msgs, &opts).unwrap(), "T0");
        let opts =
            RenderOptions { template_name: Some("default".into()), tools: Some(vec![json!({})]), ..Default::default() };
        assert_eq!(t.render(&msgs, &opts).unwrap(), "D1");
        let opts = RenderOptions { template_name: Some("nope".into()), ..Default::default() };
        assert!(t.render(&msgs, &opts).is_err());
    }

    #[test]
    fn chat_template_strftime() {
        // 2024-02-29T13:05:09Z, a Thursday.
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_709_211_909);
        assert_eq!(
            strftime("%d %b %Y|%-d %B|%A %a|%H:%M:%S %I%p|%j|%y|%%", t),
            "29 Feb 2024|29 February|Thursday Thu|13:05:09 01PM|060|24|%"
        );
        assert_eq!(strftime("%F %T %Z", UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
    }

    // ---- Byte-identical comparison with transformers' apply_chat_template (tests/fixtures/chat) ----

    fn fixture_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat/qwen3_chat_references.json")
    }

    #[test]
    fn chat_template_qwen3_matches_transformers() {
        let tok = crate::tokenizer::tests::qwen3();
        let template = ChatTemplate::from_tokenizer(&tok).unwrap();
        let path = fixture_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (regenerate with scripts/make_chat_references.py)", path.display()));
        let cases: Vec<Json> = serde_json::from_str(&text).unwrap();
        assert!(cases.len() >= 8, "expected the full reference set");
        for case in &cases {
            let name = case["name"].as_str().unwrap();
            let messages = case["messages"].as_array().unwrap();
            let mut opts = RenderOptions {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                tools: case["tools"].as_array().cloned(),
                enable_thinking: case["enable_thinking"].as_bool(),
                continue_final_message: case["continue_final_message"].as_bool().unwrap_or(false),
                ..Default::default()
            };
            if let Some(Json::Object(extra)) = case.get("extra") {
                opts.extra = extra.clone();
            }
            let got = template.render(messages, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
            let expected = case["expected"].as_str().unwrap();
            assert_eq!(got, expected, "case {name}: rendered text differs from transformers");
            let ids = tok.encode(&got, false).unwrap();
            let expected_ids: Vec<u32> = serde_json::from_value(case["expected_ids"].clone()).unwrap();
            assert_eq!(ids, expected_ids, "case {name}: token ids differ from transformers");
        }
    }

    /// What `continue_final_message` refuses, as transformers does: with `add_generation_prompt`,
    /// a final message without text, and one the template does not print as written.
    #[test]
    fn continue_final_message_refuses_what_it_cannot_continue() {
        let template = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content | upper }}</{{ m.role }}>{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let continued = RenderOptions { continue_final_message: true, ..Default::default() };
        let upper = [json!({"role": "assistant", "content": "ABC "})];
        assert_eq!(template.render(&upper, &continued).unwrap(), "<assistant>ABC ");
        let parts = [json!({"role": "user", "content": [{"type": "image"}]})];
        let err = template.render(&parts, &continued).unwrap_err().to_string();
        assert!(err.contains("no text to continue"), "{err}");
        let lower = [json!({"role": "assistant", "content": "abc"})];
        let err = template.render(&lower, &continued).unwrap_err().to_string();
        assert!(err.contains("does not appear in the rendered prompt"), "{err}");
        let both = RenderOptions { add_generation_prompt: true, ..continued };
        let err = template.render(&upper, &both).unwrap_err().to_string();
        assert!(err.contains("cannot both be set"), "{err}");
    }

    #[test]
    fn chat_template_quirks_match_transformers() {
        let tok = crate::tokenizer::tests::qwen3();
        let path = fixture_path().with_file_name("template_quirks.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (regenerate with scripts/make_chat_references.py)", path.display()));
        let cases: Vec<Json> = serde_json::from_str(&text).unwrap();
        let mut failures = Vec::new();
        for case in &cases {
            let name = case["name"].as_str().unwrap();
            let source = ChatTemplateSource::Single(case["template"].as_str().unwrap().to_string());
            let template = ChatTemplate::from_source(&source, tok.special_tokens().clone())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let opts = RenderOptions {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                tools: case["tools"].as_array().cloned(),
                documents: case["documents"].as_array().cloned(),
                extra: case["kwargs"].as_object().cloned().unwrap_or_default(),
                ..Default::default()
            };
            let expected = case["expected"].as_str().unwrap();
            match template.render(case["messages"].as_array().unwrap(), &opts) {
                Ok(got) if got == expected => {}
                Ok(got) => failures.push(format!("{name}:\n  expected {expected:?}\n  got      {got:?}")),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases differ from transformers:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
}
