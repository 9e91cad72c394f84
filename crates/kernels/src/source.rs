//! The CUDA source and which of its templates a module instantiates. One module per kernel set
//! (a family for one activation dtype and int4 block size), compiled on first use.

use std::path::PathBuf;

use crate::error::{KernelError, Result};

/// The CUDA source of every kernel (templates; `KernelSet::source` adds the instantiations).
pub const KERNELS_CU: &str = include_str!("cuda/pio_kernels.cu");

/// Names a file compiled instead of the built-in [`KERNELS_CU`]: a variant of the kernels measured
/// on a GPU host with the same binary (such hosts have no Rust toolchain to rebuild it). The file
/// must define the built-in's templates, macros and argument structs; only their bodies may differ.
pub const KERNEL_SOURCE_VAR: &str = "PIO_KERNEL_SOURCE";

/// Token tiles of 8 a kernel handles in one pass: M <= 32 tokens.
pub const MAX_TILES: usize = 4;
/// Rows of W one CTA computes.
pub const TILE_ROWS: usize = 16;
/// K per chunk (a warp's unit of work; int4 rows are padded to it).
pub const CHUNK_K: usize = 128;
/// int4 block sizes the kernels take.
pub const INT4_BLOCK_SIZES: [usize; 3] = [32, 64, 128];

/// The activation (and scale) dtype a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActDtype {
    F16,
    Bf16,
}

impl ActDtype {
    pub fn tag(self) -> &'static str {
        match self {
            ActDtype::F16 => "f16",
            ActDtype::Bf16 => "bf16",
        }
    }
    fn macro_name(self) -> &'static str {
        match self {
            ActDtype::F16 => "DT_F16",
            ActDtype::Bf16 => "DT_BF16",
        }
    }
}

/// A group of kernels compiled together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// int4 projections: the tile kernels for 1..=4 token tiles, the dequantization for the
    /// cuBLAS path and the SwiGLU over a cuBLAS gate/up product.
    LinearInt4 { block_size: usize },
    /// 16-bit projections: the tile kernels and the SwiGLU over a cuBLAS product.
    LinearDense,
    /// int4 experts: routing, planning, fc1 + SwiGLU, fc2, the weighted sum.
    Moe { block_size: usize },
    /// One-token attention on GroupQueryAttention's shared KV buffer (q/k norm, rotary, cache
    /// append, attention), one kernel per query-group size.
    DecodeAttention,
    /// The GPU check's probes: the exact (f32) dequantization and the read-bandwidth kernel.
    Probe { block_size: usize },
}

/// A family compiled for one dtype: one CUDA module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelSet {
    pub family: Family,
    pub dtype: ActDtype,
}

pub fn linear_int4_name(dtype: ActDtype, tiles: usize, block_size: usize) -> String {
    format!("pio_linear_int4_{}_t{tiles}_b{block_size}", dtype.tag())
}
pub fn linear_dense_name(dtype: ActDtype, tiles: usize) -> String {
    format!("pio_linear_dense_{}_t{tiles}", dtype.tag())
}
/// The one-token GEMV's compiled variants, as (pieces in flight per lane, row pairs per warp), in
/// the order of [`crate::gpu::GemvVariant`]: the base, `wide` (twice the pieces in flight) and
/// `pairs` (two row pairs a warp). int4 pieces hold 32 weights, 16-bit ones 8, so the 16-bit
/// variants load more pieces.
pub const GEMV_INT4_VARIANTS: [(usize, usize); 3] = [(4, 1), (8, 1), (4, 2)];
pub const GEMV_DENSE_VARIANTS: [(usize, usize); 3] = [(8, 1), (16, 1), (8, 2)];
pub fn gemv_int4_name(dtype: ActDtype, block_size: usize, (unroll, pairs): (usize, usize)) -> String {
    format!("pio_gemv_int4_{}_b{block_size}_u{unroll}p{pairs}", dtype.tag())
}
pub fn gemv_dense_name(dtype: ActDtype, (unroll, pairs): (usize, usize)) -> String {
    format!("pio_gemv_dense_{}_u{unroll}p{pairs}", dtype.tag())
}
pub fn dequant_name(dtype: ActDtype, block_size: usize, to_f32: bool) -> String {
    let f32_tag = if to_f32 { "f32_" } else { "" };
    format!("pio_dequant_{f32_tag}{}_b{block_size}", dtype.tag())
}
pub fn swiglu_rows_name(dtype: ActDtype) -> String {
    format!("pio_swiglu_rows_{}", dtype.tag())
}
pub fn moe_topk_name(dtype: ActDtype) -> String {
    format!("pio_moe_topk_{}", dtype.tag())
}
pub const MOE_PLAN: &str = "pio_moe_plan";
pub fn moe_route_name(dtype: ActDtype) -> String {
    format!("pio_moe_route_{}", dtype.tag())
}
pub fn moe_fc_name(fc1: bool, dtype: ActDtype, tiles: usize, block_size: usize) -> String {
    format!("pio_moe_fc{}_{}_t{tiles}_b{block_size}", if fc1 { 1 } else { 2 }, dtype.tag())
}
pub fn moe_combine_name(dtype: ActDtype) -> String {
    format!("pio_moe_combine_{}", dtype.tag())
}
/// Query heads per KV head that the decode attention kernels are compiled for.
pub const ATTENTION_GROUPS: [usize; 7] = [1, 2, 4, 6, 8, 12, 16];
/// The head size they take.
pub const ATTENTION_HEAD_DIM: usize = 128;
/// Most key splits of one (sequence, KV head).
pub const ATTENTION_MAX_SPLITS: usize = 32;
pub fn decode_attention_name(dtype: ActDtype, group: usize) -> String {
    format!("pio_decode_attention_{}_g{group}", dtype.tag())
}
pub const READ_BANDWIDTH: &str = "pio_read_bandwidth";

