//! Generated tokens' logprobs in each endpoint's shape: chat's `{"content": [{"token",
//! "logprob", "bytes", "top_logprobs"}]}` and completions' parallel lists (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset`).

use pio_runtime::generate::TokenEvent;

use crate::protocol::response::{ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob, TopLogprobMap};
use crate::token_text::TokenText;

impl ChatLogprobs {
    /// Adds `event`'s token (events without a logprob, such as the held-back text at the end,
    /// have no token of their own).
    pub(crate) fn push(&mut self, event: &TokenEvent, text: &TokenText) {
        let Some(logprob) = event.logprob else { return };
        let (token, bytes) = text.token(event.token_id);
        let top_logprobs = event
            .top_logprobs
            .iter()
            .map(|t| {
                let (token, bytes) = text.token(t.token);
                TopLogprob { token, logprob: t.logprob, bytes }
            })
            .collect();
        self.content.push(TokenLogprob { token, logprob, bytes, top_logprobs });
    }
}

/// Characters from `event`'s token to the next one's `text_offset`: the token's own text, as
/// vLLM counts it. Counting the text the engine released instead would give a token whose text
/// was held back (the start of a possible stop string, part of a UTF-8 character) the offset of
/// the token after it.
pub(crate) fn offset_step(event: &TokenEvent, text: &TokenText) -> usize {
    match event.logprob {
        Some(_) => text.token(event.token_id).0.chars().count(),
        None => 0,
    }
}

impl CompletionLogprobs {
    /// Adds `event`'s token, which starts at character `offset` of the completion's text.
    pub(crate) fn push(&mut self, event: &TokenEvent, offset: usize, text: &TokenText) {
        let Some(logprob) = event.logprob else { return };
        self.tokens.push(text.token(event.token_id).0);
        self.token_logprobs.push(logprob);
        self.top_logprobs
            .push(TopLogprobMap(event.top_logprobs.iter().map(|t| (text.token(t.token).0, t.logprob)).collect()));
        self.text_offset.push(offset);
    }
}
