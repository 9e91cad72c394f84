//! `pio-kernels-check ops`: each Inference-PIO operator against its ONNX Runtime counterpart,
//! both running in ONNX Runtime on the CUDA execution provider with CUDA graphs:
//!
//! | ours | ONNX Runtime's |
//! |---|---|
//! | `LinearInt4` (f16) | `MatMulNBits` (block 32) |
//! | `LinearInt4` with SwiGLU | `MatMulNBits` + `Split` + `Sigmoid` + `Mul` + `Mul` (the exporter's MLP) |
//! | `Linear` (bf16) | `MatMul` (cuBLAS) |
//! | `Linear` with SwiGLU | `MatMul` + `Split` + `Sigmoid` + `Mul` + `Mul` |
//! | `MoEInt4` (f16) | `QMoE` (int4, SwiGLU experts) |
//!
//! Both get the same values: int4 codes and scales drawn once in MatMulNBits' layout and reordered
//! for ours. Correctness: the outputs of node 0 compared (max |diff| over max |output|), ours also
//! against the CPU reference for MoE. Time per op: graphs of R and of 1 node (R weight copies
//! past the L2 cache, all reading the same x), replayed as CUDA graphs; (T_R - T_1) / (R - 1).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{RunOptions, Session};
use ort::value::{DynValueRefMut, Tensor, TensorRefMut};
use pio_export::onnx::graph::{Dim, Graph};
use pio_kernels::driver::{self, Device, DeviceBuffer};
use pio_kernels::layout::Int4Shape;
use pio_kernels::ops;
use pio_kernels::reference;
use pio_kernels::source::ActDtype;
use pio_models::manifest::TensorDtype;
use pio_runtime::ep::ExecutionProvider;
use serde_json::{json, Value};

use crate::data::{self, diff, to_f32, values, Int4Weight, Rng};
use crate::report::Report;
use crate::shapes::{moe_layer, projections, MoeLayer, Projection, PRESETS};

/// A stock op's max relative error against the CPU reference above which it computes something
/// else (a layout or semantics mismatch, not rounding: the ops agree to about 1e-3 when right).
const STOCK_WRONG_REL_ERROR: f32 = 0.05;

const BLOCK: usize = 32;
/// Weight bytes the R copies of a timing graph span at least (past the 50 MB L2 cache).
const ROTATION_BYTES: usize = 1 << 30;
const TIMED_RUNS: usize = 20;

/// What one case computes.
#[derive(Clone, Debug)]
enum Kind {
    Int4(Projection),
    Dense(Projection),
    Moe(MoeLayer),
}

/// Element type of a graph input.
#[derive(Clone, Copy, Debug)]
enum Elem {
    Act(ActDtype),
    U8,
}

/// One graph input: its name per node, element type, shape, and where node 0's data is.
struct Input {
    name: &'static str,
    elem: Elem,
    shape: Vec<usize>,
    copy0: DeviceBuffer,
}

impl Input {
    fn bytes(&self) -> usize {
        let e = match self.elem {
            Elem::Act(_) => 2,
            Elem::U8 => 1,
        };
        self.shape.iter().product::<usize>() * e
    }
}

/// One implementation of a case: its node builder and its weight inputs.
struct Side {
    label: &'static str,
    weights: Vec<Input>,
}

