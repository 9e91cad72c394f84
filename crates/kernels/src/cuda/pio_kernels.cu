// Inference-PIO's CUDA kernels, compiled at session load by NVRTC (no headers: every conversion
// and tensor-core instruction is inline PTX, so nothing but libnvrtc is needed).
//
// One tile routine serves every weight-reading kernel: a CTA computes 16 output features for
// up to 32 tokens with mma.sync.m16n8k16 (f32 accumulate). The weights are the A operand (16
// rows of W), the activations the B operand (8 tokens per n-tile), so a batch of 1 wastes only
// 7/8 of a tensor-core instruction that costs a cycle, while the memory system streams the
// weights. Warps of a CTA split K in chunks of 128 and are reduced in shared memory in a fixed
// order (deterministic; no atomics).
//
// K-slot mapping (the reason no shuffles or ldmatrix are needed): in a 32-wide sub-block at
// k0, thread t of a quad owns k0 + 8t .. k0 + 8t + 7. For mma step s (0, 1) it feeds slots
// (2t, 2t+1) with k0 + 8t + 4s + {0, 1} and slots (2t+8, 2t+9) with k0 + 8t + 4s + {2, 3}, in
// both A (weights, rows g and g+8) and B (activations, token g). The dot product over the 16
// slots is then a dot product over 16 distinct real k, so the sum over all steps is the full
// dot product. The int4 export layout (layout.rs) packs each thread's 8 codes of a sub-block
// into one 32-bit word whose nibble pairs dequantize straight into these register pairs.
//
// Formats:
//   int4:   packed (N, Kp/2) bytes, Kp = K rounded up to 128; row n, chunk c, thread slot t,
//           sub-block j -> the u32 at byte 64c + 16t + 4j holds k = 128c + 32j + 8t + l at
//           nibble position l/2 + 4(l%2). Codes are unsigned, zero point 8 (MatMulNBits').
//           scales (N, Kp/BS) in the activation dtype; w = (q - 8) * scale, exact in f32.
//   dense:  (N, K) in the activation dtype (a Hugging Face linear weight as stored).
// CUDA-graph safe: no allocation, synchronization or host access inside any kernel.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DT_F16 0
#define DT_BF16 1
#define FMT_INT4 0
#define FMT_DENSE 1
#define MAX_TILES 4
#define TILE_ROWS 16
#define CHUNK_K 128

// ---------------------------------------------------------------------------------------------
// Element conversions and packed math (inline PTX, sm_80+).
// ---------------------------------------------------------------------------------------------

template <int DT> __device__ __forceinline__ float to_f32(u16 h);
template <> __device__ __forceinline__ float to_f32<DT_F16>(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
template <> __device__ __forceinline__ float to_f32<DT_BF16>(u16 h) { return __uint_as_float(((u32)h) << 16); }

template <int DT> __device__ __forceinline__ u16 from_f32(float f);
template <> __device__ __forceinline__ u16 from_f32<DT_F16>(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
template <> __device__ __forceinline__ u16 from_f32<DT_BF16>(float f) {
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// The 8 codes of one packed word as 4 register pairs (k 2i, 2i+1) holding q - 8 exactly:
// OR a nibble into the mantissa of a magic number (1024 in f16, 128 in bf16: one unit per
// mantissa step) and subtract magic + 8 with a fused multiply-add by 1.
template <int DT> __device__ __forceinline__ void dequant_word(u32 w, u32 (&p)[4]) {
  const u32 magic = DT == DT_F16 ? 0x64006400u : 0x43004300u;
  const u32 one = DT == DT_F16 ? 0x3C003C00u : 0x3F803F80u;
  const u32 minus_magic_8 = DT == DT_F16 ? 0xE408E408u : 0xC308C308u;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    u32 v;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(w >> (4 * i)), "r"(0x000F000Fu), "r"(magic));
    if (DT == DT_F16) {
      asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(p[i]) : "r"(v), "r"(one), "r"(minus_magic_8));
    } else {
      asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(p[i]) : "r"(v), "r"(one), "r"(minus_magic_8));
    }
  }
}

// d += A * B for one m16n8k16 tile, f32 accumulate. Not volatile unless ORDERED: a pure function
// of its registers, so the compiler may issue the (volatile, in-order) loads around it early.
// ORDERED keeps it in program order with the loads: where hoisting every load of a round would
// cost more registers than it saves latency (the int4 tiles of more than 8 tokens).
#define PIO_MMA16816(QUAL, TYPE)                                                                           \
  asm QUAL("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                          \
           ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                                     \
           : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                              \
           : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))
template <int DT, bool ORDERED = false>
__device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  if (ORDERED) {
    if (DT == DT_F16) PIO_MMA16816(volatile, "f16"); else PIO_MMA16816(volatile, "bf16");
  } else {
    if (DT == DT_F16) PIO_MMA16816(, "f16"); else PIO_MMA16816(, "bf16");
  }
}

