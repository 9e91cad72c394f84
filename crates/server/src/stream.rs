//! Streamed answers: server-sent events, one `data:` chunk per token (or per piece of text) of
//! any of the request's choices (`n`), interleaved as they come, each naming its choice's
//! `index`; each choice's finish chunk as it ends; once all have ended, the usage chunk when
//! `stream_options.include_usage` asks for it, and `data: [DONE]`. An error (the engine's, or
//! the request timeout) is sent as an event with OpenAI's error body, then `[DONE]`. The
//! response body owns the engine's handles: a client that disconnects drops them, which cancels
//! every choice's sequence.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{repeat, select_all, Repeat, SelectAll, Zip};
use futures_util::StreamExt;
use pio_runtime::engine::{Event, RequestHandle};
use pio_runtime::generate::{GenerationOutput, TokenEvent, TEXT_TAIL_TOKEN};
use pio_runtime::sampling::PromptTokenLogprob;
use serde::Serialize;

use crate::app::{unix_seconds, App};
use crate::completion::{chat_finish_reason, echo_text, finish_reason, log_finished, response_id};
use crate::convert::Job;
use crate::error::{ApiError, PromptFields};
use crate::forced_calls::ForcedCall;
use crate::layers::Deadline;
use crate::logprobs::offset_step;
use crate::parse::Endpoint;
use crate::protocol::request::StreamSettings;
use crate::protocol::response::{
    ChatChunkChoice, ChatCompletionChunk, ChatLogprobs, CompletionLogprobs, Delta, DeltaToolCall, TextChoice,
    TextCompletion, Usage, UsageField,
};
use crate::token_text::Spelling;
use crate::tool_calls::{Streamed, ToolCall, ToolCallStream};

/// `handles`: one per choice, in index order.
pub(crate) fn response(
    app: App,
    job: Job,
    handles: Vec<RequestHandle>,
    settings: StreamSettings,
    deadline: Option<Deadline>,
) -> Response {
    let chat = job.endpoint == Endpoint::ChatCompletions;
    let choices = handles
        .iter()
        .enumerate()
        .map(|(index, handle)| ChoiceState {
            echo: job.params.echo.then(|| Echo {
                text: echo_text(&app, &job.prompt_of(index).prompt, handle.prompt_ids()),
                ids: handle.prompt_ids().to_vec(),
                scores: None,
            }),
            // Completions give the prompt's ids in each choice, chat once per response.
            prompt_ids: (job.params.return_token_ids && (index == 0 || !chat)).then(|| handle.prompt_ids().to_vec()),
            text_offset: 0,
            tool_calls: job.tools.as_ref().map(|t| ToolCallStream::new(t.format, t.tools.clone())),
            calls_sent: 0,
            forced_text: job.forced.as_ref().map(|_| String::new()),
            usage: None,
            prompt_tokens: handle.prompt_ids().len(),
            generated: 0,
        })
        .collect();
    let mut stream = ChunkStream {
        id: response_id(&app, job.endpoint, &handles),
        created: unix_seconds(),
        model: app.engine.model_info().served_name.clone(),
        endpoint: job.endpoint,
        fields: job.fields,
        include_usage: settings.include_usage,
        choices_per_prompt: job.params.n,
        continuous_usage: settings.continuous_usage,
        one_call: job.tools.as_ref().is_some_and(|t| !t.parallel),
        logprobs: job.params.logprobs.is_some(),
        echo_top: job.params.logprobs.unwrap_or(0),
        echo_only: job.params.echo_only(),
        token_ids: job.params.return_token_ids,
        tokens_as_ids: job.params.return_tokens_as_token_ids,
        choices,
        forced: job.forced,
        pending: VecDeque::new(),
        events: Some(select_all(handles.into_iter().enumerate().map(|(index, handle)| repeat(index).zip(handle)))),
        deadline,
        app,
    };
    // Chat's first chunk of each choice is the assistant's role, all before any text (as vLLM
    // sends them).
    if chat {
        for index in 0..stream.choices.len() {
            stream.push_chunk(index, Piece::Role);
        }
    }
    let events = futures_util::stream::unfold(stream, |mut s| async move {
        let event = s.next().await?;
        Some((Ok::<_, Infallible>(event), s))
    });
    Sse::new(events).into_response()
}

