"""API key enforcement, and what happens when the scheduler process dies under load."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from conftest import pid_alive

KEY = "sk-test-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed_server(start_server):
    return start_server("--api-key", KEY, "--served-model-name", "gemma-demo")


def test_api_key_is_enforced(keyed_server):
    url = keyed_server.url
    for path in ("/v1/models", "/get_server_info", "/get_model_info"):
        r = httpx.get(url + path, timeout=10)
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["gemma-demo"]
    out = client.chat.completions.create(model="gemma-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert out.model == "gemma-demo" and out.usage.completion_tokens <= 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_scheduler_crash_fails_in_flight_requests_and_exits_nonzero(keyed_server):
    url = keyed_server.url
    scheduler_pid = keyed_server.internal_state(**AUTH)["scheduler_pid"]
    body = {"text": "never ending story", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0}}

    async def streaming() -> list[str]:
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as c:
            async with c.stream("POST", url + "/generate", json={**body, "stream": True}) as s:
                return [line async for line in s.aiter_lines() if line.startswith("data: ")]

    async def non_streaming() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60, headers=AUTH) as c:
            return await c.post(url + "/generate", json=body)

    async def run():
        tasks = [asyncio.create_task(streaming()), asyncio.create_task(non_streaming())]
        await asyncio.sleep(1.0)  # both are decoding now
        os.kill(scheduler_pid, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

    started = time.monotonic()
    events, response = asyncio.run(run())
    assert time.monotonic() - started < 30  # an error, never a hang
    assert not isinstance(events, Exception), events
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2]
    assert not isinstance(response, Exception), response
    assert response.status_code >= 500 and "error" in response.json()
    keyed_server.proc.wait(timeout=30)
    assert keyed_server.proc.returncode != 0
    assert not pid_alive(scheduler_pid)
