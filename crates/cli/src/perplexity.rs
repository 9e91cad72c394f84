//! `pio perplexity`: how well the model predicts a text, measured as llama.cpp's
//! `llama-perplexity` does. The text's tokens are cut into windows of `--ctx` tokens (the tail
//! that fills no window is left out); each window is evaluated on its own, and only the tokens
//! after its first `ctx / 2 + 1` are scored (`ctx - ctx / 2 - 1` a window, as llama.cpp counts
//! them), so that every scored token has more than half a window before it. A tokenizer that
//! adds a BOS token gets one at the start of each window, in place of the window's first token,
//! as llama.cpp does. The perplexity is `exp` of the mean negative log-likelihood of the scored
//! tokens, with the standard error of that mean carried through `exp`.
//!
//! The windows go through the engine as requests with `prompt_logprobs` (batched as it batches
//! any prompts): on a graph exported with `--all-logits` each window is scored inside its
//! prefill, on a default export one token per run (correct, and much slower).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args as ClapArgs};
use pio_models::cli_args::NumberRange;
use pio_runtime::engine::{Engine, Prompt, Request};
use pio_runtime::generate::{GenerateOptions, GenerationOutput};
use pio_runtime::sampling::SamplingParams;
use serde::Serialize;

use crate::preflight::{GraphFolder, Refused};
use crate::ModelArgs;

#[derive(ClapArgs)]
#[command(group(ArgGroup::new("input").required(true).args(["file", "text", "ids"])))]
pub(crate) struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A UTF-8 text file to score (tokenized as is, no chat template).
    #[arg(long)]
    file: Option<PathBuf>,
    /// A text to score.
    #[arg(long)]
    text: Option<String>,
    /// Or comma-separated token ids to score (needs no tokenizer).
    #[arg(long, value_delimiter = ',', value_parser = NumberRange::<u32>::any())]
    ids: Option<Vec<u32>>,
    /// Tokens per window (>= 4, and less than what one sequence holds): llama.cpp's --ctx-size.
    /// Default: 512 (llama.cpp's), or what one sequence holds less one when that is fewer.
    #[arg(long, value_parser = NumberRange::at_least(4usize))]
    ctx: Option<usize>,
    /// Score at most this many windows, from the start (>= 1; default: every whole window).
    #[arg(long, value_parser = NumberRange::at_least(1usize))]
    chunks: Option<usize>,
    /// Print one JSON object instead of the running estimate.
    #[arg(long)]
    json: bool,
}

/// llama.cpp's default window.
const DEFAULT_CTX: usize = 512;

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    perplexity: f64,
    /// The standard error of the mean negative log-likelihood, carried through `exp`.
    perplexity_stderr: f64,
    mean_nll: f64,
    tokens_scored: usize,
    windows: usize,
    ctx: usize,
    /// Each window's own perplexity, in order.
    window_perplexity: Vec<f64>,
}

pub(crate) fn run(args: PerplexityArgs) -> Result<()> {
    // Everything the command line gets wrong is refused before the model loads.
    let graphs = GraphFolder::inspect(&args.model.graphs)?;
    args.model.check_applies_to(&graphs)?;
    let limit = graphs.sequence_limit(args.model.max_model_len);
    let ctx = match args.ctx {
        Some(ctx) if ctx >= limit => {
            let why = format!("{ctx} is not less than what one sequence holds ({limit}): a window runs as a prompt");
            return Err(Refused::new("--ctx", why).into());
        }
        Some(ctx) => ctx,
        None => DEFAULT_CTX.min(limit.saturating_sub(1)).max(4),
    };
    let input = match (&args.file, &args.text, &args.ids) {
        (Some(path), _, _) => {
            graphs.check_text("--file")?;
            let text = std::fs::read_to_string(path).with_context(|| format!("--file {}", path.display()))?;
            Input::Text("--file", text)
        }
        (None, Some(text), _) => {
            graphs.check_text("--text")?;
            Input::Text("--text", text.clone())
        }
        (None, None, Some(ids)) => {
            // Each window is a prompt of `ctx` tokens, which fits; the ids together need not.
            graphs.check_ids("--ids", ids)?;
            Input::Ids(ids.clone())
        }
        // clap requires one of them.
        (None, None, None) => return Err(Refused::new("--file", "pass --file, --text or --ids").into()),
    };
    if graphs.last_position_logits() {
        tracing::warn!(
            "these graphs return the last position's logits only: each window is scored one token per run (export \
             with --all-logits to score inside the prefill)"
        );
    }
    let engine = args.model.start()?;
    let (tokens, bos) = match input {
        Input::Text(flag, text) => {
            let tokenizer =
                engine.tokenizer().ok_or_else(|| Refused::new(flag, "this graph folder has no tokenizer"))?;
            let with_special = tokenizer.encode(&text, true).with_context(|| format!("{flag}: cannot tokenize it"))?;
            let plain = tokenizer.encode(&text, false).with_context(|| format!("{flag}: cannot tokenize it"))?;
            // A BOS the tokenizer puts first (Qwen3's and GLM's put none).
            let bos =
                (with_special.len() > plain.len() && with_special.first() != plain.first()).then(|| with_special[0]);
            (with_special, bos)
        }
        Input::Ids(ids) => (ids, None),
    };
    let whole = tokens.len() / ctx;
    let windows = args.chunks.map_or(whole, |n| n.min(whole));
    if windows == 0 {
        let why =
            format!("the text has {} tokens, less than one window of {}: pass a smaller --ctx", tokens.len(), ctx);
        return Err(Refused::new("--ctx", why).into());
    }
    let outputs = score_windows(&engine, &tokens, ctx, windows, bos)?;
    let report = report(&outputs, ctx)?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        // llama.cpp's running estimate, then the final one.
        let running = running_estimates(&outputs, ctx)?;
        let line: Vec<String> = running.iter().enumerate().map(|(i, p)| format!("[{}]{p:.4}", i + 1)).collect();
        writeln!(stdout, "{}", line.join(","))?;
        writeln!(
            stdout,
            "Final estimate: PPL = {:.4} +/- {:.5} ({} tokens in {} windows of {})",
            report.perplexity, report.perplexity_stderr, report.tokens_scored, report.windows, report.ctx
        )?;
    }
    Ok(())
}

