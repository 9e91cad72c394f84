//! The CPU reference of every kernel's math, in f32 with the kernels' structure: int4 weights
//! contribute per 32-wide sub-block, `scale * sum(x * (q - 8))`, the codes exact; the fused
//! gate/up rows give `silu(gate) * up`; experts are routed, run and mixed as QMoE does. The CPU
//! operators run these, and the GPU check compares the kernels against them.

use crate::layout::{code_at, swiglu_row_source, GateUp, Int4Shape, ZERO_POINT};

/// The exact dequantized weight matrix (N, K): `(q - 8) * scale` (exact in f32).
pub fn dequantize(shape: &Int4Shape, packed: &[u8], scales: &[f32]) -> Vec<f32> {
    let (rb, sc) = (shape.row_bytes(), shape.scale_cols());
    let mut out = Vec::with_capacity(shape.n * shape.k);
    for n in 0..shape.n {
        let row = &packed[n * rb..(n + 1) * rb];
        for k in 0..shape.k {
            let q = code_at(row, k) as i32 - ZERO_POINT as i32;
            out.push(q as f32 * scales[n * sc + k / shape.block_size]);
        }
    }
    out
}

/// y (M, N) = x (M, K) W^T for an int4 W in the kernels' layout, summed per 32-wide sub-block.
pub fn linear_int4(x: &[f32], m: usize, shape: &Int4Shape, packed: &[u8], scales: &[f32]) -> Vec<f32> {
    let (k, rb, sc) = (shape.k, shape.row_bytes(), shape.scale_cols());
    assert_eq!(x.len(), m * k, "x is not (M, K)");
    assert_eq!(packed.len(), shape.packed_len(), "packed weight length");
    assert_eq!(scales.len(), shape.scales_len(), "scales length");
    let mut y = vec![0f32; m * shape.n];
    let mut codes = vec![0f32; k];
    for n in 0..shape.n {
        let row = &packed[n * rb..(n + 1) * rb];
        for (i, c) in codes.iter_mut().enumerate() {
            *c = (code_at(row, i) as i32 - ZERO_POINT as i32) as f32;
        }
        for t in 0..m {
            let xr = &x[t * k..(t + 1) * k];
            let mut acc = 0f32;
            for k0 in (0..k).step_by(32) {
                let d: f32 = (k0..k0 + 32).map(|i| xr[i] * codes[i]).sum();
                acc += scales[n * sc + k0 / shape.block_size] * d;
            }
            y[t * shape.n + n] = acc;
        }
    }
    y
}

/// y (M, N) = x (M, K) W^T for a dense W (N, K).
pub fn linear_dense(x: &[f32], m: usize, n: usize, k: usize, w: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not (M, K)");
    assert_eq!(w.len(), n * k, "w is not (N, K)");
    let mut y = vec![0f32; m * n];
    for t in 0..m {
        let xr = &x[t * k..(t + 1) * k];
        for j in 0..n {
            y[t * n + j] = w[j * k..(j + 1) * k].iter().zip(xr).map(|(a, b)| a * b).sum();
        }
    }
    y
}

/// `silu(gate) * up` in f32.
pub fn silu_mul(gate: f32, up: f32) -> f32 {
    gate / (1.0 + (-gate).exp()) * up
}

/// The SwiGLU of a fused gate/up product whose rows are grouped as
/// [`swiglu_row_source`] says: (M, N) -> (M, N/2).
pub fn swiglu_grouped(gu: &[f32], m: usize, n: usize) -> Vec<f32> {
    let half = n / 2;
    let mut gate_row = vec![0usize; half];
    let mut up_row = vec![0usize; half];
    for r in 0..n {
        match swiglu_row_source(r) {
            (GateUp::Gate, i) => gate_row[i] = r,
            (GateUp::Up, i) => up_row[i] = r,
        }
    }
    let mut y = Vec::with_capacity(m * half);
    for t in 0..m {
        let row = &gu[t * n..(t + 1) * n];
        y.extend((0..half).map(|i| silu_mul(row[gate_row[i]], row[up_row[i]])));
    }
    y
}

/// The experts and mixing weights of each token (T, k), as QMoE routes: the top k of
/// `probs` (the lower index first on a tie), weighted by `router_weights` at those experts when
/// given, else by the softmax of `probs`; renormalized over the k when `normalize`.
pub fn route(
    probs: &[f32],
    router_weights: Option<&[f32]>,
    tokens: usize,
    experts: usize,
    k: usize,
    normalize: bool,
) -> (Vec<usize>, Vec<f32>) {
    let (mut chosen, mut weights) = (Vec::with_capacity(tokens * k), Vec::with_capacity(tokens * k));
    for t in 0..tokens {
        let p = &probs[t * experts..(t + 1) * experts];
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let top = &order[..k];
        let w: Vec<f32> = match router_weights {
            Some(rw) => top.iter().map(|&e| rw[t * experts + e]).collect(),
            None => {
                let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let denom: f32 = p.iter().map(|&v| (v - max).exp()).sum();
                top.iter().map(|&e| (p[e] - max).exp() / denom).collect()
            }
        };
        let total: f32 = w.iter().sum();
        chosen.extend_from_slice(top);
        weights.extend(w.iter().map(|&v| if normalize { v / total } else { v }));
    }
    (chosen, weights)
}

