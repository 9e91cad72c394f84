//! Running a decoder exported in stages (`pio-export --stages N`): pipeline parallelism over
//! devices. Every [`DecoderModel`](crate::model::DecoderModel) runs through this module; an
//! unstaged graph is one stage over all layers.
//!
//! - Each stage is an ONNX Runtime session of its own ([`session`]) on the device
//!   [`placement`] gives it (`--devices 0,1,..`; by default every stage on the execution
//!   provider's one device, or the CPU), with its layers' part of the KV cache on that device.
//! - What a stage outputs for later ones (the hidden states; Qwen3-VL's deepstack features) is
//!   bound to device memory and handed on as a device tensor ([`carried`]): on the same device
//!   as is, to another GPU by a peer copy through the CUDA runtime. Nothing goes through the
//!   host between stages.
//! - A step is cut into micro-steps (prefill chunks, sequences of a batched prefill, and row
//!   groups of a batched decode: micro-batches), which [`pipeline`] runs through the stages on
//!   a thread per device, so that stage k works on micro-step m while stage k + 1 works on
//!   m - 1. Per-stage busy time is measured, and the bubble is what `pio bench` reports.
//! - With CUDA graphs each stage captures its own graph per micro-batch, with its inputs,
//!   outputs and hidden states at fixed device addresses.

mod carried;
mod pipeline;
mod placement;
mod session;

pub use pipeline::{PipelineMode, StageTimings};

pub(crate) use pipeline::{execute, MicroStep};
pub(crate) use placement::{lanes, stage_eps};
pub(crate) use session::{StageKv, StageSession};

/// Where a staged model's stages run and how they overlap. Build with [`StageOptions::new`] and
/// the `with_*` methods; the default places every stage on the execution provider's device,
/// overlaps stages on different devices, and cuts batched steps into one micro-batch per group
/// of stages sharing a device.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StageOptions {
    devices: Vec<i32>,
    pipeline: PipelineMode,
    micro_batches: Option<usize>,
}

impl StageOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// The GPUs the stages run on (`--devices 0,1`): with as many devices as stages, stage i on
    /// device i; with fewer, consecutive stages share a device (stage i on
    /// `devices[i * devices.len() / stages]`). Empty: every stage on the execution provider's
    /// device.
    pub fn with_devices(mut self, devices: Vec<i32>) -> Self {
        self.devices = devices;
        self
    }

    /// How stages overlap (default [`PipelineMode::PerDevice`]).
    pub fn with_pipeline(mut self, mode: PipelineMode) -> Self {
        self.pipeline = mode;
        self
    }

    /// Micro-batches a batched decode step is cut into (default: one per thread of the
    /// pipeline, 1 when the stages share one device). 1 turns micro-batching off.
    pub fn with_micro_batches(mut self, n: usize) -> Self {
        self.micro_batches = Some(n);
        self
    }

    pub fn devices(&self) -> &[i32] {
        &self.devices
    }

    pub fn pipeline(&self) -> PipelineMode {
        self.pipeline
    }

    pub fn micro_batches(&self) -> Option<usize> {
        self.micro_batches
    }
}
