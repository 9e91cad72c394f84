//! Where a decoder is cut into stages: the settings (`--stages`, `--stage-memory-gb`,
//! `--stage-boundaries`), the bytes each layer's weights take in the exported precision, and
//! the contiguous layer ranges that balance them.
//!
//! The first stage also holds the token embeddings, the last the final norm and the lm_head
//! (and, when the lm_head is tied and the embeddings live in another stage, its own copy of the
//! table), so those bytes count towards them. Balancing minimizes the largest stage (a linear
//! partition by dynamic programming; a model has at most a few hundred layers).

use std::ops::Range;

use pio_models::config::ModelConfig;
use pio_models::size::Precision;

use crate::arch;
use crate::error::{CheckpointError, SettingsError};
use crate::settings::ExportSettings;

/// How the decoder is cut into stage graphs.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum StageSplit {
    /// One graph (`model.onnx`).
    #[default]
    Single,
    /// `--stages N`: N stages balanced by the bytes of their weights.
    Count(usize),
    /// `--stage-memory-gb G`: as few stages as keep each stage's weights within `bytes`,
    /// balanced.
    MemoryBudget(u64),
    /// `--stage-boundaries A,B,..`: the first layer of each stage after the first.
    Boundaries(Vec<usize>),
}

/// One stage of a decoder build: stage `index` of `count`, over decoder layers `layers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageScope {
    pub index: usize,
    pub count: usize,
    pub layers: Range<usize>,
}

impl StageScope {
    /// The whole decoder as one graph.
    pub fn whole(layers: usize) -> Self {
        StageScope { index: 0, count: 1, layers: 0..layers }
    }

    /// Holds the embeddings (and takes `input_ids`).
    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    /// Holds the final norm and the lm_head.
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// Bytes of a decoder's weights in the exported precision, by where they live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecoderBytes {
    pub embeddings: u64,
    /// Each decoder layer's weights.
    pub layers: Vec<u64>,
    /// The final norm and the lm_head (a tied lm_head: nothing, the first stage's table serves).
    pub head: u64,
    /// A tied lm_head's table when the last stage needs its own copy of it.
    pub tied_table: u64,
}

impl DecoderBytes {
    /// What the stage over `layers` weighs, of `stages` stages.
    pub fn stage(&self, layers: Range<usize>, stages: usize) -> u64 {
        let mut bytes: u64 = self.layers[layers.clone()].iter().sum();
        if layers.start == 0 {
            bytes += self.embeddings;
        }
        if layers.end == self.layers.len() {
            bytes += self.head;
            if stages > 1 {
                bytes += self.tied_table;
            }
        }
        bytes
    }
}

/// Bytes per element of a weight quantized to int4 with scales of `scale_bytes` per
/// `block_size` elements.
fn int4_bytes(elements: u64, block_size: usize, scale_bytes: usize) -> u64 {
    elements / 2 + elements.div_ceil(block_size as u64) * scale_bytes as u64
}

/// The decoder layer a checkpoint tensor belongs to (`...layers.N....`), if any.
pub(crate) fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// The bytes of `config`'s decoder weights as `settings` export them: 16/32-bit as the graph's
/// dtype, int4 projections (and lm_head / embeddings when asked) as codes plus block scales.
pub fn decoder_bytes(config: &ModelConfig, settings: &ExportSettings) -> Result<DecoderBytes, CheckpointError> {
    let t = &config.text;
    let dtype_bytes = settings.compute_dtype().size_bytes();
    let int4 = settings.precision == Precision::Int4;
    let bs = settings.int4_block_size.max(1);
    let mut bytes = DecoderBytes { embeddings: 0, layers: vec![0; t.num_hidden_layers], head: 0, tied_table: 0 };
    for (name, shape) in arch::checkpoint_tensors(config)? {
        let elements: u64 = shape.iter().map(|&d| d as u64).product();
        let dense = elements * dtype_bytes as u64;
        let quantized = int4_bytes(elements, bs, dtype_bytes);
        if name.contains("visual.") {
            continue; // the vision encoder is a graph of its own
        }
        if name.ends_with("embed_tokens.weight") {
            bytes.embeddings = if int4 && settings.int4_embeddings { quantized } else { dense };
            if t.tie_word_embeddings {
                // The tied lm_head reads the first stage's table; a last stage of its own loads it.
                bytes.tied_table = if int4 && settings.int4_lm_head { quantized } else { dense };
            }
            continue;
        }
        if name == "lm_head.weight" {
            bytes.head += if int4 && settings.int4_lm_head { quantized } else { dense };
            continue;
        }
        match layer_of(&name) {
            Some(layer) if layer < t.num_hidden_layers => {
                let projection = name.ends_with("_proj.weight") && shape.len() == 2;
                bytes.layers[layer] += if int4 && projection { quantized } else { dense };
            }
            Some(_) => {} // GLM's multi-token-prediction layer is not exported
            None => bytes.head += dense,
        }
    }
    Ok(bytes)
}

