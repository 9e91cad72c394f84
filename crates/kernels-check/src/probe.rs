//! `pio-kernels-check probe`: the device, its read bandwidth, the exactness and the speed of the
//! int4 dequantization, and the tile kernels timed directly (CUDA-graph replays of back-to-back
//! launches over weight copies larger than the L2 cache, for several warps per CTA), each checked
//! against the CPU reference.

use std::path::Path;

use anyhow::{Context, Result};
use pio_kernels::driver::{self, Device, DeviceBuffer};
use pio_kernels::gpu::{default_warps, GemvVariant, LinearKernels, OneTokenKernel, ProbeKernels, WeightFormat};
use pio_kernels::layout::Int4Shape;
use pio_kernels::nvrtc::Nvrtc;
use pio_kernels::reference;
use pio_kernels::source::{ActDtype, INT4_BLOCK_SIZES};
use serde_json::{json, Value};

use crate::data::{diff, to_f32, values, Int4Weight, Rng};
use crate::report::Report;
use crate::shapes::{projections, Projection, PRESETS};

/// Bytes of weight copies the timing loops rotate through (well past the 50 MB L2 cache).
const ROTATION_BYTES: usize = 1 << 30;

/// Which tile-kernel cases the probe times.
pub struct Selection {
    /// Preset names, or `all`.
    pub presets: Vec<String>,
    /// Projection names, or `all`.
    pub projections: Vec<String>,
    /// `int4` and/or `dense`.
    pub formats: Vec<String>,
    /// The tiles at the default warps per CTA only (one timed tile kernel a case, for a profiler
    /// to pick; the GEMVs at one token are still timed).
    pub default_warps_only: bool,
    /// The int4 dequantization's exactness and timing too.
    pub with_dequant: bool,
}

fn listed(list: &[String], name: &str) -> bool {
    list.iter().any(|s| s == name || s == "all")
}

pub fn run(out: &Path, tokens: &[usize], select: &Selection) -> Result<()> {
    if let Some(bad) = select.formats.iter().find(|f| !["int4", "dense", "all"].contains(&f.as_str())) {
        anyhow::bail!("--formats: {bad:?} is not a weight format (int4, dense or all)");
    }
    let mut report = Report::new(out);
    let device = Device::get(0)?;
    device.make_current()?;
    let nvrtc = Nvrtc::get()?;
    report.set(
        "device",
        json!({
            "name": device.name,
            "arch": format!("sm_{}", device.arch),
            "sms": device.sm_count,
            "driver_cuda_version": driver::driver_version()?,
            "nvrtc": nvrtc.version_string(),
            "nvrtc_location": nvrtc.location.display().to_string(),
        }),
    )?;
    let bw = report.section("bandwidth", || bandwidth(device));
    let tbps = bw.as_ref().and_then(|v| v["best_tb_per_s"].as_f64());
    if select.with_dequant {
        report.section("dequant_exact", || dequant_exact(device));
        report.section("dequant_timing", || dequant_timing(device, tbps));
    }
    report.section("tile_kernels", || tile_kernels(device, tokens, select, tbps));
    report.save()
}

/// The best and median of 10 full reads of a 4 GiB buffer.
fn bandwidth(device: &Device) -> Result<Value> {
    let probe = ProbeKernels::new(device, ActDtype::F16, 32)?;
    let bytes = 4usize << 30;
    let buf = DeviceBuffer::new(bytes)?;
    buf.zero()?;
    let sink = DeviceBuffer::new(16)?;
    let stream = driver::OwnedStream::new()?;
    let mut times = Vec::new();
    for _ in 0..11 {
        // SAFETY: `buf` holds `bytes`, `sink` 16 bytes; both outlive the synchronous timing.
        let ms = driver::time_ms(&stream, || unsafe { probe.launch_read(stream.0, buf.ptr, bytes, sink.ptr) })?;
        times.push(ms as f64);
    }
    times.remove(0); // first touch
    times.sort_by(f64::total_cmp);
    let tb = |ms: f64| bytes as f64 / (ms * 1e-3) / 1e12;
    Ok(json!({
        "bytes": bytes,
        "best_ms": times[0],
        "median_ms": times[times.len() / 2],
        "best_tb_per_s": tb(times[0]),
        "median_tb_per_s": tb(times[times.len() / 2]),
    }))
}

