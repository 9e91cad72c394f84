//! Launching the kernels on raw device pointers: what the CUDA operators do inside ONNX Runtime,
//! and what the GPU check calls directly. Every launch is asynchronous on the given stream, with
//! no allocation or synchronization (CUDA-graph safe); scratch comes from the caller.

use std::sync::Arc;

use crate::driver::{launch, launch_raw, Device, Function, LaunchConfig, Module, Stream};
use crate::error::{KernelError, Result};
use crate::source::{self, ActDtype, Family, KernelSet, CHUNK_K, MAX_TILES, TILE_ROWS};

/// How a projection's weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// The int4 layout of [`crate::layout`].
    Int4 { block_size: usize },
    /// (N, K) in the activation dtype.
    Dense,
}

/// Tokens one launch of the tile kernels takes.
pub const MAX_TOKENS: usize = 8 * MAX_TILES;

/// int4 projections run on the tile kernels up to this many tokens per call, cuBLAS above
/// (after dequantizing the weight). Measured on an H100 (2026-12-06, synthetic Qwen3-4B, `pio
/// bench`, CUDA graphs): the tiles give 303.6 / 2,305 / 6,279 tok/s at batch 1 / 8 / 32 against
/// MatMulNBits' 287.8 / 1,469 / 3,776, since they read 4-bit weights where a GEMM would read a
/// dequantized 16-bit copy: every launch size (32 tokens) is worth it.
pub const INT4_MAX_TILE_TOKENS: usize = MAX_TOKENS;

/// 16-bit projections run on the tile kernels up to this many tokens per call, cuBLAS above. In
/// the same run the bf16 tiles gave 218.4 / 1,605 / 3,858 tok/s at batch 1 / 8 / 32 against
/// cuBLAS' (stock MatMul) 215.3 / 1,716 / 6,199: +1.4% at one token, -6% at 8 and -38% at 32. Both
/// read the same 16-bit weight once, so the tiles have no bytes to save, and cuBLAS' tensor-core
/// tiles keep up better as tokens grow. 2 to 7 tokens were not measured, so they go to cuBLAS.
pub const DENSE_MAX_TILE_TOKENS: usize = 1;

impl WeightFormat {
    /// The most tokens per call the tile kernels serve for this format (cuBLAS above, when ONNX
    /// Runtime's is reachable).
    pub fn max_tile_tokens(self) -> usize {
        match self {
            WeightFormat::Int4 { .. } => INT4_MAX_TILE_TOKENS,
            WeightFormat::Dense => DENSE_MAX_TILE_TOKENS,
        }
    }
}

/// The kernel the operators run a one-token projection on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OneTokenKernel {
    /// The tile kernels (tensor cores, 16 rows a CTA, warps splitting K): int4's default.
    Tiles,
    /// The one-token GEMV (`gemv_body` in the CUDA source: CUDA cores, a warp per row pair):
    /// 16-bit weights' default.
    Gemv(GemvVariant),
}

/// A compiled variant of the one-token GEMV; the same name means the same shape of work for int4
/// and 16-bit weights ([`gemv_variants`] gives each format's parameters). All give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvVariant {
    /// 4 int4 pieces (8 16-bit ones) in flight per lane, one row pair a warp.
    Base,
    /// Twice the pieces in flight per lane.
    Wide,
    /// Two row pairs a warp.
    Pairs,
}

impl GemvVariant {
    pub const ALL: [GemvVariant; 3] = [GemvVariant::Base, GemvVariant::Wide, GemvVariant::Pairs];

