//! Tool calls in generated text: the `<tool_call>...</tool_call>` blocks a model writes when its
//! chat template offered it tools, turned into OpenAI's `tool_calls`, as vLLM's parsers do
//! (`--enable-auto-tool-choice --tool-call-parser hermes|qwen3_coder|glm45`). Which format a
//! model writes is read from its chat template ([`ToolCallFormat::detect`]): the template shows
//! the model its own calls in that format, so the text that renders past calls is the text the
//! model answers with.
//!
//! Everything here is a pure function of text (and of the request's tools, whose JSON schemas say
//! which parameter values are strings): [`parse`] for a whole answer, [`ToolCallStream`] for one
//! arriving in pieces; both give the same calls and the same content for the same text, however
//! it is cut.
//!
//! What is content and what is a call:
//! - a block that parses is a call (a qwen3_coder block with several `<function=` is several);
//! - a block that does not parse stays in the content as written (vLLM keeps the whole answer
//!   as content then; keeping only the faulty block keeps the calls that did parse);
//! - an unterminated block at the end (the answer hit `max_tokens`, or a stop string) is content;
//! - text between and after calls that is only whitespace is dropped: it is the line breaks the
//!   model puts between blocks, not something it says.

use serde_json::{Map, Value as Json};

/// Opens a tool call in every format handled here.
pub(crate) const START: &str = "<tool_call>";
/// Closes it.
pub(crate) const END: &str = "</tool_call>";

/// How a model writes its tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// Hermes / Qwen2.5 / Qwen3: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
    Hermes,
    /// Qwen3-Coder (and Qwen3-Next, Qwen3.5): `<tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n
    /// </parameter>\n</function>\n</tool_call>`.
    Qwen3Coder,
    /// GLM-4.5 / 4.6 / 4.7: `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n</tool_call>`.
    Glm45,
}

impl ToolCallFormat {
    /// The format a chat template renders past tool calls in, None when it renders none this
    /// server parses. The XML formats are checked first: their templates also contain `<tool_call>`.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<function=") {
            Some(ToolCallFormat::Qwen3Coder)
        } else if template.contains("<arg_key>") {
            Some(ToolCallFormat::Glm45)
        } else if template.contains(START) {
            Some(ToolCallFormat::Hermes)
        } else {
            None
        }
    }

    /// vLLM's `--tool-call-parser` name of the format.
    pub fn name(self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => "hermes",
            ToolCallFormat::Qwen3Coder => "qwen3_coder",
            ToolCallFormat::Glm45 => "glm45",
        }
    }
}

/// One call: the function's name and its arguments as a JSON object, serialized (OpenAI's
/// `arguments` is a string).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// A whole answer, split.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The text outside the calls (see the module docs for what is dropped).
    pub content: String,
    pub calls: Vec<ToolCall>,
}

/// The calls and the content of a whole answer. `tools` are the request's tools
/// (`{"type": "function", "function": {"name", "parameters"}}`), for the parameter types.
pub fn parse(text: &str, format: ToolCallFormat, tools: &[Json]) -> Parsed {
    let mut parsed = Parsed::default();
    let mut rest = text;
    loop {
        let Some(start) = rest.find(START) else {
            parsed.push_run(rest);
            return parsed;
        };
        parsed.push_run(&rest[..start]);
        let block = &rest[start..];
        let Some(end) = block[START.len()..].find(END).map(|i| START.len() + i) else {
            parsed.content.push_str(block);
            return parsed;
        };
        match parse_block(format, &block[START.len()..end], tools) {
            Some(calls) => parsed.calls.extend(calls),
            None => parsed.content.push_str(&block[..end + END.len()]),
        }
        rest = &block[end + END.len()..];
    }
}

impl Parsed {
    /// Text between blocks: dropped when it only separates calls.
    fn push_run(&mut self, run: &str) {
        if self.calls.is_empty() || !run.trim().is_empty() {
            self.content.push_str(run);
        }
    }
}

