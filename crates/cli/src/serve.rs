//! `pio serve`: an OpenAI-compatible HTTP server over one graph folder.
//!
//! `POST /v1/chat/completions` (chat template applied), `POST /v1/completions` (raw text or
//! token ids), `GET /v1/models`, `GET /health`. `"stream": true` answers with server-sent
//! events, one `data:` chunk per piece of text and `data: [DONE]` last, as OpenAI's API does.
//! Requests go to the serving engine (`pio_runtime::engine`), which batches them; each
//! connection has its own thread, waiting on its request's events. A client that disconnects,
//! or stops reading, mid-stream cancels its request.

use std::io::Write;
use std::ops::ControlFlow;
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use pio_runtime::chat_template::RenderOptions;
use pio_runtime::engine::{Engine, EngineError, Event, Prompt, Request as EngineRequest, RequestHandle};
use pio_runtime::generate::{FinishReason, GenerateOptions, GenerationOutput, TokenEvent};
use serde_json::{json, Value as Json};
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

/// A request the client got wrong: HTTP 400 with OpenAI's error body naming the field.
struct BadRequest {
    message: String,
    param: Option<&'static str>,
}

fn bad(param: &'static str, message: impl Into<String>) -> BadRequest {
    BadRequest { message: message.into(), param: Some(param) }
}

/// What a completion request asks for, parsed and checked before the model is touched.
struct Job {
    request: EngineRequest,
    stream: bool,
    chat: bool,
}

pub struct ServerState {
    engine: Engine,
    /// The name clients pass as `model` and see in `/v1/models`.
    model_name: String,
    created: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Serves on `addr` (e.g. `127.0.0.1:8000`; port 0 picks a free one) until the process ends.
/// Prints `listening on http://HOST:PORT` on stdout once the socket is bound.
pub fn serve(engine: Engine, addr: &str) -> Result<()> {
    let model_name = engine.model_info().served_name.clone();
    let server = Server::http(addr).map_err(|e| anyhow!("cannot listen on {addr}: {e}"))?;
    let bound = server.server_addr().to_ip().map(|a| a.to_string()).unwrap_or_else(|| addr.to_string());
    println!("listening on http://{bound}");
    tracing::info!(
        "serving {model_name} on http://{bound} (POST /v1/chat/completions, /v1/completions; GET /v1/models, /health)"
    );
    let state = Arc::new(ServerState { engine, model_name, created: now() });
    for request in server.incoming_requests() {
        let state = Arc::clone(&state);
        std::thread::spawn(move || handle(&state, request));
    }
    Ok(())
}

fn json_header() -> Header {
    Header::from_bytes("Content-Type", "application/json").unwrap_or_else(|_| unreachable!("a valid header"))
}

fn respond_json(request: Request, status: u16, body: &Json) {
    let response =
        Response::from_string(body.to_string()).with_status_code(StatusCode(status)).with_header(json_header());
    if let Err(e) = request.respond(response) {
        tracing::debug!("client went away before the response: {e}");
    }
}

fn error_body(message: &str, kind: &str, param: Option<&str>) -> Json {
    json!({"error": {"message": message, "type": kind, "param": param, "code": null}})
}

fn handle(state: &ServerState, mut request: Request) {
    let path = request.url().split('?').next().unwrap_or_default().to_string();
    let method = request.method().clone();
    tracing::debug!("{method} {path}");
    match (&method, path.as_str()) {
        (Method::Get, "/health") => {
            let _ = request.respond(Response::from_string("ok"));
        }
        (Method::Get, "/v1/models") => {
            let body = json!({"object": "list", "data": [
                {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "pio"}
            ]});
            respond_json(request, 200, &body);
        }
        (Method::Post, "/v1/chat/completions" | "/v1/completions") => {
            let chat = path == "/v1/chat/completions";
            let mut text = String::new();
            if let Err(e) = request.as_reader().read_to_string(&mut text) {
                return respond_json(
                    request,
                    400,
                    &error_body(&format!("cannot read the body: {e}"), "invalid_request_error", None),
                );
            }
            let job = match serde_json::from_str::<Json>(&text) {
                Ok(body) => parse_job(&state.engine, &body, chat, &state.model_name),
                Err(e) => Err(BadRequest { message: format!("the body is not JSON: {e}"), param: None }),
            };
            match job {
                Ok(job) if job.stream => stream(state, request, job),
                Ok(job) => complete(state, request, job),
                Err(e) => respond_json(request, 400, &error_body(&e.message, "invalid_request_error", e.param)),
            }
        }
        (_, "/health" | "/v1/models" | "/v1/chat/completions" | "/v1/completions") => respond_json(
            request,
            405,
            &error_body(&format!("{method} is not allowed on {path}"), "invalid_request_error", None),
        ),
        _ => respond_json(request, 404, &error_body(&format!("no route {method} {path}"), "not_found_error", None)),
    }
}

fn opt_f32(body: &Json, key: &'static str) -> Result<Option<f32>, BadRequest> {
    match body.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => {
            v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| bad(key, format!("`{key}` must be a number, got {v}")))
        }
    }
}

