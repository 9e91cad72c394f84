//! Qwen3-VL (`Qwen3VLForConditionalGeneration`), the text decoder: the Qwen3 decoder (per-head
//! q/k RMSNorm, half-split rotary, SwiGLU) under `model.language_model`, with
//! * token embeddings gathered in the graph, the rows of image-pad tokens replaced, in order, by
//!   the `image_embeds` input (transformers' `masked_scatter`);
//! * interleaved MRoPE from `position_ids` (3, batch, sequence) ([`crate::rotary`]);
//! * the deepstack features (`deepstack_embeds`) added at the image positions to the outputs of
//!   the first decoder layers (transformers' `_deepstack_process`).
//!
//! The vision encoder is a graph of its own ([`super::qwen3_vl_vision`]). A step's image inputs
//! hold the rows of the image-pad tokens of that step only, so a prompt can be prefilled in
//! chunks; steps without image tokens pass 0 rows.

use pio_models::config::{ModelConfig, VisionConfig, VisionTokens};
use pio_models::manifest::TensorDtype;

use super::qwen3::{dense_stack, lm_head_tensors};
use super::qwen3_vl_vision;
use crate::checkpoint::TensorList;
use crate::decoder::DecoderBuilder;
use crate::error::{BuildResult as Result, CheckpointError};
use crate::onnx::graph::{onnx_type, Dim};

/// Where the checkpoint keeps the text decoder.
pub const TEXT_ROOT: &str = "model.language_model";
pub const IMAGE_EMBEDS: &str = "image_embeds";
pub const DEEPSTACK_EMBEDS: &str = "deepstack_embeds";

/// The decoder layers that receive deepstack features: the first n, n being the number of
/// deepstack mergers (features beyond the decoder's depth are never added, as in transformers).
pub fn deepstack_decoder_layers(config: &ModelConfig) -> Vec<usize> {
    let n = config.vision.as_ref().map_or(0, |v| v.deepstack_visual_indexes.len());
    (0..n.min(config.text.num_hidden_layers)).collect()
}

/// The decoder input of a later stage carrying deepstack feature `layer` spread over the
/// step's tokens, (batch, sequence, hidden): output by the first stage, which has the image rows.
pub fn deepstack_carried(layer: usize) -> String {
    format!("deepstack_features.{layer}")
}

/// The vision encoder's config and the image token ids of a Qwen3-VL config (a parsed config.json has both).
pub fn vision_parts(config: &ModelConfig) -> std::result::Result<(&VisionConfig, &VisionTokens), CheckpointError> {
    match (&config.vision, &config.vision_tokens) {
        (Some(vision), Some(tokens)) => Ok((vision, tokens)),
        _ => Err(CheckpointError::NoVisionConfig { architecture: config.architecture.hf_name() }),
    }
}

pub fn build_decoder(b: &mut DecoderBuilder, config: &ModelConfig) -> Result<()> {
    let (vision, tokens) = vision_parts(config)?;
    let embed_name = format!("{TEXT_ROOT}.embed_tokens.weight");
    let layers = deepstack_decoder_layers(config);
    // The image rows live in the first stage: the token embeddings with image rows merged in,
    // and the deepstack features spread over the tokens, handed on to the stages that hold
    // their layers.
    let images = match b.embed_in_first_stage(&embed_name)? {
        None => None,
        Some(token_embeds) => {
            let images =
                ImageRows::new(b, tokens.image_token_id, vision.deepstack_visual_indexes.len(), &token_embeds)?;
            let own = b.scope.layers.clone();
            for &layer in layers.iter().filter(|l| !own.contains(l)) {
                b.carried_output(&images.deepstack[layer], &deepstack_carried(layer));
            }
            Some(images)
        }
    };
    let h = dense_stack(b, TEXT_ROOT, images.as_ref().map(|i| i.embeddings.as_str()), &mut |b, layer| {
        if !layers.contains(&layer) {
            return Ok(None);
        }
        Ok(Some(match &images {
            Some(images) => images.deepstack[layer].clone(),
            None => b.carried_input(&deepstack_carried(layer)),
        }))
    })?;
    b.logits_in_last_stage(h, crate::checkpoint::lm_head_weight(b.text), &embed_name)
}

/// The image inputs spread over the step's token positions.
struct ImageRows {
    /// Token embeddings with the image-pad rows replaced by the image embeddings, (B, S, hidden).
    embeddings: String,
    /// Deepstack feature k at the image positions and zeros elsewhere, (B, S, hidden).
    deepstack: Vec<String>,
}

