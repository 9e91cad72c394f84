//! The int4 weight layout the kernels read, and its packing from ONNX Runtime's MatMulNBits
//! layout (which `pio-export` quantizes into first: same codes, same scales, other byte order).
//!
//! Codes and scales mean what MatMulNBits means: unsigned 4-bit codes `q`, zero point 8,
//! `w[n, k] = (q - 8) * scale[n, k / block_size]`. Only the order differs:
//!
//! * each row is padded with code 8 (weight 0) to `Kp`, K rounded up to 128 (a chunk);
//! * chunk `c` of a row is 64 bytes: 16 bytes per thread slot `t` (0..4), each 4 words `j`
//!   (0..4, the chunk's 32-wide sub-blocks): the u32 (little-endian) at byte `64c + 16t + 4j`
//!   holds `k = 128c + 32j + 8t + l` for `l` in 0..8, element `l` at nibble position
//!   [`nibble_position`]`(l)` = `l / 2 + 4 (l % 2)`; so one 16-byte load gives a thread its 8
//!   codes of each sub-block, and nibble positions `i` and `i + 4` are elements `2i`, `2i + 1`:
//!   the register pairs the tensor-core fragment wants;
//! * scales are `(N, Kp / block_size)`, padded with zeros.
//!
//! A fused gate/up weight for the SwiGLU epilogue orders its rows in groups of 16: 8 gate rows,
//! then the 8 up rows of the same features ([`swiglu_row_source`]).

use crate::error::{KernelError, Result};
use crate::source::{CHUNK_K, INT4_BLOCK_SIZES, TILE_ROWS};

/// MatMulNBits' zero point for 4 bits.
pub const ZERO_POINT: u8 = 8;

/// Shape of one int4 weight in the kernels' layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int4Shape {
    /// Output features (rows).
    pub n: usize,
    /// Input features (the reduction).
    pub k: usize,
    pub block_size: usize,
}

/// Why a projection cannot use the kernels (then the exporter keeps ONNX Runtime's op).
pub fn unsupported_reason(n: usize, k: usize) -> Option<String> {
    if n == 0 || !n.is_multiple_of(TILE_ROWS) {
        return Some(format!("N = {n} is not a positive multiple of {TILE_ROWS}"));
    }
    if k == 0 || !k.is_multiple_of(32) {
        return Some(format!("K = {k} is not a positive multiple of 32"));
    }
    None
}

impl Int4Shape {
    pub fn new(n: usize, k: usize, block_size: usize) -> Result<Self> {
        if let Some(why) = unsupported_reason(n, k) {
            return Err(KernelError::bad_input("int4 layout", why));
        }
        if !INT4_BLOCK_SIZES.contains(&block_size) {
            return Err(KernelError::bad_input(
                "int4 layout",
                format!("block size {block_size} is not one of {INT4_BLOCK_SIZES:?}"),
            ));
        }
        Ok(Int4Shape { n, k, block_size })
    }

    /// K rounded up to a whole chunk.
    pub fn padded_k(&self) -> usize {
        self.k.div_ceil(CHUNK_K) * CHUNK_K
    }
    /// Packed bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.padded_k() / 2
    }
    /// Scales per row (padded).
    pub fn scale_cols(&self) -> usize {
        self.padded_k() / self.block_size
    }
    pub fn packed_len(&self) -> usize {
        self.n * self.row_bytes()
    }
    pub fn scales_len(&self) -> usize {
        self.n * self.scale_cols()
    }
    /// MatMulNBits' blocks per row, `ceil(K / block_size)`, and bytes per row.
    pub fn matmulnbits_blocks(&self) -> usize {
        self.k.div_ceil(self.block_size)
    }
    pub fn matmulnbits_row_bytes(&self) -> usize {
        self.matmulnbits_blocks() * self.block_size / 2
    }
}

/// Nibble position of element `l` (0..8) in its word.
pub const fn nibble_position(l: usize) -> usize {
    l / 2 + 4 * (l % 2)
}

/// (byte offset in a packed row, bit shift) of element `k`.
pub fn locate(k: usize) -> (usize, u32) {
    let (c, r) = (k / CHUNK_K, k % CHUNK_K);
    let (j, q) = (r / 32, r % 32);
    let (t, l) = (q / 8, q % 8);
    let p = nibble_position(l);
    (64 * c + 16 * t + 4 * j + p / 2, 4 * (p % 2) as u32)
}

