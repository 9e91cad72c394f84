//! The router: the routes, their layers and the state they share.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pio_runtime::engine::Engine;

use crate::completion::{chat_completions, completions};
use crate::config::ServerConfig;
use crate::convert::ToolSupport;
use crate::error::ApiError;
use crate::layers::{limit_body, require_api_key, time_limit, ApiKey, BodyLimit};
use crate::protocol::response::{ModelCard, ModelList};
use crate::token_text::TokenText;
use crate::tokenize::{detokenize, tokenize};

/// What every handler reads.
pub(crate) struct AppState {
    pub engine: Engine,
    /// When the server started (seconds since 1970), `created` of the model.
    pub created: u64,
    /// Part of every response id, so ids differ across restarts.
    pub instance: u64,
    pub token_text: TokenText,
    /// How the model writes tool calls.
    pub tools: ToolSupport,
}

pub(crate) type App = Arc<AppState>;

pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The server's routes over `engine`:
///
/// - `POST /v1/chat/completions`, `POST /v1/completions`: generation, behind the API key (if
///   any), the request timeout and the body limit;
/// - `POST /tokenize`, `POST /detokenize` (vLLM's): a prompt's token ids and ids' text, behind
///   the same layers;
/// - `GET /v1/models`, `GET /v1/models/{model}`: the served model, behind the API key;
/// - `GET /health`, `GET /metrics`: open (probes and scrapers send no key); `GET`/`POST
///   /ping` (vLLM's, for SageMaker's probe) answers as `/health`, and `GET /version` (vLLM's)
///   gives the server's version, open too.
pub fn router(engine: Engine, config: &ServerConfig) -> Router {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let state = Arc::new(AppState {
        token_text: TokenText::new(engine.tokenizer()),
        tools: ToolSupport::of(&engine),
        engine,
        created: unix_seconds(),
        instance: nanos,
    });
    let mut v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(from_fn_with_state(BodyLimit(config.body_limit()), limit_body));
    if let Some(limit) = config.request_timeout() {
        v1 = v1.route_layer(from_fn_with_state(limit, time_limit));
    }
    v1 = v1.route("/v1/models", get(models)).route("/v1/models/{*model}", get(model));
    if let Some(key) = config.api_key() {
        v1 = v1.route_layer(from_fn_with_state(ApiKey(key.into()), require_api_key));
    }
    Router::new()
        .route("/health", get(health))
        .route("/ping", get(health).post(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// 200 `ok` while the engine's worker runs; 503 once it has stopped, so that a load balancer or
/// an orchestrator's liveness probe takes the server out rather than sending it requests that
/// can only fail.
async fn health(State(app): State<App>) -> (StatusCode, &'static str) {
    if app.engine.is_running() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped")
    }
}

/// vLLM's `/version`: `{"version": ...}`, this server's.
async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION")}))
}

async fn metrics(State(app): State<App>) -> Response {
    let text = crate::metrics::render(&app.engine.metrics(), app.engine.model_info());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

async fn models(State(app): State<App>) -> Json<ModelList> {
    Json(ModelList { object: "list", data: vec![model_card(&app)] })
}

/// `GET /v1/models/{model}` (the SDKs' `models.retrieve`; the name may hold slashes, as hub ids
/// do): the served model's card, or a 404 naming the model that is served.
async fn model(State(app): State<App>, Path(requested): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    let card = model_card(&app);
    if requested == card.id {
        Ok(Json(card))
    } else {
        Err(ApiError::ModelNotFound { requested, served: card.id })
    }
}

fn model_card(app: &App) -> ModelCard {
    let info = app.engine.model_info();
    ModelCard {
        id: info.served_name.clone(),
        object: "model",
        created: app.created,
        owned_by: "pio",
        max_model_len: info.max_model_len,
    }
}

async fn no_route(request: Request) -> ApiError {
    ApiError::NoRoute { method: request.method().to_string(), path: request.uri().path().to_string() }
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed { method: request.method().to_string(), path: request.uri().path().to_string() }
}
