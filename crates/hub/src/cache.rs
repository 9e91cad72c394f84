//! The Hugging Face cache layout (what `huggingface_hub` and transformers read):
//!
//! ```text
//! $HF_HOME/hub/models--owner--name/
//!   blobs/<etag>                 file contents, named by etag (sha256 for LFS files, git oid else)
//!   blobs/<etag>.incomplete      a transfer in progress or interrupted (resumed from its length)
//!   snapshots/<commit>/<file>    symlinks ../../blobs/<etag>, made only once the blob is checked
//!   refs/<revision>              the commit a branch or tag pointed to at the last download
//! $HF_HOME/hub/.locks/models--owner--name/<etag>.lock
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hf_hub::{Cache, Repo, RepoType};
use pio_models::files::{shard_files, CONFIG_FILE, INDEX_FILE, SINGLE_FILE};

use crate::error::HubError;

/// One repository's folders in the cache.
pub(crate) struct RepoCache {
    root: PathBuf,
    locks: PathBuf,
}

/// A 40-digit commit hash (such a revision is used as is; anything else goes through refs/).
pub(crate) fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// An etag the hub sent, usable as a file name (hex digits, maybe dashes: never a path).
pub(crate) fn is_safe_etag(etag: &str) -> bool {
    !etag.is_empty() && etag.len() <= 128 && etag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl RepoCache {
    pub(crate) fn new(cache: &Cache, repo: &Repo) -> Self {
        let folder = repo.folder_name();
        RepoCache { root: cache.path().join(&folder), locks: cache.path().join(".locks").join(folder) }
    }

    pub(crate) fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub(crate) fn ref_file(&self, revision: &str) -> PathBuf {
        self.root.join("refs").join(revision)
    }

    pub(crate) fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    pub(crate) fn incomplete(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub(crate) fn lock(&self, etag: &str) -> PathBuf {
        self.locks.join(format!("{etag}.lock"))
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` (a relative symlink, as
    /// `huggingface_hub` makes them, so the cache can be moved). The link is made under a name of
    /// its own and renamed over the pointer, so that two downloads of the same repository (two
    /// `pio download`s, or one beside `pio-export --model`) linking the same file both succeed.
    pub(crate) fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf, HubError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = self.snapshot_dir(commit);
        std::fs::create_dir_all(&dir).map_err(HubError::io("create", &dir))?;
        let pointer = dir.join(file);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let staged = dir.join(format!(".{file}.{}.{unique}.link", std::process::id()));
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("../../blobs").join(etag), &staged)
            .map_err(HubError::io("link", &staged))?;
        #[cfg(not(unix))]
        std::fs::copy(self.blob(etag), &staged).map_err(HubError::io("copy into", &staged))?;
        if let Err(e) = std::fs::rename(&staged, &pointer) {
            let _ = std::fs::remove_file(&staged);
            return Err(HubError::io("link", &pointer)(e));
        }
        Ok(pointer)
    }
}

/// The commit a revision stands for in the cache, found the way `huggingface_hub` finds it: a
/// commit hash as is, else `refs/<revision>` (read through hf-hub's cache, which resolves the
/// ref to `snapshots/<commit>/config.json`).
pub(crate) fn cached_commit(cache: &Cache, repo: &Repo) -> Option<String> {
    if is_commit_hash(repo.revision()) {
        return Some(repo.revision().to_string());
    }
    let config = cache.repo(repo.clone()).get(CONFIG_FILE)?;
    let commit = config.parent()?.file_name()?.to_str()?;
    Some(commit.to_string())
}

/// What a snapshot folder lacks of what the exporter needs: config.json and the weights (every
/// shard the index lists, or model.safetensors). Empty when complete.
pub(crate) fn missing_files(dir: &Path) -> Result<Vec<String>, HubError> {
    let mut missing = Vec::new();
    if !dir.join(CONFIG_FILE).is_file() {
        missing.push(CONFIG_FILE.to_string());
    }
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(HubError::io("read", &index))?;
        for shard in shard_files(&text, &index)? {
            if !dir.join(&shard).is_file() {
                missing.push(shard);
            }
        }
    } else if !dir.join(SINGLE_FILE).is_file() {
        missing.push(format!("{SINGLE_FILE} (or {INDEX_FILE} and its shards)"));
    }
    Ok(missing)
}

/// The `Repo` of a model repository at a revision, after checking both are safe to use in
/// paths and URLs.
pub(crate) fn model_repo(repo_id: &str, revision: &str) -> Result<Repo, HubError> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p != "."
            && p != ".."
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
        return Err(HubError::InvalidRepoId(repo_id.to_string()));
    }
    let revision_ok =
        !revision.is_empty() && revision.len() <= 256 && !revision.starts_with('/') && revision.split('/').all(part_ok);
    if !revision_ok {
        return Err(HubError::InvalidRevision(revision.to_string()));
    }
    Ok(Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_escape_the_cache_are_refused() {
        for bad in ["", "a/b/c", "../x", "a/..", "a b/c", "a/b\\c", "/abs"] {
            assert!(matches!(model_repo(bad, "main"), Err(HubError::InvalidRepoId(_))), "{bad:?}");
        }
        for bad in ["", "../main", "/main", "a//b", "x y"] {
            assert!(matches!(model_repo("o/n", bad), Err(HubError::InvalidRevision(_))), "{bad:?}");
        }
        assert!(model_repo("gpt2", "main").is_ok());
        assert!(model_repo("Qwen/Qwen3-4B-Instruct-2507", "refs/pr/1").is_ok());
        assert!(is_safe_etag("0123abcd") && !is_safe_etag("../x") && !is_safe_etag(""));
        assert!(is_commit_hash(&"a".repeat(40)) && !is_commit_hash("main"));
    }
}
