//! x86_64 kernels (Pillow-SIMD's scheme): pixels widened to i16 and interleaved in pairs of taps, so that one
//! `pmaddwd` computes `a * w0 + b * w1` for four columns at once in exact i32 arithmetic; results shifted, then
//! packed with saturation (the same as clamping to 0..=255).

use std::arch::x86_64::*;

use super::{AxisFilter, CHANNELS};

/// Two i16 weights in the halves of an i32 lane, as `pmaddwd` pairs them with (first, second) samples.
fn weight_pair(first: i16, second: i16) -> i32 {
    i32::from(first as u16) | (i32::from(second as u16) << 16)
}

/// Bytes a row needs after its last pixel for these kernels' loads (read, never used).
pub(super) const ROW_PADDING: usize = 16;

/// The horizontal pass of one row (AVX2 when the CPU has it, else SSE2). `src` is the row plus
/// [`ROW_PADDING`] bytes.
pub(super) fn horizontal_row_simd(src: &[u8], filter: &AxisFilter, dst: &mut [u8]) {
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above); bounds are checked inside.
        unsafe { horizontal_row_avx2(src, filter, dst) }
    } else {
        horizontal_row_sse2(src, filter, dst)
    }
}

/// One output pixel's taps: the input bytes under them (plus padding) and their weights.
fn window<'a>(src: &'a [u8], filter: &'a AxisFilter, x: usize) -> (&'a [u8], &'a [i16]) {
    let weights = filter.weights(x);
    let start = filter.start(x) * CHANNELS;
    (&src[start..start + weights.len() * CHANNELS + ROW_PADDING], weights)
}

/// Adds `a * w0 + b * w1` per channel for the pixels at `pixels[at..]` (reading 4 bytes each: R, G, B and a
/// discarded byte). SSE2 only.
///
/// # Safety
/// `pixels` must hold at least `at + 7` bytes.
#[inline(always)]
unsafe fn add_pixel_pair(sum: __m128i, pixels: &[u8], at: usize, pair: i32) -> __m128i {
    let zero = _mm_setzero_si128();
    let read = |offset: usize| _mm_cvtsi32_si128(pixels.as_ptr().add(offset).cast::<i32>().read_unaligned());
    let a = _mm_unpacklo_epi8(read(at), zero);
    let b = _mm_unpacklo_epi8(read(at + CHANNELS), zero);
    _mm_add_epi32(sum, _mm_madd_epi16(_mm_unpacklo_epi16(a, b), _mm_set1_epi32(pair)))
}

/// Writes the three channel sums of `sum` (lanes 0..3), shifted and clamped, into `pixel`.
#[inline(always)]
fn store_pixel(sum: __m128i, precision: u32, pixel: &mut [u8]) {
    // SAFETY: SSE2 is part of the x86_64 baseline; register-only intrinsics.
    let packed = unsafe {
        let shifted = _mm_sra_epi32(sum, _mm_cvtsi32_si128(precision as i32));
        _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(shifted, shifted), _mm_setzero_si128()))
    };
    let [r, g, b, _] = packed.to_le_bytes();
    pixel.copy_from_slice(&[r, g, b]);
}

/// Two taps per step.
fn horizontal_row_sse2(src: &[u8], filter: &AxisFilter, dst: &mut [u8]) {
    for (x, pixel) in dst.chunks_exact_mut(CHANNELS).enumerate() {
        let (pixels, weights) = window(src, filter, x);
        // SAFETY: SSE2 is baseline; pair k reads pixels[3k..3k + 7], within 3 * taps + ROW_PADDING.
        let sum = unsafe {
            let mut sum = _mm_set1_epi32(filter.rounding());
            let mut pairs = weights.chunks_exact(2);
            for (k, pair) in (&mut pairs).enumerate() {
                sum = add_pixel_pair(sum, pixels, 2 * k * CHANNELS, weight_pair(pair[0], pair[1]));
            }
            if let [last] = pairs.remainder() {
                sum = add_pixel_pair(sum, pixels, (weights.len() - 1) * CHANNELS, weight_pair(*last, 0));
            }
            sum
        };
        store_pixel(sum, filter.precision, pixel);
    }
}

