"""Triton kernels for W4A16 (NVFP4) and bf16 fused MoE on Hopper/Ampere, plus the dense W4A16 GEMM.

Data flow for one MoE layer (M tokens, top-k, E experts, hidden H, intermediate I):
  1. `moe_align_kernel`: one program sorts the M*k (token, slot) pairs by expert into a padded list,
     every expert's run padded to a multiple of BLOCK_M, and maps each BLOCK_M block to its expert.
  2. `moe_gemm1_kernel`: per block, x[tokens] @ [gate; up]^T with the weights dequantised in registers,
     the two global scales applied in fp32, then act(gate) * up stored as bf16 in sorted order.
  3. `moe_gemm2_kernel`: per block, h @ down^T, times the down global scale and the routing weight,
     stored per (token, slot) pair; the caller sums over k (deterministic, no atomics on outputs).

FP4 decoding: an E2M1 code `s e e m` becomes an fp16 bit pattern with the sign at bit 15 and `e e m`
at bits 11..9, which is the E2M1 value times 2^-14 (the subnormal code 0.5 maps to an fp16 subnormal,
which fp16->fp32 conversion keeps exactly). The 2^14 is folded into the block scale, so
code * e4m3 scale is computed exactly in fp32 and is exact again in bf16 (<= 6 significant bits).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

ACT_GELU_TANH = 0
ACT_SILU = 1

# Triton's CPU interpreter multiplies bf16 tiles as raw integer bits; feed it fp32 copies instead
# (bf16 -> fp32 is exact, so the tested logic is unchanged).
_DOT_IN_FP32 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# sqrt(2 / pi), for the tanh form of GELU.
_GELU_C = tl.constexpr(0.7978845608028654)


@triton.jit
def _e2m1_times_2p14_inv(code):
    """E2M1 codes (int32 in [0, 16)) -> fp32 value * 2^-14, exactly."""
    bits = ((code & 0x7) << 9) | ((code & 0x8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_weight_tile(w_rows, s_rows, k0, K, n_mask, BN: tl.constexpr, BK: tl.constexpr, W_FP4: tl.constexpr):
    """Rows [BN] of a weight [N, K] as a bf16 tile [BN, BK] starting at column k0.

    w_rows / s_rows point at the start of each row (packed bytes / e4m3 block scales for FP4).
    Columns past K (and rows masked out) read as zero.
    """
    if W_FP4:
        offs_b = k0 // 2 + tl.arange(0, BK // 2)
        packed = tl.load(w_rows + offs_b[None, :], mask=n_mask & (offs_b[None, :] < K // 2), other=0)
        offs_s = k0 // 16 + tl.arange(0, BK // 16)
        scale = tl.load(s_rows + offs_s[None, :], mask=n_mask & (offs_s[None, :] < K // 16), other=0.0)
        scale = scale.to(tl.float32) * 16384.0
        # One scale covers 16 elements = 8 packed bytes; broadcast it over its bytes. (Loading it
        # once per byte instead, to share the packed tile's layout, measured 2x slower on H200.)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BN, BK // 16, 8)), (BN, BK // 2))
        packed = packed.to(tl.int32)
        lo = (_e2m1_times_2p14_inv(packed & 0xF) * scale).to(tl.bfloat16)
        hi = (_e2m1_times_2p14_inv(packed >> 4) * scale).to(tl.bfloat16)
        # Element 2i is the low nibble, 2i+1 the high one: interleave along K.
        w = tl.reshape(tl.join(lo, hi), (BN, BK))
    else:
        offs_k = k0 + tl.arange(0, BK)
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask & (offs_k[None, :] < K), other=0.0)
        w = w.to(tl.bfloat16)
    return w


@triton.jit
def _mma(acc, a, w, SWAP_AB: tl.constexpr):
    """acc += a @ w^T, or acc^T += w @ a^T when SWAP_AB (weights fill the MMA's wide M side)."""
    if _DOT_IN_FP32:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    if SWAP_AB:
        acc = tl.dot(w, tl.trans(a), acc)
    else:
        acc = tl.dot(a, tl.trans(w), acc)
    return acc


@triton.jit
def _zero_acc(BM: tl.constexpr, BN: tl.constexpr, SWAP_AB: tl.constexpr):
    if SWAP_AB:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    return acc


@triton.jit
def _finish_acc(acc, SWAP_AB: tl.constexpr):
    """Accumulator in [BM, BN] orientation."""
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _activation(g, ACT: tl.constexpr):
    # gelu_tanh(g) = 0.5 g (1 + tanh(z)) = g * sigmoid(2z); silu(g) = g * sigmoid(g).
    if ACT == 0:
        z = 2.0 * _GELU_C * (g + 0.044715 * g * g * g)
    else:
        z = g
    return g / (1.0 + tl.exp(-z))


@triton.jit
def moe_align_kernel(
    topk_ids_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    cursor_ptr,
    num_pairs,
    max_slots,
    max_blocks,
    num_experts,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_CHUNK: tl.constexpr,
):
    """Single program: counting sort of the (token, slot) pairs by expert, runs padded to BLOCK_M.

    Outputs: sorted_ids[max_slots] (pair index, or num_pairs for padding), block_expert[max_blocks]
    (-1 past the end), num_padded[1]. cursor[NUM_BINS] is scratch. Pair order inside an expert's run
    depends on atomics, which changes no result: every GEMM row is computed independently.
    """
    bins = tl.arange(0, NUM_BINS)
    counts = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=0)
        counts += tl.histogram(ids, NUM_BINS)
    # Masked-off lanes of the last chunk were counted in bin 0; remove them.
    pad_lanes = tl.cdiv(num_pairs, CHUNK) * CHUNK - num_pairs
    counts -= tl.where(bins == 0, pad_lanes, 0)
    counts = tl.where(bins < num_experts, counts, 0)

    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    total = tl.sum(padded, 0)
    tl.store(cursor_ptr + bins, starts)
    tl.store(num_padded_ptr, total)

    # Block b belongs to the first expert whose run ends after slot b * BLOCK_M.
    for bstart in range(0, max_blocks, BLOCK_CHUNK):
        blk = bstart + tl.arange(0, BLOCK_CHUNK)
        slot = blk * BLOCK_M
        owner = tl.sum((ends[None, :] <= slot[:, None]).to(tl.int32), 1)
        owner = tl.where(slot < total, owner, -1)
        tl.store(block_expert_ptr + blk, owner, mask=blk < max_blocks)

    for sstart in range(0, max_slots, CHUNK):
        offs = sstart + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + offs, tl.zeros((CHUNK,), dtype=tl.int32) + num_pairs, mask=offs < max_slots)
    # The cursor stores and sentinel fills above must land before the scatter below.
    tl.debug_barrier()

    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        valid = offs < num_pairs
        ids = tl.load(topk_ids_ptr + offs, mask=valid, other=0)
        pos = tl.atomic_add(cursor_ptr + ids, 1, mask=valid)
        tl.store(sorted_ids_ptr + pos, offs, mask=valid)


