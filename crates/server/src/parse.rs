//! Request bodies to typed requests: bytes in, a [`ChatCompletionRequest`] or
//! [`CompletionRequest`] out, or the 4xx [`ApiError`] naming what is wrong. Nothing here needs
//! the model (the served name, the context and the sampling defaults are checked by
//! [`crate::convert`]), so these functions are what a fuzzer drives: the `openai_request` target
//! of `fuzz/`, which CI runs bounded in `tests/fuzz_inputs.rs`.

use std::collections::BTreeMap;

use pio_runtime::chat_template::RESERVED_KWARGS;
use pio_runtime::engine::MAX_TOP_LOGPROBS;
use pio_runtime::sampling::{SamplingError, SamplingParams};
use serde_json::{Map, Value as Json};

use crate::error::ApiError;
use crate::protocol::request::{
    ChatCompletionRequest, ChatMessage, CompletionPrompt, CompletionRequest, ContentPart, GenerationParams,
    MessageContent, PromptTruncation, Role, SamplingOverrides, StreamSettings, TemplateArgs, ToolChoice,
};
use crate::protocol::wire::{WireContent, WireLogprobs, WireMessage, WireRequest};

/// The most choices (`n`) one request may ask for. vLLM sets none; each choice is a sequence of
/// its own (a KV slot, a place in the queue), so one request could otherwise fill the queue.
pub const MAX_CHOICES: usize = 16;

/// Which endpoint a body was sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// A `/v1/chat/completions` body, checked.
pub fn parse_chat_completion(body: &[u8]) -> Result<ChatCompletionRequest, ApiError> {
    let mut wire = wire_request(body)?;
    refuse_fields_of_the_other_endpoint(&wire, Endpoint::ChatCompletions)?;
    let params = generation_params(&mut wire, Endpoint::ChatCompletions)?;
    let messages = match wire.messages.take() {
        None => return Err(ApiError::field("messages", "is required: a list of messages")),
        Some(m) if m.is_empty() => return Err(ApiError::field("messages", "is empty")),
        Some(m) => m.into_iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<Vec<_>, _>>()?,
    };
    let add_generation_prompt = wire.add_generation_prompt.unwrap_or(true);
    let continue_final_message = wire.continue_final_message.unwrap_or(false);
    if continue_final_message && add_generation_prompt {
        // vLLM's rule: the two ask for opposite prompts.
        return Err(ApiError::field(
            "continue_final_message",
            "cannot be true with `add_generation_prompt: true` (its default): send `add_generation_prompt: false`",
        ));
    }
    let mut extra = wire.chat_template_kwargs.take().unwrap_or_default();
    if let Some(k) = extra.keys().find(|k| RESERVED_KWARGS.contains(&k.as_str())) {
        return Err(ApiError::field(
            format!("chat_template_kwargs.{k}"),
            "is set by the server from the request, not a template kwarg",
        ));
    }
    let kwargs_thinking = match extra.remove("enable_thinking") {
        None | Some(Json::Null) => None,
        Some(Json::Bool(b)) => Some(b),
        Some(other) => {
            return Err(ApiError::field(
                "chat_template_kwargs.enable_thinking",
                format!("must be true or false, not {other}"),
            ))
        }
    };
    let template = TemplateArgs {
        add_generation_prompt,
        continue_final_message,
        documents: documents(wire.documents.take())?,
        enable_thinking: wire.enable_thinking.or(kwargs_thinking),
        extra,
    };
    let tools = tools(wire.tools.take())?;
    let tool_choice = tool_choice(wire.tool_choice.take())?;
    check_forced_call(&tools, &tool_choice, params.structured.as_ref())?;
    let parallel_tool_calls = wire.parallel_tool_calls.unwrap_or(true);
    Ok(ChatCompletionRequest { messages, tools, tool_choice, parallel_tool_calls, template, params })
}

/// A `/v1/completions` body, checked.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let mut wire = wire_request(body)?;
    refuse_fields_of_the_other_endpoint(&wire, Endpoint::Completions)?;
    let params = generation_params(&mut wire, Endpoint::Completions)?;
    if let Some(n) = wire.best_of.filter(|&n| n != 1) {
        return Err(ApiError::field("best_of", format!("only 1 is supported, not {n}")));
    }
    match &wire.suffix {
        None | Some(Json::Null) => {}
        Some(Json::String(s)) if s.is_empty() => {}
        Some(_) => return Err(ApiError::field("suffix", "is not supported")),
    }
    let prompts = completion_prompts(wire.prompt.take())?;
    Ok(CompletionRequest { prompts, params })
}

