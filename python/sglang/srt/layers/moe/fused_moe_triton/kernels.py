"""Triton kernels for W4A16 (NVFP4) and bf16 fused MoE on Hopper/Ampere, plus the dense W4A16 GEMM.

Data flow for one MoE layer (M tokens, top-k, E experts, hidden H, intermediate I):
  1. `moe_align_kernel`: one program sorts the M*k (token, slot) pairs by expert into a padded list,
     every expert's run padded to a multiple of BLOCK_M, and maps each BLOCK_M block to its expert.
  2. `moe_gemm1_kernel`: per block, x[tokens] @ [gate; up]^T with the weights dequantised in registers,
     the two global scales applied in fp32, then act(gate) * up stored as bf16 in sorted order.
     Split-K (few tokens, so few programs): SPLIT_K programs per tile each cover a slice of K and
     store their raw fp32 accumulators per pair; `moe_gemm1_reduce_kernel` sums the slices in a fixed
     order and runs the same epilogue.
  3. `moe_gemm2_kernel`: per block, h @ down^T, times the down global scale and the routing weight,
     stored per (token, slot) pair; the caller sums over k (deterministic, no atomics on outputs).

MoE FP4 weights are repacked once at load time (`fused_moe.prepare_nvfp4_experts`):
- codes: one int32 word per 8 consecutive K elements, the 32 bits permuted (FP4_WORD_BITS) so that
  four cheap ops give four bf16x2 registers whose bf16 bit patterns are code * 2^-126: the E2M1
  magnitude bits `e e m` sit at bf16 bits 8..6 (exponent LSBs, mantissa MSB) and the sign at bit 15,
  so 0.5 is a bf16 subnormal and 1..6 are normal numbers, all exact;
- block scales: one byte b per 16 elements with bf16 bits (16 b + 235 * 128) == scale * 2^117
  (5 exponent + 3 mantissa bits: every e4m3 value from 2^-9 to 448 fits; zero-scale blocks have their
  codes zeroed at load, negative scales flip the codes' signs), four per int32 scale word. One
  bf16x2 multiply then gives code * scale * 2^-9 exactly (<= 6 significant bits); the GEMM epilogue
  multiplies the fp32 accumulator by global_scale * 2^9;
- blocks: each group of 16 rows x 64 K elements is one contiguous 576-byte block of 144 words (the 16
  rows' 8 code words, row-major, then their 16 scale words), blocks ordered [row group][K chunk]
  (K padded to a multiple of 64). A tile step thus reads a few contiguous runs of 576 * BK/64 bytes,
  codes and scales together, instead of BK/2 bytes from each of BN rows.
On the GPU the decode is inline PTX (14 instructions per 8 weights); the Triton interpreter (CPU CI)
runs the same bit operations as Triton code. Every load is >= 32 bits wide and the main K loops carry
no K mask, so Triton pipelines all tile loads as cp.async (it leaves narrower loads synchronous); a
masked tail step handles K % BK.

The dense kernel (`dense_w4a16_kernel`) reads the checkpoint layout as is (`_load_ckpt_fp4_tile`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import pdl_start

ACT_GELU_TANH = 0
ACT_SILU = 1

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# Triton's CPU interpreter multiplies bf16 tiles as raw integer bits; feed it fp32 copies instead
# (bf16 -> fp32 is exact, so the tested logic is unchanged).
_DOT_IN_FP32 = _INTERPRET

# sqrt(2 / pi), for the tanh form of GELU.
_GELU_C = tl.constexpr(0.7978845608028654)

# FP4_WORD_BITS[j][b]: the bit of a repacked word holding bit b (0: mantissa, 1-2: exponent, 3: sign)
# of the word's element j (K offset j within its 8). It is the layout that these four ops decode:
#   r0 = w & MASK, r1 = rotl(w, 10) & MASK, r2 = rotl(w, 13) & MASK, r3 = ((w & 0x001B001B) * 4228) & MASK
# with MASK = 0x81C081C0 (bf16 bits 8..6 and 15 of both halves); r_i holds elements 2i (low half)
# and 2i + 1 (high half). The multiply copies the 8 bits of 0x001B001B to their places without carries.
FP4_WORD_BITS = (
    (6, 7, 8, 15), (22, 23, 24, 31), (28, 29, 30, 5), (12, 13, 14, 21),
    (25, 26, 27, 2), (9, 10, 11, 18), (4, 0, 1, 3), (20, 16, 17, 19),
)  # fmt: skip
# bf16 bits of scale * 2^117 = 16 * encoded byte + FP4_SCALE_BIAS; the kernels' fp32 epilogue
# multiplies by FP4_UNSCALE to undo the 2^-9 left in the decoded weights.
FP4_SCALE_BIAS = 235 << 7
_FP4_SCALE_BIAS = tl.constexpr(FP4_SCALE_BIAS)
FP4_UNSCALE = tl.constexpr(512.0)
# Block of 16 rows x 64 K elements: 16 * 8 code words (offset 8 r + j), then 16 scale words (128 + r).
FP4_BLOCK_ROWS = 16
FP4_BLOCK_WORDS = 144
# Host table read by `_fp4_scale_selectors` (length: the largest BK / 8 a kernel may use).
FP4_SCALE_BYTE = tuple((w // 2) % 4 for w in range(64))
_SCALE_BYTE_TABLES: dict[torch.device, torch.Tensor] = {}


def check_fp4_block_k(block_k: int) -> None:
    """FP4 tiles step over whole 64-K blocks, and `_fp4_scale_selectors` reads one table byte per word."""
    if block_k % 64 or block_k > 8 * len(FP4_SCALE_BYTE):
        raise ValueError(f"NVFP4 tiles need block_k a multiple of 64 and <= {8 * len(FP4_SCALE_BYTE)}, got {block_k}")


def scale_byte_table(device: torch.device) -> torch.Tensor:
    """FP4_SCALE_BYTE as the uint8 tensor the kernels read, one per device."""
    if device not in _SCALE_BYTE_TABLES:
        _SCALE_BYTE_TABLES[device] = torch.tensor(FP4_SCALE_BYTE, dtype=torch.uint8, device=device)
    return _SCALE_BYTE_TABLES[device]


# One code word, its scale word and a PRMT selector copying the word's scale byte to bytes 0 and 2
# -> the word's 4 bf16x2 registers as 4 int32 ($0..$3; inputs $4 word, $5 scale word, $6 selector).
# Elementwise in Triton's sense: each output depends on its own inputs only, whatever the layout.
# The products are `fma.rn.bf16x2` with a -0.0 addend, the same bits as a multiply (exact products;
# -0 keeps a zero product's sign), because `mul.bf16x2` needs sm_90 and the FMA runs on sm_80 too
# (ptxas on sm_90 emits HFMA2/HMUL2.BF16 for either).
_FP4_DECODE_ASM = tl.constexpr("""
{
.reg .b32 s, r, z;
mov.b32 z, 0x80008000;
prmt.b32 s, $5, 0, $6;
mad.lo.u32 s, s, 16, 0x75807580;
and.b32 r, $4, 0x81C081C0;
fma.rn.bf16x2 $0, r, s, z;
shf.l.wrap.b32 r, $4, $4, 10;
and.b32 r, r, 0x81C081C0;
fma.rn.bf16x2 $1, r, s, z;
shf.l.wrap.b32 r, $4, $4, 13;
and.b32 r, r, 0x81C081C0;
fma.rn.bf16x2 $2, r, s, z;
and.b32 r, $4, 0x001B001B;
mul.lo.u32 r, r, 4228;
and.b32 r, r, 0x81C081C0;
fma.rn.bf16x2 $3, r, s, z;
}
""")


@triton.jit
def _bf16x2_times(r, scale):
    """Interpreter mirror of `mul.rn.bf16x2 r, scale` (exact here): fp32 multiply, bf16 pair back."""
    lo = ((r & 0xFFFF) << 16).to(tl.float32, bitcast=True) * scale  # code * 2^-126 * scale * 2^117
    hi = (r & 0xFFFF0000).to(tl.float32, bitcast=True) * scale
    lo = lo.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    hi = hi.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    return (lo | (hi << 16)).to(tl.int32, bitcast=True)


@triton.jit
def _fp4_decode_bits(w, sw, selector):
    """The inline-PTX decode in Triton ops (interpreter path): the same four bf16x2 bit patterns."""
    u = w.to(tl.uint32, bitcast=True)
    mask = tl.full((), 0x81C081C0, tl.uint32)
    s = (sw >> (8 * (selector & 0xF))) & 0xFF
    scale = ((s.to(tl.uint32) * 16 + _FP4_SCALE_BIAS) << 16).to(tl.float32, bitcast=True)  # scale * 2^117
    r0 = _bf16x2_times(u & mask, scale)
    r1 = _bf16x2_times(((u << 10) | (u >> 22)) & mask, scale)
    r2 = _bf16x2_times(((u << 13) | (u >> 19)) & mask, scale)
    r3 = _bf16x2_times(((u & 0x001B001B) * 4228) & mask, scale)
    return r0, r1, r2, r3


@triton.jit
def _halves(r):
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True), (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fp4_decode_regs(words, scale_words, selectors):
    """Code words, each word's scale word (int32, repacked layout, same shape) and the selectors of
    `_fp4_scale_selectors` (broadcast along the last axis) -> four int32 tensors of that shape:
    register i of a word holds its elements 2i (low half) and 2i + 1 as bf16 code * scale * 2^-9."""
    if _INTERPRET:
        r0, r1, r2, r3 = _fp4_decode_bits(words, scale_words, selectors)
    else:
        r0, r1, r2, r3 = tl.inline_asm_elementwise(
            _FP4_DECODE_ASM, "=r,=r,=r,=r,r,r,r", [words, scale_words, selectors],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
        )  # fmt: skip
    return r0, r1, r2, r3


@triton.jit
def _fp4_decode(words, scale_words, selectors, BN: tl.constexpr, BK: tl.constexpr):
    """Code words [BN, BK/8], each word's scale word [BN, BK/8] (int32, repacked layout) and the
    selectors of `_fp4_scale_selectors` [BK/8] -> bf16 [BN, BK] = code * scale * 2^-9."""
    r0, r1, r2, r3 = _fp4_decode_regs(words, scale_words, selectors[None, :])
    l0, h0 = _halves(r0)
    l1, h1 = _halves(r1)
    l2, h2 = _halves(r2)
    l3, h3 = _halves(r3)
    # Register i = 2 a + b holds elements 2i (low half) and 2i + 1: [BN, BK/8, a, b, half] is K order.
    lo = tl.join(tl.join(l0, l2), tl.join(l1, l3))
    hi = tl.join(tl.join(h0, h2), tl.join(h1, h3))
    return tl.reshape(tl.join(lo, hi), (BN, BK))


@triton.jit
def _weight_rows(w_ptr, expert, offs_n, stride_we, stride_wn, W_FP4: tl.constexpr):
    """Per-row base pointers [BN, 1] for rows offs_n of one expert's weight: (code rows, scale rows).

    FP4 (blocked layout): stride_wn is the size of a row group (words); bf16: the row stride, and the
    second pointer is unused."""
    if W_FP4:
        group = w_ptr + expert * stride_we + (offs_n // 16)[:, None].to(tl.int64) * stride_wn
        r = (offs_n % 16)[:, None]
        return group + 8 * r, group + 128 + r
    rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    return rows, rows


@triton.jit
def _group_steps(N, pid_n, num_k, BN: tl.constexpr, GROUP_N: tl.constexpr):
    """Loop length of tile group pid_n: its tiles (the last group may be short) x num_k K steps."""
    return tl.minimum(GROUP_N, tl.cdiv(N, BN) - pid_n * GROUP_N) * num_k


@triton.jit
def _group_step(i, num_k, offs_n, BN: tl.constexpr, BK: tl.constexpr):
    """Step i of a group's loop -> (tile index, K offset, the tile's columns). Addresses derive from i
    alone (the loop carries only accumulators), so the pipeliner can issue later tiles' loads early."""
    t = i // num_k
    return t, (i - t * num_k) * BK, offs_n + t * BN


