//! A lane-by-lane CPU emulation of the CUDA kernels (`cuda/pio_kernels.cu`), for the tests: the
//! same loads at the same byte offsets, the same bit operations of the dequantization, the same
//! loops and shared-memory indices, with `mma.sync.m16n8k16` emulated from the fragment layouts
//! of the PTX ISA (independently of how the kernel maps k). It agreeing with [`crate::reference`]
//! is what says the kernels' fragment mapping, packing and epilogues are right without a GPU.

// Lanes are indices by nature here (lane -> (groupID, threadID_in_group)).
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

use crate::source::{CHUNK_K, TILE_ROWS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F16,
    Bf16,
}

impl Dt {
    pub fn to_f32(self, h: u16) -> f32 {
        match self {
            Dt::F16 => f16::from_bits(h).to_f32(),
            Dt::Bf16 => bf16::from_bits(h).to_f32(),
        }
    }
    pub fn bits_of(self, v: f32) -> u16 {
        match self {
            Dt::F16 => f16::from_f32(v).to_bits(),
            Dt::Bf16 => bf16::from_f32(v).to_bits(),
        }
    }
    /// `fma.rn.{f16,bf16}x2 d, a, b, c` on packed pairs.
    fn fma2(self, a: u32, b: u32, c: u32) -> u32 {
        let lane = |x: u32, i: u32| self.to_f32((x >> (16 * i)) as u16);
        let r = |i: u32| self.bits_of(lane(a, i).mul_add(lane(b, i), lane(c, i))) as u32;
        r(0) | (r(1) << 16)
    }
}

/// `dequant_word`: four pairs (k 2i, 2i+1) of q - 8.
pub fn dequant_word(dt: Dt, w: u32) -> [u32; 4] {
    let (magic, one, minus) = match dt {
        Dt::F16 => (0x6400_6400u32, 0x3C00_3C00u32, 0xE408_E408u32),
        Dt::Bf16 => (0x4300_4300u32, 0x3F80_3F80u32, 0xC308_C308u32),
    };
    let mut p = [0u32; 4];
    for (i, out) in p.iter_mut().enumerate() {
        // lop3 0xEA = (a & b) | c
        let v = ((w >> (4 * i)) & 0x000F_000F) | magic;
        *out = dt.fma2(v, one, minus);
    }
    p
}

/// One warp's registers for an m16n8k16 tile, per lane: A (4 regs), B (2 regs).
pub type Fragments = ([[u32; 4]; 32], [[u32; 2]; 32]);

