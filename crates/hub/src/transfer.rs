//! One file from the hub into the cache: `blobs/<etag>.incomplete` grows (resumed with a Range
//! request after a dropped connection, in this run or the next), is checked against the hub's
//! hash, and only then is renamed to `blobs/<etag>` and linked into the snapshot. A file that
//! fails its check is deleted, so nothing unchecked is ever reachable from a snapshot.
//!
//! hf-hub 0.4's own `download` renames and links before any check (and does not verify), so
//! this part is ours; the layout is hf-hub's and `huggingface_hub`'s.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hf_hub::api::Progress;

use crate::cache::{is_safe_etag, RepoCache};
use crate::digest::FileDigest;
use crate::error::HubError;
use crate::http::{shown, Http, Target};

const CHUNK: usize = 1 << 20;
/// The longest wait a `Retry-After` gets (a server asking for hours is retried sooner; the
/// retries then run out and the download stops, to be resumed by the next run).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// One file to fetch, as the repository listing describes it.
pub(crate) struct Job<'a> {
    pub file: &'a str,
    pub size: Option<u64>,
    pub lfs_sha256: Option<&'a str>,
}

/// What the transfers of one download share.
pub(crate) struct Transfers<'a> {
    pub http: &'a Http,
    pub cache: &'a RepoCache,
    pub repo: &'a str,
    pub commit: &'a str,
    /// `file` -> its resolve URL at `commit`.
    pub resolve_url: &'a (dyn Fn(&str) -> String + Sync),
    pub retries: u32,
    pub retry_wait: Duration,
    /// Set when another file failed: the others stop at their next chunk, keeping what they got.
    pub cancel: &'a AtomicBool,
}

pub(crate) enum Fetched {
    Done,
    Cancelled,
}

