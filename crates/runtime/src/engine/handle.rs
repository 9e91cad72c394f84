//! A submitted request's end of the engine: its events as an async [`Stream`] or a blocking
//! [`Iterator`]. Dropping it cancels the request.

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
/// Use it as a [`Stream`] in async code, or as an [`Iterator`] (blocking; not from inside an
/// async runtime, where it panics as tokio's `blocking_recv` does). Dropping the handle, or
/// [`cancel`](Self::cancel), cancels the request: the engine notices within one step and gives
/// its slot back.
pub struct RequestHandle {
    id: u64,
    prompt_ids: Arc<[u32]>,
    events: UnboundedReceiver<Result<Event, EngineError>>,
    done: bool,
}

impl std::fmt::Debug for RequestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestHandle").field("id", &self.id).field("done", &self.done).finish_non_exhaustive()
    }
}

impl RequestHandle {
    pub(crate) fn new(id: u64, prompt_ids: Arc<[u32]>, events: UnboundedReceiver<Result<Event, EngineError>>) -> Self {
        RequestHandle { id, prompt_ids, events, done: false }
    }

    /// The engine's id of the request.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The prompt as the model sees it (after the chat template and the tokenizer).
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    /// Cancels the request; events already sent can still be read.
    pub fn cancel(&mut self) {
        self.events.close();
    }

    /// What the channel gave, ended after `Finished` or an error; a channel closed without
    /// either means the engine stopped.
    fn settle(&mut self, received: Option<Result<Event, EngineError>>) -> Option<Result<Event, EngineError>> {
        if self.done {
            return None;
        }
        let item = received.unwrap_or(Err(EngineError::Shutdown));
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

    /// Blocks until the whole output is there, skipping the token events.
    pub fn wait(self) -> Result<GenerationOutput, EngineError> {
        for event in self {
            if let Event::Finished(output) = event? {
                return Ok(output);
            }
        }
        Err(EngineError::Shutdown)
    }
}

impl Iterator for RequestHandle {
    type Item = Result<Event, EngineError>;

    /// Blocks until the next event.
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let received = self.events.blocking_recv();
        self.settle(received)
    }
}

impl Stream for RequestHandle {
    type Item = Result<Event, EngineError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}