// Weights are read once: no L1 allocation, with a 256-byte L2 prefetch (the neighbouring
// chunks belong to the other warps of the CTA).
__device__ __forceinline__ uint4 ld_weights(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Activations are re-read by every CTA: the default (L1-cached) read-only path.
__device__ __forceinline__ uint4 ld_act(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ u32 ld_u32(const void* p) {
  u32 v;
  asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ u16 ld_u16(const void* p) {
  u16 v;
  asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ u32 word_of(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

__device__ __forceinline__ float silu_mul(float gate, float up) { return gate / (1.0f + __expf(-gate)) * up; }

// ---------------------------------------------------------------------------------------------
// The tile routine.
// ---------------------------------------------------------------------------------------------

// Scales of one chunk for one row: BS = 32 -> 4 halves (8 bytes), 64 -> 2, 128 -> 1.
template <int BS> struct ChunkScales {
  u32 lo, hi;
};

template <int BS> __device__ __forceinline__ ChunkScales<BS> load_scales(const u16* row, int chunk) {
  ChunkScales<BS> s;
  if (BS == 32) {
    const u32* p = (const u32*)(row + chunk * 4);
    s.lo = ld_u32(p);
    s.hi = ld_u32(p + 1);
  } else if (BS == 64) {
    s.lo = ld_u32(row + chunk * 2);
    s.hi = 0;
  } else {
    s.lo = ld_u16(row + chunk);
    s.hi = 0;
  }
  return s;
}

// The scale of sub-block j (0..3) of the chunk: its bits, and its value.
template <int BS> __device__ __forceinline__ u16 scale_bits(const ChunkScales<BS>& s, int j) {
  const int half = BS == 32 ? j : BS == 64 ? j >> 1 : 0;
  const u32 word = half < 2 ? s.lo : s.hi;
  return (u16)(word >> (16 * (half & 1)));
}
template <int DT, int BS> __device__ __forceinline__ float scale_of(const ChunkScales<BS>& s, int j) {
  return to_f32<DT>(scale_bits<BS>(s, j));
}

// The int4 tile routine at one token tile (up to 8 tokens: decode), from a probe of kernel builds
// on an H100 (2026-12-07, Qwen3-4B's projections): 2 chunks a round, the activations of each
// chunk loaded before its mma chain, rounds inside K without bounds checks, and registers capped
// for 2 CTAs an SM; the int4 down at one token 16.4 -> 10.5 us, o 8.2 -> 6.3, gate/up (2 warps)
// 13.4. More tiles keep the routine before it (`int4_rounds_in_order`): the same changes there
// took occupancy (registers 121 -> 134 to 216, one CTA an SM) and lost (32 tokens: the down
// 22 -> 28 to 34 us).
#define TILE_MIN_CTAS(TILES) ((TILES) == 1 ? 2 : 1)
constexpr int ONE_TILE_ROUND = 2;

// The weights and scales of chunk c for a thread's rows g (a) and g + 8 (b) of a tile.
template <int BS>
__device__ __forceinline__ void load_chunk(const unsigned char* wa, const unsigned char* wb, const u16* sa,
                                           const u16* sb, int c, int t, uint4& qa, uint4& qb, ChunkScales<BS>& ca,
                                           ChunkScales<BS>& cb) {
  qa = ld_weights(wa + c * 64 + t * 16);
  qb = ld_weights(wb + c * 64 + t * 16);
  ca = load_scales<BS>(sa, c);
  cb = load_scales<BS>(sb, c);
}

// Sub-block j of a loaded chunk: both rows' weights dequantized into mma register pairs, and their scales.
template <int DT, int BS>
__device__ __forceinline__ void dequant_sub_block(const uint4& qa, const uint4& qb, const ChunkScales<BS>& ca,
                                                  const ChunkScales<BS>& cb, int j, u32 (&pa)[4], u32 (&pb)[4],
                                                  float& scale_a, float& scale_b) {
  dequant_word<DT>(word_of(qa, j), pa);
  dequant_word<DT>(word_of(qb, j), pb);
  scale_a = scale_of<DT, BS>(ca, j);
  scale_b = scale_of<DT, BS>(cb, j);
}

// One sub-block's two mma steps against one token tile's activations, added to `acc` scaled.
template <int DT, bool ORDERED>
__device__ __forceinline__ void scaled_mma(float (&acc)[4], const u32 (&pa)[4], const u32 (&pb)[4], float scale_a,
                                           float scale_b, const uint4& xv) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  mma16816<DT, ORDERED>(d, pa[0], pb[0], pa[1], pb[1], xv.x, xv.y);
  mma16816<DT, ORDERED>(d, pa[2], pb[2], pa[3], pb[3], xv.z, xv.w);
  acc[0] += scale_a * d[0];
  acc[1] += scale_a * d[1];
  acc[2] += scale_b * d[2];
  acc[3] += scale_b * d[3];
}

// One round of the one-tile routine: chunks c0, c0 + step (ONE_TILE_ROUND of them) of the warp's
// rows (g, g + 8), all loaded before any is used. FULL: every chunk of the round lies inside K
// (no checks: one basic block, so the compiler interleaves the independent mma chains).
template <int DT, int BS, bool FULL>
__device__ __forceinline__ void one_tile_round(float (&acc)[1][4], const u16* xa, const unsigned char* wa,
                                               const unsigned char* wb, const u16* sa, const u16* sb, int c0,
                                               int step, int chunks, int K, int t) {
  constexpr int R = ONE_TILE_ROUND;
  uint4 qa[R], qb[R];
  ChunkScales<BS> ca[R], cb[R];
#pragma unroll
  for (int u = 0; u < R; u++) {
    const int c = c0 + u * step;
    if (FULL || c < chunks) load_chunk<BS>(wa, wb, sa, sb, c, t, qa[u], qb[u], ca[u], cb[u]);
  }
#pragma unroll
  for (int u = 0; u < R; u++) {
    const int c = c0 + u * step;
    if (!FULL && c >= chunks) break;
    // The chunk's activations are loaded together, before its first mma (loaded beside each
    // mma, every one waited on the L1 in turn: Run 9's 3.7 us a round of the int4 down).
    uint4 xv[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int kb = c * CHUNK_K + j * 32;
      xv[j] = xa && (FULL || kb < K) ? ld_act(xa + kb + 8 * t) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
      if (!FULL && c * CHUNK_K + j * 32 >= K) break;  // the padding of the last chunk (warp-uniform)
      u32 pa[4], pb[4];
      float scale_a, scale_b;
      dequant_sub_block<DT, BS>(qa[u], qb[u], ca[u], cb[u], j, pa, pb, scale_a, scale_b);
      scaled_mma<DT, false>(acc[0], pa, pb, scale_a, scale_b, xv[j]);
    }
  }
}

// The int4 tile routine of more than one token tile: UNROLL chunks per warp loaded before any is
// used (4 x 32 bytes of weights per thread in flight, enough to cover the memory latency at a few
// warps per SM), each sub-block's activations loaded beside its mma, all in program order.
template <int DT, int TILES, int BS>
__device__ __forceinline__ void int4_rounds_in_order(float (&acc)[TILES][4], const u16* const (&xa)[TILES],
                                                     const unsigned char* wa, const unsigned char* wb,
                                                     const u16* sa, const u16* sb, int warp, int warps,
                                                     int chunks, int K, int t) {
  const int UNROLL = 4;
  for (int c0 = warp; c0 < chunks; c0 += UNROLL * warps) {
    uint4 qa[UNROLL], qb[UNROLL];
    ChunkScales<BS> ca[UNROLL], cb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const int c = c0 + u * warps;
      if (c < chunks) load_chunk<BS>(wa, wb, sa, sb, c, t, qa[u], qb[u], ca[u], cb[u]);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; u++) {
      const int c = c0 + u * warps;
      if (c >= chunks) break;
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int kb = c * CHUNK_K + j * 32;
        if (kb >= K) break;  // the padding of the last chunk (warp-uniform)
        u32 pa[4], pb[4];
        float scale_a, scale_b;
        dequant_sub_block<DT, BS>(qa[u], qb[u], ca[u], cb[u], j, pa, pb, scale_a, scale_b);
#pragma unroll
        for (int i = 0; i < TILES; i++) {
          const uint4 xv = xa[i] ? ld_act(xa[i] + kb + 8 * t) : make_uint4(0, 0, 0, 0);
          scaled_mma<DT, true>(acc[i], pa, pb, scale_a, scale_b, xv);
        }
      }
    }
  }
}

// Per-warp sums of a 16-row tile for up to 8*TILES tokens, then the CTA's fixed-order sum into
// `fin` (shared, [16][8*TILES] f32). `xrow` (shared) holds each token slot's activation row or
// null (a padding token). int4: `w` is row 0 of the tile in the packed layout, `w_row_bytes`
// the packed row length, `s`/`s_row` the scales of row 0 and the scale row length. dense: `w` is
// row 0 of an (N, K) matrix of the dtype, `w_row_bytes` = 2K.
template <int DT, int FMT, int TILES, int BS>
__device__ __forceinline__ void tile_gemm(const u16* const* xrow, const unsigned char* w, long long w_row_bytes,
                                          const u16* s, long long s_row, int K, float* smem, float* fin) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int chunks = (K + CHUNK_K - 1) / CHUNK_K;
  float acc[TILES][4];
#pragma unroll
  for (int i = 0; i < TILES; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const u16* xa[TILES];
#pragma unroll
  for (int i = 0; i < TILES; i++) xa[i] = xrow[8 * i + g];
  const unsigned char* wa = w + (long long)g * w_row_bytes;
  const unsigned char* wb = wa + 8 * w_row_bytes;

  if (FMT == FMT_INT4) {
    const u16* sa = s + (long long)g * s_row;
    const u16* sb = sa + 8 * s_row;
    if constexpr (TILES == 1) {
      // A round whose chunks all lie inside K (every round but a tail) is compiled without a
      // bounds check.
      const int full_chunks = K / CHUNK_K;
      for (int c0 = warp; c0 < chunks; c0 += ONE_TILE_ROUND * warps) {
        if (c0 + (ONE_TILE_ROUND - 1) * warps < full_chunks)
          one_tile_round<DT, BS, true>(acc, xa[0], wa, wb, sa, sb, c0, warps, chunks, K, t);
        else
          one_tile_round<DT, BS, false>(acc, xa[0], wa, wb, sa, sb, c0, warps, chunks, K, t);
      }
    } else {
      int4_rounds_in_order<DT, TILES, BS>(acc, xa, wa, wb, sa, sb, warp, warps, chunks, K, t);
    }
  } else {
    for (int c = warp; c < chunks; c += warps) {
      uint4 va[4], vb[4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int kb = c * CHUNK_K + j * 32;
        if (kb < K) {
          va[j] = ld_weights(wa + (long long)(kb + 8 * t) * 2);
          vb[j] = ld_weights(wb + (long long)(kb + 8 * t) * 2);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int kb = c * CHUNK_K + j * 32;
        if (kb >= K) break;
#pragma unroll
        for (int i = 0; i < TILES; i++) {
          const uint4 xv = xa[i] ? ld_act(xa[i] + kb + 8 * t) : make_uint4(0, 0, 0, 0);
          mma16816<DT>(acc[i], va[j].x, vb[j].x, va[j].y, vb[j].y, xv.x, xv.y);
          mma16816<DT>(acc[i], va[j].z, vb[j].z, va[j].w, vb[j].w, xv.z, xv.w);
        }
      }
    }
  }

  // D fragment: (row g, tokens 2t, 2t+1) and (row g+8, the same tokens).
  const int cols = 8 * TILES;
  float* red = smem + warp * TILE_ROWS * cols;
#pragma unroll
  for (int i = 0; i < TILES; i++) {
    red[g * cols + 8 * i + 2 * t] = acc[i][0];
    red[g * cols + 8 * i + 2 * t + 1] = acc[i][1];
    red[(g + 8) * cols + 8 * i + 2 * t] = acc[i][2];
    red[(g + 8) * cols + 8 * i + 2 * t + 1] = acc[i][3];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < TILE_ROWS * cols; idx += blockDim.x) {
    float sum = 0.f;
    for (int v = 0; v < warps; v++) sum += smem[v * TILE_ROWS * cols + idx];
    fin[idx] = sum;
  }
  __syncthreads();
}

// Shared memory of a tile kernel: one [16][8*TILES] block per warp plus the final sums.
template <int TILES> __device__ __forceinline__ float* tile_final(float* smem) {
  return smem + (blockDim.x >> 5) * TILE_ROWS * 8 * TILES;
}

// ---------------------------------------------------------------------------------------------
// Dense projections: y (M, N) = x (M, K) W^T, or with act = 1 the SwiGLU of a gate/up matrix
// whose rows come in groups of 16 (8 gate rows, then the 8 up rows of the same features):
// y (M, N/2), y[m, 8q + r] = silu(gate) * up. M <= 8 * TILES.
// ---------------------------------------------------------------------------------------------

struct LinearArgs {
  const u16* x;
  const unsigned char* w;
  const u16* scales;
  u16* y;
  int M, N, K, act;
};

template <int DT, int FMT, int TILES, int BS> __device__ __forceinline__ void linear_body(const LinearArgs& a) {
  extern __shared__ float smem[];
  __shared__ const u16* xrow[8 * MAX_TILES];
  if (threadIdx.x < 8 * TILES) xrow[threadIdx.x] = (int)threadIdx.x < a.M ? a.x + (long long)threadIdx.x * a.K : 0;
  __syncthreads();
  const int n0 = blockIdx.x * TILE_ROWS;
  const int kp = (a.K + CHUNK_K - 1) / CHUNK_K * CHUNK_K;
  const long long row_bytes = FMT == FMT_INT4 ? kp / 2 : 2LL * a.K;
  const long long s_row = kp / BS;
  float* fin = tile_final<TILES>(smem);
  tile_gemm<DT, FMT, TILES, BS>(xrow, a.w + n0 * row_bytes, row_bytes, FMT == FMT_INT4 ? a.scales + n0 * s_row : 0,
                                s_row, a.K, smem, fin);
  const int cols = 8 * TILES;
  if (a.act == 0) {
    for (int idx = threadIdx.x; idx < TILE_ROWS * cols; idx += blockDim.x) {
      const int r = idx % TILE_ROWS, m = idx / TILE_ROWS;
      if (m < a.M) a.y[(long long)m * a.N + n0 + r] = from_f32<DT>(fin[r * cols + m]);
    }
  } else {
    const int half_n = a.N / 2;
    for (int idx = threadIdx.x; idx < 8 * cols; idx += blockDim.x) {
      const int r = idx % 8, m = idx / 8;
      if (m < a.M)
        a.y[(long long)m * half_n + n0 / 2 + r] = from_f32<DT>(silu_mul(fin[r * cols + m], fin[(r + 8) * cols + m]));
    }
  }
}

#define PIO_LINEAR(NAME, DT, FMT, TILES, BS) \
  extern "C" __global__ void __launch_bounds__(256, TILE_MIN_CTAS(TILES)) NAME(LinearArgs a) { linear_body<DT, FMT, TILES, BS>(a); }

// ---------------------------------------------------------------------------------------------
// One token (M = 1): y = x W^T on the CUDA cores, a warp per two rows. The tile kernels above
// give each CTA 16 rows and split K over its warps; at one token each warp's rounds of loads run
// one after the other, each round's 16 activation loads waiting on L2 before their mma, and the
// warps meet in a shared-memory reduction (Run 9's probe on an H100: about 3.7 us a round of the
// int4 down, plus about 5 us a call). Here a warp takes rows (16q + r, 16q + r + 8), the pair a
// SwiGLU epilogue needs, and its lanes stride over the rows' 16-byte pieces (a warp load reads
// 512 contiguous bytes of each row): as many warps as 8-warp tiles, with each piece's
// activations loaded together and a shuffle reduction. Weights are dequantized exactly (q - 8 in the 16-bit type, converted to f32), each
// 8-element piece is a sum of exact f32 products, and the scale is applied per piece; each
// lane sums its pieces in order and the warp reduces them in a fixed butterfly (deterministic).
// ---------------------------------------------------------------------------------------------

// A register pair of the 16-bit type as two f32 (element 2i in the low half).
template <int DT> __device__ __forceinline__ void pair_to_f32(u32 v, float& lo, float& hi) {
  if (DT == DT_BF16) {
    lo = __uint_as_float(v << 16);
    hi = __uint_as_float(v & 0xffff0000u);
  } else {
    lo = to_f32<DT_F16>((u16)(v & 0xffffu));
    hi = to_f32<DT_F16>((u16)(v >> 16));
  }
}

// The sum of 8 products: weights as 4 register pairs, activations as one 16-byte load.
template <int DT> __device__ __forceinline__ float dot8(const u32 (&w)[4], const uint4& x) {
  const u32 xs[4] = {x.x, x.y, x.z, x.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float w0, w1, x0, x1;
    pair_to_f32<DT>(w[i], w0, w1);
    pair_to_f32<DT>(xs[i], x0, x1);
    s = fmaf(w0, x0, s);
    s = fmaf(w1, x1, s);
  }
  return s;
}

// One round of `gemv_body`: pieces p0, p0 + 32, ... (U of them) of the warp's 2P rows. FULL: all
// of them lie in whole chunks inside K (no checks, so one basic block the compiler can schedule
// as a whole).
template <int DT, int FMT, int BS, int U, int P, bool FULL>
__device__ __forceinline__ void gemv_round(float (&acc)[2 * P], const unsigned char* const (&wr)[2 * P],
                                           const u16* const (&sr)[2 * P], const u16* x, int K, int p0,
                                           int pieces) {
  uint4 q[U][2 * P];
  ChunkScales<BS> cs[U][2 * P];
#pragma unroll
  for (int u = 0; u < U; u++) {
    const int p = p0 + 32 * u;
    if (FULL || p < pieces) {
#pragma unroll
      for (int r = 0; r < 2 * P; r++) {
        q[u][r] = ld_weights(wr[r] + 16LL * p);
        if (FMT == FMT_INT4) cs[u][r] = load_scales<BS>(sr[r], p >> 2);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < U; u++) {
    const int p = p0 + 32 * u;
    if (!FULL && p >= pieces) break;
    if (FMT == FMT_INT4) {
      // Piece p: chunk c, thread slot t; word j holds k = 128c + 32j + 8t + 0..7.
      const int c = p >> 2, t = p & 3;
      uint4 xv[4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int kb = c * CHUNK_K + j * 32;
        xv[j] = FULL || kb < K ? ld_act(x + kb + 8 * t) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int j = 0; j < 4; j++) {
        if (!FULL && c * CHUNK_K + j * 32 >= K) break;  // the padding of the last chunk
#pragma unroll
        for (int r = 0; r < 2 * P; r++) {
          u32 pw[4];
          dequant_word<DT>(word_of(q[u][r], j), pw);
          acc[r] = fmaf(scale_of<DT, BS>(cs[u][r], j), dot8<DT>(pw, xv[j]), acc[r]);
        }
      }
    } else {
      const uint4 xv = ld_act(x + 8 * p);
#pragma unroll
      for (int r = 0; r < 2 * P; r++) {
        const u32 pw[4] = {q[u][r].x, q[u][r].y, q[u][r].z, q[u][r].w};
        acc[r] += dot8<DT>(pw, xv);
      }
    }
  }
}

// U pieces per lane are loaded before any is used (int4: 16 bytes of each of the warp's rows, with
// their scales; each piece's activations are loaded together before its products); a warp takes
// P row pairs: pairs P*w .. P*w + P - 1 of the 8 pairs of a 16-row block (P divides 8). Variants
// of U and P are compiled side by side for the probe to time (`gemv_variants` in gpu.rs).
template <int DT, int FMT, int BS, int U, int P> __device__ __forceinline__ void gemv_body(const LinearArgs& a) {
  const int lane = threadIdx.x & 31;
  const int first_pair = P * (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
  const int kp = (a.K + CHUNK_K - 1) / CHUNK_K * CHUNK_K;
  const long long row_bytes = FMT == FMT_INT4 ? kp / 2 : 2LL * a.K;
  const int pieces = FMT == FMT_INT4 ? kp / 32 : a.K / 8;
  const long long s_row = kp / BS;
  if (16 * (first_pair >> 3) >= a.N) return;  // warp-uniform; no barrier follows
  // Row pair i of this warp: rows (16q + r, 16q + r + 8), r = pair % 8 (all P pairs in one block).
  const unsigned char* wr[2 * P];
  const u16* sr[2 * P];
  float acc[2 * P];
#pragma unroll
  for (int i = 0; i < P; i++) {
    const int pair = first_pair + i;
    const long long na = 16 * (pair >> 3) + (pair & 7);
    wr[2 * i] = a.w + na * row_bytes;
    wr[2 * i + 1] = wr[2 * i] + 8 * row_bytes;
    sr[2 * i] = FMT == FMT_INT4 ? a.scales + na * s_row : 0;
    sr[2 * i + 1] = FMT == FMT_INT4 ? sr[2 * i] + 8 * s_row : 0;
    acc[2 * i] = acc[2 * i + 1] = 0.f;
  }
  // Pieces of whole chunks: every piece of a 16-bit row; int4 rows but a padded last chunk.
  const int full_pieces = FMT == FMT_INT4 ? a.K / CHUNK_K * 4 : pieces;
  for (int p0 = lane; p0 < pieces; p0 += 32 * U) {
    if (p0 + 32 * (U - 1) < full_pieces)
      gemv_round<DT, FMT, BS, U, P, true>(acc, wr, sr, a.x, a.K, p0, pieces);
    else
      gemv_round<DT, FMT, BS, U, P, false>(acc, wr, sr, a.x, a.K, p0, pieces);
  }
#pragma unroll
  for (int r = 0; r < 2 * P; r++) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < P; i++) {
      const int pair = first_pair + i;
      const long long na = 16 * (pair >> 3) + (pair & 7);
      if (a.act) {
        a.y[8 * (pair >> 3) + (pair & 7)] = from_f32<DT>(silu_mul(acc[2 * i], acc[2 * i + 1]));
      } else {
        a.y[na] = from_f32<DT>(acc[2 * i]);
        a.y[na + 8] = from_f32<DT>(acc[2 * i + 1]);
      }
    }
  }
}

#define PIO_GEMV(NAME, DT, FMT, BS, U, P) \
  extern "C" __global__ void __launch_bounds__(256) NAME(LinearArgs a) { gemv_body<DT, FMT, BS, U, P>(a); }

// ---------------------------------------------------------------------------------------------
// int4 dequantization (the prefill path hands the result to cuBLAS; the f32 form is the
// bit-exactness check): out (N, K). It is bandwidth-bound (reads N*Kp/2 bytes and the scales,
// writes N*K*2), so every access is a wide one: thread i loads the 16 bytes at 16*i of the
// packed weight (rows are contiguous, so a warp loads 512 contiguous bytes), which hold one
// thread slot t of one chunk c of row n: the 8 codes of each of the chunk's 4 sub-blocks j,
// k = 128c + 32j + 8t + 0..7. Each such word becomes 8 consecutive outputs: one 16-byte store
// (two for f32). For one j the 4 thread slots of a chunk write 64 contiguous bytes (aligned:
// K is a multiple of 32), so each warp-wide store fills whole 32-byte sectors.
// ---------------------------------------------------------------------------------------------

struct DequantArgs {
  const unsigned char* w;
  const u16* scales;
  void* out;
  int N, K;
};

__device__ __forceinline__ void st_v4(void* p, u32 a, u32 b, u32 c, u32 d) {
  asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// Both halves of a pair times the scale pair, rounded once: fma(p, s, -0) is p * s exactly
// rounded (the -0 addend keeps the sign of a zero product), the same bits as rounding the exact
// f32 product, which is what the f32 path and the CPU reference compute.
template <int DT> __device__ __forceinline__ u32 mul2(u32 p, u32 s) {
  u32 d;
  if (DT == DT_F16) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(p), "r"(s), "r"(0x80008000u));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(p), "r"(s), "r"(0x80008000u));
  }
  return d;
}

template <int DT, int BS, bool F32> __device__ __forceinline__ void dequant_body(const DequantArgs& a) {
  const int kp = (a.K + CHUNK_K - 1) / CHUNK_K * CHUNK_K;
  const long long per_row = kp / 32;  // 16-byte pieces per row
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= per_row * a.N) return;
  const long long n = i / per_row;
  const int piece = (int)(i % per_row), c = piece / 4, t = piece % 4;
  const uint4 q = ld_weights(a.w + 16 * i);  // = row n, byte 64c + 16t
  const ChunkScales<BS> cs = load_scales<BS>(a.scales + n * (kp / BS), c);
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const int k0 = c * CHUNK_K + j * 32 + 8 * t;
    if (k0 >= a.K) break;  // the padding of the last chunk (K is a multiple of 32: all 8 or none)
    u32 p[4];
    dequant_word<DT>(word_of(q, j), p);  // p[e] = elements 2e (low half), 2e + 1 (high half)
    const u16 s = scale_bits<BS>(cs, j);
    if (F32) {
      const float sf = to_f32<DT>(s);
      u32 v[8];
#pragma unroll
      for (int e = 0; e < 8; e++) v[e] = __float_as_uint(to_f32<DT>((u16)(p[e / 2] >> (16 * (e % 2)))) * sf);
      u32* dst = (u32*)a.out + n * a.K + k0;
      st_v4(dst, v[0], v[1], v[2], v[3]);
      st_v4(dst + 4, v[4], v[5], v[6], v[7]);
    } else {
      const u32 ss = (u32)s * 0x10001u;
      st_v4((u16*)a.out + n * a.K + k0, mul2<DT>(p[0], ss), mul2<DT>(p[1], ss), mul2<DT>(p[2], ss),
            mul2<DT>(p[3], ss));
    }
  }
}

