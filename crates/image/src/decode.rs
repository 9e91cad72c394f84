//! Encoded bytes to RGB pixels: format sniffing, the pixel budget, the per-format decoders, Pillow's RGB
//! conversion and the EXIF orientation.

use std::io::Cursor;

use image::codecs::{bmp::BmpDecoder, png::PngDecoder, webp::WebPDecoder};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, RgbImage};

use crate::error::ImageError;
use crate::format::{sniff, ImageFormat, Sniffed};
use crate::input::ImageInput;
use crate::limits::{check_dimensions, DecodeLimits};
use crate::to_rgb::{to_rgb_like_pillow, GreySixteen};

/// Decodes an image to 8-bit RGB, upright, as transformers' `load_image` sees it: Pillow's
/// `ImageOps.exif_transpose` then `convert("RGB")` (see [`crate::to_rgb`] for the conversions).
///
/// JPEG, PNG, WebP, GIF (first frame) and BMP; the format is sniffed from the bytes. Before any pixel is decoded,
/// the header's width x height is checked against `limits` (decompression bombs) and zero sizes are refused.
/// Never panics on any input.
pub fn decode(input: &ImageInput, limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    input.read(limits)?.decode(limits)
}

pub(crate) fn decode_bytes(bytes: &[u8], input: &str, limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    let format = match sniff(bytes) {
        Sniffed::Supported(format) => format,
        Sniffed::Unsupported(detected) => {
            return Err(ImageError::UnsupportedFormat { input: input.to_string(), detected })
        }
    };
    let image_error = |source: image::ImageError| {
        if is_unexpected_eof(&source) {
            ImageError::Truncated { input: input.to_string(), format }
        } else {
            ImageError::Decode { input: input.to_string(), format, source }
        }
    };
    let mut codec_limits = image::Limits::default();
    codec_limits.max_alloc = Some(limits.decoder_alloc_bytes());
    let reader = Cursor::new(bytes);
    let (rgb, orientation) = match format {
        ImageFormat::Jpeg => crate::jpeg::decode(bytes, input, limits)?,
        ImageFormat::Gif => (crate::gif::decode(bytes, input, limits)?, None),
        ImageFormat::Png => {
            // The png crate compares the picture's size with its allocation limit before anything else and
            // would report a bomb as a limit error; IHDR (always the first chunk) is checked here first.
            let header = png_header(bytes);
            if let Some(header) = header {
                check_dimensions(header.width.into(), header.height.into(), format, input, limits)?;
            }
            let grey = GreySixteen::from_png_header(header);
            let decoder = PngDecoder::with_limits(reader, codec_limits).map_err(image_error)?;
            decode_with(decoder, format, input, limits, grey).map_err(|e| e.into_image_error(image_error))?
        }
        ImageFormat::WebP => {
            // The RIFF header gives the file's length: a shorter file is truncated (image-webp would report
            // a corrupt bitstream).
            let declared = bytes.get(4..8).map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) + 8);
            if declared.is_some_and(|declared| (bytes.len() as u64) < declared) {
                return Err(ImageError::Truncated { input: input.to_string(), format });
            }
            let mut decoder = WebPDecoder::new(reader).map_err(image_error)?;
            decoder.set_limits(codec_limits).map_err(image_error)?;
            decode_with(decoder, format, input, limits, GreySixteen::HighByte)
                .map_err(|e| e.into_image_error(image_error))?
        }
        ImageFormat::Bmp => {
            let mut decoder = BmpDecoder::new(reader).map_err(image_error)?;
            decoder.set_limits(codec_limits).map_err(image_error)?;
            decode_with(decoder, format, input, limits, GreySixteen::HighByte)
                .map_err(|e| e.into_image_error(image_error))?
        }
    };
    Ok(match orientation {
        None | Some(Orientation::NoTransforms) => rgb,
        Some(orientation) => {
            let mut image = DynamicImage::ImageRgb8(rgb);
            image.apply_orientation(orientation);
            image.into_rgb8()
        }
    })
}

/// The fields of a PNG's IHDR chunk that decoding looks at.
#[derive(Clone, Copy)]
struct PngHeader {
    width: u32,
    height: u32,
    bit_depth: u8,
    color_type: u8,
}

/// IHDR is always the first chunk: signature (8 bytes), length, "IHDR", width, height (big-endian), bit depth,
/// colour type.
fn png_header(bytes: &[u8]) -> Option<PngHeader> {
    if bytes.get(12..16)? != b"IHDR" {
        return None;
    }
    let be = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    Some(PngHeader { width: be(16)?, height: be(20)?, bit_depth: *bytes.get(24)?, color_type: *bytes.get(25)? })
}

impl GreySixteen {
    /// 16-bit greyscale PNGs without an alpha channel (colour type 0, with or without a tRNS colour) are
    /// Pillow's mode "I;16"; its grey+alpha ones (colour type 4) it reads as 8-bit.
    fn from_png_header(header: Option<PngHeader>) -> GreySixteen {
        match header {
            Some(PngHeader { bit_depth: 16, color_type: 0, .. }) => GreySixteen::Clamp,
            _ => GreySixteen::HighByte,
        }
    }
}

/// A failure inside [`decode_with`]: ours (already an [`ImageError`]) or the codec's.
enum DecodeWithError {
    Ours(ImageError),
    Codec(image::ImageError),
}

impl DecodeWithError {
    fn into_image_error(self, codec: impl FnOnce(image::ImageError) -> ImageError) -> ImageError {
        match self {
            DecodeWithError::Ours(error) => error,
            DecodeWithError::Codec(error) => codec(error),
        }
    }
}

fn decode_with<D: ImageDecoder>(
    mut decoder: D,
    format: ImageFormat,
    input: &str,
    limits: &DecodeLimits,
    grey: GreySixteen,
) -> Result<(RgbImage, Option<Orientation>), DecodeWithError> {
    let (width, height) = decoder.dimensions();
    check_dimensions(width.into(), height.into(), format, input, limits).map_err(DecodeWithError::Ours)?;
    // An unreadable EXIF block means no orientation, as in Pillow.
    let orientation = decoder.orientation().ok();
    let original = decoder.original_color_type();
    let image = DynamicImage::from_decoder(decoder).map_err(DecodeWithError::Codec)?;
    let rgb = to_rgb_like_pillow(image, grey).ok_or_else(|| {
        DecodeWithError::Ours(ImageError::UnsupportedVariant {
            input: input.to_string(),
            format,
            what: format!("pixel type {original:?}"),
        })
    })?;
    Ok((rgb, orientation))
}

/// Whether an error, or one of its sources, says the data ended early: the codecs' way of saying "truncated".
/// (`image::ImageError::IoError` and gif's `UnexpectedEof` do not expose it through `source()`.)
pub(crate) fn is_unexpected_eof(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::UnexpectedEof;
    let mut current = Some(error);
    while let Some(error) = current {
        let eof = error.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == UnexpectedEof)
            || matches!(error.downcast_ref::<image::ImageError>(), Some(image::ImageError::IoError(io)) if io.kind() == UnexpectedEof)
            || matches!(error.downcast_ref::<gif::DecodingError>(), Some(gif::DecodingError::UnexpectedEof));
        if eof {
            return true;
        }
        current = error.source();
    }
    false
}