    /// `gemv`, `gemv:wide`, `gemv:pairs`: the value of [`ONE_TOKEN_KERNEL_VAR`] that picks it.
    pub fn label(self) -> &'static str {
        match self {
            GemvVariant::Base => "gemv",
            GemvVariant::Wide => "gemv:wide",
            GemvVariant::Pairs => "gemv:pairs",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The variable that picks [`OneTokenKernel`] for every format: `tiles`, `gemv`, `gemv:wide`,
/// `gemv:pairs`, or `auto` (the same as unset: [`OneTokenKernel::default_for`]).
pub const ONE_TOKEN_KERNEL_VAR: &str = "PIO_ONE_TOKEN_KERNEL";

impl OneTokenKernel {
    /// What a format's one-token projections run on unless [`ONE_TOKEN_KERNEL_VAR`] says
    /// otherwise, from Run 10 (H100, 2026-12-07, `pio bench` of one synthetic Qwen3-4B at batch 1,
    /// CUDA graphs, one call): with 16-bit weights the GEMV gave 231.4 tok/s against the tiles'
    /// 224.3 (and 219.4 for the tile-only build of a0dfbce in the same call), and the probe timed
    /// it faster on 4 of Qwen3-4B's 5 projections (all but qkv); with int4 weights it gave 304.1
    /// against 311.8 and 312.9, though the probe timed it faster on o, gate_up and down in
    /// isolation (slower on qkv by 1.5 us and on an int4 lm_head by 27 us). The variants `wide` and
    /// `pairs` were slower than `gemv` on most shapes of that probe.
    pub fn default_for(format: WeightFormat) -> Self {
        match format {
            WeightFormat::Int4 { .. } => OneTokenKernel::Tiles,
            WeightFormat::Dense => OneTokenKernel::Gemv(GemvVariant::Base),
        }
    }

    /// From [`ONE_TOKEN_KERNEL_VAR`], for kernels of `format`.
    pub fn from_env(format: WeightFormat) -> Result<Self> {
        Self::parse(std::env::var(ONE_TOKEN_KERNEL_VAR).ok().as_deref(), format)
    }

    fn parse(value: Option<&str>, format: WeightFormat) -> Result<Self> {
        match value.map(str::trim) {
            None | Some("") | Some("auto") => Ok(Self::default_for(format)),
            Some("tiles") => Ok(OneTokenKernel::Tiles),
            Some(v) => {
                GemvVariant::ALL.into_iter().find(|g| g.label() == v).map(OneTokenKernel::Gemv).ok_or_else(|| {
                    KernelError::bad_input(
                        ONE_TOKEN_KERNEL_VAR,
                        format!("{v:?} is not a one-token kernel (auto, tiles, gemv, gemv:wide or gemv:pairs)"),
                    )
                })
            }
        }
    }
}

/// Each [`GemvVariant`]'s (pieces in flight per lane, row pairs per warp) for a weight format, in
/// the order of [`GemvVariant::ALL`].
pub fn gemv_variants(format: WeightFormat) -> &'static [(usize, usize); 3] {
    match format {
        WeightFormat::Int4 { .. } => &source::GEMV_INT4_VARIANTS,
        WeightFormat::Dense => &source::GEMV_DENSE_VARIANTS,
    }
}

/// Token counts of one tile (the int4 kernels' decode shape: 2 chunks a round, activations
/// loaded before the mma chain), for which the warps follow the CTA count.
const FEW_TOKENS: usize = 8;
/// CTAs (16 rows of N each) up to which an int4 projection of at most [`FEW_TOKENS`] tokens takes
/// 8 warps per CTA, and then 4; more take 2. From the probe of kernel builds on an H100
/// (2026-12-07, one token, µs): Qwen3-4B's o and down (160 CTAs) 6.3 and 10.5 at 8 warps against
/// 7.1 and 14.0 at 4; qkv (384) 6.9 at 4 against 8.6 at 8; gate/up (1,216) 13.4 at 2 against
/// 14.8 at 4 and 20.6 at 8; the lm_head (9,496) 80 at 2 against 86 at 4.
const FEW_CTAS_8_WARPS: usize = 256;
const FEW_CTAS_4_WARPS: usize = 640;

/// Warps per CTA (they split K) for `m` tokens of an (N, K) projection. An int4 projection of a
/// few tokens: by its CTA count (above). Otherwise enough chunks per warp to keep 4 loads in
/// flight (int4) or one 4-KB chunk (dense) without leaving warps idle; at most 8 (256 threads).
pub fn default_warps(format: WeightFormat, n: usize, k: usize, m: usize) -> u32 {
    let chunks = k.div_ceil(CHUNK_K);
    let per_warp = match format {
        WeightFormat::Int4 { .. } if m <= FEW_TOKENS => {
            let ctas = n.div_ceil(TILE_ROWS);
            return if ctas <= FEW_CTAS_8_WARPS {
                8
            } else if ctas <= FEW_CTAS_4_WARPS {
                4
            } else {
                2
            };
        }
        WeightFormat::Int4 { .. } => 4,
        WeightFormat::Dense => 2,
    };
    chunks.div_ceil(per_warp).clamp(1, 8) as u32
}

/// Shared memory of a tile kernel: a [16][8 * tiles] f32 block per warp plus the final sums.
fn tile_shared_bytes(warps: u32, tiles: usize) -> u32 {
    ((warps as usize + 1) * TILE_ROWS * 8 * tiles * 4) as u32
}

#[repr(C)]
struct LinearArgs {
    x: u64,
    w: u64,
    scales: u64,
    y: u64,
    m: i32,
    n: i32,
    k: i32,
    act: i32,
}

#[repr(C)]
struct DequantArgs {
    w: u64,
    scales: u64,
    out: u64,
    n: i32,
    k: i32,
}

#[repr(C)]
struct SwigluArgs {
    gu: u64,
    y: u64,
    m: i32,
    n: i32,
}

fn dim(v: usize, what: &'static str) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::bad_input("kernel launch", format!("{what} = {v} is too large")))
}

/// The projection kernels of one weight format and dtype.
pub struct LinearKernels {
    pub format: WeightFormat,
    pub dtype: ActDtype,
    _module: Arc<Module>,
    tiles: [Function; MAX_TILES],
    /// One per [`GemvVariant`], in the order of [`GemvVariant::ALL`].
    gemv: Vec<Function>,
    one_token: OneTokenKernel,
    dequant: Option<Function>,
    swiglu_rows: Function,
}

impl LinearKernels {
    pub fn new(device: &Device, format: WeightFormat, dtype: ActDtype) -> Result<Self> {
        let family = match format {
            WeightFormat::Int4 { block_size } => Family::LinearInt4 { block_size },
            WeightFormat::Dense => Family::LinearDense,
        };
        let module = device.module(KernelSet { family, dtype })?;
        let name = |t: usize| match format {
            WeightFormat::Int4 { block_size } => source::linear_int4_name(dtype, t, block_size),
            WeightFormat::Dense => source::linear_dense_name(dtype, t),
        };
        let tiles = [
            module.function(&name(1))?,
            module.function(&name(2))?,
            module.function(&name(3))?,
            module.function(&name(4))?,
        ];
        let gemv = gemv_variants(format)
            .iter()
            .map(|&v| {
                let name = match format {
                    WeightFormat::Int4 { block_size } => source::gemv_int4_name(dtype, block_size, v),
                    WeightFormat::Dense => source::gemv_dense_name(dtype, v),
                };
                module.function(&name)
            })
            .collect::<Result<Vec<_>>>()?;
        let dequant = match format {
            WeightFormat::Int4 { block_size } => {
                Some(module.function(&source::dequant_name(dtype, block_size, false))?)
            }
            WeightFormat::Dense => None,
        };
        let swiglu_rows = module.function(&source::swiglu_rows_name(dtype))?;
        let one_token = OneTokenKernel::from_env(format)?;
        Ok(LinearKernels { format, dtype, _module: module, tiles, gemv, one_token, dequant, swiglu_rows })
    }

