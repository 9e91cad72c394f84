//! `pio bench --model PRESET --synthetic` exports graphs before it measures them: a SIGTERM or
//! Ctrl-C during that export removes its hidden scratch folder, as pio-export's own does.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pio_export::synthetic::ShapeOverrides;
use rustix::process::{kill_process, Pid, Signal};

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn sigterm_while_bench_exports_leaves_no_scratch_folder() {
    let root = tempfile::tempdir().unwrap();
    // A checkpoint already there is reused: large enough (5 MB of bf16) that its export takes a moment.
    let ck = root.path().join("ck");
    let preset = pio_models::find_preset("qwen3-4b-instruct-2507").unwrap();
    let shape = ShapeOverrides {
        layers: Some(2),
        hidden_size: Some(256),
        intermediate_size: Some(512),
        heads: Some(4),
        kv_heads: Some(2),
        vocab_size: Some(8000),
        ..Default::default()
    };
    pio_export::synthetic::write_checkpoint(preset, &shape, 0, None, &ck).unwrap();
    let graphs = root.path().join("graphs");
    std::fs::create_dir(&graphs).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_pio"))
        .args(["bench", "--model", "qwen3-4b-instruct-2507", "--synthetic", "--layers", "2", "--checkpoint-out"])
        .arg(&ck)
        .arg("--graphs-dir")
        .arg(&graphs)
        .args(["--out", root.path().join("bench.json").to_str().unwrap()])
        .current_dir(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !names_in(&graphs).iter().any(|n| n.starts_with(".pio-export-")) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pio bench ended ({status}) before its export's scratch folder showed up");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no scratch folder in {}", graphs.display());
        std::thread::sleep(Duration::from_millis(2));
    }
    kill_process(Pid::from_child(&child), Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(Signal::TERM.as_raw()), "dies of the signal: {status}");
    assert!(names_in(&graphs).is_empty(), "left behind: {:?}", names_in(&graphs));
}
