//! vLLM's vocabulary rules on a request's generated tokens: `allowed_token_ids` (only these may
//! be generated) and `bad_words` (token sequences that are never completed). Both mask logits
//! before sampling, as vLLM's logits processors do, so a request with either chooses on the host
//! from the logits rather than taking the graph's argmax.

use crate::tokenizer::Tokenizer;

use super::error::EngineError;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TokenRules {
    /// Sorted, without repeats (None: any token).
    allowed: Option<Vec<u32>>,
    /// Token sequences of the bad words: the last token of each is masked wherever the
    /// generated tokens end with the ones before it.
    bad_words: Vec<Vec<u32>>,
}

impl TokenRules {
    /// The rules of a request: `allowed` ids (checked against the vocabulary by the caller) and
    /// `bad_words`, tokenized as vLLM does (each word as written without its leading whitespace,
    /// and with one leading space, when that gives other tokens of the same count).
    pub(crate) fn new(
        allowed: Option<&[u32]>,
        bad_words: &[String],
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Self, EngineError> {
        let allowed = match allowed {
            Some([]) => return Err(EngineError::invalid("allowed_token_ids", "is empty: no token could be generated")),
            Some(ids) => {
                let mut ids = ids.to_vec();
                ids.sort_unstable();
                ids.dedup();
                Some(ids)
            }
            None => None,
        };
        let mut sequences: Vec<Vec<u32>> = Vec::new();
        if !bad_words.is_empty() {
            let Some(tokenizer) = tokenizer else {
                return Err(EngineError::invalid("bad_words", "bad words need a tokenizer, and this model has none"));
            };
            for word in bad_words {
                let word = word.trim_start();
                if word.is_empty() {
                    return Err(EngineError::invalid("bad_words", "holds an empty word"));
                }
                let encode = |text: &str| {
                    tokenizer
                        .encode(text, false)
                        .map_err(|e| EngineError::invalid_because("bad_words", format!("cannot tokenize {text:?}"), e))
                };
                let plain = encode(word)?;
                let spaced = encode(&format!(" {word}"))?;
                // vLLM's rule: the spaced form counts only where the space joins the first token.
                let spaced_differs = spaced.len() == plain.len() && spaced.first() != plain.first();
                sequences.push(plain);
                if spaced_differs {
                    sequences.push(spaced);
                }
            }
        }
        sequences.retain(|s| !s.is_empty());
        Ok(TokenRules { allowed, bad_words: sequences })
    }

    /// Whether an allowed token is left at the first generated token: not a one-token bad word,
    /// nor one of `also_masked` (the stop ids while `min_tokens` holds them back).
    pub(crate) fn leaves_a_first_token(&self, also_masked: &[u32]) -> bool {
        let Some(allowed) = &self.allowed else { return true };
        let banned = |id: &u32| also_masked.contains(id) || self.bad_words.iter().any(|w| w.as_slice() == [*id]);
        allowed.iter().any(|id| !banned(id))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.allowed.is_none() && self.bad_words.is_empty()
    }

    /// Sets to -inf the logits of the tokens these rules forbid after the `generated` tokens.
    pub(crate) fn apply(&self, row: &mut [f32], generated: &[u32]) {
        if let Some(allowed) = &self.allowed {
            let kept: Vec<(usize, f32)> =
                allowed.iter().filter_map(|&id| row.get(id as usize).map(|&v| (id as usize, v))).collect();
            row.fill(f32::NEG_INFINITY);
            for (id, v) in kept {
                row[id] = v;
            }
        }
        for word in &self.bad_words {
            let Some((&last, before)) = word.split_last() else { continue };
            if generated.ends_with(before) {
                if let Some(v) = row.get_mut(last as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_ids_keep_only_themselves_and_bad_words_mask_their_last_token_after_the_rest() {
        let rules = TokenRules { allowed: Some(vec![1, 3]), bad_words: vec![] };
        let mut row = vec![0.5, 1.0, 2.0, -1.0];
        rules.apply(&mut row, &[]);
        assert_eq!(row, [f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY, -1.0]);

        let rules = TokenRules { allowed: None, bad_words: vec![vec![2], vec![0, 1, 3]] };
        let mut row = vec![0.0; 4];
        rules.apply(&mut row, &[5, 0]);
        assert_eq!(row, [0.0, 0.0, f32::NEG_INFINITY, 0.0], "a one-token word always; [0, 1, 3] not after [.., 0]");
        let mut row = vec![0.0; 4];
        rules.apply(&mut row, &[0, 1]);
        assert_eq!(row, [0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY], "after [0, 1], 3 would complete it");
    }

    #[test]
    fn bad_words_are_tokenized_with_and_without_a_leading_space_and_need_a_tokenizer() {
        let tok = crate::tokenizer::tests::qwen3();
        let rules = TokenRules::new(None, &[" hello".to_string()], Some(&tok)).unwrap();
        let plain = tok.encode("hello", false).unwrap();
        let spaced = tok.encode(" hello", false).unwrap();
        assert_ne!(plain, spaced);
        assert_eq!(rules.bad_words, [plain, spaced]);
        let err = TokenRules::new(None, &["x".to_string()], None).unwrap_err().to_string();
        assert!(err.contains("bad_words"), "{err}");
        let only_hello = TokenRules::new(Some(&tok.encode("hello", false).unwrap()), &[], Some(&tok)).unwrap();
        assert!(only_hello.leaves_a_first_token(&[]));
        assert!(!only_hello.leaves_a_first_token(&tok.encode("hello", false).unwrap()), "min_tokens masks it");
        let banned = TokenRules::new(Some(&tok.encode("hello", false).unwrap()), &["hello".into()], Some(&tok));
        assert!(!banned.unwrap().leaves_a_first_token(&[]), "its own bad word");
        let err = TokenRules::new(Some(&[]), &[], None).unwrap_err().to_string();
        assert!(err.contains("allowed_token_ids"), "{err}");
        assert!(TokenRules::new(None, &["  ".to_string()], Some(&tok)).is_err());
    }
}
