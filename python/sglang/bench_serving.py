"""Benchmark a running server with many requests, the way SGLang's `bench_serving` does.

    python -m sglang.bench_serving --backend sglang --dataset-name random \
        --random-input-len 1000 --random-output-len 250 --num-prompts 10 --max-concurrency 1

Backends: sglang (native /generate), sglang-oai (/v1/completions), sglang-oai-chat
(/v1/chat/completions). Datasets: random, random-ids, sharegpt (local --dataset-path only),
generated-shared-prefix. Prints SGLang's summary and appends one JSON record per run to
--output-file. Failed requests are counted, not fatal; the exit status is 1 when the server cannot
be reached, the setup is invalid, or no request succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator

import aiohttp
import httpx
from tqdm import tqdm

from sglang.benchmark.backends import BACKEND_PATHS, BACKENDS, RequestInput, RequestOutput, send_request
from sglang.benchmark.datasets import DATASET_NAMES, DatasetError, DatasetRow, get_dataset
from sglang.benchmark.metrics import BenchmarkMetrics, calculate_metrics, format_summary, result_record

WARMUP_OUTPUT_LEN = 32
_INFO_TIMEOUT_S = 10.0


class BenchmarkError(RuntimeError):
    """A problem that stops the benchmark before it runs (server unreachable, bad setup)."""


# ---------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang.bench_serving", description="Benchmark the online serving throughput.")
    p.add_argument("--backend", default="sglang", choices=list(BACKEND_PATHS), help="Server API to drive.")
    p.add_argument("--base-url", default=None, help="Server URL, e.g. http://127.0.0.1:30000 (overrides --host/--port).")
    p.add_argument("--host", default="127.0.0.1", help="Server host.")
    p.add_argument("--port", type=int, default=None, help="Server port (default 30000).")
    p.add_argument("--dataset-name", default="sharegpt", choices=list(DATASET_NAMES), help="Prompt source.")
    p.add_argument("--dataset-path", default="", help="Local dataset file (sharegpt); nothing is downloaded.")
    p.add_argument("--model", default=None, help="Model name for the OpenAI APIs (default: the server's first /v1/models entry).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer path or name (default: the server's, from /get_model_info).")
    p.add_argument("--num-prompts", type=int, default=1000, help="Number of prompts to send.")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="Fixed output length for sharegpt prompts.")
    p.add_argument("--sharegpt-context-len", type=int, default=None, help="Drop sharegpt prompts longer than this (prompt + output).")
    p.add_argument("--random-input-len", type=int, default=1024, help="Input tokens per request (random datasets).")
    p.add_argument("--random-output-len", type=int, default=1024, help="Output tokens per request (random datasets).")
    p.add_argument(
        "--random-range-ratio", type=float, default=0.0,
        help="Lengths are drawn uniformly from [len * ratio, len]; 1.0 makes them exact.",
    )
    p.add_argument(
        "--request-rate", type=float, default=float("inf"),
        help="Requests per second, as a seeded Poisson process; inf (default) sends them all at once.",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight at once.")
    p.add_argument("--warmup-requests", type=int, default=1, help="Requests sent (and not counted) before the run.")
    p.add_argument("--output-file", default=None, help="JSONL file the result record is appended to.")
    p.add_argument("--output-details", action="store_true", help="Add per-request details to the JSONL record.")
    p.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    p.add_argument("--disable-stream", action="store_true", help="Non-streaming requests (TTFT = latency).")
    p.add_argument("--disable-ignore-eos", action="store_true", help="Let requests stop at EOS.")
    p.add_argument("--return-logprob", action="store_true", help="Ask /generate for logprobs too.")
    p.add_argument("--seed", type=int, default=1, help="Seed of the prompts and of the arrival times.")
    p.add_argument(
        "--extra-request-body", metavar='{"key": "value"}', default=None,
        help="JSON object merged into every request payload (nested objects such as sampling_params merge key by key).",
    )
    p.add_argument("--apply-chat-template", action="store_true", help="Wrap sharegpt prompts in the chat template.")
    p.add_argument("--tokenize-prompt", action="store_true", help="Send token ids instead of text (sglang backend, random dataset).")
    p.add_argument("--flush-cache", action="store_true", help="POST /flush_cache before the run.")
    p.add_argument("--request-timeout", type=float, default=6 * 3600.0, help="Seconds one request may take.")
    g = p.add_argument_group("generated-shared-prefix dataset arguments")
    g.add_argument("--gsp-num-groups", type=int, default=64, help="Number of shared system prompts.")
    g.add_argument("--gsp-prompts-per-group", type=int, default=16, help="Prompts per system prompt.")
    g.add_argument("--gsp-system-prompt-len", type=int, default=2048, help="Tokens of each system prompt.")
    g.add_argument("--gsp-question-len", type=int, default=128, help="Tokens of each question.")
    g.add_argument("--gsp-output-len", type=int, default=256, help="Output tokens per request.")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.extra_request_body_dict = _parse_extra_body(args.extra_request_body)
        _check_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def _parse_extra_body(raw: str | None) -> dict:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--extra-request-body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ValueError("--extra-request-body must be a JSON object")
    return body


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 <= args.random_range_ratio <= 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1]")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be positive (inf sends everything at once)")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        raise ValueError("--max-concurrency must be positive")
    if args.warmup_requests < 0:
        raise ValueError("--warmup-requests must be >= 0")
    if args.tokenize_prompt and args.backend not in ("sglang", "sglang-native"):
        raise ValueError("--tokenize-prompt works only with --backend sglang")


# ---------------------------------------------------------------------------------- server


@dataclass
class Endpoints:
    base_url: str
    api_url: str


def resolve_endpoints(args: argparse.Namespace) -> Endpoints:
    base = args.base_url.rstrip("/") if args.base_url else f"http://{args.host}:{args.port or 30000}"
    return Endpoints(base, base + BACKEND_PATHS[args.backend])


def auth_headers() -> dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _get_json(client: httpx.Client, url: str) -> dict | None:
    try:
        r = client.get(url)
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        raise BenchmarkError(
            f"cannot reach the server at {url} ({e}). Is it running? Start one with "
            "`python -m sglang.launch_server --model-path <model> --port <port>`, or point "
            "--base-url / --host / --port at it."
        ) from e
    except httpx.HTTPError as e:
        raise BenchmarkError(f"request to {url} failed: {type(e).__name__}: {e}") from e
    if r.status_code != 200:
        return None
    try:
        return r.json()
    except ValueError:
        return None


def fetch_server_info(base_url: str) -> tuple[dict, str | None]:
    """(/get_model_info answer, first model id of /v1/models); raises BenchmarkError if unreachable."""
    with httpx.Client(timeout=_INFO_TIMEOUT_S, headers=auth_headers()) as client:
        info = _get_json(client, base_url + "/get_model_info") or {}
        models = (_get_json(client, base_url + "/v1/models") or {}).get("data") or []
    if not info and not models:
        raise BenchmarkError(f"the server at {base_url} answered neither /get_model_info nor /v1/models")
    return info, (models[0].get("id") if models else None)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from sglang.test.make_gemma4_checkpoint import DEMO_MODEL_NAME, ensure_demo_model

    path = str(ensure_demo_model()) if name == DEMO_MODEL_NAME else name
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - hub/file errors come in many types; one clear message
        raise BenchmarkError(f"cannot load the tokenizer {name!r} ({type(e).__name__}: {e}); pass --tokenizer") from e


# ---------------------------------------------------------------------------------- run


@dataclass
class RunResult:
    metrics: BenchmarkMetrics
    outputs: list[RequestOutput]
    input_lens: list[int]
    output_lens: list[int]


async def _arrivals(rows: list[DatasetRow], rate: float, rng: random.Random) -> AsyncIterator[DatasetRow]:
    """Rows at Poisson arrival times (exponential gaps), or all at once for an infinite rate."""
    for i, row in enumerate(rows):
        if i and rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
        yield row


def _request_input(args, endpoints: Endpoints, model: str, row: DatasetRow, output_len: int) -> RequestInput:
    return RequestInput(
        row=row,
        api_url=endpoints.api_url,
        model=model,
        output_len=output_len,
        stream=not args.disable_stream,
        ignore_eos=not args.disable_ignore_eos,
        return_logprob=args.return_logprob,
        extra_request_body=args.extra_request_body_dict,
        headers=auth_headers(),
    )


async def _warmup(session, args, endpoints: Endpoints, model: str, row: DatasetRow) -> None:
    if args.warmup_requests <= 0:
        return
    print(f"Starting warmup with {args.warmup_requests} sequences...")
    inp = _request_input(args, endpoints, model, row, min(row.output_len, WARMUP_OUTPUT_LEN))
    outs = await asyncio.gather(*(send_request(session, BACKENDS[args.backend], inp) for _ in range(args.warmup_requests)))
    ok = sum(o.success for o in outs)
    if ok == 0:
        print(f"WARNING: every warmup request failed ({outs[0].error}); running the benchmark anyway")
    else:
        print(f"Warmup completed with {ok}/{len(outs)} successful sequences. Starting main benchmark run...")


async def _flush_cache(session, base_url: str) -> None:
    async with session.post(base_url + "/flush_cache", headers=auth_headers()) as r:
        if r.status != 200:
            print(f"WARNING: /flush_cache answered HTTP {r.status}")


async def benchmark(args, endpoints: Endpoints, model: str, tokenizer, rows: list[DatasetRow]) -> RunResult:
    backend = BACKENDS[args.backend]
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=0)  # concurrency is ours to limit, not the pool's
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, read_bufsize=10 * 2**20) as session:
        await _warmup(session, args, endpoints, model, rows[0])
        if args.flush_cache:
            await _flush_cache(session, endpoints.base_url)
        pbar = tqdm(total=len(rows), disable=args.disable_tqdm)

        async def one(row: DatasetRow) -> RequestOutput:
            inp = _request_input(args, endpoints, model, row, row.output_len)
            if limit is None:
                out = await send_request(session, backend, inp)
            else:
                async with limit:
                    out = await send_request(session, backend, inp)
            pbar.update(1)
            return out

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(row)) async for row in _arrivals(rows, args.request_rate, random.Random(args.seed))]
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        pbar.close()
    metrics, input_lens, output_lens = calculate_metrics(rows, outputs, duration, tokenizer)
    return RunResult(metrics, outputs, input_lens, output_lens)


# ---------------------------------------------------------------------------------- output


def default_output_file(args) -> str:
    day = datetime.now().strftime("%m%d")
    if args.dataset_name.startswith("random"):
        return f"{args.backend}_{day}_{args.num_prompts}_{args.random_input_len}_{args.random_output_len}.jsonl"
    return f"{args.backend}_{day}_{args.num_prompts}_{args.dataset_name}.jsonl"


def build_record(args, model: str, tokenizer_name: str, run: RunResult) -> dict:
    rate = args.request_rate
    record = {
        "backend": args.backend,
        "dataset_name": args.dataset_name,
        # Strict JSON has no Infinity; "inf" mirrors the CLI spelling.
        "request_rate": rate if rate != float("inf") else "inf",
        "max_concurrency": args.max_concurrency,
        "num_prompts": args.num_prompts,
        "sharegpt_output_len": args.sharegpt_output_len,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "seed": args.seed,
        "model": model,
        "tokenizer": tokenizer_name,
        "date": datetime.now().isoformat(timespec="seconds"),
        **result_record(run.metrics),
    }
    return record


def details(run: RunResult) -> dict:
    return {
        "input_lens": run.input_lens,
        "output_lens": run.output_lens,
        "ttfts": [o.ttft for o in run.outputs],
        "e2e_latencies": [o.latency for o in run.outputs],
        "itls": [o.itl for o in run.outputs],
        "generated_texts": [o.generated_text for o in run.outputs],
        "errors": [o.error for o in run.outputs],
    }


def _print_errors(outputs: list[RequestOutput]) -> None:
    errors = Counter(o.error for o in outputs if not o.success)
    for message, n in errors.most_common(3):
        print(f"Failed x{n}: {message[:300]}")


def run_benchmark(args: argparse.Namespace) -> dict:
    """Run one benchmark; returns the JSONL record plus per-request details."""
    endpoints = resolve_endpoints(args)
    info, served_model = fetch_server_info(endpoints.base_url)
    model = args.model or served_model or info.get("model_path") or "default"
    tokenizer_name = args.tokenizer or info.get("tokenizer_path") or info.get("model_path") or model
    tokenizer = load_tokenizer(tokenizer_name)
    print(f"benchmark_args={args}")
    try:
        rows = get_dataset(args, tokenizer)
    except (DatasetError, OSError) as e:
        raise BenchmarkError(str(e)) from e
    if len(rows) < args.num_prompts and args.dataset_name == "sharegpt":
        print(f"WARNING: the dataset has only {len(rows)} usable prompts of the {args.num_prompts} asked for")
    print(f"#Input tokens: {sum(r.prompt_len for r in rows)}")
    print(f"#Output tokens: {sum(r.output_len for r in rows)}")
    run = asyncio.run(benchmark(args, endpoints, model, tokenizer, rows))
    print(format_summary(run.metrics, args.backend, args.request_rate, args.max_concurrency))
    _print_errors(run.outputs)
    record = build_record(args, model, tokenizer_name, run)
    dump = {**record, **details(run)} if args.output_details else record
    with open(args.output_file or default_output_file(args), "a") as f:
        f.write(json.dumps(dump) + "\n")
    return {**record, **details(run)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run_benchmark(args)
    except BenchmarkError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if result["completed"] == 0:
        print(f"Error: all {result['failed']} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
