"""Static-batch latency of the model runner, without the HTTP server or the scheduler.

    python -m sglang.bench_one_batch --model-path <dir|repo|sglang-demo/gemma4-tiny-nvfp4> \
        --batch-size 1 8 64 --input-len 1024 --output-len 16 --load-format dummy

For every (batch size, input length, output length): one untimed warm-up pass, then a timed
prefill of the whole batch and `output_len - 1` timed greedy decode steps (the prefill already
yields the first token). Prints SGLang's per-run lines and a table, and appends one JSON record
per run to --result-filename. Every ServerArgs flag (--dtype, --device, --moe-runner-backend,
--kv-cache-dtype, --attention-backend, ...) is accepted too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.server_args import ServerArgs
from sglang.test.static_batch import StaticBatch, decode_step, prefill, release

logger = logging.getLogger(__name__)

# Prompt ids start above the special-token range of Gemma vocabularies (pad/eos/bos/turn markers).
_MIN_PROMPT_ID = 110
# Extra KV slots per request beyond prompt + output (the decode of the last step writes one more).
_KV_SLACK_PER_REQ = 8
_WARMUP_DECODE_STEPS = 2


@dataclass
class BenchArgs:
    run_name: str = "default"
    batch_size: tuple[int, ...] = (1,)
    input_len: tuple[int, ...] = (1024,)
    output_len: tuple[int, ...] = (16,)
    result_filename: str = "result.jsonl"
    seed: int = 42

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d = BenchArgs()
        parser.add_argument("--run-name", default=d.run_name, help="Label stored in every result record.")
        parser.add_argument("--batch-size", type=int, nargs="+", default=d.batch_size, help="One or more batch sizes.")
        parser.add_argument("--input-len", type=int, nargs="+", default=d.input_len, help="One or more prompt lengths.")
        parser.add_argument("--output-len", type=int, nargs="+", default=d.output_len, help="One or more output lengths.")
        parser.add_argument("--result-filename", default=d.result_filename, help="JSONL file results are appended to.")
        parser.add_argument("--seed", type=int, default=d.seed, help="Seed of the random prompt ids.")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "BenchArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass
class RunResult:
    batch_size: int
    input_len: int
    output_len: int
    prefill_latency: float
    decode_latencies: list[float]

    @property
    def prefill_throughput(self) -> float:
        return self.batch_size * self.input_len / self.prefill_latency

    @property
    def median_decode_latency(self) -> float:
        return statistics.median(self.decode_latencies) if self.decode_latencies else 0.0

    @property
    def median_decode_throughput(self) -> float:
        lat = self.median_decode_latency
        return self.batch_size / lat if lat else 0.0

    @property
    def total_latency(self) -> float:
        return self.prefill_latency + sum(self.decode_latencies)

    @property
    def overall_throughput(self) -> float:
        return self.batch_size * (self.input_len + self.output_len) / self.total_latency


# ---------------------------------------------------------------------------------- timing


class StepTimer:
    """Seconds one step takes: CUDA events bracketed by synchronizations on GPU, wall clock on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def time(self, fn: Callable[[], object]) -> tuple[float, object]:
        if not self.cuda:
            start = time.perf_counter()
            out = fn()
            return time.perf_counter() - start, out
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1000.0, out


