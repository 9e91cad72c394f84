//! Logging setup shared by the `pio` and `pio-export` commands: `tracing` to stderr, filtered by
//! `RUST_LOG` (default: our info messages, ONNX Runtime's warnings and errors only).

pub const DEFAULT_FILTER: &str = "info,ort=warn";

pub fn init() {
    let directives = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    let filter = tracing_subscriber::EnvFilter::try_new(directives.as_deref().unwrap_or(DEFAULT_FILTER))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    // A second init (tests calling main paths) is harmless: keep the first subscriber.
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