/// Four taps per step: 16 bytes (pixels k..k+3) loaded once, shuffled to (k, k+1) in the low lane and
/// (k+2, k+3) in the high lane, each channel's two samples side by side as i16, then one `vpmaddwd`.
#[target_feature(enable = "avx2")]
fn horizontal_row_avx2(src: &[u8], filter: &AxisFilter, dst: &mut [u8]) {
    const Z: i8 = -128; // pshufb: zero this byte
    for (x, pixel) in dst.chunks_exact_mut(CHANNELS).enumerate() {
        let (pixels, weights) = window(src, filter, x);
        let quads = weights.len() / 4;
        // SAFETY: AVX2 is enabled for this function (its caller checked the CPU). Quad q reads
        // pixels[12q..12q + 16], within 3 * taps + ROW_PADDING since 12q + 12 <= 3 * taps; the pairs after the
        // quads read as in horizontal_row_sse2.
        let sum = unsafe {
            let shuffle = _mm256_setr_epi8(
                0, Z, 3, Z, 1, Z, 4, Z, 2, Z, 5, Z, Z, Z, Z, Z, //
                6, Z, 9, Z, 7, Z, 10, Z, 8, Z, 11, Z, Z, Z, Z, Z,
            );
            let mut wide = _mm256_setzero_si256();
            for q in 0..quads {
                let w = &weights[4 * q..4 * q + 4];
                let pairs = _mm256_setr_epi32(
                    weight_pair(w[0], w[1]),
                    weight_pair(w[0], w[1]),
                    weight_pair(w[0], w[1]),
                    weight_pair(w[0], w[1]),
                    weight_pair(w[2], w[3]),
                    weight_pair(w[2], w[3]),
                    weight_pair(w[2], w[3]),
                    weight_pair(w[2], w[3]),
                );
                let bytes = _mm_loadu_si128(pixels.as_ptr().add(12 * q).cast());
                let samples = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(bytes), shuffle);
                wide = _mm256_add_epi32(wide, _mm256_madd_epi16(samples, pairs));
            }
            let mut sum = _mm_add_epi32(
                _mm_add_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256::<1>(wide)),
                _mm_set1_epi32(filter.rounding()),
            );
            let rest = &weights[4 * quads..];
            let mut k = 4 * quads;
            for pair in rest.chunks(2) {
                let second = pair.get(1).copied().unwrap_or(0);
                sum = add_pixel_pair(sum, pixels, k * CHANNELS, weight_pair(pair[0], second));
                k += 2;
            }
            sum
        };
        store_pixel(sum, filter.precision, pixel);
    }
}

/// The vertical pass of one row over as many leading columns as whole registers cover (AVX2 when the CPU has
/// it, else SSE2); returns how many columns it wrote.
pub(super) fn vertical_row_simd(
    lines: &[&[u8]],
    weights: &[i16],
    rounding: i32,
    precision: u32,
    dst: &mut [u8],
) -> usize {
    assert!(lines.len() == weights.len() && lines.iter().all(|line| line.len() >= dst.len()));
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above); bounds are checked inside.
        unsafe { vertical_row_avx2(lines, weights, rounding, precision, dst) }
    } else {
        vertical_row_sse2(lines, weights, rounding, precision, dst)
    }
}

