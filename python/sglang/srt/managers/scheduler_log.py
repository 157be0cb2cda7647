"""The scheduler's batch log, in SGLang's format: a line per prefill batch and one every
`--decode-log-interval` decode steps, so that operators can read load, cache hits and decode speed
off the server log as they do with SGLang."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("sglang.srt.managers.scheduler")


@dataclass
class SchedulerLog:
    decode_log_interval: int
    decode_steps: int = 0
    # The last logged figures, also exported as the sglang:gen_throughput / cache_hit_rate gauges.
    gen_throughput: float = 0.0
    cache_hit_rate: float = 0.0
    _last_time: float = field(default_factory=time.perf_counter)
    _last_generated: int = 0

    def prefill(self, new_seqs: int, new_tokens: int, cached_tokens: int, usage: float, running: int, queued: int) -> None:
        self.cache_hit_rate = cached_tokens / max(new_tokens + cached_tokens, 1)
        logger.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, #running-req: %d, #queue-req: %d",
            new_seqs, new_tokens, cached_tokens, usage, running, queued,
        )  # fmt: skip

    def count_decode(self) -> bool:
        """Count a decode step; True when this one is due for a line (the caller then gathers the
        figures, which it need not do every step)."""
        self.decode_steps += 1
        return self.decode_steps % self.decode_log_interval == 0

    def decode(self, generated_total: int, running: int, tokens: int, usage: float, queued: int) -> None:
        """The decode line, with the generation rate since the previous one."""
        now = time.perf_counter()
        rate = (generated_total - self._last_generated) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_generated, self.gen_throughput = now, generated_total, rate
        logger.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): %.2f, #queue-req: %d",
            running, tokens, usage, rate, queued,
        )  # fmt: skip
