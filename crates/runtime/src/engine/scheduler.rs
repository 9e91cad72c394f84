//! What one engine step runs, as a pure function of the waiting queue, the running sequences,
//! the free slots, the prefill budget and the prefix-cache lookups (no model needed: the rules
//! are unit-tested here).
//!
//! The rules, in order:
//! 1. Finished sequences (done, cancelled, failed) give their slots back first, so a waiting
//!    request takes them in the same step.
//! 2. Every sequence in its decode phase decodes one token: all of them, in one batched run,
//!    whatever else the step does (a long prompt never starves running streams).
//! 3. Prefill gets at most `prefill_tokens` prompt tokens per step. Sequences already
//!    prefilling continue first, in admission order, each with a chunk as large as the budget
//!    left allows.
//! 4. Waiting requests are admitted in FIFO order while a slot is free and budget is left, each
//!    to the lowest free slot (which keeps the decode batch, slots 0..n, small), starting its
//!    prefill after the prefix its cache lookup found. The first one that cannot be admitted
//!    stops admission: no later request overtakes it.

use std::collections::BTreeSet;

/// Identifies a request inside the engine.
pub type SeqId = u64;

/// A request waiting for a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub id: SeqId,
    pub prompt_len: usize,
    /// Prompt tokens the prefix cache can provide (at most `prompt_len - 1`: the last prompt
    /// token always runs, to give the first token's logits).
    pub cached: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `done` of `prompt_len` prompt tokens are in the slot's cache.
    Prefill {
        done: usize,
        prompt_len: usize,
    },
    Decode,
    /// Done, cancelled or failed: its slot can go.
    Finished,
}

/// A sequence holding a slot, in admission order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Running {
    pub id: SeqId,
    pub slot: usize,
    pub phase: Phase,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    pub id: SeqId,
    pub slot: usize,
    /// Prompt tokens copied from the prefix cache into the slot.
    pub cached: usize,
}

/// `len` prompt tokens of `id` from position `start`, run into `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillChunk {
    pub id: SeqId,
    pub slot: usize,
    pub start: usize,
    pub len: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Finished sequences and the slots they give back.
    pub released: Vec<(SeqId, usize)>,
    /// Waiting requests given a slot this step, in FIFO order.
    pub admitted: Vec<Admission>,
    /// Sequences that decode one token in this step's batched run.
    pub decode: Vec<SeqId>,
    /// Prompt chunks to run, in order (each one sequence, batch 1).
    pub prefill: Vec<PrefillChunk>,
}

impl StepPlan {
    pub fn prefill_tokens(&self) -> usize {
        self.prefill.iter().map(|c| c.len).sum()
    }

    pub fn is_idle(&self) -> bool {
        self.decode.is_empty() && self.prefill.is_empty()
    }
}

