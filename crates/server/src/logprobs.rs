//! Generated tokens' logprobs in each endpoint's shape: chat's `{"content": [{"token",
//! "logprob", "bytes", "top_logprobs"}]}` and completions' parallel lists (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset`), where an echoed prompt's tokens come
//! first; and the prompt's in vLLM's `prompt_logprobs` shape.

use pio_runtime::generate::TokenEvent;
use pio_runtime::sampling::PromptTokenLogprob;

use crate::protocol::response::{
    ChatLogprobs, CompletionLogprobs, OrderedMap, PromptLogprob, PromptLogprobMap, TokenLogprob, TopLogprob,
};
use crate::token_text::Spelling;

impl ChatLogprobs {
    /// Adds `event`'s token (events without a logprob, such as the held-back text at the end,
    /// have no token of their own).
    pub(crate) fn push(&mut self, event: &TokenEvent, text: Spelling<'_>) {
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
pub(crate) fn offset_step(event: &TokenEvent, text: Spelling<'_>) -> usize {
    match event.logprob {
        Some(_) => text.token(event.token_id).0.chars().count(),
        None => 0,
    }
}

impl CompletionLogprobs {
    /// Adds `event`'s token, which starts at character `offset` of the completion's text.
    pub(crate) fn push(&mut self, event: &TokenEvent, offset: usize, text: Spelling<'_>) {
        let Some(logprob) = event.logprob else { return };
        self.tokens.push(text.token(event.token_id).0);
        self.token_logprobs.push(Some(logprob));
        self.top_logprobs
            .push(Some(OrderedMap(event.top_logprobs.iter().map(|t| (text.token(t.token).0, t.logprob)).collect())));
        self.text_offset.push(offset);
    }

    /// Adds an echoed prompt's tokens (`ids`, scored in `scores`, None for the first) with `top`
    /// alternatives each, the first starting at character `offset`; returns the offset after
    /// them.
    pub(crate) fn push_prompt(
        &mut self,
        ids: &[u32],
        scores: &[Option<PromptTokenLogprob>],
        top: usize,
        mut offset: usize,
        text: Spelling<'_>,
    ) -> usize {
        for (i, &id) in ids.iter().enumerate() {
            let token = text.token(id).0;
            let score = scores.get(i).and_then(Option::as_ref);
            self.token_logprobs.push(score.map(|s| s.logprob));
            self.top_logprobs.push(score.map(|s| {
                OrderedMap(s.top_logprobs.iter().take(top).map(|t| (text.token(t.token).0, t.logprob)).collect())
            }));
            self.text_offset.push(offset);
            offset += token.chars().count();
            self.tokens.push(token);
        }
        offset
    }
}

/// vLLM's `prompt_logprobs`: per prompt position (None for the first), the prompt's token and
/// the `top` most likely ones, each with its logprob, rank and text.
pub(crate) fn prompt_logprobs(
    scores: &[Option<PromptTokenLogprob>],
    top: usize,
    text: Spelling<'_>,
) -> Vec<Option<PromptLogprobMap>> {
    let entry = |token: u32, logprob: f32, rank: usize| {
        (token, PromptLogprob { logprob, rank, decoded_token: text.token(token).0 })
    };
    scores
        .iter()
        .map(|score| {
            score.as_ref().map(|s| {
                let own = entry(s.token, s.logprob, s.rank);
                let others = s.top_logprobs.iter().take(top).enumerate().filter(|(_, t)| t.token != s.token);
                OrderedMap(std::iter::once(own).chain(others.map(|(i, t)| entry(t.token, t.logprob, i + 1))).collect())
            })
        })
        .collect()
}
