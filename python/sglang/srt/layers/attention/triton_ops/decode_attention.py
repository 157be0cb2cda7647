"""Decode attention over the paged KV pool: split-K flash-decoding in two launches.

Stage 1, grid (batch, kv_heads, splits): each program takes one request, one KV head with all the
query heads of its GQA group (padded to 16 rows so the dot products run on tensor cores), and one
contiguous chunk of the visible key range; it writes a normalised partial output and its log-sum-exp.
Stage 2, grid (batch, heads, head_dim chunks): merges the splits.

Splitting the keys is what lets batch-1 long-context decode fill the GPU: with 2 KV heads (Gemma 4
full layers) a kernel with one program per (request, KV head) would run on 2 of 132 SMs.

Sliding layers read only keys in [seq_len - W, seq_len), so their cost is O(W) at any context length.
The split count depends only on the batch and the layer geometry (not on sequence lengths), so a
decode step can be captured in a CUDA graph; chunks never go below `min_chunk` keys, and splits
beyond the visible range do no loads and write an empty partial (lse = -inf).

Softmax runs in base 2: scores are multiplied by scale * log2(e) once, and exp2/log2 are used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import pdl_launch, pdl_start

LOG2E = 1.4426950408889634
_MIN_GROUP_ROWS = 16  # tl.dot needs M >= 16


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int
    min_chunk: int  # fewest keys one split takes (keeps partial-output traffic small)


def default_decode_config(head_dim: int, batch: int = 1, fp8_kv: bool = False) -> DecodeConfig:
    """32-key tiles, 3 stages: the best of a sweep on H200 (benchmark/README_attention.md): 0.90
    (full) and 0.99 (sliding) of copy bandwidth at batch 64, 8k context. min_chunk 32: at batch 1
    and ~1k keys the layer is latency-bound and more, shorter splits win (sliding 8.7 us vs 10.2 with
    64 vs 12.9 with 128; full, fp8, 1024 keys: 8.5 us vs 10.8 with 64 vs 16.2 with 128). Large
    batches and long contexts give chunks above 32 keys anyway. fp8 KV with 256-dim heads from batch
    16: 2 warps, i.e. twice the programs per SM to hide the per-tile latency chain of that
    instruction-bound kernel (1k keys, batch 64: 104.7 us vs 116.5 with 4 warps and 117.3 with the
    64-key tiles used before; README_attention.md)."""
    if head_dim == 256 and fp8_kv and batch >= 16:
        return DecodeConfig(block_n=32, num_warps=2, num_stages=3, min_chunk=32)
    if head_dim >= 256:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=3, min_chunk=32)
    return DecodeConfig(block_n=32, num_warps=4, num_stages=2, min_chunk=64)


def decode_num_splits(batch: int, kv_heads: int, num_sms: int, max_splits: int = 64) -> int:
    """Splits per (request, KV head) so that the grid fills at most two programs per SM: rounding
    up instead would start a second, mostly idle wave (full layers at batch 64: 3 splits, 384
    programs, 84 us; 2 splits, 256 programs, 62-67 us)."""
    return max(1, min(max_splits, 2 * num_sms // (batch * kv_heads)))


@triton.jit
def _decode_stage1(
    Q, K, V, MidO, MidLse, O,
    req_to_token, req_pool_indices, seq_lens,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_r2t, stride_ob, stride_oh,
    scale_log2, v_scale, window, num_splits, min_chunk,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr, DIRECT_OUT: tl.constexpr, FP8_KV: tl.constexpr,
    V_PAIRS: tl.constexpr = False, PDL: tl.constexpr = False,
):  # fmt: skip
    pdl_start(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens + b).to(tl.int32)
    row = tl.load(req_pool_indices + b)
    kv_lo = seq_len * 0
    if SLIDING:
        kv_lo = tl.maximum(seq_len - window, 0)
    # Chunk: an even share of the visible keys, rounded up to whole blocks, at least min_chunk.
    chunk = tl.cdiv(tl.cdiv(seq_len - kv_lo, num_splits), BLOCK_N) * BLOCK_N
    chunk = tl.maximum(chunk, min_chunk)
    s_lo = kv_lo + split * chunk
    s_hi = tl.minimum(s_lo + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    head = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )  # fmt: skip
    if FP8_KV:
        q = q.to(tl.float16)  # see is_fp8: the K/V tiles then convert in one instruction

    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    tok_base = req_to_token + row * stride_r2t
    for start in range(s_lo, s_hi, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < s_hi
        # int64 slots: slot * row stride can pass 2^31 on a large pool.
        slot = tl.load(tok_base + pos, mask=n_mask, other=0)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + slot[:, None] * stride_kn + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k.to(q.dtype)), DOT_PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_PAIRS:
            v = _load_e4m3_as_f16(V + slot[:, None] * stride_vn + kvh * stride_vh, BLOCK_D, n_mask, HEAD_DIM)
        else:
            v = tl.load(V + slot[:, None] * stride_vn + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    io_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT_OUT:
        # One split (large batches): this is the final output; skip the merge launch.
        o_ptrs = O + b * stride_ob + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, (out * v_scale).to(O.dtype.element_ty), mask=io_mask)
    else:
        # An empty split leaves l_i = 0: lse -inf and output 0, so stage 2 gives it no weight.
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        mid_row = (b * NUM_HEADS + head) * num_splits + split
        tl.store(MidO + mid_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        tl.store(MidLse + mid_row, lse, mask=g_mask)


@triton.jit
def _decode_stage2(
    MidO, MidLse, O,
    stride_ob, stride_oh, num_splits, v_scale,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """Merge: out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m). All splits of a head-dim chunk
    are loaded at once (one memory round trip; a loop over splits would wait on each in turn)."""
    pdl_start(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    dc = tl.program_id(2)
    base = (b * NUM_HEADS + h) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    offs_d = dc * BLOCK_DC + tl.arange(0, BLOCK_DC)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + base + offs_s, mask=s_mask, other=float("-inf"))
    o = tl.load(MidO + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    w = tl.exp2(lse - tl.max(lse, 0))
    out = tl.sum(w[:, None] * o, 0) * (v_scale / tl.sum(w, 0))
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_mask)


def decode_attention_fwd(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    num_splits: int,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """q [B, H, d] (one new token per request, its KV already in the pool), k/v_buffer
    [slots, KVH, d] (bf16 or fp8; stored value * k/v_scale is the real value), out [B, H, d]."""
    batch, num_heads, head_dim = q.shape
    kv_heads = k_buffer.shape[1]
    group = num_heads // kv_heads
    assert q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1 and out.stride(2) == 1
    assert req_to_token.stride(1) == 1
    precision, fp8 = _dot_precision(q.dtype), is_fp8(k_buffer.dtype)
    # e4m3 V rows are read as int16 pairs (inline PTX: not under the interpreter).
    v_pairs = v_buffer.dtype == torch.float8_e4m3fn and precision != "upcast"
    if v_pairs:
        assert head_dim % 2 == 0 and v_buffer.stride(0) % 2 == 0 and v_buffer.stride(1) % 2 == 0
    cfg = config or default_decode_config(head_dim, batch, fp8)
    block_d = triton.next_power_of_2(head_dim)
    direct = num_splits == 1
    mid_shape = (1, 1) if direct else (batch, num_heads, num_splits)
    mid_o = torch.empty((*mid_shape, head_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(mid_shape, dtype=torch.float32, device=q.device)
    _decode_stage1[(batch, kv_heads, num_splits)](
        q, k_buffer, v_buffer, mid_o, mid_lse, out,
        req_to_token, req_pool_indices, seq_lens,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), req_to_token.stride(0), out.stride(0), out.stride(1),
        sm_scale * k_scale * LOG2E, v_scale, sliding_window or 0, num_splits, cfg.min_chunk,
        NUM_HEADS=num_heads, GROUP=group, BLOCK_H=max(_MIN_GROUP_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=cfg.block_n,
        SLIDING=sliding_window is not None, DOT_PRECISION=precision, DIRECT_OUT=direct,
        FP8_KV=fp8, V_PAIRS=v_pairs, **pdl_launch(q.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if direct:
        return out
    block_s = triton.next_power_of_2(num_splits)
    block_dc = min(block_d, max(16, 4096 // block_s))  # [splits, chunk] fp32 tile <= 16 KiB
    _decode_stage2[(batch, num_heads, triton.cdiv(head_dim, block_dc))](
        mid_o, mid_lse, out, out.stride(0), out.stride(1), num_splits, v_scale,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_DC=block_dc, BLOCK_S=block_s, num_warps=4,
        **pdl_launch(q.device),
    )  # fmt: skip
    return out


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs (the CPU test model) need exact dots; tf32 would cost ~1e-3 relative error.
    Under the interpreter, "upcast": its dot multiplies bf16 operands as raw int16 bits, so both
    operands go to fp32 first (bf16 products are exact in fp32: same numbers as the GPU's dot)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def is_fp8(dtype: torch.dtype) -> bool:
    """FP8 KV runs its dots in fp16, not the activations' bf16: e4m3 -> f16 is one PTX
    instruction (cvt.rn.f16x2.e4m3x2) while e4m3 -> bf16 goes through f16 plus a scalar F2F per
    element, which on sm_90 made fp8 decode slower per byte than bf16 (0.39 vs 0.90 of copy
    bandwidth, full layer, batch 64). q (bf16, RMS-normed) fits fp16 exactly unless |q| > 65504;
    softmax weights lose nothing (fp16 has more mantissa than bf16)."""
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


@triton.jit
def _load_e4m3_as_f16(rows, BLOCK_D: tl.constexpr, n_mask, HEAD_DIM: tl.constexpr):
    """[BLOCK_N, BLOCK_D] fp16 from fp8 rows (`rows`: [BLOCK_N, 1] pointers to each row's start),
    read as int16 pairs and converted by one cvt.rn.f16x2.e4m3x2 each. Loading fp8 elements for
    the P @ V dot directly makes the compiler gather single bytes from shared memory into the
    MMA operand (ldmatrix has no 8-bit transposed form on sm_90): ~80 scalar loads per tile. The
    join + reshape here keeps the conversion in the load's own layout; the fp16 tile then reaches
    the operand through shared memory by ldmatrix, as bf16 KV does."""
    offs = tl.arange(0, BLOCK_D // 2)
    pairs = tl.load(rows.to(tl.pointer_type(tl.int16)) + offs[None, :],
                    mask=n_mask[:, None] & (offs < HEAD_DIM // 2)[None, :], other=0)  # fmt: skip
    lo, hi = tl.inline_asm_elementwise(
        "{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
        "=h,=h,h", [pairs], dtype=(tl.float16, tl.float16), is_pure=True, pack=1,
    )  # fmt: skip
    return tl.reshape(tl.join(lo, hi), (pairs.shape[0], BLOCK_D))


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with an fp32 accumulator; see _dot_precision."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


def num_sms(device: torch.device | str) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in on CPU (interpreter runs)."""
    if torch.device(device).type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


__all__ = ["DecodeConfig", "decode_attention_fwd", "decode_num_splits", "default_decode_config", "num_sms"]
