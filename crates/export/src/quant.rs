//! int4 weight-only quantization for ONNX Runtime's `com.microsoft.MatMulNBits`.
//!
//! Round-to-nearest, block-wise along K, symmetric (no `zero_points` input, so MatMulNBits uses
//! its default zero point 8 and its fastest CUDA path). Layout (ORT 1.31 schema):
//!
//! * `B`: uint8 `(N, k_blocks, block_size / 2)`, `k_blocks = ceil(K / block_size)`; row `n` is
//!   the output feature, codes are packed along K, two per byte, the even index in the low
//!   nibble. Hugging Face linear weights are already `(N = out, K = in)`: no transpose.
//! * `scales`: `(N, k_blocks)` in A's dtype.
//! * dequantization: `w[n, k] = (q[n, k] - 8) * scales[n, k / block_size]`.
//!
//! ## The formula (mirrors ONNX Runtime's own quantizer)
//!
//! For each block, `m` is the element of largest magnitude *with its sign* (the negative one
//! on a tie) and
//!
//! ```text
//! scale = m / -8                       (rounded to the scales dtype first)
//! q     = clamp(round(w * (1 / scale) + 8), 0, 15)     round = half away from zero
//! ```
//!
//! so the largest-magnitude element maps exactly onto code 0 (`-8 * scale = m`), the side of
//! `m` gets all 8 negative levels and the opposite side the 7 positive ones. This is what
//! `MatMulNBitsQuantizer(is_symmetric=True)` / `quantize_matmul_4bits` produce (MLAS
//! `BlockwiseQuantizer::quantizeAndTranspose` with `range2scale`: `scale = -max / 8`, where
//! `max` is the signed extreme, `roundf(v * reciprocal + 8)`); the same scheme as MLAS'
//! older `BlkQ4Sym`. The output is bit-identical to ORT's quantizer (tested below).
//! onnxruntime-genai's model builder calls that quantizer with `int4_is_symmetric` defaulting
//! to true, block size 32.
//!
//! Why not `absmax / 7` with codes 1..15: its step is 8/7 larger, so the rounding noise of
//! every element is ~14% larger (RMS), while `m / -8` only loses on elements of the opposite
//! sign beyond 7.5 steps, rare within a block. On Gaussian weights the RMS error is 11-12%
//! lower (relative RMS error 0.076 / 0.086 / 0.095 / 0.103 of the weights' RMS at block 16 /
//! 32 / 64 / 128, against 0.085 / 0.097 / 0.108 / 0.117 for `absmax / 7`). The per-element
//! error is `<= |scale| / 2`, except those clamped opposite-side elements, whose error is
//! `<= |scale|`.
//!
//! Padding: when K is not a multiple of the block size the last block's tail is quantized as
//! zeros (code 8, dequantizes to exactly 0); ORT reads only K elements of A, so the tail never
//! contributes. An all-zero block has scale 0 and codes 8 (no division by zero: the
//! reciprocal of a zero scale is taken as 0, as in MLAS).
//!
//! ## ONNX Runtime 1.31.1 CPU kernel (tests/int4_matmulnbits.rs)
//!
//! * A (and scales, bias) in float32 or float16 run; bfloat16 has no CPU kernel ("Could not
//!   find an implementation for MatMulNBits").
//! * float32 A with `accuracy_level` 0 (and 1..3, same result) matches `A @ dequantize(W)^T`
//!   to ~3e-7 of the output's scale; `accuracy_level` 4 quantizes A to int8 per block
//!   (faster) and agrees only to ~1e-2. Any K (odd, or < block size) and blocks 16..256 work.

use half::{bf16, f16};
use pio_models::manifest::TensorDtype;
use safetensors::Dtype;

use crate::checkpoint::TensorRef;
use crate::convert::{is_float, push_f32};
use crate::error::{BuildError, BuildResult as Result, CheckpointError, QuantError};
use crate::onnx::graph::Graph;

/// Bits per weight.
pub const BITS: usize = 4;
/// MatMulNBits' default zero point for 4 bits when no `zero_points` input is given.
pub const ZERO_POINT: u8 = 8;
/// Smallest block size MatMulNBits accepts (it must also be a power of two).
pub const MIN_BLOCK_SIZE: usize = 16;

