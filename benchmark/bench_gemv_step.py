"""Batch-1 decode step GPU time with the GEMVs' steps in flight (stages) and tuned tiles swapped in.

    python benchmark/bench_gemv_step.py [--moe-stages 2 3] [--dense-stages 2 3]
        [--moe-sweep DIR/bench_moe_nvfp4.json] [--dense-sweep gemv.json] [--batch-sizes 1]

Loads the model once (dummy weights, real config) and, per setting, captures the decode CUDA graphs
again and times each batch size's graph replayed back to back (profile_step's GPU-only figure):
the built-in tiles (first and last: their spread is the noise), the NVFP4 MoE GEMV's tiles with
num_stages s (steps loaded ahead, moe_gemv._fp4_gemv), the dense GEMV's with stages s
(gemv._gemv_kernel), and, given the sweeps' JSON, their winners: `bench_moe_nvfp4.py --tune-gemv`
(the GEMV tiles fastest at the smallest M swept) and `bench_gemv.py --tune --json` (each dense
shape's fastest tile; shapes it did not sweep keep the built-in one).
"""

from __future__ import annotations

import dataclasses
import json

import torch

from bench_dual_stream import recapture_and_replay, runner_for_batch_sizes
from sglang.srt.layers.moe.fused_moe_triton import configs
from sglang.srt.layers.moe.fused_moe_triton.configs import GemvTile, MoeGemvConfig
from sglang.srt.layers.triton_ops import gemv

BUILTIN_MOE = configs.GEMV_CONFIGS["nvfp4"]
BUILTIN_DENSE = gemv.gemv_config


def _add_args(parser) -> None:
    parser.add_argument("--moe-stages", type=int, nargs="*", default=[2, 3])
    parser.add_argument("--dense-stages", type=int, nargs="*", default=[2, 3])
    parser.add_argument("--moe-sweep", help="bench_moe_nvfp4.json of a --tune-gemv run")
    parser.add_argument("--dense-sweep", help="the --json file of a bench_gemv.py --tune run")


def moe_sweep_winner(path: str) -> MoeGemvConfig:
    """The NVFP4 GEMV tiles fastest at the smallest M of a --tune-gemv run, GEMM1 and GEMM2 each."""
    sweeps = json.load(open(path))["sweeps"]
    m = min(int(key.split("/")[1]) for key in sweeps if key.startswith("nvfp4/"))
    log = sweeps[f"nvfp4/{m}"]["gemv"]
    best = [min(log[g], key=log[g].get) for g in ("gemm1_us", "gemm2_us")]
    t1, t2 = (GemvTile(*json.loads(t.replace("(", "[").replace(")", "]"))) for t in best)
    return dataclasses.replace(BUILTIN_MOE, gemm1=t1, gemm2=t2)


def dense_sweep_table(path: str):
    """gemv_config with each swept shape's best tile in place of the built-in one."""
    best = {(r["n"], r["k"]): tuple(r["best_config"]) for r in json.load(open(path))["rows"] if r["m"] == 1}
    return lambda n, k: best.get((n, k)) or BUILTIN_DENSE(n, k)


def with_stages(s: int):
    return lambda n, k: (*BUILTIN_DENSE(n, k)[:3], s)


def main() -> None:
    args, runner = runner_for_batch_sizes(__doc__.split("\n")[0], [1], _add_args)
    moe_stages = lambda s: dataclasses.replace(  # noqa: E731
        BUILTIN_MOE, gemm1=dataclasses.replace(BUILTIN_MOE.gemm1, num_stages=s),
        gemm2=dataclasses.replace(BUILTIN_MOE.gemm2, num_stages=s))  # fmt: skip
    settings = {"built-in": (BUILTIN_MOE, BUILTIN_DENSE)}
    settings.update({f"moe stages {s}": (moe_stages(s), BUILTIN_DENSE) for s in args.moe_stages})
    settings.update({f"dense stages {s}": (BUILTIN_MOE, with_stages(s)) for s in args.dense_stages})
    tuned_moe = moe_sweep_winner(args.moe_sweep) if args.moe_sweep else BUILTIN_MOE
    tuned_dense = dense_sweep_table(args.dense_sweep) if args.dense_sweep else BUILTIN_DENSE
    if args.moe_sweep:
        settings["moe sweep winner"] = (tuned_moe, BUILTIN_DENSE)
    if args.dense_sweep:
        settings["dense sweep winners"] = (BUILTIN_MOE, tuned_dense)
    if args.moe_sweep and args.dense_sweep:
        settings["both sweeps' winners"] = (tuned_moe, tuned_dense)
    settings["built-in again"] = settings["built-in"]
    times = {}
    for name, (moe_cfg, dense_cfg) in settings.items():
        configs.GEMV_CONFIGS["nvfp4"], gemv.gemv_config = moe_cfg, dense_cfg
        times[name] = recapture_and_replay(runner, args.batch_sizes, args.input_len)
    configs.GEMV_CONFIGS["nvfp4"], gemv.gemv_config = BUILTIN_MOE, BUILTIN_DENSE
    print(f"{torch.cuda.get_device_name()}, {args.model_path} (dummy weights), input {args.input_len}, "
          f"kv cache {str(runner.kv_cache.dtype).removeprefix('torch.')}; MoE GEMV built-in {BUILTIN_MOE}, "
          f"sweep winner {tuned_moe}")  # fmt: skip
    for bs in args.batch_sizes:
        base = (times["built-in"][bs] + times["built-in again"][bs]) / 2
        for name in settings:
            print(f"batch {bs:3d} {name:22s} {times[name][bs]:.3f} ms  ratio {times[name][bs] / base:.3f}")


if __name__ == "__main__":
    main()
