//! Structured outputs (constrained decoding) on llguidance, the library behind vLLM's and
//! llama.cpp's guidance backends: a [`StructuredOutput`] (a JSON schema, any JSON object, a
//! regex, a list of choices, a Lark grammar) is compiled into a matcher that says, before each
//! token, which tokens keep the text inside the constraint. The engine masks the others out of
//! the logits and feeds the chosen token back.
//!
//! llguidance walks a token trie ([`TokTrie`]) of every token's bytes. `toktrie_hf_tokenizers`
//! builds one from a `tokenizers::Tokenizer`, but of tokenizers 0.21 (ours is 0.22, and the two
//! do not interoperate), so [`Guidance::new`] builds it from our tokenizer with that crate's
//! logic.

use std::error::Error as StdError;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokenizers::DecoderWrapper;

use crate::tokenizer::{byte_level_bytes, Tokenizer};

/// What the generated text must be. `Json` and `JsonObject` text is JSON with at most
/// [`JSON_WHITESPACE`] between its tokens unless the schema's own `x-guidance` options say
/// otherwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StructuredOutput {
    /// JSON valid against this JSON schema.
    Json(Value),
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// Text the whole of which matches this regex (Rust `regex` syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this grammar, in llguidance's Lark syntax (vLLM's `grammar`).
    Grammar(String),
}

/// The whitespace a JSON constraint allows between tokens, as llama.cpp's JSON grammars have it: a
/// space, or a newline and an indent of up to 20 spaces or tabs. llguidance's default allows any
/// run of whitespace, in which a weak (or random) model can stay until `max_tokens`.
pub const JSON_WHITESPACE: &str = r"(?:\x20|\x0A[\x20\x09]{0,20})";

/// Why a constraint cannot be set up or compiled, or failed while generating.
#[derive(Debug, thiserror::Error)]
pub enum StructuredError {
    /// The tokenizer's decoder is neither byte-level BPE nor byte fallback: token bytes unknown.
    #[error("the tokenizer's decoder is neither byte-level nor byte-fallback, so its tokens' bytes are unknown")]
    UnsupportedTokenizer,
    /// The tokenizer has more ids than the model has vocabulary rows.
    #[error("the tokenizer has {tokenizer} token ids, more than the model's vocabulary of {model}")]
    VocabularyMismatch { tokenizer: usize, model: usize },
    /// Neither the model nor the tokenizer names an end-of-sequence token.
    #[error("neither the model nor its tokenizer names an end-of-sequence token")]
    NoEos,
    /// A byte-fallback token `<0xNN>` whose hex does not parse.
    #[error("token {id} ({name:?}) is not a byte")]
    BadByteToken {
        id: u32,
        name: String,
        #[source]
        source: std::num::ParseIntError,
    },
    /// Reading the tokenizer's `Replace` decoder (its pattern is private: serialized to read it).
    #[error("reading the tokenizer's decoder")]
    Decoder(#[source] serde_json::Error),
    /// llguidance could not set up its token tables.
    #[error("cannot set up the token tables")]
    Setup(#[source] Box<dyn StdError + Send + Sync>),
    /// `Choice` with no choices.
    #[error("the list of choices is empty")]
    NoChoices,
    /// The constraint does not compile (llguidance's message).
    #[error("does not compile")]
    Compile(#[source] Box<dyn StdError + Send + Sync>),
    /// The constraint admits no text at all.
    #[error("admits no text: no token can start it")]
    Empty,
    /// The matcher failed while generating (llguidance gives only its message).
    #[error("the structured-output constraint failed while generating: {0}")]
    Matcher(String),
}

/// The token trie of one model and the parser factory built on it: made once per engine (150k
/// tokens take a while) and shared by every constrained request.
pub struct Guidance {
    factory: ParserFactory,
}

impl std::fmt::Debug for Guidance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guidance").field("vocab_size", &self.factory.tok_env().tok_trie().vocab_size()).finish()
    }
}

impl Guidance {
    /// The trie of `tokenizer`'s tokens over the model's `vocab_size` rows (ids past the
    /// tokenizer's are never allowed), `eos` ending a constrained text (the model's eos ids; the
    /// tokenizer's when empty).
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos: &[u32]) -> Result<Self, StructuredError> {
        let env = TrieEnv::new(tokenizer, vocab_size, eos)?;
        let env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| StructuredError::Setup(e.into()))?;
        // Its warnings and errors reach the caller as errors; nothing on stderr.
        factory.quiet();
        Ok(Guidance { factory })
    }

    pub fn tok_trie(&self) -> &TokTrie {
        self.factory.tok_env().tok_trie()
    }

    /// Compiles `output` and computes its first mask (so that a constraint no text satisfies is
    /// refused now, not after the prompt ran).
    pub fn compile(&self, output: &StructuredOutput) -> Result<Constraint, StructuredError> {
        let grammar = match output {
            StructuredOutput::Json(schema) => TopLevelGrammar::from_json_schema(with_json_defaults(schema.clone())),
            StructuredOutput::JsonObject => {
                TopLevelGrammar::from_json_schema(with_json_defaults(json!({"type": "object"})))
            }
            StructuredOutput::Regex(rx) => TopLevelGrammar::from_regex(rx),
            StructuredOutput::Choice(choices) if choices.is_empty() => return Err(StructuredError::NoChoices),
            StructuredOutput::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            StructuredOutput::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| StructuredError::Compile(e.into()))?;
        let mut matcher = Matcher::new(Ok(parser));
        let first = matcher.compute_mask().map_err(|e| StructuredError::Compile(e.into()))?;
        if first.is_zero() {
            return Err(StructuredError::Empty);
        }
        Ok(Constraint { matcher, next_mask: Some(first) })
    }
}

