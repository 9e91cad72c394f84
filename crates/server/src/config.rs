//! The server's settings ([`ServerConfig`], built with [`ServerConfig::builder`]); the engine's
//! are `pio_runtime::engine::EngineConfig`.

use std::time::Duration;

use crate::error::ServerError;

/// Request bodies larger than this are refused with 413 while they are read (8 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 8 << 20;
/// A request that has not finished after this long is cancelled (10 minutes).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_HOST: &str = "127.0.0.1";
pub const DEFAULT_PORT: u16 = 8000;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    host: String,
    port: u16,
    body_limit: usize,
    request_timeout: Option<Duration>,
    api_key: Option<String>,
}

impl ServerConfig {
    /// The defaults: 127.0.0.1:8000, an 8 MiB body limit, a 10-minute request timeout, no API key.
    pub fn builder() -> ServerConfigBuilder {
        ServerConfigBuilder {
            config: ServerConfig {
                host: DEFAULT_HOST.into(),
                port: DEFAULT_PORT,
                body_limit: DEFAULT_BODY_LIMIT,
                request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
                api_key: None,
            },
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }
    pub fn request_timeout(&self) -> Option<Duration> {
        self.request_timeout
    }
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig::builder().config
    }
}

/// Builds a [`ServerConfig`]; [`build`](Self::build) checks the values.
#[derive(Clone, Debug)]
pub struct ServerConfigBuilder {
    config: ServerConfig,
}

impl ServerConfigBuilder {
    /// The address to listen on: an IP address or a host name (default 127.0.0.1, this machine only).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.config.host = host.into();
        self
    }
    /// The port (default 8000; 0 picks a free one).
    pub fn port(mut self, port: u16) -> Self {
        self.config.port = port;
        self
    }
    /// Bytes a request body may have (default 8 MiB).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }
    /// How long a request may take, from its first byte to its last token (default 10 minutes;
    /// None: no limit).
    pub fn request_timeout(mut self, limit: Option<Duration>) -> Self {
        self.config.request_timeout = limit;
        self
    }
    /// Requests to `/v1/...`, `/tokenize` and `/detokenize` must send `Authorization: Bearer <key>` (default: no key
    /// needed).
    pub fn api_key(mut self, key: Option<String>) -> Self {
        self.config.api_key = key;
        self
    }

    pub fn build(self) -> Result<ServerConfig, ServerError> {
        let c = self.config;
        if c.host.trim().is_empty() {
            return Err(ServerError::Config { setting: "host", message: "is empty".into() });
        }
        if c.body_limit == 0 {
            return Err(ServerError::Config { setting: "body_limit", message: "must be at least 1 byte".into() });
        }
        if c.request_timeout == Some(Duration::ZERO) {
            return Err(ServerError::Config {
                setting: "request_timeout",
                message: "must be more than 0 (None: no limit)".into(),
            });
        }
        if let Some(key) = &c.api_key {
            if key.is_empty() || key.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                return Err(ServerError::Config {
                    setting: "api_key",
                    message: "must be non-empty, without spaces or control characters".into(),
                });
            }
        }
        Ok(c)
    }
}
