//! The KV pool: one GroupQueryAttention shared buffer per layer and direction of
//! (max_seqs, kv_heads, slot_capacity, head_dim) elements, one slot (row) per running sequence,
//! allocated once where the session runs (device memory on a GPU, host memory on the CPU, where
//! GroupQueryAttention updates the buffer in place as well).
//!
//! Slots are the outermost axis, so slots 0..n are one contiguous view: the decode batch of a
//! step is the first n slots, bound as one (n, ...) tensor, and a prefill chunk is a batch-1
//! view of its slot. Graphs without GroupQueryAttention (`--no-fused-attention`) have a cache
//! that grows step by step and no views: their pool is one sequence.

use std::collections::BTreeSet;

use crate::cuda_rt::{Copy2d, CudaError, CudaRuntime};
use crate::model::{DecoderModel, KvCache, ModelError, SharedLayout};

use super::error::EngineError;

/// How the pool was asked to be sized (the engine's settings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolSettings {
    pub max_seqs: Option<usize>,
    pub kv_cache_bytes: Option<u64>,
    pub max_model_len: Option<usize>,
}

/// What the pool is sized from besides the settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    pub context_length: usize,
    pub bytes_per_token: usize,
    /// Memory measured free for the KV cache (a GPU), when no `kv_cache_bytes` is set.
    pub measured_bytes: Option<u64>,
    /// A default capacity leaves room for at least this many slots.
    pub min_slots: usize,
    /// At most this many slots unless `max_seqs` says otherwise (vLLM's `max_num_seqs` default).
    pub max_slots: usize,
    /// Whether the graph has GroupQueryAttention's shared buffer (else one growing sequence).
    pub shared_buffer: bool,
}

/// The pool's shape: `slots` sequences of `capacity` tokens each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPlan {
    pub slots: usize,
    pub capacity: usize,
}

impl PoolPlan {
    pub fn bytes(&self, bytes_per_token: usize) -> u64 {
        (self.slots * self.capacity) as u64 * bytes_per_token as u64
    }
}

/// Slot capacities the engine computes are multiples of this (the prefix cache's block size).
const CAPACITY_GRANULE: usize = 16;

/// Sizes the pool (pure; see the README's "The engine" for the rules):
/// - the slot capacity is `max_model_len`, else the graph's context length, capped (when a byte
///   budget is known) so that `max_seqs`, else `min_slots`, slots fit;
/// - the slots are `max_seqs`, else as many as the budget holds (at most `max_slots`), else
///   (no budget: the CPU without settings) `min_slots`;
/// - the budget is `kv_cache_bytes`, else the measured free memory.
pub fn plan_pool(settings: PoolSettings, limits: PoolLimits) -> Result<PoolPlan, EngineError> {
    let context = limits.context_length;
    if let Some(m) = settings.max_model_len {
        if m > context {
            return Err(EngineError::config(
                "max_model_len",
                format!("{m} is over the graph's context length {context} (export with a larger --context-length)"),
            ));
        }
        if m < 2 {
            return Err(EngineError::config("max_model_len", format!("{m} leaves no room for a prompt and a token")));
        }
    }
    if settings.max_seqs == Some(0) {
        return Err(EngineError::config("max_seqs", "must be at least 1"));
    }
    let wanted_len = settings.max_model_len.unwrap_or(context);
    if !limits.shared_buffer {
        if let Some(n) = settings.max_seqs.filter(|&n| n > 1) {
            return Err(EngineError::config(
                "max_seqs",
                format!(
                    "{n} sequences need GroupQueryAttention's shared KV buffer, and this graph was exported with \
                     --no-fused-attention (its cache grows step by step): it serves one sequence at a time"
                ),
            ));
        }
        return Ok(PoolPlan { slots: 1, capacity: wanted_len });
    }
    let bpt = limits.bytes_per_token.max(1) as u64;
    let budget = settings.kv_cache_bytes.or(limits.measured_bytes);
    let computed_capacity = |slots: usize, budget: u64| {
        let fits = (budget / (slots as u64 * bpt)) as usize;
        let cap = fits.min(context);
        if cap >= CAPACITY_GRANULE && cap < context {
            cap - cap % CAPACITY_GRANULE
        } else {
            cap
        }
    };
    let too_small = |slots: usize, capacity: usize, budget: u64| {
        EngineError::config(
            "kv_cache_bytes",
            format!(
                "{slots} sequence(s) of {capacity} tokens need {} of KV cache ({} per token), but {} is available: \
                 lower --max-seqs or --max-model-len, or give the cache more memory",
                format_bytes(slots as u64 * capacity as u64 * bpt),
                format_bytes(bpt),
                format_bytes(budget)
            ),
        )
    };
    let plan = match (settings.max_seqs, budget) {
        (Some(slots), None) => PoolPlan { slots, capacity: wanted_len },
        (Some(slots), Some(budget)) => {
            let capacity = settings.max_model_len.unwrap_or_else(|| computed_capacity(slots, budget));
            if capacity < 2 || slots as u64 * capacity as u64 * bpt > budget {
                return Err(too_small(slots, capacity.max(2), budget));
            }
            PoolPlan { slots, capacity }
        }
        (None, Some(budget)) => {
            let capacity = settings.max_model_len.unwrap_or_else(|| computed_capacity(limits.min_slots, budget));
            let slots = ((budget / (capacity.max(1) as u64 * bpt)) as usize).min(limits.max_slots);
            if capacity < 2 || slots == 0 {
                return Err(too_small(1, capacity.max(2), budget));
            }
            PoolPlan { slots, capacity }
        }
        (None, None) => PoolPlan { slots: limits.min_slots, capacity: wanted_len },
    };
    Ok(plan)
}