/// One int4 expert matrix set: `(E, rows, Kp/2)` packed and `(E, rows, Kp/block)` scales.
pub struct ExpertWeights<'a> {
    /// Shape of one expert's matrix.
    pub shape: Int4Shape,
    pub packed: &'a [u8],
    pub scales: &'a [f32],
}

impl ExpertWeights<'_> {
    fn expert(&self, e: usize) -> (&[u8], &[f32]) {
        let (p, s) = (self.shape.packed_len(), self.shape.scales_len());
        (&self.packed[e * p..(e + 1) * p], &self.scales[e * s..(e + 1) * s])
    }
}

/// The routed experts of `tokens` rows of x (T, H): per chosen expert, fc1 (2I rows, gate/up
/// grouped) with SwiGLU, `round` (the activation dtype's rounding of the intermediate), fc2,
/// then the weighted sum over the k experts in routing order. Returns (T, H).
pub fn moe_int4(
    x: &[f32],
    tokens: usize,
    fc1: &ExpertWeights,
    fc2: &ExpertWeights,
    routing: (&[usize], &[f32]),
    k: usize,
    round: impl Fn(f32) -> f32,
) -> Vec<f32> {
    let hidden = fc1.shape.k;
    let (experts, weights) = routing;
    let mut y = vec![0f32; tokens * hidden];
    for t in 0..tokens {
        let xr = &x[t * hidden..(t + 1) * hidden];
        for j in 0..k {
            let e = experts[t * k + j];
            let (p1, s1) = fc1.expert(e);
            let gu = linear_int4(xr, 1, &fc1.shape, p1, s1);
            let h: Vec<f32> = swiglu_grouped(&gu, 1, fc1.shape.n).into_iter().map(&round).collect();
            let (p2, s2) = fc2.expert(e);
            let out = linear_int4(&h, 1, &fc2.shape, p2, s2);
            for (acc, v) in y[t * hidden..(t + 1) * hidden].iter_mut().zip(out) {
                *acc += weights[t * k + j] * v;
            }
        }
    }
    y
}

/// The new token's rows and the tables of one decode-attention call on the CPU (f32), as the
/// decode kernel reads them.
pub struct DecodeAttentionInputs<'a> {
    /// Row b's query heads start at `q[b * q_row]`.
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub q_row: usize,
    pub kv_row: usize,
    /// The new token's slot per sequence.
    pub seqlens: &'a [i32],
    pub position_ids: Option<&'a [i64]>,
    /// (cos, sin), each (cos_rows, rot_half).
    pub rotary: Option<(&'a [f32], &'a [f32])>,
    /// (q_norm, k_norm), each (head_dim).
    pub norms: Option<(&'a [f32], &'a [f32])>,
}

/// RMSNorm of one head row by `w`.
fn rms_norm_row(row: &mut [f32], w: &[f32], eps: f32) {
    let ss: f32 = row.iter().map(|x| x * x).sum();
    let inv = 1.0 / (ss / row.len() as f32 + eps).sqrt();
    for (x, wi) in row.iter_mut().zip(w) {
        *x *= inv * wi;
    }
}

/// Non-interleaved rotary of one head row at table row `pos`.
fn rotate_row(row: &mut [f32], cos: &[f32], sin: &[f32], rot_half: usize, pos: usize) {
    for j in 0..rot_half {
        let (c, s) = (cos[pos * rot_half + j], sin[pos * rot_half + j]);
        let (x1, x2) = (row[j], row[j + rot_half]);
        row[j] = x1 * c - x2 * s;
        row[j + rot_half] = x2 * c + x1 * s;
    }
}

