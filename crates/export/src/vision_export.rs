//! The vision half of a vision-language export: `vision.onnx` (+ `vision.onnx.data`) from the
//! checkpoint's vision tensors, and the manifest's [`VisionSpec`] describing it and the
//! decoder's image inputs.

use std::path::Path;

use pio_models::manifest::VisionSpec;
use pio_models::ModelConfig;

use crate::arch::{qwen3_vl, qwen3_vl_vision};
use crate::error::BuildResult as Result;
use crate::onnx::graph::Graph;
use crate::weights::WeightSource;

pub const VISION_FILE: &str = "vision.onnx";
pub const VISION_WEIGHTS_FILE: &str = "vision.onnx.data";

/// What writing the vision graph produced.
pub struct VisionExport {
    pub spec: VisionSpec,
    pub model_bytes: u64,
    pub weight_bytes: u64,
}

/// Writes the vision encoder of `config` into `dir` with the decoder's weight source (the same
/// checkpoint, dtype and settings; projections are never quantized: the encoder's MatMuls run
/// over hundreds to thousands of patch rows, where int4 weights save little and cost accuracy).
/// `processor_files`: the image-processor files copied next to the graphs.
pub fn write_vision(
    dir: &Path,
    name: &str,
    config: &ModelConfig,
    w: WeightSource,
    metadata: &[(&str, String)],
    processor_files: Vec<String>,
) -> Result<VisionExport> {
    let (v, tokens) = crate::arch::qwen3_vl::vision_parts(config)?;
    let graph = Graph::new(&format!("{name}-vision"), &dir.join(VISION_WEIGHTS_FILE))?;
    let graph = qwen3_vl_vision::build(graph, w, v, w.settings.fused_norms)?;
    let (inputs, outputs) = {
        let (i, o) = graph.io();
        (i.to_vec(), o.to_vec())
    };
    let path = dir.join(VISION_FILE);
    let weight_bytes = graph.save(&path, env!("CARGO_PKG_VERSION"), metadata)?;
    let model_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let spec = VisionSpec {
        encoder: VISION_FILE.into(),
        inputs,
        outputs,
        images_per_run: 1,
        image_token_id: tokens.image_token_id,
        video_token_id: tokens.video_token_id,
        vision_start_token_id: tokens.vision_start_token_id,
        vision_end_token_id: tokens.vision_end_token_id,
        patch_size: v.patch_size,
        temporal_patch_size: v.temporal_patch_size,
        spatial_merge_size: v.spatial_merge_size,
        in_channels: v.in_channels,
        patch_dim: v.patch_dim(),
        deepstack_visual_indexes: v.deepstack_visual_indexes.clone(),
        deepstack_decoder_layers: qwen3_vl::deepstack_decoder_layers(config),
        mrope_section: config.text.rope.mrope_section.clone().unwrap_or_default(),
        preprocessor_files: processor_files,
    };
    Ok(VisionExport { spec, model_bytes, weight_bytes })
}
