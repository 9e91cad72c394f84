//! The execution provider a session runs on, with its options.

use anyhow::{anyhow, bail, Result};
use ort::session::builder::SessionBuilder;

#[derive(Clone, Debug, PartialEq)]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU kernels; `threads` = intra-op threads (None: ONNX Runtime's default).
    Cpu { threads: Option<usize> },
    Cuda { device_id: i32 },
    TensorRt { device_id: i32 },
}

impl Default for ExecutionProvider {
    fn default() -> Self {
        ExecutionProvider::Cpu { threads: None }
    }
}

impl ExecutionProvider {
    pub fn name(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu { .. } => "cpu",
            ExecutionProvider::Cuda { .. } => "cuda",
            ExecutionProvider::TensorRt { .. } => "tensorrt",
        }
    }

    /// The GPU a session runs on (None on the CPU).
    pub fn device_id(&self) -> Option<i32> {
        match self {
            ExecutionProvider::Cpu { .. } => None,
            ExecutionProvider::Cuda { device_id } | ExecutionProvider::TensorRt { device_id } => Some(*device_id),
        }
    }

    pub fn parse(name: &str, device_id: i32) -> Result<Self> {
        match name {
            "cpu" => Ok(ExecutionProvider::Cpu { threads: None }),
            "cuda" => Ok(ExecutionProvider::Cuda { device_id }),
            "tensorrt" | "trt" => Ok(ExecutionProvider::TensorRt { device_id }),
            _ => bail!("unknown execution provider `{name}`; expected cpu, cuda or tensorrt"),
        }
    }

    /// Registers this provider on a session builder; fails (rather than silently falling back
    /// to the CPU) when the provider cannot be registered.
    pub fn configure(&self, builder: SessionBuilder) -> Result<SessionBuilder> {
        let err = |e: ort::Error<SessionBuilder>| anyhow!("{e}");
        match self {
            ExecutionProvider::Cpu { threads } => match threads {
                Some(n) => builder.with_intra_threads(*n).map_err(err),
                None => Ok(builder),
            },
            ExecutionProvider::Cuda { device_id } => builder
                .with_execution_providers([ort::ep::CUDA::default().with_device_id(*device_id).build().error_on_failure()])
                .map_err(|e| anyhow!("cannot start the CUDA execution provider: {e}")),
            ExecutionProvider::TensorRt { device_id } => builder
                .with_execution_providers([
                    ort::ep::TensorRT::default().with_device_id(*device_id).build().error_on_failure(),
                    ort::ep::CUDA::default().with_device_id(*device_id).build(),
                ])
                .map_err(|e| anyhow!("cannot start the TensorRT execution provider: {e}")),
        }
    }
}
