"""sglang.bench_serving: datasets, SSE parsing and metrics math in isolation, the whole client
against a small fake server (deterministic failures, split SSE chunks), then against the real demo
server for every backend. Only 127.0.0.1 traffic; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from sglang import bench_serving
from sglang.benchmark import backends as client
from sglang.benchmark.backends import (
    RequestInput,
    RequestOutput,
    SSEParser,
    chat_payload,
    completions_payload,
    merge_extra,
    sglang_payload,
)
from sglang.benchmark.datasets import (
    DatasetError,
    DatasetRow,
    TokenSampler,
    random_lens,
    sample_generated_shared_prefix_requests,
    sample_random_ids_requests,
    sample_random_requests,
    sample_sharegpt_requests,
)
from sglang.benchmark.metrics import Stats, calculate_metrics, format_summary
from sglang.test.make_gemma4_checkpoint import ensure_demo_model

BACKENDS = ("sglang", "sglang-oai", "sglang-oai-chat")
RECORD_FIELDS = {
    "backend", "dataset_name", "request_rate", "max_concurrency", "num_prompts", "random_input_len",
    "random_output_len", "random_range_ratio", "seed", "model", "tokenizer", "date", "duration", "completed",
    "failed", "total_input_tokens", "total_output_tokens", "request_throughput", "input_throughput",
    "output_throughput", "total_throughput", "concurrency", "mean_e2e_latency_ms", "median_e2e_latency_ms",
    "p99_e2e_latency_ms", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
    "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_demo_model())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- datasets


def test_random_text_has_exact_token_lengths(tokenizer):
    sampler = TokenSampler(tokenizer, random.Random(0))
    for n in (1, 2, 7, 64, 500):
        text = sampler.random_text(n)
        assert len(tokenizer.encode(text)) == n
    assert not set(sampler.pool) & set(tokenizer.all_special_ids)


def test_random_dataset_lengths_seed_and_range_ratio(tokenizer):
    def build(seed: int, ratio: float) -> list[DatasetRow]:
        return sample_random_requests(TokenSampler(tokenizer, random.Random(seed)), 20, 40, 12, ratio)

    exact = build(0, 1.0)
    assert [(r.prompt_len, r.output_len) for r in exact] == [(40, 12)] * 20
    assert all(len(tokenizer.encode(r.prompt)) == r.prompt_len for r in exact)
    assert [r.prompt for r in build(0, 1.0)] == [r.prompt for r in exact]  # seeded
    assert [r.prompt for r in build(1, 1.0)] != [r.prompt for r in exact]
    varied = build(0, 0.5)
    assert all(20 <= r.prompt_len <= 40 and 6 <= r.output_len <= 12 for r in varied)
    assert len({r.prompt_len for r in varied}) > 1
    assert all(len(tokenizer.encode(r.prompt)) == r.prompt_len for r in varied)


def test_random_lens_follow_sglang_bounds():
    lens = random_lens(10, 0.0, 500, random.Random(0))
    assert min(lens) == 1 and max(lens) == 10
    assert random_lens(10, 1.0, 5, random.Random(0)) == [10] * 5


def test_random_ids_are_exact_and_never_special(tokenizer):
    rows = sample_random_ids_requests(TokenSampler(tokenizer, random.Random(0)), 5, 33, 4, 1.0)
    special = set(tokenizer.all_special_ids)
    for r in rows:
        assert len(r.input_ids) == r.prompt_len == 33
        assert not set(r.input_ids) & special
        assert len(set(r.input_ids)) > 1


def test_sharegpt_from_local_file(tmp_path, tokenizer):
    convs = [
        {"conversations": [{"from": "human", "value": f"What is the capital of France? {i}"},
                           {"from": "gpt", "value": "The capital of France is Paris, a big city."}]}
        for i in range(6)
    ] + [{"conversations": [{"from": "human", "value": "only one turn"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    sampler = TokenSampler(tokenizer, random.Random(0))
    rows = sample_sharegpt_requests(sampler, str(path), 4)
    assert len(rows) == 4
    assert all(r.prompt.startswith("What is the capital") and r.prompt_len == len(tokenizer.encode(r.prompt)) for r in rows)
    assert all(r.output_len == len(tokenizer.encode("The capital of France is Paris, a big city.")) for r in rows)
    assert {r.output_len for r in sample_sharegpt_requests(sampler, str(path), 3, fixed_output_len=9)} == {9}


def test_sharegpt_missing_file_is_a_clear_error(tmp_path, tokenizer):
    sampler = TokenSampler(tokenizer, random.Random(0))
    with pytest.raises(DatasetError, match="--dataset-path"):
        sample_sharegpt_requests(sampler, "", 4)
    with pytest.raises(DatasetError, match="not found"):
        sample_sharegpt_requests(sampler, str(tmp_path / "nope.json"), 4)


def test_generated_shared_prefix_groups(tokenizer):
    rows = sample_generated_shared_prefix_requests(TokenSampler(tokenizer, random.Random(0)), 3, 4, 30, 8, 5)
    assert len(rows) == 12 and {r.output_len for r in rows} == {5}
    prefixes = {r.prompt.split("\n\n")[0] for r in rows}
    assert len(prefixes) == 3
    assert all(len(tokenizer.encode(p)) == 30 for p in prefixes)
    assert all(r.prompt_len == len(tokenizer.encode(r.prompt)) for r in rows)


# ---------------------------------------------------------------------------------- SSE + payloads


def test_sse_parser_handles_arbitrary_chunking():
    events = [{"text": "a", "n": 1}, {"text": "ab", "n": 2}, {"text": "abc\u00e9", "n": 3}]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events)
    raw = b": keep-alive comment\n\n" + raw + b"data: [DONE]\n\n"
    expected = [json.dumps(e) for e in events] + ["[DONE]"]
    for size in (1, 3, 7, len(raw)):
        parser = SSEParser()
        got = [p for i in range(0, len(raw), size) for p in parser.feed(raw[i : i + size])]
        assert got + parser.flush() == expected
    parser = SSEParser()  # last event without its trailing newline
    assert parser.feed(b'data: {"x": 1}') == [] and parser.flush() == ['{"x": 1}']


class _Chunks:
    """Stands in for an aiohttp response body: one network chunk per SSE event."""

    def __init__(self, events: list[dict]):
        self.content = self
        self.raw = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]

    async def iter_any(self):
        for chunk in self.raw:
            await asyncio.sleep(0.01)
            yield chunk


def _openai_events(backend: str, texts: list[str]) -> list[dict]:
    """A streamed answer as our server sends it: chat opens with a role-only chunk; one chunk per
    text piece; the finish; the usage."""
    piece = (lambda t: {"delta": {"content": t}}) if backend == "sglang-oai-chat" else (lambda t: {"text": t})
    events = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]}] if backend == "sglang-oai-chat" else []
    events += [{"choices": [{**piece(t), "finish_reason": None}]} for t in texts]
    events.append({"choices": [{**piece(""), "finish_reason": "length"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}})
    return events


@pytest.mark.parametrize("backend", ["sglang-oai", "sglang-oai-chat"])
@pytest.mark.parametrize("texts", [[], ["a", "b"]])
def test_openai_stream_ttft_never_reads_zero(backend, texts):
    """Tokens whose text is still empty (pieces of a multi-byte character, special tokens) send no
    chunk of their own: TTFT is the first text, or without any the finish, never 0 and never the
    chat stream's opening role chunk (sent before the prefill)."""
    out = RequestOutput()
    start = time.perf_counter()
    asyncio.run(client._read_stream(client.BACKENDS[backend], _Chunks(_openai_events(backend, texts)), out, start))
    first_real_event = 2 if backend == "sglang-oai-chat" else 1  # 10 ms apart
    assert 0.01 * first_real_event - 0.002 < out.ttft <= out.latency and out.output_len == 3