/// The body as JSON, with the path of a value of the wrong type; fields neither endpoint knows
/// are logged and skipped.
fn wire_request(body: &[u8]) -> Result<WireRequest, ApiError> {
    let text = std::str::from_utf8(body).map_err(|source| ApiError::NotUtf8 { source })?;
    let mut json = serde_json::Deserializer::from_str(text);
    let mut ignored = Vec::new();
    let parsed = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(&mut json, &mut |path| {
        ignored.push(path.to_string())
    }));
    let wire: WireRequest = parsed.map_err(|e| {
        let path = e.path().to_string();
        // "." is the body itself, "?" a position serde cannot name (a malformed key), and a
        // path from a list at the top is no field either.
        let named = !matches!(path.as_str(), "" | "." | "?") && !path.starts_with('[');
        // A known key given twice is refused by the request object itself, whose path is "."; the
        // key is the field at fault.
        let path = if named { Some(path) } else { duplicate_field(e.inner()) };
        ApiError::Json { path, source: e.into_inner() }
    })?;
    json.end().map_err(|source| ApiError::Json { path: None, source })?;
    if !ignored.is_empty() {
        tracing::warn!("ignoring unknown request fields: {}", ignored.join(", "));
    }
    Ok(wire)
}

/// The field of serde's "duplicate field `name`" error (`serde::de::Error::duplicate_field`, which
/// gives no structured kind), None for any other error. The key serde refused, not the first key
/// the body repeats: a repeated unknown key (`""` included) is skipped like any unknown key, so
/// only the known one is at fault (found by the `openai_request` fuzz target).
fn duplicate_field(e: &serde_json::Error) -> Option<String> {
    let message = e.to_string();
    let rest = message.strip_prefix("duplicate field `")?;
    let name = &rest[..rest.find('`')?];
    (!name.is_empty()).then(|| name.to_string())
}

/// A chat body with completion fields, or the other way round, is refused by name (answering
/// without them would ignore what the client asked for).
fn refuse_fields_of_the_other_endpoint(wire: &WireRequest, endpoint: Endpoint) -> Result<(), ApiError> {
    let foreign: &[(&str, bool)] = match endpoint {
        Endpoint::ChatCompletions => &[
            ("prompt", wire.prompt.is_some()),
            ("echo", wire.echo.is_some()),
            ("best_of", wire.best_of.is_some()),
            ("suffix", wire.suffix.is_some()),
        ],
        Endpoint::Completions => &[
            ("messages", wire.messages.is_some()),
            ("max_completion_tokens", wire.max_completion_tokens.is_some()),
            ("top_logprobs", wire.top_logprobs.is_some()),
            ("chat_template_kwargs", wire.chat_template_kwargs.is_some()),
            ("enable_thinking", wire.enable_thinking.is_some()),
            ("add_generation_prompt", wire.add_generation_prompt.is_some()),
            ("continue_final_message", wire.continue_final_message.is_some()),
            ("documents", wire.documents.is_some()),
            ("tools", wire.tools.is_some()),
            ("tool_choice", wire.tool_choice.is_some()),
        ],
    };
    let other = match endpoint {
        Endpoint::ChatCompletions => Endpoint::Completions,
        Endpoint::Completions => Endpoint::ChatCompletions,
    };
    match foreign.iter().find(|(_, present)| *present) {
        Some((field, _)) => {
            Err(ApiError::field(*field, format!("is a field of {}, not of {}", other.path(), endpoint.path())))
        }
        None => Ok(()),
    }
}

