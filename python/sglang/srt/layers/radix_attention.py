"""One attention layer's identity and shape; the math lives in the attention backend."""

from __future__ import annotations

import torch

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

    def forward(self, q, k, v, forward_batch: ForwardBatch) -> torch.Tensor:
        """q [T, heads, d], k/v [T, kv_heads, d] -> [T, heads * d]."""
        return forward_batch.attn_backend.forward(q, k, v, self, forward_batch)
