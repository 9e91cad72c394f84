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
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
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

    // Without --json and without a tokenizer: the ids, comma-separated.
    let out = pio(&["run", "--graphs", graphs, "--prompt-ids", &prompt_arg, "--max-tokens", "7", "--greedy"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), join_ids(&expected[..7]));
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

#[test]
fn bad_sampling_options_are_rejected_by_name() {
    let graphs = fixture_graphs().to_str().unwrap();
    for (flag, value, field) in
        [("--top-p", "1.5", "top_p"), ("--temperature", "-1", "temperature"), ("--min-p", "2", "min_p")]
    {
        let arg = format!("{flag}={value}");
        let out = pio(&["run", "--graphs", graphs, "--prompt-ids", "1,2,3", "--max-tokens", "2", &arg]);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(field) && stderr.contains(value), "{flag} {value}: unclear error: {stderr}");
    }
    // Arguments clap already refuses: exit code 2 with a usage message.
    let out = pio(&["run", "--prompt-ids", "1,2,3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--graphs"), "{}", text(&out.stderr));
    let out = pio(&["run", "--graphs", graphs, "--prompt-ids", "1,x,3"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // No prompt at all.
    let out = pio(&["run", "--graphs", graphs, "--max-tokens", "2"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--prompt"), "{}", text(&out.stderr));
    // Text prompts need a tokenizer, and the fixture has none.
    let out = pio(&["run", "--graphs", graphs, "--prompt", "hello", "--raw", "--max-tokens", "2"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("tokenizer"), "{}", text(&out.stderr));
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
    // A bad image is a request error (exit code 2) naming the file.
    let missing = vl.fixture.join("missing.png").display().to_string();
    let out = pio(&["run", "--graphs", vl.graphs.to_str().unwrap(), "--prompt", "hi", "--image", &missing]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("missing.png"), "{}", text(&out.stderr));
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
    assert!(stderr.contains("messages[0].content[0].path") && stderr.contains("missing.png"), "{stderr}");
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
