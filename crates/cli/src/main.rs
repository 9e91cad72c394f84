//! `pio`: run, chat with and list models exported by pio-export.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use pio_models::presets::PRESETS;
use pio_models::size::{format_bytes, format_params, Precision};
use pio_runtime::chat_template::RenderOptions;
use pio_runtime::ep::ExecutionProvider;
use pio_runtime::generate::{GenerateOptions, Generator};
use pio_runtime::plugin::{DecoderPlugin, PluginMetadata};
use pio_runtime::sampling::SamplingParams;
use serde_json::json;

#[derive(Parser)]
#[command(name = "pio", version, about = "Run LLMs exported by pio-export on ONNX Runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from one prompt (chat template applied unless --raw).
    Run(RunArgs),
    /// Interactive multi-turn chat in the terminal, streaming tokens as they come.
    Chat(ChatArgs),
    /// The presets with their sizes computed from their configs.
    Models,
}

#[derive(ClapArgs, Clone)]
struct ModelArgs {
    /// A graph folder written by pio-export (holds pio.json).
    #[arg(long)]
    graphs: PathBuf,
    /// Execution provider: cpu, cuda, tensorrt.
    #[arg(long, default_value = "cpu")]
    ep: String,
    #[arg(long, default_value_t = 0)]
    device_id: i32,
    /// CPU intra-op threads (default: ONNX Runtime's choice).
    #[arg(long)]
    threads: Option<usize>,
}

impl ModelArgs {
    fn load(&self) -> Result<Generator> {
        let mut ep = ExecutionProvider::parse(&self.ep, self.device_id)?;
        if let (ExecutionProvider::Cpu { threads }, Some(n)) = (&mut ep, self.threads) {
            *threads = Some(n);
        }
        Generator::load(&self.graphs, &ep)
    }
}

#[derive(ClapArgs, Clone)]
struct SamplingArgs {
    /// Greedy decoding (argmax); overrides the sampling options.
    #[arg(long)]
    greedy: bool,
    /// Default: the checkpoint's generation_config.json.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    presence_penalty: Option<f32>,
    #[arg(long)]
    frequency_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn options(&self, generator: &Generator) -> Result<GenerateOptions> {
        let mut p = if self.greedy { SamplingParams::greedy() } else { DecoderPlugin::default_sampling(generator) };
        if !self.greedy {
            if let Some(t) = self.temperature {
                p.temperature = t;
            }
            if let Some(k) = self.top_k {
                p.top_k = k;
            }
            if let Some(v) = self.top_p {
                p.top_p = v;
            }
            if let Some(v) = self.min_p {
                p.min_p = v;
            }
        }
        if let Some(v) = self.repetition_penalty {
            p.repetition_penalty = v;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = v;
        }
        p.seed = self.seed;
        p.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(GenerateOptions {
            max_tokens: self.max_tokens,
            sampling: p,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            ..Default::default()
        })
    }
}

#[derive(ClapArgs)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt (a user message, unless --raw).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Comma-separated token ids (needs no tokenizer).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Use the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// A system message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Qwen3 templates: `enable_thinking` (true/false); default: the template's own.
    #[arg(long)]
    thinking: Option<bool>,
    /// Print one JSON object (prompt_ids, generated_ids, text, finish_reason, timings) instead of streaming.
    #[arg(long)]
    json: bool,
}

#[derive(ClapArgs)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long)]
    system: Option<String>,
    #[arg(long)]
    thinking: Option<bool>,
}

fn render_options(thinking: Option<bool>) -> RenderOptions {
    RenderOptions { enable_thinking: thinking, ..RenderOptions::generation() }
}

