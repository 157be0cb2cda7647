"""Run the NVFP4 MoE layer (E=128, H=2816, I=704, top-8, random weights) at the given token counts,
three calls each with serving's choice of path and tiles, for a profiler to look at:

    ncu --clock-control none -k regex:"moe_gemm|moe_gemv" --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        --section LaunchStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        python3 benchmark/run_moe_layer.py 64

(--launch-skip 2 passes over the first call's kernels, which include Triton's compile.)
"""

from __future__ import annotations

import argparse

import torch

import bench_moe_nvfp4 as bench
from sglang.srt.layers.moe.fused_moe_triton.fused_moe import fused_experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("m", type=int, nargs="+", help="tokens per call")
    args = ap.parse_args()
    w = bench.make_weights("nvfp4", init=True)
    for m in args.m:
        for x, r in bench.make_routings(m, seed=0)[:3]:
            fused_experts(x, w, r.topk_weights, r.topk_ids, bench.ACT)
        torch.cuda.synchronize()
        print(f"M={m}: 3 calls done", flush=True)


if __name__ == "__main__":
    main()
