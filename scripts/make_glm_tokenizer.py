#!/usr/bin/env python3
"""Build the small GLM-4.5/4.7-style tokenizer of the `glm4moe-a` fixture and its chat-template references.

No GLM tokenizer can be downloaded where the tests run, so the tests use this one: a byte-level BPE
trained here, deterministically, on a small built-in English + Chinese corpus, whose 512 ids fit the
fixture's `vocab_size`, with GLM's special tokens at the top of the id range and a GLM-format chat
template written for this project (see CHAT_TEMPLATE below: the prompt format, not GLM's own file).

Usage: python3 scripts/make_glm_tokenizer.py [--check]

Writes
  tests/fixtures/glm4moe-a/tokenizer.json          the fast-tokenizer definition (tokenizers library)
  tests/fixtures/glm4moe-a/tokenizer_config.json   eos/pad tokens, added_tokens_decoder, chat_template
  tests/fixtures/chat/glm4_chat_references.json    apply_chat_template references (transformers)
and sets the eos/pad ids of tests/fixtures/glm4moe-a/{config,generation_config}.json to GLM's layout
(eos = [<|endoftext|>, <|user|>, <|observation|>], pad = <|endoftext|>, no bos), which
scripts/make_fixtures.py does not know about: run this script again after regenerating glm4moe-a.
Only those fields change; the weights and reference.json do not depend on them.

`--check` rebuilds everything in memory and fails if any file on disk differs (determinism check).
`--generations` prints transformers' greedy `generate` (16 new tokens, eos = the GLM eos ids) of
glm4moe-a after a few one-message chat prompts: the ids tests/glm_chat.rs expects (nothing is written).

Each reference case is {name, messages, tools, add_generation_prompt, enable_thinking, expected,
expected_ids}, as in qwen3_chat_references.json: `expected` is
`PreTrainedTokenizerFast.from_pretrained(fixture).apply_chat_template(messages, tools=...,
add_generation_prompt=..., [enable_thinking=...], tokenize=False)` and `expected_ids` is
`encode(expected, add_special_tokens=False)`; `enable_thinking` is null when the kwarg is not passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "glm4moe-a"
REFERENCES = ROOT / "tests" / "fixtures" / "chat" / "glm4_chat_references.json"

VOCAB_SIZE = 512  # glm4moe-a's config.json vocab_size: every id, special tokens included

# GLM's added tokens, in GLM's order, at the top of the id range. (content, special)
# The control tokens are special (skip_special_tokens drops them); the reasoning / tool-call markup
# is added but not special, so a decode that skips special tokens still shows it.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("[MASK]", True),
    ("[gMASK]", True),
    ("[sMASK]", True),
    ("<sop>", True),
    ("<eop>", True),
    ("<|system|>", True),
    ("<|user|>", True),
    ("<|assistant|>", True),
    ("<|observation|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<arg_key>", False),
    ("</arg_key>", False),
    ("<arg_value>", False),
    ("</arg_value>", False),
    ("/nothink", False),
]
BPE_SIZE = VOCAB_SIZE - len(ADDED_TOKENS)  # 256 byte symbols + merges
TOKEN_IDS = {content: BPE_SIZE + i for i, (content, _) in enumerate(ADDED_TOKENS)}
# As in GLM-4.5/4.7: generation ends at <|endoftext|>, or when the model starts the next user turn or
# a tool call's observation.
EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]
EOS_IDS = [TOKEN_IDS[t] for t in EOS_TOKENS]
PAD_ID = TOKEN_IDS["<|endoftext|>"]

# Splits text like the GPT-4 / GLM-4 family before byte-level BPE: contractions, letter runs with one
# leading non-letter, digits in groups of up to three, punctuation runs, newlines, other spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Training text, written for this script: chat-like English and Chinese, a little JSON and code.
CORPUS = [
    "The user asked the assistant about the weather in Beijing, and the assistant answered with a short forecast.",
    "Hello! How can I help you today? I can answer questions, write code, and call tools when they are useful.",
    "Please think step by step before you answer. First read the question, then check the facts, then reply.",
    "The capital of France is Paris. The capital of Japan is Tokyo. The capital of China is Beijing.",
    "What is the weather like tomorrow? It will be sunny in the morning and cloudy in the afternoon.",
    "The model reads the prompt, thinks about the problem, and then writes the final answer for the user.",
    "A function call has a name and a set of arguments. The tool returns a result, and the assistant uses it.",
    "Write a short poem about the sea. The sea is wide and blue, and the waves come back to the shore again.",
    "We measured the time to first token and the number of tokens per second on one GPU.",
    "The system prompt tells the model who it is and how it should answer the questions of the user.",
    "Numbers: 1, 2, 3, 10, 42, 100, 2024, 3.14, 1000000. One plus one is two; two plus three is five.",
    "Search the documents for the answer, then summarize the results in two or three sentences.",
    "If the question is unclear, ask the user for more details instead of guessing the answer.",
    "Thanks for your help! You're welcome. Let me know if there's anything else I can do.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Translate the following sentence into Chinese, and keep the names of people and places unchanged.",
    "你好！我是一个人工智能助手，可以回答问题、写代码，也可以调用工具。",
    "请一步一步地思考，然后给出最终的答案。先理解问题，再检查事实，最后回答。",
    "北京明天的天气怎么样？明天上午晴，下午多云，气温二十度左右。",
    "法国的首都是巴黎，日本的首都是东京，中国的首都是北京。",
    "用户的问题是什么？助手需要先想一想，再用用户的语言回答。",
    "请用一句话介绍一下你自己。我是一个乐于助人的语言模型。",
    "这个函数的名字是查询天气，参数是城市和天数，返回的结果是天气预报。",
    "谢谢你的帮助！不客气，如果还有其他问题，请随时告诉我。",
    "今天我们测试了模型的速度：第一个词元的时间和每秒生成的词元数。",
    "搜索文档，找到答案，然后用两三句话总结搜索的结果。",
    "一加一等于二，二加三等于五，十乘十等于一百。",
    "大海很宽，也很蓝，海浪一次又一次地回到岸边。",
    '{"type": "function", "function": {"name": "get_weather", "description": "Get the weather forecast",'
    ' "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},'
    ' "required": ["city"]}}}',
    '{"city": "Beijing", "days": 1, "unit": "celsius", "temp_c": 21.5, "sky": "sunny", "ok": true, "next": null}',
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n",
    "fn main() {\n    let x = 1 + 2;\n    println!(\"{x}\");\n}\n",
    "- first item\n- second item\n\n1. one\n2. two\n\n**Note:** the answer is 5.",
]

# The chat template: GLM-4.5 / GLM-4.7's prompt format, written for this project.
#   [gMASK]<sop>                                       once, at the start
#   <|system|>\n{system}                              a system turn; with tools, the tools section
#                                                      (one JSON schema per line) follows the first
#                                                      system message in the same turn
#   <|user|>\n{text}
#   <|assistant|>\n<think>{reasoning}</think>\n{answer}   reasoning only for assistant turns after the
#                                                      last user message; earlier turns get an empty
#                                                      <think></think>; then the tool calls as
#                                                      \n<tool_call>{name}\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>...\n</tool_call>
#   <|observation|>\n<tool_response>\n{result}\n</tool_response>...   consecutive tool results share one
#                                                      <|observation|>
#   <|assistant|>                                      the generation prompt; `enable_thinking=False`
#                                                      appends \n<think></think> (thinking off), true or
#                                                      undefined leaves it to the model
# Reasoning comes from `reasoning_content`, else from <think>...</think> inside the content (which is
# always cut out of the answer). Content may be a string or a list of {"type": "text", "text": ...}.
CHAT_TEMPLATE = r"""{#- GLM-4.5/4.7 prompt format, written for the Inference-PIO test tokenizer. -#}
{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is string -%}
                {{- part -}}
            {%- elif part is mapping and part.type == 'text' -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{{- '[gMASK]<sop>' -}}
{%- set ns = namespace(last_user=-1, skip_first=false, content='', reasoning='') -%}
{%- for m in messages -%}
    {%- if m.role == 'user' -%}
        {%- set ns.last_user = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- if tools -%}
    {{- '<|system|>\n' -}}
    {%- if messages[0].role == 'system' -%}
        {{- text_of(messages[0].content) ~ '\n\n' -}}
        {%- set ns.skip_first = true -%}
    {%- endif -%}
    {{- '# Tools\n\nYou can call the functions below. Each one is described by a JSON schema on its own line inside <tools></tools>:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' ~ ((tool.function if tool.function is defined else tool) | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nTo call a function, write <tool_call>, the function name, then for each argument a line <arg_key>name</arg_key> and a line <arg_value>value</arg_value>, then </tool_call>. Results come back inside <tool_response></tool_response>.' -}}
{%- endif -%}
{%- for m in messages -%}
    {%- if loop.first and ns.skip_first -%}
        {%- continue -%}
    {%- endif -%}
    {%- if m.role == 'system' -%}
        {{- '<|system|>\n' ~ text_of(m.content) -}}
    {%- elif m.role == 'user' -%}
        {{- '<|user|>\n' ~ text_of(m.content) -}}
    {%- elif m.role == 'assistant' -%}
        {%- set ns.content = text_of(m.content) -%}
        {%- set ns.reasoning = '' -%}
        {%- if '</think>' in ns.content -%}
            {%- set ns.reasoning = ns.content.split('</think>')[0].split('<think>')[-1] -%}
            {%- set ns.content = ns.content.split('</think>')[-1] -%}
        {%- endif -%}
        {%- if m.reasoning_content is string -%}
            {%- set ns.reasoning = m.reasoning_content -%}
        {%- endif -%}
        {{- '<|assistant|>' -}}
        {%- if loop.index0 > ns.last_user and ns.reasoning.strip() -%}
            {{- '\n<think>' ~ ns.reasoning.strip() ~ '</think>' -}}
        {%- else -%}
            {{- '\n<think></think>' -}}
        {%- endif -%}
        {%- if ns.content.strip() -%}
            {{- '\n' ~ ns.content.strip() -}}
        {%- endif -%}
        {%- if m.tool_calls -%}
            {%- for call in m.tool_calls -%}
                {%- set f = call.function if call.function is defined else call -%}
                {{- '\n<tool_call>' ~ f.name -}}
                {%- if f.arguments is mapping -%}
                    {%- for key, value in f.arguments.items() -%}
                        {{- '\n<arg_key>' ~ key ~ '</arg_key>\n<arg_value>' -}}
                        {{- value if value is string else value | tojson -}}
                        {{- '</arg_value>' -}}
                    {%- endfor -%}
                {%- elif f.arguments is string -%}
                    {{- '\n' ~ f.arguments -}}
                {%- endif -%}
                {{- '\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
    {%- elif m.role == 'tool' or m.role == 'observation' -%}
        {%- if loop.first or messages[loop.index0 - 1].role not in ['tool', 'observation'] -%}
            {{- '<|observation|>' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' ~ text_of(m.content) ~ '\n</tool_response>' -}}
    {%- else -%}
        {{- raise_exception('unknown role ' ~ m.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
    {%- if enable_thinking is defined and not enable_thinking -%}
        {{- '\n<think></think>' -}}
    {%- endif -%}
{%- endif -%}"""


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == BPE_SIZE, f"trained {tok.get_vocab_size()} tokens, want {BPE_SIZE}: grow CORPUS"
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        added = tok.add_special_tokens([token]) if special else tok.add_tokens([token])
        assert added == 1, content
        assert tok.token_to_id(content) == TOKEN_IDS[content], (content, tok.token_to_id(content))
    assert tok.get_vocab_size() == VOCAB_SIZE
    return tok


def tokenizer_json(tok: Tokenizer) -> str:
    return json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=1) + "\n"


def tokenizer_config() -> dict:
    decoder = {}
    for content, special in ADDED_TOKENS:
        decoder[str(TOKEN_IDS[content])] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return {
        "added_tokens_decoder": decoder,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 512,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def json_text(value) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2) + "\n"


def patched_model_configs() -> dict[str, str]:
    """config.json / generation_config.json with GLM's eos/pad ids (and no bos), other fields untouched."""
    out = {}
    for name in ["config.json", "generation_config.json"]:
        cfg = json.loads((FIXTURE / name).read_text())
        if name == "config.json":
            assert cfg["vocab_size"] == VOCAB_SIZE, cfg["vocab_size"]
        cfg["eos_token_id"] = EOS_IDS
        cfg["pad_token_id"] = PAD_ID
        cfg.pop("bos_token_id", None)
        out[name] = json_text(cfg)
    return out


# ---- chat references -------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市的天气预报 (weather forecast), °C by default ☀️",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "城市名称，例如「北京」"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["city"],
        },
    },
}

SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the docs <internal> & return snippets",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "top_k": {"type": "integer", "default": 3},
                "filters": {"type": "object", "properties": {"recent_only": {"type": "boolean", "default": False}}},
            },
            "required": ["query"],
        },
    },
}

TOOLS = [WEATHER_TOOL, SEARCH_TOOL]
SYSTEM = "You are a helpful assistant. 请用用户的语言回答。"


def cases():
    user = {"role": "user", "content": "你好！请用一句话介绍一下你自己。😀"}
    yield dict(name="single_user_generation_prompt", messages=[user], add_generation_prompt=True)
    yield dict(name="single_user_enable_thinking_true", messages=[user], add_generation_prompt=True, enable_thinking=True)
    yield dict(name="single_user_enable_thinking_false", messages=[user], add_generation_prompt=True, enable_thinking=False)
    yield dict(name="single_user_no_generation_prompt", messages=[user], add_generation_prompt=False)

    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France?"},
        {
            "role": "assistant",
            "reasoning_content": "\nThe user asks about France. Paris.\n",
            "content": "\n\nThe capital of France is Paris.",
        },
        {"role": "user", "content": "  And of 日本?\n\nAnswer briefly.  "},
    ]
    yield dict(name="system_multi_turn_reasoning_history", messages=history, add_generation_prompt=True)
    yield dict(
        name="system_multi_turn_thinking_off",
        messages=history,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    yield dict(
        name="last_turn_reasoning_kept",
        messages=history
        + [{"role": "assistant", "reasoning_content": "日本的首都是东京。", "content": "Tokyo."}],
        add_generation_prompt=False,
    )
    yield dict(
        name="think_tags_in_content",
        messages=[
            {"role": "user", "content": "1+1=?"},
            {"role": "assistant", "content": "<think>\nA simple sum.\n</think>\n\n2"},
            {"role": "user", "content": "再加 3 呢？"},
            {"role": "assistant", "content": "<think>\n2+3=5，很简单。\n</think>\n\n答案是 5。"},
        ],
        add_generation_prompt=False,
    )
    yield dict(
        name="content_parts",
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world!"}]},
        ],
        add_generation_prompt=True,
        enable_thinking=False,
    )

    tool_conversation = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "北京明天天气怎么样？顺便搜索一下 «ONNX Runtime» 的文档。"},
        {
            "role": "assistant",
            "reasoning_content": "Need the weather and a doc search; call both tools.",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "北京", "days": 1, "unit": "celsius"}},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {
                        "name": "search_docs",
                        "arguments": {"query": "KV cache <io binding>", "top_k": 2, "filters": {"recent_only": True}},
                    },
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21.5, "sky": "晴"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "[1] IOBinding keeps tensors on the device…"},
    ]
    yield dict(name="tools_call_and_observation", messages=tool_conversation, tools=TOOLS, add_generation_prompt=True)
    yield dict(
        name="tools_complete_turn_thinking_off",
        messages=tool_conversation
        + [
            {"role": "assistant", "content": "<think>Summarize.</think>明天北京晴，21.5°C。"},
            {"role": "user", "content": "谢谢"},
        ],
        tools=TOOLS,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    yield dict(
        name="tools_no_system_string_arguments",
        messages=[
            {"role": "user", "content": "Weather in Zürich?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "days": 2}'}}
                ],
            },
            {"role": "tool", "content": '{"temp_c": 9}'},
        ],
        tools=[WEATHER_TOOL],
        add_generation_prompt=True,
    )
    yield dict(
        name="tools_declared_unused",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Just chat, no tools."}],
        tools=TOOLS,
        add_generation_prompt=True,
        enable_thinking=True,
    )


