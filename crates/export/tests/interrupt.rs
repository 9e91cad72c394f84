//! A real `pio-export` process interrupted mid-run: SIGTERM and SIGINT remove its hidden scratch
//! folder; what a SIGKILL leaves is removed by the next run. A synthetic checkpoint replaces
//! only an earlier one (`--force` and exports: bad_input.rs).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

fn pio_export(args: &[&str], cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pio-export"));
    cmd.args(args).current_dir(cwd).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits until `child` has a scratch folder (`prefix`*) in `dir`, then sends `signal`.
fn interrupt_when_writing(mut child: Child, dir: &Path, prefix: &str, signal: Signal) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if names_in(dir).iter().any(|n| n.starts_with(prefix)) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pio-export ended ({status}) before a {prefix}* folder showed up in {}", dir.display());
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no {prefix}* folder in {}", dir.display());
        std::thread::sleep(Duration::from_millis(2));
    }
    kill_process(Pid::from_child(&child), signal).unwrap();
    child.wait().unwrap()
}

const SHAPE: &[&str] = &[
    "--layers",
    "2",
    "--hidden-size",
    "256",
    "--intermediate-size",
    "512",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--vocab-size",
    "8000",
];

/// A synthetic checkpoint large enough that writing and exporting it take a moment (5 MB of bf16).
fn checkpoint(root: &Path) -> PathBuf {
    let ck = root.join("ck");
    let mut args = vec!["--model", "qwen3-4b-instruct-2507", "--synthetic", "--checkpoint-only", "--checkpoint-out"];
    args.push(ck.to_str().unwrap());
    args.extend_from_slice(SHAPE);
    let out = pio_export(&args, root).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ck
}

fn export_args<'a>(ck: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec!["--checkpoint", ck.to_str().unwrap(), "--out", out.to_str().unwrap(), "--context-length", "64"]
}

#[test]
fn sigterm_mid_export_leaves_nothing_and_a_killed_exports_folder_goes_next_run() {
    let root = tempfile::tempdir().unwrap();
    let ck = checkpoint(root.path());
    let graphs = root.path().join("graphs");
    std::fs::create_dir(&graphs).unwrap();
    let out = graphs.join("model");

    let child = pio_export(&export_args(&ck, &out), root.path()).spawn().unwrap();
    let status = interrupt_when_writing(child, &graphs, ".pio-export-", Signal::TERM);
    assert_eq!(status.signal(), Some(Signal::TERM.as_raw()), "dies of the signal: {status}");
    assert!(names_in(&graphs).is_empty(), "left behind: {:?}", names_in(&graphs));

    // SIGKILL cannot be handled: the folder stays until the next run beside it.
    let child = pio_export(&export_args(&ck, &out), root.path()).spawn().unwrap();
    let status = interrupt_when_writing(child, &graphs, ".pio-export-", Signal::KILL);
    assert_eq!(status.signal(), Some(Signal::KILL.as_raw()));
    let stale = names_in(&graphs);
    assert!(stale.len() == 1 && stale[0].starts_with(".pio-export-"), "{stale:?}");
    // A scratch folder of a running process (this test's) is not touched.
    let running = format!(".pio-export-{}-test", std::process::id());
    std::fs::create_dir(graphs.join(&running)).unwrap();

    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-tied-hub");
    let next = pio_export(&export_args(&tiny, &graphs.join("tiny")), root.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&next.stderr);
    assert!(next.status.success(), "{stderr}");
    assert!(stderr.contains("left by an interrupted pio-export"), "{stderr}");
    assert_eq!(names_in(&graphs), [running, "tiny".to_string()]);
}

#[test]
fn ctrl_c_while_writing_a_synthetic_checkpoint_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let mut args = vec!["--model", "qwen3-4b-instruct-2507", "--synthetic", "--checkpoint-only"];
    args.extend_from_slice(&["--checkpoint-out", "checkpoints/ck"]);
    args.extend_from_slice(SHAPE);
    let child = pio_export(&args, root.path()).spawn().unwrap();
    let checkpoints = root.path().join("checkpoints");
    let status = interrupt_when_writing(child, &checkpoints, ".pio-synthetic-", Signal::INT);
    assert_eq!(status.signal(), Some(Signal::INT.as_raw()), "{status}");
    assert!(names_in(&checkpoints).is_empty(), "left behind: {:?}", names_in(&checkpoints));
}

#[test]
fn a_synthetic_checkpoint_replaces_only_a_synthetic_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let ck = checkpoint(root.path());
    assert!(ck.join("pio-synthetic.json").is_file());
    checkpoint(root.path()); // written again over the earlier one

    std::fs::remove_file(ck.join("pio-synthetic.json")).unwrap();
    let mut args = vec!["--model", "qwen3-4b-instruct-2507", "--synthetic", "--checkpoint-only", "--checkpoint-out"];
    args.push(ck.to_str().unwrap());
    let out = pio_export(&args, root.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is not a synthetic checkpoint"), "{stderr}");
    assert!(ck.join("model.safetensors").is_file(), "the folder survives");
}
