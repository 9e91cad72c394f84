//! The model presets: each names a Hugging Face repository and carries that repository's
//! `config.json` (as published), so sizes are computed and synthetic checkpoints built at the
//! real shape without downloading anything.

use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::PresetError;

#[derive(Clone, Copy, Debug)]
pub struct Preset {
    /// The name used on the command line (`--model glm-4-7`).
    pub name: &'static str,
    pub hf_repo: &'static str,
    pub description: &'static str,
    /// The repository's config.json, verbatim in the fields the exporter reads.
    config_json: &'static str,
    /// generation_config.json of the repository (sampling defaults, stop ids).
    generation_config_json: &'static str,
    /// Which tokenizer family the preset uses (for synthetic checkpoints and tests).
    pub tokenizer_family: TokenizerFamily,
    /// Processor files of the repository (file name, content) that synthetic checkpoints carry:
    /// a vision-language model's image-processor config and chat template.
    pub processor_files: &'static [(&'static str, &'static str)],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerFamily {
    Qwen3,
    Glm4,
}

impl Preset {
    /// The repository's config.json, parsed and validated.
    pub fn config(&self) -> Result<ModelConfig, PresetError> {
        ModelConfig::from_value(&self.config_json()?)
            .map_err(|source| PresetError::BuiltInConfig { preset: self.name, source })
    }
    /// The repository's config.json as JSON (what a synthetic checkpoint writes, shrunk or not).
    pub fn config_json(&self) -> Result<Value, PresetError> {
        self.parse_built_in("config.json", self.config_json)
    }
    pub fn generation_config_json(&self) -> Result<Value, PresetError> {
        self.parse_built_in("generation_config.json", self.generation_config_json)
    }
    fn parse_built_in(&self, file: &'static str, text: &str) -> Result<Value, PresetError> {
        serde_json::from_str(text).map_err(|source| PresetError::BuiltInJson { preset: self.name, file, source })
    }
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "qwen3-4b-instruct-2507",
        hf_repo: "Qwen/Qwen3-4B-Instruct-2507",
        description: "Qwen3 4B dense, instruct (non-thinking), 256K context",
        tokenizer_family: TokenizerFamily::Qwen3,
        processor_files: &[],
        config_json: r#"{
  "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
  "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
  "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560, "initializer_range": 0.02,
  "intermediate_size": 9728, "max_position_embeddings": 262144, "max_window_layers": 36,
  "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 5000000, "sliding_window": null,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "use_cache": true,
  "use_sliding_window": false, "vocab_size": 151936
}"#,
        generation_config_json: r#"{"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643],
  "pad_token_id": 151643, "temperature": 0.7, "top_k": 20, "top_p": 0.8}"#,
    },
    Preset {
        name: "qwen3-coder-30b",
        hf_repo: "Qwen/Qwen3-Coder-30B-A3B-Instruct",
        description: "Qwen3 MoE coder, 30.5B total / 3.3B active, 128 experts top-8",
        tokenizer_family: TokenizerFamily::Qwen3,
        processor_files: &[],
        config_json: r#"{
  "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
  "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
  "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
  "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
  "max_window_layers": 48, "mlp_only_layers": [], "moe_intermediate_size": 768,
  "norm_topk_prob": true, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
  "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": false,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 10000000, "router_aux_loss_coef": 0.0,
  "shared_expert_intermediate_size": 0, "sliding_window": null, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
}"#,
        generation_config_json: r#"{"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643],
  "pad_token_id": 151643, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}"#,
    },
    Preset {
        name: "qwen3-vl-2b",
        hf_repo: "Qwen/Qwen3-VL-2B-Instruct",
        description: "Qwen3-VL 2B vision-language, 24-block vision encoder with DeepStack",
        tokenizer_family: TokenizerFamily::Qwen3,
        // The Qwen3-VL instruct repositories' files (the chat template is 5,292 bytes, SHA-256
        // 3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4).
        processor_files: &[
            ("preprocessor_config.json", include_str!("../assets/qwen3-vl/preprocessor_config.json")),
            ("chat_template.json", include_str!("../assets/qwen3-vl/chat_template.json")),
        ],
        config_json: r#"{
  "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
  "image_token_id": 151655, "video_token_id": 151656,
  "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": true,
  "text_config": {
    "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
    "model_type": "qwen3_vl_text", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_interleaved": true, "mrope_section": [24, 20, 20], "rope_type": "default"},
    "rope_theta": 5000000, "tie_word_embeddings": true, "use_cache": true, "vocab_size": 151936
  },
  "vision_config": {
    "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
    "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
    "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048,
    "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2
  }
}"#,
        generation_config_json: r#"{"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643],
  "pad_token_id": 151643, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0}"#,
    },
    Preset {
        name: "glm-4-7",
        hf_repo: "zai-org/GLM-4.7",
        description: "GLM-4.7 MoE, about 355B total / 32B active, 160 experts top-8",
        tokenizer_family: TokenizerFamily::Glm4,
        processor_files: &[],
        config_json: r#"{
  "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
  "attention_bias": true, "attention_dropout": 0.0, "eos_token_id": [151329, 151336, 151338],
  "first_k_dense_replace": 3, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
  "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 202752,
  "moe_intermediate_size": 1536, "n_group": 1, "n_routed_experts": 160, "n_shared_experts": 1,
  "norm_topk_prob": true, "num_attention_heads": 96, "num_experts_per_tok": 8,
  "num_hidden_layers": 92, "num_key_value_heads": 8, "num_nextn_predict_layers": 1,
  "pad_token_id": 151329, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
  "rope_scaling": null, "rope_theta": 1000000, "routed_scaling_factor": 2.5,
  "tie_word_embeddings": false, "topk_group": 1, "torch_dtype": "bfloat16", "use_cache": true,
  "use_qk_norm": true, "vocab_size": 151552
}"#,
        generation_config_json: r#"{"do_sample": true, "eos_token_id": [151329, 151336, 151338],
  "pad_token_id": 151329, "temperature": 1.0, "top_p": 0.95}"#,
    },
];

/// The preset called `name`; the error lists the known ones.
pub fn find_preset(name: &str) -> Result<&'static Preset, PresetError> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| PresetError::Unknown { name: name.to_string() })
}
