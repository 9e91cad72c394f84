//! Random inputs and weights in both layouts (ONNX Runtime's and the kernels'), from the same
//! codes and values, and the comparison metric.

use half::{bf16, f16};
use pio_kernels::layout::{self, swiglu_row_source, GateUp, Int4Shape};
use pio_kernels::source::ActDtype;
use serde::Serialize;

/// xorshift64*: fast, seeded, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn symmetric(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Roughly N(0, 1) (sum of four uniforms, rescaled).
    pub fn normal(&mut self) -> f32 {
        (self.symmetric() + self.symmetric() + self.symmetric() + self.symmetric()) * 0.866
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

pub fn to_bits(dtype: ActDtype, v: f32) -> u16 {
    match dtype {
        ActDtype::F16 => f16::from_f32(v).to_bits(),
        ActDtype::Bf16 => bf16::from_f32(v).to_bits(),
    }
}

pub fn to_f32(dtype: ActDtype, h: u16) -> f32 {
    match dtype {
        ActDtype::F16 => f16::from_bits(h).to_f32(),
        ActDtype::Bf16 => bf16::from_bits(h).to_f32(),
    }
}

/// `n` values of N(0, std^2) in the dtype.
pub fn values(rng: &mut Rng, dtype: ActDtype, n: usize, std: f32) -> Vec<u16> {
    (0..n).map(|_| to_bits(dtype, rng.normal() * std)).collect()
}

/// An int4 weight in MatMulNBits' layout ((N, k_blocks, bs/2) codes, (N, k_blocks) scales) with
/// random codes and scales of a projection at init scale (weights ~ 1/sqrt(K)).
pub struct Int4Weight {
    pub shape: Int4Shape,
    pub mnb_packed: Vec<u8>,
    pub mnb_scales: Vec<u16>,
}

impl Int4Weight {
    pub fn random(rng: &mut Rng, dtype: ActDtype, shape: Int4Shape) -> Int4Weight {
        let mnb_packed = rng.bytes(shape.n * shape.matmulnbits_row_bytes());
        let std = 1.0 / (shape.k as f32).sqrt() / 4.0;
        let mnb_scales = values(rng, dtype, shape.n * shape.matmulnbits_blocks(), std);
        Int4Weight { shape, mnb_packed, mnb_scales }
    }

    /// The kernels' layout, rows taken in `order` (ours row r = MatMulNBits row order(r)).
    pub fn to_pio(&self, order: impl Fn(usize) -> usize) -> (Vec<u8>, Vec<u16>) {
        let s = self.shape;
        let (mrb, rb, mb, sc) = (s.matmulnbits_row_bytes(), s.row_bytes(), s.matmulnbits_blocks(), s.scale_cols());
        let mut packed = vec![0u8; s.packed_len()];
        let mut scales = vec![0u16; s.scales_len()];
        for r in 0..s.n {
            let src = order(r);
            layout::repack_matmulnbits_row(
                &s,
                &self.mnb_packed[src * mrb..(src + 1) * mrb],
                &mut packed[r * rb..(r + 1) * rb],
            );
            scales[r * sc..r * sc + mb].copy_from_slice(&self.mnb_scales[src * mb..(src + 1) * mb]);
        }
        (packed, scales)
    }
}

/// For a gate/up weight stored [gate rows 0..I | up rows 0..I] (ONNX Runtime's fused MatMul /
/// MatMulNBits): the source row of the kernels' grouped row r.
pub fn swiglu_from_concatenated(inter: usize) -> impl Fn(usize) -> usize {
    move |r| match swiglu_row_source(r) {
        (GateUp::Gate, i) => i,
        (GateUp::Up, i) => inter + i,
    }
}

/// For QMoE's fc1 (swiglu_fusion = 1: gate j at row 2j, up j at 2j + 1): the source row of the
/// kernels' grouped row r.
pub fn swiglu_from_interleaved(r: usize) -> usize {
    match swiglu_row_source(r) {
        (GateUp::Gate, i) => 2 * i,
        (GateUp::Up, i) => 2 * i + 1,
    }
}

/// (rows, cols) -> (cols, rows), in tiles for the cache.
pub fn transpose(data: &[u16], rows: usize, cols: usize) -> Vec<u16> {
    let mut out = vec![0u16; data.len()];
    const T: usize = 64;
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    out[c * rows + r] = data[r * cols + c];
                }
            }
        }
    }
    out
}

/// How far `got` is from `expected`.
#[derive(Clone, Debug, Serialize)]
pub struct Diff {
    pub max_abs_diff: f32,
    /// max |expected|: the scale the difference is relative to.
    pub expected_max_abs: f32,
    /// max_abs_diff / expected_max_abs.
    pub max_rel_error: f32,
    pub non_finite: usize,
    pub compared: usize,
}

