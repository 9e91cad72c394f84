//! How a [`Hub`] is set up: explicit builder calls, with defaults from the environment variables
//! `huggingface_hub` reads (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::HubError;
use crate::hub::Hub;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Settings of a [`Hub`]. Start from [`HubBuilder::from_env`] (what the commands do) or
/// [`HubBuilder::new`] (no environment: what tests do), change what you need, then `build`.
#[derive(Clone, Debug)]
pub struct HubBuilder {
    hf_home: PathBuf,
    /// The cache folder when not `hf_home/hub` (`HF_HUB_CACHE`).
    hub_cache: Option<PathBuf>,
    endpoint: String,
    token: Option<String>,
    offline: bool,
    retries: u32,
    retry_wait: Duration,
    parallel: usize,
    progress: bool,
}

/// `huggingface_hub`'s reading of a boolean variable.
fn truthy(value: &OsString) -> bool {
    matches!(value.to_string_lossy().trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

impl HubBuilder {
    /// Defaults with the cache in `hf_home/hub` and the token from `hf_home/token` if there is
    /// one: the public hub, online, 5 retries per file, 8 files at a time, no progress bars.
    pub fn new(hf_home: impl Into<PathBuf>) -> Self {
        let hf_home = hf_home.into();
        let token = hf_hub::Cache::new(hf_home.join("hub")).token();
        HubBuilder {
            hf_home,
            hub_cache: None,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token,
            offline: false,
            retries: 5,
            retry_wait: Duration::from_secs(1),
            parallel: 8,
            progress: false,
        }
    }

    /// Defaults from the process environment (see [`HubBuilder::from_vars`]).
    pub fn from_env() -> Result<Self, HubError> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// Defaults from `var` (an environment lookup): `HF_HOME` (else `$XDG_CACHE_HOME/huggingface`,
    /// else `~/.cache/huggingface`), `HF_ENDPOINT`, `HF_TOKEN` (else the token file under
    /// `HF_HOME`) and `HF_HUB_OFFLINE`.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Result<Self, HubError> {
        let non_empty = |name: &str| var(name).filter(|v| !v.is_empty());
        let hf_home = match non_empty("HF_HOME") {
            Some(home) => PathBuf::from(home),
            None => non_empty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| non_empty("HOME").map(|h| Path::new(&h).join(".cache")))
                .ok_or(HubError::NoCacheDir)?
                .join("huggingface"),
        };
        let mut builder = HubBuilder::new(hf_home);
        // `huggingface_hub` reads HF_HUB_CACHE, then the older HUGGINGFACE_HUB_CACHE.
        if let Some(cache) = non_empty("HF_HUB_CACHE").or_else(|| non_empty("HUGGINGFACE_HUB_CACHE")) {
            builder = builder.hub_cache(cache);
        }
        if let Some(endpoint) = non_empty("HF_ENDPOINT") {
            builder = builder.endpoint(endpoint.to_string_lossy());
        }
        if let Some(token) = non_empty("HF_TOKEN") {
            builder = builder.token(Some(token.to_string_lossy().trim().to_string()));
        }
        if let Some(offline) = var("HF_HUB_OFFLINE") {
            builder = builder.offline(truthy(&offline));
        }
        Ok(builder)
    }

    /// The hub's base URL (a mirror, or a stand-in in tests).
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = url.into().trim_end_matches('/').to_string();
        self
    }

    /// The token sent to the endpoint (never to the storage hosts it redirects to).
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// The cache folder (snapshots, blobs, refs), instead of `hf_home/hub`; the token file stays
    /// under `hf_home`.
    pub fn hub_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.hub_cache = Some(dir.into());
        self
    }

    /// Use the cache only: no request leaves the machine.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// How many times one file's transfer is resumed after a dropped connection before the
    /// download stops (it then resumes on the next run).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The wait before the first retry; it doubles with each further one.
    pub fn retry_wait(mut self, wait: Duration) -> Self {
        self.retry_wait = wait;
        self
    }

    /// How many files are transferred at once (at least 1).
    pub fn parallel(mut self, files: usize) -> Self {
        self.parallel = files.max(1);
        self
    }

    /// Progress bars on stderr (drawn only when stderr is a terminal).
    pub fn progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    pub fn build(self) -> Result<Hub, HubError> {
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return Err(HubError::InvalidEndpoint(self.endpoint));
        }
        Hub::new(crate::hub::HubConfig {
            cache: hf_hub::Cache::new(self.hub_cache.unwrap_or_else(|| self.hf_home.join("hub"))),
            endpoint: self.endpoint,
            token: self.token,
            offline: self.offline,
            retries: self.retries,
            retry_wait: self.retry_wait,
            parallel: self.parallel,
            progress: self.progress,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn environment_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("token"), "hf_from_file\n").unwrap();
        let home = tmp.path().to_str().unwrap();

        let b = HubBuilder::from_vars(vars(&[("HF_HOME", home)])).unwrap();
        assert_eq!(b.hf_home, tmp.path());
        assert_eq!(b.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(b.token.as_deref(), Some("hf_from_file"), "the token file under HF_HOME");
        assert!(!b.offline);

        let b = HubBuilder::from_vars(vars(&[
            ("HF_HOME", home),
            ("HF_TOKEN", "hf_env"),
            ("HF_ENDPOINT", "http://mirror.example/"),
            ("HF_HUB_OFFLINE", "yes"),
        ]))
        .unwrap();
        assert_eq!(b.token.as_deref(), Some("hf_env"), "HF_TOKEN wins over the token file");
        assert_eq!(b.endpoint, "http://mirror.example");
        assert!(b.offline);

        let b = HubBuilder::from_vars(vars(&[("HOME", "/home/u"), ("HF_HUB_OFFLINE", "0")])).unwrap();
        assert_eq!(b.hf_home, Path::new("/home/u/.cache/huggingface"));
        assert!(!b.offline);
        let b = HubBuilder::from_vars(vars(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x")])).unwrap();
        assert_eq!(b.hf_home, Path::new("/x/huggingface"));
        assert_eq!(b.hub_cache, None);
        // The cache folder of its own, as huggingface_hub reads it (the newer name first).
        let b = HubBuilder::from_vars(vars(&[("HOME", "/home/u"), ("HF_HUB_CACHE", "/data/hub")])).unwrap();
        assert_eq!(b.hub_cache.as_deref(), Some(Path::new("/data/hub")));
        let b =
            HubBuilder::from_vars(vars(&[("HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/old"), ("HF_HUB_CACHE", "/new")]))
                .unwrap();
        assert_eq!(b.hub_cache.as_deref(), Some(Path::new("/new")));
        let b = HubBuilder::from_vars(vars(&[("HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "/old")])).unwrap();
        assert_eq!(b.hub_cache.as_deref(), Some(Path::new("/old")));

        assert!(matches!(HubBuilder::from_vars(vars(&[])), Err(HubError::NoCacheDir)));
        let bad = HubBuilder::from_vars(vars(&[("HOME", "/h"), ("HF_ENDPOINT", "huggingface.co")])).unwrap().build();
        assert!(matches!(bad, Err(HubError::InvalidEndpoint(_))));
    }
}