fn run(args: RunArgs) -> Result<()> {
    let mut generator = args.model.load()?;
    let options = args.sampling.options(&generator)?;
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => ids.clone(),
        (Some(text), None) if args.raw => generator.encode(text)?,
        (Some(text), None) => {
            let mut messages = Vec::new();
            if let Some(s) = &args.system {
                messages.push(json!({"role": "system", "content": s}));
            }
            messages.push(json!({"role": "user", "content": text}));
            generator.chat_prompt(&messages, &render_options(args.thinking))?.1
        }
        (None, None) => bail!("pass --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let streaming = !args.json && generator.tokenizer.is_some();
    let mut stdout = std::io::stdout().lock();
    let output = generator.generate(&prompt_ids, &options, |event| {
        if streaming {
            let _ = stdout.write_all(event.text.as_bytes());
            let _ = stdout.flush();
        }
        ControlFlow::Continue(())
    })?;
    if args.json {
        let value = json!({
            "prompt_ids": output.prompt_ids,
            "generated_ids": output.generated_ids,
            "text": output.text,
            "finish_reason": output.finish_reason,
            "timings": output.timings,
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&value)?)?;
    } else if streaming {
        writeln!(stdout)?;
    } else {
        let ids: Vec<String> = output.generated_ids.iter().map(u32::to_string).collect();
        writeln!(stdout, "{}", ids.join(","))?;
    }
    let t = &output.timings;
    tracing::info!(
        "{} prompt tokens, {} generated ({:?}); first token {:.1} ms, decode {:.1} tokens/s",
        t.prompt_tokens,
        t.generated_tokens,
        output.finish_reason,
        t.time_to_first_token_ms,
        t.decode_tokens_per_s
    );
    Ok(())
}

fn chat(args: ChatArgs) -> Result<()> {
    let mut generator = args.model.load()?;
    if generator.chat_template.is_none() {
        bail!("{} has no chat template; use `pio run --raw`", args.model.graphs.display());
    }
    let options = args.sampling.options(&generator)?;
    let render = render_options(args.thinking);
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    eprintln!("chatting with {} ({} on {}); /reset clears the history, /exit or Ctrl-D quits", generator.model.manifest.name, generator.model.manifest.precision.as_str(), args.model.ep);
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        write!(stdout, "> ")?;
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            writeln!(stdout)?;
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                messages.retain(|m| m["role"] == "system");
                continue;
            }
            _ => {}
        }
        messages.push(json!({"role": "user", "content": line}));
        let (_, ids) = generator.chat_prompt(&messages, &render)?;
        let output = generator.generate(&ids, &options, |event| {
            let _ = stdout.write_all(event.text.as_bytes());
            let _ = stdout.flush();
            ControlFlow::Continue(())
        })?;
        writeln!(stdout)?;
        tracing::debug!("{:.1} tokens/s", output.timings.decode_tokens_per_s);
        messages.push(json!({"role": "assistant", "content": output.text}));
    }
}

fn models() -> Result<()> {
    println!(
        "{:<24} {:<36} {:>9} {:>9} {:>10} {:>10} {:>10}  {}",
        "preset", "hugging face repo", "params", "active", "bf16", "int4", "kv/token", "fits one 80 GB GPU"
    );
    for preset in PRESETS {
        let meta = PluginMetadata::of(preset).with_context(|| format!("preset {}", preset.name))?;
        let bytes = |p: Precision| meta.memory.iter().find(|m| m.precision == p).map(|m| m.weight_bytes).unwrap_or(0);
        let (bf16, int4) = (bytes(Precision::Bf16), bytes(Precision::Int4));
        let fits = if bf16 < 70_000_000_000 {
            "yes (bf16)".to_string()
        } else if int4 < 70_000_000_000 {
            "int4 only".to_string()
        } else {
            format!("no: needs {}+ GPUs of 80 GB even in int4", (int4 as f64 / 70e9).ceil() as u64)
        };
        println!(
            "{:<24} {:<36} {:>9} {:>9} {:>10} {:>10} {:>10}  {}",
            meta.name,
            meta.hf_repo,
            format_params(meta.parameters.total),
            format_params(meta.parameters.active),
            format_bytes(bf16),
            format_bytes(int4),
            format_bytes(meta.kv_bytes_per_token_bf16),
            fits
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    pio_models::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Chat(a) => chat(a),
        Command::Models => models(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