fn opt_u64(body: &Json, key: &'static str) -> Result<Option<u64>, BadRequest> {
    match body.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => {
            v.as_u64().map(Some).ok_or_else(|| bad(key, format!("`{key}` must be a non-negative integer, got {v}")))
        }
    }
}

fn opt_bool(body: &Json, key: &'static str) -> Result<Option<bool>, BadRequest> {
    match body.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| bad(key, format!("`{key}` must be true or false, got {v}"))),
    }
}

/// The request's prompt: chat messages (through the chat template), or a completion prompt (a
/// string, or token ids).
fn prompt(engine: &Engine, body: &Json, chat: bool) -> Result<Prompt, BadRequest> {
    if chat {
        let messages = body
            .get("messages")
            .and_then(Json::as_array)
            .ok_or_else(|| bad("messages", "`messages` must be an array of messages"))?;
        if messages.is_empty() {
            return Err(bad("messages", "`messages` is empty"));
        }
        if engine.chat_template().is_none() {
            return Err(bad("messages", "this model has no chat template; use /v1/completions"));
        }
        return Ok(Prompt::Chat(messages.clone()));
    }
    match body.get("prompt") {
        Some(Json::String(text)) => Ok(Prompt::Text(text.clone())),
        Some(Json::Array(items)) if !items.is_empty() && items.iter().all(Json::is_u64) => items
            .iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| bad("prompt", "token ids must fit in 32 bits"))
            })
            .collect::<Result<Vec<u32>, BadRequest>>()
            .map(Prompt::Ids),
        Some(Json::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Ok(Prompt::Text(items[0].as_str().unwrap_or_default().to_string()))
        }
        _ => Err(bad("prompt", "`prompt` must be a string or an array of token ids (one prompt per request)")),
    }
}

fn parse_job(engine: &Engine, body: &Json, chat: bool, model_name: &str) -> Result<Job, BadRequest> {
    if let Some(model) = body.get("model").and_then(Json::as_str) {
        if model != model_name {
            return Err(bad("model", format!("model `{model}` is not served here; this server serves `{model_name}`")));
        }
    }
    if let Some(n) = opt_u64(body, "n")? {
        if n != 1 {
            return Err(bad("n", format!("`n` must be 1 (one choice per request), got {n}")));
        }
    }
    let prompt = prompt(engine, body, chat)?;
    let max_tokens = match opt_u64(body, "max_completion_tokens")?.or(opt_u64(body, "max_tokens")?) {
        Some(0) => return Err(bad("max_tokens", "`max_tokens` must be at least 1")),
        Some(n) => Some(n as usize),
        // The rest of the sequence.
        None => None,
    };
    let mut sampling = engine.model_info().default_sampling.clone();
    if let Some(t) = opt_f32(body, "temperature")? {
        sampling.temperature = t;
    }
    if let Some(v) = opt_f32(body, "top_p")? {
        sampling.top_p = v;
    }
    if let Some(v) = opt_u64(body, "top_k")? {
        sampling.top_k = v as usize;
    }
    if let Some(v) = opt_f32(body, "min_p")? {
        sampling.min_p = v;
    }
    if let Some(v) = opt_f32(body, "presence_penalty")? {
        sampling.presence_penalty = v;
    }
    if let Some(v) = opt_f32(body, "frequency_penalty")? {
        sampling.frequency_penalty = v;
    }
    if let Some(v) = opt_f32(body, "repetition_penalty")? {
        sampling.repetition_penalty = v;
    }
    sampling.seed = opt_u64(body, "seed")?;
    // The sampler's own check names the field and the value.
    sampling.validate().map_err(|e| {
        let pio_runtime::sampling::SamplingError::InvalidParam { field, .. } = &e;
        BadRequest { message: e.to_string(), param: Some(*field) }
    })?;
    let stop = match body.get("stop") {
        None | Some(Json::Null) => vec![],
        Some(Json::String(s)) => vec![s.clone()],
        Some(Json::Array(items)) if items.len() <= 4 && items.iter().all(Json::is_string) => {
            items.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()
        }
        Some(v) => return Err(bad("stop", format!("`stop` must be a string or up to 4 strings, got {v}"))),
    };
    if !stop.is_empty() && engine.tokenizer().is_none() {
        return Err(bad("stop", "stop strings need a tokenizer, and this model has none"));
    }
    // Chat: `logprobs: true` + `top_logprobs: N`; completions: `logprobs: N`.
    let logprobs = if chat {
        match opt_bool(body, "logprobs")? {
            Some(true) => Some(opt_u64(body, "top_logprobs")?.unwrap_or(0).min(20) as usize),
            _ => None,
        }
    } else {
        opt_u64(body, "logprobs")?.map(|n| n.min(20) as usize)
    };
    let stream = opt_bool(body, "stream")?.unwrap_or(false);
    if stream && engine.tokenizer().is_none() {
        return Err(bad("stream", "streaming text needs a tokenizer, and this model has none"));
    }
    let render = RenderOptions { enable_thinking: opt_bool(body, "enable_thinking")?, ..RenderOptions::generation() };
    let options = GenerateOptions { max_tokens, sampling, stop, logprobs, ..Default::default() };
    Ok(Job { request: EngineRequest::new(prompt).with_options(options).with_render(render), stream, chat })
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::ContextLength => "length",
    }
}

