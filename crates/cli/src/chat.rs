//! `pio chat`: a conversation in the terminal. Each line is a user message (with the images
//! attached by `/image PATH` before it, for a vision-language model); the reply streams as it
//! comes and joins the history, which goes through the chat template again each turn (the prefix
//! cache and the encoder cache make the repeated history and images cheap).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Result;
use pio_runtime::engine::{EngineError, Prompt, Request};
use pio_runtime::generate::GenerateOptions;
use serde_json::json;

use crate::preflight::GraphFolder;
use crate::{generate_streaming, render_options, user_message, ChatArgs};

/// What a line of input asks for.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Skip,
    Exit,
    Reset,
    Image(&'a str),
    Message(&'a str),
}

fn parse(line: &str) -> Line<'_> {
    match line.trim() {
        "" => Line::Skip,
        "/exit" | "/quit" => Line::Exit,
        "/reset" => Line::Reset,
        other => match other.strip_prefix("/image") {
            Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => Line::Image(rest.trim()),
            _ => Line::Message(other),
        },
    }
}

/// Whether `error` is about the request (a bad image, a prompt too long): reported, and the chat
/// goes on without that message.
fn is_request_error(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<EngineError>(),
        Some(EngineError::InvalidRequest { .. } | EngineError::ContextLength { .. })
    )
}

pub(crate) fn run(args: ChatArgs) -> Result<()> {
    if args.sampling.logprobs.is_some() {
        return Err(
            crate::preflight::Refused::new("--logprobs", "the chat prints text only: use pio run --json").into()
        );
    }
    let graphs = GraphFolder::inspect(&args.model.graphs)?;
    args.model.check_applies_to(&graphs)?;
    graphs.check_chat()?;
    graphs.check_stop(&args.sampling.stop)?;
    let engine = args.model.start()?;
    let options = args.sampling.engine_options(&engine)?;
    let render = render_options(args.thinking);
    let image_limits = args.model.image_limits();
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    let info = engine.model_info();
    let image_help = if info.takes_images { ", /image PATH attaches an image to your next message" } else { "" };
    eprintln!(
        "chatting with {} ({} on {}); /reset clears the history{image_help}, /exit or Ctrl-D quits",
        info.served_name, info.precision, args.model.ep
    );
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut images: Vec<PathBuf> = Vec::new();
    loop {
        write!(stdout, "> ")?;
        stdout.flush()?;
        let mut bytes = Vec::new();
        if stdin.lock().read_until(b'\n', &mut bytes)? == 0 {
            writeln!(stdout)?;
            return Ok(());
        }
        // A line that is not UTF-8 (a terminal in another encoding) is refused, not the chat ended.
        let Ok(line) = String::from_utf8(bytes) else {
            eprintln!("that line is not UTF-8 text; set your terminal to UTF-8");
            continue;
        };
        let text = match parse(&line) {
            Line::Skip => continue,
            Line::Exit => return Ok(()),
            Line::Reset => {
                messages.retain(|m| m["role"] == "system");
                images.clear();
                continue;
            }
            Line::Image(_) if !info.takes_images => {
                eprintln!("{} takes no images", info.served_name);
                continue;
            }
            Line::Image("") => {
                eprintln!("usage: /image PATH");
                continue;
            }
            Line::Image(path) => {
                // Decoded now (a few milliseconds) so that a bad file is named here, not with the
                // message it would have joined.
                let image = PathBuf::from(path);
                match crate::preflight::check_image("/image", &image, &image_limits) {
                    Ok(()) => {
                        images.push(image);
                        eprintln!("{} image(s) attached to your next message", images.len());
                    }
                    Err(e) => eprintln!("not attached: {e:#}"),
                }
                continue;
            }
            Line::Message(text) => text,
        };
        messages.push(user_message(text, &std::mem::take(&mut images)));
        let prompt = Prompt::Chat(messages.clone());
        // The reply gets what the sequence has room for, up to --max-tokens; a conversation that
        // leaves no room for one token is refused here, in the chat's terms.
        let reply = engine.tokenize(&prompt, &render).map_err(anyhow::Error::from).and_then(|ids| {
            let room = info.max_model_len.saturating_sub(ids.len());
            if room == 0 {
                return Err(anyhow::Error::from(ConversationTooLong { tokens: ids.len(), max: info.max_model_len }));
            }
            let options = GenerateOptions { max_tokens: options.max_tokens.map(|n| n.min(room)), ..options.clone() };
            generate_streaming(&engine, Request::new(prompt).with_options(options).with_render(render.clone()), true)
        });
        match reply {
            Ok(output) => {
                writeln!(stdout)?;
                tracing::debug!("{:.1} tokens/s", output.timings.decode_tokens_per_s);
                messages.push(json!({"role": "assistant", "content": output.text}));
            }
            Err(e) if is_request_error(&e) || e.is::<ConversationTooLong>() => {
                // That message (and its images) never happened.
                messages.pop();
                eprintln!("{e:#}");
            }
            Err(e) => return Err(e),
        }
    }
}

/// The conversation with the new message leaves no room for a reply in one sequence.
#[derive(Debug, thiserror::Error)]
#[error(
    "this message makes the conversation {tokens} tokens, and a sequence holds at most {max} with the reply: \
     it was not sent; /reset clears the history"
)]
struct ConversationTooLong {
    tokens: usize,
    max: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_commands_images_or_messages() {
        assert_eq!(parse("  \n"), Line::Skip);
        assert_eq!(parse("/quit\n"), Line::Exit);
        assert_eq!(parse("/reset"), Line::Reset);
        assert_eq!(parse("/image  photos/cat one.jpg \n"), Line::Image("photos/cat one.jpg"));
        assert_eq!(parse("/image"), Line::Image(""));
        assert_eq!(parse("/imagery is a word"), Line::Message("/imagery is a word"));
        assert_eq!(parse("What is this?"), Line::Message("What is this?"));
    }
}