@triton.jit
def moe_gemm1_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    h_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_pairs,
    top_k,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_hm,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    W_FP4: tl.constexpr,
    ACT: tl.constexpr,
    SWAP_AB: tl.constexpr,
    FUSE_ACT: tl.constexpr = True,
    HAS_GS: tl.constexpr = True,
):
    """h[slot, n] = act(gs_gate * x W_gate^T) * (gs_up * x W_up^T) for one [BM, BN] tile.

    w: [E, 2N, K] (bf16) or [E, 2N, K/2] (packed FP4) with gate rows [0, N), up rows [N, 2N).
    FUSE_ACT=False instead stores the scaled gate and up as h[slot, n] and h[slot, N + n] (h is then
    [slots, 2N]) for a separate activation pass; kept to measure what the fusion saves.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if pid_m * BM >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)

    slots = pid_m * BM + tl.arange(0, BM)
    pairs = tl.load(sorted_ids_ptr + slots)
    valid = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    a_rows = x_ptr + tokens[:, None] * stride_xm

    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = (offs_n < N)[:, None]
    gate_w = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    up_w = gate_w + N * stride_wn
    gate_s = s_ptr + expert * stride_se + offs_n[:, None].to(tl.int64) * stride_sn
    up_s = gate_s + N * stride_sn

    acc_g = _zero_acc(BM, BN, SWAP_AB)
    acc_u = _zero_acc(BM, BN, SWAP_AB)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(a_rows + offs_k[None, :], mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
        a = a.to(tl.bfloat16)
        wg = _load_weight_tile(gate_w, gate_s, k0, K, n_mask, BN, BK, W_FP4)
        acc_g = _mma(acc_g, a, wg, SWAP_AB)
        wu = _load_weight_tile(up_w, up_s, k0, K, n_mask, BN, BK, W_FP4)
        acc_u = _mma(acc_u, a, wu, SWAP_AB)
    g = _finish_acc(acc_g, SWAP_AB)
    u = _finish_acc(acc_u, SWAP_AB)
    if HAS_GS:
        # Gate and up carry their own global scales; keep both exact in fp32.
        g = g * tl.load(gs_ptr + expert * 2)
        u = u * tl.load(gs_ptr + expert * 2 + 1)
    h_ptrs = h_ptr + slots[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    if FUSE_ACT:
        h = _activation(g, ACT) * u
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=(offs_n < N)[None, :])
    else:
        tl.store(h_ptrs, g.to(h_ptr.dtype.element_ty), mask=(offs_n < N)[None, :])
        tl.store(h_ptrs + N, u.to(h_ptr.dtype.element_ty), mask=(offs_n < N)[None, :])


@triton.jit
def moe_gemm2_kernel(
    h_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    topk_w_ptr,
    out_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_pairs,
    N,
    K,
    stride_hm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_om,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    W_FP4: tl.constexpr,
    SWAP_AB: tl.constexpr,
    HAS_GS: tl.constexpr = True,
):
    """out[pair, n] = topk_w[pair] * gs_down * (h[slot] @ W_down^T)[n]; h rows are in sorted order."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if pid_m * BM >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)

    slots = pid_m * BM + tl.arange(0, BM)
    pairs = tl.load(sorted_ids_ptr + slots)
    valid = pairs < num_pairs
    a_rows = h_ptr + slots[:, None].to(tl.int64) * stride_hm

    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = (offs_n < N)[:, None]
    w_rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    s_rows = s_ptr + expert * stride_se + offs_n[:, None].to(tl.int64) * stride_sn

    acc = _zero_acc(BM, BN, SWAP_AB)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(a_rows + offs_k[None, :], mask=offs_k[None, :] < K, other=0.0).to(tl.bfloat16)
        w = _load_weight_tile(w_rows, s_rows, k0, K, n_mask, BN, BK, W_FP4)
        acc = _mma(acc, a, w, SWAP_AB)
    y = _finish_acc(acc, SWAP_AB)
    row_scale = tl.load(topk_w_ptr + pairs, mask=valid, other=0.0)
    if HAS_GS:
        row_scale = row_scale * tl.load(gs_ptr + expert)
    y = y * row_scale[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < N)[None, :])


