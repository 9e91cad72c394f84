//! The error every decoding and preprocessing step returns.

use std::path::PathBuf;

use crate::format::ImageFormat;

/// Why an image could not be turned into model input. Every variant names the input (a path, "image bytes" or
/// "data URI") or the image's position in the batch, so a caller can report it as is.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{input}: {bytes} bytes is over the input limit of {limit} bytes")]
    InputTooLarge { input: String, bytes: u64, limit: u64 },
    #[error("{input}: malformed data URI: {reason}")]
    MalformedDataUri { input: String, reason: &'static str },
    #[error("{input}: the data URI payload is not valid base64: {source}")]
    InvalidBase64 {
        input: String,
        #[source]
        source: base64::DecodeError,
    },
    #[error("{input}: empty (0 bytes)")]
    Empty { input: String },
    #[error("{input}: {} is not supported; supported formats: JPEG, PNG, WebP, GIF, BMP", .detected.unwrap_or("the format"))]
    UnsupportedFormat { input: String, detected: Option<&'static str> },
    #[error("{input}: the {format} header gives a size of {width}x{height}; an image needs at least one pixel")]
    ZeroSize { input: String, format: ImageFormat, width: u32, height: u32 },
    #[error(
        "{input}: the {format} header gives {width}x{height} = {pixels} pixels, over the decode budget of {limit} \
         pixels (raise DecodeLimits::with_max_pixels if this image is legitimate)"
    )]
    TooManyPixels { input: String, format: ImageFormat, width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("{input}: {format} data ends early (truncated file)")]
    Truncated { input: String, format: ImageFormat },
    /// libjpeg-turbo stopped; its message says why (corrupt data, an unsupported precision, ...).
    #[error("{input}: cannot decode JPEG: {message}")]
    Jpeg { input: String, message: String },
    /// The mozjpeg wrapper's own failure around libjpeg (reading scanlines, finishing).
    #[error("{input}: cannot decode JPEG: {source}")]
    JpegReader {
        input: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{input}: cannot decode GIF: {source}")]
    Gif {
        input: String,
        #[source]
        source: gif::DecodingError,
    },
    #[error("{input}: cannot decode {format}: {source}")]
    Decode {
        input: String,
        format: ImageFormat,
        #[source]
        source: image::ImageError,
    },
    #[error("{input}: {format} variant not supported: {what}")]
    UnsupportedVariant { input: String, format: ImageFormat, what: String },
    #[error("no images to preprocess")]
    NoImages,
    #[error("the batch's pixel_values would take {bytes} bytes, more than can be allocated")]
    BatchTooLarge { bytes: u64 },
    #[error(
        "image {index} is {width}x{height}: its aspect ratio {ratio:.1} is over {limit}, the most the image \
         processor accepts"
    )]
    AspectRatio { index: usize, width: u32, height: u32, ratio: f64, limit: u32 },
    #[error(
        "image {index} is {width}x{height}: with do_resize off, both sides must be multiples of patch_size x \
         merge_size = {factor}"
    )]
    NotPatchAligned { index: usize, width: u32, height: u32, factor: u32 },
    #[error("image {index} is {width}x{height}: smart resize gives {resized_width}x{resized_height} ({reason})")]
    BadResize { index: usize, width: u32, height: u32, resized_width: u64, resized_height: u64, reason: &'static str },
}
