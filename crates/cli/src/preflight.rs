//! What `pio` checks before it loads a model, so that a mistake in the command line costs no
//! load time: the graph folder's pio.json, whether the folder has the tokenizer and chat template
//! a prompt needs, token ids against its vocabulary and context length, image files, stop
//! strings, the address `pio serve` will listen on. The engine checks requests again once the
//! model is loaded (the GPU may cap the context further); these checks only answer first.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pio_models::Manifest;
use pio_runtime::engine::{EngineError, Prompt};
use pio_runtime::tokenizer::{TokenizerConfig, TOKENIZER_FILE};

/// An argument or input the model cannot take, found before it loads. `pio` exits with code 2
/// for it, as for clap's usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub(crate) struct Refused {
    /// The flag (`--prompt-ids`) or the field of an input file (`prompt_ids`).
    what: String,
    message: String,
}

impl Refused {
    /// `what`: a flag, or a file and line.
    pub(crate) fn new(what: impl Into<String>, message: impl Into<String>) -> Self {
        Refused { what: what.into(), message: message.into() }
    }
}

/// What a graph folder offers, read without loading the model.
pub(crate) struct GraphFolder {
    dir: PathBuf,
    manifest: Manifest,
    has_tokenizer: bool,
    has_chat_template: bool,
}

