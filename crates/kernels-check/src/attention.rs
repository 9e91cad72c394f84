//! `pio-kernels-check attention`: the one-token decode-attention kernel on random inputs against
//! the f32 reference (`pio_kernels::reference::decode_attention`, fed the same 16-bit values): the
//! attention output and the k and v it writes to the cache, over batch sizes, lengths (one split
//! and several), query groups, a window, with and without the q/k norm; each case also timed
//! (CUDA graph of back-to-back launches).

use std::path::Path;

use anyhow::{ensure, Result};
use pio_kernels::driver::{self, Device, DeviceBuffer};
use pio_kernels::gpu::{DecodeAttentionKernels, DecodeAttentionShape, DecodeAttentionTensors};
use pio_kernels::reference::{self, DecodeAttentionInputs};
use pio_kernels::source::{ActDtype, ATTENTION_HEAD_DIM};
use serde_json::json;

use crate::data::{diff, to_bits, to_f32, values, Rng};
use crate::report::Report;

/// One case: sequences' new-token slots, heads, window, q/k norm.
struct Case {
    name: &'static str,
    lens: Vec<usize>,
    heads: usize,
    kv_heads: usize,
    capacity: usize,
    window: usize,
    norm: bool,
}

fn cases() -> Vec<Case> {
    let c = |name, lens: Vec<usize>, heads, kv_heads, capacity, window, norm| Case {
        name,
        lens,
        heads,
        kv_heads,
        capacity,
        window,
        norm,
    };
    vec![
        c("qwen3-4b b1 L200 (one split)", vec![200], 32, 8, 4096, 0, true),
        c("qwen3-4b b1 L1000 (splits)", vec![1000], 32, 8, 4096, 0, true),
        c("qwen3-4b b1 L4000", vec![4000], 32, 8, 4096, 0, true),
        c("qwen3-4b b5 mixed lengths", vec![1, 37, 300, 129, 2048], 32, 8, 2100, 0, true),
        c("qwen3-4b b32 L300", vec![300; 32], 32, 8, 512, 0, true),
        c("qwen3-coder-30b b2 (groups of 8)", vec![77, 900], 32, 4, 1024, 0, true),
        c("glm-4.7 b1 (groups of 12)", vec![513], 96, 8, 1024, 0, true),
        c("qwen3-vl-2b b3 (groups of 2)", vec![5, 64, 640], 16, 8, 1024, 0, true),
        c("window 64, b2", vec![50, 700], 32, 8, 1024, 64, true),
        c("no q/k norm, b2", vec![10, 450], 32, 8, 512, 0, false),
    ]
}

