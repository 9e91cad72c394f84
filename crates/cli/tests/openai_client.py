"""The official `openai` Python package against a running `pio serve` (run by
crates/cli/tests/serve.rs in a venv under .cache/): models, chat, streaming, several choices (n),
completions, logprobs and errors, as an application would call them. Prints one JSON object with
what it saw; exits non-zero (with the traceback) when the SDK raises where it should not.

    python openai_client.py BASE_URL API_KEY
"""
import json
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
out = {"sdk_version": openai.__version__}

out["models"] = [m.id for m in client.models.list().data]
model = out["models"][0]
messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]

chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
out["chat"] = {
    "object": chat.object,
    "content": chat.choices[0].message.content,
    "role": chat.choices[0].message.role,
    "finish_reason": chat.choices[0].finish_reason,
    "usage": chat.usage.model_dump(),
}

# The SDK's own content-part list (what it sends for multi-part messages).
parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "text", "text": "Name a river."}]}]
out["chat_parts_content"] = client.chat.completions.create(
    model=model, messages=parts, max_tokens=8, temperature=0).choices[0].message.content

stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        finish = choice.finish_reason or finish
out["chat_stream"] = {"content": "".join(pieces), "usage": usage, "finish_reason": finish}

with_logprobs = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                               logprobs=True, top_logprobs=2)
content = with_logprobs.choices[0].logprobs.content
out["chat_logprobs"] = [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                         "top": [a.token for a in t.top_logprobs]} for t in content]

# Several choices: n=2 sampled with a seed (the second choice is seeded one higher).
several = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=1.0, seed=7, n=2,
                                         extra_body={"ignore_eos": True})
out["chat_n"] = {
    "indexes": [c.index for c in several.choices],
    "finish_reasons": [c.finish_reason for c in several.choices],
    "usage": several.usage.model_dump(),
}

completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0,
                                       logprobs=2)
out["completion"] = {
    "object": completion.object,
    "text": completion.choices[0].text,
    "tokens": completion.choices[0].logprobs.tokens,
    "text_offset": completion.choices[0].logprobs.text_offset,
    "usage": completion.usage.model_dump(),
}
streamed = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True)
out["completion_stream_text"] = "".join(c.choices[0].text for c in streamed if c.choices)
# A batch of prompts (the SDK's list form): n choices of each, in prompt order.
batch = client.completions.create(model=model, prompt=["Once upon a time", "Hello"], max_tokens=6, temperature=0)
out["completion_batch"] = {"indexes": [c.index for c in batch.choices], "texts": [c.text for c in batch.choices]}
# lm-evaluation-harness's loglikelihood request: the prompt alone, echoed with its logprobs.
scored = client.completions.create(model=model, prompt="Once upon a time", max_tokens=0, echo=True, logprobs=1,
                                   temperature=0)
out["completion_echo"] = {
    "text": scored.choices[0].text,
    "tokens": scored.choices[0].logprobs.tokens,
    "token_logprobs": scored.choices[0].logprobs.token_logprobs,
    "completion_tokens": scored.usage.completion_tokens,
}

# Tools reach the chat template (the prompt grows); a past call and its result render. The
# random model writes no call, so the answer is text either way.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
with_tools = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="auto",
                                            max_tokens=4, temperature=0)
history = messages + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]
after_call = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=4, temperature=0)
tool_stream = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=4,
                                             temperature=0, stream=True)
tool_stream_content = "".join(c.choices[0].delta.content or "" for c in tool_stream if c.choices)
out["tools"] = {
    "prompt_tokens": with_tools.usage.prompt_tokens,
    "after_call_prompt_tokens": after_call.usage.prompt_tokens,
    "content": with_tools.choices[0].message.content,
    "tool_calls": [c.model_dump() for c in with_tools.choices[0].message.tool_calls or []],
    "stream_content": tool_stream_content,
}

# A forced call: the answer is constrained to the call's JSON, which the random model can only
# follow; the SDK reads the calls, and their arguments parse. The city is one of a list: a free
# string would rarely end in a random model's answer (its closing quote is one token of many).
forced_tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
                   "required": ["city"], "additionalProperties": False}}}]


def forced(tool_choice, seed=3):
    answer = client.chat.completions.create(model=model, messages=messages, tools=forced_tools,
                                            tool_choice=tool_choice,
                                            max_tokens=80, seed=seed)
    choice = answer.choices[0]
    return {
        "finish_reason": choice.finish_reason,
        "content": choice.message.content,
        "calls": [{"name": c.function.name, "arguments": json.loads(c.function.arguments)}
                  for c in choice.message.tool_calls or []],
    }
out["forced"] = {
    "named": forced({"type": "function", "function": {"name": "get_weather"}}),
    # The constraint lets JSON have whitespace, which a random model writes plenty of, and a list
    # of calls may go on: the first of a few seeds whose list ends within the 256-token context.
    "required": next((r for r in (forced("required", seed) for seed in range(8)) if r["finish_reason"] != "length"),
                     None),
}

errors = {}
try:
    client.chat.completions.create(model=model, messages=messages, tools=tools,
                                   tool_choice={"type": "function", "function": {"name": "no_such_tool"}},
                                   max_tokens=2)
except openai.BadRequestError as e:
    errors["tool_choice_unknown"] = {"status": e.status_code, "param": e.body.get("param")}
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
except openai.NotFoundError as e:
    errors["unknown_model"] = {"status": e.status_code, "param": e.body.get("param"), "code": e.code}
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=0)
except openai.BadRequestError as e:
    errors["max_tokens_0"] = {"status": e.status_code, "param": e.body.get("param")}
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
except openai.AuthenticationError as e:
    errors["wrong_key"] = {"status": e.status_code, "code": e.code}
out["errors"] = errors
print(json.dumps(out))
