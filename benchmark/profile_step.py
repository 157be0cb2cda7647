"""Where a model step's time goes: host work, GPU time, and the GPU time per kernel family.

    python benchmark/profile_step.py --model-path nvidia/Gemma-4-26B-A4B-NVFP4 --load-format dummy \
        --mode decode --batch-size 1 --input-len 1000 [--disable-cuda-graph] [any ServerArgs flag]

decode: prefills `batch-size` random prompts, then profiles decode steps. prefill: profiles the
prefill of `batch-size` fresh prompts of `input-len` tokens (KV released after each). Each step is
timed four ways: the whole step as bench_one_batch sees it (inputs built, forward, argmax copied
back), the host time until the forward returns (launches queued), decode's CUDA graph replayed back
to back (the GPU time alone, host preparation excluded: the figure to compare kernel changes by),
and the sum of GPU kernel durations from torch.profiler. The per-kernel table groups kernels by
name so a layer's share is readable (e.g. all `moe_gemm1_kernel` calls). Kernels inside replayed
CUDA graphs are seen too.
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


class _Stepper:
    """One decode step of a live batch, or one prefill of fresh prompts, as a callable."""

    def __init__(self, runner: ModelRunner, prompts: list[list[int]], mode: str):
        self.runner, self.prompts, self.mode = runner, prompts, mode
        self.batch = None
        if mode == "decode":
            self.batch, out = prefill(runner, prompts)
            self.ids = out.next_token_logits.argmax(-1).tolist()

    def launch(self):
        if self.mode == "decode":
            return decode_step(self.runner, self.batch, self.ids)
        batch, out = prefill(self.runner, self.prompts)
        release(self.runner, batch)
        return out

    def finish(self, out) -> None:
        ids = out.next_token_logits.argmax(-1).tolist()
        if self.mode == "decode":
            self.ids = ids

    def close(self) -> None:
        if self.batch is not None:
            release(self.runner, self.batch)


def _time_steps(stepper: _Stepper, steps: int) -> tuple[list[float], list[float]]:
    step_s, host_s = [], []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        out = stepper.launch()
        host_s.append(time.perf_counter() - t0)  # launches queued, the GPU may still be running
        stepper.finish(out)
        _sync()
        step_s.append(time.perf_counter() - t0)
    return step_s, host_s


def _graph_replay_ms(runner: ModelRunner, batch_size: int, replays: int = 50) -> float | None:
    """GPU time of one decode step with no host work in between: the CUDA graph of the last step
    replayed back to back (same inputs, so it rewrites the same KV slots), timed with CUDA events.
    With PDL this includes the kernels' overlap; None without CUDA graphs."""
    graphs = runner.graph_runner
    if graphs is None or batch_size > graphs.max_bs:
        return None
    graph = graphs.graphs[next(b for b in graphs.bs_list if b >= batch_size)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def _kernel_table(prof, steps: int) -> tuple[float, list[tuple[str, float, float]]]:
    """GPU us per step in total, and (family, us/step, calls/step) sorted by time."""
    per_family: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            fam = per_family[_kernel_family(evt.name)]
            fam[0] += evt.device_time
            fam[1] += 1
    total = sum(us for us, _ in per_family.values())
    rows = [(name, us / steps, calls / steps) for name, (us, calls) in per_family.items()]
    return total / steps, sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--mode", choices=["decode", "prefill"], default="decode")
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
    stepper = _Stepper(runner, prompts, args.mode)
    _time_steps(stepper, 2)  # warm-up
    step_s, host_s = _time_steps(stepper, args.steps)
    replay_ms = _graph_replay_ms(runner, args.batch_size) if args.mode == "decode" else None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _time_steps(stepper, args.steps)
    stepper.close()

    gpu_us, rows = _kernel_table(prof, args.steps)
    graphs = "on" if runner.graph_runner is not None else "off"
    kv = str(runner.kv_cache.dtype).removeprefix("torch.")
    print(f"\n{args.mode}: batch {args.batch_size}, input {args.input_len}, cuda graphs {graphs}, kv cache {kv}")
    print(f"step wall (bench_one_batch view): median {statistics.median(step_s) * 1e3:.3f} ms")
    print(f"host time until forward returns:  median {statistics.median(host_s) * 1e3:.3f} ms")
    if replay_ms is not None:
        print(f"GPU time per step (graph replayed back to back): {replay_ms:.3f} ms")
    print(f"GPU kernel time per step (profiler): {gpu_us / 1e3:.3f} ms")
    from sglang.srt.layers.triton_ops.common import pdl_enabled

    if torch.device(runner.device).type == "cuda" and pdl_enabled(torch.device(runner.device)):
        print("note: PDL is on, so kernels overlap and their times include waiting for the previous one;"
              " SGLANG_DISABLE_PDL=1 gives a breakdown that adds up")  # fmt: skip
    print(f"\n{'kernel family':<62} {'us/step':>9} {'calls/step':>10} {'share':>6}")
    for name, us, calls in rows[: args.top]:
        print(f"{name:<62} {us:>9.1f} {calls:>10.1f} {us / max(gpu_us, 1e-9):>6.1%}")
    # Host side: which Python-visible ops cost the most CPU time (launch overhead shows up here).
    print(f"\n{'host op (self CPU time)':<62} {'us/step':>9} {'calls/step':>10}")
    cpu_rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
    for evt in cpu_rows:
        print(f"{evt.key[:62]:<62} {evt.self_cpu_time_total / args.steps:>9.1f} {evt.count / args.steps:>10.1f}")


if __name__ == "__main__":
    main()
