//! The inputs of one forward pass besides the KV cache: token ids, positions and the attention
//! mask of some rows (sequences) of a cache, each row running the same number of new tokens
//! after a past of its own length, and for a vision-language decoder the image rows of the
//! step's image-pad tokens.
//!
//! Everything a step feeds the graph is built here, in one place: GroupQueryAttention reads each
//! row's length from its mask row (`seqlens_k = ReduceSum(mask) - 1`), and its rotary from
//! `position_ids`, so rows of different lengths share one batched decode step.
//!
//! Positions: a text graph takes row r's token s at position past_r + s. A multimodal (MRoPE)
//! graph takes three (t, h, w): past_r + s + delta_r on all three for text tokens (delta_r is the
//! row's rope delta, 0 unless its prompt had images), or the positions a prompt chunk with images
//! was given ([`StepInputs::with_axis_positions`], transformers' rope index).

use std::collections::HashMap;
use std::sync::Arc;

use crate::model_error::{ModelError, Result};

use crate::vision::ImageFeatures;

#[derive(Clone, Debug)]
pub struct StepInputs {
    /// Row-major (rows, seq_len).
    tokens: Vec<u32>,
    seq_len: usize,
    /// Tokens each row's cache holds before the step; its new tokens go at past..past + seq_len.
    past_lens: Vec<usize>,
    /// Per row, added to each token's position on every axis (the rope delta).
    rope_deltas: Vec<i64>,
    /// (t, h, w) positions of every token, row-major (rows, seq_len), when given.
    axis_positions: Option<[Vec<i64>; 3]>,
    /// The image rows of the step's image-pad tokens, in order (row-major over rows and tokens).
    images: Option<Arc<ImageFeatures>>,
}

impl StepInputs {
    /// `tokens` row-major (rows, seq_len), one row per entry of `past_lens`.
    pub fn new(tokens: Vec<u32>, past_lens: Vec<usize>) -> Result<Self> {
        let rows = past_lens.len();
        if rows == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(rows) {
            return Err(ModelError::Step(format!(
                "a step needs the same positive number of tokens for each of the {rows} sequences"
            )));
        }
        Ok(StepInputs {
            seq_len: tokens.len() / rows,
            tokens,
            rope_deltas: vec![0; rows],
            past_lens,
            axis_positions: None,
            images: None,
        })
    }

    /// `rows` sequences that all hold `past` tokens.
    pub fn uniform(tokens: Vec<u32>, rows: usize, past: usize) -> Result<Self> {
        Self::new(tokens, vec![past; rows])
    }

    /// Each row's rope delta, added to its positions on all three axes of a multimodal rotary
    /// (the decode steps of a prompt that had images). Text graphs take only zeros.
    pub fn with_rope_deltas(mut self, deltas: Vec<i64>) -> Result<Self> {
        if deltas.len() != self.rows() {
            return Err(ModelError::Step(format!("{} rope deltas for a step of {} rows", deltas.len(), self.rows())));
        }
        self.rope_deltas = deltas;
        Ok(self)
    }

    /// The (t, h, w) position of every token, row-major (rows, seq_len) per axis: a prompt chunk
    /// with images (transformers' rope index).
    pub fn with_axis_positions(mut self, positions: [Vec<i64>; 3]) -> Result<Self> {
        if positions.iter().any(|axis| axis.len() != self.tokens.len()) {
            return Err(ModelError::Step(format!(
                "each position axis needs {} entries (one per token of the step)",
                self.tokens.len()
            )));
        }
        self.axis_positions = Some(positions);
        Ok(self)
    }

