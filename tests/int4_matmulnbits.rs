//! int4 MatMulNBits graphs written by `pio_export::quant` and run by ONNX Runtime on the CPU:
//! the output must equal A @ dequantize(W)^T computed in Rust (max |diff| <= 1e-3 of the
//! output's max |value| for fp32), and its distance to the unquantized A @ W^T (the
//! quantization error) must stay below a loose bound.

mod common;

use half::f16;
use ort::session::Session;
use ort::value::Tensor;
use pio_export::checkpoint::Checkpoint;
use pio_export::onnx::graph::{Dim, Graph};
use pio_export::quant::{self, Int4Layout};
use pio_models::manifest::TensorDtype;

const BATCH: usize = 2;
const SEQ: usize = 3;

/// Seeded Gaussian values (xorshift + Box-Muller): no extra dependency.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn gaussian(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.uniform(), self.uniform());
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect()
    }
}

/// y[m, n] = sum_k a[m, k] * w[n, k] (+ bias[n]), accumulated in f64.
fn matmul_nt(a: &[f32], w: &[f32], k: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let (rows, n) = (a.len() / k, w.len() / k);
    let mut y = Vec::with_capacity(rows * n);
    for m in 0..rows {
        for j in 0..n {
            let s: f64 = (0..k).map(|i| a[m * k + i] as f64 * w[j * k + i] as f64).sum();
            y.push((s + bias.map_or(0.0, |b| b[j] as f64)) as f32);
        }
    }
    y
}

fn rms(x: impl Iterator<Item = f32>) -> f64 {
    let (mut s, mut c) = (0f64, 0usize);
    for v in x {
        s += (v as f64).powi(2);
        c += 1;
    }
    (s / c as f64).sqrt()
}

fn float_bytes(x: &[f32], dtype: TensorDtype) -> Vec<u8> {
    match dtype {
        TensorDtype::Float32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorDtype::Float16 => x.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        other => panic!("no test inputs in {other:?}"),
    }
}