/// What [`ToolCallStream`] lets out: text to send as content, or a complete call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Streamed {
    Content(String),
    Call(ToolCall),
}

/// [`parse`] for an answer that arrives in pieces: content goes out as soon as it cannot be the
/// start of a block, each call once its block is complete.
#[derive(Debug)]
pub struct ToolCallStream {
    format: ToolCallFormat,
    tools: Vec<Json>,
    /// Text not yet let out: a possible start of `<tool_call>`, whitespace after a call that may
    /// only separate it from the next one, or an open block.
    held: String,
    in_block: bool,
    /// Calls let out so far.
    calls: usize,
    /// Whether the current run of text (between blocks) has let out any text.
    run_started: bool,
}

impl ToolCallStream {
    pub fn new(format: ToolCallFormat, tools: Vec<Json>) -> Self {
        ToolCallStream { format, tools, held: String::new(), in_block: false, calls: 0, run_started: false }
    }

    /// Calls let out so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// The next piece of the answer; what can be let out now.
    pub fn push(&mut self, text: &str) -> Vec<Streamed> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_block {
                let Some(end) = self.held.find(END) else { return out };
                let inner = self.held[..end].to_string();
                self.held.drain(..end + END.len());
                match parse_block(self.format, &inner, &self.tools) {
                    Some(calls) => {
                        self.calls += calls.len();
                        out.extend(calls.into_iter().map(Streamed::Call));
                    }
                    None => emit(&mut out, format!("{START}{inner}{END}")),
                }
                self.in_block = false;
                self.run_started = false;
                continue;
            }
            if let Some(start) = self.held.find(START) {
                let run = self.held[..start].to_string();
                self.held.drain(..start + START.len());
                if self.keeps(&run) {
                    emit(&mut out, run);
                }
                self.in_block = true;
                continue;
            }
            // Text that may be the start of a tag stays until the next piece says.
            let ready = self.held.len() - partial_tag_len(&self.held);
            if ready > 0 && self.keeps(&self.held[..ready]) {
                self.run_started = true;
                emit(&mut out, self.held.drain(..ready).collect());
            }
            return out;
        }
    }

    /// The end of the answer: what is still held (an unterminated block is content).
    pub fn finish(&mut self) -> Vec<Streamed> {
        let held = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        if self.in_block {
            self.in_block = false;
            emit(&mut out, format!("{START}{held}"));
        } else if self.keeps(&held) {
            emit(&mut out, held);
        }
        out
    }

    /// Whether text of the current run goes out (see [`Parsed::push_run`]).
    fn keeps(&self, run: &str) -> bool {
        self.calls == 0 || self.run_started || !run.trim().is_empty()
    }
}

fn emit(out: &mut Vec<Streamed>, text: String) {
    if !text.is_empty() {
        out.push(Streamed::Content(text));
    }
}

/// Bytes at the end of `text` that begin `<tool_call>` (0 when none). The tag is ASCII, so the
/// cut is on a character boundary.
fn partial_tag_len(text: &str) -> usize {
    (1..START.len()).rev().find(|&n| text.ends_with(&START[..n])).unwrap_or(0)
}

/// The calls of one block (the text between the tags), None when it is not a call in `format`.
fn parse_block(format: ToolCallFormat, inner: &str, tools: &[Json]) -> Option<Vec<ToolCall>> {
    match format {
        ToolCallFormat::Hermes => hermes(inner).map(|call| vec![call]),
        ToolCallFormat::Qwen3Coder => qwen3_coder(inner, tools),
        ToolCallFormat::Glm45 => glm45(inner, tools).map(|call| vec![call]),
    }
}

