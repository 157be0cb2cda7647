"""Host side of the fused-MoE Triton path: token sort/align, the two grouped GEMMs, the top-k sum.

Everything here is free of host synchronisation (no .item(), no data-dependent shapes), so a whole
MoE layer can be captured in a CUDA graph. Buffers are sized by upper bounds known from M alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from sglang.srt.layers.moe.fused_moe_triton.configs import (
    GemmTile,
    MoeGemvConfig,
    MoeTileConfig,
    get_moe_config,
    get_moe_gemv_config,
)
from sglang.srt.layers.moe.fused_moe_triton.kernels import (
    ACT_GELU_TANH,
    ACT_SILU,
    FP4_BLOCK_ROWS,
    FP4_SCALE_BIAS,
    FP4_WORD_BITS,
    check_fp4_block_k,
    fp4_dequant_kernel,
    moe_align_kernel,
    moe_count_kernel,
    moe_gemm1_kernel,
    moe_gemm1_reduce_kernel,
    moe_gemm2_kernel,
    moe_offsets_kernel,
    moe_scatter_kernel,
    scale_byte_table,
)
from sglang.srt.layers.moe.fused_moe_triton.moe_gemv import moe_gemv
from sglang.srt.layers.triton_ops.common import pdl_launch

# From this many tokens on, NVFP4 experts are expanded to bf16 once per call and run through the
# bf16 kernels: every expert is touched and in-loop decoding costs more than the expansion
# (H200, 2026-11-28, blocked layout: 1569 vs 1615 us at M=4096, 2549 vs 2833 us at 8192; at
# M=1024 the expansion loses, 1059 vs 683 us).
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
    """One layer's experts as the kernels read them: bf16, or NVFP4 in the kernels' blocked layout
    (`prepare_nvfp4_experts`; block scales inside the blocks, global scales here)."""

    w13: torch.Tensor  # [E, 2I, H] bf16, or int32 blocks [E, 2I/16, ceil(H/64), 144]
    w2: torch.Tensor  # [E, H, I] bf16, or int32 blocks [E, H/16, ceil(I/64), 144]
    w13_scale_2: torch.Tensor | None = None  # [E, 2] fp32 (gate, up); None for bf16 experts
    w2_scale_2: torch.Tensor | None = None  # [E] fp32

    @property
    def is_fp4(self) -> bool:
        return self.w13.dtype == torch.int32

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def inter(self) -> int:
        return self.w13.shape[1] * (FP4_BLOCK_ROWS if self.is_fp4 else 1) // 2

    @property
    def hidden(self) -> int:
        return self.w2.shape[1] * (FP4_BLOCK_ROWS if self.is_fp4 else 1)


def _repack_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One expert's checkpoint uint8 [N, K/2] codes + e4m3 [N, K/16] scales -> int32 blocks
    [N/16, ceil(K/64), 144] (layout in kernels.py's docstring; K padded with zero codes)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if n % FP4_BLOCK_ROWS or k % 16:
        raise ValueError(f"NVFP4 expert weights need rows % {FP4_BLOCK_ROWS} == 0 and K % 16 == 0, got {n}x{k}")
    f = scale.float()
    if torch.isnan(f).any():
        raise ValueError("NVFP4 block scales must not be NaN")
    mag = f.abs()
    bits = (mag * 2.0**117).to(torch.bfloat16).view(torch.int16).to(torch.int32) - FP4_SCALE_BIAS
    zero = mag == 0
    enc = torch.where(zero, 0, bits >> 4)
    if bool(((bits & 15) != 0)[~zero].any()) or bool(((enc < 0) | (enc > 255)).any()):
        raise AssertionError("block scale outside the e4m3 range")  # cannot happen for e4m3 inputs
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(n, k // 16, 16)
    # A zero block scale zeroes its block whatever the codes; a negative one flips their signs.
    codes = torch.where(zero[..., None], 0, codes ^ torch.where(f < 0, 8, 0).to(torch.uint8)[..., None])
    pad = -k % 64
    codes = torch.nn.functional.pad(codes.reshape(n, k), (0, pad)).reshape(n, -1, 8).to(torch.int32)
    words = torch.zeros(codes.shape[:-1], dtype=torch.int32, device=codes.device)
    for j, positions in enumerate(FP4_WORD_BITS):
        for b, pos in enumerate(positions):
            words |= ((codes[..., j] >> b) & 1) << pos
    scale_words = torch.nn.functional.pad(enc.to(torch.uint8), (0, pad // 16)).view(torch.int32)  # [N, K/64]
    groups, chunks = n // FP4_BLOCK_ROWS, words.shape[1] // 8
    words = words.reshape(groups, FP4_BLOCK_ROWS, chunks, 8).transpose(1, 2).reshape(groups, chunks, -1)
    scale_words = scale_words.reshape(groups, FP4_BLOCK_ROWS, chunks).transpose(1, 2)
    return torch.cat([words, scale_words], dim=-1).contiguous()  # [groups, chunks, 16 * 8 + 16]


def prepare_nvfp4_experts(
    w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
    w13_scale_2: torch.Tensor, w2_scale_2: torch.Tensor,
) -> ExpertWeights:  # fmt: skip
    """Checkpoint-layout NVFP4 experts (see ModelOptNvFp4FusedMoEMethod) -> the kernels' layout (once,
    at load; exact: decoding the result reproduces e2m1 * block scale bit for bit)."""
    return ExpertWeights(
        torch.stack([_repack_fp4(w13[e], w13_scale[e]) for e in range(w13.shape[0])]),
        torch.stack([_repack_fp4(w2[e], w2_scale[e]) for e in range(w2.shape[0])]),
        w13_scale_2.float().reshape(-1, 2).contiguous(), w2_scale_2.float().reshape(-1).contiguous(),
    )  # fmt: skip


def max_blocks_for(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(count_e / block_m): each non-empty expert wastes < 1 block."""
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


