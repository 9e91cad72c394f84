//! The first frame of a GIF, rendered as Pillow renders it (`Image.open(...).convert("RGB")`).
//!
//! Pillow's canvas is the logical screen, enlarged if the first frame reaches past it; the area the frame does
//! not cover holds the frame's transparent index if it has one, else index 0; every index then maps through the
//! frame's local palette, or the global one (transparency is ignored by `convert("RGB")`, indexes past the end
//! of the palette are black). The `image` crate composites onto transparent black instead, hence this module.

use std::num::NonZeroU64;

use image::RgbImage;

use crate::error::ImageError;
use crate::format::ImageFormat;
use crate::limits::{check_dimensions, DecodeLimits};

pub(crate) fn decode(bytes: &[u8], input: &str, limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    let gif_error = |source: gif::DecodingError| {
        if crate::decode::is_unexpected_eof(&source) {
            ImageError::Truncated { input: input.to_string(), format: ImageFormat::Gif }
        } else {
            ImageError::Gif { input: input.to_string(), source }
        }
    };
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    let memory = NonZeroU64::new(limits.decoder_alloc_bytes()).unwrap_or(NonZeroU64::MIN);
    options.set_memory_limit(gif::MemoryLimit::Bytes(memory));
    let mut decoder = options.read_info(bytes).map_err(gif_error)?;
    // Nothing canvas-sized is allocated before the size check below, which covers the screen and the frame.
    let (screen_width, screen_height) = (u64::from(decoder.width()), u64::from(decoder.height()));

    let global_palette = decoder.global_palette().map(<[u8]>::to_vec);
    let frame = decoder.next_frame_info().map_err(gif_error)?.ok_or_else(|| ImageError::UnsupportedVariant {
        input: input.to_string(),
        format: ImageFormat::Gif,
        what: "the file has no image frame".to_string(),
    })?;
    let (left, top) = (usize::from(frame.left), usize::from(frame.top));
    let (frame_width, frame_height) = (usize::from(frame.width), usize::from(frame.height));
    let fill_index = frame.transparent.unwrap_or(0);
    let palette = frame.palette.clone().or(global_palette).unwrap_or_default();
    let (width, height) = check_dimensions(
        screen_width.max((left + frame_width) as u64),
        screen_height.max((top + frame_height) as u64),
        ImageFormat::Gif,
        input,
        limits,
    )?;

    let mut indexes = vec![0u8; decoder.buffer_size()];
    decoder.read_into_buffer(&mut indexes).map_err(gif_error)?;

    let (width_px, height_px) = (width as usize, height as usize);
    let mut canvas = vec![fill_index; width_px * height_px];
    if frame_width > 0 {
        // The canvas holds the frame: width >= left + frame_width and height >= top + frame_height.
        for (row, frame_row) in indexes.chunks_exact(frame_width).take(frame_height).enumerate() {
            let start = (top + row) * width_px + left;
            canvas[start..start + frame_width].copy_from_slice(frame_row);
        }
    }
    let mut rgb = Vec::with_capacity(canvas.len() * 3);
    for index in canvas {
        let at = usize::from(index) * 3;
        rgb.extend_from_slice(palette.get(at..at + 3).unwrap_or(&[0, 0, 0]));
    }
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| ImageError::UnsupportedVariant {
        input: input.to_string(),
        format: ImageFormat::Gif,
        what: "decoded size does not match the header".to_string(),
    })
}