/// What both endpoints ask of a generation, checked.
fn generation_params(wire: &mut WireRequest, endpoint: Endpoint) -> Result<GenerationParams, ApiError> {
    refuse_unsupported(wire)?;
    let n = match wire.n {
        None => 1,
        Some(n) if n < 1 => return Err(ApiError::field("n", format!("must be at least 1, not {n}"))),
        Some(n) => match usize::try_from(n) {
            Ok(n) if n <= MAX_CHOICES => n,
            _ => {
                return Err(ApiError::field("n", format!("{n} is over the limit of {MAX_CHOICES} choices per request")))
            }
        },
    };
    let (max_tokens_field, max_tokens) = match (wire.max_completion_tokens, wire.max_tokens) {
        (Some(n), _) => ("max_completion_tokens", Some(n)),
        (None, n) => ("max_tokens", n),
    };
    let echo = endpoint == Endpoint::Completions && wire.echo == Some(true);
    let max_tokens = match max_tokens {
        None => None,
        // vLLM's echo without generation: the prompt alone.
        Some(0) if echo => Some(0),
        Some(n) if n < 1 => {
            let hint = if endpoint == Endpoint::Completions { " (0 only with `echo: true`)" } else { "" };
            return Err(ApiError::field(max_tokens_field, format!("must be at least 1, not {n}{hint}")));
        }
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    let top_k = match wire.top_k {
        None => None,
        // vLLM's "off" values.
        Some(-1 | 0) => Some(0),
        Some(k) if k < 0 => {
            return Err(ApiError::field("top_k", format!("must be -1 or 0 (off) or positive, not {k}")))
        }
        Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
    };
    let sampling = SamplingOverrides {
        temperature: wire.temperature,
        top_p: wire.top_p,
        top_k,
        min_p: wire.min_p,
        presence_penalty: wire.presence_penalty,
        frequency_penalty: wire.frequency_penalty,
        repetition_penalty: wire.repetition_penalty,
        // OpenAI's seed is any 64-bit integer; negative ones are taken modulo 2^64.
        seed: wire.seed.map(|s| s as u64),
        logit_bias: logit_bias(wire.logit_bias.take())?,
    };
    // Out-of-range values are refused whatever the model's defaults are.
    sampling.apply(SamplingParams::default()).validate().map_err(|e| {
        let SamplingError::InvalidParam { field, .. } = &e;
        ApiError::field(*field, e.to_string())
    })?;
    let stop = match wire.stop.take() {
        None | Some(Json::Null) => vec![],
        Some(Json::String(s)) => vec![s],
        Some(Json::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, s)| match s {
                Json::String(s) => Ok(s),
                other => Err(ApiError::field(format!("stop[{i}]"), format!("must be a string, not {other}"))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::field("stop", format!("must be a string or a list of strings, not {other}")))
        }
    };
    let stream = match (wire.stream.unwrap_or(false), &wire.stream_options) {
        (false, Some(_)) => return Err(ApiError::field("stream_options", "is only allowed with `stream: true`")),
        (false, None) => None,
        (true, options) => {
            let include_usage = options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
            let continuous_usage = options.as_ref().and_then(|o| o.continuous_usage_stats).unwrap_or(false);
            if continuous_usage && !include_usage {
                return Err(ApiError::field(
                    "stream_options.continuous_usage_stats",
                    "needs `include_usage: true` (as vLLM reads it)",
                ));
            }
            Some(StreamSettings { include_usage, continuous_usage })
        }
    };
    let top = |field: &'static str, n: i64| match usize::try_from(n) {
        Ok(n) if n <= MAX_TOP_LOGPROBS => Ok(n),
        _ => Err(ApiError::field(field, format!("must be between 0 and {MAX_TOP_LOGPROBS}, not {n}"))),
    };
    let logprobs = match (endpoint, wire.logprobs, wire.top_logprobs) {
        (Endpoint::ChatCompletions, Some(WireLogprobs::Flag(true)), n) => Some(top("top_logprobs", n.unwrap_or(0))?),
        (Endpoint::ChatCompletions, Some(WireLogprobs::Flag(false)) | None, Some(_)) => {
            return Err(ApiError::field("top_logprobs", "needs `logprobs: true`"))
        }
        (Endpoint::ChatCompletions, Some(WireLogprobs::Count(n)), _) => {
            return Err(ApiError::field(
                "logprobs",
                format!("is true or false in chat (`top_logprobs` sets the alternatives), not {n}"),
            ))
        }
        (Endpoint::Completions, Some(WireLogprobs::Count(n)), _) => Some(top("logprobs", n)?),
        (Endpoint::Completions, Some(WireLogprobs::Flag(true)), _) => {
            return Err(ApiError::field("logprobs", "is the number of alternatives per token in completions, not true"))
        }
        (_, Some(WireLogprobs::Flag(false)) | None, _) => None,
    };
    let prompt_logprobs = match wire.prompt_logprobs {
        None => None,
        Some(-1) => {
            return Err(ApiError::field(
                "prompt_logprobs",
                format!("-1 (the whole vocabulary) is over the limit of {MAX_TOP_LOGPROBS} alternatives"),
            ))
        }
        Some(n) => Some(top("prompt_logprobs", n)?),
    };
    let prompt_logprobs = match (prompt_logprobs, stream) {
        // vLLM's rule too: they would all come in the first chunk, after the whole prefill. It
        // takes 0 while streaming and returns none.
        (Some(0), Some(_)) => None,
        (Some(_), Some(_)) => {
            return Err(ApiError::field("prompt_logprobs", "is not available with `stream: true` (only 0 is)"))
        }
        (scored, _) => scored,
    };
    Ok(GenerationParams {
        model: wire.model.take(),
        min_tokens: wire.min_tokens.unwrap_or(0),
        include_stop_str_in_output: wire.include_stop_str_in_output.unwrap_or(false),
        max_tokens,
        max_tokens_field,
        sampling,
        stop,
        stop_token_ids: wire.stop_token_ids.take().unwrap_or_default(),
        allowed_token_ids: wire.allowed_token_ids.take(),
        cache_salt: match wire.cache_salt.take() {
            Some(salt) if salt.is_empty() => {
                return Err(ApiError::field("cache_salt", "is empty: a salt is a non-empty string"))
            }
            salt => salt,
        },
        bad_words: wire.bad_words.take().unwrap_or_default(),
        truncate_prompt_tokens: match wire.truncate_prompt_tokens {
            None => None,
            Some(-1) => Some(PromptTruncation::ToContext),
            Some(n) if n >= 1 => Some(PromptTruncation::Last(usize::try_from(n).unwrap_or(usize::MAX))),
            Some(n) => {
                return Err(ApiError::field("truncate_prompt_tokens", format!("must be -1 or at least 1, not {n}")))
            }
        },
        stream,
        logprobs,
        prompt_logprobs,
        echo,
        ignore_eos: wire.ignore_eos.unwrap_or(false),
        skip_special_tokens: wire.skip_special_tokens.unwrap_or(true),
        return_token_ids: wire.return_token_ids.unwrap_or(false),
        return_tokens_as_token_ids: wire.return_tokens_as_token_ids.unwrap_or(false),
        n,
        structured: crate::structured::structured(wire)?,
    })
}