#define PIO_DEQUANT(NAME, DT, BS, F32) \
  extern "C" __global__ void __launch_bounds__(256) NAME(DequantArgs a) { dequant_body<DT, BS, F32>(a); }

// SwiGLU over the rows of a gate/up product computed elsewhere (cuBLAS, prefill): gu (M, N)
// with rows grouped as in linear_body, y (M, N/2).
struct SwigluArgs {
  const u16* gu;
  u16* y;
  int M, N;
};

template <int DT> __device__ __forceinline__ void swiglu_rows_body(const SwigluArgs& a) {
  const long long half_n = a.N / 2;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= half_n * a.M) return;
  const long long m = i / half_n;
  const int j = (int)(i % half_n);
  const int row = (j / 8) * 16 + j % 8;
  const u16* src = a.gu + m * a.N;
  a.y[i] = from_f32<DT>(silu_mul(to_f32<DT>(src[row]), to_f32<DT>(src[row + 8])));
}

#define PIO_SWIGLU_ROWS(NAME, DT) \
  extern "C" __global__ void __launch_bounds__(256) NAME(SwigluArgs a) { swiglu_rows_body<DT>(a); }

// ---------------------------------------------------------------------------------------------
// Mixture of experts with int4 experts (QMoE semantics): top-k routing, pairs grouped by
// expert into slots of at most 32 tokens, fc1 + SwiGLU, fc2, then a fixed-order weighted sum.
// ---------------------------------------------------------------------------------------------

