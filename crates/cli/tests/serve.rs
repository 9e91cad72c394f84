//! `pio serve` and `pio bench serve` as commands: the CLI contract (`listening on
//! http://HOST:PORT` once bound, port 0), answers against `pio run` (whose greedy output the cli
//! tests check against transformers), the server flags, the official `openai` Python package
//! against a live server, and the load generator. The server's behaviour in depth is tested in
//! crates/server/tests/http.rs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use serde_json::{json, Value};

#[path = "../../../tests/common/mod.rs"]
mod common;

/// A synthetic Qwen3 checkpoint at the real vocabulary with the real tokenizer, exported once.
fn graphs() -> &'static Path {
    static GRAPHS: OnceLock<PathBuf> = OnceLock::new();
    GRAPHS.get_or_init(|| {
        common::export_real_tokenizer_qwen3(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-qwen3"), 7)
    })
}

/// A running `pio serve` on a free port, stopped when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pio"))
            .args(["serve", "--graphs", graphs().to_str().unwrap(), "--port", "0", "--served-model-name", "test-model"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start pio serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "binds 127.0.0.1 by default: {base}");
        Server { child, base }
    }

    /// POSTs `body`; (status, response text).
    fn post(&self, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
        let mut request = ureq::post(&format!("{}{path}", self.base)).set("Content-Type", "application/json");
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        match request.send_string(body) {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn post_json(&self, path: &str, body: Value) -> Value {
        let (status, text) = self.post(path, &body.to_string(), None);
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    fn get(&self, path: &str) -> u16 {
        match ureq::get(&format!("{}{path}", self.base)).call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{path}: {e}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pio run --json` on the same graphs.
fn pio_run(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pio"))
        .args(["run", "--graphs", graphs().to_str().unwrap(), "--json", "--greedy"])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `data:` events of a server-sent event stream.
fn events(stream: &str) -> Vec<String> {
    stream.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

#[test]
fn completions_and_chat_answer_what_pio_run_answers() {
    let server = Server::start(&[]);
    let run = pio_run(&["--prompt", "Hello there", "--raw", "--max-tokens", "8"]);
    let got = server.post_json(
        "/v1/completions",
        json!({"model": "test-model", "prompt": "Hello there", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(got["object"], "text_completion");
    assert_eq!(got["choices"][0]["text"], run["text"]);
    assert_eq!(got["choices"][0]["finish_reason"], "length");
    let prompt_tokens = run["prompt_ids"].as_array().unwrap().len();
    assert_eq!(got["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(
        (got["usage"]["completion_tokens"].as_u64(), got["usage"]["total_tokens"].as_u64()),
        (Some(8), Some(prompt_tokens as u64 + 8))
    );
    // The server's first request: nothing to reuse yet.
    assert_eq!(got["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // Token ids as the prompt give the same answer, and vLLM's return_token_ids gives the ids.
    let got_ids = server.post_json(
        "/v1/completions",
        json!({"prompt": run["prompt_ids"], "max_tokens": 8, "temperature": 0, "return_token_ids": true}),
    );
    assert_eq!(got_ids["choices"][0]["text"], run["text"]);
    assert_eq!(got_ids["choices"][0]["token_ids"], run["generated_ids"]);
    assert_eq!(got_ids["choices"][0]["prompt_token_ids"], run["prompt_ids"]);

    let run = pio_run(&["--prompt", "What is 2+2?", "--max-tokens", "6"]);
    let messages = json!([{"role": "user", "content": "What is 2+2?"}]);
    let chat = server.post_json(
        "/v1/chat/completions",
        json!({"messages": messages, "max_completion_tokens": 6, "temperature": 0, "return_token_ids": true}),
    );
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"], json!({"role": "assistant", "content": run["text"]}));
    assert_eq!(chat["prompt_token_ids"], run["prompt_ids"]);
    assert_eq!(chat["choices"][0]["token_ids"], run["generated_ids"]);
}

#[test]
fn a_stream_adds_up_to_the_answer_and_ends_with_done() {
    let server = Server::start(&[]);
    let request =
        json!({"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 12, "temperature": 0});
    let whole = server.post_json("/v1/chat/completions", request.clone());
    let mut streamed = request;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, text) = server.post("/v1/chat/completions", &streamed.to_string(), None);
    assert_eq!(status, 200);
    let sent = events(&text);
    assert_eq!(sent.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = sent[..sent.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let (usage, rest) = chunks.split_last().unwrap();
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    assert_eq!(usage["usage"]["completion_tokens"], whole["usage"]["completion_tokens"]);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));

    // Completions stream text pieces the same way.
    let body = json!({"prompt": "Once", "max_tokens": 5, "temperature": 0, "stream": true}).to_string();
    let (_, text) = server.post("/v1/completions", &body, None);
    let whole = server.post_json("/v1/completions", json!({"prompt": "Once", "max_tokens": 5, "temperature": 0}));
    let pieces: String = events(&text)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(pieces, whole["choices"][0]["text"].as_str().unwrap());
}

#[test]
fn the_server_flags_reach_the_server() {
    let server = Server::start(&["--api-key", "k3y", "--body-limit-mb", "0.001", "--max-waiting", "2"]);
    assert_eq!(server.get("/health"), 200);
    assert_eq!(server.get("/metrics"), 200);
    assert_eq!(server.get("/v1/models"), 401);
    let small = json!({"prompt": "Hi", "max_tokens": 1}).to_string();
    assert_eq!(server.post("/v1/completions", &small, None).0, 401);
    assert_eq!(server.post("/v1/completions", &small, Some("k3y")).0, 200);
    // A 2 KB body over a 1 KiB (0.001 MiB) limit.
    let big = json!({"prompt": "x".repeat(2000), "max_tokens": 1}).to_string();
    let (status, text) = server.post("/v1/completions", &big, Some("k3y"));
    assert_eq!(status, 413, "{text}");
    // Values the server cannot take are refused before it starts.
    let out = Command::new(env!("CARGO_BIN_EXE_pio"))
        .args(["serve", "--graphs", graphs().to_str().unwrap(), "--port", "0", "--request-timeout=-1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--request-timeout"), "{out:?}");
}

/// A Python with the `openai` package: a venv under the project cache (`$PIO_CACHE_DIR` or
/// .cache/pio), made here the first time (python3 -m venv, pip install), atomically.
fn openai_python() -> PathBuf {
    // The SDK version the test was written against.
    const OPENAI: &str = "openai==3.63.0";
    let cache = std::env::var_os("PIO_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/pio"));
    let venv = cache.join("venv-openai");
    let python = venv.join("bin/python");
    let has_sdk = |python: &Path| {
        Command::new(python).args(["-c", "import openai"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    };
    if has_sdk(&python) {
        return python;
    }
    let partial = cache.join(format!("venv-openai.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let run = |program: &Path, args: &[&str]| {
        let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        assert!(out.status.success(), "{} {args:?}: {}", program.display(), String::from_utf8_lossy(&out.stderr));
    };
    run(Path::new("python3"), &["-m", "venv", partial.to_str().unwrap()]);
    run(&partial.join("bin/python"), &["-m", "pip", "install", "--quiet", "--disable-pip-version-check", OPENAI]);
    // Another test run may have finished first; either venv will do.
    if std::fs::rename(&partial, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    assert!(has_sdk(&python), "no openai package in {}", venv.display());
    python
}

#[test]
fn the_openai_python_sdk_talks_to_pio_serve() {
    let python = openai_python();
    let server = Server::start(&["--api-key", "sdk-key"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(python).arg(script).args([&server.base, "sdk-key"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["models"], json!(["test-model"]));
    let chat = &seen["chat"];
    assert_eq!(
        (&chat["object"], &chat["role"], &chat["finish_reason"]),
        (&json!("chat.completion"), &json!("assistant"), &json!("length"))
    );
    assert_eq!(chat["usage"]["completion_tokens"], 8);
    // Content parts, a stream with usage, and the plain answer agree.
    assert_eq!(seen["chat_parts_content"], chat["content"]);
    assert_eq!(seen["chat_stream"]["content"], chat["content"]);
    assert_eq!(seen["chat_stream"]["usage"]["completion_tokens"], 8);
    assert_eq!(seen["chat_stream"]["finish_reason"], "length");
    let logprobs = seen["chat_logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), 4);
    assert!(logprobs.iter().all(|t| t["token"].is_string() && t["top"].as_array().unwrap().len() == 2));
    let several = &seen["chat_n"];
    assert_eq!((&several["indexes"], &several["finish_reasons"]), (&json!([0, 1]), &json!(["length", "length"])));
    // The prompt counted once, both choices' tokens summed.
    assert_eq!(several["usage"]["prompt_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(several["usage"]["completion_tokens"], 8);
    let completion = &seen["completion"];
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(seen["completion_stream_text"], completion["text"]);
    // The batch's first prompt answers as the same prompt alone (greedy).
    let batch = &seen["completion_batch"];
    assert_eq!(batch["indexes"], json!([0, 1]), "{batch}");
    assert_eq!(batch["texts"][0], completion["text"], "{batch}");
    // Echo without generation: the prompt's text and tokens, the first without a logprob.
    let echo = &seen["completion_echo"];
    assert_eq!((&echo["text"], &echo["completion_tokens"]), (&json!("Once upon a time"), &json!(0)), "{echo}");
    let scores = echo["token_logprobs"].as_array().unwrap();
    assert_eq!(scores.len(), echo["tokens"].as_array().unwrap().len(), "{echo}");
    assert!(scores[0].is_null() && scores[1..].iter().all(|l| l.as_f64().is_some_and(|l| l <= 0.0)), "{echo}");
    let tools = &seen["tools"];
    assert!(tools["prompt_tokens"].as_u64() > chat["usage"]["prompt_tokens"].as_u64(), "{tools}");
    assert!(tools["after_call_prompt_tokens"].as_u64() > tools["prompt_tokens"].as_u64(), "{tools}");
    assert_eq!(tools["stream_content"], tools["content"]);
    // Forced calls: one of get_weather for the named function (`stop`, as OpenAI answers it), one
    // or more for `required` (`tool_calls`); each with one of the schema's cities.
    for (choice, reason) in [("named", "stop"), ("required", "tool_calls")] {
        let forced = &seen["forced"][choice];
        assert_eq!((&forced["finish_reason"], &forced["content"]), (&json!(reason), &Value::Null), "{forced}");
        let calls = forced["calls"].as_array().unwrap();
        assert!(!calls.is_empty() && (choice == "required" || calls.len() == 1), "{forced}");
        for call in calls {
            assert_eq!(call["name"], "get_weather", "{forced}");
            assert!(["Paris", "Tokyo"].contains(&call["arguments"]["city"].as_str().unwrap_or_default()), "{forced}");
        }
    }
    let errors = &seen["errors"];
    assert_eq!(errors["tool_choice_unknown"], json!({"status": 400, "param": "tool_choice.function.name"}));
    assert_eq!(errors["unknown_model"], json!({"status": 404, "param": "model", "code": "model_not_found"}));
    assert_eq!(errors["max_tokens_0"], json!({"status": 400, "param": "max_tokens"}));
    assert_eq!(errors["wrong_key"], json!({"status": 401, "code": "invalid_api_key"}));
}

#[test]
fn bench_serve_loads_a_server_it_starts_and_stops_by_itself() {
    let out_dir = tempfile::tempdir().unwrap();
    let report = out_dir.path().join("serve-bench.json");
    #[rustfmt::skip]
    let args = [
        "bench", "serve", "--graphs", graphs().to_str().unwrap(), "--max-seqs", "4",
        "--concurrency", "1,4", "--prompt-len", "16", "--max-tokens", "8", "--offline-batch", "4",
        "--rates", "20,40", "--sweep-duration", "0.5", "--sweep-prompt-lens", "8..64", "--sweep-max-tokens", "4",
        "--prefix-len", "96", "--prefix-suffix", "16", "--prefix-requests", "2",
        "--long-prompt", "160", "--long-streams", "3", "--long-stream-tokens", "48",
        "--out", report.to_str().unwrap(),
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_pio")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("TTFT p99") && stdout.contains("offline (pio bench) batch 4"), "{stdout}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["offline"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    let levels = r["concurrency"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for level in levels {
        let s = &level["summary"];
        let c = level["concurrency"].as_u64().unwrap();
        assert_eq!((s["requests"].as_u64(), s["failed"].as_u64()), (Some(c), Some(0)), "{s}");
        assert_eq!(s["output_tokens"].as_u64(), Some(c * 8));
        assert!(s["ttft_p99_ms"].as_f64().unwrap() > 0.0 && s["itl_p50_ms"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["steady_decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{s}");
    }
    let sweep = r["sweep"].as_array().unwrap();
    assert_eq!(sweep.len(), 2);
    assert!(sweep.iter().all(|s| s["summary"]["failed"] == 0), "{sweep:?}");
    // The prefix hits reuse the whole shared prefix (96 tokens: 6 blocks of 16); cold ones nothing.
    assert_eq!(r["shared_prefix"]["hit_cached_tokens"], json!([96, 96]));
    assert_eq!(r["shared_prefix"]["cold_cached_tokens"], json!([0, 0]));
    let long = &r["long_prefill"];
    assert!(long["long_ttft_ms"].as_f64().unwrap() > 0.0, "{long}");
    // One stream's slowest gaps in the window: at most five, longest first, each ending after the
    // long prompt was sent.
    if long["gaps_during_prefill"].as_u64().unwrap() > 0 {
        let slowest: Vec<f64> = long["one_streams_slowest_gaps_during_prefill"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                assert!(g["ended_ms_after_sent"].as_f64().unwrap() >= 0.0, "{g}");
                g["gap_ms"].as_f64().unwrap()
            })
            .collect();
        assert!((1..=5).contains(&slowest.len()) && slowest.windows(2).all(|w| w[0] >= w[1]), "{long}");
        assert!(slowest[0] > 0.0, "{long}");
    }
    assert!(r["checks"]["decode_over_offline"].as_f64().is_some(), "{}", r["checks"]);

    // Only this machine is a target.
    let far = Command::new(env!("CARGO_BIN_EXE_pio"))
        .args(["bench", "serve", "--graphs", graphs().to_str().unwrap(), "--url", "http://192.0.2.1:8000"])
        .output()
        .unwrap();
    assert!(!far.status.success());
    assert!(String::from_utf8_lossy(&far.stderr).contains("only targets this machine"), "{far:?}");
}
