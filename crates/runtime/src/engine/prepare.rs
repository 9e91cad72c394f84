//! A submitted prompt to token ids and images, on the caller's thread: chat messages through the
//! chat template (their images read and decoded, each image's placeholder expanded to its token
//! count, the rope index computed), text through the tokenizer, ids as they are. Everything a
//! request can get wrong here is an [`EngineError::InvalidRequest`] naming the field or the
//! content part, before any model work.

use std::path::PathBuf;
use std::time::Instant;

use pio_image::{ImageProcessor, ImageProcessorConfig};
use pio_models::manifest::Manifest;

use crate::chat_template::{ChatTemplate, RenderOptions};
use crate::tokenizer::Tokenizer;
use crate::vision::chat_images::split_chat_images;
use crate::vision::{ImageSettings, MultimodalPrompt};

use super::error::EngineError;
use super::images::SequenceImages;
use super::request::Prompt;

/// A prompt ready for the engine.
pub(crate) struct Prepared {
    pub ids: Vec<u32>,
    /// Its images (None: none; always None for a text model).
    pub images: Option<SequenceImages>,
}

/// How images come into a vision-language model's prompts.
struct ImageIntake {
    processor: ImageProcessor,
    settings: ImageSettings,
    image_token: u32,
    merge: usize,
}

/// What turns prompts into [`Prepared`] ones for one model.
pub(crate) struct Preparer {
    graphs: PathBuf,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<ChatTemplate>,
    images: Option<ImageIntake>,
}

impl Preparer {
    /// For the export in `graphs` (its manifest read already); a vision-language export reads its
    /// image processor's config there.
    pub(crate) fn new(
        graphs: PathBuf,
        manifest: &Manifest,
        tokenizer: Option<Tokenizer>,
        chat_template: Option<ChatTemplate>,
        settings: ImageSettings,
    ) -> Result<Self, EngineError> {
        let images = match &manifest.vision {
            None => None,
            Some(vision) => {
                let config = ImageProcessorConfig::from_checkpoint_dir(&graphs).map_err(|e| {
                    EngineError::model_failed(
                        format!("cannot read the image processor's config in {}", graphs.display()),
                        e,
                    )
                })?;
                let threads = settings.preprocess_threads.unwrap_or_else(default_image_threads);
                Some(ImageIntake {
                    processor: ImageProcessor::new(config).with_threads(threads),
                    settings,
                    image_token: vision.image_token_id,
                    merge: vision.spatial_merge_size,
                })
            }
        };
        Ok(Preparer { graphs, tokenizer, chat_template, images })
    }

    pub(crate) fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    pub(crate) fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The image processor of a vision-language model.
    pub(crate) fn image_processor(&self) -> Option<&ImageProcessor> {
        self.images.as_ref().map(|i| &i.processor)
    }

    pub(crate) fn prepare(&self, prompt: &Prompt, render: &RenderOptions) -> Result<Prepared, EngineError> {
        let field = prompt.field();
        let tokenizer = || {
            self.tokenizer.as_ref().ok_or_else(|| {
                EngineError::invalid(
                    field,
                    format!("{} has no tokenizer.json: pass token ids instead of text", self.graphs.display()),
                )
            })
        };
        let (ids, loaded, decode_ms) = match prompt {
            Prompt::Ids(ids) => (ids.clone(), Vec::new(), 0.0),
            Prompt::Text(text) => {
                let ids = tokenizer()?
                    .encode(text, false)
                    .map_err(|e| EngineError::invalid_because("prompt", "cannot tokenize the prompt", e))?;
                (ids, Vec::new(), 0.0)
            }
            Prompt::Chat(messages) => {
                let template = self.chat_template.as_ref().ok_or_else(|| {
                    EngineError::invalid(
                        "messages",
                        format!(
                            "{} has no chat template (no chat_template.jinja, chat_template.json or chat_template in \
                             tokenizer_config.json): send a raw prompt",
                            self.graphs.display()
                        ),
                    )
                })?;
                let (rendered, images) = split_chat_images(messages).map_err(EngineError::content)?;
                let started = Instant::now();
                let loaded = match (&self.images, images.first()) {
                    (_, None) => Vec::new(),
                    (None, Some(first)) => {
                        return Err(EngineError::InvalidRequest {
                            field: "messages",
                            part: Some(first.part.clone()),
                            message: format!("{} takes no images (it has no vision encoder)", self.graphs.display()),
                            source: None,
                        })
                    }
                    (Some(intake), Some(_)) => images
                        .iter()
                        .map(|image| image.load(&intake.settings, &intake.processor))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(EngineError::content)?,
                };
                let decode_ms = started.elapsed().as_secs_f64() * 1e3;
                let text = template
                    .render(&rendered, render)
                    .map_err(|e| EngineError::invalid_because("messages", "the chat template cannot render them", e))?;
                // Templates write special tokens as text; they are parsed back as special tokens.
                let ids = tokenizer()?
                    .encode(&text, false)
                    .map_err(|e| EngineError::invalid_because("messages", "cannot tokenize the rendered chat", e))?;
                (ids, loaded, decode_ms)
            }
        };
        let Some(intake) = &self.images else { return Ok(Prepared { ids, images: None }) };
        let placed: Vec<_> = loaded.iter().map(|l| (l.hash, l.grid)).collect();
        let (ids, prompt) = MultimodalPrompt::expand(&ids, intake.image_token, &placed, intake.merge)
            .map_err(|e| EngineError::invalid_because(field, e.to_string(), e))?;
        let images = (!loaded.is_empty()).then(|| SequenceImages::new(prompt, loaded, decode_ms));
        Ok(Prepared { ids, images })
    }
}

/// The machine's cores, at most [`super::DEFAULT_MAX_IMAGE_THREADS`] (1 when unknown).
fn default_image_threads() -> std::num::NonZeroUsize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    std::num::NonZeroUsize::new(cores.min(super::DEFAULT_MAX_IMAGE_THREADS)).unwrap_or(std::num::NonZeroUsize::MIN)
}