impl GraphFolder {
    /// Reads `dir`'s pio.json and looks for the tokenizer and chat template as the engine does
    /// (a chat template counts only beside a tokenizer.json).
    pub(crate) fn inspect(dir: &Path) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let has_tokenizer = dir.join(TOKENIZER_FILE).is_file();
        let has_chat_template = has_tokenizer && TokenizerConfig::from_dir(dir)?.chat_template.is_some();
        Ok(GraphFolder { dir: dir.to_path_buf(), manifest, has_tokenizer, has_chat_template })
    }

    /// Refuses `prompt` (given as `what`: a flag or an input file's field) when this folder cannot
    /// take it: text without a tokenizer, a chat without a chat template, token ids that are
    /// empty or outside the vocabulary, or that leave no room for `max_tokens` in a sequence of
    /// the graph's context length (or `max_model_len`, when smaller).
    pub(crate) fn check_prompt(
        &self,
        prompt: &Prompt,
        what: &str,
        max_tokens: usize,
        max_model_len: Option<usize>,
    ) -> Result<()> {
        if max_tokens == 0 {
            return Err(Refused::new(what, "max_tokens must be at least 1").into());
        }
        match prompt {
            Prompt::Text(_) => self.require_tokenizer(what, "pass token ids instead of text")?,
            Prompt::Chat(_) => self.require_chat_template(what, "use --raw to send the text as it is")?,
            Prompt::Ids(ids) => {
                self.check_ids(what, ids)?;
                let limit = self.sequence_limit(max_model_len);
                if ids.len() + max_tokens > limit {
                    let error =
                        EngineError::ContextLength { prompt_tokens: ids.len(), max_tokens: Some(max_tokens), limit };
                    return Err(anyhow::Error::new(error).context(what.to_string()));
                }
            }
        }
        Ok(())
    }

    /// Stop strings are matched on the decoded text: they need a tokenizer.
    pub(crate) fn check_stop(&self, stop: &[String]) -> Result<()> {
        if stop.is_empty() {
            return Ok(());
        }
        self.require_tokenizer("--stop", "stop strings are matched on the text")
    }

    /// Token ids given as `what`: some, and all inside the vocabulary.
    pub(crate) fn check_ids(&self, what: &str, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Err(Refused::new(what, "no token ids").into());
        }
        let vocab = self.manifest.dims.vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            let message = format!("token id {bad} is outside the vocabulary (size {vocab})");
            return Err(Refused::new(what, message).into());
        }
        Ok(())
    }

    /// Text given as `what` is tokenized: it needs a tokenizer.
    pub(crate) fn check_text(&self, what: &str) -> Result<()> {
        self.require_tokenizer(what, "pass token ids instead of text")
    }

    /// Whether the graph returns the last position's logits only (no `--all-logits`).
    pub(crate) fn last_position_logits(&self) -> bool {
        self.manifest.options.last_token_logits
    }

    /// Tokens one sequence holds: the graph's context, or `max_model_len` when smaller.
    pub(crate) fn sequence_limit(&self, max_model_len: Option<usize>) -> usize {
        max_model_len.map_or(self.context_length(), |n| n.min(self.context_length()))
    }

    /// `pio chat` renders every turn with the chat template.
    pub(crate) fn check_chat(&self) -> Result<()> {
        self.require_chat_template("pio chat", "use `pio run --raw` for text as it is")
    }

    /// `--image` files: the model must take images, and each file must be there and decode within
    /// `limits` (a few milliseconds an image, against the model's load).
    pub(crate) fn check_images(&self, images: &[PathBuf], limits: &pio_image::DecodeLimits) -> Result<()> {
        if images.is_empty() {
            return Ok(());
        }
        if !self.takes_images() {
            return Err(Refused::new("--image", self.takes_no_images()).into());
        }
        images.iter().try_for_each(|image| {
            check_file("--image", image)?;
            check_image("--image", image, limits)
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model has a vision encoder.
    pub(crate) fn takes_images(&self) -> bool {
        self.manifest.vision.is_some()
    }

    /// Why an image, or an image's setting, is refused for a model without a vision encoder.
    pub(crate) fn takes_no_images(&self) -> String {
        format!("{} takes no images (it has no vision encoder)", self.dir.display())
    }

    /// The folder is a staged export (pio-export --stages N).
    pub(crate) fn is_staged(&self) -> bool {
        !self.manifest.stages.is_empty()
    }

    fn context_length(&self) -> usize {
        self.manifest.dims.context_length
    }

    fn require_tokenizer(&self, what: &str, hint: &str) -> Result<()> {
        if self.has_tokenizer {
            return Ok(());
        }
        Err(Refused::new(what, format!("{} has no {TOKENIZER_FILE}: {hint}", self.dir.display())).into())
    }

    fn require_chat_template(&self, what: &str, hint: &str) -> Result<()> {
        if self.has_chat_template {
            return Ok(());
        }
        let dir = self.dir.display();
        let message = if self.has_tokenizer {
            format!(
                "{dir} has no chat template (no chat_template.jinja, chat_template.json or chat_template in \
                 tokenizer_config.json): {hint}"
            )
        } else {
            format!("{dir} has no {TOKENIZER_FILE}, so no chat template: {hint}")
        };
        Err(Refused::new(what, message).into())
    }
}

/// Binds `host:port` and lets it go: a busy port, an address of another machine or a typo in the
/// host name is refused before the model loads, with the error the server's own bind would give.
pub(crate) fn check_address(host: &str, port: u16) -> Result<()> {
    match TcpListener::bind((host, port)) {
        Ok(_probe) => Ok(()),
        Err(source) => Err(pio_server::ServerError::Bind { address: format!("{host}:{port}"), source }.into()),
    }
}

/// Refuses `flag` when `path`, a file it needs, is not there.
/// The image at `path` decodes within `limits` (`what`: the flag or command that named it).
pub(crate) fn check_image(what: &str, path: &Path, limits: &pio_image::DecodeLimits) -> Result<()> {
    pio_image::decode(&pio_image::ImageInput::Path(path.to_path_buf()), limits)
        .map(drop)
        .context(Refused::new(format!("{what} {}", path.display()), "is not an image the model can take"))
}

pub(crate) fn check_file(flag: &str, path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Refused::new(format!("{flag} {}", path.display()), "is not a file").into()),
        Err(e) => Err(Refused::new(format!("{flag} {}", path.display()), e.to_string()).into()),
    }
}
