//! A stand-in for the Hugging Face hub on 127.0.0.1, serving in-memory repositories through the
//! routes pio-hub uses, with the hub's headers and error codes:
//!
//! - `GET /api/models/{repo}/revision/{rev}[?blobs=true]`: the listing (sizes, git oids, LFS sha256)
//! - `HEAD|GET /{repo}/resolve/{rev}/{file}`: plain files answered directly (ETag = git oid),
//!   LFS files redirected to `/cdn/{sha256}` with X-Linked-Etag / X-Linked-Size / X-Repo-Commit
//! - `GET /cdn/{sha256}`: the bytes, with Range support
//!
//! Faults on demand: a connection dropped halfway through a file once, a file served with other
//! bytes than its listed sha256, a size in the listing that is not the file's. Each connection
//! answers one request and closes.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha1::Sha1;
use sha2::{Digest, Sha256};

pub struct HubFile {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Stored in LFS (redirected to storage, listed with a sha256), as safetensors are.
    pub lfs: bool,
    /// A size for the listing other than the real one.
    pub listed_size: Option<u64>,
}

impl HubFile {
    pub fn plain(name: &str, bytes: impl Into<Vec<u8>>) -> Self {
        HubFile { name: name.into(), bytes: bytes.into(), lfs: false, listed_size: None }
    }
    pub fn lfs(name: &str, bytes: impl Into<Vec<u8>>) -> Self {
        HubFile { name: name.into(), bytes: bytes.into(), lfs: true, listed_size: None }
    }
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.bytes))
    }
    pub fn git_oid(&self) -> String {
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", self.bytes.len()).as_bytes());
        h.update(&self.bytes);
        hex(&h.finalize())
    }
    /// The name of its blob in the cache.
    pub fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            self.git_oid()
        }
    }
}

pub struct HubRepo {
    pub id: String,
    pub commit: String,
    pub files: Vec<HubFile>,
    /// A gated repository: its files need this token.
    pub token: Option<String>,
}

impl HubRepo {
    pub fn new(id: &str, files: Vec<HubFile>) -> Self {
        let commit = hex(&Sha1::digest(id.as_bytes()));
        HubRepo { id: id.into(), commit, files, token: None }
    }
    pub fn file(&self, name: &str) -> &HubFile {
        self.files.iter().find(|f| f.name == name).expect("no such file in the stand-in repo")
    }
}

#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Faults {
    cut_once: HashSet<String>,
    /// (file, status): the next storage/content request of `file` answers this status.
    fail_once: Vec<(String, u16)>,
    corrupt: HashSet<String>,
}

struct State {
    base: String,
    repos: Vec<HubRepo>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<Logged>>,
}

pub struct StandInHub {
    pub url: String,
    state: Arc<State>,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic filler bytes of a given length.
pub fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed).collect()
}