def _input(**kw) -> RequestInput:
    row = kw.pop("row", DatasetRow("hello", 3, 7))
    return RequestInput(row=row, api_url="http://x", model="m", output_len=7, **kw)


def test_payloads_follow_sglang_conventions():
    p = sglang_payload(_input())
    assert p == {"text": "hello", "sampling_params": {"temperature": 0.0, "max_new_tokens": 7, "ignore_eos": True}, "stream": True}
    ids = sglang_payload(_input(row=DatasetRow("x", 2, 7, [5, 6]), stream=False, ignore_eos=False))
    assert ids["input_ids"] == [5, 6] and "text" not in ids and not ids["stream"] and not ids["sampling_params"]["ignore_eos"]
    c = completions_payload(_input())
    assert c["prompt"] == "hello" and c["max_tokens"] == 7 and c["ignore_eos"] and c["stream_options"] == {"include_usage": True}
    chat = chat_payload(_input(stream=False))
    assert chat["messages"] == [{"role": "user", "content": "hello"}] and "stream_options" not in chat
    extra = sglang_payload(_input(extra_request_body={"sampling_params": {"top_k": 5}, "rid": "r1"}))
    assert extra["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 7, "ignore_eos": True, "top_k": 5}
    assert extra["rid"] == "r1"
    assert merge_extra({"a": 1, "b": {"x": 1}}, {"b": 2}) == {"a": 1, "b": 2}


# ---------------------------------------------------------------------------------- metrics


def test_metrics_math():
    rows = [DatasetRow("p", 10, 4), DatasetRow("q", 20, 4), DatasetRow("r", 30, 4)]
    outs = [
        RequestOutput(success=True, latency=1.0, ttft=0.4, itl=[0.2, 0.2, 0.2], prompt_len=11, output_len=4),
        RequestOutput(success=True, latency=2.0, ttft=0.5, itl=[0.5, 0.5, 0.5], output_len=4),
        RequestOutput(success=False, error="HTTP 400: bad"),
    ]
    m, in_lens, out_lens = calculate_metrics(rows, outs, 4.0, None)
    assert (m.completed, m.failed, m.total_input, m.total_output) == (2, 1, 31, 8)
    assert in_lens == [11, 20, 0] and out_lens == [4, 4, 0]
    assert m.request_throughput == pytest.approx(0.5) and m.output_throughput == pytest.approx(2.0)
    assert m.input_throughput == pytest.approx(31 / 4) and m.total_throughput == pytest.approx(39 / 4)
    assert m.concurrency == pytest.approx(3.0 / 4.0)
    assert m.e2e.mean == pytest.approx(1500) and m.ttft.median == pytest.approx(450)
    assert m.tpot.mean == pytest.approx(1000 * (0.6 / 3 + 1.5 / 3) / 2)
    assert m.itl.max == pytest.approx(500) and m.itl.p99 == pytest.approx(500)
    assert Stats.of([]) == Stats()
    text = format_summary(m, "sglang", float("inf"), None)
    for label in ("Successful requests:", "Failed requests:", "Benchmark duration (s):", "Total input tokens:",
                  "Total generated tokens:", "Request throughput (req/s):", "Input token throughput (tok/s):",
                  "Output token throughput (tok/s):", "Total token throughput (tok/s):", "Concurrency:",
                  "Median E2E Latency (ms):", "P99 E2E Latency (ms):", "P99 TTFT (ms):", "Median TPOT (ms):",
                  "P99 ITL (ms):", "Max request concurrency:"):
        assert label in text
    assert "Failed requests:                         1" in text
    assert "Max request concurrency:                 not set" in text


# ---------------------------------------------------------------------------------- fake server


class FakeServer:
    """SGLang-shaped endpoints; every `fail_every`-th generation request answers HTTP 400 and
    every `error_every`-th fails inside its stream. Events are written in two halves to split lines."""

    PROMPT_TOKENS = 11

    def __init__(self, model_dir: Path, fail_every: int = 0, error_every: int = 0):
        self.model_dir, self.fail_every, self.error_every = str(model_dir), fail_every, error_every
        self.count = 0
        self.payloads: list[dict] = []
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "FakeServer":
        self._thread.start()
        assert self._ready.wait(10), "fake server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/get_model_info", self._model_info)
        app.router.add_get("/v1/models", self._models)
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._generate)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _model_info(self, request):
        return web.json_response({"model_path": self.model_dir, "tokenizer_path": self.model_dir})

    async def _models(self, request):
        return web.json_response({"data": [{"id": "fake-model"}]})

    async def _generate(self, request):
        body = await request.json()
        self.payloads.append(body)
        self.count += 1
        if self.fail_every and self.count % self.fail_every == 0:
            return web.json_response({"error": {"message": "invalid request", "type": "BadRequestError", "code": 400}}, status=400)
        n = body.get("max_tokens") or body["sampling_params"]["max_new_tokens"]
        kind = request.path
        if not body.get("stream"):
            return web.json_response(_final(kind, n))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        fail_midway = self.error_every and self.count % self.error_every == 0
        for i in range(1, n + 1):
            await asyncio.sleep(0.002)
            event = {"error": {"message": "boom"}} if fail_midway and i == 2 else _event(kind, i, n)
            line = b"data: " + json.dumps(event).encode() + b"\n\n"
            await resp.write(line[:9])
            await resp.write(line[9:])
        if kind != "/generate":
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": _usage(n)}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _usage(n: int) -> dict:
    return {"prompt_tokens": FakeServer.PROMPT_TOKENS, "completion_tokens": n, "total_tokens": FakeServer.PROMPT_TOKENS + n}


