//! Everything a download can run into, each naming the repository, file, URL or folder.

use std::path::PathBuf;

use pio_models::files::IndexError;
use pio_models::size::format_bytes;

/// The advice for a repository that needs a token, depending on whether one was sent.
fn token_advice(has_token: &bool) -> &'static str {
    if *has_token {
        "the token sent (HF_TOKEN or the token file under HF_HOME) has no access to it"
    } else {
        "set HF_TOKEN to a token with access (or run `huggingface-cli login`)"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{0}` is not a Hugging Face repository id (expected owner/name, e.g. Qwen/Qwen3-4B-Instruct-2507)")]
    InvalidRepoId(String),
    #[error("`{0}` is not a usable revision (a branch, tag or commit hash)")]
    InvalidRevision(String),
    #[error("no folder for the Hugging Face cache: neither HF_HOME nor HOME is set")]
    NoCacheDir,
    #[error("HF_ENDPOINT `{0}` is not an http:// or https:// URL")]
    InvalidEndpoint(String),

    #[error("repository {repo} was not found on {endpoint}{}", if *has_token { "" } else { " (if it is private: set HF_TOKEN or run `huggingface-cli login`)" })]
    RepoNotFound { repo: String, endpoint: String, has_token: bool },
    #[error("revision `{revision}` of {repo} was not found on {endpoint}")]
    RevisionNotFound { repo: String, revision: String, endpoint: String },
    #[error("{repo} has no file {file} (asked at {url})")]
    FileNotFound { repo: String, file: String, url: String },
    #[error("{repo} is gated: accept its terms on {endpoint}/{repo}, then {}", token_advice(has_token))]
    Gated { repo: String, endpoint: String, has_token: bool },
    #[error("{url} refused the request (HTTP {status}): {}", token_advice(has_token))]
    Unauthorized { url: String, status: u16, has_token: bool },
    #[error("{url} answered HTTP {status}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status {
        url: String,
        status: u16,
        message: String,
        /// The server's `Retry-After`, in seconds.
        retry_after: Option<std::time::Duration>,
    },
    #[error(
        "cannot reach {} (no network? set HF_ENDPOINT for a mirror, or HF_HUB_OFFLINE=1 to use the cache only)",
        crate::http::origin(url)
    )]
    Connection {
        url: String,
        #[source]
        source: Box<ureq::Transport>,
    },
    #[error("{url}: unexpected answer from the hub: {problem}")]
    Protocol { url: String, problem: String },
    #[error("the answer from {url} broke off")]
    Read {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the HTTP client")]
    Client(#[source] Box<hf_hub::api::sync::ApiError>),

    #[error("{repo} has no config.json at revision {revision}: not a transformers checkpoint")]
    NoConfig { repo: String, revision: String },
    #[error("{repo} has no safetensors weights (model.safetensors or model.safetensors.index.json){}", if *has_bin { "; it only has PyTorch .bin weights, which pio-export does not read" } else { "" })]
    NoSafetensors { repo: String, has_bin: bool },
    #[error("model.safetensors.index.json of {repo} lists {file}, which the repository does not have")]
    MissingShard { repo: String, file: String },
    #[error("model.safetensors.index.json of {repo} lists `{file}`: only names of letters, digits, `.`, `_` and `-` are downloaded")]
    UnsupportedFileName { repo: String, file: String },
    #[error(transparent)]
    Index(#[from] IndexError),

    #[error(
        "not enough disk space for {repo}: {} still to download ({files} files, {} in all), but {} is free at {}; \
         free some space or set HF_HOME to a folder on a larger disk",
        format_bytes(*needed), format_bytes(*total), format_bytes(*free), dir.display()
    )]
    DiskSpace { repo: String, needed: u64, total: u64, files: usize, free: u64, dir: PathBuf },

    #[error("{file} of {repo}: the download stopped at {got} of {size} bytes; run again to resume from there")]
    Interrupted {
        repo: String,
        file: String,
        got: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} of {repo} failed its {algorithm} check (got {actual}, the hub lists {expected}); the download was discarded")]
    HashMismatch { repo: String, file: String, algorithm: &'static str, expected: String, actual: String },
    #[error("{file} of {repo}: the hub sent {got} bytes where {expected} were announced; the download was discarded")]
    SizeMismatch { repo: String, file: String, got: u64, expected: u64 },

    #[error("HF_HUB_OFFLINE is set and {repo} (revision {revision}) is not in the Hugging Face cache at {}", cache.display())]
    NotCached { repo: String, revision: String, cache: PathBuf },
    #[error("{repo} (revision {revision}) is incomplete in the cache at {}: missing {}", dir.display(), missing.join(", "))]
    Incomplete { repo: String, revision: String, dir: PathBuf, missing: Vec<String> },

    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HubError {
    /// A failure that may pass by itself: the connection, or an answer that says so (429, 5xx).
    /// Transfers retry these, and a listing that fails so falls back to a complete cached
    /// snapshot, as `huggingface_hub` does.
    pub fn is_transient(&self) -> bool {
        match self {
            HubError::Connection { .. } => true,
            HubError::Status { status, .. } => *status == 429 || (500..600).contains(status),
            _ => false,
        }
    }

    /// Whether the command as written is at fault (a repository id, revision or endpoint that
    /// cannot be used, no folder for the cache), as opposed to the hub, the network or the disk.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            HubError::InvalidRepoId(_)
                | HubError::InvalidRevision(_)
                | HubError::InvalidEndpoint(_)
                | HubError::NoCacheDir
        )
    }

    /// How long the server asked to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            HubError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HubError {
        let path = path.into();
        move |source| HubError::Io { action, path, source }
    }
}
