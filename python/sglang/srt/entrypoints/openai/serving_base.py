"""What the OpenAI-compatible handlers share: error bodies, body parsing, sampling-field validation,
running a request while watching for the client to disconnect, and logprob formatting."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from sglang.srt.managers.tokenizer_manager import TokenizerManager
from sglang.srt.sampling.sampling_params import UnsupportedValue, pop_neutral

T = TypeVar("T", bound=BaseModel)
MAX_N = 128
MAX_TOP_LOGPROBS = 20


class OpenAIError(Exception):
    """Becomes an OpenAI-style error body with the given HTTP status."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None, err_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.err_type = err_type or _default_type(status_code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status_code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code)


def _default_type(status_code: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 503: "service_unavailable"}.get(
        status_code, "invalid_request_error" if status_code < 500 else "internal_server_error"
    )


def abort_error(reason: dict | None) -> OpenAIError | None:
    """The error a request the server refused or failed answers with; None for other finishes,
    including an abort through /abort_request (no status), which ends normally with finish_reason
    "abort", as in SGLang."""
    if not reason or reason.get("type") != "abort" or reason.get("status_code") is None:
        return None
    return OpenAIError(reason.get("message") or "request aborted", status_code=reason["status_code"])


async def read_json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(f"Malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise OpenAIError("The request body must be a JSON object")
    return body


def drop_neutral(body: dict, neutral: dict[str, tuple]) -> dict:
    """body without the fields of `neutral` that carry a neutral value; a 400 naming any other."""
    body = dict(body)
    try:
        pop_neutral(body, neutral, "field")
    except UnsupportedValue as e:
        raise OpenAIError(str(e), param=e.name) from None
    return body


def parse_body(model: type[T], body: dict, neutral: dict[str, tuple]) -> T:
    body = drop_neutral(body, neutral)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "extra_forbidden":
            raise OpenAIError(f"Unsupported field '{param}'", param=param) from None
        raise OpenAIError(f"Invalid value for '{param}': {err.get('msg')}", param=param or None) from None


def check_common(req: Any, max_tokens: int | None) -> None:
    """Range checks shared by chat and completions (sampling knobs are checked again by SamplingParams)."""
    if req.n < 1 or req.n > MAX_N:
        raise OpenAIError(f"n must be between 1 and {MAX_N}, got {req.n}", param="n")
    if max_tokens is not None and max_tokens < 0:
        raise OpenAIError(f"max_tokens must be non-negative, got {max_tokens}", param="max_tokens")
    if req.stream_options is not None and not req.stream:
        raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")


def sampling_params_dict(req: Any, max_tokens: int | None, choice: int) -> dict:
    params = {
        "max_new_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "repetition_penalty": req.repetition_penalty,
        "min_new_tokens": req.min_tokens,
        "logit_bias": req.logit_bias,
        # n copies of one seeded request must not be identical, so each choice gets its own seed.
        "seed": None if req.seed is None else req.seed + choice,
        "stop": req.stop if req.stop is not None else [],
        "stop_token_ids": req.stop_token_ids or [],
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "no_stop_trim": req.no_stop_trim,
    }
    from sglang.srt.sampling.sampling_params import SamplingParams

    try:
        SamplingParams.from_dict(params)
    except ValueError as e:
        raise OpenAIError(str(e), param=str(e).split(" ")[0]) from None
    return params


async def run_watching_disconnect(request: Request, awaitable: Awaitable, poll_s: float = 0.5):
    """Await a generation; if the client goes away first, cancel it (which aborts it and frees its KV)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise OpenAIError("client disconnected", status_code=499)
    finally:
        if not task.done():
            task.cancel()


async def collect(gen: AsyncIterator[dict]) -> dict:
    last = None
    async for last in gen:
        pass
    return last


def tokenize_all(tm: TokenizerManager, objs: list) -> list:
    """Validate and tokenize every request up front, so errors answer 400 before anything runs."""
    try:
        return [tm.tokenize_request(o) for o in objs]
    except ValueError as e:
        raise OpenAIError(str(e)) from None


async def gather_all(tm: TokenizerManager, items: list) -> list[dict]:
    """Final outputs of several already-validated requests, run concurrently."""
    return list(await asyncio.gather(*(collect(tm.generate_tokenized(t)) for t in items)))


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def token_bytes(text: str | None) -> list[int] | None:
    return None if text is None else list(text.encode("utf-8"))


def chat_logprobs(meta: dict, start: int, end: int | None = None) -> dict:
    """OpenAI chat `logprobs` for output tokens [start, end)."""
    toks = meta.get("output_token_logprobs", [])[start:end]
    tops = meta.get("output_top_logprobs", [])[start:end]
    content = []
    for i, (lp, _tid, text) in enumerate(toks):
        top = [{"token": t_text, "logprob": t_lp, "bytes": token_bytes(t_text)} for t_lp, _t, t_text in (tops[i] if i < len(tops) else [])]
        content.append({"token": text, "logprob": lp, "bytes": token_bytes(text), "top_logprobs": top})
    return {"content": content}


def completion_logprobs(meta: dict, start: int, end: int | None, text_offset: int, kind: str = "output") -> dict:
    """Legacy completions `logprobs` for output tokens [start, end), or with kind "input" for the
    prompt's tokens (the first has no logprob: null, as its top_logprobs)."""
    toks = meta.get(f"{kind}_token_logprobs", [])[start:end]
    tops = meta.get(f"{kind}_top_logprobs", [])[start:end]
    offsets, pos = [], text_offset
    for _lp, _t, text in toks:
        offsets.append(pos)
        pos += len(text or "")
    top = [tops[i] if i < len(tops) else [] for i in range(len(toks))]
    return {
        "tokens": [t for _lp, _id, t in toks],
        "token_logprobs": [lp for lp, _id, _t in toks],
        "top_logprobs": [None if alts is None else {t: lp for lp, _id, t in alts} for alts in top],
        "text_offset": offsets,
    }


def joined_logprobs(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def finish_reason_str(reason: dict | None) -> str | None:
    if reason is None:
        return None
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(reason.get("type"), "stop")


def usage_options(req: Any) -> tuple[bool, bool]:
    """(usage in the stream, usage in every chunk) from stream_options."""
    opts = req.stream_options
    include = bool(opts and opts.include_usage)
    return include, include and opts.continuous_usage_stats


def choice_usage(meta: dict) -> dict:
    """One choice's usage so far (continuous_usage_stats: every chunk carries its choice's counts)."""
    return usage(meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"])


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class StreamDelta:
    """What one streamed update of choice `index` adds to what was already sent."""

    index: int
    text: str  # new text
    token_start: int  # the update carries output tokens [token_start, token_end)
    token_end: int
    text_offset: int  # length of the text sent before this update
    meta: dict
    reason: dict | None  # finish reason, None while running


class StreamAborted(Exception):
    def __init__(self, error: OpenAIError):
        self.error = error


async def stream_deltas(gens: list[AsyncIterator[dict]]) -> AsyncIterator[StreamDelta]:
    """Merge the choices' streams into per-choice increments; a refused or failed request ends the
    stream with StreamAborted (the client gets an error event)."""
    sent_text = [""] * len(gens)
    sent_tokens = [0] * len(gens)
    async for out in TokenizerManager.merge_streams(gens):
        i, meta = out["index"], out["meta_info"]
        reason = meta["finish_reason"]
        if (error := abort_error(reason)) is not None:
            raise StreamAborted(error)
        text, ntok = out.get("text", ""), len(out["output_ids"])
        yield StreamDelta(i, text[len(sent_text[i]) :], sent_tokens[i], ntok, len(sent_text[i]), meta, reason)
        sent_text[i], sent_tokens[i] = text, ntok


class ServingBase:
    """One OpenAI endpoint: parse and validate, tokenize, then stream or answer once."""

    request_cls: type = None  # the pydantic request model
    neutral_fields: dict[str, tuple] = {}  # see protocol.NEUTRAL_*

    def __init__(self, tokenizer_manager: TokenizerManager):
        self.tm = tokenizer_manager

    async def handle(self, request: Request):
        req = parse_body(self.request_cls, await read_json_body(request), self.neutral_fields)
        items = tokenize_all(self.tm, self._build_inputs(req))
        if req.stream:
            gens = [self.tm.generate_tokenized(t) for t in items]
            return StreamingResponse(self._stream(req, gens), media_type="text/event-stream")
        outs = await run_watching_disconnect(request, gather_all(self.tm, items))
        return JSONResponse(self._response(req, outs))

    @property
    def model_name(self) -> str:
        return self.tm.server_args.served_model_name
