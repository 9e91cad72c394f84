//! pio-models: the presets, typed Hugging Face configs, sizes computed from them, and the
//! manifest (`pio.json`) that connects the exporter to the runtime.

pub mod config;
pub mod error;
pub mod files;
mod json_fields;
pub mod logging;
pub mod manifest;
pub mod paths;
pub mod presets;
pub mod size;

pub use config::{Architecture, ModelConfig, TextConfig};
pub use error::{ConfigError, ManifestError, PresetError, UnknownNameError};
pub use manifest::{Manifest, TargetEp};
pub use presets::{find_preset, Preset, PRESETS};
pub use size::{ParameterCount, Precision};

#[cfg(test)]
mod tests;
