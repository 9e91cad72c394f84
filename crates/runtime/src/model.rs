//! A loaded graph folder: the manifest, one ONNX Runtime session over the decoder, and the
//! forward step through the KV cache.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};
use pio_models::manifest::{KvCacheSpec, Manifest, TensorDtype};

use crate::ep::ExecutionProvider;

/// The KV cache of one sequence: per layer, the present key and value of the last step.
pub struct KvCache {
    keys: Vec<DynValue>,
    values: Vec<DynValue>,
    /// Tokens the cache holds.
    pub len: usize,
}

/// Logits of one forward step: `rows` positions (the last one only, or every new token) by `vocab`.
pub struct Logits {
    pub data: Vec<f32>,
    pub rows: usize,
    pub vocab: usize,
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
    pub fn last(&self) -> &[f32] {
        self.row(self.rows - 1)
    }
}

pub struct DecoderModel {
    pub manifest: Manifest,
    pub dir: PathBuf,
    session: Session,
    pub ep: ExecutionProvider,
}

fn ort_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

impl DecoderModel {
    /// Loads `dir/pio.json` and creates the decoder session on `ep`.
    pub fn load(dir: &Path, ep: &ExecutionProvider) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        if manifest.kv_cache.dtype != TensorDtype::Float32 && matches!(ep, ExecutionProvider::Cpu { .. }) {
            bail!(
                "{} is a {} graph built for {}; on the CPU use an fp32 export (pio-export --precision fp32 --ep cpu)",
                dir.display(),
                manifest.precision.as_str(),
                manifest.target_ep.as_str()
            );
        }
        let model_path = dir.join(&manifest.decoder);
        if !model_path.is_file() {
            bail!("{} is missing (listed as the decoder in {})", model_path.display(), dir.join("pio.json").display());
        }
        let env = crate::ort_lib::environment()?;
        let builder = Session::builder(env).map_err(ort_err)?;
        let mut builder = ep.configure(builder)?;
        let session = builder
            .commit_from_file(&model_path)
            .map_err(|e| anyhow!("cannot load {}: {e}", model_path.display()))?;
        Ok(DecoderModel { manifest, dir: dir.to_path_buf(), session, ep: ep.clone() })
    }

    pub fn vocab_size(&self) -> usize {
        self.manifest.dims.vocab_size
    }

    pub fn context_length(&self) -> usize {
        self.manifest.dims.context_length
    }

    /// An empty cache (zero-length past) for one sequence.
    pub fn new_cache(&self) -> Result<KvCache> {
        let d = &self.manifest.dims;
        let shape = vec![1i64, d.num_kv_heads as i64, 0, d.head_dim as i64];
        let empty = || -> Result<DynValue> {
            Ok(Tensor::from_array((shape.clone(), Vec::<f32>::new())).map_err(ort_err)?.into_dyn())
        };
        let mut keys = Vec::with_capacity(d.num_layers);
        let mut values = Vec::with_capacity(d.num_layers);
        for _ in 0..d.num_layers {
            keys.push(empty()?);
            values.push(empty()?);
        }
        Ok(KvCache { keys, values, len: 0 })
    }

    /// Runs `tokens` (batch 1) after what `cache` holds, at positions cache.len.., and moves
    /// the cache forward. Returns logits of the last position (or all new positions when the
    /// graph was exported with all logits).
    pub fn forward(&mut self, tokens: &[u32], cache: &mut KvCache) -> Result<Logits> {
        if tokens.is_empty() {
            bail!("forward needs at least one token");
        }
        let total = cache.len + tokens.len();
        if total > self.context_length() {
            bail!(
                "sequence of {total} tokens exceeds the graph's context length {} (export with a larger --context-length)",
                self.context_length()
            );
        }
        let vocab = self.vocab_size();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary (size {vocab})");
        }
        let s = tokens.len() as i64;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let positions: Vec<i64> = (cache.len as i64..total as i64).collect();
        let mask = vec![1i64; total];
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("input_ids".into(), Tensor::from_array((vec![1, s], ids)).map_err(ort_err)?.into()),
            ("attention_mask".into(), Tensor::from_array((vec![1, total as i64], mask)).map_err(ort_err)?.into()),
            ("position_ids".into(), Tensor::from_array((vec![1, s], positions)).map_err(ort_err)?.into()),
        ];
        let kv = &self.manifest.kv_cache;
        for layer in 0..self.manifest.dims.num_layers {
            inputs.push((KvCacheSpec::name(&kv.past_key, layer).into(), (&cache.keys[layer]).into()));
            inputs.push((KvCacheSpec::name(&kv.past_value, layer).into(), (&cache.values[layer]).into()));
        }
        let mut outputs = self.session.run(inputs).map_err(|e| anyhow!("decoder step failed: {e}"))?;
        let logits_value = outputs.remove("logits").context("the graph has no `logits` output")?;
        let (shape, data) = logits_value.try_extract_tensor::<f32>().map_err(ort_err)?;
        let rows = shape.get(1).copied().unwrap_or(1) as usize;
        let logits = Logits { data: data.to_vec(), rows, vocab };
        for layer in 0..self.manifest.dims.num_layers {
            let k = outputs
                .remove(KvCacheSpec::name(&kv.present_key, layer))
                .with_context(|| format!("missing output {}", KvCacheSpec::name(&kv.present_key, layer)))?;
            let v = outputs
                .remove(KvCacheSpec::name(&kv.present_value, layer))
                .with_context(|| format!("missing output {}", KvCacheSpec::name(&kv.present_value, layer)))?;
            cache.keys[layer] = k;
            cache.values[layer] = v;
        }
        cache.len = total;
        Ok(logits)
    }
}
