//! What the server answers when it cannot answer a request: [`ApiError`], each variant with its
//! HTTP status and OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`), the
//! cause kept as the error's source; and [`ServerError`], why the server itself cannot run.

use std::error::Error as StdError;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use pio_runtime::engine::EngineError;
use serde::Serialize;

/// Why a request gets no answer. The message names the field (`param`) when one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field is missing, of the wrong kind or out of range; `param` names it (a path such as
    /// `messages[1].content[0].type` inside a list).
    #[error("`{param}`: {message}")]
    InvalidField { param: String, message: String },
    /// The body is not JSON, or a value in it has the wrong type.
    #[error("{}", json_message(.path.as_deref(), .source))]
    Json {
        /// Where in the body (None: the body as a whole).
        path: Option<String>,
        #[source]
        source: serde_json::Error,
    },
    #[error("the body is not UTF-8: {source}")]
    NotUtf8 {
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("cannot read the request body")]
    BodyRead {
        #[source]
        source: axum::Error,
    },
    #[error("the model `{requested}` does not exist: this server serves `{served}`")]
    ModelNotFound { requested: String, served: String },
    #[error("a valid API key is needed: send `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("the request did not finish within {:.0} s (the server's --request-timeout); it was cancelled", .limit.as_secs_f64())]
    Timeout { limit: Duration },
    #[error("no route {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The engine refused or failed the request.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The task that submits the request to the engine panicked.
    #[error("the server failed to submit the request")]
    Submit {
        #[source]
        source: tokio::task::JoinError,
    },
}

fn json_message(path: Option<&str>, source: &serde_json::Error) -> String {
    let syntax = source.is_eof() || source.is_syntax();
    match path {
        Some(p) if syntax => format!("the body is not valid JSON (in `{p}`): {source}"),
        Some(p) => format!("`{p}`: {source}"),
        None if syntax => format!("the body is not valid JSON: {source}"),
        None => format!("the body is not a request object: {source}"),
    }
}

