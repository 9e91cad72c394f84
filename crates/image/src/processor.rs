//! The Qwen-VL image processor: smart resize, bicubic resampling, rescale and normalize, frames repeated to the
//! temporal patch size, and patches flattened in transformers' order.

use image::RgbImage;

use crate::config::ImageProcessorConfig;
use crate::error::ImageError;
use crate::resample::resize_bicubic;
use crate::smart_resize::{smart_resize, SmartResizeError, MAX_ASPECT_RATIO};

/// An image's size in patches: `t` frames (1 for an image) x `h` x `w` patches; `image_grid_thw` in
/// transformers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GridThw {
    pub t: u32,
    pub h: u32,
    pub w: u32,
}

impl GridThw {
    /// Rows of `pixel_values` for this image: t x h x w.
    pub fn num_patches(&self) -> usize {
        self.t as usize * self.h as usize * self.w as usize
    }

    pub fn as_array(&self) -> [u32; 3] {
        [self.t, self.h, self.w]
    }
}

/// The processor's output for a batch of images: transformers' `pixel_values` ([rows, cols] f32, row-major;
/// the images' patches one after the other) and `image_grid_thw` (one grid per image).
#[derive(Clone, Debug, PartialEq)]
pub struct PixelBatch {
    pixel_values: Vec<f32>,
    rows: usize,
    cols: usize,
    grids: Vec<GridThw>,
}

impl PixelBatch {
    pub fn pixel_values(&self) -> &[f32] {
        &self.pixel_values
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// channels x temporal_patch_size x patch_size².
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn grids(&self) -> &[GridThw] {
        &self.grids
    }
    /// The rows of image `index`.
    pub fn image_rows(&self, index: usize) -> Option<&[f32]> {
        let grid = self.grids.get(index)?;
        let first: usize = self.grids[..index].iter().map(GridThw::num_patches).sum();
        self.pixel_values.get(first * self.cols..(first + grid.num_patches()) * self.cols)
    }
    pub fn into_parts(self) -> (Vec<f32>, usize, usize, Vec<GridThw>) {
        (self.pixel_values, self.rows, self.cols, self.grids)
    }
}

/// Runs the image processor a checkpoint's config describes, as transformers' default (torchvision) backend
/// does; see the crate docs for the accuracy.
#[derive(Clone, Debug)]
pub struct ImageProcessor {
    config: ImageProcessorConfig,
    /// The normalized value of each 8-bit level, per channel: the resampled image is 8-bit, so rescale and
    /// normalize reduce to a lookup, computed in transformers' f32 arithmetic.
    levels: [[f32; 256]; 3],
}

impl ImageProcessor {
    pub fn new(config: ImageProcessorConfig) -> ImageProcessor {
        let levels = normalization_levels(&config);
        ImageProcessor { config, levels }
    }

    pub fn config(&self) -> &ImageProcessorConfig {
        &self.config
    }

    /// The grid an image of `width` x `height` gets, without touching pixels (for prompt building and cache
    /// hits). Errors name the image as image 0.
    pub fn grid(&self, width: u32, height: u32) -> Result<GridThw, ImageError> {
        let (resized_width, resized_height) = self.target_size(0, width, height)?;
        Ok(self.grid_of(resized_width, resized_height))
    }

    /// How many `<|image_pad|>` tokens stand for an image with this grid in the prompt: t x h x w / merge_size².
    pub fn image_pad_tokens(&self, grid: GridThw) -> usize {
        let merge = self.config.merge_size() as usize;
        grid.num_patches() / (merge * merge)
    }

    /// transformers' `image_processor(images=[...])`: every image is checked (size, aspect ratio) before any
    /// is resampled; the rows of all images are concatenated in order, with one grid each.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<PixelBatch, ImageError> {
        if images.is_empty() {
            return Err(ImageError::NoImages);
        }
        let targets = images
            .iter()
            .enumerate()
            .map(|(index, image)| self.target_size(index, image.width(), image.height()))
            .collect::<Result<Vec<_>, _>>()?;
        let grids: Vec<GridThw> = targets.iter().map(|&(w, h)| self.grid_of(w, h)).collect();
        let cols = self.config.patch_dim();
        let rows: usize = grids.iter().map(GridThw::num_patches).sum();
        let len = rows.checked_mul(cols).ok_or(ImageError::BatchTooLarge { bytes: u64::MAX })?;
        let mut pixel_values = Vec::new();
        pixel_values
            .try_reserve_exact(len)
            .map_err(|_| ImageError::BatchTooLarge { bytes: (len as u64).saturating_mul(4) })?;
        pixel_values.resize(len, 0.0);

