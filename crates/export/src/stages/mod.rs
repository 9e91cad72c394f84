//! A decoder exported in stages (`pio-export --stages N`, `--stage-memory-gb G`,
//! `--stage-boundaries ..`): N graphs over contiguous layer ranges, each run in a session of its
//! own, on a device of its own, so that a model larger than one GPU runs on several (pipeline
//! parallelism; `pio_runtime::stages` runs them).
//!
//! - [`plan`]: where the cuts go (layer bytes in the exported precision, balanced);
//! - [`write`]: the graphs (one per stage, written in parallel) and what the manifest lists.
//!
//! Stage 0 holds the embeddings (and a vision-language decoder's image rows), the last stage
//! the final norm, the lm_head and the greedy output; the hidden states between stages are
//! stage outputs and inputs in the graph's dtype (see `pio_models::manifest::StageSpec`).

pub mod plan;
pub mod write;

pub use plan::{decoder_bytes, DecoderBytes, StageScope, StageSplit};
pub use write::{write_decoder, DecoderFiles};
