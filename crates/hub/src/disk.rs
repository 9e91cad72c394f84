//! Free space where the cache is (checked before the first byte of a download).

use std::path::{Path, PathBuf};

/// Bytes available to this user on the filesystem holding `dir` (or, if it does not exist yet,
/// its nearest existing ancestor, which is where it will be created), and that folder.
pub(crate) fn free_space(dir: &Path) -> std::io::Result<(u64, PathBuf)> {
    let existing = dir.ancestors().find(|p| p.is_dir()).unwrap_or(Path::new("."));
    let stat = rustix::fs::statvfs(existing)?;
    Ok((stat.f_bavail.saturating_mul(stat.f_frsize), existing.to_path_buf()))
}
