//! The checkpoint's image-processor settings, read as transformers reads them for `Qwen2VLImageProcessor`
//! (the class Qwen2-VL, Qwen2.5-VL and Qwen3-VL all use).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// transformers' `Qwen2VLImageProcessor` class defaults, used for every key a config leaves out.
mod defaults {
    pub const PATCH_SIZE: u32 = 14;
    pub const TEMPORAL_PATCH_SIZE: u32 = 2;
    pub const MERGE_SIZE: u32 = 2;
    pub const MIN_PIXELS: u64 = 56 * 56;
    pub const MAX_PIXELS: u64 = 28 * 28 * 1280;
    pub const IMAGE_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073]; // OPENAI_CLIP_MEAN
    pub const IMAGE_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711]; // OPENAI_CLIP_STD
    pub const RESCALE_FACTOR: f64 = 1.0 / 255.0;
    /// PIL's resampling code for bicubic.
    pub const RESAMPLE_BICUBIC: u32 = 3;
}

/// A config file that cannot be used, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid image-processor config: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{dir} has neither processor_config.json with an image_processor entry nor preprocessor_config.json")]
    NotFound { dir: PathBuf },
    #[error("{path}: {key} = {value}: {reason}")]
    Invalid { path: PathBuf, key: &'static str, value: String, reason: &'static str },
}

/// Everything the image processor needs, resolved: keys the file leaves out take transformers' class defaults.
///
/// Build it with [`ImageProcessorConfig::from_checkpoint_dir`] (or [`ImageProcessorConfig::from_json`]);
/// [`Default`] is transformers' `Qwen2VLImageProcessor()` with no config.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    patch_size: u32,
    temporal_patch_size: u32,
    merge_size: u32,
    min_pixels: u64,
    max_pixels: u64,
    do_resize: bool,
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    image_mean: [f64; 3],
    image_std: [f64; 3],
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            patch_size: defaults::PATCH_SIZE,
            temporal_patch_size: defaults::TEMPORAL_PATCH_SIZE,
            merge_size: defaults::MERGE_SIZE,
            min_pixels: defaults::MIN_PIXELS,
            max_pixels: defaults::MAX_PIXELS,
            do_resize: true,
            do_rescale: true,
            rescale_factor: defaults::RESCALE_FACTOR,
            do_normalize: true,
            image_mean: defaults::IMAGE_MEAN,
            image_std: defaults::IMAGE_STD,
        }
    }
}

/// The keys as they appear in `preprocessor_config.json` (or `processor_config.json`'s `image_processor`).
/// Other keys (`processor_class`, `image_processor_type`, ...) are ignored, as transformers ignores them here.
#[derive(Deserialize)]
struct RawConfig {
    patch_size: Option<u32>,
    temporal_patch_size: Option<u32>,
    merge_size: Option<u32>,
    size: Option<RawSize>,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    do_resize: Option<bool>,
    resample: Option<u32>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<MeanOrStd>,
    image_std: Option<MeanOrStd>,
    /// Images reach the processor already RGB (decoded as `load_image` does), so transformers' conversion is a
    /// no-op whatever this says; it is read only so that a wrong type is reported.
    #[allow(dead_code)]
    do_convert_rgb: Option<bool>,
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
}

/// transformers accepts one number for all channels or one per channel.
#[derive(Deserialize)]
#[serde(untagged)]
enum MeanOrStd {
    All(f64),
    PerChannel(Vec<f64>),
}

#[derive(Deserialize)]
struct ProcessorConfigFile {
    image_processor: Option<serde_json::Value>,
}

impl ImageProcessorConfig {
    /// Reads a checkpoint folder as transformers 5 does: the `image_processor` entry of `processor_config.json`
    /// if there is one, else `preprocessor_config.json`.
    pub fn from_checkpoint_dir(dir: impl AsRef<Path>) -> Result<ImageProcessorConfig, ConfigError> {
        let dir = dir.as_ref();
        let processor_path = dir.join("processor_config.json");
        if processor_path.is_file() {
            let text = read(&processor_path)?;
            let file: ProcessorConfigFile =
                serde_json::from_str(&text).map_err(|source| json(&processor_path, source))?;
            if let Some(entry) = file.image_processor {
                let raw = serde_json::from_value(entry).map_err(|source| json(&processor_path, source))?;
                return Self::resolve(raw, &processor_path);
            }
        }
        let preprocessor_path = dir.join("preprocessor_config.json");
        if preprocessor_path.is_file() {
            return Self::from_json(&read(&preprocessor_path)?, &preprocessor_path);
        }
        Err(ConfigError::NotFound { dir: dir.to_path_buf() })
    }

