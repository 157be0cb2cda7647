"""Extend (prefill, or a prefill chunk on top of a cached prefix) attention over the paged KV pool.

Flash attention with the GQA group folded into the query rows: for one KV head, row r of a block is
token r // G, query head r % G, so each K/V tile loaded serves all G query heads that share it
(G = 2 on Gemma 4 sliding layers, 8 on full layers). Keys come from the pool through req_to_token,
the new tokens' included (forward() stores them first), so a chunk sees its prefix and itself alike.

Grid (requests, row blocks, KV heads); blocks past a request's rows load nothing and store nothing.
A block walks keys only in [lowest visible, its last query position]: on sliding layers that starts
at first query position - W + 1, so the cost per block is O(W + block) at any prefix length. Keys
strictly below every row's causal limit and inside every row's window skip the mask arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang.srt.layers.attention.triton_ops.decode_attention import LOG2E, _dot, _dot_precision, is_fp8


@dataclass(frozen=True)
class ExtendConfig:
    block_m: int  # query rows (token x group head) per program
    block_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int


def default_extend_config(head_dim: int) -> ExtendConfig:
    """Best of a sweep on H200 for a 1000-token prompt (benchmark/README_attention.md). d=512 at
    4 warps spills a little (88 B stack on sm_90) yet beat 8 warps (203 us vs 286)."""
    if head_dim >= 512:
        return ExtendConfig(block_m=32, block_n=32, num_warps=4, num_stages=3)
    if head_dim >= 256:
        return ExtendConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)  # wgmma (HGMMA)
    return ExtendConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)


@triton.jit
def _attend_block(
    q, acc, m_i, l_i, q_pos, start, kv_hi, tok_base, K, V, kvh,
    stride_kn, stride_kh, stride_vn, stride_vh, scale_log2, window,
    offs_n, offs_d, d_mask,
    MASKED: tl.constexpr, SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax; MASKED adds the causal / window / bounds mask."""
    pos = start + offs_n
    n_mask = pos < kv_hi
    slot = tl.load(tok_base + pos, mask=n_mask, other=0)
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + slot[:, None] * stride_kn + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k.to(q.dtype)), DOT_PRECISION) * scale_log2
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if SLIDING:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + slot[:, None] * stride_vn + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _extend_kernel(
    Q, K, V, O,
    req_to_token, req_pool_indices, seq_lens, extend_lens, q_starts,
    stride_qt, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_ot, stride_oh, stride_r2t,
    scale_log2, v_scale, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8_KV: tl.constexpr,
):  # fmt: skip
    req = tl.program_id(0)
    mblk = tl.program_id(1)
    kvh = tl.program_id(2)

    ext_len = tl.load(extend_lens + req).to(tl.int32)
    seq_len = tl.load(seq_lens + req).to(tl.int32)
    q_start = tl.load(q_starts + req).to(tl.int32)
    row = tl.load(req_pool_indices + req)
    prefix = seq_len - ext_len

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    m_mask = tok < ext_len
    q_pos = prefix + tok
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    io_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    if FP8_KV:
        q = q.to(tl.float16)  # see decode_attention.is_fp8

    # Key range of this block: its first row's window start .. its last row's position.
    first_pos = prefix + (mblk * BLOCK_M) // GROUP
    last_pos = prefix + tl.minimum((mblk * BLOCK_M + BLOCK_M - 1) // GROUP, ext_len - 1)
    kv_hi = tl.where(mblk * BLOCK_M < ext_len * GROUP, last_pos + 1, 0)
    kv_lo = seq_len * 0
    if SLIDING:
        kv_lo = tl.maximum(first_pos - window + 1, 0)
    # Keys in [full_lo, full_hi) are visible to every row: no mask needed there.
    full_hi = tl.minimum(first_pos + 1, kv_hi)
    full_lo = kv_lo
    if SLIDING:
        full_lo = tl.maximum(last_pos - window + 1, 0)
    full_lo = tl.minimum(tl.cdiv(full_lo - kv_lo, BLOCK_N) * BLOCK_N + kv_lo, full_hi)
    n_full = tl.maximum(full_hi - full_lo, 0) // BLOCK_N
    full_hi = full_lo + n_full * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a fully masked tile must not give NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tok_base = req_to_token + row * stride_r2t
    # Masked head (window edge), unmasked middle, masked tail (diagonal and bounds).
    for start in range(kv_lo, full_lo, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, q_pos, start, full_lo, tok_base, K, V, kvh,
            stride_kn, stride_kh, stride_vn, stride_vh, scale_log2, window, offs_n, offs_d, d_mask,
            MASKED=True, SLIDING=SLIDING, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
    for start in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, q_pos, start, full_hi, tok_base, K, V, kvh,
            stride_kn, stride_kh, stride_vn, stride_vh, scale_log2, window, offs_n, offs_d, d_mask,
            MASKED=False, SLIDING=SLIDING, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
    for start in range(full_hi, kv_hi, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, q_pos, start, kv_hi, tok_base, K, V, kvh,
            stride_kn, stride_kh, stride_vn, stride_vh, scale_log2, window, offs_n, offs_d, d_mask,
            MASKED=True, SLIDING=SLIDING, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip

    out = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(O + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty), mask=io_mask)


def extend_attention_fwd(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    q_starts: torch.Tensor,
    max_extend_len: int,
    sm_scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    config: ExtendConfig | None = None,
) -> torch.Tensor:
    """q/out [T, H, d] (requests' new tokens back to back, request i's from q_starts[i]); the new
    tokens' K/V must already be in the pool at req_to_token[row, seq_len - extend_len : seq_len]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_buffer.shape[1]
    group = num_heads // kv_heads
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1 and out.stride(2) == 1
    assert req_to_token.stride(1) == 1
    cfg = config or default_extend_config(head_dim)
    batch = seq_lens.shape[0]
    grid = (batch, triton.cdiv(max_extend_len * group, cfg.block_m), kv_heads)
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out,
        req_to_token, req_pool_indices, seq_lens, extend_lens, q_starts,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), out.stride(0), out.stride(1), req_to_token.stride(0),
        sm_scale * k_scale * LOG2E, v_scale, sliding_window or 0,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        SLIDING=sliding_window is not None, DOT_PRECISION=_dot_precision(q.dtype), FP8_KV=is_fp8(k_buffer.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
