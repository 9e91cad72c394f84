//! pio-export: reads a Hugging Face checkpoint (config.json, safetensors, tokenizer files) and
//! writes ONNX graphs for ONNX Runtime plus the manifest (`pio.json`) the runtime reads.

pub mod arch;
pub mod checkpoint;
pub mod convert;
pub mod decoder;
pub mod error;
pub mod export;
pub mod moe;
pub mod onnx;
pub mod pio_ops;
pub mod quant;
pub mod random_int4;
pub mod rotary;
pub mod scratch;
pub mod settings;
pub mod stages;
pub mod synthetic;
pub mod unfused_attention;
pub mod unfused_inputs;
pub mod vision_export;
pub mod weights;

pub use error::{BuildError, CheckpointError, ExportError, FsError, OutputError, QuantError, SettingsError};
pub use export::{export, ExportRequest, ExportRequestBuilder, ExportSummary};
pub use pio_ops::PioKernels;
pub use settings::{ExportSettings, ExportSettingsBuilder};