@triton.jit
def dense_w4a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    gs_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    W_FP4: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """y = (x @ dequant(W)^T) * weight_scale_2 for a dense [N, K] weight (FP4 or bf16)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n

    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    a_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = (offs_n < N)[:, None]
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    s_rows = s_ptr + offs_n[:, None].to(tl.int64) * stride_sn

    acc = _zero_acc(BM, BN, SWAP_AB)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _load_weight_tile(w_rows, s_rows, k0, K, n_mask, BN, BK, W_FP4)
        acc = _mma(acc, a.to(tl.bfloat16), w, SWAP_AB)
    y = _finish_acc(acc, SWAP_AB)
    if W_FP4:
        y = y * tl.load(gs_ptr)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])


@triton.jit
def moe_count_kernel(topk_ids_ptr, counts_ptr, num_pairs, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Large-batch align, step 1: per-program histogram added into counts[NUM_BINS] (zeroed)."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    valid = offs < num_pairs
    ids = tl.load(topk_ids_ptr + offs, mask=valid, other=0)
    hist = tl.histogram(ids, NUM_BINS)
    hist -= tl.where(tl.arange(0, NUM_BINS) == 0, CHUNK - tl.sum(valid.to(tl.int32), 0), 0)
    tl.atomic_add(counts_ptr + tl.arange(0, NUM_BINS), hist)


@triton.jit
def moe_offsets_kernel(
    counts_ptr, cursor_ptr, block_expert_ptr, num_padded_ptr, max_blocks, num_experts,
    BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_CHUNK: tl.constexpr,
):  # fmt: skip
    """Large-batch align, step 2 (one program): padded run starts, block -> expert map."""
    bins = tl.arange(0, NUM_BINS)
    counts = tl.load(counts_ptr + bins)
    counts = tl.where(bins < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    tl.store(cursor_ptr + bins, ends - padded)
    tl.store(num_padded_ptr, total)
    for bstart in range(0, max_blocks, BLOCK_CHUNK):
        blk = bstart + tl.arange(0, BLOCK_CHUNK)
        slot = blk * BLOCK_M
        owner = tl.sum((ends[None, :] <= slot[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blk, tl.where(slot < total, owner, -1), mask=blk < max_blocks)


@triton.jit
def moe_scatter_kernel(topk_ids_ptr, cursor_ptr, sorted_ids_ptr, num_pairs, CHUNK: tl.constexpr):
    """Large-batch align, step 3: each pair takes the next free slot of its expert's run."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    valid = offs < num_pairs
    ids = tl.load(topk_ids_ptr + offs, mask=valid, other=0)
    pos = tl.atomic_add(cursor_ptr + ids, 1, mask=valid)
    tl.store(sorted_ids_ptr + pos, offs, mask=valid)


@triton.jit
def fp4_dequant_kernel(w_ptr, s_ptr, out_ptr, num_rows, K, BR: tl.constexpr, BB: tl.constexpr):
    """out[r, :] = e2m1(codes) * block_scale in bf16 (exact), for rows [num_rows, K/2] of packed codes.

    The global scale is left out on purpose: the GEMM epilogue applies it in fp32, as on the FP4 path.
    """
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    offs_b = tl.program_id(1) * BB + tl.arange(0, BB)
    mask = (rows < num_rows)[:, None] & (offs_b < K // 2)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    packed = tl.load(w_ptr + rows64 * (K // 2) + offs_b[None, :], mask=mask, other=0).to(tl.int32)
    scale = tl.load(s_ptr + rows64 * (K // 16) + offs_b[None, :] // 8, mask=mask, other=0.0)
    scale = scale.to(tl.float32) * 16384.0
    lo = (_e2m1_times_2p14_inv(packed & 0xF) * scale).to(tl.bfloat16)
    hi = (_e2m1_times_2p14_inv(packed >> 4) * scale).to(tl.bfloat16)
    out = tl.reshape(tl.join(lo, hi), (BR, 2 * BB))
    offs_k = 2 * tl.program_id(1) * BB + tl.arange(0, 2 * BB)
    out_mask = (rows < num_rows)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + rows64 * K + offs_k[None, :], out, mask=out_mask)
