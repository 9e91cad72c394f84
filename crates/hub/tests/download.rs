//! Downloads against a stand-in hub on 127.0.0.1 (tests/common): what is fetched and where it
//! lands in the cache, resumption, tokens, unknown repositories, offline use, hash checks and the
//! disk-space check.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{bytes, HubFile, HubRepo, StandInHub};
use pio_hub::{Hub, HubBuilder, HubError};

const REPO: &str = "org/model";
const SHARD_1: &str = "model-00001-of-00002.safetensors";
const SHARD_2: &str = "model-00002-of-00002.safetensors";
/// Files export reads, present in the repository below.
const EXPECTED: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    SHARD_1,
    SHARD_2,
];

fn sharded_repo(id: &str) -> HubRepo {
    let index = serde_json::json!({
        "metadata": {"total_size": 500_000},
        "weight_map": {"a.weight": SHARD_1, "b.weight": SHARD_2, "c.weight": SHARD_2}
    });
    HubRepo::new(
        id,
        vec![
            HubFile::plain("config.json", r#"{"architectures": ["Qwen3ForCausalLM"]}"#),
            HubFile::plain("generation_config.json", r#"{"eos_token_id": 2}"#),
            HubFile::plain("model.safetensors.index.json", index.to_string()),
            HubFile::plain("tokenizer.json", bytes(3000, 1)),
            HubFile::plain("tokenizer_config.json", "{}"),
            HubFile::plain("chat_template.jinja", "{{ messages }}"),
            HubFile::plain("preprocessor_config.json", "{}"),
            HubFile::plain("README.md", "# not needed"),
            HubFile::lfs("pytorch_model.bin", bytes(1000, 2)),
            HubFile::lfs("consolidated.safetensors", bytes(1000, 3)),
            HubFile::lfs(SHARD_1, bytes(300_000, 4)),
            HubFile::lfs(SHARD_2, bytes(200_000, 5)),
        ],
    )
}

fn hub(home: &Path, server: &StandInHub) -> Hub {
    HubBuilder::new(home).endpoint(&server.url).retry_wait(Duration::from_millis(10)).parallel(3).build().unwrap()
}

fn repo_dir(home: &Path, id: &str) -> PathBuf {
    home.join("hub").join(format!("models--{}", id.replace('/', "--")))
}

/// Every expected file is a link into blobs/<etag> with the served bytes.
fn assert_snapshot(home: &Path, repo: &HubRepo, dir: &Path) {
    assert_eq!(dir, repo_dir(home, &repo.id).join("snapshots").join(&repo.commit));
    for name in EXPECTED {
        let file = repo.file(name);
        let link = std::fs::read_link(dir.join(name)).unwrap_or_else(|e| panic!("{name} is not a link: {e}"));
        assert_eq!(link, Path::new("../../blobs").join(file.etag()), "{name}");
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), file.bytes, "{name}");
    }
    let mut present: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    present.sort();
    let mut expected: Vec<String> = EXPECTED.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(present, expected, "only the files export reads");
    let leftovers: Vec<_> = std::fs::read_dir(repo_dir(home, &repo.id).join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn full_download_lands_in_the_hf_cache_layout() {
    let server = StandInHub::start(vec![sharded_repo(REPO)]);
    let home = tempfile::tempdir().unwrap();
    let hub = hub(home.path(), &server);
    let snapshot = hub.download(REPO, "main").unwrap();
    let repo = sharded_repo(REPO);
    assert_eq!(snapshot.commit, repo.commit);
    assert_snapshot(home.path(), &repo, &snapshot.dir);
    let reference = std::fs::read_to_string(repo_dir(home.path(), REPO).join("refs/main")).unwrap();
    assert_eq!(reference, repo.commit);
    for unwanted in ["README.md", "pytorch_model.bin", "consolidated.safetensors"] {
        assert!(
            !server.requests().iter().any(|r| r.path.ends_with(unwanted)),
            "{unwanted} was requested: only what export reads is fetched"
        );
    }

    // Again: only the listing is asked for; the cache answers the rest.
    server.clear_log();
    assert_eq!(hub.download(REPO, "main").unwrap(), snapshot);
    assert!(server.file_requests().is_empty(), "{:?}", server.file_requests());
    // What pio-export does: a complete cached snapshot costs no request at all.
    server.clear_log();
    assert_eq!(hub.snapshot(REPO, "main").unwrap(), snapshot);
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    // A commit hash is a revision too.
    assert_eq!(hub.cached(REPO, &repo.commit).unwrap(), snapshot);
}

#[test]
fn single_file_checkpoint() {
    let repo = HubRepo::new(
        "org/small",
        vec![HubFile::plain("config.json", "{}"), HubFile::lfs("model.safetensors", bytes(5000, 9))],
    );
    let server = StandInHub::start(vec![repo]);
    let home = tempfile::tempdir().unwrap();
    let snapshot = hub(home.path(), &server).download("org/small", "main").unwrap();
    assert_eq!(std::fs::read(snapshot.dir.join("model.safetensors")).unwrap(), bytes(5000, 9));
}

/// Requests for the bytes of `file` (on storage), with their Range headers.
fn ranges(server: &StandInHub, repo: &HubRepo, file: &str) -> Vec<Option<String>> {
    let path = format!("/cdn/{}", repo.file(file).sha256());
    server.requests().into_iter().filter(|r| r.method == "GET" && r.path == path).map(|r| r.range).collect()
}

#[test]
fn a_cut_connection_resumes_in_the_same_run() {
    let server = StandInHub::start(vec![sharded_repo(REPO)]);
    server.cut_once(SHARD_1);
    let home = tempfile::tempdir().unwrap();
    let snapshot = hub(home.path(), &server).download(REPO, "main").unwrap();
    let repo = sharded_repo(REPO);
    assert_snapshot(home.path(), &repo, &snapshot.dir);
    // The second request continues where the first stopped (half of the file).
    assert_eq!(ranges(&server, &repo, SHARD_1), [None, Some("bytes=150000-".to_string())]);
}

#[test]
fn an_interrupted_download_resumes_on_the_next_run() {
    let server = StandInHub::start(vec![sharded_repo(REPO)]);
    server.cut_once(SHARD_1);
    let home = tempfile::tempdir().unwrap();
    let repo = sharded_repo(REPO);
    let no_retry = || HubBuilder::new(home.path()).endpoint(&server.url).retries(0).parallel(1).build().unwrap();

    let err = no_retry().download(REPO, "main").unwrap_err();
    assert!(matches!(err, HubError::Interrupted { .. }), "{err}");
    assert!(err.to_string().contains(SHARD_1) && err.to_string().contains("run again"), "{err}");
    let partial = repo_dir(home.path(), REPO).join("blobs").join(format!("{}.incomplete", repo.file(SHARD_1).sha256()));
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 150_000, "the first half is kept");
    assert!(!repo_dir(home.path(), REPO).join("snapshots").join(&repo.commit).join(SHARD_1).exists());
    assert!(!repo_dir(home.path(), REPO).join("refs/main").exists(), "no ref to an incomplete snapshot");

    let snapshot = no_retry().download(REPO, "main").unwrap();
    assert_snapshot(home.path(), &repo, &snapshot.dir);
    assert_eq!(ranges(&server, &repo, SHARD_1), [None, Some("bytes=150000-".to_string())]);
}

#[test]
fn a_gated_repository_needs_a_token() {
    let mut gated = sharded_repo("org/gated");
    gated.token = Some("hf_good".into());
    let server = StandInHub::start(vec![gated]);
    let home = tempfile::tempdir().unwrap();

    let err = hub(home.path(), &server).download("org/gated", "main").unwrap_err();
    assert!(matches!(err, HubError::Gated { has_token: false, .. }), "{err}");
    assert!(err.to_string().contains("org/gated") && err.to_string().contains("HF_TOKEN"), "{err}");
    let wrong = HubBuilder::new(home.path()).endpoint(&server.url).token(Some("hf_bad".into())).build().unwrap();
    let err = wrong.download("org/gated", "main").unwrap_err();
    assert!(err.to_string().contains("has no access"), "{err}");

    let with_token = HubBuilder::new(home.path()).endpoint(&server.url).token(Some("hf_good".into())).build().unwrap();
    with_token.download("org/gated", "main").unwrap();
    // The token file under HF_HOME (what `huggingface-cli login` writes) is read too.
    let other_home = tempfile::tempdir().unwrap();
    std::fs::write(other_home.path().join("token"), "hf_good\n").unwrap();
    hub(other_home.path(), &server).download("org/gated", "main").unwrap();
}

#[test]
fn unknown_repositories_and_revisions_are_named() {
    let server = StandInHub::start(vec![sharded_repo(REPO)]);
    let home = tempfile::tempdir().unwrap();
    let hub = hub(home.path(), &server);
    let err = hub.download("org/nothing", "main").unwrap_err();
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err}");
    assert!(err.to_string().contains("org/nothing") && err.to_string().contains("HF_TOKEN"), "{err}");
    let err = hub.download(REPO, "v9").unwrap_err();
    assert!(matches!(err, HubError::RevisionNotFound { .. }) && err.to_string().contains("v9"), "{err}");
    let err = hub.download("../etc", "main").unwrap_err();
    assert!(matches!(err, HubError::InvalidRepoId(_)), "{err}");
    assert!(!home.path().join("hub").exists() || std::fs::read_dir(home.path().join("hub")).unwrap().count() == 0);
}