impl StandInHub {
    pub fn start(repos: Vec<HubRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State { base: url.clone(), repos, faults: Mutex::default(), log: Mutex::default() });
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(&state, stream));
            }
        });
        StandInHub { url, state }
    }

    /// The next transfer of `file` stops halfway (the connection is closed).
    pub fn cut_once(&self, file: &str) {
        self.state.faults.lock().unwrap().cut_once.insert(file.into());
    }

    /// The next content request of `file` answers `status` (no body).
    pub fn fail_once(&self, file: &str, status: u16) {
        self.state.faults.lock().unwrap().fail_once.push((file.into(), status));
    }

    /// `file` is served with one byte changed (its listed sha256 stays the real one's).
    pub fn corrupt(&self, file: &str, on: bool) {
        let mut faults = self.state.faults.lock().unwrap();
        if on {
            faults.corrupt.insert(file.into());
        } else {
            faults.corrupt.remove(file);
        }
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    /// Requests for file contents (resolve and storage), not listings.
    pub fn file_requests(&self) -> Vec<Logged> {
        self.requests().into_iter().filter(|r| !r.path.starts_with("/api/")).collect()
    }

    pub fn clear_log(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Close the connection after this many body bytes.
    cut_at: Option<usize>,
}

impl Response {
    fn new(status: u16) -> Self {
        Response { status, headers: Vec::new(), body: Vec::new(), cut_at: None }
    }
    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    fn error(status: u16, code: &str) -> Self {
        Response::new(status).header("X-Error-Code", code).header("X-Error-Message", format!("stand-in hub: {code}"))
    }
    fn json(value: serde_json::Value) -> Self {
        let mut r = Response::new(200).header("Content-Type", "application/json");
        r.body = value.to_string().into_bytes();
        r
    }
}

fn serve(state: &State, mut stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut range = None;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(value.trim().to_string()),
                "authorization" => authorization = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    state.log.lock().unwrap().push(Logged {
        method: method.clone(),
        path: path.to_string(),
        range: range.clone(),
        authorization: authorization.clone(),
    });
    let response = route(state, path, query, range.as_deref(), authorization.as_deref());
    write(&mut stream, &method, response);
}

fn route(state: &State, path: &str, query: &str, range: Option<&str>, authorization: Option<&str>) -> Response {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "models", owner, name, "revision", rev] => {
            let Some(repo) = find_repo(state, owner, name) else { return Response::error(404, "RepoNotFound") };
            if *rev != "main" && *rev != repo.commit {
                return Response::error(404, "RevisionNotFound");
            }
            listing(repo, query.contains("blobs=true"))
        }
        [owner, name, "resolve", rev, file] => {
            let Some(repo) = find_repo(state, owner, name) else { return Response::error(404, "RepoNotFound") };
            if *rev != "main" && *rev != repo.commit {
                return Response::error(404, "RevisionNotFound");
            }
            if let Some(token) = &repo.token {
                if authorization != Some(format!("Bearer {token}").as_str()) {
                    return Response::error(401, "GatedRepo");
                }
            }
            let Some(f) = repo.files.iter().find(|f| f.name == *file) else {
                return Response::error(404, "EntryNotFound");
            };
            let commit = repo.commit.clone();
            if f.lfs {
                Response::new(302)
                    .header("Location", format!("{}/cdn/{}", state.base, f.sha256()))
                    .header("X-Repo-Commit", commit)
                    .header("X-Linked-Etag", format!("\"{}\"", f.sha256()))
                    .header("X-Linked-Size", f.bytes.len().to_string())
                    .header("ETag", format!("\"{}\"", f.git_oid()))
            } else {
                content(state, f, range).header("X-Repo-Commit", commit).header("ETag", format!("\"{}\"", f.git_oid()))
            }
        }
        ["cdn", sha] => {
            let file = state.repos.iter().flat_map(|r| &r.files).find(|f| f.lfs && f.sha256() == *sha);
            match file {
                Some(f) => content(state, f, range).header("ETag", format!("\"{sha}\"")),
                None => Response::new(404),
            }
        }
        _ => Response::new(404),
    }
}

fn find_repo<'a>(state: &'a State, owner: &str, name: &str) -> Option<&'a HubRepo> {
    state.repos.iter().find(|r| r.id == format!("{owner}/{name}"))
}

fn listing(repo: &HubRepo, blobs: bool) -> Response {
    let siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|f| {
            let size = f.listed_size.unwrap_or(f.bytes.len() as u64);
            let mut s = serde_json::json!({"rfilename": f.name});
            if blobs {
                s["size"] = size.into();
                s["blobId"] = f.git_oid().into();
                if f.lfs {
                    s["lfs"] = serde_json::json!({"sha256": f.sha256(), "size": size, "pointerSize": 134});
                }
            }
            s
        })
        .collect();
    Response::json(serde_json::json!({"id": repo.id, "sha": repo.commit, "siblings": siblings}))
}

/// The file's bytes (or the asked range), with the faults set for it.
fn content(state: &State, f: &HubFile, range: Option<&str>) -> Response {
    let mut bytes = f.bytes.clone();
    let mut faults = state.faults.lock().unwrap();
    if let Some(i) = faults.fail_once.iter().position(|(n, _)| *n == f.name) {
        let (_, status) = faults.fail_once.remove(i);
        return Response::new(status).header("Retry-After", "0");
    }
    if faults.corrupt.contains(&f.name) {
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
    }
    let total = bytes.len();
    let start = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let mut response = match start {
        Some(s) if s >= total => return Response::new(416).header("Content-Range", format!("bytes */{total}")),
        Some(s) => {
            let mut r = Response::new(206).header("Content-Range", format!("bytes {s}-{}/{total}", total - 1));
            r.body = bytes[s..].to_vec();
            r
        }
        None => {
            let mut r = Response::new(200);
            r.body = bytes;
            r
        }
    };
    if faults.cut_once.remove(&f.name) {
        response.cut_at = Some(response.body.len() / 2);
    }
    response.header("Accept-Ranges", "bytes")
}

fn write(stream: &mut TcpStream, method: &str, response: Response) {
    let reason = match response.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", response.body.len()));
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let end = response.cut_at.unwrap_or(response.body.len());
        let _ = stream.write_all(&response.body[..end]);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