impl ImageRows {
    /// Declares `image_embeds` (M, hidden) and `deepstack_embeds` (n, M, hidden) and gathers
    /// their rows at the image-pad tokens of `input_ids`: the k-th pad token (row-major over
    /// batch and sequence) takes row k, every other token a zero row.
    fn new(b: &mut DecoderBuilder, image_token_id: u32, deepstack: usize, token_embeds: &str) -> Result<Self> {
        let (dtype, hidden) = (b.dtype, b.text.hidden_size);
        let rows = Dim::Sym("num_image_tokens");
        let image = b.g.input(IMAGE_EMBEDS, dtype, &[rows.clone(), Dim::Fixed(hidden as i64)]);
        let g = &mut b.g;
        let pad_id = g.scalar_i64("image.token_id", image_token_id as i64)?;
        let is_image = g.node("Equal", "image.is_pad").inputs(&["input_ids", &pad_id]).out();
        // 1-based rank of each pad token among the step's pad tokens, 0 for other tokens: row 0
        // of the padded inputs below is the zero row.
        let flat_shape = g.const_i64("image.flat_shape", &[-1])?;
        let flat_pad = g.node("Reshape", "image.is_pad_flat").inputs(&[&is_image, &flat_shape]).out();
        let flat = g
            .node("Cast", "image.is_pad_i64")
            .inputs(&[&flat_pad])
            .attr("to", onnx_type(TensorDtype::Int64) as i64)
            .out();
        let axis0 = g.scalar_i64("image.axis_0", 0)?;
        let rank = g.node("CumSum", "image.pad_rank").inputs(&[&flat, &axis0]).out();
        // Pad tokens past the M rows given (a generated pad token in a decode step, which has no
        // image rows) keep their token embedding, as in transformers, rather than index past
        // the rows.
        let image_shape = g.node("Shape", "image.rows_shape").inputs(&[&image]).out();
        let given = g.node("Gather", "image.rows_given").inputs(&[&image_shape, &axis0]).attr("axis", 0i64).out();
        // M read off a shape is a host value under CUDA, and the ranks are device data: compared
        // as it is, ONNX Runtime would copy M to the device with a Memcpy node, and a session
        // with one cannot capture CUDA graphs ([`crate::onnx::cuda_placement`]). Range reads its
        // bounds on the host and writes [M] on the device.
        let one = g.scalar_i64("image.one", 1)?;
        let given_end = g.node("Add", "image.rows_given_end").inputs(&[&given, &one]).out();
        let given = g.node("Range", "image.rows_given_on_device").inputs(&[given.as_str(), &given_end, &one]).out();
        let within = g.node("LessOrEqual", "image.rank_within_rows").inputs(&[&rank, &given]).out();
        let fed = g.node("And", "image.is_fed_pad").inputs(&[&flat_pad, &within]).out();
        let no_row = g.scalar_i64("image.no_row", 0)?;
        let row = g.node("Where", "image.row_of_token").inputs(&[&fed, &rank, &no_row]).out();
        let ids_shape = g.node("Shape", "image.ids_shape").inputs(&["input_ids"]).out();
        let is_image = g.node("Reshape", "image.is_fed_pad_tokens").inputs(&[&fed, &ids_shape]).out();

        let axes0 = g.const_i64("image.axes_0", &[0])?;
        let mut stacked = g.node("Unsqueeze", "image.embeds_stacked").inputs(&[&image, &axes0]).out();
        if deepstack > 0 {
            let features =
                g.input(DEEPSTACK_EMBEDS, dtype, &[Dim::Fixed(deepstack as i64), rows, Dim::Fixed(hidden as i64)]);
            stacked = g.node("Concat", "image.all_features").inputs(&[&stacked, &features]).attr("axis", 0i64).out();
        }
        let zeros = vec![0u8; (deepstack + 1) * hidden * dtype.size_bytes()];
        let zero_rows = g.initializer("image.zero_rows", dtype, &[deepstack + 1, 1, hidden], &zeros)?;
        let padded = g.node("Concat", "image.padded").inputs(&[&zero_rows, &stacked]).attr("axis", 1i64).out();
        let spread = g.node("Gather", "image.spread").inputs(&[&padded, &row]).attr("axis", 1i64).out();
        let parts = if deepstack > 0 {
            g.node("Split", "image.split_features")
                .inputs(&[&spread])
                .attr("axis", 0i64)
                .attr("num_outputs", deepstack as i64 + 1)
                .outs(deepstack + 1)
        } else {
            vec![spread]
        };
        let token_shape = g.node("Shape", "image.token_shape").inputs(&[token_embeds]).out();
        let parts: Vec<String> = parts
            .iter()
            .enumerate()
            .map(|(k, p)| g.node("Reshape", &format!("image.feature_{k}")).inputs(&[p, &token_shape]).out())
            .collect();
        // Pad rows take the image's rows; text rows keep their token embeddings.
        let axes_last = g.const_i64("image.axes_last", &[-1])?;
        let pad_rows = g.node("Unsqueeze", "image.is_pad_row").inputs(&[&is_image, &axes_last]).out();
        let embeddings = g.node("Where", "image.merged_embeddings").inputs(&[&pad_rows, &parts[0], token_embeds]).out();
        Ok(ImageRows { embeddings, deepstack: parts[1..].to_vec() })
    }
}

/// The tensors of a Qwen3-VL checkpoint: the text decoder, the lm_head unless tied, the vision
/// encoder.
pub fn checkpoint_tensors(config: &ModelConfig) -> std::result::Result<TensorList, CheckpointError> {
    let (vision, _) = vision_parts(config)?;
    let mut out = TensorList::new();
    super::qwen3::decoder_tensors(&config.text, TEXT_ROOT, &mut out);
    lm_head_tensors(&config.text, &mut out);
    qwen3_vl_vision::checkpoint_tensors(vision, &mut out);
    Ok(out)
}
