//! Streamed answers: server-sent events, one `data:` chunk per token (or per piece of text),
//! then the finish chunk, the usage chunk when `stream_options.include_usage` asks for it, and
//! `data: [DONE]`. An error (the engine's, or the request timeout) is sent as an event with
//! OpenAI's error body, then `[DONE]`. The response body owns the engine's handle: a client
//! that disconnects drops it, which cancels the sequence.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use pio_runtime::engine::{EngineError, Event, RequestHandle};
use pio_runtime::generate::{TokenEvent, TEXT_TAIL_TOKEN};
use serde::Serialize;

use crate::app::{unix_seconds, App};
use crate::completion::{chat_finish_reason, finish_reason, log_finished, response_id};
use crate::convert::Job;
use crate::error::{ApiError, PromptFields};
use crate::layers::Deadline;
use crate::logprobs::offset_step;
use crate::parse::Endpoint;
use crate::protocol::request::StreamSettings;
use crate::protocol::response::{
    ChatChunkChoice, ChatCompletionChunk, ChatLogprobs, CompletionLogprobs, Delta, DeltaToolCall, TextChoice,
    TextCompletion, Usage, UsageField,
};
use crate::tool_calls::{Streamed, ToolCall, ToolCallStream};

pub(crate) fn response(
    app: App,
    job: Job,
    handle: RequestHandle,
    settings: StreamSettings,
    deadline: Option<Deadline>,
) -> Response {
    let stream = ChunkStream {
        id: response_id(&app, job.endpoint, &handle),
        created: unix_seconds(),
        model: app.engine.model_info().served_name.clone(),
        endpoint: job.endpoint,
        fields: job.fields,
        include_usage: settings.include_usage,
        logprobs: job.params.logprobs.is_some(),
        token_ids: job.params.return_token_ids,
        prompt_ids: job.params.return_token_ids.then(|| handle.prompt_ids().to_vec()),
        text_offset: 0,
        role_sent: false,
        tool_calls: job.tools.map(|t| ToolCallStream::new(t.format, t.tools)),
        calls_sent: 0,
        pending: VecDeque::new(),
        handle: Some(handle),
        deadline,
        app,
    };
    let events = futures_util::stream::unfold(stream, |mut s| async move {
        let event = s.next().await?;
        Some((Ok::<_, Infallible>(event), s))
    });
    Sse::new(events).into_response()
}

/// The state of one streamed answer.
struct ChunkStream {
    app: App,
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    fields: PromptFields,
    include_usage: bool,
    logprobs: bool,
    token_ids: bool,
    /// The prompt's ids, until the first chunk carries them.
    prompt_ids: Option<Vec<u32>>,
    /// Characters of text sent so far (completions' `text_offset`).
    text_offset: usize,
    /// Whether chat's first chunk (the assistant's role) went out.
    role_sent: bool,
    /// Chat with tool parsing: what finds the calls in the text as it comes.
    tool_calls: Option<ToolCallStream>,
    /// Tool calls sent (the next one's index).
    calls_sent: usize,
    /// Events ready to send.
    pending: VecDeque<SseEvent>,
    /// None once the answer has ended.
    handle: Option<RequestHandle>,
    deadline: Option<Deadline>,
}