    /// y = x W^T (or its SwiGLU) for `m` <= 32 tokens by the kernel the operators use: the tile
    /// kernels with [`default_warps`], or at one token the [`OneTokenKernel`] chosen when these
    /// kernels were loaded.
    ///
    /// # Safety
    /// As [`Self::launch_tiles`].
    pub unsafe fn launch(
        &self,
        stream: Stream,
        ptrs: (u64, u64, u64, u64),
        (m, n, k): (usize, usize, usize),
        swiglu: bool,
    ) -> Result<()> {
        if let (1, OneTokenKernel::Gemv(variant)) = (m, self.one_token) {
            self.launch_gemv(stream, ptrs, (n, k), swiglu, variant)
        } else {
            self.launch_tiles(stream, ptrs, (m, n, k), swiglu, default_warps(self.format, n, k, m))
        }
    }

    /// The kernel [`Self::launch`] runs a one-token call on.
    pub fn one_token_kernel(&self) -> OneTokenKernel {
        self.one_token
    }

    /// y = x W^T (or its SwiGLU) for one token on the CUDA cores: a warp per row pair (16q + r,
    /// 16q + r + 8), or per two with [`GemvVariant::Pairs`], 8 warps a CTA.
    ///
    /// # Safety
    /// As [`Self::launch_tiles`].
    pub unsafe fn launch_gemv(
        &self,
        stream: Stream,
        (x, w, scales, y): (u64, u64, u64, u64),
        (n, k): (usize, usize),
        swiglu: bool,
        variant: GemvVariant,
    ) -> Result<()> {
        let f = self.gemv[variant.index()];
        let pairs = gemv_variants(self.format)[variant.index()].1;
        let args = LinearArgs { x, w, scales, y, m: 1, n: dim(n, "N")?, k: dim(k, "K")?, act: swiglu as i32 };
        // 8 warps of `pairs` row pairs each: 16 * pairs rows a CTA (the last may run past N; its
        // warps beyond N return).
        let grid = n.div_ceil(TILE_ROWS * pairs) as u32;
        let config = LaunchConfig { grid: (grid, 1), block: 256, shared_bytes: 0 };
        launch(f, config, stream, &args)
    }

    /// y = x W^T (or its SwiGLU with `swiglu`) for `m` <= 32 tokens: one CTA per 16 rows of W.
    ///
    /// # Safety
    /// Device pointers of the sizes the shapes imply, live until the launch has run.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch_tiles(
        &self,
        stream: Stream,
        (x, w, scales, y): (u64, u64, u64, u64),
        (m, n, k): (usize, usize, usize),
        swiglu: bool,
        warps: u32,
    ) -> Result<()> {
        if m == 0 {
            return Ok(());
        }
        if m > MAX_TOKENS {
            return Err(KernelError::bad_input(
                "linear",
                format!("{m} tokens in one tile launch (at most {MAX_TOKENS})"),
            ));
        }
        let tiles = m.div_ceil(8);
        let args =
            LinearArgs { x, w, scales, y, m: dim(m, "M")?, n: dim(n, "N")?, k: dim(k, "K")?, act: swiglu as i32 };
        let config = LaunchConfig {
            grid: ((n / TILE_ROWS) as u32, 1),
            block: 32 * warps,
            shared_bytes: tile_shared_bytes(warps, tiles),
        };
        launch(self.tiles[tiles - 1], config, stream, &args)
    }

