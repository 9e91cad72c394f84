//! A token id as text for logprobs: its exact bytes, and those bytes as a string (lossy where a
//! token holds part of a UTF-8 character, which is what the `bytes` field is for).

use std::collections::HashMap;

use pio_runtime::tokenizer::{byte_level_bytes, Tokenizer};
use tokenizers::DecoderWrapper;

pub(crate) struct TokenText {
    tokenizer: Option<Tokenizer>,
    /// GPT-2 style byte-level vocabularies (Qwen3, GLM) spell each byte as one character.
    byte_level: bool,
    /// Added and special tokens: their content as written.
    added: HashMap<u32, String>,
}

impl TokenText {
    pub(crate) fn new(tokenizer: Option<&Tokenizer>) -> Self {
        let byte_level =
            tokenizer.is_some_and(|t| matches!(t.inner().get_decoder(), Some(DecoderWrapper::ByteLevel(_))));
        let added = tokenizer
            .map(|t| t.inner().get_added_tokens_decoder().into_iter().map(|(id, token)| (id, token.content)).collect())
            .unwrap_or_default();
        TokenText { tokenizer: tokenizer.cloned(), byte_level, added }
    }

    /// The token's bytes.
    pub(crate) fn bytes(&self, id: u32) -> Vec<u8> {
        let Some(tokenizer) = &self.tokenizer else {
            // vLLM's spelling when it has no tokenizer.
            return format!("token_id:{id}").into_bytes();
        };
        if let Some(content) = self.added.get(&id) {
            return content.as_bytes().to_vec();
        }
        if self.byte_level {
            if let Some(bytes) = tokenizer.id_to_token(id).and_then(|piece| byte_level_bytes(&piece)) {
                return bytes;
            }
        }
        tokenizer.decode(&[id], false).map(String::into_bytes).unwrap_or_default()
    }

    /// The token as a string and its bytes.
    pub(crate) fn token(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.bytes(id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// How one request's logprobs spell tokens: as their text, or as `token_id:ID` (`as_ids`).
    pub(crate) fn spelling(&self, as_ids: bool) -> Spelling<'_> {
        Spelling { text: self, as_ids }
    }
}

/// A request's way of spelling tokens in its logprobs: their text, or, with vLLM's
/// `return_tokens_as_token_ids`, `token_id:ID` (which a client maps back to the id whatever the
/// token's bytes).
#[derive(Clone, Copy)]
pub(crate) struct Spelling<'a> {
    text: &'a TokenText,
    as_ids: bool,
}

impl Spelling<'_> {
    /// The token as the request spells it, and that string's bytes (the token's own bytes when
    /// spelled as text).
    pub(crate) fn token(&self, id: u32) -> (String, Vec<u8>) {
        if self.as_ids {
            let spelled = format!("token_id:{id}");
            let bytes = spelled.clone().into_bytes();
            return (spelled, bytes);
        }
        self.text.token(id)
    }
}
