//! What one engine step runs, as a pure function of the waiting queue, the running sequences,
//! the free slots, the prefill budget and the prefix-cache lookups (no model needed: the rules
//! are unit-tested here).
//!
//! The rules, in order:
//! 1. Finished sequences (done, cancelled, failed) give their slots back first, so a waiting
//!    request takes them in the same step.
//! 2. Every sequence in its decode phase decodes one token: all of them, in one batched run,
//!    whatever else the step does (a long prompt never starves running streams).
//! 3. Prefill gets at most the [`PrefillBudget`]'s prompt tokens per step, and each prefill run
//!    also costs its fixed overhead against the budget's cost (with pacing, the measured time of
//!    a run that does not depend on its length, in tokens). Prompts' first chunks of one length
//!    in consecutive slots, planned one after the other, share a run ([`prefill_runs`]): a chunk
//!    that joins the run before it pays no overhead. Sequences already prefilling continue first, in admission
//!    order, each with a chunk as large as the budget left allows. With a per-sequence cap (vLLM's
//!    `long_prefill_token_threshold`) and one long prompt (more left than the cap) to prefill, its
//!    chunk is at most the cap and shorter prompts share the rest of the budget; with two or more
//!    long prompts that could run (prefilling, or waiting with a slot for them) the cap is lifted
//!    for the step, since capped they would advance one at a time in small runs.
//!    A sequence's own `max_chunk` caps its chunks whatever the budget (one token for a prompt
//!    scored position by position on a graph that returns only the last position's logits).
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
    /// Prompt tokens the prefix cache can provide (used up to `prompt_len - 1`: the last prompt
    /// token always runs, to give the first token's logits).
    pub cached: usize,
    /// Its first chunk runs alone, so it shares no run with the chunks beside it and pays a
    /// run's overhead of its own: a prompt with images (the encoder's output goes into its run),
    /// or one whose positions are scored (its run fetches every position's logits).
    pub runs_alone: bool,
    /// Its chunks' length at most, whatever the budget (None: only the budget's caps).
    pub max_chunk: Option<usize>,
}

impl Waiting {
    /// The prompt position its prefill starts at: after the cached tokens it can use.
    fn start(&self) -> usize {
        self.cached.min(self.prompt_len.saturating_sub(1))
    }
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
    /// Its chunks' length at most, whatever the budget (None: only the budget's caps): 1 for a
    /// prompt whose every position's logits are asked of a graph that returns the last one's.
    pub max_chunk: Option<usize>,
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
    /// Prompt chunks to run, in order (one sequence each; [`prefill_runs`] groups them into
    /// batched runs).
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

/// What one step may prefill: at most `tokens` prompt tokens, at most `per_sequence` of them
/// from one sequence, and chunks whose costs add up to at most `cost`: `len` each, plus
/// `chunk_overhead` for each chunk that starts a run (see [`prefill_runs`]). All are in tokens;
/// the overhead stands for what a prefill run costs whatever its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillBudget {
    pub tokens: usize,
    pub cost: usize,
    pub chunk_overhead: usize,
    pub per_sequence: usize,
}

impl PrefillBudget {
    /// Only a token count: `tokens` prompt tokens, however many chunks.
    pub fn tokens(tokens: usize) -> Self {
        PrefillBudget { tokens, cost: tokens, chunk_overhead: 0, per_sequence: usize::MAX }
    }

    /// The same budget with at most `tokens` prompt tokens of any one sequence (vLLM's
    /// `long_prefill_token_threshold`): a long prompt advances that much a step while shorter
    /// ones still fill the rest of the budget. [`plan_step`] lifts it when two or more long
    /// prompts could run.
    pub fn per_sequence(self, tokens: usize) -> Self {
        PrefillBudget { per_sequence: tokens.max(1), ..self }
    }

    /// The longest chunk (of at most `want` tokens) that still fits in a run of its own; 0 when
    /// none does.
    pub(crate) fn chunk(&self, want: usize) -> usize {
        want.min(self.tokens).min(self.cost.saturating_sub(self.chunk_overhead))
    }