def render_references(fixture_dir: Path) -> str:
    import transformers
    from transformers import PreTrainedTokenizerFast

    transformers.logging.set_verbosity_error()
    hf = PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))
    raw = Tokenizer.from_file(str(fixture_dir / "tokenizer.json"))
    assert len(hf) == VOCAB_SIZE, len(hf)
    assert hf.eos_token_id == PAD_ID and hf.pad_token_id == PAD_ID
    for content, _ in ADDED_TOKENS:
        assert hf.convert_tokens_to_ids(content) == TOKEN_IDS[content], content
    results = []
    for case in cases():
        kwargs = {}
        if "enable_thinking" in case:
            kwargs["enable_thinking"] = case["enable_thinking"]
        text = hf.apply_chat_template(
            case["messages"],
            tools=case.get("tools"),
            add_generation_prompt=case["add_generation_prompt"],
            tokenize=False,
            **kwargs,
        )
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids, case["name"]
        assert hf.decode(ids) == text, case["name"]
        assert text.startswith("[gMASK]<sop>"), case["name"]
        results.append(
            {
                "name": case["name"],
                "messages": case["messages"],
                "tools": case.get("tools"),
                "add_generation_prompt": case["add_generation_prompt"],
                "enable_thinking": case.get("enable_thinking"),
                "expected": text,
                "expected_ids": ids,
            }
        )
    return json.dumps(results, ensure_ascii=False, indent=1) + "\n"


