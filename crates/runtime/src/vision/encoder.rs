//! The vision encoder session (`vision.onnx` of a Qwen3-VL export): one image's patch rows in,
//! its image embeddings and deepstack features out, left where the session ran (the GPU with
//! CUDA) in the decoder's dtype, so the decoder binds them as they are.

use std::fmt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::{DynTensor, DynTensorValueType, DynValue, Tensor};
use pio_image::GridThw;
use pio_models::manifest::{Manifest, TensorDtype, VisionSpec};

use crate::ep::ExecutionProvider;

use super::VisionError;

/// One image's encoder outputs: `embeds` (tokens, hidden) and `deepstack` (layers, tokens,
/// hidden), in the decoder's dtype, where the encoder ran.
pub struct ImageFeatures {
    embeds: DynTensor,
    deepstack: DynTensor,
    tokens: usize,
    hidden: usize,
    layers: usize,
    dtype: TensorDtype,
    /// The image's grid (None: rows gathered from several images for one step).
    grid: Option<GridThw>,
}

impl fmt::Debug for ImageFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageFeatures")
            .field("tokens", &self.tokens)
            .field("hidden", &self.hidden)
            .field("layers", &self.layers)
            .field("dtype", &self.dtype)
            .field("grid", &self.grid)
            .finish()
    }
}

impl ImageFeatures {
    /// Image tokens (rows): the `<|image_pad|>` tokens that stand for the image.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    /// Deepstack features per token (the decoder layers they are added after).
    pub fn deepstack_layers(&self) -> usize {
        self.layers
    }
    pub fn dtype(&self) -> TensorDtype {
        self.dtype
    }
    /// The image's grid in patches (None: rows gathered from several images for one step).
    pub fn grid(&self) -> Option<GridThw> {
        self.grid
    }
    /// Bytes of both outputs.
    pub fn bytes(&self) -> usize {
        (1 + self.layers) * self.tokens * self.hidden * self.dtype.size_bytes()
    }
    /// Bytes of one row (one token's features of one output).
    pub fn row_bytes(&self) -> usize {
        self.hidden * self.dtype.size_bytes()
    }
    pub fn embeds(&self) -> &DynTensor {
        &self.embeds
    }
    pub fn deepstack(&self) -> &DynTensor {
        &self.deepstack
    }
    /// Data address of `embeds` (device memory on a GPU).
    pub fn embeds_addr(&self) -> usize {
        self.embeds.data_ptr() as usize
    }
    pub fn deepstack_addr(&self) -> usize {
        self.deepstack.data_ptr() as usize
    }

    /// Both outputs as float32 host vectors (copied off the device when they live there).
    pub fn to_host(&self) -> Result<(Vec<f32>, Vec<f32>), VisionError> {
        Ok((to_f32_vec(&self.embeds)?, to_f32_vec(&self.deepstack)?))
    }
}

/// A float tensor's values as float32, copied to the host if it lives on a device.
pub fn to_f32_vec(tensor: &DynTensor) -> Result<Vec<f32>, VisionError> {
    let failed = |source: ort::Error| VisionError::Output { what: "copying features to the host", source };
    let host;
    let value = if tensor.memory_info().is_cpu_accessible() {
        tensor
    } else {
        host = tensor.to(AllocationDevice::CPU, 0).map_err(failed)?;
        &host
    };
    if let Ok((_, d)) = value.try_extract_tensor::<f32>() {
        return Ok(d.to_vec());
    }
    if let Ok((_, d)) = value.try_extract_tensor::<f16>() {
        return Ok(d.iter().map(|x| x.to_f32()).collect());
    }
    let (_, d) = value.try_extract_tensor::<bf16>().map_err(failed)?;
    Ok(d.iter().map(|x| x.to_f32()).collect())
}

/// The vision encoder graph of an export, one image per run.
pub struct VisionEncoder {
    session: Session,
    memory: MemoryInfo<'static>,
    spec: VisionSpec,
    path: PathBuf,
    hidden: usize,
    dtype: TensorDtype,
}

impl fmt::Debug for VisionEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VisionEncoder").field("path", &self.path).finish_non_exhaustive()
    }
}

impl VisionEncoder {
    /// Loads the vision encoder of the export in `dir` on `ep` (CUDA graphs off: every image has
    /// a shape of its own).
    pub fn load(dir: &Path, ep: &ExecutionProvider) -> Result<Self, VisionError> {
        let manifest =
            Manifest::load(dir).map_err(|e| VisionError::Load { path: dir.join("pio.json"), source: e.into() })?;
        Self::load_with(dir, &manifest, ep)
    }

