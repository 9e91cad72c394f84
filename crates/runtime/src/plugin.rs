//! The model plugin interface: what a service embeds to serve one model family.
//!
//! One trait, [`ModelPlugin`]: metadata (computed from the preset's config), initialize (the
//! ONNX Runtime environment and the execution provider), load (a graph folder, started as an
//! [`Engine`]), infer (prompt in, text out; `infer_with_images` with images for a
//! vision-language model), generate (full options, streaming), unload. One
//! plugin per preset family, made by [`plugin_for_preset`]. A loaded plugin hands out its
//! [`Engine`] for concurrent requests. Every failure is a [`PluginError`].

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use pio_image::ImageInput;
use pio_models::config::Architecture;
use pio_models::presets::{find_preset, Preset};
use pio_models::size::{ParameterCount, Precision};
use pio_models::{ManifestError, PresetError};
use serde::Serialize;
use serde_json::json;

use crate::engine::{Engine, EngineConfig, EngineError, Event, Prompt, Request};
use crate::ep::ExecutionProvider;
use crate::generate::{Clock, FinishReason, GenerateOptions, GenerationOutput, OutputBuilder, TokenEvent};
use crate::ort_lib::OrtLibError;

/// What a [`ModelPlugin`] refuses or fails at: the plugin (named) used out of order, a graph folder of another
/// family, and the preset's, ONNX Runtime's, the manifest's and the engine's own errors.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// An unknown preset, or a built-in config that does not parse.
    #[error(transparent)]
    Preset(#[from] PresetError),
    /// ONNX Runtime could not be found or loaded (`initialize`).
    #[error(transparent)]
    OrtLib(#[from] OrtLibError),
    /// The graph folder's `pio.json` (`load`).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The engine refused the request or failed; its own variants tell which.
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("plugin {plugin}: initialize before load")]
    NotInitialized { plugin: String },
    #[error("plugin {plugin}: no model loaded (call load first)")]
    NotLoaded { plugin: String },
    /// `graphs` holds another family's export.
    #[error("{} holds a {architecture} graph, but plugin {plugin} serves the {family:?} family", graphs.display())]
    WrongFamily { graphs: PathBuf, architecture: &'static str, plugin: String, family: Family },
    /// Images need a chat message, so a model without a chat template cannot take them.
    #[error("{} has no chat template: images go into a chat message", graphs.display())]
    ImagesWithoutChatTemplate { graphs: PathBuf },
    #[error("plugin {plugin}: the engine ended the request without an output")]
    NoOutput { plugin: String },
}

type Result<T, E = PluginError> = std::result::Result<T, E>;

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
    pub fn of(preset: &Preset) -> Result<Self, PresetError> {
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
    /// [`infer`](Self::infer) with images: one user message holding the images, in order, then
    /// the prompt (a vision-language model; others refuse images).
    fn infer_with_images(&mut self, prompt: &str, images: &[ImageInput], max_tokens: usize) -> Result<String>;
    /// Generates for `request`, calling `on_token` with each event as it comes; returning
    /// `ControlFlow::Break(())` cancels the request (the output then holds what was seen).
    fn generate(
        &mut self,
        request: &Request,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<GenerationOutput>;
    /// The loaded model's engine, for many requests at once (None before `load`).
    fn engine(&self) -> Option<&Engine>;
    /// Drops the engine, its session and its memory; `load` may be called again.
    fn unload(&mut self);
}

/// A chat content part carrying `image`: a path as transformers' `path`, bytes as `base64`, a data
/// URI as OpenAI's `image_url`.
fn image_part(image: &ImageInput) -> serde_json::Value {
    use base64::Engine as _;
    match image {
        ImageInput::Path(path) => json!({"type": "image", "path": path}),
        ImageInput::Bytes(bytes) => {
            json!({"type": "image", "base64": base64::engine::general_purpose::STANDARD.encode(bytes)})
        }
        ImageInput::DataUri(uri) => json!({"type": "image_url", "image_url": {"url": uri}}),
    }
}

/// The plugin of every text-decoding family (the family decides what it accepts and reports).
pub struct DecoderPlugin {
    meta: PluginMetadata,
    ep: Option<ExecutionProvider>,
    engine: Option<Engine>,
}

pub fn plugin_for_preset(name: &str) -> Result<Box<dyn ModelPlugin>> {
    let preset = find_preset(name)?;
    Ok(Box::new(DecoderPlugin { meta: PluginMetadata::of(preset)?, ep: None, engine: None }))
}

impl DecoderPlugin {
    fn loaded(&self) -> Result<&Engine> {
        self.engine.as_ref().ok_or_else(|| PluginError::NotLoaded { plugin: self.meta.name.clone() })
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
        let ep = self.ep.clone().ok_or_else(|| PluginError::NotInitialized { plugin: self.meta.name.clone() })?;
        let manifest = pio_models::Manifest::load(graphs)?;
        if Family::of(manifest.architecture) != self.meta.family {
            return Err(PluginError::WrongFamily {
                graphs: graphs.to_path_buf(),
                architecture: manifest.architecture.hf_name(),
                plugin: self.meta.name.clone(),
                family: self.meta.family,
            });
        }
        // Unload first: the old engine's memory goes before the new one takes its own.
        self.engine = None;
        self.engine = Some(Engine::start(EngineConfig::builder(graphs).ep(ep).build()?)?);
        Ok(())
    }

    fn is_loaded(&self) -> bool {
        self.engine.is_some()
    }

    fn infer(&mut self, prompt: &str, max_tokens: usize) -> Result<String> {
        self.infer_with_images(prompt, &[], max_tokens)
    }

    fn infer_with_images(&mut self, prompt: &str, images: &[ImageInput], max_tokens: usize) -> Result<String> {
        let engine = self.loaded()?;
        let info = engine.model_info();
        let prompt = if info.has_chat_template && !images.is_empty() {
            let mut content: Vec<serde_json::Value> = images.iter().map(image_part).collect();
            content.push(json!({"type": "text", "text": prompt}));
            Prompt::Chat(vec![json!({"role": "user", "content": content})])
        } else if info.has_chat_template {
            Prompt::Chat(vec![json!({"role": "user", "content": prompt})])
        } else if images.is_empty() {
            Prompt::Text(prompt.to_string())
        } else {
            return Err(PluginError::ImagesWithoutChatTemplate { graphs: info.graphs.clone() });
        };
        let options = GenerateOptions {
            max_tokens: Some(max_tokens),
            sampling: info.default_sampling.clone(),
            ..Default::default()
        };
        Ok(engine.generate(Request::new(prompt).with_options(options))?.text)
    }

    fn generate(
        &mut self,
        request: &Request,
        on_token: &mut dyn FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<GenerationOutput> {
        let mut clock = Clock::new(Instant::now());
        let mut handle = self.loaded()?.submit(request.clone())?;
        let mut seen = OutputBuilder::default();
        while let Some(event) = handle.blocking_next() {
            match event? {
                Event::Token(token) => {
                    clock.first_token.get_or_insert_with(Instant::now);
                    seen.push(&token);
                    if on_token(&token).is_break() {
                        let prompt = handle.prompt_ids().to_vec();
                        handle.cancel();
                        return Ok(seen.finish(prompt, 0, FinishReason::Cancelled, clock));
                    }
                }
                // Also in the output, which is what this returns.
                Event::PromptLogprobs(_) => {}
                Event::Finished(output) => return Ok(output),
            }
        }
        Err(PluginError::NoOutput { plugin: self.meta.name.clone() })
    }

    fn engine(&self) -> Option<&Engine> {
        self.engine.as_ref()
    }

    fn unload(&mut self) {
        self.engine = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_errors_are_typed_and_name_the_plugin() {
        let err = plugin_for_preset("llama-7b").err().expect("an unknown preset is refused");
        assert!(matches!(&err, PluginError::Preset(PresetError::Unknown { name }) if name == "llama-7b"), "{err:?}");

        let mut plugin = plugin_for_preset("qwen3-4b-instruct-2507").unwrap();
        let err = plugin.load(Path::new("graphs/nowhere")).unwrap_err();
        assert!(
            matches!(&err, PluginError::NotInitialized { plugin } if plugin == "qwen3-4b-instruct-2507"),
            "{err:?}"
        );
        let err = plugin.infer("Hello", 4).unwrap_err();
        assert!(matches!(err, PluginError::NotLoaded { .. }), "{err:?}");
        assert_eq!(err.to_string(), "plugin qwen3-4b-instruct-2507: no model loaded (call load first)");
    }
}
