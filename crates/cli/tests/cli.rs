//! The `pio` binary end to end: `pio run --json` against transformers' greedy reference, `pio
//! models`, argument and input errors, and `pio chat` over piped stdin with the real Qwen3
//! tokenizer. Graphs are exported into temporary folders with pio-export's library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

// The workspace tests' export helpers (fp32 CPU settings kept in step with ExportSettings).
#[path = "../../../tests/common/mod.rs"]
mod common;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

fn export_into(checkpoint: &Path, out: &Path) {
    common::export_to(checkpoint, out, common::cpu_settings(true));
}

/// The fixture qwen3-tied-hub exported once per test process.
fn fixture_graphs() -> &'static Path {
    static GRAPHS: OnceLock<PathBuf> = OnceLock::new();
    GRAPHS.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-qwen3-tied-hub");
        export_into(&fixture("qwen3-tied-hub"), &out);
        out
    })
}

/// A synthetic Qwen3 checkpoint at the real vocabulary with the real tokenizer, exported once per
/// test process.
fn real_tokenizer_graphs() -> &'static Path {
    static GRAPHS: OnceLock<PathBuf> = OnceLock::new();
    GRAPHS.get_or_init(|| {
        common::export_real_tokenizer_qwen3(
            &Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-qwen3-real-tokenizer"),
            99,
        )
    })
}

fn pio(args: &[&str]) -> Output {
    pio_with_stdin(args, None)
}

fn pio_with_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    pio_with_stdin_bytes(args, stdin.map(str::as_bytes))
}

