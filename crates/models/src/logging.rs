//! Logging setup shared by the `pio` and `pio-export` commands: `tracing` to stderr, filtered by
//! `RUST_LOG` (default: our info messages, ONNX Runtime's warnings and errors only), in colour
//! only when stderr is a terminal and `NO_COLOR` is not set.

use std::ffi::OsStr;
use std::io::IsTerminal;

pub const DEFAULT_FILTER: &str = "info,ort=warn";

pub fn init() {
    let directives = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    let filter = tracing_subscriber::EnvFilter::try_new(directives.as_deref().unwrap_or(DEFAULT_FILTER))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let ansi = colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    // A second init (tests calling main paths) is harmless: keep the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

/// Whether log lines get ANSI colour codes: only on a terminal (a file or a pipe gets plain text),
/// and not when `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
pub fn colour(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(true, Some(OsStr::new("false"))), "any non-empty value counts");
        assert!(!colour(false, None));
    }
}
