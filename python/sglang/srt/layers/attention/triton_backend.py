"""Triton attention backend: paged decode (split-K flash-decoding) and extend (flash attention over
a cached prefix), for sliding-window and full layers, GQA, bf16 or fp8_e4m3 KV.

Semantics match TorchNativeAttnBackend: causal by absolute position; on sliding layers a query at p
sees keys in (p - W, p]; fp32 softmax; output [T, H * d] in q's dtype.

FP8 KV scales: a layer may carry float attributes `k_scale` / `v_scale` (real value = stored value *
scale); absent, they are 1.0 and the pool's plain cast is the quantiser. They apply only to an fp8
pool (kv_scales): k/v are stored divided by them and the kernels multiply them back; a bf16 pool holds
k/v as they are, whatever the checkpoint calibrated.

Hybrid sliding-window pool: on sliding layers the kernels get the swa slot table and the (smaller)
swa buffers as arguments; the kernels read only positions inside the window, which the scheduler keeps
allocated, so they are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.triton_ops.decode_attention import decode_attention_fwd, decode_num_splits, num_sms
from sglang.srt.layers.attention.triton_ops.extend_attention import extend_attention_fwd
from sglang.srt.model_executor.forward_batch_info import ForwardBatch


@dataclass
class TritonAttnMetadata:
    """Per-step values every layer shares, computed once in init_forward_metadata."""

    q_starts: torch.Tensor | None  # [B] int64 offset of each request's first new token (extend)
    max_extend_len: int
    num_sms: int


class TritonAttnBackend(AttentionBackend):
    def __init__(self, max_kv_splits: int = 64):
        self.max_kv_splits = max_kv_splits
        self.metadata: TritonAttnMetadata | None = None
        self._metadata_batch: ForwardBatch | None = None
        self._num_sms: int | None = None

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        if self._num_sms is None:
            self._num_sms = num_sms(forward_batch.seq_lens.device)
        q_starts, max_ext = None, 1
        if not forward_batch.forward_mode.is_decode():
            # Exclusive cumsum on the device: no host-to-device copy, no sync.
            ext = forward_batch.extend_seq_lens
            q_starts = torch.cumsum(ext, 0) - ext
            max_ext = max(forward_batch.extend_seq_lens_cpu)
        self.metadata = TritonAttnMetadata(q_starts, max_ext, self._num_sms)
        self._metadata_batch = forward_batch

    def kv_scales(self, layer, pool) -> tuple[float, float]:
        # The checkpoint's scales are loaded whatever the pool dtype; they calibrate fp8 storage only.
        if pool.dtype != torch.float8_e4m3fn:
            return 1.0, 1.0
        return float(getattr(layer, "k_scale", 1.0) or 1.0), float(getattr(layer, "v_scale", 1.0) or 1.0)

    def forward_extend(self, q, layer, forward_batch: ForwardBatch) -> torch.Tensor:
        md = self._metadata(forward_batch)
        k_buf, v_buf = forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        k_scale, v_scale = self.kv_scales(layer, forward_batch.token_to_kv_pool)
        out = q.new_empty(q.shape[0], layer.tp_q_head_num, k_buf.shape[-1])
        extend_attention_fwd(
            q.reshape(q.shape[0], layer.tp_q_head_num, -1), k_buf, v_buf, out,
            forward_batch.req_to_token(layer), forward_batch.req_pool_indices,
            forward_batch.seq_lens, forward_batch.extend_seq_lens, md.q_starts, md.max_extend_len,
            layer.scaling, layer.sliding_window, k_scale, v_scale,
        )  # fmt: skip
        return out.view(q.shape[0], -1)

    def forward_decode(self, q, layer, forward_batch: ForwardBatch) -> torch.Tensor:
        md = self._metadata(forward_batch)
        k_buf, v_buf = forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        k_scale, v_scale = self.kv_scales(layer, forward_batch.token_to_kv_pool)
        batch = q.shape[0]
        out = q.new_empty(batch, layer.tp_q_head_num, k_buf.shape[-1])
        splits = decode_num_splits(batch, layer.tp_k_head_num, md.num_sms, self.max_kv_splits)
        decode_attention_fwd(
            q.reshape(batch, layer.tp_q_head_num, -1), k_buf, v_buf, out,
            forward_batch.req_to_token(layer), forward_batch.req_pool_indices,
            forward_batch.seq_lens, layer.scaling, splits, layer.sliding_window, k_scale, v_scale,
        )  # fmt: skip
        return out.view(batch, -1)

    def _metadata(self, forward_batch: ForwardBatch) -> TritonAttnMetadata:
        # Callers that skip init_forward_metadata (unit tests, ad-hoc use) still get a valid one.
        if self._metadata_batch is not forward_batch:
            self.init_forward_metadata(forward_batch)
        return self.metadata
