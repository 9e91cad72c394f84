//! [`Hub`]: a model repository at a revision, from the cache or the hub, as a snapshot folder.

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};
use pio_models::files::{shard_files, INDEX_FILE, SINGLE_FILE};
use pio_models::size::format_bytes;

use crate::cache::{cached_commit, is_commit_hash, missing_files, model_repo, RepoCache};
use crate::disk::free_space;
use crate::error::HubError;
use crate::http::{Http, Target};
use crate::info::{RepoInfo, Sibling};
use crate::progress::Bars;
use crate::selection::{select, weights, Weights};
use crate::transfer::{Fetched, Job, Transfers};

/// The largest index read into memory (GLM-4.7's, with 93 shards, is about 2 MB).
const INDEX_LIMIT: u64 = 64 << 20;

pub(crate) struct HubConfig {
    pub cache: Cache,
    pub endpoint: String,
    pub token: Option<String>,
    pub offline: bool,
    pub retries: u32,
    pub retry_wait: Duration,
    pub parallel: usize,
    pub progress: bool,
}

/// Downloads model repositories into the Hugging Face cache. Build one with
/// [`HubBuilder`](crate::HubBuilder).
pub struct Hub {
    config: HubConfig,
    http: Http,
    /// hf-hub's client, for the repository listing.
    api: Api,
}

/// A complete checkpoint in the cache: `dir` is `snapshots/<commit>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub commit: String,
}

impl Hub {
    pub(crate) fn new(config: HubConfig) -> Result<Self, HubError> {
        let http = Http::new(&config.endpoint, config.token.clone());
        let api = ApiBuilder::from_cache(config.cache.clone())
            .with_endpoint(config.endpoint.clone())
            .with_token(config.token.clone())
            .with_progress(false)
            .with_user_agent("pio-hub", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| HubError::Client(Box::new(e)))?;
        Ok(Hub { config, http, api })
    }

    /// The cache folder (`$HF_HOME/hub`).
    pub fn cache_dir(&self) -> &Path {
        self.config.cache.path()
    }

    pub fn is_offline(&self) -> bool {
        self.config.offline
    }

    /// The repository at `revision` from the cache alone; an error names what is missing.
    pub fn cached(&self, repo_id: &str, revision: &str) -> Result<Snapshot, HubError> {
        let repo = model_repo(repo_id, revision)?;
        let not_cached = || HubError::NotCached {
            repo: repo_id.into(),
            revision: revision.into(),
            cache: self.cache_dir().to_path_buf(),
        };
        let commit = cached_commit(&self.config.cache, &repo).ok_or_else(not_cached)?;
        let dir = RepoCache::new(&self.config.cache, &repo).snapshot_dir(&commit);
        if !dir.is_dir() {
            return Err(not_cached());
        }
        let missing = missing_files(&dir)?;
        if !missing.is_empty() {
            return Err(HubError::Incomplete { repo: repo_id.into(), revision: revision.into(), dir, missing });
        }
        Ok(Snapshot { dir, commit })
    }

    /// The cached snapshot if it is complete, else a download (what `pio-export --model` does:
    /// no request when the checkpoint is already there).
    pub fn snapshot(&self, repo_id: &str, revision: &str) -> Result<Snapshot, HubError> {
        match self.cached(repo_id, revision) {
            Err(HubError::NotCached { .. } | HubError::Incomplete { .. }) if !self.config.offline => {
                self.download(repo_id, revision)
            }
            other => other,
        }
    }

    /// Brings the files `pio-export` reads at `revision` into the cache (skipping those already
    /// there) and returns the snapshot. Offline, the cached snapshot or an error naming what is
    /// missing; when the hub cannot be reached, a complete cached snapshot with a warning.
    pub fn download(&self, repo_id: &str, revision: &str) -> Result<Snapshot, HubError> {
        if self.config.offline {
            return self.cached(repo_id, revision);
        }
        let repo = model_repo(repo_id, revision)?;
        let info = match self.repo_info(repo_id, &repo) {
            Err(e) if e.is_transient() => {
                return match self.cached(repo_id, revision) {
                    Ok(snapshot) => {
                        tracing::warn!("{e}; using the cached snapshot {}", snapshot.dir.display());
                        Ok(snapshot)
                    }
                    Err(_) => Err(e),
                }
            }
            other => other?,
        };
        let commit = info.sha.clone();
        let cache = RepoCache::new(&self.config.cache, &repo);
        let snapshot = cache.snapshot_dir(&commit);
        let shards = match weights(repo_id, revision, &info)? {
            Weights::Single => vec![SINGLE_FILE.to_string()],
            Weights::Sharded => self.shard_list(repo_id, &commit, &snapshot)?,
        };
        let files = select(repo_id, &info, &shards)?;
        let todo: Vec<&Sibling> = files.into_iter().filter(|s| !snapshot.join(&s.rfilename).is_file()).collect();
        self.check_disk_space(repo_id, &cache, &todo)?;
        if !todo.is_empty() {
            self.fetch_all(repo_id, &commit, &cache, &todo)?;
        }
        if !is_commit_hash(revision) {
            self.config
                .cache
                .repo(repo.clone())
                .create_ref(&commit)
                .map_err(HubError::io("write", cache.ref_file(revision)))?;
        }
        Ok(Snapshot { dir: snapshot, commit })
    }

