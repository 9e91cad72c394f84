//! Decoded pixels to 8-bit RGB, as Pillow's `convert("RGB")` does it (transformers' `load_image`).
//!
//! - alpha is dropped, not composited (transparent pixels keep their stored colour);
//! - grey is replicated into the three channels;
//! - 16-bit RGB, RGBA and grey+alpha keep the high byte (Pillow reads them as 8-bit modes);
//! - 16-bit grey without an alpha channel is Pillow's mode "I;16", whose conversion to RGB clamps values to 255
//!   rather than scaling them: a 16-bit grey photo comes out nearly white, exactly as it does in transformers.

use image::{DynamicImage, RgbImage};

/// How 16-bit grey samples become 8-bit: which of Pillow's modes the file would open in. The decoded pixel type
/// cannot tell (a grey PNG with a tRNS colour decodes as grey+alpha, yet Pillow opens it as "I;16").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GreySixteen {
    /// Mode "I;16": clamped to 255.
    Clamp,
    /// An 8-bit mode: the high byte.
    HighByte,
}

/// `None` for float images, which the formats pio-image decodes never produce.
pub(crate) fn to_rgb_like_pillow(image: DynamicImage, grey: GreySixteen) -> Option<RgbImage> {
    let (width, height) = (image.width(), image.height());
    let rgb: Vec<u8> = match image {
        DynamicImage::ImageRgb8(rgb) => return Some(rgb),
        DynamicImage::ImageRgba8(rgba) => rgba.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(grey) => grey.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(grey) => grey.as_raw().chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        DynamicImage::ImageLuma16(samples) => {
            samples.as_raw().iter().map(|&v| grey16(v, grey)).flat_map(|v| [v, v, v]).collect()
        }
        DynamicImage::ImageLumaA16(samples) => {
            samples.as_raw().chunks_exact(2).map(|p| grey16(p[0], grey)).flat_map(|v| [v, v, v]).collect()
        }
        DynamicImage::ImageRgb16(rgb) => rgb.as_raw().iter().map(|&v| high_byte(v)).collect(),
        DynamicImage::ImageRgba16(rgba) => {
            rgba.as_raw().chunks_exact(4).flat_map(|p| [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])]).collect()
        }
        _ => return None,
    };
    RgbImage::from_raw(width, height, rgb)
}

fn grey16(value: u16, grey: GreySixteen) -> u8 {
    match grey {
        GreySixteen::Clamp => value.min(255) as u8,
        GreySixteen::HighByte => high_byte(value),
    }
}

fn high_byte(value: u16) -> u8 {
    (value >> 8) as u8
}
