//! `pio` on a decoder exported in stages (`pio-export --stages`): `pio run` gives the greedy
//! tokens of the unstaged export (and transformers'), `--devices` is refused on the CPU, and
//! `pio bench` reports the pipeline (each stage's busy time, overlapped and one after the other).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

#[path = "../../../tests/common/mod.rs"]
mod common;

const FIXTURE: &str = "glm4moe-a";

/// The fixture exported as one graph and in `stages` stages (0: one graph) into `root`.
fn export(root: &Path, stages: usize) -> PathBuf {
    let out = root.join(format!("stages-{stages}"));
    let split = match stages {
        0 => pio_export::stages::StageSplit::Single,
        n => pio_export::stages::StageSplit::Count(n),
    };
    let settings = common::cpu_settings(true).stages(split);
    common::export_to(&common::fixtures_dir().join(FIXTURE), &out, settings);
    out
}

fn pio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pio")).args(args).env("NO_COLOR", "1").output().expect("cannot start pio")
}

fn run_json(graphs: &Path, prompt: &str, extra: &[&str]) -> Value {
    let mut args = vec!["run", "--graphs", graphs.to_str().unwrap(), "--prompt-ids", prompt];
    args.extend(["--max-tokens", "12", "--greedy", "--ignore-eos", "--json"]);
    args.extend(extra);
    let out = pio(&args);
    assert!(out.status.success(), "pio run failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn run_on_stages_gives_the_unstaged_greedy_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let single = export(tmp.path(), 0);
    let reference = common::load_reference(&common::fixtures_dir().join(FIXTURE));
    let prompt = reference.greedy.prompt_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let want = run_json(&single, &prompt, &[]);
    let expected: Vec<Value> = reference.greedy.generated_ids[..12].iter().map(|&t| t.into()).collect();
    assert_eq!(want["generated_ids"], Value::Array(expected), "transformers' greedy tokens");
    for stages in [2, 3] {
        let graphs = export(tmp.path(), stages);
        for extra in [&[][..], &["--micro-batches", "1"][..]] {
            let got = run_json(&graphs, &prompt, extra);
            assert_eq!(got["generated_ids"], want["generated_ids"], "{stages} stages {extra:?}");
        }
    }
    let graphs = export(tmp.path(), 2);
    let out = pio(&[
        "run",
        "--graphs",
        graphs.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--max-tokens",
        "4",
        "--devices",
        "0,1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--devices") && stderr.contains("--ep cuda"), "{stderr}");
}

#[test]
fn bench_reports_each_stage_and_the_bubble() {
    let tmp = tempfile::tempdir().unwrap();
    let graphs = export(tmp.path(), 2);
    let report = tmp.path().join("bench.json");
    let args = [
        "bench",
        "--graphs",
        graphs.to_str().unwrap(),
        "--prompt-lens",
        "24",
        "--batches",
        "1,3",
        "--decode-prompt-len",
        "8",
        "--decode-tokens",
        "4",
        "--repeats",
        "1",
        "--micro-batches",
        "2",
        "--out",
        report.to_str().unwrap(),
    ];
    let out = pio(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 stages") && stdout.contains("bubble"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let pipeline = &v["runs"][0]["pipeline"];
    assert_eq!(pipeline["stages"], 2, "{pipeline}");
    assert_eq!(pipeline["micro_batches"], 2);
    let rows = pipeline["rows"].as_array().unwrap();
    // Decode at batch 1 and 3 and the 24-token prefill, sequential and per-device.
    assert_eq!(rows.len(), 6, "{pipeline}");
    for row in rows {
        let busy = row["stage_busy_ms"].as_array().unwrap();
        assert_eq!(busy.len(), 2);
        assert!(busy.iter().all(|b| b.as_f64().unwrap() > 0.0), "{row}");
        let bubble = row["bubble"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&bubble), "{row}");
    }
}