/// One new token per sequence on the shared KV buffer (`kcache`, `vcache`: (B, Hkv, capacity,
/// D)), what the decode kernel computes: each head's q and k RMS-normalized (with `norms`) and
/// rotated (with `rotary`) at `position_ids[b]` (else the slot), k and v written to slot
/// `seqlens[b]`, then each query head's softmax attention over the slots up to it (the last
/// `window` with a window). Returns (B, H * D).
pub fn decode_attention(
    x: &DecodeAttentionInputs<'_>,
    s: &crate::gpu::DecodeAttentionShape,
    kcache: &mut [f32],
    vcache: &mut [f32],
) -> Vec<f32> {
    let d = s.head_dim;
    let group = s.heads / s.kv_heads;
    let mut out = vec![0f32; s.batch * s.heads * d];
    for b in 0..s.batch {
        let last = x.seqlens[b];
        if last < 0 || last as usize >= s.capacity {
            continue;
        }
        let last = last as usize;
        let pos = x.position_ids.map_or(last as i64, |p| p[b]).clamp(0, s.cos_rows.max(1) as i64 - 1) as usize;
        let total = last + 1;
        let start = if s.window > 0 && total > s.window { total - s.window } else { 0 };
        for g in 0..s.kv_heads {
            let head = (b * s.kv_heads + g) * s.capacity * d;
            let mut k: Vec<f32> = x.k[b * x.kv_row + g * d..][..d].to_vec();
            if let Some((_, kn)) = x.norms {
                rms_norm_row(&mut k, kn, s.eps);
            }
            if let Some((cos, sin)) = x.rotary {
                rotate_row(&mut k, cos, sin, s.rot_half, pos);
            }
            kcache[head + last * d..][..d].copy_from_slice(&k);
            vcache[head + last * d..][..d].copy_from_slice(&x.v[b * x.kv_row + g * d..][..d]);
            for h in g * group..(g + 1) * group {
                let mut q: Vec<f32> = x.q[b * x.q_row + h * d..][..d].to_vec();
                if let Some((qn, _)) = x.norms {
                    rms_norm_row(&mut q, qn, s.eps);
                }
                if let Some((cos, sin)) = x.rotary {
                    rotate_row(&mut q, cos, sin, s.rot_half, pos);
                }
                let scores: Vec<f32> = (start..total)
                    .map(|j| s.scale * q.iter().zip(&kcache[head + j * d..][..d]).map(|(a, b)| a * b).sum::<f32>())
                    .collect();
                let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let p: Vec<f32> = scores.iter().map(|v| (v - mx).exp()).collect();
                let sum: f32 = p.iter().sum();
                let o = &mut out[(b * s.heads + h) * d..][..d];
                for (pj, j) in p.iter().zip(start..total) {
                    for (oi, vi) in o.iter_mut().zip(&vcache[head + j * d..][..d]) {
                        *oi += pj / sum * vi;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::pack_row;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_int4(rng: &mut ChaCha8Rng, shape: &Int4Shape) -> (Vec<u8>, Vec<f32>, Vec<u8>) {
        let codes: Vec<u8> = (0..shape.n * shape.k).map(|_| rng.random_range(0..16u8)).collect();
        let mut packed = vec![0u8; shape.packed_len()];
        for (n, row) in packed.chunks_mut(shape.row_bytes()).enumerate() {
            pack_row(shape, |k| codes[n * shape.k + k], row);
        }
        let scales: Vec<f32> = (0..shape.scales_len()).map(|_| rng.random_range(-0.05..0.05f32)).collect();
        (packed, scales, codes)
    }

    #[test]
    fn int4_reference_is_x_times_the_dequantized_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (n, k, bs) in [(16, 32, 32), (32, 160, 32), (16, 192, 64), (48, 384, 128)] {
            let shape = Int4Shape::new(n, k, bs).unwrap();
            let (packed, scales, codes) = random_int4(&mut rng, &shape);
            let w = dequantize(&shape, &packed, &scales);
            for (i, &c) in codes.iter().enumerate() {
                let s = scales[(i / k) * shape.scale_cols() + (i % k) / bs];
                assert_eq!(w[i], (c as f32 - 8.0) * s, "dequantization is (q - 8) * scale exactly");
            }
            let m = 3;
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let y = linear_int4(&x, m, &shape, &packed, &scales);
            for t in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k).map(|i| x[t * k + i] as f64 * w[j * k + i] as f64).sum();
                    let got = y[t * n + j] as f64;
                    assert!((got - exact).abs() <= 1e-5 * (1.0 + exact.abs()), "({t},{j}): {got} vs {exact}");
                }
            }
            let dense = linear_dense(&x, m, n, k, &w);
            for (a, b) in y.iter().zip(&dense) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()));
            }
        }
    }

    #[test]
    fn swiglu_pairs_each_gate_row_with_its_up_row() {
        let (m, n) = (2, 32);
        let gu: Vec<f32> = (0..m * n).map(|i| (i as f32 - 20.0) / 7.0).collect();
        let y = swiglu_grouped(&gu, m, n);
        assert_eq!(y.len(), m * n / 2);
        // Feature 9: gate row 16 + 1, up row 16 + 9.
        let row = &gu[n..2 * n];
        assert_eq!(y[n / 2 + 9], silu_mul(row[17], row[25]));
        assert_eq!(y[3], silu_mul(gu[3], gu[11]));
    }

    #[test]
    fn routing_takes_the_top_k_breaks_ties_low_and_normalizes() {
        let probs = [0.5f32, 2.0, 2.0, -1.0, 1.0, f32::NEG_INFINITY];
        let (e, w) = route(&probs, None, 1, 6, 3, false);
        assert_eq!(e, vec![1, 2, 4]);
        let denom: f32 = probs.iter().map(|&p| (p - 2.0).exp()).sum();
        assert!((w[0] - 1.0 / denom).abs() < 1e-7 && w[0] == w[1]);
        let (_, wn) = route(&probs, None, 1, 6, 3, true);
        assert!((wn.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let rw = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
        let (e2, w2) = route(&probs, Some(&rw), 1, 6, 2, true);
        assert_eq!(e2, vec![1, 2]);
        assert!((w2[0] - 0.4).abs() < 1e-7 && (w2[1] - 0.6).abs() < 1e-7);
    }
}