pub fn run(out: &Path, presets: &[String], main_tokens: &[usize], other_tokens: &[usize], pool_gib: f64) -> Result<()> {
    let mut report = Report::new(out);
    let device = Device::get(0)?;
    device.make_current()?;
    let mut rng = Rng::new(17);
    let pool_bytes = (pool_gib * (1u64 << 30) as f64) as usize;
    eprintln!("[pio-kernels-check] uploading a {pool_gib} GiB pool of random weight copies");
    let pool = DeviceBuffer::new(pool_bytes)?;
    let chunk = rng.bytes(64 << 20);
    for at in (0..pool_bytes).step_by(chunk.len()) {
        let n = chunk.len().min(pool_bytes - at);
        // SAFETY: within the pool.
        unsafe { driver::copy_to_device(pool.ptr + at as u64, &chunk[..n])? };
    }
    let tmp = tempfile::tempdir()?;
    for (i, (preset, _)) in
        PRESETS.iter().enumerate().filter(|(_, (p, _))| presets.iter().any(|s| s == p || s == "all"))
    {
        let tokens = if i == 0 { main_tokens } else { other_tokens };
        let mut kinds: Vec<Kind> = Vec::new();
        for p in projections(preset)? {
            if p.name != "lm_head" {
                kinds.push(Kind::Int4(p.clone()));
            }
            kinds.push(Kind::Dense(p));
        }
        if let Some(layer) = moe_layer(preset)? {
            kinds.push(Kind::Moe(layer));
        }
        let mut rows = Vec::new();
        for kind in &kinds {
            // Experts at every batch (the MoE target is per batch size), projections as asked.
            let tokens = if matches!(kind, Kind::Moe(_)) { main_tokens } else { tokens };
            for &m in tokens {
                let label = case_label(kind, m);
                eprintln!("[pio-kernels-check] {label}");
                let dir = tmp.path().join(format!("case{}", rows.len()));
                let value = match run_case(kind, m, &pool, &mut rng, &dir) {
                    Ok(v) => v,
                    Err(e) => json!({ "case": label, "error": format!("{e:#}") }),
                };
                let _ = std::fs::remove_dir_all(&dir);
                rows.push(value);
                report.set(preset, Value::Array(rows.clone()))?;
            }
        }
    }
    report.save()
}

fn case_label(kind: &Kind, m: usize) -> String {
    match kind {
        Kind::Int4(p) => format!("{} {} int4-f16 M={m}", p.preset, p.name),
        Kind::Dense(p) => format!("{} {} dense-bf16 M={m}", p.preset, p.name),
        Kind::Moe(l) => format!("{} moe int4-f16 M={m}", l.preset),
    }
}

fn bits<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain data viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn input(name: &'static str, elem: Elem, shape: Vec<usize>, data: &[u8]) -> Result<Input> {
    Ok(Input { name, elem, shape, copy0: DeviceBuffer::from_host(data)? })
}

/// The inputs of both sides, x and (MoE) the router probabilities, and the CPU expectation of
/// ours where it is cheap.
struct CaseData {
    dtype: ActDtype,
    x: Input,
    probs: Option<Input>,
    stock: Side,
    ours: Side,
    out_n: usize,
    /// Bytes one node reads (weights and scales; for MoE the experts the routing touches).
    bytes_read: usize,
    cpu_expected: Option<(Vec<f32>, usize)>,
}

