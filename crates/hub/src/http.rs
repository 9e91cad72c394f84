//! Requests to the hub and the storage it redirects to: the token goes to the endpoint only,
//! redirects are followed by hand (the hub's own headers are on its redirect answer), and
//! failed answers become errors that say what to do (the hub's `X-Error-Code` first).

use std::io::Read;
use std::time::Duration;

use crate::error::HubError;

const MAX_REDIRECTS: usize = 10;
/// The longest error body quoted in a message.
const MESSAGE_LIMIT: u64 = 300;

/// What a request was for, to name it in errors.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub repo: &'a str,
    pub revision: &'a str,
    /// None for the repository listing.
    pub file: Option<&'a str>,
}

/// What a file's metadata request (`HEAD .../resolve/...`) tells.
#[derive(Debug)]
pub(crate) struct FileMeta {
    /// X-Linked-Etag (LFS files: the sha256) or ETag (git oid), without quotes.
    pub etag: String,
    /// X-Linked-Size or Content-Length.
    pub size: Option<u64>,
    /// Where the bytes are: the storage URL the hub redirected to, or the resolve URL itself.
    pub url: String,
}

pub(crate) struct Http {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

/// `scheme://host[:port]` of a URL.
pub(crate) fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// A URL as errors and logs show it: without its query, which for a storage host is a signature
/// that grants access to the file.
pub(crate) fn shown(url: &str) -> &str {
    url.split_once('?').map_or(url, |(path, _)| path)
}

/// `location` resolved against `base` (absolute, scheme-relative or path forms).
fn resolve_location(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let dir = base.rfind('/').map(|i| &base[..=i]).unwrap_or(base);
        format!("{dir}{location}")
    }
}

