"""Triton fused-MoE (bf16 + W4A16 NVFP4) and the NVFP4 dense linear against the exact torch reference.

On a CPU host the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before the
kernels are imported) at tiny shapes; on a GPU host the same checks run at the real Gemma 4 shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
from conftest import ptxas_available, run_compile_child  # noqa: E402

from sglang.srt.layers.moe.fused_moe_triton.configs import (  # noqa: E402
    GemvTile,
    MoeGemvConfig,
    MoeTileConfig,
    get_moe_config,
    get_moe_gemv_config,
    tile,
)
from sglang.srt.layers.moe.fused_moe_triton.fused_moe import moe_align  # noqa: E402
from sglang.srt.layers.moe.moe_runner.base import get_moe_runner  # noqa: E402
from sglang.srt.layers.moe.topk import TopKOutput, gemma4_topk  # noqa: E402
from sglang.srt.layers.quantization.fp4_utils import dequantize_nvfp4, quantize_nvfp4  # noqa: E402
from sglang.srt.layers.quantization.nvfp4_linear_triton import nvfp4_linear  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-2
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, N, K] -> packed [E, N, K/2], scales [E, N, K/16], global scales [E] (one per expert)."""
    parts = [quantize_nvfp4(w[e]) for e in range(w.shape[0])]
    return tuple(torch.stack(p) for p in zip(*parts))


def make_moe_layer(
    num_experts: int, hidden: int, inter: int, top_k: int, weight_format: str,
    activation: str = "gelu_pytorch_tanh", device: str = DEV,
) -> torch.nn.Module:  # fmt: skip
    """A stand-in for FusedMoE carrying exactly the attributes a runner reads; gate and up get
    different magnitudes so their NVFP4 global scales differ."""
    layer = torch.nn.Module()
    layer.num_experts, layer.top_k, layer.hidden_size = num_experts, top_k, hidden
    layer.intermediate_size_per_partition, layer.activation = inter, activation
    gate = torch.randn(num_experts, inter, hidden, device=device) * 0.05
    up = torch.randn(num_experts, inter, hidden, device=device) * 0.02
    down = torch.randn(num_experts, hidden, inter, device=device) * 0.03

    def param(t: torch.Tensor) -> torch.nn.Parameter:
        return torch.nn.Parameter(t, requires_grad=False)

    if weight_format == "bf16":
        layer.w13_weight = param(torch.cat([gate, up], 1).bfloat16())
        layer.w2_weight = param(down.bfloat16())
        return layer
    pg, sg, gg = _quantize_experts(gate)
    pu, su, gu = _quantize_experts(up)
    p2, s2, g2 = _quantize_experts(down)
    layer.w13_weight = param(torch.cat([pg, pu], 1))
    layer.w13_weight_scale = param(torch.cat([sg, su], 1))
    layer.w13_weight_scale_2 = param(torch.stack([gg, gu], 1))
    layer.w2_weight, layer.w2_weight_scale, layer.w2_weight_scale_2 = param(p2), param(s2), param(g2)
    layer.w13_input_scale = param(torch.ones(num_experts, 2))
    layer.w2_input_scale = param(torch.ones(num_experts))
    return layer


def make_routing(num_tokens: int, num_experts: int, top_k: int, skewed: bool, device: str = DEV) -> TopKOutput:
    logits = torch.randn(num_tokens, num_experts, device=device)
    if skewed:
        # Two hot experts take most tokens; every third expert gets none.
        logits[:, :2] += 4.0
        logits[:, 2::3] = -1e4
        if num_experts - len(range(2, num_experts, 3)) < top_k:
            logits[:, 2::3] = -1e3 - torch.arange(len(range(2, num_experts, 3)), device=device).float()
    per_expert_scale = torch.rand(num_experts, device=device) + 0.5
    return gemma4_topk(logits, top_k, per_expert_scale)


def reference(layer: torch.nn.Module, x: torch.Tensor, topk: TopKOutput, weight_format: str) -> torch.Tensor:
    """The torch runner fed fp32 activations (bit-equal to x), so its output is not rounded to bf16."""
    return get_moe_runner("torch", weight_format).apply(layer, x.float(), topk)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output (unwritten or poisoned element)"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_triton(layer, x, topk, weight_format, config: MoeTileConfig | None = None) -> torch.Tensor:
    """Note: repacks an NVFP4 layer in place (take the torch reference first)."""
    runner = get_moe_runner("triton", weight_format)
    runner.process_weights_after_loading(layer)
    if config is None:
        return runner.apply(layer, x, topk)
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import fused_experts

    return fused_experts(x, runner._weights(layer), topk.topk_weights, topk.topk_ids, layer.activation, config)


def _poison_allocator():
    """Fill freshly allocated CUDA memory with NaN so unwritten outputs cannot pass."""
    if torch.cuda.is_available():
        junk = torch.full((64 << 20,), float("nan"), dtype=torch.float32, device="cuda")
        del junk


# ---------------------------------------------------------------- CPU (interpreter) and GPU