/// The text to score, and the flag it came in, or its token ids.
enum Input {
    Text(&'static str, String),
    Ids(Vec<u32>),
}

/// Each window's output with its prompt's logprobs, in order: all windows are queued at once and
/// the engine runs as many together as it holds.
fn score_windows(
    engine: &Engine,
    tokens: &[u32],
    ctx: usize,
    windows: usize,
    bos: Option<u32>,
) -> Result<Vec<GenerationOutput>> {
    let options = GenerateOptions {
        max_tokens: Some(1),
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        prompt_logprobs: Some(0),
        ..Default::default()
    };
    let requests: Vec<Request> = tokens
        .chunks_exact(ctx)
        .take(windows)
        .map(|window| {
            let mut window = window.to_vec();
            if let Some(bos) = bos {
                window[0] = bos;
            }
            Request::new(Prompt::Ids(window)).with_options(options.clone())
        })
        .collect();
    let handles = engine.submit_batch(requests)?;
    handles.into_iter().map(|h| h.wait().map_err(anyhow::Error::from)).collect()
}

/// The negative log-likelihoods of a window's scored tokens: those after its first `ctx / 2 + 1`
/// (predicted from positions `ctx / 2` to `ctx - 2`, as llama.cpp scores them).
fn window_nll(output: &GenerationOutput, ctx: usize) -> Result<Vec<f64>> {
    let scores = output.prompt_logprobs.as_deref().context("the engine returned no prompt logprobs")?;
    scores
        .get(ctx / 2 + 1..)
        .context("the engine returned fewer prompt logprobs than the window's tokens")?
        .iter()
        .map(|s| s.as_ref().map(|s| -f64::from(s.logprob)).context("a scored position has no logprob"))
        .collect()
}

fn report(outputs: &[GenerationOutput], ctx: usize) -> Result<Report> {
    let per_window = outputs.iter().map(|o| window_nll(o, ctx)).collect::<Result<Vec<_>>>()?;
    let all: Vec<f64> = per_window.iter().flatten().copied().collect();
    let (mean, stderr) = mean_and_stderr(&all);
    Ok(Report {
        perplexity: mean.exp(),
        perplexity_stderr: mean.exp() * stderr,
        mean_nll: mean,
        tokens_scored: all.len(),
        windows: outputs.len(),
        ctx,
        window_perplexity: per_window.iter().map(|w| mean_and_stderr(w).0.exp()).collect(),
    })
}

/// The perplexity over the first 1, 2, ... windows.
fn running_estimates(outputs: &[GenerationOutput], ctx: usize) -> Result<Vec<f64>> {
    let mut all = Vec::new();
    let mut running = Vec::with_capacity(outputs.len());
    for output in outputs {
        all.extend(window_nll(output, ctx)?);
        running.push(mean_and_stderr(&all).0.exp());
    }
    Ok(running)
}

/// The mean of `x` and its standard error (0 for fewer than two values).
fn mean_and_stderr(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    if x.len() < 2 {
        return (mean, 0.0);
    }
    let variance = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (variance / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_error_is_that_of_the_mean() {
        let (mean, stderr) = mean_and_stderr(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(mean, 2.5);
        // Sample variance 5/3, over n = 4.
        assert!((stderr - (5.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_and_stderr(&[2.0]), (2.0, 0.0));
    }
}