impl KernelSet {
    /// A short name for logs and cache files: `linear-int4-f16-b32`.
    pub fn name(&self) -> String {
        let dt = self.dtype.tag();
        match self.family {
            Family::LinearInt4 { block_size } => format!("linear-int4-{dt}-b{block_size}"),
            Family::LinearDense => format!("linear-dense-{dt}"),
            Family::Moe { block_size } => format!("moe-int4-{dt}-b{block_size}"),
            Family::DecodeAttention => format!("decode-attention-{dt}"),
            Family::Probe { block_size } => format!("probe-{dt}-b{block_size}"),
        }
    }

    /// (kernel name, instantiation line) of every kernel of the set.
    fn instances(&self) -> Vec<(String, String)> {
        let (dt, dtm) = (self.dtype, self.dtype.macro_name());
        let mut out = Vec::new();
        let tiles = 1..=MAX_TILES;
        match self.family {
            Family::LinearInt4 { block_size: bs } => {
                for t in tiles {
                    let n = linear_int4_name(dt, t, bs);
                    out.push((n.clone(), format!("PIO_LINEAR({n}, {dtm}, FMT_INT4, {t}, {bs})")));
                }
                for v @ (u, p) in GEMV_INT4_VARIANTS {
                    let n = gemv_int4_name(dt, bs, v);
                    out.push((n.clone(), format!("PIO_GEMV({n}, {dtm}, FMT_INT4, {bs}, {u}, {p})")));
                }
                let n = dequant_name(dt, bs, false);
                out.push((n.clone(), format!("PIO_DEQUANT({n}, {dtm}, {bs}, false)")));
                let n = swiglu_rows_name(dt);
                out.push((n.clone(), format!("PIO_SWIGLU_ROWS({n}, {dtm})")));
            }
            Family::LinearDense => {
                for t in tiles {
                    let n = linear_dense_name(dt, t);
                    // The block size is unused by the dense format.
                    out.push((n.clone(), format!("PIO_LINEAR({n}, {dtm}, FMT_DENSE, {t}, 32)")));
                }
                for v @ (u, p) in GEMV_DENSE_VARIANTS {
                    let n = gemv_dense_name(dt, v);
                    out.push((n.clone(), format!("PIO_GEMV({n}, {dtm}, FMT_DENSE, 32, {u}, {p})")));
                }
                let n = swiglu_rows_name(dt);
                out.push((n.clone(), format!("PIO_SWIGLU_ROWS({n}, {dtm})")));
            }
            Family::Moe { block_size: bs } => {
                let n = moe_topk_name(dt);
                out.push((n.clone(), format!("PIO_MOE_TOPK({n}, {dtm})")));
                out.push((MOE_PLAN.to_string(), String::new()));
                let n = moe_route_name(dt);
                out.push((n.clone(), format!("PIO_MOE_ROUTE({n}, {dtm})")));
                for t in tiles {
                    for fc1 in [true, false] {
                        let n = moe_fc_name(fc1, dt, t, bs);
                        let mac = if fc1 { "PIO_MOE_FC1" } else { "PIO_MOE_FC2" };
                        out.push((n.clone(), format!("{mac}({n}, {dtm}, {t}, {bs})")));
                    }
                }
                let n = moe_combine_name(dt);
                out.push((n.clone(), format!("PIO_MOE_COMBINE({n}, {dtm})")));
            }
            Family::DecodeAttention => {
                for g in ATTENTION_GROUPS {
                    let n = decode_attention_name(dt, g);
                    out.push((n.clone(), format!("PIO_DECODE_ATTENTION({n}, {dtm}, {g})")));
                }
            }
            Family::Probe { block_size: bs } => {
                let n = dequant_name(dt, bs, true);
                out.push((n.clone(), format!("PIO_DEQUANT({n}, {dtm}, {bs}, true)")));
                out.push((READ_BANDWIDTH.to_string(), String::new()));
            }
        }
        out
    }