fn case_data(kind: &Kind, m: usize, rng: &mut Rng) -> Result<CaseData> {
    match kind {
        Kind::Int4(p) => {
            let dtype = ActDtype::F16;
            let shape = Int4Shape::new(p.n, p.k, BLOCK)?;
            let w = Int4Weight::random(rng, dtype, shape);
            let (packed, scales) =
                if p.swiglu { w.to_pio(data::swiglu_from_concatenated(p.n / 2)) } else { w.to_pio(|r| r) };
            let kb = shape.matmulnbits_blocks();
            let x = values(rng, dtype, m * p.k, 1.0);
            Ok(CaseData {
                dtype,
                x: input("x", Elem::Act(dtype), vec![m, p.k], bits(&x))?,
                probs: None,
                stock: Side {
                    label: "MatMulNBits",
                    weights: vec![
                        input("w", Elem::U8, vec![p.n, kb, BLOCK / 2], &w.mnb_packed)?,
                        input("s", Elem::Act(dtype), vec![p.n, kb], bits(&w.mnb_scales))?,
                    ],
                },
                ours: Side {
                    label: ops::LINEAR_INT4,
                    weights: vec![
                        input("w", Elem::U8, vec![p.n, shape.row_bytes()], &packed)?,
                        input("s", Elem::Act(dtype), vec![p.n, shape.scale_cols()], bits(&scales))?,
                    ],
                },
                out_n: if p.swiglu { p.n / 2 } else { p.n },
                bytes_read: shape.packed_len() + shape.scales_len() * 2,
                cpu_expected: None,
            })
        }
        Kind::Dense(p) => {
            let dtype = ActDtype::Bf16;
            // Rows in ONNX Runtime's order ([gate | up] for SwiGLU), then ours reordered.
            let stock_rows = values(rng, dtype, p.n * p.k, 1.0 / (p.k as f32).sqrt());
            let order = data::swiglu_from_concatenated(p.n / 2);
            let ours: Vec<u16> = if p.swiglu {
                (0..p.n).flat_map(|r| stock_rows[order(r) * p.k..(order(r) + 1) * p.k].iter().copied()).collect()
            } else {
                stock_rows.clone()
            };
            let stock = data::transpose(&stock_rows, p.n, p.k);
            let x = values(rng, dtype, m * p.k, 1.0);
            Ok(CaseData {
                dtype,
                x: input("x", Elem::Act(dtype), vec![m, p.k], bits(&x))?,
                probs: None,
                stock: Side {
                    label: "MatMul",
                    weights: vec![input("w", Elem::Act(dtype), vec![p.k, p.n], bits(&stock))?],
                },
                ours: Side {
                    label: ops::LINEAR,
                    weights: vec![input("w", Elem::Act(dtype), vec![p.n, p.k], bits(&ours))?],
                },
                out_n: if p.swiglu { p.n / 2 } else { p.n },
                bytes_read: p.n * p.k * 2,
                cpu_expected: None,
            })
        }
        Kind::Moe(l) => moe_data(l, m, rng),
    }
}

fn moe_data(l: &MoeLayer, m: usize, rng: &mut Rng) -> Result<CaseData> {
    let dtype = ActDtype::F16;
    let (e, h, i) = (l.experts, l.hidden, l.inter);
    let s1 = Int4Shape::new(e * 2 * i, h, BLOCK)?;
    let s2 = Int4Shape::new(e * h, i, BLOCK)?;
    let fc1 = Int4Weight::random(rng, dtype, s1);
    let fc2 = Int4Weight::random(rng, dtype, s2);
    let rows1 = 2 * i;
    let (p1, sc1) = fc1.to_pio(|r| (r / rows1) * rows1 + data::swiglu_from_interleaved(r % rows1));
    let (p2, sc2) = fc2.to_pio(|r| r);
    let x = values(rng, dtype, m * h, 1.0);
    let probs = values(rng, dtype, m * e, 1.0);
    let f = |v: &[u16]| v.iter().map(|&b| to_f32(dtype, b)).collect::<Vec<f32>>();
    let (probs_f, x_f) = (f(&probs), f(&x));
    let routing = reference::route(&probs_f, None, m, e, l.top_k, true);
    let mut touched: Vec<usize> = routing.0.clone();
    touched.sort();
    touched.dedup();
    let expert_bytes = (s1.packed_len() + s1.scales_len() * 2 + s2.packed_len() + s2.scales_len() * 2) / e;
    // The CPU reference for the first tokens (one token is 8 experts' worth of work).
    let check = m.min(4);
    let one = |s: Int4Shape| Int4Shape { n: s.n / e, ..s };
    let (sf1, sf2) = (f(&sc1), f(&sc2));
    let w1 = reference::ExpertWeights { shape: one(s1), packed: &p1, scales: &sf1 };
    let w2 = reference::ExpertWeights { shape: one(s2), packed: &p2, scales: &sf2 };
    let k = l.top_k;
    let round = |v: f32| to_f32(dtype, data::to_bits(dtype, v));
    let expected = reference::moe_int4(
        &x_f[..check * h],
        check,
        &w1,
        &w2,
        (&routing.0[..check * k], &routing.1[..check * k]),
        k,
        round,
    );
    let kb1 = s1.matmulnbits_blocks();
    let kb2 = s2.matmulnbits_blocks();
    Ok(CaseData {
        dtype,
        x: input("x", Elem::Act(dtype), vec![m, h], bits(&x))?,
        probs: Some(input("probs", Elem::Act(dtype), vec![m, e], bits(&probs))?),
        stock: Side {
            label: "QMoE",
            weights: vec![
                input("fc1", Elem::U8, vec![e, rows1, kb1 * BLOCK / 2], &fc1.mnb_packed)?,
                input("fc1_s", Elem::Act(dtype), vec![e, rows1, kb1], bits(&fc1.mnb_scales))?,
                input("fc2", Elem::U8, vec![e, h, kb2 * BLOCK / 2], &fc2.mnb_packed)?,
                input("fc2_s", Elem::Act(dtype), vec![e, h, kb2], bits(&fc2.mnb_scales))?,
            ],
        },
        ours: Side {
            label: ops::MOE_INT4,
            weights: vec![
                input("fc1", Elem::U8, vec![e, rows1, s1.row_bytes()], &p1)?,
                input("fc1_s", Elem::Act(dtype), vec![e, rows1, s1.scale_cols()], bits(&sc1))?,
                input("fc2", Elem::U8, vec![e, h, s2.row_bytes()], &p2)?,
                input("fc2_s", Elem::Act(dtype), vec![e, h, s2.scale_cols()], bits(&sc2))?,
            ],
        },
        out_n: h,
        bytes_read: touched.len() * expert_bytes,
        cpu_expected: Some((expected, check)),
    })
}