/// `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}`: d[lane] += A * B, fragments laid out as
/// the PTX ISA documents (groupID = lane / 4, threadID_in_group = lane % 4):
/// A: reg 0 = (row g, cols 2t, 2t+1), reg 1 = (row g+8, same), reg 2 = (row g, cols 2t+8, 2t+9),
/// reg 3 = (row g+8, cols 2t+8, 2t+9); B: reg 0 = (rows 2t, 2t+1, col g), reg 1 = (rows 2t+8,
/// 2t+9, col g); D: (row g, cols 2t, 2t+1), (row g+8, cols 2t, 2t+1). Low halves hold the lower index.
pub fn mma(dt: Dt, d: &mut [[f32; 4]; 32], frags: &Fragments) {
    let (a, b) = frags;
    let mut am = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 16];
    let half = |r: u32, i: usize| dt.to_f32((r >> (16 * i)) as u16);
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for i in 0..2 {
            am[g][2 * t + i] = half(a[lane][0], i);
            am[g + 8][2 * t + i] = half(a[lane][1], i);
            am[g][2 * t + 8 + i] = half(a[lane][2], i);
            am[g + 8][2 * t + 8 + i] = half(a[lane][3], i);
            bm[2 * t + i][g] = half(b[lane][0], i);
            bm[2 * t + 8 + i][g] = half(b[lane][1], i);
        }
    }
    let dot = |r: usize, c: usize| (0..16).map(|k| am[r][k] * bm[k][c]).sum::<f32>();
    for (lane, dl) in d.iter_mut().enumerate() {
        let (g, t) = (lane / 4, lane % 4);
        dl[0] += dot(g, 2 * t);
        dl[1] += dot(g, 2 * t + 1);
        dl[2] += dot(g + 8, 2 * t);
        dl[3] += dot(g + 8, 2 * t + 1);
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// A 16-byte load as 4 little-endian words (zeros past the end, which the kernel never reads).
fn uint4_at(bytes: &[u8], at: usize) -> [u32; 4] {
    [u32_at(bytes, at), u32_at(bytes, at + 4), u32_at(bytes, at + 8), u32_at(bytes, at + 12)]
}

/// Activations as the kernel sees them: rows of u16.
pub fn activation_row_bytes(row: &[u16]) -> Vec<u8> {
    row.iter().flat_map(|h| h.to_le_bytes()).collect()
}

/// `load_scales<BS>`: the chunk's scales of one row as the kernel loads them (lo, hi words).
fn load_scales(scales: &[u16], row: usize, chunk: usize, block_size: usize) -> (u32, u32) {
    let word = |at: usize| scales[at] as u32 | ((scales[at + 1] as u32) << 16);
    match block_size {
        32 => (word(row + chunk * 4), word(row + chunk * 4 + 2)),
        64 => (word(row + chunk * 2), 0),
        _ => (scales[row + chunk] as u32, 0),
    }
}

/// `scale_bits<BS>`: the bits of sub-block j's scale from the loaded words.
fn scale_bits((lo, hi): (u32, u32), j: usize, block_size: usize) -> u16 {
    let half = match block_size {
        32 => j,
        64 => j >> 1,
        _ => 0,
    };
    let word = if half < 2 { lo } else { hi };
    (word >> (16 * (half & 1))) as u16
}

/// `scale_of<DT, BS>`: the scale of sub-block j from the loaded words.
fn scale_of(dt: Dt, words: (u32, u32), j: usize, block_size: usize) -> f32 {
    dt.to_f32(scale_bits(words, j, block_size))
}

/// The weight side of a tile: int4 (packed rows of `row_bytes`, scales as u16 rows) or dense.
pub enum Weights<'a> {
    Int4 { packed: &'a [u8], row_bytes: usize, scales: &'a [u16], scale_row: usize, block_size: usize },
    Dense { w: &'a [u16], k: usize },
}

/// `tile_gemm`: the CTA's [16][8 * tiles] sums for rows `n0..n0+16` and the token rows `xrow`
/// (None: a padding token), with `warps` warps splitting K.
pub fn tile_gemm(
    dt: Dt,
    weights: &Weights,
    n0: usize,
    xrow: &[Option<Vec<u8>>],
    tiles: usize,
    k: usize,
    warps: usize,
) -> Vec<f32> {
    let cols = 8 * tiles;
    let chunks = k.div_ceil(CHUNK_K);
    let mut smem = vec![0f32; warps * TILE_ROWS * cols];
    for warp in 0..warps {
        let mut acc = vec![[[0f32; 4]; 32]; tiles];
        let mut c = warp;
        while c < chunks {
            for j in 0..4 {
                let kb = c * CHUNK_K + j * 32;
                if kb >= k {
                    break;
                }
                // Per lane: A registers of the two steps, and the sub-block scales.
                let mut a_steps = [[[0u32; 4]; 32]; 2];
                let mut scale = [[0f32; 2]; 32];
                for lane in 0..32 {
                    let (g, t) = (lane / 4, lane % 4);
                    let (pa, pb) = match weights {
                        Weights::Int4 { packed, row_bytes, scales, scale_row, block_size } => {
                            let qa = uint4_at(packed, (n0 + g) * row_bytes + c * 64 + t * 16);
                            let qb = uint4_at(packed, (n0 + g + 8) * row_bytes + c * 64 + t * 16);
                            scale[lane] = [
                                scale_of(dt, load_scales(scales, (n0 + g) * scale_row, c, *block_size), j, *block_size),
                                scale_of(
                                    dt,
                                    load_scales(scales, (n0 + g + 8) * scale_row, c, *block_size),
                                    j,
                                    *block_size,
                                ),
                            ];
                            (dequant_word(dt, qa[j]), dequant_word(dt, qb[j]))
                        }
                        Weights::Dense { w, k } => {
                            let row = |r: usize| -> [u32; 4] {
                                let at = r * k + kb + 8 * t;
                                let h = &w[at..at + 8];
                                [0, 1, 2, 3].map(|i| h[2 * i] as u32 | ((h[2 * i + 1] as u32) << 16))
                            };
                            (row(n0 + g), row(n0 + g + 8))
                        }
                    };
                    a_steps[0][lane] = [pa[0], pb[0], pa[1], pb[1]];
                    a_steps[1][lane] = [pa[2], pb[2], pa[3], pb[3]];
                }
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let mut b_steps = [[[0u32; 2]; 32]; 2];
                    for lane in 0..32 {
                        let (g, t) = (lane / 4, lane % 4);
                        let xv = match &xrow[8 * i + g] {
                            Some(row) => uint4_at(row, (kb + 8 * t) * 2),
                            None => [0; 4],
                        };
                        b_steps[0][lane] = [xv[0], xv[1]];
                        b_steps[1][lane] = [xv[2], xv[3]];
                    }
                    match weights {
                        Weights::Int4 { .. } => {
                            let mut d = [[0f32; 4]; 32];
                            mma(dt, &mut d, &(a_steps[0], b_steps[0]));
                            mma(dt, &mut d, &(a_steps[1], b_steps[1]));
                            for lane in 0..32 {
                                acc_i[lane][0] += scale[lane][0] * d[lane][0];
                                acc_i[lane][1] += scale[lane][0] * d[lane][1];
                                acc_i[lane][2] += scale[lane][1] * d[lane][2];
                                acc_i[lane][3] += scale[lane][1] * d[lane][3];
                            }
                        }
                        Weights::Dense { .. } => {
                            mma(dt, acc_i, &(a_steps[0], b_steps[0]));
                            mma(dt, acc_i, &(a_steps[1], b_steps[1]));
                        }
                    }
                }
            }
            c += warps;
        }
        let red = &mut smem[warp * TILE_ROWS * cols..(warp + 1) * TILE_ROWS * cols];
        for (i, acc_i) in acc.iter().enumerate() {
            for (lane, a) in acc_i.iter().enumerate() {
                let (g, t) = (lane / 4, lane % 4);
                red[g * cols + 8 * i + 2 * t] = a[0];
                red[g * cols + 8 * i + 2 * t + 1] = a[1];
                red[(g + 8) * cols + 8 * i + 2 * t] = a[2];
                red[(g + 8) * cols + 8 * i + 2 * t + 1] = a[3];
            }
        }
    }
    (0..TILE_ROWS * cols).map(|idx| (0..warps).map(|v| smem[v * TILE_ROWS * cols + idx]).sum()).collect()
}