    /// The kernels this set's module holds.
    pub fn kernel_names(&self) -> Vec<String> {
        self.instances().into_iter().map(|(n, _)| n).collect()
    }

    /// The full built-in source: the templates and this set's `extern "C"` instantiations.
    pub fn source(&self) -> String {
        self.source_from(KERNELS_CU)
    }

    /// The source to compile: the built-in one, or the templates of the file [`KERNEL_SOURCE_VAR`]
    /// names (unset or empty: built-in).
    pub fn source_to_compile(&self) -> Result<String> {
        let Some(path) = std::env::var_os(KERNEL_SOURCE_VAR).filter(|p| !p.is_empty()).map(PathBuf::from) else {
            return Ok(self.source());
        };
        let templates = std::fs::read_to_string(&path).map_err(|source| KernelError::KernelSource {
            path: path.clone(),
            var: KERNEL_SOURCE_VAR,
            source,
        })?;
        tracing::info!("kernels {}: CUDA source from {} ({KERNEL_SOURCE_VAR})", self.name(), path.display());
        Ok(self.source_from(&templates))
    }

    fn source_from(&self, templates: &str) -> String {
        let mut s = String::with_capacity(templates.len() + 1024);
        s.push_str(templates);
        s.push_str("\n// Instantiations of this module.\n");
        for (_, line) in self.instances() {
            if !line.is_empty() {
                s.push_str(&line);
                s.push('\n');
            }
        }
        s
    }

    /// Every set the operators may need (for the compile check).
    pub fn all() -> Vec<KernelSet> {
        let mut out = Vec::new();
        for dtype in [ActDtype::F16, ActDtype::Bf16] {
            out.push(KernelSet { family: Family::LinearDense, dtype });
            out.push(KernelSet { family: Family::DecodeAttention, dtype });
            for bs in INT4_BLOCK_SIZES {
                out.push(KernelSet { family: Family::LinearInt4 { block_size: bs }, dtype });
                out.push(KernelSet { family: Family::Moe { block_size: bs }, dtype });
                out.push(KernelSet { family: Family::Probe { block_size: bs }, dtype });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_variable_replaces_the_templates_and_names_a_missing_file() {
        let set = KernelSet { family: Family::LinearDense, dtype: ActDtype::Bf16 };
        let dir = tempfile::tempdir().unwrap();
        let variant = dir.path().join("variant.cu");
        std::fs::write(&variant, "// a variant\n").unwrap();
        std::env::set_var(KERNEL_SOURCE_VAR, &variant);
        let replaced = set.source_to_compile();
        let missing = dir.path().join("missing.cu");
        std::env::set_var(KERNEL_SOURCE_VAR, &missing);
        let err = set.source_to_compile().unwrap_err();
        std::env::set_var(KERNEL_SOURCE_VAR, "");
        let empty = set.source_to_compile();
        std::env::remove_var(KERNEL_SOURCE_VAR);
        let replaced = replaced.unwrap();
        assert!(replaced.starts_with("// a variant\n") && !replaced.contains("mma16816"), "{replaced:.200}");
        assert!(replaced.contains("PIO_GEMV(pio_gemv_dense_bf16_u8p1"), "the instantiations follow");
        assert!(err.to_string().contains("missing.cu") && err.to_string().contains(KERNEL_SOURCE_VAR), "{err}");
        assert!(matches!(err, KernelError::KernelSource { .. }));
        assert_eq!(empty.unwrap(), set.source());
    }

    #[test]
    fn every_set_instantiates_distinct_named_kernels() {
        for set in KernelSet::all() {
            let names = set.kernel_names();
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), names.len(), "{}", set.name());
            let src = set.source();
            for n in &names {
                assert!(src.contains(n.as_str()), "{} lacks {n}", set.name());
            }
        }
        let set = KernelSet { family: Family::LinearInt4 { block_size: 64 }, dtype: ActDtype::Bf16 };
        assert_eq!(set.name(), "linear-int4-bf16-b64");
        assert!(set.source().contains("PIO_LINEAR(pio_linear_int4_bf16_t3_b64, DT_BF16, FMT_INT4, 3, 64)"));
    }
}
