"""Paged KV memory: request rows, token slots, and the per-layer K/V buffers.

Two slot spaces (the hybrid sliding-window pool, SGLang's `--swa-full-tokens-ratio`):

* Full layers read every earlier token, so each token keeps a *full* slot for the request's life.
* Sliding layers read only keys in (p - W, p] for a query at p, so a token's sliding-layer KV is dead
  once the request has W - 1 newer tokens. Those layers get their own, smaller slot space (*swa*
  slots) whose slots are recycled: `free_swa_outside_window` frees a request's swa slots of
  positions < kv_len - (W - 1) and zeroes their table entries (tombstones; slot 0 is the padding
  sink, never handed out, so 0 means "no KV here"). The scheduler does this when the swa pool runs
  short (until then the slots serve the prefix cache); the static-batch driver after every step.

`ReqToTokenPool.req_to_token[row, pos]` holds the full slot and `req_to_swa_token[row, pos]` the swa
slot of the same token, so attention kernels that index a table by (row, position) work unchanged on
either space: the backend just passes the sliding table and buffers on sliding layers. Kernels only
read positions inside the window, so tombstoned entries are never dereferenced.

With the hybrid pool off (`--disable-hybrid-swa-memory`, or a model with only one layer kind) there is
one slot space and `req_to_swa_token` is None; every layer is indexed by full slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sglang.srt.utils import to_device


class ReqToTokenPool:
    """Row r, column p: the KV slot of token p of the request that holds row r (and, with the hybrid
    pool, its swa slot in `req_to_swa_token`)."""

    def __init__(self, size: int, max_context_len: int, device: str, hybrid_swa: bool = False):
        self.size = size
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self.req_to_swa_token = torch.zeros_like(self.req_to_token) if hybrid_swa else None
        self._free = list(range(size))

    @property
    def hybrid_swa(self) -> bool:
        return self.req_to_swa_token is not None

    def table(self, sliding: bool) -> torch.Tensor:
        """The slot table a layer reads: the swa one for sliding layers when the pool is hybrid."""
        return self.req_to_swa_token if sliding and self.req_to_swa_token is not None else self.req_to_token

    def available_size(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        self._free.append(row)


class TokenToKVPoolAllocator:
    """Free list of KV slots. Slot 0 is never handed out: padded positions write there."""

    def __init__(self, size: int, device: str):
        self.size = size
        self.device = device
        self.clear()

    def clear(self) -> None:
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64, device="cpu")

    def available_size(self) -> int:
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        if n > self._free.numel():
            return None
        out, self._free = self._free[:n], self._free[n:]
        return to_device(out, self.device)

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([self._free, slots.to("cpu", torch.int64)])


@dataclass
class LayerKVSpec:
    num_kv_heads: int
    head_dim: int
    is_sliding: bool = False


@dataclass(frozen=True)
class KVPoolSizes:
    """Token capacity of each slot space; swa_tokens is None when there is a single space."""

    full_tokens: int
    swa_tokens: int | None = None

    @property
    def hybrid(self) -> bool:
        return self.swa_tokens is not None


def split_bytes_per_token(layer_specs: list[LayerKVSpec], dtype: torch.dtype) -> tuple[int, int]:
    """(full-layer, sliding-layer) K+V bytes of one token."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_layer = [(2 * s.num_kv_heads * s.head_dim * elem, s.is_sliding) for s in layer_specs]
    return sum(b for b, sliding in per_layer if not sliding), sum(b for b, sliding in per_layer if sliding)


