//! `pio run --batch FILE`: the prompts of a JSON-lines file submitted together, so the engine
//! batches them (offline batch inference); one JSON object per line comes out, in order.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use pio_runtime::chat_template::RenderOptions;
use pio_runtime::engine::{Engine, Prompt, Request};
use pio_runtime::generate::GenerateOptions;
use serde::Deserialize;
use serde_json::{json, Value as Json};

use crate::preflight::{GraphFolder, Refused};

/// One line of a batch file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt_ids: Option<Vec<u32>>,
    prompt: Option<String>,
    messages: Option<Vec<Json>>,
    max_tokens: Option<usize>,
    seed: Option<u64>,
}

/// A prompt and what it overrides of the command line's options.
pub struct BatchRequest {
    /// Its line in the file, from 1.
    line: usize,
    /// Which of `prompt_ids`, `prompt` and `messages` the line gave.
    field: &'static str,
    prompt: Prompt,
    max_tokens: Option<usize>,
    seed: Option<u64>,
}

/// Reads `path` (blank lines skipped). `prompt` is a user message (after `system`) unless `raw`.
pub fn read(path: &Path, raw: bool, system: Option<&str>) -> Result<Vec<BatchRequest>> {
    let text =
        std::fs::read_to_string(path).context(Refused::new(format!("--batch {}", path.display()), "cannot be read"))?;
    let mut requests = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{} line {}", path.display(), i + 1);
        let line: Line = serde_json::from_str(line).with_context(|| Refused::new(at(), "is not a request line"))?;
        let (field, prompt) = match (line.prompt_ids, line.prompt, line.messages) {
            (Some(ids), None, None) => ("prompt_ids", Prompt::Ids(ids)),
            (None, Some(text), None) if raw => ("prompt", Prompt::Text(text)),
            (None, Some(text), None) => {
                let mut messages: Vec<Json> =
                    system.map(|s| json!({"role": "system", "content": s})).into_iter().collect();
                messages.push(json!({"role": "user", "content": text}));
                ("prompt", Prompt::Chat(messages))
            }
            (None, None, Some(messages)) => ("messages", Prompt::Chat(messages)),
            _ => return Err(Refused::new(at(), "give exactly one of prompt_ids, prompt and messages").into()),
        };
        let (max_tokens, seed) = (line.max_tokens, line.seed);
        requests.push(BatchRequest { line: i + 1, field, prompt, max_tokens, seed });
    }
    if requests.is_empty() {
        return Err(Refused::new(format!("--batch {}", path.display()), "has no prompts").into());
    }
    Ok(requests)
}

/// Refuses the file if a line's prompt cannot run on `graphs` (see [`GraphFolder::check_prompt`];
/// `max_tokens`: the command line's, for lines without their own), naming the line.
pub fn check(
    path: &Path,
    requests: &[BatchRequest],
    graphs: &GraphFolder,
    max_tokens: usize,
    max_model_len: Option<usize>,
) -> Result<()> {
    for r in requests {
        graphs
            .check_prompt(&r.prompt, r.field, r.max_tokens.unwrap_or(max_tokens), max_model_len)
            .with_context(|| format!("{} line {}", path.display(), r.line))?;
    }
    Ok(())
}

/// Refuses `--system` when no line is a `prompt` rendered through the chat template (the only
/// lines it joins), and `--thinking` when no line is a chat at all: they would do nothing.
pub fn check_chat_flags(path: &Path, requests: &[BatchRequest], system: bool, thinking: bool) -> Result<()> {
    let is_chat = |r: &&BatchRequest| matches!(r.prompt, Prompt::Chat(_));
    if system && !requests.iter().filter(is_chat).any(|r| r.field == "prompt") {
        let message =
            format!("no line of {} is a `prompt` through the chat template (it joins only those)", path.display());
        return Err(Refused::new("--system", message).into());
    }
    if thinking && !requests.iter().any(|r| is_chat(&r)) {
        let message = format!("no line of {} goes through the chat template", path.display());
        return Err(Refused::new("--thinking", message).into());
    }
    Ok(())
}

/// Submits every request, then prints each output as one JSON line, in order, and a summary on
/// stderr.
pub fn run(
    engine: &Engine,
    requests: Vec<BatchRequest>,
    options: &GenerateOptions,
    render: &RenderOptions,
) -> Result<()> {
    let start = Instant::now();
    let count = requests.len();
    let handles = requests
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut options = options.clone();
            options.max_tokens = r.max_tokens.or(options.max_tokens);
            options.sampling.seed = r.seed.or(options.sampling.seed);
            let request = Request::new(r.prompt).with_options(options).with_render(render.clone());
            engine.submit(request).with_context(|| format!("batch request {}", i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut stdout = std::io::stdout().lock();
    let mut generated = 0;
    for (i, handle) in handles.into_iter().enumerate() {
        let output = handle.wait().with_context(|| format!("batch request {}", i + 1))?;
        generated += output.generated_ids.len();
        writeln!(stdout, "{}", crate::output_json(&output))?;
    }
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        "{count} requests, {generated} tokens generated in {secs:.2} s ({:.1} tokens/s)",
        generated as f64 / secs.max(1e-9)
    );
    Ok(())
}