/// The code of element `k` of one packed row.
pub fn code_at(row: &[u8], k: usize) -> u8 {
    let (byte, shift) = locate(k);
    (row[byte] >> shift) & 0x0F
}

/// Packs one row from `code(k)` (codes 0..=15 for k < K) into `out` (`row_bytes` bytes); the
/// padding gets code 8.
pub fn pack_row(shape: &Int4Shape, code: impl Fn(usize) -> u8, out: &mut [u8]) {
    debug_assert_eq!(out.len(), shape.row_bytes());
    let k = shape.k;
    for c in 0..shape.padded_k() / CHUNK_K {
        for t in 0..4 {
            for j in 0..4 {
                let k0 = CHUNK_K * c + 32 * j + 8 * t;
                let mut word = 0u32;
                for l in 0..8 {
                    let q = if k0 + l < k { code(k0 + l) & 0x0F } else { ZERO_POINT };
                    word |= (q as u32) << (4 * nibble_position(l));
                }
                let at = 64 * c + 16 * t + 4 * j;
                out[at..at + 4].copy_from_slice(&word.to_le_bytes());
            }
        }
    }
}

/// Repacks one MatMulNBits row (`matmulnbits_row_bytes`: codes along K, the even k in the low
/// nibble) into the kernels' layout, a word at a time (the same result as [`pack_row`] over its
/// codes, tested).
pub fn repack_matmulnbits_row(shape: &Int4Shape, mnb_row: &[u8], out: &mut [u8]) {
    debug_assert_eq!(mnb_row.len(), shape.matmulnbits_row_bytes());
    debug_assert_eq!(out.len(), shape.row_bytes());
    // Low nibbles of 4 bytes into 16 bits, in byte order.
    fn squeeze(x: u32) -> u32 {
        let y = (x | (x >> 4)) & 0x00FF_00FF;
        (y | (y >> 8)) & 0xFFFF
    }
    for c in 0..shape.padded_k() / CHUNK_K {
        for t in 0..4 {
            for j in 0..4 {
                let k0 = CHUNK_K * c + 32 * j + 8 * t;
                // Codes k0..k0+8 are the 4 bytes at k0/2 (K is a multiple of 32, so a word is
                // either all real or all padding).
                let word = if k0 < shape.k {
                    let v = u32::from_le_bytes([
                        mnb_row[k0 / 2],
                        mnb_row[k0 / 2 + 1],
                        mnb_row[k0 / 2 + 2],
                        mnb_row[k0 / 2 + 3],
                    ]);
                    // Even elements (low nibbles) to nibble positions 0..3, odd ones to 4..7.
                    squeeze(v & 0x0F0F_0F0F) | (squeeze((v >> 4) & 0x0F0F_0F0F) << 16)
                } else {
                    0x8888_8888
                };
                let at = 64 * c + 16 * t + 4 * j;
                out[at..at + 4].copy_from_slice(&word.to_le_bytes());
            }
        }
    }
}

/// One row of MatMulNBits scales (`matmulnbits_blocks` values of `elem` bytes each) padded with
/// zeros to `scale_cols` values.
pub fn pad_scales_row(shape: &Int4Shape, mnb_scales: &[u8], elem: usize, out: &mut [u8]) {
    let real = shape.matmulnbits_blocks() * elem;
    debug_assert_eq!(mnb_scales.len(), real);
    debug_assert_eq!(out.len(), shape.scale_cols() * elem);
    out[..real].copy_from_slice(mnb_scales);
    out[real..].fill(0);
}

/// Which half of a SwiGLU gate/up pair a fused row is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateUp {
    Gate,
    Up,
}

/// Row `r` of a fused gate/up weight (2I rows, I a multiple of 8): gate or up row `i`.
pub fn swiglu_row_source(r: usize) -> (GateUp, usize) {
    let (group, within) = (r / 16, r % 16);
    if within < 8 {
        (GateUp::Gate, 8 * group + within)
    } else {
        (GateUp::Up, 8 * group + within - 8)
    }
}

