"""Tool calls: Gemma 4's native call notation read back as OpenAI tool_calls (streamed and not),
tools rendered through the chat template, replayed calls and tool results in the history; and
Gemma 4's thinking split into reasoning_content (--reasoning-parser gemma4)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from conftest import DEMO_MODEL

from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
from sglang.srt.entrypoints.openai.tool_calls import HeldContent, held_back, split_tool_calls

Q = '<|"|>'
CALL = f"<|tool_call>call:get_weather{{city:{Q}Paris, {{FR}}: centre{Q},days:3,opts:{{metric:true,hours:[6,-12.5,1e3]}},note:null}}<tool_call|>"
ARGS = {"city": "Paris, {FR}: centre", "days": 3, "opts": {"metric": True, "hours": [6, -12.5, 1000.0]}, "note": None}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "strict": True,
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


def test_quoted_keys_and_json_strings_are_read_too():
    _, calls = split_tool_calls(f'<|tool_call>call:f{{{Q}a key{Q}:"json \\"q\\"",b:{Q}x{Q}}}<tool_call|>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"a key": 'json "q"', "b": "x"}


def test_calls_are_parsed_out_of_the_text():
    content, calls = split_tool_calls(f"Let me check. {CALL}{CALL.replace('get_weather', 'get.time')}")
    assert content == "Let me check. "
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get.time"]
    assert all(json.loads(c["function"]["arguments"]) == ARGS and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("text", ["plain answer", "<|tool_call>call:f{a:}<tool_call|>", f"<|tool_call>call:f{{a:{Q}open}}<tool_call|>",
                                  "<|tool_call>call:f{a:1,}<tool_call|> x"])  # fmt: skip
def test_text_without_a_valid_call_stays_content(text):
    assert split_tool_calls(text) == (text, [])


def test_streamed_content_holds_back_only_what_may_be_a_call():
    assert held_back("abc <|tool") == 4 and held_back("abc <") == 4 and held_back("abc") == 3
    text = f"Checking the weather {CALL} now."
    for cut in range(1, len(text)):
        held = HeldContent()
        first, _ = held.add(text[:cut], False)
        rest, calls = held.add(text[cut:], True)
        assert first + rest == "Checking the weather  now.", cut
        assert [json.loads(c["function"]["arguments"]) for c in calls] == [ARGS]


def chat_with(template: str, reasoning_parser: str | None = None):
    from transformers import AutoTokenizer

    from sglang.test.make_gemma4_checkpoint import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model())
    tokenizer.chat_template = template
    args = SimpleNamespace(served_model_name="m", reasoning_parser=reasoning_parser)
    return OpenAIServingChat(SimpleNamespace(tokenizer=tokenizer, server_args=args)), tokenizer


def test_tools_and_replayed_calls_reach_the_template():
    template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}<{{ m.role }}>"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
                "{{ m.content or '' }}{% endfor %}")  # fmt: skip
    chat, tok = chat_with(template)
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]  # fmt: skip
    prompt = tok.decode(chat._apply_chat_template(ChatCompletionRequest(messages=history, tools=TOOLS)))
    assert prompt == "[get_weather]<user>weather?<assistant>get_weather(Paris)<tool>sunny"
    off = tok.decode(chat._apply_chat_template(ChatCompletionRequest(messages=history, tools=TOOLS, tool_choice="none")))
    assert off == "<user>weather?<assistant>get_weather(Paris)<tool>sunny"


def fake_out(text: str, final: bool) -> dict:
    meta = {"finish_reason": {"type": "stop", "matched": 1} if final else None, "prompt_tokens": 5,
            "completion_tokens": len(text), "cached_tokens": 0}  # fmt: skip
    return {"text": text, "output_ids": list(range(len(text))), "meta_info": meta}


def stream_events(chat, req, text: str, cuts: tuple[int, ...]) -> list[dict]:
    async def gen():
        for end in (*cuts, len(text)):
            yield fake_out(text[:end], end == len(text))

    async def collect():
        return [line async for line in chat._stream(req.model_copy(update={"stream": True}), [gen()])]

    return [json.loads(e[6:]) for e in asyncio.run(collect()) if e.startswith("data: {")]


def test_thinking_is_split_into_reasoning_content():
    chat, tok = chat_with("{% for m in messages %}{{ m.content }}{% endfor %}", reasoning_parser="gemma4")
    special = tok.all_special_tokens[0]
    text = f"<|channel>thought\nThe user wants weather.<channel|>Let me check.{special} {CALL}"
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    assert chat._build_inputs(req.model_copy(update={"tools": None}))[0].sampling_params["skip_special_tokens"] is False
    choice = chat._response(req, [fake_out(text, True)])["choices"][0]
    assert choice["message"]["reasoning_content"] == "The user wants weather."
    assert choice["message"]["content"] == "Let me check." and choice["finish_reason"] == "tool_calls"
    events = stream_events(chat, req, text, (9, 25, 50, 60))
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user wants weather."
    assert "".join(d.get("content", "") for d in deltas) == "Let me check. "
    assert [json.loads(c["function"]["arguments"]) for d in deltas for c in d.get("tool_calls", [])] == [ARGS]
    # separate_reasoning false (or no parser): the answer as decoded, thinking included
    off = chat._response(req.model_copy(update={"separate_reasoning": False, "tools": None}), [fake_out("plain", True)])
    assert off["choices"][0]["message"] == {"role": "assistant", "content": "plain"}


def test_answers_carry_tool_calls_streamed_or_not():
    chat, tok = chat_with("{% for m in messages %}{{ m.content }}{% endfor %}")
    special = tok.all_special_tokens[0]  # other special tokens stay out of the content
    text = f"Check{special}ing. {CALL}"
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    message = chat._response(req, [fake_out(text, True)])["choices"][0]
    assert message["finish_reason"] == "tool_calls" and message["message"]["content"] == "Checking."
    assert json.loads(message["message"]["tool_calls"][0]["function"]["arguments"]) == ARGS
    params = chat._build_inputs(req)[0].sampling_params  # the markers must survive detokenization, unpadded
    assert (params["skip_special_tokens"], params["spaces_between_special_tokens"]) == (False, False)
    plain = chat._response(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]), [fake_out(text, True)])
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": text}  # without tools: untouched

    events = stream_events(chat, req, text, (12, 30))
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content", "") for d in deltas) == "Checking. "
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0] and json.loads(calls[0]["function"]["arguments"]) == ARGS
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    "body,field",
    [({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"), ({"tools": [{"type": "retrieval"}]}, "tools"),
     ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
       "function": {"name": "f", "arguments": "{not json"}}]}]}, "messages")],
)  # fmt: skip
def test_bad_tool_requests_get_400(demo_server, body, field):
    r = httpx.post(demo_server.url + "/v1/chat/completions", json={"model": DEMO_MODEL, "messages": [{"role": "user", "content": "hi"}], **body}, timeout=30)
    assert r.status_code == 400 and field in r.json()["error"]["message"] + (r.json()["error"]["param"] or ""), r.text


def test_tool_requests_are_served(demo_server):
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1",
                "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]  # fmt: skip
    body = {"model": DEMO_MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 4, "temperature": 0}
    r = httpx.post(demo_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