@triton.jit
def _later_tile_rows(rows, t, BN: tl.constexpr, stride_wn, W_FP4: tl.constexpr):
    """`_weight_rows` pointers moved t tiles of BN rows on (FP4: BN / 16 row groups a tile)."""
    if W_FP4:
        return rows + (t * (BN // 16)).to(tl.int64) * stride_wn
    return rows + (t * BN).to(tl.int64) * stride_wn


@triton.jit
def _load_weight_tile(
    w_rows, s_rows, selectors, k0, K, n_mask,
    BN: tl.constexpr, BK: tl.constexpr, W_FP4: tl.constexpr, MASK_K: tl.constexpr,
):  # fmt: skip
    """Rows [BN] of a weight [N, K] as a bf16 tile [BN, BK] starting at column k0.

    FP4 (BK a multiple of 64): w_rows / s_rows from `_weight_rows`; selectors from
    `_fp4_scale_selectors`; the tile is scaled by 2^-9. A row's scale word is loaded once per 64-K
    block and broadcast to its 8 code words: Triton still lays the decode out in the MMA operand's
    registers, and the copies into shared memory drop from one per code word to one per row
    (H100: 10 -> 6.5 KB a GEMM1 stage, the layer 13-15% faster at 16-64 tokens). Without MASK_K the
    caller guarantees k0 + BK <= K; masked columns read as zero.
    """
    if W_FP4:
        offs_w = k0 // 8 + tl.arange(0, BK // 8)
        chunk = (offs_w // 8) * 144
        offs_c = k0 // 64 + tl.arange(0, BK // 64)
        if MASK_K:
            k_mask = n_mask & (offs_w[None, :] < (K + 63) // 64 * 8)
            words = tl.load(w_rows + (chunk + offs_w % 8)[None, :], mask=k_mask, other=0)
            scales = tl.load(s_rows + (offs_c * 144)[None, :], mask=n_mask & (offs_c[None, :] < (K + 63) // 64), other=0)
        else:
            words = tl.load(w_rows + (chunk + offs_w % 8)[None, :], mask=n_mask, other=0)
            scales = tl.load(s_rows + (offs_c * 144)[None, :], mask=n_mask, other=0)
        scales = tl.reshape(tl.broadcast_to(scales[:, :, None], (BN, BK // 64, 8)), (BN, BK // 8))
        w = _fp4_decode(words, scales, selectors, BN, BK)
    else:
        offs_k = k0 + tl.arange(0, BK)
        if MASK_K:
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask & (offs_k[None, :] < K), other=0.0)
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask, other=0.0)
        w = w.to(tl.bfloat16)
    return w


@triton.jit
def _fp4_scale_selectors(table_ptr, BK: tl.constexpr, W_FP4: tl.constexpr):
    """PRMT selectors copying word w's scale byte, (w // 2) % 4 of its scale word, to bytes 0 and 2
    (bytes 1 and 3 zero), for w < BK/8; computed once per program, outside the K loop.

    The byte index is read from a small uint8 table (FP4_SCALE_BYTE) rather than computed from
    tl.arange: Triton derives the MMA operand layout from the narrowest load feeding it, and this
    8-bit load makes it give each thread whole code words (kWidth 8), so the decode lands in the MMA
    registers without a pass through shared memory (an arange-derived index also blocks that)."""
    if W_FP4:
        byte = tl.load(table_ptr + tl.arange(0, BK // 8)).to(tl.int32)
    else:
        byte = tl.zeros((BK // 8,), tl.int32)
    return byte * 0x0101 + 0x4040


@triton.jit
def _load_act_tile(a_rows, row_mask, k0, K, BK: tl.constexpr, MASK_K: tl.constexpr):
    offs_k = k0 + tl.arange(0, BK)
    if MASK_K:
        a = tl.load(a_rows + offs_k[None, :], mask=row_mask[:, None] & (offs_k[None, :] < K), other=0.0)
    else:
        a = tl.load(a_rows + offs_k[None, :], mask=row_mask[:, None], other=0.0)
    return a.to(tl.bfloat16)


@triton.jit
def _e2m1_times_2p14_inv(code):
    """Checkpoint-layout E2M1 codes (int32 in [0, 16)) -> fp32 value * 2^-14, exactly: `s e e m`
    becomes an fp16 pattern with the sign at bit 15 and `e e m` at bits 11..9."""
    bits = ((code & 0x7) << 9) | ((code & 0x8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_ckpt_fp4_tile(w_rows, s_rows, k0, K, n_mask, BN: tl.constexpr, BK: tl.constexpr):
    """Dense-kernel weight tile in the checkpoint layout (uint8 [N, K/2], e4m3 [N, K/16]) -> bf16 [BN, BK]."""
    offs_b = k0 // 2 + tl.arange(0, BK // 2)
    packed = tl.load(w_rows + offs_b[None, :], mask=n_mask & (offs_b[None, :] < K // 2), other=0)
    offs_s = k0 // 16 + tl.arange(0, BK // 16)
    scale = tl.load(s_rows + offs_s[None, :], mask=n_mask & (offs_s[None, :] < K // 16), other=0.0)
    scale = scale.to(tl.float32) * 16384.0
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BN, BK // 16, 8)), (BN, BK // 2))
    packed = packed.to(tl.int32)
    lo = (_e2m1_times_2p14_inv(packed & 0xF) * scale).to(tl.bfloat16)
    hi = (_e2m1_times_2p14_inv(packed >> 4) * scale).to(tl.bfloat16)
    # Element 2i is the low nibble, 2i+1 the high one: interleave along K.
    return tl.reshape(tl.join(lo, hi), (BN, BK))


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


# Arguments that follow the token count (num_pairs, max_slots, max_blocks) are not specialised on: Triton
# would compile a variant per class (divisible by 16, equal to 1, other), and the warm-up's even prefill
# sizes would leave an odd-length prefill to compile its MoE kernels while serving.
@triton.jit(do_not_specialize=("num_pairs", "max_slots", "max_blocks"))
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
    PDL: tl.constexpr = False,
):
    """Single program: counting sort of the (token, slot) pairs by expert, runs padded to BLOCK_M.

    Outputs: sorted_ids[max_slots] (pair index, or num_pairs for padding), block_expert[max_blocks]
    (-1 past the end), num_padded[1]. cursor[NUM_BINS] is scratch. Pair order inside an expert's run
    depends on atomics, which changes no result: every GEMM row is computed independently.
    """
    pdl_start(PDL)
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
        _scatter_pairs(topk_ids_ptr, cursor_ptr, sorted_ids_ptr, start + tl.arange(0, CHUNK), num_pairs)


@triton.jit
def _scatter_pairs(topk_ids_ptr, cursor_ptr, sorted_ids_ptr, offs, num_pairs):
    """Pairs `offs` take the next free slot of their expert's run (cursor holds each run's next slot)."""
    valid = offs < num_pairs
    ids = tl.load(topk_ids_ptr + offs, mask=valid, other=0)
    pos = tl.atomic_add(cursor_ptr + ids, 1, mask=valid)
    tl.store(sorted_ids_ptr + pos, offs, mask=valid)


@triton.jit
def _gemm1_step(
    acc_g, acc_u, a_rows, valid, gate_w, up_w, gate_s, up_s, selectors, k0, K, n_mask,
    BN: tl.constexpr, BK: tl.constexpr, W_FP4: tl.constexpr, SWAP_AB: tl.constexpr, MASK_K: tl.constexpr,
):  # fmt: skip
    a = _load_act_tile(a_rows, valid, k0, K, BK, MASK_K)
    wg = _load_weight_tile(gate_w, gate_s, selectors, k0, K, n_mask, BN, BK, W_FP4, MASK_K)
    acc_g = _mma(acc_g, a, wg, SWAP_AB)
    wu = _load_weight_tile(up_w, up_s, selectors, k0, K, n_mask, BN, BK, W_FP4, MASK_K)
    acc_u = _mma(acc_u, a, wu, SWAP_AB)
    return acc_g, acc_u


@triton.jit
def _tile_ids(N, BN: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's (block, N tile, K slice). Slices of one tile are neighbours in launch order (they
    share the activation rows); blocks are outermost, so the unused ones past num_padded come last."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    return pid // (SPLIT_K * num_n), (pid // SPLIT_K) % num_n, pid % SPLIT_K


@triton.jit
def _block_pairs(sorted_ids_ptr, pid_m, num_pairs, BM: tl.constexpr):
    """Block pid_m's slots [BM], their (token, slot) pairs and which of them are real (not padding)."""
    slots = pid_m * BM + tl.arange(0, BM)
    pairs = tl.load(sorted_ids_ptr + slots)
    return slots, pairs, pairs < num_pairs


@triton.jit
def _gemm1_epilogue(
    g, u, expert, gs_ptr, h_ptr, slots, offs_n, N, stride_hm,
    W_FP4: tl.constexpr, ACT: tl.constexpr, FUSE_ACT: tl.constexpr, HAS_GS: tl.constexpr,
):  # fmt: skip
    """Gate and up accumulators [BM, BN] (fp32, unscaled) -> h rows `slots`, columns offs_n."""
    if W_FP4:
        g = g * FP4_UNSCALE
        u = u * FP4_UNSCALE
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


@triton.jit(do_not_specialize=("num_pairs",))
def moe_gemm1_kernel(
    x_ptr,
    w_ptr,
    tbl_ptr,
    gs_ptr,
    h_ptr,
    ws_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_pairs,
    top_k,
    N,
    K,
    k_split,
    stride_xm,
    stride_we,
    stride_wn,
    stride_hm,
    stride_ws_split,
    stride_ws_pair,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    W_FP4: tl.constexpr,
    ACT: tl.constexpr,
    SWAP_AB: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
    GROUP_N: tl.constexpr = 1,
    FUSE_ACT: tl.constexpr = True,
    HAS_GS: tl.constexpr = True,
    PDL: tl.constexpr = False,
):
    """h[slot, n] = act(gs_gate * x W_gate^T) * (gs_up * x W_up^T) for one [BM, BN] tile.

    w: [E, 2N, K] (bf16) or FP4 blocks (see the module docstring), gate rows [0, N), up rows [N, 2N).
    FUSE_ACT=False instead stores the scaled gate and up as h[slot, n] and h[slot, N + n] (h is then
    [slots, 2N]) for a separate activation pass; kept to measure what the fusion saves.

    SPLIT_K > 1: program s of a tile covers K columns [s * k_split, min((s + 1) * k_split, K)) and
    stores its raw accumulators, gate at ws[s, pair, n] and up at ws[s, pair, N + n], for real pairs
    only; `moe_gemm1_reduce_kernel` finishes. k_split is a multiple of BK (for FP4 a multiple of 64,
    so every slice starts on a block and its main loop stays unmasked) and the host launches no empty
    slice, so only the last slice can hold the K % BK tail. SPLIT_K = 1 passes k_split = K.

    GROUP_N > 1 (SPLIT_K = 1, K a multiple of BK): a program computes GROUP_N neighbouring N tiles
    of its block in one loop, storing each tile when its last K step is done. Short programs pay
    their pipeline fill and set-up once per program; this spreads it over more steps.
    """
    tl.static_assert(GROUP_N == 1 or SPLIT_K == 1, "tile groups need an unsplit K")
    pdl_start(PDL)
    pid_m, pid_n, pid_s = _tile_ids(N, BN * GROUP_N, SPLIT_K)
    if pid_m * BM >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)

    slots, pairs, valid = _block_pairs(sorted_ids_ptr, pid_m, num_pairs, BM)
    tokens = (pairs // top_k).to(tl.int64)
    a_rows = x_ptr + tokens[:, None] * stride_xm

    offs_n = pid_n * GROUP_N * BN + tl.arange(0, BN)
    gate_w, gate_s = _weight_rows(w_ptr, expert, offs_n, stride_we, stride_wn, W_FP4)
    up_w, up_s = _weight_rows(w_ptr, expert, offs_n + N, stride_we, stride_wn, W_FP4)

    acc_g = _zero_acc(BM, BN, SWAP_AB)
    acc_u = _zero_acc(BM, BN, SWAP_AB)
    selectors = _fp4_scale_selectors(tbl_ptr, BK, W_FP4)
    if GROUP_N > 1:
        # One flat loop over the group's tiles x K steps: the load pipeline runs on across tiles.
        num_k = K // BK
        for i in range(0, _group_steps(N, pid_n, num_k, BN, GROUP_N)):
            t, k0, tile_n = _group_step(i, num_k, offs_n, BN, BK)
            acc_g, acc_u = _gemm1_step(
                acc_g, acc_u, a_rows, valid,
                _later_tile_rows(gate_w, t, BN, stride_wn, W_FP4), _later_tile_rows(up_w, t, BN, stride_wn, W_FP4),
                _later_tile_rows(gate_s, t, BN, stride_wn, W_FP4), _later_tile_rows(up_s, t, BN, stride_wn, W_FP4),
                selectors, k0, K, (tile_n < N)[:, None], BN, BK, W_FP4, SWAP_AB, False,
            )  # fmt: skip
            if k0 + BK == K:
                g = _finish_acc(acc_g, SWAP_AB)
                u = _finish_acc(acc_u, SWAP_AB)
                _gemm1_epilogue(g, u, expert, gs_ptr, h_ptr, slots, tile_n, N, stride_hm, W_FP4, ACT, FUSE_ACT, HAS_GS)
                acc_g = _zero_acc(BM, BN, SWAP_AB)
                acc_u = _zero_acc(BM, BN, SWAP_AB)
    else:
        n_mask = (offs_n < N)[:, None]
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        k_main = K - K % BK
        for k0 in range(k_lo, tl.minimum(k_hi, k_main), BK):
            acc_g, acc_u = _gemm1_step(
                acc_g, acc_u, a_rows, valid, gate_w, up_w, gate_s, up_s, selectors, k0, K, n_mask,
                BN, BK, W_FP4, SWAP_AB, False,
            )
        if k_main < k_hi:
            acc_g, acc_u = _gemm1_step(
                acc_g, acc_u, a_rows, valid, gate_w, up_w, gate_s, up_s, selectors, k_main, K, n_mask,
                BN, BK, W_FP4, SWAP_AB, True,
            )
        g = _finish_acc(acc_g, SWAP_AB)
        u = _finish_acc(acc_u, SWAP_AB)
        if SPLIT_K > 1:
            # Rows by pair, not slot: the workspace then scales with M * top_k, not with the padding.
            ws_ptrs = ws_ptr + pid_s * stride_ws_split + pairs[:, None].to(tl.int64) * stride_ws_pair + offs_n[None, :]
            mask = valid[:, None] & (offs_n < N)[None, :]
            tl.store(ws_ptrs, g, mask=mask)
            tl.store(ws_ptrs + N, u, mask=mask)
        else:
            _gemm1_epilogue(g, u, expert, gs_ptr, h_ptr, slots, offs_n, N, stride_hm, W_FP4, ACT, FUSE_ACT, HAS_GS)


@triton.jit(do_not_specialize=("num_pairs",))
def moe_gemm1_reduce_kernel(
    ws_ptr,
    gs_ptr,
    h_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_pairs,
    N,
    stride_ws_split,
    stride_ws_pair,
    stride_hm,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SPLIT_K: tl.constexpr,
    W_FP4: tl.constexpr,
    ACT: tl.constexpr,
    FUSE_ACT: tl.constexpr = True,
    HAS_GS: tl.constexpr = True,
    PDL: tl.constexpr = False,
):
    """Split-K GEMM1, second pass over the same [BM, BN] tiles: sums the SPLIT_K partial accumulators
    of `moe_gemm1_kernel` in slice order (deterministic), then its epilogue. Padding rows read zeros
    and so store act(0) * 0 = 0, as the unsplit kernel does (GEMM2 reads them unmasked)."""
    pdl_start(PDL)
    pid_m, pid_n, _ = _tile_ids(N, BN, 1)
    if pid_m * BM >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots, pairs, valid = _block_pairs(sorted_ids_ptr, pid_m, num_pairs, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = valid[:, None] & (offs_n < N)[None, :]
    ws_ptrs = ws_ptr + pairs[:, None].to(tl.int64) * stride_ws_pair + offs_n[None, :]
    g = tl.zeros((BM, BN), dtype=tl.float32)
    u = tl.zeros((BM, BN), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        g += tl.load(ws_ptrs + s * stride_ws_split, mask=mask, other=0.0)
        u += tl.load(ws_ptrs + s * stride_ws_split + N, mask=mask, other=0.0)
    _gemm1_epilogue(g, u, expert, gs_ptr, h_ptr, slots, offs_n, N, stride_hm, W_FP4, ACT, FUSE_ACT, HAS_GS)


@triton.jit
def _gemm2_step(
    acc, a_rows, w_rows, s_rows, selectors, k0, K, n_mask, row_mask,
    BN: tl.constexpr, BK: tl.constexpr, W_FP4: tl.constexpr, SWAP_AB: tl.constexpr, MASK_K: tl.constexpr,
):  # fmt: skip
    a = _load_act_tile(a_rows, row_mask, k0, K, BK, MASK_K)
    w = _load_weight_tile(w_rows, s_rows, selectors, k0, K, n_mask, BN, BK, W_FP4, MASK_K)
    return _mma(acc, a, w, SWAP_AB)


@triton.jit(do_not_specialize=("num_pairs",))
def moe_gemm2_kernel(
    h_ptr,
    w_ptr,
    tbl_ptr,
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
    stride_om,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    W_FP4: tl.constexpr,
    SWAP_AB: tl.constexpr,
    GROUP_N: tl.constexpr = 1,
    HAS_GS: tl.constexpr = True,
    PDL: tl.constexpr = False,
):
    """out[pair, n] = topk_w[pair] * gs_down * (h[slot] @ W_down^T)[n]; h rows are in sorted order.
    GROUP_N as in `moe_gemm1_kernel` (K = I is only a few steps, so GEMM2 programs are short)."""
    pdl_start(PDL)
    pid_m, pid_n, _ = _tile_ids(N, BN * GROUP_N, 1)
    if pid_m * BM >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)

    slots, pairs, valid = _block_pairs(sorted_ids_ptr, pid_m, num_pairs, BM)
    a_rows = h_ptr + slots[:, None].to(tl.int64) * stride_hm

    offs_n = pid_n * GROUP_N * BN + tl.arange(0, BN)
    w_rows, s_rows = _weight_rows(w_ptr, expert, offs_n, stride_we, stride_wn, W_FP4)

    # Padding rows of h hold finite values (GEMM1 wrote them); loading them all keeps the loads unmasked.
    all_rows = slots >= 0
    selectors = _fp4_scale_selectors(tbl_ptr, BK, W_FP4)
    acc = _zero_acc(BM, BN, SWAP_AB)
    row_scale = tl.load(topk_w_ptr + pairs, mask=valid, other=0.0)
    if W_FP4:
        row_scale = row_scale * FP4_UNSCALE
    if HAS_GS:
        row_scale = row_scale * tl.load(gs_ptr + expert)
    out_rows = out_ptr + pairs[:, None].to(tl.int64) * stride_om
    if GROUP_N > 1:
        num_k = K // BK
        for i in range(0, _group_steps(N, pid_n, num_k, BN, GROUP_N)):
            t, k0, tile_n = _group_step(i, num_k, offs_n, BN, BK)
            acc = _gemm2_step(
                acc, a_rows, _later_tile_rows(w_rows, t, BN, stride_wn, W_FP4),
                _later_tile_rows(s_rows, t, BN, stride_wn, W_FP4), selectors, k0, K, (tile_n < N)[:, None],
                all_rows, BN, BK, W_FP4, SWAP_AB, False,
            )  # fmt: skip
            if k0 + BK == K:
                _gemm2_store(acc, row_scale, out_rows, tile_n, valid, N, SWAP_AB)
                acc = _zero_acc(BM, BN, SWAP_AB)
    else:
        n_mask = (offs_n < N)[:, None]
        k_main = K - K % BK
        for k0 in range(0, k_main, BK):
            acc = _gemm2_step(
                acc, a_rows, w_rows, s_rows, selectors, k0, K, n_mask, all_rows, BN, BK, W_FP4, SWAP_AB, False
            )
        if k_main < K:
            acc = _gemm2_step(
                acc, a_rows, w_rows, s_rows, selectors, k_main, K, n_mask, all_rows, BN, BK, W_FP4, SWAP_AB, True
            )
        _gemm2_store(acc, row_scale, out_rows, offs_n, valid, N, SWAP_AB)


@triton.jit
def _gemm2_store(acc, row_scale, out_rows, offs_n, valid, N, SWAP_AB: tl.constexpr):
    y = _finish_acc(acc, SWAP_AB) * row_scale[:, None]
    tl.store(out_rows + offs_n[None, :], y.to(out_rows.dtype.element_ty), mask=valid[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=("M",))  # M is the token count (see moe_align_kernel)
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
    """y = (x @ dequant(W)^T) * weight_scale_2 for a dense [N, K] weight (FP4 in the checkpoint layout, or bf16)."""
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
        a = _load_act_tile(a_rows, m_mask, k0, K, BK, True)
        if W_FP4:
            w = _load_ckpt_fp4_tile(w_rows, s_rows, k0, K, n_mask, BN, BK)
        else:
            w = _load_weight_tile(w_rows, s_rows, w_rows, k0, K, n_mask, BN, BK, False, True)
        acc = _mma(acc, a, w, SWAP_AB)
    y = _finish_acc(acc, SWAP_AB)
    if W_FP4:
        y = y * tl.load(gs_ptr)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=("num_pairs",))
def moe_count_kernel(topk_ids_ptr, counts_ptr, num_pairs, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Large-batch align, step 1: per-program histogram added into counts[NUM_BINS] (zeroed)."""
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    valid = offs < num_pairs
    ids = tl.load(topk_ids_ptr + offs, mask=valid, other=0)
    hist = tl.histogram(ids, NUM_BINS)
    hist -= tl.where(tl.arange(0, NUM_BINS) == 0, CHUNK - tl.sum(valid.to(tl.int32), 0), 0)
    tl.atomic_add(counts_ptr + tl.arange(0, NUM_BINS), hist)


@triton.jit(do_not_specialize=("max_blocks",))
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


@triton.jit(do_not_specialize=("num_pairs",))
def moe_scatter_kernel(topk_ids_ptr, cursor_ptr, sorted_ids_ptr, num_pairs, CHUNK: tl.constexpr):
    """Large-batch align, step 3: each pair takes the next free slot of its expert's run."""
    _scatter_pairs(topk_ids_ptr, cursor_ptr, sorted_ids_ptr, tl.program_id(0) * CHUNK + tl.arange(0, CHUNK), num_pairs)


@triton.jit
def fp4_dequant_kernel(
    w_ptr, tbl_ptr, out_ptr, num_rows, N, K, stride_we, stride_wn, BR: tl.constexpr, BW: tl.constexpr
):  # fmt: skip
    """out[r, :K] = e2m1(codes) * block_scale in bf16 (exact) for the rows r = e * N + n of FP4 experts
    in the blocked layout; BW (words per program) a multiple of 8.

    The global scale is left out on purpose: the GEMM epilogue applies it in fp32, as on the FP4 path.
    """
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_mask = (rows < num_rows)[:, None]
    w_rows, s_rows = _weight_rows(w_ptr, (rows // N)[:, None].to(tl.int64), rows % N, stride_we, stride_wn, True)
    k0 = tl.program_id(1) * 8 * BW
    out = _load_weight_tile(w_rows, s_rows, _fp4_scale_selectors(tbl_ptr, 8 * BW, True), k0, K, row_mask,
                            BR, 8 * BW, True, True)  # fmt: skip
    out = (out.to(tl.float32) * FP4_UNSCALE).to(tl.bfloat16)
    offs_k = k0 + tl.arange(0, 8 * BW)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :], out, mask=row_mask & (offs_k < K)[None, :])
