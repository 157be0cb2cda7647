"""The HTTP server end to end, through real HTTP, on one shared demo-model server (see conftest.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from conftest import DEMO_MODEL

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sglang.test.make_gemma4_checkpoint import ensure_demo_model

    return AutoTokenizer.from_pretrained(ensure_demo_model())


def generate(server, text=None, input_ids=None, timeout=60, **params) -> dict:
    body = {"sampling_params": params}
    body.update({"text": text} if text is not None else {"input_ids": input_ids})
    r = httpx.post(server.url + "/generate", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def chat_prompt_len(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


# ------------------------------------------------------------------ OpenAI API


def test_chat_stream_equals_non_stream_and_usage_is_exact(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours, 日本語 too."}]
    full = client.chat.completions.create(model=DEMO_MODEL, messages=messages, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage.prompt_tokens == chat_prompt_len(tokenizer, messages)
    assert full.usage.completion_tokens == 20
    assert full.usage.total_tokens == full.usage.prompt_tokens + 20

    stream = client.chat.completions.create(
        model=DEMO_MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert roles == ["assistant"]
    assert "".join(pieces) == choice.message.content
    assert finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, 20)


def test_completions_stream_equals_non_stream(client):
    full = client.completions.create(model=DEMO_MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    stream = client.completions.create(model=DEMO_MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text


def test_completions_batch_prompts_and_n(client, tokenizer):
    out = client.completions.create(model=DEMO_MODEL, prompt=["one two", "three"], n=2, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy copies agree
    assert out.usage.completion_tokens == 16
    assert out.usage.prompt_tokens == len(tokenizer.encode("one two")) + len(tokenizer.encode("three"))  # once per prompt
    by_ids = client.completions.create(model=DEMO_MODEL, prompt=[[5, 6, 7, 8], [9, 10]], max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.usage.prompt_tokens == 6 and len(by_ids.choices) == 2


def test_models_endpoint(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [DEMO_MODEL]


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model=DEMO_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
        assert item.logprob <= 0


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=DEMO_MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    two = client.completions.create(n=2, **kw)
    assert two.choices[0].text == a.choices[0].text  # choice j uses seed + j


# ------------------------------------------------------------------ stop conditions


def test_stop_string_cuts_text_stream_and_non_stream(demo_server, client):
    base = generate(demo_server, "Tell me a story about a cat", max_new_tokens=24, ignore_eos=True, **GREEDY)
    text = base["text"]
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2])
    cut = text[: text.index(stop)]
    out = generate(demo_server, "Tell me a story about a cat", max_new_tokens=24, ignore_eos=True, stop=[stop], **GREEDY)
    assert out["text"] == cut
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["meta_info"]["completion_tokens"] < 24

    stream = client.completions.create(model=DEMO_MODEL, prompt="Tell me a story about a cat", max_tokens=24, temperature=0, stop=[stop], stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids_and_max_new_tokens(demo_server):
    base = generate(demo_server, "Count with me", max_new_tokens=10, ignore_eos=True, **GREEDY)
    ids = base["output_ids"]
    target = ids[3]
    k = ids.index(target)
    out = generate(demo_server, "Count with me", max_new_tokens=10, ignore_eos=True, stop_token_ids=[target], **GREEDY)
    assert out["output_ids"] == ids[: k + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    assert out["meta_info"]["completion_tokens"] == k + 1
    short = generate(demo_server, "Count with me", max_new_tokens=2, ignore_eos=True, **GREEDY)
    assert short["output_ids"] == ids[:2]
    assert short["meta_info"]["finish_reason"]["type"] == "length"


def test_eos_stops_unless_ignored(demo_server):
    # One batched call over candidate prompts finds one whose greedy continuation hits an EOS id.
    prompts = [[2, 10 + i, 20 + i, 30 + i] for i in range(32)]
    r = httpx.post(demo_server.url + "/generate", json={"input_ids": prompts, "sampling_params": {"max_new_tokens": 32, **GREEDY}}, timeout=120)
    hits = [(p, o) for p, o in zip(prompts, r.json()) if o["meta_info"]["finish_reason"]["type"] == "stop"]
    if not hits:
        pytest.skip("no greedy EOS found for the demo model")
    prompt, out = hits[0]
    assert out["output_ids"][-1] == out["meta_info"]["finish_reason"]["matched"]
    n = len(out["output_ids"])
    longer = generate(demo_server, input_ids=prompt, max_new_tokens=n + 3, ignore_eos=True, **GREEDY)
    assert longer["output_ids"][:n] == out["output_ids"]
    assert longer["meta_info"]["finish_reason"]["type"] == "length"


# ------------------------------------------------------------------ batching and caching


def test_32_concurrent_greedy_requests_match_each_alone(demo_server):
    prompts = [f"Request {i}: describe the number {i * 37} in words" for i in range(32)]
    alone = [generate(demo_server, p, max_new_tokens=8, ignore_eos=True, **GREEDY)["output_ids"] for p in prompts]

    async def run_all():
        async with httpx.AsyncClient(timeout=120) as c:
            body = lambda p: {"text": p, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True, **GREEDY}}  # noqa: E731
            rs = await asyncio.gather(*(c.post(demo_server.url + "/generate", json=body(p)) for p in prompts))
            return [r.json()["output_ids"] for r in rs]

    assert asyncio.run(run_all()) == alone


def test_shared_prefix_reports_cached_tokens_and_same_output(demo_server, client):
    prefix = "You are a meticulous assistant. " + " ".join(f"fact{i}" for i in range(60))
    first = client.chat.completions.create(model=DEMO_MODEL, messages=[{"role": "system", "content": prefix}, {"role": "user", "content": "first question"}], max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens > 100
    msgs = [{"role": "system", "content": prefix}, {"role": "user", "content": "second question"}]
    second = client.chat.completions.create(model=DEMO_MODEL, messages=msgs, max_tokens=6, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 100, cached
    assert cached < second.usage.prompt_tokens
    assert httpx.post(demo_server.url + "/flush_cache", timeout=30).status_code == 200
    cold = client.chat.completions.create(model=DEMO_MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == second.choices[0].message.content
    # The native API reports the same through meta_info.
    again = generate(demo_server, input_ids=list(range(5, 150)), max_new_tokens=3, **GREEDY)
    hit = generate(demo_server, input_ids=list(range(5, 150)) + [7, 8], max_new_tokens=3, **GREEDY)
    assert again["meta_info"]["cached_tokens"] == 0 or again["meta_info"]["cached_tokens"] < 145
    assert hit["meta_info"]["cached_tokens"] >= 140


def test_long_prompt_goes_through_chunked_prefill(demo_server):
    ids = [(i * 13) % 700 + 5 for i in range(300)]  # > 4 chunks of 64
    a = generate(demo_server, input_ids=ids, max_new_tokens=6, ignore_eos=True, **GREEDY)
    assert a["meta_info"]["prompt_tokens"] == 300 and len(a["output_ids"]) == 6


def test_native_generate_batch_and_stream(demo_server):
    r = httpx.post(demo_server.url + "/generate", json={"text": ["alpha", "beta gamma"], "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}}, timeout=60)
    assert r.status_code == 200
    outs = r.json()
    assert len(outs) == 2 and all(len(o["output_ids"]) == 3 for o in outs)
    with httpx.stream("POST", demo_server.url + "/generate", json={"text": "alpha", "stream": True, "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}}, timeout=60) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["text"] == outs[0]["text"] and last["output_ids"] == outs[0]["output_ids"]


def test_client_disconnect_mid_stream_frees_kv(demo_server):
    async def start_and_drop(i: int) -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"text": f"stream {i} " * 20, "stream": True, "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True, **GREEDY}}
            async with c.stream("POST", demo_server.url + "/generate", json=body) as s:
                got = 0
                async for line in s.aiter_lines():
                    got += line.startswith("data: ")
                    if got >= 3:
                        break  # leaving the block closes the connection mid-stream

    async def run():
        await asyncio.gather(*(start_and_drop(i) for i in range(6)))

    asyncio.run(run())
    state = demo_server.wait_idle(timeout=60)
    assert state["kv_used_tokens"] == 0
    assert state["memory_ok"] is True


# ------------------------------------------------------------------ errors


BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": -5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "min_p": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [10**9]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 5000}]}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": -1}}),
    ("/generate", {"text": "hi", "sampling_params": {"bogus": 1}}),
    ("/generate", {"text": "hi", "input_ids": [1, 2]}),
    ("/generate", {"input_ids": [1, 100000]}),
    ("/generate", {"text": "hi", "extra": True}),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": "hot"}}),
    ("/generate", {"text": "hi", "sampling_params": "greedy"}),
    ("/generate", {"text": [], "sampling_params": {}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
    ("/v1/chat/completions", {"messages": "hi"}),
]


@pytest.mark.parametrize("path,body", BAD_REQUESTS, ids=[f"{p}:{sorted(b)[-1]}:{i}" for i, (p, b) in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_400_with_openai_error_body(demo_server, path, body):
    r = httpx.post(demo_server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["code"] == 400


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_malformed_json_gets_400(demo_server, raw):
    for path in ("/v1/chat/completions", "/v1/completions", "/generate"):
        r = httpx.post(demo_server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, r.text)
        assert "error" in r.json()


def test_stream_request_errors_before_streaming(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEMO_MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1, stream=True)


def test_server_keeps_serving_after_errors(demo_server):
    for path, body in BAD_REQUESTS[:5]:
        httpx.post(demo_server.url + path, json=body, timeout=30)
    assert httpx.get(demo_server.url + "/health_generate", timeout=60).status_code == 200
    assert demo_server.wait_idle()["kv_used_tokens"] == 0


# ------------------------------------------------------------------ operations


def test_operational_endpoints(demo_server):
    url = demo_server.url
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert httpx.get(url + "/health_generate", timeout=60).status_code == 200
    info = httpx.get(url + "/get_model_info", timeout=10).json()
    assert info["model_path"] == DEMO_MODEL and info["is_generation"] is True
    assert info["architectures"] == ["Gemma4ForConditionalGeneration"]
    server_info = demo_server.server_info()
    assert server_info["moe_runner_backend"] == "torch" and server_info["attention_backend"] == "torch_native"
    state = server_info["internal_states"][0]
    assert state["max_total_num_tokens"] == 8192 and state["moe_top_k"] == 2


def test_metrics_are_prometheus_text(demo_server):
    generate(demo_server, "metrics please", max_new_tokens=3, **GREEDY)
    text = httpx.get(demo_server.url + "/metrics", timeout=10).text
    for name in (
        "sglang:prompt_tokens_total", "sglang:generation_tokens_total", "sglang:num_running_reqs",
        "sglang:num_queue_reqs", "sglang:token_usage", "sglang:time_to_first_token_seconds_bucket",
        "sglang:inter_token_latency_seconds_bucket",
    ):
        assert name in text, name
    gen = next(line for line in text.splitlines() if line.startswith("sglang:generation_tokens_total"))
    assert float(gen.split()[-1]) >= 3


def test_flush_cache_empties_the_pool(demo_server):
    generate(demo_server, "fill the cache a little", max_new_tokens=3, **GREEDY)
    demo_server.wait_idle()
    assert httpx.post(demo_server.url + "/flush_cache", timeout=30).status_code == 200
    state = demo_server.internal_state()
    assert state["kv_available_tokens"] == state["max_total_num_tokens"]
    assert state["kv_cached_tokens"] == 0
