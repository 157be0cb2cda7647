"""Per-head q/k RMSNorm + rotary embedding and v RMSNorm for all heads of a layer in one launch, with
k and v stored straight into the layer's paged KV cache (the attention backend then skips its store).

Reads the fused projection qkv [T, (H + KVH [+ KVH]) * D] (with attention_k_eq_v the k heads double
as v), writes q [T, H, D] and rows loc[t] of the cache buffers [slots, KVH, D]. Rotary is the
rotate-half layout with cos/sin [T, D] in fp32; pass-through frequencies of partial rope have cos 1,
sin 0 there.

Rounding follows the torch path: the normed head is rounded to the dtype (RMSNorm's output) before
the rotation, and the rotated result again. The store is KVCache.set_kv_buffer's: x * fp32(1 / scale)
rounded to the dtype (scale 1 unless the pool is fp8), then cast to the cache dtype (fp8 e4m3
saturating at +-448, bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import (
    e4m3_bits, inv_count, inv_rms, load_row, pdl_launch, pdl_start, round_to, row_warps, scale_row, unit_stride_rows,
)  # fmt: skip
from sglang.srt.mem_cache.memory_pool import KVWrite, fp32_reciprocal


@triton.jit
def _head_tile(num_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """(start of each head, offsets in a half head, column mask, tile mask) of one token's heads."""
    offs = tl.arange(0, BLOCK_HALF)
    col_mask = offs < HALF
    heads = tl.arange(0, BLOCK_H) * (2 * HALF)
    return heads, offs, col_mask, (tl.arange(0, BLOCK_H) < num_heads)[:, None] & col_mask[None, :]


