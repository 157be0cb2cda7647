"""Host side of the fused-MoE Triton path: token sort/align, the two grouped GEMMs, the top-k sum.

Everything here is free of host synchronisation (no .item(), no data-dependent shapes), so a whole
MoE layer can be captured in a CUDA graph. Buffers are sized by upper bounds known from M alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from sglang.srt.layers.moe.fused_moe_triton.configs import GemmTile, MoeTileConfig, get_moe_config
from sglang.srt.layers.moe.fused_moe_triton.kernels import (
    ACT_GELU_TANH,
    ACT_SILU,
    FP4_SCALE_BYTE,
    FP4_SCALE_BIAS,
    FP4_WORD_BITS,
    fp4_dequant_kernel,
    moe_align_kernel,
    moe_count_kernel,
    moe_gemm1_kernel,
    moe_gemm2_kernel,
    moe_offsets_kernel,
    moe_scatter_kernel,
)

# From this many tokens on, NVFP4 experts are expanded to bf16 once per call and run through the
# bf16 kernels: every expert is touched and in-loop decoding costs more than the expansion
# (H200, 2026-11-28: 1711 vs 1989 us at M=4096, 2525 vs 3467 us at 8192; slower at 1024).
FP4_DEQUANT_MIN_TOKENS = int(os.environ.get("SGLANG_MOE_FP4_DEQUANT_MIN_TOKENS", "4096"))

# Above this many (token, slot) pairs the one-program align kernel is slower than three launches.
_SINGLE_PROGRAM_ALIGN_MAX = 1024

_ACTIVATIONS = {"gelu_pytorch_tanh": ACT_GELU_TANH, "gelu_tanh": ACT_GELU_TANH, "silu": ACT_SILU}


@dataclass
class AlignedTokens:
    sorted_ids: torch.Tensor  # [max_blocks * block_m] int32: pair index m * k + j, or num_pairs (padding)
    block_expert: torch.Tensor  # [max_blocks] int32: expert of each block, -1 past the end
    num_padded: torch.Tensor  # [1] int32: used slots (a multiple of block_m)
    max_blocks: int
    block_m: int


@dataclass
class ExpertWeights:
    """One layer's experts as the kernels read them. Scales are None for bf16 experts; NVFP4 experts
    are in the kernels' repacked layout (`prepare_nvfp4_experts`)."""

    w13: torch.Tensor  # [E, 2I, H] bf16 or [E, 2I, H/8] int32 code words
    w2: torch.Tensor  # [E, H, I] bf16 or [E, H, I/8] int32 code words
    w13_scale: torch.Tensor | None = None  # [E, 2I, ceil(H/64)] int32: 4 encoded block scales each
    w2_scale: torch.Tensor | None = None  # [E, H, ceil(I/64)] int32
    w13_scale_2: torch.Tensor | None = None  # [E, 2] fp32 (gate, up)
    w2_scale_2: torch.Tensor | None = None  # [E] fp32

    @property
    def is_fp4(self) -> bool:
        return self.w13.dtype == torch.int32

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def inter(self) -> int:
        return self.w13.shape[1] // 2

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]


def _repack_fp4(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint uint8 [..., K/2] codes + e4m3 [..., K/16] scales -> int32 code words [..., K/8] +
    int32 scale words [..., ceil(K/64)] (see kernels.py for both layouts)."""
    f = scale.float()
    if torch.isnan(f).any():
        raise ValueError("NVFP4 block scales must not be NaN")
    mag = f.abs()
    bits = (mag * 2.0**117).to(torch.bfloat16).view(torch.int16).to(torch.int32) - FP4_SCALE_BIAS
    zero = mag == 0
    enc = torch.where(zero, 0, bits >> 4)
    if bool(((bits & 15) != 0)[~zero].any()) or bool(((enc < 0) | (enc > 255)).any()):
        raise AssertionError("block scale outside the e4m3 range")  # cannot happen for e4m3 inputs
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1, 16)
    # A zero block scale zeroes its block whatever the codes; a negative one flips their signs.
    codes = torch.where(zero[..., None], 0, codes ^ torch.where(f < 0, 8, 0).to(torch.uint8)[..., None])
    codes = codes.reshape(*packed.shape[:-1], -1, 8).to(torch.int32)
    words = torch.zeros(codes.shape[:-1], dtype=torch.int32, device=codes.device)
    for j, positions in enumerate(FP4_WORD_BITS):
        for b, pos in enumerate(positions):
            words |= ((codes[..., j] >> b) & 1) << pos
    pad = -enc.shape[-1] % 4
    enc = torch.nn.functional.pad(enc.to(torch.uint8), (0, pad))
    return words, enc.view(torch.int32)


def prepare_nvfp4_experts(
    w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
    w13_scale_2: torch.Tensor, w2_scale_2: torch.Tensor,
) -> ExpertWeights:  # fmt: skip
    """Checkpoint-layout NVFP4 experts (see ModelOptNvFp4FusedMoEMethod) -> the kernels' layout (once,
    at load; exact: decoding the result reproduces e2m1 * block scale bit for bit)."""
    q13 = [_repack_fp4(w13[e], w13_scale[e]) for e in range(w13.shape[0])]
    q2 = [_repack_fp4(w2[e], w2_scale[e]) for e in range(w2.shape[0])]
    return ExpertWeights(
        torch.stack([q[0] for q in q13]), torch.stack([q[0] for q in q2]),
        torch.stack([q[1] for q in q13]), torch.stack([q[1] for q in q2]),
        w13_scale_2.float().reshape(-1, 2).contiguous(), w2_scale_2.float().reshape(-1).contiguous(),
    )  # fmt: skip


_SCALE_BYTE_TABLES: dict[torch.device, torch.Tensor] = {}


def _scale_byte_table(device: torch.device) -> torch.Tensor:
    """The kernels' small uint8 table (see kernels._fp4_scale_selectors), one per device."""
    if device not in _SCALE_BYTE_TABLES:
        _SCALE_BYTE_TABLES[device] = torch.tensor(FP4_SCALE_BYTE, dtype=torch.uint8, device=device)
    return _SCALE_BYTE_TABLES[device]


