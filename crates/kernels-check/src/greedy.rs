//! `pio-kernels-check greedy`: a graph with Inference-PIO's kernels against the same model's
//! graph of ONNX Runtime's operators, on the GPU: greedy tokens from the same prompt, and the
//! logits of both teacher-forced on the stock graph's tokens (so one near-tie that flips a token
//! does not hide how close the rest is).

use std::path::Path;

use anyhow::{ensure, Result};
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::model::{argmax, DecoderModel};
use serde_json::json;

use crate::report::Report;

/// The logits rows of a prompt's last position and of each step after it.
struct Run {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

/// Greedy from `prompt` (`forced`: feed these tokens instead of the argmax).
fn decode(model: &mut DecoderModel, prompt: &[u32], steps: usize, forced: Option<&[u32]>) -> Result<Run> {
    let mut cache = model.new_cache()?;
    let mut last = model.forward(prompt, &mut cache)?.last().to_vec();
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let next = forced.map(|f| f[i]).unwrap_or_else(|| argmax(&last));
        tokens.push(argmax(&last));
        logits.push(std::mem::take(&mut last));
        last = model.forward(&[next], &mut cache)?.last().to_vec();
    }
    Ok(Run { tokens, logits })
}

fn top2_margin(x: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in x {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

/// KL(p || q) of the softmaxes of two logit rows.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let lse = |x: &[f32]| {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter().zip(q).map(|(&a, &b)| (a as f64 - lp).exp() * ((a as f64 - lp) - (b as f64 - lq))).sum()
}

pub fn run(out: &Path, stock: &Path, pio: &Path, steps: usize, prompt_len: usize) -> Result<()> {
    let mut report = Report::new(out);
    let ep = ExecutionProvider::from_cli("cuda", 0, &[])?;
    report.set("graphs", json!({ "stock": stock.display().to_string(), "pio": pio.display().to_string() }))?;
    let mut a = DecoderModel::load(stock, &ep)?;
    let vocab = a.vocab_size() as u64;
    let prompt: Vec<u32> = (0..prompt_len as u64).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let ra = decode(&mut a, &prompt, steps, None)?;
    drop(a);
    let mut b = DecoderModel::load(pio, &ep)?;
    let rb = decode(&mut b, &prompt, steps, None)?;
    let forced = decode(&mut b, &prompt, steps, Some(&ra.tokens))?;
    drop(b);
    ensure!(forced.logits.len() == ra.logits.len(), "teacher-forced run has {} rows", forced.logits.len());

    let first_mismatch = ra.tokens.iter().zip(&rb.tokens).position(|(x, y)| x != y);
    let mut max_diff = 0f32;
    let mut agree = 0;
    let mut kl_sum = 0f64;
    for (p, q) in ra.logits.iter().zip(&forced.logits) {
        max_diff = p.iter().zip(q).map(|(x, y)| (x - y).abs()).fold(max_diff, f32::max);
        agree += (argmax(p) == argmax(q)) as usize;
        kl_sum += kl(p, q);
    }
    let at_mismatch = first_mismatch.map(|i| {
        json!({
            "step": i,
            "stock_token": ra.tokens[i], "pio_token": rb.tokens[i],
            "stock_top2_margin": top2_margin(&ra.logits[i]),
            "teacher_forced_top2_margin_pio": top2_margin(&forced.logits[i]),
        })
    });
    report.set(
        "greedy",
        json!({
            "steps": steps, "prompt_tokens": prompt_len,
            "tokens_equal": first_mismatch.is_none(),
            "first_mismatch": at_mismatch,
            "stock_tokens": ra.tokens, "pio_tokens": rb.tokens,
        }),
    )?;
    report.set(
        "teacher_forced",
        json!({
            "positions": steps,
            "max_abs_logit_diff": max_diff,
            "top1_agreement": agree as f64 / steps as f64,
            "mean_kl_stock_to_pio": kl_sum / steps as f64,
            "min_stock_top2_margin": ra.logits.iter().map(|l| top2_margin(l)).fold(f32::INFINITY, f32::min),
        }),
    )?;
    report.save()
}