/// `{"name": ..., "arguments": {...}}`. Arguments given as a string (some fine-tunes write them
/// serialized) are kept when they are JSON and serialized as a string otherwise, so that
/// `arguments` is always JSON; missing arguments are `{}`.
fn hermes(inner: &str) -> Option<ToolCall> {
    let Json::Object(mut call) = serde_json::from_str::<Json>(inner.trim()).ok()? else { return None };
    let name = match call.remove("name")? {
        Json::String(name) if !name.trim().is_empty() => name,
        _ => return None,
    };
    let arguments = match call.remove("arguments").or_else(|| call.remove("parameters")) {
        None | Some(Json::Null) => "{}".to_string(),
        Some(Json::String(s)) if serde_json::from_str::<Json>(&s).is_ok() => s,
        Some(value) => value.to_string(),
    };
    Some(ToolCall { name, arguments })
}

/// `<function=NAME>` then `<parameter=P>\nVALUE\n</parameter>`s, `</function>`; the closing tags
/// may be missing, as vLLM allows (a parameter ends at the next parameter or the function's end).
fn qwen3_coder(inner: &str, tools: &[Json]) -> Option<Vec<ToolCall>> {
    const FUNCTION: &str = "<function=";
    const PARAMETER: &str = "<parameter=";
    let mut calls = Vec::new();
    let mut rest = inner;
    while let Some(at) = rest.find(FUNCTION) {
        let body = &rest[at + FUNCTION.len()..];
        let end = [body.find("</function>"), body.find(FUNCTION)].into_iter().flatten().min().unwrap_or(body.len());
        rest = &body[end..];
        let body = &body[..end];
        let (name, mut params) = body.split_once('>')?;
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        let mut arguments = Map::new();
        while let Some(at) = params.find(PARAMETER) {
            let (key, tail) = params[at + PARAMETER.len()..].split_once('>')?;
            let value_end = [tail.find("</parameter>"), tail.find(PARAMETER)].into_iter().flatten().min();
            let value = &tail[..value_end.unwrap_or(tail.len())];
            params = &tail[value.len()..];
            // The template writes the value on lines of its own.
            let value = value.strip_prefix('\n').unwrap_or(value);
            let value = value.strip_suffix('\n').unwrap_or(value);
            let key = key.trim();
            let value = convert(value, param_type(tools, name, key), Untyped::String);
            arguments.insert(key.to_string(), value);
        }
        calls.push(ToolCall { name: name.to_string(), arguments: Json::Object(arguments).to_string() });
    }
    (!calls.is_empty()).then_some(calls)
}

/// `NAME` then `<arg_key>K</arg_key><arg_value>V</arg_value>` pairs (whitespace between them
/// allowed); anything else in the block makes it no call.
fn glm45(inner: &str, tools: &[Json]) -> Option<ToolCall> {
    const KEY: &str = "<arg_key>";
    let name_end = [inner.find('\n'), inner.find(KEY)].into_iter().flatten().min().unwrap_or(inner.len());
    let name = inner[..name_end].trim();
    if name.is_empty() || name.contains('<') {
        return None;
    }
    let mut arguments = Map::new();
    let mut rest = inner[name_end..].trim_start();
    while !rest.is_empty() {
        let (key, tail) = rest.strip_prefix(KEY)?.split_once("</arg_key>")?;
        let (value, tail) = tail.trim_start().strip_prefix("<arg_value>")?.split_once("</arg_value>")?;
        let key = key.trim();
        arguments.insert(key.to_string(), convert(value.trim(), param_type(tools, name, key), Untyped::Json));
        rest = tail.trim_start();
    }
    Some(ToolCall { name: name.to_string(), arguments: Json::Object(arguments).to_string() })
}

/// A parameter's type in its tool's JSON schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ParamType {
    String,
    Boolean,
    /// number, integer, object, array, null: written as JSON.
    Json,
    /// Not in the schema, or no `type` there.
    Untyped,
}

/// How a value of no known type is read: vLLM's qwen3_coder parser keeps it a string, its glm45
/// parser reads it as JSON when it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Untyped {
    String,
    Json,
}

