//! A Hugging Face checkpoint folder: config, generation config, safetensors (single or sharded,
//! memory-mapped) and tokenizer files.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use pio_models::config::{GenerationDefaults, ModelConfig, TextConfig};
use pio_models::files::{CONFIG_FILE, GENERATION_CONFIG_FILE};
use safetensors::{Dtype, SafeTensors};

use crate::error::fs_error;
pub use crate::error::CheckpointError;
/// `PROCESSOR_FILES`: the image-processor files of a vision-language checkpoint, copied into its export (the chat
/// template, `chat_template.json`, travels with the tokenizer files).
pub use pio_models::files::{INDEX_FILE, PROCESSOR_FILES, SINGLE_FILE, TOKENIZER_FILES};

type Result<T> = std::result::Result<T, CheckpointError>;

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
    let invalid = |source| CheckpointError::Safetensors { file: path.to_path_buf(), source };
    // deserialize validates the header against the file length (catches truncation).
    SafeTensors::deserialize(bytes).map_err(invalid)?;
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(invalid)?;
    // Both cannot overflow: deserialize checked that the header and every range lie inside `bytes`.
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
    let file = File::open(path).map_err(fs_error("open", path))?;
    // SAFETY: the checkpoint is treated as read-only input; a file changed underneath us while
    // exporting is outside what we can guard against (as with every mmap-based loader).
    Ok(unsafe { Mmap::map(&file) }.map_err(fs_error("map", path))?)
}

impl Checkpoint {
    /// Opens a checkpoint folder: reads and validates config.json (and generation_config.json if present), maps
    /// the safetensors files and checks their headers. Errors name the file and the field or tensor.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(CheckpointError::NoFolder { dir: dir.to_path_buf() });
        }
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        let gen_path = dir.join(GENERATION_CONFIG_FILE);
        let generation = if gen_path.exists() { Some(GenerationDefaults::from_file(&gen_path)?) } else { None };

        let files = Self::weight_files(dir)?;
        let mut shards: Vec<Shard> = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let mmap = map_file(&path)?;
            for tensor in read_tensor_entries(&mmap, &path)? {
                let entry =
                    Entry { shard: shards.len(), dtype: tensor.dtype, shape: tensor.shape, range: tensor.range };
                if let Some(earlier) = index.insert(tensor.name.clone(), entry) {
                    // A tensor seen twice in one file cannot happen (the header is a JSON object); across
                    // files the earlier one is in a shard already pushed.
                    let first = shards.get(earlier.shard).map_or_else(|| path.clone(), |s| s.path.clone());
                    return Err(CheckpointError::DuplicateTensor { tensor: tensor.name, first, second: path });
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
            let text = std::fs::read_to_string(&index_path).map_err(fs_error("read", &index_path))?;
            let files = pio_models::files::shard_files(&text, &index_path)?;
            let mut paths = Vec::new();
            for f in files {
                let p = dir.join(&f);
                if !p.exists() {
                    return Err(CheckpointError::MissingShard { shard: p, index: index_path });
                }
                paths.push(p);
            }
            return Ok(paths);
        }
        let single = dir.join(SINGLE_FILE);
        if single.exists() {
            return Ok(vec![single]);
        }
        Err(CheckpointError::NoWeights { dir: dir.to_path_buf() })
    }

    /// Checks that every tensor of `expected` (the architecture's list for this config) is present with its
    /// shape and a supported dtype, before any graph is built: a checkpoint that does not match its config
    /// fails here, naming the first tensor that is missing or wrong. `needed` is a lower bound of the list's
    /// length (layers and experts), compared with the tensors present before the list is built, so that a
    /// config describing absurdly many layers or experts costs nothing.
    pub fn check_tensors(&self, needed: u64, expected: impl FnOnce() -> Result<TensorList>) -> Result<()> {
        if needed > self.index.len() as u64 {
            let t = &self.config.text;
            return Err(CheckpointError::TooFewTensors {
                dir: self.dir.clone(),
                needed,
                layers: t.num_hidden_layers,
                experts: t.moe.as_ref().map_or(0, |m| m.num_experts),
                held: self.index.len(),
            });
        }
        for (name, shape) in expected()? {
            self.tensor(&name, &shape)?;
        }
        Ok(())
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
            return Err(CheckpointError::WrongShape {
                tensor: name.to_string(),
                file: t.file.to_path_buf(),
                shape: t.shape,
                expected: expected_shape.to_vec(),
            });
        }
        Ok(t)
    }

    /// Looks up a tensor of a floating dtype (F32, F16, BF16), whatever its shape.
    pub fn tensor_any_shape(&self, name: &str) -> Result<TensorRef<'_>> {
        let missing = || CheckpointError::MissingTensor { tensor: name.to_string(), dir: self.dir.clone() };
        let (key, entry) = self.index.get_key_value(name).ok_or_else(missing)?;
        let shard = self.shards.get(entry.shard).ok_or_else(missing)?;
        match entry.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => {}
            dtype => {
                return Err(CheckpointError::UnsupportedDtype {
                    tensor: name.to_string(),
                    file: shard.path.clone(),
                    dtype,
                })
            }
        }
        // The range was checked against this mapping when the header was read.
        let data = shard.mmap.get(entry.range.clone()).ok_or_else(missing)?;
        Ok(TensorRef { name: key, file: &shard.path, dtype: entry.dtype, shape: entry.shape.clone(), data })
    }

    /// Drops a tensor's pages from this process's resident set once it has been written out
    /// (they stay in the page cache), so peak memory does not grow with the checkpoint.
    pub fn release(&self, name: &str) {
        let Some(entry) = self.index.get(name) else { return };
        let Some(shard) = self.shards.get(entry.shard) else { return };
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

/// The lm_head's weight in the Hugging Face layout, None when it is tied to the embeddings. Here,
/// below both `arch` and `moe`, as the tensor lists are.
pub fn lm_head_weight(t: &TextConfig) -> Option<&'static str> {
    if t.tie_word_embeddings {
        None
    } else {
        Some("lm_head.weight")
    }
}

/// One layer's attention tensors in the Hugging Face layout (Qwen3, Qwen3-MoE, Qwen3-VL and GLM
/// share it), with their shapes. Here, below both `arch` and `moe`, so that neither imports the other.
pub fn attention_tensors(t: &TextConfig, prefix: &str, out: &mut TensorList) {
    let (h, q, kv) = (t.hidden_size, t.q_width(), t.kv_width());
    for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
        out.push((format!("{prefix}.self_attn.{name}.weight"), vec![rows, h]));
        if t.attention_bias {
            out.push((format!("{prefix}.self_attn.{name}.bias"), vec![rows]));
        }
    }
    out.push((format!("{prefix}.self_attn.o_proj.weight"), vec![h, q]));
    if t.qk_norm {
        out.push((format!("{prefix}.self_attn.q_norm.weight"), vec![t.head_dim]));
        out.push((format!("{prefix}.self_attn.k_norm.weight"), vec![t.head_dim]));
    }
    out.push((format!("{prefix}.input_layernorm.weight"), vec![h]));
    out.push((format!("{prefix}.post_attention_layernorm.weight"), vec![h]));
}

/// SwiGLU MLP tensors under `prefix` (e.g. `model.layers.0.mlp`).
pub fn mlp_tensors(hidden: usize, intermediate: usize, prefix: &str, out: &mut TensorList) {
    out.push((format!("{prefix}.gate_proj.weight"), vec![intermediate, hidden]));
    out.push((format!("{prefix}.up_proj.weight"), vec![intermediate, hidden]));
    out.push((format!("{prefix}.down_proj.weight"), vec![hidden, intermediate]));
}