def _event(kind: str, i: int, n: int) -> dict:
    finish = "length" if i == n else None
    if kind == "/generate":
        meta = {"prompt_tokens": FakeServer.PROMPT_TOKENS, "completion_tokens": i, "finish_reason": {"type": "length"} if finish else None}
        return {"text": "tok " * i, "meta_info": meta}
    if kind == "/v1/completions":
        return {"choices": [{"text": "tok ", "finish_reason": finish}], "usage": None}
    return {"choices": [{"delta": {"content": "tok "}, "finish_reason": finish}], "usage": None}


def _final(kind: str, n: int) -> dict:
    if kind == "/generate":
        return {"text": "tok " * n, "meta_info": {"prompt_tokens": FakeServer.PROMPT_TOKENS, "completion_tokens": n, "finish_reason": {"type": "length"}}}
    choice = {"text": "tok " * n} if kind == "/v1/completions" else {"message": {"content": "tok " * n}}
    return {"choices": [{**choice, "finish_reason": "length"}], "usage": _usage(n)}


def _bench_argv(url: str, out: Path, *extra: str, backend: str = "sglang", n: int = 8, in_len: int = 16, out_len: int = 6) -> list[str]:
    return [
        "--backend", backend, "--base-url", url, "--dataset-name", "random", "--num-prompts", str(n),
        "--random-input-len", str(in_len), "--random-output-len", str(out_len), "--random-range-ratio", "1",
        "--max-concurrency", "2", "--output-file", str(out), "--disable-tqdm", *extra,
    ]


