//! `pio-server` over HTTP, in-process on the CPU, over a small random-weight Qwen3 with the
//! real tokenizer (1 layer, hidden 64, a 4,096-token context):
//! - isolation: 32 concurrent streams (different prompts, lengths, sampling settings and
//!   seeds) each give what the same request gives alone (on the qwen3-tied-hub fixture, whose
//!   512-token vocabulary keeps sampling in a debug build fast);
//! - cancellation: every disconnect (streaming, not streaming, waiting) and every request
//!   timeout frees its slot (`/metrics` reports 0 running and 0 waiting after);
//! - prefix reuse across requests: A, an unrelated B, then C sharing A's 2,000-token prefix:
//!   C's usage reports the cached tokens and its tokens equal a cold server's;
//! - bad input: each case gets its 4xx naming the field, and the next request succeeds; a
//!   50 MB body is refused before it is sent; 401 without the key; 429 with a full queue;
//!   `include_usage` on and off; HTTP/1.0 and keep-alive; both endpoints' logprobs shapes;
//!   the metrics the model-server protocol reads;
//! - `n`: each of n choices answers as a lone request seeded `seed + i`, streamed or not, with
//!   the usage summed.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use pio_runtime::engine::{Engine, EngineConfig};
use pio_server::{Server, ServerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// The model, exported once per test process.
fn graphs() -> &'static Path {
    static GRAPHS: OnceLock<PathBuf> = OnceLock::new();
    GRAPHS.get_or_init(|| {
        common::export_real_tokenizer_qwen3_with_context(
            &Path::new(env!("CARGO_TARGET_TMPDIR")).join("server-http-qwen3"),
            11,
            4096,
        )
    })
}

/// The qwen3-tied-hub fixture (vocabulary 512, no tokenizer), exported once per test process.
fn small_vocab_graphs() -> &'static Path {
    static GRAPHS: OnceLock<PathBuf> = OnceLock::new();
    GRAPHS.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("server-http-qwen3-tied-hub");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen3-tied-hub");
        common::export_to(&fixture, &out, common::cpu_settings(true));
        out
    })
}

/// Ordinary token ids of the Qwen3 vocabulary (no special tokens).
fn random_ids(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..151_643)).collect()
}

/// A server in this process on 127.0.0.1, stopped when dropped.
struct Served {
    base: String,
    address: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    engine: Engine,
}

struct Settings {
    graphs: &'static Path,
    max_seqs: usize,
    prefill_budget: usize,
    prefix_caching: bool,
    max_waiting: usize,
    /// `--served-model-name` (None: the graph's name).
    served_name: Option<&'static str>,
    server: ServerConfig,
}

impl Default for Settings {
    fn default() -> Self {
        let server = ServerConfig::builder().port(0).build().unwrap();
        Settings {
            graphs: graphs(),
            max_seqs: 4,
            prefill_budget: 512,
            prefix_caching: true,
            max_waiting: 64,
            served_name: None,
            server,
        }
    }
}

