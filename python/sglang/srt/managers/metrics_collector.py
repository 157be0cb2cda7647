"""Request metrics in Prometheus text format, without a prometheus_client dependency.

Counters and histograms are observed by the TokenizerManager as outputs arrive; gauges (running and
queued requests, KV usage) are read from the scheduler when /metrics is scraped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float, times: int = 1) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += times
        self.total += value * times
        self.count += times

    def render(self, name: str, labels: str) -> list[str]:
        lines, running = [f"# TYPE {name} histogram"], 0
        for bound, c in zip(self.buckets, self.counts):
            running += c
            lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum{{{labels}}} {self.total}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


class MetricsCollector:
    def __init__(self, model_name: str):
        self.labels = f'model_name="{model_name}"'
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.cached_tokens_total = 0
        self.num_requests_total = 0
        self.num_aborted_requests_total = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.tpot = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def observe_tokens(self, num_new: int, since_created: float, since_last: float | None) -> None:
        """New tokens of one request arrived; since_last is None for its first tokens."""
        self.generation_tokens_total += num_new
        if num_new <= 0:
            return
        if since_last is None:
            self.ttft.observe(since_created)
            if num_new > 1:
                self.itl.observe(0.0, num_new - 1)
        else:
            self.itl.observe(since_last / num_new, num_new)

    def observe_finished(self, prompt_tokens: int, cached_tokens: int, e2e: float, aborted: bool, tpot: float | None = None) -> None:
        """tpot: the request's time per output token after the first (None with fewer than two)."""
        if tpot is not None:
            self.tpot.observe(tpot)
        self.num_requests_total += 1
        self.num_aborted_requests_total += aborted
        self.prompt_tokens_total += prompt_tokens
        self.cached_tokens_total += cached_tokens
        self.e2e.observe(e2e)

    def render(self, scheduler_state: dict | None) -> str:
        lab = self.labels
        lines = []

        def metric(kind: str, name: str, value) -> None:
            lines.extend([f"# TYPE {name} {kind}", f"{name}{{{lab}}} {value}"])

        metric("counter", "sglang:prompt_tokens_total", self.prompt_tokens_total)
        metric("counter", "sglang:generation_tokens_total", self.generation_tokens_total)
        metric("counter", "sglang:cached_tokens_total", self.cached_tokens_total)
        metric("counter", "sglang:num_requests_total", self.num_requests_total)
        metric("counter", "sglang:num_aborted_requests_total", self.num_aborted_requests_total)
        if scheduler_state:
            metric("gauge", "sglang:num_running_reqs", scheduler_state["num_running_reqs"])
            metric("gauge", "sglang:num_queue_reqs", scheduler_state["num_waiting_reqs"])
            metric("gauge", "sglang:token_usage", scheduler_state["token_usage"])
            metric("gauge", "sglang:kv_used_tokens", scheduler_state["kv_used_tokens"])
            metric("gauge", "sglang:kv_cached_tokens", scheduler_state["kv_cached_tokens"])
            metric("gauge", "sglang:max_total_num_tokens", scheduler_state["max_total_num_tokens"])
            metric("counter", "sglang:num_retractions_total", scheduler_state["num_retractions"])
            # As the scheduler's last batch log lines computed them (SGLang's gauges of the same name).
            metric("gauge", "sglang:gen_throughput", scheduler_state["gen_throughput"])
            metric("gauge", "sglang:cache_hit_rate", scheduler_state["cache_hit_rate"])
        lines += self.ttft.render("sglang:time_to_first_token_seconds", lab)
        lines += self.itl.render("sglang:inter_token_latency_seconds", lab)
        lines += self.tpot.render("sglang:time_per_output_token_seconds", lab)
        lines += self.e2e.render("sglang:e2e_request_latency_seconds", lab)
        return "\n".join(lines) + "\n"
