//! A prompt's images placed on its tokens: each image's `<|image_pad|>` (one per image, as the
//! chat template writes it) expanded to the image's token count, as transformers' processor
//! expands it in the text, and the rope index over the result.

use std::ops::Range;

use pio_image::{GridThw, ImageHash};

use super::rope_index::{rope_index, RopeIndex};
use super::VisionError;

/// One image of a prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptImage {
    pub hash: ImageHash,
    pub grid: GridThw,
    /// Its pad tokens in the prompt.
    pub tokens: Range<usize>,
}

/// The images of a prompt and the rotary positions they give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultimodalPrompt {
    pub images: Vec<PromptImage>,
    pub rope: RopeIndex,
}

impl MultimodalPrompt {
    /// `ids` as tokenized, with one `image_token` per image (in order); each is expanded to
    /// t·h·w / merge² tokens of its image. Returns the expanded ids and the prompt's images.
    pub fn expand(
        ids: &[u32],
        image_token: u32,
        images: &[(ImageHash, GridThw)],
        merge: usize,
    ) -> Result<(Vec<u32>, MultimodalPrompt), VisionError> {
        let pads = ids.iter().filter(|&&t| t == image_token).count();
        if pads != images.len() {
            return Err(VisionError::Input {
                message: format!(
                    "the prompt has {pads} image placeholder token(s) (<|image_pad|>) for {} image(s)",
                    images.len()
                ),
            });
        }
        let merge2 = merge * merge;
        let extra: usize = images.iter().map(|(_, g)| g.num_patches() / merge2).sum::<usize>();
        let mut expanded = Vec::with_capacity(ids.len() + extra);
        let mut placed = Vec::with_capacity(images.len());
        let mut next_image = images.iter();
        for &id in ids {
            if id != image_token {
                expanded.push(id);
                continue;
            }
            let Some(&(hash, grid)) = next_image.next() else { break };
            let count = grid.num_patches() / merge2;
            let start = expanded.len();
            expanded.extend(std::iter::repeat_n(image_token, count));
            placed.push(PromptImage { hash, grid, tokens: start..start + count });
        }
        let grids: Vec<[i64; 3]> = images.iter().map(|(_, g)| g.as_array().map(i64::from)).collect();
        let rope = rope_index(&expanded, image_token, &grids, merge as i64)?;
        Ok((expanded, MultimodalPrompt { images: placed, rope }))
    }

    /// The (t, h, w) positions of prompt tokens `range`.
    pub fn positions(&self, range: Range<usize>) -> [Vec<i64>; 3] {
        std::array::from_fn(|axis| self.rope.positions[axis][range.clone()].to_vec())
    }

    /// The images whose pad tokens fall in `range`, each with the rows (of its features) that do.
    pub fn rows_in(&self, range: Range<usize>) -> Vec<(usize, Range<usize>)> {
        self.images
            .iter()
            .enumerate()
            .filter_map(|(i, image)| {
                let start = image.tokens.start.max(range.start);
                let end = image.tokens.end.min(range.end);
                (start < end).then(|| (i, start - image.tokens.start..end - image.tokens.start))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ImageHash {
        ImageHash::of_encoded(&[n])
    }

    #[test]
    fn each_placeholder_becomes_its_images_tokens() {
        // <start> pad <end> text <start> pad <end>: a 1x4x6 grid (6 tokens) and a 1x2x2 (1 token).
        let ids = [7, 9, 8, 1, 7, 9, 8];
        let images = [(hash(1), GridThw { t: 1, h: 4, w: 6 }), (hash(2), GridThw { t: 1, h: 2, w: 2 })];
        let (expanded, prompt) = MultimodalPrompt::expand(&ids, 9, &images, 2).unwrap();
        assert_eq!(expanded, [7, 9, 9, 9, 9, 9, 9, 8, 1, 7, 9, 8]);
        assert_eq!(prompt.images[0].tokens, 1..7);
        assert_eq!(prompt.images[1].tokens, 10..11);
        assert_eq!(prompt.rope.positions[2][..8], [0, 1, 2, 3, 1, 2, 3, 4]);
        // A chunk from token 4 to 11 holds rows 3.. of the first image and all of the second.
        assert_eq!(prompt.rows_in(4..11), vec![(0, 3..6), (1, 0..1)]);
        assert_eq!(prompt.rows_in(7..10), vec![]);
        assert_eq!(prompt.positions(0..2), [vec![0, 1], vec![0, 1], vec![0, 1]]);
    }

    #[test]
    fn placeholders_must_match_the_images() {
        let e = MultimodalPrompt::expand(&[9, 1, 9], 9, &[(hash(1), GridThw { t: 1, h: 2, w: 2 })], 2).unwrap_err();
        assert!(e.to_string().contains("2 image placeholder token(s) (<|image_pad|>) for 1 image(s)"), "{e}");
    }
}