_ONE_TOKEN_SLOTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _align_one_token(ids: torch.Tensor, block_m: int) -> AlignedTokens:
    """A single token's top-k experts are distinct, so the sorted list is known without a kernel:
    block j holds pair j then padding, and its expert is ids[j]. The slot list and count are
    constants, made once per shape (before any CUDA-graph capture: the model runs eagerly first)."""
    top_k = ids.numel()
    key = (top_k, block_m, ids.device)
    if key not in _ONE_TOKEN_SLOTS:
        slots = torch.arange(top_k * block_m, dtype=torch.int32, device=ids.device)
        sorted_ids = torch.where(slots % block_m == 0, slots // block_m, top_k).to(torch.int32)
        _ONE_TOKEN_SLOTS[key] = sorted_ids, torch.full((1,), top_k * block_m, dtype=torch.int32, device=ids.device)
    sorted_ids, num_padded = _ONE_TOKEN_SLOTS[key]
    return AlignedTokens(sorted_ids, ids, num_padded, top_k, block_m)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedTokens:
    """Sort (token, slot) pairs by expert, each expert's run padded to block_m; one kernel launch
    (none for a single token)."""
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    if topk_ids.shape[0] == 1:
        return _align_one_token(ids, block_m)
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
        num_warps=8, **pdl_launch(dev),
    )  # fmt: skip
    return AlignedTokens(sorted_ids, block_expert, num_padded, max_blocks, block_m)


def _launch_kwargs(t: GemmTile, w: ExpertWeights, block_m: int) -> dict:
    swap_ab = t.swap_ab
    if w.is_fp4:
        check_fp4_block_k(t.block_k)
        # With block_m >= 64 tokens on the MMA's M side Triton picks wgmma, whose B operand must come
        # from shared memory, and (Triton 3.6) fails to lay out the decoded tile there; with the
        # weights on the M side (swap) the decoded tile is wgmma's A operand, which works.
        swap_ab = swap_ab or block_m >= 64
    return dict(BN=t.block_n, BK=t.block_k, SWAP_AB=swap_ab, num_warps=t.num_warps, num_stages=t.num_stages,
                **pdl_launch(w.w13.device))


