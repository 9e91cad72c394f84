//! One file per architecture, each on the shared decoder core ([`crate::decoder`]): it names the
//! checkpoint's tensors and picks the feed-forward block; the core does the rest.

use anyhow::Result;
use pio_models::config::{Architecture, ModelConfig};

use crate::checkpoint::TensorList;
use crate::decoder::DecoderBuilder;

pub mod glm4_moe;
pub mod qwen3;
pub mod qwen3_moe;
pub mod qwen3_vl;
pub mod qwen3_vl_vision;

/// Builds the decoder graph of `config`'s architecture.
pub fn build_decoder(config: &ModelConfig, b: &mut DecoderBuilder) -> Result<()> {
    match config.architecture {
        Architecture::Qwen3 => qwen3::build_decoder(b),
        Architecture::Qwen3Moe => qwen3_moe::build_decoder(b),
        Architecture::Glm4Moe => glm4_moe::build_decoder(b),
        Architecture::Qwen3Vl => qwen3_vl::build_decoder(b, config),
    }
}

/// The tensors a checkpoint of `config` holds.
pub fn checkpoint_tensors(config: &ModelConfig) -> Result<TensorList> {
    match config.architecture {
        Architecture::Qwen3 => Ok(qwen3::checkpoint_tensors(&config.text)),
        Architecture::Qwen3Moe => Ok(qwen3_moe::checkpoint_tensors(&config.text)),
        Architecture::Glm4Moe => Ok(glm4_moe::checkpoint_tensors(&config.text)),
        Architecture::Qwen3Vl => qwen3_vl::checkpoint_tensors(config),
    }
}
