//! GLM-4.5/4.7 chat on the `glm4moe-a` fixture, with the tokenizer the tests build
//! (scripts/make_glm_tokenizer.py: a 512-id byte-level BPE with GLM's special tokens at the top of
//! the id range and a GLM-format chat template in its tokenizer_config.json; no GLM tokenizer can be
//! downloaded here).
//!
//! * The template renders byte for byte what transformers' `apply_chat_template` renders, and the
//!   Rust tokenizer gives the same ids (tests/fixtures/chat/glm4_chat_references.json).
//! * The prompt has GLM's structure: `[gMASK]<sop>` once at the start, `<|system|>` / `<|user|>` /
//!   `<|assistant|>` / `<|observation|>` turns as single special ids, `<think></think>` after the
//!   generation prompt when thinking is off, reasoning kept only after the last user message, tools as
//!   JSON lines in the system turn.
//! * End to end: the exported checkpoint carries the tokenizer and template, its eos ids are GLM's
//!   (`<|endoftext|>`, `<|user|>`, `<|observation|>`), and greedy chat generation streams text and stops
//!   at an eos id exactly as transformers' `generate` does.

mod common;

use std::path::PathBuf;

use common::*;
use pio_runtime::chat_template::{ChatTemplate, RenderOptions};
use pio_runtime::engine::{Engine, Prompt, Request};
use pio_runtime::generate::{FinishReason, GenerateOptions};
use pio_runtime::sampling::SamplingParams;
use pio_runtime::tokenizer::Tokenizer;
use serde_json::{json, Value};

const FIXTURE: &str = "glm4moe-a";
const VOCAB_SIZE: usize = 512;
/// GLM's stop tokens: generation ends at the end of text, or when the model opens the next user turn
/// or a tool result.
const EOS_TOKENS: [&str; 3] = ["<|endoftext|>", "<|user|>", "<|observation|>"];
const CONTROL_TOKENS: [&str; 10] = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
];
const MARKUP_TOKENS: [&str; 10] = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
];

fn fixture() -> PathBuf {
    fixtures_dir().join(FIXTURE)
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(fixture()).unwrap_or_else(|e| panic!("{e} (regenerate with scripts/make_glm_tokenizer.py)"))
}

fn template() -> ChatTemplate {
    ChatTemplate::from_tokenizer(&tokenizer()).unwrap()
}

fn id(tok: &Tokenizer, token: &str) -> u32 {
    tok.token_to_id(token).unwrap_or_else(|| panic!("{token} is not in the GLM test tokenizer"))
}

fn read_json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn references() -> Vec<Value> {
    let path = fixtures_dir().join("chat").join("glm4_chat_references.json");
    let cases = read_json(path).as_array().unwrap().clone();
    assert!(cases.len() >= 10, "expected the full reference set");
    cases
}

