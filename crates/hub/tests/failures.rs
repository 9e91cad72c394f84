//! Downloads that meet a failing or malformed hub (tests/common's stand-in): transient answers,
//! a storage host's refusal, sizes past u64, two downloads of one repository at once, and the
//! cache folder variable.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{bytes, HubFile, HubRepo, StandInHub};
use pio_hub::{Hub, HubBuilder, HubError};

const SHARD: &str = "model.safetensors";

fn repo(id: &str) -> HubRepo {
    HubRepo::new(id, vec![HubFile::plain("config.json", "{}"), HubFile::lfs(SHARD, bytes(300_000, 4))])
}

fn hub(home: &Path, server: &StandInHub) -> Hub {
    HubBuilder::new(home).endpoint(&server.url).retry_wait(Duration::from_millis(10)).build().unwrap()
}

/// A 429 or 5xx from storage is retried like a dropped connection.
#[test]
fn transient_5xx_and_429_from_storage_are_retried() {
    let mut failed = Vec::new();
    for status in [503u16, 429, 502, 500] {
        let server = StandInHub::start(vec![repo("org/m")]);
        server.fail_once(SHARD, status);
        let home = tempfile::tempdir().unwrap();
        if let Err(e) = hub(home.path(), &server).download("org/m", "main") {
            failed.push(e.to_string());
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// A 403 from the storage host (which never gets the token) does not blame the token.
#[test]
fn a_storage_403_does_not_blame_the_token() {
    let server = StandInHub::start(vec![repo("org/m")]);
    server.fail_once(SHARD, 403);
    let home = tempfile::tempdir().unwrap();
    // The stand-in redirects LFS files to 127.0.0.1: with the hub at `localhost`, that is another host.
    let endpoint = server.url.replace("127.0.0.1", "localhost");
    let hub = HubBuilder::new(home.path()).endpoint(endpoint).token(Some("hf_x".into())).build().unwrap();
    let err = hub.download("org/m", "main").unwrap_err().to_string();
    let cdn_auth = server.requests().iter().any(|r| r.path.starts_with("/cdn/") && r.authorization.is_some());
    assert!(!cdn_auth, "token went to storage");
    assert!(!err.contains("the token sent"), "{err}");
}

/// Sizes in a listing are the server's: their sum saturates (no panic in debug builds, no
/// wrap-around that passes the disk check in release ones).
#[test]
fn huge_listed_sizes_do_not_overflow_the_disk_check() {
    let mut r = HubRepo::new(
        "org/huge",
        vec![
            HubFile::plain("config.json", "{}"),
            HubFile::plain(
                "model.safetensors.index.json",
                r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}"#,
            ),
            HubFile::lfs("model-1.safetensors", bytes(10, 1)),
            HubFile::lfs("model-2.safetensors", bytes(10, 2)),
        ],
    );
    r.files[2].listed_size = Some((1 << 63) + 1);
    r.files[3].listed_size = Some((1 << 63) + 1);
    let server = StandInHub::start(vec![r]);
    let home = tempfile::tempdir().unwrap();
    let hub = hub(home.path(), &server);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hub.download("org/huge", "main")));
    let err = result.expect("download panicked on a malformed listing").unwrap_err();
    assert!(matches!(err, HubError::DiskSpace { .. }), "{err}");
}

/// HF_HUB_CACHE (huggingface_hub's cache folder variable) is the cache.
#[test]
fn hf_hub_cache_is_honoured() {
    let vars = |name: &str| match name {
        "HOME" => Some("/home/u".into()),
        "HF_HUB_CACHE" => Some("/data/hub".into()),
        _ => None,
    };
    let hub = HubBuilder::from_vars(vars).unwrap().build().unwrap();
    assert_eq!(hub.cache_dir(), Path::new("/data/hub"));
}

/// Two downloads of the same repository at once (two `pio download`s, or pio-export and pio
/// download) both succeed: linking a file the other just linked is not an error.
#[test]
fn concurrent_downloads_of_one_repo_both_succeed() {
    let files: Vec<HubFile> = std::iter::once(HubFile::plain("config.json", "{}"))
        .chain(std::iter::once(HubFile::plain(
            "model.safetensors.index.json",
            serde_json::json!({"weight_map": (0..40).map(|i| (format!("t{i}"), serde_json::Value::from(format!("m-{i}.safetensors")))).collect::<serde_json::Map<_, _>>()}).to_string(),
        )))
        .chain((0..40).map(|i| HubFile::lfs(&format!("m-{i}.safetensors"), bytes(100, i as u8))))
        .collect();
    let server = StandInHub::start(vec![HubRepo::new("org/c", files)]);
    let mut failures = Vec::new();
    for _ in 0..20 {
        let home = tempfile::tempdir().unwrap();
        let results: Vec<_> = std::thread::scope(|s| {
            let a = s.spawn(|| hub(home.path(), &server).download("org/c", "main"));
            let b = s.spawn(|| hub(home.path(), &server).download("org/c", "main"));
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        failures.extend(
            results.into_iter().filter_map(|r| r.err()).map(|e| format!("{e:#} / {:?}", std::error::Error::source(&e))),
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
