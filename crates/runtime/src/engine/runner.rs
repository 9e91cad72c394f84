//! The model runner: owns the model, the KV pool and the prefix cache's storage, and runs what a
//! step plan says: one batched decode over the first slots, prefill chunks (batch 1, or several
//! of one length batched over consecutive slots), and prefix copies into and out of slots.
//!
//! Every step's inputs are built through [`StepInputs`] (the decode batch in [`Runner::decode`],
//! a prefill chunk in [`Runner::prefill`]): rope deltas of rows whose prompt had images, and a
//! chunk's (t, h, w) positions and image rows (from the [`VisionRuntime`]).

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use crate::cuda_rt::{Copy2d, CudaError, CudaRuntime};
use crate::model::{DecoderModel, Fetch, KvBuffer, ModelError, SharedLayout, StepOutput};
use crate::step_inputs::StepInputs;
use crate::vision::ImageFeatures;

use super::decode_rows::{separate_clashes, DecodeRow};
use super::error::RunnerError;
use super::images::{SequenceImages, VisionRuntime};
use super::kv_pool::{KvMemory, KvPool, PoolPlan};
use super::metrics::MetricsSnapshot;
use super::prefix_cache::{BlockKey, HitPiece, PrefixCache, Reservation, BLOCK_TOKENS};

/// Decode batch sizes with a CUDA graph of their own, up to `max_seqs` (vLLM's capture sizes:
/// 1, 2, 4, then multiples of 8), and `max_seqs` itself.
pub(crate) fn graph_batch_sizes(max_seqs: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = [1, 2, 4].into_iter().chain((8..).step_by(8)).take_while(|&s| s < max_seqs).collect();
    sizes.push(max_seqs);
    sizes
}

/// The prefix cache's index; its extents' bytes live where the pool's layers do.
struct PrefixStore {
    cache: PrefixCache<KvBuffer>,
}

pub(crate) struct Runner {
    model: DecoderModel,
    pool: KvPool,
    prefix: Option<PrefixStore>,
    /// Empty without CUDA graphs.
    graph_sizes: Vec<usize>,
    /// A vision-language model's encoder side.
    vision: Option<VisionRuntime>,
    /// Runs that fail on purpose, and the batched decode runs so far.
    #[cfg(feature = "fault-injection")]
    faults: (super::faults::FaultPlan, u64),
}

impl Runner {
    /// `prefix_cache_bytes`: None or 0 turns prefix caching off. Refused (off, with a warning)
    /// where KV cannot be copied: a growing cache, or a GPU without the CUDA runtime loaded.
    pub(crate) fn new(
        model: DecoderModel,
        plan: PoolPlan,
        prefix_cache_bytes: Option<u64>,
        vision: Option<VisionRuntime>,
        chunk_lengths: &[usize],
    ) -> Result<Self, ModelError> {
        let pool = KvPool::new(&model, plan)?;
        let prefix = match (prefix_cache_bytes.filter(|&b| b > 0), pool.layout()) {
            (Some(bytes), Some(layout)) if KvMemory::available(layout) => {
                Some(PrefixStore { cache: PrefixCache::new(bytes, (BLOCK_TOKENS * layout.bytes_per_token()) as u64) })
            }
            (Some(_), None) => {
                tracing::warn!("prefix caching is off: this graph's KV cache grows step by step (no shared buffer)");
                None
            }
            (Some(_), Some(_)) => {
                tracing::warn!("prefix caching is off: the CUDA runtime is not loaded in this process");
                None
            }
            (None, _) => None,
        };
        let graph_sizes = if model.can_replay_graphs() { graph_batch_sizes(plan.slots) } else { Vec::new() };
        let mut runner = Runner {
            model,
            pool,
            prefix,
            graph_sizes,
            vision,
            #[cfg(feature = "fault-injection")]
            faults: Default::default(),
        };
        if runner.model.device_id().is_some() {
            for &chunk in chunk_lengths {
                runner.warm_up_late_chunk(chunk);
            }
            if let Some(store) = &runner.prefix {
                reserve_device_memory(&runner.model, store.cache.limit_bytes());
            }
        }
        Ok(runner)
    }

