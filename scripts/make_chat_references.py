#!/usr/bin/env python3
"""Render reference chat prompts with transformers' `apply_chat_template` for the Rust chat-template tests.

Usage: scripts/make_chat_references.py [TOKENIZER_DIR] [OUTPUT_JSON]

  TOKENIZER_DIR  Qwen3 tokenizer folder (default: $PIO_CACHE_DIR/tokenizers/qwen3 or
                 <repo>/.cache/pio/tokenizers/qwen3, filled by scripts/setup.sh)
  OUTPUT_JSON    default: tests/fixtures/chat/qwen3_chat_references.json

Also writes tests/fixtures/chat/template_quirks.json next to OUTPUT_JSON: small templates (rendered through the
same `apply_chat_template(..., chat_template=TEMPLATE)` path, with the Qwen3 tokenizer's special tokens) that
pin down the Jinja2/Python behaviours the Rust renderer emulates: {name, template, messages, tools,
documents, add_generation_prompt, kwargs, expected}.

Each case is {name, messages, tools, add_generation_prompt, enable_thinking, expected, expected_ids}, and
`continue_final_message: true` in the cases that pass it: `expected` is
`tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=..., [enable_thinking=...],
[continue_final_message=True], tokenize=False)` and `expected_ids` is `tokenizer.encode(expected,
add_special_tokens=False)`. `enable_thinking` is null when the kwarg is not passed at all.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询指定城市的天气预报 (weather forecast) — returns °C by default ☀️",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "城市名称，例如「北京」"},
                "days": {"type": "integer", "description": "Number of days (1–7)", "minimum": 1, "maximum": 7},
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
        "description": "Recherche dans la base de connaissances « docs » <interne> & renvoie des extraits",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Requête de recherche"},
                "top_k": {"type": "integer", "default": 3},
                "min_score": {"type": "number", "default": 0.25},
                "filters": {
                    "type": "object",
                    "properties": {
                        "lang": {"type": "string", "enum": ["fr", "en", "zh"]},
                        "recent_only": {"type": "boolean", "default": False},
                    },
                },
                "cursor": {"type": ["string", "null"], "default": None},
            },
            "required": ["query"],
        },
    },
}

TOOLS = [WEATHER_TOOL, SEARCH_TOOL]

SYSTEM = "You are Qwen, a helpful assistant. 请用用户的语言回答。"


def cases():
    user_zh = {"role": "user", "content": "你好！请用一句话介绍一下你自己。😀"}
    yield dict(name="single_user_no_generation_prompt", messages=[user_zh], add_generation_prompt=False)
    yield dict(name="single_user_generation_prompt", messages=[user_zh], add_generation_prompt=True)

    multi = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "  And of 日本?\n\nAnswer briefly.  "},
    ]
    yield dict(name="system_multi_turn", messages=multi, add_generation_prompt=True)
    yield dict(name="enable_thinking_false", messages=multi, add_generation_prompt=True, enable_thinking=False)
    yield dict(name="enable_thinking_true", messages=multi, add_generation_prompt=True, enable_thinking=True)
    yield dict(
        name="enable_thinking_false_no_generation_prompt",
        messages=multi,
        add_generation_prompt=False,
        enable_thinking=False,
    )

    reasoning_history = [
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "reasoning_content": "\nThe user asks a simple sum. 1+1=2.\n", "content": "\n\n2"},
        {"role": "user", "content": "再加 3 呢？"},
        {"role": "assistant", "content": "<think>\n2+3=5，很简单。\n</think>\n\n答案是 5。"},
    ]
    yield dict(name="history_reasoning_content_and_think_tags", messages=reasoning_history, add_generation_prompt=False)
    yield dict(
        name="history_reasoning_then_generation",
        messages=reasoning_history + [{"role": "user", "content": "Thanks! 🎉"}],
        add_generation_prompt=True,
        enable_thinking=True,
    )
    # transformers 5 aliases `reasoning` / `thinking` to `reasoning_content`.
    yield dict(
        name="reasoning_field_alias",
        messages=[
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "reasoning": "Just greet.", "content": "Hi!"},
        ],
        add_generation_prompt=False,
    )

    tool_conversation = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "北京明天天气怎么样？顺便搜索一下 «ONNX Runtime» 的文档。"},
        {
            "role": "assistant",
            "reasoning_content": "Need weather and a doc search; call both tools.",
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
                        "arguments": {
                            "query": "ONNX Runtime «KV cache» <io binding>",
                            "top_k": 2,
                            "min_score": 1e-05,
                            "filters": {"lang": "en", "recent_only": True},
                            "cursor": None,
                        },
                    },
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21.5, "sky": "晴", "wind": "3级"}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "[1] IOBinding lets you keep tensors on device…"},
    ]
    yield dict(name="tools_multi_step_generation", messages=tool_conversation, tools=TOOLS, add_generation_prompt=True)
    yield dict(
        name="tools_complete_turn",
        messages=tool_conversation
        + [
            {
                "role": "assistant",
                "content": "<think>\nSummarize both results.\n</think>\n\n明天北京晴，21.5°C。文档说 IOBinding 可以把张量留在设备上。",
            },
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
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "days": 2}'},
                    }
                ],
            },
            {"role": "tool", "content": '{"temp_c": 9}'},
        ],
        tools=TOOLS,
        add_generation_prompt=True,
    )
    yield dict(
        name="tools_declared_unused",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Just chat, no tools."}],
        tools=TOOLS,
        add_generation_prompt=True,
    )


# Small templates exercising HF / Jinja2 / Python behaviour beyond what the Qwen3 template uses.
QUIRK_MESSAGES = [
    {"role": "system", "content": "  Sys prompt\twith tabs \n", "name": None},
    {"role": "user", "content": "Hello <b>&</b> 'quotes' \"dq\" — ünïcødé 中文 😀\n\nsecond line  "},
    {
        "role": "assistant",
        "content": None,
        "thinking": "t1",
        "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": 1.0, "y": 1e-07, "z": 1e20, "w": 3.14, "n": None, "b": False, "s": "é"}}}
        ],
    },
    {"role": "tool", "content": "result", "tool_call_id": "c1"},
    {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nDone.", "reasoning_content": None},
]

QUIRK_TOOLS = [SEARCH_TOOL]

QUIRK_DOCS = [{"title": "Doc «1»", "text": "Texte."}]

QUIRK_TEMPLATES = {
    "tojson_default": "{% for m in messages %}{{ m|tojson }}\n{% endfor %}",
    "tojson_options": (
        "{{ tools|tojson(indent=2) }}\n{{ messages[1]|tojson(ensure_ascii=True, sort_keys=True, separators=(',', ':')) }}\n"
        "{{ messages[2]|tojson(indent='\\t') }}\n{{ messages[1].content|tojson(true) }}\n{{ [1, [], {}]|tojson(indent=0) }}\n"
        "{{ {'b': 1, 'a': [1, 2]}|tojson(sort_keys=true, indent=1, separators=(', ', ' = ')) }}"
    ),
    "python_str_printing": (
        "{{ messages[2] }}|{{ messages[1].content.split() }}|{{ true }}|{{ none }}|{{ 1.5e-7 }}|{{ 1e16 }}|{{ 2.0 }}|"
        "{{ tools is none }}|{{ documents }}|{{ bos_token is defined }}|{{ eos_token }}|{{ pad_token }}|{{ [1, 'a', none, true] }}|"
        "{{ messages[2].tool_calls[0].function.arguments|string }}|{{ 1.0 ~ '' }}|{{ 7 // 2 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 7 % 3 }}"
    ),
    "string_methods": (
        "{% set c = messages[1].content %}{% set s = messages[0].content %}"
        "[{{ s.strip() }}][{{ s.lstrip() }}][{{ s.rstrip() }}][{{ s.strip(' \\nS') }}]"
        "{{ c.split(' ', 2) }}{{ c.rsplit(None, 1) }}{{ c.splitlines() }}{{ c.upper() }}{{ c.lower() }}"
        "{{ c.startswith(('x', 'Hel')) }}{{ c.endswith('  ') }}{{ c.find('中') }}{{ c.count('e') }}"
        "{{ c.replace('e', 'E', 1) }}{{ 'hello world'.title() }}{{ 'hELLo'.capitalize() }}{{ '-'.join(['a', 'b']) }}"
        "{{ c[:5] }}{{ c[-3:] }}{{ c[::-1][:4] }}{{ 'abc'.removeprefix('a') }}{{ 'a,b,,c'.split(',') }}"
    ),
    "filters": (
        "{{ messages[0].content|trim }}|{{ messages|length }}|{{ messages|map(attribute='role')|join(',') }}|"
        "{{ messages|selectattr('role', 'equalto', 'assistant')|list|length }}|{{ messages[0].missing|default('dflt') }}|"
        "{{ (messages|first).role }}|{{ (messages|last).role }}|{{ 'hello world'|title }}|{{ 'hELLo'|capitalize }}|"
        "{{ [3, 1, 2]|sort|join }}|{% for k, v in {'b': 1, 'a': 2}|dictsort %}{{ k }}{{ v }}{% endfor %}|{{ 'a\\n\\nb\\nc'|indent(2) }}|{{ '%s-%d'|format('a', 3) }}|"
        "{{ 'x'|upper }}{{ 'Y'|lower }}|{{ [1, 2, 3]|reverse|list }}|{{ 3.7|int }}|{{ '2'|int + 1 }}|{{ 'ab'|replace('a', 'c') }}|"
        "{% for k, v in {'k1': 'v1', 'k2': 'v2'}|items %}{{ k }}={{ v }};{% endfor %}|{{ 'é中'|length }}|{{ [1, 2]|sum }}|{{ [none, 1]|select|list }}"
    ),
    "tests_and_operators": (
        "{% for m in messages %}{{ m.content is string }},{{ m.content is defined }},{{ m.tool_calls is iterable }},"
        "{{ m is mapping }},{{ m.thinking is defined }},{{ 'think' in (m.content or '') }},{{ m.role in ['user', 'tool'] }};{% endfor %}"
        "{{ 1 is number }}{{ 1.5 is number }}{{ none is none }}{{ false is false }}{{ true is true }}{{ 0 is false }}{{ 'a' is sequence }}"
        "{{ 'a' if messages else 'b' }}{{ not messages }}{{ 'k' in {'k': 1} }}{{ messages[1:]|length }}"
    ),
    "whitespace_control": (
        "{# comment #}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'system' %}\n"
        "        SYS: {{ m.content }}\n"
        "    {%- elif m.role == 'user' -%}\n"
        "        USER: {{ m.content }}\n"
        "    {%+ else %}\n"
        "  OTHER {{ loop.index }}/{{ loop.length }} {{ loop.first }} {{ loop.last }} {{ loop.revindex0 }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    GEN\n"
        "{% endif %}\n"
        "  trailing {{ 'x' }}  \n"
        "\n"
    ),
    "loop_controls_namespace": (
        "{% set ns = namespace(count=0, last_user=-1, roles=[]) %}"
        "{% for m in messages %}{% if m.role == 'tool' %}{% continue %}{% endif %}"
        "{% set ns.count = ns.count + 1 %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}"
        "{% if loop.index0 > 3 %}{% break %}{% endif %}{{ m.role[0] }}{% endfor %}"
        "|{{ ns.count }}|{{ ns.last_user }}|{% for m in messages[::-1] %}{{ loop.index0 }}{% endfor %}"
        "|{% for i in range(3) %}{{ i }}{{ loop.cycle('a', 'b') }}{% endfor %}|{{ dict(a=1, b='x') }}|{{ {'k': [1, {'n': none}]} }}"
    ),
    "generation_block": (
        "{% for m in messages %}"
        "{% if m.role == 'assistant' %}\n"
        "    {% generation %}\n"
        "A: {{ m.content }}\n"
        "    {%- endgeneration %}\n"
        "{% else %}\n"
        "{{ m.role }}\n"
        "{% endif %}"
        "{% endfor %}"
    ),
    "macros_tool_schemas": (
        "{%- macro ts_type(spec, required, is_nullable=false) -%}\n"
        "    {%- if spec.type == 'array' -%}\n"
        "        {%- if spec['items'] -%}{{- ts_type(spec['items'], required) + '[]' }}{%- else -%}any[]{%- endif -%}\n"
        "    {%- elif spec.type is defined and spec.type is iterable and spec.type is not string and spec.type is not mapping -%}\n"
        "        {{- spec.type | join(' | ') }}\n"
        "    {%- elif spec.type == 'string' -%}\n"
        "        {%- if spec.enum -%}{{- '\"' + spec.enum|join('\" | \"') + '\"' -}}{%- else -%}string{%- endif -%}\n"
        "    {%- elif spec.type == 'object' -%}\n"
        "        {%- if spec.properties -%}\n"
        "            {{- '{\\n' }}\n"
        "            {%- for name, sub in spec.properties.items() -%}\n"
        "                {{- name -}}{%- if name not in (spec.required or []) -%}?{%- endif -%}: {{ ts_type(sub, spec.required or []) }}\n"
        "                {%- if not loop.last -%}{{- ', ' }}{%- endif -%}\n"
        "            {%- endfor -%}\n"
        "            {{- '}' }}\n"
        "        {%- else -%}object{%- endif -%}\n"
        "    {%- else -%}{{- 'number' if spec.type in ['number', 'integer'] else 'any' }}{%- endif -%}\n"
        "{%- endmacro -%}\n"
        "{%- set last = namespace(name=none) %}\n"
        "{%- for tool in tools %}\n"
        "    {%- set tool = tool.function %}\n"
        "// {{ tool.description }}\n"
        "type {{ tool.name }} = (_: {\n"
        "    {%- for pname, pspec in tool.parameters.properties.items() %}\n"
        "{{ pname }}{{ '?' if pname not in (tool.parameters.required or []) }}: {{ ts_type(pspec, tool.parameters.required or []) }}\n"
        "        {%- if pspec.default is defined %}, // default: {{ pspec.default|tojson }}{% endif %}\n"
        "    {%- endfor %}\n"
        "}) => any;\n"
        "{% endfor %}\n"
        "{%- for message in messages %}\n"
        "    {%- if 'tool_calls' in message %}\n"
        "        {%- set later = namespace(found=false) %}\n"
        "        {%- for m in messages[loop.index:] %}{% if m.role == 'assistant' and 'tool_calls' not in m %}{% set later.found = true %}{% endif %}{% endfor %}\n"
        "        {%- set call = message.tool_calls[0] %}{% if call.function %}{% set call = call.function %}{% endif %}\n"
        "<call {{ call.name }} later={{ later.found }}>{{ call.arguments|tojson }}</call>\n"
        "        {%- set last.name = call.name %}\n"
        "    {%- elif message.role == 'tool' %}\n"
        "<result of {{ last.name }}>{{ message.content|tojson }}\n"
        "    {%- elif 'thinking' in message %}\n"
        "<thinking>{{ message.thinking }}\n"
        "    {%- endif %}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "<|start|>assistant\n"
        "{%- endif -%}"
    ),
    "jinja_edge_cases": "{{ nothing|length }}|{{ '=' * 3 }}|{{ none.foo }}|{{ 'abc'.foo }}|[{{ messages[10] }}]|{% for m in messages if m.role != 'system' %}{{ m.role }}{% endfor %}|{% for m in messages %}{{ loop.previtem.role if loop.previtem is defined else '-' }}{% endfor %}|{% macro w() %}[{{ caller() }}]{% endmacro %}{% call w() %}x{% endcall %}|{{ 'a' in nothing }}|{{ 1 ~ 2 }}|{% set d = {'items': [1], 'a': 2} %}{{ d['items'] }}|{{ messages[-1].role }}{{ 'hello'[1:-1] }}|{{ messages|join(', ', attribute='role') }}|{{ ([1] + [2])|length }}|{{ '%.2f'|format(3.14159) }} {{ 3.0|round }} {{ 2.5|round }} {{ 10/4 }}|{{ 'xxhixx'|trim('x') }}|{{ {'a': 'b'}|tojson|length }}|{{ 5 is divisibleby 5 }}{{ 'A' is upper }}{{ 3 is odd }}{{ 1 is integer }}{{ 1.0 is float }}{{ 'x' is in 'xyz' }}|{% for c in 'ab' %}{{ c }}|{% endfor %}|{{ '  x '.strip(none) }}|{{ 'abc'.upper().startswith('AB') }}|{{ true + 1 }}|{{ none == none }}{{ nothing == none }}{{ nothing is none }}|{{ 'ab'|center(6) }}|",
    "kwargs_and_special_tokens": (
        "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ custom }}|{{ date_string }}|"
        "{{ enable_thinking is defined }}|{{ documents|tojson }}|{{ add_generation_prompt }}"
    ),
}

QUIRK_KWARGS = {
    "kwargs_and_special_tokens": {"custom": {"a": [1, 2.5]}, "date_string": "26 Jul 2024", "eos_token": "<override>"},
}


def continue_cases():
    """`continue_final_message`: the rendered prompt ends where the final message's text does."""
    question = {"role": "user", "content": "List three primes."}
    yield dict(name="continue_assistant", messages=[question, {"role": "assistant", "content": "Sure: 2, 3"}])
    # Trailing whitespace that the template keeps: cut after it.
    yield dict(name="continue_trailing_space", messages=[question, {"role": "assistant", "content": "The primes are "}])
    # Leading whitespace: cut after the stripped text.
    yield dict(name="continue_leading_newline", messages=[question, {"role": "assistant", "content": "\n\n{\"primes\": ["}])
    yield dict(
        name="continue_after_thinking_off",
        messages=[question, {"role": "assistant", "content": "2, 3"}],
        enable_thinking=False,
    )
    # The user's own text can be continued too.
    yield dict(name="continue_user", messages=[{"role": "user", "content": "Complete this: once upon a"}])