/// OpenAI's `logit_bias`: a map from token ids, as strings, to a bias (the range is the sampler's
/// check, the ids the engine's).
fn logit_bias(wire: Option<Map<String, Json>>) -> Result<BTreeMap<u32, f32>, ApiError> {
    wire.unwrap_or_default()
        .into_iter()
        .map(|(key, value)| {
            let id = key.trim().parse::<u32>().map_err(|_| {
                ApiError::field("logit_bias", format!("keys are token ids (whole numbers as strings), not {key:?}"))
            })?;
            match value.as_f64() {
                Some(bias) => Ok((id, bias as f32)),
                None => {
                    Err(ApiError::field("logit_bias", format!("the bias of token {id} must be a number, not {value}")))
                }
            }
        })
        .collect()
}

/// Fields the server knows and cannot honour, unless they are set to what they do by default.
fn refuse_unsupported(wire: &WireRequest) -> Result<(), ApiError> {
    let absent = |v: &Option<Json>| match v {
        None | Some(Json::Null) => true,
        Some(Json::Array(a)) => a.is_empty(),
        _ => false,
    };
    // OpenAI's deprecated function calling; `tools` and `tool_choice` say the same.
    if !absent(&wire.functions) {
        return Err(ApiError::field("functions", "is not supported: use `tools`"));
    }
    match &wire.function_call {
        None | Some(Json::Null) => {}
        Some(Json::String(s)) if s == "none" => {}
        Some(_) => return Err(ApiError::field("function_call", "is not supported: use `tool_choice`")),
    }
    Ok(())
}

/// `tools`: a list of `{"type": "function", "function": {"name", "description", "parameters"}}`,
/// kept as sent (the chat template reads them as transformers passes them); an empty list is no
/// tools.
fn tools(wire: Option<Json>) -> Result<Vec<Json>, ApiError> {
    let tools = match wire {
        None | Some(Json::Null) => return Ok(vec![]),
        Some(Json::Array(tools)) => tools,
        Some(other) => return Err(ApiError::field("tools", format!("must be a list of tools, not {other}"))),
    };
    for (i, tool) in tools.iter().enumerate() {
        let at = |field: &str| format!("tools[{i}]{field}");
        let Json::Object(tool) = tool else {
            return Err(ApiError::field(at(""), format!("must be an object, not {tool}")));
        };
        match tool.get("type") {
            Some(Json::String(t)) if t == "function" => {}
            None => return Err(ApiError::field(at(".type"), "is required: \"function\"")),
            Some(other) => return Err(ApiError::field(at(".type"), format!("must be \"function\", not {other}"))),
        }
        let Some(Json::Object(function)) = tool.get("function") else {
            return Err(ApiError::field(at(".function"), "is required: an object with the function's name"));
        };
        match function.get("name") {
            Some(Json::String(name)) if !name.trim().is_empty() => {}
            None | Some(Json::Null) => return Err(ApiError::field(at(".function.name"), "is required")),
            Some(other) => {
                return Err(ApiError::field(at(".function.name"), format!("must be a non-empty string, not {other}")))
            }
        }
        match function.get("description") {
            None | Some(Json::Null | Json::String(_)) => {}
            Some(other) => {
                return Err(ApiError::field(at(".function.description"), format!("must be a string, not {other}")))
            }
        }
        match function.get("parameters") {
            None | Some(Json::Null | Json::Object(_)) => {}
            Some(other) => {
                return Err(ApiError::field(
                    at(".function.parameters"),
                    format!("must be a JSON schema object, not {other}"),
                ))
            }
        }
    }
    Ok(tools)
}

/// vLLM's `documents`: a list of objects (each a document's fields, such as `title` and `text`),
/// passed to the chat template as they came.
fn documents(wire: Option<Json>) -> Result<Option<Vec<Json>>, ApiError> {
    match wire {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Array(documents)) => {
            if let Some(i) = documents.iter().position(|d| !d.is_object()) {
                return Err(ApiError::field(format!("documents[{i}]"), "must be an object (a document's fields)"));
            }
            Ok(Some(documents))
        }
        Some(other) => Err(ApiError::field("documents", format!("must be a list of objects, not {other}"))),
    }
}

/// `tool_choice`: `"auto"` (the default), `"none"`, `"required"`, or a named function
/// (`{"type": "function", "function": {"name": ...}}`).
fn tool_choice(wire: Option<Json>) -> Result<ToolChoice, ApiError> {
    let choice = match wire {
        None | Some(Json::Null) => return Ok(ToolChoice::Auto),
        Some(Json::String(s)) => s,
        Some(Json::Object(choice)) => return named_tool_choice(&choice),
        Some(other) => {
            return Err(ApiError::field(
                "tool_choice",
                format!("must be \"auto\", \"none\", \"required\" or a function, not {other}"),
            ))
        }
    };
    match choice.as_str() {
        "auto" => Ok(ToolChoice::Auto),
        "none" => Ok(ToolChoice::None),
        "required" => Ok(ToolChoice::Required),
        other => Err(ApiError::field(
            "tool_choice",
            format!("must be \"auto\", \"none\", \"required\" or a function, not {other:?}"),
        )),
    }
}

