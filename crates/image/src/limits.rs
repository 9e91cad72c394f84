//! Bounds checked before any pixel is decoded.

use crate::error::ImageError;
use crate::format::ImageFormat;

/// Pillow's `Image.MAX_IMAGE_PIXELS`: it warns above this many pixels and refuses twice as many.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;
/// 64 MiB of encoded input.
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 64 << 20;

/// Decompression-bomb guards for [`crate::decode`]: the width and height are read from the header and their
/// product checked against `max_pixels` before the decoder allocates the picture; the encoded input is checked
/// against `max_input_bytes` before it is read into memory (files) or base64-decoded (data URIs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    max_pixels: u64,
    max_input_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_pixels: DEFAULT_MAX_PIXELS, max_input_bytes: DEFAULT_MAX_INPUT_BYTES }
    }
}

impl DecodeLimits {
    /// The most pixels (width x height, from the header) an image may have.
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// The most encoded bytes an input may have.
    pub fn with_max_input_bytes(mut self, max_input_bytes: u64) -> Self {
        self.max_input_bytes = max_input_bytes;
        self
    }

    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
    }

    pub fn max_input_bytes(&self) -> u64 {
        self.max_input_bytes
    }

    /// What the `image` crate's decoders may allocate: the largest picture they can produce for the pixel
    /// budget (16-bit RGBA, 8 bytes a pixel) plus room for their working buffers.
    pub(crate) fn decoder_alloc_bytes(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(64 << 20)
    }
}

/// Refuses a header's size before decoding: zero width or height, or more pixels than the budget.
pub(crate) fn check_dimensions(
    width: u64,
    height: u64,
    format: ImageFormat,
    input: &str,
    limits: &DecodeLimits,
) -> Result<(u32, u32), ImageError> {
    let pixels = width.saturating_mul(height);
    let (Ok(width32), Ok(height32)) = (u32::try_from(width), u32::try_from(height)) else {
        return Err(too_many(input, format, width, height, pixels, limits));
    };
    if pixels == 0 {
        return Err(ImageError::ZeroSize { input: input.to_string(), format, width: width32, height: height32 });
    }
    if pixels > limits.max_pixels() {
        return Err(too_many(input, format, width, height, pixels, limits));
    }
    Ok((width32, height32))
}

fn too_many(
    input: &str,
    format: ImageFormat,
    width: u64,
    height: u64,
    pixels: u64,
    limits: &DecodeLimits,
) -> ImageError {
    ImageError::TooManyPixels {
        input: input.to_string(),
        format,
        width: u32::try_from(width).unwrap_or(u32::MAX),
        height: u32::try_from(height).unwrap_or(u32::MAX),
        pixels,
        limit: limits.max_pixels(),
    }
}
