//! The serving engine embedded in a small tokio service: a TCP line protocol where each line a
//! client sends is a prompt (a user message through the chat template; comma-separated token
//! ids for a graph without a tokenizer), and the answer streams back as it is generated, then a
//! summary line. Connections are served concurrently and the engine batches their requests; a
//! client that disconnects cancels its request (its handle is dropped).
//!
//! ```text
//! cargo run --release -p pio-runtime --example engine_service -- graphs/qwen3-4b-instruct-2507-fp32 127.0.0.1:7000
//! printf 'Name three rivers.\n' | nc 127.0.0.1 7000
//! ```

use std::error::Error;

use pio_runtime::engine::{Engine, EngineConfig, Event, Prompt, Request};
use pio_runtime::generate::GenerateOptions;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let graphs = args.next().ok_or("usage: engine_service GRAPHS_DIR [ADDR]")?;
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7000".to_string());
    // Loading the model blocks: it runs off the async threads.
    let engine =
        tokio::task::spawn_blocking(move || EngineConfig::builder(graphs).build().and_then(Engine::start)).await??;
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (socket, peer) = listener.accept().await?;
        // The engine handle is cheap to clone; each connection gets its own.
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(&engine, socket).await {
                eprintln!("{peer}: {e}");
            }
        });
    }
}

/// Answers each line of one connection in turn.
async fn serve(engine: &Engine, socket: TcpStream) -> Result<(), BoxError> {
    let (reader, mut writer) = socket.into_split();
    let mut lines = BufReader::new(reader).lines();
    let info = engine.model_info();
    while let Some(line) = lines.next_line().await? {
        let prompt = if info.has_chat_template {
            Prompt::Chat(vec![json!({"role": "user", "content": line})])
        } else {
            Prompt::Ids(line.split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>()?)
        };
        let options =
            GenerateOptions { max_tokens: Some(128), sampling: info.default_sampling.clone(), ..Default::default() };
        // Checks and tokenizes here; refusals (a bad field, a prompt too long, a full queue)
        // come back at once.
        let mut handle = match engine.submit(Request::new(prompt).with_options(options)) {
            Ok(handle) => handle,
            Err(e) => {
                writer.write_all(format!("error: {e}\n").as_bytes()).await?;
                continue;
            }
        };
        while let Some(event) = handle.next_event().await {
            match event? {
                Event::Token(token) if info.has_tokenizer => writer.write_all(token.text.as_bytes()).await?,
                Event::Token(token) => writer.write_all(format!("{} ", token.token_id).as_bytes()).await?,
                // Not asked for here (`prompt_logprobs`).
                Event::PromptLogprobs(_) => {}
                Event::Finished(output) => {
                    let t = &output.timings;
                    let summary = format!(
                        "\n[{} tokens, {}; first token {:.1} ms, {} prompt tokens from the prefix cache]\n",
                        output.generated_ids.len(),
                        output.finish_reason.as_str(),
                        t.time_to_first_token_ms,
                        t.cached_prompt_tokens
                    );
                    writer.write_all(summary.as_bytes()).await?;
                }
            }
        }
        // A failed write returns early: `handle` is dropped there, which cancels the request.
    }
    Ok(())
}
