"""Reference attention over the paged KV cache, one request at a time, fp32 softmax.

The CPU path and the yardstick for GPU kernels. A query at position p sees keys at positions
<= p, and on sliding layers only the last `sliding_window` of them (p - W < key position).
"""

from __future__ import annotations

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend


class TorchNativeAttnBackend(AttentionBackend):
    def _attend_one(self, q, layer, forward_batch, req: int, q_start: int, q_len: int) -> torch.Tensor:
        seq_len = forward_batch.seq_lens_cpu[req]
        first_q_pos = seq_len - q_len
        kv_start = 0
        if layer.sliding_window is not None:
            kv_start = max(0, first_q_pos - layer.sliding_window + 1)
        row = int(forward_batch.req_pool_indices[req])
        # Sliding layers of a hybrid pool read swa slots; positions < kv_start may be tombstones there.
        slots = forward_batch.req_to_token(layer)[row, kv_start:seq_len]
        k_buf, v_buf = forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        k = k_buf[slots].float().transpose(0, 1)  # [KVH, S, d]
        v = v_buf[slots].float().transpose(0, 1)
        qh = q[q_start : q_start + q_len].float().transpose(0, 1)  # [H, Q, d]
        group = layer.tp_q_head_num // layer.tp_k_head_num
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
        scores = (qh @ k.transpose(1, 2)) * layer.scaling  # [H, Q, S]
        q_pos = torch.arange(first_q_pos, seq_len, device=q.device)[:, None]
        k_pos = torch.arange(kv_start, seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if layer.sliding_window is not None:
            visible &= k_pos > q_pos - layer.sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [H, Q, d]
        return out.transpose(0, 1).reshape(q_len, -1)

    def _attend_all(self, q, layer, forward_batch) -> torch.Tensor:
        outs, start = [], 0
        for req, q_len in enumerate(forward_batch.extend_seq_lens_cpu):
            outs.append(self._attend_one(q, layer, forward_batch, req, start, q_len))
            start += q_len
        return torch.cat(outs).to(q.dtype)

    def forward_extend(self, q, layer, forward_batch):
        return self._attend_all(q, layer, forward_batch)

    def forward_decode(self, q, layer, forward_batch):
        return self._attend_all(q, layer, forward_batch)