struct MoeTopkArgs {
  const u16* probs;           // (T, E) router logits
  const u16* router_weights;  // (T, E) or null: mixing weights at the chosen experts
  int* topk_expert;           // (T, k)
  float* topk_weight;         // (T, k)
  int T, E, k, normalize;
};

// One warp per token: softmax (when no router_weights), k rounds of a warp arg-max (the lower
// expert index wins a tie, as TopK), optional renormalization over the k.
template <int DT> __device__ __forceinline__ void moe_topk_token(const MoeTopkArgs& a, const int tok) {
  const int lane = threadIdx.x & 31;
  const int per_lane = (a.E + 31) / 32;  // <= 8 (E <= 256)
  float v[8];
  const float NEG_INF = __int_as_float(0xff800000);
  float mx = NEG_INF;
#pragma unroll
  for (int i = 0; i < 8; i++) {
    const int e = lane + 32 * i;
    v[i] = (i < per_lane && e < a.E) ? to_f32<DT>(a.probs[(long long)tok * a.E + e]) : NEG_INF;
    mx = fmaxf(mx, v[i]);
  }
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float denom = 0.f;
  if (!a.router_weights) {
#pragma unroll
    for (int i = 0; i < 8; i++) denom += v[i] == NEG_INF ? 0.f : __expf(v[i] - mx);
    for (int o = 16; o > 0; o >>= 1) denom += __shfl_xor_sync(0xffffffffu, denom, o);
  }
  bool taken[8] = {false, false, false, false, false, false, false, false};
  float chosen_w[8];
  int chosen_e[8];
  float total = 0.f;
  for (int r = 0; r < a.k; r++) {
    float best = NEG_INF;
    int best_e = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const int e = lane + 32 * i;
      if (e < a.E && !taken[i] && (v[i] > best || (v[i] == best && e < best_e))) {
        best = v[i];
        best_e = e;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) {
        best = ob;
        best_e = oe;
      }
    }
    if (best_e % 32 == lane) taken[best_e / 32] = true;
    const float wgt = a.router_weights ? to_f32<DT>(a.router_weights[(long long)tok * a.E + best_e])
                                       : __expf(best - mx) / denom;
    if (r < 8) {
      chosen_w[r] = wgt;
      chosen_e[r] = best_e;
    }
    total += wgt;
  }
  if (lane == 0) {
    for (int r = 0; r < a.k && r < 8; r++) {
      a.topk_expert[tok * a.k + r] = chosen_e[r];
      a.topk_weight[tok * a.k + r] = a.normalize ? chosen_w[r] / total : chosen_w[r];
    }
  }
}