    /// The int4 weight dequantized into `out` (N, K) of the dtype (the cuBLAS path): one thread
    /// per 16 packed bytes, each of its 4 words written as one 16-byte store (`out` 16-byte aligned).
    ///
    /// # Safety
    /// As [`Self::launch_tiles`].
    pub unsafe fn launch_dequant(
        &self,
        stream: Stream,
        (w, scales, out): (u64, u64, u64),
        (n, k): (usize, usize),
    ) -> Result<()> {
        let f = self.dequant.ok_or_else(|| KernelError::bad_input("linear", "dense weights have no dequantization"))?;
        let pieces = n * k.div_ceil(CHUNK_K) * 4;
        let args = DequantArgs { w, scales, out, n: dim(n, "N")?, k: dim(k, "K")? };
        let config = LaunchConfig { grid: (pieces.div_ceil(256) as u32, 1), block: 256, shared_bytes: 0 };
        launch(f, config, stream, &args)
    }

    /// y (M, N/2) = the SwiGLU of a grouped gate/up product gu (M, N).
    ///
    /// # Safety
    /// As [`Self::launch_tiles`].
    pub unsafe fn launch_swiglu_rows(&self, stream: Stream, (gu, y): (u64, u64), (m, n): (usize, usize)) -> Result<()> {
        let args = SwigluArgs { gu, y, m: dim(m, "M")?, n: dim(n, "N")? };
        let total = m * n / 2;
        let config = LaunchConfig { grid: (total.div_ceil(256) as u32, 1), block: 256, shared_bytes: 0 };
        launch(self.swiglu_rows, config, stream, &args)
    }
}

/// Device scratch of one MoE launch group, carved from one allocation.
#[derive(Clone, Copy, Debug)]
pub struct MoeScratch {
    pub topk_expert: u64,
    pub topk_weight: u64,
    pub pair_token: u64,
    pub pair_slot_of: u64,
    pub slot_expert: u64,
    pub slot_begin: u64,
    pub slot_count: u64,
    pub num_slots: u64,
    /// (P, I) intermediate in the dtype.
    pub hidden: u64,
    /// (P, H) per-pair expert outputs in f32.
    pub pair_out: u64,
}

/// Shape of an MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeShape {
    pub experts: usize,
    pub k: usize,
    pub hidden: usize,
    pub inter: usize,
    pub block_size: usize,
}

impl MoeShape {
    /// Slots (groups of <= 32 pairs of one expert) `tokens` can need.
    pub fn max_slots(&self, tokens: usize) -> usize {
        let pairs = tokens * self.k;
        pairs.div_ceil(32) + self.experts.min(pairs)
    }

    /// Bytes of scratch for `tokens`, and where each part starts (offsets from the base).
    pub fn scratch_layout(&self, tokens: usize, dtype_bytes: usize) -> (usize, [usize; 10]) {
        let pairs = tokens * self.k;
        let slots = self.max_slots(tokens);
        let sizes = [
            pairs * 4,
            pairs * 4,
            pairs * 4,
            pairs * 4,
            slots * 4,
            slots * 4,
            slots * 4,
            4,
            pairs * self.inter * dtype_bytes,
            pairs * self.hidden * 4,
        ];
        let mut offsets = [0usize; 10];
        let mut at = 0;
        for (o, s) in offsets.iter_mut().zip(sizes) {
            *o = at;
            at += s.div_ceil(256) * 256;
        }
        (at, offsets)
    }

    pub fn scratch_at(&self, base: u64, tokens: usize, dtype_bytes: usize) -> MoeScratch {
        let (_, o) = self.scratch_layout(tokens, dtype_bytes);
        let p = |i: usize| base + o[i] as u64;
        MoeScratch {
            topk_expert: p(0),
            topk_weight: p(1),
            pair_token: p(2),
            pair_slot_of: p(3),
            slot_expert: p(4),
            slot_begin: p(5),
            slot_count: p(6),
            num_slots: p(7),
            hidden: p(8),
            pair_out: p(9),
        }
    }
}

#[repr(C)]
struct MoeTopkArgs {
    probs: u64,
    router_weights: u64,
    topk_expert: u64,
    topk_weight: u64,
    t: i32,
    e: i32,
    k: i32,
    normalize: i32,
}

#[repr(C)]
struct MoePlanArgs {
    topk_expert: u64,
    pair_token: u64,
    pair_slot_of: u64,
    slot_expert: u64,
    slot_begin: u64,
    slot_count: u64,
    num_slots: u64,
    p: i32,
    k: i32,
    e: i32,
    max_slots: i32,
}

#[repr(C)]
struct MoeRouteArgs {
    topk: MoeTopkArgs,
    plan: MoePlanArgs,
}

#[repr(C)]
struct MoeExpertArgs {
    x: u64,
    w: u64,
    scales: u64,
    pair_token: u64,
    slot_expert: u64,
    slot_begin: u64,
    slot_count: u64,
    num_slots: u64,
    out: u64,
    rows: i32,
    k: i32,
}

