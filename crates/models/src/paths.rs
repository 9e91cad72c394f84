//! Where the project keeps what `scripts/setup.sh` fetched: `.cache/pio/` in the repository
//! (ONNX Runtime, the Qwen3 tokenizer), found from `PIO_CACHE_DIR`, then upward from the current
//! folder, then upward from the running executable (so `target/release/pio` finds its repo).

use std::path::{Path, PathBuf};

pub const CACHE_ENV: &str = "PIO_CACHE_DIR";

/// Candidate cache folders in search order (existing ones only).
pub fn cache_dirs() -> Vec<PathBuf> {
    let mut starts = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        starts.push(exe_dir);
    }
    let explicit = std::env::var_os(CACHE_ENV).map(PathBuf::from);
    cache_dirs_from(explicit.as_deref(), &starts)
}

/// `explicit` first, then `.cache/pio` in each start folder or any of its ancestors.
pub fn cache_dirs_from(explicit: Option<&Path>, starts: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    if let Some(e) = explicit {
        if e.is_dir() {
            out.push(e.to_path_buf());
        }
    }
    for start in starts {
        for dir in start.ancestors() {
            let c = dir.join(".cache").join("pio");
            if c.is_dir() && !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// The first cache folder holding `relative` (e.g. `tokenizers/qwen3/tokenizer.json`).
pub fn find_in_cache(relative: &str) -> Option<PathBuf> {
    cache_dirs().into_iter().map(|d| d.join(relative)).find(|p| p.exists())
}

/// The real Qwen3 tokenizer folder fetched by setup (tokenizer.json + tokenizer_config.json).
pub fn qwen3_tokenizer_dir() -> Option<PathBuf> {
    find_in_cache("tokenizers/qwen3/tokenizer.json").and_then(|p| p.parent().map(Path::to_path_buf))
}