impl StageSplit {
    /// Checks the settings against a decoder of `layers` layers, naming the flag.
    pub fn validate(&self, layers: usize) -> Result<(), SettingsError> {
        match self {
            StageSplit::Single | StageSplit::MemoryBudget(1..) => Ok(()),
            StageSplit::Count(0) => Err(SettingsError::ZeroStages),
            StageSplit::Count(n) if *n > layers => Err(SettingsError::MoreStagesThanLayers { stages: *n, layers }),
            StageSplit::Count(_) => Ok(()),
            StageSplit::MemoryBudget(0) => Err(SettingsError::ZeroStageMemory),
            StageSplit::Boundaries(b) if b.is_empty() => Err(SettingsError::NoStageBoundaries),
            StageSplit::Boundaries(b) => {
                let mut previous = 0;
                for &layer in b {
                    if layer <= previous || layer >= layers {
                        return Err(SettingsError::StageBoundary { boundaries: b.clone(), layer, layers });
                    }
                    previous = layer;
                }
                Ok(())
            }
        }
    }

    /// The stages' layer ranges for a decoder weighing `bytes` (one range: an unstaged graph).
    pub fn plan(&self, bytes: &DecoderBytes) -> Result<Vec<Range<usize>>, SettingsError> {
        let layers = bytes.layers.len();
        self.validate(layers)?;
        Ok(match self {
            StageSplit::Single => std::iter::once(0..layers).collect(),
            StageSplit::Count(n) => balanced(bytes, *n).0,
            StageSplit::Boundaries(b) => {
                let starts: Vec<usize> = std::iter::once(0).chain(b.iter().copied()).collect();
                starts.iter().zip(starts[1..].iter().chain([&layers])).map(|(&s, &e)| s..e).collect()
            }
            StageSplit::MemoryBudget(budget) => {
                for n in 1..=layers {
                    let (ranges, largest) = balanced(bytes, n);
                    if largest <= *budget {
                        return Ok(ranges);
                    }
                }
                let (ranges, _) = balanced(bytes, layers);
                let (worst, weight) = ranges
                    .iter()
                    .map(|r| (r.clone(), bytes.stage(r.clone(), layers)))
                    .max_by_key(|(_, w)| *w)
                    .unwrap_or((0..0, 0));
                return Err(SettingsError::StageMemoryTooSmall { budget: *budget, layer: worst.start, bytes: weight });
            }
        })
    }
}

