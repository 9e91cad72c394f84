//! vLLM's `/tokenize` and `/detokenize`: a client counts a prompt's tokens (a chat through the
//! model's own template, images expanded to their token counts) before it sends the prompt, or
//! turns ids back into text, without generating.
//!
//! `POST /tokenize` takes `/v1/completions`' `prompt` (one string, or ids, which come back as
//! they are) with `add_special_tokens` (default true, as vLLM: the tokenizer's post-processor
//! tokens such as a BOS; Qwen3's adds none), or `/v1/chat/completions`' `messages` with the chat
//! template's fields (`add_generation_prompt`, `chat_template_kwargs`, `tools`, ...), and
//! `return_token_strs`. It answers `{"count", "max_model_len", "tokens"}` and, when asked,
//! `token_strs` (the vocabulary's pieces, as `convert_ids_to_tokens` gives them). `POST
//! /detokenize` takes `{"tokens": [...]}` and answers `{"prompt": text}` (special tokens kept).

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use pio_runtime::engine::{Prompt, Request};
use pio_runtime::tokenizer::Tokenizer;
use serde::Serialize;
use serde_json::Value;

use crate::app::App;
use crate::convert::{chat_job, completion_job};
use crate::error::{ApiError, RequestError};
use crate::layers::{read_body, BodyLimit};
use crate::parse::{parse_chat_completion, parse_completion};

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

pub(crate) async fn tokenize(State(app): State<App>, limit: Option<Extension<BodyLimit>>, body: Body) -> Response {
    match tokenize_body(&app, limit.map(|l| l.0), body).await {
        Ok(response) => Json(response).into_response(),
        Err(error) => error.into_response(),
    }
}

pub(crate) async fn detokenize(State(app): State<App>, limit: Option<Extension<BodyLimit>>, body: Body) -> Response {
    let answer = async {
        let bytes = read_body(body, limit.map(|l| l.0)).await?;
        let body = object(&bytes)?;
        check_model(&app, &body)?;
        let tokens = match body.get("tokens") {
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(|| {
                        ApiError::field(format!("tokens[{i}]"), "token ids must be integers from 0 to 4294967295")
                    })
                })
                .collect::<Result<Vec<u32>, _>>()?,
            Some(other) => return Err(ApiError::field("tokens", format!("must be a list of token ids, not {other}"))),
            None => return Err(ApiError::field("tokens", "is required: a list of token ids")),
        };
        let tokenizer = tokenizer_of(&app, "tokens")?;
        in_vocabulary(&tokens, tokenizer.vocab_size(), "tokens")?;
        let prompt = tokenizer
            .decode(&tokens, false)
            .map_err(|e| ApiError::field("tokens", format!("cannot be decoded: {e}")))?;
        Ok(DetokenizeResponse { prompt })
    }
    .await;
    match answer {
        Ok(response) => Json(response).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn tokenize_body(app: &App, limit: Option<BodyLimit>, body: Body) -> Result<TokenizeResponse, RequestError> {
    let bytes = read_body(body, limit).await?;
    let value = object(&bytes)?;
    let flag = |name: &'static str| -> Result<Option<bool>, ApiError> {
        match value.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(ApiError::field(name, format!("must be true or false, not {other}"))),
        }
    };
    let token_strs = flag("return_token_strs")?.unwrap_or(false);
    let add_special_tokens = flag("add_special_tokens")?;
    let info = app.engine.model_info();
    let tokens = if value.get("messages").is_some() {
        if add_special_tokens == Some(true) {
            return Err(ApiError::field(
                "add_special_tokens",
                "must be false with messages: the chat template writes the special tokens",
            )
            .into());
        }
        let job = chat_job(parse_chat_completion(&bytes)?, info, app.tools)?;
        let fields = Some(job.fields);
        let request = job.prompts.into_iter().next().ok_or(ApiError::field("messages", "is required"))?;
        engine_tokenize(app, request).await.map_err(|error| RequestError { error, fields })?
    } else {
        let job = completion_job(parse_completion(&bytes)?, info)?;
        let fields = Some(job.fields);
        let mut prompts = job.prompts;
        if prompts.len() != 1 {
            return Err(ApiError::field("prompt", "takes one prompt here, not a list of them").into());
        }
        match prompts.remove(0).prompt {
            Prompt::Text(text) => tokenizer_of(app, "prompt")?
                .encode(&text, add_special_tokens.unwrap_or(true))
                .map_err(|e| ApiError::field("prompt", format!("cannot be tokenized: {e}")))?,
            Prompt::Ids(ids) => {
                in_vocabulary(&ids, info.vocab_size, "prompt").map_err(|error| RequestError { error, fields })?;
                ids
            }
            Prompt::Chat(_) => return Err(ApiError::field("prompt", "must be text or token ids").into()),
        }
    };
    let token_strs = token_strs
        .then(|| {
            let tokenizer = tokenizer_of(app, "return_token_strs")?;
            Ok::<_, ApiError>(tokens.iter().map(|&t| tokenizer.id_to_token(t).unwrap_or_default()).collect())
        })
        .transpose()?;
    Ok(TokenizeResponse { count: tokens.len(), max_model_len: info.max_model_len, tokens, token_strs })
}

/// The prompt's ids as the engine makes them for generation (chat template, images), on a
/// blocking thread: rendering a template and decoding images take a while.
async fn engine_tokenize(app: &App, request: Request) -> Result<Vec<u32>, ApiError> {
    let engine = app.engine.clone();
    tokio::task::spawn_blocking(move || engine.tokenize(&request.prompt, &request.render))
        .await
        .map_err(|source| ApiError::Submit { source })?
        .map_err(ApiError::from)
}

/// An error naming `field[i]`, the first id at or past `vocab_size`.
fn in_vocabulary(ids: &[u32], vocab_size: usize, field: &str) -> Result<(), ApiError> {
    match ids.iter().position(|&t| t as usize >= vocab_size) {
        Some(i) => Err(ApiError::field(
            format!("{field}[{i}]"),
            format!("{} is outside the vocabulary of {vocab_size} tokens", ids[i]),
        )),
        None => Ok(()),
    }
}

/// The body as a JSON object (anything else: "not a request object", as the other routes say).
fn object(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|source| ApiError::NotUtf8 { source })?;
    serde_json::from_str(text).map_err(|source| ApiError::Json { path: None, source })
}

fn check_model(app: &App, body: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    let served = &app.engine.model_info().served_name;
    match body.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == served => Ok(()),
        Some(Value::String(m)) => Err(ApiError::ModelNotFound { requested: m.clone(), served: served.clone() }),
        Some(other) => Err(ApiError::field("model", format!("must be a string, not {other}"))),
    }
}

fn tokenizer_of<'a>(app: &'a App, field: &'static str) -> Result<&'a Tokenizer, ApiError> {
    app.engine.tokenizer().ok_or_else(|| {
        ApiError::field(field, "this model has no tokenizer (no tokenizer.json beside its graphs): only ids are known")
    })
}