/// A JSON schema with our whitespace default, unless its `x-guidance` sets its own options.
fn with_json_defaults(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(|| json!({"whitespace_pattern": JSON_WHITESPACE}));
    }
    schema
}

/// One sequence's constraint: the tokens allowed next, and the chosen ones fed back.
pub struct Constraint {
    matcher: Matcher,
    /// The mask computed ahead (the first one, at compilation).
    next_mask: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// The tokens that keep the text inside the constraint (the eos ids once it may end).
    pub fn mask(&mut self) -> Result<SimpleVob, StructuredError> {
        if let Some(mask) = self.next_mask.take() {
            return Ok(mask);
        }
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| StructuredError::Matcher(format!("{e:#}")))?;
        if mask.is_zero() {
            return Err(StructuredError::Matcher("no token is allowed next".into()));
        }
        Ok(mask)
    }

    /// Sets the logits of the tokens `mask` does not allow to -inf (and every row past the
    /// trie's vocabulary).
    pub fn apply(mask: &SimpleVob, logits: &mut [f32]) {
        let n = mask.len();
        for (id, v) in logits.iter_mut().enumerate() {
            if id >= n || !mask.is_allowed(id as TokenId) {
                *v = f32::NEG_INFINITY;
            }
        }
    }

    /// Feeds the chosen token.
    pub fn consume(&mut self, token: u32) -> Result<(), StructuredError> {
        self.next_mask = None;
        self.matcher.consume_token(token).map_err(|e| StructuredError::Matcher(format!("{e:#}")))
    }

    /// Whether the text is complete and nothing but an end may follow (the sequence stops, as
    /// vLLM's does when the grammar completes).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// The token environment llguidance asks for: the trie, and tokenizing bytes (the grammar's
/// forced text) with our tokenizer.
struct TrieEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            // The trie's greedy tokenization when the tokenizer fails (it does not for valid UTF-8).
            self.tokenizer.encode(text, false).unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}