def quirk_cases():
    for name, template in QUIRK_TEMPLATES.items():
        for gen in (False, True):
            yield dict(
                name=f"{name}{'_gen' if gen else ''}",
                template=template,
                messages=QUIRK_MESSAGES,
                tools=QUIRK_TOOLS if name != "python_str_printing" else None,
                documents=QUIRK_DOCS if name == "kwargs_and_special_tokens" else None,
                add_generation_prompt=gen,
                kwargs=QUIRK_KWARGS.get(name, {}),
            )


def main():
    cache = Path(os.environ.get("PIO_CACHE_DIR", ROOT / ".cache" / "pio"))
    tok_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else cache / "tokenizers" / "qwen3"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "tests" / "fixtures" / "chat" / "qwen3_chat_references.json"
    if not (tok_dir / "tokenizer.json").is_file():
        sys.exit(f"{tok_dir}/tokenizer.json not found: run scripts/setup.sh first")

    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    results = []
    for case in list(cases()) + [dict(c, add_generation_prompt=False, continue_final_message=True) for c in continue_cases()]:
        kwargs = {}
        if case.get("continue_final_message"):
            kwargs["continue_final_message"] = True
        if "enable_thinking" in case:
            kwargs["enable_thinking"] = case["enable_thinking"]
        text = tok.apply_chat_template(
            case["messages"],
            tools=case.get("tools"),
            add_generation_prompt=case["add_generation_prompt"],
            tokenize=False,
            **kwargs,
        )
        ids = tok.encode(text, add_special_tokens=False)
        keys = ("name", "messages", "tools", "add_generation_prompt", "enable_thinking")
        result = {key: case.get(key) for key in keys} | {"expected": text, "expected_ids": ids}
        if case.get("continue_final_message"):
            result["continue_final_message"] = True
        results.append(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(results)} cases to {out} (transformers {transformers.__version__})")

    quirks = []
    for case in quirk_cases():
        text = tok.apply_chat_template(
            case["messages"],
            tools=case["tools"],
            documents=case["documents"],
            chat_template=case["template"],
            add_generation_prompt=case["add_generation_prompt"],
            tokenize=False,
            **case["kwargs"],
        )
        quirks.append({**case, "expected": text})
    quirk_out = out.parent / "template_quirks.json"
    with open(quirk_out, "w", encoding="utf-8") as f:
        json.dump(quirks, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(quirks)} cases to {quirk_out}")


if __name__ == "__main__":
    main()
