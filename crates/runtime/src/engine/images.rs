//! Images inside the engine: a request's images from submission to its last prefill chunk
//! ([`SequenceImages`]), and the worker's vision side ([`VisionRuntime`]): the image processor,
//! the encoder session and the encoder cache, and the image rows each prefill chunk takes.
//!
//! An image is decoded when its request is submitted (so a bad one is refused before any model
//! work), preprocessed and encoded on the worker right before the first prefill chunk that holds
//! its pad tokens (not at all when the encoder cache has it, or a prefix-cache hit covers all its
//! tokens), and its features are dropped with the request.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use ort::value::DynTensorValueType;
use pio_image::{ImageError, ImageProcessor, PixelBatch, RgbImage};

use crate::cuda_rt::{Copy2d, CudaError};
use crate::generate::ImageTimings;
use crate::model::{DecoderModel, ModelError};
use crate::vision::{EncoderCache, ImageFeatures, LoadedImage, MultimodalPrompt, VisionEncoder, VisionError};

use super::error::RunnerError;
use super::kv_pool::KvMemory;
use super::metrics::MetricsSnapshot;
use super::prefix_cache::ExtraKey;

/// Why image `index` of a request could not be turned into features.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageEncodeError {
    /// The engine's own bookkeeping failed: the pixels were dropped before the image was encoded.
    #[error("image {index}'s pixels are gone before it was encoded")]
    PixelsGone { index: usize },
    #[error("preprocessing image {index}")]
    Preprocess {
        index: usize,
        #[source]
        source: ImageError,
    },
    #[error("encoding image {index}")]
    Encode {
        index: usize,
        #[source]
        source: VisionError,
    },
    /// The encoder and the prompt disagree on the image's size.
    #[error("image {index} encodes to {encoded} tokens, its prompt holds {placed}")]
    TokenCount { index: usize, encoded: usize, placed: usize },
}

/// A request's images: where they sit in its prompt, their pixels until encoded, their
/// features once encoded.
pub(crate) struct SequenceImages {
    pub prompt: MultimodalPrompt,
    pixels: Vec<Option<RgbImage>>,
    features: Vec<Option<Arc<ImageFeatures>>>,
    pub timings: ImageTimings,
}

impl SequenceImages {
    /// `loaded` in prompt order; `decode_ms`: what reading and decoding them took.
    pub(crate) fn new(prompt: MultimodalPrompt, loaded: Vec<LoadedImage>, decode_ms: f64) -> Self {
        let timings = ImageTimings {
            images: prompt.images.len(),
            image_tokens: prompt.images.iter().map(|i| i.tokens.len()).sum(),
            decode_ms,
            ..Default::default()
        };
        let features = vec![None; loaded.len()];
        SequenceImages { prompt, pixels: loaded.into_iter().map(|l| Some(l.pixels)).collect(), features, timings }
    }

    /// Added to every position of the generated tokens.
    pub(crate) fn rope_delta(&self) -> i64 {
        self.prompt.rope.delta
    }

    /// The prefix cache's extra keys: each image's tokens and content hash.
    pub(crate) fn extra_keys(&self) -> Vec<(Range<usize>, ExtraKey)> {
        self.prompt.images.iter().map(|i| (i.tokens.clone(), *i.hash.as_bytes())).collect()
    }

    /// Lets go of the pixels of the images wholly inside the first `cached` tokens (a prefix-cache
    /// hit): their rows are never needed.
    pub(crate) fn skip_cached(&mut self, cached: usize) {
        for (image, pixels) in self.prompt.images.iter().zip(&mut self.pixels) {
            if image.tokens.end <= cached {
                *pixels = None;
            }
        }
    }
}

/// The worker's vision side: the checkpoint's image processor, the encoder session, the encoder
/// cache, and a pixel batch reused between images (its memory is large, and fresh memory costs
/// as much to write as preprocessing does).
pub(crate) struct VisionRuntime {
    encoder: VisionEncoder,
    processor: ImageProcessor,
    cache: EncoderCache,
    batch: PixelBatch,
}

impl VisionRuntime {
    pub(crate) fn new(encoder: VisionEncoder, processor: ImageProcessor, cache_bytes: u64) -> Self {
        VisionRuntime { encoder, processor, cache: EncoderCache::new(cache_bytes), batch: PixelBatch::default() }
    }

    pub(crate) fn cache_bytes(&self) -> u64 {
        self.cache.used_bytes()
    }

