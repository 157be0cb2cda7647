"""One benchmark request per backend: build the payload, send it, time the tokens as they stream.

Backends: `sglang` (native POST /generate), `sglang-oai` (/v1/completions), `sglang-oai-chat`
(/v1/chat/completions). Token counts come from the server (`meta_info` / `usage`) when it reports
them; the caller falls back to re-tokenizing the text otherwise.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import aiohttp

from sglang.benchmark.datasets import DatasetRow

BACKEND_PATHS = {
    "sglang": "/generate",
    "sglang-native": "/generate",
    "sglang-oai": "/v1/completions",
    "sglang-oai-chat": "/v1/chat/completions",
}


@dataclass
class RequestInput:
    row: DatasetRow
    api_url: str
    model: str
    output_len: int
    stream: bool = True
    ignore_eos: bool = True
    return_logprob: bool = False
    extra_request_body: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


@dataclass
class RequestOutput:
    success: bool = False
    generated_text: str = ""
    latency: float = 0.0  # seconds from sending the request to the end of the answer
    ttft: float = 0.0  # seconds to the first generated token (= latency without streaming)
    itl: list[float] = field(default_factory=list)  # gaps between tokens, seconds
    prompt_len: int | None = None  # server-reported prompt tokens
    output_len: int | None = None  # server-reported generated tokens
    finish_reason: str | None = None
    error: str = ""


# ---------------------------------------------------------------------------------- SSE


class SSEParser:
    """Turns a byte stream of server-sent events into `data:` payload strings.

    Network chunks split lines anywhere, so incomplete lines are kept until their newline arrives.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [p for p in map(_data_payload, lines) if p is not None]

    def flush(self) -> list[str]:
        rest, self._buf = self._buf, b""
        payload = _data_payload(rest)
        return [payload] if payload is not None else []


def _data_payload(line: bytes) -> str | None:
    line = line.strip()
    if not line.startswith(b"data:"):
        return None  # blank separators, comments (": ping") and other SSE fields
    return line[len(b"data:"):].strip().decode("utf-8")


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, dict | None]]:
    """(arrival time, parsed JSON) per event; None marks `data: [DONE]`."""
    parser = SSEParser()
    async for chunk in response.content.iter_any():
        now = time.perf_counter()
        for payload in parser.feed(chunk):
            yield now, _parse_event(payload)
    for payload in parser.flush():
        yield time.perf_counter(), _parse_event(payload)


def _parse_event(payload: str) -> dict | None:
    if payload == "[DONE]":
        return None
    return json.loads(payload)


# ---------------------------------------------------------------------------------- payloads


def merge_extra(body: dict, extra: dict) -> dict:
    """`--extra-request-body` on top of the payload; nested dicts (sampling_params) merge key by key."""
    out = dict(body)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def sglang_payload(inp: RequestInput) -> dict:
    row = inp.row
    body: dict[str, Any] = {"input_ids": row.input_ids} if row.input_ids is not None else {"text": row.prompt}
    body["sampling_params"] = {"temperature": 0.0, "max_new_tokens": inp.output_len, "ignore_eos": inp.ignore_eos}
    body["stream"] = inp.stream
    if inp.return_logprob:
        body["return_logprob"] = True
    return merge_extra(body, inp.extra_request_body)


def _oai_common(inp: RequestInput) -> dict:
    body: dict[str, Any] = {
        "model": inp.model,
        "temperature": 0.0,
        "max_tokens": inp.output_len,
        "stream": inp.stream,
        "ignore_eos": inp.ignore_eos,
    }
    if inp.stream:
        body["stream_options"] = {"include_usage": True}  # so the last chunk carries token counts
    return body


def completions_payload(inp: RequestInput) -> dict:
    return merge_extra({**_oai_common(inp), "prompt": inp.row.prompt}, inp.extra_request_body)


def chat_payload(inp: RequestInput) -> dict:
    messages = [{"role": "user", "content": inp.row.prompt}]
    return merge_extra({**_oai_common(inp), "messages": messages}, inp.extra_request_body)


# ---------------------------------------------------------------------------------- timing


@dataclass
class _Timeline:
    """Turns 'n new tokens arrived at t' into TTFT and per-token ITL samples."""

    out: RequestOutput
    start: float
    last: float | None = None
    first_event: float | None = None  # the first event that carried a token or a choice, text or not

    def tokens(self, now: float, n: int) -> None:
        if self.first_event is None:
            self.first_event = now
        if n <= 0:
            return
        if self.last is None:
            self.out.ttft = now - self.start
        else:
            # Several tokens in one event share the gap evenly, as SGLang's client does.
            self.out.itl.extend([(now - self.last) / n] * n)
        self.last = now


def _usage(out: RequestOutput, usage: dict | None) -> None:
    if usage:
        out.prompt_len = usage.get("prompt_tokens", out.prompt_len)
        out.output_len = usage.get("completion_tokens", out.output_len)


def _error_message(data: dict) -> str:
    err = data.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


class StreamError(RuntimeError):
    """The server reported an error inside a 200 response."""


