"""bf16 linear of one row (batch-1 decode) at Gemma-4-26B-A4B's dense shapes: our Triton GEMV
against cuBLAS (F.linear), inside CUDA graphs as the server runs them.

Each timed call reads a different copy of the weight (copies cover >= 400 MB) so nothing is served
from the 50 MB L2, as in a real step where ~100 MB of other weights pass between two reads of one.
Reports us per call, effective bandwidth (weight bytes / time) and its ratio to the device copy
bandwidth measured in the same run; `--tune` sweeps tile configs and prints the best per shape.

    python benchmark/bench_gemv.py --tune --json benchmark/results/DATE_h200_gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_moe_nvfp4 import measure_ceilings, time_graph  # noqa: E402

from sglang.srt.layers.triton_ops.gelu_and_mul import gelu_tanh_and_mul  # noqa: E402
from sglang.srt.layers.triton_ops.gemv import gemv, gemv_config, gemv_gelu_tanh_and_mul  # noqa: E402

# (name, N, K, calls per decode step) for nvidia/Gemma-4-26B-A4B-NVFP4 (25 sliding + 5 full layers).
SHAPES = [
    ("qkv sliding", 8192, 2816, 25),
    ("qk full (k=v)", 9216, 2816, 5),
    ("o sliding", 2816, 4096, 25),
    ("o full", 2816, 8192, 5),
    ("mlp gate_up", 4224, 2816, 30),
    ("mlp down", 2816, 2112, 30),
    ("router", 128, 2816, 30),
    ("lm head", 262144, 2816, 1),
]
# stages: K steps in flight (gemv._gemv_kernel); 1 is the kernel as it ran before 2026-12-08.
TUNE_SPACE = {"block_n": [4, 8, 16], "block_k": [256, 512, 1024, 2048], "warps": [4, 8], "stages": [1, 2, 3]}


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    count = max(1, -(-400_000_000 // (2 * n * k)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]


def time_per_call(fn, ws: list[torch.Tensor], x: torch.Tensor) -> float:
    calls = [lambda w=w: fn(x, w) for w in ws] * max(1, 8 // len(ws))
    return time_graph(calls, replays=7)


def bench_shape(n: int, k: int, tune: bool) -> dict:
    ws = weight_copies(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ ws[0].float().T
    err = lambda y: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    row = {"n": n, "k": k, "cublas_s": time_per_call(F.linear, ws, x), "cublas_err": err(F.linear(x, ws[0]))}
    default = gemv_config(n, k)
    # Steps ahead of 2048-wide ones would hold 3 x 64 registers of weights a thread: not swept.
    sweep = [c for c in itertools.product(*TUNE_SPACE.values()) if c != default and (c[3] == 1 or c[1] <= 1024)]
    configs = [default] + (sweep if tune else [])
    best = None
    for cfg in configs:
        try:
            t = time_per_call(lambda a, w, c=cfg: gemv(a, w, c), ws, x)
        except Exception as e:  # out of shared memory / registers for this tile: skip it
            print(f"  config {cfg} failed: {type(e).__name__}", flush=True)
            continue
        if cfg == default:
            row["default_s"], row["default_err"] = t, err(gemv(x, ws[0], cfg))
        if best is None or t < best[0]:
            best = (t, cfg)
    row["best_s"], row["best_config"] = best
    return row


def bench_gated(n: int = 4224, k: int = 2816) -> dict:
    """The dense MLP's gate_up projection and its tanh-GELU(gate) * up: two launches (GEMV, then
    gelu_tanh_and_mul) against the GEMV with the activation in its epilogue, at a few row tiles."""
    ws = weight_copies(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    row = {"two_launches_s": time_per_call(lambda a, w: gelu_tanh_and_mul(gemv(a, w)), ws, x)}
    for block_n in (4, 8, 16):
        cfg = (block_n, 1024, 4, 3)
        row[f"fused_{block_n}_s"] = time_per_call(lambda a, w, c=cfg: gemv_gelu_tanh_and_mul(a, w, c), ws, x)
    row["fused_default_s"] = time_per_call(gemv_gelu_tanh_and_mul, ws, x)
    print("mlp gate_up + gelu: " + ", ".join(f"{key[:-2]} {t * 1e6:.2f} us" for key, t in row.items()), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true", help="sweep tile configs (slow: one compile per config)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    ceil = measure_ceilings()
    bw = ceil["copy_bw_Bps"]
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s")
    rows = []
    print(f"{'shape':15s} {'cuBLAS us':>9s} {'%copy':>6s} {'ours us':>8s} {'%copy':>6s} {'best us':>8s} best config (bn,bk,warps,stages)  err ours/cuBLAS")
    for name, n, k, per_step in SHAPES:
        r = bench_shape(n, k, args.tune) | {"shape": name, "calls_per_step": per_step}
        rows.append(r)
        nbytes = 2 * n * k
        pct = lambda t: 100 * nbytes / t / bw  # noqa: E731
        print(f"{name:15s} {r['cublas_s'] * 1e6:9.2f} {pct(r['cublas_s']):5.0f}% {r['default_s'] * 1e6:8.2f} {pct(r['default_s']):5.0f}%"
              f" {r['best_s'] * 1e6:8.2f} {str(r['best_config']):22s} {r['default_err']:.1e}/{r['cublas_err']:.1e}", flush=True)  # fmt: skip
    step = lambda key: sum(r[key] * r["calls_per_step"] for r in rows) * 1e6  # noqa: E731
    print(f"dense time per batch-1 decode step: cuBLAS {step('cublas_s'):.0f} us, ours {step('default_s'):.0f} us, best-tuned {step('best_s'):.0f} us")
    gated = bench_gated()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "ceilings": ceil, "rows": rows, "gated": gated}, f, indent=1)


if __name__ == "__main__":
    main()