impl ApiError {
    pub(crate) fn field(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidField { param: param.into(), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidField { .. }
            | ApiError::Json { .. }
            | ApiError::NotUtf8 { .. }
            | ApiError::BodyRead { .. } => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::ModelNotFound { .. } | ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Submit { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Engine(e) => match e {
                EngineError::InvalidRequest { .. } | EngineError::ContextLength { .. } => StatusCode::BAD_REQUEST,
                EngineError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
                EngineError::Shutdown | EngineError::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
                EngineError::Config { .. } | EngineError::Model { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// OpenAI's `type`.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The request field at fault, if one is.
    pub fn param(&self) -> Option<String> {
        match self {
            ApiError::InvalidField { param, .. } => Some(param.clone()),
            ApiError::Json { path, .. } => path.clone(),
            ApiError::ModelNotFound { .. } => Some("model".into()),
            // The part inside the field when the engine names one (`messages[1].content[0].image_url`).
            ApiError::Engine(EngineError::InvalidRequest { field, part, .. }) => {
                Some(part.clone().unwrap_or_else(|| (*field).to_string()))
            }
            ApiError::Engine(EngineError::ContextLength { .. }) => None,
            _ => None,
        }
    }

    /// OpenAI's `code`, where it has one for the case.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::ModelNotFound { .. } => Some("model_not_found"),
            ApiError::Unauthorized => Some("invalid_api_key"),
            ApiError::BodyTooLarge { .. } => Some("request_too_large"),
            ApiError::Timeout { .. } => Some("timeout"),
            ApiError::Engine(EngineError::ContextLength { .. }) => Some("context_length_exceeded"),
            ApiError::Engine(EngineError::Overloaded { .. }) => Some("overloaded"),
            _ => None,
        }
    }

    /// The JSON body (also sent as a stream's error event). `fields`: the fields the request's
    /// prompt and maximum came in, which name the culprit of a request over the context.
    pub fn body(&self, fields: Option<PromptFields>) -> ErrorBody {
        let param = self.param().or_else(|| match (self, fields) {
            // The maximum is at fault only where the prompt alone fits.
            (ApiError::Engine(EngineError::ContextLength { prompt_tokens, max_tokens: Some(_), limit }), Some(f))
                if prompt_tokens < limit =>
            {
                Some(f.max_tokens.into())
            }
            (ApiError::Engine(EngineError::ContextLength { .. }), Some(f)) => Some(f.prompt_param()),
            _ => None,
        });
        let mut message = self.to_string();
        // What made a request invalid is the client's input too (a template's raise_exception, an
        // image that does not decode): the client is told the whole chain, as vLLM does.
        if let ApiError::Engine(invalid @ EngineError::InvalidRequest { .. }) = self {
            let mut source = invalid.source();
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
        }
        ErrorBody { error: ErrorDetail { message, kind: self.kind(), param, code: self.code() } }
    }

    /// Logs what the client is not told: a server-side failure with its whole cause chain.
    pub(crate) fn log(&self) {
        if self.status().is_server_error() {
            let mut chain = self.to_string();
            let mut source = self.source();
            while let Some(cause) = source {
                chain.push_str(": ");
                chain.push_str(&cause.to_string());
                source = cause.source();
            }
            tracing::error!("{} {chain}", self.status().as_u16());
        } else {
            tracing::debug!("{} {self}", self.status().as_u16());
        }
    }
}

/// OpenAI's error body.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

/// The fields a request's prompt (`messages` or `prompt`) and its maximum (`max_tokens` or
/// `max_completion_tokens`) came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptFields {
    pub prompt: &'static str,
    pub max_tokens: &'static str,
    /// Which prompt of a batch (completions' list of prompts) is at fault, when one is.
    pub element: Option<usize>,
}

impl PromptFields {
    /// The prompt's field, with its element in a batch (`prompt[2]`).
    pub fn prompt_param(&self) -> String {
        match self.element {
            Some(i) => format!("{}[{i}]", self.prompt),
            None => self.prompt.to_string(),
        }
    }
}

/// An [`ApiError`] about a request whose fields are known.
pub(crate) struct RequestError {
    pub error: ApiError,
    pub fields: Option<PromptFields>,
}

impl From<ApiError> for RequestError {
    fn from(error: ApiError) -> Self {
        RequestError { error, fields: None }
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let error = self.error;
        error.log();
        let status = error.status();
        let body = serde_json::to_string(&error.body(self.fields))
            .unwrap_or_else(|_| r#"{"error":{"message":"unprintable error"}}"#.to_string());
        let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        let headers = response.headers_mut();
        match error {
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            ApiError::Engine(EngineError::Overloaded { .. }) => {
                headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        RequestError::from(self).into_response()
    }
}

/// Why the server cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("server setting `{setting}`: {message}")]
    Config { setting: &'static str, message: String },
    #[error("cannot listen on {address}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server stopped")]
    Serve {
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_statuses_and_name_their_field() {
        let invalid = ApiError::from(EngineError::InvalidRequest {
            field: "top_p",
            part: None,
            message: "out of range".into(),
            source: None,
        });
        assert_eq!((invalid.status(), invalid.param().as_deref()), (StatusCode::BAD_REQUEST, Some("top_p")));
        // The cause of an invalid request is the client's to read (a template's raise_exception).
        let cause = std::io::Error::other("Conversation roles must alternate user/assistant");
        let unrendered = ApiError::from(EngineError::InvalidRequest {
            field: "messages",
            part: None,
            message: "cannot render them".into(),
            source: Some(std::sync::Arc::new(cause)),
        });
        let message = unrendered.body(None).error.message;
        assert!(message.ends_with("cannot render them: Conversation roles must alternate user/assistant"), "{message}");
        let long = ApiError::from(EngineError::ContextLength { prompt_tokens: 300, max_tokens: None, limit: 256 });
        let chat = PromptFields { prompt: "messages", max_tokens: "max_completion_tokens", element: None };
        let body = long.body(Some(chat));
        assert_eq!(long.status(), StatusCode::BAD_REQUEST);
        assert_eq!(body.error.param.as_deref(), Some("messages"));
        assert!(body.error.message.contains("300") && body.error.message.contains("256"), "{}", body.error.message);
        let over = ApiError::from(EngineError::ContextLength { prompt_tokens: 10, max_tokens: Some(300), limit: 256 });
        assert_eq!(over.body(Some(chat)).error.param.as_deref(), Some("max_completion_tokens"));
        let batch = PromptFields { prompt: "prompt", max_tokens: "max_tokens", element: Some(2) };
        assert_eq!(long.body(Some(batch)).error.param.as_deref(), Some("prompt[2]"));
        // A prompt over the context alone is at fault whatever max_tokens says.
        let alone = ApiError::from(EngineError::ContextLength { prompt_tokens: 300, max_tokens: Some(5), limit: 256 });
        assert_eq!(alone.body(Some(batch)).error.param.as_deref(), Some("prompt[2]"));
        assert_eq!(ApiError::from(EngineError::Overloaded { waiting: 4, limit: 4 }).status(), 429);
        assert_eq!(ApiError::from(EngineError::Shutdown).status(), 503);
        let failed = ApiError::from(EngineError::Config { setting: "max_seqs", message: "too many".into() });
        assert_eq!((failed.status(), failed.kind()), (StatusCode::INTERNAL_SERVER_ERROR, "server_error"));
    }
}