fn serve(settings: Settings) -> Served {
    let mut config = EngineConfig::builder(settings.graphs)
        .max_seqs(settings.max_seqs)
        .prefill_budget(settings.prefill_budget)
        .prefix_caching(settings.prefix_caching)
        .max_waiting(settings.max_waiting);
    if let Some(name) = settings.served_name {
        config = config.served_model_name(name);
    }
    let config = config.build().unwrap();
    let engine = Engine::start(config).unwrap_or_else(|e| panic!("{e:#}"));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = runtime.block_on(Server::bind(engine.clone(), &settings.server)).unwrap();
    let address = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(server.run(async {
        let _ = stopped.await;
    }));
    Served { base: format!("http://{address}"), address, runtime: Some(runtime), stop: Some(stop), engine }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Served {
    /// POSTs `body` (bytes as they are); (status, response text).
    fn post_bytes(&self, path: &str, body: &[u8], key: Option<&str>) -> (u16, String) {
        let mut request = ureq::post(&format!("{}{path}", self.base)).set("Content-Type", "application/json");
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        match request.send_bytes(body) {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.post_bytes(path, body.to_string().as_bytes(), None);
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}")))
    }

    /// POSTs `body`, expecting a 400 that names `field`.
    fn assert_refused(&self, path: &str, body: &Value, field: &str) {
        let (status, answer) = self.post(path, body);
        assert_eq!((status, answer["error"]["param"].as_str()), (400, Some(field)), "{path} {body}: {answer}");
    }

    /// POSTs `body`, expecting 200.
    fn answer(&self, path: &str, body: &Value) -> Value {
        let (status, answer) = self.post(path, body);
        assert_eq!(status, 200, "{path} {body}: {answer}");
        answer
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut request = ureq::get(&format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.set("Authorization", &format!("Bearer {key}"));
        }
        match request.call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    }

    /// A streamed request's `data:` events, `[DONE]` included.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let response = ureq::post(&format!("{}{path}", self.base))
            .send_string(&body.to_string())
            .unwrap_or_else(|e| panic!("{path} {body}: {e}"));
        assert_eq!(response.header("content-type"), Some("text/event-stream"));
        let mut events = Vec::new();
        for line in BufReader::new(response.into_reader()).lines() {
            if let Some(data) = line.unwrap().strip_prefix("data: ") {
                events.push(data.to_string());
            }
        }
        events
    }

    /// A sample of `/metrics` (the one without labels other than the model's).
    fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.get("/metrics", None);
        assert_eq!(status, 200);
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.split('}').next().is_some_and(|h| !h.contains(',')))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    fn cancelled(&self) -> f64 {
        let (_, text) = self.get("/metrics", None);
        let line = text.lines().find(|l| l.contains("finished_reason=\"cancelled\"")).expect("no cancelled count");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Waits until `/metrics` says the engine runs nothing and nothing waits.
    fn wait_idle(&self) {
        self.wait_until("no request running or waiting", |s| {
            s.metric("pio_num_requests_running") == 0.0 && s.metric("pio_num_requests_waiting") == 0.0
        });
    }

    fn wait_until(&self, what: &str, done: impl Fn(&Served) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A raw connection that has sent `body` to `path` as HTTP/1.1.
    fn send_raw(&self, path: &str, body: &Value) -> TcpStream {
        let mut socket = TcpStream::connect(self.address).unwrap();
        let body = body.to_string();
        write!(socket, "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        socket
    }
}

/// The JSON chunks of a stream (all but `[DONE]`, which must be last).
fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

/// What a response (or the chunks of a stream) says about its one choice: the generated ids,
/// the text, and each token's logprob.
#[derive(Debug, PartialEq)]
struct Answer {
    ids: Vec<u64>,
    text: String,
    logprobs: Vec<f64>,
    finish_reason: String,
}

impl Answer {
    /// Tokens, text and finish reason equal; logprobs within fp32 rounding. Batched and lone runs
    /// put different row counts through the same GEMMs, so a logprob may move in its last bits
    /// (seen: 2e-6) while every token stays the same.
    fn assert_same_as(&self, other: &Answer, what: &str) {
        assert_eq!(
            (&self.ids, &self.text, &self.finish_reason),
            (&other.ids, &other.text, &other.finish_reason),
            "{what}"
        );
        assert_eq!(self.logprobs.len(), other.logprobs.len(), "{what}: logprob count");
        for (k, (a, b)) in self.logprobs.iter().zip(&other.logprobs).enumerate() {
            assert!((a - b).abs() <= 1e-4, "{what}: logprob {k}: {a} vs {b}\n{self:?}\n{other:?}");
        }
    }
}

fn answer_of(choice: &Value, chat: bool) -> Answer {
    let text = if chat { &choice["message"]["content"] } else { &choice["text"] };
    let logprobs = if chat {
        choice["logprobs"]["content"].as_array().map(|c| c.iter().map(|t| t["logprob"].as_f64().unwrap()).collect())
    } else {
        choice["logprobs"]["token_logprobs"].as_array().map(|c| c.iter().map(|l| l.as_f64().unwrap()).collect())
    };
    Answer {
        ids: choice["token_ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect(),
        text: text.as_str().unwrap().to_string(),
        logprobs: logprobs.unwrap_or_default(),
        finish_reason: choice["finish_reason"].as_str().unwrap().to_string(),
    }
}

fn streamed_answer(chunks: &[Value], chat: bool) -> Answer {
    let mut answer = Answer { ids: vec![], text: String::new(), logprobs: vec![], finish_reason: String::new() };
    for c in chunks.iter().filter(|c| !c["choices"].as_array().unwrap().is_empty()) {
        let choice = &c["choices"][0];
        answer.ids.extend(choice["token_ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()));
        let text = if chat { &choice["delta"]["content"] } else { &choice["text"] };
        answer.text.push_str(text.as_str().unwrap_or_default());
        let lp = if chat { &choice["logprobs"]["content"] } else { &choice["logprobs"]["token_logprobs"] };
        if let Some(lp) = lp.as_array() {
            answer.logprobs.extend(lp.iter().map(|l| if chat { &l["logprob"] } else { l }.as_f64().unwrap()));
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            answer.finish_reason = reason.to_string();
        }
    }
    answer
}

#[test]
fn concurrent_streams_answer_as_each_alone() {
    // 8 slots for 32 requests: they wait, get slots as others finish, and prefill in chunks of
    // at most 24 tokens per step beside the running decodes.
    // No prefix cache: the requests run again alone, and a prefix hit computes the prompt's last
    // token in another chunk, which changes logprobs in their last bits.
    let settings = Settings {
        graphs: small_vocab_graphs(),
        max_seqs: 8,
        prefill_budget: 24,
        prefix_caching: false,
        ..Default::default()
    };
    let server = Arc::new(serve(settings));
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let requests: Vec<Value> = (0..32)
        .map(|i| {
            let mut body = match i % 4 {
                0 => json!({"temperature": 0}),
                1 => json!({"temperature": 0.8, "top_k": 20, "seed": 100 + i}),
                2 => json!({"temperature": 1.3, "top_p": 0.9, "min_p": 0.02, "seed": 100 + i}),
                _ => json!({"temperature": 0, "repetition_penalty": 1.3, "frequency_penalty": 0.2}),
            };
            // 2 to 61 prompt tokens, 3 to 26 new ones.
            body["prompt"] = json!((0..2 + (i * 7) % 60).map(|_| rng.random_range(0..512u32)).collect::<Vec<_>>());
            body["max_tokens"] = json!(3 + (i * 5) % 24);
            body["ignore_eos"] = json!(true);
            body["return_token_ids"] = json!(true);
            if i % 5 == 0 {
                body["logprobs"] = json!(2);
            }
            body
        })
        .collect();

    let start = Arc::new(Barrier::new(requests.len()));
    let streams: Vec<_> = requests
        .iter()
        .cloned()
        .map(|mut body| {
            let (server, start) = (Arc::clone(&server), Arc::clone(&start));
            std::thread::spawn(move || {
                body["stream"] = json!(true);
                start.wait();
                server.stream("/v1/completions", &body)
            })
        })
        .collect();
    let streamed: Vec<Vec<String>> = streams.into_iter().map(|t| t.join().unwrap()).collect();
    let steps = server.metric("pio_engine_steps_total");

    let mut generated = 0;
    for (i, (body, events)) in requests.iter().zip(&streamed).enumerate() {
        let got = streamed_answer(&chunks(events), false);
        let alone = answer_of(&server.answer("/v1/completions", body)["choices"][0], false);
        got.assert_same_as(&alone, &format!("request {i}: streamed together vs alone"));
        assert_eq!(got.ids.len() as u64, body["max_tokens"].as_u64().unwrap(), "request {i}");
        assert_eq!(got.finish_reason, "length");
        if body.get("logprobs").is_some() {
            assert_eq!(got.logprobs.len(), got.ids.len(), "request {i}: a token without its logprob");
        }
        generated += got.ids.len();
    }
    // They ran batched: far fewer engine steps than tokens.
    assert!(steps < generated as f64 * 0.75, "{steps} steps for {generated} tokens");
    // Seeds matter: the same sampled request with another seed differs.
    let mut reseeded = requests[1].clone();
    reseeded["seed"] = json!(1);
    let other = answer_of(&server.answer("/v1/completions", &reseeded)["choices"][0], false);
    assert_ne!(other.ids, streamed_answer(&chunks(&streamed[1]), false).ids);
}

/// Reads a stream until `n` of its `data:` lines have come.
fn read_data_lines(reader: &mut BufReader<TcpStream>, n: usize) {
    let mut data_lines = 0;
    while data_lines < n {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        data_lines += usize::from(line.starts_with("data: "));
    }
}

#[test]
fn disconnects_and_timeouts_cancel_their_sequences() {
    let server = serve(Settings { max_seqs: 1, ..Default::default() });
    let long = json!({"prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": true});

    // Streaming: read a few chunks, then hang up.
    let mut streaming = long.clone();
    streaming["stream"] = json!(true);
    let socket = server.send_raw("/v1/completions", &streaming);
    let mut reader = BufReader::new(socket);
    read_data_lines(&mut reader, 3);
    assert_eq!(server.metric("pio_num_requests_running"), 1.0);
    drop(reader);
    server.wait_idle();
    assert_eq!(server.cancelled(), 1.0);

    // Streaming two choices, one running and one waiting for the slot: hanging up cancels both.
    let mut two = streaming.clone();
    two["n"] = json!(2);
    let mut reader = BufReader::new(server.send_raw("/v1/completions", &two));
    read_data_lines(&mut reader, 3);
    assert_eq!((server.metric("pio_num_requests_running"), server.metric("pio_num_requests_waiting")), (1.0, 1.0));
    drop(reader);
    server.wait_idle();
    assert_eq!(server.cancelled(), 3.0);

    // Not streaming: one running, one waiting for the slot; both hang up.
    let running = server.send_raw("/v1/completions", &long);
    server.wait_until("the first request runs", |s| s.metric("pio_num_requests_running") == 1.0);
    let waiting = server.send_raw("/v1/completions", &long);
    server.wait_until("the second request waits", |s| s.metric("pio_num_requests_waiting") == 1.0);
    drop(waiting);
    server.wait_until("the waiting request is gone", |s| s.metric("pio_num_requests_waiting") == 0.0);
    assert_eq!(server.metric("pio_num_requests_running"), 1.0);
    drop(running);
    server.wait_idle();
    assert_eq!(server.cancelled(), 5.0);
    // The slot serves the next request.
    let next = server.answer("/v1/completions", &json!({"prompt": [5, 6], "max_tokens": 2}));
    assert_eq!(next["usage"]["completion_tokens"], 2);

    // The request timeout: a 504 not streaming, an error event streaming; both cancelled.
    let timeout = ServerConfig::builder().port(0).request_timeout(Some(Duration::from_millis(500))).build().unwrap();
    let server = serve(Settings { max_seqs: 2, server: timeout, ..Default::default() });
    let start = Instant::now();
    let (status, body) = server.post("/v1/completions", &long);
    assert_eq!((status, &body["error"]["code"]), (504, &json!("timeout")), "{body}");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    let events = server.stream("/v1/completions", &streaming);
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "timeout", "{error}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    server.wait_idle();
    assert_eq!(server.cancelled(), 2.0);
}

#[test]
fn a_shared_prefix_is_reused_across_requests_and_answers_as_cold() {
    let cached = serve(Settings::default());
    let cold = serve(Settings { prefix_caching: false, ..Default::default() });
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let shared = random_ids(&mut rng, 2000);
    let with_shared = |rng: &mut ChaCha8Rng, extra: usize| [shared.clone(), random_ids(rng, extra)].concat();
    let (a, b, c) = (with_shared(&mut rng, 20), random_ids(&mut rng, 300), with_shared(&mut rng, 30));
    let body = |prompt: &[u32]| json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": true});
    let cached_tokens = |answer: &Value| answer["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(cached_tokens(&cached.answer("/v1/completions", &body(&a))), 0);
    assert_eq!(cached_tokens(&cached.answer("/v1/completions", &body(&b))), 0, "B shares nothing");
    let hit = cached.answer("/v1/completions", &body(&c));
    let want = cold.answer("/v1/completions", &body(&c));
    // A's 2,000 shared tokens are 125 blocks of 16.
    assert_eq!(cached_tokens(&hit), 2000);
    assert_eq!(cached_tokens(&want), 0);
    assert_eq!(hit["choices"][0]["token_ids"], want["choices"][0]["token_ids"]);
    assert_eq!(hit["choices"][0]["text"], want["choices"][0]["text"]);
    // Streamed with include_usage, the hit is in the usage chunk too.
    let mut streamed = body(&c);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = chunks(&cached.stream("/v1/completions", &streamed));
    let usage = &events.last().unwrap()["usage"];
    assert!(cached_tokens(&json!({"usage": usage})) >= 2000, "{usage}");
    assert!(cached.metric("pio_prefix_cache_hits_total") >= 2000.0);
}

#[test]
fn bad_input_gets_a_4xx_naming_the_field_and_the_server_goes_on() {
    let server = serve(Settings::default());
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body.to_string().into_bytes()
    };
    let too_long: Vec<u32> = (0..5000).map(|i| i % 1000).collect();
    // (route, body, status, param, a part of the message)
    type Case<'a> = (&'a str, Vec<u8>, u16, Option<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        ("/v1/chat/completions", b"{not json".to_vec(), 400, None, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]".to_vec(), 400, None, "not a request object"),
        ("/v1/chat/completions", b"{}".to_vec(), 400, Some("messages"), "required"),
        ("/v1/chat/completions", br#"{"messages": []}"#.to_vec(), 400, Some("messages"), "empty"),
        ("/v1/chat/completions", br#"{"messages": "hi"}"#.to_vec(), 400, Some("messages"), "invalid type"),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": "robot", "content": "x"}]}"#.to_vec(),
            400,
            Some("messages[0].role"),
            "robot",
        ),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": "user"}]}"#.to_vec(),
            400,
            Some("messages[0].content"),
            "required",
        ),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}"#.to_vec(),
            400,
            Some("messages[0].content[0].type"),
            "input_audio",
        ),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}"#
                .to_vec(),
            400,
            Some("messages[0].content[0].type"),
            "text only",
        ),
        ("/v1/chat/completions", chat(json!({"temperature": "hot"})), 400, Some("temperature"), "invalid type"),
        ("/v1/chat/completions", chat(json!({"model": "gpt-4"})), 404, Some("model"), "gpt-4"),
        ("/v1/chat/completions", chat(json!({"max_tokens": 0})), 400, Some("max_tokens"), "at least 1"),
        (
            "/v1/chat/completions",
            chat(json!({"max_completion_tokens": -5})),
            400,
            Some("max_completion_tokens"),
            "at least 1",
        ),
        ("/v1/chat/completions", chat(json!({"max_tokens": 100000})), 400, Some("max_tokens"), "4096"),
        ("/v1/chat/completions", chat(json!({"n": 17})), 400, Some("n"), "over the limit of 16"),
        ("/v1/completions", br#"{"prompt": "x", "n": 0}"#.to_vec(), 400, Some("n"), "at least 1"),
        // A constraint the engine cannot compile is named by the field it came in.
        (
            "/v1/chat/completions",
            chat(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}})),
            400,
            Some("response_format.json_schema.schema"),
            "minimum (5) is greater than maximum (1)",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "x", "structured_outputs": {"regex": "(unclosed"}}"#.to_vec(),
            400,
            Some("structured_outputs.regex"),
            "does not compile",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"guided_grammar": "start: nowhere"})),
            400,
            Some("guided_grammar"),
            "nowhere",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"response_format": {"type": "xml"}})),
            400,
            Some("response_format.type"),
            "xml",
        ),
        // A forced call: tools to call, one of them named, and no other constraint; a schema the
        // engine cannot compile is named by the tool it came in.
        ("/v1/chat/completions", chat(json!({"tool_choice": "required"})), 400, Some("tool_choice"), "no"),
        (
            "/v1/chat/completions",
            chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}}})),
            400,
            Some("tool_choice.function.name"),
            "\"g\"",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
                "response_format": {"type": "json_object"}})),
            400,
            Some("tool_choice"),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                    "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]}}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}}})),
            400,
            Some("tools[0].function.parameters"),
            "minimum (5) is greater than maximum (1)",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": [{"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"description": "no name"}}]})),
            400,
            Some("tools[1].function.name"),
            "required",
        ),
        ("/v1/chat/completions", chat(json!({"functions": [{"name": "f"}]})), 400, Some("functions"), "tools"),
        (
            "/v1/chat/completions",
            chat(json!({"stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
            "stream",
        ),
        ("/v1/chat/completions", chat(json!({"top_logprobs": 2})), 400, Some("top_logprobs"), "logprobs: true"),
        ("/v1/chat/completions", chat(json!({"prompt": "x"})), 400, Some("prompt"), "/v1/completions"),
        ("/v1/completions", json!({"prompt": too_long}).to_string().into_bytes(), 400, Some("prompt"), "5000 tokens"),
        ("/v1/completions", br#"{"prompt": [1, -3]}"#.to_vec(), 400, Some("prompt"), "token ids"),
        ("/v1/completions", br#"{"prompt": [1, 99999999]}"#.to_vec(), 400, Some("prompt"), "outside the vocabulary"),
        ("/v1/completions", br#"{"prompt": ["a", [1]]}"#.to_vec(), 400, Some("prompt[1]"), "must be a string"),
        ("/v1/completions", br#"{"prompt": ["a", ""]}"#.to_vec(), 400, Some("prompt[1]"), "empty"),
        ("/v1/completions", br#"{"max_tokens": 3}"#.to_vec(), 400, Some("prompt"), "required"),
        ("/v1/completions", br#"{"prompt": "x", "top_p": 2}"#.to_vec(), 400, Some("top_p"), "(0, 1]"),
        ("/v1/completions", br#"{"prompt": "x", "stop": 5}"#.to_vec(), 400, Some("stop"), "string"),
        ("/v1/completions", br#"{"prompt": "x", "logprobs": 21}"#.to_vec(), 400, Some("logprobs"), "20"),
        (
            "/v1/completions",
            br#"{"prompt": "x", "logit_bias": {"a": 1}}"#.to_vec(),
            400,
            Some("logit_bias"),
            "token ids",
        ),
        ("/v1/completions", br#"{"prompt": "x", "logit_bias": {"1": 300}}"#.to_vec(), 400, Some("logit_bias"), "100]"),
        (
            "/v1/completions",
            br#"{"prompt": "x", "logit_bias": {"99999999": 1}}"#.to_vec(),
            400,
            Some("logit_bias"),
            "outside the vocabulary",
        ),
        (
            "/v1/completions",
            br#"{"messages": [{"role": "user", "content": "x"}]}"#.to_vec(),
            400,
            Some("messages"),
            "/v1/chat/completions",
        ),
        ("/v1/completions", b"{\"prompt\": \"\xff\xfe\"}".to_vec(), 400, None, "not UTF-8"),
    ];
    let good = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    for (path, body, status, param, fragment) in cases {
        let shown = String::from_utf8_lossy(&body).chars().take(120).collect::<String>();
        let (got, text) = server.post_bytes(path, &body, None);
        assert_eq!(got, status, "{path} {shown}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{shown}: {e}: {text}"));
        assert_eq!(error["error"]["param"].as_str(), param, "{path} {shown}: {text}");
        assert!(error["error"]["message"].as_str().unwrap().contains(fragment), "{path} {shown}: {text}");
        let kind = error["error"]["type"].as_str().unwrap();
        assert_eq!(kind, "invalid_request_error", "{text}");
        // The server goes on serving.
        server.answer("/v1/chat/completions", &good);
    }
    assert_eq!(server.post_bytes("/v1/embeddings", b"{}", None).0, 404);
    assert_eq!(server.get("/v1/chat/completions", None).0, 405);

    // Content as a list of text parts (what the openai SDKs send) is the joined text.
    let parts = json!([{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]);
    let greedy = |content: Value| {
        let body = json!({"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0});
        server.answer("/v1/chat/completions", &body)
    };
    let from_parts = greedy(parts);
    let from_text = greedy(json!("Hello\nthere"));
    assert_eq!(from_parts["choices"][0]["message"], from_text["choices"][0]["message"]);
    assert_eq!(from_parts["usage"], from_text["usage"]);
    // logit_bias: -100 keeps greedy's first token out, +100 makes another every token.
    let ids = |bias: Value| {
        let body = json!({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "return_token_ids": true,
            "ignore_eos": true, "logit_bias": bias});
        let answer = server.answer("/v1/completions", &body);
        serde_json::from_value::<Vec<u32>>(answer["choices"][0]["token_ids"].clone()).unwrap()
    };
    let plain = ids(json!({}));
    let banned = ids(json!({plain[0].to_string(): -100}));
    assert_eq!(banned.len(), 4);
    assert!(!banned.contains(&plain[0]), "{plain:?} then {banned:?}");
    let other = (0..5).find(|t| !plain.contains(t)).unwrap();
    assert_eq!(ids(json!({other.to_string(): 100})), vec![other; 4]);
    // An unknown role was silently dropped before; `developer` is a system message.
    let developer = json!({"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0});
    let system = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0});
    let (developer, system) =
        (server.answer("/v1/chat/completions", &developer), server.answer("/v1/chat/completions", &system));
    assert_eq!(developer["usage"]["prompt_tokens"], system["usage"]["prompt_tokens"]);
    assert_eq!(developer["choices"][0]["message"], system["choices"][0]["message"]);
    // The second found the first's prompt in the prefix cache: the same tokens.
    assert!(system["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);
}

/// Tools reach the chat template (the prompt grows by their rendering), past calls and tool
/// results render, and an answer made of tool-call tags (forced with `logit_bias`; a random model
/// cannot be made to write a whole call) is content, the same streamed as not: the open blocks are
/// held while streaming and let out at the end.
#[test]
fn tools_are_rendered_and_tool_call_tags_stream_as_content() {
    let server = serve(Settings::default());
    let weather = json!([{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let user = json!({"role": "user", "content": "Weather in Paris?"});
    let prompt_tokens = |extra: Value| {
        let mut body = json!({"messages": [user], "max_tokens": 1, "temperature": 0});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        server.answer("/v1/chat/completions", &body)["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let plain = prompt_tokens(json!({}));
    let with_tools = prompt_tokens(json!({"tools": weather}));
    assert!(with_tools > plain + 20, "{with_tools} vs {plain}");
    // `none` renders them too (as vLLM does) and only leaves the answer unparsed.
    assert_eq!(prompt_tokens(json!({"tools": weather, "tool_choice": "none"})), with_tools);
    assert_eq!(prompt_tokens(json!({"tools": weather, "tool_choice": "auto"})), with_tools);
    assert_eq!(prompt_tokens(json!({"tools": []})), plain);

    // A past call (OpenAI's arguments: a JSON string) and its result.
    let history = json!([
        user,
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]);
    let body = json!({"messages": history, "tools": weather, "max_tokens": 1, "temperature": 0});
    let answer = server.answer("/v1/chat/completions", &body);
    assert!(answer["usage"]["prompt_tokens"].as_u64().unwrap() > with_tools + 15, "{answer}");

    // <tool_call> and </tool_call> (151657, 151658) only: empty blocks are no calls.
    let body = json!({"messages": [user], "tools": weather, "max_tokens": 6, "temperature": 0, "ignore_eos": true,
        "logit_bias": {"151657": 100, "151658": 100}});
    let whole = server.answer("/v1/chat/completions", &body);
    let choice = &whole["choices"][0];
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty(), "{whole}");
    assert!(content.replace("<tool_call>", "").replace("</tool_call>", "").is_empty(), "{whole}");
    assert!(choice["message"].get("tool_calls").is_none(), "{whole}");
    assert_eq!(choice["finish_reason"], "length");
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let chunks = chunks(&server.stream("/v1/chat/completions", &streaming));
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, content);
    assert!(chunks.iter().all(|c| c["choices"][0]["delta"].get("tool_calls").is_none()));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
}

/// Sends a `total`-byte body on another thread (announced or chunked) and reads the answer
/// here; (the answer's first line, the bytes sent when the writer stopped).
fn send_huge_body(address: SocketAddr, total: usize, chunked: bool) -> (String, usize) {
    let mut socket = TcpStream::connect(address).unwrap();
    let head = if chunked {
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
    } else {
        format!("POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: {total}\r\n\r\n")
    };
    socket.write_all(head.as_bytes()).unwrap();
    let mut writer = socket.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let block = vec![b'x'; 1 << 16];
        let mut sent = 0;
        while sent < total {
            let ok = if chunked {
                writer.write_all(format!("{:x}\r\n", block.len()).as_bytes()).is_ok()
                    && writer.write_all(&block).is_ok()
                    && writer.write_all(b"\r\n").is_ok()
            } else {
                writer.write_all(&block).is_ok()
            };
            if !ok {
                break;
            }
            sent += block.len();
        }
        sent
    });
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = String::new();
    BufReader::new(&socket).read_line(&mut answer).unwrap();
    let sent = sender.join().unwrap();
    (answer.trim().to_string(), sent)
}

#[test]
fn a_huge_body_is_refused_before_it_is_all_sent() {
    let server = serve(Settings::default());
    let total = 50 << 20;
    // Announced as 50 MB: refused from the headers, before any of the body is read.
    let mut socket = TcpStream::connect(server.address).unwrap();
    write!(socket, "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Length: {total}\r\n\r\n").unwrap();
    let mut head = [0u8; 512];
    let n = socket.read(&mut head).unwrap();
    let text = String::from_utf8_lossy(&head[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    drop(socket);
    for chunked in [false, true] {
        let (status, sent) = send_huge_body(server.address, total, chunked);
        assert!(status.starts_with("HTTP/1.1 413"), "chunked {chunked}: {status}");
        // The server stopped reading at the 8 MiB limit and closed: the rest never went out.
        assert!(sent < total, "chunked {chunked}: the whole body was sent");
    }
    server.answer("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1}));
}

#[test]
fn health_reports_an_engine_that_has_stopped_and_requests_get_503() {
    let server = serve(Settings::default());
    assert_eq!(server.get("/health", None), (200, "ok".to_string()));
    server.engine.shutdown();
    assert_eq!(server.get("/health", None), (503, "the engine has stopped".to_string()));
    let (status, body) = server.post("/v1/completions", &json!({"prompt": [1, 2, 3], "max_tokens": 2}));
    assert_eq!(status, 503, "{body}");
    // The server itself goes on answering.
    assert_eq!(server.get("/v1/models", None).0, 200);
}

#[test]
fn the_api_key_guards_v1_and_leaves_health_and_metrics_open() {
    let config = ServerConfig::builder().port(0).api_key(Some("sekrit".into())).build().unwrap();
    let server = serve(Settings { server: config, ..Default::default() });
    assert_eq!(server.get("/health", None), (200, "ok".to_string()));
    assert_eq!(server.get("/metrics", None).0, 200);
    // vLLM's /ping (GET and POST, as SageMaker probes) and /version, open too.
    assert_eq!(server.get("/ping", None), (200, "ok".to_string()));
    assert_eq!(server.post_bytes("/ping", b"", None), (200, "ok".to_string()));
    let (status, version) = server.get("/version", None);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&version).unwrap()["version"], env!("CARGO_PKG_VERSION"));
    let (status, text) = server.get("/v1/models", None);
    assert_eq!(status, 401, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["code"], "invalid_api_key");
    assert_eq!(server.get("/v1/models", Some("wrong")).0, 401);
    let (status, models) = server.get("/v1/models", Some("sekrit"));
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["max_model_len"], 4096);
    let body = br#"{"prompt": "Hi", "max_tokens": 1}"#;
    assert_eq!(server.post_bytes("/v1/completions", body, None).0, 401);
    assert_eq!(server.post_bytes("/v1/completions", body, Some("sekrit")).0, 200);
    assert_eq!(server.post_bytes("/tokenize", body, None).0, 401);
    assert_eq!(server.post_bytes("/tokenize", body, Some("sekrit")).0, 200);
}

#[test]
fn a_full_queue_answers_429() {
    let server = serve(Settings { max_seqs: 1, max_waiting: 2, ..Default::default() });
    let long = json!({"prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": true});
    let running = server.send_raw("/v1/completions", &long);
    server.wait_until("one runs", |s| s.metric("pio_num_requests_running") == 1.0);
    let waiting = server.send_raw("/v1/completions", &long);
    server.wait_until("one waits", |s| s.metric("pio_num_requests_waiting") == 1.0);
    // Two choices with room for one: the request is refused whole, and neither choice is left
    // in the queue. More choices than the queue holds is a 400 naming `n` (no retry would help).
    let mut two = long.clone();
    two["n"] = json!(2);
    let (status, error) = server.post("/v1/completions", &two);
    assert_eq!((status, &error["error"]["code"]), (429, &json!("overloaded")), "{error}");
    assert_eq!(server.metric("pio_num_requests_waiting"), 1.0);
    two["n"] = json!(3);
    let (status, error) = server.post("/v1/completions", &two);
    assert_eq!((status, &error["error"]["param"]), (400, &json!("n")), "{error}");
    let waiting_too = server.send_raw("/v1/completions", &long);
    server.wait_until("two wait", |s| s.metric("pio_num_requests_waiting") == 2.0);
    let response = ureq::post(&format!("{}/v1/completions", server.base)).send_string(&long.to_string());
    let Err(ureq::Error::Status(429, response)) = response else { panic!("expected a 429: {response:?}") };
    assert_eq!(response.header("retry-after"), Some("1"));
    let error: Value = serde_json::from_str(&response.into_string().unwrap()).unwrap();
    assert_eq!((&error["error"]["type"], &error["error"]["code"]), (&json!("rate_limit_error"), &json!("overloaded")));
    drop((running, waiting, waiting_too));
    server.wait_idle();
}

#[test]
fn usage_is_streamed_only_when_asked_for() {
    let server = serve(Settings::default());
    for (path, mut body) in [
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hi"}]})),
        ("/v1/completions", json!({"prompt": "Once upon"})),
    ] {
        body["max_tokens"] = json!(5);
        body["temperature"] = json!(0);
        let whole = server.answer(path, &body);
        body["stream"] = json!(true);
        let plain = chunks(&server.stream(path, &body));
        assert!(plain.iter().all(|c| c.get("usage").is_none()), "{path}: usage without include_usage: {plain:?}");
        assert!(plain.iter().all(|c| c["choices"].as_array().unwrap().len() == 1));
        body["stream_options"] = json!({"include_usage": true});
        let with = chunks(&server.stream(path, &body));
        let (last, rest) = with.split_last().unwrap();
        assert!(rest.iter().all(|c| c["usage"].is_null() && c.get("usage").is_some()), "{path}: {rest:?}");
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"], whole["usage"], "{path}");
        let chat = path.contains("chat");
        assert_eq!(rest[0]["object"], if chat { "chat.completion.chunk" } else { "text_completion" });
        if chat {
            assert_eq!(rest[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        }

        // vLLM's continuous_usage_stats: every chunk has the usage so far; the counts grow to the
        // finish chunk's, which are the whole answer's (no cache detail until the last chunk).
        body["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
        let running = chunks(&server.stream(path, &body));
        let (last, rest) = running.split_last().unwrap();
        assert_eq!(last["usage"], whole["usage"], "{path}");
        let prompt_tokens = &whole["usage"]["prompt_tokens"];
        let mut before = 0;
        for c in rest {
            let usage = &c["usage"];
            assert_eq!(&usage["prompt_tokens"], prompt_tokens, "{path}: {c}");
            let done = usage["completion_tokens"].as_u64().unwrap();
            assert!(done >= before, "{path}: {c}");
            assert_eq!(usage["total_tokens"], prompt_tokens.as_u64().unwrap() + done, "{path}: {c}");
            assert!(usage.get("prompt_tokens_details").is_none(), "{path}: {c}");
            before = done;
        }
        assert_eq!(
            before,
            whole["usage"]["completion_tokens"].as_u64().unwrap(),
            "{path}: the finish chunk counts all"
        );
        body["stream_options"] = json!({"continuous_usage_stats": true});
        let (status, error) = server.post(path, &body);
        assert_eq!((status, &error["error"]["param"]), (400, &json!("stream_options.continuous_usage_stats")));
    }
}

/// Reads an HTTP/1.1 response with a Content-Length body from `reader`; (head, body).
fn read_response(reader: &mut BufReader<TcpStream>) -> (String, String) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

#[test]
fn http_1_0_and_keep_alive_work_as_hyper_does() {
    let server = serve(Settings::default());
    let exchange = |request: &str| {
        let mut socket = TcpStream::connect(server.address).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        socket.write_all(request.as_bytes()).unwrap();
        let mut all = String::new();
        // HTTP/1.0: the server closes the connection after the answer.
        socket.read_to_string(&mut all).unwrap();
        all
    };
    let health = exchange("GET /health HTTP/1.0\r\n\r\n");
    assert!(health.starts_with("HTTP/1.0 200") && health.ends_with("ok"), "{health}");
    for stream in [false, true] {
        let body = json!({"prompt": "Hi", "max_tokens": 3, "stream": stream}).to_string();
        let answer =
            exchange(&format!("POST /v1/completions HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        assert!(answer.contains(if stream { "data: [DONE]" } else { "\"text_completion\"" }), "{answer}");
    }
    // HTTP/1.1 keeps the connection for the next request.
    let mut socket = TcpStream::connect(server.address).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    for _ in 0..2 {
        let body = json!({"prompt": "Hi", "max_tokens": 2}).to_string();
        write!(socket, "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            .unwrap();
        let (head, body) = read_response(&mut reader);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["usage"]["completion_tokens"], 2);
    }
}

#[test]
fn logprobs_have_each_endpoints_shape_and_metrics_the_protocols() {
    let server = serve(Settings::default());
    let chat = server.answer(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "logprobs": true, "top_logprobs": 3, "ignore_eos": true}),
    );
    let content = chat["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 6);
    for t in content {
        let bytes: Vec<u8> = t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(t["token"].as_str().unwrap(), String::from_utf8_lossy(&bytes), "{t}");
        let logprob = t["logprob"].as_f64().unwrap();
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        assert!(logprob <= 0.0 && logprob <= top[0]["logprob"].as_f64().unwrap() + 1e-6, "{t}");
        assert!(top.iter().all(|a| a["token"].is_string() && a["bytes"].is_array()));
    }
    let text = server
        .answer("/v1/completions", &json!({"prompt": "Once", "max_tokens": 6, "logprobs": 2, "ignore_eos": true}));
    let choice = &text["choices"][0];
    let lp = &choice["logprobs"];
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[key].as_array().map(Vec::len), Some(6), "{key}: {lp}");
    }
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[0] == 0, "{offsets:?}");
    assert!(*offsets.last().unwrap() as usize <= choice["text"].as_str().unwrap().chars().count());
    assert!(lp["top_logprobs"].as_array().unwrap().iter().all(|m| (1..=2).contains(&m.as_object().unwrap().len())));

    // The engine publishes a step's counters after the step: wait for the last one's.
    server.wait_until("both requests counted", |s| s.metric("pio_generation_tokens_total") == 12.0);
    let (_, metrics) = server.get("/metrics", None);
    // The model-server protocol's gauges, under pio's and vLLM's names.
    for (name, kind) in [
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:num_requests_running", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("pio_num_requests_waiting", "gauge"),
        ("pio_num_requests_running", "gauge"),
        ("pio_kv_cache_usage_ratio", "gauge"),
        ("pio_time_to_first_token_seconds", "histogram"),
        ("pio_inter_token_latency_seconds", "histogram"),
        ("pio_prompt_tokens_total", "counter"),
        ("pio_generation_tokens_total", "counter"),
        ("pio_prefix_cache_hits_total", "counter"),
        ("pio_prefix_cache_queries_total", "counter"),
    ] {
        assert!(metrics.contains(&format!("# TYPE {name} {kind}\n")), "{name} {kind}:\n{metrics}");
    }
    assert_eq!(server.metric("pio_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(server.metric("vllm:kv_cache_usage_perc"), 0.0);
    assert!(
        metrics.contains("pio_requests_finished_total{model_name=\"graphs\",finished_reason=\"length\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pio_time_to_first_token_seconds_bucket{model_name=\"graphs\",le=\"+Inf\"} 2"),
        "{metrics}"
    );
}

/// `tokens`, `text_offset` and `text` of a completion with logprobs.
fn completion_logprobs(answer: &Value) -> (Vec<String>, Vec<u64>, String) {
    let lp = &answer["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let offsets = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    (tokens, offsets, answer["choices"][0]["text"].as_str().unwrap().to_string())
}

#[test]
fn text_offsets_count_each_tokens_own_text() {
    // A stop string that starts with a generated token but never matches holds that token's
    // text back until the next token: the offsets must not shift with it, streamed or not.
    let server = serve(Settings::default());
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 0, "ignore_eos": true});
    let (tokens, offsets, text) = completion_logprobs(&server.answer("/v1/completions", &body));
    let mut expected = vec![0u64];
    for t in &tokens[..tokens.len() - 1] {
        expected.push(expected.last().unwrap() + t.chars().count() as u64);
    }
    assert_eq!(offsets, expected, "{tokens:?}");
    let held = (0..tokens.len() - 1)
        .find(|&i| !tokens[i].is_empty() && !tokens[i].contains('\u{fffd}'))
        .expect("a token with whole characters");
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([format!("{}\u{1}\u{1}", tokens[held])]);
    let (tokens_stop, offsets_stop, text_stop) = completion_logprobs(&server.answer("/v1/completions", &with_stop));
    assert_eq!((&tokens_stop, &text_stop), (&tokens, &text));
    assert_eq!(offsets_stop, offsets, "non-streamed, with the stop string");
    with_stop["stream"] = json!(true);
    let streamed: Vec<u64> = chunks(&server.stream("/v1/completions", &with_stop))
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["text_offset"].as_array().cloned())
        .flatten()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(streamed, offsets, "streamed, with the stop string");
}

#[test]
fn n_choices_answer_as_lone_requests_seeded_one_apart() {
    // No prefix cache: the lone requests would hit the prompt the choices cached, which moves
    // logprobs in their last bits (see `concurrent_streams_answer_as_each_alone`).
    let server = serve(Settings { prefix_caching: false, ..Default::default() });
    for (path, mut body) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 2}),
        ),
        ("/v1/completions", json!({"prompt": "Once upon", "logprobs": 2})),
    ] {
        let chat = path.contains("chat");
        for (key, value) in [
            ("max_tokens", json!(6)),
            ("temperature", json!(1.0)),
            ("seed", json!(41)),
            ("ignore_eos", json!(true)),
            ("return_token_ids", json!(true)),
            ("n", json!(3)),
        ] {
            body[key] = value;
        }
        let whole = server.answer(path, &body);
        let choices = whole["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3, "{path}: {whole}");
        let mut alone_usage = None;
        for (i, choice) in choices.iter().enumerate() {
            assert_eq!(choice["index"], i, "{path}");
            let mut alone = body.clone();
            alone["n"] = json!(1);
            alone["seed"] = json!(41 + i);
            let lone = server.answer(path, &alone);
            answer_of(choice, chat)
                .assert_same_as(&answer_of(&lone["choices"][0], chat), &format!("{path}: choice {i}"));
            alone_usage = Some(lone["usage"].clone());
        }
        assert_ne!(choices[0]["token_ids"], choices[1]["token_ids"], "{path}: the seeds differ");
        // The prompt counted once, the completions summed.
        let prompt_tokens = alone_usage.unwrap()["prompt_tokens"].as_u64().unwrap();
        assert_eq!(
            whole["usage"],
            json!({"prompt_tokens": prompt_tokens, "completion_tokens": 18, "total_tokens": prompt_tokens + 18,
                   "prompt_tokens_details": {"cached_tokens": 0}}),
            "{path}"
        );

        // Streamed: each choice's chunks make the same answer, with one finish reason each, then
        // the same usage and one [DONE].
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let events = server.stream(path, &body);
        assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1, "{path}");
        let chunks = chunks(&events);
        for (i, choice) in choices.iter().enumerate() {
            let of_choice: Vec<Value> = chunks.iter().filter(|c| c["choices"][0]["index"] == i).cloned().collect();
            assert!(of_choice.iter().all(|c| c["choices"].as_array().unwrap().len() == 1));
            streamed_answer(&of_choice, chat)
                .assert_same_as(&answer_of(choice, chat), &format!("{path}: streamed choice {i}"));
            let reasons = of_choice.iter().filter(|c| c["choices"][0]["finish_reason"].is_string()).count();
            assert_eq!(reasons, 1, "{path}: choice {i}");
            if chat {
                assert_eq!(of_choice[0]["choices"][0]["delta"]["role"], "assistant", "{path}: choice {i}");
            }
        }
        let (last, _) = chunks.split_last().unwrap();
        assert_eq!((&last["choices"], &last["usage"]), (&json!([]), &whole["usage"]), "{path}");
    }
}

#[test]
fn a_batch_of_prompts_answers_each_as_a_lone_request() {
    // As in `n_choices_answer_as_lone_requests_seeded_one_apart`: no prefix cache.
    let server = serve(Settings { prefix_caching: false, ..Default::default() });
    let path = "/v1/completions";
    let prompts = ["Once upon", "The quick brown fox jumps", "A"];
    let mut body = json!({"prompt": prompts, "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 11,
                          "ignore_eos": true, "return_token_ids": true, "logprobs": 1});
    let whole = server.answer(path, &body);
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6, "{whole}");
    // Choice p * n + i is prompt p's i-th, answered as that prompt alone with seed + i.
    let mut prompt_tokens = 0;
    for (p, prompt) in prompts.iter().enumerate() {
        for i in 0..2 {
            let index = p * 2 + i;
            let choice = &choices[index];
            assert_eq!(choice["index"], index);
            let alone = json!({"prompt": prompt, "max_tokens": 5, "temperature": 1.0, "seed": 11 + i,
                               "ignore_eos": true, "return_token_ids": true, "logprobs": 1});
            let lone = server.answer(path, &alone);
            answer_of(choice, false).assert_same_as(&answer_of(&lone["choices"][0], false), &format!("choice {index}"));
            assert_eq!(choice["prompt_token_ids"], lone["choices"][0]["prompt_token_ids"], "choice {index}");
            if i == 0 {
                prompt_tokens += lone["usage"]["prompt_tokens"].as_u64().unwrap();
            }
        }
    }
    // Each prompt counted once, every completion summed.
    assert_eq!(
        whole["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 30, "total_tokens": prompt_tokens + 30,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );

    // The same prompts as token ids answer the same.
    let ids: Vec<Value> = choices.iter().step_by(2).map(|c| c["prompt_token_ids"].clone()).collect();
    let mut by_ids = body.clone();
    by_ids["prompt"] = json!(ids);
    let answered = server.answer(path, &by_ids);
    for (index, choice) in choices.iter().enumerate() {
        answer_of(&answered["choices"][index], false)
            .assert_same_as(&answer_of(choice, false), &format!("ids {index}"));
    }

    // Streamed: each choice's chunks make its answer, then the same usage and one [DONE].
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = server.stream(path, &body);
    let chunks = chunks(&events);
    for (index, choice) in choices.iter().enumerate() {
        let of_choice: Vec<Value> = chunks.iter().filter(|c| c["choices"][0]["index"] == index).cloned().collect();
        streamed_answer(&of_choice, false).assert_same_as(&answer_of(choice, false), &format!("streamed {index}"));
    }
    let (last, _) = chunks.split_last().unwrap();
    assert_eq!((&last["choices"], &last["usage"]), (&json!([]), &whole["usage"]));

    // A refused batch names the prompt at fault.
    let long = "word ".repeat(5000);
    for (prompt, code) in
        [(json!(["Once upon", long, "A"]), Some("context_length_exceeded")), (json!([[1, 2], [3, 999_999_999]]), None)]
    {
        let (status, answer) = server.post(path, &json!({"prompt": prompt, "max_tokens": 2}));
        assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("prompt[1]")), "{answer}");
        assert_eq!(answer["error"]["code"].as_str(), code, "{answer}");
    }
    server.wait_idle();
}

#[test]
fn models_are_listed_and_retrieved_by_a_name_with_slashes() {
    let server = serve(Settings { served_name: Some("org/pio-test"), ..Default::default() });
    let (status, list) = server.get("/v1/models", None);
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["data"][0]["id"], "org/pio-test");
    let (status, card) = server.get("/v1/models/org/pio-test", None);
    assert_eq!(status, 200, "{card}");
    assert_eq!(serde_json::from_str::<Value>(&card).unwrap(), list["data"][0]);
    let (status, error) = server.get("/v1/models/org/other", None);
    let error: Value = serde_json::from_str(&error).unwrap();
    assert_eq!(
        (status, &error["error"]["code"], &error["error"]["param"]),
        (404, &json!("model_not_found"), &json!("model"))
    );
    assert!(error["error"]["message"].as_str().unwrap().contains("org/pio-test"), "{error}");
    // Requests name it too.
    server.answer("/v1/completions", &json!({"model": "org/pio-test", "prompt": "Hi", "max_tokens": 1}));
}

#[test]
fn tokenize_gives_the_ids_generation_gets_and_detokenize_the_text_back() {
    let server = serve(Settings::default());
    // A chat, through the template with the generation prompt: the ids a generation starts from.
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]);
    let chat = server
        .answer("/v1/chat/completions", &json!({"messages": messages, "max_tokens": 1, "return_token_ids": true}));
    let tokenized = server.answer("/tokenize", &json!({"messages": messages, "return_token_strs": true}));
    assert_eq!(tokenized["tokens"], chat["prompt_token_ids"], "{tokenized}");
    let count = tokenized["tokens"].as_array().unwrap().len();
    assert_eq!(tokenized["count"], count);
    assert_eq!(tokenized["token_strs"].as_array().map(Vec::len), Some(count));
    let (_, models) = server.get("/v1/models", None);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(tokenized["max_model_len"], models["data"][0]["max_model_len"]);
    // Without the generation prompt, fewer tokens.
    let bare = server.answer("/tokenize", &json!({"messages": messages, "add_generation_prompt": false}));
    assert!(bare["count"].as_u64().unwrap() < count as u64, "{bare}");

    // A prompt: its ids as /v1/completions gets them, and /detokenize gives the text back.
    let text = "Once upon a time, in a land";
    let completion =
        server.answer("/v1/completions", &json!({"prompt": text, "max_tokens": 1, "return_token_ids": true}));
    let tokenized = server.answer("/tokenize", &json!({"prompt": text}));
    assert_eq!(tokenized["tokens"], completion["choices"][0]["prompt_token_ids"]);
    assert!(tokenized.get("token_strs").is_none(), "{tokenized}");
    let detokenized = server.answer("/detokenize", &json!({"tokens": tokenized["tokens"]}));
    assert_eq!(detokenized["prompt"], text);

    // Bad input: a 4xx naming the field, and the server goes on.
    for (path, body, status, param) in [
        ("/tokenize", json!({"prompt": ["a", "b"]}), 400, "prompt"),
        ("/tokenize", json!({"prompt": [1, 99999999]}), 400, "prompt[1]"),
        ("/tokenize", json!({"messages": messages, "add_special_tokens": true}), 400, "add_special_tokens"),
        ("/tokenize", json!({"prompt": "a", "return_token_strs": 1}), 400, "return_token_strs"),
        ("/tokenize", json!({"messages": [{"role": "robot", "content": "x"}]}), 400, "messages[0].role"),
        ("/tokenize", json!({"prompt": "a", "model": "another"}), 404, "model"),
        ("/detokenize", json!({"tokens": [1, -2]}), 400, "tokens[1]"),
        ("/detokenize", json!({"tokens": [99999999]}), 400, "tokens[0]"),
        ("/detokenize", json!({"tokens": "abc"}), 400, "tokens"),
        ("/detokenize", json!({}), 400, "tokens"),
    ] {
        let (got, error) = server.post(path, &body);
        assert_eq!((got, error["error"]["param"].as_str()), (status, Some(param)), "{path} {body}: {error}");
    }
    let (status, error) = server.post("/tokenize", &json!([1]));
    assert_eq!(status, 400);
    assert!(error["error"]["message"].as_str().unwrap().contains("not a request object"), "{error}");
    server.answer("/tokenize", &json!({"prompt": "still serving"}));
}

/// Structured outputs over HTTP: the random-weight model's answer takes the shape of the
/// constraint, on both endpoints, and ends with `stop` when the constraint is complete.
#[test]
fn structured_outputs_shape_the_answer_on_both_endpoints() {
    let server = serve(Settings::default());
    let message = json!([{"role": "user", "content": "Yes or no?"}]);
    let answer = server.answer(
        "/v1/chat/completions",
        &json!({"messages": message, "max_tokens": 16, "structured_outputs": {"choice": ["yes", "no"]}}),
    );
    let choice = &answer["choices"][0];
    assert!(["yes", "no"].contains(&choice["message"]["content"].as_str().unwrap()), "{answer}");
    assert_eq!(choice["finish_reason"], "stop", "{answer}");
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"], "additionalProperties": false});
    let answer = server.answer(
        "/v1/chat/completions",
        &json!({"messages": message, "max_tokens": 64, "seed": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "digit", "schema": schema, "strict": true}}}),
    );
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    let value: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert!(value["n"].as_u64().is_some_and(|n| n <= 9) && value.as_object().unwrap().len() == 1, "{answer}");
    let answer =
        server.answer("/v1/completions", &json!({"prompt": "Digits:", "max_tokens": 16, "guided_regex": "[0-9]{4}"}));
    let text = answer["choices"][0]["text"].as_str().unwrap();
    assert!(text.len() == 4 && text.bytes().all(|b| b.is_ascii_digit()), "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
}

/// The calls of a chat choice, whole or streamed: (name, arguments) each, with its checks: the
/// whole answer's calls have ids and no content beside them, the streamed ones come one per
/// delta, in order, and no content delta carries text.
fn forced_calls(choice: &Value) -> Vec<(String, String)> {
    assert!(choice["message"]["content"].is_null(), "{choice}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("no calls: {choice}"));
    calls
        .iter()
        .map(|c| {
            assert!(c["id"].as_str().unwrap().starts_with("call_") && c["type"] == "function", "{c}");
            (c["function"]["name"].as_str().unwrap().into(), c["function"]["arguments"].as_str().unwrap().into())
        })
        .collect()
}

fn streamed_forced_calls(chunks: &[Value], index: usize) -> (Vec<(String, String)>, String) {
    let mut calls = Vec::new();
    let mut finish = String::new();
    for choice in chunks.iter().map(|c| &c["choices"][0]).filter(|c| c["index"] == index) {
        assert!(choice["delta"]["content"].as_str().is_none_or(str::is_empty), "{choice}");
        for call in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(call["index"], calls.len(), "{choice}");
            let function = &call["function"];
            calls.push((function["name"].as_str().unwrap().into(), function["arguments"].as_str().unwrap().into()));
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.into();
        }
    }
    (calls, finish)
}

/// `tool_choice` `"required"` and a named function: the random-weight model's answer is
/// constrained to the calls' JSON, and the calls are read from it: arguments valid against the
/// tool's schema, the same streamed as whole for one seed, for each of `n` choices; an answer
/// cut short is no call.
#[test]
fn forced_tool_calls_are_constrained_json_read_as_calls() {
    let server = serve(Settings::default());
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather",
            "parameters": {"type": "object", "properties": {
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["unit", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"], "additionalProperties": false}}},
    ]);
    // Checked by hand against the schemas above.
    let valid = |(name, arguments): &(String, String)| {
        let value: Value = serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{e}: {arguments}"));
        let args = value.as_object().unwrap();
        match name.as_str() {
            "get_weather" => {
                args.len() == 2
                    && ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap_or_default())
                    && args["days"].as_u64().is_some_and(|d| (1..=7).contains(&d))
            }
            "get_time" => args.len() == 1 && ["UTC", "CET"].contains(&args["zone"].as_str().unwrap_or_default()),
            _ => false,
        }
    };
    let messages = json!([{"role": "user", "content": "Weather for the next days?"}]);
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let cases = [(named.clone(), 1, "stop"), (json!("required"), 2, "tool_calls")];
    for (tool_choice, n, reason) in cases {
        let mut body = json!({"messages": messages, "tools": tools, "tool_choice": tool_choice, "n": n,
            "max_tokens": 400, "seed": 7});
        let whole = server.answer("/v1/chat/completions", &body);
        body["stream"] = json!(true);
        let chunks = chunks(&server.stream("/v1/chat/completions", &body));
        for (index, choice) in whole["choices"].as_array().unwrap().iter().enumerate() {
            let calls = forced_calls(choice);
            assert!(!calls.is_empty() && calls.iter().all(valid), "{tool_choice}: {whole}");
            if tool_choice == named {
                assert_eq!(calls.len(), 1, "{whole}");
                assert_eq!(calls[0].0, "get_weather");
            }
            assert_eq!(choice["finish_reason"], reason, "{tool_choice}: {whole}");
            assert_eq!(streamed_forced_calls(&chunks, index), (calls, reason.to_string()), "{tool_choice}");
        }
    }

    // parallel_tool_calls: false: "required" makes exactly one call, in every choice.
    let body = json!({"messages": messages, "tools": tools, "tool_choice": "required", "n": 4, "max_tokens": 400,
        "seed": 7, "parallel_tool_calls": false});
    let whole = server.answer("/v1/chat/completions", &body);
    for choice in whole["choices"].as_array().unwrap() {
        let calls = forced_calls(choice);
        assert!(calls.len() == 1 && calls.iter().all(valid), "{whole}");
    }
    let (status, error) = server.post("/v1/chat/completions", &json!({"messages": messages, "parallel_tool_calls": 2}));
    assert_eq!((status, &error["error"]["param"]), (400, &json!("parallel_tool_calls")), "{error}");

    // Cut short: no call from JSON that does not parse, the text as content, and `length`.
    let body = json!({"messages": messages, "tools": tools, "tool_choice": named, "max_tokens": 3, "seed": 7});
    let whole = server.answer("/v1/chat/completions", &body);
    let choice = &whole["choices"][0];
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(content).is_err() && choice["message"].get("tool_calls").is_none());
    assert_eq!(choice["finish_reason"], "length", "{whole}");
}

/// The prompt's tokens as a completion's `echo` gives them: (tokens, token_logprobs,
/// top_logprobs, text_offset) of its logprobs.
fn echoed(choice: &Value) -> (Vec<String>, Vec<Option<f64>>, Vec<Value>, Vec<u64>) {
    let lp = &choice["logprobs"];
    let list = |key: &str| lp[key].as_array().unwrap_or_else(|| panic!("no {key}: {choice}")).clone();
    (
        list("tokens").iter().map(|t| t.as_str().unwrap().to_string()).collect(),
        list("token_logprobs").iter().map(Value::as_f64).collect(),
        list("top_logprobs"),
        list("text_offset").iter().map(|o| o.as_u64().unwrap()).collect(),
    )
}

/// lm-evaluation-harness scores text with `echo`, `logprobs` and `max_tokens: 0`: the prompt
/// comes back as the text with each token's logprob (none for the first), and the logprob of a
/// token scored in the prompt is the one it gets when generated after the same tokens. vLLM's
/// `prompt_logprobs` gives the same numbers by token id in both endpoints; echo streams the
/// prompt first. The graph returns last-position logits only, so the engine scores the prompt
/// one token per run.
#[test]
fn echo_and_prompt_logprobs_score_the_prompt_as_generation_would() {
    let server = serve(Settings::default());
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let context = random_ids(&mut rng, 12);
    let next = server.answer(
        "/v1/completions",
        &json!({"prompt": context, "max_tokens": 1, "temperature": 0, "logprobs": 0, "ignore_eos": true, "return_token_ids": true}),
    );
    let generated = next["choices"][0]["token_ids"][0].as_u64().unwrap() as u32;
    let generated_logprob = next["choices"][0]["logprobs"]["token_logprobs"][0].as_f64().unwrap();
    let mut scored = context.clone();
    scored.push(generated);

    let body = json!({"prompt": scored, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0});
    let answer = server.answer("/v1/completions", &body);
    let choice = &answer["choices"][0];
    let (tokens, logprobs, tops, offsets) = echoed(choice);
    assert_eq!(tokens.len(), scored.len(), "{choice}");
    assert_eq!(tokens.concat(), choice["text"].as_str().unwrap(), "the text is the prompt");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(answer["usage"]["completion_tokens"], 0, "{answer}");
    assert_eq!((logprobs[0], &tops[0]), (None, &Value::Null), "nothing predicts the first token");
    assert!(logprobs[1..].iter().all(|l| l.is_some_and(|l| l <= 0.0)), "{logprobs:?}");
    assert!(tops[1..].iter().all(|t| t.as_object().is_some_and(|m| m.len() == 1)), "{tops:?}");
    let last = logprobs[scored.len() - 1].unwrap();
    assert!((last - generated_logprob).abs() < 1e-4, "scored {last}, generated {generated_logprob}");
    // It was the greedy choice: it is the most likely token there.
    assert_eq!(tops[scored.len() - 1].as_object().unwrap().values().next().unwrap().as_f64(), Some(last));
    let mut expected = vec![0u64];
    for t in &tokens[..tokens.len() - 1] {
        expected.push(expected.last().unwrap() + t.chars().count() as u64);
    }
    assert_eq!(offsets, expected);

    // vLLM's prompt_logprobs: by id, the prompt's token with its rank, then the alternatives.
    let by_id = server.answer(
        "/v1/completions",
        &json!({"prompt": scored, "max_tokens": 2, "prompt_logprobs": 2, "temperature": 0, "ignore_eos": true}),
    );
    let positions = by_id["choices"][0]["prompt_logprobs"].as_array().unwrap().clone();
    assert_eq!(positions.len(), scored.len());
    assert!(positions[0].is_null());
    for (p, entry) in positions.iter().enumerate().skip(1) {
        let map = entry.as_object().unwrap();
        let own = &map[&scored[p].to_string()];
        assert!((own["logprob"].as_f64().unwrap() - logprobs[p].unwrap()).abs() < 1e-4, "{p}: {entry}");
        assert!(own["rank"].as_u64().unwrap() >= 1 && own["decoded_token"].as_str() == Some(tokens[p].as_str()));
        assert!((2..=3).contains(&map.len()), "{p}: {entry}");
    }
    assert_eq!(positions[scored.len() - 1][generated.to_string()]["rank"], 1);
    let chat = server.answer(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0, "return_token_ids": true}),
    );
    let prompt_ids = chat["prompt_token_ids"].as_array().unwrap();
    let positions = chat["prompt_logprobs"].as_array().unwrap();
    assert_eq!(positions.len(), prompt_ids.len());
    assert!(positions[1..]
        .iter()
        .zip(&prompt_ids[1..])
        .all(|(p, id)| p.as_object().unwrap().contains_key(&id.to_string())));

    // Streamed, echo sends the prompt (with its logprobs) before the answer's tokens.
    let body =
        json!({"prompt": scored, "max_tokens": 3, "echo": true, "logprobs": 1, "temperature": 0, "ignore_eos": true});
    let whole = server.answer("/v1/completions", &body);
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let streamed_chunks = chunks(&server.stream("/v1/completions", &streaming));
    assert_eq!(
        streamed_chunks[0]["choices"][0]["text"].as_str(),
        Some(tokens.concat().as_str()),
        "the prompt comes first"
    );
    let text: String = streamed_chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let streamed: Vec<Value> = streamed_chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["token_logprobs"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed.len(), scored.len() + 3);
    assert_eq!(&Value::Array(streamed), &whole["choices"][0]["logprobs"]["token_logprobs"]);

    // 0 while streaming is taken (vLLM's rule) and gives nothing.
    let zero = json!({"prompt": "a", "max_tokens": 1, "prompt_logprobs": 0, "stream": true});
    assert!(chunks(&server.stream("/v1/completions", &zero))
        .iter()
        .all(|c| c["choices"][0].get("prompt_logprobs").is_none()));
    for (body, field) in [
        (json!({"prompt": "a", "prompt_logprobs": 1, "stream": true}), "prompt_logprobs"),
        (json!({"prompt": "a", "prompt_logprobs": 21}), "prompt_logprobs"),
        (json!({"prompt": "a", "allowed_token_ids": [151_645], "min_tokens": 1}), "allowed_token_ids"),
        (json!({"prompt": "a", "prompt_logprobs": -1}), "prompt_logprobs"),
        (json!({"prompt": "a", "max_tokens": 0}), "max_tokens"),
        (json!({"messages": [{"role": "user", "content": "a"}], "echo": true}), "echo"),
    ] {
        let path = if body.get("messages").is_some() { "/v1/chat/completions" } else { "/v1/completions" };
        server.assert_refused(path, &body, field);
    }
    server.wait_idle();
}

/// `continue_final_message` (vLLM's, transformers'): the prompt ends with the assistant text the
/// client began, open, and the answer continues it; `/tokenize` gives the same prompt. With
/// `add_generation_prompt` left at its default it is a 400, as in vLLM.
#[test]
fn continue_final_message_continues_the_assistant_text_the_client_began() {
    let server = serve(Settings::default());
    let messages =
        json!([{"role": "user", "content": "List three primes."}, {"role": "assistant", "content": "Sure: 2, 3"}]);
    let tokenized = server.answer(
        "/tokenize",
        &json!({"messages": messages, "continue_final_message": true, "add_generation_prompt": false}),
    );
    let ids = tokenized["tokens"].clone();
    let text = server.answer("/detokenize", &json!({"tokens": ids}))["prompt"].as_str().unwrap().to_string();
    assert!(text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\nSure: 2, 3"), "{text:?}");
    let chat = server.answer(
        "/v1/chat/completions",
        &json!({"messages": messages, "continue_final_message": true, "add_generation_prompt": false, "max_tokens": 5,
                "temperature": 0, "ignore_eos": true, "return_token_ids": true}),
    );
    assert_eq!(chat["prompt_token_ids"], ids);
    let completion = server
        .answer("/v1/completions", &json!({"prompt": ids, "max_tokens": 5, "temperature": 0, "ignore_eos": true}));
    assert_eq!(chat["choices"][0]["message"]["content"], completion["choices"][0]["text"]);
    let refused = json!({"messages": messages, "continue_final_message": true});
    server.assert_refused("/v1/chat/completions", &refused, "continue_final_message");
}

/// vLLM's vocabulary rules and prompt truncation: `allowed_token_ids` keeps every generated id
/// in the set (sampled or greedy); `bad_words` bans a word the greedy answer would write, and the
/// answer is the same up to where it would have; `truncate_prompt_tokens` answers as the prompt's
/// last tokens alone.
#[test]
fn allowed_ids_bad_words_and_prompt_truncation_shape_the_answer() {
    let server = serve(Settings::default());
    let path = "/v1/completions";
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let prompt = random_ids(&mut rng, 40);
    let allowed = random_ids(&mut rng, 3);
    for temperature in [0.0, 1.0] {
        let answer = server.answer(
            path,
            &json!({"prompt": prompt, "max_tokens": 8, "temperature": temperature, "seed": 3, "ignore_eos": true,
                    "allowed_token_ids": allowed, "return_token_ids": true}),
        );
        let ids = answer["choices"][0]["token_ids"].as_array().unwrap();
        assert_eq!(ids.len(), 8);
        assert!(ids.iter().all(|id| allowed.contains(&(id.as_u64().unwrap() as u32))), "{ids:?} outside {allowed:?}");
    }

    let greedy =
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let ids_of = |answer: &Value| -> Vec<u32> {
        answer["choices"][0]["token_ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
    };
    let before = ids_of(&server.answer(path, &greedy));
    // A generated token that is a word on its own: it tokenizes back to itself, with a leading space or without.
    let (at, word) = before
        .iter()
        .enumerate()
        .find_map(|(at, &id)| {
            let text = server.answer("/detokenize", &json!({"tokens": [id]}))["prompt"].as_str()?.to_string();
            let word = text.trim_start().to_string();
            let alone = |t: String| server.answer("/tokenize", &json!({"prompt": t}))["tokens"] == json!([id]);
            (!word.is_empty() && !word.contains('\u{fffd}') && (alone(word.clone()) || alone(format!(" {word}"))))
                .then_some((at, word))
        })
        .expect("a generated token that is a word");
    let mut banned = greedy.clone();
    banned["bad_words"] = json!([word]);
    let after = ids_of(&server.answer(path, &banned));
    assert_eq!(after[..at], before[..at], "the same answer up to the banned word");
    assert!(!after.contains(&before[at]), "{word:?} ({}) was generated: {after:?}", before[at]);

    let last = &prompt[30..];
    let mut truncated = greedy.clone();
    truncated["truncate_prompt_tokens"] = json!(10);
    let cut = server.answer(path, &truncated);
    assert_eq!(cut["usage"]["prompt_tokens"], 10);
    assert_eq!(cut["choices"][0]["prompt_token_ids"], json!(last));
    let mut alone = greedy.clone();
    alone["prompt"] = json!(last);
    assert_eq!(ids_of(&cut), ids_of(&server.answer(path, &alone)));

    for (extra, field) in [
        (json!({"allowed_token_ids": []}), "allowed_token_ids"),
        (json!({"allowed_token_ids": [999_999_999]}), "allowed_token_ids"),
        (json!({"allowed_token_ids": [-1]}), "allowed_token_ids[0]"),
        (json!({"bad_words": [" "]}), "bad_words"),
        (json!({"bad_words": "word"}), "bad_words"),
        (json!({"truncate_prompt_tokens": 0}), "truncate_prompt_tokens"),
    ] {
        let mut body = json!({"prompt": "Once", "max_tokens": 2});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        server.assert_refused(path, &body, field);
    }
    server.wait_idle();
}

/// vLLM's `cache_salt`: `cached_tokens` reports prefix hits only between requests with the same
/// salt; an empty salt is a 400.
#[test]
fn a_cache_salt_keeps_prefix_hits_within_the_salt() {
    let server = serve(Settings::default());
    let prompt = random_ids(&mut ChaCha8Rng::seed_from_u64(12), 64);
    let cached = |salt: Option<&str>| {
        let mut body = json!({"prompt": prompt, "max_tokens": 2, "temperature": 0});
        if let Some(salt) = salt {
            body["cache_salt"] = json!(salt);
        }
        server.answer("/v1/completions", &body)["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap()
    };
    assert_eq!(cached(Some("a")), 0);
    assert_eq!(cached(Some("b")), 0, "another salt");
    assert_eq!(cached(None), 0, "no salt");
    // The first request kept its prompt and answer: all but the last prompt token, which always runs.
    assert_eq!(cached(Some("a")), 63, "the same salt");
    server.assert_refused("/v1/completions", &json!({"prompt": "a", "cache_salt": ""}), "cache_salt");
}

/// vLLM's `return_tokens_as_token_ids`: logprobs spell each token (and its alternatives)
/// `token_id:ID`, in both endpoints, streamed or not, the echoed prompt's too.
#[test]
fn tokens_as_token_ids_spell_logprobs_by_id() {
    let server = serve(Settings::default());
    let spelled = |ids: &Value| -> Vec<String> {
        ids.as_array().unwrap().iter().map(|id| format!("token_id:{}", id.as_u64().unwrap())).collect()
    };
    let body = json!({"prompt": "Once upon", "max_tokens": 4, "temperature": 0, "ignore_eos": true, "logprobs": 2,
                      "echo": true, "return_token_ids": true, "return_tokens_as_token_ids": true});
    let answer = server.answer("/v1/completions", &body);
    let choice = &answer["choices"][0];
    let mut expected = spelled(&choice["prompt_token_ids"]);
    expected.extend(spelled(&choice["token_ids"]));
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"], json!(expected), "{lp}");
    assert!(lp["top_logprobs"].as_array().unwrap().iter().skip(1).all(|m| m
        .as_object()
        .unwrap()
        .keys()
        .all(|k| k.starts_with("token_id:"))));
    let offsets: Vec<u64> = expected
        .iter()
        .scan(0, |at, t| {
            let here = *at;
            *at += t.len() as u64;
            Some(here)
        })
        .collect();
    assert_eq!(lp["text_offset"], json!(offsets));
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let streamed: Vec<Value> = chunks(&server.stream("/v1/completions", &streaming))
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(json!(streamed), json!(expected));

    let chat = server.answer(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": true, "top_logprobs": 1,
                "return_token_ids": true, "return_tokens_as_token_ids": true, "ignore_eos": true}),
    );
    let content = chat["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let tokens: Vec<&str> = content.iter().map(|t| t["token"].as_str().unwrap()).collect();
    assert_eq!(tokens, spelled(&chat["choices"][0]["token_ids"]));
    assert!(content.iter().all(|t| t["bytes"] == json!(t["token"].as_str().unwrap().as_bytes())));
}
