"""What clients written for SGLang, vLLM and OpenAI send besides the basics: fields at their "off"
value, assistant turns replayed from other servers, echo, per-chunk usage, model retrieval, and the
error shape of unknown routes. On the shared demo-model server (see conftest.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from conftest import DEMO_MODEL

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def sse_events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as s:
        lines = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_upstream_bench_serving_payloads_are_served(demo_server):
    """SGLang's own bench_serving (--backend sglang) sends these fields on every /generate request,
    and its sglang-oai backend `best_of: 1` on every completion: they must not fail."""
    plain = post(demo_server, "/generate", {"text": "the quick brown", "sampling_params": GREEDY}).json()
    upstream = {
        "text": "the quick brown", "sampling_params": {**GREEDY, "repetition_penalty": 1.0, "frequency_penalty": 0.0,
        "presence_penalty": 0, "min_new_tokens": 0, "n": 1, "json_schema": None}, "stream": False,
        "lora_path": None, "return_logprob": False, "logprob_start_len": -1, "return_text_in_logprobs": True,
        "image_data": None, "return_hidden_states": False,
    }  # fmt: skip
    r = post(demo_server, "/generate", upstream)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == plain["output_ids"]

    body = {"model": DEMO_MODEL, "prompt": "the quick brown", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = post(demo_server, "/v1/completions", body).json()
    r = post(demo_server, "/v1/completions", {**body, "best_of": 1, "logit_bias": {}, "min_tokens": 0, "suffix": ""})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain["choices"][0]["text"]


def test_penalties_and_min_tokens_reach_the_sampler_from_either_api(demo_server):
    """OpenAI's names (min_tokens) and SGLang's (min_new_tokens) mean the same; the values arrive
    (the sampler itself is checked against the definitions in test_penalties.py)."""
    knobs = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3}
    native = post(demo_server, "/generate", {"text": "the the the", "sampling_params": {**GREEDY, **knobs, "min_new_tokens": 6}})
    body = {"model": DEMO_MODEL, "prompt": "the the the", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    openai_ = post(demo_server, "/v1/completions", {**body, **knobs, "min_tokens": 6})
    plain = post(demo_server, "/v1/completions", body)
    assert native.status_code == openai_.status_code == 200, (native.text, openai_.text)
    assert openai_.json()["choices"][0]["text"] == native.json()["text"]
    assert openai_.json()["choices"][0]["text"] != plain.json()["choices"][0]["text"]


def test_sampling_seed_is_sglangs_name_for_seed(demo_server):
    params = {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True}
    a = post(demo_server, "/generate", {"text": "seeded", "sampling_params": {**params, "seed": 7}}).json()
    b = post(demo_server, "/generate", {"text": "seeded", "sampling_params": {**params, "sampling_seed": 7}}).json()
    assert a["output_ids"] == b["output_ids"]
    r = post(demo_server, "/generate", {"text": "seeded", "sampling_params": {**params, "seed": 7, "sampling_seed": 8}})
    assert r.status_code == 400 and "disagree" in r.json()["error"]["message"]


def test_chat_accepts_neutral_tool_fields_and_replayed_assistant_turns(demo_server):
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "tool_calls": None, "refusal": None, "reasoning_content": "greet back"},
        {"role": "user", "content": "how are you"},
    ]
    plain_history = [{"role": m["role"], "content": m["content"]} for m in history]
    kw = dict(model=DEMO_MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(messages=plain_history, **kw)
    extra = client.chat.completions.create(
        messages=history, tools=[], tool_choice="auto", parallel_tool_calls=True, logit_bias={},
        response_format={"type": "text"}, store=False, **kw,
    )
    # The replayed fields reach neither the template nor the sampler: same prompt, same answer.
    assert extra.usage.prompt_tokens == plain.usage.prompt_tokens
    assert extra.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/generate", {"text": "hi", "lora_path": "my-adapter"}, "lora_path"),
        ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": 1000}, "logprob_start_len"),
        ("/generate", {"text": "hi", "sampling_params": {"regex": "a+"}}, "regex"),
        ("/generate", {"text": "hi", "sampling_params": {"n": 2}}, "'n'"),
        ("/v1/completions", {"prompt": "hi", "best_of": 2}, "best_of"),
        ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "high"}, "reasoning_effort"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                  "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                  "tool_calls": [{"id": "1", "type": "function"}]}]}, "tool_calls"),
    ],
)  # fmt: skip
def test_unsupported_values_get_400_naming_the_field(demo_server, path, body, field):
    r = post(demo_server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["type"] == "invalid_request_error"


def test_completions_echo_prepends_the_prompt(demo_server):
    body = {"model": DEMO_MODEL, "prompt": "once upon", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    plain = post(demo_server, "/v1/completions", body).json()["choices"][0]["text"]
    echoed = post(demo_server, "/v1/completions", {**body, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "once upon" + plain
    events = sse_events(demo_server, "/v1/completions", {**body, "echo": True, "stream": True})
    assert "".join(c["text"] for e in events for c in e["choices"]) == echoed
    from transformers import AutoTokenizer

    from sglang.test.make_gemma4_checkpoint import ensure_demo_model

    ids = [5, 6, 7]  # token-id prompts are echoed as their decoded text
    plain = post(demo_server, "/v1/completions", {**body, "prompt": ids}).json()["choices"][0]["text"]
    echoed = post(demo_server, "/v1/completions", {**body, "prompt": ids, "echo": True}).json()["choices"][0]["text"]
    assert echoed == AutoTokenizer.from_pretrained(ensure_demo_model()).decode(ids) + plain


def test_continuous_usage_stats_in_every_chunk(demo_server):
    body = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    events = sse_events(demo_server, "/v1/chat/completions", body)
    content = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    counts = [e["usage"]["completion_tokens"] for e in content]
    assert counts and counts == sorted(counts) and counts[-1] == 5
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"] for e in content)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    # Without include_usage the option changes nothing (as in vLLM).
    body["stream_options"] = {"continuous_usage_stats": True}
    assert all("usage" not in e for e in sse_events(demo_server, "/v1/chat/completions", body))


def test_retrieve_model_and_openai_errors_for_unknown_routes(demo_server):
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.models.retrieve(DEMO_MODEL).id == DEMO_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    for method, path, status in (("GET", "/v1/chat/completions", 405), ("GET", "/no/such/route", 404)):
        r = httpx.request(method, demo_server.url + path, timeout=10)
        assert r.status_code == status
        assert r.json()["error"]["code"] == status and r.json()["error"]["message"]


def test_server_info_has_the_resolved_limits_on_top(demo_server):
    info = httpx.get(demo_server.url + "/get_server_info", timeout=10).json()
    assert info["max_total_num_tokens"] == 8192
    assert isinstance(info["max_running_requests"], int) and info["max_running_requests"] > 0
    assert info["model_path"] == DEMO_MODEL
    assert httpx.get(demo_server.url + "/server_info", timeout=10).json()["max_total_num_tokens"] == 8192
    assert httpx.get(demo_server.url + "/model_info", timeout=10).json()["model_path"] == DEMO_MODEL


def test_chat_template_kwargs_reach_the_template():
    """The kwargs become template variables (unit level: the demo template uses none)."""
    from transformers import AutoTokenizer

    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
    from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
    from sglang.test.make_gemma4_checkpoint import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model())
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if shout %}!!{% endif %}"
    chat = OpenAIServingChat(SimpleNamespace(tokenizer=tokenizer))
    messages = [{"role": "user", "content": "hey"}]
    quiet = chat._apply_chat_template(ChatCompletionRequest(messages=messages))
    loud = chat._apply_chat_template(ChatCompletionRequest(messages=messages, chat_template_kwargs={"shout": True}))
    assert tokenizer.decode(loud) == "hey!!" and tokenizer.decode(quiet) == "hey"


def test_metrics_have_sglangs_throughput_cache_and_tpot_series(demo_server):
    # Streamed, so tokens reach the server's front end one step at a time (a non-streamed request's
    # tokens all arrive with its end, as in SGLang, and give a time per output token of 0).
    prompt = {"text": "a prompt that is long enough to be cached " * 4, "sampling_params": GREEDY, "stream": True}
    for _ in range(2):  # the second prefill finds the first one's prefix
        assert sse_events(demo_server, "/generate", prompt)[-1]["meta_info"]["completion_tokens"] == 6
    text = httpx.get(demo_server.url + "/metrics", timeout=10).text
    values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert 0 < values["sglang:cache_hit_rate"] <= 1
    assert values["sglang:gen_throughput"] >= 0
    assert values["sglang:time_per_output_token_seconds_count"] >= 2
    assert values["sglang:time_per_output_token_seconds_sum"] > 0


def test_tokenize_and_detokenize_round_trip(demo_server):
    from transformers import AutoTokenizer

    from sglang.test.make_gemma4_checkpoint import ensure_demo_model

    tok = AutoTokenizer.from_pretrained(ensure_demo_model())
    one = post(demo_server, "/tokenize", {"prompt": "hello world"}).json()
    assert one["tokens"] == tok.encode("hello world") and one["count"] == len(one["tokens"]) and one["max_model_len"] > 0
    both = post(demo_server, "/v1/tokenize", {"prompt": ["a b", "c"], "add_special_tokens": False}).json()
    assert both["tokens"] == [tok.encode("a b", add_special_tokens=False), tok.encode("c", add_special_tokens=False)]
    assert post(demo_server, "/detokenize", {"tokens": both["tokens"][0]}).json()["text"] == "a b"
    assert post(demo_server, "/v1/detokenize", {"tokens": both["tokens"]}).json()["text"] == ["a b", "c"]
    for path, body in (("/tokenize", {"prompt": 5}), ("/detokenize", {"tokens": [10**9]}), ("/detokenize", {"tokens": "x"})):
        r = post(demo_server, path, body)
        assert r.status_code == 400 and r.json()["error"]["message"], (path, r.text)


def test_prompt_logprobs_equal_the_models_across_chunks_and_the_prefix_cache(demo_server):
    """logprob_start_len: the prompt's logprobs from that position on, equal to log_softmax of the
    model's logits over the whole prompt (the demo server prefills 64-token chunks, so a 150-token
    prompt takes three; the second request finds the first one's prefix cached up to its start)."""
    import torch

    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.server_args import ServerArgs
    from sglang.test.static_batch import prefill, release

    ids = [(i * 37) % 500 + 3 for i in range(150)]
    args = ServerArgs(model_path=DEMO_MODEL, device="cpu", dtype="float32", max_total_tokens=1024)
    runner = ModelRunner(args, ModelConfig.from_server_args(args))
    batch, out = prefill(runner, [ids], return_all_logits=True)
    release(runner, batch)
    ref = torch.log_softmax(out.all_logits.float(), dim=-1)
    for start in (0, 100):
        body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": start, "top_logprobs_num": 2,
                "sampling_params": {"max_new_tokens": 2, "temperature": 0}}  # fmt: skip
        meta = post(demo_server, "/generate", body).json()["meta_info"]
        got = meta["input_token_logprobs"]
        assert [t for _, t, _ in got] == ids[start:]
        if start == 0:
            assert got[0][0] is None and meta["input_top_logprobs"][0] is None
            got, tops = got[1:], meta["input_top_logprobs"][1:]
        else:
            tops = meta["input_top_logprobs"]
            assert 0 < meta["cached_tokens"] <= start - 1  # the prefix cache stops short of the scored rows
        first = max(start, 1)
        expected = torch.stack([ref[p - 1, ids[p]] for p in range(first, len(ids))])
        assert torch.allclose(torch.tensor([lp for lp, _, _ in got]), expected, atol=1e-4)
        ref_top = ref[first - 1 : len(ids) - 1].topk(2, dim=-1)
        assert [[t for _, t, _ in top] for top in tops] == ref_top.indices.tolist()
        assert len(meta["output_token_logprobs"]) == 2