def _run(argv: list[str]) -> dict:
    return bench_serving.run_benchmark(bench_serving.parse_args(argv))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_server_each_backend(backend, tmp_path, capsys):
    out = tmp_path / "res.jsonl"
    with FakeServer(ensure_demo_model()) as server:
        result = _run(_bench_argv(server.url, out, backend=backend))
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["total_output_tokens"] == 8 * 6
    assert result["total_input_tokens"] == 8 * FakeServer.PROMPT_TOKENS  # server-reported counts win
    assert all(len(itl) == 5 for itl in result["itls"])  # one gap per token after the first
    assert all(0 < t <= e for t, e in zip(result["ttfts"], result["e2e_latencies"]))
    body = server.payloads[-1]
    assert body.get("model", "fake-model") == "fake-model"
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_fake_server_failures_are_counted_not_fatal(tmp_path, capsys):
    out = tmp_path / "res.jsonl"
    with FakeServer(ensure_demo_model(), fail_every=3, error_every=4) as server:
        code = bench_serving.main(_bench_argv(server.url, out, "--warmup-requests", "0", n=9))
    text = capsys.readouterr().out
    record = json.loads(out.read_text())
    # Requests 3, 6, 9 answer HTTP 400; request 4 and 8 break mid-stream.
    assert code == 0 and record["failed"] == 5 and record["completed"] == 4
    assert record["total_output_tokens"] == 4 * 6
    assert "Failed requests:                         5" in text
    assert "HTTP 400: invalid request" in text and "boom" in text