/// The f32 dequantization kernel against the CPU's (q - 8) * scale, bit for bit, and the 16-bit
/// dequantization (the cuBLAS path) against its rounding.
fn dequant_exact(device: &Device) -> Result<Value> {
    let mut rows = Vec::new();
    let mut rng = Rng::new(3);
    for dtype in [ActDtype::F16, ActDtype::Bf16] {
        for bs in INT4_BLOCK_SIZES {
            let shape = Int4Shape::new(512, 2560 + 96, bs)?; // a partial last chunk too
            let w = Int4Weight::random(&mut rng, dtype, shape);
            let (packed, scales) = w.to_pio(|r| r);
            let scales_f32: Vec<f32> = scales.iter().map(|&h| to_f32(dtype, h)).collect();
            let expected = reference::dequantize(&shape, &packed, &scales_f32);
            let (dp, ds) = (DeviceBuffer::from_host(&packed)?, DeviceBuffer::from_host(&scales)?);
            let out32 = DeviceBuffer::new(shape.n * shape.k * 4)?;
            let out16 = DeviceBuffer::new(shape.n * shape.k * 2)?;
            let probe = ProbeKernels::new(device, dtype, bs)?;
            let lin = LinearKernels::new(device, WeightFormat::Int4 { block_size: bs }, dtype)?;
            let null = std::ptr::null_mut();
            // SAFETY: buffers of the shape's sizes; synchronized before reading.
            unsafe {
                probe.launch_dequant_f32(null, (dp.ptr, ds.ptr, out32.ptr), (shape.n, shape.k))?;
                lin.launch_dequant(null, (dp.ptr, ds.ptr, out16.ptr), (shape.n, shape.k))?;
            }
            driver::synchronize()?;
            let got32: Vec<f32> = out32.to_host()?;
            let got16: Vec<u16> = out16.to_host()?;
            let mismatch32 = got32.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            let mismatch16 = got16.iter().zip(&expected).filter(|(&a, &b)| a != crate::data::to_bits(dtype, b)).count();
            rows.push(json!({
                "dtype": dtype.tag(), "block_size": bs, "n": shape.n, "k": shape.k,
                "f32_mismatches": mismatch32, "rounded_mismatches": mismatch16, "elements": expected.len(),
                "bit_exact": mismatch32 == 0 && mismatch16 == 0,
            }));
        }
    }
    Ok(Value::Array(rows))
}

/// The 16-bit int4 dequantization (the first step of the int4 prefill path, before cuBLAS) on
/// each int4 projection of the first preset (Qwen3-4B, block 32, f16): µs per call over rotating
/// weight copies past the L2 cache, and TB/s counting the packed weight and scales read and the
/// N x K x 2 bytes written.
fn dequant_timing(device: &Device, tbps: Option<f64>) -> Result<Value> {
    let (dtype, block_size) = (ActDtype::F16, 32);
    let kernels = LinearKernels::new(device, WeightFormat::Int4 { block_size }, dtype)?;
    // The values do not change the time: zeros.
    let pool = DeviceBuffer::new(ROTATION_BYTES)?;
    pool.zero()?;
    let mut rows = Vec::new();
    for proj in projections(PRESETS[0].0)?.into_iter().filter(|p| p.name != "lm_head") {
        let shape = Int4Shape::new(proj.n, proj.k, block_size)?;
        let (wbytes, sbytes) = (shape.packed_len(), shape.scales_len() * 2);
        let per_copy = (wbytes + sbytes).div_ceil(256) * 256;
        let copies = (ROTATION_BYTES / per_copy).clamp(1, 256);
        let out = DeviceBuffer::new(shape.n * shape.k * 2)?;
        let us = driver::graph_time_us(copies.max(16), 10, |stream, i| {
            let base = pool.ptr + ((i % copies) * per_copy) as u64;
            // SAFETY: the copy lies inside the pool; `out` holds N x K halves.
            unsafe { kernels.launch_dequant(stream, (base, base + wbytes as u64, out.ptr), (shape.n, shape.k)) }
        })
        .with_context(|| format!("dequantizing {} ({} x {})", proj.name, proj.n, proj.k))?;
        let bytes = (wbytes + sbytes + shape.n * shape.k * 2) as f64;
        let tb = bytes / (us * 1e-6) / 1e12;
        rows.push(json!({
            "case": format!("{} {} dequant int4-f16", proj.preset, proj.name), "n": proj.n, "k": proj.k,
            "block_size": block_size, "bytes_moved": bytes, "us": us, "tb_per_s": tb,
            "floor_us": tbps.map(|b| bytes / (b * 1e12) * 1e6), "fraction_of_bandwidth": tbps.map(|b| tb / b),
        }));
    }
    Ok(Value::Array(rows))
}