/// How the weight enters the graph.
enum Source<'a> {
    /// In-memory (N, K) f32 weights through `matmul_nbits_rows`.
    Rows { w: &'a [f32], n: usize },
    /// Checkpoint tensors (F16/BF16) through `matmul_nbits` (one) or `matmul_nbits_parts`.
    Checkpoint { ck: &'a Checkpoint, names: &'a [&'a str] },
}

struct Case<'a> {
    label: String,
    k: usize,
    block_size: usize,
    /// A's dtype (and the scales').
    dtype: TensorDtype,
    accuracy_level: i64,
    bias: bool,
    source: Source<'a>,
}

/// Builds A (BATCH, seq, K) -> MatMulNBits -> Y, saves it, runs it with ORT on the CPU and
/// returns (ORT's Y, A @ dequantize(W)^T, A @ W^T).
fn run_case(c: &Case, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = Rng(seed);
    let k = c.k;
    let half_in = c.dtype == TensorDtype::Float16;
    let round_in = |v: Vec<f32>| if half_in { v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect() } else { v };

    // The weights as f32 (as the quantizer reads them).
    let w: Vec<f32> = match &c.source {
        Source::Rows { w, .. } => w.to_vec(),
        Source::Checkpoint { ck, names } => {
            let mut all = Vec::new();
            for name in names.iter() {
                let t = ck.tensor_any_shape(name).unwrap();
                let mut row = vec![0f32; t.shape[1]];
                for r in 0..t.shape[0] {
                    quant::read_row_f32(&t, r, &mut row).unwrap();
                    all.extend_from_slice(&row);
                }
            }
            all
        }
    };
    let n = w.len() / k;
    let a = round_in(rng.gaussian(BATCH * SEQ * k, 1.0));
    let bias = round_in(rng.gaussian(n, 0.5));

    let tmp = tempfile::tempdir().unwrap();
    let model_path = tmp.path().join("model.onnx");
    let mut g = Graph::new("int4_test", &tmp.path().join("model.onnx.data")).unwrap();
    let x = g.input("A", c.dtype, &[Dim::Fixed(BATCH as i64), Dim::Sym("seq"), Dim::Fixed(k as i64)]);
    let b = c.bias.then(|| g.initializer("proj.bias", c.dtype, &[n], &float_bytes(&bias, c.dtype)).unwrap());
    let y_name = match &c.source {
        Source::Rows { w, n } => {
            let layout = Int4Layout::new(*n, k, c.block_size).unwrap();
            quant::matmul_nbits_rows(&mut g, &x, "proj", &layout, c.dtype, c.accuracy_level, b.as_deref(), |r, buf| {
                buf.copy_from_slice(&w[r * k..(r + 1) * k]);
                Ok(())
            })
            .unwrap()
        }
        Source::Checkpoint { ck, names } => {
            let parts: Vec<_> = names.iter().map(|nm| ck.tensor_any_shape(nm).unwrap()).collect();
            if parts.len() == 1 && b.is_none() {
                quant::matmul_nbits(&mut g, &x, &parts[0], "proj", c.block_size, c.dtype, c.accuracy_level).unwrap()
            } else {
                quant::matmul_nbits_parts(
                    &mut g,
                    &x,
                    &parts,
                    "proj",
                    c.block_size,
                    c.dtype,
                    c.accuracy_level,
                    b.as_deref(),
                )
                .unwrap()
            }
        }
    };
    g.output(&y_name, c.dtype, &[Dim::Fixed(BATCH as i64), Dim::Sym("seq"), Dim::Fixed(n as i64)]);
    g.save(&model_path, "test", &[]).unwrap();

    // References: the same quantization in memory, dequantized; and the unquantized weights.
    let layout = Int4Layout::new(n, k, c.block_size).unwrap();
    let q = quant::quantize(&layout, &w, c.dtype).unwrap();
    let w_dq = quant::dequantize(&layout, &q.packed, &q.scales);
    let bias_ref = c.bias.then_some(bias.as_slice());
    let y_dq = matmul_nt(&a, &w_dq, k, bias_ref);
    let y_full = matmul_nt(&a, &w, k, bias_ref);

    let env = pio_runtime::ort_lib::environment().unwrap();
    let mut session = Session::builder(env)
        .unwrap()
        .with_intra_threads(1)
        .unwrap()
        .commit_from_file(&model_path)
        .unwrap_or_else(|e| panic!("{}: loading the MatMulNBits graph: {e}", c.label));
    let shape = vec![BATCH as i64, SEQ as i64, k as i64];
    let mut outputs = if half_in {
        let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        session.run(ort::inputs!["A" => Tensor::from_array((shape, a16)).unwrap()])
    } else {
        session.run(ort::inputs!["A" => Tensor::from_array((shape, a.clone())).unwrap()])
    }
    .unwrap_or_else(|e| panic!("{}: running MatMulNBits: {e}", c.label));
    let out = outputs.remove(y_name.as_str()).expect("output");
    let expected_shape = [BATCH as i64, SEQ as i64, n as i64];
    let y: Vec<f32> = if half_in {
        let (s, d) = out.try_extract_tensor::<f16>().unwrap();
        assert_eq!(&**s, &expected_shape);
        d.iter().map(|v| v.to_f32()).collect()
    } else {
        let (s, d) = out.try_extract_tensor::<f32>().unwrap();
        assert_eq!(&**s, &expected_shape);
        d.to_vec()
    };
    (y, y_dq, y_full)
}

/// ORT vs the dequantized reference within `tol` of the output's max |value|; the
/// quantization error (relative RMS of A @ dequantize(W)^T - A @ W^T) below `max_err`.
fn check(c: &Case, seed: u64, tol: f64, max_err: f64) {
    let (y, y_dq, y_full) = run_case(c, seed);
    let scale = y_dq.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let diff = common::max_abs_diff(&y, &y_dq) as f64 / scale;
    let err = rms(y_dq.iter().zip(&y_full).map(|(a, b)| a - b)) / rms(y_full.iter().copied());
    eprintln!(
        "{}: ORT vs dequantized reference max |diff| {diff:.2e} of max |y|; quantization error {err:.4} (relative RMS)",
        c.label
    );
    assert!(diff <= tol, "{}: ORT vs A @ dequantize(W)^T: max |diff| {diff:.2e} of max |y| > {tol:.0e}", c.label);
    assert!(err < max_err, "{}: quantization error (relative RMS vs unquantized) {err:.4} >= {max_err}", c.label);
    assert!(err > 1e-3, "{}: quantization error {err:.2e} is implausibly small: were the weights quantized?", c.label);
}

const N: usize = 40;

fn synthetic_case(w: &[f32], k: usize, block_size: usize) -> Case<'_> {
    Case {
        label: format!("synthetic N={N} K={k} block {block_size} fp32"),
        k,
        block_size,
        dtype: TensorDtype::Float32,
        accuracy_level: 0,
        bias: false,
        source: Source::Rows { w, n: N },
    }
}