@triton.jit
def _load_heads(ptr, heads, offs, mask):
    """[BLOCK_H, BLOCK_HALF] tile of one half of each head; `heads` points at each head's start."""
    return tl.load(ptr + heads[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _norm_rope_heads(
    src, num_heads, w_a, w_b, cos_row, sin_row, inv_d, eps,
    HAS_W: tl.constexpr, ROPE: tl.constexpr, DTYPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """RMSNorm (weight halves w_a, w_b already loaded), then rotary when ROPE, of `num_heads`
    consecutive heads of one token: the two halves of each head as fp32 tiles holding DTYPE values."""
    heads, offs, col_mask, mask = _head_tile(num_heads, HALF, BLOCK_H, BLOCK_HALF)
    # the two halves of each head apart: rotate-half pairs element i with element i + HALF
    a = _load_heads(src, heads, offs, mask)
    b = _load_heads(src + HALF, heads, offs, mask)
    if ROPE:  # loaded with the heads, ahead of the reduction: one memory round trip for all
        cos_a, cos_b = load_row(cos_row, offs, col_mask)[None, :], load_row(cos_row + HALF, offs, col_mask)[None, :]
        sin_a, sin_b = load_row(sin_row, offs, col_mask)[None, :], load_row(sin_row + HALF, offs, col_mask)[None, :]
    r = inv_rms(tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1), inv_d, eps)[:, None]
    a = scale_row(a, r, w_a[None, :], HAS_W, DTYPE)  # RMSNorm's output, rounded
    b = scale_row(b, r, w_b[None, :], HAS_W, DTYPE)
    if ROPE:
        # x * cos + rotate_half(x) * sin, with rotate_half(x) = [-b, a]
        a, b = round_to(a * cos_a - b * sin_a, DTYPE), round_to(b * cos_b + a * sin_b, DTYPE)
    return a, b


@triton.jit
def _store_heads(dst, a, b, num_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads, offs, _, mask = _head_tile(num_heads, HALF, BLOCK_H, BLOCK_HALF)
    tl.store(dst + heads[:, None] + offs[None, :], a, mask=mask)
    tl.store(dst + HALF + heads[:, None] + offs[None, :], b, mask=mask)


@triton.jit
def _cache_value(x, inv_scale, DTYPE: tl.constexpr, CACHE: tl.constexpr):
    """set_kv_buffer's store of x: x * inv_scale in DTYPE (x / scale on CUDA), cast to the cache dtype
    (CACHE uint8: fp8 e4m3 bits)."""
    x = round_to(x * inv_scale, DTYPE)
    # one return: Triton wants every return of a function to have one type
    if CACHE == tl.uint8:
        x = e4m3_bits(x)
    else:
        x = round_to(x, CACHE)
    return x


@triton.jit
def _qkv_norm_rope_kernel(
    qkv_ptr, q_ptr, k_cache, v_cache, loc_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr,
    stride_qkv, stride_cs, stride_k_cache, stride_v_cache, num_heads, num_kv_heads, v_col, inv_d, eps,
    inv_k_scale, inv_v_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """Grid (T, 3): program (t, 0) does token t's q heads, (t, 1) its k heads, (t, 2) its v heads."""
    t = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    DTYPE: tl.constexpr = q_ptr.dtype.element_ty
    CACHE: tl.constexpr = k_cache.dtype.element_ty
    # The norm weight before the wait: no kernel writes it (v heads load k's, unused).
    w_ptr = kw_ptr
    if group == 0:
        w_ptr = qw_ptr
    offs = tl.arange(0, BLOCK_HALF)
    w_a, w_b = load_row(w_ptr, offs, offs < HALF), load_row(w_ptr + HALF, offs, offs < HALF)
    pdl_start(PDL)
    row = qkv_ptr + t * stride_qkv
    cos_row = cos_ptr + t * stride_cs
    sin_row = sin_ptr + t * stride_cs
    if group == 0:
        a, b = _norm_rope_heads(
            row, num_heads, w_a, w_b, cos_row, sin_row, inv_d, eps, True, True, DTYPE, HALF, BLOCK_H, BLOCK_HALF
        )
        _store_heads(q_ptr + t * num_heads * HEAD_DIM, a, b, num_heads, HALF, BLOCK_H, BLOCK_HALF)
    else:
        slot = tl.load(loc_ptr + t)
        if group == 1:
            k_src = row + num_heads * HEAD_DIM
            a, b = _norm_rope_heads(
                k_src, num_kv_heads, w_a, w_b, cos_row, sin_row, inv_d, eps, True, True, DTYPE, HALF, BLOCK_H, BLOCK_HALF
            )
            dst, inv_scale = k_cache + slot * stride_k_cache, inv_k_scale
        else:  # v: norm without weight, no rope
            a, b = _norm_rope_heads(
                row + v_col, num_kv_heads, w_a, w_b, cos_row, sin_row, inv_d, eps, False, False, DTYPE, HALF, BLOCK_H,
                BLOCK_HALF,
            )  # fmt: skip
            dst, inv_scale = v_cache + slot * stride_v_cache, inv_v_scale
        # new names: a and b leave both branches of `group == 0`, where they must keep one type
        stored_a, stored_b = _cache_value(a, inv_scale, DTYPE, CACHE), _cache_value(b, inv_scale, DTYPE, CACHE)
        _store_heads(dst, stored_a, stored_b, num_kv_heads, HALF, BLOCK_H, BLOCK_HALF)


def _cache_view(buffer: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A [slots, KVH, D] cache buffer as the kernel writes it: fp8 as its bytes (the kernel encodes e4m3
    itself, bit-exactly as torch casts)."""
    if buffer.stride()[1:] != (head_dim, 1):
        raise ValueError(f"KV cache buffer needs contiguous rows of heads, got strides {buffer.stride()}")
    return buffer.view(torch.uint8) if buffer.dtype == torch.float8_e4m3fn else buffer


def qkv_norm_rope(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, k_eq_v: bool,
    q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, kv: KVWrite,
) -> torch.Tensor:  # fmt: skip
    """rope(q_norm(q)) [T, H, D] from the fused projection; rope(k_norm(k)) and v_norm(v) go into the
    KV cache as `kv` says."""
    tokens = qkv.shape[0]
    qkv = unit_stride_rows(qkv)
    q = qkv.new_empty(tokens, num_heads, head_dim)
    if tokens == 0:
        return q
    cos, sin = cos.contiguous(), sin.contiguous()
    k_cache, v_cache = _cache_view(kv.k_buffer, head_dim), _cache_view(kv.v_buffer, head_dim)
    v_col = (num_heads + (0 if k_eq_v else num_kv_heads)) * head_dim
    block_h = triton.next_power_of_2(max(num_heads, num_kv_heads))
    block_half = triton.next_power_of_2(head_dim // 2)
    _qkv_norm_rope_kernel[(tokens, 3)](
        qkv, q, k_cache, v_cache, kv.loc, q_weight, k_weight, cos, sin, qkv.stride(0), cos.stride(0),
        k_cache.stride(0), v_cache.stride(0), num_heads, num_kv_heads, v_col, inv_count(head_dim), eps,
        fp32_reciprocal(kv.k_scale), fp32_reciprocal(kv.v_scale),
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=row_warps(2 * block_h * block_half),
        enable_fp_fusion=False, **pdl_launch(qkv.device),
    )  # fmt: skip
    return q
