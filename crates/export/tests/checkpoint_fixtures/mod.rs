//! The committed test checkpoints (tests/fixtures/) and ways to damage a copy of one.

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};

use pio_export::checkpoint::read_tensor_entries;
use safetensors::Dtype;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// Copies a fixture checkpoint into `dir` so a test can damage it.
pub fn copy_fixture(name: &str, dir: &Path) -> PathBuf {
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

/// Rewrites the JSON file at `path` with `edit` applied.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

/// Sets element (`row`, `column`) of the 2-D 16- or 32-bit float `tensor` in the safetensors file `path` to NaN.
pub fn poison_weight(path: &Path, tensor: &str, row: usize, column: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let entry = read_tensor_entries(&bytes, path).unwrap().into_iter().find(|t| t.name == tensor).unwrap();
    let nan: &[u8] = match entry.dtype {
        Dtype::BF16 => &[0xC0, 0x7F],
        Dtype::F16 => &[0x00, 0x7E],
        Dtype::F32 => &[0x00, 0x00, 0xC0, 0x7F],
        other => panic!("{tensor} is {other}"),
    };
    let at = entry.range.start + (row * entry.shape[1] + column) * nan.len();
    bytes[at..at + nan.len()].copy_from_slice(nan);
    std::fs::write(path, bytes).unwrap();
}

/// Rewrites the JSON header of the safetensors file `path` with `edit` applied (the data is kept as it is).
pub fn edit_safetensors_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut new_header = serde_json::to_vec(&header).unwrap();
    new_header.resize(new_header.len().next_multiple_of(8), b' ');
    let mut out = (new_header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&new_header);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}
