"""Paged KV memory: request rows, token slots, and the per-layer K/V buffers.

A token's KV has one slot index shared by every layer; each layer owns its own buffers, because
Gemma 4's sliding and full layers differ in KV heads and head dim. Sliding layers read only the last
`sliding_window` slots of a request (the attention backend applies the window), so a later pool can
hand those layers a smaller, recycled buffer without changing this interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ReqToTokenPool:
    """Row r, column p: the KV slot of token p of the request that holds row r."""

    def __init__(self, size: int, max_context_len: int, device: str):
        self.size = size
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int64, device=device)
        self._free = list(range(size))

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
        return out.to(self.device)

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([self._free, slots.to("cpu", torch.int64)])


@dataclass
class LayerKVSpec:
    num_kv_heads: int
    head_dim: int


class KVCache:
    """K and V buffers per layer, [size + 1, kv_heads, head_dim] (row 0 is the padding sink)."""

    def __init__(self, size: int, layer_specs: list[LayerKVSpec], dtype: torch.dtype, device: str):
        self.size = size
        self.dtype = dtype
        self.k_buffer = [torch.zeros((size + 1, s.num_kv_heads, s.head_dim), dtype=dtype, device=device) for s in layer_specs]
        self.v_buffer = [torch.zeros((size + 1, s.num_kv_heads, s.head_dim), dtype=dtype, device=device) for s in layer_specs]

    @staticmethod
    def bytes_per_token(layer_specs: list[LayerKVSpec], dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return sum(2 * s.num_kv_heads * s.head_dim * elem for s in layer_specs)

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffer[layer_id][loc] = k.to(self.dtype)
        self.v_buffer[layer_id][loc] = v.to(self.dtype)
