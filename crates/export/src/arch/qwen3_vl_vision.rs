//! Qwen3-VL's vision encoder (`model.visual`) as its own graph, one image per run (the runtime
//! loops over a prompt's images, and caches encodings by image):
//! * patch embedding: the Conv3d with kernel = stride as a MatMul over the flattened patch rows;
//! * the learned square position table bilinearly interpolated to the image's grid, in the
//!   patches' merge-block order, as transformers' `fast_pos_embed_interpolate`;
//! * 2D rotary: the rotary frequencies split between each patch's row and column (RotaryEmbedding);
//! * pre-LN blocks: LayerNorm, attention with qkv bias (MultiHeadAttention: no mask tensor,
//!   flash or memory-efficient kernels on CUDA; the frames of a video are its batch, so attention
//!   stays within each frame as transformers' cu_seqlens do), LayerNorm, MLP;
//! * the merger (LayerNorm, 2x2 patches concatenated, MLP with exact GELU) and the deepstack
//!   mergers (concatenated first, LayerNorm after: `use_postshuffle_norm`) at
//!   `deepstack_visual_indexes`.
//!
//! Inputs: `pixel_values` (patches, channels x temporal patch x patch^2) float32, the rows the
//! image processor writes, and `image_grid_thw` (1, 3) int64. Outputs: `image_embeds`
//! (patches / merge^2, out_hidden) and `deepstack_embeds` (deepstack, patches / merge^2,
//! out_hidden), in the graph dtype, ready for the decoder's inputs of the same names.

use pio_models::config::VisionConfig;
use pio_models::manifest::TensorDtype;

use crate::checkpoint::TensorList;
use crate::convert::write_transposed;
use crate::error::{BuildError, BuildResult as Result};
use crate::onnx::graph::{onnx_type, Dim, Graph};
use crate::weights::WeightSource;

pub const VISION_ROOT: &str = "model.visual";
pub const PIXEL_VALUES: &str = "pixel_values";
pub const IMAGE_GRID_THW: &str = "image_grid_thw";
/// LayerNorm epsilon of every vision norm (hard-coded in transformers' modeling code).
const NORM_EPS: f32 = 1e-6;

/// The vision tensors of a checkpoint with their shapes.
pub fn checkpoint_tensors(v: &VisionConfig, out: &mut TensorList) {
    let (hv, iv) = (v.hidden_size, v.intermediate_size);
    let root = VISION_ROOT;
    let t = |name: String, shape: Vec<usize>, out: &mut TensorList| out.push((name, shape));
    t(
        format!("{root}.patch_embed.proj.weight"),
        vec![hv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size],
        out,
    );
    t(format!("{root}.patch_embed.proj.bias"), vec![hv], out);
    t(format!("{root}.pos_embed.weight"), vec![v.num_position_embeddings, hv], out);
    for i in 0..v.depth {
        let p = format!("{root}.blocks.{i}");
        for norm in ["norm1", "norm2"] {
            t(format!("{p}.{norm}.weight"), vec![hv], out);
            t(format!("{p}.{norm}.bias"), vec![hv], out);
        }
        linear_tensors(&format!("{p}.attn.qkv"), hv, 3 * hv, out);
        linear_tensors(&format!("{p}.attn.proj"), hv, hv, out);
        linear_tensors(&format!("{p}.mlp.linear_fc1"), hv, iv, out);
        linear_tensors(&format!("{p}.mlp.linear_fc2"), iv, hv, out);
    }
    merger_tensors(v, &format!("{root}.merger"), hv, out);
    for k in 0..v.deepstack_visual_indexes.len() {
        merger_tensors(v, &format!("{root}.deepstack_merger_list.{k}"), v.merged_dim(), out);
    }
}

fn linear_tensors(prefix: &str, in_dim: usize, out_dim: usize, out: &mut TensorList) {
    out.push((format!("{prefix}.weight"), vec![out_dim, in_dim]));
    out.push((format!("{prefix}.bias"), vec![out_dim]));
}

