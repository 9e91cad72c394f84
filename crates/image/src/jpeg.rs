//! JPEG through libjpeg-turbo (the `mozjpeg` crate builds its decoder from bundled C source).
//!
//! Why not the `image` crate's zune-jpeg: Pillow and torchvision both decode with libjpeg-turbo (islow IDCT, fancy
//! chroma upsampling), and zune-jpeg differs from them by up to 4 levels on 4:2:0 photos, i.e. 0.03 after
//! Qwen-VL's normalization, three times the tolerance. libjpeg-turbo here is bit-exact with both.
//!
//! libjpeg reports fatal errors through a callback that must not return; the `mozjpeg` crate unwinds out of it
//! (a `C-unwind` ABI), and this module catches that unwind and turns it into an [`ImageError`]. This needs
//! `panic = "unwind"` (the default, and what this workspace builds with).

use std::any::Any;
use std::os::raw::c_int;
use std::panic::{self, AssertUnwindSafe};

use image::metadata::Orientation;
use image::RgbImage;
use mozjpeg::{ColorSpace, Decompress, Marker};
use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};

use crate::error::ImageError;
use crate::format::ImageFormat;
use crate::limits::check_dimensions;
use crate::limits::DecodeLimits;

/// Why libjpeg stopped, carried by the unwind from its callbacks to [`decode`].
enum LibjpegStop {
    Error(String),
    Truncated,
}

/// Decodes a JPEG to RGB as Pillow's `convert("RGB")` sees it, with the EXIF orientation it carries.
pub(crate) fn decode(
    bytes: &[u8],
    input: &str,
    limits: &DecodeLimits,
) -> Result<(RgbImage, Option<Orientation>), ImageError> {
    match panic::catch_unwind(AssertUnwindSafe(|| decode_unguarded(bytes, input, limits))) {
        Ok(result) => result,
        Err(payload) => Err(stop_to_error(payload, input)),
    }
}

fn stop_to_error(payload: Box<dyn Any + Send>, input: &str) -> ImageError {
    match payload.downcast::<LibjpegStop>() {
        Ok(stop) => match *stop {
            LibjpegStop::Error(message) => ImageError::Jpeg { input: input.to_string(), message },
            LibjpegStop::Truncated => ImageError::Truncated { input: input.to_string(), format: ImageFormat::Jpeg },
        },
        // A panic that is not libjpeg's is a bug: let it go on.
        Err(other) => panic::resume_unwind(other),
    }
}

fn decode_unguarded(
    bytes: &[u8],
    input: &str,
    limits: &DecodeLimits,
) -> Result<(RgbImage, Option<Orientation>), ImageError> {
    let io_error = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            ImageError::Truncated { input: input.to_string(), format: ImageFormat::Jpeg }
        } else {
            ImageError::JpegReader { input: input.to_string(), source }
        }
    };
    let decompress = Decompress::builder()
        .with_err(error_manager())
        .with_markers(&[Marker::APP(1), Marker::APP(14)])
        .from_mem(bytes)
        .map_err(io_error)?;
    let (width, height) = (decompress.width(), decompress.height());
    let (width, height) = check_dimensions(width as u64, height as u64, ImageFormat::Jpeg, input, limits)?;
    let orientation = exif_orientation(&decompress);
    let adobe = decompress.markers().any(|m| m.marker == Marker::APP(14) && m.data.starts_with(b"Adobe"));
    let pixels = width as usize * height as usize;
    let rgb = match decompress.color_space() {
        ColorSpace::JCS_GRAYSCALE | ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB => {
            let mut started = decompress.rgb().map_err(io_error)?;
            let mut rgb = vec![0u8; pixels * 3];
            started.read_scanlines_into(&mut rgb).map_err(io_error)?;
            started.finish().map_err(io_error)?;
            rgb
        }
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
            let mut started = decompress.to_colorspace(ColorSpace::JCS_CMYK).map_err(io_error)?;
            let mut cmyk = vec![0u8; pixels * 4];
            started.read_scanlines_into(&mut cmyk).map_err(io_error)?;
            started.finish().map_err(io_error)?;
            cmyk_to_rgb(&cmyk, adobe)
        }
        other => {
            return Err(ImageError::UnsupportedVariant {
                input: input.to_string(),
                format: ImageFormat::Jpeg,
                what: format!("colour space {other:?}"),
            })
        }
    };
    let image = RgbImage::from_raw(width, height, rgb).ok_or_else(|| ImageError::Jpeg {
        input: input.to_string(),
        message: "decoded size does not match the header".to_string(),
    })?;
    Ok((image, orientation))
}

/// The orientation in the first `Exif` APP1 segment (Pillow keeps the first one too).
fn exif_orientation<R>(decompress: &Decompress<R>) -> Option<Orientation> {
    let exif = decompress.markers().find(|m| m.marker == Marker::APP(1) && m.data.starts_with(b"Exif\0\0"))?;
    Orientation::from_exif_chunk(&exif.data[6..])
}

/// Pillow's CMYK to RGB: Adobe files store inverted CMYK (Pillow's "CMYK;I" raw mode), then
/// `channel = (255 - k) - channel * (255 - k) / 255`, rounded as its `MULDIV255` rounds.
fn cmyk_to_rgb(cmyk: &[u8], adobe_inverted: bool) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let [c, m, y, k] = if adobe_inverted {
            [255 - px[0], 255 - px[1], 255 - px[2], 255 - px[3]]
        } else {
            [px[0], px[1], px[2], px[3]]
        };
        let not_k = 255 - i32::from(k);
        for ink in [c, m, y] {
            let product = i32::from(ink) * not_k + 128;
            let scaled = ((product >> 8) + product) >> 8;
            rgb.push((not_k - scaled).clamp(0, 255) as u8);
        }
    }
    rgb
}

/// libjpeg's defaults, except that errors and the end-of-data warning unwind to [`decode`] (the defaults print
/// to stderr and call `exit`, or let a truncated file decode with grey fill).
fn error_manager() -> jpeg_error_mgr {
    // SAFETY: jpeg_error_mgr is a plain C struct (function pointers, integers, pointers) for which all-zero is a
    // valid value, and jpeg_std_error only writes into it.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let message = format_message(cinfo);
    // resume_unwind rather than panic!: the panic hook would print a backtrace for a bad input file.
    panic::resume_unwind(Box::new(LibjpegStop::Error(message)));
}

unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    // Level -1 is a warning. Pillow ignores libjpeg's warnings (extraneous bytes, bad restart markers), except
    // running out of data, which it reports as "image file is truncated".
    // SAFETY: libjpeg passes the cinfo whose err field points at the manager built by error_manager().
    let code = unsafe { cinfo.err.as_ref() }.map(|err| err.msg_code);
    if level < 0 && code == Some(JWRN_JPEG_EOF as c_int) {
        panic::resume_unwind(Box::new(LibjpegStop::Truncated));
    }
}

fn format_message(cinfo: &mut jpeg_common_struct) -> String {
    let mut buffer = [0u8; 80];
    // SAFETY: cinfo.err is the manager from error_manager(); format_message is libjpeg's, which writes a
    // NUL-terminated message of at most JMSG_LENGTH_MAX (80) bytes into the buffer. The binding declares the
    // buffer as a shared reference although C writes into it, so the pointer is cast to the writable type (what
    // the mozjpeg crate does too).
    unsafe {
        let Some(format) = cinfo.err.as_ref().and_then(|err| err.format_message) else {
            return "libjpeg error (no message)".to_string();
        };
        let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]) = std::mem::transmute(format);
        format(cinfo, &mut buffer);
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}