/// An exclusive lock on a blob (flock, as `huggingface_hub`'s filelock takes it), so two
/// downloads of the same file (ours or Python's) do not write one `.incomplete` together.
fn lock_blob(path: &Path, file: &str) -> Result<File, HubError> {
    use rustix::fs::{flock, FlockOperation};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(HubError::io("create", dir))?;
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(HubError::io("open the lock file", path))?;
    if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
        tracing::info!("waiting for another download of {file} (lock {})", path.display());
        flock(&lock, FlockOperation::LockExclusive).map_err(|e| HubError::Io {
            action: "lock",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
    }
    Ok(lock)
}

/// Feeds the first `len` bytes of `file` to `digest` (the part an earlier run got).
fn hash_prefix(file: &mut File, len: u64, digest: &mut FileDigest, path: &Path) -> Result<(), HubError> {
    file.seek(SeekFrom::Start(0)).map_err(HubError::io("read", path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(CHUNK);
        file.read_exact(&mut buf[..n]).map_err(HubError::io("read", path))?;
        digest.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

impl Transfers<'_> {
    fn target<'t>(&'t self, file: &'t str) -> Target<'t> {
        Target { repo: self.repo, revision: self.commit, file: Some(file) }
    }

    pub(crate) fn fetch(&self, job: &Job, progress: &mut impl Progress) -> Result<Fetched, HubError> {
        let url = (self.resolve_url)(job.file);
        let meta = self.retrying(job.file, || self.http.metadata(&url, self.target(job.file)))?;
        if !is_safe_etag(&meta.etag) {
            return Err(HubError::Protocol { url, problem: format!("ETag {:?} is not a hash", meta.etag) });
        }
        let size = match (job.size, meta.size) {
            (Some(listed), Some(sent)) if listed != sent => {
                return Err(HubError::Protocol {
                    url,
                    problem: format!("{} is listed with {listed} bytes but announced with {sent}", job.file),
                })
            }
            (Some(size), _) | (None, Some(size)) => size,
            (None, None) => return Err(HubError::Protocol { url, problem: format!("no size for {}", job.file) }),
        };
        progress.init(size as usize, job.file);
        let blob = self.cache.blob(&meta.etag);
        let _lock = if blob.is_file() { None } else { Some(lock_blob(&self.cache.lock(&meta.etag), job.file)?) };
        // Checked again under the lock: another process may have finished it meanwhile.
        if !blob.is_file() {
            let digest = FileDigest::new(job.lfs_sha256, &meta.etag, size);
            match self.receive(job.file, &meta.url, size, digest, &meta.etag, progress)? {
                Fetched::Done => {}
                Fetched::Cancelled => return Ok(Fetched::Cancelled),
            }
        } else {
            progress.update(size as usize);
        }
        self.cache.link(self.commit, job.file, &meta.etag)?;
        progress.finish();
        Ok(Fetched::Done)
    }

    /// Fills `blobs/<etag>.incomplete` up to `size` bytes, checks it and renames it to the blob.
    fn receive(
        &self,
        file: &str,
        url: &str,
        size: u64,
        digest: FileDigest,
        etag: &str,
        progress: &mut impl Progress,
    ) -> Result<Fetched, HubError> {
        let mut partial = Partial::open(self.cache.incomplete(etag), size, digest)?;
        if partial.have > 0 {
            tracing::info!("{file}: resuming at {} of {size} bytes", partial.have);
            progress.update(partial.have as usize);
        }
        let mut failures = 0u32;
        while partial.have < size {
            let mut retry_after = None;
            let stopped = match self.http.get(url, partial.have, self.target(file)) {
                Err(e) if e.is_transient() => {
                    retry_after = e.retry_after();
                    std::io::Error::other(e)
                }
                Err(e) => return Err(e),
                Ok(response) => {
                    match response.status() {
                        206 => {
                            let start = response
                                .header("Content-Range")
                                .and_then(|r| r.trim().strip_prefix("bytes "))
                                .and_then(|r| r.split('-').next())
                                .and_then(|s| s.parse::<u64>().ok());
                            if start != Some(partial.have) {
                                return Err(HubError::Protocol {
                                    url: shown(url).to_string(),
                                    problem: format!(
                                        "asked for bytes from {}, got Content-Range {start:?}",
                                        partial.have
                                    ),
                                });
                            }
                        }
                        200 if partial.have > 0 => {
                            // The server ignored the Range header: start over.
                            partial.restart()?;
                            progress.init(size as usize, file);
                        }
                        200 => {}
                        other => {
                            return Err(HubError::Protocol {
                                url: shown(url).to_string(),
                                problem: format!("HTTP {other} to a download request"),
                            })
                        }
                    }
                    match self.copy_body(response, &mut partial, file, progress)? {
                        Copied::Complete => break,
                        Copied::Cancelled => return Ok(Fetched::Cancelled),
                        Copied::Stopped(e) => e,
                    }
                }
            };
            if failures >= self.retries {
                let (got, source) = (partial.have, stopped);
                return Err(HubError::Interrupted { repo: self.repo.into(), file: file.into(), got, size, source });
            }
            failures += 1;
            let wait = self.wait(failures, retry_after);
            tracing::warn!(
                "{file}: transfer stopped at {} of {size} bytes ({stopped}); resuming in {wait:?} (retry {failures} of {})",
                partial.have,
                self.retries
            );
            std::thread::sleep(wait);
        }
        partial.finish(self.repo, file, &self.cache.blob(etag))?;
        Ok(Fetched::Done)
    }

    /// `attempt`, again after a transient failure ([`HubError::is_transient`]) up to `retries`
    /// times, waiting as a transfer does between tries.
    fn retrying<T>(&self, file: &str, mut attempt: impl FnMut() -> Result<T, HubError>) -> Result<T, HubError> {
        let mut failures = 0u32;
        loop {
            match attempt() {
                Err(e) if e.is_transient() && failures < self.retries => {
                    failures += 1;
                    let wait = self.wait(failures, e.retry_after());
                    tracing::warn!("{file}: {e}; retrying in {wait:?} (retry {failures} of {})", self.retries);
                    std::thread::sleep(wait);
                }
                other => return other,
            }
        }
    }

    /// The wait before retry number `failures` (from 1): `retry_wait`, doubling with each retry,
    /// or longer when the server asked for it (at most [`MAX_RETRY_AFTER`]).
    fn wait(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.retry_wait.saturating_mul(1 << (failures.max(1) - 1).min(6));
        retry_after.map_or(backoff, |after| backoff.max(after.min(MAX_RETRY_AFTER)))
    }

    /// Appends a response body to the partial file until the file is complete, the body ends
    /// or fails, or the download is cancelled.
    fn copy_body(
        &self,
        response: ureq::Response,
        partial: &mut Partial,
        file: &str,
        progress: &mut impl Progress,
    ) -> Result<Copied, HubError> {
        let mut body = response.into_reader();
        let mut buf = vec![0u8; CHUNK];
        while partial.have < partial.size {
            if self.cancel.load(Ordering::Relaxed) {
                return Ok(Copied::Cancelled);
            }
            let n = match body.read(&mut buf) {
                Ok(0) => return Ok(Copied::Stopped(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => n,
                Err(e) => return Ok(Copied::Stopped(e)),
            };
            partial.append(&buf[..n], self.repo, file)?;
            progress.update(n);
        }
        Ok(Copied::Complete)
    }
}

enum Copied {
    Complete,
    Cancelled,
    /// The body ended early or the connection failed: resume from what the file has.
    Stopped(std::io::Error),
}

/// `blobs/<etag>.incomplete` and the digest of its bytes.
struct Partial {
    path: PathBuf,
    out: File,
    have: u64,
    size: u64,
    digest: FileDigest,
}

impl Partial {
    /// Opens (or creates) the partial file; bytes an earlier run got are hashed and kept.
    fn open(path: PathBuf, size: u64, mut digest: FileDigest) -> Result<Self, HubError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(HubError::io("create", dir))?;
        }
        let mut out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(HubError::io("open", &path))?;
        let mut have = out.metadata().map_err(HubError::io("read", &path))?.len();
        if have > size {
            out.set_len(0).map_err(HubError::io("truncate", &path))?;
            have = 0;
        }
        hash_prefix(&mut out, have, &mut digest, &path)?;
        out.seek(SeekFrom::Start(have)).map_err(HubError::io("seek in", &path))?;
        Ok(Partial { path, out, have, size, digest })
    }

    fn restart(&mut self) -> Result<(), HubError> {
        self.out.set_len(0).map_err(HubError::io("truncate", &self.path))?;
        self.out.seek(SeekFrom::Start(0)).map_err(HubError::io("seek in", &self.path))?;
        self.digest.reset();
        self.have = 0;
        Ok(())
    }

    /// Appends bytes; more than the announced size discards the file.
    fn append(&mut self, bytes: &[u8], repo: &str, file: &str) -> Result<(), HubError> {
        let got = self.have + bytes.len() as u64;
        if got > self.size {
            let _ = std::fs::remove_file(&self.path);
            return Err(HubError::SizeMismatch { repo: repo.into(), file: file.into(), got, expected: self.size });
        }
        self.out.write_all(bytes).map_err(HubError::io("write", &self.path))?;
        self.digest.update(bytes);
        self.have = got;
        Ok(())
    }

    /// Checks the complete file and renames it to `blob`; a file that fails is deleted.
    fn finish(self, repo: &str, file: &str, blob: &Path) -> Result<(), HubError> {
        self.out.sync_all().map_err(HubError::io("write", &self.path))?;
        drop(self.out);
        if let Err(e) = self.digest.verify(repo, file) {
            std::fs::remove_file(&self.path).map_err(HubError::io("remove", &self.path))?;
            return Err(e);
        }
        std::fs::rename(&self.path, blob).map_err(HubError::io("rename into", blob))
    }
}