fn format_bytes(bytes: u64) -> String {
    pio_models::size::format_bytes(bytes)
}

/// Copies between KV memory regions where the pool lives: host memcpy on the CPU,
/// `cudaMemcpy2DAsync` on a GPU (then one synchronize before the next session run).
#[derive(Clone, Copy)]
pub(crate) enum KvMemory {
    Host,
    Cuda { device: i32, runtime: &'static CudaRuntime },
}

impl KvMemory {
    /// Whether KV can be copied where every layer of `layout` lives (a GPU needs the CUDA
    /// runtime in the process).
    pub(crate) fn available(layout: &SharedLayout) -> bool {
        layout.devices.iter().all(|&d| Self::on(d).is_some())
    }

    /// The copier for memory of CUDA device `device` (None: host memory).
    pub(crate) fn on(device: Option<i32>) -> Option<KvMemory> {
        match device {
            None => Some(KvMemory::Host),
            Some(device) => CudaRuntime::get().map(|runtime| KvMemory::Cuda { device, runtime }),
        }
    }

    /// Runs each copy on its memory (the device of the layer it moves: a staged model's layers
    /// live on their stages' devices), and waits for them.
    ///
    /// # Safety
    /// As [`copy`](Self::copy), for each copy on its device.
    pub(crate) unsafe fn copy_on_devices(copies: &[(Option<i32>, Copy2d)]) -> Result<(), CudaError> {
        let mut devices: Vec<Option<i32>> = copies.iter().map(|(d, _)| *d).collect();
        devices.sort();
        devices.dedup();
        for device in devices {
            let memory = Self::on(device)
                .ok_or_else(|| CudaError::NotLoaded { needed_for: format!("copying KV on GPU {device:?}") })?;
            let group: Vec<Copy2d> = copies.iter().filter(|(d, _)| *d == device).map(|(_, c)| *c).collect();
            memory.copy(&group)?;
        }
        Ok(())
    }

    /// Runs `copies` and waits for them.
    ///
    /// # Safety
    /// Every copy's regions must be live memory of this kind of that extent, not overlapping.
    pub(crate) unsafe fn copy(&self, copies: &[Copy2d]) -> Result<(), CudaError> {
        match self {
            KvMemory::Host => {
                for c in copies {
                    c.run_on_host();
                }
                Ok(())
            }
            KvMemory::Cuda { device, runtime } => {
                runtime.device_copies_2d(*device, copies)?;
                runtime.synchronize(*device)
            }
        }
    }
}

/// The slots: one KV cache of `slots` rows, and which rows are free.
pub(crate) struct KvPool {
    cache: KvCache,
    plan: PoolPlan,
    free: BTreeSet<usize>,
    /// A growing cache still holds a finished sequence's KV: starting it over failed when the
    /// slot was given back, so taking the slot tries again.
    stale: bool,
}

impl KvPool {
    pub(crate) fn new(model: &DecoderModel, plan: PoolPlan) -> Result<Self, ModelError> {
        let cache = Self::new_cache(model, plan)?;
        Ok(KvPool { cache, plan, free: (0..plan.slots).collect(), stale: false })
    }

    fn new_cache(model: &DecoderModel, plan: PoolPlan) -> Result<KvCache, ModelError> {
        if model.has_shared_buffer() {
            model.new_shared_cache(plan.slots, plan.capacity)
        } else {
            model.new_batch_cache(1, plan.capacity)
        }
    }

    pub(crate) fn plan(&self) -> PoolPlan {
        self.plan
    }

