"""MoE for a handful of tokens: one GEMV per (token, slot) pair, no sorting, no MMA.

At decode batch 1-8 nearly every pair reads its own expert, so the work is a few matrix-vector
products whose weights are read once; the grouped-GEMM path (fused_moe.py) pads each pair to a
16-row MMA block, needs the align kernel first and, at one token, split-K plus a reduction kernel to
occupy the GPU. Here program (N block, pair) reads the pair's expert id straight from topk_ids,
streams its weight rows over the whole K and multiplies on the CUDA cores, keeping per-lane fp32
partial sums that are reduced once at the end. GEMM1 applies both global scales and act(gate) * up;
GEMM2 the down scale and the routing weight; rows are stored in pair order, so the caller's top-k sum
reads them as the GEMM path's. NVFP4 rows are read a whole 64-K block at a time from the repacked
layout (8 contiguous code words and a scale word per row and block) and decoded in registers by the
GEMM kernels' inline PTX; each decoded bf16x2 register is multiplied by the two x elements it holds,
so nothing is reordered into K order. configs.GEMV_CONFIGS has the measured crossovers.
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
    _gemm1_epilogue,
    _weight_rows,
)
from sglang.srt.layers.triton_ops.common import pdl_launch, pdl_start

_BLOCK_WORDS = tl.constexpr(FP4_BLOCK_WORDS)


@triton.jit
def _f32_halves(r):
    """A bf16x2 register (int32) as two fp32: its low and high elements (exact)."""
    return (r << 16).to(tl.float32, bitcast=True), (r & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _x_pairs(x_row, k0, lo, K, NB: tl.constexpr, EVEN_K: tl.constexpr):
    """x[k0 : k0 + 64 NB] in the shape of an FP4 step's words [1, NB, 8], as the fp32 operands of
    the four decoded registers: register j of a word holds its elements 2j (low) and 2j + 1 (high).
    Elements below lo (already taken by the previous step) or past K read as zero. Loaded once per
    step and shared by every row (and by GEMM1's gate and up)."""
    kb = tl.arange(0, NB)[None, :, None]
    w = tl.arange(0, 8)[None, None, :]
    # Four 4-byte loads a word (L1 hits after the first row): one 16-byte load split into the four
    # registers' layouts costs a round trip through shared memory and a barrier per step.
    pairs = x_row.to(tl.pointer_type(tl.int32)) + (k0 // 2 + kb * 32 + w * 4)
    if EVEN_K:
        p0, p1, p2, p3 = tl.load(pairs), tl.load(pairs + 1), tl.load(pairs + 2), tl.load(pairs + 3)
    else:
        k = k0 + kb * 64 + w * 8  # K % 16 == 0: a word is wholly inside K or wholly past it
        ok = (k >= lo) & (k < K)
        p0 = tl.load(pairs, mask=ok, other=0)
        p1 = tl.load(pairs + 1, mask=ok, other=0)
        p2 = tl.load(pairs + 2, mask=ok, other=0)
        p3 = tl.load(pairs + 3, mask=ok, other=0)
    x0, x1 = _f32_halves(p0)
    x2, x3 = _f32_halves(p1)
    x4, x5 = _f32_halves(p2)
    x6, x7 = _f32_halves(p3)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _fp4_tile_ptrs(w_rows, s_rows, NB: tl.constexpr):
    """Pointers of the first step's tile: NB whole 64-K blocks of rows [BN] (code words [BN, NB, 8],
    scale words [BN, NB, 1]); later steps add a scalar. Per row and block the 8 code words are
    contiguous: 16-byte loads, and every 32-byte sector read is used."""
    kb = tl.arange(0, NB)[None, :, None] * _BLOCK_WORDS
    return w_rows[:, :, None] + kb + tl.arange(0, 8)[None, None, :], s_rows[:, :, None] + kb


@triton.jit
def _fp4_load(word_ptrs, scale_ptrs, k0):
    off = (k0 // 64) * _BLOCK_WORDS
    return tl.load(word_ptrs + off), tl.load(scale_ptrs + off)


@triton.jit
def _fp4_mac(acc, words, scales, x0, x1, x2, x3, x4, x5, x6, x7):
    """acc [BN, NB, 8] += each word's 8 products with x: the decoded registers are never unpacked
    into K order; register j meets x elements 2j and 2j + 1 of its word (`_x_pairs`)."""
    w = tl.arange(0, 8)[None, None, :]
    selectors = ((w // 2) % 4) * 0x0101 + 0x4040  # the word's scale byte -> bytes 0 and 2
    r0, r1, r2, r3 = _fp4_decode_regs(words, tl.broadcast_to(scales, words.shape), selectors)
    w0, w1 = _f32_halves(r0)
    w2, w3 = _f32_halves(r1)
    w4, w5 = _f32_halves(r2)
    w6, w7 = _f32_halves(r3)
    # One fused multiply-add per weight (bf16 * bf16 is exact in fp32).
    acc += w0 * x0
    acc += w1 * x1
    acc += w2 * x2
    acc += w3 * x3
    acc += w4 * x4
    acc += w5 * x5
    acc += w6 * x6
    acc += w7 * x7
    return acc


@triton.jit
def _fp4_load_ab(a_w, a_s, b_w, b_s, k0, TWO: tl.constexpr):
    """One step's tiles of row sets a and b (b = a without TWO)."""
    aw, as_ = _fp4_load(a_w, a_s, k0)
    bw, bs = aw, as_
    if TWO:
        bw, bs = _fp4_load(b_w, b_s, k0)
    return aw, as_, bw, bs


@triton.jit
def _fp4_gemv(
    x_row, a_rows, a_srows, b_rows, b_srows, K,
    BN: tl.constexpr, NB: tl.constexpr, EVEN_K: tl.constexpr, TWO: tl.constexpr, PDL_AFTER_FIRST: tl.constexpr,
    DEPTH: tl.constexpr = 1,
):  # fmt: skip
    """Unscaled row sums (W_a x, W_b x) [BN] for FP4 row sets a and, with TWO, b (GEMM1's gate and
    up, sharing each step's x); without TWO the second is zero. The tiles of the next DEPTH (1-3)
    steps are in flight while a step multiplies (Triton's pipeliner leaves loads that do not feed a
    dot synchronous, so this is done by hand): with a few programs per SM, as at one token, a step's
    math is shorter than a memory round trip and the loop runs at one round trip per DEPTH steps.
    Weight loads carry no mask: every step's tile lies inside the K blocks (NB <= their count, see
    `_launch`); when K is not a whole number of steps the last one moves back to end at the last
    block and zeroes x where the step before it already went (a re-read of L1/L2-resident tiles);
    loads past the last step re-read it too.
    PDL_AFTER_FIRST: wait for the previous kernel (x) only once the first tiles are on their way."""
    a_w, a_s = _fp4_tile_ptrs(a_rows, a_srows, NB)
    b_w, b_s = _fp4_tile_ptrs(b_rows, b_srows, NB)
    acc_a = tl.zeros((BN, NB, 8), dtype=tl.float32)
    acc_b = tl.zeros((BN, NB, 8), dtype=tl.float32)
    step = 64 * NB
    last = (tl.cdiv(K, 64) - NB) * 64  # where the last step starts
    aw, as_, bw, bs = _fp4_load_ab(a_w, a_s, b_w, b_s, 0, TWO)
    aw1, as1, bw1, bs1 = aw, as_, bw, bs
    aw2, as2, bw2, bs2 = aw, as_, bw, bs
    if DEPTH >= 2:
        aw1, as1, bw1, bs1 = _fp4_load_ab(a_w, a_s, b_w, b_s, tl.minimum(step, last), TWO)
    if DEPTH >= 3:
        aw2, as2, bw2, bs2 = _fp4_load_ab(a_w, a_s, b_w, b_s, tl.minimum(2 * step, last), TWO)
    pdl_start(PDL_AFTER_FIRST)
    for k0 in range(0, K, step):
        naw, nas, nbw, nbs = _fp4_load_ab(a_w, a_s, b_w, b_s, tl.minimum(k0 + DEPTH * step, last), TWO)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_pairs(x_row, tl.minimum(k0, last), k0, K, NB, EVEN_K)
        acc_a = _fp4_mac(acc_a, aw, as_, x0, x1, x2, x3, x4, x5, x6, x7)
        if TWO:
            acc_b = _fp4_mac(acc_b, bw, bs, x0, x1, x2, x3, x4, x5, x6, x7)
        if DEPTH == 1:
            aw, as_, bw, bs = naw, nas, nbw, nbs
        elif DEPTH == 2:
            aw, as_, bw, bs = aw1, as1, bw1, bs1
            aw1, as1, bw1, bs1 = naw, nas, nbw, nbs
        else:
            aw, as_, bw, bs = aw1, as1, bw1, bs1
            aw1, as1, bw1, bs1 = aw2, as2, bw2, bs2
            aw2, as2, bw2, bs2 = naw, nas, nbw, nbs
    return tl.sum(tl.sum(acc_a, 2), 1), tl.sum(tl.sum(acc_b, 2), 1)


@triton.jit
def _bf16_step(acc, w_rows, x_row, k0, K, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """acc [BN, BK] += W[rows, k0:k0+BK] * x[k0:k0+BK], elementwise."""
    offs_k = k0 + tl.arange(0, BK)
    if EVEN_K:
        w = tl.load(w_rows + offs_k[None, :])
        x = tl.load(x_row + offs_k)
    else:
        w = tl.load(w_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
        x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0)
    return acc + w.to(tl.float32) * x.to(tl.float32)[None, :]


@triton.jit
def _gemv_rows(w_ptr, expert, offs_n, N, row_offset, stride_we, stride_wn, W_FP4: tl.constexpr):
    # Rows past N re-read row 0 (always there) and are dropped at the store: loads need no row mask.
    return _weight_rows(w_ptr, expert, tl.where(offs_n < N, offs_n, 0) + row_offset, stride_we, stride_wn, W_FP4)


@triton.jit
def moe_gemv1_kernel(
    x_ptr, w_ptr, gs_ptr, topk_ids_ptr, h_ptr, top_k, N, K,
    stride_xm, stride_we, stride_wn, stride_hm,
    BN: tl.constexpr, BK: tl.constexpr, W_FP4: tl.constexpr, ACT: tl.constexpr, HAS_GS: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr = False, DEPTH: tl.constexpr = 1,
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
    if W_FP4:
        g, u = _fp4_gemv(x_row, gate_w, gate_s, up_w, up_s, K, BN, BK // 64, EVEN_K, True, False, DEPTH)
    else:
        acc_g = tl.zeros((BN, BK), dtype=tl.float32)
        acc_u = tl.zeros((BN, BK), dtype=tl.float32)
        for k0 in range(0, K, BK):
            acc_g = _bf16_step(acc_g, gate_w, x_row, k0, K, BK, EVEN_K)
            acc_u = _bf16_step(acc_u, up_w, x_row, k0, K, BK, EVEN_K)
        g, u = tl.sum(acc_g, 1), tl.sum(acc_u, 1)
    row = tl.full((1,), pair, tl.int32)
    g = g[None, :]
    u = u[None, :]
    _gemm1_epilogue(g, u, expert, gs_ptr, h_ptr, row, offs_n, N, stride_hm, W_FP4, ACT, True, HAS_GS)


@triton.jit
def moe_gemv2_kernel(
    h_ptr, w_ptr, gs_ptr, topk_ids_ptr, topk_w_ptr, out_ptr, N, K,
    stride_hm, stride_we, stride_wn, stride_om,
    BN: tl.constexpr, BK: tl.constexpr, W_FP4: tl.constexpr, HAS_GS: tl.constexpr, EVEN_K: tl.constexpr,
    PDL: tl.constexpr = False, DEPTH: tl.constexpr = 1,
):  # fmt: skip
    """out[pair, n] = topk_w[pair] * gs_down * (h[pair] @ W_down^T)[n] for N columns [BN) of one pair.

    Under PDL the FP4 path reads the expert id and its first DEPTH weight tiles before waiting for h: this
    kernel follows GEMM1, which let it launch only after waiting for its own predecessor, so
    topk_ids (written before GEMM1) is complete, and no kernel writes the weights."""
    if not W_FP4:
        pdl_start(PDL)
    pid_n, pair = tl.program_id(0), tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    h_row = h_ptr + pair.to(tl.int64) * stride_hm
    offs_n = pid_n * BN + tl.arange(0, BN)
    w_rows, s_rows = _gemv_rows(w_ptr, expert, offs_n, N, 0, stride_we, stride_wn, W_FP4)
    if W_FP4:
        y, _ = _fp4_gemv(h_row, w_rows, s_rows, w_rows, s_rows, K, BN, BK // 64, EVEN_K, False, PDL, DEPTH)
    else:
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for k0 in range(0, K, BK):
            acc = _bf16_step(acc, w_rows, h_row, k0, K, BK, EVEN_K)
        y = tl.sum(acc, 1)
    scale = tl.load(topk_w_ptr + pair)
    if W_FP4:
        scale = scale * FP4_UNSCALE
    if HAS_GS:
        scale = scale * tl.load(gs_ptr + expert)
    y = y * scale
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def _launch(t: GemvTile, w_fp4: bool, k: int, device: torch.device) -> dict:
    block_k, stages = t.block_k, t.num_stages
    extra = {}
    if w_fp4:
        if block_k % 64 or block_k & (block_k - 1):
            raise ValueError(f"NVFP4 GEMV tiles step over a power of two of whole 64-K blocks; got block_k {block_k}")
        if not 1 <= stages <= 3:
            raise ValueError(f"NVFP4 GEMV tiles load 1-3 steps ahead (num_stages); got num_stages {stages}")
        while block_k > 64 and block_k > triton.cdiv(k, 64) * 64:
            block_k //= 2  # a step never reaches past the last block (its loads have no mask)
        # The steps ahead are loaded by hand (_fp4_gemv); Triton's pipeliner has nothing to do.
        extra, stages = dict(DEPTH=stages), 1
    return dict(BN=t.block_n, BK=block_k, EVEN_K=k % block_k == 0, num_warps=t.num_warps, num_stages=stages,
                **extra, **pdl_launch(device))


def moe_gemv1(x: torch.Tensor, w, topk_ids: torch.Tensor, act: int, t: GemvTile) -> torch.Tensor:
    """h [M * top_k, I] bf16 in pair order; w is a fused_moe.ExpertWeights."""
    num_pairs, top_k = topk_ids.numel(), topk_ids.shape[1]
    inter, hidden = w.inter, x.shape[1]
    if w.is_fp4 and (x.dtype != torch.bfloat16 or x.data_ptr() % 4):
        # Read as 4-byte bf16 pairs, so aligned bf16 it must be (the grouped kernels round x to bf16 too).
        x = x.to(torch.bfloat16, copy=True)
    h = torch.empty(num_pairs, inter, dtype=torch.bfloat16, device=x.device)
    gs = w.w13_scale_2 if w.w13_scale_2 is not None else w.w13
    moe_gemv1_kernel[(triton.cdiv(inter, t.block_n), num_pairs)](
        x, w.w13, gs, topk_ids.reshape(-1), h, top_k, inter, hidden,
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
        h, w.w2, gs, topk_ids.reshape(-1), topk_weights.reshape(-1).float(), out,
        hidden, inter, h.stride(0), w.w2.stride(0), w.w2.stride(1), out.stride(0),
        W_FP4=w.is_fp4, HAS_GS=w.w2_scale_2 is not None, **_launch(t, w.is_fp4, inter, h.device),
    )  # fmt: skip
    return out


def moe_gemv(x, w, topk_weights: torch.Tensor, topk_ids: torch.Tensor, act: int, cfg: MoeGemvConfig) -> torch.Tensor:
    """Weighted expert outputs [M * top_k, H] in pair order: row m * top_k + j is
    topk_weights[m, j] * expert_{topk_ids[m, j]}(x[m]). w is a fused_moe.ExpertWeights."""
    h = moe_gemv1(x, w, topk_ids, act, cfg.gemm1)
    return moe_gemv2(h, w, topk_ids, topk_weights, cfg.gemm2, x.dtype)