#[repr(C)]
struct MoeCombineArgs {
    pair_out: u64,
    topk_weight: u64,
    pair_slot_of: u64,
    y: u64,
    t: i32,
    k: i32,
    h: i32,
}

/// Largest expert count and top-k the routing kernel takes.
pub const MOE_MAX_EXPERTS: usize = 256;
pub const MOE_MAX_TOP_K: usize = 8;
/// Tokens per launch group (bounds the scratch: per-pair outputs are f32).
pub const MOE_TOKENS_PER_GROUP: usize = 256;
/// Tokens up to which routing and planning run as one launch (a warp a token in one CTA).
pub const MOE_ROUTE_ONE_CTA_TOKENS: usize = 32;

/// The MoE kernels of one dtype and block size.
pub struct MoeKernels {
    pub dtype: ActDtype,
    pub block_size: usize,
    _module: Arc<Module>,
    topk: Function,
    plan: Function,
    route: Function,
    fc1: [Function; MAX_TILES],
    fc2: [Function; MAX_TILES],
    combine: Function,
}

/// Device pointers of one MoE call.
#[derive(Clone, Copy, Debug)]
pub struct MoeTensors {
    pub x: u64,
    pub probs: u64,
    /// 0 when absent.
    pub router_weights: u64,
    pub fc1: u64,
    pub fc1_scales: u64,
    pub fc2: u64,
    pub fc2_scales: u64,
    pub y: u64,
}

impl MoeShape {
    /// Refuses what the routing kernel cannot take.
    pub fn validate(&self) -> Result<()> {
        if self.experts > MOE_MAX_EXPERTS || self.k == 0 || self.k > MOE_MAX_TOP_K || self.k > self.experts {
            return Err(KernelError::bad_input(
                "MoEInt4",
                format!(
                    "{} experts, top-{}: the kernels take up to {MOE_MAX_EXPERTS} experts and top-{MOE_MAX_TOP_K}",
                    self.experts, self.k
                ),
            ));
        }
        if let Some(why) = crate::layout::swiglu_unsupported_reason(self.inter, self.hidden) {
            return Err(KernelError::bad_input("MoEInt4", format!("fc1: {why}")));
        }
        if let Some(why) = crate::layout::unsupported_reason(self.hidden, self.inter) {
            return Err(KernelError::bad_input("MoEInt4", format!("fc2: {why}")));
        }
        Ok(())
    }
}

impl MoeKernels {
    pub fn new(device: &Device, dtype: ActDtype, block_size: usize) -> Result<Self> {
        let bs = block_size;
        let module = device.module(KernelSet { family: Family::Moe { block_size: bs }, dtype })?;
        let fc = |fc1: bool| -> Result<[Function; MAX_TILES]> {
            Ok([
                module.function(&source::moe_fc_name(fc1, dtype, 1, bs))?,
                module.function(&source::moe_fc_name(fc1, dtype, 2, bs))?,
                module.function(&source::moe_fc_name(fc1, dtype, 3, bs))?,
                module.function(&source::moe_fc_name(fc1, dtype, 4, bs))?,
            ])
        };
        Ok(MoeKernels {
            dtype,
            block_size,
            topk: module.function(&source::moe_topk_name(dtype))?,
            plan: module.function(source::MOE_PLAN)?,
            route: module.function(&source::moe_route_name(dtype))?,
            fc1: fc(true)?,
            fc2: fc(false)?,
            combine: module.function(&source::moe_combine_name(dtype))?,
            _module: module,
        })
    }

