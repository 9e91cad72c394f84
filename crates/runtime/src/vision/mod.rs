//! The vision half of a vision-language export (Qwen3-VL), as the engine drives it:
//!
//! * [`chat_images`]: images in chat messages (OpenAI `image_url` and transformers `image`
//!   content parts; data URIs, paths, bytes, and URLs when allowed), read, hashed and decoded
//!   with `pio-image` before any model work;
//! * [`MultimodalPrompt`]: each image's placeholder expanded to its token count, and
//!   transformers' rope index ([`rope_index()`]): (t, h, w) positions and the rope delta;
//! * [`VisionEncoder`]: the encoder session, one image per run, its [`ImageFeatures`] left where
//!   the session ran;
//! * [`EncoderCache`]: encodings kept by image content hash, bounded, least recently used out.

pub mod chat_images;
mod encoder;
mod encoder_cache;
mod prompt;
mod rope_index;

use std::path::PathBuf;

pub use chat_images::{ChatImage, ContentError, ImageSettings, LoadedImage, LocalImageFiles, RemoteImages};
pub use encoder::{to_f32_vec, ImageFeatures, VisionEncoder};
pub use encoder_cache::EncoderCache;
pub use prompt::{MultimodalPrompt, PromptImage};
pub use rope_index::{rope_index, RopeIndex};

use pio_image::GridThw;

/// What the vision path can fail on.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("{} has no vision encoder (it is not a vision-language export)", dir.display())]
    NotVisionLanguage { dir: PathBuf },
    #[error("cannot load the vision encoder {}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the vision encoder failed on an image of {}x{}x{} patches", grid.t, grid.h, grid.w)]
    Encode {
        grid: GridThw,
        #[source]
        source: ort::Error,
    },
    #[error("the vision encoder has no `{name}` output")]
    MissingOutput { name: &'static str },
    #[error("{what} failed")]
    Output {
        what: &'static str,
        #[source]
        source: ort::Error,
    },
    /// Inputs that do not fit together (patch rows and grid, placeholders and images).
    #[error("{message}")]
    Input { message: String },
}