#[test]
fn offline_uses_a_complete_cache_and_names_what_is_missing() {
    let server = StandInHub::start(vec![sharded_repo(REPO)]);
    let home = tempfile::tempdir().unwrap();
    let online = hub(home.path(), &server).download(REPO, "main").unwrap();
    // No server behind this endpoint: any request would fail.
    let offline = HubBuilder::new(home.path()).endpoint("http://127.0.0.1:9").offline(true).build().unwrap();
    assert_eq!(offline.download(REPO, "main").unwrap(), online);
    assert_eq!(offline.snapshot(REPO, "main").unwrap(), online);

    let err = offline.download("org/other", "main").unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE") && err.to_string().contains("org/other"), "{err}");

    std::fs::remove_file(online.dir.join(SHARD_2)).unwrap();
    let err = offline.snapshot(REPO, "main").unwrap_err();
    assert!(matches!(err, HubError::Incomplete { .. }), "{err}");
    assert!(err.to_string().contains(SHARD_2) && !err.to_string().contains(SHARD_1), "{err}");
}

#[test]
fn an_unreachable_hub_falls_back_to_a_complete_cache() {
    let server = StandInHub::start(vec![sharded_repo(REPO)]);
    let home = tempfile::tempdir().unwrap();
    let online = hub(home.path(), &server).download(REPO, "main").unwrap();
    let unreachable = HubBuilder::new(home.path()).endpoint("http://127.0.0.1:9").build().unwrap();
    assert_eq!(unreachable.download(REPO, "main").unwrap(), online);
    let err = unreachable.download("org/other", "main").unwrap_err();
    assert!(matches!(err, HubError::Connection { .. }), "{err}");
    assert!(err.to_string().contains("cannot reach http://127.0.0.1:9"), "{err}");
}