def _sglang_finish(out: RequestOutput, meta: dict) -> None:
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind is not None:
        out.finish_reason = str(kind)
    if kind == "abort":
        message = reason.get("message", "aborted") if isinstance(reason, dict) else "aborted"
        raise StreamError(f"request aborted by the server: {message}")


def _sglang_event(out: RequestOutput, tl: _Timeline, now: float, data: dict) -> None:
    meta = data.get("meta_info") or {}
    if "completion_tokens" in meta:
        new = meta["completion_tokens"] - (out.output_len or 0)
        out.output_len = meta["completion_tokens"]
    else:  # no counts: each growth of the text is one token
        new = 1 if len(data.get("text", "")) > len(out.generated_text) else 0
    out.prompt_len = meta.get("prompt_tokens", out.prompt_len)
    out.generated_text = data.get("text", out.generated_text)
    tl.tokens(now, new)
    _sglang_finish(out, meta)


def _completions_event(out: RequestOutput, tl: _Timeline, now: float, data: dict) -> None:
    choices = data.get("choices") or []
    if choices:
        text = choices[0].get("text") or ""
        out.generated_text += text
        tl.tokens(now, 1 if text else 0)
        out.finish_reason = choices[0].get("finish_reason") or out.finish_reason
    _usage(out, data.get("usage"))


def _chat_event(out: RequestOutput, tl: _Timeline, now: float, data: dict) -> None:
    choices = data.get("choices") or []
    if choices:
        delta = choices[0].get("delta") or {}
        text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        out.generated_text += text
        if text or choices[0].get("finish_reason"):  # not the role-only chunk that opens the stream
            tl.tokens(now, 1 if text else 0)
        out.finish_reason = choices[0].get("finish_reason") or out.finish_reason
    _usage(out, data.get("usage"))


def _sglang_final(out: RequestOutput, data: dict) -> None:
    if isinstance(data, list):  # a batch answer; the benchmark sends one prompt per request
        data = data[0]
    meta = data.get("meta_info") or {}
    out.generated_text = data.get("text", "")
    out.prompt_len = meta.get("prompt_tokens")
    out.output_len = meta.get("completion_tokens")
    _sglang_finish(out, meta)


def _completions_final(out: RequestOutput, data: dict) -> None:
    choice = (data.get("choices") or [{}])[0]
    out.generated_text = choice.get("text") or ""
    out.finish_reason = choice.get("finish_reason")
    _usage(out, data.get("usage"))


def _chat_final(out: RequestOutput, data: dict) -> None:
    choice = (data.get("choices") or [{}])[0]
    out.generated_text = (choice.get("message") or {}).get("content") or ""
    out.finish_reason = choice.get("finish_reason")
    _usage(out, data.get("usage"))


@dataclass(frozen=True)
class Backend:
    name: str
    payload: Callable[[RequestInput], dict]
    on_event: Callable[[RequestOutput, _Timeline, float, dict], None]
    on_final: Callable[[RequestOutput, dict], None]


_SGLANG = Backend("sglang", sglang_payload, _sglang_event, _sglang_final)
_COMPLETIONS = Backend("sglang-oai", completions_payload, _completions_event, _completions_final)
_CHAT = Backend("sglang-oai-chat", chat_payload, _chat_event, _chat_final)
BACKENDS = {"sglang": _SGLANG, "sglang-native": _SGLANG, "sglang-oai": _COMPLETIONS, "sglang-oai-chat": _CHAT}


# ---------------------------------------------------------------------------------- sending


async def _http_error(response: aiohttp.ClientResponse) -> str:
    body = await response.text()
    try:
        message = _error_message(json.loads(body))
    except (json.JSONDecodeError, AttributeError):
        message = body.strip()[:500] or (response.reason or "")
    return f"HTTP {response.status}: {message}"


async def _read_stream(backend: Backend, response, out: RequestOutput, start: float) -> None:
    tl = _Timeline(out, start)
    async for now, data in sse_events(response):
        if data is None:
            break
        if "error" in data:
            raise StreamError(_error_message(data))
        backend.on_event(out, tl, now, data)
    out.latency = time.perf_counter() - start
    if tl.last is None and tl.first_event is not None:
        # Tokens came but none showed as text (pieces of one multi-byte character, special tokens):
        # the first thing seen of them is the first event after the stream's opening, often the
        # finish; it is no earlier than the first token, and TTFT must not read 0.
        out.ttft = tl.first_event - start


async def send_request(session: aiohttp.ClientSession, backend: Backend, inp: RequestInput) -> RequestOutput:
    """Never raises: transport and server errors become a failed RequestOutput."""
    out = RequestOutput()
    start = time.perf_counter()
    try:
        async with session.post(inp.api_url, json=backend.payload(inp), headers=inp.headers) as response:
            if response.status != 200:
                out.error = await _http_error(response)
                return out
            if inp.stream:
                await _read_stream(backend, response, out, start)
            else:
                data = await response.json(content_type=None)
                out.latency = out.ttft = time.perf_counter() - start
                if isinstance(data, dict) and "error" in data:
                    raise StreamError(_error_message(data))
                backend.on_final(out, data)
        out.success = True
    except Exception as e:  # noqa: BLE001 - any failure of one request is counted, not fatal
        out.success = False
        out.error = f"{type(e).__name__}: {e}"
    return out