fn merger_tensors(v: &VisionConfig, prefix: &str, norm_width: usize, out: &mut TensorList) {
    out.push((format!("{prefix}.norm.weight"), vec![norm_width]));
    out.push((format!("{prefix}.norm.bias"), vec![norm_width]));
    linear_tensors(&format!("{prefix}.linear_fc1"), v.merged_dim(), v.merged_dim(), out);
    linear_tensors(&format!("{prefix}.linear_fc2"), v.merged_dim(), v.out_hidden_size, out);
}

/// Which fused activation op computes the MLP's `hidden_act` (with the fc1 bias added inside).
fn activation_op(hidden_act: &str) -> Result<&'static str> {
    match hidden_act {
        // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): com.microsoft FastGelu.
        "gelu_pytorch_tanh" | "gelu_new" => Ok("FastGelu"),
        // The exact (erf) GELU: com.microsoft BiasGelu.
        "gelu" => Ok("BiasGelu"),
        // pio_models::config refuses any other (config::VISION_ACTIVATIONS).
        other => Err(BuildError::Internal(format!("vision activation `{other}`"))),
    }
}

/// Builds the vision encoder graph into `g` from the checkpoint's `model.visual` tensors.
/// `fused_norms`: residual add + LayerNorm as SkipLayerNormalization.
pub fn build(g: Graph, w: WeightSource, v: &VisionConfig, fused_norms: bool) -> Result<Graph> {
    let mut b = VisionBuilder { g, w, v, fused_norms, act: activation_op(&v.hidden_act)? };
    b.build()?;
    Ok(b.g)
}

struct VisionBuilder<'a> {
    g: Graph,
    w: WeightSource<'a>,
    v: &'a VisionConfig,
    fused_norms: bool,
    act: &'static str,
}

/// The image's grid and what every block reads from it.
struct Grid {
    /// (t, -1, hidden): the frames as the attention's batch; (1, -1, hidden): back to one.
    frames_shape: String,
    batched_shape: String,
    /// (1, N) patch indices, the rotary's positions (N = t * h * w).
    rotary_positions: String,
    /// Each patch's row and column in its frame, (h * w,) int64 in merge-block order.
    row: String,
    col: String,
    /// The grid's height and width (scalars).
    height: String,
    width: String,
    /// (t, 1): repeats a frame's rows for every frame.
    frame_tiles: String,
}