#[test]
fn a_corrupted_file_is_discarded_and_named() {
    let server = StandInHub::start(vec![sharded_repo(REPO)]);
    server.corrupt(SHARD_2, true);
    let home = tempfile::tempdir().unwrap();
    let repo = sharded_repo(REPO);
    let err = hub(home.path(), &server).download(REPO, "main").unwrap_err();
    assert!(matches!(err, HubError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains(SHARD_2) && err.to_string().contains("sha256"), "{err}");
    let blobs = repo_dir(home.path(), REPO).join("blobs");
    let sha = repo.file(SHARD_2).sha256();
    assert!(!blobs.join(&sha).exists(), "no blob for the bad bytes");
    assert!(!blobs.join(format!("{sha}.incomplete")).exists(), "the bad bytes are not kept to resume from");
    let snapshot_dir = repo_dir(home.path(), REPO).join("snapshots").join(&repo.commit);
    assert!(snapshot_dir.join(SHARD_2).symlink_metadata().is_err(), "no link to the bad file");
    assert!(hub(home.path(), &server).cached(REPO, "main").is_err());

    server.corrupt(SHARD_2, false);
    let snapshot = hub(home.path(), &server).download(REPO, "main").unwrap();
    assert_snapshot(home.path(), &repo, &snapshot.dir);
}

#[test]
fn disk_space_is_checked_before_the_first_byte() {
    let mut repo = sharded_repo("org/huge");
    // The listing says 700 GB, as GLM-4.7's in bf16; the temporary folder has far less.
    repo.files.iter_mut().find(|f| f.name == SHARD_1).unwrap().listed_size = Some(700_000_000_000_000);
    let server = StandInHub::start(vec![repo]);
    let home = tempfile::tempdir().unwrap();
    let err = hub(home.path(), &server).download("org/huge", "main").unwrap_err();
    assert!(matches!(err, HubError::DiskSpace { .. }), "{err}");
    assert!(err.to_string().contains("not enough disk space for org/huge"), "{err}");
    assert!(err.to_string().contains("700000.00 GB"), "{err}");
    let fetched: Vec<_> = server.file_requests().into_iter().filter(|r| !r.path.ends_with(".index.json")).collect();
    assert!(fetched.is_empty(), "nothing but the index before the check: {fetched:?}");
    assert!(!repo_dir(home.path(), "org/huge").join("blobs").exists(), "nothing written");
}