    /// The image rows of prompt tokens `range` of a request (None when the range holds no image
    /// token), encoding the images they come from first if need be.
    pub(crate) fn chunk_rows(
        &mut self,
        model: &DecoderModel,
        images: &mut SequenceImages,
        range: Range<usize>,
        metrics: &mut MetricsSnapshot,
    ) -> Result<Option<Arc<ImageFeatures>>, RunnerError> {
        let pieces = images.prompt.rows_in(range);
        for &(index, _) in &pieces {
            if images.features[index].is_none() {
                images.features[index] = Some(self.features(images, index, metrics)?);
            }
        }
        let parts: Vec<(Arc<ImageFeatures>, Range<usize>)> =
            pieces.into_iter().filter_map(|(index, rows)| images.features[index].clone().map(|f| (f, rows))).collect();
        match parts.as_slice() {
            [] => Ok(None),
            // One whole image: its features as they are.
            [(features, rows)] if rows.start == 0 && rows.end == features.tokens() => Ok(Some(Arc::clone(features))),
            _ => gather_rows(model, &parts).map(|f| Some(Arc::new(f))),
        }
    }

    /// Image `index`'s features: from the encoder cache, or preprocessed and encoded now.
    fn features(
        &mut self,
        images: &mut SequenceImages,
        index: usize,
        metrics: &mut MetricsSnapshot,
    ) -> Result<Arc<ImageFeatures>, ImageEncodeError> {
        let hash = images.prompt.images[index].hash;
        if let Some(features) = self.cache.get(&hash) {
            images.timings.encoder_cache_hits += 1;
            metrics.encoder_cache_hits += 1;
            images.pixels[index] = None;
            return Ok(features);
        }
        let pixels = images.pixels[index].take().ok_or(ImageEncodeError::PixelsGone { index })?;
        let start = Instant::now();
        self.processor
            .preprocess_into(std::slice::from_ref(&pixels), &mut self.batch)
            .map_err(|source| ImageEncodeError::Preprocess { index, source })?;
        let grid = self.batch.grids()[0];
        let encoded = Instant::now();
        images.timings.preprocess_ms += (encoded - start).as_secs_f64() * 1e3;
        let features = Arc::new(
            self.encoder
                .encode(self.batch.pixel_values(), grid)
                .map_err(|source| ImageEncodeError::Encode { index, source })?,
        );
        images.timings.encode_ms += encoded.elapsed().as_secs_f64() * 1e3;
        images.timings.encoded += 1;
        metrics.images_encoded += 1;
        let placed = images.prompt.images[index].tokens.len();
        if features.tokens() != placed {
            return Err(ImageEncodeError::TokenCount { index, encoded: features.tokens(), placed });
        }
        self.cache.insert(hash, Arc::clone(&features));
        Ok(features)
    }
}

/// Rows `rows` of each image's features, one after the other, in a new tensor where the model
/// runs (strided copies: the deepstack features are (layers, tokens, hidden)).
fn gather_rows(
    model: &DecoderModel,
    parts: &[(Arc<ImageFeatures>, Range<usize>)],
) -> Result<ImageFeatures, RunnerError> {
    let first = &parts[0].0;
    let (hidden, layers, dtype, row_bytes) =
        (first.hidden(), first.deepstack_layers(), first.dtype(), first.row_bytes());
    let total: usize = parts.iter().map(|(_, rows)| rows.len()).sum();
    let (embeds, embeds_addr) = model.new_tensor(dtype, &[total, hidden])?;
    let (deepstack, deepstack_addr) = model.new_tensor(dtype, &[layers, total, hidden])?;
    let mut copies = Vec::with_capacity(2 * parts.len());
    let mut at = 0;
    for (features, rows) in parts {
        let width = rows.len() * row_bytes;
        copies.push(Copy2d {
            dst: embeds_addr + at * row_bytes,
            dst_pitch: width,
            src: features.embeds_addr() + rows.start * row_bytes,
            src_pitch: width,
            width,
            height: 1,
        });
        if layers > 0 {
            copies.push(Copy2d {
                dst: deepstack_addr + at * row_bytes,
                dst_pitch: total * row_bytes,
                src: features.deepstack_addr() + rows.start * row_bytes,
                src_pitch: features.tokens() * row_bytes,
                width,
                height: layers,
            });
        }
        at += rows.len();
    }
    let memory = KvMemory::on(model.device_id()).ok_or_else(|| RunnerError::Copy {
        what: "copying image rows",
        source: CudaError::NotLoaded { needed_for: "copying image rows on the GPU".into() },
    })?;
    // SAFETY: every source lies inside a live features tensor (rows within its tokens, its
    // layers), every destination inside the tensors just allocated for `total` rows; the two
    // never overlap, and all live in the memory `memory` copies in (where the model runs).
    unsafe { memory.copy(&copies) }.map_err(|source| RunnerError::Copy { what: "copying image rows", source })?;
    let embeds = embeds.downcast::<DynTensorValueType>().map_err(ModelError::from)?;
    let deepstack = deepstack.downcast::<DynTensorValueType>().map_err(ModelError::from)?;
    Ok(ImageFeatures::gathered(embeds, deepstack, hidden, layers, dtype))
}
