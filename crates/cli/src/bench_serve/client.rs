//! One streamed completion over HTTP with the time of every token: the load generator's
//! client (hyper, one connection per request, loopback only).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// Where the server is: a loopback address (the load generator refuses any other).
#[derive(Clone, Debug)]
pub struct Target {
    pub address: SocketAddr,
    pub api_key: Option<String>,
}

impl Target {
    /// `http://HOST:PORT` (a path after it is ignored), HOST resolving to loopback addresses only.
    pub fn from_url(url: &str, api_key: Option<String>) -> Result<Target> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--url {url}: must start with http:// (the load generator speaks plain HTTP)"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let addresses: Vec<SocketAddr> = authority
            .to_socket_addrs()
            .with_context(|| format!("--url {url}: `{authority}` is not HOST:PORT"))?
            .collect();
        if addresses.is_empty() || !addresses.iter().all(|a| is_loopback(a.ip())) {
            bail!("--url {url}: the load generator only targets this machine (127.0.0.0/8 or ::1), not {addresses:?}");
        }
        Ok(Target { address: addresses[0], api_key })
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// What one request asks for.
#[derive(Clone, Debug)]
pub struct Ask {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
}

/// What happened to one request.
#[derive(Clone, Debug)]
pub struct Trace {
    pub prompt_tokens: usize,
    pub sent: Instant,
    /// When each token arrived (a chunk of several tokens gives each the chunk's time).
    pub tokens: Vec<Instant>,
    pub cached_tokens: usize,
    /// None when it completed.
    pub error: Option<String>,
}

impl Trace {
    pub fn ttft_s(&self) -> Option<f64> {
        self.tokens.first().map(|t| (*t - self.sent).as_secs_f64())
    }

    /// Seconds between consecutive tokens.
    pub fn itls_s(&self) -> impl Iterator<Item = f64> + '_ {
        self.tokens.windows(2).map(|w| (w[1] - w[0]).as_secs_f64())
    }
}

/// Sends `ask` as a streamed, greedy `/v1/completions` request that asks for every token's id
/// (so each token comes as a chunk of its own) and ignores eos (so it runs `max_tokens`).
/// `progress` counts the tokens received so far.
pub async fn stream_completion(target: &Target, ask: &Ask, progress: Option<Arc<AtomicUsize>>) -> Trace {
    let sent = Instant::now();
    let mut trace = Trace { prompt_tokens: ask.prompt.len(), sent, tokens: vec![], cached_tokens: 0, error: None };
    if let Err(e) = run(target, ask, &mut trace, progress.as_deref()).await {
        trace.error = Some(format!("{e:#}"));
    }
    trace
}

async fn run(target: &Target, ask: &Ask, trace: &mut Trace, progress: Option<&AtomicUsize>) -> Result<()> {
    let body = json!({
        "prompt": ask.prompt,
        "max_tokens": ask.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
        "return_token_ids": true,
    });
    let stream = TcpStream::connect(target.address).await.context("cannot connect")?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("connection ended: {e}");
        }
    });
    let mut request = Request::post("/v1/completions")
        .header(HOST, target.address.to_string())
        .header(CONTENT_TYPE, "application/json");
    if let Some(key) = &target.api_key {
        request = request.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = request.body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&text));
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        let now = Instant::now();
        pending.extend_from_slice(&data);
        while let Some(end) = find(&pending, b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data: ") else { continue };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let chunk: Value =
                    serde_json::from_str(data).with_context(|| format!("a chunk that is not JSON: {data}"))?;
                if let Some(error) = chunk.get("error") {
                    bail!("error event: {error}");
                }
                let ids = chunk["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
                trace.tokens.extend(std::iter::repeat_n(now, ids));
                if let Some(p) = progress {
                    p.fetch_add(ids, Ordering::Relaxed);
                }
                if let Some(cached) = chunk["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
                    trace.cached_tokens = cached as usize;
                }
            }
        }
    }
    if !done {
        bail!("the stream ended without [DONE]");
    }
    if trace.tokens.len() != ask.max_tokens {
        bail!("{} tokens came back, {} were asked for", trace.tokens.len(), ask.max_tokens);
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The served model's `max_model_len` (from `/v1/models`).
pub async fn max_model_len(target: &Target) -> Result<usize> {
    let stream = TcpStream::connect(target.address).await.context("cannot connect")?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::get("/v1/models").header(HOST, target.address.to_string());
    if let Some(key) = &target.api_key {
        request = request.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    let response = sender.send_request(request.body(Full::new(Bytes::new()))?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("GET /v1/models: HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    let models: Value = serde_json::from_slice(&body)?;
    models["data"][0]["max_model_len"]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| anyhow!("GET /v1/models gave no max_model_len: {models}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_taken() {
        assert!(Target::from_url("http://127.0.0.1:8000", None).is_ok());
        assert!(Target::from_url("http://[::1]:8000/v1", None).is_ok());
        assert!(Target::from_url("http://localhost:8000", None).is_ok());
        let far = Target::from_url("http://10.1.2.3:8000", None).unwrap_err().to_string();
        assert!(far.contains("only targets this machine"), "{far}");
        assert!(Target::from_url("https://127.0.0.1:8000", None).is_err());
        assert!(Target::from_url("http://127.0.0.1", None).is_err());
    }
}