fn options(add_generation_prompt: bool, enable_thinking: Option<bool>) -> RenderOptions {
    RenderOptions { add_generation_prompt, enable_thinking, ..Default::default() }
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

// ---- the tokenizer ----------------------------------------------------------------------------

/// The test tokenizer fits the checkpoint (512 ids), has GLM's special tokens at the top of the id range,
/// and config.json / generation_config.json use GLM's eos and pad tokens.
#[test]
fn glm_tokenizer_fits_the_checkpoint_and_its_eos_ids() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), VOCAB_SIZE);
    let config = read_json(fixture().join("config.json"));
    assert_eq!(config["vocab_size"], json!(VOCAB_SIZE));
    let first = (VOCAB_SIZE - CONTROL_TOKENS.len() - MARKUP_TOKENS.len() - 1) as u32;
    for (i, token) in CONTROL_TOKENS.iter().chain(&MARKUP_TOKENS).enumerate() {
        assert_eq!(id(&tok, token), first + i as u32, "{token}");
        assert_eq!(tok.id_to_token(first + i as u32).as_deref(), Some(*token));
    }
    assert_eq!(id(&tok, "/nothink"), VOCAB_SIZE as u32 - 1);
    let decoder = &tok.config().added_tokens_decoder;
    for token in CONTROL_TOKENS {
        assert!(decoder[&id(&tok, token)].special, "{token} must be special");
    }
    for token in MARKUP_TOKENS {
        assert!(!decoder[&id(&tok, token)].special, "{token} is markup, not a special token");
    }
    let st = tok.special_tokens();
    assert_eq!(st.eos_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(st.pad_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(st.bos_token, None);
    assert_eq!(tok.eos_token_id(), Some(id(&tok, "<|endoftext|>")));

    let eos: Vec<u32> = EOS_TOKENS.iter().map(|t| id(&tok, t)).collect();
    let generation = read_json(fixture().join("generation_config.json"));
    for (name, cfg) in [("config.json", &config), ("generation_config.json", &generation)] {
        assert_eq!(cfg["eos_token_id"], json!(eos), "{name}: eos ids are not GLM's");
        assert_eq!(cfg["pad_token_id"], json!(id(&tok, "<|endoftext|>")), "{name}: pad id");
        assert!(cfg.get("bos_token_id").is_none(), "{name}: GLM has no bos token");
    }
}

/// Any text encodes (byte-level) and decodes back; special tokens in text are single ids;
/// skipping special tokens drops the control tokens but keeps the reasoning markup; the streaming
/// decoder agrees with the full decode.
#[test]
fn glm_tokenizer_round_trips_any_text() {
    let tok = tokenizer();
    let text = "Hello, 世界! naïve café 🤖👨‍👩‍👧 \t\n\r x=1e-5 «»";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.iter().all(|&i| (i as usize) < VOCAB_SIZE));
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.encode(text, true).unwrap(), ids, "no bos/eos added");

    let chat = "[gMASK]<sop><|user|>\n你好<|assistant|>\n<think>想一想</think>\n答案<|user|>";
    let ids = tok.encode(chat, false).unwrap();
    assert_eq!(&ids[..3], &[id(&tok, "[gMASK]"), id(&tok, "<sop>"), id(&tok, "<|user|>")]);
    assert_eq!(*ids.last().unwrap(), id(&tok, "<|user|>"));
    assert!(ids.contains(&id(&tok, "<think>")) && ids.contains(&id(&tok, "</think>")));
    assert_eq!(tok.decode(&ids, false).unwrap(), chat);
    assert_eq!(tok.decode(&ids, true).unwrap(), "\n你好\n<think>想一想</think>\n答案");

    for skip in [false, true] {
        let mut decoder = tok.incremental_decoder(skip);
        let mut streamed = String::new();
        for &i in &ids {
            if let Some(delta) = decoder.push(i).unwrap() {
                assert!(!delta.contains('\u{FFFD}'), "delta {delta:?} splits a character");
                streamed.push_str(&delta);
            }
        }
        streamed.push_str(&decoder.flush().unwrap());
        assert_eq!(streamed, tok.decode(&ids, skip).unwrap());
    }
}

// ---- (a) byte-identical with transformers ------------------------------------------------------

/// Every reference conversation renders to transformers' text byte for byte, from the template in the
/// fixture's tokenizer_config.json, and tokenizes to transformers' ids.
#[test]
fn glm_template_matches_transformers() {
    let tok = tokenizer();
    let template = ChatTemplate::from_tokenizer(&tok).unwrap();
    let from_dir = ChatTemplate::from_tokenizer_dir(fixture()).unwrap();
    for case in references() {
        let name = case["name"].as_str().unwrap();
        let messages = case["messages"].as_array().unwrap();
        let opts = RenderOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            tools: case["tools"].as_array().cloned(),
            enable_thinking: case["enable_thinking"].as_bool(),
            ..Default::default()
        };
        let got = template.render(messages, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = case["expected"].as_str().unwrap();
        assert_eq!(got, expected, "case {name}: rendered text differs from transformers");
        assert_eq!(from_dir.render(messages, &opts).unwrap(), got, "case {name}: from_tokenizer_dir");
        let ids = tok.encode(&got, false).unwrap();
        let expected_ids: Vec<u32> = serde_json::from_value(case["expected_ids"].clone()).unwrap();
        assert_eq!(ids, expected_ids, "case {name}: token ids differ from transformers");
        assert_eq!(tok.decode(&ids, false).unwrap(), got, "case {name}: decode");
    }
}

