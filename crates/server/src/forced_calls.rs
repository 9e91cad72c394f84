//! `tool_choice: "required"` and a named function, as vLLM does them: the answer is constrained
//! to JSON (the engine's structured output), and the calls are read from that JSON, not from the
//! model's own tool-call format. So they work the same for every model, whatever its template
//! writes calls in; the prompt still shows the tools as for `"auto"`.
//!
//! - A named function: the answer is its arguments, JSON valid against its `parameters` schema
//!   (any JSON object when it has none), and is returned as the one call's `arguments`.
//! - `required`: the answer is a list of one call or more, `[{"name": ..., "parameters": {...}}]`,
//!   each element valid against one tool's name and schema (vLLM's
//!   `_get_json_schema_from_tool`), and each element is a call.
//!
//! An answer that is not that JSON (cut by `max_tokens` or a stop string) has no calls: it is
//! returned as content, so that no client gets arguments that do not parse.

use pio_runtime::generate::FinishReason;
use pio_runtime::structured::StructuredOutput;
use serde_json::{json, Map, Value as Json};

use crate::completion::finish_reason;
use crate::error::ApiError;
use crate::protocol::request::ToolChoice;
use crate::tool_calls::ToolCall;

/// Which calls the answer is forced to make.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Forced {
    /// One call of this function; the answer is its arguments.
    Named(String),
    /// One call or more of any of the tools; the answer is the list of calls.
    Required,
}

/// A forced call: what is forced, the constraint that forces it, and the request field an error
/// about the constraint (a schema the engine cannot compile) names.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ForcedCall {
    pub forced: Forced,
    pub output: StructuredOutput,
    pub param: String,
}

impl ForcedCall {
    /// The forced call of a request's `tool_choice`, None when it forces none. The request's
    /// parse has checked that a named function is one of `tools` and that `required` has tools.
    /// `parallel` (`parallel_tool_calls`): false lets `required` make one call only.
    pub fn of(tools: &[Json], choice: &ToolChoice, parallel: bool) -> Result<Option<Self>, ApiError> {
        match choice {
            ToolChoice::Auto | ToolChoice::None => Ok(None),
            ToolChoice::Function(name) => {
                let Some((i, function)) = functions(tools).find(|(_, f)| f.get("name") == Some(&json!(name))) else {
                    return Err(ApiError::field(
                        "tool_choice.function.name",
                        format!("{name:?} is not the name of one of the request's `tools`"),
                    ));
                };
                // No schema, or an empty one: the function takes any object (OpenAI's arguments
                // are an object), which a bare `{}` schema would not say.
                let output = match function.get("parameters") {
                    Some(Json::Object(schema)) if !schema.is_empty() => {
                        StructuredOutput::Json(Json::Object(schema.clone()))
                    }
                    _ => StructuredOutput::JsonObject,
                };
                let forced = Forced::Named(name.clone());
                Ok(Some(ForcedCall { forced, output, param: format!("tools[{i}].function.parameters") }))
            }
            ToolChoice::Required => Ok(Some(ForcedCall {
                forced: Forced::Required,
                output: StructuredOutput::Json(required_schema(tools, parallel)?),
                param: "tools".into(),
            })),
        }
    }

    /// The calls of a whole answer, None when it is not the complete JSON the constraint asks for.
    pub fn calls(&self, text: &str) -> Option<Vec<ToolCall>> {
        let value: Json = serde_json::from_str(text).ok()?;
        match &self.forced {
            // The arguments as the model wrote them (the constraint made them valid JSON).
            Forced::Named(name) => {
                value.is_object().then(|| vec![ToolCall { name: name.clone(), arguments: text.trim().to_string() }])
            }
            Forced::Required => {
                let Json::Array(items) = value else { return None };
                let calls = items
                    .into_iter()
                    .map(|item| {
                        let Json::Object(mut item) = item else { return None };
                        let Some(Json::String(name)) = item.remove("name") else { return None };
                        let parameters = item.remove("parameters").filter(Json::is_object)?;
                        Some(ToolCall { name, arguments: parameters.to_string() })
                    })
                    .collect::<Option<Vec<_>>>()?;
                (!calls.is_empty()).then_some(calls)
            }
        }
    }

    /// A whole answer as the response gives it: its calls and no content, or, when it is not the
    /// complete JSON (cut short), its text as the content and no call; and its finish reason.
    pub fn answer(&self, text: String, reason: FinishReason) -> (Option<String>, Vec<ToolCall>, &'static str) {
        let (content, calls) = match self.calls(&text) {
            Some(calls) => (None, calls),
            None => (Some(text), vec![]),
        };
        let reason = self.finish_reason(reason, !calls.is_empty());
        (content, calls, reason)
    }

    /// The finish reason of an answer that ended on its own: `tool_calls` for `required`, `stop`
    /// for a named function (OpenAI answers a named `tool_choice` with `stop`; vLLM does both so).
    /// An answer cut short says `length`, as any other.
    pub fn finish_reason(&self, reason: FinishReason, called: bool) -> &'static str {
        match (&self.forced, reason) {
            (Forced::Required, FinishReason::Stop) if called => "tool_calls",
            (_, reason) => finish_reason(reason),
        }
    }
}

/// The request's functions (`tools[i].function`), with their index.
fn functions(tools: &[Json]) -> impl Iterator<Item = (usize, &Map<String, Json>)> {
    tools.iter().enumerate().filter_map(|(i, tool)| tool.get("function").and_then(Json::as_object).map(|f| (i, f)))
}