/// One projection at one token count, both formats, several warp counts.
fn tile_kernels(device: &Device, tokens: &[usize], select: &Selection, tbps: Option<f64>) -> Result<Value> {
    let mut rows = Vec::new();
    let mut rng = Rng::new(5);
    // One rotation pool for every case: random bytes (weights of the timing copies).
    let pool = DeviceBuffer::from_host(&rng.bytes(ROTATION_BYTES + (256 << 20)))?;
    let formats = [WeightFormat::Int4 { block_size: 32 }, WeightFormat::Dense]
        .into_iter()
        .filter(|&format| listed(&select.formats, format_name(format)))
        .map(|format| format_kernels(device, format))
        .collect::<Result<Vec<_>>>()?;
    for (preset, _) in PRESETS.iter().filter(|(p, _)| listed(&select.presets, p)) {
        for proj in projections(preset)?.into_iter().filter(|p| listed(&select.projections, &p.name)) {
            for kernels in &formats {
                for &m in tokens {
                    let label = format!("{} {} {} M={m}", proj.preset, proj.name, kernel_label(kernels.format));
                    match tile_case(kernels, &proj, m, &pool, &mut rng, tbps, select.default_warps_only) {
                        Ok(v) => rows.push(v),
                        Err(e) => rows.push(json!({ "case": label, "error": format!("{e:#}") })),
                    }
                }
            }
        }
    }
    Ok(Value::Array(rows))
}

/// A kernel the probe times: the tile kernels with a warp count, or a one-token GEMV variant.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Tiles(u32),
    Gemv(GemvVariant),
}

impl Kernel {
    fn applies(self, m: usize) -> bool {
        matches!(self, Kernel::Tiles(_)) || m == 1
    }
    fn warps(self) -> u32 {
        match self {
            Kernel::Tiles(w) => w,
            Kernel::Gemv(_) => 8,
        }
    }
    fn label(self) -> String {
        match self {
            Kernel::Tiles(w) => format!("tiles/{w}w"),
            Kernel::Gemv(v) => v.label().to_string(),
        }
    }
    /// # Safety
    /// As [`LinearKernels::launch_tiles`].
    unsafe fn launch(
        self,
        kernels: &LinearKernels,
        stream: driver::Stream,
        ptrs: (u64, u64, u64, u64),
        (m, n, k): (usize, usize, usize),
        swiglu: bool,
    ) -> pio_kernels::error::Result<()> {
        match self {
            Kernel::Tiles(w) => kernels.launch_tiles(stream, ptrs, (m, n, k), swiglu, w),
            Kernel::Gemv(v) => kernels.launch_gemv(stream, ptrs, (n, k), swiglu, v),
        }
    }
}

fn format_name(format: WeightFormat) -> &'static str {
    match format {
        WeightFormat::Int4 { .. } => "int4",
        WeightFormat::Dense => "dense",
    }
}

fn kernel_label(format: WeightFormat) -> &'static str {
    match format {
        WeightFormat::Int4 { .. } => "int4-f16",
        WeightFormat::Dense => "dense-bf16",
    }
}

/// (weight bytes, scale bytes) of one copy.
fn weight_bytes(format: WeightFormat, n: usize, k: usize) -> (usize, usize) {
    match format {
        WeightFormat::Int4 { block_size } => {
            let s = Int4Shape { n, k, block_size };
            (s.packed_len(), s.scales_len() * 2)
        }
        WeightFormat::Dense => (n * k * 2, 0),
    }
}

/// The kernels of one format the cases check and time (f16 activations for int4 weights, bf16
/// for dense), loaded once for all of them.
fn format_kernels(device: &Device, format: WeightFormat) -> Result<LinearKernels> {
    let dtype = match format {
        WeightFormat::Int4 { .. } => ActDtype::F16,
        WeightFormat::Dense => ActDtype::Bf16,
    };
    Ok(LinearKernels::new(device, format, dtype)?)
}

