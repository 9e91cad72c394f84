//! pio-image: images in for vision-language models.
//!
//! - [`decode`]: JPEG, PNG, WebP, GIF (first frame) and BMP from a path, bytes or a `data:` URI to upright 8-bit
//!   RGB, exactly as transformers' `load_image` (Pillow `exif_transpose` + `convert("RGB")`) gives it, with a
//!   pixel budget checked from the header before decoding.
//! - [`ImageProcessor`]: the Qwen2-VL / Qwen2.5-VL / Qwen3-VL image processor as transformers runs it by default
//!   (the torchvision backend): smart resize, antialiased bicubic, rescale and normalize, patches →
//!   `pixel_values` [N, 3·T·P·P] and `image_grid_thw`. Bit-exact with transformers on every fixture (README,
//!   "Image preprocessing").
//! - [`ImageHash`]: a content hash for caching vision encodings.
//!
//! ```no_run
//! use pio_image::{decode, DecodeLimits, ImageInput, ImageProcessor, ImageProcessorConfig};
//!
//! let config = ImageProcessorConfig::from_checkpoint_dir("checkpoints/qwen3-vl-2b")?;
//! let processor = ImageProcessor::new(config);
//! let image = decode(&ImageInput::Path("photo.jpg".into()), &DecodeLimits::default())?;
//! let batch = processor.preprocess(&[image])?; // pixel_values [rows, 3·T·P·P] f32 + one grid per image
//! let pads = processor.image_pad_tokens(batch.grids()[0]); // <|image_pad|> tokens for this image
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod config;
mod decode;
mod error;
mod format;
mod gif;
mod hash;
mod input;
mod jpeg;
mod limits;
mod normalize;
mod processor;
mod resample;
mod smart_resize;
mod stream;
mod to_rgb;

pub use config::{ConfigError, ImageProcessorConfig};
pub use decode::decode;
pub use error::ImageError;
pub use format::ImageFormat;
pub use hash::ImageHash;
pub use image::RgbImage;
pub use input::{EncodedImage, ImageInput};
pub use limits::{DecodeLimits, DEFAULT_MAX_INPUT_BYTES, DEFAULT_MAX_PIXELS};
pub use processor::{GridThw, ImageProcessor, PixelBatch};
pub use smart_resize::{smart_resize, SmartResizeError, MAX_ASPECT_RATIO};