/// Plans one step (see the module docs). `free_slots` in any order; `prefill_tokens` >= 1.
pub fn plan_step(waiting: &[Waiting], running: &[Running], free_slots: &[usize], prefill_tokens: usize) -> StepPlan {
    let mut plan = StepPlan::default();
    let mut free: BTreeSet<usize> = free_slots.iter().copied().collect();
    let mut budget = prefill_tokens;
    for seq in running {
        match seq.phase {
            Phase::Finished => {
                plan.released.push((seq.id, seq.slot));
                free.insert(seq.slot);
            }
            Phase::Decode => plan.decode.push(seq.id),
            Phase::Prefill { done, prompt_len } => {
                let len = (prompt_len - done).min(budget);
                if len > 0 {
                    plan.prefill.push(PrefillChunk { id: seq.id, slot: seq.slot, start: done, len });
                    budget -= len;
                }
            }
        }
    }
    for request in waiting {
        if budget == 0 {
            break;
        }
        let Some(slot) = free.pop_first() else { break };
        let cached = request.cached.min(request.prompt_len.saturating_sub(1));
        plan.admitted.push(Admission { id: request.id, slot, cached });
        let len = (request.prompt_len - cached).min(budget);
        plan.prefill.push(PrefillChunk { id: request.id, slot, start: cached, len });
        budget -= len;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(id: SeqId, prompt_len: usize) -> Waiting {
        Waiting { id, prompt_len, cached: 0 }
    }

    fn decoding(id: SeqId, slot: usize) -> Running {
        Running { id, slot, phase: Phase::Decode }
    }

    #[test]
    fn admission_is_fifo_into_the_lowest_free_slots() {
        let plan = plan_step(&[waiting(1, 4), waiting(2, 4), waiting(3, 4)], &[], &[5, 2, 7], 100);
        let admitted: Vec<(SeqId, usize)> = plan.admitted.iter().map(|a| (a.id, a.slot)).collect();
        assert_eq!(admitted, [(1, 2), (2, 5), (3, 7)]);
        assert_eq!(plan.prefill_tokens(), 12);
        // Two slots for three requests: the third waits.
        let plan = plan_step(&[waiting(1, 4), waiting(2, 4), waiting(3, 4)], &[], &[0, 1], 100);
        assert_eq!(plan.admitted.iter().map(|a| a.id).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn a_request_that_cannot_start_is_not_overtaken() {
        // No free slot: nothing is admitted, however short.
        let running = [decoding(10, 0), decoding(11, 1)];
        let plan = plan_step(&[waiting(1, 500), waiting(2, 1)], &running, &[], 64);
        assert!(plan.admitted.is_empty());
        assert_eq!(plan.decode, [10, 11]);
        // A running prefill takes the whole budget: the head waits, and the short request
        // behind it does not go first although a slot is free.
        let prefilling = Running { id: 12, slot: 2, phase: Phase::Prefill { done: 0, prompt_len: 1000 } };
        let plan = plan_step(&[waiting(1, 500), waiting(2, 1)], &[prefilling], &[0, 1], 64);
        assert!(plan.admitted.is_empty(), "{plan:?}");
        assert_eq!(plan.prefill, [PrefillChunk { id: 12, slot: 2, start: 0, len: 64 }]);
    }

    #[test]
    fn the_prefill_budget_is_shared_in_order_and_never_exceeded() {
        let a = Running { id: 1, slot: 0, phase: Phase::Prefill { done: 10, prompt_len: 30 } };
        let b = Running { id: 2, slot: 1, phase: Phase::Prefill { done: 0, prompt_len: 100 } };
        let plan = plan_step(&[waiting(3, 50)], &[a, b], &[2], 64);
        assert_eq!(
            plan.prefill,
            [PrefillChunk { id: 1, slot: 0, start: 10, len: 20 }, PrefillChunk { id: 2, slot: 1, start: 0, len: 44 }]
        );
        assert_eq!(plan.prefill_tokens(), 64);
        assert!(plan.admitted.is_empty());
        // Budget left after the running ones: the next request starts with a partial chunk.
        let plan = plan_step(&[waiting(3, 50), waiting(4, 50)], &[a], &[2, 3], 64);
        assert_eq!(plan.admitted, [Admission { id: 3, slot: 2, cached: 0 }]);
        assert_eq!(plan.prefill[1], PrefillChunk { id: 3, slot: 2, start: 0, len: 44 });
        assert!(plan.prefill_tokens() <= 64);
    }

    #[test]
    fn decode_runs_every_step_beside_a_long_prefill() {
        let long = Running { id: 9, slot: 3, phase: Phase::Prefill { done: 0, prompt_len: 4096 } };
        let mut running = vec![decoding(1, 0), decoding(2, 1), long, decoding(4, 2)];
        let mut chunks = 0;
        loop {
            let plan = plan_step(&[], &running, &[], 512);
            let decoding: Vec<SeqId> = running.iter().filter(|r| r.phase == Phase::Decode).map(|r| r.id).collect();
            assert_eq!(plan.decode, decoding, "every decoding sequence runs in every step");
            assert!([1, 2, 4].iter().all(|id| plan.decode.contains(id)));
            assert!(plan.prefill_tokens() <= 512);
            let Some(chunk) = plan.prefill.first() else { break };
            chunks += 1;
            let done = chunk.start + chunk.len;
            running[2].phase = if done == 4096 { Phase::Decode } else { Phase::Prefill { done, prompt_len: 4096 } };
        }
        assert_eq!(chunks, 8);
        assert_eq!(running[2].phase, Phase::Decode);
    }

    #[test]
    fn finished_slots_are_reused_in_the_same_step() {
        let running = [Running { id: 1, slot: 0, phase: Phase::Finished }, decoding(2, 1)];
        let plan = plan_step(&[waiting(3, 8)], &running, &[], 100);
        assert_eq!(plan.released, [(1, 0)]);
        assert_eq!(plan.admitted, [Admission { id: 3, slot: 0, cached: 0 }]);
        assert_eq!(plan.decode, [2]);
    }

    #[test]
    fn a_prefix_hit_starts_the_prefill_after_it_and_keeps_the_last_prompt_token() {
        let hit = Waiting { id: 1, prompt_len: 40, cached: 32 };
        let plan = plan_step(&[hit], &[], &[0], 100);
        assert_eq!(plan.admitted, [Admission { id: 1, slot: 0, cached: 32 }]);
        assert_eq!(plan.prefill, [PrefillChunk { id: 1, slot: 0, start: 32, len: 8 }]);
        let whole = Waiting { id: 2, prompt_len: 32, cached: 32 };
        let plan = plan_step(&[whole], &[], &[0], 100);
        assert_eq!(plan.prefill, [PrefillChunk { id: 2, slot: 0, start: 31, len: 1 }]);
    }
}
