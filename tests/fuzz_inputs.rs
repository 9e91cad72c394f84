//! Bounded fuzzing for CI: the entry points of the cargo-fuzz targets (fuzz/src/lib.rs) over
//! seeded random mutations of the seeds in fuzz/seeds/ (byte-level, and JSON-aware for JSON
//! inputs and safetensors headers), a fixed number of cases each, plus every crash input kept
//! in fuzz/regressions/<target>/. Deterministic (fixed seeds), a few seconds in all; libFuzzer
//! runs the same entry points open-ended (README, "Fuzzing").

#[path = "../fuzz/src/lib.rs"]
mod entry;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const CASES: usize = 1500;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/<kind>/<target>/` (none if the folder does not exist).
fn files(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| (e.path(), std::fs::read(e.path()).unwrap())).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Runs `f` on each input; a panic fails the test after saving the input for a regression.
fn run(target: &str, inputs: impl IntoIterator<Item = Vec<u8>>, f: impl Fn(&[u8])) {
    let mut count = 0;
    for (path, data) in files("regressions", target) {
        if catch_unwind(AssertUnwindSafe(|| f(&data))).is_err() {
            panic!("{target}: the regression input {} panics again", path.display());
        }
    }
    for data in inputs {
        if catch_unwind(AssertUnwindSafe(|| f(&data))).is_err() {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let saved = dir.join(format!("{target}-{count}"));
            std::fs::write(&saved, &data).unwrap();
            panic!(
                "{target}: input {count} panics; saved to {} (copy it to fuzz/regressions/{target}/ with the fix)",
                saved.display()
            );
        }
        count += 1;
    }
}

const INTERESTING_BYTES: &[u8] = b"\x00\xff\x7f\x80\"{}[]:,-09eE. \\";

/// One to four byte-level edits of `data` (bit flips, interesting bytes, inserts, deletes,
/// repeats, truncation, splices with `other`, little-endian integers).
fn mutate_bytes(rng: &mut ChaCha8Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = rng.random_range(0..=d.len());
        let last = at.min(d.len().saturating_sub(1));
        match rng.random_range(0..8) {
            0 if !d.is_empty() => d[last] ^= 1 << rng.random_range(0..8),
            1 if !d.is_empty() => d[last] = *INTERESTING_BYTES.choose(rng).unwrap(),
            2 => {
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                d.splice(at..at, bytes);
            }
            3 => {
                let end = (at + rng.random_range(1..32)).min(d.len());
                d.drain(at..end);
            }
            4 => {
                let end = (at + rng.random_range(1..64)).min(d.len());
                let copy = d[at..end].to_vec();
                d.splice(at..at, copy);
            }
            5 => d.truncate(at),
            6 if !other.is_empty() => {
                let from = rng.random_range(0..other.len());
                let end = (from + rng.random_range(1..64)).min(other.len());
                d.splice(at..at, other[from..end].iter().copied());
            }
            _ => {
                let value: u64 =
                    *[0, 1, 7, 8, u32::MAX as u64, u64::MAX, 1 << 40, i64::MAX as u64].choose(rng).unwrap();
                let end = (at + 8).min(d.len());
                d.splice(at..end, value.to_le_bytes());
            }
        }
    }
    d
}

fn interesting_json(rng: &mut ChaCha8Rng) -> Value {
    let choices = [
        json!(0),
        json!(-1),
        json!(1),
        json!(3),
        json!(1u64 << 40),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e300),
        json!(-1e-300),
        json!(0.5),
        json!(""),
        json!("silu"),
        json!("../x.safetensors"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!([0, 1, 2]),
        json!(["sliding_attention", "full_attention"]),
        json!({"rope_type": "linear", "factor": 0.0}),
        json!({"type": "yarn", "factor": 4.0}),
    ];
    choices.choose(rng).unwrap().clone()
}

/// Every value position in `v` (as a path of keys and indices).
fn positions(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(path.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                path.push(json!(k));
                positions(child, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                path.push(json!(i));
                positions(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at_path<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, key| match key {
        Value::String(k) => &mut v[k.as_str()],
        Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

/// One to three JSON-level edits: a value replaced by an interesting one, a key removed, a
/// key added, a value copied over another.
fn mutate_json(rng: &mut ChaCha8Rng, value: &Value) -> Value {
    let mut v = value.clone();
    for _ in 0..rng.random_range(1..=3) {
        let mut all = Vec::new();
        positions(&v, &mut Vec::new(), &mut all);
        let path = all.choose(rng).unwrap().clone();
        match rng.random_range(0..4) {
            0 | 1 => *at_path(&mut v, &path) = interesting_json(rng),
            2 => {
                if let Some((last, parent)) = path.split_last() {
                    match (at_path(&mut v, parent), last) {
                        (Value::Object(m), Value::String(k)) => {
                            m.remove(k);
                        }
                        (Value::Array(a), Value::Number(i)) => {
                            a.remove(i.as_u64().unwrap() as usize);
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                let donor = all.choose(rng).unwrap().clone();
                let copy = at_path(&mut v, &donor).clone();
                if let Value::Object(m) = at_path(&mut v, &path) {
                    m.insert(format!("k{}", rng.random_range(0..4)), copy);
                } else {
                    *at_path(&mut v, &path) = copy;
                }
            }
        }
    }
    v
}

/// `CASES` inputs: half byte-level, half JSON-level mutations of the seeds (which must parse
/// as JSON when `json` is set).
fn mutated_inputs(target: &str, json_seeds: bool) -> Vec<Vec<u8>> {
    let seeds: Vec<Vec<u8>> = files("seeds", target).into_iter().map(|(_, d)| d).collect();
    assert!(!seeds.is_empty(), "no seeds in fuzz/seeds/{target}");
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    (0..CASES)
        .map(|i| {
            let seed = seeds.choose(&mut rng).unwrap();
            if json_seeds && i % 2 == 0 {
                let value: Value = serde_json::from_slice(seed).unwrap();
                serde_json::to_vec(&mutate_json(&mut rng, &value)).unwrap()
            } else {
                let other = seeds.choose(&mut rng).unwrap();
                mutate_bytes(&mut rng, seed, other)
            }
        })
        .collect()
}

/// Safetensors files whose JSON header was edited (the length prefix kept right, or not).
fn mutated_safetensors_headers() -> Vec<Vec<u8>> {
    let seeds: Vec<Vec<u8>> = files("seeds", "safetensors_file").into_iter().map(|(_, d)| d).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5afe);
    (0..CASES)
        .map(|_| {
            let seed = seeds.choose(&mut rng).unwrap();
            let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
            let header: Value = serde_json::from_slice(&seed[8..8 + n]).unwrap();
            let new_header = serde_json::to_vec(&mutate_json(&mut rng, &header)).unwrap();
            let mut out = (new_header.len() as u64).to_le_bytes().to_vec();
            if rng.random_range(0..8) == 0 {
                out = rng.random::<u64>().to_le_bytes().to_vec();
            }
            out.extend_from_slice(&new_header);
            out.extend_from_slice(&seed[8 + n..]);
            out
        })
        .collect()
}

#[test]
fn safetensors_files() {
    let inputs = mutated_inputs("safetensors_file", false).into_iter().chain(mutated_safetensors_headers());
    run("safetensors_file", inputs, entry::safetensors_file);
}

#[test]
fn safetensors_indexes() {
    run("safetensors_index", mutated_inputs("safetensors_index", true), entry::safetensors_index);
}

#[test]
fn model_configs() {
    run("model_config", mutated_inputs("model_config", true), entry::model_config);
}

#[test]
fn chat_templates_with_adversarial_messages() {
    let templates = entry::Templates::load(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
    assert!(templates.count() > 10, "the Qwen3, GLM and quirk templates");
    let mut rng = ChaCha8Rng::seed_from_u64(0xc4a7);
    let inputs = (0..CASES).map(|_| {
        let len = rng.random_range(0..2048);
        (0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()
    });
    let seeds = files("seeds", "chat_template").into_iter().map(|(_, d)| d);
    run("chat_template", seeds.chain(inputs), |data| entry::chat_template(&templates, data));
}

#[test]
fn image_decoding() {
    run("image_decode", mutated_inputs("image_decode", false), entry::image_decode);
}
