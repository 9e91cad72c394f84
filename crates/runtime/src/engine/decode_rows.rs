//! The rows of a batched decode step, one per slot 0..n, and which of them can run together.
//!
//! A multimodal (MRoPE) decoder builds one rotary table per step, indexed by cache slot: a row
//! whose cache holds `past` tokens is rotated with table row `past` (see the export's
//! `rotary.rs`). So rows at the same slot must carry the same position there:
//!
//! * rows that do not decode (free slots, slots between prefill chunks) run a dummy token whose
//!   KV nothing reads; they take the position the table holds at their slot anyway: the one of a
//!   decoding row at that slot, else the static table's (the slot itself, rope delta 0);
//! * two decoding rows at the same slot with different rope deltas (prompts with images of
//!   other shapes, at the same length: rare) cannot share the table. The first (lowest slot)
//!   keeps the batched run; each other one becomes a dummy row there and runs alone right after,
//!   as a batch-1 view of its slot, where its dummy KV is overwritten by its real token's.
//!
//! Text models have rope delta 0 everywhere: nothing ever runs apart.

use std::collections::HashMap;

/// One row of a decode batch: the token it runs, the tokens its slot holds before it, and its
/// rope delta (added to its position on all three axes of a multimodal rotary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecodeRow {
    pub token: u32,
    pub past: usize,
    pub delta: i64,
    /// Whether the row decodes (its output is read); otherwise it runs a dummy token.
    pub decoding: bool,
}

impl DecodeRow {
    pub(crate) fn decode(token: u32, past: usize, delta: i64) -> Self {
        DecodeRow { token, past, delta, decoding: true }
    }

    /// A row whose slot is not decoding (free, or between prefill chunks): it writes its token's
    /// KV at position `filled`, which the slot's next prefill chunk (or whoever takes a free
    /// slot) overwrites before anything attends to it.
    pub(crate) fn idle(filled: usize) -> Self {
        DecodeRow { token: 0, past: filled, delta: 0, decoding: false }
    }
}

/// Makes `rows` runnable as one step: idle rows take the delta of the decoding row at their
/// slot, and decoding rows that clash with an earlier one at the same slot become idle rows
/// there. Returns those (their index and their own row), to run alone after the batch.
pub(crate) fn separate_clashes(rows: &mut [DecodeRow]) -> Vec<(usize, DecodeRow)> {
    let mut at_slot: HashMap<usize, i64> = HashMap::new();
    let mut apart = Vec::new();
    for (i, row) in rows.iter_mut().enumerate().filter(|(_, r)| r.decoding) {
        match at_slot.get(&row.past) {
            None => {
                at_slot.insert(row.past, row.delta);
            }
            Some(&delta) if delta == row.delta => {}
            Some(&delta) => {
                apart.push((i, *row));
                *row = DecodeRow { delta, ..DecodeRow::idle(row.past) };
            }
        }
    }
    for row in rows.iter_mut().filter(|r| !r.decoding) {
        row.delta = at_slot.get(&row.past).copied().unwrap_or(0);
    }
    apart
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_rows_take_the_position_the_table_holds_at_their_slot() {
        let mut rows = [DecodeRow::decode(5, 40, -12), DecodeRow::idle(40), DecodeRow::idle(7), DecodeRow::idle(0)];
        assert!(separate_clashes(&mut rows).is_empty());
        assert_eq!(rows.map(|r| r.delta), [-12, -12, 0, 0]);
    }

    #[test]
    fn decoding_rows_that_clash_at_a_slot_run_apart() {
        // Slots 0 and 2 both hold 30 tokens with other deltas; slot 1 agrees with slot 0.
        let mut rows = [
            DecodeRow::decode(5, 30, -4),
            DecodeRow::decode(6, 30, -4),
            DecodeRow::decode(7, 30, -9),
            DecodeRow::decode(8, 12, 0),
            DecodeRow::idle(30),
        ];
        let apart = separate_clashes(&mut rows);
        assert_eq!(apart, vec![(2, DecodeRow::decode(7, 30, -9))]);
        assert_eq!(rows[2], DecodeRow { token: 0, past: 30, delta: -4, decoding: false });
        assert_eq!(rows[4].delta, -4, "an idle row follows the row the batch keeps");
        assert!(rows[..2].iter().all(|r| r.decoding) && rows[3].decoding);
        // Nothing left to separate once separated.
        assert!(separate_clashes(&mut rows).is_empty());
    }
}