/// One choice's events, each with the choice's index.
type ChoiceEvents = Zip<Repeat<usize>, RequestHandle>;

/// The state of one streamed answer.
struct ChunkStream {
    app: App,
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    fields: PromptFields,
    include_usage: bool,
    /// `n`: the choices of one prompt, which share its usage's prompt tokens.
    choices_per_prompt: usize,
    /// Every chunk carries its choice's usage so far.
    continuous_usage: bool,
    /// `parallel_tool_calls: false` with tool parsing: one call an answer.
    one_call: bool,
    logprobs: bool,
    /// An echoed prompt's alternatives per token (completions' `logprobs`).
    echo_top: usize,
    /// `echo` with `max_tokens: 0`: the prompt alone, without the token generated to run it.
    echo_only: bool,
    token_ids: bool,
    /// vLLM's `return_tokens_as_token_ids`: logprobs spell tokens `token_id:ID`.
    tokens_as_ids: bool,
    /// Each choice's state, by index.
    choices: Vec<ChoiceState>,
    /// Chat with `tool_choice` `"required"` or a named function: the call forced on each choice.
    forced: Option<ForcedCall>,
    /// Events ready to send.
    pending: VecDeque<SseEvent>,
    /// Every running choice's events, as they come; None once the answer has ended. Dropping it
    /// drops the handles, which cancels the choices still running.
    events: Option<SelectAll<ChoiceEvents>>,
    deadline: Option<Deadline>,
}

/// An echoed prompt, sent as a choice's first chunk of text (with its logprobs when asked for,
/// which come before the first token).
struct Echo {
    text: String,
    ids: Vec<u32>,
    scores: Option<Vec<Option<PromptTokenLogprob>>>,
}

/// What one choice's stream has sent.
struct ChoiceState {
    /// Completions' `echo`: the prompt, until it is sent.
    echo: Option<Echo>,
    /// The prompt's ids, until the choice's first chunk carries them.
    prompt_ids: Option<Vec<u32>>,
    /// Characters of text sent so far (completions' `text_offset`).
    text_offset: usize,
    /// Chat with tool parsing: what finds the calls in the text as it comes.
    tool_calls: Option<ToolCallStream>,
    /// Tool calls sent (the next one's index).
    calls_sent: usize,
    /// A forced call: the answer so far. Its JSON is the call's (or the calls') and not content,
    /// and it is only known to be whole at the end, so the calls are sent then.
    forced_text: Option<String>,
    /// The choice's usage, once it has finished.
    usage: Option<pio_runtime::generate::Usage>,
    /// Its prompt's tokens and the tokens generated so far (`continuous_usage_stats`).
    prompt_tokens: usize,
    generated: usize,
}