impl TrieEnv {
    fn new(tokenizer: &Tokenizer, vocab_size: usize, eos: &[u32]) -> Result<Self, StructuredError> {
        let (mut words, detected_eos) = token_bytes(tokenizer.inner())?;
        if words.len() > vocab_size {
            return Err(StructuredError::VocabularyMismatch { tokenizer: words.len(), model: vocab_size });
        }
        // Rows the model has past the tokenizer's ids (Qwen3: 151,936 rows, 151,669 ids) are
        // special tokens no grammar allows, named as toktrie_hf_tokenizers names them.
        while words.len() < vocab_size {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let eos: Vec<u32> = match eos.iter().copied().filter(|&id| (id as usize) < vocab_size).collect::<Vec<_>>() {
            ids if !ids.is_empty() => ids,
            _ => detected_eos.into_iter().collect(),
        };
        let Some(&first) = eos.first() else { return Err(StructuredError::NoEos) };
        let info = TokRxInfo::new(vocab_size as u32, first);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        Ok(TrieEnv { trie, tokenizer: tokenizer.clone() })
    }
}

// The token bytes below follow toktrie_hf_tokenizers 1.9.1 (`ByteTokenizer::from_tokenizer`,
// https://github.com/guidance-ai/llguidance, MIT licensed, Copyright (c) Microsoft Corporation),
// ported to tokenizers 0.22 and without its panics.

#[derive(Default)]
struct DecoderKind {
    byte_level: bool,
    byte_fallback: bool,
    /// The character a `Replace` decoder turns into a space (SentencePiece's ▁).
    space: Option<char>,
}

fn decoder_kind(d: &DecoderWrapper, kind: &mut DecoderKind) -> Result<(), StructuredError> {
    match d {
        DecoderWrapper::ByteFallback(_) => kind.byte_fallback = true,
        DecoderWrapper::ByteLevel(_) => kind.byte_level = true,
        DecoderWrapper::Replace(r) if r.content == " " => {
            let v = serde_json::to_value(r).map_err(StructuredError::Decoder)?;
            if let Some(s) = v["pattern"]["String"].as_str() {
                let mut chars = s.chars();
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    kind.space = Some(c);
                }
            }
        }
        DecoderWrapper::Sequence(seq) => {
            for d in seq.get_decoders() {
                decoder_kind(d, kind)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Every token id's bytes (special tokens: the marker byte, then their name), and the eos id
/// the added tokens name, if one does.
fn token_bytes(hft: &tokenizers::Tokenizer) -> Result<(Vec<Vec<u8>>, Option<u32>), StructuredError> {
    let mut kind = DecoderKind::default();
    if let Some(d) = hft.get_decoder() {
        decoder_kind(d, &mut kind)?;
    }
    if !kind.byte_fallback && !kind.byte_level {
        return Err(StructuredError::UnsupportedTokenizer);
    }
    let vocab_size = hft.get_vocab_size(true);
    let mut words: Vec<Vec<u8>> = vec![Vec::new(); vocab_size];
    let mut specials = std::collections::HashSet::new();
    let mut eos = None;
    for (id, token) in hft.get_added_tokens_decoder() {
        let Some(word) = words.get_mut(id as usize) else { continue };
        // Added tokens of the form <...> count as special, as toktrie_hf_tokenizers has it.
        if token.special || (token.content.starts_with('<') && token.content.ends_with('>')) {
            if matches!(
                token.content.as_str(),
                "</s>" | "<|endoftext|>" | "<|end_of_text|>" | "<｜end▁of▁sentence｜>" | "<eos>"
            ) {
                eos = Some(id);
            }
            specials.insert(id);
        } else {
            *word = token.content.clone().into_bytes();
        }
    }
    for id in 0..vocab_size as u32 {
        let Some(name) = hft.id_to_token(id) else { continue };
        let bytes = if specials.contains(&id) {
            let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            bytes.extend_from_slice(name.as_bytes());
            bytes
        } else if kind.byte_fallback {
            if name.len() == 6 && name.starts_with("<0x") && name.ends_with('>') {
                let byte = u8::from_str_radix(&name[3..5], 16).map_err(|source| StructuredError::BadByteToken {
                    id,
                    name: name.clone(),
                    source,
                })?;
                vec![byte]
            } else {
                let name = match kind.space {
                    Some(c) => name.replace(c, " "),
                    None => name,
                };
                name.into_bytes()
            }
        } else {
            // Byte-level: a token whose characters are not all of the alphabet (an added
            // non-special token's raw text, kept above) stays as it was.
            match byte_level_bytes(&name) {
                Some(bytes) => bytes,
                None => continue,
            }
        };
        if let Some(word) = words.get_mut(id as usize) {
            *word = bytes;
        }
    }
    Ok((words, eos))
}

/// The `Guidance` of an engine, built on the first constrained request and then shared.
pub(crate) type SharedGuidance = std::sync::OnceLock<Result<Arc<Guidance>, Arc<StructuredError>>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::qwen3;

    fn id(tok: &Tokenizer, text: &str) -> u32 {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids.len(), 1, "{text:?} is one token: {ids:?}");
        ids[0]
    }

    #[test]
    fn qwen3_token_bytes_are_the_bytes_they_decode_to() {
        let tok = qwen3();
        let (words, eos) = token_bytes(tok.inner()).unwrap();
        for text in [" hello", "\n\n", "  ", "世界", "{\"", " 😀"] {
            let ids = tok.encode(text, false).unwrap();
            let bytes: Vec<u8> = ids.iter().flat_map(|&i| words[i as usize].clone()).collect();
            assert_eq!(bytes, text.as_bytes(), "{text:?} as {ids:?}");
        }
        assert_eq!(words[id(&tok, " hello") as usize], b" hello");
        assert_eq!(words[id(&tok, "\n\n") as usize], b"\n\n");
        // A token that is part of a character: the first bytes of one, not U+FFFD.
        let partial = (0..words.len()).find(|&i| words[i].len() == 1 && words[i][0] >= 0x80).unwrap();
        assert!(std::str::from_utf8(&words[partial]).is_err());
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        assert_eq!(words[im_end as usize][0], TokTrie::SPECIAL_TOKEN_MARKER);
        assert_eq!(&words[im_end as usize][1..], b"<|im_end|>");
        assert_eq!(eos, tok.token_to_id("<|endoftext|>"));
    }

    #[test]
    fn the_trie_covers_the_model_rows_past_the_tokenizer() {
        let tok = qwen3();
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        let g = Guidance::new(&tok, 151_936, &[im_end]).unwrap();
        let trie = g.tok_trie();
        assert_eq!(trie.vocab_size(), 151_936);
        assert!(trie.is_special_token(151_935));
        assert_eq!(trie.eos_token(), im_end);
        let err = Guidance::new(&tok, 1000, &[im_end]).unwrap_err();
        assert!(matches!(err, StructuredError::VocabularyMismatch { .. }), "{err}");
    }

    #[test]
    fn a_choice_allows_only_its_texts_and_then_only_eos() {
        let tok = qwen3();
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        let g = Guidance::new(&tok, 151_936, &[im_end]).unwrap();
        let mut c = g.compile(&StructuredOutput::Choice(vec!["yes".into(), "no".into()])).unwrap();
        let mask = c.mask().unwrap();
        let yes = id(&tok, "yes");
        assert!(mask.is_allowed(yes) && mask.is_allowed(id(&tok, "no")));
        assert!(!mask.is_allowed(id(&tok, "maybe")) && !mask.is_allowed(im_end));
        c.consume(yes).unwrap();
        assert!(c.is_finished(), "nothing may follow `yes`");
        let mut logits = vec![0.0; 151_936];
        let mut c = g.compile(&StructuredOutput::Regex("a+".into())).unwrap();
        Constraint::apply(&c.mask().unwrap(), &mut logits);
        assert_eq!(logits[id(&tok, "b") as usize], f32::NEG_INFINITY);
        assert_eq!(logits[id(&tok, "a") as usize], 0.0);
        assert!(matches!(g.compile(&StructuredOutput::Regex("(".into())), Err(StructuredError::Compile(_))));
        assert!(matches!(g.compile(&StructuredOutput::Choice(vec![])), Err(StructuredError::NoChoices)));
    }
}