    /// Runs one chunk of `chunk_tokens` (a length the scheduler plans while streams decode: the
    /// prefill budget, the per-sequence cap) in slot 0 after a past that fills the slot, before any
    /// request: the attention kernels of a late chunk take scratch that grows with the past, and
    /// ONNX Runtime's arena grew for it on the serving path (an H200, Run 6: a 4,096-token prompt's
    /// last 512-token chunk took 30.5 ms against 15.3 ms for the one before; the first prefix
    /// hit's 64 tokens 13.3 ms against 6.5 ms for later ones). The slot is free and its contents
    /// are overwritten by whoever takes it. Best effort: a failure only warns.
    fn warm_up_late_chunk(&mut self, chunk_tokens: usize) {
        let capacity = self.pool.plan().capacity;
        if self.pool.layout().is_none() || capacity < 2 {
            return;
        }
        let chunk = chunk_tokens.clamp(1, capacity - 1);
        let start = Instant::now();
        match self.prefill(0, &vec![0; chunk], capacity - chunk, Fetch::Logits, None) {
            Ok(_) => tracing::debug!(
                "a {chunk}-token chunk after {} tokens ran in {:.1} ms at start",
                capacity - chunk,
                start.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => tracing::warn!("the warm-up chunk after {} tokens failed: {e:#}", capacity - chunk),
        }
    }

    pub(crate) fn model(&self) -> &DecoderModel {
        &self.model
    }

    pub(crate) fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub(crate) fn graph_sizes(&self) -> &[usize] {
        &self.graph_sizes
    }

    pub(crate) fn prefix_caching(&self) -> bool {
        self.prefix.is_some()
    }

    pub(crate) fn prefix_cache_bytes(&self) -> u64 {
        self.prefix.as_ref().map_or(0, |p| p.cache.used_bytes())
    }

    /// Bytes of vision encodings the encoder cache holds.
    pub(crate) fn encoder_cache_bytes(&self) -> u64 {
        self.vision.as_ref().map_or(0, VisionRuntime::cache_bytes)
    }

    /// Gives `slot` back to the pool.
    pub(crate) fn release(&mut self, slot: usize) -> Result<(), ModelError> {
        self.pool.release(&self.model, slot)
    }

    /// Takes `slot` from the pool for an admitted request (see [`KvPool::take`]).
    pub(crate) fn take(&mut self, slot: usize) -> Result<(), ModelError> {
        self.pool.take(&self.model, slot)
    }

    /// How many rows a decode over slots 0..n runs: n, or the smallest CUDA-graph batch size
    /// that holds n (the rows past n are idle slots).
    pub(crate) fn decode_rows(&self, n: usize) -> usize {
        self.graph_sizes.iter().copied().find(|&s| s >= n).unwrap_or(n)
    }

    /// Captures the decode step's CUDA graph at every batch size before the first request, on
    /// this (the worker's) thread, where ONNX Runtime keeps them: as vLLM does, so that no
    /// running stream waits for a capture the first time the batch grows to a new size. ONNX
    /// Runtime captures on a graph's third run (two plain runs first, to settle its memory), so
    /// each size runs three times, every row idle (a dummy token at position 0 of each free
    /// slot, which whoever takes the slot overwrites first). Returns how long it took.
    pub(crate) fn capture_decode_graphs(&mut self) -> Result<std::time::Duration, RunnerError> {
        const RUNS_TO_CAPTURE: usize = 3;
        let start = std::time::Instant::now();
        for rows in self.graph_sizes.clone() {
            let idle = vec![DecodeRow::idle(0); rows];
            for _ in 0..RUNS_TO_CAPTURE {
                self.decode(&idle, Fetch::Greedy)?;
            }
        }
        Ok(start.elapsed())
    }

    /// Fails the runs `plan` names (after running them).
    #[cfg(feature = "fault-injection")]
    pub(crate) fn with_faults(mut self, plan: super::faults::FaultPlan) -> Self {
        self.faults = (plan, 0);
        self
    }

    /// One batched decode step over slots 0..rows.len() (a row per slot, `rows.len()` from
    /// [`decode_rows`](Self::decode_rows)), each row after its own past at its own rope delta.
    /// A decoding row whose position clashes with another's at the same cache slot (see
    /// `decode_rows`) runs alone right after; its output takes its row's place.
    /// Returns the output and how many rows ran apart.
    pub(crate) fn decode(&mut self, rows: &[DecodeRow], fetch: Fetch) -> Result<(StepOutput, usize), RunnerError> {
        let mut rows = rows.to_vec();
        let apart = if self.model.manifest.position_axes() == 3 { separate_clashes(&mut rows) } else { Vec::new() };
        let inputs = StepInputs::new(rows.iter().map(|r| r.token).collect(), rows.iter().map(|r| r.past).collect())?
            .with_rope_deltas(rows.iter().map(|r| r.delta).collect())?;
        let cache = self.pool.cache();
        let mut output = if self.graph_sizes.contains(&rows.len()) {
            self.model.run_rows_graph(&inputs, cache, fetch)?
        } else {
            self.model.run_rows(&inputs, cache, 0, fetch)?
        };
        for &(slot, row) in &apart {
            let alone = StepInputs::new(vec![row.token], vec![row.past])?.with_rope_deltas(vec![row.delta])?;
            let own = self.model.run_rows(&alone, self.pool.cache(), slot, fetch)?;
            replace_row(&mut output, slot, own)?;
        }
        #[cfg(feature = "fault-injection")]
        {
            let step = self.faults.1;
            self.faults.1 += 1;
            self.faults.0.check_decode(step)?;
        }
        Ok((output, apart.len()))
    }

    /// One prefill chunk: `tokens` into `slot` after the `past` tokens it holds (batch 1). A
    /// prompt with images gives the chunk's (t, h, w) positions and image rows.
    pub(crate) fn prefill(
        &mut self,
        slot: usize,
        tokens: &[u32],
        past: usize,
        fetch: Fetch,
        images: Option<(&mut SequenceImages, &mut MetricsSnapshot)>,
    ) -> Result<StepOutput, RunnerError> {
        let mut inputs = StepInputs::new(tokens.to_vec(), vec![past])?;
        if let Some((images, metrics)) = images {
            let range = past..past + tokens.len();
            inputs = inputs.with_axis_positions(images.prompt.positions(range.clone()))?;
            if let Some(rows) = self.chunk_rows(images, range, metrics)? {
                inputs = inputs.with_images(rows);
            }
        }
        let output = self.model.run_rows(&inputs, self.pool.cache(), slot, fetch)?;
        #[cfg(feature = "fault-injection")]
        self.faults.0.check_prefill(tokens)?;
        Ok(output)
    }

    /// Prefill chunks of one length, batched: row r takes `tokens[r * len..(r + 1) * len]` into
    /// slot `first + r` after the `pasts[r]` tokens it holds. Text only (a chunk with images
    /// runs alone, through [`prefill`](Self::prefill)).
    pub(crate) fn prefill_rows(
        &mut self,
        first: usize,
        tokens: Vec<u32>,
        pasts: Vec<usize>,
        fetch: Fetch,
    ) -> Result<StepOutput, RunnerError> {
        let inputs = StepInputs::new(tokens, pasts)?;
        let output = self.model.run_rows(&inputs, self.pool.cache(), first, fetch)?;
        #[cfg(feature = "fault-injection")]
        self.faults.0.check_prefill(inputs.tokens())?;
        Ok(output)
    }

    /// The image rows of prompt tokens `range`, encoding their images first if need be.
    fn chunk_rows(
        &mut self,
        images: &mut SequenceImages,
        range: Range<usize>,
        metrics: &mut MetricsSnapshot,
    ) -> Result<Option<Arc<ImageFeatures>>, RunnerError> {
        let vision = self.vision.as_mut().ok_or(RunnerError::NoVisionEncoder)?;
        vision.chunk_rows(&self.model, images, range, metrics)
    }

    /// Prompt tokens of `tokens` the prefix cache holds (whole blocks; no use recorded).
    pub(crate) fn lookup(&self, tokens: &[u32], keys: &[BlockKey]) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.cache.lookup(tokens, keys))
    }

    /// Copies the cached KV of the first `want` tokens of `tokens` into `slot`; returns how many
    /// tokens it provided (`want`, which a [`lookup`](Self::lookup) in the same step found).
    pub(crate) fn load_prefix(
        &mut self,
        slot: usize,
        tokens: &[u32],
        keys: &[BlockKey],
        want: usize,
    ) -> Result<usize, RunnerError> {
        let (Some(store), Some(layout)) = (self.prefix.as_mut(), self.pool.layout()) else { return Ok(0) };
        if want == 0 {
            return Ok(0);
        }
        let blocks = want.div_ceil(BLOCK_TOKENS);
        let pieces = store.cache.acquire(tokens, keys, blocks);
        let got: usize = pieces.iter().map(|p| p.blocks).sum();
        if got < blocks {
            return Err(RunnerError::Bookkeeping(format!(
                "the prefix cache holds {got} blocks of {blocks} looked up in this step"
            )));
        }
        let mut copies = Vec::with_capacity(pieces.len() * 2 * layout.layers.len());
        for piece in &pieces {
            let extent = store
                .cache
                .extent(piece.extent)
                .ok_or_else(|| RunnerError::Bookkeeping("a prefix-cache extent vanished".into()))?;
            copies.extend(hit_copies(layout, slot, piece, extent.blocks, &extent.storage));
        }
        // SAFETY: each copy reads an extent's buffer and writes positions of `slot` of the pool,
        // both live and of the sizes computed from their layouts, on the layer's device; they do
        // not overlap.
        unsafe { KvMemory::copy_on_devices(&copies) }
            .map_err(|source| RunnerError::Copy { what: "copying cached KV into a slot", source })?;
        Ok(want)
    }

    /// Offers the KV of `tokens` (what `slot` holds; `keys` their block keys) to the prefix
    /// cache: the full blocks it does not hold yet are copied out of the slot into a new extent.
    pub(crate) fn store_prefix(&mut self, slot: usize, tokens: &[u32], keys: &[BlockKey]) -> Result<(), RunnerError> {
        let Some(store) = self.prefix.as_mut() else { return Ok(()) };
        let Some(layout) = self.pool.layout() else { return Ok(()) };
        let Some(reservation) = store.cache.reserve(tokens, keys) else { return Ok(()) };
        let bytes = reservation.blocks * BLOCK_TOKENS * layout.bytes_per_token();
        let buffer = self.model.new_kv_buffer(bytes)?;
        let copies = store_copies(layout, slot, &reservation, &buffer);
        // SAFETY: each copy reads positions of `slot` of the pool and writes the new buffer,
        // both live and of the sizes computed from their layouts, on the layer's device; they do
        // not overlap.
        unsafe { KvMemory::copy_on_devices(&copies) }
            .map_err(|source| RunnerError::Copy { what: "copying KV from a slot into the prefix cache", source })?;
        store.cache.commit(reservation, tokens, keys, buffer);
        Ok(())
    }

    /// Bytes free for the KV pool on the sessions' GPUs: free memory less the share
    /// `1 - utilization` of the total kept back for activations and everything else. Measured
    /// after one prefill of `prefill_tokens` tokens, so that the largest activations of a step
    /// are already allocated (ONNX Runtime's arena keeps them). A staged model's GPUs each hold
    /// their stages' layers' share of every token's KV; the pool is what the tightest of them
    /// allows, in bytes of the whole model's KV. None on the CPU.
    pub(crate) fn measure_free_kv_bytes(
        model: &mut DecoderModel,
        prefill_tokens: usize,
        utilization: f64,
    ) -> Result<Option<u64>, ModelError> {
        if model.device_id().is_none() {
            return Ok(None);
        }
        let runtime = CudaRuntime::get()
            .ok_or_else(|| CudaError::NotLoaded { needed_for: "measuring the GPU's free memory".into() })?;
        let tokens = prefill_tokens.clamp(1, model.context_length() - 1);
        let mut cache = model.new_batch_cache(1, tokens)?;
        let profile = StepInputs::new(vec![0; tokens], vec![0])?;
        model
            .run_rows(&profile, &mut cache, 0, Fetch::Logits)
            .map_err(|e| e.context("the profiling prefill failed"))?;
        drop(cache);
        let layers = model.manifest.dims.num_layers.max(1) as u64;
        let mut per_device: Vec<(i32, u64)> = Vec::new();
        for (device, range) in model.stage_devices().into_iter().zip(model.stage_layers()) {
            let Some(device) = device else { continue };
            match per_device.iter_mut().find(|(d, _)| *d == device) {
                Some((_, n)) => *n += range.len() as u64,
                None => per_device.push((device, range.len() as u64)),
            }
        }
        let mut budget = u64::MAX;
        for (device, device_layers) in per_device {
            let (free, total) = runtime.memory_info(device)?;
            let keep = ((1.0 - utilization) * total as f64) as u64;
            let available = (free as u64).saturating_sub(keep);
            tracing::info!(
                "GPU {device}: {} free of {} after a {tokens}-token profiling prefill; {} for the KV cache of its {device_layers} of {layers} layers (utilization {utilization})",
                pio_models::size::format_bytes(free as u64),
                pio_models::size::format_bytes(total as u64),
                pio_models::size::format_bytes(available)
            );
            budget = budget.min(available / device_layers.max(1) * layers);
        }
        Ok(Some(budget))
    }
}