pub fn diff(got: &[f32], expected: &[f32]) -> Diff {
    let mut d = Diff {
        max_abs_diff: 0.0,
        expected_max_abs: 0.0,
        max_rel_error: 0.0,
        non_finite: 0,
        compared: got.len().min(expected.len()),
    };
    for (&g, &e) in got.iter().zip(expected) {
        if !g.is_finite() {
            d.non_finite += 1;
        }
        d.max_abs_diff = d.max_abs_diff.max((g - e).abs());
        d.expected_max_abs = d.expected_max_abs.max(e.abs());
    }
    if got.len() != expected.len() {
        d.non_finite += got.len().abs_diff(expected.len());
    }
    d.max_rel_error = if d.expected_max_abs > 0.0 { d.max_abs_diff / d.expected_max_abs } else { d.max_abs_diff };
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use pio_export::quant::{dequantize, Int4Layout};
    use pio_kernels::reference;

    fn f32s(dtype: ActDtype, v: &[u16]) -> Vec<f32> {
        v.iter().map(|&b| to_f32(dtype, b)).collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        let d = diff(a, b);
        assert!(d.max_rel_error < 1e-5 && d.non_finite == 0, "{d:?}");
    }

    /// ONNX Runtime's fused gate/up output [gate | up] through Split, Sigmoid, Mul, Mul.
    fn stock_swiglu(y: &[f32], m: usize, n: usize) -> Vec<f32> {
        let i = n / 2;
        (0..m).flat_map(|t| (0..i).map(move |j| reference::silu_mul(y[t * n + j], y[t * n + i + j]))).collect()
    }

    #[test]
    fn int4_weights_in_both_layouts_compute_the_same_swiglu() {
        let (dtype, m, n, k) = (ActDtype::F16, 3, 64, 96);
        let mut rng = Rng::new(1);
        let shape = Int4Shape::new(n, k, 32).unwrap();
        let w = Int4Weight::random(&mut rng, dtype, shape);
        let x = f32s(dtype, &values(&mut rng, dtype, m * k, 1.0));
        let mnb = dequantize(&Int4Layout::new(n, k, 32).unwrap(), &w.mnb_packed, &f32s(dtype, &w.mnb_scales));
        let stock = stock_swiglu(&reference::linear_dense(&x, m, n, k, &mnb), m, n);
        let (packed, scales) = w.to_pio(swiglu_from_concatenated(n / 2));
        let ours = reference::linear_int4(&x, m, &shape, &packed, &f32s(dtype, &scales));
        close(&reference::swiglu_grouped(&ours, m, n), &stock);
    }

    #[test]
    fn dense_weights_in_both_layouts_compute_the_same_swiglu() {
        let (dtype, m, n, k) = (ActDtype::Bf16, 2, 48, 64);
        let mut rng = Rng::new(2);
        let stock_rows = values(&mut rng, dtype, n * k, 0.1);
        let order = swiglu_from_concatenated(n / 2);
        let ours: Vec<u16> = (0..n).flat_map(|r| stock_rows[order(r) * k..(order(r) + 1) * k].to_vec()).collect();
        let stock_t = f32s(dtype, &transpose(&stock_rows, n, k));
        let x = f32s(dtype, &values(&mut rng, dtype, m * k, 1.0));
        // x (M, K) @ W (K, N), as MatMul computes.
        let y: Vec<f32> = (0..m)
            .flat_map(|t| {
                (0..n).map(|j| (0..k).map(|i| x[t * k + i] * stock_t[i * n + j]).sum::<f32>()).collect::<Vec<_>>()
            })
            .collect();
        let expected = stock_swiglu(&y, m, n);
        let got = reference::swiglu_grouped(&reference::linear_dense(&x, m, n, k, &f32s(dtype, &ours)), m, n);
        close(&got, &expected);
    }

    #[test]
    fn qmoe_interleaved_fc1_rows_map_to_the_grouped_ones() {
        let (dtype, experts, h, inter) = (ActDtype::F16, 3, 64, 16);
        let rows = 2 * inter;
        let mut rng = Rng::new(3);
        let s1 = Int4Shape::new(experts * rows, h, 32).unwrap();
        let fc1 = Int4Weight::random(&mut rng, dtype, s1);
        let x = f32s(dtype, &values(&mut rng, dtype, h, 1.0));
        let mnb = dequantize(
            &Int4Layout::new(experts * rows, h, 32).unwrap(),
            &fc1.mnb_packed,
            &f32s(dtype, &fc1.mnb_scales),
        );
        let (packed, scales) = fc1.to_pio(|r| (r / rows) * rows + swiglu_from_interleaved(r % rows));
        let sf = f32s(dtype, &scales);
        for e in 0..experts {
            // QMoE with swiglu_fusion = 1: gate j = row 2j, up j = row 2j + 1.
            let y = reference::linear_dense(&x, 1, rows, h, &mnb[e * rows * h..(e + 1) * rows * h]);
            let stock: Vec<f32> = (0..inter).map(|j| reference::silu_mul(y[2 * j], y[2 * j + 1])).collect();
            let one = Int4Shape { n: rows, ..s1 };
            let (p, s) = (one.packed_len(), one.scales_len());
            let ours = reference::linear_int4(&x, 1, &one, &packed[e * p..(e + 1) * p], &sf[e * s..(e + 1) * s]);
            close(&reference::swiglu_grouped(&ours, 1, rows), &stock);
        }
    }

    #[test]
    fn transpose_and_diff() {
        assert_eq!(transpose(&[1, 2, 3, 4, 5, 6], 2, 3), vec![1, 4, 2, 5, 3, 6]);
        let d = diff(&[1.0, f32::NAN, 3.5], &[1.0, 2.0, 4.0]);
        assert_eq!((d.non_finite, d.max_abs_diff, d.expected_max_abs), (1, 0.5, 4.0));
    }
}