fn tile_case(
    kernels: &LinearKernels,
    proj: &Projection,
    m: usize,
    pool: &DeviceBuffer,
    rng: &mut Rng,
    tbps: Option<f64>,
    default_warps_only: bool,
) -> Result<Value> {
    let (format, dtype) = (kernels.format, kernels.dtype);
    let (n, k) = (proj.n, proj.k);
    let x = values(rng, dtype, m * k, 1.0);
    let xf: Vec<f32> = x.iter().map(|&h| to_f32(dtype, h)).collect();
    let dx = DeviceBuffer::from_host(&x)?;
    let out_n = if proj.swiglu { n / 2 } else { n };
    let dy = DeviceBuffer::new(m * out_n * 2)?;

    // Correctness on the first rows (the same kernel on a smaller N), against the reference.
    let check_n = n.min(512);
    let (expected, (dw, ds)) = match format {
        WeightFormat::Int4 { block_size } => {
            let shape = Int4Shape::new(check_n, k, block_size)?;
            let w = Int4Weight::random(rng, dtype, shape);
            let (packed, scales) = w.to_pio(|r| r);
            let sf: Vec<f32> = scales.iter().map(|&h| to_f32(dtype, h)).collect();
            let y = reference::linear_int4(&xf, m, &shape, &packed, &sf);
            (y, (DeviceBuffer::from_host(&packed)?, DeviceBuffer::from_host(&scales)?))
        }
        WeightFormat::Dense => {
            let w = values(rng, dtype, check_n * k, 1.0 / (k as f32).sqrt());
            let wf: Vec<f32> = w.iter().map(|&h| to_f32(dtype, h)).collect();
            (reference::linear_dense(&xf, m, check_n, k, &wf), (DeviceBuffer::from_host(&w)?, DeviceBuffer::new(16)?))
        }
    };
    let expected = if proj.swiglu { reference::swiglu_grouped(&expected, m, check_n) } else { expected };
    let check_out = if proj.swiglu { check_n / 2 } else { check_n };
    let warps = default_warps(format, proj.n, k, m);
    // Each kernel that may take this case, against the reference: the tiles with the default
    // warps, and at one token the GEMV (which the operators use there).
    let mut kernel_checks = Vec::new();
    let gemvs: Vec<Kernel> = GemvVariant::ALL.into_iter().map(Kernel::Gemv).collect();
    // The tiles at `tile_warps`, then the GEMVs at one token.
    let kernel_list = |tile_warps: Vec<u32>| -> Vec<Kernel> {
        tile_warps.into_iter().map(Kernel::Tiles).chain(gemvs.iter().copied()).filter(|kn| kn.applies(m)).collect()
    };
    for kernel in kernel_list(vec![warps]) {
        // NaN in every output first (0xFFFF in f16 and bf16), so an output a kernel fails to write
        // counts as non-finite rather than keeping the previous kernel's value.
        let dcheck = DeviceBuffer::from_host(&vec![0xFFFFu16; m * check_out])?;
        // SAFETY: buffers of the sizes the shapes imply; synchronized before reading.
        unsafe {
            kernel.launch(
                kernels,
                std::ptr::null_mut(),
                (dx.ptr, dw.ptr, ds.ptr, dcheck.ptr),
                (m, check_n, k),
                proj.swiglu,
            )?
        };
        driver::synchronize()?;
        let got: Vec<f32> = dcheck.to_host::<u16>()?.iter().map(|&h| to_f32(dtype, h)).collect();
        kernel_checks.push((kernel, diff(&got, &expected)));
    }
    let max_rel_error = kernel_checks.iter().map(|(_, c)| c.max_rel_error).fold(0f32, f32::max);
    let non_finite: usize = kernel_checks.iter().map(|(_, c)| c.non_finite).sum();

    // Timing over rotating copies of the full weight.
    let (wbytes, sbytes) = weight_bytes(format, n, k);
    let per_copy = (wbytes + sbytes).div_ceil(256) * 256;
    let copies = (ROTATION_BYTES / per_copy).clamp(1, 256);
    let calls = copies.max(32);
    let mut timings = Vec::new();
    let mut candidates = if default_warps_only { vec![warps] } else { vec![warps, 2, 4, 8] };
    candidates.sort();
    candidates.dedup();
    let operators_use = match (m, kernels.one_token_kernel()) {
        (1, OneTokenKernel::Gemv(v)) => Kernel::Gemv(v),
        _ => Kernel::Tiles(warps),
    };
    for kernel in kernel_list(candidates) {
        let us = driver::graph_time_us(calls, 10, |stream, i| {
            let base = pool.ptr + ((i % copies) * per_copy) as u64;
            // SAFETY: the copy lies inside the pool (copies * per_copy <= ROTATION_BYTES + slack).
            unsafe {
                kernel.launch(kernels, stream, (dx.ptr, base, base + wbytes as u64, dy.ptr), (m, n, k), proj.swiglu)
            }
        })
        .with_context(|| format!("timing {}", kernel.label()))?;
        let bytes = (wbytes + sbytes + m * k * 2 + m * out_n * 2) as f64;
        let tb = bytes / (us * 1e-6) / 1e12;
        timings.push(json!({
            "kernel": kernel.label(), "warps": kernel.warps(), "default": kernel == operators_use, "us": us,
            "tb_per_s": tb, "fraction_of_bandwidth": tbps.map(|b| tb / b),
        }));
    }
    let correctness: Vec<Value> =
        kernel_checks.iter().map(|(kn, c)| json!({ "kernel": kn.label(), "check": c })).collect();
    Ok(json!({
        "case": format!("{} {} {} M={m}", proj.preset, proj.name, kernel_label(format)),
        "preset": proj.preset, "projection": proj.name, "format": kernel_label(format), "n": n, "k": k, "m": m,
        "swiglu": proj.swiglu, "weight_bytes": wbytes + sbytes, "copies_rotated": copies,
        "max_rel_error_vs_cpu_reference": max_rel_error, "non_finite_or_unwritten": non_finite,
        "correctness": correctness,
        "timings": timings,
    }))
}