def grouped_format(weight_format: str, num_tokens: int) -> str:
    """The weight format the grouped GEMMs run (and take their tuned tiles) for: NVFP4 experts are
    expanded to bf16 once per call from FP4_DEQUANT_MIN_TOKENS tokens on."""
    return "bf16" if weight_format == "nvfp4" and num_tokens >= FP4_DEQUANT_MIN_TOKENS else weight_format


def tile_group(t: GemmTile, k: int, slices: int = 1) -> int:
    """N tiles a program computes: t.group_n where the kernels support it (whole K steps, no split)."""
    if t.group_n < 1:
        raise ValueError(f"group_n must be >= 1, got {t.group_n}")
    return t.group_n if k % t.block_k == 0 and slices == 1 else 1


def gemm1_k_slices(hidden: int, t: GemmTile) -> tuple[int, int]:
    """(k_split, slices) for GEMM1's split-K: each slice covers whole block_k steps (so, for NVFP4,
    whole 64-K blocks, and its main loop needs no K mask), the last one also the K % block_k tail.
    Slices are balanced to within one step; fewer than t.split_k when K has too few steps."""
    if t.split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {t.split_k}")
    steps = triton.cdiv(hidden, t.block_k)
    k_split = triton.cdiv(steps, t.split_k) * t.block_k
    return k_split, triton.cdiv(hidden, k_split)


