//! `pio download` against the stand-in hub of pio-hub's tests: a preset name or a repository
//! id, the snapshot folder as the last stdout line, and errors that name the repository.

#[path = "../../hub/tests/common/mod.rs"]
mod stand_in_hub;

use std::path::Path;
use std::process::{Command, Output};

use stand_in_hub::{HubFile, HubRepo, StandInHub};

fn fixture_repo(id: &str) -> HubRepo {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-tied-hub");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    HubRepo::new(
        id,
        vec![
            HubFile::plain("config.json", read("config.json")),
            HubFile::plain("generation_config.json", read("generation_config.json")),
            HubFile::lfs("model.safetensors", read("model.safetensors")),
        ],
    )
}

fn pio_download(args: &[&str], hf_home: &Path, endpoint: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pio"))
        .arg("download")
        .args(args)
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap()
}

#[test]
fn download_prints_the_snapshot_folder_last() {
    let preset = fixture_repo("Qwen/Qwen3-4B-Instruct-2507");
    let commit = preset.commit.clone();
    let server = StandInHub::start(vec![preset, fixture_repo("org/other")]);
    let home = tempfile::tempdir().unwrap();

    let out = pio_download(&["qwen3-4b-instruct-2507"], home.path(), &server.url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let folder = Path::new(stdout.lines().last().unwrap());
    assert_eq!(folder, home.path().join("hub/models--Qwen--Qwen3-4B-Instruct-2507/snapshots").join(&commit));
    assert!(folder.join("model.safetensors").is_file() && folder.join("config.json").is_file());
    assert!(stderr.contains("pio-export --model qwen3-4b-instruct-2507"), "{stderr}");

    let out = pio_download(&["org/other", "--revision", "main"], home.path(), &server.url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8(out.stdout).unwrap().trim_end().ends_with(&fixture_repo("org/other").commit));
}

#[test]
fn download_errors_name_what_is_wrong() {
    let server = StandInHub::start(vec![]);
    let home = tempfile::tempdir().unwrap();
    // Exit code 2 for what the command got wrong, 1 for what the hub answered.
    for (args, needle, code) in [
        (&["org/missing"][..], "repository org/missing was not found", 1),
        (&["llama"][..], "unknown preset `llama`", 2),
        (&["org/x y"][..], "is not a Hugging Face repository id", 2),
    ] {
        let out = pio_download(args, home.path(), &server.url);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
    let out = pio_download(&["org/model"], home.path(), "huggingface.co");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_preset_at_another_revision_is_exported_from_its_folder() {
    // `pio-export --model` reads the preset's main branch: the suggestion names the folder.
    let preset = fixture_repo("Qwen/Qwen3-4B-Instruct-2507");
    let commit = preset.commit.clone();
    let server = StandInHub::start(vec![preset]);
    let home = tempfile::tempdir().unwrap();
    let out = pio_download(&["qwen3-4b-instruct-2507", "--revision", &commit], home.path(), &server.url);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("pio-export --checkpoint") && !stderr.contains("pio-export --model"), "{stderr}");
}