def hybrid_pool_sizes(budget_bytes: float, full_bpt: int, swa_bpt: int, swa_full_ratio: float) -> KVPoolSizes:
    """Split a byte budget so that swa_tokens = ratio * full_tokens and both pools use it all:
    budget = full_tokens * (full_bpt + ratio * swa_bpt)."""
    if swa_full_ratio <= 0:
        raise ValueError(f"--swa-full-tokens-ratio must be positive, got {swa_full_ratio}")
    full = int(budget_bytes // (full_bpt + swa_full_ratio * swa_bpt))
    return KVPoolSizes(full, int(full * swa_full_ratio))


class KVCache:
    """K and V buffers per layer, [rows, kv_heads, head_dim] with rows = pool size + 1 (row 0 is the
    padding sink). Full layers are sized by the full pool; with `swa_size`, sliding layers by the swa
    pool, and their slots are swa slots."""

    def __init__(self, size: int, layer_specs: list[LayerKVSpec], dtype: torch.dtype, device: str, swa_size: int | None = None):
        self.size = size
        self.swa_size = swa_size
        self.dtype = dtype

        def rows(s: LayerKVSpec) -> int:
            return (swa_size if s.is_sliding and swa_size is not None else size) + 1

        self.k_buffer = [torch.zeros((rows(s), s.num_kv_heads, s.head_dim), dtype=dtype, device=device) for s in layer_specs]
        self.v_buffer = [torch.zeros((rows(s), s.num_kv_heads, s.head_dim), dtype=dtype, device=device) for s in layer_specs]

    @staticmethod
    def bytes_per_token(layer_specs: list[LayerKVSpec], dtype: torch.dtype) -> int:
        return sum(split_bytes_per_token(layer_specs, dtype))

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]

    def set_kv_buffer(
        self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:  # fmt: skip
        """Store k / k_scale and v / v_scale, cast to the pool dtype, at slots `loc`."""
        self.k_buffer[layer_id][loc] = self._cast(_divide(k, k_scale))
        self.v_buffer[layer_id][loc] = self._cast(_divide(v, v_scale))

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        # fp8 saturates: torch's CUDA cast turns |x| >= 464 into NaN (its CPU cast saturates), and one
        # NaN in the cache would poison every later attention over it.
        if self.dtype == torch.float8_e4m3fn:
            x = x.clamp(-torch.finfo(self.dtype).max, torch.finfo(self.dtype).max)
        return x.to(self.dtype)


@dataclass(frozen=True)
class KVWrite:
    """Where one layer's k/v of a step go, for a kernel that stores them itself (the backend is then
    called with save_kv_cache=False): the layer's buffers [slots, kv_heads, d], each new token's slot,
    and the scales KVCache.set_kv_buffer would divide k and v by."""

    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    loc: torch.Tensor
    k_scale: float
    v_scale: float


def fp32_reciprocal(scale: float) -> float:
    """1 / scale computed in fp32: CUDA divides a tensor by a Python scalar as a multiply by this."""
    return float(np.float32(1.0) / np.float32(scale))


def _divide(x: torch.Tensor, scale: float) -> torch.Tensor:
    # The multiply CUDA does for x / scale, written out so that every device (and the fused store
    # kernel) rounds the same way.
    return x if scale == 1.0 else x * fp32_reciprocal(scale)


@dataclass
class SwaRelease:
    """Positions [lo, hi) of the request in `row` whose swa slots are no longer needed."""

    row: int
    lo: int
    hi: int


def swa_keep_from(kv_len: int, window: int) -> int:
    """First position whose sliding KV is still needed once `kv_len` tokens have KV: the next query
    (at kv_len, or a chunk starting there) sees keys in (kv_len - window, kv_len]."""
    return max(0, kv_len - window + 1)


def free_swa_outside_window(pool: ReqToTokenPool, swa_allocator: TokenToKVPoolAllocator, releases: list[SwaRelease]) -> int:
    """Free the swa slots of the given positions and tombstone them (0) in the table; one gather and
    one scatter for the whole batch. Returns how many slots were freed."""
    releases = [r for r in releases if r.hi > r.lo]
    if not releases:
        return 0
    table = pool.req_to_swa_token
    rows = to_device(torch.cat([torch.full((r.hi - r.lo,), r.row, dtype=torch.int64) for r in releases]), table.device)
    cols = to_device(torch.cat([torch.arange(r.lo, r.hi, dtype=torch.int64) for r in releases]), table.device)
    slots = table[rows, cols]
    held = slots[slots != 0]  # positions already tombstoned (never allocated here) are skipped
    swa_allocator.free(held)
    table[rows, cols] = 0
    return int(held.numel())