// ---- (b) GLM's prompt structure ------------------------------------------------------------------

/// `[gMASK]<sop>` starts every prompt (once); each turn opens with its role token as one special id.
#[test]
fn glm_prompt_starts_with_gmask_sop_and_has_one_role_token_per_turn() {
    let tok = tokenizer();
    let (gmask, sop) = (id(&tok, "[gMASK]"), id(&tok, "<sop>"));
    for case in references() {
        let name = case["name"].as_str().unwrap();
        let text = case["expected"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["expected_ids"].clone()).unwrap();
        assert!(text.starts_with("[gMASK]<sop>"), "{name}: {text:?}");
        assert_eq!(&ids[..2], &[gmask, sop], "{name}");
        assert_eq!(ids.iter().filter(|&&i| i == gmask || i == sop).count(), 2, "{name}: [gMASK]<sop> only once");

        let messages = case["messages"].as_array().unwrap();
        let role_count = |role: &str| messages.iter().filter(|m| m["role"] == role).count();
        let id_count = |token: &str| ids.iter().filter(|&&i| i == id(&tok, token)).count();
        let gen = case["add_generation_prompt"].as_bool().unwrap() as usize;
        assert_eq!(id_count("<|user|>"), role_count("user"), "{name}");
        assert_eq!(id_count("<|assistant|>"), role_count("assistant") + gen, "{name}");
        let has_tools = case["tools"].as_array().is_some_and(|t| !t.is_empty());
        let system_turns = role_count("system") + usize::from(has_tools && messages[0]["role"] != "system");
        assert_eq!(id_count("<|system|>"), system_turns, "{name}");
        // One <|observation|> per run of consecutive tool results, one <tool_response> per result.
        let runs = messages.windows(2).filter(|w| w[1]["role"] == "tool" && w[0]["role"] != "tool").count();
        assert_eq!(id_count("<|observation|>"), runs, "{name}");
        // (The tools section names the tags once in its instructions.)
        assert_eq!(id_count("<tool_response>"), role_count("tool") + usize::from(has_tools), "{name}");
        // Every assistant turn (and the generation prompt with thinking off) has one <think></think> pair.
        let thinking_off = case["enable_thinking"] == json!(false);
        let think_pairs = role_count("assistant") + usize::from(gen == 1 && thinking_off);
        assert_eq!(id_count("<think>"), think_pairs, "{name}");
        assert_eq!(id_count("</think>"), think_pairs, "{name}");
        // No stray whitespace at the start of a turn: role tokens are followed by "\n" + content.
        for role in ["<|system|>", "<|user|>"] {
            for turn in text.split(role).skip(1) {
                assert!(turn.starts_with('\n') && !turn.starts_with("\n\n"), "{name}: {role} turn {turn:?}");
            }
        }
        assert!(!text.ends_with('\n'), "{name}: trailing newline");
    }
}

/// The generation prompt is `<|assistant|>`; thinking off appends `\n<think></think>` (an empty,
/// closed reasoning block), thinking on or unset leaves the model to think; the conversation before it
/// does not depend on the thinking mode.
#[test]
fn glm_generation_prompt_thinking_on_and_off() {
    let tok = tokenizer();
    let template = template();
    let messages = [
        json!({"role": "system", "content": "Be brief."}),
        user("What is 2+2?"),
        json!({"role": "assistant", "reasoning_content": "Easy: 4.", "content": "4"}),
        user("And 3+3?"),
    ];
    let history = template.render(&messages, &options(false, None)).unwrap();
    let unset = template.render(&messages, &options(true, None)).unwrap();
    let on = template.render(&messages, &options(true, Some(true))).unwrap();
    let off = template.render(&messages, &options(true, Some(false))).unwrap();
    assert_eq!(unset, format!("{history}<|assistant|>"));
    assert_eq!(on, unset, "enable_thinking=true is the default");
    assert_eq!(off, format!("{history}<|assistant|>\n<think></think>"));
    assert_eq!(template.render(&messages, &options(false, Some(false))).unwrap(), history);
    assert!(history.ends_with("<|user|>\nAnd 3+3?"), "{history:?}");

    let ids = tok.encode(&off, false).unwrap();
    let tail: Vec<u32> = ["<|assistant|>", "\n", "<think>", "</think>"]
        .iter()
        .map(|t| tok.encode(t, false).unwrap())
        .collect::<Vec<_>>()
        .concat();
    assert_eq!(tail.len(), 4, "each piece is one id");
    assert!(ids.ends_with(&tail), "thinking off ends with <|assistant|> \\n <think> </think>");
    assert_eq!(*tok.encode(&on, false).unwrap().last().unwrap(), id(&tok, "<|assistant|>"));
}