/// Shape of one quantized (N, K) weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int4Layout {
    /// Output features (rows of the Hugging Face weight).
    pub n: usize,
    /// Input features (the reduction axis).
    pub k: usize,
    /// Elements per quantization block along K: a power of two >= 16.
    pub block_size: usize,
}

impl Int4Layout {
    /// Checks the shape and block size.
    pub fn new(n: usize, k: usize, block_size: usize) -> std::result::Result<Self, QuantError> {
        if n == 0 || k == 0 {
            return Err(QuantError::Empty { n, k });
        }
        if block_size < MIN_BLOCK_SIZE || !block_size.is_power_of_two() {
            return Err(QuantError::BlockSize { block_size });
        }
        Ok(Int4Layout { n, k, block_size })
    }

    /// Blocks per row: `ceil(K / block_size)`.
    pub fn k_blocks(&self) -> usize {
        self.k.div_ceil(self.block_size)
    }

    /// Bytes per block (`block_size * bits / 8`).
    pub fn blob_size(&self) -> usize {
        self.block_size * BITS / 8
    }

    /// Packed bytes per output row.
    pub fn row_bytes(&self) -> usize {
        self.k_blocks() * self.blob_size()
    }

    /// Shape of the `B` initializer: `(N, k_blocks, blob_size)`.
    pub fn b_shape(&self) -> [usize; 3] {
        [self.n, self.k_blocks(), self.blob_size()]
    }

    /// Shape of the `scales` initializer: `(N, k_blocks)`.
    pub fn scales_shape(&self) -> [usize; 2] {
        [self.n, self.k_blocks()]
    }

    pub fn packed_len(&self) -> usize {
        self.n * self.row_bytes()
    }

    pub fn scales_len(&self) -> usize {
        self.n * self.k_blocks()
    }
}

