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
    """One layer's experts as the kernels read them. Scales are None for bf16 experts."""

    w13: torch.Tensor  # [E, 2I, H] bf16 or [E, 2I, H/2] uint8
    w2: torch.Tensor  # [E, H, I] bf16 or [E, H, I/2] uint8
    w13_scale: torch.Tensor | None = None  # [E, 2I, H/16] float8_e4m3fn
    w2_scale: torch.Tensor | None = None  # [E, H, I/16] float8_e4m3fn
    w13_scale_2: torch.Tensor | None = None  # [E, 2] fp32 (gate, up)
    w2_scale_2: torch.Tensor | None = None  # [E] fp32

    @property
    def is_fp4(self) -> bool:
        return self.w13.dtype == torch.uint8

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def inter(self) -> int:
        return self.w13.shape[1] // 2

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]


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


def _launch_kwargs(t: GemmTile) -> dict:
    return dict(BN=t.block_n, BK=t.block_k, SWAP_AB=t.swap_ab, num_warps=t.num_warps, num_stages=t.num_stages)


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
        x, w.w13, scale, gs, h, aligned.sorted_ids, aligned.block_expert, aligned.num_padded,
        x.shape[0] * top_k, top_k, inter, hidden,
        x.stride(0), w.w13.stride(0), w.w13.stride(1), scale.stride(0), scale.stride(1), h.stride(0),
        BM=aligned.block_m, W_FP4=w.is_fp4, ACT=_ACTIVATIONS[activation], FUSE_ACT=fuse_act,
        HAS_GS=w.w13_scale_2 is not None,
        **_launch_kwargs(t),
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
        h, w.w2, scale, gs, topk_w, out, aligned.sorted_ids, aligned.block_expert, aligned.num_padded,
        topk_w.numel(), hidden, inter,
        h.stride(0), w.w2.stride(0), w.w2.stride(1), scale.stride(0), scale.stride(1), out.stride(0),
        BM=aligned.block_m, W_FP4=w.is_fp4, HAS_GS=w.w2_scale_2 is not None, **_launch_kwargs(t),
    )  # fmt: skip
    return out


def dequantize_fp4_experts(w: ExpertWeights) -> ExpertWeights:
    """bf16 copies of the codes times block scales (exact); global scales stay for the epilogue."""

    def expand(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows, k = packed.shape[0] * packed.shape[1], packed.shape[2] * 2
        out = torch.empty(packed.shape[0], packed.shape[1], k, dtype=torch.bfloat16, device=packed.device)
        grid = (triton.cdiv(rows, 16), triton.cdiv(k // 2, 128))
        fp4_dequant_kernel[grid](packed, scale, out, rows, k, BR=16, BB=128)
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