impl VisionBuilder<'_> {
    fn build(&mut self) -> Result<()> {
        let v = self.v;
        let (dtype, hv) = (self.w.dtype, v.hidden_size);
        self.g.input(PIXEL_VALUES, TensorDtype::Float32, &[Dim::Sym("num_patches"), Dim::Fixed(v.patch_dim() as i64)]);
        self.g.input(IMAGE_GRID_THW, TensorDtype::Int64, &[Dim::Fixed(1), Dim::Fixed(3)]);

        let grid = self.grid()?;
        let (rotary_cos, rotary_sin) = self.rotary_rows(&grid)?;
        let patch_embeds = self.patch_embed()?;
        let positions = self.position_embeddings(&grid)?;
        let x = self.g.node("Add", "visual.embeddings").inputs(&[&patch_embeds, &positions]).out();
        let axes0 = self.g.const_i64("visual.axes_0", &[0])?;
        let x = self.g.node("Unsqueeze", "visual.embeddings_batched").inputs(&[&x, &axes0]).out();

        // The residual stream, and the normed input of the next block's attention.
        let mut residual = x.clone();
        let mut h = self.layer_norm(&x, &format!("{VISION_ROOT}.blocks.0.norm1"), hv)?;
        let mut deepstack = Vec::new();
        for i in 0..v.depth {
            let p = format!("{VISION_ROOT}.blocks.{i}");
            let attn = self.attention(&p, &h, &grid, &rotary_cos, &rotary_sin)?;
            let (h2, r2) = self.add_and_layer_norm(&attn, &residual, &format!("{p}.norm2"), hv)?;
            let mlp = self.mlp(&p, &h2)?;
            // The next block's norm1, or after the last block the merger's norm.
            let next_norm = if i + 1 < v.depth {
                format!("{VISION_ROOT}.blocks.{}.norm1", i + 1)
            } else {
                format!("{VISION_ROOT}.merger.norm")
            };
            let (h3, r3) = self.add_and_layer_norm(&mlp, &r2, &next_norm, hv)?;
            if let Some(k) = v.deepstack_visual_indexes.iter().position(|&d| d == i) {
                deepstack.push(self.deepstack_merger(k, &r3)?);
            }
            h = h3;
            residual = r3;
        }
        let _ = residual;
        // The merger's LayerNorm came with the last residual add: now 2x2 concat and the MLP.
        let merged = self.merged_rows(&h, "visual.merger")?;
        let image_embeds = self.merger_mlp(&format!("{VISION_ROOT}.merger"), &merged)?;
        let tokens = Dim::Sym("num_image_tokens");
        let out = Dim::Fixed(v.out_hidden_size as i64);
        self.g.node("Identity", "visual.image_embeds").inputs(&[&image_embeds]).named_outs(&["image_embeds"]);
        self.g.output("image_embeds", dtype, &[tokens.clone(), out.clone()]);
        if !deepstack.is_empty() {
            let stacked: Vec<String> = deepstack
                .iter()
                .enumerate()
                .map(|(k, d)| {
                    self.g.node("Unsqueeze", &format!("visual.deepstack_{k}.stacked")).inputs(&[d, &axes0]).out()
                })
                .collect();
            self.g
                .node("Concat", "visual.deepstack_embeds")
                .inputs(&stacked)
                .attr("axis", 0i64)
                .named_outs(&["deepstack_embeds"]);
            self.g.output("deepstack_embeds", dtype, &[Dim::Fixed(stacked.len() as i64), tokens, out]);
        }
        Ok(())
    }

    /// t, h and w from `image_grid_thw`, and each patch's row and column in merge-block order:
    /// block row, block column, then the m x m patches of the block row by row (the order the
    /// image processor writes them in).
    fn grid(&mut self) -> Result<Grid> {
        let v = self.v;
        let g = &mut self.g;
        let shape3 = g.const_i64("visual.grid_shape", &[3])?;
        let grid = g.node("Reshape", "visual.grid").inputs(&[IMAGE_GRID_THW, &shape3]).out();
        let mut dims = Vec::new();
        for (i, name) in ["t", "h", "w"].iter().enumerate() {
            let idx = g.scalar_i64(&format!("visual.grid_index_{name}"), i as i64)?;
            dims.push(g.node("Gather", &format!("visual.grid_{name}")).inputs(&[&grid, &idx]).attr("axis", 0i64).out());
        }
        let [frames, height, width] = [dims[0].clone(), dims[1].clone(), dims[2].clone()];
        let per_frame = g.node("Mul", "visual.patches_per_frame").inputs(&[&height, &width]).out();
        let patches = g.node("Mul", "visual.patches").inputs(&[&frames, &per_frame]).out();
        let axes0 = g.const_i64("visual.grid_axes_0", &[0])?;
        let frames1 = g.node("Unsqueeze", "visual.frames").inputs(&[&frames, &axes0]).out();
        let rest = g.const_i64("visual.frame_rest_shape", &[-1, v.hidden_size as i64])?;
        let frames_shape = g.node("Concat", "visual.frames_shape").inputs(&[&frames1, &rest]).attr("axis", 0i64).out();
        let batched_shape = g.const_i64("visual.batched_shape", &[1, -1, v.hidden_size as i64])?;
        let one1 = g.const_i64("visual.tile_once", &[1])?;
        let frame_tiles = g.node("Concat", "visual.frame_tiles").inputs(&[&frames1, &one1]).attr("axis", 0i64).out();
        let (zero, one) = (g.scalar_i64("visual.zero", 0)?, g.scalar_i64("visual.one", 1)?);
        let all = g.node("Range", "visual.patch_index").inputs(&[&zero, &patches, &one]).out();
        let rotary_positions = g.node("Unsqueeze", "visual.rotary_positions").inputs(&[&all, &axes0]).out();

        let m = v.spatial_merge_size as i64;
        let m1 = g.scalar_i64("visual.merge", m)?;
        let m2 = g.scalar_i64("visual.merge_squared", m * m)?;
        let index = g.node("Range", "visual.frame_patch_index").inputs(&[&zero, &per_frame, &one]).out();
        let in_col = g.node("Mod", "visual.in_block_col").inputs(&[&index, &m1]).out();
        let by_merge = g.node("Div", "visual.index_by_merge").inputs(&[&index, &m1]).out();
        let in_row = g.node("Mod", "visual.in_block_row").inputs(&[&by_merge, &m1]).out();
        let block = g.node("Div", "visual.block").inputs(&[&index, &m2]).out();
        let blocks_per_row = g.node("Div", "visual.blocks_per_row").inputs(&[&width, &m1]).out();
        let block_col = g.node("Mod", "visual.block_col").inputs(&[&block, &blocks_per_row]).out();
        let block_row = g.node("Div", "visual.block_row").inputs(&[&block, &blocks_per_row]).out();
        let row = g.node("Mul", "visual.row_base").inputs(&[&block_row, &m1]).out();
        let row = g.node("Add", "visual.row").inputs(&[&row, &in_row]).out();
        let col = g.node("Mul", "visual.col_base").inputs(&[&block_col, &m1]).out();
        let col = g.node("Add", "visual.col").inputs(&[&col, &in_col]).out();
        Ok(Grid { frames_shape, batched_shape, rotary_positions, row, col, height, width, frame_tiles })
    }

    /// The rotary's cos and sin rows, (N, head_dim / 2): with f the head_dim / 4 frequencies
    /// 1 / theta^(2i / (head_dim / 2)), a patch's angles are (row * f, col * f), in float32
    /// as transformers' `rot_pos_emb`.
    fn rotary_rows(&mut self, grid: &Grid) -> Result<(String, String)> {
        let v = self.v;
        let dtype = self.w.dtype;
        let g = &mut self.g;
        let spatial = v.head_dim() / 2;
        let freqs = crate::rotary::inv_freq(v.rope_theta, spatial);
        let freqs = g.const_f32("visual.rotary_inv_freq", &[freqs.len()], &freqs)?;
        let axes_last = g.const_i64("visual.axes_last", &[-1])?;
        let mut angles = Vec::new();
        for (coord, name) in [(&grid.row, "row"), (&grid.col, "col")] {
            let f = g
                .node("Cast", &format!("visual.rotary_{name}_f32"))
                .inputs(&[coord])
                .attr("to", onnx_type(TensorDtype::Float32) as i64)
                .out();
            let f = g.node("Unsqueeze", &format!("visual.rotary_{name}_column")).inputs(&[&f, &axes_last]).out();
            angles.push(g.node("Mul", &format!("visual.rotary_{name}_angles")).inputs(&[&f, &freqs]).out());
        }
        let angles = g.node("Concat", "visual.rotary_angles").inputs(&angles).attr("axis", -1i64).out();
        let angles = g.node("Tile", "visual.rotary_angles_frames").inputs(&[&angles, &grid.frame_tiles]).out();
        let mut rows = Vec::new();
        for op in ["Cos", "Sin"] {
            let name = format!("visual.rotary_{}", op.to_lowercase());
            let r = g.node(op, &name).inputs(&[&angles]).out();
            rows.push(cast_to(g, &r, dtype, &name));
        }
        Ok((rows[0].clone(), rows[1].clone()))
    }

    /// The Conv3d patch embedding (kernel = stride = (temporal patch, patch, patch)) as a
    /// MatMul: its weight (hidden, C, T, P, P) is the (hidden, C*T*P*P) matrix of a Linear over
    /// the processor's rows, which are flattened in the same (C, T, P, P) order.
    fn patch_embed(&mut self) -> Result<String> {
        let v = self.v;
        let (dtype, hv, pd) = (self.w.dtype, v.hidden_size, v.patch_dim());
        let name = format!("{VISION_ROOT}.patch_embed.proj");
        let stored = [hv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size];
        let t = self.w.ck.tensor(&format!("{name}.weight"), &stored)?;
        let matrix = crate::checkpoint::TensorRef { shape: vec![hv, pd], ..t };
        let read = matrix.data.len();
        let wt = self.g.initializer_with("visual.patch_embed.weight", dtype, &[pd, hv], |sink| {
            write_transposed(&matrix, dtype, sink)
        })?;
        self.w.ck.release(&format!("{name}.weight"));
        self.w.advance(read);
        let x = cast_to(&mut self.g, PIXEL_VALUES, dtype, "visual.pixel_values");
        let y = self.g.node("MatMul", "visual.patch_embed").inputs(&[&x, &wt]).out();
        let bias = self.w.bias(&mut self.g, "visual.patch_embed", &[name], &[hv])?;
        Ok(self.g.node("Add", "visual.patch_embed.bias_add").inputs(&[&y, &bias]).out())
    }

    /// The learned (side x side) position table bilinearly interpolated to the (h, w) grid at
    /// each patch (align_corners: the grid's corners sit on the table's), repeated for every
    /// frame, (N, hidden). Per axis a patch at index i lies at s = i (side - 1) / max(size - 1, 1)
    /// of the table, between taps floor(s) and min(floor(s) + 1, side - 1) with weights
    /// 1 - frac(s) and frac(s); the four taps' rows are weighed in float32.
    fn position_embeddings(&mut self, grid: &Grid) -> Result<String> {
        let v = self.v;
        let (dtype, hv) = (self.w.dtype, v.hidden_size);
        let side = v.position_grid_side();
        let table =
            self.w.weight(&mut self.g, &format!("{VISION_ROOT}.pos_embed.weight"), &[v.num_position_embeddings, hv])?;
        let g = &mut self.g;
        let f32_type = onnx_type(TensorDtype::Float32) as i64;
        let i64_type = onnx_type(TensorDtype::Int64) as i64;
        let one_i = g.scalar_i64("visual.pos_one", 1)?;
        let last_tap = g.scalar_i64("visual.pos_last_tap", side as i64 - 1)?;
        let table_span = g.const_f32("visual.pos_span", &[], &[(side - 1) as f32])?;
        let one_f = g.const_f32("visual.pos_one_f32", &[], &[1.0])?;
        // (taps, weights) of each axis: ((lower, upper), (weight lower, weight upper)).
        let mut axes = Vec::new();
        for (coord, size, name) in [(&grid.row, &grid.height, "row"), (&grid.col, &grid.width, "col")] {
            let p = format!("visual.pos_{name}");
            let last = g.node("Sub", &format!("{p}.last_index")).inputs(&[size, &one_i]).out();
            let last = g.node("Max", &format!("{p}.last_index_at_least_1")).inputs(&[&last, &one_i]).out();
            let last = g.node("Cast", &format!("{p}.last_index_f32")).inputs(&[&last]).attr("to", f32_type).out();
            let i = g.node("Cast", &format!("{p}.index_f32")).inputs(&[coord]).attr("to", f32_type).out();
            let scaled = g.node("Mul", &format!("{p}.scaled")).inputs(&[&i, &table_span]).out();
            let at = g.node("Div", &format!("{p}.at")).inputs(&[&scaled, &last]).out();
            let floor = g.node("Floor", &format!("{p}.floor")).inputs(&[&at]).out();
            let frac = g.node("Sub", &format!("{p}.frac")).inputs(&[&at, &floor]).out();
            let lower_w = g.node("Sub", &format!("{p}.lower_weight")).inputs(&[&one_f, &frac]).out();
            let lower = g.node("Cast", &format!("{p}.lower")).inputs(&[&floor]).attr("to", i64_type).out();
            let upper = g.node("Add", &format!("{p}.upper_unclamped")).inputs(&[&lower, &one_i]).out();
            let upper = g.node("Min", &format!("{p}.upper")).inputs(&[&upper, &last_tap]).out();
            axes.push(((lower, upper), (lower_w, frac)));
        }
        let ((r0, r1), (wr0, wr1)) = axes[0].clone();
        let ((c0, c1), (wc0, wc1)) = axes[1].clone();
        let side_s = g.scalar_i64("visual.pos_side", side as i64)?;
        let axes_last = g.const_i64("visual.pos_axes_last", &[-1])?;
        let mut taps = Vec::new();
        let mut weights = Vec::new();
        for (k, (r, c, wr, wc)) in
            [(&r0, &c0, &wr0, &wc0), (&r0, &c1, &wr0, &wc1), (&r1, &c0, &wr1, &wc0), (&r1, &c1, &wr1, &wc1)]
                .into_iter()
                .enumerate()
        {
            let base = g.node("Mul", &format!("visual.pos_tap{k}.row_start")).inputs(&[r, &side_s]).out();
            let tap = g.node("Add", &format!("visual.pos_tap{k}")).inputs(&[&base, c]).out();
            taps.push(g.node("Unsqueeze", &format!("visual.pos_tap{k}.column")).inputs(&[&tap, &axes_last]).out());
            let wt = g.node("Mul", &format!("visual.pos_tap{k}.weight")).inputs(&[wr, wc]).out();
            weights.push(
                g.node("Unsqueeze", &format!("visual.pos_tap{k}.weight_column")).inputs(&[&wt, &axes_last]).out(),
            );
        }
        let taps = g.node("Concat", "visual.pos_taps").inputs(&taps).attr("axis", -1i64).out();
        let weights = g.node("Concat", "visual.pos_weights").inputs(&weights).attr("axis", -1i64).out();
        let weights = g.node("Unsqueeze", "visual.pos_weights_per_channel").inputs(&[&weights, &axes_last]).out();
        let rows = g.node("Gather", "visual.pos_rows").inputs(&[&table, &taps]).attr("axis", 0i64).out();
        let rows = cast_from(g, &rows, dtype, "visual.pos_rows");
        let weighted = g.node("Mul", "visual.pos_weighted").inputs(&[&rows, &weights]).out();
        let axis1 = g.const_i64("visual.pos_axes_1", &[1])?;
        let frame = g.node("ReduceSum", "visual.pos_frame").inputs(&[&weighted, &axis1]).attr("keepdims", 0i64).out();
        let frame = cast_to(g, &frame, dtype, "visual.pos_frame");
        Ok(g.node("Tile", "visual.pos_embeds").inputs(&[&frame, &grid.frame_tiles]).out())
    }

    /// LayerNorm with weight and bias over the last axis (`{prefix}.weight`, `{prefix}.bias`).
    fn layer_norm(&mut self, x: &str, prefix: &str, width: usize) -> Result<String> {
        let (w, b) = self.norm_weights(prefix, width)?;
        Ok(self
            .g
            .node("LayerNormalization", prefix)
            .inputs(&[x, &w, &b])
            .attr("axis", -1i64)
            .attr("epsilon", NORM_EPS)
            .attr("stash_type", 1i64)
            .out())
    }

    fn norm_weights(&mut self, prefix: &str, width: usize) -> Result<(String, String)> {
        let w = self.w.weight(&mut self.g, &format!("{prefix}.weight"), &[width])?;
        let b = self.w.weight(&mut self.g, &format!("{prefix}.bias"), &[width])?;
        Ok((w, b))
    }

    /// residual' = x + residual; returns (LayerNorm(residual'), residual'), one
    /// SkipLayerNormalization when `fused_norms`.
    fn add_and_layer_norm(&mut self, x: &str, residual: &str, prefix: &str, width: usize) -> Result<(String, String)> {
        if !self.fused_norms {
            let sum = self.g.node("Add", &format!("{prefix}.residual_add")).inputs(&[x, residual]).out();
            let normed = self.layer_norm(&sum, prefix, width)?;
            return Ok((normed, sum));
        }
        let (w, b) = self.norm_weights(prefix, width)?;
        let outs = self
            .g
            .node("SkipLayerNormalization", prefix)
            .ms()
            .inputs(&[x, residual, &w, &b])
            .attr("epsilon", NORM_EPS)
            .named_outs(&[format!("{prefix}/out0"), String::new(), String::new(), format!("{prefix}/out3")]);
        Ok((outs[0].clone(), outs[3].clone()))
    }

    fn linear(&mut self, x: &str, prefix: &str, in_dim: usize, out_dim: usize) -> Result<String> {
        self.w.projection(&mut self.g, None, x, prefix, &[prefix.to_string()], in_dim, &[out_dim], true, false)
    }

    /// Attention of one block on its normed input (1, N, hidden): qkv with bias, rotary on q
    /// and k, MultiHeadAttention with each frame as a batch entry, proj with bias.
    fn attention(&mut self, block: &str, h: &str, grid: &Grid, cos: &str, sin: &str) -> Result<String> {
        let v = self.v;
        let hv = v.hidden_size;
        let p = format!("{block}.attn");
        let qkv = self.linear(h, &format!("{p}.qkv"), hv, 3 * hv)?;
        let g = &mut self.g;
        let parts = g
            .node("Split", &format!("{p}.qkv_split"))
            .inputs(&[&qkv])
            .attr("axis", -1i64)
            .attr("num_outputs", 3i64)
            .outs(3);
        let mut rotated = Vec::new();
        for (x, name) in [(&parts[0], "q"), (&parts[1], "k")] {
            rotated.push(
                g.node("RotaryEmbedding", &format!("{p}.{name}_rotary"))
                    .ms()
                    .inputs(&[x.as_str(), &grid.rotary_positions, cos, sin])
                    .attr("num_heads", v.num_heads)
                    .attr("interleaved", 0i64)
                    .out(),
            );
        }
        let dtype = self.w.dtype;
        let attention_dtype = attention_dtype(dtype);
        let mut frames = Vec::new();
        for (x, name) in [(&rotated[0], "q"), (&rotated[1], "k"), (&parts[2], "v")] {
            let framed =
                g.node("Reshape", &format!("{p}.{name}_frames")).inputs(&[x.as_str(), &grid.frames_shape]).out();
            frames.push(convert(g, &framed, dtype, attention_dtype, &format!("{p}.{name}_attention_dtype")));
        }
        let context = g
            .node("MultiHeadAttention", &format!("{p}.mha"))
            .ms()
            .inputs(&frames)
            .attr("num_heads", v.num_heads)
            .attr("scale", 1.0 / (v.head_dim() as f32).sqrt())
            .out();
        let context = convert(g, &context, attention_dtype, dtype, &format!("{p}.context_dtype"));
        let context = g.node("Reshape", &format!("{p}.context")).inputs(&[&context, &grid.batched_shape]).out();
        self.linear(&context, &format!("{p}.proj"), hv, hv)
    }

    /// fc2(act(fc1(x) + bias) ) + bias, the activation fused with fc1's bias.
    fn mlp(&mut self, block: &str, h: &str) -> Result<String> {
        let (hv, iv) = (self.v.hidden_size, self.v.intermediate_size);
        let p = format!("{block}.mlp");
        let act = self.act;
        let y = self.biased_activation(h, &format!("{p}.linear_fc1"), hv, iv, act)?;
        self.linear(&y, &format!("{p}.linear_fc2"), iv, hv)
    }

    /// act(x @ W^T + bias) with the bias added inside the activation op.
    fn biased_activation(&mut self, x: &str, prefix: &str, in_dim: usize, out_dim: usize, op: &str) -> Result<String> {
        let names = [prefix.to_string()];
        let y = self.w.projection(&mut self.g, None, x, prefix, &names, in_dim, &[out_dim], false, false)?;
        let bias = self.w.bias(&mut self.g, prefix, &names, &[out_dim])?;
        Ok(self.g.node(op, &format!("{prefix}.act")).ms().inputs(&[&y, &bias]).out())
    }

    /// Each merged token's m x m consecutive patch rows side by side, (N / m^2, hidden m^2).
    fn merged_rows(&mut self, x: &str, name: &str) -> Result<String> {
        let shape = self.g.const_i64(&format!("{name}.merged_shape"), &[-1, self.v.merged_dim() as i64])?;
        Ok(self.g.node("Reshape", &format!("{name}.merged_rows")).inputs(&[x, &shape]).out())
    }

    /// The merger's MLP on merged rows: fc2(GELU(fc1(x))), GELU exact (torch's nn.GELU()).
    fn merger_mlp(&mut self, prefix: &str, merged: &str) -> Result<String> {
        let (md, out) = (self.v.merged_dim(), self.v.out_hidden_size);
        let y = self.biased_activation(merged, &format!("{prefix}.linear_fc1"), md, md, "BiasGelu")?;
        self.linear(&y, &format!("{prefix}.linear_fc2"), md, out)
    }

    /// Deepstack merger k on a block's output: rows merged first, then LayerNorm over the
    /// merged width (`use_postshuffle_norm`), then the MLP.
    fn deepstack_merger(&mut self, k: usize, x: &str) -> Result<String> {
        let prefix = format!("{VISION_ROOT}.deepstack_merger_list.{k}");
        let merged = self.merged_rows(x, &format!("visual.deepstack_{k}"))?;
        let normed = self.layer_norm(&merged, &format!("{prefix}.norm"), self.v.merged_dim())?;
        self.merger_mlp(&prefix, &normed)
    }
}