/// `x` rounded to the nearest value of `dtype` (a floating type), as f32.
pub fn round_to_dtype(x: f32, dtype: TensorDtype) -> f32 {
    match dtype {
        TensorDtype::Float16 => f16::from_f32(x).to_f32(),
        TensorDtype::Bfloat16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn check_scale_dtype(dtype: TensorDtype) -> std::result::Result<(), QuantError> {
    if !is_float(dtype) {
        return Err(QuantError::ScaleDtype { dtype });
    }
    Ok(())
}

fn check_length(what: &'static str, got: usize, expected: usize) -> std::result::Result<(), QuantError> {
    if got != expected {
        return Err(QuantError::Length { what, got, expected });
    }
    Ok(())
}

/// The scale of one block, already rounded to the scales dtype (codes are computed from the
/// stored value, as ORT does, so rounding the scale does not shift the codes' error).
#[inline]
fn block_scale(block: &[f32], scale_dtype: TensorDtype) -> f32 {
    let (mut lo, mut hi) = (0.0f32, 0.0f32);
    for &v in block {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    // On a magnitude tie the negative extreme wins (as in MLAS' range2scale).
    let m = if hi.abs() > lo.abs() { hi } else { lo };
    round_to_dtype(m / -8.0, scale_dtype)
}

#[inline]
fn code(w: f32, reciprocal: f32) -> u8 {
    (w * reciprocal + ZERO_POINT as f32).round().clamp(0.0, 15.0) as u8
}

/// Quantizes output row `index` of K weights (`row`) into `packed` (`row_bytes` bytes) and
/// `scales` (`k_blocks` values, exactly representable in `scale_dtype`). Fails on non-finite
/// weights or scales that overflow `scale_dtype`, naming the row (`index`) and the column.
pub fn quantize_row(
    layout: &Int4Layout,
    index: usize,
    row: &[f32],
    scale_dtype: TensorDtype,
    packed: &mut [u8],
    scales: &mut [f32],
) -> std::result::Result<(), QuantError> {
    check_scale_dtype(scale_dtype)?;
    check_length("the row", row.len(), layout.k)?;
    check_length("the packed row buffer", packed.len(), layout.row_bytes())?;
    check_length("the scales row buffer", scales.len(), layout.k_blocks())?;
    let bs = layout.block_size;
    for (b, (scale_out, blob)) in scales.iter_mut().zip(packed.chunks_exact_mut(layout.blob_size())).enumerate() {
        let block = &row[b * bs..((b + 1) * bs).min(layout.k)];
        if let Some(bad) = block.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NotFinite { row: index, column: b * bs + bad, value: block[bad] });
        }
        let scale = block_scale(block, scale_dtype);
        if !scale.is_finite() {
            return Err(QuantError::ScaleOverflow { row: index, block: b, dtype: scale_dtype });
        }
        *scale_out = scale;
        let reciprocal = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        // Tail of a short last block: code 8 (zero).
        let at = |i: usize| if i < block.len() { code(block[i], reciprocal) } else { ZERO_POINT };
        for (j, byte) in blob.iter_mut().enumerate() {
            *byte = at(2 * j) | (at(2 * j + 1) << 4);
        }
    }
    Ok(())
}

/// Rows packed per call of the sink in [`quantize_rows`] (bounded memory, few calls).
const ROW_CHUNK_BYTES: usize = 1 << 20;

/// Streams an (N, K) weight row by row: `read_row(n, buf)` fills `buf` (K values) with row
/// `n`; packed bytes go to `write_packed` in row order (`N * row_bytes` in all). Returns the
/// scales (`N * k_blocks`, row-major, exactly representable in `scale_dtype`): they are small
/// (1/16..1/128 of the weights' element count) and are written as their own initializer.
/// `weight` names the weight in errors.
pub fn quantize_rows(
    weight: &str,
    layout: &Int4Layout,
    scale_dtype: TensorDtype,
    mut read_row: impl FnMut(usize, &mut [f32]) -> Result<()>,
    mut write_packed: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Vec<f32>> {
    check_scale_dtype(scale_dtype).map_err(BuildError::quantize(weight))?;
    let (rb, kb, k) = (layout.row_bytes(), layout.k_blocks(), layout.k);
    let rows_per_chunk = (ROW_CHUNK_BYTES / rb).clamp(1, layout.n);
    let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1).min(rows_per_chunk);
    let mut rows = vec![0f32; rows_per_chunk * k];
    let mut packed = vec![0u8; rows_per_chunk * rb];
    let mut scales = vec![0f32; layout.scales_len()];
    let mut n0 = 0;
    while n0 < layout.n {
        let n1 = (n0 + rows_per_chunk).min(layout.n);
        let count = n1 - n0;
        // Rows are read in order (the source may be a stream); quantizing them is pure, so the
        // chunk's rows are split over the cores.
        for (i, n) in (n0..n1).enumerate() {
            read_row(n, &mut rows[i * k..(i + 1) * k])?;
        }
        let per_thread = count.div_ceil(threads);
        let chunk_scales = &mut scales[n0 * kb..n1 * kb];
        let results: Vec<std::result::Result<(), QuantError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = rows[..count * k]
                .chunks(per_thread * k)
                .zip(packed[..count * rb].chunks_mut(per_thread * rb))
                .zip(chunk_scales.chunks_mut(per_thread * kb))
                .enumerate()
                .map(|(t, ((src, dst), sc))| {
                    scope.spawn(move || {
                        for (i, ((row, p), s)) in
                            src.chunks(k).zip(dst.chunks_mut(rb)).zip(sc.chunks_mut(kb)).enumerate()
                        {
                            quantize_row(layout, n0 + t * per_thread + i, row, scale_dtype, p, s)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(Err(QuantError::ThreadPanicked))).collect()
        });
        for r in results {
            r.map_err(BuildError::quantize(weight))?;
        }
        write_packed(&packed[..count * rb])?;
        n0 = n1;
    }
    Ok(scales)
}

/// A quantized weight held in memory (tests, small tensors).
#[derive(Clone, Debug)]
pub struct Int4Weights {
    pub layout: Int4Layout,
    /// `B`: `N * row_bytes` bytes.
    pub packed: Vec<u8>,
    /// `N * k_blocks` scales (values of the scales dtype, as f32).
    pub scales: Vec<f32>,
}

/// Quantizes a row-major (N, K) f32 matrix (named "the weights" in errors).
pub fn quantize(layout: &Int4Layout, weights: &[f32], scale_dtype: TensorDtype) -> Result<Int4Weights> {
    const NAME: &str = "the weights";
    check_length("the weights", weights.len(), layout.n * layout.k).map_err(BuildError::quantize(NAME))?;
    let mut packed = Vec::with_capacity(layout.packed_len());
    let k = layout.k;
    let scales = quantize_rows(
        NAME,
        layout,
        scale_dtype,
        |n, buf| {
            buf.copy_from_slice(&weights[n * k..(n + 1) * k]);
            Ok(())
        },
        |bytes| {
            packed.extend_from_slice(bytes);
            Ok(())
        },
    )?;
    Ok(Int4Weights { layout: *layout, packed, scales })
}

/// The 4-bit code of element (n, k) of a packed `B`.
#[inline]
pub fn code_at(layout: &Int4Layout, packed: &[u8], n: usize, k: usize) -> u8 {
    let (b, i) = (k / layout.block_size, k % layout.block_size);
    let byte = packed[n * layout.row_bytes() + b * layout.blob_size() + i / 2];
    if i % 2 == 0 {
        byte & 0x0F
    } else {
        byte >> 4
    }
}

/// Reference dequantization (what MatMulNBits computes with): the row-major (N, K) matrix
/// `(q - 8) * scale`, without the padding.
pub fn dequantize(layout: &Int4Layout, packed: &[u8], scales: &[f32]) -> Vec<f32> {
    assert_eq!(packed.len(), layout.packed_len(), "packed B length");
    assert_eq!(scales.len(), layout.scales_len(), "scales length");
    let kb = layout.k_blocks();
    let mut out = Vec::with_capacity(layout.n * layout.k);
    for n in 0..layout.n {
        for k in 0..layout.k {
            let q = code_at(layout, packed, n, k) as i32 - ZERO_POINT as i32;
            out.push(q as f32 * scales[n * kb + k / layout.block_size]);
        }
    }
    out
}

/// Scales as little-endian bytes of `dtype` (exact: the values came from that dtype).
pub fn scales_bytes(scales: &[f32], dtype: TensorDtype) -> std::result::Result<Vec<u8>, QuantError> {
    check_scale_dtype(dtype)?;
    let mut out = Vec::with_capacity(scales.len() * dtype.size_bytes());
    for &s in scales {
        push_f32(dtype, s, &mut out);
    }
    Ok(out)
}

/// Reads row `row` of a 2-D F32/F16/BF16 tensor as f32 into `out` (length = columns).
pub fn read_row_f32(t: &TensorRef, row: usize, out: &mut [f32]) -> Result<()> {
    let [rows, cols] = t.shape[..] else {
        return Err(BuildError::Internal(format!("tensor {} should be 2-D, has shape {:?}", t.name, t.shape)));
    };
    if out.len() != cols || row >= rows {
        let problem = format!("row {row} / buffer {} outside tensor {} {:?}", out.len(), t.name, t.shape);
        return Err(BuildError::Internal(problem));
    }
    match t.dtype {
        Dtype::F32 => {
            let bytes = &t.data[row * cols * 4..(row + 1) * cols * 4];
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 | Dtype::BF16 => {
            let bytes = &t.data[row * cols * 2..(row + 1) * cols * 2];
            let bf = t.dtype == Dtype::BF16;
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = if bf {
                    bf16::from_le_bytes([c[0], c[1]]).to_f32()
                } else {
                    f16::from_le_bytes([c[0], c[1]]).to_f32()
                };
            }
        }
        dtype => {
            let file = t.file.to_path_buf();
            return Err(CheckpointError::UnsupportedDtype { tensor: t.name.to_string(), file, dtype }.into());
        }
    }
    Ok(())
}

/// `y = x @ W^T` with W = `t`, a Hugging Face (out, in) linear weight, quantized to int4:
/// adds the `B` and `scales` initializers (`<name>.weight_q4`, `<name>.scales`) and the
/// MatMulNBits node (`name`), returns its output. `dtype` is A's (the activations') dtype,
/// which the scales take; `accuracy_level` is MatMulNBits' attribute (0 = unset: compute in
/// A's type; 4 = quantize A to int8 per block on the CPU), omitted from the node when 0.
pub fn matmul_nbits(
    g: &mut Graph,
    x: &str,
    t: &TensorRef,
    name: &str,
    block_size: usize,
    dtype: TensorDtype,
    accuracy_level: i64,
) -> Result<String> {
    matmul_nbits_parts(g, x, std::slice::from_ref(t), name, block_size, dtype, accuracy_level, None)
}

/// Like [`matmul_nbits`] for several (out_i, in) weights concatenated along the output axis
/// (fused q/k/v or gate/up: one MatMulNBits with N = sum out_i), with an optional bias
/// (a graph value of shape (N,) in `dtype`, MatMulNBits' input 5).
#[allow(clippy::too_many_arguments)]
pub fn matmul_nbits_parts(
    g: &mut Graph,
    x: &str,
    parts: &[TensorRef],
    name: &str,
    block_size: usize,
    dtype: TensorDtype,
    accuracy_level: i64,
    bias: Option<&str>,
) -> Result<String> {
    let internal = |problem: String| BuildError::Internal(format!("{name}: {problem}"));
    let Some(k) = parts.first().and_then(|t| t.shape.get(1).copied()) else {
        return Err(internal(format!(
            "no 2-D weights to quantize: {:?}",
            parts.iter().map(|t| &t.shape).collect::<Vec<_>>()
        )));
    };
    if let Some(t) = parts.iter().find(|t| t.shape.len() != 2 || t.shape[1] != k) {
        return Err(internal(format!("tensor {} has shape {:?}, the others {k} input features", t.name, t.shape)));
    }
    let n: usize = parts.iter().map(|t| t.shape[0]).sum();
    let layout = Int4Layout::new(n, k, block_size).map_err(BuildError::quantize(name))?;
    // Global row -> (part, row in part).
    let mut starts = Vec::with_capacity(parts.len());
    let mut acc = 0;
    for t in parts {
        starts.push(acc);
        acc += t.shape[0];
    }
    matmul_nbits_rows(g, x, name, &layout, dtype, accuracy_level, bias, |row, buf| {
        let p = starts.partition_point(|&s| s <= row) - 1;
        read_row_f32(&parts[p], row - starts[p], buf)
    })
}

/// The source-agnostic core of [`matmul_nbits`]: the (N, K) weight comes row by row from
/// `read_row(n, buf)` (K values), quantized as it streams into the weight file.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nbits_rows(
    g: &mut Graph,
    x: &str,
    name: &str,
    layout: &Int4Layout,
    dtype: TensorDtype,
    accuracy_level: i64,
    bias: Option<&str>,
    read_row: impl FnMut(usize, &mut [f32]) -> Result<()>,
) -> Result<String> {
    let (b_name, s_name) = int4_initializers(g, name, layout, dtype, read_row)?;
    matmul_nbits_node(g, x, name, layout, &b_name, &s_name, accuracy_level, bias)
}

/// Quantizes an (N, K) weight streamed row by row into the two initializers MatMulNBits (and
/// GatherBlockQuantized, viewed as (N, K/2)) read: `<name>.weight_q4` uint8 (N, k_blocks,
/// block/2) and `<name>.scales` (N, k_blocks) in `dtype`. Returns their names.
pub fn int4_initializers(
    g: &mut Graph,
    name: &str,
    layout: &Int4Layout,
    dtype: TensorDtype,
    read_row: impl FnMut(usize, &mut [f32]) -> Result<()>,
) -> Result<(String, String)> {
    check_scale_dtype(dtype).map_err(BuildError::quantize(name))?;
    let mut scales = Vec::new();
    let b_name = g.initializer_with(&format!("{name}.weight_q4"), TensorDtype::Uint8, &layout.b_shape(), |sink| {
        scales = quantize_rows(name, layout, dtype, read_row, |bytes| sink.write(bytes))?;
        Ok(())
    })?;
    let scale_bytes = scales_bytes(&scales, dtype).map_err(BuildError::quantize(name))?;
    let s_name = g.initializer(&format!("{name}.scales"), dtype, &layout.scales_shape(), &scale_bytes)?;
    Ok((b_name, s_name))
}

/// A MatMulNBits node over initializers written by [`int4_initializers`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_nbits_node(
    g: &mut Graph,
    x: &str,
    name: &str,
    layout: &Int4Layout,
    b_name: &str,
    s_name: &str,
    accuracy_level: i64,
    bias: Option<&str>,
) -> Result<String> {
    if !(0..=4).contains(&accuracy_level) {
        return Err(BuildError::Internal(format!("{name}: accuracy_level must be 0..=4, got {accuracy_level}")));
    }
    let mut inputs: Vec<&str> = vec![x, b_name, s_name];
    if let Some(b) = bias {
        // zero_points (3) and g_idx (4) omitted.
        inputs.extend(["", "", b]);
    }
    let mut node = g
        .node("MatMulNBits", name)
        .ms()
        .inputs(&inputs)
        .attr("K", layout.k)
        .attr("N", layout.n)
        .attr("bits", BITS)
        .attr("block_size", layout.block_size);
    if accuracy_level != 0 {
        node = node.attr("accuracy_level", accuracy_level);
    }
    Ok(node.out())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const F32: TensorDtype = TensorDtype::Float32;

    fn gaussian(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f32 = rng.random::<f32>().max(1e-12);
                let u2: f32 = rng.random::<f32>();
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    }

    #[test]
    fn nibble_order_and_scale_sign_on_hand_computed_rows() {
        let l = Int4Layout::new(2, 16, 16).unwrap();
        // Row 0: -8..7, extreme -8 -> scale 1, codes 0..15 in order.
        let mut w: Vec<f32> = (0..16).map(|i| i as f32 - 8.0).collect();
        // Row 1: extreme +8 -> scale -1, q = round(8 - w).
        w.extend([8.0, 0.0, -7.0, 1.0, 2.4, 2.6, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let q = quantize(&l, &w, F32).unwrap();
        assert_eq!(q.scales, vec![1.0, -1.0]);
        assert_eq!(&q.packed[..8], &[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]);
        // 8->0, 0->8 | -7->15, 1->7 | 2.4->5.6->6, 2.6->5.4->5 | -0.5->8.5->9 (half away), 0.5->7.5->8 | zeros->8
        assert_eq!(&q.packed[8..], &[0x80, 0x7F, 0x56, 0x89, 0x88, 0x88, 0x88, 0x88]);
        let d = dequantize(&l, &q.packed, &q.scales);
        assert_eq!(&d[..16], &w[..16]);
        assert_eq!(&d[16..24], &[8.0, 0.0, -7.0, 1.0, 2.0, 3.0, -1.0, 0.0]);
        for k in 0..16 {
            assert_eq!(code_at(&l, &q.packed, 0, k), k as u8);
        }
    }

    /// Bit-exact with onnxruntime 1.31.1's `quantize_matmul_4bits(..., is_symmetric=True)`
    /// (what `MatMulNBitsQuantizer(is_symmetric=True)` writes): weights
    /// `w[n, k] = ((n * 40 + k) * 37 % 101 - 50) / 16` (exact in f32; the 0.375-scale block has
    /// rounding ties),
    /// N = 2, K = 40, block 16. Expected bytes printed by that function (its padding
    /// nibbles, which it leaves 0, replaced by our 8: they are never read).
    #[test]
    fn matches_onnxruntime_quantizer() {
        let l = Int4Layout::new(2, 40, 16).unwrap();
        let w: Vec<f32> = (0..80).map(|i| (((i * 37) % 101) as f32 - 50.0) / 16.0).collect();
        let q = quantize(&l, &w, F32).unwrap();
        assert_eq!(q.scales, ORT_SCALES.to_vec());
        assert_eq!(q.packed, ORT_PACKED.to_vec());
    }

    #[test]
    fn error_is_at_most_half_a_step_except_clamped_opposite_side() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &bs in &[16usize, 32, 64, 128] {
            for &k in &[bs, 3 * bs, 200, 5] {
                let n = 9;
                let l = Int4Layout::new(n, k, bs).unwrap();
                let mut w = gaussian(&mut rng, n * k);
                w.iter_mut().enumerate().for_each(|(i, v)| *v *= 0.01 + (i % 7) as f32);
                for dtype in [F32, TensorDtype::Float16, TensorDtype::Bfloat16] {
                    let q = quantize(&l, &w, dtype).unwrap();
                    assert_eq!(q.packed.len(), n * k.div_ceil(bs) * bs / 2);
                    let d = dequantize(&l, &q.packed, &q.scales);
                    for r in 0..n {
                        for c in 0..k {
                            let s = q.scales[r * l.k_blocks() + c / bs].abs();
                            assert_eq!(s, round_to_dtype(s, dtype), "scale must be a {dtype:?} value");
                            let (x, y) = (w[r * k + c], d[r * k + c]);
                            let err = (x - y).abs();
                            let clamped = code_at(&l, &q.packed, r, c) == 15 && (x / s).abs() > 7.5;
                            let bound = if clamped { s } else { s / 2.0 };
                            assert!(
                                err <= bound * (1.0 + 1e-5) + 1e-30,
                                "bs {bs} k {k} {dtype:?} ({r},{c}): w {x} dq {y} scale {s}"
                            );
                        }
                    }
                    // The block's extreme element is reproduced (exactly in f32).
                    if dtype == F32 {
                        for r in 0..n {
                            for b in 0..l.k_blocks() {
                                let blk = &w[r * k + b * bs..r * k + ((b + 1) * bs).min(k)];
                                let i = (0..blk.len()).fold(0, |m, i| if blk[i].abs() > blk[m].abs() { i } else { m });
                                assert_eq!(code_at(&l, &q.packed, r, b * bs + i), 0);
                                let dq = d[r * k + b * bs + i];
                                assert!((dq - blk[i]).abs() <= 1e-6 * blk[i].abs(), "{dq} vs {}", blk[i]);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn k_not_a_multiple_of_block_pads_with_zero_codes() {
        let l = Int4Layout::new(3, 40, 32).unwrap();
        assert_eq!((l.k_blocks(), l.blob_size(), l.row_bytes()), (2, 16, 32));
        assert_eq!(l.b_shape(), [3, 2, 16]);
        assert_eq!(l.scales_shape(), [3, 2]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let w = gaussian(&mut rng, 3 * 40);
        let q = quantize(&l, &w, F32).unwrap();
        for r in 0..3 {
            // Last block holds k = 32..40; its tail (8..32) is padding.
            for k in 40..64 {
                assert_eq!(code_at(&l, &q.packed, r, k), ZERO_POINT);
            }
            // The last block's scale depends only on its 8 real elements.
            let tail = &w[r * 40 + 32..r * 40 + 40];
            let m = tail.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            assert_eq!(q.scales[r * 2 + 1], m / -8.0);
        }
        assert_eq!(dequantize(&l, &q.packed, &q.scales).len(), 3 * 40);
    }

    #[test]
    fn all_zero_block_has_zero_scale_and_no_nan() {
        let l = Int4Layout::new(1, 64, 32).unwrap();
        let mut w = vec![0.0f32; 64];
        w[40] = 3.0;
        w[41] = -1.0;
        for dtype in [F32, TensorDtype::Float16, TensorDtype::Bfloat16] {
            let q = quantize(&l, &w, dtype).unwrap();
            assert_eq!(q.scales[0], 0.0);
            assert!(q.packed[..16].iter().all(|&b| b == 0x88));
            let d = dequantize(&l, &q.packed, &q.scales);
            assert!(d.iter().all(|v| v.is_finite()));
            assert!(d[..32].iter().all(|&v| v == 0.0));
            assert_eq!(d[40], 3.0);
        }
    }

    #[test]
    fn tiny_weights_underflowing_the_scale_dtype_become_zero() {
        // f16 scale of 1e-9/8 underflows to 0: codes 8, dequantized 0, no NaN.
        let l = Int4Layout::new(1, 16, 16).unwrap();
        let q = quantize(&l, &[1e-9f32; 16], TensorDtype::Float16).unwrap();
        assert!(q.scales[0] == 0.0 && q.packed.iter().all(|&b| b == 0x88));
    }

    #[test]
    fn rejects_bad_inputs() {
        assert_eq!(Int4Layout::new(4, 64, 8), Err(QuantError::BlockSize { block_size: 8 }));
        assert_eq!(Int4Layout::new(4, 64, 48), Err(QuantError::BlockSize { block_size: 48 }));
        assert_eq!(Int4Layout::new(0, 64, 32), Err(QuantError::Empty { n: 0, k: 64 }));
        let cause = |result: Result<Int4Weights>| match result {
            Err(BuildError::Quantize { weight, source }) if weight == "the weights" => source,
            other => panic!("expected a quantization error, got {other:?}"),
        };
        let l = Int4Layout::new(2, 16, 16).unwrap();
        let mut w = vec![1.0f32; 32];
        w[16 + 3] = f32::NAN;
        assert!(matches!(cause(quantize(&l, &w, F32)), QuantError::NotFinite { row: 1, column: 3, .. }));
        let overflow = cause(quantize(&l, &[1e6f32; 32], TensorDtype::Float16)); // scale 1.25e5
        assert_eq!(overflow, QuantError::ScaleOverflow { row: 0, block: 0, dtype: TensorDtype::Float16 });
        let dtype = cause(quantize(&l, &[1.0f32; 32], TensorDtype::Int64));
        assert_eq!(dtype, QuantError::ScaleDtype { dtype: TensorDtype::Int64 });
    }

    /// Documents the choice of `m / -8` over `absmax / 7`: lower RMS error on Gaussian weights
    /// at every block size.
    #[test]
    fn signed_extreme_over_8_beats_absmax_over_7() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &bs in &[16usize, 32, 64, 128] {
            let (n, k) = (64, 512);
            let l = Int4Layout::new(n, k, bs).unwrap();
            let w = gaussian(&mut rng, n * k);
            let q = quantize(&l, &w, F32).unwrap();
            let d = dequantize(&l, &q.packed, &q.scales);
            let ours: f64 = w.iter().zip(&d).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let mut alt = 0f64;
            for blk in w.chunks(bs) {
                let s = blk.iter().fold(0f32, |m, v| m.max(v.abs())) / 7.0;
                for &v in blk {
                    let dq = (v / s).round().clamp(-7.0, 7.0) * s;
                    alt += ((v - dq) as f64).powi(2);
                }
            }
            assert!(ours < alt * 0.95, "block {bs}: rms {} vs absmax/7 {}", ours.sqrt(), alt.sqrt());
        }
    }

    #[test]
    fn streaming_matches_in_memory_and_calls_the_sink_in_chunks() {
        // 3000 rows x 1024 cols: row_bytes 512 -> 2048 rows per 1 MiB chunk -> 2 sink calls.
        let l = Int4Layout::new(3000, 1024, 32).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let w = gaussian(&mut rng, 3000 * 1024);
        let whole = quantize(&l, &w, TensorDtype::Float16).unwrap();
        let mut calls = 0;
        let mut bytes = Vec::new();
        let scales = quantize_rows(
            "w",
            &l,
            TensorDtype::Float16,
            |n, buf| {
                buf.copy_from_slice(&w[n * 1024..(n + 1) * 1024]);
                Ok(())
            },
            |b| {
                calls += 1;
                bytes.extend_from_slice(b);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(bytes, whole.packed);
        assert_eq!(scales, whole.scales);
        let sb = scales_bytes(&scales, TensorDtype::Float16).unwrap();
        assert_eq!(sb.len(), 3000 * 32 * 2);
    }

    #[test]
    fn reads_rows_of_half_precision_tensors() {
        let vals: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let f16_bytes: Vec<u8> = vals.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = vals.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|&v| v.to_le_bytes()).collect();
        let path = std::path::Path::new("mem");
        for (dtype, data) in [(Dtype::F16, &f16_bytes), (Dtype::BF16, &bf16_bytes), (Dtype::F32, &f32_bytes)] {
            let t = TensorRef { name: "w", file: path, dtype, shape: vec![3, 4], data };
            let mut row = vec![0f32; 4];
            read_row_f32(&t, 2, &mut row).unwrap();
            assert_eq!(row, vals[8..12].to_vec());
        }
    }

    const ORT_SCALES: [f32; 6] = [0.390625, -0.390625, -0.3359375, 0.375, 0.3828125, -0.3515625];
    #[rustfmt::skip]
    const ORT_PACKED: [u8; 48] = [
        0x60, 0x2C, 0xD8, 0x93, 0x5F, 0x0B, 0xC6, 0x82, 0xC2, 0x06, 0x5B, 0x9F, 0xD3, 0x28, 0x6C, 0xA0,
        0xF4, 0x29, 0x7E, 0xC0, 0x88, 0x88, 0x88, 0x88, 0x0B, 0xC6, 0x82, 0x3E, 0xFA, 0xB5, 0x71, 0x2D,
        0xE8, 0xA4, 0x6F, 0x1C, 0xD7, 0x93, 0x4F, 0x0A, 0x4A, 0x8F, 0xD2, 0x07, 0x88, 0x88, 0x88, 0x88,
    ];
}
