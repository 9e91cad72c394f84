//! A Hugging Face checkpoint folder: config, generation config, safetensors (single or sharded,
//! memory-mapped) and tokenizer files.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use pio_models::config::{GenerationDefaults, ModelConfig};
use safetensors::{Dtype, SafeTensors};

pub use pio_models::files::{INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES};

/// Image-processor files of a vision-language checkpoint, copied into its export (the chat
/// template, `chat_template.json`, travels with the tokenizer files).
pub const PROCESSOR_FILES: &[&str] =
    &["preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json"];

/// Checkpoint tensors by name with their shapes: what an architecture reads (and what a
/// synthetic checkpoint of it writes).
pub type TensorList = Vec<(String, Vec<usize>)>;

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// Where a tensor lives: parsed once from the shard headers at open.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the shard's mmap.
    range: std::ops::Range<usize>,
}

/// A borrowed tensor: dtype, shape and raw little-endian bytes, plus where it came from.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub file: &'a Path,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub generation: Option<GenerationDefaults>,
    shards: Vec<Shard>,
    index: HashMap<String, Entry>,
}

/// One tensor as a safetensors header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Where its bytes are in the file.
    pub range: std::ops::Range<usize>,
}

/// The tensors of a safetensors file (`bytes`; `path` only names it in errors), after checking
/// its header against the file: every range lies inside `bytes` and fits its dtype and shape.
pub fn read_tensor_entries(bytes: &[u8], path: &Path) -> Result<Vec<TensorEntry>> {
    // deserialize validates the header against the file length (catches truncation).
    SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{} is not a valid safetensors file (truncated or corrupt?): {e}", path.display()))?;
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let data_start = 8 + header_len;
    Ok(metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (start, end) = info.data_offsets;
            TensorEntry {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                range: data_start + start..data_start + end,
            }
        })
        .collect())
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the checkpoint is treated as read-only input; a file changed underneath us while
    // exporting is outside what we can guard against (as with every mmap-based loader).
    unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("checkpoint folder {} does not exist", dir.display());
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.exists() { Some(GenerationDefaults::from_file(&gen_path)?) } else { None };

        let files = Self::weight_files(dir)?;
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let mmap = map_file(&path)?;
            for tensor in read_tensor_entries(&mmap, &path)? {
                let entry =
                    Entry { shard: shards.len(), dtype: tensor.dtype, shape: tensor.shape, range: tensor.range };
                if let Some(earlier) = index.insert(tensor.name.clone(), entry) {
                    let first: &Shard = &shards[earlier.shard];
                    bail!("tensor {} is in both {} and {}", tensor.name, first.path.display(), path.display());
                }
            }
            shards.push(Shard { path, mmap });
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), config, generation, shards, index })
    }

    /// The safetensors files: from the index when sharded, else `model.safetensors`.
    fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let files = pio_models::files::shard_files(&text, &index_path)?;
            let mut paths = Vec::new();
            for f in files {
                let p = dir.join(&f);
                if !p.exists() {
                    bail!("missing shard {} (listed in {})", p.display(), index_path.display());
                }
                paths.push(p);
            }
            return Ok(paths);
        }
        let single = dir.join(SINGLE_FILE);
        if single.exists() {
            return Ok(vec![single]);
        }
        bail!("no weights in {}: expected {SINGLE_FILE} or {INDEX_FILE}", dir.display())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Bytes of all tensors (for progress reporting).
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }

    /// Looks up a tensor and checks its shape.
    pub fn tensor(&self, name: &str, expected_shape: &[usize]) -> Result<TensorRef<'_>> {
        let t = self.tensor_any_shape(name)?;
        if t.shape != expected_shape {
            bail!(
                "tensor {name} in {} has shape {:?}, but config.json implies {:?}",
                t.file.display(),
                t.shape,
                expected_shape
            );
        }
        Ok(t)
    }

    pub fn tensor_any_shape(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, entry) = self
            .index
            .get_key_value(name)
            .ok_or_else(|| anyhow!("tensor {name} is missing from the checkpoint in {}", self.dir.display()))?;
        let shard = &self.shards[entry.shard];
        match entry.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => {}
            other => bail!("tensor {name} in {} has dtype {other}; supported: F32, F16, BF16", shard.path.display()),
        }
        Ok(TensorRef {
            name: key,
            file: &shard.path,
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            data: &shard.mmap[entry.range.clone()],
        })
    }

    /// Drops a tensor's pages from this process's resident set once it has been written out
    /// (they stay in the page cache), so peak memory does not grow with the checkpoint.
    pub fn release(&self, name: &str) {
        let Some(entry) = self.index.get(name) else { return };
        let shard = &self.shards[entry.shard];
        let page = 4096;
        let start = entry.range.start / page * page;
        let len = entry.range.end - start;
        // SAFETY: the mapping is a read-only shared file mapping; MADV_DONTNEED only drops this
        // process's page-table entries, and a later read faults the file's pages back in.
        let result = unsafe { shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
        if let Err(e) = result {
            tracing::debug!("madvise(DONTNEED) on {}: {e}", shard.path.display());
        }
    }

    /// Tokenizer files present in the folder.
    pub fn tokenizer_files(&self) -> Vec<PathBuf> {
        self.present(TOKENIZER_FILES)
    }

    /// Image-processor files present in the folder.
    pub fn processor_files(&self) -> Vec<PathBuf> {
        self.present(PROCESSOR_FILES)
    }

    fn present(&self, files: &[&str]) -> Vec<PathBuf> {
        files.iter().map(|f| self.dir.join(f)).filter(|p| p.is_file()).collect()
    }
}