def test_completions_echo_with_logprobs_scores_the_prompt(demo_server):
    """What lm-eval's loglikelihood requests send: echo, logprobs and a short completion. The prompt's
    tokens lead the logprobs (the first with null), with the values /generate's prompt logprobs give,
    and the stream carries the same."""
    ids = [(i * 11) % 300 + 5 for i in range(20)]
    body = {"model": DEMO_MODEL, "prompt": ids, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "echo": True, "logprobs": 2}
    choice = post(demo_server, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in lp["token_logprobs"][1:]) and all(len(t) == 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    native = post(demo_server, "/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                             "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}})  # fmt: skip
    meta = native.json()["meta_info"]
    assert lp["token_logprobs"] == [v for v, _, _ in meta["input_token_logprobs"]] + [v for v, _, _ in meta["output_token_logprobs"]]
    events = sse_events(demo_server, "/v1/completions", {**body, "stream": True})
    parts = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"]]
    assert [v for p in parts for v in p["token_logprobs"]] == lp["token_logprobs"]
    assert "".join(c["text"] for e in events for c in e["choices"]) == choice["text"]


def test_abort_request_ends_requests_with_finish_reason_abort(demo_server):
    """SGLang's /abort_request: the request ends normally (200) with what it generated so far and
    finish_reason abort; its KV is freed and the server keeps serving."""
    import asyncio

    body = {"text": "abort me " * 5, "rid": "to-abort", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0}}  # fmt: skip
    events = []
    with httpx.stream("POST", demo_server.url + "/generate", json=body, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    assert post(demo_server, "/abort_request", {"rid": "to-abort"}).status_code == 200
    last = json.loads(events[-2])
    assert events[-1] == "[DONE]" and last["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(last["output_ids"]) < 3000

    async def abort_all_while_running():
        async with httpx.AsyncClient(timeout=60) as c:
            task = asyncio.ensure_future(c.post(demo_server.url + "/v1/completions", json={
                "model": DEMO_MODEL, "prompt": "keep going", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}))  # fmt: skip
            await asyncio.sleep(0.5)
            assert (await c.post(demo_server.url + "/abort_request", json={"abort_all": True})).status_code == 200
            return await task

    r = asyncio.run(abort_all_while_running())
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "abort"
    assert demo_server.wait_idle(timeout=60)["kv_used_tokens"] == 0
    assert post(demo_server, "/abort_request", {"rid": "no-such-request"}).status_code == 200
    assert post(demo_server, "/abort_request", {}).status_code == 400
    assert post(demo_server, "/generate", {"text": "still serving", "sampling_params": GREEDY}).status_code == 200
