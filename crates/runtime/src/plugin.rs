//! The model plugin interface: what a service embeds to serve one model family.
//!
//! One trait, [`ModelPlugin`]: metadata (computed from the preset's config), initialize (the
//! ONNX Runtime environment and the execution provider), load (a graph folder), infer (prompt in,
//! text out), generate (full options, streaming), unload. One plugin per preset family, made by
//! [`plugin_for_preset`].

use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use pio_models::config::Architecture;
use pio_models::presets::{find_preset, Preset};
use pio_models::size::{ParameterCount, Precision};
use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::chat_template::RenderOptions;
use crate::ep::ExecutionProvider;
use crate::generate::{GenerateOptions, GenerationOutput, Generator, TokenEvent};
use crate::sampling::SamplingParams;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Text,
    Image,
}

/// The preset families, one plugin each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    Qwen3,
    Qwen3Moe,
    Qwen3Vl,
    Glm4Moe,
}

impl Family {
    pub fn of(arch: Architecture) -> Family {
        match arch {
            Architecture::Qwen3 => Family::Qwen3,
            Architecture::Qwen3Moe => Family::Qwen3Moe,
            Architecture::Qwen3Vl => Family::Qwen3Vl,
            Architecture::Glm4Moe => Family::Glm4Moe,
        }
    }
    pub fn modalities(self) -> Vec<Modality> {
        match self {
            Family::Qwen3Vl => vec![Modality::Text, Modality::Image],
            _ => vec![Modality::Text],
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryNeed {
    pub precision: Precision,
    pub weight_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PluginMetadata {
    pub name: String,
    pub hf_repo: String,
    pub family: Family,
    pub architecture: Architecture,
    pub parameters: ParameterCount,
    /// Weight memory at each precision (the KV cache comes on top, per token of context).
    pub memory: Vec<MemoryNeed>,
    pub kv_bytes_per_token_bf16: u64,
    pub modalities: Vec<Modality>,
    pub max_context: usize,
}

impl PluginMetadata {
    pub fn of(preset: &Preset) -> Result<Self> {
        let config = preset.config()?;
        let parameters = ParameterCount::of(&config);
        let memory = Precision::ALL
            .iter()
            .map(|&p| MemoryNeed { precision: p, weight_bytes: parameters.weight_bytes(p) })
            .collect();
        Ok(PluginMetadata {
            name: preset.name.to_string(),
            hf_repo: preset.hf_repo.to_string(),
            family: Family::of(config.architecture),
            architecture: config.architecture,
            kv_bytes_per_token_bf16: pio_models::size::kv_bytes_per_token(&config.text, 2),
            parameters,
            memory,
            modalities: Family::of(config.architecture).modalities(),
            max_context: config.text.max_position_embeddings,
        })
    }
}

/// A prompt: plain text (no template), chat messages (the model's template), or token ids.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Json>),
    Ids(Vec<u32>),
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub options: GenerateOptions,
    pub render: RenderOptions,
}

pub trait ModelPlugin: Send {
    fn metadata(&self) -> &PluginMetadata;
    /// Loads ONNX Runtime and remembers the execution provider to run on.
    fn initialize(&mut self, ep: ExecutionProvider) -> Result<()>;
    /// Loads a graph folder written by pio-export for this family.
    fn load(&mut self, graphs: &Path) -> Result<()>;
    fn is_loaded(&self) -> bool;
    /// Prompt in, text out: the chat template when the model has one, the checkpoint's sampling
    /// defaults, up to `max_tokens`.
    fn infer(&mut self, prompt: &str, max_tokens: usize) -> Result<String>;
    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<GenerationOutput>;
    /// Drops the session and its memory; `load` may be called again.
    fn unload(&mut self);
}

/// The plugin of every text-decoding family (the family decides what it accepts and reports).
pub struct DecoderPlugin {
    meta: PluginMetadata,
    ep: Option<ExecutionProvider>,
    generator: Option<Generator>,
}

pub fn plugin_for_preset(name: &str) -> Result<Box<dyn ModelPlugin>> {
    let preset = find_preset(name)?;
    Ok(Box::new(DecoderPlugin { meta: PluginMetadata::of(preset)?, ep: None, generator: None }))
}

impl DecoderPlugin {
    fn generator(&mut self) -> Result<&mut Generator> {
        let name = self.meta.name.clone();
        self.generator.as_mut().ok_or_else(|| anyhow!("plugin {name}: no model loaded (call load first)"))
    }

    /// Sampling defaults from the checkpoint's generation_config.json (greedy when it says so).
    pub fn default_sampling(generator: &Generator) -> SamplingParams {
        let g = &generator.model.manifest.generation;
        if !g.do_sample {
            return SamplingParams::greedy();
        }
        let mut p = SamplingParams::default();
        if let Some(t) = g.temperature {
            p.temperature = t as f32;
        }
        if let Some(t) = g.top_p {
            p.top_p = t as f32;
        }
        if let Some(k) = g.top_k {
            p.top_k = k;
        }
        if let Some(m) = g.min_p {
            p.min_p = m as f32;
        }
        if let Some(r) = g.repetition_penalty {
            p.repetition_penalty = r as f32;
        }
        p
    }
}

impl ModelPlugin for DecoderPlugin {
    fn metadata(&self) -> &PluginMetadata {
        &self.meta
    }

    fn initialize(&mut self, ep: ExecutionProvider) -> Result<()> {
        crate::ort_lib::environment()?;
        self.ep = Some(ep);
        Ok(())
    }

    fn load(&mut self, graphs: &Path) -> Result<()> {
        let ep = self.ep.clone().ok_or_else(|| anyhow!("plugin {}: initialize before load", self.meta.name))?;
        let manifest = pio_models::Manifest::load(graphs)?;
        if Family::of(manifest.architecture) != self.meta.family {
            bail!(
                "{} holds a {} graph, but plugin {} serves the {:?} family",
                graphs.display(),
                manifest.architecture.hf_name(),
                self.meta.name,
                self.meta.family
            );
        }
        self.generator = Some(Generator::load(graphs, &ep)?);
        Ok(())
    }

    fn is_loaded(&self) -> bool {
        self.generator.is_some()
    }

    fn infer(&mut self, prompt: &str, max_tokens: usize) -> Result<String> {
        let generator = self.generator()?;
        let sampling = Self::default_sampling(generator);
        let prompt = if generator.chat_template.is_some() {
            Prompt::Chat(vec![json!({"role": "user", "content": prompt})])
        } else {
            Prompt::Text(prompt.to_string())
        };
        let request = GenerateRequest {
            prompt,
            options: GenerateOptions { max_tokens, sampling, ..Default::default() },
            render: RenderOptions::generation(),
        };
        Ok(self.generate(&request, &mut |_| ControlFlow::Continue(()))?.text)
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<GenerationOutput> {
        let generator = self.generator()?;
        let ids = match &request.prompt {
            Prompt::Ids(ids) => ids.clone(),
            Prompt::Text(text) => generator.encode(text)?,
            Prompt::Chat(messages) => generator.chat_prompt(messages, &request.render)?.1,
        };
        generator.generate(&ids, &request.options, on_token)
    }

    fn unload(&mut self) {
        self.generator = None;
    }
}
