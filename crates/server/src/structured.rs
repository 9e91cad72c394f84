//! The request fields that constrain the answer's shape, parsed into the engine's
//! [`StructuredOutput`]: OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's
//! `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`) and vLLM's older
//! `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. At most one of them may
//! constrain a request. The engine compiles the constraint; a constraint that does not compile
//! comes back named by [`Structured::param`].

use pio_runtime::structured::StructuredOutput;
use serde_json::{Map, Value as Json};

use crate::error::ApiError;
use crate::protocol::wire::WireRequest;

/// A request's constraint and the field it came in (`response_format.json_schema.schema`,
/// `structured_outputs.regex`, `guided_choice`, ...), which an error about it names.
#[derive(Clone, Debug, PartialEq)]
pub struct Structured {
    pub output: StructuredOutput,
    pub param: &'static str,
}

/// The request's constraint, if a field sets one.
pub(crate) fn structured(wire: &mut WireRequest) -> Result<Option<Structured>, ApiError> {
    let mut found: Vec<Structured> = Vec::new();
    if let Some(s) = response_format(wire.response_format.take())? {
        found.push(s);
    }
    if let Some(s) = structured_outputs(wire.structured_outputs.take())? {
        found.push(s);
    }
    let guided = [
        ("guided_json", Kind::Json, wire.guided_json.take()),
        ("guided_regex", Kind::Regex, wire.guided_regex.take()),
        ("guided_choice", Kind::Choice, wire.guided_choice.take()),
        ("guided_grammar", Kind::Grammar, wire.guided_grammar.take()),
    ];
    for (param, kind, value) in guided {
        if let Some(value) = value.filter(|v| !v.is_null()) {
            found.push(kind.parse(param, value)?);
        }
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|s| s.param).collect();
        // The second one is named at fault; all are listed.
        return Err(ApiError::field(
            found[1].param,
            format!("only one constraint may be given, and the request has {}", names.join(", ")),
        ));
    }
    Ok(found.pop())
}