template <int DT> __device__ __forceinline__ void moe_topk_body(const MoeTopkArgs& a) {
  const int tok = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (tok < a.T) moe_topk_token<DT>(a, tok);
}

#define PIO_MOE_TOPK(NAME, DT) \
  extern "C" __global__ void __launch_bounds__(256) NAME(MoeTopkArgs a) { moe_topk_body<DT>(a); }

struct MoePlanArgs {
  const int* topk_expert;  // (P) = (T, k) flattened
  int* pair_token;         // (P) pairs sorted by expert
  int* pair_slot_of;       // (P) position of pair p in the sorted order
  int* slot_expert;        // (max_slots)
  int* slot_begin;
  int* slot_count;
  int* num_slots;
  int P, k, E, max_slots;
};

// One CTA: count per expert, scan, slots of <= 32 pairs, scatter. The order of pairs within an
// expert depends on atomics, which changes nothing: every token column is computed on its own.
// The scan is a warp's: each lane takes (E / 32) consecutive experts, so the slots come out in
// expert order as a serial loop would give them, without its chain of E dependent steps (about
// 3 us of a layer's 34 at one token on an H100).
__device__ __forceinline__ void moe_plan_body(const MoePlanArgs& a) {
  __shared__ int count[256];
  __shared__ int cursor[256];
  for (int e = threadIdx.x; e < a.E; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < a.P; p += blockDim.x) atomicAdd(&count[a.topk_expert[p]], 1);
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int per_lane = (a.E + 31) / 32;  // <= 8 (E <= 256)
    const int e0 = lane * per_lane;
    int pairs = 0, slots_needed = 0;
    for (int i = 0; i < per_lane; i++) {
      const int e = e0 + i;
      if (e < a.E) {
        pairs += count[e];
        slots_needed += (count[e] + 31) / 32;
      }
    }
    int pairs_incl = pairs, slots_incl = slots_needed;
    for (int o = 1; o < 32; o <<= 1) {
      const int p = __shfl_up_sync(0xffffffffu, pairs_incl, o);
      const int q = __shfl_up_sync(0xffffffffu, slots_incl, o);
      if (lane >= o) {
        pairs_incl += p;
        slots_incl += q;
      }
    }
    int offset = pairs_incl - pairs, slots = slots_incl - slots_needed;
    for (int i = 0; i < per_lane; i++) {
      const int e = e0 + i;
      if (e >= a.E) break;
      cursor[e] = offset;
      for (int b = 0; b < count[e] && slots < a.max_slots; b += 32) {
        a.slot_expert[slots] = e;
        a.slot_begin[slots] = offset + b;
        a.slot_count[slots] = min(32, count[e] - b);
        slots++;
      }
      offset += count[e];
    }
    if (lane == 31) *a.num_slots = min(slots_incl, a.max_slots);
  }
  __syncthreads();
  for (int p = threadIdx.x; p < a.P; p += blockDim.x) {
    const int pos = atomicAdd(&cursor[a.topk_expert[p]], 1);
    a.pair_token[pos] = p / a.k;
    a.pair_slot_of[p] = pos;
  }
}