/// Gaussian weights: relative RMS error ~0.08 at block 16/32, ~0.10 at 128 (quant.rs docs).
const GAUSSIAN_MAX_ERR: f64 = 0.13;

#[test]
fn fp32_matches_dequantized_reference() {
    for (i, &(k, bs)) in
        [(96, 32), (200, 32), (96, 64), (200, 64), (200, 16), (200, 128), (256, 128)].iter().enumerate()
    {
        let w = Rng(0x9E37_79B9 + i as u64).gaussian(N * k, 0.05);
        check(&synthetic_case(&w, k, bs), 100 + i as u64, 1e-3, GAUSSIAN_MAX_ERR);
    }
}

#[test]
fn fp32_with_bias() {
    for (i, &(k, bs)) in [(200, 64), (96, 32)].iter().enumerate() {
        let w = Rng(7 + i as u64).gaussian(N * k, 0.05);
        let c = Case {
            bias: true,
            label: format!("synthetic N={N} K={k} block {bs} fp32 + bias"),
            ..synthetic_case(&w, k, bs)
        };
        check(&c, 200 + i as u64, 1e-3, GAUSSIAN_MAX_ERR);
    }
}

/// accuracy_level 4 lets the CPU kernel quantize A to int8 per block: looser agreement.
#[test]
fn fp32_accuracy_level_4_int8_activations() {
    for (i, &(k, bs)) in [(96, 32), (200, 64), (256, 128)].iter().enumerate() {
        let w = Rng(31 + i as u64).gaussian(N * k, 0.05);
        let c = Case {
            accuracy_level: 4,
            label: format!("synthetic N={N} K={k} block {bs} fp32 accuracy_level 4"),
            ..synthetic_case(&w, k, bs)
        };
        check(&c, 300 + i as u64, 2e-2, GAUSSIAN_MAX_ERR);
    }
}

/// fp16 A and scales (the GPU configuration) on the CPU kernel: fp16 output rounding needs a
/// looser tolerance.
#[test]
fn fp16_activations_and_scales() {
    for (i, &(k, bs)) in [(96, 32), (200, 64)].iter().enumerate() {
        let w = Rng(41 + i as u64).gaussian(N * k, 0.05);
        let c = Case {
            dtype: TensorDtype::Float16,
            label: format!("synthetic N={N} K={k} block {bs} fp16"),
            ..synthetic_case(&w, k, bs)
        };
        check(&c, 400 + i as u64, 5e-3, GAUSSIAN_MAX_ERR);
    }
}

/// Real checkpoint tensors: an F16 q_proj alone, and BF16 gate_proj + up_proj fused along N
/// with a bias, read through `TensorRef`.
#[test]
fn checkpoint_tensors_single_and_fused() {
    let fixtures = common::fixtures_dir();
    let ck16 = Checkpoint::open(&fixtures.join("qwen3-fp16")).unwrap();
    let q = ["model.layers.0.self_attn.q_proj.weight"];
    for (i, bs) in [32usize, 128].into_iter().enumerate() {
        let c = Case {
            label: format!("qwen3-fp16 q_proj (F16) block {bs} fp32"),
            k: 128,
            block_size: bs,
            dtype: TensorDtype::Float32,
            accuracy_level: 0,
            bias: false,
            source: Source::Checkpoint { ck: &ck16, names: &q },
        };
        check(&c, 500 + i as u64, 1e-3, 0.2);
    }
    let ckbf = Checkpoint::open(&fixtures.join("qwen3-tied-hub")).unwrap();
    let gate_up = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"];
    for (i, (bs, dtype, tol)) in
        [(16usize, TensorDtype::Float32, 1e-3), (32, TensorDtype::Float16, 5e-3)].into_iter().enumerate()
    {
        let c = Case {
            label: format!("qwen3-tied-hub gate+up (BF16, fused) block {bs} {dtype:?} + bias"),
            k: 64,
            block_size: bs,
            dtype,
            accuracy_level: 0,
            bias: true,
            source: Source::Checkpoint { ck: &ckbf, names: &gate_up },
        };
        check(&c, 600 + i as u64, tol, 0.2);
    }
}
