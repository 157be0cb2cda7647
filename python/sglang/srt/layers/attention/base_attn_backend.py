"""The interface every attention backend keeps."""

from __future__ import annotations

import torch

from sglang.srt.model_executor.forward_batch_info import ForwardBatch


class AttentionBackend:
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Precompute per-step metadata shared by all layers."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, forward_batch: ForwardBatch) -> torch.Tensor:
        """Store this step's k/v in the cache (the swa slots on sliding layers of a hybrid pool), then attend. q [T, H, d], k/v [T, KVH, d] -> [T, H*d]."""
        forward_batch.token_to_kv_pool.set_kv_buffer(layer.layer_id, forward_batch.cache_loc(layer), k, v)
        if forward_batch.forward_mode.is_decode():
            return self.forward_decode(q, layer, forward_batch)
        return self.forward_extend(q, layer, forward_batch)

    def forward_extend(self, q, layer, forward_batch):
        raise NotImplementedError

    def forward_decode(self, q, layer, forward_batch):
        raise NotImplementedError