    /// The image rows of the step's image-pad tokens, in order: one image's features, or the
    /// rows of several gathered for the step (see `ImageFeatures::gather`).
    pub fn with_images(mut self, images: Arc<ImageFeatures>) -> Self {
        self.images = Some(images);
        self
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

    pub fn rope_deltas(&self) -> &[i64] {
        &self.rope_deltas
    }

    pub fn images(&self) -> Option<&ImageFeatures> {
        self.images.as_deref()
    }

    /// Whether every position is its cache slot on every axis (text tokens, rope delta 0): what a
    /// text graph can take.
    pub fn has_plain_positions(&self) -> bool {
        self.axis_positions.is_none() && self.rope_deltas.iter().all(|&d| d == 0)
    }

    /// The longest row after the step: the mask's width when it spans only what is used.
    pub fn total_len(&self) -> usize {
        self.past_lens.iter().max().copied().unwrap_or(0) + self.seq_len
    }

    /// Rows `rows` of this step as a step of their own (a micro-batch of a pipelined step). A
    /// step with image rows is not split (its image rows follow its tokens across rows).
    pub(crate) fn select_rows(&self, rows: std::ops::Range<usize>) -> Result<StepInputs> {
        if self.images.is_some() {
            return Err(ModelError::Step("a step with image rows runs whole".into()));
        }
        if rows.is_empty() || rows.end > self.rows() {
            return Err(ModelError::Step(format!("rows {rows:?} of a step of {} rows", self.rows())));
        }
        let tokens = rows.start * self.seq_len..rows.end * self.seq_len;
        Ok(StepInputs {
            tokens: self.tokens[tokens.clone()].to_vec(),
            seq_len: self.seq_len,
            past_lens: self.past_lens[rows.clone()].to_vec(),
            rope_deltas: self.rope_deltas[rows].to_vec(),
            axis_positions: self
                .axis_positions
                .as_ref()
                .map(|axes| axes.clone().map(|axis| axis[tokens.clone()].to_vec())),
            images: None,
        })
    }

    pub(crate) fn input_ids(&self) -> Vec<i64> {
        self.tokens.iter().map(|&t| t as i64).collect()
    }

    /// Row r's positions past_lens[r]..past_lens[r] + seq_len (a text graph's one axis).
    pub(crate) fn position_ids(&self) -> Vec<i64> {
        self.past_lens.iter().flat_map(|&p| p as i64..(p + self.seq_len) as i64).collect()
    }

    /// The (3, rows, seq_len) t, h, w positions of a multimodal rotary, flattened: the given
    /// ones, else past + s + the row's rope delta on every axis.
    pub(crate) fn axis_position_ids(&self) -> Vec<i64> {
        if let Some(axes) = &self.axis_positions {
            return axes.concat();
        }
        let one: Vec<i64> = self
            .past_lens
            .iter()
            .zip(&self.rope_deltas)
            .flat_map(|(&p, &d)| (p as i64 + d)..(p + self.seq_len) as i64 + d)
            .collect();
        one.repeat(3)
    }

    /// A multimodal graph builds one rotary table per step, indexed by cache slot: rows whose
    /// tokens land on the same slot must have the same (t, h, w) position there. Returns the
    /// first slot where two rows disagree (their row indexes and the slot).
    pub fn slot_conflict(&self) -> Option<(usize, usize, usize)> {
        let axes = self.axis_position_ids();
        let n = self.tokens.len();
        let mut at_slot: HashMap<usize, (usize, [i64; 3])> = HashMap::new();
        for (row, &past) in self.past_lens.iter().enumerate() {
            for s in 0..self.seq_len {
                let i = row * self.seq_len + s;
                let position = [axes[i], axes[n + i], axes[2 * n + i]];
                match at_slot.insert(past + s, (row, position)) {
                    Some((other, earlier)) if earlier != position => return Some((other, row, past + s)),
                    _ => {}
                }
            }
        }
        None
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
    fn selected_rows_keep_their_tokens_pasts_deltas_and_positions() {
        let step = StepInputs::new(vec![1, 2, 3, 4, 5, 6], vec![3, 0, 7])
            .unwrap()
            .with_rope_deltas(vec![0, -1, 2])
            .unwrap()
            .with_axis_positions([vec![0, 1, 2, 3, 4, 5], vec![6, 7, 8, 9, 10, 11], vec![0; 6]])
            .unwrap();
        let tail = step.select_rows(1..3).unwrap();
        assert_eq!(
            (tail.tokens(), tail.past_lens(), tail.rope_deltas()),
            (&[3, 4, 5, 6][..], &[0, 7][..], &[-1, 2][..])
        );
        assert_eq!(tail.axis_position_ids(), vec![2, 3, 4, 5, 8, 9, 10, 11, 0, 0, 0, 0]);
        assert!(step.select_rows(2..4).is_err());
        assert!(step.select_rows(1..1).is_err());
    }

    #[test]
    fn ragged_tokens_are_refused() {
        assert!(StepInputs::new(vec![1, 2, 3], vec![0, 0]).is_err());
        assert!(StepInputs::new(vec![], vec![0]).is_err());
        assert!(StepInputs::new(vec![1], vec![]).is_err());
        let step = StepInputs::new(vec![1, 2], vec![0, 0]).unwrap();
        assert!(step.with_rope_deltas(vec![1]).is_err());
        let step = StepInputs::new(vec![1, 2], vec![0]).unwrap();
        assert!(step.with_axis_positions([vec![0, 1], vec![0, 1], vec![0]]).is_err());
    }

    #[test]
    fn rope_deltas_move_every_axis_and_given_positions_win() {
        let step = StepInputs::new(vec![5, 6], vec![3, 7]).unwrap().with_rope_deltas(vec![-2, 0]).unwrap();
        assert!(!step.has_plain_positions());
        assert_eq!(step.axis_position_ids(), vec![1, 7, 1, 7, 1, 7]);
        let chunk = StepInputs::new(vec![1, 2, 3], vec![0])
            .unwrap()
            .with_axis_positions([vec![0, 1, 1], vec![0, 1, 2], vec![0, 2, 1]])
            .unwrap();
        assert_eq!(chunk.axis_position_ids(), vec![0, 1, 1, 0, 1, 2, 0, 2, 1]);
        assert!(StepInputs::new(vec![1], vec![4]).unwrap().has_plain_positions());
    }

    #[test]
    fn rows_sharing_a_slot_must_agree_on_its_position() {
        // Rows 0 and 2 decode at slot 5: the same delta agrees, another does not.
        let agree = StepInputs::new(vec![1, 2, 3], vec![5, 3, 5]).unwrap().with_rope_deltas(vec![-4, 0, -4]).unwrap();
        assert_eq!(agree.slot_conflict(), None);
        let clash = StepInputs::new(vec![1, 2, 3], vec![5, 3, 5]).unwrap().with_rope_deltas(vec![-4, 0, 2]).unwrap();
        assert_eq!(clash.slot_conflict(), Some((0, 2, 5)));
        // A first prompt of two rows: every slot shared, text positions agree.
        assert_eq!(StepInputs::uniform(vec![1, 2, 3, 4], 2, 0).unwrap().slot_conflict(), None);
    }
}