/// Reasoning of an assistant turn is shown only after the last user message; earlier turns get an empty
/// `<think></think>`. Reasoning comes from `reasoning_content` or from `<think>` tags in the content,
/// which never stay in the answer.
#[test]
fn glm_reasoning_only_after_the_last_user_message() {
    let template = template();
    let earlier = json!({"role": "assistant", "reasoning_content": "SECRET-1", "content": "Paris."});
    let tagged = json!({"role": "assistant", "content": "<think>\nSECRET-2\n</think>\n\nTokyo."});
    let messages = [user("France?"), earlier.clone(), user("Japan?"), tagged.clone()];
    let text = template.render(&messages, &options(false, None)).unwrap();
    assert!(!text.contains("SECRET-1"), "reasoning before the last user message must be dropped: {text:?}");
    assert!(text.contains("<|user|>\nFrance?<|assistant|>\n<think></think>\nParis.<|user|>"), "{text:?}");
    assert!(text.ends_with("<|user|>\nJapan?<|assistant|>\n<think>SECRET-2</think>\nTokyo."), "{text:?}");

    // Once another user message follows, the last turn's reasoning goes too.
    let messages = [user("France?"), earlier, user("Japan?"), tagged, user("Thanks")];
    let text = template.render(&messages, &options(true, Some(false))).unwrap();
    assert!(!text.contains("SECRET"), "{text:?}");
    assert_eq!(count(&text, "<think></think>"), 3, "{text:?}");
}

