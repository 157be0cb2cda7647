"""Decode step GPU time per batch size with the MoE's per-pair GEMV path on and off.

    python benchmark/bench_moe_gemv_step.py [--model-path nvidia/Gemma-4-26B-A4B-NVFP4] [--batch-sizes 1 2 4 8]

Loads the model once (dummy weights, real config); for each setting of SGLANG_MOE_GEMV_MAX_PAIRS
(0: grouped GEMMs always; unset: the configured crossover, configs.GEMV_CONFIGS) captures the decode
CUDA graphs again and times each batch size's graph replayed back to back (profile_step's GPU-only
figure), as bench_dual_stream.py does for the second stream.
"""

from __future__ import annotations

import os

import torch

from bench_dual_stream import recapture_and_replay, runner_for_batch_sizes
from sglang.srt.layers.moe.fused_moe_triton.configs import GEMV_CONFIGS

ENV = "SGLANG_MOE_GEMV_MAX_PAIRS"


def main() -> None:
    args, runner = runner_for_batch_sizes(__doc__.split("\n")[0], [1, 2, 4, 8])
    times = {}
    for setting in ("0", None):
        if setting is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = setting
        for bs, ms in recapture_and_replay(runner, args.batch_sizes, args.input_len).items():
            times[setting, bs] = ms
    os.environ.pop(ENV, None)
    print(f"{torch.cuda.get_device_name()}, {args.model_path} (dummy weights), input {args.input_len}, "
          f"kv cache {str(runner.kv_cache.dtype).removeprefix('torch.')}; GEMV configs {GEMV_CONFIGS}")  # fmt: skip
    for bs in args.batch_sizes:
        grouped, default = times["0", bs], times[None, bs]
        print(f"batch {bs:3d}: grouped GEMMs {grouped:.3f} ms, configured {default:.3f} ms, ratio {default / grouped:.3f}")


if __name__ == "__main__":
    main()
