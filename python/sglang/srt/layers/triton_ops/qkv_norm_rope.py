"""Per-head q/k RMSNorm + rotary embedding and v RMSNorm, for all heads of a layer in one launch.

Reads the fused projection qkv [T, (H + KVH [+ KVH]) * D] (with attention_k_eq_v the k heads double
as v) and writes q [T, H, D], k [T, KVH, D], v [T, KVH, D]. Rotary is the rotate-half layout with
cos/sin [T, D] in fp32; pass-through frequencies of partial rope have cos 1, sin 0 there.

Rounding follows the torch path: the normed head is rounded to the dtype (RMSNorm's output) before
the rotation, and the rotated result again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import (
    inv_count, inv_rms, load_row, round_to, row_warps, scale_row, unit_stride_rows,
)  # fmt: skip


@triton.jit
def _load_heads(ptr, heads, offs, mask):
    """[BLOCK_H, BLOCK_HALF] tile of one half of each head; `heads` points at each head's start."""
    return tl.load(ptr + heads[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _norm_rope_heads(
    src, dst, num_heads, w_ptr, cos_row, sin_row, inv_d, eps,
    HAS_W: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """RMSNorm (then rotary when ROPE) of `num_heads` consecutive heads of one token."""
    DTYPE: tl.constexpr = dst.dtype.element_ty
    offs = tl.arange(0, BLOCK_HALF)
    col_mask = offs < HALF
    heads = tl.arange(0, BLOCK_H) * (2 * HALF)
    mask = (tl.arange(0, BLOCK_H) < num_heads)[:, None] & col_mask[None, :]
    # the two halves of each head apart: rotate-half pairs element i with element i + HALF
    a = _load_heads(src, heads, offs, mask)
    b = _load_heads(src + HALF, heads, offs, mask)
    r = inv_rms(tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1), inv_d, eps)[:, None]
    a = scale_row(a, r, w_ptr, offs, col_mask, HAS_W, DTYPE)  # RMSNorm's output, rounded
    b = scale_row(b, r, w_ptr + HALF, offs, col_mask, HAS_W, DTYPE)
    if ROPE:
        # x * cos + rotate_half(x) * sin, with rotate_half(x) = [-b, a]
        cos_a, cos_b = load_row(cos_row, offs, col_mask)[None, :], load_row(cos_row + HALF, offs, col_mask)[None, :]
        sin_a, sin_b = load_row(sin_row, offs, col_mask)[None, :], load_row(sin_row + HALF, offs, col_mask)[None, :]
        a, b = round_to(a * cos_a - b * sin_a, DTYPE), round_to(b * cos_b + a * sin_b, DTYPE)
    tl.store(dst + heads[:, None] + offs[None, :], a, mask=mask)
    tl.store(dst + HALF + heads[:, None] + offs[None, :], b, mask=mask)


@triton.jit
def _qkv_norm_rope_kernel(
    qkv_ptr, q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
    stride_qkv, stride_cs, num_heads, num_kv_heads, v_col, inv_d, eps,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Grid (T, 3): program (t, 0) does token t's q heads, (t, 1) its k heads, (t, 2) its v heads."""
    t = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    row = qkv_ptr + t * stride_qkv
    cos_row = cos_ptr + t * stride_cs
    sin_row = sin_ptr + t * stride_cs
    kv_dst = t * num_kv_heads * HEAD_DIM
    if group == 0:
        q_dst = q_ptr + t * num_heads * HEAD_DIM
        _norm_rope_heads(
            row, q_dst, num_heads, qw_ptr, cos_row, sin_row, inv_d, eps, True, True, HALF, BLOCK_H, BLOCK_HALF
        )
    elif group == 1:
        k_src = row + num_heads * HEAD_DIM
        _norm_rope_heads(
            k_src, k_ptr + kv_dst, num_kv_heads, kw_ptr, cos_row, sin_row, inv_d, eps, True, True, HALF, BLOCK_H, BLOCK_HALF
        )
    else:  # v: norm without weight, no rope
        _norm_rope_heads(
            row + v_col, v_ptr + kv_dst, num_kv_heads, kw_ptr, cos_row, sin_row, inv_d, eps, False, False, HALF, BLOCK_H,
            BLOCK_HALF,
        )  # fmt: skip


def qkv_norm_rope(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, k_eq_v: bool,
    q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(rope(q_norm(q)), rope(k_norm(k)), v_norm(v)) from the fused projection output."""
    tokens = qkv.shape[0]
    qkv = unit_stride_rows(qkv)
    q = qkv.new_empty(tokens, num_heads, head_dim)
    k = qkv.new_empty(tokens, num_kv_heads, head_dim)
    v = qkv.new_empty(tokens, num_kv_heads, head_dim)
    if tokens == 0:
        return q, k, v
    cos, sin = cos.contiguous(), sin.contiguous()
    v_col = (num_heads + (0 if k_eq_v else num_kv_heads)) * head_dim
    block_h = triton.next_power_of_2(max(num_heads, num_kv_heads))
    block_half = triton.next_power_of_2(head_dim // 2)
    _qkv_norm_rope_kernel[(tokens, 3)](
        qkv, q, k, v, q_weight, k_weight, cos, sin, qkv.stride(0), cos.stride(0), num_heads, num_kv_heads,
        v_col, inv_count(head_dim), eps, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=row_warps(2 * block_h * block_half), enable_fp_fusion=False,
    )  # fmt: skip
    return q, k, v