/// `linear_body`: y (M, N) or (M, N/2) in the dtype's bits.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    dt: Dt,
    weights: &Weights,
    x: &[u16],
    m: usize,
    n: usize,
    k: usize,
    swiglu: bool,
    warps: usize,
) -> Vec<u16> {
    let tiles = m.div_ceil(8);
    let cols = 8 * tiles;
    let xrow: Vec<Option<Vec<u8>>> =
        (0..cols).map(|i| (i < m).then(|| activation_row_bytes(&x[i * k..(i + 1) * k]))).collect();
    let out_n = if swiglu { n / 2 } else { n };
    let mut y = vec![0u16; m * out_n];
    for n0 in (0..n).step_by(TILE_ROWS) {
        let fin = tile_gemm(dt, weights, n0, &xrow, tiles, k, warps);
        if !swiglu {
            for idx in 0..TILE_ROWS * cols {
                let (r, mm) = (idx % TILE_ROWS, idx / TILE_ROWS);
                if mm < m {
                    y[mm * n + n0 + r] = dt.bits_of(fin[r * cols + mm]);
                }
            }
        } else {
            for idx in 0..8 * cols {
                let (r, mm) = (idx % 8, idx / 8);
                if mm < m {
                    let (gate, up) = (fin[r * cols + mm], fin[(r + 8) * cols + mm]);
                    y[mm * out_n + n0 / 2 + r] = dt.bits_of(crate::reference::silu_mul(gate, up));
                }
            }
        }
    }
    y
}

/// `dot8<DT>`: 8 exact products (register pairs as f32) summed in order by f32 FMAs.
fn dot8(dt: Dt, w: [u32; 4], x: [u32; 4]) -> f32 {
    let mut s = 0f32;
    for i in 0..4 {
        for half in 0..2 {
            let wv = dt.to_f32((w[i] >> (16 * half)) as u16);
            let xv = dt.to_f32((x[i] >> (16 * half)) as u16);
            s = wv.mul_add(xv, s);
        }
    }
    s
}

/// `gemv_body` with `pairs` row pairs per warp, launched as `launch_gemv` does (8 warps a CTA,
/// N / (16 pairs) CTAs rounded up): warp w takes pairs (pairs w ..), each pair rows (16q + r,
/// 16q + r + 8); lanes stride over the rows' 16-byte pieces (rounds of U pieces visit them in
/// the same order whatever U, so U does not change a bit), each lane's sum in piece order, then
/// the butterfly (xor 16, 8, 4, 2, 1) the shuffles compute. y (N) or its SwiGLU (N/2) in the
/// dtype's bits, and how many times each output was written.
pub fn gemv(
    dt: Dt,
    weights: &Weights,
    x: &[u16],
    n: usize,
    k: usize,
    swiglu: bool,
    pairs: usize,
) -> (Vec<u16>, Vec<usize>) {
    let xb = activation_row_bytes(x);
    let kp = k.div_ceil(CHUNK_K) * CHUNK_K;
    let pieces = match weights {
        Weights::Int4 { .. } => kp / 32,
        Weights::Dense { .. } => k / 8,
    };
    let out_n = if swiglu { n / 2 } else { n };
    let mut y = vec![0u16; out_n];
    let mut writes = vec![0usize; out_n];
    let warps = 8 * n.div_ceil(TILE_ROWS * pairs);
    let warp_pairs = (0..warps).flat_map(|w| {
        let first = pairs * w;
        // Warps whose block lies past N return at once.
        (0..pairs).map(move |i| first + i).filter(move |_| 16 * (first / 8) < n)
    });
    for pair in warp_pairs {
        let na = 16 * (pair / 8) + pair % 8;
        let nb = na + 8;
        let mut lanes = [[0f32; 2]; 32];
        for (lane, acc) in lanes.iter_mut().enumerate() {
            // The kernel's rounds of U pieces visit p = lane, lane + 32, ... in this order too.
            for p in (lane..pieces).step_by(32) {
                for (r, row) in [na, nb].into_iter().enumerate() {
                    match weights {
                        Weights::Int4 { packed, row_bytes, scales, scale_row, block_size } => {
                            let q = uint4_at(packed, row * row_bytes + 16 * p);
                            let (c, t) = (p / 4, p % 4);
                            let sc = load_scales(scales, row * scale_row, c, *block_size);
                            for j in 0..4 {
                                let kb = c * CHUNK_K + j * 32;
                                if kb >= k {
                                    break;
                                }
                                let xv = uint4_at(&xb, (kb + 8 * t) * 2);
                                let d = dot8(dt, dequant_word(dt, q[j]), xv);
                                acc[r] = scale_of(dt, sc, j, *block_size).mul_add(d, acc[r]);
                            }
                        }
                        Weights::Dense { w, k } => {
                            let at = row * k + 8 * p;
                            let h = &w[at..at + 8];
                            let wv = [0, 1, 2, 3].map(|i| h[2 * i] as u32 | ((h[2 * i + 1] as u32) << 16));
                            acc[r] += dot8(dt, wv, uint4_at(&xb, 16 * p));
                        }
                    }
                }
            }
        }
        for o in [16, 8, 4, 2, 1] {
            let before = lanes;
            for (lane, acc) in lanes.iter_mut().enumerate() {
                acc[0] += before[lane ^ o][0];
                acc[1] += before[lane ^ o][1];
            }
        }
        let [a, b] = lanes[0];
        if swiglu {
            let at = 8 * (pair / 8) + pair % 8;
            y[at] = dt.bits_of(crate::reference::silu_mul(a, b));
            writes[at] += 1;
        } else {
            y[na] = dt.bits_of(a);
            y[nb] = dt.bits_of(b);
            writes[na] += 1;
            writes[nb] += 1;
        }
    }
    (y, writes)
}