@pytest.mark.parametrize("num_tokens", [11, 400])  # one-program path, multi-program path
def test_align_is_a_padded_permutation(num_tokens):
    num_experts, block_m = 7, 4
    ids = torch.randint(0, num_experts, (num_tokens, 3), dtype=torch.int32, device=DEV)
    ids[:, 0] = 1  # one hot expert; experts with no tokens are likely too
    a = moe_align(ids, num_experts, block_m)
    total = int(a.num_padded)
    counts = torch.bincount(ids.flatten().long().cpu(), minlength=num_experts)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    sorted_ids = a.sorted_ids[:total].cpu()
    real = sorted_ids[sorted_ids < ids.numel()]
    assert sorted(real.tolist()) == list(range(ids.numel()))
    assert (a.sorted_ids[total:].cpu() == ids.numel()).all()
    experts = a.block_expert.cpu()
    flat = ids.flatten().cpu()
    for slot, pair in enumerate(sorted_ids.tolist()):
        if pair < ids.numel():
            assert flat[pair] == experts[slot // block_m]
    assert (experts[total // block_m :] == -1).all()


def test_align_of_one_token_needs_no_kernel(monkeypatch):
    """A single token (distinct top-k experts): pair j alone in block j, expert ids[j], no launch."""
    from sglang.srt.layers.moe.fused_moe_triton import fused_moe as fm

    monkeypatch.setattr(fm, "moe_align_kernel", None)  # any launch would fail
    ids = torch.randperm(9, device=DEV)[:5].reshape(1, 5).to(torch.int32)
    a = moe_align(ids, 9, 4)
    assert int(a.num_padded) == 20 and a.max_blocks == 5 and a.block_m == 4
    assert a.sorted_ids.tolist() == sum(([j, 5, 5, 5] for j in range(5)), [])
    assert a.block_expert.tolist() == ids.flatten().tolist()


# (E, H, I, M, top_k, skewed, activation): E not a power of two, I not a tile multiple, top-k 1..8.
_TINY_CASES = [
    (7, 64, 48, 1, 4, False, "gelu_pytorch_tanh"),
    (5, 64, 48, 7, 3, False, "gelu_pytorch_tanh"),
    (6, 32, 80, 9, 1, True, "gelu_pytorch_tanh"),
    (9, 64, 32, 3, 8, True, "silu"),
]
_TINY_CFG = MoeTileConfig(16, tile(32, 64, 4, 2, 1), tile(32, 64, 4, 2, 0))


@pytest.mark.parametrize("case", _TINY_CASES)
@pytest.mark.parametrize("weight_format", ["nvfp4", "bf16"])
def test_fused_moe_tiny(case, weight_format):
    num_experts, hidden, inter, m, top_k, skewed, act = case
    layer = make_moe_layer(num_experts, hidden, inter, top_k, weight_format, act)
    x = torch.randn(m, hidden, device=DEV).bfloat16()
    topk = make_routing(m, num_experts, top_k, skewed)
    cfg = _TINY_CFG if DEV == "cpu" else None
    ref = reference(layer, x, topk, weight_format)
    out = run_triton(layer, x, topk, weight_format, cfg)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) <= TOL


# GEMM1 split-K, (split_k, M, top_k, skewed): with H=160 and block_k=64 (3 K steps, the last one a
# 32-wide tail) split 2 gives slices of 128 + 32, split 3 of 64 + 64 + 32, and split 4 gets 3 slices.
_SPLIT_CASES = [(2, 7, 3, True), (3, 5, 1, True), (4, 4, 4, False)]


@pytest.mark.parametrize("case", _SPLIT_CASES)
@pytest.mark.parametrize("swap", [0, 1])
@pytest.mark.parametrize("weight_format", ["nvfp4", "bf16"])
def test_gemm1_split_k(case, swap, weight_format):
    split_k, m, top_k, skewed = case
    layer = make_moe_layer(6, 160, 48, top_k, weight_format)
    x = torch.randn(m, 160, device=DEV).bfloat16()
    topk = make_routing(m, 6, top_k, skewed)
    cfg = MoeTileConfig(16, tile(64, 64, 4, 2, swap, split_k), tile(64, 64, 4, 2, 0))  # N tile 48 of 64
    ref = reference(layer, x, topk, weight_format)
    _poison_allocator()
    assert rel_err(run_triton(layer, x, topk, weight_format, cfg), ref) <= TOL


# Tiles a program computes in one loop (group_n), (hidden, inter, group): GEMM1 has 4 N tiles of 32
# (I = 128) or 3 with a partial last one (I = 80), GEMM2 6 (H = 192); every case leaves one GEMM a
# short last group. GEMM2's K = 80 is no whole number of 64-steps: one tile a program there.
_GROUP_CASES = [(192, 128, 3), (192, 128, 4), (192, 80, 2)]


@pytest.mark.parametrize("case", _GROUP_CASES)
@pytest.mark.parametrize("swap", [0, 1])
@pytest.mark.parametrize("weight_format", ["nvfp4", "bf16"])
def test_tile_groups(case, swap, weight_format):
    hidden, inter, group = case
    layer = make_moe_layer(5, hidden, inter, 2, weight_format)
    x = torch.randn(6, hidden, device=DEV).bfloat16()
    topk = make_routing(6, 5, 2, True)
    cfg = MoeTileConfig(16, tile(32, 64, 4, 2, swap, 1, group), tile(32, 64, 4, 2, swap, 1, group))
    ref = reference(layer, x, topk, weight_format)
    _poison_allocator()
    out = run_triton(layer, x, topk, weight_format, cfg)
    assert rel_err(out, ref) <= TOL
    # Each tile's K loop is unchanged by the grouping: bit for bit the one-tile-a-program result.
    one = MoeTileConfig(16, tile(32, 64, 4, 2, swap), tile(32, 64, 4, 2, swap))
    assert torch.equal(out, run_triton(layer, x, topk, weight_format, one))


def test_tile_group_needs_whole_k_steps():
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import tile_group

    assert tile_group(tile(64, 64, 4, 4, 0, 1, 4), 704) == 4
    assert tile_group(tile(64, 128, 4, 4, 0, 1, 4), 704) == 1  # 5.5 steps: the tail needs its own pass
    assert tile_group(tile(64, 64, 4, 4, 0, 2, 4), 2816, slices=2) == 1
    with pytest.raises(ValueError, match="group_n"):
        tile_group(tile(64, 64, 4, 4, 0, 1, 0), 704)


def test_gemm1_split_k_unfused_activation():
    """The benchmark's separate-activation variant through the split-K reduction: scaled gate | up."""
    from sglang.srt.layers.moe.fused_moe_triton import fused_moe as fm

    layer = make_moe_layer(4, 160, 48, 2, "bf16")
    x = torch.randn(5, 160, device=DEV).bfloat16()
    topk = make_routing(5, 4, 2, False)
    w = fm.ExpertWeights(layer.w13_weight, layer.w2_weight)
    aligned = fm.moe_align(topk.topk_ids, 4, 16)
    h = [fm.moe_gemm1(x, w, aligned, 2, "silu", tile(32, 64, 4, 2, 0, s), fuse_act=False) for s in (1, 3)]
    real = aligned.sorted_ids < topk.topk_ids.numel()
    assert rel_err(h[1][real], h[0][real]) <= TOL


def test_gemm1_k_slices():
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import gemm1_k_slices

    assert gemm1_k_slices(2816, tile(64, 64, 4, 4, 0, 8)) == (384, 8)  # 44 steps: 7 x 6 + 2
    assert gemm1_k_slices(2816, tile(64, 128, 4, 4, 0, 3)) == (1024, 3)  # 22 steps: 8 + 8 + 6
    assert gemm1_k_slices(160, tile(32, 64, 4, 2, 0, 4)) == (64, 3)  # fewer slices than asked
    assert gemm1_k_slices(64, tile(32, 64, 4, 2, 0, 2)) == (64, 1)
    with pytest.raises(ValueError):
        gemm1_k_slices(64, tile(32, 64, 4, 2, 0, 0))
    with pytest.raises(ValueError):
        MoeTileConfig(16, tile(32, 64, 4, 2, 0), tile(32, 64, 4, 2, 0, 2))


def _compile_split_k_for_sm90() -> None:
    """GEMM1 split-K and the GEMV path's kernels compiled for sm_90 at the real tiles, and the FP4
    kernels for sm_80 (the interpreter never compiles them; the FP4 decode's inline PTX only exists on
    this path). Run without TRITON_INTERPRET."""
    from conftest import compile_for_sm90

    from sglang.srt.layers.moe.fused_moe_triton import kernels

    def compile_one(fn, args: dict, consts: dict, num_warps: int, num_stages: int) -> None:
        compile_for_sm90(fn, args, consts, num_warps=num_warps, num_stages=num_stages)

    i32, ptr = "i32", "*i32"
    rows = dict(sorted_ids_ptr=ptr, block_expert_ptr=ptr, num_padded_ptr=ptr, num_pairs=i32)
    gemm1 = dict(
        x_ptr="*bf16", w_ptr=ptr, tbl_ptr="*u8", gs_ptr="*fp32", h_ptr="*bf16", ws_ptr="*fp32", **rows, top_k=i32,
        N=i32, K=i32, k_split=i32, stride_xm=i32, stride_we=i32, stride_wn=i32, stride_hm=i32, stride_ws_split=i32,
        stride_ws_pair=i32,
    )  # fmt: skip
    for w_fp4, swap in ((True, False), (True, True), (False, False)):
        consts = dict(BM=16, BN=64, BK=64 if w_fp4 else 128, W_FP4=w_fp4, ACT=0, SWAP_AB=swap, SPLIT_K=4, GROUP_N=1, FUSE_ACT=True,
                      HAS_GS=w_fp4, PDL=True)  # fmt: skip
        compile_one(kernels.moe_gemm1_kernel, {**gemm1, "w_ptr": ptr if w_fp4 else "*bf16"}, consts, 4, 4)
    reduce = dict(ws_ptr="*fp32", gs_ptr="*fp32", h_ptr="*bf16", **rows, N=i32, stride_ws_split=i32,
                  stride_ws_pair=i32, stride_hm=i32)  # fmt: skip
    consts = dict(BM=16, BN=64, SPLIT_K=4, W_FP4=True, ACT=0, FUSE_ACT=True, HAS_GS=True, PDL=True)
    compile_one(kernels.moe_gemm1_reduce_kernel, reduce, consts, 4, 1)
    # Tile groups: one loop over several N tiles, stores inside it (both GEMMs, FP4 at the real tiles).
    consts = dict(BM=16, BN=64, BK=64, W_FP4=True, ACT=0, SWAP_AB=False, SPLIT_K=1, GROUP_N=2, FUSE_ACT=True,
                  HAS_GS=True, PDL=True)  # fmt: skip
    compile_one(kernels.moe_gemm1_kernel, gemm1, consts, 4, 4)
    gemm2 = dict(h_ptr="*bf16", w_ptr=ptr, tbl_ptr="*u8", gs_ptr="*fp32", topk_w_ptr="*fp32", out_ptr="*bf16", **rows,
                 N=i32, K=i32, stride_hm=i32, stride_we=i32, stride_wn=i32, stride_om=i32)  # fmt: skip
    for swap in (False, True):
        consts = dict(BM=16, BN=64, BK=64, W_FP4=True, SWAP_AB=swap, GROUP_N=4, HAS_GS=True, PDL=True)
        compile_one(kernels.moe_gemm2_kernel, gemm2, consts, 4, 4)
    # The bf16 prefill tiles the tuner sweeps with groups (128-row blocks, wgmma).
    consts = dict(BM=128, BN=128, BK=64, W_FP4=False, ACT=0, SWAP_AB=True, SPLIT_K=1, GROUP_N=2, FUSE_ACT=True,
                  HAS_GS=False, PDL=True)  # fmt: skip
    compile_one(kernels.moe_gemm1_kernel, {**gemm1, "w_ptr": "*bf16"}, consts, 8, 4)
    consts = dict(BM=128, BN=256, BK=64, W_FP4=False, SWAP_AB=False, GROUP_N=2, HAS_GS=False, PDL=True)
    compile_one(kernels.moe_gemm2_kernel, {**gemm2, "w_ptr": "*bf16"}, consts, 8, 3)

    from sglang.srt.layers.moe.fused_moe_triton import moe_gemv

    strides = dict(stride_we=i32, stride_wn=i32)
    gemv1 = dict(x_ptr="*bf16", w_ptr=ptr, gs_ptr="*fp32", topk_ids_ptr=ptr, h_ptr="*bf16", top_k=i32,
                 N=i32, K=i32, stride_xm=i32, **strides, stride_hm=i32)  # fmt: skip
    gemv2 = dict(h_ptr="*bf16", w_ptr=ptr, gs_ptr="*fp32", topk_ids_ptr=ptr, topk_w_ptr="*fp32",
                 out_ptr="*bf16", N=i32, K=i32, stride_hm=i32, **strides, stride_om=i32)  # fmt: skip
    for even, depth in ((True, 1), (False, 3)):
        consts = dict(BN=16, BK=256, W_FP4=True, ACT=0, HAS_GS=True, EVEN_K=even, PDL=True, DEPTH=depth)
        compile_one(moe_gemv.moe_gemv1_kernel, gemv1, consts, 4, 1)
        # GEMM2 reads the expert id and its first DEPTH weight tiles before its wait (moe_gemv2_kernel).
        consts = dict(BN=32, BK=128, W_FP4=True, HAS_GS=True, EVEN_K=even, PDL=True, DEPTH=4 - depth)
        compile_for_sm90(moe_gemv.moe_gemv2_kernel, gemv2, consts, ("w_ptr", "topk_ids_ptr"), num_warps=4, num_stages=1)

    # Ampere (sm_80): the FP4 decode's PTX must assemble there too (no PDL below sm_90).
    for swap in (False, True):
        consts = dict(BM=16, BN=64, BK=64, W_FP4=True, ACT=0, SWAP_AB=swap, SPLIT_K=1, GROUP_N=1, FUSE_ACT=True,
                      HAS_GS=True, PDL=False)  # fmt: skip
        compile_for_sm90(kernels.moe_gemm1_kernel, gemm1, consts, arch=80, num_warps=4, num_stages=4)
    consts = dict(BN=16, BK=256, W_FP4=True, ACT=0, HAS_GS=True, EVEN_K=True, PDL=False, DEPTH=2)
    compile_for_sm90(moe_gemv.moe_gemv1_kernel, gemv1, consts, arch=80, num_warps=4, num_stages=1)
    consts = dict(BN=32, BK=256, W_FP4=True, HAS_GS=True, EVEN_K=False, PDL=False, DEPTH=1)
    compile_for_sm90(moe_gemv.moe_gemv2_kernel, gemv2, consts, arch=80, num_warps=4, num_stages=1)


@pytest.mark.skipif(not ptxas_available(), reason="no ptxas here")
def test_split_k_and_gemv_kernels_compile_for_sm90():
    run_compile_child(__file__)


def test_nvfp4_bf16_expansion_path(monkeypatch):
    """The large-batch path (experts expanded to bf16 first) computes the same function."""
    from sglang.srt.layers.moe.fused_moe_triton import fused_moe

    layer = make_moe_layer(5, 64, 48, 3, "nvfp4")
    x = torch.randn(9, 64, device=DEV).bfloat16()
    topk = make_routing(9, 5, 3, True)
    ref = reference(layer, x, topk, "nvfp4")
    cfg = _TINY_CFG if DEV == "cpu" else None
    assert rel_err(run_triton(layer, x, topk, "nvfp4", cfg), ref) <= TOL
    monkeypatch.setattr(fused_moe, "FP4_DEQUANT_MIN_TOKENS", 1)
    assert rel_err(run_triton(layer, x, topk, "nvfp4", cfg), ref) <= TOL
    # Without a given config the expanded experts take the bf16 table's tiles (bf16 kernels run).
    asked = []
    monkeypatch.setattr(fused_moe, "get_moe_gemv_config", lambda *a: None)
    monkeypatch.setattr(fused_moe, "get_moe_config", lambda *a: asked.append(a[-1]) or _TINY_CFG)
    assert rel_err(run_triton(layer, x, topk, "nvfp4"), ref) <= TOL and asked == ["bf16"]


def _prepare(layer):
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import prepare_nvfp4_experts

    return prepare_nvfp4_experts(layer.w13_weight, layer.w2_weight, layer.w13_weight_scale,
                                 layer.w2_weight_scale, layer.w13_weight_scale_2, layer.w2_weight_scale_2)  # fmt: skip


def test_fp4_expansion_is_exact():
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import dequantize_fp4_experts

    layer = make_moe_layer(3, 64, 48, 2, "nvfp4")
    w = _prepare(layer)
    expanded = dequantize_fp4_experts(w, 64)
    want = dequantize_nvfp4(layer.w2_weight.cpu(), layer.w2_weight_scale.cpu(), 1.0)
    assert torch.equal(expanded.w2.float().cpu(), want)
    assert torch.equal(expanded.w13_scale_2, w.w13_scale_2)


def test_fp4_decode_every_code_and_scale():
    """The kernels' decode (inline PTX on the GPU, its Triton mirror on the CPU) against the exact
    dequantisation, for all 16 codes at every position of a word, times every non-NaN e4m3 scale
    (subnormal, zero and negative ones included)."""
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import dequantize_fp4_experts

    scale_bytes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F] + [0x38, 0x01], dtype=torch.uint8)
    rows = len(scale_bytes)
    t = torch.arange(256)
    codes = ((t % 16 + t // 16) % 16).to(torch.uint8).expand(rows, 256)  # block b: codes shifted by b
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scales = scale_bytes[:, None].expand(rows, 16).contiguous().view(torch.float8_e4m3fn)
    ones = torch.ones(1, 2)
    w = _prepare(SimpleNamespace(w13_weight=packed[None].to(DEV), w2_weight=packed[None].to(DEV),
                                 w13_weight_scale=scales[None].to(DEV), w2_weight_scale=scales[None].to(DEV),
                                 w13_weight_scale_2=ones.to(DEV), w2_weight_scale_2=ones[:, 0].to(DEV)))  # fmt: skip
    got = dequantize_fp4_experts(w, 256)
    want = dequantize_nvfp4(packed, scales, 1.0)
    assert torch.equal(got.w13[0].float().cpu(), want)


def test_gate_and_up_scales_are_kept_apart():
    """Swapping the two global scales must change the result: each half uses its own scale."""
    layer = make_moe_layer(4, 32, 32, 2, "nvfp4")
    assert not torch.allclose(layer.w13_weight_scale_2[:, 0], layer.w13_weight_scale_2[:, 1])
    x = torch.randn(5, 32, device=DEV).bfloat16()
    topk = make_routing(5, 4, 2, False)
    cfg = MoeTileConfig(16, tile(16, 64, 4, 2, 0), tile(16, 64, 4, 2, 1))
    ref = reference(layer, x, topk, "nvfp4")
    out = run_triton(layer, x, topk, "nvfp4", cfg)
    assert rel_err(out, ref) <= TOL
    layer.w13_weight_scale_2.data = layer.w13_weight_scale_2.data.flip(1).contiguous()
    swapped = run_triton(layer, x, topk, "nvfp4", cfg)
    assert rel_err(swapped, out) > 0.05


@pytest.mark.parametrize("m,n,k", [(3, 48, 64), (17, 32, 96)])
def test_nvfp4_linear(m, n, k):
    w = torch.randn(n, k) * 0.1
    packed, scale, gs = quantize_nvfp4(w)
    x = torch.randn(m, k, device=DEV).bfloat16()
    y = nvfp4_linear(x, packed.to(DEV), scale.to(DEV), gs.to(DEV))
    ref = x.float() @ dequantize_nvfp4(packed, scale, gs).to(DEV).t()
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert rel_err(y, ref) <= TOL

# Per-pair GEMV path, (E, H, I, M, top_k, skewed, act, tiles): I not a multiple of block_n, H and I
# with and without a K tail (FP4 rows padded to 64), top-k 1 (pair rows are the output rows), a
# skewed routing where one expert serves several pairs. A tile's 4th field is num_stages: for NVFP4
# the steps loaded ahead (1-3), so each depth meets loops shorter and longer than itself.
_GEMV_CASES = [
    (5, 128, 48, 2, 3, True, "gelu_pytorch_tanh", ((32, 64, 4, 3), (16, 64, 2, 1))),
    (6, 192, 80, 3, 1, False, "silu", ((16, 128, 4, 2), (32, 128, 4, 3))),
    (9, 64, 32, 1, 8, True, "gelu_pytorch_tanh", ((16, 64, 2, 1), (16, 64, 2, 2))),
    # K not a whole number of steps: the last FP4 step moves back (H = 5 blocks of 64 at 4 a step);
    # a step wider than all of K (I = 176: 3 blocks) is narrowed to fit.
    (5, 320, 176, 2, 2, False, "gelu_pytorch_tanh", ((16, 256, 4, 3), (16, 512, 2, 2))),
]


@pytest.mark.parametrize("case", _GEMV_CASES)
@pytest.mark.parametrize("weight_format", ["nvfp4", "bf16"])
def test_moe_gemv_path(case, weight_format):
    num_experts, hidden, inter, m, top_k, skewed, act, (t1, t2) = case
    layer = make_moe_layer(num_experts, hidden, inter, top_k, weight_format, act)
    x = torch.randn(m, hidden, device=DEV).bfloat16()
    topk = make_routing(m, num_experts, top_k, skewed)
    cfg = MoeGemvConfig(m * top_k, GemvTile(*t1), GemvTile(*t2))
    ref = reference(layer, x, topk, weight_format)
    _poison_allocator()
    out = run_triton(layer, x, topk, weight_format, cfg)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) <= TOL


def test_moe_gemv_fp4_takes_fp32_activations():
    """fp32 models: the NVFP4 GEMV reads x as bf16 pairs, so the wrapper rounds x to bf16 first (as
    the grouped kernels do); the output keeps x's dtype."""
    layer = make_moe_layer(6, 128, 48, 4, "nvfp4")
    x = torch.randn(2, 128, device=DEV)
    topk = make_routing(2, 6, 4, False)
    ref = reference(layer, x, topk, "nvfp4")
    out = run_triton(layer, x, topk, "nvfp4", MoeGemvConfig(8, GemvTile(16, 64, 2), GemvTile(16, 64, 2)))
    assert out.dtype == torch.float32 and rel_err(out, ref) <= TOL


def test_moe_gemv_fp4_takes_a_misaligned_row():
    """x at an odd bf16 offset (a view into a larger buffer) cannot be read as 4-byte pairs in place:
    on a GPU the misaligned loads would fault (the CPU interpreter reads unaligned memory, so there
    this checks the values only)."""
    layer = make_moe_layer(6, 128, 48, 4, "nvfp4")
    x = torch.randn(1, 129, device=DEV).bfloat16()[:, 1:]
    assert x.data_ptr() % 4 == 2
    topk = make_routing(1, 6, 4, False)
    ref = reference(layer, x, topk, "nvfp4")
    out = run_triton(layer, x, topk, "nvfp4", MoeGemvConfig(4, GemvTile(16, 64, 2), GemvTile(16, 64, 2)))
    assert rel_err(out, ref) <= TOL


def test_moe_gemv_is_the_default_for_few_pairs(monkeypatch):
    """Auto selection: experts of either format take the GEMV path up to its max_pairs and the
    grouped GEMMs above; the env override moves the crossover or turns the path off."""
    from sglang.srt.layers.moe.fused_moe_triton import fused_moe as fm

    calls = []
    real = fm.moe_gemv
    monkeypatch.setattr(fm, "moe_gemv", lambda *a: calls.append(a) or real(*a))
    for fmt in ("bf16", "nvfp4"):
        layer = make_moe_layer(4, 64, 32, 2, fmt)
        x = torch.randn(2, 64, device=DEV).bfloat16()
        topk = make_routing(2, 4, 2, False)
        ref = reference(layer, x, topk, fmt)  # before the triton runner repacks the weights
        calls.clear()
        assert rel_err(run_triton(layer, x, topk, fmt), ref) <= TOL and len(calls) == 1
        limit = get_moe_gemv_config(0, fmt).max_pairs
        assert limit >= 8, fmt  # one token of top-8 at least
        assert get_moe_gemv_config(limit, fmt) is not None and get_moe_gemv_config(limit + 1, fmt) is None
    monkeypatch.setenv("SGLANG_MOE_GEMV_MAX_PAIRS", "200")
    assert get_moe_gemv_config(200, "nvfp4") is not None
    monkeypatch.setenv("SGLANG_MOE_GEMV_MAX_PAIRS", "0")
    assert get_moe_gemv_config(4, "bf16") is None and get_moe_gemv_config(1, "nvfp4") is None


def test_moe_gemv_rejects_bad_fp4_tiles():
    layer = make_moe_layer(3, 64, 32, 1, "nvfp4")
    topk = make_routing(1, 3, 1, False)
    bad = MoeGemvConfig(1, GemvTile(16, 96, 4), GemvTile(16, 64, 4))
    with pytest.raises(ValueError, match="block_k"):
        run_triton(layer, torch.randn(1, 64, device=DEV).bfloat16(), topk, "nvfp4", bad)
    too_deep = MoeGemvConfig(1, GemvTile(16, 64, 4, 4), GemvTile(16, 64, 4))
    with pytest.raises(ValueError, match="num_stages 4"):
        run_triton(layer, torch.randn(1, 64, device=DEV).bfloat16(), topk, "nvfp4", too_deep)


# ---------------------------------------------------------------- GPU only, real and awkward shapes


@gpu_only
@pytest.mark.parametrize("weight_format", ["nvfp4", "bf16"])
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256, 1024, 4096, 8192])
def test_real_shapes(weight_format, m):
    layer = make_moe_layer(128, 2816, 704, 8, weight_format)
    x = torch.randn(m, 2816, device="cuda").bfloat16()
    topk = make_routing(m, 128, 8, skewed=(m % 3 == 1))
    # The reference loops over experts in fp32; cap its cost by checking a row subset at large M.
    rows = torch.arange(m, device="cuda") if m <= 1024 else torch.randperm(m, device="cuda")[:512]
    sub = TopKOutput(topk.topk_weights[rows], topk.topk_ids[rows], topk.router_logits[rows])
    ref = reference(layer, x[rows], sub, weight_format)
    _poison_allocator()
    out = run_triton(layer, x, topk, weight_format)
    assert rel_err(out[rows], ref) <= TOL
    if m <= 8:  # the per-pair GEMV path, forced: the configured tiles, and tiles leaving a K tail
        configured = get_moe_gemv_config(0, weight_format)
        for cfg in (configured, MoeGemvConfig(m * 8, GemvTile(32, 512, 4), GemvTile(64, 128, 8))):
            _poison_allocator()
            assert rel_err(run_triton(layer, x, topk, weight_format, cfg)[rows], ref) <= TOL, cfg
    if m <= 64:  # GEMM1 split-K, at the decode sizes it is meant for, with the configured tiles
        cfg = get_moe_config(m, 128, 2816, 704, 8, weight_format)
        for split_k in (2, 4, 8):
            split = dataclasses.replace(cfg, gemm1=dataclasses.replace(cfg.gemm1, split_k=split_k))
            _poison_allocator()
            assert rel_err(run_triton(layer, x, topk, weight_format, split)[rows], ref) <= TOL, split_k