    /// The routed experts of `tokens` (<= [`MOE_TOKENS_PER_GROUP`]) rows: five launches, four up to
    /// [`MOE_ROUTE_ONE_CTA_TOKENS`] tokens (routing and planning in one).
    /// `t` holds this group's rows (x, probs, router weights and y already offset).
    ///
    /// # Safety
    /// Device pointers of the sizes the shapes imply; `scratch` laid out by
    /// [`MoeShape::scratch_at`] for `tokens`; all live until the launches have run.
    pub unsafe fn launch(
        &self,
        stream: Stream,
        s: &MoeShape,
        t: &MoeTensors,
        scratch: &MoeScratch,
        tokens: usize,
        normalize: bool,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        if s.block_size != self.block_size {
            return Err(KernelError::bad_input("MoEInt4", "block size differs from the compiled kernels'"));
        }
        s.validate()?;
        let pairs = tokens * s.k;
        let max_slots = s.max_slots(tokens);
        let topk = MoeTopkArgs {
            probs: t.probs,
            router_weights: t.router_weights,
            topk_expert: scratch.topk_expert,
            topk_weight: scratch.topk_weight,
            t: dim(tokens, "tokens")?,
            e: dim(s.experts, "experts")?,
            k: dim(s.k, "k")?,
            normalize: normalize as i32,
        };
        let plan = MoePlanArgs {
            topk_expert: scratch.topk_expert,
            pair_token: scratch.pair_token,
            pair_slot_of: scratch.pair_slot_of,
            slot_expert: scratch.slot_expert,
            slot_begin: scratch.slot_begin,
            slot_count: scratch.slot_count,
            num_slots: scratch.num_slots,
            p: dim(pairs, "pairs")?,
            k: dim(s.k, "k")?,
            e: dim(s.experts, "experts")?,
            max_slots: dim(max_slots, "slots")?,
        };
        let one_cta = LaunchConfig { grid: (1, 1), block: 1024, shared_bytes: 0 };
        if tokens <= MOE_ROUTE_ONE_CTA_TOKENS {
            launch(self.route, one_cta, stream, &MoeRouteArgs { topk, plan })?;
        } else {
            let per_warp = LaunchConfig { grid: (tokens.div_ceil(8) as u32, 1), block: 256, shared_bytes: 0 };
            launch(self.topk, per_warp, stream, &topk)?;
            launch(self.plan, one_cta, stream, &plan)?;
        }
        // A slot holds at most one pair per token, so at most min(tokens, 32) pairs.
        let tiles = tokens.min(MAX_TOKENS).div_ceil(8);
        let fc = |fc1: bool, x: u64, w: u64, scales: u64, out: u64, rows: usize, k: usize| -> Result<()> {
            let args = MoeExpertArgs {
                x,
                w,
                scales,
                pair_token: scratch.pair_token,
                slot_expert: scratch.slot_expert,
                slot_begin: scratch.slot_begin,
                slot_count: scratch.slot_count,
                num_slots: scratch.num_slots,
                out,
                rows: dim(rows, "rows")?,
                k: dim(k, "K")?,
            };
            // Every expert slot is a CTA column of its own (max_slots of them), so the few-CTA
            // rule of a lone projection does not apply: counted as full tiles. (Counting the CTAs
            // of all columns gave Qwen3-Coder-30B's fc1 and fc2 8 warps at one token, and the
            // layer took 36.7 against 34.1 us on an H100, 2026-12-07.)
            let warps = default_warps(WeightFormat::Int4 { block_size: s.block_size }, rows, k, MAX_TOKENS);
            let config = LaunchConfig {
                grid: ((rows / TILE_ROWS) as u32, max_slots as u32),
                block: 32 * warps,
                shared_bytes: tile_shared_bytes(warps, tiles),
            };
            let f = if fc1 { self.fc1[tiles - 1] } else { self.fc2[tiles - 1] };
            launch(f, config, stream, &args)
        };
        fc(true, t.x, t.fc1, t.fc1_scales, scratch.hidden, 2 * s.inter, s.hidden)?;
        fc(false, scratch.hidden, t.fc2, t.fc2_scales, scratch.pair_out, s.hidden, s.inter)?;
        let combine = MoeCombineArgs {
            pair_out: scratch.pair_out,
            topk_weight: scratch.topk_weight,
            pair_slot_of: scratch.pair_slot_of,
            y: t.y,
            t: dim(tokens, "tokens")?,
            k: dim(s.k, "k")?,
            h: dim(s.hidden, "hidden")?,
        };
        let grid = (s.hidden.div_ceil(256) as u32, tokens as u32);
        launch(self.combine, LaunchConfig { grid, block: 256, shared_bytes: 0 }, stream, &combine)
    }
}

/// The GPU check's probes: exact f32 dequantization and the read-bandwidth kernel.
pub struct ProbeKernels {
    _module: Arc<Module>,
    dequant_f32: Function,
    read_bandwidth: Function,
    sm_count: i32,
}

impl ProbeKernels {
    pub fn new(device: &Device, dtype: ActDtype, block_size: usize) -> Result<Self> {
        let module = device.module(KernelSet { family: Family::Probe { block_size }, dtype })?;
        Ok(ProbeKernels {
            dequant_f32: module.function(&source::dequant_name(dtype, block_size, true))?,
            read_bandwidth: module.function(source::READ_BANDWIDTH)?,
            sm_count: device.sm_count,
            _module: module,
        })
    }

    /// (q - 8) * scale as f32 into `out` (N, K).
    ///
    /// # Safety
    /// As [`LinearKernels::launch_tiles`].
    pub unsafe fn launch_dequant_f32(
        &self,
        stream: Stream,
        (w, scales, out): (u64, u64, u64),
        (n, k): (usize, usize),
    ) -> Result<()> {
        let pieces = n * k.div_ceil(CHUNK_K) * 4;
        let args = DequantArgs { w, scales, out, n: dim(n, "N")?, k: dim(k, "K")? };
        launch(
            self.dequant_f32,
            LaunchConfig { grid: (pieces.div_ceil(256) as u32, 1), block: 256, shared_bytes: 0 },
            stream,
            &args,
        )
    }