    fn repo_info(&self, repo_id: &str, repo: &Repo) -> Result<RepoInfo, HubError> {
        let request =
            self.api.repo(repo.clone()).info_request().query("blobs", "true").timeout(Duration::from_secs(120));
        let url = request.url().to_string();
        let target = Target { repo: repo_id, revision: repo.revision(), file: None };
        let response = self.http.send(request, target)?;
        let info: RepoInfo = response.into_json().map_err(|e| HubError::Protocol {
            url: url.clone(),
            problem: format!("the listing is not what a hub sends: {e}"),
        })?;
        if !is_commit_hash(&info.sha) {
            return Err(HubError::Protocol { url, problem: format!("commit {:?} is not a hash", info.sha) });
        }
        Ok(info)
    }

    /// The resolve URL of `file` at `commit` (hf-hub's).
    fn resolve_url(&self, repo_id: &str, commit: &str, file: &str) -> String {
        let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, commit.to_string());
        self.api.repo(repo).url(file)
    }

    /// The shards the index lists: read from the snapshot if it has the index, else fetched
    /// into memory (it is small, and the disk check comes before anything is written).
    fn shard_list(&self, repo_id: &str, commit: &str, snapshot: &Path) -> Result<Vec<String>, HubError> {
        let cached = snapshot.join(INDEX_FILE);
        let text = if cached.is_file() {
            std::fs::read_to_string(&cached).map_err(HubError::io("read", &cached))?
        } else {
            let url = self.resolve_url(repo_id, commit, INDEX_FILE);
            let target = Target { repo: repo_id, revision: commit, file: Some(INDEX_FILE) };
            let mut text = String::new();
            let body = self.http.get(&url, 0, target)?.into_reader();
            body.take(INDEX_LIMIT).read_to_string(&mut text).map_err(|source| HubError::Read { url, source })?;
            text
        };
        Ok(shard_files(&text, Path::new(INDEX_FILE))?)
    }

    /// Refuses a download that cannot fit: the bytes still to come (sizes from the listing, less
    /// what interrupted transfers already hold) against the free space at the cache.
    fn check_disk_space(&self, repo_id: &str, cache: &RepoCache, todo: &[&Sibling]) -> Result<(), HubError> {
        let mut needed = 0u64;
        let mut total = 0u64;
        for s in todo {
            let size = s.size().unwrap_or(0);
            // Sizes come from the server: a sum past u64 is no smaller than any disk.
            total = total.saturating_add(size);
            let have = match s.expected_etag() {
                Some(etag) if cache.blob(etag).is_file() => size,
                Some(etag) => std::fs::metadata(cache.incomplete(etag)).map(|m| m.len().min(size)).unwrap_or(0),
                None => 0,
            };
            needed = needed.saturating_add(size - have);
        }
        if todo.iter().any(|s| s.size().is_none()) {
            tracing::warn!("the hub listed no size for some files of {repo_id}: the disk check counts them as empty");
        }
        let (free, dir) =
            free_space(self.cache_dir()).map_err(HubError::io("check the free space at", self.cache_dir()))?;
        if needed > free {
            return Err(HubError::DiskSpace { repo: repo_id.into(), needed, total, files: todo.len(), free, dir });
        }
        tracing::info!("{repo_id}: {} files, {} to download", todo.len(), format_bytes(needed));
        Ok(())
    }

    /// Transfers `todo` with up to `parallel` files at a time; the first failure stops the
    /// others (each keeps what it got, for the next run) and is returned.
    fn fetch_all(&self, repo_id: &str, commit: &str, cache: &RepoCache, todo: &[&Sibling]) -> Result<(), HubError> {
        let total = todo.iter().fold(0u64, |sum, s| sum.saturating_add(s.size().unwrap_or(0)));
        let bars = Bars::new(self.config.progress, total, todo.len());
        let cancel = AtomicBool::new(false);
        let resolve = |file: &str| self.resolve_url(repo_id, commit, file);
        let transfers = Transfers {
            http: &self.http,
            cache,
            repo: repo_id,
            commit,
            resolve_url: &resolve,
            retries: self.config.retries,
            retry_wait: self.config.retry_wait,
            cancel: &cancel,
        };
        let queue: Mutex<VecDeque<(usize, &Sibling)>> = Mutex::new(todo.iter().copied().enumerate().collect());
        let errors: Mutex<Vec<(usize, HubError)>> = Mutex::new(Vec::new());
        let next = || queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        std::thread::scope(|scope| {
            for _ in 0..self.config.parallel.min(todo.len()) {
                scope.spawn(|| {
                    while let Some((i, sibling)) = next() {
                        if cancel.load(Ordering::Relaxed) {
                            break;
                        }
                        let job = Job {
                            file: &sibling.rfilename,
                            size: sibling.size(),
                            lfs_sha256: sibling.lfs.as_ref().map(|l| l.sha256.as_str()),
                        };
                        match transfers.fetch(&job, &mut bars.file(job.file)) {
                            Ok(Fetched::Done | Fetched::Cancelled) => {}
                            Err(e) => {
                                cancel.store(true, Ordering::Relaxed);
                                errors.lock().unwrap_or_else(|p| p.into_inner()).push((i, e));
                            }
                        }
                    }
                });
            }
        });
        bars.finish();
        let mut errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
        errors.sort_by_key(|(i, _)| *i);
        let mut errors = errors.into_iter().map(|(_, e)| e);
        match errors.next() {
            None => Ok(()),
            Some(first) => {
                for other in errors {
                    tracing::warn!("also: {other}");
                }
                Err(first)
            }
        }
    }
}