/// Grows ONNX Runtime's device arena by the prefix cache's whole size once, at start: the cache
/// then carves each stored extent out of memory the arena already holds (freed extents go back
/// to it, not to the device). Without this every store of a new extent was a `cudaMalloc` on the
/// serving path: 7 ms for a 2,112-token prefix and 17.6 ms for a 4,096-token prompt on an H200
/// (Run 6), time the next request's first token or every stream's next token waited for. When
/// the memory cannot be had at once, extents are allocated as they come, as before.
fn reserve_device_memory(model: &DecoderModel, bytes: u64) {
    let start = Instant::now();
    let Ok(len) = usize::try_from(bytes) else { return };
    match model.new_kv_buffer(len) {
        Ok(reserved) => {
            drop(reserved);
            tracing::info!(
                "prefix cache: {} reserved in the device arena in {:.0} ms",
                pio_models::size::format_bytes(bytes),
                start.elapsed().as_secs_f64() * 1e3
            );
        }
        Err(e) => tracing::warn!(
            "prefix cache: {} could not be reserved at start ({e:#}); its extents are allocated as they are stored",
            pio_models::size::format_bytes(bytes)
        ),
    }
}

/// Puts row 0 of `own` (a step of one row) in row `row` of `output` (a batched step's).
fn replace_row(output: &mut StepOutput, row: usize, own: StepOutput) -> Result<(), RunnerError> {
    match (output, own) {
        (StepOutput::Greedy(tokens), StepOutput::Greedy(mine)) => {
            let (slot, mine) = (tokens.get_mut(row), mine.first());
            *slot.ok_or_else(|| RunnerError::Bookkeeping("a decode step without the row run apart".into()))? =
                *mine.ok_or_else(|| RunnerError::Bookkeeping("a step of one row gave no token".into()))?;
        }
        (StepOutput::Logits(all), StepOutput::Logits(mine)) => {
            let width = all.rows * all.vocab;
            if row >= all.batch || mine.data.len() != width {
                return Err(RunnerError::Bookkeeping("a row run apart does not fit the batch's logits".into()));
            }
            all.data[row * width..(row + 1) * width].copy_from_slice(&mine.data);
        }
        _ => return Err(RunnerError::Bookkeeping("a row run apart brought back other outputs than the batch".into())),
    }
    Ok(())
}

