"""Where a decode step's time goes: host work, GPU time, and the GPU time per kernel family.

    python benchmark/profile_decode.py --model-path nvidia/Gemma-4-26B-A4B-NVFP4 --load-format dummy \
        --batch-size 1 --input-len 1000 [--disable-cuda-graph] [any ServerArgs flag]

Prefills `batch-size` random prompts, then times decode steps three ways: the whole step as
bench_one_batch sees it (inputs built, forward, argmax copied back), the host time until the forward
returns (launches queued), and the sum of GPU kernel durations from torch.profiler. The per-kernel table
groups kernels by name prefix so a layer's share is readable (e.g. all `moe_gemm1_kernel` calls).
With CUDA graphs the profiler still sees each kernel inside the replayed graph.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sglang.bench_one_batch import random_prompts
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.server_args import ServerArgs
from sglang.test.static_batch import decode_step, prefill, release


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _kernel_family(name: str) -> str:
    # Triton kernels carry their Python name; cutlass/aten names are long templates: keep the head.
    return name.split("(")[0].split("<")[0][:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.max_running_requests is None:
        args.max_running_requests = max(args.batch_size, 8)
    server_args = ServerArgs.from_cli_args(args)
    runner = ModelRunner(server_args, ModelConfig.from_server_args(server_args))
    prompts = random_prompts(args.batch_size, args.input_len, runner.model_config.vocab_size, seed=0)

    batch, out = prefill(runner, prompts)
    ids = out.next_token_logits.argmax(-1).tolist()
    step_s, host_s = [], []
    for _ in range(args.steps):
        _sync()
        t0 = time.perf_counter()
        out = decode_step(runner, batch, ids)
        host_s.append(time.perf_counter() - t0)  # launches queued, GPU may still be running
        ids = out.next_token_logits.argmax(-1).tolist()
        _sync()
        step_s.append(time.perf_counter() - t0)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            out = decode_step(runner, batch, ids)
            ids = out.next_token_logits.argmax(-1).tolist()
        _sync()
    release(runner, batch)

    per_family: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    gpu_total_us = 0.0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            fam = per_family[_kernel_family(evt.name)]
            fam[0] += evt.device_time
            fam[1] += 1
            gpu_total_us += evt.device_time
    n = args.steps
    print(f"\nbatch {args.batch_size}, context {args.input_len}, cuda graphs {'off' if args.disable_cuda_graph else 'on'}")
    print(f"step wall (bench_one_batch view): median {statistics.median(step_s) * 1e3:.3f} ms")
    print(f"host time until forward returns:  median {statistics.median(host_s) * 1e3:.3f} ms")
    print(f"GPU kernel time per step (profiler): {gpu_total_us / n / 1e3:.3f} ms")
    print(f"\n{'kernel family':<62} {'us/step':>9} {'calls/step':>10} {'share':>6}")
    for name, (us, calls) in sorted(per_family.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{name:<62} {us / n:>9.1f} {calls / n:>10.1f} {us / gpu_total_us:>6.1%}")


if __name__ == "__main__":
    main()