/// The vertical kernel, written once for two register widths: `$step` columns at a time with the given
/// intrinsics. In AVX2 the unpacks and packs work within 128-bit lanes, symmetrically, so the columns come back in
/// order.
macro_rules! vertical_kernel {
    ($(#[$attribute:meta])* $name:ident: $step:literal columns, $zero:ident, $set1:ident, $load:ident, $store:ident,
     $unpacklo8:ident, $unpackhi8:ident, $unpacklo16:ident, $unpackhi16:ident, $madd:ident, $add:ident,
     $sra:ident, $packs:ident, $packus:ident) => {
        $(#[$attribute])*
        fn $name(lines: &[&[u8]], weights: &[i16], rounding: i32, precision: u32, dst: &mut [u8]) -> usize {
            let columns = dst.len() / $step * $step;
            // SAFETY: the instruction set is available (SSE2: the x86_64 baseline; AVX2: enabled for this function,
            // whose caller checked the CPU). Every load reads lines[k][x..x + $step] and every store writes
            // dst[x..x + $step] with x + $step <= columns <= dst.len() <= lines[k].len() (asserted by the caller).
            unsafe {
                let zero = $zero();
                let shift = _mm_cvtsi32_si128(precision as i32);
                for x in (0..columns).step_by($step) {
                    let mut sums = [$set1(rounding); 4];
                    let mut k = 0;
                    while k < lines.len() {
                        let a = $load(lines[k].as_ptr().add(x).cast());
                        let (b, pair) = if k + 1 < lines.len() {
                            ($load(lines[k + 1].as_ptr().add(x).cast()), weight_pair(weights[k], weights[k + 1]))
                        } else {
                            (zero, weight_pair(weights[k], 0))
                        };
                        let pair = $set1(pair);
                        let (a_lo, a_hi) = ($unpacklo8(a, zero), $unpackhi8(a, zero));
                        let (b_lo, b_hi) = ($unpacklo8(b, zero), $unpackhi8(b, zero));
                        let products = [
                            $madd($unpacklo16(a_lo, b_lo), pair),
                            $madd($unpackhi16(a_lo, b_lo), pair),
                            $madd($unpacklo16(a_hi, b_hi), pair),
                            $madd($unpackhi16(a_hi, b_hi), pair),
                        ];
                        for (sum, product) in sums.iter_mut().zip(products) {
                            *sum = $add(*sum, product);
                        }
                        k += 2;
                    }
                    let [s0, s1, s2, s3] = sums.map(|sum| $sra(sum, shift));
                    let packed = $packus($packs(s0, s1), $packs(s2, s3));
                    $store(dst.as_mut_ptr().add(x).cast(), packed);
                }
            }
            columns
        }
    };
}

vertical_kernel!(vertical_row_sse2: 16 columns, _mm_setzero_si128, _mm_set1_epi32, _mm_loadu_si128,
    _mm_storeu_si128, _mm_unpacklo_epi8, _mm_unpackhi_epi8, _mm_unpacklo_epi16, _mm_unpackhi_epi16, _mm_madd_epi16,
    _mm_add_epi32, _mm_sra_epi32, _mm_packs_epi32, _mm_packus_epi16);

vertical_kernel!(#[target_feature(enable = "avx2")] vertical_row_avx2: 32 columns, _mm256_setzero_si256,
    _mm256_set1_epi32, _mm256_loadu_si256, _mm256_storeu_si256, _mm256_unpacklo_epi8, _mm256_unpackhi_epi8,
    _mm256_unpacklo_epi16, _mm256_unpackhi_epi16, _mm256_madd_epi16, _mm256_add_epi32, _mm256_sra_epi32,
    _mm256_packs_epi32, _mm256_packus_epi16);

#[cfg(test)]
mod tests {
    use super::super::{horizontal_row_scalar, vertical_columns_scalar, AxisFilter, CHANNELS};
    use super::*;

    /// Each kernel (SSE2 always, AVX2 when the CPU has it) against the scalar one, on awkward sizes: tails,
    /// one-pixel rows, odd tap counts, upscales and large downscales.
    #[test]
    fn kernels_match_scalar() {
        let avx2 = is_x86_feature_detected!("avx2");
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for &(in_size, out_size) in &[(1, 7), (7, 1), (5, 3), (33, 17), (100, 37), (1000, 31), (64, 200), (97, 96)] {
            let filter = AxisFilter::new(in_size, out_size);
            let src: Vec<u8> = (0..in_size * CHANNELS + ROW_PADDING).map(|_| next() as u8).collect();
            let mut expected = vec![0u8; out_size * CHANNELS];
            horizontal_row_scalar(&src, &filter, &mut expected);
            let mut got = vec![0u8; out_size * CHANNELS];
            horizontal_row_sse2(&src, &filter, &mut got);
            assert_eq!(got, expected, "SSE2 horizontal {in_size} -> {out_size}");
            if avx2 {
                // SAFETY: the CPU supports AVX2.
                unsafe { horizontal_row_avx2(&src, &filter, &mut got) };
                assert_eq!(got, expected, "AVX2 horizontal {in_size} -> {out_size}");
            }

            for width in [1usize, 15, 16, 17, 31, 32, 33, 70] {
                let rows: Vec<Vec<u8>> = (0..in_size).map(|_| (0..width).map(|_| next() as u8).collect()).collect();
                for y in 0..out_size {
                    let lines: Vec<&[u8]> =
                        (0..filter.weights(y).len()).map(|k| rows[filter.start(y) + k].as_slice()).collect();
                    let (weights, rounding, precision) = (filter.weights(y), filter.rounding(), filter.precision);
                    let mut expected = vec![0u8; width];
                    vertical_columns_scalar(&lines, weights, rounding, precision, &mut expected, 0);
                    let mut got = vec![0u8; width];
                    let done = vertical_row_sse2(&lines, weights, rounding, precision, &mut got);
                    vertical_columns_scalar(&lines, weights, rounding, precision, &mut got, done);
                    assert_eq!(got, expected, "SSE2 vertical {in_size} -> {out_size}, width {width}, row {y}");
                    if avx2 {
                        // SAFETY: the CPU supports AVX2.
                        let done = unsafe { vertical_row_avx2(&lines, weights, rounding, precision, &mut got) };
                        vertical_columns_scalar(&lines, weights, rounding, precision, &mut got, done);
                        assert_eq!(got, expected, "AVX2 vertical {in_size} -> {out_size}, width {width}, row {y}");
                    }
                }
            }
        }
    }
}