def test_fake_server_non_streaming_poisson_and_append(tmp_path):
    out = tmp_path / "res.jsonl"
    with FakeServer(ensure_demo_model()) as server:
        first = _run(_bench_argv(server.url, out, "--disable-stream", "--request-rate", "200"))
        _run(_bench_argv(server.url, out, "--disable-ignore-eos", "--extra-request-body", '{"sampling_params": {"top_k": 3}}'))
        payload = server.payloads[-1]
    assert first["ttfts"] == first["e2e_latencies"] and first["request_rate"] == 200
    assert payload["sampling_params"]["top_k"] == 3 and payload["sampling_params"]["ignore_eos"] is False
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and RECORD_FIELDS <= set(records[0])
    assert "itls" not in records[0]  # details only with --output-details


def test_unreachable_server_exits_nonzero(tmp_path):
    port = _free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.bench_serving", "--port", str(port), "--dataset-name", "random",
         "--num-prompts", "2", "--output-file", str(tmp_path / "x.jsonl")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "cannot reach the server" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_bad_arguments_are_argparse_errors():
    with pytest.raises(SystemExit):
        bench_serving.parse_args(["--extra-request-body", "[1, 2]"])
    with pytest.raises(SystemExit):
        bench_serving.parse_args(["--random-range-ratio", "2"])


# ---------------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def real_server_url(request) -> str:
    """The session's demo server from conftest when there is one, else our own."""
    try:
        return request.getfixturevalue("demo_server").url
    except pytest.FixtureLookupError:
        pass
    own = _OwnServer()
    request.addfinalizer(own.stop)
    return own.url


class _OwnServer:
    def __init__(self):
        import time

        import httpx

        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sglang.launch_server", "--model-path", "sglang-demo/gemma4-tiny-nvfp4",
             "--device", "cpu", "--host", "127.0.0.1", "--port", port],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError("demo server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_server_each_backend(backend, real_server_url, tmp_path):
    out = tmp_path / "res.jsonl"
    in_len, out_len, n = 16, 6, 8
    result = _run(_bench_argv(real_server_url, out, backend=backend, n=n, in_len=in_len, out_len=out_len))
    record = json.loads(out.read_text())
    assert RECORD_FIELDS <= set(record)
    assert record["completed"] == n and record["failed"] == 0
    assert record["total_output_tokens"] == n * out_len  # ignore_eos: every request runs to its length
    if backend != "sglang-oai-chat":  # chat adds the template's tokens to the prompt
        assert record["total_input_tokens"] == n * in_len
    duration = record["duration"]
    assert record["output_throughput"] == pytest.approx(record["total_output_tokens"] / duration)
    assert record["input_throughput"] == pytest.approx(record["total_input_tokens"] / duration)
    assert record["request_throughput"] == pytest.approx(n / duration)
    assert all(0 < t <= e for t, e in zip(result["ttfts"], result["e2e_latencies"]))
    assert record["max_concurrency"] == 2 and 0 < record["concurrency"] <= 2.0 + 1e-6
    assert record["mean_ttft_ms"] <= record["mean_e2e_latency_ms"]


def test_real_server_invalid_requests_show_as_failures(real_server_url, tmp_path, capsys):
    out = tmp_path / "res.jsonl"
    argv = _bench_argv(real_server_url, out, "--extra-request-body", '{"sampling_params": {"temperature": -1}}', n=4)
    code = bench_serving.main(argv)
    text = capsys.readouterr()
    record = json.loads(out.read_text())
    assert record["failed"] == 4 and record["completed"] == 0
    assert "Failed requests:                         4" in text.out and "HTTP 400" in text.out
    assert code == 1 and "all 4 requests failed" in text.err


def test_real_server_random_ids_and_tokenize_prompt(real_server_url, tmp_path):
    for extra in (("--dataset-name", "random-ids"), ("--tokenize-prompt",)):
        argv = _bench_argv(real_server_url, tmp_path / "r.jsonl", n=3, in_len=12, out_len=3) + list(extra)
        result = _run(argv)
        assert result["completed"] == 3 and result["input_lens"] == [12, 12, 12]