extern "C" __global__ void __launch_bounds__(1024) pio_moe_plan(MoePlanArgs a) { moe_plan_body(a); }

// Routing and planning in one CTA for a few tokens (at most 32, a warp each): at batch 1 the
// layer is a handful of short launches, and one fewer gap between them is a few percent of it
// (Qwen3-Coder-30B's layer at one token on an H100, 2026-12-07: 34.1 against 36.5 us).
// The routing's global writes are visible to the whole CTA after the barrier.
struct MoeRouteArgs {
  MoeTopkArgs topk;
  MoePlanArgs plan;
};

template <int DT> __device__ __forceinline__ void moe_route_body(const MoeRouteArgs& a) {
  const int warp = threadIdx.x >> 5;
  if (warp < a.topk.T) moe_topk_token<DT>(a.topk, warp);
  __syncthreads();
  moe_plan_body(a.plan);
}

#define PIO_MOE_ROUTE(NAME, DT) \
  extern "C" __global__ void __launch_bounds__(1024) NAME(MoeRouteArgs a) { moe_route_body<DT>(a); }

struct MoeExpertArgs {
  const u16* x;            // fc1: tokens (T, H); fc2: h (P, I)
  const unsigned char* w;  // (E, rows, Kp/2)
  const u16* scales;       // (E, rows, Kp/BS)
  const int* pair_token;
  const int* slot_expert;
  const int* slot_begin;
  const int* slot_count;
  const int* num_slots;
  void* out;  // fc1: h (P, I) dtype; fc2: per-pair (P, H) f32
  int rows, K;
};

// fc1 (rows = 2I, gate/up grouped by 16 rows, SwiGLU epilogue) or fc2 (rows = H, f32 out) for
// the pairs of slot blockIdx.y.
template <int DT, int TILES, int BS, bool FC1> __device__ __forceinline__ void moe_expert_body(const MoeExpertArgs& a) {
  extern __shared__ float smem[];
  __shared__ const u16* xrow[8 * MAX_TILES];
  const int slot = blockIdx.y;
  if (slot >= *a.num_slots) return;  // CTA-uniform, before any barrier
  const int e = a.slot_expert[slot], begin = a.slot_begin[slot], n = a.slot_count[slot];
  if (threadIdx.x < 8 * TILES) {
    const int i = threadIdx.x;
    const long long row = FC1 ? (long long)(i < n ? a.pair_token[begin + i] : 0) : (long long)(begin + i);
    xrow[i] = i < n ? a.x + row * a.K : 0;
  }
  __syncthreads();
  const int kp = (a.K + CHUNK_K - 1) / CHUNK_K * CHUNK_K;
  const long long row_bytes = kp / 2, s_row = kp / BS;
  const long long r0 = (long long)e * a.rows + blockIdx.x * TILE_ROWS;
  float* fin = tile_final<TILES>(smem);
  tile_gemm<DT, FMT_INT4, TILES, BS>(xrow, a.w + r0 * row_bytes, row_bytes, a.scales + r0 * s_row, s_row, a.K, smem,
                                     fin);
  const int cols = 8 * TILES;
  const int n0 = blockIdx.x * TILE_ROWS;
  if (FC1) {
    const int inter = a.rows / 2;
    for (int idx = threadIdx.x; idx < 8 * cols; idx += blockDim.x) {
      const int r = idx % 8, m = idx / 8;
      if (m < n)
        ((u16*)a.out)[(long long)(begin + m) * inter + n0 / 2 + r] =
            from_f32<DT>(silu_mul(fin[r * cols + m], fin[(r + 8) * cols + m]));
    }
  } else {
    for (int idx = threadIdx.x; idx < TILE_ROWS * cols; idx += blockDim.x) {
      const int r = idx % TILE_ROWS, m = idx / TILE_ROWS;
      if (m < n) ((float*)a.out)[(long long)(begin + m) * a.rows + n0 + r] = fin[r * cols + m];
    }
  }
}

#define PIO_MOE_FC1(NAME, DT, TILES, BS) \
  extern "C" __global__ void __launch_bounds__(256, TILE_MIN_CTAS(TILES)) NAME(MoeExpertArgs a) { moe_expert_body<DT, TILES, BS, true>(a); }
#define PIO_MOE_FC2(NAME, DT, TILES, BS) \
  extern "C" __global__ void __launch_bounds__(256, TILE_MIN_CTAS(TILES)) NAME(MoeExpertArgs a) { moe_expert_body<DT, TILES, BS, false>(a); }

struct MoeCombineArgs {
  const float* pair_out;     // (P, H)
  const float* topk_weight;  // (T, k)
  const int* pair_slot_of;   // (T, k) -> row of pair_out
  u16* y;                    // (T, H)
  int T, k, H;
};

// y[t] = sum over the k experts of t, in routing order, of weight * expert output.
template <int DT> __device__ __forceinline__ void moe_combine_body(const MoeCombineArgs& a) {
  const int tok = blockIdx.y;
  const int h = blockIdx.x * blockDim.x + threadIdx.x;
  if (tok >= a.T || h >= a.H) return;
  float sum = 0.f;
  for (int j = 0; j < a.k; j++) {
    const int p = tok * a.k + j;
    sum += a.topk_weight[p] * a.pair_out[(long long)a.pair_slot_of[p] * a.H + h];
  }
  a.y[(long long)tok * a.H + h] = from_f32<DT>(sum);
}

#define PIO_MOE_COMBINE(NAME, DT) \
  extern "C" __global__ void __launch_bounds__(256) NAME(MoeCombineArgs a) { moe_combine_body<DT>(a); }