/// `required`'s schema: a list of one call or more, each `{"name": NAME, "parameters": ARGS}` of
/// one tool (vLLM's shape, with each tool's name tied to its own schema by `anyOf`). The tools'
/// `$defs` move to the top, where their `#/$defs/...` references point once the schemas are
/// nested; two tools defining one name differently cannot share it (vLLM refuses them too).
/// Without `parallel`, the list holds one call.
fn required_schema(tools: &[Json], parallel: bool) -> Result<Json, ApiError> {
    let mut defs = Map::new();
    let mut alternatives = Vec::new();
    for (i, function) in functions(tools) {
        let mut parameters = match function.get("parameters") {
            Some(Json::Object(schema)) if !schema.is_empty() => schema.clone(),
            _ => Map::from_iter([("type".to_string(), json!("object"))]),
        };
        if let Some(Json::Object(own)) = parameters.remove("$defs") {
            for (key, schema) in own {
                match defs.get(&key) {
                    Some(other) if *other != schema => {
                        return Err(ApiError::field(
                            format!("tools[{i}].function.parameters.$defs.{key}"),
                            "is defined differently by another tool, and tool_choice \"required\" puts every \
                             tool's $defs in one schema",
                        ))
                    }
                    _ => {
                        defs.insert(key, schema);
                    }
                }
            }
        }
        alternatives.push(json!({
            "type": "object",
            "properties": {"name": {"const": function.get("name")}, "parameters": parameters},
            "required": ["name", "parameters"],
            "additionalProperties": false,
        }));
    }
    let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": alternatives}});
    if !parallel {
        schema["maxItems"] = json!(1);
    }
    if !defs.is_empty() {
        schema["$defs"] = Json::Object(defs);
    }
    Ok(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, parameters: Json) -> Json {
        json!({"type": "function", "function": {"name": name, "parameters": parameters}})
    }

    #[test]
    fn a_named_function_is_constrained_to_its_schema_and_its_answer_is_the_arguments() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let tools = [tool("a", json!({})), tool("b", schema.clone())];
        let forced = ForcedCall::of(&tools, &ToolChoice::Function("b".into()), true).unwrap().unwrap();
        assert_eq!(
            (&forced.output, forced.param.as_str()),
            (&StructuredOutput::Json(schema), "tools[1].function.parameters")
        );
        let empty = ForcedCall::of(&tools, &ToolChoice::Function("a".into()), true).unwrap().unwrap();
        assert_eq!(empty.output, StructuredOutput::JsonObject);
        let calls = forced.calls(r#"{"city": "Paris"}"#).unwrap();
        assert_eq!(calls, vec![ToolCall { name: "b".into(), arguments: r#"{"city": "Paris"}"#.into() }]);
        assert_eq!(forced.finish_reason(FinishReason::Stop, true), "stop");
        // Cut short: no call, and `length`.
        assert_eq!(forced.calls(r#"{"city": "Par"#), None);
        assert_eq!(forced.finish_reason(FinishReason::Length, false), "length");
        assert_eq!(ForcedCall::of(&tools, &ToolChoice::Auto, true).unwrap(), None);
        let missing = ForcedCall::of(&tools, &ToolChoice::Function("c".into()), true).unwrap_err();
        assert_eq!(missing.param().as_deref(), Some("tool_choice.function.name"));
    }

    #[test]
    fn required_is_a_list_of_calls_of_any_tool_with_their_defs_at_the_top() {
        let with_defs = json!({"type": "object", "properties": {"u": {"$ref": "#/$defs/Unit"}},
            "$defs": {"Unit": {"enum": ["c", "f"]}}});
        let tools = [tool("a", with_defs), json!({"type": "function", "function": {"name": "b"}})];
        let forced = ForcedCall::of(&tools, &ToolChoice::Required, true).unwrap().unwrap();
        let StructuredOutput::Json(schema) = &forced.output else { panic!("{forced:?}") };
        assert_eq!((&schema["minItems"], schema.get("maxItems")), (&json!(1), None));
        assert_eq!(schema["$defs"], json!({"Unit": {"enum": ["c", "f"]}}));
        // parallel_tool_calls: false: one call.
        let one = ForcedCall::of(&tools, &ToolChoice::Required, false).unwrap().unwrap();
        let StructuredOutput::Json(one) = &one.output else { panic!("{one:?}") };
        assert_eq!((&one["minItems"], &one["maxItems"]), (&json!(1), &json!(1)));
        let alternatives = schema["items"]["anyOf"].as_array().unwrap();
        assert_eq!(alternatives[0]["properties"]["name"], json!({"const": "a"}));
        assert!(alternatives[0]["properties"]["parameters"].get("$defs").is_none());
        assert_eq!(alternatives[1]["properties"]["parameters"], json!({"type": "object"}));

        let calls = forced.calls(r#"[{"name": "a", "parameters": {"u": "c"}}, {"name": "b", "parameters": {}}]"#);
        let expected = vec![
            ToolCall { name: "a".into(), arguments: r#"{"u":"c"}"#.into() },
            ToolCall { name: "b".into(), arguments: "{}".into() },
        ];
        assert_eq!(calls, Some(expected));
        assert_eq!(forced.finish_reason(FinishReason::Stop, true), "tool_calls");
        for not_calls in ["[]", r#"[{"name": "a"}]"#, r#"[{"name": "a", "parameters": {}}"#, "{}"] {
            assert_eq!(forced.calls(not_calls), None, "{not_calls}");
        }

        let clash = [tool("a", json!({"$defs": {"X": {"type": "string"}}})), tool("b", json!({"$defs": {"X": {}}}))];
        let err = ForcedCall::of(&clash, &ToolChoice::Required, true).unwrap_err();
        assert_eq!(err.param().as_deref(), Some("tools[1].function.parameters.$defs.X"));
    }
}
