//! pio-export: reads a Hugging Face checkpoint (config.json, safetensors, tokenizer files) and
//! writes ONNX graphs for ONNX Runtime plus the manifest (`pio.json`) the runtime reads.

pub mod arch;
pub mod checkpoint;
pub mod convert;
pub mod decoder;
pub mod export;
pub mod moe;
pub mod onnx;
pub mod quant;
pub mod scratch;
pub mod synthetic;
pub mod unfused_attention;

pub use decoder::ExportSettings;
pub use export::{export, ExportRequest, ExportSummary};