/// OpenAI's `response_format`: `text` (no constraint), `json_object`, or `json_schema` with its
/// `schema`.
fn response_format(wire: Option<Json>) -> Result<Option<Structured>, ApiError> {
    let format = match wire {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::Object(format)) => format,
        Some(other) => {
            return Err(ApiError::field("response_format", format!("must be an object with a `type`, not {other}")))
        }
    };
    match format.get("type").and_then(Json::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Structured { output: StructuredOutput::JsonObject, param: "response_format" })),
        Some("json_schema") => {
            let Some(Json::Object(spec)) = format.get("json_schema") else {
                return Err(ApiError::field(
                    "response_format.json_schema",
                    "is required with type json_schema: an object with the `name` and `schema`",
                ));
            };
            let param = "response_format.json_schema.schema";
            match spec.get("schema") {
                None | Some(Json::Null) => Err(ApiError::field(param, "is required: the JSON schema of the answer")),
                Some(s) => Kind::Json.parse(param, s.clone()).map(Some),
            }
        }
        Some(other) => Err(ApiError::field(
            "response_format.type",
            format!("must be \"text\", \"json_object\" or \"json_schema\", not {other:?}"),
        )),
        None => {
            Err(ApiError::field("response_format.type", "is required: \"text\", \"json_object\" or \"json_schema\""))
        }
    }
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar`,
/// `json_object`.
fn structured_outputs(wire: Option<Json>) -> Result<Option<Structured>, ApiError> {
    let fields: Map<String, Json> = match wire {
        None | Some(Json::Null) => return Ok(None),
        Some(Json::Object(fields)) => fields,
        Some(other) => return Err(ApiError::field("structured_outputs", format!("must be an object, not {other}"))),
    };
    let mut found = None;
    for (key, value) in fields {
        if value.is_null() {
            continue;
        }
        let this = match key.as_str() {
            "json" => Kind::Json.parse("structured_outputs.json", value)?,
            "regex" => Kind::Regex.parse("structured_outputs.regex", value)?,
            "choice" => Kind::Choice.parse("structured_outputs.choice", value)?,
            "grammar" => Kind::Grammar.parse("structured_outputs.grammar", value)?,
            "json_object" => match value {
                Json::Bool(true) => {
                    Structured { output: StructuredOutput::JsonObject, param: "structured_outputs.json_object" }
                }
                Json::Bool(false) => continue,
                other => {
                    return Err(ApiError::field(
                        "structured_outputs.json_object",
                        format!("must be true or false, not {other}"),
                    ))
                }
            },
            // vLLM's options of its own backends (whitespace, fallbacks): refused rather than
            // ignored, as they would change the answer.
            _ => {
                return Err(ApiError::field(
                    format!("structured_outputs.{key}"),
                    "is not supported: give one of `json`, `regex`, `choice`, `grammar`, `json_object`",
                ))
            }
        };
        if let Some(Structured { param: first, .. }) = found {
            return Err(ApiError::field(
                this.param,
                format!("only one constraint may be given, and `{first}` is set too"),
            ));
        }
        found = Some(this);
    }
    match found {
        Some(s) => Ok(Some(s)),
        None => Err(ApiError::field(
            "structured_outputs",
            "needs one of `json`, `regex`, `choice`, `grammar`, `json_object`",
        )),
    }
}

/// The kinds of constraint vLLM names both in `structured_outputs` and in its `guided_*` fields.
#[derive(Clone, Copy)]
enum Kind {
    Json,
    Regex,
    Choice,
    Grammar,
}

impl Kind {
    /// The constraint `param`'s value gives.
    fn parse(self, param: &'static str, value: Json) -> Result<Structured, ApiError> {
        let output = match self {
            Kind::Json => StructuredOutput::Json(schema(param, value)?),
            Kind::Regex => StructuredOutput::Regex(text(param, value)?),
            Kind::Choice => choice(param, value)?,
            Kind::Grammar => StructuredOutput::Grammar(text(param, value)?),
        };
        Ok(Structured { output, param })
    }
}

/// A JSON schema: an object or a boolean, or (as vLLM takes it) a string holding one.
fn schema(param: &'static str, value: Json) -> Result<Json, ApiError> {
    match value {
        Json::Object(_) | Json::Bool(_) => Ok(value),
        Json::String(s) => match serde_json::from_str::<Json>(&s) {
            Ok(v @ (Json::Object(_) | Json::Bool(_))) => Ok(v),
            Ok(other) => Err(ApiError::field(param, format!("must be a JSON schema (an object), not {other}"))),
            Err(e) => Err(ApiError::field(param, format!("is a string that is not JSON: {e}"))),
        },
        other => Err(ApiError::field(param, format!("must be a JSON schema (an object), not {other}"))),
    }
}

fn text(param: &'static str, value: Json) -> Result<String, ApiError> {
    match value {
        Json::String(s) => Ok(s),
        other => Err(ApiError::field(param, format!("must be a string, not {other}"))),
    }
}

/// A non-empty list of strings.
fn choice(param: &'static str, value: Json) -> Result<StructuredOutput, ApiError> {
    let Json::Array(items) = value else {
        return Err(ApiError::field(param, format!("must be a list of strings, not {value}")));
    };
    if items.is_empty() {
        return Err(ApiError::field(param, "is empty: give at least one choice"));
    }
    let choices = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Json::String(s) => Ok(s),
            other => Err(ApiError::field(format!("{param}[{i}]"), format!("must be a string, not {other}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(StructuredOutput::Choice(choices))
}

#[cfg(test)]
mod tests {
    use crate::parse::{parse_chat_completion, parse_completion};
    use pio_runtime::structured::StructuredOutput;
    use serde_json::json;

    fn chat(extra: &str) -> String {
        format!(r#"{{"messages": [{{"role": "user", "content": "hi"}}]{extra}}}"#)
    }

    fn completion(extra: &str) -> String {
        format!(r#"{{"prompt": "hi"{extra}}}"#)
    }

    #[test]
    fn each_field_gives_its_constraint_and_names_itself() {
        let cases = [
            (r#", "response_format": {"type": "text"}"#, None),
            (
                r#", "response_format": {"type": "json_object"}"#,
                Some((StructuredOutput::JsonObject, "response_format")),
            ),
            (
                r#", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}, "strict": true}}"#,
                Some((StructuredOutput::Json(json!({"type": "integer"})), "response_format.json_schema.schema")),
            ),
            (
                r#", "structured_outputs": {"regex": "a+"}"#,
                Some((StructuredOutput::Regex("a+".into()), "structured_outputs.regex")),
            ),
            (
                r#", "structured_outputs": {"choice": ["a", "b"]}"#,
                Some((StructuredOutput::Choice(vec!["a".into(), "b".into()]), "structured_outputs.choice")),
            ),
            (
                r#", "structured_outputs": {"json": "{\"type\": \"string\"}"}"#,
                Some((StructuredOutput::Json(json!({"type": "string"})), "structured_outputs.json")),
            ),
            (
                r#", "structured_outputs": {"grammar": "start: \"x\""}"#,
                Some((StructuredOutput::Grammar("start: \"x\"".into()), "structured_outputs.grammar")),
            ),
            (
                r#", "structured_outputs": {"json_object": true}"#,
                Some((StructuredOutput::JsonObject, "structured_outputs.json_object")),
            ),
            (r#", "guided_regex": "[0-9]+""#, Some((StructuredOutput::Regex("[0-9]+".into()), "guided_regex"))),
            (r#", "guided_choice": ["x"]"#, Some((StructuredOutput::Choice(vec!["x".into()]), "guided_choice"))),
            (
                r#", "guided_json": {"type": "object"}"#,
                Some((StructuredOutput::Json(json!({"type": "object"})), "guided_json")),
            ),
            (
                r#", "guided_grammar": "start: \"y\"""#,
                Some((StructuredOutput::Grammar("start: \"y\"".into()), "guided_grammar")),
            ),
        ];
        for (extra, expected) in cases {
            let got = parse_chat_completion(chat(extra).as_bytes()).unwrap().params.structured;
            assert_eq!(got.map(|s| (s.output, s.param)), expected, "{extra}");
            let got = parse_completion(completion(extra).as_bytes()).unwrap().params.structured;
            assert_eq!(got.map(|s| (s.output, s.param)), expected, "completions: {extra}");
        }
    }

    #[test]
    fn malformed_constraints_are_refused_by_field() {
        let cases = [
            (r#", "response_format": {"type": "xml"}"#, "response_format.type"),
            (r#", "response_format": {"type": "json_schema"}"#, "response_format.json_schema"),
            (
                r#", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r#", "response_format": {"type": "json_schema", "json_schema": {"schema": 3}}"#,
                "response_format.json_schema.schema",
            ),
            (r#", "structured_outputs": {}"#, "structured_outputs"),
            (r#", "structured_outputs": {"regex": "a", "choice": ["b"]}"#, "structured_outputs.choice"),
            (r#", "structured_outputs": {"whitespace_pattern": " "}"#, "structured_outputs.whitespace_pattern"),
            (r#", "structured_outputs": {"choice": []}"#, "structured_outputs.choice"),
            (r#", "guided_choice": ["a", 1]"#, "guided_choice[1]"),
            (r#", "guided_regex": 5"#, "guided_regex"),
            (r#", "guided_json": "{not json"#, "guided_json"),
            (r#", "guided_regex": "a", "response_format": {"type": "json_object"}"#, "guided_regex"),
        ];
        for (extra, param) in cases {
            let err = parse_chat_completion(chat(extra).as_bytes()).unwrap_err();
            assert_eq!(err.param().as_deref(), Some(param), "{extra}: {err}");
            assert_eq!(err.status(), 400, "{extra}");
        }
    }
}
