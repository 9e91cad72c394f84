//! `pio-server`: an OpenAI-compatible HTTP server over the serving engine
//! (`pio_runtime::engine`), on axum (tokio, hyper). `pio serve` is its command line.
//!
//! - Routes ([`router`]): `POST /v1/chat/completions`, `POST /v1/completions`, `GET
//!   /v1/models`, `GET /health`, `GET /metrics` (Prometheus text, with the Gateway API
//!   Inference Extension's gauges under vLLM's names too).
//! - Requests and responses are typed ([`protocol`]); [`parse`] turns a body into a typed
//!   request or the 4xx [`ApiError`] naming the field (the hook a fuzzer drives).
//! - Limits and access are tower layers: the body limit applied while reading, the request
//!   timeout, the API key. A full engine queue answers 429.
//! - A client that disconnects, streaming or not, cancels its sequence.
//!
//! ```no_run
//! # async fn serve(engine: pio_runtime::engine::Engine) -> Result<(), pio_server::ServerError> {
//! let config = pio_server::ServerConfig::builder().port(8000).build()?;
//! let server = pio_server::Server::bind(engine, &config).await?;
//! println!("listening on http://{}", server.local_addr());
//! server.run(pio_server::shutdown_signal()).await
//! # }
//! ```

mod app;
mod completion;
mod config;
mod convert;
mod error;
mod forced_calls;
mod layers;
mod logprobs;
mod metrics;
pub mod parse;
pub mod protocol;
mod stream;
pub mod structured;
mod token_text;
mod tokenize;
pub mod tool_calls;

use std::future::Future;
use std::net::SocketAddr;

use pio_runtime::engine::Engine;
use tokio::net::TcpListener;

pub use app::router;
pub use config::{
    ServerConfig, ServerConfigBuilder, DEFAULT_BODY_LIMIT, DEFAULT_HOST, DEFAULT_PORT, DEFAULT_REQUEST_TIMEOUT,
};
pub use error::{ApiError, ErrorBody, ErrorDetail, PromptFields, ServerError};

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    listener: TcpListener,
    address: SocketAddr,
    engine: Engine,
    router: axum::Router,
}

impl Server {
    /// Binds `config`'s host and port (port 0: a free one; [`local_addr`](Self::local_addr)
    /// says which).
    pub async fn bind(engine: Engine, config: &ServerConfig) -> Result<Server, ServerError> {
        let address = format!("{}:{}", config.host(), config.port());
        let bind_error = |source| ServerError::Bind { address: address.clone(), source };
        let listener = TcpListener::bind((config.host(), config.port())).await.map_err(bind_error)?;
        let bound = listener.local_addr().map_err(bind_error)?;
        Ok(Server { router: router(engine.clone(), config), listener, address: bound, engine })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `shutdown` completes; then stops taking connections, shuts the engine down
    /// (requests in flight end with a 503, or an error event in a stream) and returns once the
    /// open connections are done.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServerError> {
        let engine = self.engine.clone();
        let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
        let stopped = stopping.clone();
        let stop = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections; requests in flight end");
            stopped.notify_one();
            // The engine joins its worker thread: not on the async threads.
            let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        };
        let info = self.engine.model_info();
        tracing::info!(
            "serving {} on http://{} (POST /v1/chat/completions, /v1/completions; GET /v1/models, /health, /metrics)",
            info.served_name,
            self.address
        );
        let serving = axum::serve(self.listener, self.router).with_graceful_shutdown(stop);
        // Requests end as soon as the engine stops, but a connection still sending its body (a
        // stalled or slow client) would hold the shutdown for as long as it likes: it gets
        // DRAIN_LIMIT, then is dropped.
        let drain_limit = async move {
            stopping.notified().await;
            tokio::time::sleep(DRAIN_LIMIT).await;
        };
        tokio::select! {
            served = serving => served.map_err(|source| ServerError::Serve { source }),
            _ = drain_limit => {
                tracing::warn!("connections still open {} s after the shutdown began: closed", DRAIN_LIMIT.as_secs());
                Ok(())
            }
        }
    }
}

/// How long a shutdown waits for open connections (below Kubernetes' default grace period of
/// 30 s, which ends in SIGKILL).
pub const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Completes on Ctrl-C or, on Unix, SIGTERM (what Kubernetes sends a pod it stops).
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    /// README's `pio_server` example is this crate's documentation example (compiled by
    /// `cargo test` as a doctest): the same lines.
    #[test]
    fn the_readme_example_is_the_doc_example() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let source = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
        let readme = std::fs::read_to_string(root.join("../../README.md")).unwrap();
        let example: Vec<&str> = source
            .lines()
            .skip_while(|l| !l.starts_with("//! ```no_run"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .filter_map(|l| l.strip_prefix("//! "))
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert_eq!(example.len(), 4, "{example:?}");
        assert!(
            readme.contains(&example.join("\n")),
            "README.md's pio_server example differs from lib.rs's:\n{}",
            example.join("\n")
        );
    }
}
