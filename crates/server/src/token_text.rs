//! A token id as text for logprobs: its exact bytes, and those bytes as a string (lossy where a
//! token holds part of a UTF-8 character, which is what the `bytes` field is for).

use std::collections::HashMap;

use pio_runtime::tokenizer::Tokenizer;
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
}

/// The bytes a byte-level BPE piece spells (GPT-2's `bytes_to_unicode`, inverted): printable
/// bytes stand for themselves, the others were moved to U+0100 and up in order. None when a
/// character is not such a byte.
pub(crate) fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    piece.chars().map(byte_of_char).collect()
}

fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let code = c as u32;
    if code < 0x100 {
        return printable(code).then_some(code as u8);
    }
    // The n-th byte that is not printable is spelled as U+0100 + n.
    let n = code - 0x100;
    (0u32..0x100).filter(|&b| !printable(b)).nth(n as usize).map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_pieces_give_their_bytes() {
        // "Ġ" is the space (0x20, the 33rd non-printable byte), "Ċ" the newline.
        assert_eq!(byte_level_bytes("Ġhello").unwrap(), b" hello");
        assert_eq!(byte_level_bytes("Ċ").unwrap(), b"\n");
        // "é" in UTF-8 is c3 a9; byte-level spells it "Ã©".
        assert_eq!(byte_level_bytes("Ã©").unwrap(), "é".as_bytes());
        // Half a character: one byte, not valid UTF-8 alone.
        assert_eq!(byte_level_bytes("Ã").unwrap(), [0xc3]);
        assert_eq!(byte_level_bytes("中"), None);
        for b in 0u8..=255 {
            let spelled: Vec<char> =
                (0u32..0x200).filter_map(char::from_u32).filter(|&c| byte_of_char(c) == Some(b)).collect();
            assert_eq!(spelled.len(), 1, "byte {b:#x} is spelled {spelled:?}");
        }
    }
}
