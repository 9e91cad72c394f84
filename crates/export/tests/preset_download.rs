//! `pio-export --model PRESET` without the checkpoint at hand: downloaded from the hub (the
//! stand-in of pio-hub's tests) into the Hugging Face cache and exported; offline, an error
//! that says what is missing and what else to do.

#[path = "../../hub/tests/common/mod.rs"]
mod stand_in_hub;

use std::path::Path;
use std::process::{Command, Output};

use stand_in_hub::{HubFile, HubRepo, StandInHub};

const PRESET: &str = "qwen3-4b-instruct-2507";
const REPO: &str = "Qwen/Qwen3-4B-Instruct-2507";

fn export_preset(cwd: &Path, hf_home: &Path, endpoint: &str, offline: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pio-export"));
    cmd.args(["--model", PRESET, "--out", "out", "--context-length", "64"])
        .current_dir(cwd)
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN");
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    } else {
        cmd.env_remove("HF_HUB_OFFLINE");
    }
    cmd.output().unwrap()
}

#[test]
fn a_preset_is_downloaded_when_missing() {
    // The stand-in serves the small fixture checkpoint under the preset's repository id.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-tied-hub");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let repo = HubRepo::new(
        REPO,
        vec![
            HubFile::plain("config.json", read("config.json")),
            HubFile::plain("generation_config.json", read("generation_config.json")),
            HubFile::lfs("model.safetensors", read("model.safetensors")),
        ],
    );
    let server = StandInHub::start(vec![repo]);
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("hf");

    let out = export_preset(work.path(), &home, &server.url, false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(work.path().join("out/pio.json").is_file());
    let manifest = std::fs::read_to_string(work.path().join("out/pio.json")).unwrap();
    assert!(manifest.contains(REPO), "the manifest names the source");

    // The second export finds the cache and asks the hub nothing.
    server.clear_log();
    std::fs::remove_dir_all(work.path().join("out")).unwrap();
    let out = export_preset(work.path(), &home, &server.url, true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn offline_without_the_checkpoint_says_what_to_do() {
    let work = tempfile::tempdir().unwrap();
    let out = export_preset(work.path(), &work.path().join("hf"), "http://127.0.0.1:9", true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in ["HF_HUB_OFFLINE", REPO, "--checkpoint", "--synthetic"] {
        assert!(stderr.contains(needle), "`{needle}` missing: {stderr}");
    }
    assert!(!work.path().join("out").exists());
}