    /// Parses the image-processor JSON object; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<ImageProcessorConfig, ConfigError> {
        let raw = serde_json::from_str(text).map_err(|source| json(path, source))?;
        Self::resolve(raw, path)
    }

    fn resolve(raw: RawConfig, path: &Path) -> Result<ImageProcessorConfig, ConfigError> {
        let invalid =
            |key, value: String, reason| ConfigError::Invalid { path: path.to_path_buf(), key, value, reason };
        let base = ImageProcessorConfig::default();
        // Qwen2VLImageProcessor.__init__: `size` (or the class default when absent), then min_pixels and
        // max_pixels, when given, override its shortest_edge and longest_edge.
        let (size_min, size_max) = match raw.size {
            Some(size) => (size.shortest_edge, size.longest_edge),
            None => (Some(base.min_pixels), Some(base.max_pixels)),
        };
        let min_pixels = raw.min_pixels.or(size_min).ok_or_else(|| {
            invalid("size", "{..}".into(), "size needs shortest_edge (min pixels), or give min_pixels")
        })?;
        let max_pixels = raw.max_pixels.or(size_max).ok_or_else(|| {
            invalid("size", "{..}".into(), "size needs longest_edge (max pixels), or give max_pixels")
        })?;
        let resample = raw.resample.unwrap_or(defaults::RESAMPLE_BICUBIC);
        if resample != defaults::RESAMPLE_BICUBIC {
            return Err(invalid("resample", resample.to_string(), "only bicubic (3) is implemented"));
        }
        let positive = |key, value: Option<u32>, default| match value.unwrap_or(default) {
            0 => Err(invalid(key, "0".into(), "must be at least 1")),
            v => Ok(v),
        };
        let config = ImageProcessorConfig {
            patch_size: positive("patch_size", raw.patch_size, base.patch_size)?,
            temporal_patch_size: positive("temporal_patch_size", raw.temporal_patch_size, base.temporal_patch_size)?,
            merge_size: positive("merge_size", raw.merge_size, base.merge_size)?,
            min_pixels,
            max_pixels,
            do_resize: raw.do_resize.unwrap_or(true),
            do_rescale: raw.do_rescale.unwrap_or(true),
            rescale_factor: raw.rescale_factor.unwrap_or(base.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(true),
            image_mean: per_channel(raw.image_mean, base.image_mean).map_err(|v| invalid("image_mean", v, THREE))?,
            image_std: per_channel(raw.image_std, base.image_std).map_err(|v| invalid("image_std", v, THREE))?,
        };
        if config.patch_size.checked_mul(config.merge_size).is_none() {
            return Err(invalid("merge_size", config.merge_size.to_string(), "patch_size x merge_size overflows"));
        }
        let patch_dim = config.patch_size.checked_mul(config.patch_size).and_then(|p2| p2.checked_mul(3));
        if patch_dim.and_then(|d| d.checked_mul(config.temporal_patch_size)).is_none_or(|d| d > 1 << 24) {
            return Err(invalid(
                "patch_size",
                config.patch_size.to_string(),
                "3 x temporal_patch_size x patch_size² is too large",
            ));
        }
        if !(config.rescale_factor.is_finite() && config.rescale_factor > 0.0) {
            return Err(invalid("rescale_factor", config.rescale_factor.to_string(), "must be a positive number"));
        }
        if config.image_std.iter().any(|&s| !(s.is_finite() && s != 0.0)) {
            return Err(invalid("image_std", format!("{:?}", config.image_std), "must be finite and non-zero"));
        }
        if config.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(invalid("image_mean", format!("{:?}", config.image_mean), "must be finite"));
        }
        Ok(config)
    }

    /// Replaces the pixel range (transformers' `size={"shortest_edge": min, "longest_edge": max}` override, vLLM's
    /// `min_pixels`/`max_pixels` processor kwargs).
    pub fn with_pixel_range(mut self, min_pixels: u64, max_pixels: u64) -> Self {
        self.min_pixels = min_pixels;
        self.max_pixels = max_pixels;
        self
    }

    pub fn patch_size(&self) -> u32 {
        self.patch_size
    }
    pub fn temporal_patch_size(&self) -> u32 {
        self.temporal_patch_size
    }
    pub fn merge_size(&self) -> u32 {
        self.merge_size
    }
    pub fn min_pixels(&self) -> u64 {
        self.min_pixels
    }
    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
    }
    pub fn do_resize(&self) -> bool {
        self.do_resize
    }
    pub fn do_rescale(&self) -> bool {
        self.do_rescale
    }
    pub fn rescale_factor(&self) -> f64 {
        self.rescale_factor
    }
    pub fn do_normalize(&self) -> bool {
        self.do_normalize
    }
    pub fn image_mean(&self) -> [f64; 3] {
        self.image_mean
    }
    pub fn image_std(&self) -> [f64; 3] {
        self.image_std
    }

    /// Both sides of a resized image are multiples of this: patch_size x merge_size.
    pub fn resize_factor(&self) -> u32 {
        self.patch_size * self.merge_size
    }

    /// Values in one row of `pixel_values`: channels x temporal_patch_size x patch_size².
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size as usize * self.patch_size as usize * self.patch_size as usize
    }
}

const THREE: &str = "must be one number or three (one per channel)";

fn per_channel(value: Option<MeanOrStd>, default: [f64; 3]) -> Result<[f64; 3], String> {
    match value {
        None => Ok(default),
        Some(MeanOrStd::All(v)) => Ok([v; 3]),
        Some(MeanOrStd::PerChannel(values)) => {
            <[f64; 3]>::try_from(values.as_slice()).map_err(|_| format!("{values:?}"))
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })
}

fn json(path: &Path, source: serde_json::Error) -> ConfigError {
    ConfigError::Json { path: path.to_path_buf(), source }
}
