"""Benchmark (and tile tuning) of the Triton fused-MoE path, NVFP4 vs bf16 experts, on one GPU.

  python benchmark/bench_moe_nvfp4.py            # table with the configured tiles (configs.py)
  python benchmark/bench_moe_nvfp4.py --tune     # sweep tiles per M first and use the best ones
  python benchmark/bench_moe_nvfp4.py --tune --formats nvfp4 --m 1 16   # a part of the sweep
  python benchmark/bench_moe_nvfp4.py --tune --m 1 4 16 64        # the decode sizes (GEMM1 split-K too)

Shapes: E=128, H=2816, I=704, top-8 (Gemma 4 26B-A4B), random weights, random routing.
Timing: each point captures R calls with R different routings (and inputs) in one CUDA graph and
replays it (serving decodes under CUDA graphs; varying the routing keeps the touched experts from
sitting in L2 between calls); median over replays, divided by R. Ceilings measured in the same run:
device-to-device copy (bytes read + written; the faster of `copy_`, a cudaMemcpy, and an elementwise
kernel, which streams through the SMs like the MoE kernels) and an 8192^3 bf16 matmul.
Writes results JSON (and the tuned table) to $OUT or --out.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from types import SimpleNamespace
from typing import Callable

import torch

E, H, I, TOP_K = 128, 2816, 704, 8
M_LIST = [1, 4, 16, 64, 256, 1024, 4096, 8192]
ACT = "gelu_pytorch_tanh"
ROUTINGS = 8  # calls per graph, each with its own routing
UNFUSED_M = (1, 64, 1024, 8192)  # points where the separate-activation variant is timed too

# Tile candidates (block_n, block_k, num_warps, num_stages, swap_ab) for the sweep. NVFP4 tiles need
# block_k a multiple of 64; with block_m >= 64 they always run swapped (see fused_moe._launch_kwargs).
SMALL_TILES = {
    "nvfp4": [
        (32, 128, 4, 4, 0), (32, 256, 4, 3, 0), (16, 256, 2, 4, 0), (16, 128, 2, 4, 0), (64, 128, 4, 4, 0),
        (64, 64, 4, 4, 0), (64, 64, 4, 6, 0), (64, 64, 8, 4, 0), (128, 64, 8, 4, 0), (32, 64, 4, 4, 0),
        (32, 128, 4, 6, 0), (64, 256, 8, 3, 0), (64, 64, 4, 4, 1), (32, 64, 2, 4, 1), (64, 64, 2, 4, 1),
        (32, 128, 2, 4, 1), (32, 64, 2, 6, 1),
    ],
    "bf16": [
        (32, 128, 4, 4, 0), (64, 128, 4, 4, 0), (64, 128, 4, 4, 1), (128, 128, 4, 3, 1), (16, 128, 4, 4, 0),
        (32, 128, 8, 4, 0), (64, 128, 8, 4, 0), (16, 256, 4, 3, 0), (32, 256, 8, 3, 0), (64, 256, 8, 3, 1),
    ],
}  # fmt: skip
LARGE_TILES = {
    "nvfp4": [
        (64, 64, 4, 3, 1), (128, 64, 8, 3, 1), (128, 64, 4, 3, 1), (64, 128, 4, 3, 1), (128, 128, 8, 3, 1),
        (256, 64, 8, 3, 1), (64, 64, 4, 4, 1), (128, 64, 8, 4, 1),
    ],
    "bf16": [
        (64, 64, 4, 3, 0), (128, 64, 8, 3, 0), (128, 64, 4, 4, 0), (128, 64, 8, 4, 1), (64, 128, 4, 4, 1),
        (256, 64, 8, 3, 0), (64, 64, 8, 3, 0), (128, 128, 8, 3, 0), (64, 128, 8, 3, 0),
    ],
}  # fmt: skip


# Tile groups (group_n: neighbouring N tiles one program computes in one loop), tried on the tiles the
# sweeps favoured: tuples as above plus (split_k, group_n). GEMM2's N = H = 2816 is 44 tiles of 64.
GROUP_TILES = {
    ("nvfp4", "g1", False): [(64, 64, 4, 4, 0, 1, g) for g in (2, 3)] + [(64, 64, 4, 6, 0, 1, 2)],
    ("nvfp4", "g2", False): [(64, 64, 4, 4, 0, 1, g) for g in (2, 4, 11)] + [(64, 64, 4, 6, 0, 1, g) for g in (2, 4)]
    + [(128, 64, 8, 4, 0, 1, 2), (32, 64, 4, 4, 0, 1, 4)],
    ("nvfp4", "g1", True): [(64, 64, 4, 4, 1, 1, 2), (64, 64, 4, 3, 1, 1, 2)],
    ("nvfp4", "g2", True): [(64, 64, 4, 3, 1, 1, g) for g in (2, 4)] + [(64, 64, 4, 4, 1, 1, 2)],
    # bf16 from 64 tokens a block (prefill, and NVFP4 experts expanded to bf16): GEMM2 is 11 steps too.
    ("bf16", "g1", True): [(128, 64, 8, 4, 1, 1, 2), (128, 64, 8, 3, 0, 1, 2)],
    ("bf16", "g2", True): [(256, 64, 8, 3, 0, 1, g) for g in (2, 11)] + [(128, 64, 8, 4, 0, 1, g) for g in (2, 4)],
}


def group_tiles_for(fmt: str, gemm: str, block_m: int) -> list[tuple]:
    """bf16 below 64-row blocks has none: those tiles already run near the copy rate."""
    return GROUP_TILES.get((fmt, gemm, block_m > 32), [])


# GEMM1 split-K (slices of K per output tile) tried with every tile up to this many tokens, where
# the unsplit grid (block count x N tiles) leaves SMs idle. 3 and 6 against wave quantisation: at one
# token and 64-row tiles, 8 experts x 22 N tiles x 4 slices = 704 programs are 1.33 waves at 4
# programs per SM on 132 SMs, x 3 = 528 exactly one (not yet swept on the GPU).
SPLIT_KS = (1, 2, 3, 4, 6, 8)
SPLIT_K_MAX_M = 64


# The per-pair GEMV path (moe_gemv.py) is swept up to this many tokens; tiles are
# (block_n, block_k, num_warps, num_stages). GEMM2's K (I = 704) has 11 blocks of 64.
GEMV_MAX_M = 8
GEMV1_TILES = {
    "bf16": [(bn, bk, w, s) for bn in (16, 32) for bk in (128, 256, 512) for w in (2, 4, 8) for s in (1, 3)],
    # NVFP4: the 4th field is the steps loaded ahead by hand (Triton does not pipeline these loads).
    "nvfp4": [(bn, bk, w, s) for bn in (8, 16, 32) for bk in (64, 128, 256, 512, 1024) for w in (1, 2, 4, 8)
              for s in (1, 2, 3) if s == 1 or bk <= 512],
}
GEMV2_TILES = {
    "bf16": [(bn, bk, w, s) for bn in (16, 32, 64) for bk in (64, 128, 256) for w in (2, 4, 8) for s in (1, 3)],
    # K = 704: a 1024-wide step would be narrowed to 512 (moe_gemv._launch), a duplicate.
    "nvfp4": [(bn, bk, w, s) for bn in (8, 16, 32) for bk in (64, 128, 256, 512) for w in (1, 2, 4, 8)
              for s in (1, 2, 3) if s == 1 or bk <= 256],
}


def block_m_candidates(m: int) -> list[int]:
    per_expert = m * TOP_K / E
    if per_expert <= 4:
        return [16]
    if per_expert <= 16:
        return [16, 32]
    if per_expert <= 64:
        return [32, 64]
    return [64, 128]


def tiles_for(fmt: str, block_m: int) -> list[tuple]:
    return (SMALL_TILES if block_m <= 32 else LARGE_TILES)[fmt]


def gemm1_tiles_for(fmt: str, block_m: int, m: int) -> list[tuple]:
    """GEMM1 candidates: the tiles, each with every split-K count at small M (6-tuples, as `tile`)."""
    splits = SPLIT_KS if m <= SPLIT_K_MAX_M else (1,)
    return [t + (s,) for t in tiles_for(fmt, block_m) for s in splits] + group_tiles_for(fmt, "g1", block_m)


def gemm2_tiles_for(fmt: str, block_m: int) -> list[tuple]:
    return tiles_for(fmt, block_m) + group_tiles_for(fmt, "g2", block_m)


# ----------------------------------------------------------------------------- setup


def make_weights(fmt: str, init: bool):
    """ExpertWeights at the real shapes (NVFP4 in the kernels' repacked layout); init=False leaves
    memory uninitialised (compile-only use)."""
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import ExpertWeights, prepare_nvfp4_experts
    from sglang.srt.layers.moe.fused_moe_triton.kernels import FP4_BLOCK_WORDS
    from sglang.srt.layers.quantization.fp4_utils import quantize_nvfp4

    dev = "cuda"
    if fmt == "bf16":
        if not init:
            return ExpertWeights(torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=dev),
                                 torch.empty(E, H, I, dtype=torch.bfloat16, device=dev))  # fmt: skip
        return ExpertWeights((torch.randn(E, 2 * I, H, device=dev) * 0.03).bfloat16(),
                             (torch.randn(E, H, I, device=dev) * 0.03).bfloat16())  # fmt: skip
    if not init:
        i32, words = torch.int32, FP4_BLOCK_WORDS
        return ExpertWeights(
            torch.empty(E, 2 * I // 16, -(-H // 64), words, dtype=i32, device=dev),
            torch.empty(E, H // 16, -(-I // 64), words, dtype=i32, device=dev),
            torch.ones(E, 2, device=dev), torch.ones(E, device=dev),
        )  # fmt: skip

    def quant(rows: int, cols: int, std: float):
        parts = [quantize_nvfp4(torch.randn(rows, cols, device=dev) * std) for _ in range(E)]
        return [torch.stack(p) for p in zip(*parts)]

    pg, sg, gg = quant(I, H, 0.05)
    pu, su, gu = quant(I, H, 0.02)
    p2, s2, g2 = quant(H, I, 0.03)
    checkpoint = SimpleNamespace(w13=torch.cat([pg, pu], 1), w2=p2, w13_scale=torch.cat([sg, su], 1), w2_scale=s2,
                                 w13_scale_2=torch.stack([gg, gu], 1), w2_scale_2=g2)  # fmt: skip
    w = prepare_nvfp4_experts(checkpoint.w13, checkpoint.w2, checkpoint.w13_scale, checkpoint.w2_scale,
                              checkpoint.w13_scale_2, checkpoint.w2_scale_2)  # fmt: skip
    w.checkpoint = checkpoint  # the torch reference reads the checkpoint layout
    return w


def expert_bytes(fmt: str) -> int:
    """Bytes one expert's weights (+ block and global scales for NVFP4) occupy."""
    if fmt == "bf16":
        return 2 * 3 * I * H
    return 3 * I * H // 2 + 3 * I * H // 16 + 3 * 4


def make_routings(m: int, seed: int):
    from sglang.srt.layers.moe.topk import gemma4_topk

    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(ROUTINGS):
        logits = torch.randn(m, E, device="cuda", generator=gen)
        scale = torch.rand(E, device="cuda", generator=gen) + 0.5
        out.append((torch.randn(m, H, device="cuda", generator=gen).bfloat16(), gemma4_topk(logits, TOP_K, scale)))
    return out


# ----------------------------------------------------------------------------- timing


def warm_up_gpu(seconds: float = 0.5) -> None:
    """Run large copies for a while so that clocks have ramped up before anything is timed."""
    a = torch.randn(1 << 26, device="cuda")
    b = torch.empty_like(a)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            b.copy_(a)
        torch.cuda.synchronize()


def time_graph(calls: list[Callable[[], object]], replays: int = 10) -> float:
    """Seconds per call: all calls captured in one CUDA graph, median over replays."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        graph.replay()
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) / 1e3)
    del graph
    return statistics.median(times) / len(calls)


def time_eager(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings() -> dict:
    warm_up_gpu()
    n = 1 << 28  # fp32 elements: 1 GiB each way
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    t_memcpy = time_graph([lambda: b.copy_(a)] * 4)
    t_kernel = time_graph([lambda: torch.mul(a, 1.0, out=b)] * 4)
    t_copy = min(t_memcpy, t_kernel)
    n *= 4
    del a, b
    x = torch.randn(8192, 8192, device="cuda").bfloat16()
    y = torch.randn(8192, 8192, device="cuda").bfloat16()
    t_mm = time_graph([lambda: x @ y] * 4)
    return {"copy_bw_Bps": 2 * n / t_copy, "memcpy_bw_Bps": 2 * n / t_memcpy, "kernel_copy_bw_Bps": 2 * n / t_kernel,
            "bf16_mm_flops": 2 * 8192**3 / t_mm}  # fmt: skip


# ----------------------------------------------------------------------------- tuning


def _jobs(formats: list[str], m_list: list[int], grouped: bool = True) -> list[tuple]:
    """Kernel variants of the sweep; grouped=False: the GEMV path's only."""
    jobs = []
    for fmt in formats:
        for m in m_list:
            for bm in block_m_candidates(m) if grouped else ():
                jobs.append((fmt, m, bm, "align", None))
                jobs += [(fmt, m, bm, "g1", t) for t in gemm1_tiles_for(fmt, bm, m)]
                jobs += [(fmt, m, bm, "g2", t) for t in gemm2_tiles_for(fmt, bm)]
            if m <= GEMV_MAX_M:
                jobs += [(fmt, m, 0, "v1", t) for t in GEMV1_TILES[fmt]] + [(fmt, m, 0, "v2", t) for t in GEMV2_TILES[fmt]]
    # One variant's jobs for the different M next to each other: they tend to land in one worker's
    # chunk, which compiles the variant once instead of several workers compiling it at once.
    return sorted(jobs, key=lambda j: (j[0], j[2], j[3], str(j[4]), j[1]))


_WORKER_STATE: dict = {}


def _compile_job(job: tuple) -> str:
    """Launch one kernel variant once on uninitialised data so Triton compiles it into its disk cache."""
    from sglang.srt.layers.moe.fused_moe_triton import fused_moe as fm
    from sglang.srt.layers.moe.fused_moe_triton import moe_gemv as mv
    from sglang.srt.layers.moe.fused_moe_triton.configs import GemvTile, tile

    fmt, m, bm, kind, t = job
    if fmt not in _WORKER_STATE:
        _WORKER_STATE.clear()
        _WORKER_STATE[fmt] = make_weights(fmt, init=False)
    w = _WORKER_STATE[fmt]
    ids = torch.randint(0, E, (m, TOP_K), dtype=torch.int32, device="cuda")
    try:
        if kind == "v1":
            mv.moe_gemv1(torch.randn(m, H, device="cuda").bfloat16(), w, ids, 0, GemvTile(*t))
        elif kind == "v2":
            h = torch.zeros(m * TOP_K, I, dtype=torch.bfloat16, device="cuda")
            mv.moe_gemv2(h, w, ids, torch.rand(m, TOP_K, device="cuda"), GemvTile(*t))
        elif kind == "g1":
            aligned = fm.moe_align(ids, E, bm)
            fm.moe_gemm1(torch.randn(m, H, device="cuda").bfloat16(), w, aligned, TOP_K, ACT, tile(*t))
        elif kind == "g2":
            aligned = fm.moe_align(ids, E, bm)
            h = torch.zeros(aligned.max_blocks * bm, I, dtype=torch.bfloat16, device="cuda")
            out = torch.empty(m * TOP_K, H, dtype=torch.bfloat16, device="cuda")
            fm.moe_gemm2(h, w, aligned, torch.rand(m, TOP_K, device="cuda"), out, tile(*t))
        else:
            fm.moe_align(ids, E, bm)
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # a tile that does not fit (shared memory, registers) is skipped
        return f"fail {job}: {type(exc).__name__}: {str(exc)[:120]}"


def _compile_layer_job(job: tuple) -> str:
    """Run the configured layer path once (fused and unfused activation, and for NVFP4 at M >= 1024
    both the in-loop and the expand-to-bf16 path) on uninitialised data: fills Triton's disk cache."""
    from sglang.srt.layers.moe.fused_moe_triton import fused_moe as fm

    fmt, m = job
    if fmt not in _WORKER_STATE:
        _WORKER_STATE.clear()
        _WORKER_STATE[fmt] = make_weights(fmt, init=False)
    w = _WORKER_STATE[fmt]
    x = torch.randn(m, H, device="cuda").bfloat16()
    ids = torch.randint(0, E, (m, TOP_K), dtype=torch.int32, device="cuda")
    topk_w = torch.rand(m, TOP_K, device="cuda")
    try:
        fm.fused_experts(x, w, topk_w, ids, ACT)
        if m in UNFUSED_M:
            fm.fused_experts(x, w, topk_w, ids, ACT, fuse_act=False)
        if fmt == "nvfp4" and m >= 1024:
            saved = fm.FP4_DEQUANT_MIN_TOKENS
            fm.FP4_DEQUANT_MIN_TOKENS = 1 << 30 if m >= saved else 1
            fm.fused_experts(x, w, topk_w, ids, ACT)
            fm.FP4_DEQUANT_MIN_TOKENS = saved
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:
        return f"fail {job}: {type(exc).__name__}: {str(exc)[:120]}"


def _compile_any(job: tuple) -> str:
    return _compile_job(job) if len(job) == 5 else _compile_layer_job(job)


def precompile(workers: int, formats: list[str], m_list: list[int], tune: str) -> None:
    """tune: "" (the configured layer path), "all" (every sweep variant) or "gemv" (GEMV variants
    and the configured layer path)."""
    jobs = _jobs(formats, m_list, grouped=tune == "all") if tune else []
    if tune != "all":
        jobs += [(fmt, m) for fmt in formats for m in m_list]
    # Group by format so each worker holds one weight set at a time.
    jobs.sort(key=lambda j: j[0])
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        fails = [r for r in pool.imap_unordered(_compile_any, jobs, chunksize=4 if tune else 1) if r != "ok"]
    print(f"precompiled {len(jobs)} variants in {time.time() - t0:.0f}s with {workers} workers; {len(fails)} failed")
    for f in fails[:10]:
        print("  ", f)


def time_tiles(tiles: list[tuple], calls_for: Callable[[tuple], list[Callable[[], object]]]) -> dict:
    """Seconds per call for each tile (`calls_for(tile)`: one call per routing, timed in one graph);
    inf for a tile that fails to compile or launch (shared memory, registers)."""
    times = {}
    for t in tiles:
        try:
            times[t] = time_graph(calls_for(t))
        except Exception:
            times[t] = float("inf")
    return times


def tune_point(fmt: str, w, m: int, routings) -> tuple[dict, dict]:
    """Best (block_m, gemm1 tile, gemm2 tile) for one M, timing each GEMM over all candidates."""
    from sglang.srt.layers.moe.fused_moe_triton import fused_moe as fm
    from sglang.srt.layers.moe.fused_moe_triton.configs import tile

    log, best = {}, None
    for bm in block_m_candidates(m):
        aligned = [fm.moe_align(r.topk_ids, E, bm) for _, r in routings]
        t_align = time_graph([lambda r=r: fm.moe_align(r.topk_ids, E, bm) for _, r in routings])
        g1 = time_tiles(gemm1_tiles_for(fmt, bm, m), lambda t: [
            lambda x=x, a=a: fm.moe_gemm1(x, w, a, TOP_K, ACT, tile(*t)) for (x, _), a in zip(routings, aligned)])  # fmt: skip
        t1 = min(g1, key=g1.get)
        unsplit = min((t for t in g1 if t[5:] in ((1,), (1, 1))), key=g1.get)
        print(f"{fmt} M={m} block_m={bm}: gemm1 best {t1} {g1[t1] * 1e6:.1f} us, best unsplit {unsplit} "
              f"{g1[unsplit] * 1e6:.1f} us", flush=True)  # fmt: skip
        hs = [fm.moe_gemm1(x, w, a, TOP_K, ACT, tile(*t1)) for (x, _), a in zip(routings, aligned)]
        outs = [torch.empty(m * TOP_K, H, dtype=torch.bfloat16, device="cuda") for _ in routings]
        g2 = time_tiles(gemm2_tiles_for(fmt, bm), lambda t: [
            lambda h=h, a=a, r=r, o=o: fm.moe_gemm2(h, w, a, r.topk_weights, o, tile(*t))
            for h, a, (_, r), o in zip(hs, aligned, routings, outs)])  # fmt: skip
        t2 = min(g2, key=g2.get)
        total = t_align + g1[t1] + g2[t2]
        log[bm] = {"align_us": t_align * 1e6, "gemm1_us": {str(k): v * 1e6 for k, v in g1.items()},
                   "gemm2_us": {str(k): v * 1e6 for k, v in g2.items()}}  # fmt: skip
        if best is None or total < best[0]:
            best = (total, bm, t1, t2)
    _, bm, t1, t2 = best
    tuned = {"block_m": bm, "gemm1": t1, "gemm2": t2, "grouped_us": best[0] * 1e6}
    if m <= GEMV_MAX_M:
        tuned["gemv"] = tune_gemv(w, m, routings, log)
    return tuned, log


def tune_gemv(w, m: int, routings, log: dict) -> dict:
    """Best tiles of the per-pair GEMV path: GEMM1 first, then GEMM2 on its output."""
    from sglang.srt.layers.moe.fused_moe_triton import moe_gemv as mv
    from sglang.srt.layers.moe.fused_moe_triton.configs import GemvTile

    fmt = "nvfp4" if w.is_fp4 else "bf16"
    g1 = time_tiles(GEMV1_TILES[fmt], lambda t: [
        lambda x=x, r=r: mv.moe_gemv1(x, w, r.topk_ids, 0, GemvTile(*t)) for x, r in routings])  # fmt: skip
    t1 = min(g1, key=g1.get)
    hs = [mv.moe_gemv1(x, w, r.topk_ids, 0, GemvTile(*t1)) for x, r in routings]
    g2 = time_tiles(GEMV2_TILES[fmt], lambda t: [
        lambda h=h, r=r: mv.moe_gemv2(h, w, r.topk_ids, r.topk_weights, GemvTile(*t))
        for h, (_, r) in zip(hs, routings)])  # fmt: skip
    t2 = min(g2, key=g2.get)
    log["gemv"] = {"gemm1_us": {str(k): v * 1e6 for k, v in g1.items()}, "gemm2_us": {str(k): v * 1e6 for k, v in g2.items()}}
    print(f"M={m} gemv: gemm1 {t1} {g1[t1] * 1e6:.1f} us, gemm2 {t2} {g2[t2] * 1e6:.1f} us", flush=True)
    return {"gemm1": t1, "gemm2": t2, "us": (g1[t1] + g2[t2]) * 1e6}


# ----------------------------------------------------------------------------- main


def bench_layer(fmt: str, w, m: int, routings, cfg, fuse_act: bool = True) -> float:
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import fused_experts

    return time_graph([lambda x=x, r=r: fused_experts(x, w, r.topk_weights, r.topk_ids, ACT, cfg, fuse_act)
                       for x, r in routings])  # fmt: skip


def torch_reference_time(fmt: str, w, m: int, routings) -> float:
    from sglang.srt.layers.moe.moe_runner.base import get_moe_runner

    layer = torch.nn.Module()
    layer.intermediate_size_per_partition, layer.activation = I, ACT
    if fmt == "nvfp4":
        w = w.checkpoint
    layer.w13_weight, layer.w2_weight = w.w13, w.w2
    if fmt == "nvfp4":
        layer.w13_weight_scale, layer.w2_weight_scale = w.w13_scale, w.w2_scale
        layer.w13_weight_scale_2, layer.w2_weight_scale_2 = w.w13_scale_2, w.w2_scale_2
    runner = get_moe_runner("torch", fmt)
    x, r = routings[0]
    return time_eager(lambda: runner.apply(layer, x, r))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-gemv", action="store_true",
                    help="sweep only the GEMV path's tiles (M <= 8) and compare with the configured grouped path")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--ref-max-m", type=int, default=64, help="largest M for the (slow) torch reference")
    ap.add_argument("--formats", nargs="+", default=["nvfp4", "bf16"], choices=["nvfp4", "bf16"])
    ap.add_argument("--m", nargs="+", type=int, default=M_LIST, help="token counts to run")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    from sglang.srt.layers.moe.fused_moe_triton import fused_moe as fm
    from sglang.srt.layers.moe.fused_moe_triton.configs import (
        GemvTile,
        MoeGemvConfig,
        MoeTileConfig,
        device_key,
        get_moe_config,
        get_moe_gemv_config,
        tile,
    )

    card = torch.cuda.get_device_name()
    print(f"card: {card}  triton {__import__('triton').__version__}  torch {torch.__version__}")
    if args.workers > 1:
        precompile(args.workers, args.formats, args.m, "all" if args.tune else "gemv" if args.tune_gemv else "")
    ceil = measure_ceilings()
    print(f"copy {ceil['copy_bw_Bps'] / 1e12:.2f} TB/s (memcpy {ceil['memcpy_bw_Bps'] / 1e12:.2f}, kernel "
          f"{ceil['kernel_copy_bw_Bps'] / 1e12:.2f})   bf16 matmul {ceil['bf16_mm_flops'] / 1e12:.0f} TFLOP/s")  # fmt: skip

    results = {"card": card, "device_key": device_key(), "ceilings": ceil, "shape": [E, H, I, TOP_K], "points": []}
    tuned = {}
    for fmt in args.formats:
        w = make_weights(fmt, init=True)
        for m in args.m:
            routings = make_routings(m, seed=m)
            if args.tune:
                best, log = tune_point(fmt, w, m, routings)
                cfg = MoeTileConfig(best["block_m"], tile(*best["gemm1"]), tile(*best["gemm2"]))
                gemv = best.get("gemv")
                if gemv and gemv["us"] < best["grouped_us"]:
                    cfg = MoeGemvConfig(m * TOP_K, GemvTile(*gemv["gemm1"]), GemvTile(*gemv["gemm2"]))
                tuned.setdefault(fmt, []).append((m, best))
                results.setdefault("sweeps", {})[f"{fmt}/{m}"] = log
            elif args.tune_gemv and m <= GEMV_MAX_M:
                gemv = tune_gemv(w, m, routings, results.setdefault("sweeps", {}).setdefault(f"{fmt}/{m}", {}))
                candidates = {"gemv": MoeGemvConfig(m * TOP_K, GemvTile(*gemv["gemm1"]), GemvTile(*gemv["gemm2"])),
                              "grouped": get_moe_config(m, E, H, I, TOP_K, fmt)}  # fmt: skip
                layer_us = {k: bench_layer(fmt, w, m, routings, c) * 1e6 for k, c in candidates.items()}
                cfg = candidates[min(layer_us, key=layer_us.get)]
                print(f"tuned gemv {fmt} M={m}: gemm1={gemv['gemm1']} gemm2={gemv['gemm2']} layer {layer_us['gemv']:.1f} us"
                      f" vs grouped {layer_us['grouped']:.1f} us", flush=True)  # fmt: skip
            else:
                cfg = get_moe_gemv_config(m * TOP_K, fmt) or get_moe_config(m, E, H, I, TOP_K, fmt)
            # NVFP4 from FP4_DEQUANT_MIN_TOKENS on: experts expanded to bf16, bf16 kernels with their tiles.
            dequant = fm.grouped_format(fmt, m) != fmt
            t = bench_layer(fmt, w, m, routings, None if dequant else cfg)
            touched = statistics.mean(len(torch.unique(r.topk_ids)) for _, r in routings)
            nbytes = touched * expert_bytes(fmt)
            flops = 2 * 3 * m * TOP_K * I * H
            point = {
                "fmt": fmt, "m": m, "time_us": t * 1e6, "experts_touched": touched, "bytes": nbytes,
                "eff_bw_Bps": nbytes / t, "bw_ratio": nbytes / t / ceil["copy_bw_Bps"],
                "floor_ratio": t / (nbytes / ceil["copy_bw_Bps"]), "tflops": flops / t / 1e12,
                "mm_ratio": flops / t / ceil["bf16_mm_flops"],
                "config": "bf16 table" if dequant else str(cfg),
            }  # fmt: skip
            if m in UNFUSED_M:
                point["unfused_act_us"] = bench_layer(fmt, w, m, routings, None if dequant else cfg, fuse_act=False) * 1e6
            if fmt == "nvfp4" and m >= 1024:
                # The other side of FP4_DEQUANT_MIN_TOKENS: experts expanded to bf16 first vs decoded in the loop.
                point["fp4_path"] = "dequant" if dequant else "in-loop"
                other = 1 << 30 if dequant else 1
                saved, fm.FP4_DEQUANT_MIN_TOKENS = fm.FP4_DEQUANT_MIN_TOKENS, other
                point["other_path_us"] = bench_layer(fmt, w, m, routings, cfg if dequant else None) * 1e6
                fm.FP4_DEQUANT_MIN_TOKENS = saved
            if m <= args.ref_max_m:
                point["torch_ref_us"] = torch_reference_time(fmt, w, m, routings) * 1e6
            results["points"].append(point)
            print(json.dumps(point), flush=True)
        del w
        torch.cuda.empty_cache()
    results["tuned"] = tuned
    os.makedirs(args.out, exist_ok=True)
    if tuned:
        path = os.path.join(args.out, "moe_configs.json")
        with open(path, "w") as f:
            json.dump(config_file_entries(tuned, device_key()), f, indent=1)
        print(f"tuned tables: {path} (serve with SGLANG_MOE_CONFIG_FILE={path})")
    with open(os.path.join(args.out, "bench_moe_nvfp4.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)


def config_file_entries(tuned: dict, device: str) -> list[dict]:
    """The sweep's winners as SGLANG_MOE_CONFIG_FILE entries (configs.read_config_file). Each tuned M
    gets the bucket of the built-in table that holds it (so its row replaces that one), or, for a
    card or shape without a table, a bucket up to the geometric middle of it and the next tuned M."""
    from sglang.srt.layers.moe.fused_moe_triton.configs import TUNED_MOE_CONFIGS

    entries = []
    for fmt, points in tuned.items():
        builtin = [b for b, _ in TUNED_MOE_CONFIGS.get((device, fmt, E, H, I, TOP_K), [])]
        ms = sorted(m for m, _ in points)
        rows = []
        for m, best in sorted(points, key=lambda p: p[0]):
            later = [n for n in ms if n > m]
            bound = next((b for b in builtin if b >= m), None) or (math.isqrt(m * later[0]) if later else 1 << 30)
            rows.append([bound, best["block_m"], list(best["gemm1"]), list(best["gemm2"])])
        entries.append({"device": device, "format": fmt, "shape": [E, H, I, TOP_K], "rows": rows})
    return entries


def print_table(results: dict) -> None:
    ceil = results["ceilings"]
    print(f"\n{results['card']}: copy {ceil['copy_bw_Bps'] / 1e12:.2f} TB/s, "
          f"bf16 mm {ceil['bf16_mm_flops'] / 1e12:.0f} TFLOP/s; E={E} H={H} I={I} top-{TOP_K}")  # fmt: skip
    by = {(p["fmt"], p["m"]): p for p in results["points"]}
    print(f"{'M':>5} | {'fp4 us':>8} {'GB/s':>6} {'%copy':>6} {'xfloor':>6} {'TF/s':>6} {'%mm':>5} | "
          f"{'bf16 us':>8} {'%copy':>6} {'TF/s':>6} | {'fp4/bf16':>8} | {'unfused':>8} | {'torch ref':>9}")  # fmt: skip
    for m in sorted({p["m"] for p in results["points"]}):
        f, b = by.get(("nvfp4", m)), by.get(("bf16", m))
        if not f:
            continue
        ref = f.get("torch_ref_us")
        unf = f.get("unfused_act_us")
        bf = (f"{b['time_us']:>8.1f} {100 * b['bw_ratio']:>5.0f}% {b['tflops']:>6.1f} | "
              f"{f['time_us'] / b['time_us']:>8.2f}") if b else f"{'-':>8} {'-':>6} {'-':>6} | {'-':>8}"  # fmt: skip
        print(f"{m:>5} | {f['time_us']:>8.1f} {f['eff_bw_Bps'] / 1e9:>6.0f} {100 * f['bw_ratio']:>5.0f}% "
              f"{f['floor_ratio']:>6.2f} {f['tflops']:>6.1f} {100 * f['mm_ratio']:>4.0f}% | {bf} | "
              f"{(f'{unf:.1f}' if unf else '-'):>8} | {(f'{ref:.0f}' if ref else '-'):>9}")  # fmt: skip
    others = [p for p in results["points"] if "other_path_us" in p]
    if others:
        print("NVFP4 large-batch paths (us): " + ", ".join(
            f"M={p['m']} {p['fp4_path']} {p['time_us']:.0f} / other {p['other_path_us']:.0f}" for p in others))  # fmt: skip
    for fmt, rows in results.get("tuned", {}).items():
        for m, best in rows:
            print(f"tuned {fmt} M={m}: block_m={best['block_m']} gemm1={tuple(best['gemm1'])} gemm2={tuple(best['gemm2'])}"
                  f" {best['grouped_us']:.1f} us")  # fmt: skip
            if "gemv" in best:
                g = best["gemv"]
                print(f"tuned gemv {fmt} M={m}: gemm1={tuple(g['gemm1'])} gemm2={tuple(g['gemm2'])} {g['us']:.1f} us")


if __name__ == "__main__":
    main()