def random_prompts(batch_size: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random ids (never all zeros: degenerate inputs make kernels look faster than they are)."""
    gen = torch.Generator().manual_seed(seed)
    low = _MIN_PROMPT_ID if vocab_size > 2 * _MIN_PROMPT_ID else 1
    return torch.randint(low, vocab_size, (batch_size, input_len), generator=gen).tolist()


def _greedy(logits: torch.Tensor) -> list[int]:
    # Part of every step: a real server samples on the device and copies the ids back.
    return logits.argmax(dim=-1).tolist()


def run_once(runner: ModelRunner, prompts: list[list[int]], decode_steps: int, timer: StepTimer) -> tuple[float, list[float]]:
    """Timed prefill and `decode_steps` decode steps of one static batch; KV is released after."""
    prefill_s, (batch, next_ids) = timer.time(lambda: _prefill(runner, prompts))
    decode_s: list[float] = []
    try:
        for _ in range(decode_steps):
            step_s, next_ids = timer.time(lambda: _greedy(decode_step(runner, batch, next_ids).next_token_logits))
            decode_s.append(step_s)
    finally:
        release(runner, batch)
    return prefill_s, decode_s


def _prefill(runner: ModelRunner, prompts: list[list[int]]) -> tuple[StaticBatch, list[int]]:
    batch, out = prefill(runner, prompts)
    return batch, _greedy(out.next_token_logits)


def bench_one(runner: ModelRunner, bs: int, input_len: int, output_len: int, seed: int) -> RunResult:
    vocab = runner.model_config.vocab_size
    timer = StepTimer(runner.device)
    # Warm-up with the same shapes: first calls pay for allocator growth and kernel selection.
    run_once(runner, random_prompts(bs, input_len, vocab, seed + 1), min(_WARMUP_DECODE_STEPS, output_len - 1), timer)
    prefill_s, decode_s = run_once(runner, random_prompts(bs, input_len, vocab, seed), output_len - 1, timer)
    return RunResult(bs, input_len, output_len, prefill_s, decode_s)


# ---------------------------------------------------------------------------------- setup


def size_kv_for_runs(args: argparse.Namespace, bench: BenchArgs) -> None:
    """Make the KV pool and request pool big enough for the largest run unless the user chose.

    On CPU the runner's default pool is small; on GPU --mem-fraction-static already sizes it.
    """
    need_tokens = max(bench.batch_size) * (max(bench.input_len) + max(bench.output_len) + _KV_SLACK_PER_REQ)
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if on_cpu and args.max_total_tokens is None:
        args.max_total_tokens = need_tokens
    if args.max_running_requests is None or args.max_running_requests < max(bench.batch_size):
        args.max_running_requests = max(bench.batch_size)


def check_bench_args(bench: BenchArgs, context_len: int) -> None:
    for name in ("batch_size", "input_len", "output_len"):
        if min(getattr(bench, name)) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} values must be positive")
    longest = max(bench.input_len) + max(bench.output_len)
    if longest > context_len:
        raise ValueError(f"input + output length {longest} exceeds the model's context length {context_len}")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return "cpu"


# ---------------------------------------------------------------------------------- output


def print_run(r: RunResult) -> None:
    print(f"Prefill. latency: {r.prefill_latency:6.5f} s, throughput: {r.prefill_throughput:9.2f} token/s")
    for i, lat in enumerate(r.decode_latencies[:5]):
        print(f"Decode {i}. Batch size: {r.batch_size}, latency: {lat:6.5f} s, throughput: {r.batch_size / lat:9.2f} token/s")
    if r.decode_latencies:
        print(f"Decode.  median latency: {r.median_decode_latency:6.5f} s, median throughput: {r.median_decode_throughput:9.2f} token/s")
    print(f"Total. latency: {r.total_latency:6.3f} s, throughput: {r.overall_throughput:9.2f} token/s")


def format_table(results: list[RunResult]) -> str:
    head = f"{'batch':>6} {'input':>6} {'output':>6} | {'prefill ms':>11} {'prefill tok/s':>14} | {'decode ms (median)':>18} {'decode tok/s':>13} | {'total s':>8}"
    rows = [
        f"{r.batch_size:>6} {r.input_len:>6} {r.output_len:>6} | {r.prefill_latency * 1e3:>11.2f} {r.prefill_throughput:>14.1f} | "
        f"{r.median_decode_latency * 1e3:>18.3f} {r.median_decode_throughput:>13.1f} | {r.total_latency:>8.3f}"
        for r in results
    ]
    return "\n".join([head, "-" * len(head), *rows])


def result_record(r: RunResult, bench: BenchArgs, server_args: ServerArgs, runner: ModelRunner) -> dict:
    return {
        "run_name": bench.run_name,
        "batch_size": r.batch_size,
        "input_len": r.input_len,
        "output_len": r.output_len,
        "prefill_latency": r.prefill_latency,
        "prefill_throughput": r.prefill_throughput,
        "median_decode_latency": r.median_decode_latency,
        "median_decode_throughput": r.median_decode_throughput,
        "decode_steps": len(r.decode_latencies),
        "total_latency": r.total_latency,
        "overall_throughput": r.overall_throughput,
        "model_path": server_args.model_path,
        "load_format": server_args.load_format,
        "dtype": str(runner.dtype).replace("torch.", ""),
        "quantization": runner.model_config.quantization,
        "moe_runner_backend": runner.moe_runner_backend,
        "device": runner.device,
        "device_name": device_name(runner.device),
        "date": datetime.now().isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sglang.bench_one_batch", description=__doc__.split("\n")[0])
    ServerArgs.add_cli_args(parser)
    BenchArgs.add_cli_args(parser)
    return parser


def run(server_args: ServerArgs, bench: BenchArgs, model_config: ModelConfig | None = None) -> list[RunResult]:
    model_config = model_config or ModelConfig.from_server_args(server_args)
    check_bench_args(bench, model_config.context_len)
    runner = ModelRunner(server_args, model_config)
    print(f"model {server_args.model_path} ({server_args.load_format}) on {device_name(runner.device)}, "
          f"dtype {runner.dtype}, moe backend {runner.moe_runner_backend}")
    results = []
    for bs in bench.batch_size:
        for il in bench.input_len:
            for ol in bench.output_len:
                print(f"Benchmark ... batch size {bs}, input len {il}, output len {ol}")
                r = bench_one(runner, bs, il, ol, bench.seed)
                print_run(r)
                results.append(r)
                with open(bench.result_filename, "a") as f:
                    f.write(json.dumps(result_record(r, bench, server_args, runner)) + "\n")
    print(format_table(results))
    return results


def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = build_parser()
    args = parser.parse_args(argv)
    bench = BenchArgs.from_cli_args(args)
    level = str(getattr(args, "log_level", "info")).upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), format="%(message)s")
    size_kv_for_runs(args, bench)
    try:
        server_args = ServerArgs.from_cli_args(args)
        model_config = ModelConfig.from_server_args(server_args)
        check_bench_args(bench, model_config.context_len)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return run(server_args, bench, model_config)


if __name__ == "__main__":
    main()