        let mut rest = pixel_values.as_mut_slice();
        for ((image, &(width, height)), grid) in images.iter().zip(&targets).zip(&grids) {
            let (out, tail) = rest.split_at_mut(grid.num_patches() * cols);
            rest = tail;
            if image.dimensions() == (width, height) {
                self.write_patches(image, *grid, out);
            } else {
                self.write_patches(&resize_bicubic(image, width, height), *grid, out);
            }
        }
        Ok(PixelBatch { pixel_values, rows, cols, grids })
    }

    /// `(width, height)` after smart resize (or the image's own size, checked, when do_resize is off).
    fn target_size(&self, index: usize, width: u32, height: u32) -> Result<(u32, u32), ImageError> {
        let config = &self.config;
        let factor = config.resize_factor();
        if !config.do_resize() {
            if width == 0 || height == 0 || !width.is_multiple_of(factor) || !height.is_multiple_of(factor) {
                return Err(ImageError::NotPatchAligned { index, width, height, factor });
            }
            return Ok((width, height));
        }
        if width == 0 || height == 0 {
            return Err(ImageError::BadResize {
                index,
                width,
                height,
                resized_width: 0,
                resized_height: 0,
                reason: "the image is empty",
            });
        }
        match smart_resize(height, width, factor, config.min_pixels(), config.max_pixels()) {
            Ok((resized_height, resized_width)) => Ok((resized_width, resized_height)),
            Err(SmartResizeError::AspectRatio(ratio)) => {
                Err(ImageError::AspectRatio { index, width, height, ratio, limit: MAX_ASPECT_RATIO })
            }
            Err(SmartResizeError::OutOfRange { height: resized_height, width: resized_width }) => {
                Err(ImageError::BadResize {
                    index,
                    width,
                    height,
                    resized_width,
                    resized_height,
                    reason: "a side is zero or too large; check min_pixels and max_pixels",
                })
            }
        }
    }

    fn grid_of(&self, width: u32, height: u32) -> GridThw {
        let patch = self.config.patch_size();
        GridThw { t: 1, h: height / patch, w: width / patch }
    }

    /// transformers' `patchify`: rows in merge-block order (block row, block column, row in block, column in
    /// block), each row laid out as (channel, frame, y, x) with the image repeated in every frame.
    fn write_patches(&self, image: &RgbImage, grid: GridThw, out: &mut [f32]) {
        let patch = self.config.patch_size() as usize;
        let merge = self.config.merge_size() as usize;
        let frames = self.config.temporal_patch_size() as usize;
        let (grid_h, grid_w) = (grid.h as usize, grid.w as usize);
        let src = image.as_raw();
        let stride = image.width() as usize * 3;
        let plane = patch * patch;
        let mut rows = out.chunks_exact_mut(3 * frames * plane);
        for block_y in 0..grid_h / merge {
            for block_x in 0..grid_w / merge {
                for in_y in 0..merge {
                    for in_x in 0..merge {
                        let Some(row) = rows.next() else { return };
                        let y0 = (block_y * merge + in_y) * patch;
                        let x0 = (block_x * merge + in_x) * patch;
                        for (channel, channel_block) in row.chunks_exact_mut(frames * plane).enumerate() {
                            let levels = &self.levels[channel];
                            let (first, repeats) = channel_block.split_at_mut(plane);
                            for (py, line) in first.chunks_exact_mut(patch).enumerate() {
                                let start = (y0 + py) * stride + x0 * 3 + channel;
                                let pixels = src[start..].iter().step_by(3);
                                for (value, &level) in line.iter_mut().zip(pixels) {
                                    *value = levels[usize::from(level)];
                                }
                            }
                            for frame in repeats.chunks_exact_mut(plane) {
                                frame.copy_from_slice(first);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// transformers' `rescale_and_normalize` on each 8-bit level, in its f32 arithmetic: with both steps on it
/// folds the rescale into the constants (`mean / rescale_factor`, `std / rescale_factor`, as f32 products) and
/// computes `(x - mean') / std'`; normalize alone is `(x - mean) / std`; rescale alone is `x * rescale_factor`.
fn normalization_levels(config: &ImageProcessorConfig) -> [[f32; 256]; 3] {
    let mut levels = [[0.0f32; 256]; 3];
    let inverse_rescale = (1.0 / config.rescale_factor()) as f32;
    for (channel, channel_levels) in levels.iter_mut().enumerate() {
        let (mean, std) = (config.image_mean()[channel] as f32, config.image_std()[channel] as f32);
        for (level, value) in channel_levels.iter_mut().enumerate() {
            let x = level as f32;
            *value = match (config.do_rescale(), config.do_normalize()) {
                (true, true) => (x - mean * inverse_rescale) / (std * inverse_rescale),
                (false, true) => (x - mean) / std,
                (true, false) => x * config.rescale_factor() as f32,
                (false, false) => x,
            };
        }
    }
    levels
}
