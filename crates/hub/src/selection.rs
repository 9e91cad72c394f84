//! Which files of a repository a download fetches: exactly what `pio-export` reads (config,
//! generation config, the safetensors or the shards its index lists, tokenizer files and chat
//! template, image/video processor settings), nothing else (no .bin weights, no README).

use pio_models::files::{
    CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, PROCESSOR_FILES, SINGLE_FILE, TOKENIZER_FILES,
};

use crate::error::HubError;
use crate::info::{RepoInfo, Sibling};

/// How a repository stores its weights.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Weights {
    /// `model.safetensors.index.json` and the shards it lists.
    Sharded,
    /// `model.safetensors`.
    Single,
}

fn has(info: &RepoInfo, name: &str) -> bool {
    info.siblings.iter().any(|s| s.rfilename == name)
}

/// Checks the repository is a safetensors transformers checkpoint and says how it is stored.
pub(crate) fn weights(repo: &str, revision: &str, info: &RepoInfo) -> Result<Weights, HubError> {
    if !has(info, CONFIG_FILE) {
        return Err(HubError::NoConfig { repo: repo.into(), revision: revision.into() });
    }
    if has(info, INDEX_FILE) {
        Ok(Weights::Sharded)
    } else if has(info, SINGLE_FILE) {
        Ok(Weights::Single)
    } else {
        let has_bin = info.siblings.iter().any(|s| s.rfilename.ends_with(".bin"));
        Err(HubError::NoSafetensors { repo: repo.into(), has_bin })
    }
}

/// The files to fetch, small ones first: the fixed names the repository has, and `shards`
/// (from the index, or `model.safetensors`), each of which it must have.
pub(crate) fn select<'a>(repo: &str, info: &'a RepoInfo, shards: &[String]) -> Result<Vec<&'a Sibling>, HubError> {
    let find = |name: &str| info.siblings.iter().find(|s| s.rfilename == name);
    let fixed = [CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE].into_iter().chain(TOKENIZER_FILES.iter().copied());
    let mut files: Vec<&Sibling> = fixed.chain(PROCESSOR_FILES.iter().copied()).filter_map(find).collect();
    for shard in shards {
        // Names go into URLs and paths unescaped: hub shard names only use these characters.
        if !shard.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(HubError::UnsupportedFileName { repo: repo.into(), file: shard.clone() });
        }
        let sibling = find(shard).ok_or_else(|| HubError::MissingShard { repo: repo.into(), file: shard.clone() })?;
        files.push(sibling);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(names: &[&str]) -> RepoInfo {
        let siblings = names.iter().map(|n| serde_json::json!({"rfilename": n})).collect::<Vec<_>>();
        serde_json::from_value(serde_json::json!({"sha": "0".repeat(40), "siblings": siblings})).unwrap()
    }

    #[test]
    fn only_what_export_reads() {
        let i = info(&[
            "config.json",
            "README.md",
            "model.safetensors.index.json",
            "model-1.safetensors",
            "model-2.safetensors",
            "consolidated.safetensors",
            "pytorch_model.bin",
            "tokenizer.json",
            "chat_template.jinja",
            "preprocessor_config.json",
            "original/params.json",
        ]);
        assert_eq!(weights("o/n", "main", &i).unwrap(), Weights::Sharded);
        let shards = ["model-1.safetensors".to_string(), "model-2.safetensors".to_string()];
        let names: Vec<&str> = select("o/n", &i, &shards).unwrap().iter().map(|s| s.rfilename.as_str()).collect();
        assert_eq!(
            names,
            [
                "config.json",
                "model.safetensors.index.json",
                "tokenizer.json",
                "chat_template.jinja",
                "preprocessor_config.json",
                "model-1.safetensors",
                "model-2.safetensors"
            ]
        );
        let missing = select("o/n", &i, &["model-3.safetensors".to_string()]).unwrap_err();
        assert!(matches!(missing, HubError::MissingShard { .. }), "{missing}");
        let odd = select("o/n", &i, &["a b.safetensors".to_string()]).unwrap_err();
        assert!(matches!(odd, HubError::UnsupportedFileName { .. }), "{odd}");
    }

    #[test]
    fn repositories_export_cannot_read_are_refused() {
        let bin = weights("o/n", "main", &info(&["config.json", "pytorch_model.bin"])).unwrap_err();
        assert!(bin.to_string().contains(".bin weights"), "{bin}");
        let no_config = weights("o/n", "main", &info(&["model.safetensors"])).unwrap_err();
        assert!(matches!(no_config, HubError::NoConfig { .. }));
        assert_eq!(weights("o/n", "main", &info(&["config.json", "model.safetensors"])).unwrap(), Weights::Single);
    }
}