/// A chunk's content: a piece of the answer, or its end.
enum Piece<'a> {
    /// Chat's first chunk: the assistant's role.
    Role,
    /// Text to send, with the token it came with (for its logprob and id; None for text let out
    /// at the end).
    Text(Option<&'a TokenEvent>, String),
    /// An echoed prompt (completions).
    Echo(Echo),
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
            let mut events = self.events.take()?;
            let received = match self.deadline {
                // timeout_at polls the receive first, so with events always queued (a client that
                // reads slower than the engine writes) it would never see the deadline: check it.
                Some(d) if tokio::time::Instant::now() >= d.at => Err(d.limit),
                Some(d) => tokio::time::timeout_at(d.at, events.next()).await.map_err(|_| d.limit),
                None => Ok(events.next().await),
            };
            match received {
                Ok(Some((index, Ok(Event::PromptLogprobs(scores))))) => {
                    if let Some(echo) = self.choices[index].echo.as_mut() {
                        echo.scores = Some(scores);
                    }
                    self.events = Some(events);
                }
                // The prompt alone: the token generated to run it is not sent.
                Ok(Some((_, Ok(Event::Token(_))))) if self.echo_only => self.events = Some(events),
                Ok(Some((index, Ok(Event::Token(token))))) => {
                    self.push_echo(index);
                    self.push_token(index, &token);
                    self.events = Some(events);
                }
                Ok(Some((index, Ok(Event::Finished(output))))) => {
                    self.push_echo(index);
                    self.push_finish(index, output);
                    self.events = Some(events);
                }
                // Every choice has finished (a handle ends its events after `Finished` or an
                // error, and an error ends the answer).
                Ok(None) => {
                    if self.include_usage {
                        let usage =
                            Usage::of_choices(self.choices.iter().filter_map(|c| c.usage), self.choices_per_prompt);
                        self.push_usage(usage);
                    }
                    self.pending.push_back(SseEvent::default().data("[DONE]"));
                }
                // Dropping the events (here) cancels the other choices.
                Ok(Some((_, Err(e)))) => self.push_error(e.into()),
                Err(limit) => self.push_error(ApiError::Timeout { limit }),
            }
        }
    }

    fn push_token(&mut self, index: usize, token: &TokenEvent) {
        let choice = &mut self.choices[index];
        if token.token_id != TEXT_TAIL_TOKEN {
            choice.generated += 1;
        }
        let streamed = match (choice.forced_text.as_mut(), choice.tool_calls.as_mut()) {
            // Nothing to let out (the token's logprob and id still go out, with no text).
            (Some(forced), _) => {
                forced.push_str(&token.text);
                Some(vec![])
            }
            (None, parser) => parser.map(|parser| parser.push(&token.text)),
        };
        match streamed {
            Some(out) => self.push_streamed(index, out, Some(token)),
            None if !token.text.is_empty() || self.wants_token_chunk(token) => {
                self.push_chunk(index, Piece::Text(Some(token), token.text.clone()))
            }
            None => {}
        }
        if self.logprobs {
            self.choices[index].text_offset += offset_step(token, self.spelling());
        }
    }

    /// How the request's logprobs spell tokens.
    fn spelling(&self) -> Spelling<'_> {
        self.app.token_text.spelling(self.tokens_as_ids)
    }

    /// The choice's echoed prompt, before its first token's chunk (or its finish).
    fn push_echo(&mut self, index: usize) {
        if let Some(echo) = self.choices[index].echo.take() {
            self.push_chunk(index, Piece::Echo(echo));
        }
    }

    /// A choice's end: a forced call's calls (or its text, when it is not their whole JSON), or
    /// the text its tool-call parser still held; and its finish chunk.
    fn push_finish(&mut self, index: usize, output: GenerationOutput) {
        log_finished(&output);
        let choice = &mut self.choices[index];
        let mut usage = output.usage();
        if self.echo_only {
            usage.completion_tokens = 0;
        }
        choice.usage = Some(usage);
        // The finish chunk's running usage is the exact count.
        choice.generated = usage.completion_tokens;
        if let (Some(forced), Some(text)) = (&self.forced, choice.forced_text.take()) {
            // Not the whole JSON (cut short): the text, as the whole answer gives it.
            let (content, calls, reason) = forced.answer(text, output.finish_reason);
            let content = content.filter(|text| !text.is_empty()).map(Streamed::Content);
            let out = content.into_iter().chain(calls.into_iter().map(Streamed::Call)).collect();
            self.push_streamed(index, out, None);
            self.push_chunk(index, Piece::Finish(reason));
            return;
        }
        let reason = match choice.tool_calls.as_mut().map(|parser| parser.finish()) {
            Some(rest) => {
                self.push_streamed(index, rest, None);
                chat_finish_reason(output.finish_reason, self.choices[index].calls_sent > 0)
            }
            None => finish_reason(output.finish_reason),
        };
        self.push_chunk(index, Piece::Finish(reason));
    }

    /// Held-back text makes tokens without text; they get a chunk of their own only when the
    /// client wants each token's logprob or id.
    fn wants_token_chunk(&self, token: &TokenEvent) -> bool {
        token.token_id != TEXT_TAIL_TOKEN && (self.logprobs || self.token_ids)
    }

    /// What the tool-call parser let out, in order; `token` (the one whose text was pushed) goes
    /// with the first text, or in a chunk of its own when there is none and the client wants it.
    fn push_streamed(&mut self, index: usize, out: Vec<Streamed>, mut token: Option<&TokenEvent>) {
        for item in out {
            match item {
                Streamed::Content(text) => self.push_chunk(index, Piece::Text(token.take(), text)),
                // `parallel_tool_calls: false`: the answer's first call only.
                Streamed::Call(_) if self.one_call && self.choices[index].calls_sent > 0 => {}
                Streamed::Call(call) => {
                    let choice = &mut self.choices[index];
                    let call_index = choice.calls_sent;
                    choice.calls_sent += 1;
                    self.push_chunk(index, Piece::ToolCall(call_index, call));
                }
            }
        }
        if let Some(token) = token.filter(|t| self.wants_token_chunk(t)) {
            self.push_chunk(index, Piece::Text(Some(token), String::new()));
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

    /// A chunk of choice `index`.
    fn push_chunk(&mut self, index: usize, piece: Piece<'_>) {
        let usage = match (self.include_usage, self.continuous_usage) {
            (true, true) => {
                let choice = &self.choices[index];
                UsageField::Usage(Usage {
                    prompt_tokens: choice.prompt_tokens,
                    completion_tokens: choice.generated,
                    total_tokens: choice.prompt_tokens + choice.generated,
                    prompt_tokens_details: None,
                })
            }
            (true, false) => UsageField::Null,
            (false, _) => UsageField::Absent,
        };
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
        let mut echoed_logprobs = None;
        let (text, finish, call) = match piece {
            Piece::Role => (Some(String::new()), None, None),
            Piece::Text(_, text) => (Some(text), None, None),
            Piece::Echo(echo) => {
                if self.logprobs {
                    let mut l = CompletionLogprobs::default();
                    let scores = echo.scores.as_deref().unwrap_or_default();
                    let offset = self.choices[index].text_offset;
                    self.choices[index].text_offset =
                        l.push_prompt(&echo.ids, scores, self.echo_top, offset, self.spelling());
                    echoed_logprobs = Some(l);
                }
                (Some(echo.text), None, None)
            }
            Piece::ToolCall(index, call) => (None, None, Some(DeltaToolCall { index, call: call.into() })),
            Piece::Finish(reason) => (None, Some(reason), None),
        };
        let choice = &mut self.choices[index];
        let prompt_token_ids = choice.prompt_ids.take();
        let text_offset = choice.text_offset;
        let event = match self.endpoint {
            Endpoint::ChatCompletions => {
                let delta =
                    Delta { role: role_chunk.then_some("assistant"), content: text, tool_calls: call.map(|c| vec![c]) };
                let logprobs = token.map(|t| {
                    let mut l = ChatLogprobs::default();
                    l.push(t, self.spelling());
                    l
                });
                json_event(&ChatCompletionChunk {
                    id: self.id.clone(),
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: self.model.clone(),
                    choices: vec![ChatChunkChoice { index, delta, logprobs, finish_reason: finish, token_ids: ids }],
                    usage,
                    prompt_token_ids,
                })
            }
            Endpoint::Completions => {
                let logprobs = echoed_logprobs.or_else(|| {
                    token.map(|t| {
                        let mut l = CompletionLogprobs::default();
                        l.push(t, text_offset, self.spelling());
                        l
                    })
                });
                json_event(&TextCompletion {
                    id: self.id.clone(),
                    object: "text_completion",
                    created: self.created,
                    model: self.model.clone(),
                    choices: vec![TextChoice {
                        index,
                        text: text.unwrap_or_default(),
                        logprobs,
                        finish_reason: finish,
                        prompt_token_ids,
                        token_ids: ids,
                        prompt_logprobs: None,
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