// ---------------------------------------------------------------------------------------------
// The device's read bandwidth: every byte of a large buffer read once with 16-byte streaming
// loads, 4 in flight per thread (the GPU check's floor).
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(256) pio_read_bandwidth(const uint4* p, long long n, u32* sink) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  u32 acc = 0;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = ld_weights(p + i), b = ld_weights(p + i + stride), c = ld_weights(p + i + 2 * stride),
                d = ld_weights(p + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    const uint4 a = ld_weights(p + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;  // keeps the loads; practically never taken
}

// ---------------------------------------------------------------------------------------------
// Decode attention (one new token per sequence) on GroupQueryAttention's shared KV buffer: the
// q/k RMSNorm, the rotary, the cache append and the attention of a layer in one launch, where
// ONNX Runtime's GroupQueryAttention runs three kernels (sequence lengths, unpack + rotary +
// append, then its decode attention). A CTA takes one sequence b, one KV head g with its G query
// heads, and one split of the keys; every CTA recomputes the new token's normalized, rotated q
// and k from the projection (G + 1 rows of 128: cheaper than a launch), split 0 writes k and v
// to slot seqlens[b], and the key at that slot is read from shared memory by every split (it may
// not be in the cache yet). Splits write their (max, sum, output) partials; the last CTA of a
// (b, g) to finish (a counter it resets, so CUDA-graph replays work) merges them in split
// order (deterministic). Head size 128.
// ---------------------------------------------------------------------------------------------

#define ATTN_D 128
#define ATTN_WARPS 4
#define ATTN_MAX_SPLITS 32
#define ATTN_KEYS_PER_SPLIT_MIN 128

struct DecodeAttentionArgs {
  const u16* q;               // row b's G * Hkv query heads at q + b * q_row
  const u16* k;               // row b's new key heads at k + b * kv_row
  const u16* v;               // row b's new value heads at v + b * kv_row
  long long q_row, kv_row;    // elements between batch rows
  u16* kcache;                // (B, Hkv, cap, D)
  u16* vcache;
  const int* seqlens;         // (B): the new token's slot (total length - 1)
  const long long* position_ids;  // (B) or null: the rotary position (else the slot)
  const u16* cos;             // (cos_rows, rot_half) or null: no rotary
  const u16* sin;
  const u16* q_norm;          // (D) or null: no q/k norm
  const u16* k_norm;
  u16* out;                   // (B, H * D)
  float* partial;             // (B * Hkv, max_splits, G, 2 + D)
  u32* counters;              // (B * Hkv), zero between launches
  float scale, eps;
  int Hkv, cap, rot_half, cos_rows, window, max_splits;
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float ld_cg_f32(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

// The 8 elements of a 16-byte load as floats.
template <int DT> __device__ __forceinline__ void unpack8(const uint4& w, float (&f)[8]) {
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const u32 x = word_of(w, j);
    f[2 * j] = to_f32<DT>((u16)(x & 0xffffu));
    f[2 * j + 1] = to_f32<DT>((u16)(x >> 16));
  }
}

template <int DT> __device__ __forceinline__ float round_dt(float f) { return to_f32<DT>(from_f32<DT>(f)); }

template <int DT, int G> __device__ __forceinline__ void decode_attention_body(const DecodeAttentionArgs& a) {
  constexpr int D = ATTN_D;
  __shared__ __align__(16) float sq[G][D];  // the new token's query heads, then scaled
  __shared__ __align__(16) float sk[D];
  __shared__ __align__(16) float sv[D];
  __shared__ float wm[ATTN_WARPS][G], wl[ATTN_WARPS][G];
  __shared__ float wo[ATTN_WARPS][G][D];
  __shared__ int is_last;
  __shared__ __align__(16) float sqn[D], skn[D];  // the q/k RMSNorm weights
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bg = blockIdx.y, split = blockIdx.x;
  const int b = bg / a.Hkv, g = bg % a.Hkv;
  const int H = G * a.Hkv;
  // The sequence's length and what does not depend on it load together (a warp stalls only at
  // the first use of a load, so loads issued before that cost one round trip between them): the
  // new token's G query heads, key and value rows (thread tid holds dim tid of each: blockDim is
  // D), its rotary position and the norm weights, into shared memory.
  const int last = a.seqlens[b];
  const long long position_id = a.position_ids ? a.position_ids[b] : 0;
  const u16* qrow = a.q + (long long)b * a.q_row + (long long)g * G * D;
#pragma unroll
  for (int r = 0; r < G; r++) sq[r][tid] = to_f32<DT>(qrow[r * D + tid]);
  sk[tid] = to_f32<DT>(a.k[(long long)b * a.kv_row + (long long)g * D + tid]);
  sv[tid] = to_f32<DT>(a.v[(long long)b * a.kv_row + (long long)g * D + tid]);
  if (a.q_norm) sqn[tid] = to_f32<DT>(a.q_norm[tid]);
  if (a.k_norm) skn[tid] = to_f32<DT>(a.k_norm[tid]);
  if (last < 0 || last >= a.cap) return;  // outside the buffer: the host checks lengths
  const int L = last + 1;
  const int start = (a.window > 0 && L > a.window) ? L - a.window : 0;
  const int nkeys = L - start;
  int per = (nkeys + a.max_splits - 1) / a.max_splits;
  per = max(ATTN_KEYS_PER_SPLIT_MIN, (per + 31) & ~31);
  const int nsplit = (nkeys + per - 1) / per;
  if (split >= nsplit) return;
  const int k0 = start + split * per, k1 = min(L, k0 + per);

  const long long head_base = (long long)bg * a.cap * D;
  // This warp's first block of 32 keys (lane = key): its rows start loading now, under the
  // prologue below (16 loads of 16 bytes a lane in flight), as every later block's do at the
  // top of its iteration, and with them (up to 6 query heads a KV head: beyond, the registers
  // spill) the block's values. The new token's own key and value (slot `last`) come from shared
  // memory.
  constexpr bool VALUES_WITH_KEYS = G <= 6;
  const int first_kb = k0 + 32 * warp;
  uint4 kw[D / 8];
  auto load_keys = [&](int kb) {
    const int j = kb + lane;
    const bool from_cache = j < k1 && j != last;
    const u16* krow = a.kcache + head_base + (long long)j * D;
#pragma unroll
    for (int c = 0; c < D / 8; c++) kw[c] = from_cache ? ld_act(krow + 8 * c) : make_uint4(0, 0, 0, 0);
  };
  // Values: lane = 4 dims; a block's 32 keys' pieces in two halves of 16.
  uint2 vw[2][16];
  auto load_values = [&](int kb, int half) {
#pragma unroll
    for (int u = 0; u < 16; u++) {
      const int jk = kb + 16 * half + u;
      vw[half][u] = (jk < k1 && jk != last)
                        ? *reinterpret_cast<const uint2*>(a.vcache + head_base + (long long)jk * D + 4 * lane)
                        : make_uint2(0, 0);
    }
  };
  if (first_kb < k1) {
    load_keys(first_kb);
    if (VALUES_WITH_KEYS) {
      load_values(first_kb, 0);
      if (first_kb + 16 < k1) load_values(first_kb, 1);
    }
  }

  // The rotary row of the token's position.
  __shared__ float scos[ATTN_D / 2], ssin[ATTN_D / 2];
  long long pos = 0;
  if (a.cos) {
    pos = a.position_ids ? position_id : (long long)last;
    pos = pos < 0 ? 0 : (pos >= a.cos_rows ? a.cos_rows - 1 : pos);
    if (tid < a.rot_half) {
      scos[tid] = to_f32<DT>(a.cos[pos * a.rot_half + tid]);
      ssin[tid] = to_f32<DT>(a.sin[pos * a.rot_half + tid]);
    }
  }
  __syncthreads();
  if (a.q_norm) {  // RMSNorm over each head (rows 0..G-1 the queries, row G the key), rounded as a node's output
    for (int r = warp; r <= G; r += ATTN_WARPS) {
      float* row = r < G ? sq[r] : sk;
      float ss = 0.f;
#pragma unroll
      for (int d = lane; d < D; d += 32) ss += row[d] * row[d];
      const float inv = rsqrtf(warp_sum(ss) / D + a.eps);
      const float* w = r < G ? sqn : skn;
#pragma unroll
      for (int d = lane; d < D; d += 32) row[d] = round_dt<DT>(row[d] * inv * w[d]);
    }
    __syncthreads();
  }
  if (a.cos) {  // non-interleaved rotary over the first 2 * rot_half dims
    for (int i = tid; i < (G + 1) * a.rot_half; i += blockDim.x) {
      const int r = i / a.rot_half, j = i % a.rot_half;
      float* row = r < G ? sq[r] : sk;
      const float c = scos[j], sn = ssin[j];
      const float x1 = row[j], x2 = row[j + a.rot_half];
      row[j] = round_dt<DT>(x1 * c - x2 * sn);
      row[j + a.rot_half] = round_dt<DT>(x2 * c + x1 * sn);
    }
    __syncthreads();
  }
  if (split == 0) {
    a.kcache[head_base + (long long)last * D + tid] = from_f32<DT>(sk[tid]);
    a.vcache[head_base + (long long)last * D + tid] = from_f32<DT>(sv[tid]);
  }

  // Online softmax per head over the warp's blocks.
  const float NEG_INF = __int_as_float(0xff800000);
  float m[G], l[G], o[G][4];
#pragma unroll
  for (int h = 0; h < G; h++) {
    m[h] = NEG_INF;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++) o[h][i] = 0.f;
  }
  for (int kb = first_kb; kb < k1; kb += 32 * ATTN_WARPS) {
    if (kb != first_kb) {
      load_keys(kb);
      if (VALUES_WITH_KEYS) {
        load_values(kb, 0);
        if (kb + 16 < k1) load_values(kb, 1);
      }
    }
    const int j = kb + lane;
    const bool valid = j < k1;
    float s[G];
#pragma unroll
    for (int h = 0; h < G; h++) s[h] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 8; c++) {
      float kv[8];
      if (j == last) {
#pragma unroll
        for (int i = 0; i < 8; i++) kv[i] = sk[8 * c + i];
      } else {
        unpack8<DT>(kw[c], kv);
      }
#pragma unroll
      for (int h = 0; h < G; h++) {
        const float4 qa = *reinterpret_cast<const float4*>(&sq[h][8 * c]);
        const float4 qb = *reinterpret_cast<const float4*>(&sq[h][8 * c + 4]);
        s[h] += qa.x * kv[0] + qa.y * kv[1] + qa.z * kv[2] + qa.w * kv[3] + qb.x * kv[4] + qb.y * kv[5] +
                qb.z * kv[6] + qb.w * kv[7];
      }
    }
    if (!VALUES_WITH_KEYS) load_values(kb, 0);
    float p[G];
#pragma unroll
    for (int h = 0; h < G; h++) {
      const float sc = valid ? s[h] * a.scale : NEG_INF;
      const float mnew = fmaxf(m[h], warp_max(sc));  // lane 0's key is always valid
      const float corr = __expf(m[h] - mnew);
      p[h] = valid ? __expf(sc - mnew) : 0.f;
      l[h] = l[h] * corr + p[h];
      m[h] = mnew;
#pragma unroll
      for (int i = 0; i < 4; i++) o[h][i] *= corr;
    }
    const bool second = kb + 16 < k1;
    if (!VALUES_WITH_KEYS && second) load_values(kb, 1);
#pragma unroll
    for (int half = 0; half < 2; half++) {
      if (half == 1 && !second) break;
#pragma unroll
      for (int u = 0; u < 16; u++) {
        const int jj = 16 * half + u;
        float vv[4];
        if (kb + jj == last) {
#pragma unroll
          for (int i = 0; i < 4; i++) vv[i] = sv[4 * lane + i];
        } else {
          const uint2 w = vw[half][u];
          vv[0] = to_f32<DT>((u16)(w.x & 0xffffu));
          vv[1] = to_f32<DT>((u16)(w.x >> 16));
          vv[2] = to_f32<DT>((u16)(w.y & 0xffffu));
          vv[3] = to_f32<DT>((u16)(w.y >> 16));
        }
        // Keys past k1 have p = 0 (and zero values): no guard needed.
#pragma unroll
        for (int h = 0; h < G; h++) {
          const float pj = __shfl_sync(0xffffffffu, p[h], jj);
#pragma unroll
          for (int i = 0; i < 4; i++) o[h][i] += pj * vv[i];
        }
      }
    }
  }
#pragma unroll
  for (int h = 0; h < G; h++) {
    const float lw = warp_sum(l[h]);
    if (lane == 0) {
      wm[warp][h] = m[h];
      wl[warp][h] = lw;
    }
#pragma unroll
    for (int i = 0; i < 4; i++) wo[warp][h][4 * lane + i] = o[h][i];
  }
  __syncthreads();
  // The CTA's result: warps merged in order; thread tid holds dim tid of every head.
  float* part = a.partial + ((long long)bg * a.max_splits + split) * G * (2 + D);
  for (int h = 0; h < G; h++) {
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; w++) mx = fmaxf(mx, wm[w][h]);
    float ls = 0.f, os = 0.f;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; w++) {
      const float f = wm[w][h] == NEG_INF ? 0.f : __expf(wm[w][h] - mx);
      ls += wl[w][h] * f;
      os += wo[w][h][tid] * f;
    }
    if (nsplit == 1) {
      a.out[(long long)b * H * D + (long long)(g * G + h) * D + tid] = from_f32<DT>(os / ls);
    } else {
      part[h * (2 + D) + 2 + tid] = os;
      if (tid == 0) {
        part[h * (2 + D)] = mx;
        part[h * (2 + D) + 1] = ls;
      }
    }
  }
  if (nsplit == 1) return;
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(&a.counters[bg], 1u) == (u32)(nsplit - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // The merge, in split order, with its loads issued in rounds rather than one by one: every
  // split's (max, sum) of every head into shared memory (the warps' output no longer needed),
  // then each split's weight per head, then the G output rows of each split together.
  const float* base = a.partial + (long long)bg * a.max_splits * G * (2 + D);
  float* ml = &wo[0][0][0];  // [nsplit][G][2]: (max, sum), then (weight, sum)
  for (int i = tid; i < nsplit * G; i += blockDim.x) {
    const float* ps = base + i * (2 + D);  // split i / G, head i % G
    const float mi = ld_cg_f32(ps), li = ld_cg_f32(ps + 1);
    ml[2 * i] = mi;
    ml[2 * i + 1] = li;
  }
  __syncthreads();
  if (tid < G) {
    const int h = tid;
    float mx = NEG_INF;
    for (int sp = 0; sp < nsplit; sp++) mx = fmaxf(mx, ml[2 * (sp * G + h)]);
    float ls = 0.f;
    for (int sp = 0; sp < nsplit; sp++) {
      const float f = __expf(ml[2 * (sp * G + h)] - mx);
      ml[2 * (sp * G + h)] = f;
      ls += ml[2 * (sp * G + h) + 1] * f;
    }
    wl[0][h] = ls;
  }
  __syncthreads();
  float acc[G];
#pragma unroll
  for (int h = 0; h < G; h++) acc[h] = 0.f;
  for (int sp = 0; sp < nsplit; sp++) {
    const float* ps = base + (long long)sp * G * (2 + D) + 2 + tid;
    float pv[G];
#pragma unroll
    for (int h = 0; h < G; h++) pv[h] = ld_cg_f32(ps + h * (2 + D));
#pragma unroll
    for (int h = 0; h < G; h++) acc[h] += pv[h] * ml[2 * (sp * G + h)];
  }
#pragma unroll
  for (int h = 0; h < G; h++) a.out[(long long)b * H * D + (long long)(g * G + h) * D + tid] = from_f32<DT>(acc[h] / wl[0][h]);
  if (tid == 0) a.counters[bg] = 0;
}

#define PIO_DECODE_ATTENTION(NAME, DT, G) \
  extern "C" __global__ void __launch_bounds__(128) NAME(DecodeAttentionArgs a) { decode_attention_body<DT, G>(a); }
