//! Antialiased bicubic resampling of 8-bit RGB, bit-exact with what transformers' default (torchvision) Qwen-VL
//! processor runs: `torchvision.transforms.v2.functional.resize(uint8 tensor, BICUBIC, antialias=True)`, i.e.
//! PyTorch's uint8 `_upsample_bicubic2d_aa` on the CPU, itself a port of Pillow-SIMD's `ImagingResample`.
//!
//! Separable: a horizontal pass (skipped when the width is unchanged) into an 8-bit intermediate, then a
//! vertical pass (skipped when the height is unchanged). For each axis, each output sample is a weighted sum of
//! the input samples under a Keys cubic (a = -0.5) stretched by the downscale factor (the antialiasing); the
//! weights are computed in f64, normalised, and converted to i16 fixed point with the most fractional bits that
//! keep the largest weight below 2^15; sums are i32 with round-half-up, clamped to 0..=255.
//!
//! The kernels: portable scalar ones, and on x86_64 SSE2 ones (always present there) plus an AVX2 vertical
//! pass chosen at run time; all compute the same integers, so they agree bit for bit (tested).

#[cfg(target_arch = "x86_64")]
mod x86;

use std::borrow::Cow;
use std::num::NonZeroUsize;
use std::ops::Range;

use image::RgbImage;

const CHANNELS: usize = 3;

#[cfg(target_arch = "x86_64")]
use x86::ROW_PADDING;
#[cfg(not(target_arch = "x86_64"))]
const ROW_PADDING: usize = 0;

/// The fixed-point filter of one axis: for output sample `i`, `taps[i]` weights starting at input `starts[i]`,
/// stored at `weights[i * stride..]`.
pub(super) struct AxisFilter {
    starts: Vec<usize>,
    taps: Vec<usize>,
    stride: usize,
    weights: Vec<i16>,
    pub(super) precision: u32,
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
    pub(super) fn new(input_size: usize, output_size: usize) -> AxisFilter {
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

    pub(super) fn weights(&self, i: usize) -> &[i16] {
        &self.weights[i * self.stride..i * self.stride + self.taps[i]]
    }

    pub(super) fn rounding(&self) -> i32 {
        1 << self.precision.saturating_sub(1)
    }

    pub(super) fn start(&self, i: usize) -> usize {
        self.starts[i]
    }
}

fn to_u8(sum: i32, precision: u32) -> u8 {
    (sum >> precision).clamp(0, 255) as u8
}

/// An image resampled to `width` x `height` as torchvision does, handed out in bands of rows: the horizontal
/// pass (when the width changes) runs over the whole image up front, the vertical pass (when the height changes)
/// only for the rows asked for, so a caller can use a few rows at a time while they are in cache, and the
/// resampled image is never stored whole.
pub(crate) struct Resampled<'a> {
    /// The input after the horizontal pass.
    columns: Cow<'a, RgbImage>,
    vertical: Option<AxisFilter>,
}