    /// Plans the chunk of `want` tokens from prompt position `start` into `slot` after the
    /// chunks of `plan` and spends its cost: no overhead when it joins the run of the chunk
    /// before it (see [`prefill_runs`]). Its length, 0 when nothing fits.
    /// `after` is the chunk planned before it, None when either runs alone.
    fn spend(&mut self, after: Option<&PrefillChunk>, slot: usize, start: usize, want: usize) -> usize {
        let want = want.min(self.per_sequence);
        let joining = want.min(self.tokens).min(self.cost);
        let joins = after.is_some_and(|last| joins_run(last, slot, start, joining));
        let (len, overhead) = if joins { (joining, 0) } else { (self.chunk(want), self.chunk_overhead) };
        if len == 0 {
            return 0;
        }
        self.tokens -= len;
        self.cost = self.cost.saturating_sub(overhead + len);
        len
    }
}

/// Plans one step (see the module docs). `free_slots` in any order; `budget.tokens` >= 1; the
/// budget is spent as chunks are planned.
pub fn plan_step(
    waiting: &[Waiting],
    running: &[Running],
    free_slots: &[usize],
    mut budget: PrefillBudget,
) -> StepPlan {
    let mut plan = StepPlan::default();
    let mut free: BTreeSet<usize> = free_slots.iter().copied().collect();
    if long_prompts(waiting, running, free_slots.len(), budget.per_sequence) >= 2 {
        // Several long prompts queue: capped, they would prefill one after the other in small
        // runs (each with a run's fixed cost), and those behind would wait for all of it.
        budget.per_sequence = usize::MAX;
    }
    for seq in running {
        match seq.phase {
            Phase::Finished => {
                plan.released.push((seq.id, seq.slot));
                free.insert(seq.slot);
            }
            Phase::Decode => plan.decode.push(seq.id),
            Phase::Prefill { done, prompt_len } => {
                let want = (prompt_len - done).min(seq.max_chunk.unwrap_or(usize::MAX));
                let len = budget.spend(plan.prefill.last(), seq.slot, done, want);
                if len > 0 {
                    plan.prefill.push(PrefillChunk { id: seq.id, slot: seq.slot, start: done, len });
                }
            }
        }
    }
    // In FIFO order, while a chunk fits: one that joins the run before it costs no run overhead,
    // so it can fit where a chunk of its own would not.
    let mut last_alone = false;
    for request in waiting {
        let Some(&slot) = free.first() else { break };
        let cached = request.start();
        let after = plan.prefill.last().filter(|_| !last_alone && !request.runs_alone);
        let want = (request.prompt_len - cached).min(request.max_chunk.unwrap_or(usize::MAX));
        let len = budget.spend(after, slot, cached, want);
        if len == 0 {
            break;
        }
        last_alone = request.runs_alone;
        free.remove(&slot);
        plan.admitted.push(Admission { id: request.id, slot, cached });
        plan.prefill.push(PrefillChunk { id: request.id, slot, start: cached, len });
    }
    plan
}

/// Prompts with more than `cap` tokens left to prefill, which the cap slows (not those whose own
/// `max_chunk` is at most the cap): those prefilling, and those waiting that could get a slot this step (`free_slots` plus the slots finished sequences give back), after
/// the prefix their cache lookup found. A waiting request without a slot does not count: however
/// fast the others prefill, it waits for a sequence to finish.
fn long_prompts(waiting: &[Waiting], running: &[Running], free_slots: usize, cap: usize) -> usize {
    let slots = free_slots + running.iter().filter(|s| s.phase == Phase::Finished).count();
    // A prompt whose own chunks are no longer than the cap advances by them whatever the cap.
    let capped = |max_chunk: Option<usize>| max_chunk.is_some_and(|m| m <= cap);
    let prefilling = running
        .iter()
        .filter(|s| !capped(s.max_chunk))
        .filter(|s| matches!(s.phase, Phase::Prefill { done, prompt_len } if prompt_len - done > cap))
        .count();
    let waiting = waiting.iter().take(slots).filter(|w| !capped(w.max_chunk) && w.prompt_len - w.start() > cap);
    prefilling + waiting.count()
}