@gpu_only
@pytest.mark.parametrize("weight_format", ["nvfp4", "bf16"])
@pytest.mark.parametrize(
    "num_experts,hidden,inter,m,top_k,skewed",
    [(60, 512, 176, 333, 4, True), (7, 256, 96, 8192, 1, True), (33, 384, 208, 1, 8, False), (128, 2816, 704, 77, 2, True)],
)
def test_awkward_shapes(weight_format, num_experts, hidden, inter, m, top_k, skewed):
    layer = make_moe_layer(num_experts, hidden, inter, top_k, weight_format, "silu" if top_k == 4 else "gelu_pytorch_tanh")
    x = torch.randn(m, hidden, device="cuda").bfloat16()
    topk = make_routing(m, num_experts, top_k, skewed)
    ref = reference(layer, x, topk, weight_format)
    _poison_allocator()
    out = run_triton(layer, x, topk, weight_format)
    assert rel_err(out, ref) <= TOL


@gpu_only
@pytest.mark.parametrize("weight_format", ["nvfp4", "bf16"])
@pytest.mark.parametrize("swap", [0, 1])
@pytest.mark.parametrize("block_m", [16, 64, 128])
@pytest.mark.parametrize("split_k", [1, 4])
def test_forced_tiles(weight_format, swap, block_m, split_k):
    """Every tile family the tables may pick, at a shape where I is not a multiple of the tile."""
    layer = make_moe_layer(20, 512, 176, 4, weight_format)
    x = torch.randn(300, 512, device="cuda").bfloat16()
    topk = make_routing(300, 20, 4, True)
    cfg = MoeTileConfig(block_m, tile(64, 128, 4, 3, swap, split_k), tile(128, 64, 8, 3, swap))
    ref = reference(layer, x, topk, weight_format)
    out = run_triton(layer, x, topk, weight_format, cfg)
    assert rel_err(out, ref) <= TOL


