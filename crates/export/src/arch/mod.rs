//! One file per architecture, each on the shared decoder core ([`crate::decoder`]): it names the
//! checkpoint's tensors and picks the feed-forward block; the core does the rest.

use pio_models::config::{Architecture, ModelConfig};

use crate::checkpoint::TensorList;
use crate::decoder::DecoderBuilder;
use crate::error::{BuildResult, CheckpointError};

pub mod glm4_moe;
pub mod qwen3;
pub mod qwen3_moe;
pub mod qwen3_vl;
pub mod qwen3_vl_vision;

/// Builds the decoder graph of `config`'s architecture.
pub fn build_decoder(config: &ModelConfig, b: &mut DecoderBuilder) -> BuildResult<()> {
    match config.architecture {
        Architecture::Qwen3 => qwen3::build_decoder(b),
        Architecture::Qwen3Moe => qwen3_moe::build_decoder(b),
        Architecture::Glm4Moe => glm4_moe::build_decoder(b),
        Architecture::Qwen3Vl => qwen3_vl::build_decoder(b, config),
    }
}

/// A lower bound of the number of tensors a checkpoint of `config` holds, computed without building the list
/// (which grows with layers x experts): every decoder layer has tensors of its own, every routed expert of a
/// sparse layer too, and every vision block.
pub fn min_tensor_count(config: &ModelConfig) -> u64 {
    let t = &config.text;
    let experts = t.moe.as_ref().map_or(0, |m| m.num_experts as u64);
    let layers: u64 = (0..t.num_hidden_layers).map(|i| if t.is_moe_layer(i) { 1 + experts } else { 1 }).sum();
    layers + config.vision.as_ref().map_or(0, |v| v.depth as u64)
}

/// The tensors a checkpoint of `config` holds.
pub fn checkpoint_tensors(config: &ModelConfig) -> Result<TensorList, CheckpointError> {
    match config.architecture {
        Architecture::Qwen3 => Ok(qwen3::checkpoint_tensors(&config.text)),
        Architecture::Qwen3Moe => Ok(qwen3_moe::checkpoint_tensors(&config.text)),
        Architecture::Glm4Moe => Ok(glm4_moe::checkpoint_tensors(&config.text)),
        Architecture::Qwen3Vl => qwen3_vl::checkpoint_tensors(config),
    }
}
