//! Antialiased bicubic resampling of 8-bit RGB, bit-exact with what transformers' default (torchvision) Qwen-VL
//! processor runs: `torchvision.transforms.v2.functional.resize(uint8 tensor, BICUBIC, antialias=True)`, i.e.
//! PyTorch's uint8 `_upsample_bicubic2d_aa` on the CPU, itself a port of Pillow-SIMD's `ImagingResample`.
//!
//! Separable: a horizontal pass (skipped when the width is unchanged) into an 8-bit intermediate, then a
//! vertical pass (skipped when the height is unchanged). For each axis, each output sample is a weighted sum of
//! the input samples under a Keys cubic (a = -0.5) stretched by the downscale factor (the antialiasing); the
//! weights are computed in f64, normalised, and converted to i16 fixed point with the most fractional bits that
//! keep the largest weight below 2^15; sums are i32 with round-half-up, clamped to 0..=255.

use image::RgbImage;

const CHANNELS: usize = 3;

/// The fixed-point filter of one axis: for output sample `i`, `taps[i]` weights starting at input `starts[i]`,
/// stored at `weights[i * stride..]`.
struct AxisFilter {
    starts: Vec<usize>,
    taps: Vec<usize>,
    stride: usize,
    weights: Vec<i16>,
    precision: u32,
}

/// The Keys cubic convolution kernel with a = -0.5 (Pillow's and PyTorch's antialiasing bicubic), evaluated in
/// the same operation order as PyTorch's `cubic_convolution1/2`.
fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

impl AxisFilter {
    /// PyTorch's `_compute_index_ranges_weights` (antialias branch) and `_compute_index_ranges_int16_weights`.
    fn new(input_size: usize, output_size: usize) -> AxisFilter {
        const INTERP_SIZE: f64 = 4.0; // bicubic
        let scale = input_size as f64 / output_size as f64;
        let support = if scale >= 1.0 { INTERP_SIZE * 0.5 * scale } else { INTERP_SIZE * 0.5 };
        let stride = support.ceil() as usize * 2 + 1;
        let inverse_scale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };

        let mut starts = Vec::with_capacity(output_size);
        let mut taps = Vec::with_capacity(output_size);
        let mut float_weights = vec![0.0f64; output_size * stride];
        let mut max_weight = 0.0f64;
        for (i, row) in float_weights.chunks_exact_mut(stride).enumerate() {
            let center = scale * (i as f64 + 0.5);
            // `as i64` truncates toward zero, as C's static_cast<int64_t> does.
            let start = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(input_size as i64);
            let count = (end - start).clamp(0, stride as i64) as usize;
            let mut total = 0.0;
            for (j, weight) in row[..count].iter_mut().enumerate() {
                *weight = keys_cubic(((j as i64 + start) as f64 - center + 0.5) * inverse_scale);
                total += *weight;
            }
            if total != 0.0 {
                for weight in &mut row[..count] {
                    *weight /= total;
                    max_weight = max_weight.max(*weight);
                }
            }
            starts.push(start as usize);
            taps.push(count);
        }

        let mut precision = 0u32;
        while precision < 22 {
            let next_value = (0.5 + max_weight * f64::from(1u32 << (precision + 1))) as i32;
            if next_value >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let unit = f64::from(1u32 << precision);
        let weights = float_weights
            .iter()
            .map(|&w| {
                let v = w * unit;
                (if v < 0.0 { -0.5 + v } else { 0.5 + v }) as i32 as i16
            })
            .collect();
        AxisFilter { starts, taps, stride, weights, precision }
    }

    fn weights(&self, i: usize) -> &[i16] {
        &self.weights[i * self.stride..i * self.stride + self.taps[i]]
    }

    fn rounding(&self) -> i32 {
        1 << self.precision.saturating_sub(1)
    }
}

fn to_u8(sum: i32, precision: u32) -> u8 {
    (sum >> precision).clamp(0, 255) as u8
}

/// Resizes `image` to `width` x `height` (both non-zero) as torchvision does (see the module docs).
pub(crate) fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_width, in_height) = image.dimensions();
    let horizontal = if width != in_width { resize_horizontal(image, width) } else { image.clone() };
    if height != in_height {
        resize_vertical(&horizontal, height)
    } else {
        horizontal
    }
}

fn resize_horizontal(image: &RgbImage, width: u32) -> RgbImage {
    let filter = AxisFilter::new(image.width() as usize, width as usize);
    let in_row = image.width() as usize * CHANNELS;
    let out_row = width as usize * CHANNELS;
    let mut out = vec![0u8; out_row * image.height() as usize];
    let rounding = filter.rounding();
    for (src, dst) in image.as_raw().chunks_exact(in_row).zip(out.chunks_exact_mut(out_row)) {
        for (x, pixel) in dst.chunks_exact_mut(CHANNELS).enumerate() {
            let start = filter.starts[x] * CHANNELS;
            let mut sum = [rounding; CHANNELS];
            for (k, &weight) in filter.weights(x).iter().enumerate() {
                let at = start + k * CHANNELS;
                for c in 0..CHANNELS {
                    sum[c] += i32::from(src[at + c]) * i32::from(weight);
                }
            }
            for c in 0..CHANNELS {
                pixel[c] = to_u8(sum[c], filter.precision);
            }
        }
    }
    RgbImage::from_raw(width, image.height(), out).expect("buffer sized for the output")
}

fn resize_vertical(image: &RgbImage, height: u32) -> RgbImage {
    let filter = AxisFilter::new(image.height() as usize, height as usize);
    let row = image.width() as usize * CHANNELS;
    let src = image.as_raw();
    let mut out = vec![0u8; row * height as usize];
    let rounding = filter.rounding();
    let mut sums = vec![0i32; row];
    for (y, dst) in out.chunks_exact_mut(row).enumerate() {
        sums.fill(rounding);
        for (k, &weight) in filter.weights(y).iter().enumerate() {
            let line = &src[(filter.starts[y] + k) * row..][..row];
            let weight = i32::from(weight);
            for (sum, &value) in sums.iter_mut().zip(line) {
                *sum += i32::from(value) * weight;
            }
        }
        for (pixel, &sum) in dst.iter_mut().zip(&sums) {
            *pixel = to_u8(sum, filter.precision);
        }
    }
    RgbImage::from_raw(image.width(), height, out).expect("buffer sized for the output")
}
