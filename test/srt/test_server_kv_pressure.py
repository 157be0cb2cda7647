"""A server with a tiny KV pool: admission control and retraction must finish every request
correctly, and the pool must be empty afterwards, also when clients disconnect mid-stream."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from conftest import pid_alive

NUM_REQUESTS = 50
MAX_NEW = 24
POOL = 192


def prompt_ids(i: int) -> list[int]:
    return [2] + [(i * 31 + j * 7) % 700 + 5 for j in range(23)]  # 24 tokens + 24 out: a quarter of the pool


@pytest.fixture(scope="module")
def tiny_server(start_server):
    # A low conservativeness makes admission optimistic, so decoding really runs out and retracts.
    return start_server("--max-total-tokens", str(POOL), "--schedule-conservativeness", "0.3", "--dtype", "float32", "--chunked-prefill-size", "32")


async def _generate_all(url: str, prompts: list[list[int]]) -> list[dict]:
    async with httpx.AsyncClient(timeout=300) as c:
        body = lambda p: {"input_ids": p, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}  # noqa: E731
        rs = await asyncio.gather(*(c.post(url + "/generate", json=body(p)) for p in prompts))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:3]
    return [r.json() for r in rs]


def test_50_concurrent_long_requests_complete_and_free_the_pool(tiny_server, demo_server):
    prompts = [prompt_ids(i) for i in range(NUM_REQUESTS)]
    before = tiny_server.internal_state()["num_retractions"]
    outs = asyncio.run(_generate_all(tiny_server.url, prompts))
    # The same requests on the roomy shared server (batched there too) are the reference.
    reference = asyncio.run(_generate_all(demo_server.url, prompts))
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in reference]
    assert all(o["meta_info"]["completion_tokens"] == MAX_NEW for o in outs)
    state = tiny_server.wait_idle()
    assert state["num_retractions"] > before, "the pool was never short; the test exercises nothing"
    assert state["kv_used_tokens"] == 0 and state["memory_ok"] is True
    assert httpx.post(tiny_server.url + "/flush_cache", timeout=30).status_code == 200
    state = tiny_server.internal_state()
    assert state["kv_available_tokens"] == state["max_total_num_tokens"] == POOL


def test_disconnects_mid_stream_under_pressure_free_the_pool(tiny_server):
    async def start_and_drop(c: httpx.AsyncClient, i: int) -> None:
        body = {"input_ids": prompt_ids(100 + i), "stream": True, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
        async with c.stream("POST", tiny_server.url + "/generate", json=body) as s:
            seen = 0
            async for line in s.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 2 + i % 5:
                    return

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            await asyncio.gather(*(start_and_drop(c, i) for i in range(20)))

    asyncio.run(run())
    state = tiny_server.wait_idle(timeout=120)
    assert state["kv_used_tokens"] == 0 and state["memory_ok"] is True
    # Still serving correctly afterwards.
    assert httpx.get(tiny_server.url + "/health_generate", timeout=60).status_code == 200


def test_prompt_longer_than_the_pool_is_rejected(tiny_server):
    r = httpx.post(tiny_server.url + "/generate", json={"input_ids": [5] * (POOL + 10), "sampling_params": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 400
    assert "KV cache" in r.json()["error"]["message"]


def test_sigint_shuts_down_cleanly(tiny_server):
    scheduler_pid = tiny_server.internal_state()["scheduler_pid"]
    assert tiny_server.stop(signal.SIGINT) == 0
    assert not pid_alive(scheduler_pid)