/// `mul2<DT>`: a pair times a scale pair as `fma.rn.{f16,bf16}x2 d, p, s, -0`.
fn mul2(dt: Dt, p: u32, s: u32) -> u32 {
    dt.fma2(p, s, 0x8000_8000)
}

/// What thread `i` of `dequant_body` touches for a weight with `k` columns: the byte offset of
/// its 16-byte load in the packed weight, and for each of its 4 words the element offset in the
/// output (N, K) of its 8 consecutive outputs (`None`: padding, not written). The kernel stores
/// each word's outputs with one 16-byte store (16-bit) or two (f32).
pub fn dequant_piece(i: usize, k: usize) -> (usize, [Option<usize>; 4]) {
    let kp = k.div_ceil(CHUNK_K) * CHUNK_K;
    let per_row = kp / 32;
    let (row, piece) = (i / per_row, i % per_row);
    let (c, t) = (piece / 4, piece % 4);
    let stores = [0, 1, 2, 3].map(|j| {
        let k0 = c * CHUNK_K + j * 32 + 8 * t;
        (k0 < k).then_some(row * k + k0)
    });
    (16 * i, stores)
}

/// Device memory written by vector stores: the bytes, and which were written (a byte written
/// twice is a bug of the kernel's mapping, so it panics).
struct Stores {
    bytes: Vec<u8>,
    written: Vec<bool>,
}

impl Stores {
    fn new(len: usize) -> Self {
        Stores { bytes: vec![0; len], written: vec![false; len] }
    }
    /// `st.global.v4.u32 [at], {w0, w1, w2, w3}` (little-endian).
    fn st_v4(&mut self, at: usize, words: [u32; 4]) {
        assert_eq!(at % 16, 0, "a 16-byte store at {at} is misaligned");
        for (b, w) in words.iter().enumerate() {
            for (e, byte) in w.to_le_bytes().into_iter().enumerate() {
                let a = at + 4 * b + e;
                assert!(!self.written[a], "byte {a} written twice");
                self.written[a] = true;
                self.bytes[a] = byte;
            }
        }
    }
    fn finish(self) -> Vec<u8> {
        if let Some(a) = self.written.iter().position(|&w| !w) {
            panic!("byte {a} of the output never written");
        }
        self.bytes
    }
}

/// `dequant_body`: every thread's load, dequantization and vector stores; `F32` gives the exact
/// (q - 8) * scale as f32 bits, otherwise the dtype's bits. Returns the output (N, K) bytes.
fn dequant_bytes(
    dt: Dt,
    packed: &[u8],
    scales: &[u16],
    (n, k, block_size): (usize, usize, usize),
    f32_out: bool,
) -> Vec<u8> {
    let kp = k.div_ceil(CHUNK_K) * CHUNK_K;
    let elem = if f32_out { 4 } else { 2 };
    let mut out = Stores::new(n * k * elem);
    for i in 0..n * (kp / 32) {
        let (load_at, stores) = dequant_piece(i, k);
        let q = uint4_at(packed, load_at);
        let (row, c) = (i / (kp / 32), i % (kp / 32) / 4);
        let cs = load_scales(scales, row * (kp / block_size), c, block_size);
        for (j, at) in stores.iter().enumerate() {
            let Some(at) = *at else { break };
            let p = dequant_word(dt, q[j]);
            let s = scale_bits(cs, j, block_size);
            if f32_out {
                let sf = dt.to_f32(s);
                let v: Vec<u32> =
                    (0..8).map(|e| (dt.to_f32((p[e / 2] >> (16 * (e % 2))) as u16) * sf).to_bits()).collect();
                out.st_v4(at * 4, [v[0], v[1], v[2], v[3]]);
                out.st_v4(at * 4 + 16, [v[4], v[5], v[6], v[7]]);
            } else {
                let ss = s as u32 * 0x1_0001;
                out.st_v4(at * 2, p.map(|pair| mul2(dt, pair, ss)));
            }
        }
    }
    out.finish()
}

