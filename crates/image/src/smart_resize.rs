//! Qwen-VL's `smart_resize`: the size an image is resampled to before it is cut into patches.

/// transformers refuses images whose longer side is more than this many times the shorter.
pub const MAX_ASPECT_RATIO: u32 = 200;

/// Why [`smart_resize`] gave no size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SmartResizeError {
    /// `max(h, w) / min(h, w)` is over [`MAX_ASPECT_RATIO`].
    AspectRatio(f64),
    /// The pixel range gives a side of zero (possible only with `min_pixels` below one patch block) or one too
    /// large for `u32`.
    OutOfRange { height: u64, width: u64 },
}

/// transformers' `smart_resize(height, width, factor, min_pixels, max_pixels)` (qwen2_vl/image_processing):
/// both sides become multiples of `factor` (patch_size x merge_size), the pixel count is brought within
/// `[min_pixels, max_pixels]`, the aspect ratio is kept as well as that allows. Returns `(height, width)`.
///
/// The arithmetic is Python's, in the same order, in f64: `round` rounds half to even, `/` is true division.
/// `height` and `width` must be non-zero.
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32), SmartResizeError> {
    let (h, w, f) = (f64::from(height), f64::from(width), f64::from(factor));
    let ratio = h.max(w) / h.min(w);
    if ratio > f64::from(MAX_ASPECT_RATIO) {
        return Err(SmartResizeError::AspectRatio(ratio));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    // Pixel counts are exact in f64 (< 2^53) for every size a u32 side and a u64 budget can describe here.
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    let out_of_range = || SmartResizeError::OutOfRange { height: h_bar as u64, width: w_bar as u64 };
    let side = |value: f64| {
        if value >= 1.0 && value <= f64::from(u32::MAX) {
            Ok(value as u32)
        } else {
            Err(out_of_range())
        }
    };
    Ok((side(h_bar)?, side(w_bar)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values computed with transformers 5.25's smart_resize.
    #[test]
    fn matches_transformers() {
        let qwen3 = |h, w| smart_resize(h, w, 32, 65_536, 16_777_216).unwrap();
        assert_eq!(qwen3(1080, 1920), (1088, 1920));
        assert_eq!(qwen3(48, 80), (224, 352)); // upscaled to reach min_pixels
        assert_eq!(qwen3(3024, 4032), (3008, 4032)); // 94.5 rounds to even
        assert_eq!(qwen3(8000, 6000), (4704, 3520)); // scaled down to max_pixels
        let qwen2 = |h, w| smart_resize(h, w, 28, 3_136, 1_003_520).unwrap();
        assert_eq!(qwen2(1080, 1920), (728, 1316));
        assert_eq!(qwen2(10, 1999), (28, 812));
    }

    #[test]
    fn aspect_ratio_limit() {
        assert!(smart_resize(10, 2000, 32, 1024, u64::MAX).is_ok());
        assert_eq!(smart_resize(10, 2001, 32, 1024, u64::MAX), Err(SmartResizeError::AspectRatio(200.1)));
    }

    #[test]
    fn zero_side_is_an_error() {
        assert_eq!(smart_resize(10, 40, 32, 0, 1 << 20), Err(SmartResizeError::OutOfRange { height: 0, width: 32 }));
    }
}
