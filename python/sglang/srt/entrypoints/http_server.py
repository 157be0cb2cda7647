"""The HTTP server: FastAPI routes over a TokenizerManager, served by uvicorn in the main process.

Shutdown: SIGINT/SIGTERM stop uvicorn gracefully, then the scheduler child is terminated. If the
scheduler dies, in-flight requests get an error, the server stops, and the process exits with 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglang import __version__
from sglang.srt.entrypoints.openai.serving_base import (
    SSE_DONE,
    OpenAIError,
    drop_neutral,
    abort_error,
    gather_all,
    now,
    read_json_body,
    run_watching_disconnect,
    sse,
    tokenize_all,
)
from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.tokenizer_manager import SchedulerDeadError, TokenizerManager
from sglang.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

GENERATE_FIELDS = {
    "text", "input_ids", "sampling_params", "stream", "return_logprob", "top_logprobs_num", "logprob_start_len", "rid",
}  # fmt: skip
# SGLang's other GenerateReqInput fields, passed at the values that turn them off (upstream
# bench_serving sends `lora_path: null` on every request); other values are a 400. Logprob entries
# always carry the token text, so return_text_in_logprobs may be either.
NEUTRAL_GENERATE_FIELDS = {
    "lora_path": (), "return_text_in_logprobs": (True, False), "image_data": (),
    "video_data": (), "audio_data": (), "modalities": ([],), "custom_logit_processor": (),
    "return_hidden_states": (False,), "return_routed_experts": (False,), "session_params": (),
    "data_parallel_rank": (), "bootstrap_host": (), "bootstrap_port": (), "bootstrap_room": (),
    "log_metrics": (True, False),
}  # fmt: skip
HEALTH_GENERATE_TIMEOUT_S = 20


def create_app(tm: TokenizerManager, server_args: ServerArgs) -> FastAPI:
    app = FastAPI(title="sglang", version=__version__)
    chat, completions = OpenAIServingChat(tm), OpenAIServingCompletion(tm)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, e: OpenAIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException):
        # Unknown routes (404) and wrong methods (405) answer in the OpenAI error shape too.
        return OpenAIError(str(e.detail), status_code=e.status_code).response()

    @app.exception_handler(SchedulerDeadError)
    async def _dead(_request: Request, e: SchedulerDeadError):
        return OpenAIError(str(e), status_code=503).response()

    if server_args.api_key:
        _add_api_key_middleware(app, server_args.api_key)

    @app.get("/health")
    async def health():
        return Response(status_code=503 if tm.dead_reason else 200)

    @app.get("/health_generate")
    async def health_generate():
        if tm.dead_reason:
            return Response(status_code=503)
        obj = GenerateReqInput(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
        try:
            await asyncio.wait_for(gather_all(tm, [tm.tokenize_request(obj)]), HEALTH_GENERATE_TIMEOUT_S)
        except (asyncio.TimeoutError, SchedulerDeadError):
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/get_model_info")
    @app.get("/model_info")  # SGLang's newer name
    async def get_model_info():
        info = tm.scheduler_info
        return {
            "model_path": server_args.model_path,
            # Where the tokenizer really came from (a demo name or shipped config resolves to a dir).
            "tokenizer_path": getattr(tm.tokenizer, "name_or_path", None) or server_args.tokenizer_path,
            "served_model_name": server_args.served_model_name,
            "is_generation": True,
            "architectures": info.get("architectures"),
            "context_length": tm.context_len,
            "vocab_size": tm.vocab_size,
            "quantization": server_args.quantization,
        }

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info():
        # As SGLang: the arguments, then what the scheduler resolved (e.g. max_running_requests) on top;
        # model_path stays as given (the scheduler's is the resolved directory).
        args = {k: v for k, v in dataclasses.asdict(server_args).items() if k != "api_key"}
        resolved = {k: v for k, v in tm.scheduler_info.items() if k != "model_path"}
        return {**args, **resolved, "version": __version__, "internal_states": [await tm.get_internal_state()]}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        result = await tm.flush_cache()
        return PlainTextResponse(result.message, status_code=200 if result.success else 400)

    @app.get("/metrics")
    async def metrics():
        if not server_args.enable_metrics:
            raise OpenAIError("metrics are disabled; start the server with --enable-metrics", status_code=404)
        state = None if tm.dead_reason else await tm.get_internal_state()
        return PlainTextResponse(tm.metrics.render(state), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": server_args.served_model_name, "object": "model", "created": now(), "owned_by": "sglang",
                "root": server_args.model_path, "max_model_len": tm.context_len}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        if model_id != server_args.served_model_name:
            raise OpenAIError(f"The model '{model_id}' does not exist", status_code=404, param="model")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat.handle(request)

    @app.post("/v1/completions")
    async def v1_completions(request: Request):
        return await completions.handle(request)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        """SGLang's: {"rid": ..., "abort_all": false}. The request ends with finish_reason abort and
        what it generated so far; an unknown rid is ignored."""
        body = await read_json_body(request)
        rid, everything = body.get("rid"), body.get("abort_all", False)
        if not isinstance(everything, bool) or not (everything or isinstance(rid, str)):
            raise OpenAIError("give a request id as 'rid', or 'abort_all': true", param="rid")
        await tm.abort_by_client(None if everything else rid)
        return Response(status_code=200)

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request):
        """SGLang's: {"prompt": str | [str], "add_special_tokens": bool} -> tokens, count, max_model_len."""
        body = await read_json_body(request)
        prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise OpenAIError("prompt must be a string or a non-empty list of strings", param="prompt")
        if not isinstance(special, bool):
            raise OpenAIError("add_special_tokens must be a boolean", param="add_special_tokens")
        tokens = [_tokenizer(tm).encode(t, add_special_tokens=special) for t in texts]
        counts = [len(t) for t in tokens]
        if isinstance(prompt, str):
            tokens, counts = tokens[0], counts[0]
        return {"tokens": tokens, "count": counts, "max_model_len": tm.context_len}

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request):
        """SGLang's: {"tokens": [int] | [[int]]} -> text (or a list of texts)."""
        tokens = (await read_json_body(request)).get("tokens")
        single = isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
        rows = [tokens] if single else tokens
        valid = lambda r: isinstance(r, list) and all(isinstance(t, int) and 0 <= t < tm.vocab_size for t in r)  # noqa: E731
        if not isinstance(rows, list) or not all(valid(r) for r in rows):
            raise OpenAIError(f"tokens must be token ids in [0, {tm.vocab_size}), or a list of such lists", param="tokens")
        texts = [_tokenizer(tm).decode(r) for r in rows]
        return {"text": texts[0] if single else texts}

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        return await _native_generate(tm, request)

    return app