/// `dequant_body` with F32: the exact (q - 8) * scale of every element, (N, K).
pub fn dequant_f32(dt: Dt, packed: &[u8], scales: &[u16], n: usize, k: usize, block_size: usize) -> Vec<f32> {
    dequant_bytes(dt, packed, scales, (n, k, block_size), true)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `dequant_body` in the dtype (the cuBLAS path's weight): (N, K) bits.
pub fn dequant(dt: Dt, packed: &[u8], scales: &[u16], n: usize, k: usize, block_size: usize) -> Vec<u16> {
    dequant_bytes(dt, packed, scales, (n, k, block_size), false)
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// `moe_topk_body` for one token: the k rounds of the warp arg-max (ties to the lower expert).
pub fn moe_topk(
    dt: Dt,
    probs: &[u16],
    router_weights: Option<&[u16]>,
    k: usize,
    normalize: bool,
) -> (Vec<usize>, Vec<f32>) {
    let v: Vec<f32> = probs.iter().map(|&h| dt.to_f32(h)).collect();
    let mx = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let denom: f32 = v.iter().map(|&x| if x == f32::NEG_INFINITY { 0.0 } else { (x - mx).exp() }).sum();
    let mut taken = vec![false; v.len()];
    let (mut experts, mut weights) = (Vec::new(), Vec::new());
    for _ in 0..k {
        let mut best = (f32::NEG_INFINITY, usize::MAX);
        for (e, &x) in v.iter().enumerate() {
            if !taken[e] && (x > best.0 || (x == best.0 && e < best.1)) {
                best = (x, e);
            }
        }
        taken[best.1] = true;
        experts.push(best.1);
        weights.push(match router_weights {
            Some(rw) => dt.to_f32(rw[best.1]),
            None => (best.0 - mx).exp() / denom,
        });
    }
    let total: f32 = weights.iter().sum();
    if normalize {
        weights.iter_mut().for_each(|w| *w /= total);
    }
    (experts, weights)
}

/// A slot: (expert, first pair, pairs).
pub type Slot = (usize, usize, usize);
/// (pair_token, pair_slot_of, slots).
pub type MoePlan = (Vec<usize>, Vec<usize>, Vec<Slot>);

/// `pio_moe_plan` (with a sequential scatter: the kernel's atomic order within an expert changes
/// no result). Returns (pair_token, pair_slot_of, slots as (expert, begin, count)).
pub fn moe_plan(topk_expert: &[usize], k: usize, experts: usize) -> MoePlan {
    let mut count = vec![0usize; experts];
    for &e in topk_expert {
        count[e] += 1;
    }
    let (mut cursor, mut slots, mut offset) = (vec![0usize; experts], Vec::new(), 0);
    for e in 0..experts {
        cursor[e] = offset;
        let mut b = 0;
        while b < count[e] {
            slots.push((e, offset + b, 32.min(count[e] - b)));
            b += 32;
        }
        offset += count[e];
    }
    let (mut pair_token, mut pair_slot_of) = (vec![0; topk_expert.len()], vec![0; topk_expert.len()]);
    for (p, &e) in topk_expert.iter().enumerate() {
        pair_token[cursor[e]] = p / k;
        pair_slot_of[p] = cursor[e];
        cursor[e] += 1;
    }
    (pair_token, pair_slot_of, slots)
}

/// An MoE layer's int4 experts as the kernels read them (u16 scales).
pub struct Experts<'a> {
    pub packed: &'a [u8],
    pub scales: &'a [u16],
    pub rows: usize,
    pub k: usize,
    pub block_size: usize,
}

impl Experts<'_> {
    fn weights(&self, e: usize) -> Weights<'_> {
        let kp = self.k.div_ceil(CHUNK_K) * CHUNK_K;
        let (rb, sr) = (kp / 2, kp / self.block_size);
        Weights::Int4 {
            packed: &self.packed[e * self.rows * rb..(e + 1) * self.rows * rb],
            row_bytes: rb,
            scales: &self.scales[e * self.rows * sr..(e + 1) * self.rows * sr],
            scale_row: sr,
            block_size: self.block_size,
        }
    }
}

