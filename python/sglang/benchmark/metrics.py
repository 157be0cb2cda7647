"""Benchmark metrics from per-request outputs, SGLang's printed summary and its JSONL record."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sglang.benchmark.backends import RequestOutput
from sglang.benchmark.datasets import DatasetRow

_LABEL_WIDTH = 40
_RULE_WIDTH = 50


@dataclass
class Stats:
    """Distribution of one latency, in milliseconds (all 0 when there are no samples)."""

    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0

    @classmethod
    def of(cls, seconds: list[float]) -> "Stats":
        if not seconds:
            return cls()
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(
            mean=float(ms.mean()),
            median=float(np.median(ms)),
            std=float(ms.std()),
            p95=float(np.percentile(ms, 95)),
            p99=float(np.percentile(ms, 99)),
            max=float(ms.max()),
        )


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    total_output_retokenized: int
    duration: float
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float  # mean requests in flight: sum of E2E latencies over the duration
    e2e: Stats
    ttft: Stats
    tpot: Stats
    itl: Stats


def request_token_counts(row: DatasetRow, out: RequestOutput, tokenizer) -> tuple[int, int, int]:
    """(prompt, generated, re-tokenized generated) tokens of one successful request.

    The server's own counts win; without them the dataset's prompt length and a re-tokenization of
    the generated text stand in.
    """
    retok = len(tokenizer.encode(out.generated_text, add_special_tokens=False)) if tokenizer else 0
    prompt = out.prompt_len if out.prompt_len is not None else row.prompt_len
    output = out.output_len if out.output_len is not None else retok
    return prompt, output, retok


def calculate_metrics(
    rows: list[DatasetRow], outputs: list[RequestOutput], duration: float, tokenizer
) -> tuple[BenchmarkMetrics, list[int], list[int]]:
    """Metrics over successful requests, plus per-request (input, output) token counts (0 if failed)."""
    input_lens, output_lens = [0] * len(outputs), [0] * len(outputs)
    retok_total = 0
    e2e, ttft, tpot, itl = [], [], [], []
    for i, (row, out) in enumerate(zip(rows, outputs)):
        if not out.success:
            continue
        input_lens[i], output_lens[i], retok = request_token_counts(row, out, tokenizer)
        retok_total += retok
        e2e.append(out.latency)
        ttft.append(out.ttft)
        itl.extend(out.itl)
        if output_lens[i] > 1:  # time per token after the first one
            tpot.append((out.latency - out.ttft) / (output_lens[i] - 1))
    completed = len(e2e)
    total_in, total_out = sum(input_lens), sum(output_lens)
    dur = max(duration, 1e-9)
    metrics = BenchmarkMetrics(
        completed=completed,
        failed=len(outputs) - completed,
        total_input=total_in,
        total_output=total_out,
        total_output_retokenized=retok_total,
        duration=duration,
        request_throughput=completed / dur,
        input_throughput=total_in / dur,
        output_throughput=total_out / dur,
        total_throughput=(total_in + total_out) / dur,
        concurrency=sum(e2e) / dur,
        e2e=Stats.of(e2e),
        ttft=Stats.of(ttft),
        tpot=Stats.of(tpot),
        itl=Stats.of(itl),
    )
    return metrics, input_lens, output_lens


# ---------------------------------------------------------------------------------- summary


def _line(label: str, value, fmt: str = "") -> str:
    return f"{label:<{_LABEL_WIDTH}} {value:<10{fmt}}"


def _title(text: str, fill: str) -> str:
    return f"{text:{fill}^{_RULE_WIDTH}}"


def _stats_lines(title: str, name: str, s: Stats, p95_max: bool = False) -> list[str]:
    lines = [_title(title, "-"), _line(f"Mean {name} (ms):", s.mean, ".2f"), _line(f"Median {name} (ms):", s.median, ".2f")]
    if p95_max:
        lines.append(_line(f"P95 {name} (ms):", s.p95, ".2f"))
    lines.append(_line(f"P99 {name} (ms):", s.p99, ".2f"))
    if p95_max:
        lines.append(_line(f"Max {name} (ms):", s.max, ".2f"))
    return lines


def format_summary(m: BenchmarkMetrics, backend: str, request_rate: float, max_concurrency: int | None) -> str:
    lines = [
        _title(" Serving Benchmark Result ", "="),
        _line("Backend:", backend),
        _line("Traffic request rate:", request_rate),
        _line("Max request concurrency:", max_concurrency if max_concurrency else "not set"),
        _line("Successful requests:", m.completed),
        _line("Failed requests:", m.failed),
        _line("Benchmark duration (s):", m.duration, ".2f"),
        _line("Total input tokens:", m.total_input),
        _line("Total generated tokens:", m.total_output),
        _line("Total generated tokens (retokenized):", m.total_output_retokenized),
        _line("Request throughput (req/s):", m.request_throughput, ".2f"),
        _line("Input token throughput (tok/s):", m.input_throughput, ".2f"),
        _line("Output token throughput (tok/s):", m.output_throughput, ".2f"),
        _line("Total token throughput (tok/s):", m.total_throughput, ".2f"),
        _line("Concurrency:", m.concurrency, ".2f"),
        *_stats_lines("End-to-End Latency", "E2E Latency", m.e2e),
        *_stats_lines("Time to First Token", "TTFT", m.ttft),
        *_stats_lines("Time per Output Token (excl. 1st token)", "TPOT", m.tpot),
        *_stats_lines("Inter-Token Latency", "ITL", m.itl, p95_max=True),
        "=" * _RULE_WIDTH,
    ]
    return "\n".join(lines)


def result_record(m: BenchmarkMetrics) -> dict:
    """The metric fields of the JSONL record, under SGLang's names."""
    record = {
        "duration": m.duration,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input,
        "total_output_tokens": m.total_output,
        "total_output_tokens_retokenized": m.total_output_retokenized,
        "request_throughput": m.request_throughput,
        "input_throughput": m.input_throughput,
        "output_throughput": m.output_throughput,
        "total_throughput": m.total_throughput,
        "concurrency": m.concurrency,
    }
    for name, s in (("e2e_latency", m.e2e), ("ttft", m.ttft), ("tpot", m.tpot)):
        record.update({f"{k}_{name}_ms": getattr(s, k) for k in ("mean", "median", "std", "p99")})
    record.update({f"{k}_itl_ms": getattr(m.itl, k) for k in ("mean", "median", "std", "p95", "p99", "max")})
    return record