fn param_type(tools: &[Json], function: &str, param: &str) -> ParamType {
    let schema = tools
        .iter()
        .filter_map(|t| t.get("function"))
        .find(|f| f.get("name").and_then(Json::as_str) == Some(function))
        .and_then(|f| f.get("parameters"))
        .and_then(|p| p.get("properties"))
        .and_then(|p| p.get(param));
    // `"type": ["integer", "null"]`: the type besides null.
    let kind = match schema.and_then(|s| s.get("type")) {
        Some(Json::String(t)) => Some(t.as_str()),
        Some(Json::Array(types)) => types.iter().filter_map(Json::as_str).find(|t| *t != "null"),
        _ => None,
    };
    match kind {
        None => ParamType::Untyped,
        Some("string") => ParamType::String,
        Some("boolean") => ParamType::Boolean,
        Some(_) => ParamType::Json,
    }
}

/// A parameter's value as written, as the JSON its type says; a value that is not what its type
/// says stays the string the model wrote (the client sees what came, not a guess).
fn convert(value: &str, kind: ParamType, untyped: Untyped) -> Json {
    let as_json = || serde_json::from_str::<Json>(value).unwrap_or_else(|_| Json::String(value.to_string()));
    match kind {
        ParamType::String => Json::String(value.to_string()),
        // Python-trained models write `True`.
        ParamType::Boolean => match value.trim().to_ascii_lowercase().as_str() {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => Json::String(value.to_string()),
        },
        ParamType::Json => as_json(),
        ParamType::Untyped => match untyped {
            Untyped::String => Json::String(value.to_string()),
            Untyped::Json => as_json(),
        },
    }
}

