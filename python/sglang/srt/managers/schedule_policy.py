"""Which waiting requests join the next prefill batch: queue order and KV admission control.

Admission reserves KV for future output, not just the prompt: a new request is charged its whole
prompt plus min(max_new_tokens, CLIP) output tokens; requests already running are charged their
remaining output times `new_token_ratio` (an optimistic estimate that decays while decoding goes
well and jumps back up after a retraction). All space is counted through the allocator and the radix
tree.

With the hybrid sliding-window pool a request must also fit the swa pool (`SwaPolicy`). Its own swa
slots never exceed window - 1 between steps plus the tokens of one step, so it is charged that peak
(or less when it has fewer tokens left) minus what it already holds; the prefix's window belongs to
the tree and is locked with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING

from sglang.srt.mem_cache.memory_pool import SwaRelease, swa_keep_from

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
    from sglang.srt.mem_cache.radix_cache import RadixCache

# Output tokens assumed per request when reserving KV; longer outputs rely on retraction.
CLIP_MAX_NEW_TOKENS = 4096


class AddReqResult(Enum):
    CONTINUE = auto()  # admitted; try the next one
    NO_TOKEN = auto()  # not enough KV: stop for this round
    OTHER = auto()  # batch budget used up (prefill tokens, chunk, rows): stop for this round


def order_waiting_queue(policy: str, waiting: list["Req"], tree_cache: "RadixCache") -> list["Req"]:
    """fcfs keeps arrival order; lpm runs the requests with the longest cached prefix first."""
    if policy != "lpm" or tree_cache.disable:
        return waiting
    lens = {id(r): len(tree_cache.match_prefix(r.fill_ids[:-1])[0]) for r in waiting}
    return sorted(waiting, key=lambda r: -lens[id(r)])


def output_reserve(req: "Req") -> int:
    return max(0, min(req.sampling_params.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS))


@dataclass
class SwaPolicy:
    """What requests cost the sliding-window (swa) pool of a hybrid KV pool.

    A request's own swa slots (positions from the end of its tree prefix up to kv_len) split into
    *pinned* ones, inside the window its next query reads (at most W - 1), and *reclaimable* ones
    below it, which the scheduler frees only when the pool runs short (until then they stay, so a
    finished request hands the tree a prompt whose every prefix is reusable).
    """

    allocator: "TokenToKVPoolAllocator"
    window: int
    chunk_size: int | float  # most prompt tokens one request computes in one step

    def _own_range(self, req: "Req") -> tuple[int, int]:
        """(first own held position, first position the next query still reads)."""
        lo = max(len(req.prefix_indices), req.swa_freed_upto)
        return lo, max(lo, swa_keep_from(req.kv_len, self.window))

    def reclaimable(self, req: "Req") -> int:
        if req.req_pool_idx is None:
            return 0
        lo, keep = self._own_range(req)
        return keep - lo

    def pinned(self, req: "Req") -> int:
        if req.req_pool_idx is None:
            return 0
        return max(0, req.kv_len - self._own_range(req)[1])

    def release(self, req: "Req") -> SwaRelease | None:
        """Mark `req`'s reclaimable slots freed; the caller frees them (free_swa_outside_window)."""
        if req.req_pool_idx is None:
            return None
        lo, keep = self._own_range(req)
        req.swa_freed_upto = keep
        return SwaRelease(req.req_pool_idx, lo, keep) if keep > lo else None

    def peak(self, req: "Req") -> int:
        """Most pinned swa slots `req` holds at once from now on: window - 1 kept between steps
        plus one step's new tokens, capped by what it pins plus every token it may still add."""
        left = req.seq_len - req.kv_len
        step = max(1, min(left, self.chunk_size))
        return min(self.window - 1 + step, self.pinned(req) + left + output_reserve(req))

    def reserve(self, req: "Req") -> int:
        return max(0, self.peak(req) - self.pinned(req))


class PrefillAdder:
    def __init__(
        self,
        tree_cache: "RadixCache",
        allocator: "TokenToKVPoolAllocator",
        req_to_token_pool: "ReqToTokenPool",
        running: list["Req"],
        chunked_req: "Req | None",
        new_token_ratio: float,
        max_prefill_tokens: int,
        chunk_size: int | None,
        swa: SwaPolicy | None = None,
    ):
        self.tree_cache = tree_cache
        self.allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.swa = swa
        self.rem_input_tokens = max_prefill_tokens
        self.rem_chunk_tokens = chunk_size if chunk_size is not None else math.inf
        self.reserved = sum(math.ceil(output_reserve(r) * new_token_ratio) for r in running)
        if chunked_req is not None:
            self.reserved += (chunked_req.seq_len - chunked_req.kv_len) + output_reserve(chunked_req)
        holders = running + ([chunked_req] if chunked_req is not None else [])
        self.swa_reserved = sum(swa.reserve(r) for r in holders) if swa is not None else 0
        self.swa_reclaimable = sum(swa.reclaimable(r) for r in holders) if swa is not None else 0
        self.can_run: list[Req] = []
        self.new_chunked_req: Req | None = None
        self.free_rows = req_to_token_pool.available_size()

    def rem_total_tokens(self) -> int:
        return self.allocator.available_size() + self.tree_cache.evictable_size() - self.reserved

    def rem_swa_tokens(self) -> int | float:
        if self.swa is None:
            return math.inf
        free = self.swa.allocator.available_size() + self.tree_cache.swa_evictable_size() + self.swa_reclaimable
        return free - self.swa_reserved

    def add_chunked_req(self, req: "Req") -> None:
        """The next chunk of the request being prefilled in pieces (its KV was reserved already)."""
        req.extend_len = int(min(req.seq_len - req.kv_len, self.rem_chunk_tokens, max(self.rem_input_tokens, 1)))
        self._take(req, req.extend_len)
        if req.kv_len + req.extend_len < req.seq_len:
            self.new_chunked_req = req

    def add_one_req(self, req: "Req") -> AddReqResult:
        """Admit `req` (its prefix already matched into req.prefix_indices/last_node) if it fits."""
        if self.new_chunked_req is not None or self.rem_chunk_tokens <= 0:
            return AddReqResult.OTHER
        if req.req_pool_idx is None and self.free_rows <= 0:
            return AddReqResult.OTHER
        extend = req.seq_len - req.kv_len
        if self.can_run and extend > self.rem_input_tokens:
            return AddReqResult.OTHER
        # Lock first: a prefix we are about to use is no longer evictable space.
        self.tree_cache.inc_lock_ref(req.last_node)
        need = extend + output_reserve(req)
        need_swa = self.swa.reserve(req) if self.swa is not None else 0
        if need > self.rem_total_tokens() or need_swa > self.rem_swa_tokens():
            self.tree_cache.dec_lock_ref(req.last_node)
            return AddReqResult.NO_TOKEN
        self.reserved += need
        self.swa_reserved += need_swa
        req.extend_len = int(min(extend, self.rem_chunk_tokens))
        if req.req_pool_idx is None:
            self.free_rows -= 1
        self._take(req, req.extend_len)
        if req.extend_len < extend:
            self.new_chunked_req = req
            return AddReqResult.OTHER
        return AddReqResult.CONTINUE

    def _take(self, req: "Req", n: int) -> None:
        self.rem_input_tokens -= n
        self.rem_chunk_tokens -= n
        self.can_run.append(req)
