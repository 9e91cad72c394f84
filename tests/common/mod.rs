//! Helpers shared by the workspace integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pio_export::{export, ExportRequest, ExportSettings};
use pio_models::size::Precision;
use pio_models::TargetEp;
use serde::Deserialize;

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The transformers reference written by scripts/make_fixtures.py.
#[derive(Deserialize)]
pub struct Reference {
    pub prompt_ids: Vec<u32>,
    pub prefill_logits: Vec<Vec<f32>>,
    pub steps: Vec<Step>,
    pub greedy: Greedy,
    pub greedy_token_by_token: Vec<u32>,
}

#[derive(Deserialize)]
pub struct Step {
    pub input_id: u32,
    pub position: usize,
    pub logits: Vec<f32>,
}

#[derive(Deserialize)]
pub struct Greedy {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub generated_ids: Vec<u32>,
}

pub fn load_reference(fixture: &Path) -> Reference {
    let path = fixture.join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn cpu_settings(last_token_logits: bool) -> ExportSettings {
    ExportSettings {
        precision: Precision::Fp32,
        target_ep: TargetEp::Cpu,
        context_length: 256,
        last_token_logits,
        fused_norms: true,
        fused_qk_norm: false,
        fused_gate_up: false,
        fused_qkv: false,
        int4_block_size: 32,
        int4_lm_head: false,
        int4_accuracy_level: 0,
    }
}

/// Exports `checkpoint` into `out` with the given settings.
pub fn export_to(checkpoint: &Path, out: &Path, settings: ExportSettings) {
    export(&ExportRequest {
        checkpoint: checkpoint.to_path_buf(),
        out_dir: out.to_path_buf(),
        settings,
        overwrite: true,
        source: format!("test {}", checkpoint.display()),
        progress: false,
    })
    .unwrap_or_else(|e| panic!("export of {} failed: {e:#}", checkpoint.display()));
}

pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows differ in length");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
