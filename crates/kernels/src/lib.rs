//! Inference-PIO's own kernels for ONNX Runtime: custom operators (domain `ai.pio`) whose CUDA
//! implementations are compiled with NVRTC when a session loads, for the device's architecture,
//! and launched on the CUDA execution provider's stream; each operator also has a CPU
//! implementation (the Rust reference of the same math), so a graph that uses them runs, and is
//! tested, on the CPU too.
//!
//! * [`layout`]: the int4 weight layout and its packing from MatMulNBits' (used by `pio-export`);
//! * [`reference`]: the CPU math of every kernel;
//! * [`ops`]: the ONNX Runtime operators ([`ops::operator_domain`] registers them all);
//! * [`gpu`]: launching the kernels on device pointers; [`driver`], [`nvrtc`], [`cublas`]:
//!   the CUDA libraries, all loaded at run time (a CPU-only build and machine never touch them).

pub mod cublas;
pub mod driver;
#[cfg(test)]
mod emulator;
pub mod error;
pub mod gpu;
pub mod layout;
pub mod nvrtc;
pub mod ops;
pub mod reference;
pub mod source;

pub use error::{KernelError, Result};