    /// Reads `bytes` (a multiple of 16) at `buf` once.
    ///
    /// # Safety
    /// `buf` must hold `bytes`; `sink` 4 bytes.
    pub unsafe fn launch_read(&self, stream: Stream, buf: u64, bytes: usize, sink: u64) -> Result<()> {
        let (mut p, mut n, mut s) = (buf, (bytes / 16) as i64, sink);
        let mut params = [(&mut p as *mut u64).cast(), (&mut n as *mut i64).cast(), (&mut s as *mut u64).cast()];
        let grid = (self.sm_count.max(1) as u32) * 8;
        launch_raw(
            self.read_bandwidth,
            LaunchConfig { grid: (grid, 1), block: 256, shared_bytes: 0 },
            stream,
            &mut params,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_token_kernel_is_the_formats_default_unless_one_is_named() {
        let (int4, dense) = (WeightFormat::Int4 { block_size: 32 }, WeightFormat::Dense);
        for auto in [None, Some(""), Some("auto")] {
            assert_eq!(OneTokenKernel::parse(auto, int4).unwrap(), OneTokenKernel::Tiles);
            assert_eq!(OneTokenKernel::parse(auto, dense).unwrap(), OneTokenKernel::Gemv(GemvVariant::Base));
        }
        for format in [int4, dense] {
            assert_eq!(OneTokenKernel::parse(Some("tiles"), format).unwrap(), OneTokenKernel::Tiles);
            assert_eq!(OneTokenKernel::parse(Some(" gemv "), format).unwrap(), OneTokenKernel::Gemv(GemvVariant::Base));
            for v in GemvVariant::ALL {
                assert_eq!(OneTokenKernel::parse(Some(v.label()), format).unwrap(), OneTokenKernel::Gemv(v));
            }
            for bad in ["fast", "gemv:", "gemv:u8p1", "gemv:Wide", "Auto"] {
                let e = OneTokenKernel::parse(Some(bad), format).unwrap_err().to_string();
                assert!(e.contains(ONE_TOKEN_KERNEL_VAR) && e.contains(&format!("{bad:?}")), "{e}");
            }
        }
        // Each name means the same shape of work in both formats, and every variant's pairs divide 8.
        for format in [int4, dense] {
            let [(base_u, base_p), (wide_u, wide_p), (pairs_u, pairs_p)] = *gemv_variants(format);
            assert_eq!((wide_u, wide_p), (2 * base_u, base_p), "{format:?}");
            assert_eq!((pairs_u, pairs_p), (base_u, 2 * base_p), "{format:?}");
            assert!(gemv_variants(format).iter().all(|&(u, p)| u >= 1 && 8 % p == 0), "{format:?}");
        }
    }

    #[test]
    fn warps_follow_the_probe() {
        let int4 = WeightFormat::Int4 { block_size: 32 };
        // Qwen3-4B at one and eight tokens: o (160 CTAs) 8 warps, qkv (384) 4, gate/up (1,216)
        // and the lm_head (9,496) 2.
        assert_eq!(default_warps(int4, 2560, 4096, 1), 8);
        assert_eq!(default_warps(int4, 2560, 9728, 8), 8);
        assert_eq!(default_warps(int4, 6144, 2560, 1), 4);
        assert_eq!(default_warps(int4, 19456, 2560, 8), 2);
        assert_eq!(default_warps(int4, 151936, 2560, 1), 2);
        // More tokens: by K.
        assert_eq!(default_warps(int4, 6144, 2560, 32), 5);
        assert_eq!(default_warps(int4, 2048, 1536, 9), 3);
        // 16-bit weights: by K alone.
        assert_eq!(default_warps(WeightFormat::Dense, 6144, 2560, 1), 8);
    }
}

/// The kernel parameter of `decode_attention_body` (field order and types as in the CUDA struct).
#[repr(C)]
struct DecodeAttentionArgs {
    q: u64,
    k: u64,
    v: u64,
    q_row: i64,
    kv_row: i64,
    kcache: u64,
    vcache: u64,
    seqlens: u64,
    position_ids: u64,
    cos: u64,
    sin: u64,
    q_norm: u64,
    k_norm: u64,
    out: u64,
    partial: u64,
    counters: u64,
    scale: f32,
    eps: f32,
    hkv: i32,
    cap: i32,
    rot_half: i32,
    cos_rows: i32,
    window: i32,
    max_splits: i32,
}

/// The shape of one decode-attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeAttentionShape {
    pub batch: usize,
    pub head_dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Slots per (sequence, KV head) of the shared buffer.
    pub capacity: usize,
    /// Half the rotary width (0: no rotary).
    pub rot_half: usize,
    /// Rows of the cos/sin caches.
    pub cos_rows: usize,
    /// Keys a query sees at most (0: all).
    pub window: usize,
    pub scale: f32,
    pub eps: f32,
}

/// Device pointers of one decode-attention call (0 for an absent optional one).
#[derive(Clone, Copy, Debug)]
pub struct DecodeAttentionTensors {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    /// Elements between consecutive sequences' rows of q, and of k and v.
    pub q_row: usize,
    pub kv_row: usize,
    pub kcache: u64,
    pub vcache: u64,
    pub seqlens: u64,
    pub position_ids: u64,
    pub cos: u64,
    pub sin: u64,
    pub q_norm: u64,
    pub k_norm: u64,
    pub out: u64,
}

impl DecodeAttentionShape {
    /// Why the kernels cannot take this shape, or None.
    pub fn unsupported_reason(&self) -> Option<String> {
        let d = source::ATTENTION_HEAD_DIM;
        if self.head_dim != d {
            return Some(format!("heads of {} (the kernel takes {d})", self.head_dim));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Some(format!("{} query heads over {} KV heads", self.heads, self.kv_heads));
        }
        let group = self.heads / self.kv_heads;
        if !source::ATTENTION_GROUPS.contains(&group) {
            return Some(format!("{group} query heads per KV head (compiled: {:?})", source::ATTENTION_GROUPS));
        }
        if 2 * self.rot_half > d {
            return Some(format!("a rotary width of {} over heads of {d}", 2 * self.rot_half));
        }
        None
    }