/// Tools: listed as one JSON object per line inside `<tools>` in the (first) system turn; calls as
/// `<tool_call>name` + `<arg_key>`/`<arg_value>` lines (non-string values as JSON); results after one
/// `<|observation|>` each inside `<tool_response>`.
#[test]
fn glm_tools_calls_and_observations() {
    let template = template();
    let tool = json!({"type": "function", "function": {
        "name": "get_weather", "description": "天气 forecast",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}});
    let messages = [
        json!({"role": "system", "content": "SYS"}),
        user("Weather?"),
        json!({"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "days": 2}}}]}),
        json!({"role": "tool", "content": "{\"temp_c\": 21}"}),
        json!({"role": "tool", "content": "second"}),
    ];
    let opts = RenderOptions { tools: Some(vec![tool.clone()]), ..options(true, None) };
    let text = template.render(&messages, &opts).unwrap();
    assert!(text.starts_with("[gMASK]<sop><|system|>\nSYS\n\n"), "system text first, then the tools: {text:?}");
    assert_eq!(count(&text, "<|system|>"), 1, "the tools share the system turn");
    let listed = text.split("<tools>\n").nth(1).unwrap().split("\n</tools>").next().unwrap();
    let schemas: Vec<Value> = listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(schemas, vec![tool["function"].clone()]);
    assert!(
        text.contains(concat!(
            "<|assistant|>\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>",
            "\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call><|observation|>\n<tool_response>\n",
            "{\"temp_c\": 21}\n</tool_response>\n<tool_response>\nsecond\n</tool_response><|assistant|>"
        )),
        "{text:?}"
    );
    assert!(text.ends_with("</tool_response><|assistant|>"));

    // No tools, no tools section; unknown roles are an error.
    let plain = template.render(&messages[..2], &options(true, None)).unwrap();
    assert_eq!(plain, "[gMASK]<sop><|system|>\nSYS<|user|>\nWeather?<|assistant|>");
    let err = template.render(&[json!({"role": "narrator", "content": "x"})], &options(true, None)).unwrap_err();
    assert!(err.to_string().contains("unknown role narrator"), "{err}");
}

// ---- (c) end to end --------------------------------------------------------------------------

/// transformers' greedy `generate` (eos = GLM's eos ids, 16 new tokens) after a one-message chat prompt
/// on glm4moe-a: `python3 scripts/make_glm_tokenizer.py --generations` prints these. The smallest
/// top-1 - top-2 logit gap along each is >= 0.069, so fp32 in ONNX Runtime cannot choose differently.
const GENERATIONS: [(&str, Option<bool>, &[u32]); 3] = [
    ("sea Beijing?", None, &[89, 385, 430, 391, 498]), // stops at <|user|>
    ("北京 天气?", None, &[89, 76, 116, 318, 384, 299, 500]), // stops at <|observation|>
    (
        "Write a haiku about the sea.",
        Some(false),
        &[86, 281, 106, 360, 322, 391, 218, 382, 464, 322, 322, 281, 281, 281, 281, 281],
    ),
];

const MAX_TOKENS: usize = 16;

/// Renders the chat prompt, generates greedily with eos on, and checks that the stream, the returned text
/// and the finish reason agree, whichever way generation ends. Returns the generated ids.
fn chat_generate(engine: &Engine, message: &str, enable_thinking: Option<bool>) -> Vec<u32> {
    let tok = engine.tokenizer().unwrap().clone();
    let eos = engine.model_info().eos_token_ids.clone();
    let render = options(true, enable_thinking);
    let text = engine.chat_template().unwrap().render(&[user(message)], &render).unwrap();
    let prompt = engine.tokenize(&Prompt::Chat(vec![user(message)]), &render).unwrap();
    assert!(text.starts_with(&format!("[gMASK]<sop><|user|>\n{message}<|assistant|>")), "{text:?}");
    if enable_thinking == Some(false) {
        assert!(text.ends_with("<|assistant|>\n<think></think>"), "{text:?}");
    } else {
        assert!(text.ends_with("<|assistant|>"), "{text:?}");
    }
    assert_eq!(prompt, tok.encode(&text, false).unwrap());
    assert_eq!(&prompt[..2], &[id(&tok, "[gMASK]"), id(&tok, "<sop>")]);

    let opts = GenerateOptions {
        max_tokens: Some(MAX_TOKENS),
        sampling: SamplingParams::greedy(),
        ignore_eos: false,
        ..Default::default()
    };
    let request = Request::new(Prompt::Chat(vec![user(message)])).with_options(opts).with_render(render);
    let (out, events) = generate_collect(engine, request);
    let ids = out.generated_ids.clone();
    assert_eq!(out.prompt_ids, prompt);
    assert!(!ids.is_empty() && ids.len() <= MAX_TOKENS);

    // The deltas add up to the returned text, one event per token (+ at most one tail event).
    let streamed: String = events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(streamed, out.text, "{message:?}: streamed deltas differ from the returned text");
    let token_events: Vec<u32> = events.iter().map(|e| e.token_id).filter(|&t| t != u32::MAX).collect();
    assert_eq!(token_events, ids, "{message:?}: streamed token ids");
    assert!(events.len() <= ids.len() + 1);

    // An eos id ends generation right there, with Stop; otherwise it runs to max_tokens.
    match ids.iter().position(|t| eos.contains(t)) {
        Some(at) => {
            assert_eq!(at, ids.len() - 1, "{message:?}: generation went on past eos id {}", ids[at]);
            assert_eq!(out.finish_reason, FinishReason::Stop, "{message:?}");
            let stop_event = events.iter().rfind(|e| e.token_id != u32::MAX).unwrap();
            assert_eq!(stop_event.token_id, ids[at]);
            assert!(stop_event.text.is_empty(), "the eos token is not part of the text");
        }
        None => {
            assert_eq!(out.finish_reason, FinishReason::Length, "{message:?}");
            assert_eq!(ids.len(), MAX_TOKENS);
        }
    }
    let answer: Vec<u32> = ids.iter().copied().filter(|t| !eos.contains(t)).collect();
    assert_eq!(out.text, tok.decode(&answer, true).unwrap(), "{message:?}: text differs from the decode");
    assert_eq!(out.timings.prompt_tokens, prompt.len());
    assert_eq!(out.timings.generated_tokens, ids.len());
    ids
}

/// Export glm4moe-a with its tokenizer, load it, render a chat prompt with the checkpoint's template
/// and generate greedily: the manifest's eos ids are GLM's, and generation stops at them as
/// transformers' `generate` does.
#[test]
fn glm_chat_generation_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join(FIXTURE);
    export_to(&fixture(), &graphs, cpu_settings(true));
    let engine = start_engine(&graphs, 2, None, true);
    let tok = engine.tokenizer().expect("the export lost the tokenizer").clone();
    assert!(engine.chat_template().is_some(), "the export lost the chat template");

    let manifest = pio_models::Manifest::load(&graphs).unwrap();
    let glm_eos: Vec<u32> = EOS_TOKENS.iter().map(|t| id(&tok, t)).collect();
    assert_eq!(manifest.eos_token_ids, glm_eos, "the manifest's eos ids are not GLM's eos set");
    assert_eq!(manifest.pad_token_id, Some(id(&tok, "<|endoftext|>")));
    assert_eq!(manifest.bos_token_id, None);
    let spec = manifest.tokenizer.as_ref().expect("no tokenizer in pio.json");
    assert!(
        spec.files.iter().any(|f| f == "tokenizer.json") && spec.files.iter().any(|f| f == "tokenizer_config.json")
    );
    assert_eq!(spec.chat_template_source.as_deref(), Some("tokenizer_config.json"));

    // Any message: consistent whichever way it ends.
    for (message, thinking) in [("Hello! 你好 😀", None), ("Tell me a story.", Some(true)), ("谢谢", Some(false))]
    {
        chat_generate(&engine, message, thinking);
    }
    // Known continuations: two stop at an eos id (<|user|>, <|observation|>), one runs to the limit.
    let mut stopped = 0;
    for (message, thinking, expected) in GENERATIONS {
        let ids = chat_generate(&engine, message, thinking);
        assert_eq!(ids, expected, "{message:?}: greedy ids differ from transformers' generate");
        stopped += usize::from(glm_eos.contains(ids.last().unwrap()));
    }
    assert_eq!(stopped, 2, "both eos paths must be exercised");
}

/// With the tokenizer in the checkpoint, the fixture's transformers reference (greedy 32 tokens from
/// random prompt ids, eos ignored) still holds, and the stream now carries text: the deltas add up to
/// the decode of the generated ids (special tokens skipped), with at most one tail event.
#[test]
fn glm_reference_greedy_streams_text_with_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let graphs = tmp.path().join(FIXTURE);
    export_to(&fixture(), &graphs, cpu_settings(true));
    let engine = start_engine(&graphs, 2, None, true);
    let tok = engine.tokenizer().unwrap().clone();
    let g = load_reference(&fixture()).greedy;
    let (out, events) = generate_collect(&engine, ids_request(&g.prompt_ids, greedy_options(g.max_new_tokens)));
    assert_eq!(out.generated_ids, g.generated_ids, "greedy ids differ from transformers generate");
    assert_eq!(out.finish_reason, FinishReason::Length);
    let token_events: Vec<u32> = events.iter().map(|e| e.token_id).filter(|&t| t != u32::MAX).collect();
    assert_eq!(token_events, out.generated_ids);
    assert!(events.len() <= out.generated_ids.len() + 1);
    let streamed: String = events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(streamed, out.text);
    assert_eq!(out.text, tok.decode(&out.generated_ids, true).unwrap());
    assert!(!out.text.is_empty());
}
