//! `pio serve` over HTTP: answers against `pio run` (whose greedy output the cli tests check
//! against transformers), streaming against the non-streamed answer, and the 4xx errors.

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
    fn start() -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pio"))
            .args(["serve", "--graphs", graphs().to_str().unwrap(), "--port", "0", "--served-model-name", "test-model"])
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
        Server { child, base }
    }

    /// POSTs `body`; (status, response text).
    fn post(&self, path: &str, body: &str) -> (u16, String) {
        let result =
            ureq::post(&format!("{}{path}", self.base)).set("Content-Type", "application/json").send_string(body);
        match result {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn post_json(&self, path: &str, body: Value) -> Value {
        let (status, text) = self.post(path, &body.to_string());
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
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
    let server = Server::start();
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

    // Token ids as the prompt give the same answer.
    let got_ids =
        server.post_json("/v1/completions", json!({"prompt": run["prompt_ids"], "max_tokens": 8, "temperature": 0}));
    assert_eq!(got_ids["choices"][0]["text"], run["text"]);

    let run = pio_run(&["--prompt", "What is 2+2?", "--max-tokens", "6"]);
    let messages = json!([{"role": "user", "content": "What is 2+2?"}]);
    let chat =
        server.post_json("/v1/chat/completions", json!({"messages": messages, "max_tokens": 6, "temperature": 0}));
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"], json!({"role": "assistant", "content": run["text"]}));
    assert_eq!(chat["usage"]["prompt_tokens"], run["prompt_ids"].as_array().unwrap().len());
}

#[test]
fn a_stream_adds_up_to_the_answer_and_ends_with_done() {
    let server = Server::start();
    let request =
        json!({"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 12, "temperature": 0});
    let whole = server.post_json("/v1/chat/completions", request.clone());
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (status, text) = server.post("/v1/chat/completions", &streamed.to_string());
    assert_eq!(status, 200);
    let sent = events(&text);
    assert_eq!(sent.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = sent[..sent.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    assert_eq!(last["usage"], whole["usage"]);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));

    // Completions stream text pieces the same way.
    let (_, text) = server.post(
        "/v1/completions",
        &json!({"prompt": "Once", "max_tokens": 5, "temperature": 0, "stream": true}).to_string(),
    );
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
fn bad_requests_are_400s_naming_the_field() {
    let server = Server::start();
    let models: Value =
        serde_json::from_str(&ureq::get(&format!("{}/v1/models", server.base)).call().unwrap().into_string().unwrap())
            .unwrap();
    assert_eq!(models["data"][0]["id"], "test-model");
    assert_eq!(ureq::get(&format!("{}/health", server.base)).call().unwrap().status(), 200);

    let cases = [
        (json!({"prompt": "x", "temperature": -1}), "temperature"),
        (json!({"prompt": "x", "n": 2}), "`n` must be 1"),
        (json!({"prompt": "x", "model": "gpt-4"}), "model `gpt-4` is not served here"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "stop": 5}), "`stop`"),
        (json!({"prompt": [1, 99999999]}), "outside the vocabulary"),
        (json!({"max_tokens": 3}), "`prompt`"),
    ];
    for (body, expected) in cases {
        let (status, text) = server.post("/v1/completions", &body.to_string());
        assert_eq!(status, 400, "{body}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error");
        assert!(error["error"]["message"].as_str().unwrap().contains(expected), "{body}: {text}");
    }
    let (_, text) = server.post("/v1/completions", &json!({"prompt": "x", "top_p": 2}).to_string());
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["param"], "top_p", "{text}");
    let (status, text) = server.post("/v1/chat/completions", "{not json");
    assert_eq!(status, 400, "{text}");
    let (status, text) = server.post("/v1/chat/completions", &json!({"messages": []}).to_string());
    assert!(status == 400 && text.contains("messages"), "{text}");
    let (status, _) = server.post("/v1/embeddings", "{}");
    assert_eq!(status, 404);
}
