//! transformers' `get_rope_index` for Qwen3-VL: the (t, h, w) rotary position of every prompt
//! token, and the rope delta that decode steps add to their cache position.

use super::VisionError;

/// The three position rows of a prompt and its rope delta.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RopeIndex {
    /// t, h and w positions, one per prompt token each.
    pub positions: [Vec<i64>; 3],
    /// max position + 1 - prompt length: a generated token at cache slot p sits at p + delta on
    /// all three axes.
    pub delta: i64,
}

/// transformers' `get_rope_index` for a prompt of text and images (one grid (t, h, w) in patches
/// per run of `image_token` ids, in order): text tokens count on all three axes; an image's
/// tokens sit at (start + frame, start + row, start + column) of its merged grid, and the text
/// after it resumes at start + max(h, w) / merge.
pub fn rope_index(ids: &[u32], image_token: u32, grids: &[[i64; 3]], merge: i64) -> Result<RopeIndex, VisionError> {
    let mut rows: [Vec<i64>; 3] = std::array::from_fn(|_| Vec::with_capacity(ids.len()));
    let (mut next, mut i, mut images) = (0i64, 0usize, grids.iter());
    let mismatch = |message: String| VisionError::Input { message };
    while i < ids.len() {
        if ids[i] != image_token {
            for r in rows.iter_mut() {
                r.push(next);
            }
            next += 1;
            i += 1;
            continue;
        }
        let [t, h, w] = *images.next().ok_or_else(|| mismatch("more image runs in the prompt than grids".into()))?;
        let (gh, gw) = (h / merge, w / merge);
        let count = (t * gh * gw) as usize;
        if ids[i..].len() < count || ids[i..i + count].iter().any(|&x| x != image_token) {
            return Err(mismatch(format!(
                "an image of grid {t}x{h}x{w} needs {count} consecutive image tokens at {i}"
            )));
        }
        for k in 0..t * gh * gw {
            rows[0].push(next + k / (gh * gw));
            rows[1].push(next + (k / gw) % gh);
            rows[2].push(next + k % gw);
        }
        next += gh.max(gw);
        i += count;
    }
    if images.next().is_some() {
        return Err(mismatch("fewer image runs in the prompt than grids".into()));
    }
    let max = rows.iter().flatten().copied().max().unwrap_or(-1);
    Ok(RopeIndex { positions: rows, delta: max + 1 - ids.len() as i64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_sits_on_its_grid_and_the_text_after_it_resumes_past_its_largest_side() {
        // text, a 1x4x6 grid (merged: 2 rows of 3 tokens), text.
        let ids = [1, 2, 9, 9, 9, 9, 9, 9, 3];
        let index = rope_index(&ids, 9, &[[1, 4, 6]], 2).unwrap();
        assert_eq!(index.positions[0], [0, 1, 2, 2, 2, 2, 2, 2, 5]);
        assert_eq!(index.positions[1], [0, 1, 2, 2, 2, 3, 3, 3, 5]);
        assert_eq!(index.positions[2], [0, 1, 2, 3, 4, 2, 3, 4, 5]);
        assert_eq!(index.delta, 6 - 9);
        let text = rope_index(&[1, 2, 3], 9, &[], 2).unwrap();
        assert_eq!((text.positions[2].clone(), text.delta), (vec![0, 1, 2], 0));
    }

    #[test]
    fn runs_and_grids_must_match() {
        assert!(rope_index(&[9, 9, 9], 9, &[[1, 4, 6]], 2).is_err(), "too few pad tokens");
        assert!(rope_index(&[1, 2], 9, &[[1, 2, 2]], 2).is_err(), "a grid without a run");
        assert!(rope_index(&[9], 9, &[], 2).is_err(), "a run without a grid");
    }
}