/// Byte offset of layer `layer`'s keys (`direction` 0) or values (1) in an extent of `tokens`
/// tokens: per layer and direction (kv_heads, tokens, head_dim).
fn extent_region(layout: &SharedLayout, tokens: usize, layer: usize, direction: usize) -> usize {
    (layer * 2 + direction) * layout.kv_heads * tokens * layout.position_bytes()
}

/// The pool buffer of `layer`'s keys (`direction` 0) or values (1).
fn pool_buffer(layout: &SharedLayout, layer: usize, direction: usize) -> usize {
    let (k, v) = layout.layers[layer];
    if direction == 0 {
        k
    } else {
        v
    }
}

/// Copies of a hit piece from its extent (`extent_blocks` long, in `extent`) into `slot`:
/// one strided copy per layer and direction, a run of the piece's tokens per head, each on
/// its layer's device.
fn hit_copies(
    layout: &SharedLayout,
    slot: usize,
    piece: &HitPiece,
    extent_blocks: usize,
    extent: &KvBuffer,
) -> Vec<(Option<i32>, Copy2d)> {
    let extent_tokens = extent_blocks * BLOCK_TOKENS;
    let pb = layout.position_bytes();
    let mut copies = Vec::with_capacity(2 * layout.layers.len());
    for layer in 0..layout.layers.len() {
        for direction in 0..2 {
            let copy = Copy2d {
                dst: layout.address(pool_buffer(layout, layer, direction), slot, piece.to * BLOCK_TOKENS),
                dst_pitch: layout.head_pitch(),
                src: extent
                    .address(extent_region(layout, extent_tokens, layer, direction) + piece.first * BLOCK_TOKENS * pb),
                src_pitch: extent_tokens * pb,
                width: piece.blocks * BLOCK_TOKENS * pb,
                height: layout.kv_heads,
            };
            copies.push((layout.devices[layer], copy));
        }
    }
    copies
}

