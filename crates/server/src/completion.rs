//! The generation routes: read and check the body, submit it to the engine (one engine request
//! per choice of `n` of each prompt, as vLLM's parallel sampling does), and answer with one JSON
//! response or a stream ([`crate::stream`]).
//!
//! A client that disconnects drops the handler's future (or, streaming, the response body),
//! and with it the engine's handles, which cancels the sequences; the engine frees their slots
//! in its next step.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::future::try_join_all;
use pio_runtime::engine::{EngineError, Event, Prompt, RequestHandle};
use pio_runtime::generate::{FinishReason, GenerationOutput, TokenEvent};

use crate::app::{unix_seconds, App};
use crate::convert::{chat_job, completion_job, Job, ToolParsing};
use crate::error::{ApiError, PromptFields, RequestError};
use crate::forced_calls::ForcedCall;
use crate::layers::{read_body, BodyLimit, Deadline};
use crate::logprobs::offset_step;
use crate::parse::{parse_chat_completion, parse_completion, Endpoint};
use crate::protocol::response::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatLogprobs, CompletionLogprobs, TextChoice, TextCompletion, Usage,
    UsageField,
};
use crate::tool_calls;

pub(crate) async fn chat_completions(
    State(app): State<App>,
    limit: Option<Extension<BodyLimit>>,
    deadline: Option<Extension<Deadline>>,
    body: Body,
) -> Response {
    generation(Endpoint::ChatCompletions, app, limit.map(|l| l.0), deadline.map(|d| d.0), body).await
}

pub(crate) async fn completions(
    State(app): State<App>,
    limit: Option<Extension<BodyLimit>>,
    deadline: Option<Extension<Deadline>>,
    body: Body,
) -> Response {
    generation(Endpoint::Completions, app, limit.map(|l| l.0), deadline.map(|d| d.0), body).await
}

async fn generation(
    endpoint: Endpoint,
    app: App,
    limit: Option<BodyLimit>,
    deadline: Option<Deadline>,
    body: Body,
) -> Response {
    let job = async {
        let bytes = read_body(body, limit).await?;
        let info = app.engine.model_info();
        match endpoint {
            Endpoint::ChatCompletions => chat_job(parse_chat_completion(&bytes)?, info, app.tools),
            Endpoint::Completions => completion_job(parse_completion(&bytes)?, info),
        }
    }
    .await;
    respond(app, job, deadline).await
}

async fn respond(app: App, job: Result<Job, ApiError>, deadline: Option<Deadline>) -> Response {
    let job = match job {
        Ok(job) => job,
        Err(e) => return RequestError::from(e).into_response(),
    };
    let fields = Some(job.fields);
    let handles = match submit(&app, &job).await {
        Ok(handles) => handles,
        Err(error) => return error.into_response(),
    };
    match job.params.stream {
        Some(settings) => crate::stream::response(app, job, handles, settings, deadline),
        None => match complete(&app, &job, handles).await {
            Ok(response) => response,
            Err(error) => RequestError { error, fields }.into_response(),
        },
    }
}

/// Submits the job's choices on a blocking thread: the engine renders the chat template and
/// tokenizes there (once per choice), which a long prompt makes slow. All or none: the engine
/// queues the choices together or refuses them all, so a full queue (a 429) leaves no choice
/// running. One handle per choice, in index order. A refused batch of prompts names the prompt
/// at fault (`prompt[2]`).
async fn submit(app: &App, job: &Job) -> Result<Vec<RequestHandle>, RequestError> {
    let engine = app.engine.clone();
    let requests = job.choice_requests();
    let prompts = (job.prompts.len() > 1).then(|| job.prompts.clone());
    let submitted = tokio::task::spawn_blocking(move || {
        let refused = engine.submit_batch(requests);
        // Only a refusal of a prompt is looked for, and only then is each prompt checked again.
        let culprit = match (&refused, &prompts) {
            (Err(EngineError::InvalidRequest { field: "prompt", part: None, .. }), Some(prompts))
            | (Err(EngineError::ContextLength { .. }), Some(prompts)) => {
                prompts.iter().position(|p| engine.check_request(p).is_err())
            }
            _ => None,
        };
        (refused, culprit)
    })
    .await
    .map_err(|source| ApiError::Submit { source })?;
    let (submitted, culprit) = submitted;
    let fields = PromptFields { element: culprit, ..job.fields };
    refused_batch(job, submitted, culprit).map_err(|error| RequestError { error, fields: Some(fields) })
}