def _tokenizer(tm: TokenizerManager):
    if tm.tokenizer is None:
        raise OpenAIError("this server runs with --skip-tokenizer-init: it has no tokenizer")
    return tm.tokenizer


def _add_api_key_middleware(app: FastAPI, api_key: str) -> None:
    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        # Health checks and scrapes stay open, as in SGLang, so orchestrators need no secret.
        open_path = request.url.path.startswith("/health") or request.url.path == "/metrics"
        if request.method != "OPTIONS" and not open_path and request.headers.get("Authorization") != f"Bearer {api_key}":
            return OpenAIError("Invalid or missing API key", status_code=401).response()
        return await call_next(request)


async def _native_generate(tm: TokenizerManager, request: Request):
    body = drop_neutral(await read_json_body(request), NEUTRAL_GENERATE_FIELDS)
    unknown = sorted(set(body) - GENERATE_FIELDS)
    if unknown:
        raise OpenAIError(f"Unsupported field(s) for /generate: {', '.join(unknown)}", param=unknown[0])
    try:
        obj = GenerateReqInput(**body)
    except (ValueError, TypeError) as e:
        raise OpenAIError(str(e)) from None
    items = tokenize_all(tm, [obj[i] for i in range(obj.batch_size)] if not obj.is_single else [obj])
    if obj.stream:
        return StreamingResponse(_native_stream(tm, items, obj.is_single), media_type="text/event-stream")
    outs = await run_watching_disconnect(request, gather_all(tm, items))
    for out in outs:
        if (error := abort_error(out["meta_info"]["finish_reason"])) is not None:
            raise error
    return JSONResponse(outs[0] if obj.is_single else outs)


async def _native_stream(tm: TokenizerManager, items: list, is_single: bool):
    gens = [tm.generate_tokenized(t) for t in items]
    async for out in TokenizerManager.merge_streams(gens):
        if (error := abort_error(out["meta_info"]["finish_reason"])) is not None:
            yield sse(error.body())
            break
        if is_single:
            out.pop("index", None)
        yield sse(out)
    yield SSE_DONE


# ------------------------------------------------------------------ process entry


def _exit_on_signal(signum, _frame):
    raise SystemExit(0)


def launch_server(server_args: ServerArgs) -> None:
    """Run the server until SIGINT/SIGTERM (exit 0) or a scheduler crash (exit 1)."""
    import uvicorn

    from sglang.srt.entrypoints.engine import launch_subprocesses
    from sglang.srt.utils import configure_logger, terminate_process

    configure_logger(server_args.log_level)
    # uvicorn restores these after its graceful shutdown and re-raises the signal into them.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    proc = None
    crashed: list[str] = []
    try:
        tm, proc = launch_subprocesses(server_args)
        app = create_app(tm, server_args)
        config = uvicorn.Config(
            app, host=server_args.host, port=server_args.port, log_level=server_args.log_level,
            access_log=server_args.log_level == "debug", timeout_keep_alive=5, timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)

        def on_death(reason: str) -> None:
            crashed.append(reason)
            # Give in-flight handlers a moment to send their errors, then stop serving.
            asyncio.get_running_loop().call_later(0.5, lambda: setattr(server, "should_exit", True))

        tm.on_scheduler_death = on_death
        logger.info("serving %s at http://%s:%d", server_args.served_model_name, server_args.host, server_args.port)
        server.run()
    finally:
        terminate_process(proc)
    if crashed:
        logger.error("exiting because %s", crashed[0])
        sys.exit(1)