/// Whether a chunk of `len` tokens from prompt position `start` into `slot` runs with `last`
/// (the chunk planned before it): rows of one batched run take the same number of new tokens,
/// into consecutive slots of the pool (a run binds one contiguous view of it), and all start
/// their prompts (GroupQueryAttention takes several rows of more than one new token only as
/// first prompts: "batch_size must be 1 when sequence_length > 1 and past context is given").
fn joins_run(last: &PrefillChunk, slot: usize, start: usize, len: usize) -> bool {
    len > 0 && len == last.len && slot == last.slot + 1 && start == 0 && last.start == 0
}

/// The plan's prefill chunks grouped into batched runs, in order: each run a stretch of chunks
/// planned one after the other, first chunks of their prompts, of one length, in consecutive
/// slots. Grouping several short prompts into one run pays a run's fixed cost (every weight
/// read, every kernel launched) once: 32 prompts of 128 tokens take 8 runs at a 512-token
/// budget, not 32.
/// A chunk of a sequence that `runs_alone` says must run alone (a prompt with images, a scored
/// prompt) is a run of its own whatever its shape.
pub fn prefill_runs(chunks: &[PrefillChunk], runs_alone: impl Fn(SeqId) -> bool) -> Vec<&[PrefillChunk]> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=chunks.len() {
        let joins = i < chunks.len()
            && joins_run(&chunks[i - 1], chunks[i].slot, chunks[i].start, chunks[i].len)
            && !runs_alone(chunks[i - 1].id)
            && !runs_alone(chunks[i].id);
        if !joins {
            runs.push(&chunks[start..i]);
            start = i;
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(id: SeqId, prompt_len: usize) -> Waiting {
        Waiting { id, prompt_len, cached: 0, runs_alone: false, max_chunk: None }
    }

    fn decoding(id: SeqId, slot: usize) -> Running {
        Running { id, slot, phase: Phase::Decode, max_chunk: None }
    }

    #[test]
    fn admission_is_fifo_into_the_lowest_free_slots() {
        let plan =
            plan_step(&[waiting(1, 4), waiting(2, 4), waiting(3, 4)], &[], &[5, 2, 7], PrefillBudget::tokens(100));
        let admitted: Vec<(SeqId, usize)> = plan.admitted.iter().map(|a| (a.id, a.slot)).collect();
        assert_eq!(admitted, [(1, 2), (2, 5), (3, 7)]);
        assert_eq!(plan.prefill_tokens(), 12);
        // Two slots for three requests: the third waits.
        let plan = plan_step(&[waiting(1, 4), waiting(2, 4), waiting(3, 4)], &[], &[0, 1], PrefillBudget::tokens(100));
        assert_eq!(plan.admitted.iter().map(|a| a.id).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn a_chunk_that_joins_the_run_before_it_is_admitted_for_its_tokens_alone() {
        // Overhead 100, cost 200: the first 30-token prompt costs 130, leaving 70; the second
        // (next slot, same length, from 0) joins its run, so it costs 30, not 130.
        let budget = PrefillBudget { cost: 200, chunk_overhead: 100, ..PrefillBudget::tokens(512) };
        let plan = plan_step(&[waiting(1, 30), waiting(2, 30)], &[], &[0, 1], budget);
        assert_eq!(plan.prefill.len(), 2, "{plan:?}");
        assert_eq!(plan.prefill_tokens(), 60);
        // One that would start a run of its own (another length) does not fit, and the one
        // behind it does not go first.
        let plan = plan_step(&[waiting(1, 30), waiting(2, 31), waiting(3, 30)], &[], &[0, 1, 2], budget);
        assert_eq!(plan.admitted.iter().map(|a| a.id).collect::<Vec<_>>(), [1], "{plan:?}");
    }

    #[test]
    fn a_prompt_with_images_runs_alone_and_pays_its_own_overhead() {
        // Overhead 10, cost 100: three 20-token prompts share one run (10 + 60); with the middle
        // one carrying images, each is a run of its own (3 x 30 = 90).
        let budget = PrefillBudget { cost: 100, chunk_overhead: 10, ..PrefillBudget::tokens(512) };
        let text = |id| waiting(id, 20);
        let image = |id| Waiting { runs_alone: true, ..waiting(id, 20) };
        let plan = plan_step(&[text(1), text(2), text(3)], &[], &[0, 1, 2], budget);
        assert_eq!(plan.prefill_tokens(), 60);
        let plan = plan_step(&[text(1), image(2), text(3), text(4)], &[], &[0, 1, 2, 3], budget);
        assert_eq!(plan.admitted.iter().map(|a| a.id).collect::<Vec<_>>(), [1, 2, 3], "{plan:?}");
    }

    #[test]
    fn a_request_that_cannot_start_is_not_overtaken() {
        // No free slot: nothing is admitted, however short.
        let running = [decoding(10, 0), decoding(11, 1)];
        let plan = plan_step(&[waiting(1, 500), waiting(2, 1)], &running, &[], PrefillBudget::tokens(64));
        assert!(plan.admitted.is_empty());
        assert_eq!(plan.decode, [10, 11]);
        // A running prefill takes the whole budget: the head waits, and the short request
        // behind it does not go first although a slot is free.
        let prefilling =
            Running { id: 12, slot: 2, phase: Phase::Prefill { done: 0, prompt_len: 1000 }, max_chunk: None };
        let plan = plan_step(&[waiting(1, 500), waiting(2, 1)], &[prefilling], &[0, 1], PrefillBudget::tokens(64));
        assert!(plan.admitted.is_empty(), "{plan:?}");
        assert_eq!(plan.prefill, [PrefillChunk { id: 12, slot: 2, start: 0, len: 64 }]);
    }

    #[test]
    fn a_per_sequence_cap_chunks_a_long_prompt_and_leaves_the_rest_to_shorter_ones() {
        // A 4,096-token prompt prefilling while streams decode: 128 tokens a step, not 512.
        let long = Running { id: 1, slot: 0, phase: Phase::Prefill { done: 256, prompt_len: 4096 }, max_chunk: None };
        let capped = PrefillChunk { id: 1, slot: 0, start: 256, len: 128 };
        let budget = PrefillBudget::tokens(512).per_sequence(128);
        let plan = plan_step(&[waiting(2, 100)], &[long, decoding(9, 1)], &[2, 3], budget);
        assert_eq!(plan.decode, [9]);
        // The short prompt runs whole beside it.
        assert_eq!(plan.prefill, [capped, PrefillChunk { id: 2, slot: 2, start: 0, len: 100 }]);
        assert_eq!(plan.admitted.iter().map(|a| a.id).collect::<Vec<_>>(), [2]);
        // A short prompt already prefilling, and one whose cached prefix leaves it short, too.
        let short = Running { id: 5, slot: 4, phase: Phase::Prefill { done: 90, prompt_len: 100 }, max_chunk: None };
        let mostly_cached = Waiting { id: 3, prompt_len: 300, cached: 200, runs_alone: false, max_chunk: None };
        let plan = plan_step(&[mostly_cached], &[long, short], &[2], budget);
        assert_eq!(
            plan.prefill,
            [
                capped,
                PrefillChunk { id: 5, slot: 4, start: 90, len: 10 },
                PrefillChunk { id: 3, slot: 2, start: 200, len: 100 }
            ]
        );
        // The last 128 tokens of a prompt are not long: the cap holds beside it.
        let ending = Running { id: 6, slot: 5, phase: Phase::Prefill { done: 872, prompt_len: 1000 }, max_chunk: None };
        let plan = plan_step(&[], &[long, ending], &[], budget);
        assert_eq!(plan.prefill_tokens(), 256);
        // Without the cap the long prompt takes the whole budget and nothing is admitted.
        let plan = plan_step(&[waiting(2, 100)], &[long], &[2], PrefillBudget::tokens(512));
        assert_eq!(plan.prefill, [PrefillChunk { id: 1, slot: 0, start: 256, len: 512 }]);
        assert!(plan.admitted.is_empty());
    }

    #[test]
    fn two_long_prompts_that_could_run_lift_the_cap() {
        let long = Running { id: 1, slot: 0, phase: Phase::Prefill { done: 256, prompt_len: 4096 }, max_chunk: None };
        let budget = PrefillBudget::tokens(512).per_sequence(128);
        let whole_budget = [PrefillChunk { id: 1, slot: 0, start: 256, len: 512 }];
        // A second long prompt waiting with a slot for it: capped, the two would advance one at a
        // time in 128-token runs; the first takes the whole budget, the second waits for it.
        let plan = plan_step(&[waiting(2, 300)], &[long, decoding(9, 1)], &[2], budget);
        assert_eq!(plan.prefill, whole_budget);
        assert!(plan.admitted.is_empty());
        // ... or already prefilling.
        let other = Running { id: 4, slot: 3, phase: Phase::Prefill { done: 0, prompt_len: 1000 }, max_chunk: None };
        let plan = plan_step(&[], &[long, other], &[], budget);
        assert_eq!(plan.prefill, whole_budget);
        // Both waiting: the first starts with the whole budget.
        let plan = plan_step(&[waiting(2, 1000), waiting(3, 1000)], &[decoding(9, 0)], &[1, 2], budget);
        assert_eq!(plan.prefill, [PrefillChunk { id: 2, slot: 1, start: 0, len: 512 }]);
        // A long prompt waiting without a slot does not count: it waits for a sequence to finish,
        // however fast the other prefills.
        let plan = plan_step(&[waiting(2, 300)], &[long, decoding(9, 1)], &[], budget);
        assert_eq!(plan.prefill, [PrefillChunk { id: 1, slot: 0, start: 256, len: 128 }]);
        // A slot that a finished sequence gives back in this step counts.
        let finished = Running { id: 7, slot: 1, phase: Phase::Finished, max_chunk: None };
        let plan = plan_step(&[waiting(2, 300)], &[long, finished], &[], budget);
        assert_eq!(plan.prefill, whole_budget);
    }

    #[test]
    fn the_prefill_budget_is_shared_in_order_and_never_exceeded() {
        let a = Running { id: 1, slot: 0, phase: Phase::Prefill { done: 10, prompt_len: 30 }, max_chunk: None };
        let b = Running { id: 2, slot: 1, phase: Phase::Prefill { done: 0, prompt_len: 100 }, max_chunk: None };
        let plan = plan_step(&[waiting(3, 50)], &[a, b], &[2], PrefillBudget::tokens(64));
        assert_eq!(
            plan.prefill,
            [PrefillChunk { id: 1, slot: 0, start: 10, len: 20 }, PrefillChunk { id: 2, slot: 1, start: 0, len: 44 }]
        );
        assert_eq!(plan.prefill_tokens(), 64);
        assert!(plan.admitted.is_empty());
        // Budget left after the running ones: the next request starts with a partial chunk.
        let plan = plan_step(&[waiting(3, 50), waiting(4, 50)], &[a], &[2, 3], PrefillBudget::tokens(64));
        assert_eq!(plan.admitted, [Admission { id: 3, slot: 2, cached: 0 }]);
        assert_eq!(plan.prefill[1], PrefillChunk { id: 3, slot: 2, start: 0, len: 44 });
        assert!(plan.prefill_tokens() <= 64);
    }

    #[test]
    fn decode_runs_every_step_beside_a_long_prefill() {
        let long = Running { id: 9, slot: 3, phase: Phase::Prefill { done: 0, prompt_len: 4096 }, max_chunk: None };
        let mut running = vec![decoding(1, 0), decoding(2, 1), long, decoding(4, 2)];
        let mut chunks = 0;
        loop {
            let plan = plan_step(&[], &running, &[], PrefillBudget::tokens(512));
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
    fn each_chunk_pays_its_overhead_against_the_cost() {
        // Room for 300 token-equivalents, 100 of them per run: one chunk of 200.
        let budget = PrefillBudget { cost: 300, chunk_overhead: 100, ..PrefillBudget::tokens(512) };
        let a = Running { id: 1, slot: 0, phase: Phase::Prefill { done: 0, prompt_len: 1000 }, max_chunk: None };
        let b = Running { id: 2, slot: 1, phase: Phase::Prefill { done: 0, prompt_len: 1000 }, max_chunk: None };
        let plan = plan_step(&[waiting(3, 8)], &[a, b], &[2], budget);
        assert_eq!(plan.prefill, [PrefillChunk { id: 1, slot: 0, start: 0, len: 200 }]);
        assert!(plan.admitted.is_empty(), "no cost left for another run: {plan:?}");
        // Short prompts in slots apart (each a run of its own): each run costs 50 + 30; the
        // fourth gets what is left (10 tokens).
        let budget = PrefillBudget { cost: 300, chunk_overhead: 50, ..PrefillBudget::tokens(512) };
        let plan =
            plan_step(&[waiting(1, 30), waiting(2, 30), waiting(3, 30), waiting(4, 30)], &[], &[0, 2, 4, 6], budget);
        assert_eq!(plan.prefill.iter().map(|c| c.len).collect::<Vec<_>>(), [30, 30, 30, 10]);
        // The token cap still holds when the cost would allow more.
        let budget = PrefillBudget { cost: 10_000, chunk_overhead: 10, ..PrefillBudget::tokens(40) };
        let plan = plan_step(&[waiting(1, 30), waiting(2, 30)], &[], &[0, 1], budget);
        assert_eq!(plan.prefill_tokens(), 40);
    }

    #[test]
    fn chunks_of_one_length_in_consecutive_slots_share_a_run() {
        let chunk = |id: SeqId, slot: usize, len: usize| PrefillChunk { id, slot, start: 0, len };
        let chunks = [chunk(1, 0, 128), chunk(2, 1, 128), chunk(3, 2, 128), chunk(4, 4, 128), chunk(5, 5, 64)];
        let runs: Vec<Vec<SeqId>> =
            prefill_runs(&chunks, |_| false).iter().map(|r| r.iter().map(|c| c.id).collect()).collect();
        // Slot 3 is missing (a gap ends the run); 5 has another length.
        assert_eq!(runs, [vec![1, 2, 3], vec![4], vec![5]]);
        assert!(prefill_runs(&[], |_| false).is_empty());
        // Consecutive slots in the other order do not join (a run's rows go up the pool).
        assert_eq!(prefill_runs(&[chunk(1, 1, 8), chunk(2, 0, 8)], |_| false).len(), 2);
        // A chunk that must run alone splits the run it would have joined.
        let alone: Vec<Vec<SeqId>> = prefill_runs(&[chunk(1, 0, 8), chunk(2, 1, 8), chunk(3, 2, 8)], |id| id == 2)
            .iter()
            .map(|r| r.iter().map(|c| c.id).collect())
            .collect();
        assert_eq!(alone, [vec![1], vec![2], vec![3]]);
        // A chunk after a prompt's start (a later chunk, a prefix hit) runs alone.
        let later = PrefillChunk { id: 2, slot: 1, start: 16, len: 8 };
        assert_eq!(prefill_runs(&[chunk(1, 0, 8), later], |_| false).len(), 2);
        assert_eq!(prefill_runs(&[later, chunk(3, 2, 8)], |_| false).len(), 2);
    }

    #[test]
    fn a_chunk_that_joins_the_run_before_it_pays_no_overhead() {
        // Requests arriving together get consecutive slots: four chunks of 30 cost one run's
        // overhead (50) and their tokens, 170 of the 300.
        let budget = PrefillBudget { cost: 300, chunk_overhead: 50, ..PrefillBudget::tokens(512) };
        let plan =
            plan_step(&[waiting(1, 30), waiting(2, 30), waiting(3, 30), waiting(4, 30)], &[], &[0, 1, 2, 3], budget);
        assert_eq!(plan.prefill.iter().map(|c| c.len).collect::<Vec<_>>(), [30, 30, 30, 30]);
        assert_eq!(prefill_runs(&plan.prefill, |_| false).len(), 1);
        // Lengths that differ start runs of their own, each paying the overhead: 50 + 30, then
        // 50 + 40, then 50 + 80 leave nothing for the fourth.
        let plan =
            plan_step(&[waiting(1, 30), waiting(2, 40), waiting(3, 80), waiting(4, 30)], &[], &[0, 1, 2, 3], budget);
        assert_eq!(plan.prefill.iter().map(|c| c.len).collect::<Vec<_>>(), [30, 40, 80]);
        // A free slot out of line (3, then 7) starts a new run too.
        let plan = plan_step(&[waiting(1, 30), waiting(2, 30)], &[], &[3, 7], budget);
        assert_eq!(prefill_runs(&plan.prefill, |_| false).len(), 2);
    }

    #[test]
    fn finished_slots_are_reused_in_the_same_step() {
        let running = [Running { id: 1, slot: 0, phase: Phase::Finished, max_chunk: None }, decoding(2, 1)];
        let plan = plan_step(&[waiting(3, 8)], &running, &[], PrefillBudget::tokens(100));
        assert_eq!(plan.released, [(1, 0)]);
        assert_eq!(plan.admitted, [Admission { id: 3, slot: 0, cached: 0 }]);
        assert_eq!(plan.decode, [2]);
    }

    #[test]
    fn a_prefix_hit_starts_the_prefill_after_it_and_keeps_the_last_prompt_token() {
        let hit = Waiting { id: 1, prompt_len: 40, cached: 32, runs_alone: false, max_chunk: None };
        let plan = plan_step(&[hit], &[], &[0], PrefillBudget::tokens(100));
        assert_eq!(plan.admitted, [Admission { id: 1, slot: 0, cached: 32 }]);
        assert_eq!(plan.prefill, [PrefillChunk { id: 1, slot: 0, start: 32, len: 8 }]);
        let whole = Waiting { id: 2, prompt_len: 32, cached: 32, runs_alone: false, max_chunk: None };
        let plan = plan_step(&[whole], &[], &[0], PrefillBudget::tokens(100));
        assert_eq!(plan.prefill, [PrefillChunk { id: 2, slot: 0, start: 31, len: 1 }]);
    }

    /// A long prompt capped by its own `max_chunk` (a scored one) is not one the per-sequence cap
    /// slows: beside one ordinary long prompt, the cap stays.
    #[test]
    fn a_prompt_under_its_own_cap_does_not_lift_the_per_sequence_cap() {
        let long = Running { id: 1, slot: 0, phase: Phase::Prefill { done: 0, prompt_len: 4096 }, max_chunk: None };
        let scored =
            Running { id: 2, slot: 1, phase: Phase::Prefill { done: 5, prompt_len: 4096 }, max_chunk: Some(1) };
        let plan = plan_step(&[], &[long, scored, decoding(3, 2)], &[], PrefillBudget::tokens(512).per_sequence(64));
        assert_eq!(
            plan.prefill,
            [PrefillChunk { id: 1, slot: 0, start: 0, len: 64 }, PrefillChunk { id: 2, slot: 1, start: 5, len: 1 }]
        );
    }

    #[test]
    fn a_sequence_with_its_own_chunk_cap_advances_by_it_and_leaves_the_budget_to_others() {
        let scored = Running { id: 1, slot: 0, phase: Phase::Prefill { done: 5, prompt_len: 40 }, max_chunk: Some(1) };
        let other = Running { id: 2, slot: 1, phase: Phase::Prefill { done: 0, prompt_len: 30 }, max_chunk: None };
        let queued = Waiting { max_chunk: Some(1), ..waiting(3, 50) };
        let plan = plan_step(&[queued], &[scored, other], &[2], PrefillBudget::tokens(64));
        assert_eq!(
            plan.prefill,
            [
                PrefillChunk { id: 1, slot: 0, start: 5, len: 1 },
                PrefillChunk { id: 2, slot: 1, start: 0, len: 30 },
                PrefillChunk { id: 3, slot: 2, start: 0, len: 1 },
            ]
        );
        assert_eq!(plan.admitted, [Admission { id: 3, slot: 2, cached: 0 }]);
    }
}
