//! The check a downloaded file must pass before it becomes a blob: LFS files (the safetensors)
//! against the sha256 the hub lists, other files against their git blob id (the sha1 of
//! `blob <size>\0<bytes>`, which is the ETag the hub sends for them).

use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use crate::error::HubError;

pub(crate) enum FileDigest {
    Sha256 {
        expected: String,
        state: Sha256,
    },
    GitBlob {
        expected: String,
        size: u64,
        state: Sha1,
    },
    /// Neither a sha256 nor a git oid to compare with (a mirror that sends other etags).
    Unchecked,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn git_blob_state(size: u64) -> Sha1 {
    let mut state = Sha1::new();
    state.update(format!("blob {size}\0").as_bytes());
    state
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl FileDigest {
    /// `lfs_sha256` from the listing; `etag` from the file's metadata (a sha256 for LFS files,
    /// a git oid for the others); `size` the bytes announced.
    pub(crate) fn new(lfs_sha256: Option<&str>, etag: &str, size: u64) -> Self {
        if let Some(expected) = lfs_sha256.filter(|s| is_hex(s, 64)).or(is_hex(etag, 64).then_some(etag)) {
            FileDigest::Sha256 { expected: expected.to_ascii_lowercase(), state: Sha256::new() }
        } else if is_hex(etag, 40) {
            FileDigest::GitBlob { expected: etag.to_ascii_lowercase(), size, state: git_blob_state(size) }
        } else {
            FileDigest::Unchecked
        }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            FileDigest::Sha256 { state, .. } => state.update(bytes),
            FileDigest::GitBlob { state, .. } => state.update(bytes),
            FileDigest::Unchecked => {}
        }
    }

    /// Forgets the bytes seen (the transfer starts over).
    pub(crate) fn reset(&mut self) {
        match self {
            FileDigest::Sha256 { state, .. } => *state = Sha256::new(),
            FileDigest::GitBlob { state, size, .. } => *state = git_blob_state(*size),
            FileDigest::Unchecked => {}
        }
    }

    /// Whether the bytes seen are the file the hub lists.
    pub(crate) fn verify(self, repo: &str, file: &str) -> Result<(), HubError> {
        let (algorithm, expected, actual) = match self {
            FileDigest::Sha256 { expected, state } => ("sha256", expected, hex(&state.finalize())),
            FileDigest::GitBlob { expected, state, .. } => ("git blob sha1", expected, hex(&state.finalize())),
            FileDigest::Unchecked => {
                tracing::warn!("{file} of {repo}: the hub gave no sha256 or git oid, so it was not checked");
                return Ok(());
            }
        };
        if expected == actual {
            Ok(())
        } else {
            Err(HubError::HashMismatch { repo: repo.into(), file: file.into(), algorithm, expected, actual })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_known_values() {
        // `git hash-object` of "hello\n" and sha256sum of the same bytes.
        let mut git = FileDigest::new(None, "ce013625030ba8dba906f756967f9e9ca394464a", 6);
        git.update(b"hello\n");
        assert!(git.verify("r", "f").is_ok());
        let sha = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        let mut lfs = FileDigest::new(Some(sha), "ignored", 6);
        lfs.update(b"hel");
        lfs.update(b"lo\n");
        assert!(lfs.verify("r", "f").is_ok());
        let mut bad = FileDigest::new(Some(sha), "ignored", 6);
        bad.update(b"hello!");
        let err = bad.verify("o/n", "model.safetensors").unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("sha256") && err.contains(sha), "{err}");
    }
}