@gpu_only
@pytest.mark.parametrize("m", [1, 7, 64, 1000])
def test_nvfp4_linear_gpu(m):
    n, k = 2816, 2112
    w = torch.randn(n, k, device="cuda") * 0.02
    packed, scale, gs = quantize_nvfp4(w)
    x = torch.randn(m, k, device="cuda").bfloat16()
    y = nvfp4_linear(x, packed, scale, gs)
    ref = x.float() @ dequantize_nvfp4(packed, scale, gs).t()
    assert rel_err(y, ref) <= TOL


def test_config_lookup_has_a_default():
    cfg = get_moe_config(3, 17, 96, 80, 2, "nvfp4")
    assert cfg.block_m in (16, 32, 64, 128)


@pytest.mark.parametrize("card", ["H100", "H200"])
def test_tuned_tables_cover_both_hopper_cards(card, monkeypatch):
    """Both cards have measured tables for the 26B-A4B experts in both formats: every bucket is
    found there, not in the shape-agnostic default (which at 1024 NVFP4 tokens would take 128-row
    swapped tiles; both sweeps chose 32-row blocks)."""
    from sglang.srt.layers.moe.fused_moe_triton import configs

    monkeypatch.setattr(configs, "device_key", lambda: card)
    for fmt in ("nvfp4", "bf16"):
        table = configs.TUNED_MOE_CONFIGS[(card, fmt, 128, 2816, 704, 8)]
        for m in (1, 16, 256, 1024, 8192):
            assert get_moe_config(m, 128, 2816, 704, 8, fmt) == next(c for max_m, c in table if m <= max_m)
    assert get_moe_config(1024, 128, 2816, 704, 8, "nvfp4").block_m == 32