/// Why a gate/up pair of width `intermediate` cannot use the SwiGLU epilogue.
pub fn swiglu_unsupported_reason(intermediate: usize, k: usize) -> Option<String> {
    if !intermediate.is_multiple_of(8) {
        return Some(format!("intermediate size {intermediate} is not a multiple of 8"));
    }
    unsupported_reason(2 * intermediate, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_has_its_own_nibble_and_the_word_order_is_the_documented_one() {
        let shape = Int4Shape::new(16, 256, 32).unwrap();
        let mut seen = vec![false; shape.row_bytes() * 2];
        for k in 0..shape.padded_k() {
            let (byte, shift) = locate(k);
            let slot = byte * 2 + (shift / 4) as usize;
            assert!(!seen[slot], "k {k} collides");
            seen[slot] = true;
        }
        assert!(seen.iter().all(|&s| s));
        // k = 128 + 32*2 + 8*3 + 5: chunk 1, word j=2 of thread slot 3, element 5 -> nibble 6.
        assert_eq!(locate(128 + 64 + 24 + 5), (64 + 48 + 8 + 3, 0));
        // Element 1 sits at nibble 4 (the high half of the word's low 16 bits pair with element 0).
        assert_eq!(locate(1), (2, 0));
        assert_eq!(locate(2), (0, 4));
    }

    #[test]
    fn packing_round_trips_and_pads_with_zero_codes() {
        let shape = Int4Shape::new(16, 96, 32).unwrap();
        assert_eq!((shape.padded_k(), shape.row_bytes(), shape.scale_cols()), (128, 64, 4));
        let codes: Vec<u8> = (0..96).map(|k| ((k * 7 + 3) % 16) as u8).collect();
        let mut row = vec![0u8; shape.row_bytes()];
        pack_row(&shape, |k| codes[k], &mut row);
        for (k, &c) in codes.iter().enumerate() {
            assert_eq!(code_at(&row, k), c, "k {k}");
        }
        for k in 96..128 {
            assert_eq!(code_at(&row, k), ZERO_POINT);
        }
    }

    #[test]
    fn repacking_matmulnbits_keeps_every_code() {
        // K = 160 with block 64: MatMulNBits has 3 blocks (192 codes, the tail padded by its
        // quantizer); ours pads to 256.
        let shape = Int4Shape::new(16, 160, 64).unwrap();
        assert_eq!((shape.matmulnbits_blocks(), shape.matmulnbits_row_bytes()), (3, 96));
        let mnb: Vec<u8> = (0..96).map(|i| (i * 37 % 256) as u8).collect();
        let mut ours = vec![0u8; shape.row_bytes()];
        repack_matmulnbits_row(&shape, &mnb, &mut ours);
        for k in 0..160 {
            let expected = (mnb[k / 2] >> (4 * (k % 2))) & 0x0F;
            assert_eq!(code_at(&ours, k), expected, "k {k}");
        }
        let mut slow = vec![0u8; shape.row_bytes()];
        pack_row(&shape, |k| (mnb[k / 2] >> (4 * (k % 2))) & 0x0F, &mut slow);
        assert_eq!(ours, slow, "the word-level repack equals packing code by code");
        let mut scales = vec![0xAAu8; shape.scale_cols() * 2];
        pad_scales_row(&shape, &[1, 2, 3, 4, 5, 6], 2, &mut scales);
        assert_eq!(scales, [1, 2, 3, 4, 5, 6, 0, 0]);
    }

    #[test]
    fn swiglu_rows_come_in_groups_of_eight_gate_then_eight_up() {
        let rows: Vec<(GateUp, usize)> = (0..32).map(swiglu_row_source).collect();
        assert_eq!(rows[0], (GateUp::Gate, 0));
        assert_eq!(rows[7], (GateUp::Gate, 7));
        assert_eq!(rows[8], (GateUp::Up, 0));
        assert_eq!(rows[15], (GateUp::Up, 7));
        assert_eq!(rows[16], (GateUp::Gate, 8));
        assert_eq!(rows[31], (GateUp::Up, 15));
        assert!(swiglu_unsupported_reason(96, 64).is_none());
        assert!(swiglu_unsupported_reason(12, 64).is_some());
    }

    #[test]
    fn shapes_the_kernels_cannot_take_are_refused() {
        assert!(Int4Shape::new(24, 64, 32).is_err(), "N % 16");
        assert!(Int4Shape::new(16, 48, 32).is_err(), "K % 32");
        assert!(Int4Shape::new(16, 64, 16).is_err(), "block 16");
        assert!(Int4Shape::new(16, 64, 256).is_err(), "block 256");
        assert!(Int4Shape::new(151936, 2560, 128).is_ok());
    }
}