    pub(crate) fn free_slots(&self) -> Vec<usize> {
        self.free.iter().copied().collect()
    }

    pub(crate) fn slots_in_use(&self) -> usize {
        self.plan.slots - self.free.len()
    }

    /// Marks `slot` taken (the scheduler chose it among the free ones). Fails only when a
    /// growing cache could not start over, then or now: the slot is taken all the same, and the
    /// request that took it fails, which gives it back.
    pub(crate) fn take(&mut self, model: &DecoderModel, slot: usize) -> Result<(), ModelError> {
        self.free.remove(&slot);
        if self.stale {
            self.cache = Self::new_cache(model, self.plan)?;
            self.stale = false;
        }
        Ok(())
    }

    /// Gives `slot` back, free whatever happens next. A growing cache starts over empty; when
    /// that fails, the next [`take`](Self::take) tries again.
    pub(crate) fn release(&mut self, model: &DecoderModel, slot: usize) -> Result<(), ModelError> {
        self.free.insert(slot);
        if !self.cache.is_shared_buffer() {
            self.stale = true;
            self.cache = Self::new_cache(model, self.plan)?;
            self.stale = false;
        }
        Ok(())
    }

    pub(crate) fn cache(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    pub(crate) fn layout(&self) -> Option<&SharedLayout> {
        self.cache.shared_layout()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: PoolLimits = PoolLimits {
        context_length: 32768,
        bytes_per_token: 1000,
        measured_bytes: Some(64_000_000_000),
        min_slots: 32,
        max_slots: 256,
        shared_buffer: true,
    };

    fn plan(settings: PoolSettings, limits: PoolLimits) -> PoolPlan {
        plan_pool(settings, limits).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn free_memory_sizes_the_slots_with_the_capacity_capped_for_a_useful_number() {
        // 64 GB at 1000 bytes per token: 64M tokens; the full context (32768) fits 1953 times,
        // so the context stays and the slots stop at 256.
        assert_eq!(plan(PoolSettings::default(), GPU), PoolPlan { slots: 256, capacity: 32768 });
        // 640 MB: 640k tokens; 32 slots of the full context do not fit, so the capacity drops
        // to 20000 (a multiple of 16) and 32 slots fit.
        let small = PoolLimits { measured_bytes: Some(640_000_000), ..GPU };
        let p = plan(PoolSettings::default(), small);
        assert_eq!(p, PoolPlan { slots: 32, capacity: 20000 });
        assert!(p.bytes(1000) <= 640_000_000);
    }

    #[test]
    fn settings_win_over_measurement_and_are_checked_against_the_budget() {
        let s = PoolSettings { max_model_len: Some(4096), ..Default::default() };
        let small = PoolLimits { measured_bytes: Some(640_000_000), ..GPU };
        assert_eq!(plan(s, small), PoolPlan { slots: 156, capacity: 4096 });
        let s = PoolSettings { max_seqs: Some(8), ..Default::default() };
        assert_eq!(plan(s, small), PoolPlan { slots: 8, capacity: 32768 });
        let s = PoolSettings { max_seqs: Some(64), kv_cache_bytes: Some(64_000_000), ..Default::default() };
        assert_eq!(plan(s, GPU), PoolPlan { slots: 64, capacity: 992 });
        let s = PoolSettings { max_seqs: Some(64), max_model_len: Some(32768), kv_cache_bytes: Some(64_000_000) };
        let err = plan_pool(s, GPU).unwrap_err().to_string();
        assert!(err.contains("64 sequence(s) of 32768 tokens") && err.contains("kv_cache_bytes"), "{err}");
        let s = PoolSettings { max_model_len: Some(40000), ..Default::default() };
        assert!(plan_pool(s, GPU).unwrap_err().to_string().contains("context length 32768"));
    }

    #[test]
    fn the_cpu_without_settings_gets_the_default_slots_of_the_whole_context() {
        let cpu = PoolLimits { measured_bytes: None, min_slots: 4, ..GPU };
        assert_eq!(plan(PoolSettings::default(), cpu), PoolPlan { slots: 4, capacity: 32768 });
    }

    #[test]
    fn a_growing_cache_serves_one_sequence() {
        let growing = PoolLimits { shared_buffer: false, ..GPU };
        assert_eq!(plan(PoolSettings::default(), growing), PoolPlan { slots: 1, capacity: 32768 });
        let err = plan_pool(PoolSettings { max_seqs: Some(4), ..Default::default() }, growing).unwrap_err();
        assert!(err.to_string().contains("--no-fused-attention"), "{err}");
    }
}
