//! The Qwen-VL image processor: smart resize, bicubic resampling, rescale and normalize, frames repeated to the
//! temporal patch size, and patches flattened in transformers' order.

use std::mem::MaybeUninit;
use std::num::NonZeroUsize;

use image::RgbImage;

use crate::config::ImageProcessorConfig;
use crate::error::ImageError;
use crate::normalize::Normalization;
use crate::resample::Resampled;
use crate::smart_resize::{smart_resize, SmartResizeError, MAX_ASPECT_RATIO};
use crate::stream::{self, SliceWriter};

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
#[derive(Clone, Debug, Default, PartialEq)]
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
    normalization: Normalization,
    threads: NonZeroUsize,
}

impl ImageProcessor {
    /// A processor that works on the calling thread alone (see [`ImageProcessor::with_threads`]).
    pub fn new(config: ImageProcessorConfig) -> ImageProcessor {
        let normalization = Normalization::from_config(&config);
        ImageProcessor { config, normalization, threads: NonZeroUsize::MIN }
    }

    /// Spreads each image's resampling, normalization and patch cutting over up to `threads` threads (bands of
    /// rows each, scoped threads started per call). The output is the same, bit for bit, whatever the count:
    /// every value is computed by the same code, only elsewhere.
    pub fn with_threads(self, threads: NonZeroUsize) -> ImageProcessor {
        ImageProcessor { threads, ..self }
    }

    pub fn threads(&self) -> NonZeroUsize {
        self.threads
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
        let mut batch = PixelBatch::default();
        self.preprocess_into(images, &mut batch)?;
        Ok(batch)
    }

    /// [`ImageProcessor::preprocess`] into an earlier batch, reusing its allocation. `pixel_values` is large
    /// (50 MB for a 1080p image at Qwen3-VL's settings) and writing fresh memory costs page faults, about as
    /// much as the rest of preprocessing; a caller that preprocesses repeatedly can keep one batch. On error the
    /// batch is left empty.
    pub fn preprocess_into(&self, images: &[RgbImage], batch: &mut PixelBatch) -> Result<(), ImageError> {
        // What the last batch wrote is mapped and cached-out memory: the place for streaming stores.
        let written_before = batch.pixel_values.len();
        batch.pixel_values.clear();
        batch.grids.clear();
        batch.rows = 0;
        batch.cols = self.config.patch_dim();
        if images.is_empty() {
            return Err(ImageError::NoImages);
        }
        let targets = images
            .iter()
            .enumerate()
            .map(|(index, image)| self.target_size(index, image.width(), image.height()))
            .collect::<Result<Vec<_>, _>>()?;
        let grids: Vec<GridThw> = targets.iter().map(|&(w, h)| self.grid_of(w, h)).collect();
        let rows: usize = grids.iter().map(GridThw::num_patches).sum();
        let len = rows.checked_mul(batch.cols).ok_or(ImageError::BatchTooLarge { bytes: u64::MAX })?;
        let warm_until = if batch.pixel_values.capacity() >= len { written_before } else { 0 };
        batch
            .pixel_values
            .try_reserve_exact(len)
            .map_err(|_| ImageError::BatchTooLarge { bytes: (len as u64).saturating_mul(4) })?;
        let mut at = 0;
        let spare = &mut batch.pixel_values.spare_capacity_mut()[..len];
        for ((image, &(width, height)), grid) in images.iter().zip(&targets).zip(&grids) {
            let resampled = Resampled::new(image, width, height, self.threads);
            let image_len = grid.num_patches() * batch.cols;
            self.write_patches(&resampled, *grid, &mut spare[at..at + image_len], at + image_len <= warm_until);
            at += image_len;
        }
        // (Every thread that wrote fenced its own streaming stores: `write_bands`.)
        // SAFETY: the reservation holds `len` values, and the loop above wrote all of them: the images' slices
        // tile 0..len, and write_patches fills its slice whole (it asserts so).
        unsafe { batch.pixel_values.set_len(len) };
        batch.rows = rows;
        batch.grids = grids;
        Ok(())
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

    /// transformers' `patchify` into `out` (exactly this image's values): rows in merge-block order (block row,
    /// block column, row in block, column in block), each row laid out as (channel, frame, y, x) with the image
    /// repeated in every frame. A block row (merge_size x patch_size image rows) is one band: resampled,
    /// normalized into channel planes and cut into patches while it is in cache, its values written in output
    /// order, each once. Bands are independent, so consecutive runs of them go to up to `threads` threads.
    fn write_patches(&self, image: &Resampled<'_>, grid: GridThw, out: &mut [MaybeUninit<f32>], streaming: bool) {
        let merge = self.config.merge_size() as usize;
        let bands = grid.h as usize / merge;
        if bands == 0 {
            // target_size makes every side a positive multiple of merge x patch; preprocess_into's
            // set_len relies on this image having no values either.
            assert!(out.is_empty(), "an image without a band of patches must have no pixel values");
            return;
        }
        let band_len = out.len() / bands;
        let threads = self.threads.get().min(bands);
        let per_thread = bands.div_ceil(threads);
        if threads == 1 {
            self.write_bands(image, grid, 0, out, band_len, streaming);
            return;
        }
        std::thread::scope(|scope| {
            for (index, part) in out.chunks_mut(per_thread * band_len).enumerate() {
                scope.spawn(move || self.write_bands(image, grid, index * per_thread, part, band_len, streaming));
            }
        });
    }

    /// Bands `first..` of an image into `out`, `band_len` values each, until `out` is full.
    fn write_bands(
        &self,
        image: &Resampled<'_>,
        grid: GridThw,
        first: usize,
        out: &mut [MaybeUninit<f32>],
        band_len: usize,
        streaming: bool,
    ) {
        let patch = self.config.patch_size() as usize;
        let merge = self.config.merge_size() as usize;
        let frames = self.config.temporal_patch_size() as usize;
        let width = grid.w as usize * patch;
        let band_rows = merge * patch;
        let channel_len = band_rows * width;
        let mut scratch = Vec::new();
        let mut planes = vec![0.0f32; 3 * channel_len];
        let mut patch_plane = vec![0.0f32; patch * patch];
        for (block_y, out) in (first..).zip(out.chunks_mut(band_len)) {
            let mut writer = SliceWriter::new(out, streaming);
            let band = image.band(block_y * band_rows..(block_y + 1) * band_rows, &mut scratch);
            let (red, rest) = planes.split_at_mut(channel_len);
            let (green, blue) = rest.split_at_mut(channel_len);
            let rows = band.chunks_exact(width * 3).zip(red.chunks_exact_mut(width));
            for ((rgb, r), (g, b)) in rows.zip(green.chunks_exact_mut(width).zip(blue.chunks_exact_mut(width))) {
                self.normalization.row_to_planes(rgb, r, g, b);
            }
            for block_x in 0..grid.w as usize / merge {
                for in_y in 0..merge {
                    for in_x in 0..merge {
                        let x0 = (block_x * merge + in_x) * patch;
                        for channel in planes.chunks_exact(channel_len) {
                            for (py, line) in patch_plane.chunks_exact_mut(patch).enumerate() {
                                let start = (in_y * patch + py) * width + x0;
                                line.copy_from_slice(&channel[start..start + patch]);
                            }
                            writer.push_copies(&patch_plane, frames);
                        }
                    }
                }
            }
            // preprocess_into's set_len relies on this.
            assert!(writer.is_full(), "a band of patches must fill its share of pixel_values");
        }
        // Streaming stores are ordered by a fence on the thread that made them.
        stream::finish();
    }
}