fn usage(output: &GenerationOutput) -> Json {
    let (p, c) = (output.prompt_ids.len(), output.generated_ids.len());
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
           "prompt_tokens_details": {"cached_tokens": output.timings.cached_prompt_tokens}})
}

fn completion_id(chat: bool) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos:x}", if chat { "chatcmpl" } else { "cmpl" })
}

/// How the server answers an engine's refusal or failure: (HTTP status, OpenAI error type, param).
fn engine_error_status(e: &EngineError, job: &Job) -> (u16, &'static str, Option<&'static str>) {
    match e {
        EngineError::InvalidRequest { field, .. } => (400, "invalid_request_error", Some(*field)),
        EngineError::ContextLength { max_tokens: Some(_), .. } => (400, "invalid_request_error", Some("max_tokens")),
        EngineError::ContextLength { .. } => {
            (400, "invalid_request_error", Some(if job.chat { "messages" } else { "prompt" }))
        }
        EngineError::Overloaded { .. } => (429, "rate_limit_error", None),
        EngineError::Shutdown | EngineError::Cancelled => (503, "server_error", None),
        EngineError::Config { .. } | EngineError::Model { .. } => (500, "server_error", None),
    }
}

/// Reads a submitted generation's events; `on_token` sees each and may cancel it.
fn generate(
    handle: RequestHandle,
    mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
) -> Result<GenerationOutput, EngineError> {
    let mut output = None;
    for event in handle {
        match event? {
            Event::Token(token) => {
                if on_token(&token).is_break() {
                    // Dropping the handle cancels the request.
                    return Err(EngineError::Cancelled);
                }
            }
            Event::Finished(o) => output = Some(o),
        }
    }
    let output = output.ok_or(EngineError::Shutdown)?;
    let t = &output.timings;
    tracing::info!(
        "{} prompt + {} generated tokens ({:?}): first token {:.1} ms, {:.1} tokens/s",
        t.prompt_tokens,
        t.generated_tokens,
        output.finish_reason,
        t.time_to_first_token_ms,
        t.decode_tokens_per_s
    );
    Ok(output)
}

fn logprobs_json(events: &[TokenEvent]) -> Json {
    let content: Vec<Json> = events
        .iter()
        .filter_map(|e| {
            e.logprob.map(|lp| {
                let top: Vec<Json> =
                    e.top_logprobs.iter().map(|t| json!({"token_id": t.token, "logprob": t.logprob})).collect();
                json!({"token_id": e.token_id, "logprob": lp, "top_logprobs": top})
            })
        })
        .collect();
    json!({ "content": content })
}

/// Submits the job; a refusal is answered as an HTTP error (and None returned).
fn submit(state: &ServerState, request: Request, job: &Job) -> Option<(Request, RequestHandle)> {
    match state.engine.submit(job.request.clone()) {
        Ok(handle) => Some((request, handle)),
        Err(e) => {
            let (status, kind, param) = engine_error_status(&e, job);
            respond_json(request, status, &error_body(&error_text(&e), kind, param));
            None
        }
    }
}

