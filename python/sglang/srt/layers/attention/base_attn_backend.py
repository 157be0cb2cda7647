"""The interface every attention backend keeps."""

from __future__ import annotations

import torch

from sglang.srt.model_executor.forward_batch_info import ForwardBatch


class AttentionBackend:
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Precompute per-step metadata shared by all layers."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer, forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """Store this step's k/v in the cache (the swa slots on sliding layers of a hybrid pool), then
        attend. save_kv_cache=False: the caller has stored them already (RadixAttention.kv_write) and
        k/v may be None. q [T, H, d], k/v [T, KVH, d] -> [T, H*d]."""
        if save_kv_cache:
            pool = forward_batch.token_to_kv_pool
            pool.set_kv_buffer(layer.layer_id, forward_batch.cache_loc(layer), k, v, *self.kv_scales(layer, pool))
        if forward_batch.forward_mode.is_decode():
            return self.forward_decode(q, layer, forward_batch)
        return self.forward_extend(q, layer, forward_batch)

    def kv_scales(self, layer, pool) -> tuple[float, float]:
        """(k_scale, v_scale): the cache holds k / k_scale and v / v_scale, and the backend multiplies
        them back when it reads. Here 1.0: stored values are read as they are."""
        return 1.0, 1.0

    def forward_extend(self, q, layer, forward_batch):
        raise NotImplementedError

    def forward_decode(self, q, layer, forward_batch):
        raise NotImplementedError
