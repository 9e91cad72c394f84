//! Decoded pixels to 8-bit RGB, as Pillow's `convert("RGB")` does it (transformers' `load_image`).
//!
//! - alpha is dropped, not composited (transparent pixels keep their stored colour);
//! - grey is replicated into the three channels;
//! - 16-bit RGB, RGBA and grey+alpha keep the high byte (Pillow reads them as 8-bit modes);
//! - 16-bit grey without an alpha channel is Pillow's mode "I;16", whose conversion to RGB clamps values to 255
//!   rather than scaling them: a 16-bit grey photo comes out nearly white, exactly as it does in transformers.

use image::{DynamicImage, ExtendedColorType, RgbImage};

/// `None` for float images, which the formats pio-image decodes never produce.
pub(crate) fn to_rgb_like_pillow(image: DynamicImage, original: ExtendedColorType) -> Option<RgbImage> {
    let (width, height) = (image.width(), image.height());
    let rgb: Vec<u8> = match image {
        DynamicImage::ImageRgb8(rgb) => return Some(rgb),
        DynamicImage::ImageRgba8(rgba) => rgba.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(grey) => grey.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(grey) => grey.as_raw().chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        DynamicImage::ImageLuma16(grey) => {
            grey.as_raw().iter().map(|&v| grey16(v, original)).flat_map(|v| [v, v, v]).collect()
        }
        DynamicImage::ImageLumaA16(grey) => {
            grey.as_raw().chunks_exact(2).map(|p| grey16(p[0], original)).flat_map(|v| [v, v, v]).collect()
        }
        DynamicImage::ImageRgb16(rgb) => rgb.as_raw().iter().map(|&v| high_byte(v)).collect(),
        DynamicImage::ImageRgba16(rgba) => {
            rgba.as_raw().chunks_exact(4).flat_map(|p| [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])]).collect()
        }
        _ => return None,
    };
    RgbImage::from_raw(width, height, rgb)
}

/// A 16-bit grey sample: "I;16" (grey, possibly with a tRNS colour) clamps; grey+alpha keeps the high byte.
fn grey16(value: u16, original: ExtendedColorType) -> u8 {
    if original == ExtendedColorType::L16 {
        value.min(255) as u8
    } else {
        high_byte(value)
    }
}

fn high_byte(value: u16) -> u8 {
    (value >> 8) as u8
}