/// The engine's answer to a job's batch, its refusals named as the client sent the request.
fn refused_batch(
    job: &Job,
    submitted: Result<Vec<RequestHandle>, EngineError>,
    culprit: Option<usize>,
) -> Result<Vec<RequestHandle>, ApiError> {
    let n = job.prompts.len() * job.params.n;
    match submitted {
        Err(EngineError::InvalidRequest { field: "prompt", part: None, message, source }) if culprit.is_some() => {
            Err(EngineError::InvalidRequest {
                field: "prompt",
                part: culprit.map(|i| format!("prompt[{i}]")),
                message,
                source,
            }
            .into())
        }
        // More choices than the queue ever holds: no retry would help, so not a 429.
        Err(EngineError::Overloaded { limit, .. }) if n > limit => Err(match job.prompts.len() {
            1 => ApiError::field(
                "n",
                format!("{n} choices are more than this server queues at once ({limit}, its --max-waiting)"),
            ),
            prompts => ApiError::field(
                "prompt",
                format!(
                    "{prompts} prompts of {} choices each are more than this server queues at once ({limit}, its \
                     --max-waiting)",
                    job.params.n
                ),
            ),
        }),
        // The engine names the constraint `structured_output`; the client sent it in its own field
        // (a forced call's, in its tools).
        Err(EngineError::InvalidRequest { field: "structured_output", part: None, message, source }) => {
            Err(EngineError::InvalidRequest {
                field: "structured_output",
                part: (job.params.structured.as_ref().map(|s| s.param.to_string()))
                    .or_else(|| job.forced.as_ref().map(|f| f.param.clone())),
                message,
                source,
            }
            .into())
        }
        submitted => Ok(submitted?),
    }
}

/// A response id: chat's `chatcmpl-...`, completions' `cmpl-...`, from the first choice's
/// engine id.
pub(crate) fn response_id(app: &App, endpoint: Endpoint, handles: &[RequestHandle]) -> String {
    let prefix = match endpoint {
        Endpoint::ChatCompletions => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    format!("{prefix}-{:x}{:06x}", app.instance, handles.first().map_or(0, RequestHandle::id))
}

pub(crate) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextLength => "length",
        FinishReason::Cancelled => "abort",
    }
}

/// Chat's finish reason: `tool_calls` when the answer called tools and ended on its own (an
/// answer cut by `max_tokens` says `length` whatever it holds, as the client must know it is cut).
pub(crate) fn chat_finish_reason(reason: FinishReason, called: bool) -> &'static str {
    match reason {
        FinishReason::Stop if called => "tool_calls",
        reason => finish_reason(reason),
    }
}

/// A whole chat answer as the assistant's message and its finish reason: with tool parsing, the
/// calls in the text become `tool_calls` and the rest is the content (`null` when nothing but
/// whitespace is left besides calls).
pub(crate) fn chat_message(
    text: String,
    reason: FinishReason,
    tools: Option<&ToolParsing>,
) -> (AssistantMessage, &'static str) {
    let Some(parsing) = tools else {
        return (
            AssistantMessage { role: "assistant", content: Some(text), tool_calls: vec![] },
            finish_reason(reason),
        );
    };
    let mut parsed = tool_calls::parse(&text, parsing.format, &parsing.tools);
    if !parsing.parallel {
        parsed.calls.truncate(1);
    }
    let called = !parsed.calls.is_empty();
    let content = (!called || !parsed.content.trim().is_empty()).then_some(parsed.content);
    let message =
        AssistantMessage { role: "assistant", content, tool_calls: parsed.calls.into_iter().map(Into::into).collect() };
    (message, chat_finish_reason(reason, called))
}

/// A whole answer to a forced call: its calls, with no content; or, when it is not the JSON the
/// constraint asks for (cut short), its text as content and no call.
fn forced_message(text: String, reason: FinishReason, forced: &ForcedCall) -> (AssistantMessage, &'static str) {
    let (content, calls, reason) = forced.answer(text, reason);
    (AssistantMessage { role: "assistant", content, tool_calls: calls.into_iter().map(Into::into).collect() }, reason)
}

pub(crate) fn log_finished(output: &GenerationOutput) {
    let t = &output.timings;
    tracing::info!(
        "{} prompt tokens ({} cached) + {} generated ({:?}): first token {:.1} ms, {:.1} tokens/s",
        t.prompt_tokens,
        t.cached_prompt_tokens,
        t.generated_tokens,
        output.finish_reason,
        t.time_to_first_token_ms,
        t.decode_tokens_per_s
    );
}