# One-user-message chat prompts whose greedy continuation tests/glm_chat.rs checks: (message,
# enable_thinking). The first two stop at an eos id (<|user|>, <|observation|>), the last runs 16 tokens.
GENERATION_PROMPTS = [("sea Beijing?", None), ("北京 天气?", None), ("Write a haiku about the sea.", False)]


def print_generations():
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    tok = PreTrainedTokenizerFast.from_pretrained(str(FIXTURE))
    model = AutoModelForCausalLM.from_pretrained(str(FIXTURE), dtype=torch.float32, attn_implementation="eager").eval()
    for message, thinking in GENERATION_PROMPTS:
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        text = tok.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False, **kwargs
        )
        ids = tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=EOS_IDS, pad_token_id=PAD_ID
            )
            # Smallest top-1 - top-2 logit gap along the way: another runtime cannot flip a choice.
            seq, gap = torch.tensor([ids]), float("inf")
            for _ in out[0, len(ids):].tolist():
                top = torch.topk(model(seq).logits[0, -1], 2)
                gap = min(gap, float(top.values[0] - top.values[1]))
                seq = torch.cat([seq, top.indices[:1].view(1, 1)], 1)
        generated = out[0, len(ids):].tolist()
        print(f"{message!r} enable_thinking={thinking}: prompt {len(ids)} ids, generated {generated}, min gap {gap:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the files on disk differ from a rebuild")
    parser.add_argument("--generations", action="store_true", help="print greedy chat generations of glm4moe-a")
    args = parser.parse_args()
    if args.generations:
        print_generations()
        return

    tok = build_tokenizer()
    files = {
        FIXTURE / "tokenizer.json": tokenizer_json(tok),
        FIXTURE / "tokenizer_config.json": json_text(tokenizer_config()),
    }
    files.update({FIXTURE / name: text for name, text in patched_model_configs().items()})
    # The references are rendered from the tokenizer folder as it will be on disk.
    with tempfile.TemporaryDirectory(prefix="glm-tokenizer-") as tmp:
        for path, text in files.items():
            if path.name.startswith("tokenizer"):
                (Path(tmp) / path.name).write_text(text, encoding="utf-8")
        files[REFERENCES] = render_references(Path(tmp))

    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, t in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != t]
        if stale:
            sys.exit(f"differs from a rebuild: {', '.join(stale)}")
        print("all files are up to date")
        return
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        print(f"wrote {path.relative_to(ROOT)} ({len(text.encode())} bytes)")
    print(f"eos ids {EOS_IDS} ({', '.join(EOS_TOKENS)}), pad id {PAD_ID}")


if __name__ == "__main__":
    main()