/// `n` contiguous non-empty stages minimizing the heaviest one; returns them and its weight.
fn balanced(bytes: &DecoderBytes, n: usize) -> (Vec<Range<usize>>, u64) {
    let layers = bytes.layers.len();
    let n = n.clamp(1, layers.max(1));
    // best[k][j]: the lightest heaviest stage when layers 0..j form k stages; cut[k][j] where
    // the k-th stage starts.
    let mut best = vec![vec![u64::MAX; layers + 1]; n + 1];
    let mut cut = vec![vec![0usize; layers + 1]; n + 1];
    best[0][0] = 0;
    for k in 1..=n {
        for j in k..=layers {
            for i in (k - 1)..j {
                if best[k - 1][i] == u64::MAX {
                    continue;
                }
                let weight = best[k - 1][i].max(bytes.stage(i..j, n));
                if weight < best[k][j] {
                    best[k][j] = weight;
                    cut[k][j] = i;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(n);
    let mut end = layers;
    for k in (1..=n).rev() {
        let start = cut[k][end];
        ranges.push(start..end);
        end = start;
    }
    ranges.reverse();
    (ranges, best[n][layers])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(layers: &[u64], embeddings: u64, head: u64) -> DecoderBytes {
        DecoderBytes { embeddings, layers: layers.to_vec(), head, tied_table: 0 }
    }

    #[test]
    fn balances_heavy_moe_layers_against_the_dense_ones_and_the_embeddings() {
        // 3 dense layers of 1, then 5 MoE layers of 10; embeddings 4, head 4.
        let b = bytes(&[1, 1, 1, 10, 10, 10, 10, 10], 4, 4);
        let (ranges, largest) = balanced(&b, 2);
        // 0..5 weighs 4 + 23, 5..8 weighs 30 + 4: cutting one layer later would make 37.
        assert_eq!(ranges, vec![0..5, 5..8]);
        assert_eq!(largest, 34);
        let (ranges, largest) = balanced(&b, 4);
        assert_eq!(largest, 20);
        assert_eq!(ranges.len(), 4);
        assert!(ranges.iter().all(|r| !r.is_empty()));
        assert_eq!(ranges.first().map(|r| r.start), Some(0));
        assert_eq!(ranges.last().map(|r| r.end), Some(8));
    }

    #[test]
    fn a_memory_budget_takes_the_fewest_stages_that_fit() {
        let b = bytes(&[1, 1, 1, 10, 10, 10, 10, 10], 4, 4);
        assert_eq!(StageSplit::MemoryBudget(100).plan(&b).unwrap(), vec![0..8]);
        // Two stages weigh 34 at best; three fit 27 (17, 20, 24).
        let ranges = StageSplit::MemoryBudget(27).plan(&b).unwrap();
        assert_eq!(ranges.len(), 3);
        let ranges = StageSplit::MemoryBudget(20).plan(&b).unwrap();
        assert!(ranges.iter().all(|r| b.stage(r.clone(), ranges.len()) <= 20), "{ranges:?}");
        let err = StageSplit::MemoryBudget(9).plan(&b).unwrap_err();
        assert!(matches!(err, SettingsError::StageMemoryTooSmall { budget: 9, layer: 7, bytes: 14 }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("--stage-memory-gb") && message.contains("layer 7"), "{message}");
    }

    #[test]
    fn boundaries_are_taken_as_given_and_bad_ones_refused_by_name() {
        let b = bytes(&[1; 5], 0, 0);
        assert_eq!(StageSplit::Boundaries(vec![1, 3]).plan(&b).unwrap(), vec![0..1, 1..3, 3..5]);
        assert_eq!(StageSplit::Boundaries(vec![]).plan(&b), Err(SettingsError::NoStageBoundaries));
        for (bad, layer) in [(vec![0], 0), (vec![3, 2], 2), (vec![5], 5), (vec![2, 2], 2)] {
            let err = StageSplit::Boundaries(bad.clone()).plan(&b).unwrap_err();
            assert_eq!(err, SettingsError::StageBoundary { boundaries: bad.clone(), layer, layers: 5 });
            assert!(err.to_string().contains("--stage-boundaries"), "{bad:?}: {err}");
        }
        assert_eq!(StageSplit::Count(0).plan(&b), Err(SettingsError::ZeroStages));
        assert_eq!(StageSplit::Count(6).plan(&b), Err(SettingsError::MoreStagesThanLayers { stages: 6, layers: 5 }));
        assert!(StageSplit::Count(6).plan(&b).unwrap_err().to_string().contains("5 layers"));
        assert_eq!(StageSplit::MemoryBudget(0).plan(&b), Err(SettingsError::ZeroStageMemory));
    }

    #[test]
    fn layers_are_read_from_tensor_names() {
        assert_eq!(layer_of("model.layers.12.mlp.gate.weight"), Some(12));
        assert_eq!(layer_of("model.language_model.layers.3.input_layernorm.weight"), Some(3));
        assert_eq!(layer_of("model.norm.weight"), None);
    }
}