/// The dtype MultiHeadAttention runs in for a graph of `dtype`: float16 for a bfloat16 graph.
/// ONNX Runtime 1.31's CUDA MultiHeadAttention takes bfloat16, but (Run 4, H100) a bf16 encoder
/// took 29.0 ms on a 1024x1024 image and 99.9 ms on a 1920x1080 one against 20.6 and 68.1 ms for
/// the same graph in float16: a gap that grows with the square of the patches, the attention's. The
/// casts are exact both ways for every value in float16's normal range (bfloat16 has fewer mantissa
/// bits; beyond ±65,504 a value would become infinite), and the kernels accumulate in float32
/// either way.
fn attention_dtype(dtype: TensorDtype) -> TensorDtype {
    if dtype == TensorDtype::Bfloat16 {
        TensorDtype::Float16
    } else {
        dtype
    }
}

/// `x` of dtype `from` as `to` by node `node` (unchanged when they are the same).
fn convert(g: &mut Graph, x: &str, from: TensorDtype, to: TensorDtype, node: &str) -> String {
    if from == to {
        return x.to_string();
    }
    g.node("Cast", node).inputs(&[x]).attr("to", onnx_type(to) as i64).out()
}

/// `x` cast to `dtype` (unchanged when it is float32 already).
fn cast_to(g: &mut Graph, x: &str, dtype: TensorDtype, name: &str) -> String {
    convert(g, x, TensorDtype::Float32, dtype, &format!("{name}.cast"))
}

/// `x` of `dtype` cast to float32.
fn cast_from(g: &mut Graph, x: &str, dtype: TensorDtype, name: &str) -> String {
    convert(g, x, dtype, TensorDtype::Float32, &format!("{name}.f32"))
}