fn tensor_dtype(e: Elem) -> TensorDtype {
    match e {
        Elem::Act(ActDtype::F16) => TensorDtype::Float16,
        Elem::Act(ActDtype::Bf16) => TensorDtype::Bfloat16,
        Elem::U8 => TensorDtype::Uint8,
    }
}

fn fixed(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&d| Dim::Fixed(d as i64)).collect()
}

/// The SwiGLU of ONNX Runtime's graphs: Split, Sigmoid, Mul, Mul, into output `y`.
fn stock_swiglu(g: &mut Graph, both: &str, node: &str, y: &str) {
    let parts =
        g.node("Split", &format!("{node}.split")).inputs(&[both]).attr("axis", -1i64).attr("num_outputs", 2i64).outs(2);
    let sig = g.node("Sigmoid", &format!("{node}.sigmoid")).inputs(&[&parts[0]]).out();
    let silu = g.node("Mul", &format!("{node}.silu")).inputs(&[&parts[0], &sig]).out();
    g.node("Mul", &format!("{node}.mul_up")).inputs(&[&silu, &parts[1]]).named_outs(&[y]);
}

/// A graph of `nodes` copies of one side's op, all reading x (and probs).
fn build_graph(dir: &Path, kind: &Kind, d: &CaseData, stock: bool, nodes: usize, m: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut g = Graph::new("ops", &dir.join("model.onnx.data"))?;
    let dt = tensor_dtype(Elem::Act(d.dtype));
    g.input("x", dt, &fixed(&d.x.shape));
    if let Some(p) = &d.probs {
        g.input("probs", dt, &fixed(&p.shape));
    }
    let side = if stock { &d.stock } else { &d.ours };
    for n in 0..nodes {
        let name = |base: &str| format!("{base}{n}");
        for w in &side.weights {
            g.input(&name(w.name), tensor_dtype(w.elem), &fixed(&w.shape));
        }
        let (y, node) = (name("y"), name("op"));
        match (kind, stock) {
            (Kind::Int4(p), true) => {
                let mm = g
                    .node("MatMulNBits", &node)
                    .ms()
                    .inputs(&[String::from("x"), name("w"), name("s")])
                    .attr("K", p.k)
                    .attr("N", p.n)
                    .attr("bits", 4usize)
                    .attr("block_size", BLOCK);
                if p.swiglu {
                    let both = mm.out();
                    stock_swiglu(&mut g, &both, &node, &y);
                } else {
                    mm.named_outs(&[&y]);
                }
            }
            (Kind::Int4(p), false) => {
                g.node(ops::LINEAR_INT4, &node)
                    .domain(ops::DOMAIN)
                    .inputs(&[String::from("x"), name("w"), name("s")])
                    .attr("K", p.k)
                    .attr("N", p.n)
                    .attr("block_size", BLOCK)
                    .attr("activation", if p.swiglu { ops::ACTIVATION_SWIGLU } else { ops::ACTIVATION_NONE })
                    .named_outs(&[&y]);
            }
            (Kind::Dense(p), true) => {
                let mm = g.node("MatMul", &node).inputs(&[String::from("x"), name("w")]);
                if p.swiglu {
                    let both = mm.out();
                    stock_swiglu(&mut g, &both, &node, &y);
                } else {
                    mm.named_outs(&[&y]);
                }
            }
            (Kind::Dense(p), false) => {
                g.node(ops::LINEAR, &node)
                    .domain(ops::DOMAIN)
                    .inputs(&[String::from("x"), name("w")])
                    .attr("K", p.k)
                    .attr("N", p.n)
                    .attr("activation", if p.swiglu { ops::ACTIVATION_SWIGLU } else { ops::ACTIVATION_NONE })
                    .named_outs(&[&y]);
            }
            (Kind::Moe(l), true) => {
                g.node("QMoE", &node)
                    .ms()
                    .inputs(&[
                        String::from("x"),
                        "probs".into(),
                        name("fc1"),
                        name("fc1_s"),
                        String::new(),
                        name("fc2"),
                        name("fc2_s"),
                    ])
                    .attr("k", l.top_k)
                    .attr("activation_type", "swiglu")
                    .attr("activation_alpha", 1.0f32)
                    .attr("activation_beta", 0.0f32)
                    .attr("swiglu_fusion", 1i64)
                    .attr("normalize_routing_weights", 1i64)
                    .attr("expert_weight_bits", 4usize)
                    .attr("block_size", BLOCK)
                    .named_outs(&[&y]);
            }
            (Kind::Moe(l), false) => {
                g.node(ops::MOE_INT4, &node)
                    .domain(ops::DOMAIN)
                    .inputs(&[
                        String::from("x"),
                        "probs".into(),
                        name("fc1"),
                        name("fc1_s"),
                        name("fc2"),
                        name("fc2_s"),
                    ])
                    .attr("k", l.top_k)
                    .attr("normalize_routing_weights", 1i64)
                    .attr("block_size", BLOCK)
                    .named_outs(&[&y]);
            }
        }
        g.output(&y, dt, &[Dim::Fixed(m as i64), Dim::Fixed(d.out_n as i64)]);
    }
    let path = dir.join("model.onnx");
    g.save(&path, "pio-kernels-check", &[])?;
    Ok(path)
}