    /// [`load`](Self::load) with the export's manifest already read.
    pub fn load_with(dir: &Path, manifest: &Manifest, ep: &ExecutionProvider) -> Result<Self, VisionError> {
        let spec = manifest.vision.clone().ok_or_else(|| VisionError::NotVisionLanguage { dir: dir.to_path_buf() })?;
        let path = dir.join(&spec.encoder);
        let load_error =
            |source: Box<dyn std::error::Error + Send + Sync>| VisionError::Load { path: path.clone(), source };
        let mut ep = ep.clone();
        ep.set_cuda_graph(false);
        let env = crate::ort_lib::environment().map_err(|e| load_error(e.into()))?;
        let builder = Session::builder(env).map_err(|e| load_error(e.into()))?;
        let builder = ep.configure(builder).map_err(|e| load_error(e.into()))?;
        let mut builder = crate::ort_lib::profiled(builder, &path).map_err(|e| load_error(e.into()))?;
        let session = builder.commit_from_file(&path).map_err(|e| load_error(e.into()))?;
        let memory = match ep.device_id() {
            Some(id) => MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)
                .map_err(|e| load_error(e.into()))?,
            None => MemoryInfo::default(),
        };
        Ok(VisionEncoder {
            session,
            memory,
            spec,
            path,
            hidden: manifest.dims.hidden_size,
            dtype: manifest.kv_cache.dtype,
        })
    }

    pub fn spec(&self) -> &VisionSpec {
        &self.spec
    }

    /// Values per `pixel_values` row (channels x temporal patch x patch²).
    pub fn patch_dim(&self) -> usize {
        self.spec.patch_dim
    }

    /// The features of one image: its processor rows (`pixel_values`, grid.t·h·w rows of
    /// [`patch_dim`](Self::patch_dim)) and its grid.
    pub fn encode(&mut self, pixels: &[f32], grid: GridThw) -> Result<ImageFeatures, VisionError> {
        let rows = grid.num_patches();
        if pixels.len() != rows * self.spec.patch_dim {
            return Err(VisionError::Input {
                message: format!(
                    "{} pixel values for a grid of {rows} patches of {} values",
                    pixels.len(),
                    self.spec.patch_dim
                ),
            });
        }
        let merge = self.spec.spatial_merge_size;
        let tokens = rows / (merge * merge);
        let run_error = |source: ort::Error| VisionError::Encode { grid, source };
        // An owned copy: `IoBinding::bind_input` copies a borrowed `TensorRef` itself, through a
        // session of ort's that can deadlock on its own lock (ort 2.0.0-rc.15, seen in the tests).
        let pixel_values = Tensor::from_array((vec![rows, self.spec.patch_dim], pixels.to_vec())).map_err(run_error)?;
        let grid_thw = [grid.t, grid.h, grid.w].map(i64::from).to_vec();
        let grid_thw = Tensor::from_array((vec![1usize, 3], grid_thw)).map_err(run_error)?;
        let mut binding = self.session.create_binding().map_err(run_error)?;
        binding.bind_input("pixel_values", &pixel_values).map_err(run_error)?;
        binding.bind_input("image_grid_thw", &grid_thw).map_err(run_error)?;
        binding.bind_output_to_device("image_embeds", &self.memory).map_err(run_error)?;
        binding.bind_output_to_device("deepstack_embeds", &self.memory).map_err(run_error)?;
        let mut out = self.session.run_binding(&binding).map_err(run_error)?;
        let mut take = |name: &'static str| -> Result<DynTensor, VisionError> {
            let value: DynValue = out.remove(name).ok_or(VisionError::MissingOutput { name })?;
            value.downcast::<DynTensorValueType>().map_err(|source| VisionError::Output { what: name, source })
        };
        let embeds = take("image_embeds")?;
        let deepstack = take("deepstack_embeds")?;
        let layers = self.spec.deepstack_visual_indexes.len();
        let expect = |t: &DynTensor, shape: &[i64], name: &'static str| -> Result<(), VisionError> {
            if &**t.shape() != shape {
                return Err(VisionError::Input {
                    message: format!("the encoder's {name} has shape {:?}, expected {shape:?}", t.shape()),
                });
            }
            Ok(())
        };
        expect(&embeds, &[tokens as i64, self.hidden as i64], "image_embeds")?;
        expect(&deepstack, &[layers as i64, tokens as i64, self.hidden as i64], "deepstack_embeds")?;
        Ok(ImageFeatures {
            embeds,
            deepstack,
            tokens,
            hidden: self.hidden,
            layers,
            dtype: self.dtype,
            grid: Some(grid),
        })
    }
}

impl ImageFeatures {
    /// Features computed elsewhere (transformers' reference, a test), as host float32 tensors:
    /// `embeds` (tokens, hidden) and `deepstack` (layers, tokens, hidden).
    pub fn from_host_f32(
        embeds: Vec<f32>,
        deepstack: Vec<f32>,
        hidden: usize,
        layers: usize,
        grid: GridThw,
    ) -> Result<Self, VisionError> {
        let tokens = embeds.len() / hidden.max(1);
        if embeds.len() != tokens * hidden || deepstack.len() != layers * tokens * hidden {
            return Err(VisionError::Input {
                message: format!(
                    "{} embedding and {} deepstack values do not make {layers} layers of rows of {hidden}",
                    embeds.len(),
                    deepstack.len()
                ),
            });
        }
        let tensor = |shape: Vec<usize>, data: Vec<f32>| -> Result<DynTensor, VisionError> {
            let t = Tensor::from_array((shape, data))
                .map_err(|source| VisionError::Output { what: "host features", source })?;
            Ok(t.upcast())
        };
        Ok(ImageFeatures {
            embeds: tensor(vec![tokens, hidden], embeds)?,
            deepstack: tensor(vec![layers, tokens, hidden], deepstack)?,
            tokens,
            hidden,
            layers,
            dtype: TensorDtype::Float32,
            grid: Some(grid),
        })
    }

    /// Rows gathered for one step: `embeds` (tokens, hidden) and `deepstack` (layers, tokens,
    /// hidden) of `dtype`.
    pub(crate) fn gathered(
        embeds: DynTensor,
        deepstack: DynTensor,
        hidden: usize,
        layers: usize,
        dtype: TensorDtype,
    ) -> Self {
        let tokens = embeds.shape().first().copied().unwrap_or(0).max(0) as usize;
        ImageFeatures { embeds, deepstack, tokens, hidden, layers, dtype, grid: None }
    }
}