def test_config_file_replaces_its_buckets(tmp_path, monkeypatch):
    """SGLANG_MOE_CONFIG_FILE (what `bench_moe_nvfp4.py --tune` writes): its rows replace the built-in
    rows of the same bucket, the other buckets stay, a new card or shape gets a table of its own."""
    from sglang.srt.layers.moe.fused_moe_triton import configs

    rows = [[128, 16, [64, 64, 4, 4, 0, 1, 2], [64, 64, 4, 4, 0, 1, 4]]]
    entries = [{"device": "H200", "format": "nvfp4", "shape": [128, 2816, 704, 8], "rows": rows},
               {"device": "L40S", "format": "bf16", "shape": [60, 96, 80, 2], "rows": [[1 << 30, 32] + rows[0][2:]]}]  # fmt: skip
    path = tmp_path / "moe_configs.json"
    path.write_text(json.dumps(entries))
    monkeypatch.setenv("SGLANG_MOE_CONFIG_FILE", str(path))
    configs.tuned_tables.cache_clear()
    try:
        monkeypatch.setattr(configs, "device_key", lambda: "H200")
        cfg = get_moe_config(64, 128, 2816, 704, 8, "nvfp4")
        assert (cfg.block_m, cfg.gemm1.group_n, cfg.gemm2.group_n) == (16, 2, 4)
        builtin = dict(configs.TUNED_MOE_CONFIGS[("H200", "nvfp4", 128, 2816, 704, 8)])
        assert get_moe_config(16, 128, 2816, 704, 8, "nvfp4") == builtin[32]
        assert get_moe_config(256, 128, 2816, 704, 8, "nvfp4") == builtin[512]
        monkeypatch.setattr(configs, "device_key", lambda: "L40S")
        assert get_moe_config(7, 60, 96, 80, 2, "bf16").block_m == 32
        path.write_text(json.dumps([{"device": "H200", "format": "nvfp4", "rows": rows}]))
        configs.tuned_tables.cache_clear()
        with pytest.raises(ValueError, match="moe_configs.json.*shape"):
            get_moe_config(64, 128, 2816, 704, 8, "nvfp4")
        bad = [[128, 16, [64, 32, 4, 4, 0], rows[0][3]]]  # block_k 32: no whole FP4 blocks
        path.write_text(json.dumps([{**entries[0], "rows": bad}]))
        configs.tuned_tables.cache_clear()
        with pytest.raises(ValueError, match="moe_configs.json.*block_k"):
            configs.tuned_tables()
    finally:
        configs.tuned_tables.cache_clear()


def test_tuner_writes_a_config_file(tmp_path):
    """bench_moe_nvfp4.py --tune's winners land in the built-in buckets holding each tuned M (the
    H200 table), or in geometric-middle buckets for a card without one; the file reads back."""
    from sglang.srt.layers.moe.fused_moe_triton import configs

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))
    from bench_moe_nvfp4 import config_file_entries

    best = {"block_m": 16, "gemm1": (64, 64, 4, 4, 0, 1, 1), "gemm2": (64, 64, 4, 4, 0, 1, 4)}
    tuned = {"nvfp4": [(256, {**best, "block_m": 32}), (16, best), (64, best)]}
    for device, bounds in (("H200", [32, 128, 512]), ("L40S", [32, 128, 1 << 30])):
        path = tmp_path / f"{device}.json"
        path.write_text(json.dumps(config_file_entries(tuned, device)))
        rows = configs.read_config_file(str(path))[(device, "nvfp4", 128, 2816, 704, 8)]
        assert [b for b, _ in rows] == bounds
        assert rows[2][1].block_m == 32 and rows[0][1].gemm2.group_n == 4


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    _compile_split_k_for_sm90()