/// An etag header without its weak marker and quotes.
fn clean_etag(value: &str) -> String {
    value.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

impl Http {
    pub(crate) fn new(endpoint: &str, token: Option<String>) -> Self {
        let agent = ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .redirects(0)
            .timeout_connect(Duration::from_secs(20))
            // A stalled transfer fails (and is resumed) instead of hanging.
            .timeout_read(Duration::from_secs(60))
            .user_agent(concat!("pio-hub/", env!("CARGO_PKG_VERSION"), "; hf-hub/0.4"))
            .build();
        Http { agent, endpoint: endpoint.to_string(), token }
    }

    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self.agent.request(method, url);
        match &self.token {
            Some(token) if origin(url) == origin(&self.endpoint) => {
                request.set("Authorization", &format!("Bearer {token}"))
            }
            _ => request,
        }
    }

    /// Sends a request, turning failed answers and transport errors into [`HubError`]s.
    pub(crate) fn send(&self, request: ureq::Request, target: Target) -> Result<ureq::Response, HubError> {
        let url = request.url().to_string();
        match request.call() {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) => Err(self.status_error(status, response, &url, target)),
            Err(ureq::Error::Transport(source)) => Err(HubError::Connection { url, source: Box::new(source) }),
        }
    }

    /// The metadata of a file: follows the hub's relative redirects (renamed repositories) and
    /// stops at a redirect to storage, whose headers describe the file.
    pub(crate) fn metadata(&self, url: &str, target: Target) -> Result<FileMeta, HubError> {
        let mut url = url.to_string();
        for _ in 0..MAX_REDIRECTS {
            let response = self.send(self.request("HEAD", &url).set("Accept-Encoding", "identity"), target)?;
            let header = |name: &str| response.header(name).map(str::to_string);
            let redirect_to = if (300..400).contains(&response.status()) {
                let location = header("Location").ok_or_else(|| HubError::Protocol {
                    url: url.clone(),
                    problem: format!("HTTP {} without a Location header", response.status()),
                })?;
                Some(resolve_location(&url, &location))
            } else {
                None
            };
            if let Some(next) = &redirect_to {
                if !location_is_absolute(&response) {
                    url = next.clone();
                    continue;
                }
            }
            let etag = header("X-Linked-Etag").or_else(|| header("ETag")).map(|e| clean_etag(&e)).ok_or_else(|| {
                HubError::Protocol {
                    url: url.clone(),
                    problem: "no ETag header (is HF_ENDPOINT a Hugging Face hub?)".into(),
                }
            })?;
            let size = header("X-Linked-Size")
                .or_else(|| if redirect_to.is_none() { header("Content-Length") } else { None })
                .and_then(|s| s.trim().parse().ok());
            return Ok(FileMeta { etag, size, url: redirect_to.unwrap_or(url) });
        }
        Err(HubError::Protocol {
            url: shown(&url).to_string(),
            problem: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// GET from `from` on (a Range request when `from` > 0), following redirects.
    pub(crate) fn get(&self, url: &str, from: u64, target: Target) -> Result<ureq::Response, HubError> {
        let mut url = url.to_string();
        for _ in 0..MAX_REDIRECTS {
            // Bytes as stored: sizes, ranges and hashes are of the file, not of a compressed body.
            let mut request = self.request("GET", &url).set("Accept-Encoding", "identity");
            if from > 0 {
                request = request.set("Range", &format!("bytes={from}-"));
            }
            let response = self.send(request, target)?;
            if !(300..400).contains(&response.status()) {
                return Ok(response);
            }
            let location = response.header("Location").ok_or_else(|| HubError::Protocol {
                url: shown(&url).to_string(),
                problem: format!("HTTP {} without a Location header", response.status()),
            })?;
            url = resolve_location(&url, location);
        }
        Err(HubError::Protocol {
            url: shown(&url).to_string(),
            problem: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    fn status_error(&self, status: u16, response: ureq::Response, url: &str, target: Target) -> HubError {
        let code = response.header("X-Error-Code").unwrap_or_default().to_string();
        let header_message = response.header("X-Error-Message").map(str::to_string);
        let repo = target.repo.to_string();
        let endpoint = self.endpoint.clone();
        let at_endpoint = origin(url) == origin(&self.endpoint);
        // The token goes to the endpoint only: a refusal elsewhere is not about it.
        let has_token = self.has_token() && at_endpoint;
        let url = shown(url);
        // The hub's error code first (it answers 401 for a missing repository, not to tell
        // private ones apart), then the status.
        match (code.as_str(), status, target.file) {
            ("GatedRepo", ..) => HubError::Gated { repo, endpoint, has_token },
            ("RevisionNotFound", ..) => {
                HubError::RevisionNotFound { repo, revision: target.revision.to_string(), endpoint }
            }
            ("RepoNotFound", ..) | ("", 404, None) => HubError::RepoNotFound { repo, endpoint, has_token },
            ("EntryNotFound", _, Some(file)) | ("", 404, Some(file)) => {
                HubError::FileNotFound { repo, file: file.to_string(), url: url.to_string() }
            }
            (_, 401 | 403, _) if at_endpoint => HubError::Unauthorized { url: url.to_string(), status, has_token },
            (_, 401 | 403, _) => HubError::Status {
                url: url.to_string(),
                status,
                message: "the storage host refused the download (its signed link may have expired); run again".into(),
                retry_after: None,
            },
            _ => {
                // Seconds only (an HTTP date is rare from the hub and its CDN).
                let retry_after =
                    response.header("Retry-After").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
                let message = header_message.unwrap_or_else(|| {
                    let mut body = String::new();
                    let _ = response.into_reader().take(MESSAGE_LIMIT).read_to_string(&mut body);
                    body.trim().to_string()
                });
                HubError::Status { url: url.to_string(), status, message, retry_after }
            }
        }
    }
}

/// Whether a redirect's Location names a host (storage) rather than a path on the hub; only
/// path redirects are followed for metadata, as `huggingface_hub` does.
fn location_is_absolute(response: &ureq::Response) -> bool {
    response
        .header("Location")
        .is_some_and(|l| l.starts_with("http://") || l.starts_with("https://") || l.starts_with("//"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_and_origins() {
        assert_eq!(origin("https://huggingface.co/a/b"), "https://huggingface.co");
        assert_eq!(origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        let base = "https://huggingface.co/o/n/resolve/main/config.json";
        assert_eq!(
            resolve_location(base, "/o/m/resolve/main/config.json"),
            "https://huggingface.co/o/m/resolve/main/config.json"
        );
        assert_eq!(resolve_location(base, "https://cdn.example/x?y=1"), "https://cdn.example/x?y=1");
        assert_eq!(resolve_location(base, "//cdn.example/x"), "https://cdn.example/x");
        assert_eq!(resolve_location(base, "other.json"), "https://huggingface.co/o/n/resolve/main/other.json");
        assert_eq!(clean_etag("W/\"abc\""), "abc");
    }
}