impl<'a> Resampled<'a> {
    /// `width` and `height` must be non-zero. The horizontal pass spreads its rows over up to `threads` threads.
    pub(crate) fn new(image: &'a RgbImage, width: u32, height: u32, threads: NonZeroUsize) -> Resampled<'a> {
        let columns = if width != image.width() {
            Cow::Owned(resize_horizontal(image, width, threads))
        } else {
            Cow::Borrowed(image)
        };
        let vertical = (height != image.height()).then(|| AxisFilter::new(image.height() as usize, height as usize));
        Resampled { columns, vertical }
    }

    /// Output rows `rows` (row-major RGB), borrowed from the input when the height is unchanged, else computed
    /// into `scratch`.
    pub(crate) fn band<'s>(&'s self, rows: Range<usize>, scratch: &'s mut Vec<u8>) -> &'s [u8] {
        let row = self.columns.width() as usize * CHANNELS;
        let src = self.columns.as_raw();
        let Some(filter) = &self.vertical else {
            return &src[rows.start * row..rows.end * row];
        };
        scratch.resize(rows.len() * row, 0);
        let mut lines: Vec<&[u8]> = Vec::with_capacity(filter.stride);
        for (y, dst) in rows.zip(scratch.chunks_exact_mut(row)) {
            lines.clear();
            lines.extend((0..filter.weights(y).len()).map(|k| &src[(filter.start(y) + k) * row..][..row]));
            vertical_row(&lines, filter.weights(y), filter.rounding(), filter.precision, dst);
        }
        scratch
    }
}

fn resize_horizontal(image: &RgbImage, width: u32, threads: NonZeroUsize) -> RgbImage {
    let filter = AxisFilter::new(image.width() as usize, width as usize);
    let in_row = image.width() as usize * CHANNELS;
    let out_row = width as usize * CHANNELS;
    let height = image.height() as usize;
    let mut out = vec![0u8; out_row * height];
    // Each row is copied with padding: the SIMD kernels read past a pixel's three bytes.
    let rows = |src: &[u8], dst: &mut [u8]| {
        let mut padded = vec![0u8; in_row + ROW_PADDING];
        for (src, dst) in src.chunks_exact(in_row).zip(dst.chunks_exact_mut(out_row)) {
            padded[..in_row].copy_from_slice(src);
            horizontal_row(&padded, &filter, dst);
        }
    };
    let threads = threads.get().min(height.max(1));
    if threads == 1 {
        rows(image.as_raw(), &mut out);
    } else {
        let per_thread = height.div_ceil(threads);
        std::thread::scope(|scope| {
            let parts = image.as_raw().chunks(per_thread * in_row).zip(out.chunks_mut(per_thread * out_row));
            for (src, dst) in parts {
                scope.spawn(move || rows(src, dst));
            }
        });
    }
    RgbImage::from_raw(width, image.height(), out).expect("buffer sized for the output")
}

/// One output row of the horizontal pass. `src` is the input row plus [`ROW_PADDING`] bytes.
fn horizontal_row(src: &[u8], filter: &AxisFilter, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    x86::horizontal_row_simd(src, filter, dst);
    #[cfg(not(target_arch = "x86_64"))]
    horizontal_row_scalar(src, filter, dst);
}

/// One output row of the vertical pass: `dst[i] = Σ_k lines[k][i] * weights[k]`, in fixed point; every line
/// is as long as `dst`.
fn vertical_row(lines: &[&[u8]], weights: &[i16], rounding: i32, precision: u32, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    let done = x86::vertical_row_simd(lines, weights, rounding, precision, dst);
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    vertical_columns_scalar(lines, weights, rounding, precision, dst, done);
}

#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
fn horizontal_row_scalar(src: &[u8], filter: &AxisFilter, dst: &mut [u8]) {
    let rounding = filter.rounding();
    for (x, pixel) in dst.chunks_exact_mut(CHANNELS).enumerate() {
        let start = filter.start(x) * CHANNELS;
        let mut sum = [rounding; CHANNELS];
        for (k, &weight) in filter.weights(x).iter().enumerate() {
            let at = start + k * CHANNELS;
            for (c, sum) in sum.iter_mut().enumerate() {
                *sum += i32::from(src[at + c]) * i32::from(weight);
            }
        }
        for (value, sum) in pixel.iter_mut().zip(sum) {
            *value = to_u8(sum, filter.precision);
        }
    }
}

/// The vertical pass for columns `from..` of a row (the SIMD kernels leave a tail narrower than a register).
fn vertical_columns_scalar(
    lines: &[&[u8]],
    weights: &[i16],
    rounding: i32,
    precision: u32,
    dst: &mut [u8],
    from: usize,
) {
    for (x, pixel) in dst.iter_mut().enumerate().skip(from) {
        let mut sum = rounding;
        for (line, &weight) in lines.iter().zip(weights) {
            sum += i32::from(line[x]) * i32::from(weight);
        }
        *pixel = to_u8(sum, precision);
    }
}
