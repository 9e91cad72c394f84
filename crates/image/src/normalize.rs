//! transformers' `rescale_and_normalize`, as the f32 operations it performs, so the results are bit-identical.

use crate::config::ImageProcessorConfig;

/// How each 8-bit sample becomes an f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Normalization {
    /// `(x - sub) / div` per channel. With rescale and normalize both on, transformers folds the rescale into
    /// the constants (`sub = f32(mean) * f32(1 / rescale_factor)`, `div` likewise from std); with normalize
    /// alone they are mean and std.
    Affine { sub: [f32; 3], div: [f32; 3] },
    /// `x * factor`: rescale alone.
    Scale(f32),
    /// `x`: neither.
    Identity,
}

impl Normalization {
    pub(crate) fn from_config(config: &ImageProcessorConfig) -> Normalization {
        let as_f32 = |values: [f64; 3]| values.map(|v| v as f32);
        let (mean, std) = (as_f32(config.image_mean()), as_f32(config.image_std()));
        match (config.do_rescale(), config.do_normalize()) {
            (true, true) => {
                let inverse_rescale = (1.0 / config.rescale_factor()) as f32;
                Normalization::Affine { sub: mean.map(|m| m * inverse_rescale), div: std.map(|s| s * inverse_rescale) }
            }
            (false, true) => Normalization::Affine { sub: mean, div: std },
            (true, false) => Normalization::Scale(config.rescale_factor() as f32),
            (false, false) => Normalization::Identity,
        }
    }

    /// Normalizes one row of interleaved RGB into three planar rows (as long as the row has pixels).
    pub(crate) fn row_to_planes(&self, rgb: &[u8], red: &mut [f32], green: &mut [f32], blue: &mut [f32]) {
        let planes = red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut());
        let pixels = rgb.chunks_exact(3).zip(planes);
        // One simple loop per case, which the compiler vectorises.
        match *self {
            Normalization::Affine { sub, div } => {
                for (pixel, ((r, g), b)) in pixels {
                    *r = (f32::from(pixel[0]) - sub[0]) / div[0];
                    *g = (f32::from(pixel[1]) - sub[1]) / div[1];
                    *b = (f32::from(pixel[2]) - sub[2]) / div[2];
                }
            }
            Normalization::Scale(factor) => {
                for (pixel, ((r, g), b)) in pixels {
                    *r = f32::from(pixel[0]) * factor;
                    *g = f32::from(pixel[1]) * factor;
                    *b = f32::from(pixel[2]) * factor;
                }
            }
            Normalization::Identity => {
                for (pixel, ((r, g), b)) in pixels {
                    *r = f32::from(pixel[0]);
                    *g = f32::from(pixel[1]);
                    *b = f32::from(pixel[2]);
                }
            }
        }
    }
}