/// A chunk's content: a piece of the answer, or its end.
enum Piece<'a> {
    /// Chat's first chunk: the assistant's role.
    Role,
    /// Text to send, with the token it came with (for its logprob and id; None for text let out
    /// at the end).
    Text(Option<&'a TokenEvent>, String),
    /// The answer's `index`-th tool call, whole.
    ToolCall(usize, ToolCall),
    /// The finish reason.
    Finish(&'static str),
}

impl ChunkStream {
    /// The next event to send, None after `[DONE]`.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let mut handle = self.handle.take()?;
            if self.endpoint == Endpoint::ChatCompletions && !self.role_sent {
                self.role_sent = true;
                self.push_chunk(Piece::Role);
                self.handle = Some(handle);
                continue;
            }
            let received = match self.deadline {
                // timeout_at polls the receive first, so with events always queued (a client that
                // reads slower than the engine writes) it would never see the deadline: check it.
                Some(d) if tokio::time::Instant::now() >= d.at => Err(d.limit),
                Some(d) => tokio::time::timeout_at(d.at, handle.next_event()).await.map_err(|_| d.limit),
                None => Ok(handle.next_event().await),
            };
            match received {
                Ok(Some(Ok(Event::Token(token)))) => {
                    self.push_token(&token);
                    self.handle = Some(handle);
                }
                Ok(Some(Ok(Event::Finished(output)))) => {
                    log_finished(&output);
                    let reason = match self.tool_calls.as_mut().map(|parser| parser.finish()) {
                        Some(rest) => {
                            self.push_streamed(rest, None);
                            chat_finish_reason(output.finish_reason, self.calls_sent > 0)
                        }
                        None => finish_reason(output.finish_reason),
                    };
                    self.push_chunk(Piece::Finish(reason));
                    if self.include_usage {
                        self.push_usage(Usage::from(output.usage()));
                    }
                    self.pending.push_back(SseEvent::default().data("[DONE]"));
                }
                Ok(Some(Err(e))) => self.push_error(e.into()),
                Ok(None) => self.push_error(EngineError::Shutdown.into()),
                // Dropping the handle (here) cancels the sequence.
                Err(limit) => self.push_error(ApiError::Timeout { limit }),
            }
        }
    }

    fn push_token(&mut self, token: &TokenEvent) {
        match self.tool_calls.as_mut().map(|parser| parser.push(&token.text)) {
            Some(out) => self.push_streamed(out, Some(token)),
            None if !token.text.is_empty() || self.wants_token_chunk(token) => {
                self.push_chunk(Piece::Text(Some(token), token.text.clone()))
            }
            None => {}
        }
        if self.logprobs {
            self.text_offset += offset_step(token, &self.app.token_text);
        }
    }

    /// Held-back text makes tokens without text; they get a chunk of their own only when the
    /// client wants each token's logprob or id.
    fn wants_token_chunk(&self, token: &TokenEvent) -> bool {
        token.token_id != TEXT_TAIL_TOKEN && (self.logprobs || self.token_ids)
    }

    /// What the tool-call parser let out, in order; `token` (the one whose text was pushed) goes
    /// with the first text, or in a chunk of its own when there is none and the client wants it.
    fn push_streamed(&mut self, out: Vec<Streamed>, mut token: Option<&TokenEvent>) {
        for item in out {
            match item {
                Streamed::Content(text) => self.push_chunk(Piece::Text(token.take(), text)),
                Streamed::Call(call) => {
                    let index = self.calls_sent;
                    self.calls_sent += 1;
                    self.push_chunk(Piece::ToolCall(index, call));
                }
            }
        }
        if let Some(token) = token.filter(|t| self.wants_token_chunk(t)) {
            self.push_chunk(Piece::Text(Some(token), String::new()));
        }
    }

    fn push_usage(&mut self, usage: Usage) {
        let event = match self.endpoint {
            Endpoint::ChatCompletions => json_event(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: UsageField::Usage(usage),
                prompt_token_ids: None,
            }),
            Endpoint::Completions => json_event(&TextCompletion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: UsageField::Usage(usage),
            }),
        };
        self.pending.push_back(event);
    }

    fn push_error(&mut self, error: ApiError) {
        error.log();
        self.pending.push_back(json_event(&error.body(Some(self.fields))));
        self.pending.push_back(SseEvent::default().data("[DONE]"));
    }

    fn push_chunk(&mut self, piece: Piece<'_>) {
        let usage = if self.include_usage { UsageField::Null } else { UsageField::Absent };
        let token = match &piece {
            Piece::Text(t, _) => *t,
            _ => None,
        };
        let ids = self.token_ids.then(|| match token {
            Some(t) if t.token_id != TEXT_TAIL_TOKEN => vec![t.token_id],
            _ => vec![],
        });
        let token = token.filter(|t| self.logprobs && t.logprob.is_some());
        let role_chunk = matches!(piece, Piece::Role);
        let (text, finish, call) = match piece {
            Piece::Role => (Some(String::new()), None, None),
            Piece::Text(_, text) => (Some(text), None, None),
            Piece::ToolCall(index, call) => (None, None, Some(DeltaToolCall { index, call: call.into() })),
            Piece::Finish(reason) => (None, Some(reason), None),
        };
        let prompt_token_ids = self.prompt_ids.take();
        let event = match self.endpoint {
            Endpoint::ChatCompletions => {
                let delta =
                    Delta { role: role_chunk.then_some("assistant"), content: text, tool_calls: call.map(|c| vec![c]) };
                let logprobs = token.map(|t| {
                    let mut l = ChatLogprobs::default();
                    l.push(t, &self.app.token_text);
                    l
                });
                json_event(&ChatCompletionChunk {
                    id: self.id.clone(),
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: self.model.clone(),
                    choices: vec![ChatChunkChoice { index: 0, delta, logprobs, finish_reason: finish, token_ids: ids }],
                    usage,
                    prompt_token_ids,
                })
            }
            Endpoint::Completions => {
                let logprobs = token.map(|t| {
                    let mut l = CompletionLogprobs::default();
                    l.push(t, self.text_offset, &self.app.token_text);
                    l
                });
                json_event(&TextCompletion {
                    id: self.id.clone(),
                    object: "text_completion",
                    created: self.created,
                    model: self.model.clone(),
                    choices: vec![TextChoice {
                        index: 0,
                        text: text.unwrap_or_default(),
                        logprobs,
                        finish_reason: finish,
                        prompt_token_ids,
                        token_ids: ids,
                    }],
                    usage,
                })
            }
        };
        self.pending.push_back(event);
    }
}

fn json_event(value: &impl Serialize) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(json) => SseEvent::default().data(json),
        // Our response types always serialize; should one not, the client sees why.
        Err(e) => SseEvent::default().data(format!(r#"{{"error": {{"message": "cannot serialize a chunk: {e}"}}}}"#)),
    }
}
