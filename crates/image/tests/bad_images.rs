//! Every bad input gets its typed error before any model work, and nothing panics.

use std::path::{Path, PathBuf};

use pio_image::{
    decode, ConfigError, DecodeLimits, ImageError, ImageFormat, ImageInput, ImageProcessor, ImageProcessorConfig,
    RgbImage,
};

fn source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images/source").join(name)
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(source(name)).expect("fixture")
}

fn decode_bytes(bytes: Vec<u8>) -> Result<RgbImage, ImageError> {
    decode(&ImageInput::Bytes(bytes), &DecodeLimits::default())
}

/// CRC-32 (PNG's chunk checksum), so that patched headers stay valid.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A fixture PNG with its IHDR width and height replaced (CRC fixed, so only the size is wrong).
fn png_with_size(width: u32, height: u32) -> Vec<u8> {
    let mut png = fixture_bytes("gradient.png");
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A fixture JPEG with the frame header's height and width replaced.
fn jpeg_with_size(width: u16, height: u16) -> Vec<u8> {
    let mut jpeg = fixture_bytes("photo-small.jpg");
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline SOF0");
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

/// A fixture GIF with its logical screen size (and, with `frame`, its first frame's size) replaced.
fn gif_with_size(width: u16, height: u16, frame: bool) -> Vec<u8> {
    let mut gif = fixture_bytes("offset-trns.gif");
    gif[6..8].copy_from_slice(&width.to_le_bytes());
    gif[8..10].copy_from_slice(&height.to_le_bytes());
    if frame {
        // Header (13 bytes), global palette (768), graphic control extension (8), then the image descriptor.
        let descriptor = 13 + 768 + 8;
        assert_eq!(gif[descriptor], 0x2C, "image descriptor");
        gif[descriptor + 1..descriptor + 5].fill(0);
        gif[descriptor + 5..descriptor + 7].copy_from_slice(&width.to_le_bytes());
        gif[descriptor + 7..descriptor + 9].copy_from_slice(&height.to_le_bytes());
    }
    gif
}

#[test]
fn truncated_files_are_reported_as_truncated() {
    for name in ["photo-landscape.jpg", "photo-pano.jpg", "gradient.png", "offset-trns.gif", "lossy.webp", "rgb24.bmp"]
    {
        let bytes = fixture_bytes(name);
        for keep in [bytes.len() / 3, bytes.len() - 10] {
            let error = decode_bytes(bytes[..keep].to_vec()).expect_err(name);
            assert!(matches!(error, ImageError::Truncated { .. }), "{name} cut to {keep} bytes: {error}");
        }
    }
}

#[test]
fn corrupt_files_are_refused_with_the_decoder_message() {
    let scramble = |mut bytes: Vec<u8>| {
        let n = bytes.len();
        for i in (n / 3..n * 2 / 3).step_by(7) {
            bytes[i] ^= 0x5A;
        }
        bytes
    };
    let jpeg = decode_bytes(scramble(fixture_bytes("photo-landscape.jpg"))).unwrap_err();
    assert!(matches!(jpeg, ImageError::Jpeg { .. }), "{jpeg}");
    let garbage_jpeg = decode_bytes([&[0xFF, 0xD8, 0xFF][..], &[0x13; 64]].concat()).unwrap_err();
    assert!(matches!(garbage_jpeg, ImageError::Jpeg { .. }), "{garbage_jpeg}");
    let png = decode_bytes(scramble(fixture_bytes("gradient.png"))).unwrap_err();
    assert!(matches!(png, ImageError::Decode { format: ImageFormat::Png, .. }), "{png}");
    let gif = decode_bytes(scramble(fixture_bytes("animated.gif"))).unwrap_err();
    assert!(matches!(gif, ImageError::Gif { .. }), "{gif}");
    // The message says what is wrong, not only that something is.
    assert!(jpeg.to_string().len() > "image bytes: cannot decode JPEG: ".len());
}

#[test]
fn zero_sized_images_are_refused() {
    let png = decode_bytes(png_with_size(0, 256)).unwrap_err();
    assert!(matches!(png, ImageError::ZeroSize { format: ImageFormat::Png, width: 0, height: 256, .. }), "{png}");
    let gif = decode_bytes(gif_with_size(0, 0, true)).unwrap_err();
    assert!(matches!(gif, ImageError::ZeroSize { format: ImageFormat::Gif, .. }), "{gif}");
    // libjpeg refuses a zero height itself ("Empty JPEG image").
    let jpeg = decode_bytes(jpeg_with_size(97, 0)).unwrap_err();
    assert!(matches!(jpeg, ImageError::Jpeg { .. } | ImageError::ZeroSize { .. }), "{jpeg}");
}

/// Headers that promise billions of pixels are refused from the header: decoding first would try to allocate
/// gigabytes (or fail as truncated), so `TooManyPixels` shows the check ran before the decoder.
#[test]
fn decompression_bombs_are_refused_from_the_header() {
    let cases = [
        ("PNG", png_with_size(100_000, 100_000)),
        ("JPEG", jpeg_with_size(60_000, 60_000)),
        ("GIF", gif_with_size(65_535, 65_535, false)),
    ];
    for (format, bytes) in cases {
        let error = decode_bytes(bytes).unwrap_err();
        assert!(matches!(error, ImageError::TooManyPixels { .. }), "{format}: {error}");
    }
    let mut bmp = fixture_bytes("rgb24.bmp");
    bmp[18..22].copy_from_slice(&40_000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&40_000i32.to_le_bytes());
    let error = decode_bytes(bmp).unwrap_err();
    assert!(matches!(error, ImageError::TooManyPixels { .. }), "BMP: {error}");
    let mut webp = fixture_bytes("lossless-rgba.webp");
    let vp8l = webp.windows(4).position(|w| w == b"VP8L").expect("lossless chunk") + 8;
    assert_eq!(webp[vp8l], 0x2F, "VP8L signature");
    // 14 bits each of width - 1 and height - 1, then the alpha and version bits, kept.
    let size_bits: u32 = 15_999 | (15_999 << 14) | (u32::from(webp[vp8l + 4]) >> 4 << 28);
    webp[vp8l + 1..vp8l + 5].copy_from_slice(&size_bits.to_le_bytes());
    let error = decode_bytes(webp).unwrap_err();
    assert!(matches!(error, ImageError::TooManyPixels { width: 16_000, height: 16_000, .. }), "WebP: {error}");

    // A real, valid image over a lowered budget: 300x256 against 50,000 pixels.
    let limits = DecodeLimits::default().with_max_pixels(50_000);
    let error = decode(&ImageInput::Path(source("gradient.png")), &limits).unwrap_err();
    assert!(
        matches!(error, ImageError::TooManyPixels { width: 300, height: 256, pixels: 76_800, limit: 50_000, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("gradient.png"), "the error names the file: {error}");
}

#[test]
fn unsupported_formats_are_named() {
    let tiff = decode_bytes(b"II*\0\x08\0\0\0 rest of a TIFF".to_vec()).unwrap_err();
    assert!(matches!(tiff, ImageError::UnsupportedFormat { detected: Some("TIFF"), .. }), "{tiff}");
    let heic = decode_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic".to_vec()).unwrap_err();
    assert!(matches!(heic, ImageError::UnsupportedFormat { detected: Some("HEIF/HEIC"), .. }), "{heic}");
    let text = decode_bytes(b"hello, this is not an image".to_vec()).unwrap_err();
    assert!(matches!(text, ImageError::UnsupportedFormat { detected: None, .. }), "{text}");
    assert!(text.to_string().contains("JPEG, PNG, WebP, GIF, BMP"), "{text}");
    let empty = decode_bytes(Vec::new()).unwrap_err();
    assert!(matches!(empty, ImageError::Empty { .. }), "{empty}");
}

#[test]
fn aspect_ratio_over_200_is_refused_before_resampling() {
    let processor = ImageProcessor::new(ImageProcessorConfig::default());
    let error = processor.preprocess(&[RgbImage::new(64, 64), RgbImage::new(2010, 10)]).unwrap_err();
    assert!(matches!(error, ImageError::AspectRatio { index: 1, width: 2010, height: 10, limit: 200, .. }), "{error}");
    let error = processor.preprocess(&[RgbImage::new(10, 2001)]).unwrap_err();
    assert!(matches!(error, ImageError::AspectRatio { ratio, .. } if (ratio - 200.1).abs() < 1e-9), "{error}");
    assert!(processor.preprocess(&[RgbImage::new(2000, 10)]).is_ok(), "200:1 itself is allowed");
    assert!(processor.grid(2010, 10).is_err());
}

#[test]
fn processor_refusals() {
    let processor = ImageProcessor::new(ImageProcessorConfig::default());
    assert!(matches!(processor.preprocess(&[]), Err(ImageError::NoImages)));
    // A failed preprocess_into leaves the reused batch empty, not holding the previous images.
    let mut batch = processor.preprocess(&[RgbImage::new(64, 64)]).unwrap();
    assert!(batch.rows() > 0);
    assert!(processor.preprocess_into(&[RgbImage::new(2010, 10)], &mut batch).is_err());
    assert_eq!((batch.rows(), batch.pixel_values().len(), batch.grids().len()), (0, 0, 0));

    let dir = tempfile::tempdir().unwrap();
    let write = |json: &str| {
        std::fs::write(dir.path().join("preprocessor_config.json"), json).unwrap();
        ImageProcessorConfig::from_checkpoint_dir(dir.path())
    };
    let unresized = ImageProcessor::new(write(r#"{"do_resize": false, "patch_size": 16}"#).unwrap());
    let error = unresized.preprocess(&[RgbImage::new(64, 50)]).unwrap_err();
    assert!(matches!(error, ImageError::NotPatchAligned { factor: 32, .. }), "{error}");
    let batch = unresized.preprocess(&[RgbImage::new(64, 32)]).unwrap();
    assert_eq!(batch.grids()[0].as_array(), [1, 2, 4]);

    let zero_min = ImageProcessor::new(ImageProcessorConfig::default().with_pixel_range(0, 1 << 20));
    let error = zero_min.preprocess(&[RgbImage::new(40, 10)]).unwrap_err();
    assert!(matches!(error, ImageError::BadResize { resized_height: 0, .. }), "{error}");
}

#[test]
fn config_errors_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let error = ImageProcessorConfig::from_checkpoint_dir(dir.path()).unwrap_err();
    assert!(matches!(error, ConfigError::NotFound { .. }), "{error}");
    let path = dir.path().join("preprocessor_config.json");
    let write = |json: &str| {
        std::fs::write(&path, json).unwrap();
        ImageProcessorConfig::from_checkpoint_dir(dir.path()).unwrap_err()
    };
    let invalid_key = |error: ConfigError| match error {
        ConfigError::Invalid { key, path: at, .. } => {
            assert_eq!(at, path);
            key
        }
        other => panic!("expected Invalid, got {other}"),
    };
    assert_eq!(invalid_key(write(r#"{"resample": 2}"#)), "resample");
    assert_eq!(invalid_key(write(r#"{"image_mean": [0.5, 0.5]}"#)), "image_mean");
    assert_eq!(invalid_key(write(r#"{"image_std": 0}"#)), "image_std");
    assert_eq!(invalid_key(write(r#"{"patch_size": 0}"#)), "patch_size");
    assert_eq!(invalid_key(write(r#"{"size": {"shortest_edge": 3136}}"#)), "size");
    assert!(matches!(write(r#"{"patch_size": "16"}"#), ConfigError::Json { .. }));
    assert!(matches!(write("{"), ConfigError::Json { .. }));
}

/// Mutated fixtures (bit flips, cut-offs, spliced headers) never panic: each decode returns Ok or an error.
/// A small deterministic run for CI; the fuzzing proper is separate.
#[test]
fn mutated_inputs_never_panic() {
    let names =
        ["photo-small.jpg", "photo-pano.jpg", "tiny.png", "palette-trns.png", "offset-trns.gif", "animated.gif"];
    let names = [&names[..], &["lossy.webp", "lossless-rgba.webp", "palette8.bmp", "cmyk.jpg", "grey16.png"]].concat();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let limits = DecodeLimits::default().with_max_pixels(1 << 22);
    let mut outcomes = [0usize; 2];
    for name in names {
        let original = fixture_bytes(name);
        for _ in 0..60 {
            let mut bytes = original.clone();
            match next() % 3 {
                0 => {
                    for _ in 0..1 + next() % 8 {
                        let at = (next() as usize) % bytes.len();
                        bytes[at] ^= 1 << (next() % 8);
                    }
                }
                1 => bytes.truncate((next() as usize) % bytes.len()),
                _ => {
                    // Corrupt the first 64 bytes, where the headers live.
                    let at = (next() as usize) % bytes.len().min(64);
                    bytes[at] = next() as u8;
                }
            }
            let result = decode(&ImageInput::Bytes(bytes), &limits);
            outcomes[usize::from(result.is_ok())] += 1;
        }
    }
    println!("mutated inputs: {} refused, {} decoded", outcomes[0], outcomes[1]);
    assert!(outcomes[0] > 0 && outcomes[1] > 0);
}