/// Copies of a reservation's blocks from `slot` into a new extent `extent`.
fn store_copies(
    layout: &SharedLayout,
    slot: usize,
    reservation: &Reservation,
    extent: &KvBuffer,
) -> Vec<(Option<i32>, Copy2d)> {
    let tokens = reservation.blocks * BLOCK_TOKENS;
    let pb = layout.position_bytes();
    let mut copies = Vec::with_capacity(2 * layout.layers.len());
    for layer in 0..layout.layers.len() {
        for direction in 0..2 {
            let copy = Copy2d {
                dst: extent.address(extent_region(layout, tokens, layer, direction)),
                dst_pitch: tokens * pb,
                src: layout.address(
                    pool_buffer(layout, layer, direction),
                    slot,
                    reservation.first_block * BLOCK_TOKENS,
                ),
                src_pitch: layout.head_pitch(),
                width: tokens * pb,
                height: layout.kv_heads,
            };
            copies.push((layout.devices[layer], copy));
        }
    }
    copies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_batch_sizes_follow_vllm_and_end_at_max_seqs() {
        assert_eq!(graph_batch_sizes(1), [1]);
        assert_eq!(graph_batch_sizes(6), [1, 2, 4, 6]);
        assert_eq!(graph_batch_sizes(32), [1, 2, 4, 8, 16, 24, 32]);
        assert_eq!(graph_batch_sizes(33), [1, 2, 4, 8, 16, 24, 32, 33]);
    }

    /// A host "pool" of 3 slots and an extent (in two parts, as a model of two stages has it),
    /// filled with recognizable bytes: a slot's blocks stored and copied back into another slot
    /// land at the same positions, every layer, key and value.
    #[test]
    fn store_and_hit_copies_round_trip_between_slots() {
        crate::ort_lib::environment().unwrap(); // the extent is an ONNX Runtime allocation
        let (layers, kv_heads, capacity, head_dim, rows) = (2, 3, 64, 4, 3);
        let per_buffer = rows * kv_heads * capacity * head_dim;
        let mut buffers: Vec<Vec<u8>> =
            (0..layers * 2).map(|b| (0..per_buffer).map(|i| ((i * 7 + b * 13) % 251) as u8).collect()).collect();
        let layout = SharedLayout {
            layers: (0..layers)
                .map(|l| (buffers[2 * l].as_mut_ptr() as usize, buffers[2 * l + 1].as_mut_ptr() as usize))
                .collect(),
            rows,
            kv_heads,
            capacity,
            head_dim,
            element_bytes: 1,
            devices: vec![None; layers],
        };
        let reservation = Reservation { first_block: 1, blocks: 2, parent: None };
        let host = ort::memory::Allocator::default();
        let bytes = 2 * BLOCK_TOKENS * layout.bytes_per_token();
        let extent = KvBuffer::allocate(bytes, layers, &[(0..1, &host), (1..2, &host)]).unwrap();
        assert_eq!(extent.parts().iter().map(|p| p.1).collect::<Vec<_>>(), [bytes / 2, bytes / 2]);
        let stored = store_copies(&layout, 1, &reservation, &extent);
        assert_eq!(stored.len(), 2 * layers, "one copy per layer and direction");
        let (second, _) = extent.parts()[1];
        assert_eq!(stored[2].1.dst, second, "layer 1's keys start the second part");
        // SAFETY: the regions are inside `buffers` and `extent`, computed from their shapes.
        unsafe { KvMemory::copy_on_devices(&stored) }.unwrap();
        let piece = HitPiece { extent: 0, first: 0, blocks: 2, to: 1 };
        let hit = hit_copies(&layout, 2, &piece, 2, &extent);
        // SAFETY: as above.
        unsafe { KvMemory::copy_on_devices(&hit) }.unwrap();
        for buffer in &buffers {
            for h in 0..kv_heads {
                let at = |slot: usize| ((slot * kv_heads + h) * capacity + BLOCK_TOKENS) * head_dim;
                let span = 2 * BLOCK_TOKENS * head_dim;
                assert_eq!(buffer[at(1)..at(1) + span], buffer[at(2)..at(2) + span], "head {h}");
                // Positions before the copied blocks are untouched.
                assert_ne!(buffer[at(1) - head_dim..at(1)], buffer[at(2) - head_dim..at(2)]);
            }
        }
    }
}
