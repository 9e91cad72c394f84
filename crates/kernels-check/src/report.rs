//! A JSON report saved after every section, so a crash or a timeout keeps what was measured; a
//! failing section records its error and the next one runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value};

pub struct Report {
    path: PathBuf,
    root: Map<String, Value>,
}

impl Report {
    pub fn new(path: &Path) -> Report {
        Report { path: path.to_path_buf(), root: Map::new() }
    }

    pub fn set(&mut self, key: &str, value: Value) -> Result<()> {
        self.root.insert(key.to_string(), value);
        self.save()
    }

    /// Runs one section; its value or its error (with any panic caught) goes under `key`. Returns
    /// the value when the section succeeded (its error is in the report otherwise).
    pub fn section(&mut self, key: &str, f: impl FnOnce() -> Result<Value>) -> Option<Value> {
        eprintln!("[pio-kernels-check] {key} ...");
        let start = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|p| Err(anyhow::anyhow!("panicked: {}", panic_text(&p))));
        let seconds = start.elapsed().as_secs_f64();
        let (stored, result) = match outcome {
            Ok(v) => (v.clone(), Some(v)),
            Err(e) => {
                eprintln!("[pio-kernels-check] {key} failed: {e:#}");
                (serde_json::json!({ "error": format!("{e:#}") }), None)
            }
        };
        self.root.insert(key.to_string(), stored);
        self.root.insert(format!("{key}_seconds"), seconds.into());
        if let Err(e) = self.save() {
            eprintln!("[pio-kernels-check] cannot save {}: {e:#}", self.path.display());
        }
        result
    }

    pub fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&Value::Object(self.root.clone()))?;
        std::fs::write(&self.path, text).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}
