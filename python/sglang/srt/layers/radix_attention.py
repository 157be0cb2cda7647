"""One attention layer's identity and shape; the math lives in the attention backend."""

from __future__ import annotations

import torch

from sglang.srt.mem_cache.memory_pool import KVWrite
from sglang.srt.model_executor.forward_batch_info import ForwardBatch


class RadixAttention(torch.nn.Module):
    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scaling: float,
        num_kv_heads: int,
        layer_id: int,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.tp_q_head_num = num_heads
        self.tp_k_head_num = num_kv_heads
        self.head_dim = head_dim
        self.scaling = scaling
        self.layer_id = layer_id
        # Number of most recent positions (the query's own included) a query may see; None = all.
        self.sliding_window = sliding_window

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """q [T, heads, d], k/v [T, kv_heads, d] -> [T, heads * d]. save_kv_cache=False: k/v are in
        the cache already (stored as `kv_write` says) and may be None."""
        return forward_batch.attn_backend.forward(q, k, v, self, forward_batch, save_kv_cache)

    def kv_write(self, forward_batch: ForwardBatch) -> KVWrite:
        """Where and how this step's k/v of this layer are stored, for a kernel that stores them itself:
        the slot space (swa or full) and the scales are the backend's, as in its own store."""
        pool = forward_batch.token_to_kv_pool
        k_buffer, v_buffer = pool.get_kv_buffer(self.layer_id)
        k_scale, v_scale = forward_batch.attn_backend.kv_scales(self, pool)
        return KVWrite(k_buffer, v_buffer, forward_batch.cache_loc(self), k_scale, v_scale)
