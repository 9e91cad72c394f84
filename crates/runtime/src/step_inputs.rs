//! The inputs of one forward pass besides the KV cache: token ids, positions and the attention
//! mask of some rows (sequences) of a cache, each row running the same number of new tokens
//! after a past of its own length.
//!
//! Everything a step feeds the graph is built here, in one place: GroupQueryAttention reads each
//! row's length from its mask row (`seqlens_k = ReduceSum(mask) - 1`), and its rotary from
//! `position_ids`, so rows of different lengths share one batched decode step. Inputs beyond text
//! (3D rotary positions with a per-sequence offset, image features for a prefill chunk) extend
//! this type rather than the code that binds it.

use anyhow::{bail, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepInputs {
    /// Row-major (rows, seq_len).
    tokens: Vec<u32>,
    seq_len: usize,
    /// Tokens each row's cache holds before the step; its new tokens go at past..past + seq_len.
    past_lens: Vec<usize>,
}

impl StepInputs {
    /// `tokens` row-major (rows, seq_len), one row per entry of `past_lens`.
    pub fn new(tokens: Vec<u32>, past_lens: Vec<usize>) -> Result<Self> {
        let rows = past_lens.len();
        if rows == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(rows) {
            bail!("a step needs the same positive number of tokens for each of the {rows} sequences");
        }
        Ok(StepInputs { seq_len: tokens.len() / rows, tokens, past_lens })
    }

    /// `rows` sequences that all hold `past` tokens.
    pub fn uniform(tokens: Vec<u32>, rows: usize, past: usize) -> Result<Self> {
        Self::new(tokens, vec![past; rows])
    }

    pub fn rows(&self) -> usize {
        self.past_lens.len()
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn past_lens(&self) -> &[usize] {
        &self.past_lens
    }

    /// The longest row after the step: the mask's width when it spans only what is used.
    pub fn total_len(&self) -> usize {
        self.past_lens.iter().max().copied().unwrap_or(0) + self.seq_len
    }

    pub(crate) fn input_ids(&self) -> Vec<i64> {
        self.tokens.iter().map(|&t| t as i64).collect()
    }

    /// Row r's positions past_lens[r]..past_lens[r] + seq_len.
    pub(crate) fn position_ids(&self) -> Vec<i64> {
        self.past_lens.iter().flat_map(|&p| p as i64..(p + self.seq_len) as i64).collect()
    }

    /// (rows, width), row r with ones over its past_lens[r] + seq_len tokens and zeros after:
    /// GroupQueryAttention takes each row's length from it; the unfused attention masks keys
    /// with it. `width` must be at least [`total_len`](Self::total_len).
    pub(crate) fn attention_mask(&self, width: usize) -> Vec<i64> {
        let mut mask = vec![0i64; self.rows() * width];
        for (row, &past) in self.past_lens.iter().enumerate() {
            mask[row * width..row * width + past + self.seq_len].fill(1);
        }
        mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_different_lengths_get_their_own_positions_and_mask_rows() {
        let inputs = StepInputs::new(vec![5, 6, 7], vec![2, 0, 4]).unwrap();
        assert_eq!((inputs.rows(), inputs.seq_len(), inputs.total_len()), (3, 1, 5));
        assert_eq!(inputs.position_ids(), vec![2, 0, 4]);
        assert_eq!(inputs.attention_mask(6), vec![1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0]);
        let chunk = StepInputs::uniform(vec![1, 2, 3], 1, 4).unwrap();
        assert_eq!(chunk.position_ids(), vec![4, 5, 6]);
        assert_eq!(chunk.attention_mask(chunk.total_len()), vec![1; 7]);
    }

    #[test]
    fn ragged_tokens_are_refused() {
        assert!(StepInputs::new(vec![1, 2, 3], vec![0, 0]).is_err());
        assert!(StepInputs::new(vec![], vec![0]).is_err());
        assert!(StepInputs::new(vec![1], vec![]).is_err());
    }
}
