"""Decode step GPU time per batch size with the built-in MoE tile tables and with a tuned table file.

    SGLANG_MOE_CONFIG_FILE=moe_configs.json python benchmark/bench_moe_table_step.py [--batch-sizes 16 32 64]

Loads the model once (dummy weights, real config); captures the decode CUDA graphs with the built-in
tables (configs.TUNED_MOE_CONFIGS), with the file's rows in their place, then with the built-in ones
again (the spread of the two built-in figures is the noise), and times each batch size's graph
replayed back to back (profile_step's GPU-only figure), as bench_moe_gemv_step.py does for the GEMV.
"""

from __future__ import annotations

import os

import torch

from bench_dual_stream import recapture_and_replay, runner_for_batch_sizes
from sglang.srt.layers.moe.fused_moe_triton.configs import tuned_tables

ENV = "SGLANG_MOE_CONFIG_FILE"


def main() -> None:
    path = os.environ.pop(ENV, None)
    if not path:
        raise SystemExit(f"set {ENV} to the tuned table file to compare with the built-in tables")
    args, runner = runner_for_batch_sizes(__doc__.split("\n")[0], [16, 32, 64])
    times = {}
    for setting in ("built-in", "file", "built-in again"):
        if setting == "file":
            os.environ[ENV] = path
        else:
            os.environ.pop(ENV, None)
        tuned_tables.cache_clear()
        for bs, ms in recapture_and_replay(runner, args.batch_sizes, args.input_len).items():
            times[setting, bs] = ms
    print(f"{torch.cuda.get_device_name()}, {args.model_path} (dummy weights), input {args.input_len}, "
          f"kv cache {str(runner.kv_cache.dtype).removeprefix('torch.')}; tables from {path}")  # fmt: skip
    for bs in args.batch_sizes:
        a, f, b = times["built-in", bs], times["file", bs], times["built-in again", bs]
        print(f"batch {bs:3d}: built-in {a:.3f} / {b:.3f} ms, file {f:.3f} ms, ratio {2 * f / (a + b):.3f}")


if __name__ == "__main__":
    main()