/// OpenAI's named function: `{"type": "function", "function": {"name": "f"}}`.
fn named_tool_choice(choice: &Map<String, Json>) -> Result<ToolChoice, ApiError> {
    match choice.get("type") {
        Some(Json::String(t)) if t == "function" => {}
        None => return Err(ApiError::field("tool_choice.type", "is required: \"function\"")),
        // OpenAI's `allowed_tools` and `custom` would need more than one function's schema or
        // free text: refused rather than read as something else.
        Some(other) => return Err(ApiError::field("tool_choice.type", format!("must be \"function\", not {other}"))),
    }
    match choice.get("function").and_then(|f| f.get("name")) {
        Some(Json::String(name)) => Ok(ToolChoice::Function(name.clone())),
        None | Some(Json::Null) => Err(ApiError::field("tool_choice.function.name", "is required")),
        Some(other) => Err(ApiError::field("tool_choice.function.name", format!("must be a string, not {other}"))),
    }
}

/// A forced call (`required`, a named function) needs a tool to call, and takes the answer's
/// constraint for itself, so no other constraint may be given (vLLM refuses them together too).
fn check_forced_call(
    tools: &[Json],
    choice: &ToolChoice,
    structured: Option<&crate::structured::Structured>,
) -> Result<(), ApiError> {
    match choice {
        ToolChoice::Auto | ToolChoice::None => return Ok(()),
        ToolChoice::Required if tools.is_empty() => {
            return Err(ApiError::field("tool_choice", "\"required\" needs `tools` to call, and the request has none"))
        }
        ToolChoice::Required => {}
        ToolChoice::Function(name) => {
            let named = |tool: &Json| tool.pointer("/function/name").and_then(Json::as_str) == Some(name.as_str());
            if !tools.iter().any(named) {
                return Err(ApiError::field(
                    "tool_choice.function.name",
                    format!("{name:?} is not the name of one of the request's `tools`"),
                ));
            }
        }
    }
    match structured {
        Some(s) => Err(ApiError::field(
            "tool_choice",
            format!(
                "forces a tool call, whose arguments are the constrained answer, so `{}` cannot be given too",
                s.param
            ),
        )),
        None => Ok(()),
    }
}