/// An id for a call: `call_` and 24 random letters and digits, as vLLM makes them.
pub(crate) fn call_id() -> String {
    use rand::Rng as _;
    let suffix: String = rand::rng().sample_iter(rand::distr::Alphanumeric).take(24).map(char::from).collect();
    format!("call_{suffix}")
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use serde_json::json;

    use super::*;

    fn weather_tools() -> Vec<Json> {
        vec![json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "hours": {"type": ["array", "null"]},
                "note": {"description": "no type"},
            }},
        }})]
    }

    fn call(name: &str, arguments: Json) -> ToolCall {
        ToolCall { name: name.to_string(), arguments: arguments.to_string() }
    }

    fn parsed(content: &str, calls: Vec<ToolCall>) -> Parsed {
        Parsed { content: content.to_string(), calls }
    }

    #[test]
    fn the_format_comes_from_the_template() {
        assert_eq!(ToolCallFormat::detect("{{- '<tool_call>\\n{\"name\": ' }}"), Some(ToolCallFormat::Hermes));
        assert_eq!(ToolCallFormat::detect("<tool_call>\n<function={{ name }}>"), Some(ToolCallFormat::Qwen3Coder));
        assert_eq!(ToolCallFormat::detect("<tool_call>{{ name }}<arg_key>"), Some(ToolCallFormat::Glm45));
        assert_eq!(ToolCallFormat::detect("{{ messages }}"), None);
    }

    #[test]
    fn hermes_calls_and_the_text_before_them() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        assert_eq!(
            parse(text, ToolCallFormat::Hermes, &[]),
            parsed(
                "Let me check.\n",
                vec![call("get_weather", json!({"city": "Paris", "days": 2})), call("get_time", json!({}))]
            )
        );
    }

    #[test]
    fn hermes_arguments_keep_their_order_and_strings_stay_json() {
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": {\"z\": 1, \"a\": \"é\"}}</tool_call>";
        assert_eq!(parse(text, ToolCallFormat::Hermes, &[]).calls[0].arguments, r#"{"z":1,"a":"é"}"#);
        let text = r#"<tool_call>{"name": "f", "arguments": "{\"a\": 1}"}</tool_call>"#;
        assert_eq!(parse(text, ToolCallFormat::Hermes, &[]).calls[0].arguments, r#"{"a": 1}"#);
        let text = r#"<tool_call>{"name": "f", "arguments": "not json"}</tool_call>"#;
        assert_eq!(parse(text, ToolCallFormat::Hermes, &[]).calls[0].arguments, r#""not json""#);
        let text = r#"<tool_call>{"name": "f"}</tool_call>"#;
        assert_eq!(parse(text, ToolCallFormat::Hermes, &[]).calls[0].arguments, "{}");
    }

    #[test]
    fn malformed_and_unterminated_blocks_stay_content() {
        let good = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        for bad in [
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\n</tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": 3}</tool_call>",
            "<tool_call>[1, 2]</tool_call>",
            "<tool_call></tool_call>",
        ] {
            let text = format!("{good}\n{bad}\n{good}");
            assert_eq!(
                parse(&text, ToolCallFormat::Hermes, &[]),
                parsed(bad, vec![call("f", json!({})), call("f", json!({}))]),
                "{bad}"
            );
        }
        let open = "<tool_call>\n{\"name\": \"f\", \"argu";
        assert_eq!(
            parse(&format!("{good}{open}"), ToolCallFormat::Hermes, &[]),
            parsed(open, vec![call("f", json!({}))])
        );
        assert_eq!(parse("no calls <tool_c", ToolCallFormat::Hermes, &[]), parsed("no calls <tool_c", vec![]));
        assert_eq!(parse("", ToolCallFormat::Hermes, &[]), parsed("", vec![]));
    }

    #[test]
    fn qwen3_coder_values_follow_the_schema() {
        let text = "I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\nTrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n<parameter=note>\n42\n</parameter>\n<parameter=other>\n{\"a\": 1}\n</parameter>\n</function>\n</tool_call>";
        let expected = json!({"city": "New York", "days": 3, "metric": true, "hours": [1, 2], "note": "42", "other": "{\"a\": 1}"});
        assert_eq!(
            parse(text, ToolCallFormat::Qwen3Coder, &weather_tools()),
            parsed("I'll look.\n", vec![call("get_weather", expected)])
        );
        // A value that is not its type stays as written; a string keeps inner line breaks.
        let text = "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=city>\nA\nB\n\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(
            parse(text, ToolCallFormat::Qwen3Coder, &weather_tools()).calls,
            vec![call("get_weather", json!({"days": "three", "city": "A\nB\n"}))]
        );
    }

    #[test]
    fn qwen3_coder_without_closing_tags_and_several_functions() {
        let text = "<tool_call>\n<function=a>\n<parameter=x>\n1\n<parameter=y>\n2\n</function>\n<function=b>\n</function>\n</tool_call>";
        assert_eq!(
            parse(text, ToolCallFormat::Qwen3Coder, &[]),
            parsed("", vec![call("a", json!({"x": "1", "y": "2"})), call("b", json!({}))])
        );
        for bad in ["<tool_call>\n{\"name\": \"a\"}\n</tool_call>", "<tool_call><function=>\n</function></tool_call>"] {
            assert_eq!(parse(bad, ToolCallFormat::Qwen3Coder, &[]), parsed(bad, vec![]), "{bad}");
        }
    }

    #[test]
    fn glm45_values_follow_the_schema() {
        let text = "Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n<arg_key>extra</arg_key><arg_value>[1]</arg_value>\n</tool_call><tool_call>now</tool_call><tool_call>get_weather<arg_key>city</arg_key><arg_value>123</arg_value></tool_call>";
        assert_eq!(
            parse(text, ToolCallFormat::Glm45, &weather_tools()),
            parsed(
                "Checking.",
                vec![
                    call("get_weather", json!({"city": "Paris", "days": 2, "extra": [1]})),
                    call("now", json!({})),
                    call("get_weather", json!({"city": "123"})),
                ]
            )
        );
        for bad in [
            "<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
            "<tool_call>f\n<arg_key>a</arg_key>\n</tool_call>",
            "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</tool_call>",
            "<tool_call>f\nstray text</tool_call>",
        ] {
            assert_eq!(parse(bad, ToolCallFormat::Glm45, &[]), parsed(bad, vec![]), "{bad}");
        }
    }

    /// The stream's content, joined, and its calls.
    fn streamed(format: ToolCallFormat, tools: &[Json], pieces: &[&str]) -> Parsed {
        let mut stream = ToolCallStream::new(format, tools.to_vec());
        let mut out: Vec<Streamed> = pieces.iter().flat_map(|p| stream.push(p)).collect();
        out.extend(stream.finish());
        let mut result = Parsed::default();
        for item in out {
            match item {
                Streamed::Content(text) => {
                    assert!(!text.is_empty());
                    result.content.push_str(&text);
                }
                Streamed::Call(call) => result.calls.push(call),
            }
        }
        assert_eq!(stream.calls(), result.calls.len());
        result
    }

    /// Cuts `text` at random character boundaries.
    fn random_pieces<'a>(text: &'a str, rng: &mut ChaCha8Rng) -> Vec<&'a str> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = rng.random_range(1..=rest.len().min(16));
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            let (piece, tail) = rest.split_at(cut);
            pieces.push(piece);
            rest = tail;
        }
        pieces
    }

    #[test]
    fn a_stream_cut_anywhere_gives_what_the_whole_text_gives() {
        let hermes_call =
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>";
        let cases: Vec<(ToolCallFormat, String)> = vec![
            (ToolCallFormat::Hermes, "Plain answer, < and <tool and </tool_call> but no call.\n".into()),
            (ToolCallFormat::Hermes, format!("Sure — checking.\n\n{hermes_call}\n{hermes_call}\n")),
            (ToolCallFormat::Hermes, format!("{hermes_call}\n\nAfter the call.<tool_c")),
            (ToolCallFormat::Hermes, format!("<tool_call>{{bad}}</tool_call>\n {hermes_call} \n<tool_call>\n{{\"na")),
            (ToolCallFormat::Hermes, format!("\n{hermes_call}\n<tool_call><tool_call>{hermes_call}")),
            (
                ToolCallFormat::Qwen3Coder,
                "Ok\n<tool_call>\n<function=get_weather>\n<parameter=days>\n4\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=x>\n</function>\n</tool_call>".into(),
            ),
            (
                ToolCallFormat::Glm45,
                "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>4</arg_value>\n</tool_call>\n<tool_call>oops".into(),
            ),
        ];
        let tools = weather_tools();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (format, text) in &cases {
            let whole = parse(text, *format, &tools);
            let chars: Vec<&str> = text.char_indices().map(|(i, c)| &text[i..i + c.len_utf8()]).collect();
            assert_eq!(streamed(*format, &tools, &chars), whole, "one character at a time: {text:?}");
            assert_eq!(streamed(*format, &tools, &[text]), whole, "in one piece: {text:?}");
            for _ in 0..50 {
                let pieces = random_pieces(text, &mut rng);
                assert_eq!(streamed(*format, &tools, &pieces), whole, "{pieces:?}");
            }
        }
    }

    #[test]
    fn a_stream_lets_content_out_as_soon_as_it_is_no_tag() {
        let mut stream = ToolCallStream::new(ToolCallFormat::Hermes, vec![]);
        assert_eq!(stream.push("Hello <tool"), vec![Streamed::Content("Hello ".into())]);
        assert_eq!(stream.push("box>"), vec![Streamed::Content("<toolbox>".into())]);
        assert_eq!(stream.push("<tool_call>{\"name\": \"f\"}"), vec![]);
        assert_eq!(stream.push("</tool_call>"), vec![Streamed::Call(call("f", json!({})))]);
        // Whitespace after a call waits: it may only lead to the next call.
        assert_eq!(stream.push("\n"), vec![]);
        assert_eq!(stream.push("Done"), vec![Streamed::Content("\nDone".into())]);
        assert_eq!(stream.finish(), vec![]);
    }

    #[test]
    fn call_ids_are_24_random_alphanumerics() {
        let id = call_id();
        let suffix = id.strip_prefix("call_").unwrap();
        assert_eq!(suffix.len(), 24);
        assert!(suffix.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(call_id(), id);
    }
}
