//! The repository listing (`/api/models/{repo}/revision/{rev}?blobs=true`): the commit a
//! revision points to, and each file's size, git oid and, for LFS files, sha256.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub(crate) struct RepoInfo {
    pub sha: String,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Sibling {
    pub rfilename: String,
    pub size: Option<u64>,
    #[serde(rename = "blobId")]
    pub blob_id: Option<String>,
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Lfs {
    pub sha256: String,
    pub size: u64,
}

impl Sibling {
    /// The file's size: the LFS object's for LFS files (`size` is then the object's too on the
    /// hub, but mirrors differ).
    pub fn size(&self) -> Option<u64> {
        self.lfs.as_ref().map(|l| l.size).or(self.size)
    }

    /// The etag the hub will name the file by, when the listing tells: the sha256 of an LFS
    /// file, the git oid of another.
    pub fn expected_etag(&self) -> Option<&str> {
        self.lfs.as_ref().map(|l| l.sha256.as_str()).or(self.blob_id.as_deref())
    }
}