/// One choice's whole answer, with its token events when the client wants logprobs.
struct Finished {
    output: GenerationOutput,
    events: Vec<TokenEvent>,
}

/// Reads one choice's events to its end.
async fn finish(mut handle: RequestHandle, want_logprobs: bool) -> Result<Finished, ApiError> {
    let mut events = Vec::new();
    loop {
        match handle.next_event().await {
            Some(Ok(Event::Token(token))) if want_logprobs => events.push(token),
            // The output holds them too.
            Some(Ok(Event::Token(_) | Event::PromptLogprobs(_))) => {}
            Some(Ok(Event::Finished(output))) => {
                log_finished(&output);
                return Ok(Finished { output, events });
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Err(EngineError::Shutdown.into()),
        }
    }
}

/// The text an echoed prompt adds before the answer: the prompt as the client wrote it, or its
/// ids spelled out (special tokens too), as vLLM echoes them.
pub(crate) fn echo_text(app: &App, prompt: &Prompt, ids: &[u32]) -> String {
    match (prompt, app.engine.tokenizer()) {
        (Prompt::Text(text), _) => text.clone(),
        (_, Some(tokenizer)) => tokenizer.decode(ids, false).unwrap_or_else(|e| {
            tracing::warn!("cannot spell the echoed prompt: {e}");
            String::new()
        }),
        // Refused when the job was made (`completion_job`).
        (_, None) => String::new(),
    }
}

/// Waits for every choice's whole answer and sends them as one JSON object.
async fn complete(app: &App, job: &Job, handles: Vec<RequestHandle>) -> Result<Response, ApiError> {
    let id = response_id(app, job.endpoint, &handles);
    let want_logprobs = job.params.logprobs.is_some();
    // The choices run together; the first to fail drops the others' futures, and with them
    // their handles, which cancels them.
    let mut finished = try_join_all(handles.into_iter().map(|handle| finish(handle, want_logprobs))).await?;
    if job.params.echo_only() {
        // The prompt alone: the token generated to run it is not part of the answer.
        for f in &mut finished {
            f.output.generated_ids.clear();
            f.output.text.clear();
            f.output.logprobs.clear();
            f.events.clear();
        }
    }
    let spelling = app.token_text.spelling(job.params.return_tokens_as_token_ids);
    let prompt_logprobs = |output: &GenerationOutput| {
        let top = job.params.prompt_logprobs?;
        Some(crate::logprobs::prompt_logprobs(output.prompt_logprobs.as_deref().unwrap_or_default(), top, spelling))
    };
    let ids = job.params.return_token_ids;
    let model = app.engine.model_info().served_name.clone();
    let usage = Usage::of_choices(finished.iter().map(|f| f.output.usage()), job.params.n);
    let choices = finished.into_iter().enumerate();
    let response = match job.endpoint {
        Endpoint::ChatCompletions => {
            // Chat gives the prompt's ids and logprobs once, beside the choices.
            let mut prompt_token_ids = None;
            let mut prompt_scores = None;
            let choices = choices
                .map(|(index, Finished { output, events })| {
                    if index == 0 {
                        prompt_scores = prompt_logprobs(&output);
                    }
                    let logprobs = want_logprobs.then(|| {
                        let mut l = ChatLogprobs::default();
                        events.iter().for_each(|e| l.push(e, spelling));
                        l
                    });
                    if ids && index == 0 {
                        prompt_token_ids = Some(output.prompt_ids);
                    }
                    let (message, reason) = match &job.forced {
                        Some(forced) => forced_message(output.text, output.finish_reason, forced),
                        None => chat_message(output.text, output.finish_reason, job.tools.as_ref()),
                    };
                    ChatChoice {
                        index,
                        message,
                        logprobs,
                        finish_reason: reason,
                        token_ids: ids.then_some(output.generated_ids),
                    }
                })
                .collect();
            Json(ChatCompletion {
                id,
                object: "chat.completion",
                created: unix_seconds(),
                model,
                choices,
                usage,
                prompt_token_ids,
                prompt_logprobs: prompt_scores,
            })
            .into_response()
        }
        Endpoint::Completions => {
            let choices = choices
                .map(|(index, Finished { output, events })| {
                    let echoed =
                        job.params.echo.then(|| echo_text(app, &job.prompt_of(index).prompt, &output.prompt_ids));
                    let logprobs = want_logprobs.then(|| {
                        let mut l = CompletionLogprobs::default();
                        let mut offset = 0;
                        if let (Some(_), Some(top)) = (&echoed, job.params.logprobs) {
                            let scores = output.prompt_logprobs.as_deref().unwrap_or_default();
                            offset = l.push_prompt(&output.prompt_ids, scores, top, 0, spelling);
                        }
                        for e in &events {
                            l.push(e, offset, spelling);
                            offset += offset_step(e, spelling);
                        }
                        l
                    });
                    let prompt_logprobs = prompt_logprobs(&output);
                    let text = match echoed {
                        Some(prompt) => prompt + &output.text,
                        None => output.text,
                    };
                    TextChoice {
                        index,
                        text,
                        logprobs,
                        finish_reason: Some(finish_reason(output.finish_reason)),
                        prompt_token_ids: ids.then_some(output.prompt_ids),
                        token_ids: ids.then_some(output.generated_ids),
                        prompt_logprobs,
                    }
                })
                .collect();
            Json(TextCompletion {
                id,
                object: "text_completion",
                created: unix_seconds(),
                model,
                choices,
                usage: UsageField::Usage(usage),
            })
            .into_response()
        }
    };
    Ok(response)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::protocol::response::PromptTokensDetails;
    use crate::tool_calls::ToolCallFormat;

    #[test]
    fn a_chat_answer_with_calls_becomes_tool_calls() {
        let tools = ToolParsing {
            format: ToolCallFormat::Hermes,
            tools: vec![json!({"type": "function", "function": {"name": "get_weather"}})],
            parallel: true,
        };
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (message, reason) = chat_message(format!("\n\n{call}\n{call}"), FinishReason::Stop, Some(&tools));
        assert_eq!(reason, "tool_calls");
        let body = serde_json::to_value(&message).unwrap();
        assert!(body["content"].is_null(), "{body}");
        assert_eq!(body["tool_calls"].as_array().unwrap().len(), 2);
        for call in body["tool_calls"].as_array().unwrap() {
            assert_eq!(call["type"], "function");
            assert_eq!(call["function"], json!({"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}));
            assert!(call["id"].as_str().unwrap().starts_with("call_"));
        }
        assert_ne!(body["tool_calls"][0]["id"], body["tool_calls"][1]["id"]);
        // parallel_tool_calls: false keeps the first call.
        let one = ToolParsing { parallel: false, ..tools.clone() };
        let (message, reason) = chat_message(format!("\n\n{call}\n{call}"), FinishReason::Stop, Some(&one));
        assert_eq!((message.tool_calls.len(), reason), (1, "tool_calls"));

        // Text before the calls is the content; an answer cut by max_tokens says so.
        let (message, reason) =
            chat_message(format!("Checking.\n{call}<tool_call>"), FinishReason::Length, Some(&tools));
        assert_eq!(
            (message.content.as_deref(), message.tool_calls.len(), reason),
            (Some("Checking.\n<tool_call>"), 1, "length")
        );
        // No calls: the text as it is, and no `tool_calls` key.
        let (message, reason) = chat_message(" ".into(), FinishReason::Stop, Some(&tools));
        assert_eq!((message.content.as_deref(), reason), (Some(" "), "stop"));
        assert!(serde_json::to_value(&message).unwrap().get("tool_calls").is_none());
        // Without tool parsing (no tools, or tool_choice "none") the calls are text.
        let (message, reason) = chat_message(call.into(), FinishReason::Stop, None);
        assert_eq!((message.content.as_deref(), message.tool_calls.len(), reason), (Some(call), 0, "stop"));
    }

    #[test]
    fn usage_counts_each_prompt_once_and_every_completion() {
        let usage = |prompt_tokens, completion_tokens, cached_tokens| pio_runtime::generate::Usage {
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        };
        // Two prompts (10 and 4 tokens) of two choices each; the second choice's cache hit on
        // its own prompt's first choice is not counted.
        let choices = [usage(10, 3, 2), usage(10, 5, 10), usage(4, 1, 0), usage(4, 2, 4)];
        let total = Usage::of_choices(choices, 2);
        assert_eq!((total.prompt_tokens, total.completion_tokens, total.total_tokens), (14, 11, 25));
        assert_eq!(total.prompt_tokens_details, Some(PromptTokensDetails { cached_tokens: 2 }));
        let one = Usage::of_choices(choices, 4);
        assert_eq!((one.prompt_tokens, one.completion_tokens, one.total_tokens), (10, 11, 21));
    }
}