/// A read-only device view bound without a copy.
fn view<'a>(memory: &MemoryInfo<'static>, ptr: u64, elem: Elem, shape: &[usize]) -> Result<DynValueRefMut<'a>> {
    let shape = ort::value::Shape::new(shape.iter().map(|&d| d as i64));
    let p = ptr as *mut std::ffi::c_void;
    // SAFETY: `ptr` is device memory of the shape's size that outlives the binding.
    Ok(unsafe {
        match elem {
            Elem::Act(ActDtype::F16) => TensorRefMut::<f16>::from_raw(memory.clone(), p, shape)?.into_dyn(),
            Elem::Act(ActDtype::Bf16) => TensorRefMut::<bf16>::from_raw(memory.clone(), p, shape)?.into_dyn(),
            Elem::U8 => TensorRefMut::<u8>::from_raw(memory.clone(), p, shape)?.into_dyn(),
        }
    })
}

/// What one session measured.
struct Measured {
    /// Node 0's output after the first (regular) run.
    y0: Vec<f32>,
    /// Node 0's output after the CUDA-graph replays, identical to y0?
    replay_identical: bool,
    median_ms: f64,
    cuda_graph: bool,
}

fn measure(
    path: &Path,
    d: &CaseData,
    stock: bool,
    nodes: usize,
    copies_at: &dyn Fn(usize, usize) -> u64,
    m: usize,
) -> Result<Measured> {
    match measure_with(path, d, stock, nodes, copies_at, m, true) {
        Ok(r) => Ok(r),
        Err(e) => {
            eprintln!("[pio-kernels-check]   with CUDA graphs: {e:#}; measuring without");
            measure_with(path, d, stock, nodes, copies_at, m, false)
        }
    }
}

