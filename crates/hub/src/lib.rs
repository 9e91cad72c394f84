//! pio-hub: downloads from the Hugging Face hub into its shared cache (`$HF_HOME/hub`, the
//! layout `huggingface-cli` and transformers use), fetching only what `pio-export` reads.
//!
//! Built on the `hf-hub` crate (0.4, synchronous): its [`Cache`](hf_hub::Cache) and
//! [`Repo`](hf_hub::Repo) types (cache paths, refs, the token file), its API client for the
//! repository listing and file URLs, and its progress interface. Added here, where hf-hub has
//! nothing: the choice of files, the disk-space check, hash checks before a file enters a
//! snapshot, resumption in the same run, parallel transfers, offline use and the `HF_TOKEN` /
//! `HF_HUB_OFFLINE` variables.
//!
//! ```no_run
//! let hub = pio_hub::HubBuilder::from_env()?.progress(true).build()?;
//! let snapshot = hub.download("Qwen/Qwen3-4B-Instruct-2507", "main")?;
//! println!("{}", snapshot.dir.display());
//! # Ok::<(), pio_hub::HubError>(())
//! ```

mod cache;
mod digest;
mod disk;
mod error;
mod http;
mod hub;
mod info;
mod progress;
mod selection;
mod settings;
mod transfer;

pub use error::HubError;
pub use hub::{Hub, Snapshot};
pub use settings::{HubBuilder, DEFAULT_ENDPOINT};
