"""MoE for a handful of tokens: one GEMV per (token, slot) pair, no sorting, no MMA.

At decode batch 1-4 nearly every pair reads its own expert, so the work is a few matrix-vector
products whose weights are read once; the grouped-GEMM path (fused_moe.py) pads each pair to a
16-row MMA block and needs the align kernel first. Here program (N block, pair) reads the pair's
expert id straight from topk_ids, decodes its weight rows in registers (NVFP4: the same repacked
blocks and decode as the GEMM kernels) and multiplies on the CUDA cores, keeping per-lane fp32
partial sums that are reduced once at the end. GEMM1 applies both global scales and act(gate) * up;
GEMM2 the down scale and the routing weight; rows are stored in pair order, so the caller's top-k sum
reads them as the GEMM path's. Measured on the H200 this wins for bf16 experts up to 4 tokens and
loses for NVFP4 ones (configs.GEMV_CONFIGS has the figures), so by default only bf16 experts come here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.moe.fused_moe_triton.configs import GemvTile, MoeGemvConfig
from sglang.srt.layers.moe.fused_moe_triton.kernels import (
    FP4_BLOCK_WORDS,
    FP4_UNSCALE,
    _fp4_decode_regs,
    _fp4_scale_selectors,
    _gemm1_epilogue,
    _halves,
    _weight_rows,
    check_fp4_block_k,
    scale_byte_table,
)
from sglang.srt.layers.triton_ops.common import pdl_launch, pdl_start

_BLOCK_WORDS = tl.constexpr(FP4_BLOCK_WORDS)


@triton.jit
def _word_dot(r, x_words, j: tl.constexpr, k_ok, EVEN_K: tl.constexpr):
    """Products of one decoded register (elements j, j + 1 of each word) with the matching x."""
    lo, hi = _halves(r)
    if EVEN_K:
        x_lo = tl.load(x_words + j)
        x_hi = tl.load(x_words + j + 1)
    else:
        x_lo = tl.load(x_words + j, mask=k_ok, other=0.0)
        x_hi = tl.load(x_words + j + 1, mask=k_ok, other=0.0)
    return lo.to(tl.float32) * x_lo.to(tl.float32)[None, :] + hi.to(tl.float32) * x_hi.to(tl.float32)[None, :]


@triton.jit
def _gemv_step(
    acc, w_rows, s_rows, selectors, x_row, k0, K,
    BK: tl.constexpr, W_FP4: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """acc += W[rows, k0:k0+BK] * x[k0:k0+BK], elementwise: [BN, BK/8] per word (FP4) or [BN, BK].

    FP4 words are not unpacked into K order: each decoded register is multiplied by the x elements it
    holds. K columns past K hold zero codes (blocks are padded to 64) and x is masked there."""
    if W_FP4:
        offs_w = k0 // 8 + tl.arange(0, BK // 8)
        chunk = (offs_w // 8) * _BLOCK_WORDS
        k_ok = offs_w * 8 < K
        if EVEN_K:
            words = tl.load(w_rows + (chunk + offs_w % 8)[None, :])
            scales = tl.load(s_rows + chunk[None, :])
        else:
            words = tl.load(w_rows + (chunk + offs_w % 8)[None, :], mask=k_ok[None, :], other=0)
            scales = tl.load(s_rows + chunk[None, :], mask=k_ok[None, :], other=0)
        r0, r1, r2, r3 = _fp4_decode_regs(words, scales, selectors[None, :])
        x_words = x_row + offs_w * 8
        acc += _word_dot(r0, x_words, 0, k_ok, EVEN_K) + _word_dot(r1, x_words, 2, k_ok, EVEN_K)
        acc += _word_dot(r2, x_words, 4, k_ok, EVEN_K) + _word_dot(r3, x_words, 6, k_ok, EVEN_K)
    else:
        offs_k = k0 + tl.arange(0, BK)
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :])
            x = tl.load(x_row + offs_k)
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
            x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return acc


@triton.jit
def _gemv_rows(w_ptr, expert, offs_n, N, row_offset, stride_we, stride_wn, W_FP4: tl.constexpr):
    # Rows past N re-read row 0 (always there) and are dropped at the store: loads need no row mask.
    return _weight_rows(w_ptr, expert, tl.where(offs_n < N, offs_n, 0) + row_offset, stride_we, stride_wn, W_FP4)


@triton.jit
def _zero_gemv_acc(BN: tl.constexpr, BK: tl.constexpr, W_FP4: tl.constexpr):
    if W_FP4:
        acc = tl.zeros((BN, BK // 8), dtype=tl.float32)
    else:
        acc = tl.zeros((BN, BK), dtype=tl.float32)
    return acc


@triton.jit
def moe_gemv1_kernel(
    x_ptr, w_ptr, tbl_ptr, gs_ptr, topk_ids_ptr, h_ptr, top_k, N, K,
    stride_xm, stride_we, stride_wn, stride_hm,
    BN: tl.constexpr, BK: tl.constexpr, W_FP4: tl.constexpr, ACT: tl.constexpr, HAS_GS: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """h[pair, n] = act(gs_gate * x W_gate^T) * (gs_up * x W_up^T) for N columns [BN) of one pair;
    w is [E, 2N, K] bf16 or FP4 blocks, gate rows [0, N), up rows [N, 2N) (as moe_gemm1_kernel)."""
    pdl_start(PDL)
    pid_n, pair = tl.program_id(0), tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // top_k).to(tl.int64) * stride_xm
    offs_n = pid_n * BN + tl.arange(0, BN)
    gate_w, gate_s = _gemv_rows(w_ptr, expert, offs_n, N, 0, stride_we, stride_wn, W_FP4)
    up_w, up_s = _gemv_rows(w_ptr, expert, offs_n, N, N, stride_we, stride_wn, W_FP4)
    selectors = _fp4_scale_selectors(tbl_ptr, BK, W_FP4)
    acc_g = _zero_gemv_acc(BN, BK, W_FP4)
    acc_u = _zero_gemv_acc(BN, BK, W_FP4)
    for k0 in range(0, K, BK):
        acc_g = _gemv_step(acc_g, gate_w, gate_s, selectors, x_row, k0, K, BK, W_FP4, EVEN_K)
        acc_u = _gemv_step(acc_u, up_w, up_s, selectors, x_row, k0, K, BK, W_FP4, EVEN_K)
    row = tl.full((1,), pair, tl.int32)
    g = tl.sum(acc_g, 1)[None, :]
    u = tl.sum(acc_u, 1)[None, :]
    _gemm1_epilogue(g, u, expert, gs_ptr, h_ptr, row, offs_n, N, stride_hm, W_FP4, ACT, True, HAS_GS)


@triton.jit
def moe_gemv2_kernel(
    h_ptr, w_ptr, tbl_ptr, gs_ptr, topk_ids_ptr, topk_w_ptr, out_ptr, N, K,
    stride_hm, stride_we, stride_wn, stride_om,
    BN: tl.constexpr, BK: tl.constexpr, W_FP4: tl.constexpr, HAS_GS: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """out[pair, n] = topk_w[pair] * gs_down * (h[pair] @ W_down^T)[n] for N columns [BN) of one pair."""
    pdl_start(PDL)
    pid_n, pair = tl.program_id(0), tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    h_row = h_ptr + pair.to(tl.int64) * stride_hm
    offs_n = pid_n * BN + tl.arange(0, BN)
    w_rows, s_rows = _gemv_rows(w_ptr, expert, offs_n, N, 0, stride_we, stride_wn, W_FP4)
    selectors = _fp4_scale_selectors(tbl_ptr, BK, W_FP4)
    acc = _zero_gemv_acc(BN, BK, W_FP4)
    for k0 in range(0, K, BK):
        acc = _gemv_step(acc, w_rows, s_rows, selectors, h_row, k0, K, BK, W_FP4, EVEN_K)
    scale = tl.load(topk_w_ptr + pair)
    if W_FP4:
        scale = scale * FP4_UNSCALE
    if HAS_GS:
        scale = scale * tl.load(gs_ptr + expert)
    y = tl.sum(acc, 1) * scale
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def _launch(t: GemvTile, w_fp4: bool, k: int, device: torch.device) -> dict:
    if w_fp4:
        check_fp4_block_k(t.block_k)
    return dict(BN=t.block_n, BK=t.block_k, EVEN_K=k % t.block_k == 0, num_warps=t.num_warps, num_stages=t.num_stages,
                **pdl_launch(device))


def moe_gemv1(x: torch.Tensor, w, topk_ids: torch.Tensor, act: int, t: GemvTile) -> torch.Tensor:
    """h [M * top_k, I] bf16 in pair order; w is a fused_moe.ExpertWeights."""
    num_pairs, top_k = topk_ids.numel(), topk_ids.shape[1]
    inter, hidden = w.inter, x.shape[1]
    h = torch.empty(num_pairs, inter, dtype=torch.bfloat16, device=x.device)
    gs = w.w13_scale_2 if w.w13_scale_2 is not None else w.w13
    moe_gemv1_kernel[(triton.cdiv(inter, t.block_n), num_pairs)](
        x, w.w13, scale_byte_table(x.device), gs, topk_ids.reshape(-1), h, top_k, inter, hidden,
        x.stride(0), w.w13.stride(0), w.w13.stride(1), h.stride(0),
        W_FP4=w.is_fp4, ACT=act, HAS_GS=w.w13_scale_2 is not None, **_launch(t, w.is_fp4, hidden, x.device),
    )  # fmt: skip
    return h


def moe_gemv2(
    h: torch.Tensor, w, topk_ids: torch.Tensor, topk_weights: torch.Tensor, t: GemvTile,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # fmt: skip
    """Weighted expert outputs [M * top_k, H] in pair order from moe_gemv1's h."""
    num_pairs, hidden, inter = topk_ids.numel(), w.hidden, w.inter
    out = torch.empty(num_pairs, hidden, dtype=dtype, device=h.device)
    gs = w.w2_scale_2 if w.w2_scale_2 is not None else w.w2
    moe_gemv2_kernel[(triton.cdiv(hidden, t.block_n), num_pairs)](
        h, w.w2, scale_byte_table(h.device), gs, topk_ids.reshape(-1), topk_weights.reshape(-1).float(), out,
        hidden, inter, h.stride(0), w.w2.stride(0), w.w2.stride(1), out.stride(0),
        W_FP4=w.is_fp4, HAS_GS=w.w2_scale_2 is not None, **_launch(t, w.is_fp4, inter, h.device),
    )  # fmt: skip
    return out


def moe_gemv(x, w, topk_weights: torch.Tensor, topk_ids: torch.Tensor, act: int, cfg: MoeGemvConfig) -> torch.Tensor:
    """Weighted expert outputs [M * top_k, H] in pair order: row m * top_k + j is
    topk_weights[m, j] * expert_{topk_ids[m, j]}(x[m]). w is a fused_moe.ExpertWeights."""
    h = moe_gemv1(x, w, topk_ids, act, cfg.gemm1)
    return moe_gemv2(h, w, topk_ids, topk_weights, cfg.gemm2, x.dtype)
