//! The files of a Hugging Face checkpoint that the exporter reads, in one place: `pio-export`
//! opens them and `pio download` fetches exactly these (and nothing else) from the hub.

pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// The shard list of a sharded checkpoint (`weight_map`: tensor name -> file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The weights of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Tokenizer files and the chat template, copied into an export when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
];
/// Image and video preprocessing settings of vision-language models.
pub const PROCESSOR_FILES: &[&str] =
    &["preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json"];

use std::path::{Path, PathBuf};

/// What is wrong with a `model.safetensors.index.json`.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{} is not valid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has no `weight_map` object", path.display())]
    NoWeightMap { path: PathBuf },
    #[error("{}: weight_map entry for {tensor} is not a file name", path.display())]
    NotAFileName { path: PathBuf, tensor: String },
    #[error("{}: weight_map entry for {tensor} is not a .safetensors file in the same folder: {file:?}", path.display())]
    BadFileName { path: PathBuf, tensor: String, file: String },
    #[error("{}: weight_map lists no tensors", path.display())]
    Empty { path: PathBuf },
}

/// The shard files an index lists (`text` is the index read from `path`, which only names it in
/// errors), sorted and without repeats. Each must be a plain `*.safetensors` name in the same
/// folder: an index is input, and its names become paths that are opened or downloaded.
pub fn shard_files(text: &str, path: &Path) -> Result<Vec<String>, IndexError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|source| IndexError::Json { path: path.to_path_buf(), source })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| IndexError::NoWeightMap { path: path.to_path_buf() })?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| IndexError::NotAFileName { path: path.to_path_buf(), tensor: tensor.clone() })?;
        if !is_plain_file_name(file) || !file.ends_with(".safetensors") {
            return Err(IndexError::BadFileName {
                path: path.to_path_buf(),
                tensor: tensor.clone(),
                file: file.to_string(),
            });
        }
        files.push(file.to_string());
    }
    if files.is_empty() {
        return Err(IndexError::Empty { path: path.to_path_buf() });
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// A name that stays inside its folder when joined to it: no separators, not `.` or `..`.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}
