//! Image container formats, recognised from their first bytes (never from a file name or a media type).

use std::fmt;

/// A format pio-image decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Gif,
    WebP,
    Bmp,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            ImageFormat::Gif => "GIF",
            ImageFormat::WebP => "WebP",
            ImageFormat::Bmp => "BMP",
        })
    }
}

/// What the first bytes say: a supported format, a known unsupported one (named in the error), or nothing known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sniffed {
    Supported(ImageFormat),
    Unsupported(Option<&'static str>),
}

pub(crate) fn sniff(bytes: &[u8]) -> Sniffed {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    if starts(&[0xFF, 0xD8, 0xFF]) {
        Sniffed::Supported(ImageFormat::Jpeg)
    } else if starts(b"\x89PNG\r\n\x1a\n") {
        Sniffed::Supported(ImageFormat::Png)
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        Sniffed::Supported(ImageFormat::Gif)
    } else if starts(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        Sniffed::Supported(ImageFormat::WebP)
    } else if starts(b"BM") {
        Sniffed::Supported(ImageFormat::Bmp)
    } else {
        Sniffed::Unsupported(unsupported_name(bytes))
    }
}

/// Names a few formats people send by mistake, so the error can say "TIFF is not supported" rather than
/// "unknown format".
fn unsupported_name(bytes: &[u8]) -> Option<&'static str> {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    let brand = bytes.get(4..12);
    if starts(b"II*\0") || starts(b"MM\0*") {
        Some("TIFF")
    } else if brand == Some(b"ftypavif") || brand == Some(b"ftypavis") {
        Some("AVIF")
    } else if brand.is_some_and(|b| b.starts_with(b"ftyphei") || b.starts_with(b"ftypmif1") || b == b"ftypheic") {
        Some("HEIF/HEIC")
    } else if starts(&[0xFF, 0x0A]) || starts(b"\0\0\0\x0CJXL \r\n\x87\n") {
        Some("JPEG XL")
    } else if starts(&[0, 0, 1, 0]) {
        Some("ICO")
    } else if starts(b"8BPS") {
        Some("PSD")
    } else if starts(b"qoif") {
        Some("QOI")
    } else if starts(b"%PDF") {
        Some("PDF")
    } else if starts(b"<?xml") || starts(b"<svg") {
        Some("SVG")
    } else {
        None
    }
}