    /// Key splits per (sequence, KV head): enough CTAs for about two per SM, at most
    /// [`source::ATTENTION_MAX_SPLITS`], and no more than the buffer's keys fill at 128 a split.
    pub fn max_splits(&self, sm_count: usize) -> usize {
        let rows = (self.batch * self.kv_heads).max(1);
        let keys = if self.window > 0 { self.window.min(self.capacity) } else { self.capacity };
        (2 * sm_count).div_ceil(rows).min(keys.div_ceil(128)).clamp(1, source::ATTENTION_MAX_SPLITS)
    }

    /// f32 elements of the split partials.
    pub fn partial_len(&self, sm_count: usize) -> usize {
        let group = self.heads / self.kv_heads.max(1);
        self.batch * self.kv_heads * self.max_splits(sm_count) * group * (2 + source::ATTENTION_HEAD_DIM)
    }
}

/// The decode-attention kernels of one dtype (one per query-group size).
pub struct DecodeAttentionKernels {
    pub dtype: ActDtype,
    sm_count: usize,
    _module: Arc<Module>,
    by_group: Vec<(usize, Function)>,
}

impl DecodeAttentionKernels {
    pub fn new(device: &Device, dtype: ActDtype) -> Result<Self> {
        let module = device.module(KernelSet { family: Family::DecodeAttention, dtype })?;
        let by_group = source::ATTENTION_GROUPS
            .iter()
            .map(|&g| Ok((g, module.function(&source::decode_attention_name(dtype, g))?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(DecodeAttentionKernels { dtype, sm_count: device.sm_count.max(1) as usize, _module: module, by_group })
    }

    /// f32 elements of scratch a call of `shape` needs for its split partials.
    pub fn partial_len(&self, shape: &DecodeAttentionShape) -> usize {
        shape.partial_len(self.sm_count)
    }

    /// One token per sequence: writes its k and v to slot `seqlens[b]` of the buffer and its
    /// attention output to `t.out`.
    ///
    /// # Safety
    /// Device pointers of the sizes the shape implies; `partial` holds [`Self::partial_len`]
    /// f32s; `counters` holds `batch * kv_heads` u32s that are zero (the kernel leaves them so);
    /// all live until the launch has run.
    pub unsafe fn launch(
        &self,
        stream: Stream,
        s: &DecodeAttentionShape,
        t: &DecodeAttentionTensors,
        partial: u64,
        counters: u64,
    ) -> Result<()> {
        if let Some(why) = s.unsupported_reason() {
            return Err(KernelError::bad_input("GroupQueryAttention", why));
        }
        if s.batch == 0 {
            return Ok(());
        }
        let group = s.heads / s.kv_heads;
        let Some(&(_, f)) = self.by_group.iter().find(|(g, _)| *g == group) else {
            return Err(KernelError::bad_input("GroupQueryAttention", format!("no kernel for groups of {group}")));
        };
        let max_splits = s.max_splits(self.sm_count);
        let args = DecodeAttentionArgs {
            q: t.q,
            k: t.k,
            v: t.v,
            q_row: t.q_row as i64,
            kv_row: t.kv_row as i64,
            kcache: t.kcache,
            vcache: t.vcache,
            seqlens: t.seqlens,
            position_ids: t.position_ids,
            cos: t.cos,
            sin: t.sin,
            q_norm: t.q_norm,
            k_norm: t.k_norm,
            out: t.out,
            partial,
            counters,
            scale: s.scale,
            eps: s.eps,
            hkv: dim(s.kv_heads, "kv heads")?,
            cap: dim(s.capacity, "capacity")?,
            rot_half: dim(s.rot_half, "rotary half width")?,
            cos_rows: dim(s.cos_rows, "rotary rows")?,
            window: dim(s.window, "window")?,
            max_splits: dim(max_splits, "splits")?,
        };
        let rows = u32::try_from(s.batch * s.kv_heads)
            .map_err(|_| KernelError::bad_input("GroupQueryAttention", "too many sequences x KV heads"))?;
        let config = LaunchConfig { grid: (max_splits as u32, rows), block: 128, shared_bytes: 0 };
        launch(f, config, stream, &args)
    }
}