def max_blocks_for(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(count_e / block_m): each non-empty expert wastes < 1 block."""
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedTokens:
    """Sort (token, slot) pairs by expert, each expert's run padded to block_m; one kernel launch."""
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    num_pairs = ids.numel()
    max_blocks = max_blocks_for(num_pairs, num_experts, block_m)
    num_bins = triton.next_power_of_2(num_experts)
    dev = ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_bins, dtype=torch.int32, device=dev)
    block_chunk = max(16, 4096 // num_bins)
    if num_pairs > _SINGLE_PROGRAM_ALIGN_MAX:
        # One program serialises too much work here; spread counting and scattering over the GPU.
        counts = torch.zeros(num_bins, dtype=torch.int32, device=dev)
        sorted_ids.fill_(num_pairs)
        chunks = triton.cdiv(num_pairs, 1024)
        moe_count_kernel[(chunks,)](ids, counts, num_pairs, NUM_BINS=num_bins, CHUNK=1024)
        moe_offsets_kernel[(1,)](
            counts, cursor, block_expert, num_padded, max_blocks, num_experts,
            BLOCK_M=block_m, NUM_BINS=num_bins, BLOCK_CHUNK=block_chunk, num_warps=8,
        )  # fmt: skip
        moe_scatter_kernel[(chunks,)](ids, cursor, sorted_ids, num_pairs, CHUNK=1024)
        return AlignedTokens(sorted_ids, block_expert, num_padded, max_blocks, block_m)
    moe_align_kernel[(1,)](
        ids, sorted_ids, block_expert, num_padded, cursor,
        num_pairs, max_blocks * block_m, max_blocks, num_experts,
        BLOCK_M=block_m, NUM_BINS=num_bins, CHUNK=1024, BLOCK_CHUNK=block_chunk,
        num_warps=8,
    )  # fmt: skip
    return AlignedTokens(sorted_ids, block_expert, num_padded, max_blocks, block_m)


def _launch_kwargs(t: GemmTile, w: ExpertWeights, block_m: int) -> dict:
    swap_ab = t.swap_ab
    if w.is_fp4:
        if t.block_k % 64 or t.block_k > 8 * len(FP4_SCALE_BYTE):
            raise ValueError(f"NVFP4 tiles need block_k a multiple of 64 and <= 512, got {t.block_k}")
        # With block_m >= 64 tokens on the MMA's M side Triton picks wgmma, whose B operand must come
        # from shared memory, and (Triton 3.6) fails to lay out the decoded tile there; with the
        # weights on the M side (swap) the decoded tile is wgmma's A operand, which works.
        swap_ab = swap_ab or block_m >= 64
    return dict(BN=t.block_n, BK=t.block_k, SWAP_AB=swap_ab, num_warps=t.num_warps, num_stages=t.num_stages)


def moe_gemm1(
    x: torch.Tensor, w: ExpertWeights, aligned: AlignedTokens, top_k: int, activation: str, t: GemmTile,
    fuse_act: bool = True,
) -> torch.Tensor:  # fmt: skip
    """h [slots, I] bf16 = act(x W_gate^T * gs_gate) * (x W_up^T * gs_up), rows in sorted order.

    fuse_act=False returns [slots, 2I] (scaled gate | scaled up) for `unfused_activation`."""
    inter, hidden = w.inter, x.shape[1]
    width = inter if fuse_act else 2 * inter
    h = torch.empty(aligned.max_blocks * aligned.block_m, width, dtype=torch.bfloat16, device=x.device)
    scale = w.w13_scale if w.is_fp4 else w.w13
    gs = w.w13_scale_2 if w.w13_scale_2 is not None else w.w13
    grid = (aligned.max_blocks * triton.cdiv(inter, t.block_n),)
    moe_gemm1_kernel[grid](
        x, w.w13, scale, _scale_byte_table(x.device), gs, h, aligned.sorted_ids, aligned.block_expert, aligned.num_padded,
        x.shape[0] * top_k, top_k, inter, hidden,
        x.stride(0), w.w13.stride(0), w.w13.stride(1), scale.stride(0), scale.stride(1), h.stride(0),
        BM=aligned.block_m, W_FP4=w.is_fp4, ACT=_ACTIVATIONS[activation], FUSE_ACT=fuse_act,
        HAS_GS=w.w13_scale_2 is not None,
        **_launch_kwargs(t, w, aligned.block_m),
    )  # fmt: skip
    return h


def unfused_activation(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """The separate-kernel alternative to the fused epilogue (benchmark comparison only)."""
    from sglang.srt.layers.activation import get_act_fn

    inter = gate_up.shape[1] // 2
    g, u = gate_up[:, :inter].float(), gate_up[:, inter:].float()
    return (get_act_fn(activation)(g) * u).to(torch.bfloat16)


def moe_gemm2(
    h: torch.Tensor, w: ExpertWeights, aligned: AlignedTokens, topk_weights: torch.Tensor, out: torch.Tensor,
    t: GemmTile,
) -> torch.Tensor:  # fmt: skip
    """out [pairs, H] = routing weight * gs_down * (h W_down^T), one row per (token, slot) pair."""
    hidden, inter = w.hidden, w.inter
    scale = w.w2_scale if w.is_fp4 else w.w2
    gs = w.w2_scale_2 if w.w2_scale_2 is not None else w.w2
    topk_w = topk_weights.reshape(-1).float()
    grid = (aligned.max_blocks * triton.cdiv(hidden, t.block_n),)
    moe_gemm2_kernel[grid](
        h, w.w2, scale, _scale_byte_table(h.device), gs, topk_w, out, aligned.sorted_ids, aligned.block_expert, aligned.num_padded,
        topk_w.numel(), hidden, inter,
        h.stride(0), w.w2.stride(0), w.w2.stride(1), scale.stride(0), scale.stride(1), out.stride(0),
        BM=aligned.block_m, W_FP4=w.is_fp4, HAS_GS=w.w2_scale_2 is not None, **_launch_kwargs(t, w, aligned.block_m),
    )  # fmt: skip
    return out


def dequantize_fp4_experts(w: ExpertWeights) -> ExpertWeights:
    """bf16 copies of the codes times block scales (exact); global scales stay for the epilogue."""

    def expand(words: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows, k = words.shape[0] * words.shape[1], words.shape[2] * 8
        out = torch.empty(words.shape[0], words.shape[1], k, dtype=torch.bfloat16, device=words.device)
        grid = (triton.cdiv(rows, 16), triton.cdiv(k // 8, 32))
        fp4_dequant_kernel[grid](words, scale, _scale_byte_table(words.device), out, rows, k, BR=16, BW=32)
        return out

    return ExpertWeights(
        expand(w.w13, w.w13_scale), expand(w.w2, w.w2_scale), w13_scale_2=w.w13_scale_2, w2_scale_2=w.w2_scale_2
    )


def fused_experts(
    x: torch.Tensor,
    w: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "gelu_pytorch_tanh",
    config: MoeTileConfig | None = None,
    fuse_act: bool = True,
) -> torch.Tensor:
    """sum_j topk_weights[m, j] * expert_{topk_ids[m, j]}(x[m]) -> [M, H] in x.dtype.

    fuse_act=False runs the activation as separate kernels (only for measuring the fusion)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unsupported MoE activation {activation!r}; supported: {sorted(_ACTIVATIONS)}")
    num_tokens, top_k = topk_ids.shape
    if w.is_fp4 and num_tokens >= FP4_DEQUANT_MIN_TOKENS:
        w = dequantize_fp4_experts(w)
    if config is None:
        fmt = "nvfp4" if w.is_fp4 else "bf16"
        config = get_moe_config(num_tokens, w.num_experts, w.hidden, w.inter, top_k, fmt)
    x = x.contiguous()
    aligned = moe_align(topk_ids, w.num_experts, config.block_m)
    h = moe_gemm1(x, w, aligned, top_k, activation, config.gemm1, fuse_act)
    if not fuse_act:
        h = unfused_activation(h, activation)
    if top_k == 1:
        # One pair per token: the pair rows are the output rows.
        return moe_gemm2(h, w, aligned, topk_weights, torch.empty_like(x), config.gemm2)
    pair_out = torch.empty(num_tokens * top_k, w.hidden, dtype=x.dtype, device=x.device)
    moe_gemm2(h, w, aligned, topk_weights, pair_out, config.gemm2)
    # torch accumulates a bf16 sum in fp32; summing in slot order keeps the result deterministic.
    return pair_out.view(num_tokens, top_k, w.hidden).sum(dim=1)