fn complete(state: &ServerState, request: Request, job: Job) {
    let Some((request, handle)) = submit(state, request, &job) else { return };
    let mut events = Vec::new();
    let keep = job.request.options.logprobs.is_some();
    let result = generate(handle, |e| {
        if keep && e.logprob.is_some() {
            events.push(e.clone());
        }
        ControlFlow::Continue(())
    });
    let output = match result {
        Ok(o) => o,
        Err(e) => {
            let (status, kind, param) = engine_error_status(&e, &job);
            return respond_json(request, status, &error_body(&error_text(&e), kind, param));
        }
    };
    let logprobs = if keep { logprobs_json(&events) } else { Json::Null };
    let choice = if job.chat {
        json!({"index": 0, "message": {"role": "assistant", "content": output.text}, "logprobs": logprobs,
               "finish_reason": finish_reason(output.finish_reason)})
    } else {
        json!({"index": 0, "text": output.text, "logprobs": logprobs, "finish_reason": finish_reason(output.finish_reason)})
    };
    let body = json!({
        "id": completion_id(job.chat),
        "object": if job.chat { "chat.completion" } else { "text_completion" },
        "created": now(),
        "model": state.model_name,
        "choices": [choice],
        "usage": usage(&output),
    });
    respond_json(request, 200, &body);
}

fn sse(value: &Json) -> Vec<u8> {
    format!("data: {value}\n\n").into_bytes()
}

/// Events a streamed response may have waiting for a slow client before its generation is
/// stopped (so a client that stops reading cannot hold the model).
const STREAM_BACKLOG: usize = 256;

/// Server-sent events written straight to the socket, one HTTP chunk each, flushed as they come
/// (tiny_http's own chunked body buffers 8 KB before it sends anything). A writer thread owns
/// the socket; generation hands it events without waiting, and stops when the client is gone
/// or has fallen `STREAM_BACKLOG` events behind.
fn stream(state: &ServerState, request: Request, job: Job) {
    let Some((request, handle)) = submit(state, request, &job) else { return };
    let mut socket = request.into_writer();
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(STREAM_BACKLOG);
    let writer = std::thread::spawn(move || {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
        socket.write_all(head.as_bytes()).and_then(|_| socket.flush())?;
        for bytes in rx {
            let framed = [format!("{:x}\r\n", bytes.len()).as_bytes(), &bytes, b"\r\n"].concat();
            socket.write_all(&framed).and_then(|_| socket.flush())?;
        }
        Ok::<(), std::io::Error>(())
    });
    // False once the writer is gone or the client is too far behind.
    let send = |bytes: Vec<u8>| tx.try_send(bytes).is_ok();
    let id = completion_id(job.chat);
    let created = now();
    let object = if job.chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = |text: Option<&str>, finish: Option<&str>, usage: Option<Json>| {
        let choice = if job.chat {
            let delta = match text {
                None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                None => json!({}),
                Some(t) => json!({"content": t}),
            };
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": null, "finish_reason": finish})
        };
        let mut v =
            json!({"id": id, "object": object, "created": created, "model": state.model_name, "choices": [choice]});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        sse(&v)
    };
    let mut connected = !job.chat || send(chunk(None, None, None));
    let result = generate(handle, |e| {
        if !e.text.is_empty() {
            connected = connected && send(chunk(Some(&e.text), None, None));
        }
        // A client that hung up gets no more tokens.
        if connected {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    });
    let last = match result {
        Ok(output) => chunk(None, Some(finish_reason(output.finish_reason)), Some(usage(&output))),
        Err(e) => {
            let (_, kind, param) = engine_error_status(&e, &job);
            sse(&error_body(&error_text(&e), kind, param))
        }
    };
    // The zero-length chunk ends the body; the connection stays open for the next request.
    if !(send(last) && send(b"data: [DONE]\n\n".to_vec()) && send(Vec::new())) {
        tracing::debug!("the client left or fell behind before the end of its stream");
    }
    drop(tx);
    match writer.join() {
        Ok(Err(e)) => tracing::debug!("stream to the client ended early: {e}"),
        Err(_) => tracing::warn!("the stream writer panicked"),
        Ok(Ok(())) => {}
    }
}

/// An error's message with its causes, for an error body.
fn error_text(e: &EngineError) -> String {
    format!("{:#}", anyhow::Error::new(e.clone()))
}

/// Runs the server over a started engine.
pub fn run(engine: Engine, host: &str, port: u16) -> Result<()> {
    serve(engine, &format!("{host}:{port}")).context("pio serve")
}