/// The whole MoE pipeline (topk, plan, fc1 + SwiGLU, fc2, combine) for `tokens` rows of x (T, H).
#[allow(clippy::too_many_arguments)]
pub fn moe(
    dt: Dt,
    x: &[u16],
    tokens: usize,
    probs: &[u16],
    router_weights: Option<&[u16]>,
    (fc1, fc2): (&Experts, &Experts),
    (experts, k, normalize): (usize, usize, bool),
    warps: usize,
) -> Vec<u16> {
    let (hidden, inter) = (fc1.k, fc2.k);
    let mut topk_expert = Vec::new();
    let mut topk_weight = Vec::new();
    for t in 0..tokens {
        let rw = router_weights.map(|r| &r[t * experts..(t + 1) * experts]);
        let (e, w) = moe_topk(dt, &probs[t * experts..(t + 1) * experts], rw, k, normalize);
        topk_expert.extend(e);
        topk_weight.extend(w);
    }
    let (pair_token, pair_slot_of, slots) = moe_plan(&topk_expert, k, experts);
    let pairs = tokens * k;
    let tiles = tokens.min(32).div_ceil(8);
    let mut h = vec![0u16; pairs * inter];
    let mut pair_out = vec![0f32; pairs * hidden];
    for &(e, begin, n) in &slots {
        let xrow: Vec<Option<Vec<u8>>> = (0..8 * tiles)
            .map(|i| (i < n).then(|| activation_row_bytes(&x[pair_token[begin + i] * hidden..][..hidden])))
            .collect();
        let w1 = fc1.weights(e);
        for n0 in (0..2 * inter).step_by(TILE_ROWS) {
            let fin = tile_gemm(dt, &w1, n0, &xrow, tiles, hidden, warps);
            for idx in 0..8 * 8 * tiles {
                let (r, m) = (idx % 8, idx / 8);
                if m < n {
                    let cols = 8 * tiles;
                    let v = crate::reference::silu_mul(fin[r * cols + m], fin[(r + 8) * cols + m]);
                    h[(begin + m) * inter + n0 / 2 + r] = dt.bits_of(v);
                }
            }
        }
    }
    for &(e, begin, n) in &slots {
        let xrow: Vec<Option<Vec<u8>>> =
            (0..8 * tiles).map(|i| (i < n).then(|| activation_row_bytes(&h[(begin + i) * inter..][..inter]))).collect();
        let w2 = fc2.weights(e);
        for n0 in (0..hidden).step_by(TILE_ROWS) {
            let fin = tile_gemm(dt, &w2, n0, &xrow, tiles, inter, warps);
            for idx in 0..TILE_ROWS * 8 * tiles {
                let (r, m) = (idx % TILE_ROWS, idx / TILE_ROWS);
                if m < n {
                    pair_out[(begin + m) * hidden + n0 + r] = fin[r * 8 * tiles + m];
                }
            }
        }
    }
    let mut y = vec![0u16; tokens * hidden];
    for t in 0..tokens {
        for c in 0..hidden {
            let sum: f32 =
                (0..k).map(|j| topk_weight[t * k + j] * pair_out[pair_slot_of[t * k + j] * hidden + c]).sum();
            y[t * hidden + c] = dt.bits_of(sum);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{pack_row, Int4Shape};
    use crate::reference;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Random values already representable in `dt` (bits, and their f32 values).
    fn values(rng: &mut ChaCha8Rng, dt: Dt, n: usize, scale: f32) -> (Vec<u16>, Vec<f32>) {
        let bits: Vec<u16> = (0..n).map(|_| dt.bits_of(rng.random_range(-scale..scale))).collect();
        let f = bits.iter().map(|&b| dt.to_f32(b)).collect();
        (bits, f)
    }

    struct Int4 {
        shape: Int4Shape,
        packed: Vec<u8>,
        scale_bits: Vec<u16>,
        scales: Vec<f32>,
    }

    impl Int4 {
        /// The weight side the kernels' emulations take.
        fn weights(&self) -> Weights<'_> {
            Weights::Int4 {
                packed: &self.packed,
                row_bytes: self.shape.row_bytes(),
                scales: &self.scale_bits,
                scale_row: self.shape.scale_cols(),
                block_size: self.shape.block_size,
            }
        }
    }

    fn int4(rng: &mut ChaCha8Rng, dt: Dt, n: usize, k: usize, block_size: usize) -> Int4 {
        let shape = Int4Shape::new(n, k, block_size).unwrap();
        let codes: Vec<u8> = (0..n * k).map(|_| rng.random_range(0..16u8)).collect();
        let mut packed = vec![0u8; shape.packed_len()];
        for (r, row) in packed.chunks_mut(shape.row_bytes()).enumerate() {
            pack_row(&shape, |i| codes[r * k + i], row);
        }
        // Scales of the padding are 0, as the exporter writes them.
        let real = shape.matmulnbits_blocks();
        let (mut scale_bits, mut scales) = values(rng, dt, shape.scales_len(), 0.05);
        for r in 0..n {
            for c in real..shape.scale_cols() {
                scale_bits[r * shape.scale_cols() + c] = 0;
                scales[r * shape.scale_cols() + c] = 0.0;
            }
        }
        Int4 { shape, packed, scale_bits, scales }
    }

    fn assert_close(dt: Dt, got: &[u16], expected: &[f32], what: &str) {
        let eps = match dt {
            Dt::F16 => 1.0 / 1024.0,
            Dt::Bf16 => 1.0 / 128.0,
        };
        let max = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(got.len(), expected.len(), "{what}: length");
        for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
            let g = dt.to_f32(g);
            let tol = eps * (e.abs() + 1e-3 * max) + 1e-6;
            assert!((g - e).abs() <= tol, "{what} [{i}]: kernel {g} vs reference {e} (tol {tol})");
        }
    }

    #[test]
    fn dequant_word_gives_q_minus_8_for_every_code_and_position() {
        for dt in [Dt::F16, Dt::Bf16] {
            for q in 0..16u32 {
                for pos in 0..8 {
                    let w = 0x8888_8888u32 & !(0xF << (4 * pos)) | (q << (4 * pos));
                    let p = dequant_word(dt, w);
                    // Nibble position i -> pair i low half, position i + 4 -> pair i high half.
                    let (pair, hi) = (pos % 4, pos / 4);
                    for (i, &reg) in p.iter().enumerate() {
                        for half in 0..2 {
                            let v = dt.to_f32((reg >> (16 * half)) as u16);
                            let expected = if i == pair && half == hi { q as f32 - 8.0 } else { 0.0 };
                            assert_eq!(v, expected, "{dt:?} code {q} at nibble {pos}: pair {i} half {half}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn int4_tile_kernel_matches_the_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let cases = [
            (16, 32, 32, 1, 1),
            (32, 96, 32, 5, 2),
            (16, 160, 64, 8, 1),
            (48, 384, 128, 9, 3),
            (32, 256, 32, 32, 2),
            (16, 128, 64, 17, 1),
        ];
        for dt in [Dt::F16, Dt::Bf16] {
            for &(n, k, bs, m, warps) in &cases {
                let w = int4(&mut rng, dt, n, k, bs);
                let (xb, xf) = values(&mut rng, dt, m * k, 1.0);
                let weights = w.weights();
                let what = format!("{dt:?} int4 N={n} K={k} bs={bs} M={m} warps={warps}");
                let y = linear(dt, &weights, &xb, m, n, k, false, warps);
                let expected = reference::linear_int4(&xf, m, &w.shape, &w.packed, &w.scales);
                assert_close(dt, &y, &expected, &what);
                let y = linear(dt, &weights, &xb, m, n, k, true, warps);
                assert_close(dt, &y, &reference::swiglu_grouped(&expected, m, n), &format!("{what} SwiGLU"));
            }
        }
    }

    #[test]
    fn dense_tile_kernel_matches_the_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for dt in [Dt::F16, Dt::Bf16] {
            for &(n, k, m, warps) in &[(16, 32, 1, 1), (32, 160, 7, 2), (48, 256, 24, 2), (16, 96, 32, 1)] {
                let (wb, wf) = values(&mut rng, dt, n * k, 0.2);
                let (xb, xf) = values(&mut rng, dt, m * k, 1.0);
                let weights = Weights::Dense { w: &wb, k };
                let what = format!("{dt:?} dense N={n} K={k} M={m}");
                let expected = reference::linear_dense(&xf, m, n, k, &wf);
                assert_close(dt, &linear(dt, &weights, &xb, m, n, k, false, warps), &expected, &what);
                let y = linear(dt, &weights, &xb, m, n, k, true, warps);
                assert_close(dt, &y, &reference::swiglu_grouped(&expected, m, n), &format!("{what} SwiGLU"));
            }
        }
    }

    /// Every output written exactly once, and each close to the reference.
    fn check_gemv(dt: Dt, (y, writes): &(Vec<u16>, Vec<usize>), expected: &[f32], what: &str) {
        assert!(writes.iter().all(|&w| w == 1), "{what}: outputs written {writes:?} times");
        assert_close(dt, y, expected, what);
    }

    #[test]
    fn one_token_gemv_matches_the_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        for dt in [Dt::F16, Dt::Bf16] {
            // K with a partial last chunk, several rounds of a lane, and each block size.
            for &(n, k, bs) in &[(16, 32, 32), (32, 2560 + 96, 32), (48, 4224 + 32, 64), (16, 9728 + 64, 128)] {
                let w = int4(&mut rng, dt, n, k, bs);
                let (xb, xf) = values(&mut rng, dt, k, 1.0);
                let weights = w.weights();
                let expected = reference::linear_int4(&xf, 1, &w.shape, &w.packed, &w.scales);
                for (_, pairs) in crate::source::GEMV_INT4_VARIANTS {
                    let what = format!("{dt:?} int4 GEMV N={n} K={k} bs={bs} pairs={pairs}");
                    check_gemv(dt, &gemv(dt, &weights, &xb, n, k, false, pairs), &expected, &what);
                    let swiglu = reference::swiglu_grouped(&expected, 1, n);
                    check_gemv(dt, &gemv(dt, &weights, &xb, n, k, true, pairs), &swiglu, &format!("{what} SwiGLU"));
                }
            }
            for &(n, k) in &[(16, 32), (32, 2560), (48, 9728 + 32)] {
                let (wb, wf) = values(&mut rng, dt, n * k, 0.2);
                let (xb, xf) = values(&mut rng, dt, k, 1.0);
                let weights = Weights::Dense { w: &wb, k };
                let expected = reference::linear_dense(&xf, 1, n, k, &wf);
                for (_, pairs) in crate::source::GEMV_DENSE_VARIANTS {
                    let what = format!("{dt:?} dense GEMV N={n} K={k} pairs={pairs}");
                    check_gemv(dt, &gemv(dt, &weights, &xb, n, k, false, pairs), &expected, &what);
                    let swiglu = reference::swiglu_grouped(&expected, 1, n);
                    check_gemv(dt, &gemv(dt, &weights, &xb, n, k, true, pairs), &swiglu, &format!("{what} SwiGLU"));
                }
            }
        }
    }

    #[test]
    fn dequantization_is_bit_exact() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        for dt in [Dt::F16, Dt::Bf16] {
            // K = 96, 160 and 416 end in a partial chunk (padding words are skipped, not written).
            for &(n, k, bs) in &[(16, 96, 32), (32, 256, 64), (16, 384, 128), (48, 160, 32), (16, 416, 64)] {
                let w = int4(&mut rng, dt, n, k, bs);
                let what = format!("{dt:?} N={n} K={k} bs={bs}");
                let expected = reference::dequantize(&w.shape, &w.packed, &w.scales);
                let got = dequant_f32(dt, &w.packed, &w.scale_bits, n, k, bs);
                assert!(got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: f32");
                // The 16-bit output (the cuBLAS path's weight) is the exact value rounded once.
                let got = dequant(dt, &w.packed, &w.scale_bits, n, k, bs);
                assert_eq!(got.len(), expected.len(), "{what}");
                for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                    assert_eq!(g, dt.bits_of(e), "{what}: element {i} = {} vs {e}", dt.to_f32(g));
                }
            }
        }
    }

    #[test]
    fn dequantization_accesses_are_wide_and_coalesced() {
        // Per warp (32 consecutive threads): the loads are one contiguous run of 16-byte pieces,
        // and each of the 4 store instructions writes whole aligned 32-byte sectors of the
        // output (16-bit), so no sector is written partly by one instruction.
        for &(n, k) in &[(16usize, 96usize), (32, 256), (16, 160), (48, 2560 + 96)] {
            let pieces = n * k.div_ceil(CHUNK_K) * 4;
            for warp in 0..pieces.div_ceil(32) {
                let lanes = warp * 32..(warp * 32 + 32).min(pieces);
                let loads: Vec<usize> = lanes.clone().map(|i| dequant_piece(i, k).0).collect();
                assert!(loads.windows(2).all(|w| w[1] == w[0] + 16), "N={n} K={k} warp {warp}: loads");
                for j in 0..4 {
                    let mut bytes: Vec<usize> = lanes
                        .clone()
                        .filter_map(|i| dequant_piece(i, k).1[j])
                        .flat_map(|at| 2 * at..2 * at + 16)
                        .collect();
                    bytes.sort_unstable();
                    let sectors: std::collections::BTreeSet<usize> = bytes.iter().map(|b| b / 32).collect();
                    assert_eq!(bytes.len(), sectors.len() * 32, "N={n} K={k} warp {warp} word {j}: partial sectors");
                }
            }
        }
    }

    #[test]
    fn moe_pipeline_matches_the_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        // (experts, k, hidden, inter, tokens, normalize, router weights)
        let cases = [(8, 2, 64, 32, 1, true, false), (8, 3, 64, 32, 5, false, true), (16, 8, 128, 64, 40, true, false)];
        for dt in [Dt::F16, Dt::Bf16] {
            for &(experts, k, hidden, inter, tokens, normalize, with_rw) in &cases {
                let fc1: Vec<Int4> = (0..experts).map(|_| int4(&mut rng, dt, 2 * inter, hidden, 32)).collect();
                let fc2: Vec<Int4> = (0..experts).map(|_| int4(&mut rng, dt, hidden, inter, 32)).collect();
                let cat = |v: &[Int4]| -> (Vec<u8>, Vec<u16>, Vec<f32>) {
                    (
                        v.iter().flat_map(|w| w.packed.clone()).collect(),
                        v.iter().flat_map(|w| w.scale_bits.clone()).collect(),
                        v.iter().flat_map(|w| w.scales.clone()).collect(),
                    )
                };
                let (p1, sb1, s1) = cat(&fc1);
                let (p2, sb2, s2) = cat(&fc2);
                let (xb, xf) = values(&mut rng, dt, tokens * hidden, 1.0);
                let (pb, pf) = values(&mut rng, dt, tokens * experts, 2.0);
                let (rwb, rwf) = values(&mut rng, dt, tokens * experts, 1.0);
                let (rwb, rwf): (Vec<u16>, Vec<f32>) = (
                    rwb.iter().map(|&b| dt.bits_of(dt.to_f32(b).abs() + 0.01)).collect(),
                    rwf.iter().map(|v| dt.to_f32(dt.bits_of(v.abs() + 0.01))).collect(),
                );
                let e1 = Experts { packed: &p1, scales: &sb1, rows: 2 * inter, k: hidden, block_size: 32 };
                let e2 = Experts { packed: &p2, scales: &sb2, rows: hidden, k: inter, block_size: 32 };
                let y = moe(dt, &xb, tokens, &pb, with_rw.then_some(&rwb[..]), (&e1, &e2), (experts, k, normalize), 2);
                let routing = reference::route(&pf, with_rw.then_some(&rwf[..]), tokens, experts, k, normalize);
                let w1 = reference::ExpertWeights { shape: fc1[0].shape, packed: &p1, scales: &s1 };
                let w2 = reference::ExpertWeights { shape: fc2[0].shape, packed: &p2, scales: &s2 };
                let round = |v: f32| dt.to_f32(dt.bits_of(v));
                let expected = reference::moe_int4(&xf, tokens, &w1, &w2, (&routing.0, &routing.1), k, round);
                assert_close(dt, &y, &expected, &format!("{dt:?} MoE E={experts} k={k} T={tokens}"));
            }
        }
    }
}
