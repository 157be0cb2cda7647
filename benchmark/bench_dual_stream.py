"""Decode step GPU time per batch size with each MoE layer's dense MLP on one CUDA stream and on two.

    python benchmark/bench_dual_stream.py [--model-path nvidia/Gemma-4-26B-A4B-NVFP4] [--batch-sizes 1 2 4 ...]

Loads the model once (dummy weights, real config), then for each setting of
`gemma4_causal.DUAL_STREAM_TOKENS` captures the decode CUDA graphs again and, per batch size,
prefills random prompts of `--input-len` tokens and times the decode graph replayed back to back
(profile_step's GPU-only figure). The printed ratio (two streams / one) chose DUAL_STREAM_TOKENS.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from profile_step import _graph_replay_ms, _Stepper, _time_steps
from sglang.bench_one_batch import random_prompts
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.models import gemma4_causal
from sglang.srt.server_args import ServerArgs


def replay_ms(runner: ModelRunner, batch_size: int, input_len: int) -> float:
    prompts = random_prompts(batch_size, input_len, runner.model_config.vocab_size, seed=0)
    stepper = _Stepper(runner, prompts, "decode")
    _time_steps(stepper, 3)  # real decode steps fill the graph's static inputs
    ms = min(_graph_replay_ms(runner, batch_size) for _ in range(3))
    stepper.close()
    return ms


def recapture_and_replay(runner: ModelRunner, batch_sizes: list[int], input_len: int) -> dict[int, float]:
    """Capture the decode CUDA graphs again (the current settings then hold in them) and time each
    batch size's graph replayed: {batch size: ms}."""
    runner.graph_runner = None
    runner.graph_runner = runner._init_cuda_graphs()
    return {bs: replay_ms(runner, bs, input_len) for bs in batch_sizes}


def runner_for_batch_sizes(
    description: str, batch_sizes: list[int], add_args: Callable[[argparse.ArgumentParser], None] | None = None
) -> tuple[argparse.Namespace, ModelRunner]:
    """Command line (--model-path, --batch-sizes, --input-len, and what add_args adds) and a runner
    on dummy weights whose CUDA graphs cover every batch size asked for."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-path", default="nvidia/Gemma-4-26B-A4B-NVFP4")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=batch_sizes)
    parser.add_argument("--input-len", type=int, default=1000)
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    max_bs = max(args.batch_sizes)
    server_args = ServerArgs(model_path=args.model_path, load_format="dummy", cuda_graph_max_bs=max_bs,
                             max_running_requests=max_bs + 16)  # fmt: skip
    return args, ModelRunner(server_args, ModelConfig.from_server_args(server_args))


def main() -> None:
    args, runner = runner_for_batch_sizes(__doc__.split("\n")[0], [1, 2, 4, 8, 16, 32, 64])
    max_bs = max(args.batch_sizes)
    times = {}
    for streams, tokens in ((1, range(0)), (2, range(1, max_bs + 1))):
        gemma4_causal.DUAL_STREAM_TOKENS = tokens
        for bs, ms in recapture_and_replay(runner, args.batch_sizes, args.input_len).items():
            times[streams, bs] = ms
    print(f"{torch.cuda.get_device_name()}, {args.model_path} (dummy weights), input {args.input_len}, "
          f"kv cache {str(runner.kv_cache.dtype).removeprefix('torch.')}")  # fmt: skip
    for bs in args.batch_sizes:
        one, two = times[1, bs], times[2, bs]
        print(f"batch {bs:3d}: one stream {one:.3f} ms, two streams {two:.3f} ms, ratio {two / one:.3f}")


if __name__ == "__main__":
    main()