/// [`pio_with_stdin`] with any bytes on stdin (not only UTF-8).
fn pio_with_stdin_bytes(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pio"))
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start pio");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn reference_greedy(name: &str) -> (Vec<u32>, Vec<u32>) {
    let path = fixture(name).join("reference.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<u32>>();
    (ids(&v["greedy"]["prompt_ids"]), ids(&v["greedy"]["generated_ids"]))
}

fn join_ids(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn run_json_prints_one_object_matching_transformers_greedy() {
    let graphs = fixture_graphs().to_str().unwrap();
    let (prompt, expected) = reference_greedy("qwen3-tied-hub");
    let prompt_arg = join_ids(&prompt);
    let out = pio(&["run", "--graphs", graphs, "--prompt-ids", &prompt_arg, "--max-tokens", "5", "--greedy", "--json"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "pio run failed: {stderr}");
    // The whole of stdout is one JSON object (logs go to stderr).
    let v: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    let obj = v.as_object().expect("a JSON object");
    for key in ["prompt_ids", "generated_ids", "text", "finish_reason", "timings"] {
        assert!(obj.contains_key(key), "missing key {key}: {stdout}");
    }
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<u32>>();
    assert_eq!(ids(&v["prompt_ids"]), prompt);
    assert_eq!(ids(&v["generated_ids"]), expected[..5].to_vec(), "not transformers' greedy prefix");
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["text"], "", "no tokenizer in the fixture, so no text");
    let t = &v["timings"];
    assert!(t["time_to_first_token_ms"].as_f64().unwrap() > 0.0, "{t}");
    assert!(t["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{t}");
    assert_eq!(t["prompt_tokens"].as_u64().unwrap() as usize, prompt.len());
    assert_eq!(t["generated_tokens"].as_u64().unwrap(), 5);
    // The mark that a model load began, which the pre-load checks' tests look for.
    assert!(stderr.contains(LOAD_STARTED) && stderr.contains("engine ready"), "{stderr}");

    // Without --json and without a tokenizer: the ids, comma-separated.
    let out = pio(&["run", "--graphs", graphs, "--prompt-ids", &prompt_arg, "--max-tokens", "7", "--greedy"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), join_ids(&expected[..7]));
    // --logit-bias ID=-100 keeps greedy's first token out; an id past the vocabulary is refused by name.
    let biased = |bias: &str| {
        let args = ["run", "--graphs", graphs, "--prompt-ids", &prompt_arg, "--max-tokens", "3", "--greedy"];
        pio(&[&args[..], &["--logit-bias", bias]].concat())
    };
    let out = biased(&format!("{}=-100", expected[0]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let banned = text(&out.stdout).trim().to_string();
    assert!(!banned.split(',').any(|id| id == expected[0].to_string()), "{banned}");
    let out = biased("99999999=1");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("logit_bias"), "{}", text(&out.stderr));
}

/// `pio run --batch`: the lines run together on the engine and come out in order, each as
/// `pio run --json` would print it alone; a bad line is refused by number.
#[test]
fn run_batch_prints_one_line_per_prompt_in_order() {
    let graphs = fixture_graphs().to_str().unwrap();
    let (prompt, expected) = reference_greedy("qwen3-tied-hub");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompts.jsonl");
    let lines = [
        serde_json::json!({"prompt_ids": [5, 6, 7], "max_tokens": 3}),
        serde_json::json!({"prompt_ids": prompt, "max_tokens": 6}),
        serde_json::json!({"prompt_ids": [9, 8], "max_tokens": 4, "seed": 3}),
    ];
    let contents: String = lines.iter().map(|l| format!("{l}\n\n")).collect();
    std::fs::write(&file, contents).unwrap();
    let batch =
        ["run", "--graphs", graphs, "--batch", file.to_str().unwrap(), "--greedy", "--ignore-eos", "--logprobs", "2"];
    let out = pio(&batch);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let outputs: Vec<Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(outputs.len(), 3);
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<u32>>();
    assert_eq!(ids(&outputs[1]["generated_ids"]), expected[..6].to_vec());
    assert_eq!(ids(&outputs[0]["prompt_ids"]), [5, 6, 7]);
    for (o, n) in outputs.iter().zip([3, 6, 4]) {
        assert_eq!(o["generated_ids"].as_array().unwrap().len(), n);
        assert_eq!(o["logprobs"].as_array().unwrap().len(), n, "--logprobs reports each token's");
    }
    // Each line alone gives what the batch gave.
    let alone = pio(&[
        "run",
        "--graphs",
        graphs,
        "--prompt-ids",
        "9,8",
        "--max-tokens",
        "4",
        "--greedy",
        "--ignore-eos",
        "--json",
    ]);
    let alone: Value = serde_json::from_slice(&alone.stdout).unwrap();
    assert_eq!(alone["generated_ids"], outputs[2]["generated_ids"]);

    // --system and --thinking join only lines that go through the chat template: with token ids
    // alone they would do nothing, and are refused before the model loads.
    for flag in [["--system", "be brief"], ["--thinking", "false"]] {
        let out = pio(&[&["run", "--graphs", graphs, "--batch", file.to_str().unwrap()][..], &flag[..]].concat());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag:?}: {stderr}");
        assert!(stderr.contains(flag[0]) && stderr.contains("chat template"), "{stderr}");
        assert!(!stderr.contains(LOAD_STARTED), "{stderr}");
    }

    std::fs::write(&file, "{\"prompt_ids\": [1]}\n{\"prompt_ids\": [1], \"prompt\": \"x\"}\n").unwrap();
    let out = pio(&batch);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("line 2"), "{}", text(&out.stderr));
}

#[test]
fn models_lists_every_preset_and_what_fits_one_gpu() {
    let out = pio(&["models"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for preset in pio_models::PRESETS {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(preset.name))
            .unwrap_or_else(|| panic!("pio models does not list {}:\n{stdout}", preset.name));
        assert!(line.contains(preset.hf_repo), "{line}");
    }
    let line = |name: &str| stdout.lines().find(|l| l.starts_with(name)).unwrap().to_string();
    let glm = line("glm-4-7");
    assert!(
        glm.contains("no:") && glm.contains("GPUs"),
        "glm-4-7 must be reported as not fitting one 80 GB GPU: {glm}"
    );
    assert!(line("qwen3-4b-instruct-2507").contains("yes"), "{stdout}");
    assert!(stdout.lines().next().unwrap().contains("80 GB"), "header: {stdout}");
}

#[test]
fn a_missing_graph_folder_is_an_error_naming_it_and_pio_json() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-export");
    let out = pio(&["run", "--graphs", missing.to_str().unwrap(), "--prompt-ids", "1,2,3", "--max-tokens", "2"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains(missing.to_str().unwrap()) && stderr.contains("pio.json"), "unclear error: {stderr}");
    assert!(text(&out.stdout).trim().is_empty(), "nothing on stdout on error");
}

/// What the engine logs once it starts loading the model: an error that comes without it cost no
/// load time (the successful run above shows that a load logs it).
const LOAD_STARTED: &str = "loading ONNX Runtime";

/// A numeric flag out of range is refused by clap (exit code 2) with the flag and its range:
/// negative values too (clap alone calls `-1` an unexpected argument), before anything is read.
#[test]
fn numeric_flags_out_of_range_name_the_flag_and_the_range() {
    // Nothing is read: the folder need not exist.
    const GRAPHS: &str = "no-such-folder";
    let graphs = GRAPHS;
    fn run<'a>(flag: &'a str, value: &'a str) -> Vec<&'a str> {
        vec!["run", "--graphs", GRAPHS, "--prompt-ids", "1,2,3", flag, value]
    }
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (run("--max-tokens", "-1"), "--max-tokens", "must be a whole number >= 1"),
        (run("--max-tokens", "0"), "--max-tokens", "must be a whole number >= 1"),
        (run("--top-p", "1.5"), "--top-p", "must be in (0, 1] (1 = off)"),
        (run("--top-p", "0"), "--top-p", "must be in (0, 1] (1 = off)"),
        (run("--temperature", "-1"), "--temperature", "must be a finite number >= 0 (0 = greedy)"),
        (run("--min-p", "2"), "--min-p", "must be in [0, 1] (0 = off)"),
        (run("--repetition-penalty", "0"), "--repetition-penalty", "must be a finite number > 0"),
        (run("--presence-penalty", "inf"), "--presence-penalty", "must be finite"),
        (run("--top-k", "-1"), "--top-k", "must be a whole number >= 0"),
        (run("--logprobs", "21"), "--logprobs", "must be a whole number in [0, 20]"),
        (run("--seed", "-1"), "--seed", "must be a whole number in [0, 18446744073709551615]"),
        (run("--logit-bias", "5"), "--logit-bias", "must be ID=BIAS"),
        (run("--logit-bias", "x=1"), "--logit-bias", "the token id `x` is not a whole number"),
        (run("--logit-bias", "5=-150"), "--logit-bias", "each bias must be a number in [-100, 100]"),
        (run("--threads", "0"), "--threads", "must be a whole number >= 1"),
        (run("--max-seqs", "-3"), "--max-seqs", "must be a whole number >= 1"),
        (run("--max-model-len", "0"), "--max-model-len", "must be a whole number >= 1"),
        (run("--prefill-budget", "0"), "--prefill-budget", "must be a whole number >= 1"),
        (run("--itl-factor", "0.5"), "--itl-factor", "must be 0 (off) or a finite number > 1"),
        (run("--itl-factor", "1"), "--itl-factor", "must be 0 (off) or a finite number > 1"),
        (run("--kv-cache-gb", "0"), "--kv-cache-gb", "must be a number > 0"),
        (run("--prefix-cache-gb", "-1"), "--prefix-cache-gb", "must be a number > 0"),
        (run("--encoder-cache-gb", "-0.5"), "--encoder-cache-gb", "must be a number >= 0"),
        (run("--gpu-memory-utilization", "1.5"), "--gpu-memory-utilization", "must be a number in (0, 1]"),
        (run("--device-id", "-1"), "--device-id", "must be a whole number >= 0"),
        (
            vec!["run", "--graphs", graphs, "--prompt-ids", "1,-2"],
            "--prompt-ids",
            "must be a whole number in [0, 4294967295]",
        ),
        (vec!["serve", "--graphs", graphs, "--port", "70000"], "--port", "must be a whole number in [0, 65535]"),
        (vec!["serve", "--graphs", graphs, "--port", "-1"], "--port", "must be a whole number in [0, 65535]"),
        (vec!["serve", "--graphs", graphs, "--body-limit-mb", "0"], "--body-limit-mb", "must be a number > 0"),
        (
            vec!["serve", "--graphs", graphs, "--request-timeout", "-1"],
            "--request-timeout",
            "must be a number in [0, 1000000000]",
        ),
        // Past what a Duration holds: refused, not a panic.
        (
            vec!["serve", "--graphs", graphs, "--request-timeout", "1e20"],
            "--request-timeout",
            "must be a number in [0, 1000000000]",
        ),
        (vec!["serve", "--graphs", graphs, "--max-waiting", "0"], "--max-waiting", "must be a whole number >= 1"),
        (vec!["chat", "--graphs", graphs, "--max-tokens", "-5"], "--max-tokens", "must be a whole number >= 1"),
        (vec!["bench", "--graphs", graphs, "--batches", "1,-8"], "--batches", "must be a whole number in [1, 4096]"),
        (vec!["bench", "--graphs", graphs, "--repeats", "0"], "--repeats", "must be a whole number >= 1"),
        (
            vec!["bench", "serve", "--graphs", graphs, "--concurrency", "0"],
            "--concurrency",
            "must be a whole number >= 1",
        ),
        (vec!["bench", "serve", "--graphs", graphs, "--rates", "-2"], "--rates", "must be a number > 0"),
        (
            vec!["bench", "serve", "--graphs", graphs, "--max-duration", "1e20"],
            "--max-duration",
            "must be a number in (0, 1000000000]",
        ),
    ];
    for (args, flag, range) in cases {
        let out = pio(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("for '{flag} <")) && stderr.contains(range), "{args:?}: {stderr}");
    }
}

#[test]
fn usage_errors_and_conflicting_flags_are_refused_by_clap() {
    let graphs = fixture_graphs().to_str().unwrap();
    let refused = |args: &[&str], needle: &str| {
        let out = pio(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?} should mention {needle}: {stderr}");
    };
    refused(&["run", "--prompt-ids", "1,2,3"], "--graphs");
    refused(&["run", "--graphs", graphs, "--prompt-ids", "1,x,3"], "--prompt-ids");
    // No prompt at all.
    refused(&["run", "--graphs", graphs, "--max-tokens", "2"], "--prompt");
    // Options that would be ignored.
    refused(&["run", "--graphs", graphs, "--prompt-ids", "1", "--system", "be brief"], "--system");
    refused(&["run", "--graphs", graphs, "--prompt", "hi", "--raw", "--thinking", "false"], "--thinking");
    refused(&["run", "--graphs", graphs, "--batch", "x.jsonl", "--image", "a.png"], "--image");
    refused(
        &["run", "--graphs", graphs, "--prompt-ids", "1", "--no-prefix-cache", "--prefix-cache-gb", "1"],
        "--no-prefix-cache",
    );
    refused(&["bench", "--model", "qwen3-4b-instruct-2507"], "--synthetic");
    refused(&["bench", "--graphs", graphs, "--cuda-graph", "maybe"], "--cuda-graph");
    refused(&["run", "--graphs", graphs, "--prompt-ids", "1", "--greedy", "--temperature", "1.5"], "--temperature");
    refused(&["run", "--graphs", "/no/such/graphs", "--prompt-ids", "1"], "/no/such/graphs");
}

/// Mistakes the graph folder can reveal are refused before the model loads: with a valid graph
/// folder, each error arrives without the engine's first load message. The fixture has no
/// tokenizer, so text prompts, chat prompts and stop strings cannot run on it.
#[test]
fn arguments_and_prompts_are_checked_before_the_model_loads() {
    let graphs = fixture_graphs().to_str().unwrap();
    let manifest = pio_models::Manifest::load(fixture_graphs()).unwrap();
    let (vocab, context) = (manifest.dims.vocab_size, manifest.dims.context_length);
    let tmp = tempfile::tempdir().unwrap();
    let bad_batch = tmp.path().join("prompts.jsonl");
    std::fs::write(&bad_batch, "{\"prompt_ids\": [1, 2]}\n{\"prompt\": \"hello\"}\n").unwrap();
    let missing_batch = tmp.path().join("missing.jsonl");
    let out_of_vocab = format!("1,{vocab}");
    let fill = (0..context - 4).map(|_| "1").collect::<Vec<_>>().join(",");
    let mut cases: Vec<(Vec<&str>, Vec<String>, Option<i32>)> = vec![
        (vec!["--prompt", "hello", "--raw"], vec!["--prompt".into(), "tokenizer.json".into()], Some(2)),
        (vec!["--prompt", "hello"], vec!["--prompt".into(), "tokenizer.json".into()], Some(2)),
        (vec!["--prompt-ids", &out_of_vocab], vec![format!("token id {vocab} is outside the vocabulary")], Some(2)),
        (
            vec!["--prompt-ids", &fill, "--max-tokens", "5"],
            vec![format!("a sequence holds at most {context}")],
            Some(2),
        ),
        (vec!["--prompt-ids", "1,2", "--max-model-len", "6", "--max-tokens", "5"], vec!["at most 6".into()], Some(2)),
        (vec!["--prompt-ids", "1,2", "--stop", "x"], vec!["--stop".into(), "tokenizer.json".into()], Some(2)),
        (
            vec!["--batch", bad_batch.to_str().unwrap(), "--max-tokens", "2"],
            vec!["line 2".into(), "tokenizer.json".into()],
            Some(2),
        ),
        (vec!["--batch", missing_batch.to_str().unwrap()], vec!["missing.jsonl".into()], Some(2)),
        (
            vec!["--prompt-ids", "1", "--max-tokens", "2", "--logprobs", "2"],
            vec!["--logprobs".into(), "--json".into()],
            Some(2),
        ),
        (
            vec!["--prompt-ids", "1", "--max-tokens", "2", "--ep", "gpu"],
            vec!["unknown execution provider".into()],
            Some(2),
        ),
        (
            vec!["--prompt-ids", "1", "--max-tokens", "2", "--local-images", "/no/such/folder"],
            vec!["--local-images".into()],
            None,
        ),
        // Flags that would do nothing here: a GPU's on the CPU, a staged export's and images' on
        // a single-stage text model.
        (vec!["--prompt-ids", "1", "--device-id", "1"], vec!["--device-id".into(), "the CPU".into()], Some(2)),
        (
            vec!["--prompt-ids", "1", "--gpu-memory-utilization", "0.5"],
            vec!["--gpu-memory-utilization".into(), "the CPU".into()],
            Some(2),
        ),
        (vec!["--prompt-ids", "1", "--micro-batches", "2"], vec!["not a staged export".into()], Some(2)),
        (vec!["--prompt-ids", "1", "--devices", "0,1"], vec!["--devices".into()], Some(2)),
        (
            vec!["--prompt-ids", "1", "--image-threads", "2"],
            vec!["--image-threads".into(), "takes no images".into()],
            Some(2),
        ),
        (vec!["--prompt-ids", "1", "--max-image-pixels", "100"], vec!["--max-image-pixels".into()], Some(2)),
    ];
    // The same through `pio chat` (a chat template is needed).
    let mut all: Vec<(Vec<&str>, Vec<String>, Option<i32>)> = cases
        .drain(..)
        .map(|(args, needles, code)| ([vec!["run", "--graphs", graphs], args].concat(), needles, code))
        .collect();
    all.push((vec!["chat", "--graphs", graphs], vec!["chat template".into()], Some(2)));
    for (args, needles, code) in all {
        let out = pio(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        if let Some(code) = code {
            assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        }
        for needle in &needles {
            assert!(stderr.contains(needle.as_str()), "{args:?} should mention {needle}: {stderr}");
        }
        assert!(!stderr.contains(LOAD_STARTED), "{args:?} loaded the model first: {stderr}");
        assert!(text(&out.stdout).is_empty(), "{args:?}: {}", text(&out.stdout));
    }
}

/// `pio serve` on a port in use, and `pio bench` with one missing graph folder among good ones,
/// fail before any model loads.
#[test]
fn serve_and_bench_refuse_their_inputs_before_loading() {
    let graphs = fixture_graphs().to_str().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = pio(&["serve", "--graphs", graphs, "--port", &port]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains(LOAD_STARTED), "{stderr}");

    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing-graphs");
    let report = tmp.path().join("bench.json");
    let args = ["bench", "--graphs", graphs, "--graphs", missing.to_str().unwrap(), "--out", report.to_str().unwrap()];
    let out = pio(&args);
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("missing-graphs"), "{stderr}");
    assert!(!stderr.contains(LOAD_STARTED) && !report.exists(), "{stderr}");
}

#[test]
fn run_with_a_text_prompt_streams_text_and_seeds_reproduce() {
    let graphs = real_tokenizer_graphs().to_str().unwrap();
    // Hot sampling: at the checkpoint's default temperature the untrained model only repeats the
    // prompt's last token (a newline).
    let args = [
        "run",
        "--graphs",
        graphs,
        "--prompt",
        "Hello!",
        "--max-tokens",
        "12",
        "--seed",
        "5",
        "--temperature",
        "3",
        "--ignore-eos",
        "--json",
    ];
    let a = pio(&args);
    assert!(a.status.success(), "{}", text(&a.stderr));
    let b = pio(&args);
    let (va, vb): (Value, Value) =
        (serde_json::from_slice(&a.stdout).unwrap(), serde_json::from_slice(&b.stdout).unwrap());
    assert_eq!(va["generated_ids"], vb["generated_ids"], "the same seed gave different tokens");
    assert_eq!(va["generated_ids"].as_array().unwrap().len(), 12);
    assert_eq!(va["finish_reason"], "length");

    // Streaming (no --json): the text on stdout is the text --json reports.
    let stream_args: Vec<&str> = args.iter().copied().filter(|a| *a != "--json").collect();
    let s = pio(&stream_args);
    assert!(s.status.success(), "{}", text(&s.stderr));
    let streamed = text(&s.stdout);
    assert_eq!(streamed.strip_suffix('\n').unwrap_or(&streamed), va["text"].as_str().unwrap());
}

#[test]
fn chat_over_piped_stdin_streams_a_reply_and_exits_cleanly() {
    let graphs = real_tokenizer_graphs().to_str().unwrap();
    let out = pio_with_stdin(
        &["chat", "--graphs", graphs, "--max-tokens", "8", "--seed", "1", "--temperature", "3", "--ignore-eos"],
        Some("hello\n/exit\n"),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "pio chat failed: {stderr}");
    assert!(stderr.contains("/exit"), "the banner explains how to quit: {stderr}");
    // "> " prompt, the streamed reply and a newline, then "> " again before /exit.
    let reply = stdout
        .strip_prefix("> ")
        .and_then(|s| s.strip_suffix("> "))
        .unwrap_or_else(|| panic!("unexpected chat output: {stdout:?}"));
    assert!(reply.ends_with('\n') && !reply.trim().is_empty(), "no reply streamed: {stdout:?}");

    // A line that is not UTF-8 is refused and the chat goes on to the next one.
    let out =
        pio_with_stdin_bytes(&["chat", "--graphs", graphs, "--max-tokens", "4", "--seed", "2"], Some(b"caf\xe9\nhi\n"));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("not UTF-8"), "{stderr}");
    assert!(stdout.matches("> ").count() >= 3, "the chat went on after the line: {stdout:?}");

    // A message that leaves the conversation no room for a reply (this graph holds 256 tokens) is
    // refused in the chat's terms, and the chat goes on.
    let long = format!("{}\nhi\n", "word ".repeat(400));
    let out = pio_with_stdin(&["chat", "--graphs", graphs, "--max-tokens", "4", "--seed", "2"], Some(&long));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("holds at most 256") && stderr.contains("was not sent"), "{stderr}");
    assert!(!stderr.contains("max_tokens"), "{stderr}");
    assert!(stdout.matches("> ").count() >= 3, "the chat went on after the message: {stdout:?}");

    // End of input (Ctrl-D) also ends the chat cleanly; /reset is accepted.
    let out =
        pio_with_stdin(&["chat", "--graphs", graphs, "--max-tokens", "4", "--seed", "2"], Some("hi\n/reset\nagain\n"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).matches("> ").count() >= 3, "{}", text(&out.stdout));

    // A graph folder without a chat template is refused.
    let out = pio_with_stdin(&["chat", "--graphs", fixture_graphs().to_str().unwrap()], Some("hello\n"));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("chat template"), "{}", text(&out.stderr));
}

