//! `pio serve`: the command line of `pio-server` (an OpenAI-compatible HTTP server over the
//! serving engine). It starts the engine, binds, prints `listening on http://HOST:PORT` once
//! bound, and serves until Ctrl-C or SIGTERM.

use std::time::Duration;

use anyhow::Result;
use clap::Args as ClapArgs;
use pio_models::cli_args::NumberRange;
use pio_server::{Server, ServerConfig};

use crate::ModelArgs;

#[derive(ClapArgs)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (an IP address or host name; 0.0.0.0 for every interface).
    #[arg(long, default_value = pio_server::DEFAULT_HOST)]
    pub host: String,
    /// Port to listen on, 0 to 65535 (0: any free port; the address is printed).
    #[arg(long, default_value_t = pio_server::DEFAULT_PORT, value_parser = NumberRange::<u16>::any())]
    pub port: u16,
    /// The model name clients pass and /v1/models lists (default: the graph's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Requests to /v1/..., /tokenize and /detokenize must send `Authorization: Bearer KEY` (/health and /metrics stay open).
    #[arg(long, env = "PIO_API_KEY", hide_env_values = true, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub api_key: Option<String>,
    /// Largest request body in MiB, > 0; a larger one is refused with 413 while it is read.
    #[arg(
        long,
        default_value_t = (pio_server::DEFAULT_BODY_LIMIT >> 20) as f64,
        value_parser = NumberRange::above(0.0)
    )]
    pub body_limit_mb: f64,
    /// Seconds a request may take, body to last token, before it is cancelled, >= 0 (0: no limit).
    #[arg(
        long,
        default_value_t = pio_server::DEFAULT_REQUEST_TIMEOUT.as_secs_f64(),
        value_parser = NumberRange::between(0.0, 1e9)
    )]
    pub request_timeout: f64,
    /// Requests that may wait for a sequence slot, >= 1; more are answered 429.
    #[arg(long, default_value_t = pio_runtime::engine::DEFAULT_MAX_WAITING, value_parser = NumberRange::at_least(1usize))]
    pub max_waiting: usize,
}

impl ServeArgs {
    /// The server's settings (the flags' parsers have checked their ranges).
    pub fn server_config(&self) -> Result<ServerConfig> {
        let timeout = (self.request_timeout > 0.0).then(|| Duration::from_secs_f64(self.request_timeout));
        Ok(ServerConfig::builder()
            .host(&self.host)
            .port(self.port)
            .body_limit((self.body_limit_mb * (1u64 << 20) as f64) as usize)
            .request_timeout(timeout)
            .api_key(self.api_key.clone())
            .build()?)
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let config = args.server_config()?;
    // A busy port or a mistyped host is refused before the model loads.
    let graphs = crate::preflight::GraphFolder::inspect(&args.model.graphs)?;
    args.model.check_applies_to(&graphs)?;
    crate::preflight::check_address(config.host(), config.port())?;
    // Clients must not read the server's files: local image paths only where --local-images says.
    let mut engine_config = args.model.config_with_local_images("none")?.max_waiting(args.max_waiting);
    if let Some(name) = &args.served_model_name {
        engine_config = engine_config.served_model_name(name);
    }
    let engine = pio_runtime::engine::Engine::start(engine_config.build()?)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("pio-serve").build()?;
    runtime.block_on(async {
        let server = Server::bind(engine, &config).await?;
        println!("listening on http://{}", server.local_addr());
        if config.api_key().is_none() && !server.local_addr().ip().is_loopback() {
            tracing::warn!("listening beyond this machine without --api-key: anyone who can reach it can use it");
        }
        // A second Ctrl-C or SIGTERM while draining stops at once, as in vLLM and llama.cpp.
        let second_signal = async {
            pio_server::shutdown_signal().await;
            pio_server::shutdown_signal().await;
        };
        tokio::select! {
            served = server.run(pio_server::shutdown_signal()) => served?,
            _ = second_signal => tracing::warn!("a second signal: stopping without waiting for open connections"),
        }
        Ok(())
    })
}
