//! The limits and access checks, as tower layers (axum middleware) around the routes: the API
//! key, the request timeout, and the body limit applied while the body is read.

use std::error::Error as StdError;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{LengthLimitError, Limited};
use tokio::time::Instant;

use crate::error::ApiError;

/// The API key requests must send as `Authorization: Bearer <key>`.
#[derive(Clone)]
pub(crate) struct ApiKey(pub std::sync::Arc<str>);

pub(crate) async fn require_api_key(State(key): State<ApiKey>, request: Request, next: Next) -> Response {
    let sent = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match sent {
        Some(sent) if same_bytes(sent.as_bytes(), key.0.as_bytes()) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

/// Compares in time that depends on the length only, not on where the first difference is.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Bytes a request body may have.
#[derive(Clone, Copy)]
pub(crate) struct BodyLimit(pub usize);

/// A body announced as larger than the limit is refused before any of it is read; any other
/// body is cut off where it passes the limit ([`read_body`] answers 413 then), so the server
/// never holds more than the limit of one request.
pub(crate) async fn limit_body(State(limit): State<BodyLimit>, request: Request, next: Next) -> Response {
    let announced =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit.0 as u64) {
        return ApiError::BodyTooLarge { limit: limit.0 }.into_response();
    }
    let request = request.map(|body| Body::new(Limited::new(body, limit.0)));
    let mut request = request;
    request.extensions_mut().insert(limit);
    next.run(request).await
}

/// The whole body (limited by [`limit_body`]).
pub(crate) async fn read_body(body: Body, limit: Option<BodyLimit>) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, usize::MAX).await.map_err(|source| {
        let mut cause: Option<&(dyn StdError + 'static)> = Some(&source);
        while let Some(e) = cause {
            if e.is::<LengthLimitError>() {
                return ApiError::BodyTooLarge { limit: limit.map_or(0, |l| l.0) };
            }
            cause = e.source();
        }
        ApiError::BodyRead { source }
    })
}

/// When the request must be done (its stream ends with an error event then).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    pub at: Instant,
    pub limit: Duration,
}

/// Cancels a request that runs past `limit`: dropping the handler's future drops its engine
/// handle, which cancels the sequence. A stream's response is out by then, so the stream reads
/// the [`Deadline`] and ends itself.
pub(crate) async fn time_limit(State(limit): State<Duration>, mut request: Request, next: Next) -> Response {
    let deadline = Deadline { at: Instant::now() + limit, limit };
    request.extensions_mut().insert(deadline);
    match tokio::time::timeout_at(deadline.at, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout { limit }.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_by_every_byte() {
        assert!(same_bytes(b"secret", b"secret"));
        assert!(!same_bytes(b"secret", b"secreT"));
        assert!(!same_bytes(b"secret", b"secrets"));
        assert!(!same_bytes(b"", b"x"));
    }
}
