"""Which waiting requests join the next prefill batch: queue order and KV admission control.

Admission reserves KV for future output, not just the prompt: a new request is charged its whole
prompt plus min(max_new_tokens, CLIP) output tokens; requests already running are charged their
remaining output times `new_token_ratio` (an optimistic estimate that decays while decoding goes
well and jumps back up after a retraction). All space is counted through the allocator and the radix
tree, so a second (sliding-window) pool later only changes these two numbers.
"""

from __future__ import annotations

import math
from enum import Enum, auto
from typing import TYPE_CHECKING

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
    ):
        self.tree_cache = tree_cache
        self.allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.rem_input_tokens = max_prefill_tokens
        self.rem_chunk_tokens = chunk_size if chunk_size is not None else math.inf
        self.reserved = sum(math.ceil(output_reserve(r) * new_token_ratio) for r in running)
        if chunked_req is not None:
            self.reserved += (chunked_req.seq_len - chunked_req.kv_len) + output_reserve(chunked_req)
        self.can_run: list[Req] = []
        self.new_chunked_req: Req | None = None
        self.free_rows = req_to_token_pool.available_size()

    def rem_total_tokens(self) -> int:
        return self.allocator.available_size() + self.tree_cache.evictable_size() - self.reserved

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
        if need > self.rem_total_tokens():
            self.tree_cache.dec_lock_ref(req.last_node)
            return AddReqResult.NO_TOKEN
        self.reserved += need
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