fn measure_with(
    path: &Path,
    d: &CaseData,
    stock: bool,
    nodes: usize,
    copies_at: &dyn Fn(usize, usize) -> u64,
    m: usize,
    cuda_graph: bool,
) -> Result<Measured> {
    let env = pio_runtime::ort_lib::environment()?;
    let options: Vec<String> = if cuda_graph { vec!["cuda_graph=1".into()] } else { vec![] };
    let ep = ExecutionProvider::from_cli("cuda", 0, &options)?;
    let builder = ep.configure(Session::builder(env)?)?;
    let mut builder =
        builder.with_operators(ops::operator_domain(env)?).map_err(|e| anyhow!("registering ai.pio: {e}"))?;
    let mut session = builder.commit_from_file(path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
    let memory = MemoryInfo::new(AllocationDevice::CUDA, 0, AllocatorType::Device, MemoryType::Default)?;
    let allocator = Allocator::new(&session, memory.clone())?;
    let side = if stock { &d.stock } else { &d.ours };
    let mut views = vec![("x".to_string(), view(&memory, d.x.copy0.ptr, d.x.elem, &d.x.shape)?)];
    if let Some(p) = &d.probs {
        views.push(("probs".into(), view(&memory, p.copy0.ptr, p.elem, &p.shape)?));
    }
    for n in 0..nodes {
        for (j, w) in side.weights.iter().enumerate() {
            let ptr = if n == 0 { w.copy0.ptr } else { copies_at(n, j) };
            views.push((format!("{}{n}", w.name), view(&memory, ptr, w.elem, &w.shape)?));
        }
    }
    let mut outputs: Vec<ort::value::DynValue> = Vec::new();
    let mut y0_ptr = 0u64;
    for n in 0..nodes {
        let (value, ptr) = match d.dtype {
            ActDtype::F16 => {
                let t = Tensor::<f16>::new(&allocator, [m, d.out_n])?;
                let p = t.data_ptr() as u64;
                (t.into_dyn(), p)
            }
            ActDtype::Bf16 => {
                let t = Tensor::<bf16>::new(&allocator, [m, d.out_n])?;
                let p = t.data_ptr() as u64;
                (t.into_dyn(), p)
            }
        };
        if n == 0 {
            y0_ptr = ptr;
        }
        outputs.push(value);
    }
    let mut binding = session.create_binding()?;
    for (name, v) in &views {
        pio_runtime::model::bind_input_in_place(&mut binding, name, v)?;
    }
    for (n, o) in outputs.iter_mut().enumerate() {
        binding.bind_output(format!("y{n}"), o)?;
    }
    let mut run_options = RunOptions::new()?;
    if cuda_graph {
        run_options.set("gpu_graph_id", "1")?;
    }
    let read_y0 = || -> Result<Vec<f32>> {
        // SAFETY: node 0's output tensor, m * out_n elements, alive.
        let h: Vec<u16> = unsafe { driver::copy_to_host(y0_ptr, m * d.out_n)? };
        Ok(h.iter().map(|&b| to_f32(d.dtype, b)).collect())
    };
    session.run_binding_with_options(&binding, &run_options).context("first run")?;
    let y0 = read_y0()?;
    for _ in 0..4 {
        session.run_binding_with_options(&binding, &run_options).context("warm-up (CUDA-graph capture)")?;
    }
    let mut times = Vec::with_capacity(TIMED_RUNS);
    for _ in 0..TIMED_RUNS {
        let start = Instant::now();
        session.run_binding_with_options(&binding, &run_options)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let replayed = read_y0()?;
    let replay_identical = replayed.iter().zip(&y0).all(|(a, b)| a.to_bits() == b.to_bits());
    drop(binding);
    Ok(Measured { y0, replay_identical, median_ms: times[TIMED_RUNS / 2], cuda_graph })
}

fn run_case(kind: &Kind, m: usize, pool: &DeviceBuffer, rng: &mut Rng, dir: &Path) -> Result<Value> {
    let d = case_data(kind, m, rng)?;
    let per_node = |s: &Side| s.weights.iter().map(|w| w.bytes().div_ceil(256) * 256).sum::<usize>();
    let alloc = per_node(&d.stock).max(per_node(&d.ours));
    let max_copies = pool.bytes / alloc;
    if max_copies == 0 {
        bail!("one copy of the weights ({alloc} bytes) does not fit the {} byte pool", pool.bytes);
    }
    let nodes = (ROTATION_BYTES.div_ceil(alloc)).clamp(2, 64).min(max_copies + 1);
    // Copy n (1..nodes) of weight input j: its own region of the pool.
    let copies_at = |side: &Side| {
        let offsets: Vec<usize> = side
            .weights
            .iter()
            .scan(0usize, |at, w| {
                let o = *at;
                *at += w.bytes().div_ceil(256) * 256;
                Some(o)
            })
            .collect();
        move |n: usize, j: usize| pool.ptr + ((n - 1) * alloc + offsets[j]) as u64
    };
    let (stock_at, ours_at) = (copies_at(&d.stock), copies_at(&d.ours));
    let mut result = json!({
        "case": case_label(kind, m), "m": m, "nodes_timed": nodes, "bytes_read_per_op": d.bytes_read,
        "ours": d.ours.label, "stock": d.stock.label,
    });
    let mut per_side = Vec::new();
    for stock in [true, false] {
        let at: &dyn Fn(usize, usize) -> u64 = if stock { &stock_at } else { &ours_at };
        let tag = if stock { "stock" } else { "ours" };
        let many =
            measure(&build_graph(&dir.join(format!("{tag}-r")), kind, &d, stock, nodes, m)?, &d, stock, nodes, at, m)
                .with_context(|| format!("{tag}, {nodes} nodes"))?;
        let one = measure(&build_graph(&dir.join(format!("{tag}-1")), kind, &d, stock, 1, m)?, &d, stock, 1, at, m)
            .with_context(|| format!("{tag}, 1 node"))?;
        let us = (many.median_ms - one.median_ms) * 1e3 / (nodes - 1) as f64;
        result[tag] = json!({
            "op": if stock { d.stock.label } else { d.ours.label },
            "us_per_op": us,
            "tb_per_s": d.bytes_read as f64 / (us * 1e-6) / 1e12,
            "run_ms_many": many.median_ms, "run_ms_one": one.median_ms,
            "cuda_graph": many.cuda_graph && one.cuda_graph,
            "graph_replay_identical": many.replay_identical && one.replay_identical,
        });
        per_side.push((us, many.y0));
    }
    let (stock_us, stock_y) = &per_side[0];
    let (ours_us, ours_y) = &per_side[1];
    result["speedup"] = json!(stock_us / ours_us);
    let vs = diff(ours_y, stock_y);
    result["max_rel_error_vs_stock"] = json!(vs.max_rel_error);
    result["vs_stock"] = serde_json::to_value(vs)?;
    if let Some((expected, tokens)) = &d.cpu_expected {
        let got = &ours_y[..tokens * d.out_n];
        let vr = diff(got, expected);
        result["max_rel_error_vs_cpu_reference"] = json!(vr.max_rel_error);
        result["vs_cpu_reference"] = serde_json::to_value(vr)?;
        // A stock op that does not compute the reference's function is not a baseline: ONNX
        // Runtime 1.31's CUDA QMoE fed its weights as graph inputs (as here, so that every timed
        // node reads its own copy) cannot rearrange them (it does that when prepacking
        // initializers), and reads raw MatMulNBits rows as its CUTLASS layout. Its time is kept,
        // its speed-up is not.
        let stock_vs_reference = diff(&stock_y[..tokens * d.out_n], expected);
        if stock_vs_reference.max_rel_error > STOCK_WRONG_REL_ERROR {
            result["stock_wrong"] = json!(true);
            result["stock_max_rel_error_vs_cpu_reference"] = json!(stock_vs_reference.max_rel_error);
            result["speedup"] = serde_json::Value::Null;
        }
    }
    Ok(result)
}