/// `pio run --image` on the Qwen3-VL fixtures: the image files and the prompt through the chat
/// template, pio-image and the vision graph give transformers' greedy tokens, for one image and
/// for two images of different sizes; `--image` wants a chat prompt.
#[test]
fn run_with_images_matches_transformers_greedy() {
    for (fixture, case_name) in [("qwen3vl-a", "one_image"), ("qwen3vl-b", "two_images")] {
        let vl = common::vl_fixture::VlExport::new(fixture);
        let case = vl.case(case_name);
        let graphs = vl.graphs.to_str().unwrap();
        let mut args = vec!["run", "--graphs", graphs, "--prompt", &case.text, "--greedy", "--ignore-eos"];
        let images: Vec<String> = case.image_files.iter().map(|f| vl.fixture.join(f).display().to_string()).collect();
        for image in &images {
            args.extend(["--image", image.as_str()]);
        }
        args.extend(["--max-tokens", "32", "--json"]);
        let out = pio(&args);
        assert!(out.status.success(), "{fixture}: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<u32>>();
        assert_eq!(ids(&v["prompt_ids"]), case.input_ids, "{fixture}: prompt ids");
        assert_eq!(ids(&v["generated_ids"]), case.greedy.generated_ids, "{fixture}: greedy tokens");
        assert_eq!(v["timings"]["images"]["images"], images.len(), "{fixture}: {v}");
        assert_eq!(v["timings"]["images"]["encoded"], images.len(), "{fixture}: {v}");
    }
    let vl = common::vl_fixture::VlExport::new("qwen3vl-a");
    let image = vl.fixture.join("one_image.0.png").display().to_string();
    let out = pio(&["run", "--graphs", vl.graphs.to_str().unwrap(), "--prompt-ids", "1,2", "--image", &image]);
    assert!(!out.status.success() && text(&out.stderr).contains("--image"), "{}", text(&out.stderr));
    // A missing image is a usage error (exit code 2) naming the file, before the model loads;
    // so is an image for a text model.
    let missing = vl.fixture.join("missing.png").display().to_string();
    let out = pio(&["run", "--graphs", vl.graphs.to_str().unwrap(), "--prompt", "hi", "--image", &missing]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--image") && stderr.contains("missing.png"), "{stderr}");
    assert!(!stderr.contains(LOAD_STARTED), "{stderr}");
    // So is a file that is not an image (decoded before the model loads, within --max-image-*).
    let tmp = tempfile::tempdir().unwrap();
    let not_image = tmp.path().join("notes.png");
    std::fs::write(&not_image, "not a picture").unwrap();
    let not_image = not_image.display().to_string();
    let too_big = ["--max-image-pixels", "100"];
    for (file, extra) in [(&not_image, &[][..]), (&image, &too_big[..])] {
        let args =
            [&["run", "--graphs", vl.graphs.to_str().unwrap(), "--prompt", "hi", "--image", file][..], extra].concat();
        let out = pio(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(file.as_str()) && stderr.contains("not an image the model can take"), "{stderr}");
        assert!(!stderr.contains(LOAD_STARTED), "{stderr}");
    }
    let out = pio(&["run", "--graphs", real_tokenizer_graphs().to_str().unwrap(), "--prompt", "hi", "--image", &image]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("takes no images") && !stderr.contains(LOAD_STARTED), "{stderr}");
}

/// `pio chat` with `/image PATH`: the image joins the next message (the reply is transformers'
/// greedy answer to that message); a bad image is reported and the chat goes on.
#[test]
fn chat_attaches_images_to_the_next_message() {
    let vl = common::vl_fixture::VlExport::new("qwen3vl-a");
    let case = vl.case("one_image");
    let tokenizer = pio_runtime::tokenizer::Tokenizer::from_dir(&vl.graphs).unwrap();
    let expected = tokenizer.decode(&case.greedy.generated_ids, true).unwrap();
    let script = format!(
        "/image {}\nfirst\n/image {}\n{}\n/exit\n",
        vl.fixture.join("missing.png").display(),
        vl.fixture.join(&case.image_files[0]).display(),
        case.text
    );
    let args = ["chat", "--graphs", vl.graphs.to_str().unwrap(), "--greedy", "--ignore-eos", "--max-tokens", "32"];
    let out = pio_with_stdin(&args, Some(&script));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("/image PATH"), "the banner tells about /image: {stderr}");
    // A bad image is named when it is attached, not with the message it would have joined.
    assert!(stderr.contains("not attached: /image") && stderr.contains("missing.png"), "{stderr}");
    assert!(!stderr.contains("messages[0]"), "{stderr}");
    assert!(stdout.contains(&expected), "the reply to the image is transformers' answer {expected:?}: {stdout:?}");
}

/// `pio bench` on the CPU: the JSON report has its documented shape, the CPU row has every
/// requested measurement, and a provider that cannot start (CUDA with the CPU build of ONNX
/// Runtime here; or, on a GPU machine, TensorRT without its libraries) is a row saying why,
/// not a failure of the run.
#[test]
fn bench_writes_a_report_with_a_row_per_provider() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench.json");
    let o = pio(&[
        "bench",
        "--graphs",
        fixture_graphs().to_str().unwrap(),
        "--ep",
        "cpu,tensorrt",
        "--prompt-lens",
        "8,16,100000",
        "--batches",
        "1,2",
        "--decode-tokens",
        "3",
        "--repeats",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for key in ["machine", "plan", "runs", "accuracy", "switches_not_measured", "hf_baseline"] {
        assert!(report.get(key).is_some(), "report lacks `{key}`: {report}");
    }
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{report}");
    let cpu = &runs[0];
    assert_eq!(cpu["ep"], "cpu");
    assert!(cpu["error"].is_null(), "{cpu}");
    let ttft: Vec<u64> = cpu["ttft"].as_array().unwrap().iter().map(|t| t["prompt_len"].as_u64().unwrap()).collect();
    assert_eq!(ttft, [8, 16]);
    assert!(cpu["ttft"].as_array().unwrap().iter().all(|t| t["ms"].as_f64().unwrap() > 0.0));
    // The prompt over the graph's context length is a skipped row with the reason.
    assert!(cpu["skipped"].to_string().contains("context length"), "{cpu}");
    let batches: Vec<u64> = cpu["decode"].as_array().unwrap().iter().map(|d| d["batch"].as_u64().unwrap()).collect();
    assert_eq!(batches, [1, 2]);
    assert!(cpu["decode"].as_array().unwrap().iter().all(|d| d["tokens_per_s"].as_f64().unwrap() > 0.0));
    let trt = &runs[1];
    assert_eq!(trt["ep"], "tensorrt");
    let why = trt["error"].as_str().unwrap_or_default();
    assert!(why.contains("TensorRT"), "the TensorRT row should say why it did not run: {trt}");
    assert!(text(&o.stdout).contains("not run"), "{}", text(&o.stdout));
}

/// --choice, --regex and --json-schema shape the output; two at once are refused by clap, and a
/// constraint that does not compile is its flag's usage error (exit code 2).
#[test]
fn run_constrains_its_output_and_names_the_flag_of_a_bad_constraint() {
    let graphs = real_tokenizer_graphs().to_str().unwrap();
    let base = ["run", "--graphs", graphs, "--prompt", "Yes or no?", "--max-tokens", "16", "--seed", "3", "--json"];
    let answer = |extra: &[&str]| -> Value {
        let out = pio(&[&base[..], extra].concat());
        assert!(out.status.success(), "{extra:?}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = answer(&["--choice", "yes", "--choice", "no"]);
    assert!(v["text"] == "yes" || v["text"] == "no", "{v}");
    assert_eq!(v["finish_reason"], "stop", "{v}");
    let v = answer(&["--regex", "[a-c]{3}"]);
    let t = v["text"].as_str().unwrap();
    assert!(t.len() == 3 && t.bytes().all(|b| (b'a'..=b'c').contains(&b)), "{v}");
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}"#).unwrap();
    let v = answer(&["--json-schema", schema.to_str().unwrap()]);
    let parsed: Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {v}"));
    assert!(parsed["ok"].is_boolean(), "{v}");

    let refused = |extra: &[&str], needle: &str| {
        let out = pio(&[&base[..], extra].concat());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{extra:?} should mention {needle}: {stderr}");
    };
    refused(&["--regex", "(unclosed"], "--regex");
    refused(&["--regex", "a", "--choice", "b"], "--choice");
    refused(&["--json-schema", "/nonexistent/schema.json"], "--json-schema");
}

/// `pio perplexity` is `exp` of the mean negative log-likelihood of each window's second half,
/// computed here from the model's every-position logits (whose parity with transformers
/// tests/parity_qwen3.rs checks); the default export (one token per run) and an `--all-logits`
/// one give it alike. Its inputs are refused before the model loads.
#[test]
fn perplexity_scores_each_windows_second_half() {
    let tmp = tempfile::tempdir().unwrap();
    let all_logits = tmp.path().join("all-logits");
    common::export_to(&fixture("qwen3-tied-hub"), &all_logits, common::cpu_settings(false));
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 512).collect();
    let mut nll = Vec::new();
    for window in ids.chunks_exact(16) {
        let logits = common::prefill(&all_logits, window);
        // llama.cpp's count: the tokens after the first ctx / 2 + 1 of each window.
        for p in 9..16 {
            let row = logits.row(p - 1);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_z = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            nll.push(-(row[window[p] as usize] as f64 - max - log_z));
        }
    }
    let expected = (nll.iter().sum::<f64>() / nll.len() as f64).exp();
    let ids_arg = join_ids(&ids);
    for graphs in [fixture_graphs(), all_logits.as_path()] {
        let graphs = graphs.to_str().unwrap();
        let out = pio(&["perplexity", "--graphs", graphs, "--ids", &ids_arg, "--ctx", "16", "--json"]);
        assert!(out.status.success(), "{graphs}: {}", text(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let got = report["perplexity"].as_f64().unwrap();
        assert!((got / expected - 1.0).abs() < 1e-4, "{graphs}: {got} against {expected}");
        assert_eq!((&report["tokens_scored"], &report["windows"]), (&Value::from(14), &Value::from(2)), "{report}");
        assert_eq!(report["window_perplexity"].as_array().map(Vec::len), Some(2));
    }
    // Ids longer than a sequence holds (256) are fine: each window is a prompt; --chunks keeps the first windows.
    let long: Vec<u32> = (0..300u32).map(|i| (i * 53 + 7) % 512).collect();
    let graphs = fixture_graphs().to_str().unwrap();
    let out =
        pio(&["perplexity", "--graphs", graphs, "--ids", &join_ids(&long), "--ctx", "16", "--chunks", "3", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&report["windows"], &report["tokens_scored"]), (&Value::from(3), &Value::from(21)), "{report}");
    let out = pio(&["perplexity", "--graphs", fixture_graphs().to_str().unwrap(), "--ids", &ids_arg, "--ctx", "16"]);
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("[1]") && stdout.contains("Final estimate: PPL = "), "{stdout}");

    let graphs = fixture_graphs().to_str().unwrap();
    for (args, flag) in [
        (vec!["--ids", "1,2,3", "--ctx", "4"], "--ctx"),
        (vec!["--ids", "1,2,3", "--ctx", "3"], "--ctx"),
        (vec!["--ids", "1,2,3,4,5", "--ctx", "100000"], "--ctx"),
        (vec!["--ids", "1,99999"], "--ids"),
        (vec!["--text", "hello"], "--text"),
    ] {
        let mut all = vec!["perplexity", "--graphs", graphs];
        all.extend(&args);
        let out = pio(&all);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
