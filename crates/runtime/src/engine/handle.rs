//! A submitted request's end of the engine: its events as an async [`Stream`], or blocking
//! ([`RequestHandle::blocking_next`], or `for event in handle`). Dropping it cancels the request.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::generate::GenerationOutput;

use super::error::EngineError;
use super::request::Event;

/// The events of one request: `Ok(Event::Token)` per token, then `Ok(Event::Finished)`, or an
/// `Err` instead; nothing after either.
///
/// Use it as a [`Stream`] (or [`next_event`](Self::next_event), [`output`](Self::output)) in
/// async code, or blocking: [`blocking_next`](Self::blocking_next), [`wait`](Self::wait), or
/// `for event in handle` (it is [`IntoIterator`]); not from inside an async runtime, where the
/// blocking calls panic as tokio's `blocking_recv` does. Dropping the handle, or
/// [`cancel`](Self::cancel), cancels the request: the engine notices within one step and gives
/// its slot back.
pub struct RequestHandle {
    id: u64,
    prompt_ids: Arc<[u32]>,
    events: UnboundedReceiver<Result<Event, EngineError>>,
    done: bool,
    cancelled: bool,
}

impl std::fmt::Debug for RequestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHandle").field("id", &self.id).field("done", &self.done).finish_non_exhaustive()
    }
}

impl RequestHandle {
    pub(crate) fn new(id: u64, prompt_ids: Arc<[u32]>, events: UnboundedReceiver<Result<Event, EngineError>>) -> Self {
        RequestHandle { id, prompt_ids, events, done: false, cancelled: false }
    }

    /// The engine's id of the request.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The prompt as the model sees it (after the chat template and the tokenizer).
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    /// Cancels the request; events already sent can still be read, then `Cancelled` ends them.
    pub fn cancel(&mut self) {
        self.cancelled = true;
        self.events.close();
    }

    /// What the channel gave, ended after `Finished` or an error; a channel closed without
    /// either means the request was cancelled, or else that the engine stopped.
    fn settle(&mut self, received: Option<Result<Event, EngineError>>) -> Option<Result<Event, EngineError>> {
        if self.done {
            return None;
        }
        let ended = if self.cancelled { EngineError::Cancelled } else { EngineError::Shutdown };
        let item = received.unwrap_or(Err(ended));
        self.done = matches!(item, Ok(Event::Finished(_)) | Err(_));
        Some(item)
    }

    /// The next event, waiting for it (async).
    pub async fn next_event(&mut self) -> Option<Result<Event, EngineError>> {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event, EngineError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(received) => Poll::Ready(self.settle(received)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits (async) for the whole output, skipping the token events.
    pub async fn output(mut self) -> Result<GenerationOutput, EngineError> {
        while let Some(event) = self.next_event().await {
            if let Event::Finished(output) = event? {
                return Ok(output);
            }
        }
        Err(EngineError::Shutdown)
    }

    /// The next event, blocking until it is there (None after the last).
    pub fn blocking_next(&mut self) -> Option<Result<Event, EngineError>> {
        if self.done {
            return None;
        }
        let received = self.events.blocking_recv();
        self.settle(received)
    }

    /// Blocks until the whole output is there, skipping the token events.
    pub fn wait(mut self) -> Result<GenerationOutput, EngineError> {
        while let Some(event) = self.blocking_next() {
            if let Event::Finished(output) = event? {
                return Ok(output);
            }
        }
        Err(EngineError::Shutdown)
    }
}

/// A request's events, blocking for each ([`RequestHandle`]'s `IntoIterator`).
#[derive(Debug)]
pub struct BlockingEvents(RequestHandle);

impl Iterator for BlockingEvents {
    type Item = Result<Event, EngineError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.blocking_next()
    }
}

impl IntoIterator for RequestHandle {
    type Item = Result<Event, EngineError>;
    type IntoIter = BlockingEvents;

    fn into_iter(self) -> BlockingEvents {
        BlockingEvents(self)
    }
}

impl Stream for RequestHandle {
    type Item = Result<Event, EngineError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}