fn run_case(kernels: &DecodeAttentionKernels, dtype: ActDtype, case: &Case, seed: u64) -> Result<serde_json::Value> {
    let d = ATTENTION_HEAD_DIM;
    let mut rng = Rng::new(seed);
    let b = case.lens.len();
    let (h, hkv, cap) = (case.heads, case.kv_heads, case.capacity);
    let rot_half = d / 2;
    let q = values(&mut rng, dtype, b * h * d, 1.0);
    let k = values(&mut rng, dtype, b * hkv * d, 1.0);
    let v = values(&mut rng, dtype, b * hkv * d, 1.0);
    let kc = values(&mut rng, dtype, b * hkv * cap * d, 1.0);
    let vc = values(&mut rng, dtype, b * hkv * cap * d, 1.0);
    let qn: Vec<u16> = (0..d).map(|_| to_bits(dtype, 1.0 + 0.2 * rng.symmetric())).collect();
    let kn: Vec<u16> = (0..d).map(|_| to_bits(dtype, 1.0 + 0.2 * rng.symmetric())).collect();
    // Qwen3's rotary table (theta 1e6) for every slot.
    let (mut cos, mut sin) = (Vec::with_capacity(cap * rot_half), Vec::with_capacity(cap * rot_half));
    for p in 0..cap {
        for j in 0..rot_half {
            let a = p as f64 / 1e6f64.powf(2.0 * j as f64 / d as f64);
            cos.push(to_bits(dtype, a.cos() as f32));
            sin.push(to_bits(dtype, a.sin() as f32));
        }
    }
    let seqlens: Vec<i32> = case.lens.iter().map(|&l| l as i32 - 1).collect();
    let shape = DecodeAttentionShape {
        batch: b,
        head_dim: d,
        heads: h,
        kv_heads: hkv,
        capacity: cap,
        rot_half,
        cos_rows: cap,
        window: case.window,
        scale: 1.0 / (d as f32).sqrt(),
        eps: 1e-6,
    };
    ensure!(shape.unsupported_reason().is_none(), "{}: {:?}", case.name, shape.unsupported_reason());

    // The reference on the same 16-bit values.
    let f = |x: &[u16]| -> Vec<f32> { x.iter().map(|&v| to_f32(dtype, v)).collect() };
    let (qf, kf, vf, cosf, sinf, qnf, knf) = (f(&q), f(&k), f(&v), f(&cos), f(&sin), f(&qn), f(&kn));
    let (mut kcf, mut vcf) = (f(&kc), f(&vc));
    let inputs = DecodeAttentionInputs {
        q: &qf,
        k: &kf,
        v: &vf,
        q_row: h * d,
        kv_row: hkv * d,
        seqlens: &seqlens,
        position_ids: None,
        rotary: Some((&cosf, &sinf)),
        norms: case.norm.then_some((&qnf[..], &knf[..])),
    };
    let expected = reference::decode_attention(&inputs, &shape, &mut kcf, &mut vcf);

    let up = DeviceBuffer::from_host::<u16>;
    let (q_d, k_d, v_d, kc_d, vc_d) = (up(&q)?, up(&k)?, up(&v)?, up(&kc)?, up(&vc)?);
    let (cos_d, sin_d, qn_d, kn_d) = (up(&cos)?, up(&sin)?, up(&qn)?, up(&kn)?);
    let seq_d = DeviceBuffer::from_host(&seqlens)?;
    let out_d = DeviceBuffer::new(b * h * d * 2)?;
    let partial = DeviceBuffer::new(kernels.partial_len(&shape).max(1) * 4)?;
    let counters = DeviceBuffer::new(b * hkv * 4)?;
    counters.zero()?;
    let t = DecodeAttentionTensors {
        q: q_d.ptr,
        k: k_d.ptr,
        v: v_d.ptr,
        q_row: h * d,
        kv_row: hkv * d,
        kcache: kc_d.ptr,
        vcache: vc_d.ptr,
        seqlens: seq_d.ptr,
        position_ids: 0,
        cos: cos_d.ptr,
        sin: sin_d.ptr,
        q_norm: if case.norm { qn_d.ptr } else { 0 },
        k_norm: if case.norm { kn_d.ptr } else { 0 },
        out: out_d.ptr,
    };
    let stream = driver::OwnedStream::new()?;
    // SAFETY: buffers of the shape's sizes, alive until the synchronization below.
    unsafe { kernels.launch(stream.0, &shape, &t, partial.ptr, counters.ptr)? };
    driver::synchronize()?;
    let got: Vec<f32> = out_d.to_host::<u16>()?.iter().map(|&x| to_f32(dtype, x)).collect();
    let out_diff = diff(&got, &expected);
    // The written slots, against the reference's (normalized, rotated) k and the v.
    let (kc_got, vc_got) = (f(&kc_d.to_host::<u16>()?), f(&vc_d.to_host::<u16>()?));
    let slot_rows = |c: &[f32]| -> Vec<f32> {
        let mut rows = Vec::new();
        for (bi, &l) in case.lens.iter().enumerate() {
            for g in 0..hkv {
                rows.extend_from_slice(&c[((bi * hkv + g) * cap + l - 1) * d..][..d]);
            }
        }
        rows
    };
    let k_diff = diff(&slot_rows(&kc_got), &slot_rows(&kcf));
    let v_diff = diff(&slot_rows(&vc_got), &slot_rows(&vcf));
    let counters_left: Vec<u32> = counters.to_host()?;
    // Timing: back-to-back launches in one CUDA graph (the cache slot is rewritten each time).
    let us = driver::graph_time_us(32, 10, |s, _| unsafe { kernels.launch(s, &shape, &t, partial.ptr, counters.ptr) })?;
    Ok(json!({
        "lens": case.lens, "heads": h, "kv_heads": hkv, "capacity": cap, "window": case.window, "qk_norm": case.norm,
        "max_splits": shape.max_splits(Device::get(0)?.sm_count as usize),
        "output": out_diff, "k_written": k_diff, "v_written": v_diff,
        "counters_left_nonzero": counters_left.iter().filter(|&&c| c != 0).count(),
        "us_per_call": us,
    }))
}

pub fn run(out: &Path) -> Result<()> {
    let mut report = Report::new(out);
    let device = Device::get(0)?;
    device.make_current()?;
    report
        .set("device", json!({ "name": device.name, "arch": format!("sm_{}", device.arch), "sms": device.sm_count }))?;
    for dtype in [ActDtype::Bf16, ActDtype::F16] {
        let kernels = DecodeAttentionKernels::new(device, dtype)?;
        for (i, case) in cases().iter().enumerate() {
            let key = format!("{} {}", dtype.tag(), case.name);
            if let Some(v) = report.section(&key, || run_case(&kernels, dtype, case, 1000 + i as u64)) {
                eprintln!(
                    "{key}: output max rel {:.2e}, k {:.2e}, v {:.2e}, {:.2} us",
                    v["output"]["max_rel_error"].as_f64().unwrap_or(f64::NAN),
                    v["k_written"]["max_rel_error"].as_f64().unwrap_or(f64::NAN),
                    v["v_written"]["max_rel_error"].as_f64().unwrap_or(f64::NAN),
                    v["us_per_call"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
    }
    report.save()
}