fn message(i: usize, m: WireMessage) -> Result<ChatMessage, ApiError> {
    let content = match m.content {
        None => None,
        Some(WireContent::Text(t)) => Some(MessageContent::Text(t)),
        Some(WireContent::Parts(parts)) => Some(MessageContent::Parts(
            parts
                .into_iter()
                .enumerate()
                .map(|(j, p)| {
                    let at = |field: &str| format!("messages[{i}].content[{j}]{field}");
                    match p.kind.as_str() {
                        "text" => {
                            p.text.map(ContentPart::Text).ok_or_else(|| ApiError::field(at(".text"), "is required"))
                        }
                        "image_url" => p
                            .image_url
                            .map(|u| ContentPart::ImageUrl { url: u.url, detail: u.detail })
                            .ok_or_else(|| ApiError::field(at(".image_url"), "is required")),
                        other => Err(ApiError::field(
                            at(".type"),
                            format!(
                                "content part type `{other}` is not supported (`text`; `image_url` for vision models)"
                            ),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
        )),
    };
    let needs_content = match m.role {
        Role::Assistant => m.tool_calls.is_none(),
        _ => true,
    };
    if content.is_none() && needs_content {
        return Err(ApiError::field(format!("messages[{i}].content"), "is required"));
    }
    Ok(ChatMessage {
        role: m.role,
        content,
        name: m.name,
        tool_calls: m.tool_calls,
        tool_call_id: m.tool_call_id,
        reasoning_content: m.reasoning_content,
    })
}

/// `prompt`: a string, token ids, or a list of either (several prompts in one request, as
/// OpenAI's batch form: each answered as a request of its own). A list mixing strings and id
/// lists, or holding an empty prompt, is refused naming the element.
fn completion_prompts(prompt: Option<Json>) -> Result<Vec<CompletionPrompt>, ApiError> {
    let ids = |items: &[Json], field: &str| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| ApiError::field(field, "token ids must be integers from 0 to 4294967295"))
    };
    match prompt {
        None | Some(Json::Null) => Err(ApiError::field("prompt", "is required: a string or a list of token ids")),
        Some(Json::String(s)) => Ok(vec![CompletionPrompt::Text(s)]),
        Some(Json::Array(items)) => match items.first() {
            None => Err(ApiError::field("prompt", "is empty")),
            Some(Json::String(_) | Json::Array(_)) => {
                let texts = items[0].is_string();
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let field = format!("prompt[{i}]");
                        let prompt = match item {
                            Json::String(s) if texts => CompletionPrompt::Text(s.clone()),
                            Json::Array(inner) if !texts => CompletionPrompt::Ids(ids(inner, &field)?),
                            other => {
                                let kind = if texts {
                                    "a string, as prompt[0] is"
                                } else {
                                    "a list of token ids, as prompt[0] is"
                                };
                                return Err(ApiError::field(field, format!("must be {kind}, not {other}")));
                            }
                        };
                        // One prompt's emptiness is the engine's to refuse (it names `prompt`);
                        // in a list, the element is named here.
                        if items.len() > 1 && prompt.is_empty() {
                            return Err(ApiError::field(field, "is empty"));
                        }
                        Ok(prompt)
                    })
                    .collect()
            }
            Some(_) => ids(&items, "prompt").map(|ids| vec![CompletionPrompt::Ids(ids)]),
        },
        Some(other) => Err(ApiError::field("prompt", format!("must be a string or a list of token ids, not {other}"))),
    }
}

impl SamplingOverrides {
    /// `base` with the values the request set.
    pub fn apply(&self, mut base: SamplingParams) -> SamplingParams {
        let s = self;
        if let Some(v) = s.temperature {
            base.temperature = v;
        }
        if let Some(v) = s.top_p {
            base.top_p = v;
        }
        if let Some(v) = s.top_k {
            base.top_k = v;
        }
        if let Some(v) = s.min_p {
            base.min_p = v;
        }
        if let Some(v) = s.presence_penalty {
            base.presence_penalty = v;
        }
        if let Some(v) = s.frequency_penalty {
            base.frequency_penalty = v;
        }
        if let Some(v) = s.repetition_penalty {
            base.repetition_penalty = v;
        }
        base.seed = s.seed;
        base.logit_bias = s.logit_bias.clone();
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = r#"{"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}], "max_completion_tokens": 16, "temperature": 0.7, "top_p": 0.9, "seed": -3, "stop": ["\n\n"], "stream": true, "stream_options": {"include_usage": "true"}, "logprobs": true, "top_logprobs": 3, "chat_template_kwargs": {"enable_thinking": false}, "user": "u1"}"#;
    const COMPLETION: &str = r#"{"prompt": [1, 2, 3], "max_tokens": 8, "top_k": -1, "logprobs": 2, "return_token_ids": true, "ignore_eos": true, "n": 1, "stop": "x"}"#;

    #[test]
    fn valid_bodies_become_typed_requests() {
        let chat = parse_chat_completion(CHAT.as_bytes()).unwrap();
        assert_eq!(chat.messages.len(), 2);
        assert_eq!(chat.messages[0].role, Role::System);
        let parts = vec![ContentPart::Text("Hi".into()), ContentPart::Text("there".into())];
        assert_eq!(chat.messages[1].content, Some(MessageContent::Parts(parts)));
        let p = &chat.params;
        assert_eq!((p.max_tokens, p.max_tokens_field), (Some(16), "max_completion_tokens"));
        assert_eq!(p.stream, Some(StreamSettings { include_usage: true, continuous_usage: false }));
        assert_eq!((p.logprobs, p.sampling.seed), (Some(3), Some((-3i64) as u64)));
        assert_eq!(chat.template.enable_thinking, Some(false));
        assert!(chat.template.add_generation_prompt);

        let completion = parse_completion(COMPLETION.as_bytes()).unwrap();
        assert_eq!(completion.prompts, [CompletionPrompt::Ids(vec![1, 2, 3])]);
        let p = &completion.params;
        assert_eq!((p.logprobs, p.sampling.top_k, p.stop.as_slice()), (Some(2), Some(0), ["x".to_string()].as_slice()));
        assert!(p.return_token_ids && p.ignore_eos && p.stream.is_none());
        let text = |t: &str| CompletionPrompt::Text(t.into());
        for (body, prompts) in [
            (r#"{"prompt": "a"}"#, vec![text("a")]),
            (r#"{"prompt": ["a"]}"#, vec![text("a")]),
            (r#"{"prompt": [[4, 5]]}"#, vec![CompletionPrompt::Ids(vec![4, 5])]),
            // OpenAI's batch form: several prompts of one kind.
            (r#"{"prompt": ["a", "b c"]}"#, vec![text("a"), text("b c")]),
            (r#"{"prompt": [[4, 5], [6]]}"#, vec![CompletionPrompt::Ids(vec![4, 5]), CompletionPrompt::Ids(vec![6])]),
        ] {
            assert_eq!(parse_completion(body.as_bytes()).unwrap().prompts, prompts, "{body}");
        }
        // A batch names its bad element: a mix of kinds, an empty prompt, a bad id.
        let param = |body: &str| parse_completion(body.as_bytes()).unwrap_err().param();
        assert_eq!(param(r#"{"prompt": ["a", [1]]}"#).as_deref(), Some("prompt[1]"));
        assert_eq!(param(r#"{"prompt": [[1], "a"]}"#).as_deref(), Some("prompt[1]"));
        assert_eq!(param(r#"{"prompt": ["a", "b", ""]}"#).as_deref(), Some("prompt[2]"));
        assert_eq!(param(r#"{"prompt": [[1], []]}"#).as_deref(), Some("prompt[1]"));
        assert_eq!(param(r#"{"prompt": [[1], [2, -3]]}"#).as_deref(), Some("prompt[1]"));
        assert_eq!(param(r#"{"prompt": []}"#).as_deref(), Some("prompt"));
    }

    #[test]
    fn errors_name_the_field() {
        let param = |r: Result<ChatCompletionRequest, ApiError>| r.unwrap_err().param();
        let chat = |extra: &str| format!(r#"{{"messages": [{{"role": "user", "content": "x"}}]{extra}}}"#);
        assert_eq!(
            param(parse_chat_completion(chat(r#", "max_tokens": "8""#).as_bytes())).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(param(parse_chat_completion(chat(r#", "stop": [1]"#).as_bytes())).as_deref(), Some("stop[0]"));
        assert_eq!(param(parse_chat_completion(chat(r#", "logprobs": 2"#).as_bytes())).as_deref(), Some("logprobs"));
        assert_eq!(param(parse_chat_completion(chat(r#", "top_k": -2"#).as_bytes())).as_deref(), Some("top_k"));
        assert_eq!(param(parse_chat_completion(chat(r#", "min_p": 2"#).as_bytes())).as_deref(), Some("min_p"));
        let wrong_part = br#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#;
        assert_eq!(param(parse_chat_completion(wrong_part)).as_deref(), Some("messages[0].content[0].text"));
        // serde refuses a repeated key at the object's level; the key is still named.
        let twice = chat(r#", "logprobs": true, "logprobs": true"#);
        assert_eq!(param(parse_chat_completion(twice.as_bytes())).as_deref(), Some("logprobs"));
        // A repeated unknown key before it (the empty key here) is not the one at fault.
        let unknown_first = chat(r#", "": 1, "": 2, "stop": "a", "stop": "b""#);
        assert_eq!(param(parse_chat_completion(unknown_first.as_bytes())).as_deref(), Some("stop"));
        let twice_inside = br#"{"messages": [{"role": "user", "role": "user", "content": "x"}]}"#;
        assert_eq!(param(parse_chat_completion(twice_inside)).as_deref(), Some("messages[0]"));
        // A template kwarg the server sets itself is named as the kwarg, not as the messages.
        for key in RESERVED_KWARGS {
            let kwarg = chat(&format!(r#", "chat_template_kwargs": {{"{key}": 1}}"#));
            let expected = format!("chat_template_kwargs.{key}");
            assert_eq!(param(parse_chat_completion(kwarg.as_bytes())).as_deref(), Some(expected.as_str()));
        }
        // vLLM's min_tokens and include_stop_str_in_output are taken; values of the wrong kind are named.
        let on = chat(r#", "min_tokens": 4, "include_stop_str_in_output": true"#);
        let p = parse_chat_completion(on.as_bytes()).unwrap().params;
        assert_eq!((p.min_tokens, p.include_stop_str_in_output), (4, true));
        let off = parse_chat_completion(chat("").as_bytes()).unwrap().params;
        assert_eq!((off.min_tokens, off.include_stop_str_in_output), (0, false));
        for (field, value) in [("min_tokens", "-1"), ("min_tokens", "2.5"), ("include_stop_str_in_output", "1")] {
            let bad = chat(&format!(r#", "{field}": {value}"#));
            assert_eq!(param(parse_chat_completion(bad.as_bytes())).as_deref(), Some(field), "{bad}");
        }
        // OpenAI's logit_bias: ids as strings to numbers in [-100, 100].
        let bias = chat(r#", "logit_bias": {"5": -100, " 7": 2.5}"#);
        let p = parse_chat_completion(bias.as_bytes()).unwrap().params;
        assert_eq!(p.sampling.logit_bias, [(5, -100.0), (7, 2.5)].into());
        for value in [r#"{"x": 1}"#, r#"{"-1": 1}"#, r#"{"5": "a"}"#, r#"{"5": 101}"#, r#"{"5": -100.5}"#] {
            let bad = chat(&format!(r#", "logit_bias": {value}"#));
            assert_eq!(param(parse_chat_completion(bad.as_bytes())).as_deref(), Some("logit_bias"), "{bad}");
        }
        // `n`: 1 to MAX_CHOICES choices, 1 when absent.
        assert_eq!(parse_chat_completion(chat("").as_bytes()).unwrap().params.n, 1);
        let most = chat(&format!(r#", "n": {MAX_CHOICES}"#));
        assert_eq!(parse_chat_completion(most.as_bytes()).unwrap().params.n, MAX_CHOICES);
        assert_eq!(parse_completion(br#"{"prompt": "x", "n": 3}"#).unwrap().params.n, 3);
        for n in ["0".to_string(), "-1".into(), (MAX_CHOICES + 1).to_string(), i64::MAX.to_string(), "1.5".into()] {
            let bad = chat(&format!(r#", "n": {n}"#));
            assert_eq!(param(parse_chat_completion(bad.as_bytes())).as_deref(), Some("n"), "{bad}");
            let completion = format!(r#"{{"prompt": "x", "n": {n}}}"#);
            assert_eq!(parse_completion(completion.as_bytes()).unwrap_err().param().as_deref(), Some("n"), "{n}");
        }
        let over = parse_chat_completion(chat(r#", "n": 17"#).as_bytes()).unwrap_err().to_string();
        assert!(over.contains(&format!("limit of {MAX_CHOICES}")), "{over}");
        let tail = format!("{} trailing", chat(""));
        assert!(matches!(parse_chat_completion(tail.as_bytes()), Err(ApiError::Json { path: None, .. })));
    }

    /// vLLM's `documents` reach the template as sent; anything but a list of objects is named.
    #[test]
    fn documents_are_a_list_of_objects_for_the_template() {
        let chat = |extra: &str| format!(r#"{{"messages": [{{"role": "user", "content": "x"}}]{extra}}}"#);
        let given = chat(r#", "documents": [{"title": "A", "text": "alpha"}]"#);
        let documents = parse_chat_completion(given.as_bytes()).unwrap().template.documents;
        assert_eq!(documents, Some(vec![serde_json::json!({"title": "A", "text": "alpha"})]));
        assert_eq!(parse_chat_completion(chat("").as_bytes()).unwrap().template.documents, None);
        for (value, field) in [(r#"[{"text": "a"}, "b"]"#, "documents[1]"), (r#""a""#, "documents")] {
            let bad = chat(&format!(r#", "documents": {value}"#));
            assert_eq!(parse_chat_completion(bad.as_bytes()).unwrap_err().param().as_deref(), Some(field), "{bad}");
        }
        let foreign = parse_completion(br#"{"prompt": "x", "documents": []}"#).unwrap_err();
        assert_eq!(foreign.param().as_deref(), Some("documents"));
    }

    #[test]
    fn tools_are_kept_as_sent_and_checked_by_path() {
        let chat = |extra: &str| format!(r#"{{"messages": [{{"role": "user", "content": "x"}}]{extra}}}"#);
        let tool = r#"{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}"#;
        let parsed = parse_chat_completion(chat(&format!(r#", "tools": [{tool}]"#)).as_bytes()).unwrap();
        assert_eq!(parsed.tools, vec![serde_json::from_str::<Json>(tool).unwrap()]);
        assert_eq!(parsed.tool_choice, ToolChoice::Auto);
        for (choice, expected) in [
            ("null", ToolChoice::Auto),
            (r#""auto""#, ToolChoice::Auto),
            (r#""none""#, ToolChoice::None),
            (r#""required""#, ToolChoice::Required),
            (r#"{"type": "function", "function": {"name": "f"}}"#, ToolChoice::Function("f".into())),
        ] {
            let body = chat(&format!(r#", "tools": [{tool}], "tool_choice": {choice}"#));
            assert_eq!(parse_chat_completion(body.as_bytes()).unwrap().tool_choice, expected, "{choice}");
        }
        for (extra, field) in [
            (r#", "tools": {}"#, "tools"),
            (r#", "tools": [1]"#, "tools[0]"),
            (r#", "tools": [{"function": {"name": "f"}}]"#, "tools[0].type"),
            (r#", "tools": [{"type": "retrieval", "function": {"name": "f"}}]"#, "tools[0].type"),
            (r#", "tools": [{"type": "function"}]"#, "tools[0].function"),
            (r#", "tools": [{"type": "function", "function": {"name": ""}}]"#, "tools[0].function.name"),
            (r#", "tools": [{"type": "function", "function": {"name": 1}}]"#, "tools[0].function.name"),
            (
                r#", "tools": [{"type": "function", "function": {"name": "f", "description": 1}}]"#,
                "tools[0].function.description",
            ),
            (
                r#", "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]"#,
                "tools[0].function.parameters",
            ),
            // `required` with no tools to call; a function that is not one of the tools.
            (r#", "tool_choice": "required""#, "tool_choice"),
            (r#", "tools": [], "tool_choice": "required""#, "tool_choice"),
            (r#", "tool_choice": {"type": "function", "function": {"name": "f"}}"#, "tool_choice.function.name"),
            (
                &format!(r#", "tools": [{tool}], "tool_choice": {{"type": "function", "function": {{"name": "g"}}}}"#),
                "tool_choice.function.name",
            ),
            (r#", "tool_choice": {"type": "function", "function": {}}"#, "tool_choice.function.name"),
            (r#", "tool_choice": {"type": "allowed_tools"}"#, "tool_choice.type"),
            (r#", "tool_choice": {"function": {"name": "f"}}"#, "tool_choice.type"),
            // A forced call is the answer's constraint: no other may be given.
            (
                &format!(
                    r#", "tools": [{tool}], "tool_choice": "required", "response_format": {{"type": "json_object"}}"#
                ),
                "tool_choice",
            ),
            (
                &format!(
                    r#", "tools": [{tool}], "tool_choice": {{"type": "function", "function": {{"name": "f"}}}}, "structured_outputs": {{"regex": "a"}}"#
                ),
                "tool_choice",
            ),
            (r#", "tool_choice": "any""#, "tool_choice"),
            (r#", "tool_choice": 1"#, "tool_choice"),
            (r#", "functions": [{"name": "f"}]"#, "functions"),
            (r#", "function_call": "auto""#, "function_call"),
        ] {
            let body = chat(extra);
            let param = parse_chat_completion(body.as_bytes()).unwrap_err().param();
            assert_eq!(param.as_deref(), Some(field), "{body}");
        }
        let completion = parse_completion(br#"{"prompt": "x", "tools": []}"#).unwrap_err();
        assert_eq!(completion.param().as_deref(), Some("tools"));
    }
}