def moe_gemm1(
    x: torch.Tensor, w: ExpertWeights, aligned: AlignedTokens, top_k: int, activation: str, t: GemmTile,
    fuse_act: bool = True,
) -> torch.Tensor:  # fmt: skip
    """h [slots, I] bf16 = act(x W_gate^T * gs_gate) * (x W_up^T * gs_up), rows in sorted order.

    fuse_act=False returns [slots, 2I] (scaled gate | scaled up) for `unfused_activation`.
    t.split_k > 1: K is cut into slices computed by separate programs, whose fp32 partial sums go to
    a workspace [slices, M * top_k, 2I] (sized from M alone) and are summed in a second kernel."""
    inter, hidden = w.inter, x.shape[1]
    num_pairs = x.shape[0] * top_k
    width = inter if fuse_act else 2 * inter
    h = torch.empty(aligned.max_blocks * aligned.block_m, width, dtype=torch.bfloat16, device=x.device)
    gs = w.w13_scale_2 if w.w13_scale_2 is not None else w.w13
    k_split, slices = gemm1_k_slices(hidden, t)
    # Unsplit, the kernel writes h directly and never touches the workspace argument.
    ws = h if slices == 1 else torch.empty(slices, num_pairs, 2 * inter, dtype=torch.float32, device=x.device)
    tiles = aligned.max_blocks * triton.cdiv(inter, t.block_n)
    group = tile_group(t, hidden, slices)
    epilogue = dict(W_FP4=w.is_fp4, ACT=_ACTIVATIONS[activation], FUSE_ACT=fuse_act, HAS_GS=w.w13_scale_2 is not None)
    moe_gemm1_kernel[(aligned.max_blocks * triton.cdiv(inter, t.block_n * group) * slices,)](
        x, w.w13, scale_byte_table(x.device), gs, h, ws, aligned.sorted_ids, aligned.block_expert, aligned.num_padded,
        num_pairs, top_k, inter, hidden, k_split,
        x.stride(0), w.w13.stride(0), w.w13.stride(1), h.stride(0), ws.stride(0), ws.stride(1),
        BM=aligned.block_m, SPLIT_K=slices, GROUP_N=group, **epilogue, **_launch_kwargs(t, w, aligned.block_m),
    )  # fmt: skip
    if slices > 1:
        moe_gemm1_reduce_kernel[(tiles,)](
            ws, gs, h, aligned.sorted_ids, aligned.block_expert, aligned.num_padded, num_pairs, inter,
            ws.stride(0), ws.stride(1), h.stride(0),
            BM=aligned.block_m, BN=t.block_n, SPLIT_K=slices, **epilogue, num_warps=4, **pdl_launch(x.device),
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
    gs = w.w2_scale_2 if w.w2_scale_2 is not None else w.w2
    topk_w = topk_weights.reshape(-1).float()
    group = tile_group(t, inter)
    grid = (aligned.max_blocks * triton.cdiv(hidden, t.block_n * group),)
    moe_gemm2_kernel[grid](
        h, w.w2, scale_byte_table(h.device), gs, topk_w, out, aligned.sorted_ids, aligned.block_expert, aligned.num_padded,
        topk_w.numel(), hidden, inter,
        h.stride(0), w.w2.stride(0), w.w2.stride(1), out.stride(0),
        BM=aligned.block_m, W_FP4=w.is_fp4, GROUP_N=group, HAS_GS=w.w2_scale_2 is not None,
        **_launch_kwargs(t, w, aligned.block_m),
    )  # fmt: skip
    return out


def dequantize_fp4_experts(w: ExpertWeights, hidden: int) -> ExpertWeights:
    """bf16 copies of the codes times block scales (exact); global scales stay for the epilogue."""

    def expand(blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
        out = torch.empty(blocks.shape[0], n, k, dtype=torch.bfloat16, device=blocks.device)
        rows = blocks.shape[0] * n
        grid = (triton.cdiv(rows, 16), triton.cdiv(k, 256))
        fp4_dequant_kernel[grid](
            blocks, scale_byte_table(blocks.device), out, rows, n, k, blocks.stride(0), blocks.stride(1), BR=16, BW=32
        )
        return out

    return ExpertWeights(expand(w.w13, 2 * w.inter, hidden), expand(w.w2, w.hidden, w.inter), w.w13_scale_2, w.w2_scale_2)


def fused_experts(
    x: torch.Tensor,
    w: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "gelu_pytorch_tanh",
    config: MoeTileConfig | MoeGemvConfig | None = None,
    fuse_act: bool = True,
    sum_pairs: bool = True,
) -> torch.Tensor:
    """sum_j topk_weights[m, j] * expert_{topk_ids[m, j]}(x[m]) -> [M, H] in x.dtype.

    config: None picks the per-pair GEMV path (moe_gemv.py) for a few tokens, the grouped GEMMs with
    the tuned tiles otherwise; a given config forces its path.
    fuse_act=False runs the activation as separate kernels (only for measuring the fusion; grouped path).
    sum_pairs=False returns the weighted terms unsummed, [M, top_k, H] (top_k 1: [M, H], already the
    sum), for a consumer that sums them in its own pass (the fused FFN combine)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unsupported MoE activation {activation!r}; supported: {sorted(_ACTIVATIONS)}")
    num_tokens, top_k = topk_ids.shape
    fmt = "nvfp4" if w.is_fp4 else "bf16"
    if config is None and fuse_act:
        config = get_moe_gemv_config(num_tokens * top_k, fmt)
    x = x.contiguous()
    if isinstance(config, MoeGemvConfig):
        pair_out = moe_gemv(x, w, topk_weights, topk_ids, _ACTIVATIONS[activation], config)
    else:
        if grouped_format(fmt, num_tokens) != fmt:
            w = dequantize_fp4_experts(w, x.shape[1])
            fmt = "bf16"  # the bf16 kernels run from here on, so their tuned tiles apply
        if config is None:
            config = get_moe_config(num_tokens, w.num_experts, w.hidden, w.inter, top_k, fmt)
        aligned = moe_align(topk_ids, w.num_experts, config.block_m)
        h = moe_gemm1(x, w, aligned, top_k, activation, config.gemm1, fuse_act)
        if not fuse_act:
            h = unfused_activation(h, activation)
        pair_out = torch.empty(num_tokens * top_k, w.hidden, dtype=x.dtype, device=x.device)
        moe_gemm2(h, w, aligned, topk_weights, pair_out, config.gemm2)
    if top_k == 1:
        return pair_out  # one pair per token: the pair rows are the output rows
    pairs = pair_out.view(num_tokens, top_k, w.hidden)
    # torch accumulates a bf16 sum in fp32; summing in slot order keeps the result deterministic.
    return pairs.sum(dim=1) if sum_pairs else pairs
