"""Whole-model agreement of the fast GPU path with the reference path, on the same weights.

Fast path: the server's defaults on the device (Triton MoE, Triton attention, CUDA graphs, the chosen
KV dtype, fused Triton small ops). Reference: the torch MoE runner (exact W4A16, fp32 math), the torch
attention backend (fp32 softmax) over a KV cache of the same dtype, and the torch small ops (norms,
rope, router, combine). Both load the same dummy weights (same seed), read one random prompt, then the
fast path decodes greedily and the reference is teacher-forced along the same tokens, so every
position compares logits for identical inputs.

Two comparisons, because top-k routing is discontinuous: a last-bit difference in a router input
swaps one of a token's 8 experts when the 8th and 9th logits nearly tie (with random weights, ~3% of
tokens per layer), and a swap moves that token's hidden state by a few percent. So
- free: both paths route themselves (the fast path as served, CUDA graphs included);
- replayed: the fast path (eager) uses the experts the reference chose at every layer and position,
  with routing weights from its own router logits. This isolates the numerics of every kernel from
  routing flips, as routing replay does in RL rollouts.

  python benchmark/check_model_accuracy.py --model-path nvidia/Gemma-4-26B-A4B-NVFP4 --load-format dummy \
      --prompt-len 1000 --decode-len 64 --kv-cache-dtype auto        # then fp8_e4m3
Pass criteria (issue 7), over all positions: mean cosine similarity >= 0.999 and top-1 agreement
>= 99%, both free and replayed. The smallest cosine is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys

import torch

from sglang.srt.layers.moe.topk import TopKOutput
from sglang.srt.layers.triton_ops import fused_ops
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.server_args import ServerArgs
from sglang.test.static_batch import decode_step, prefill, release

MIN_COSINE = 0.999
MIN_TOP1 = 0.99


@dataclasses.dataclass
class Agreement:
    positions: int
    min_cosine: float
    mean_cosine: float
    top1: float


@dataclasses.dataclass
class Report:
    free: Agreement
    replayed: Agreement

    def passed(self) -> bool:
        return all(a.mean_cosine >= MIN_COSINE and a.top1 >= MIN_TOP1 for a in (self.free, self.replayed))


def compare(fast: list[torch.Tensor], ref: list[torch.Tensor]) -> Agreement:
    a, b = torch.cat(fast).float(), torch.cat(ref).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean()
    return Agreement(a.shape[0], cos.min().item(), cos.mean().item(), top1.item())


def _moe_layers(runner: ModelRunner):
    return [(i, layer) for i, layer in enumerate(runner.model.model.layers) if layer.enable_moe]


@contextlib.contextmanager
def _pre_hooks(runner: ModelRunner, make_hook):
    handles = [layer.experts.register_forward_pre_hook(make_hook(i, layer)) for i, layer in _moe_layers(runner)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def recording(runner: ModelRunner, log: dict[int, list[torch.Tensor]]):
    """Append each MoE layer's chosen experts to log[layer] at every forward call."""

    def make_hook(i, layer):
        return lambda module, args: log.setdefault(i, []).append(args[1].topk_ids.clone())

    return _pre_hooks(runner, make_hook)


def replaying(runner: ModelRunner, log: dict[int, list[torch.Tensor]]):
    """Route every MoE call through the recorded experts, in recording order; the weights are
    gemma4_topk's (softmax over the chosen logits, times the per-expert scale) on this runner's logits."""
    calls = {i: iter(ids) for i, ids in log.items()}

    def make_hook(i, layer):
        def hook(module, args):
            x, topk = args
            ids = next(calls[i]).long()
            weights = torch.softmax(topk.router_logits.gather(1, ids), dim=-1)
            weights = weights * layer.router.per_expert_scale.float()[ids]
            return x, TopKOutput(weights, ids.to(torch.int32), topk.router_logits)

        return hook

    return _pre_hooks(runner, make_hook)


def _logits(out) -> torch.Tensor:
    # A CUDA-graph replay returns views of its static output buffer: copy before the next step.
    return out.next_token_logits.float().clone()


def free_pass(fast: ModelRunner, ref: ModelRunner, prompt: list[int], decode_len: int, log: dict):
    """Fast path greedy, reference teacher-forced (recording its routing). Returns both logit lists and
    the tokens fed at each decode step."""
    fb, fout = prefill(fast, [prompt], return_all_logits=True)
    with fused_ops(False), recording(ref, log):
        rb, rout = prefill(ref, [prompt], return_all_logits=True)
    fast_logits, ref_logits, tokens = [fout.all_logits.float()], [rout.all_logits.float()], []
    token = int(fout.next_token_logits[0].argmax())
    for _ in range(decode_len):
        tokens.append(token)
        f = _logits(decode_step(fast, fb, [token]))
        with fused_ops(False), recording(ref, log):
            ref_logits.append(_logits(decode_step(ref, rb, [token])))
        fast_logits.append(f)
        token = int(f[0].argmax())
    release(fast, fb)
    release(ref, rb)
    return fast_logits, ref_logits, tokens


def replay_pass(fast: ModelRunner, prompt: list[int], tokens: list[int], log: dict) -> list[torch.Tensor]:
    """The fast path, eager (hooks do not run inside a CUDA graph), along the same tokens with the
    reference's routing."""
    graphs, fast.graph_runner = fast.graph_runner, None
    try:
        with replaying(fast, log):
            fb, out = prefill(fast, [prompt], return_all_logits=True)
            logits = [out.all_logits.float()] + [_logits(decode_step(fast, fb, [t])) for t in tokens]
        release(fast, fb)
    finally:
        fast.graph_runner = graphs
    return logits


def run_pair(fast: ModelRunner, ref: ModelRunner, prompt: list[int], decode_len: int) -> Report:
    """Prompt logits at every position, then decode_len greedy steps of the fast path."""
    log: dict[int, list[torch.Tensor]] = {}
    fast_logits, ref_logits, tokens = free_pass(fast, ref, prompt, decode_len, log)
    replayed = replay_pass(fast, prompt, tokens, log)
    return Report(compare(fast_logits, ref_logits), compare(replayed, ref_logits))


def build_runners(args) -> tuple[ModelRunner, ModelRunner]:
    # Two 26B runners share the GPU, so size the KV pools by the sequence, not by free memory; the
    # sliding-window pool is swa_full_tokens_ratio of the full one and must hold the sequence too.
    need = args.prompt_len + args.decode_len + 64
    tokens = math.ceil(need / min(1.0, ServerArgs.swa_full_tokens_ratio)) + 64
    common = dict(
        model_path=args.model_path, load_format=args.load_format, dtype=args.dtype, device=args.device,
        random_seed=args.seed, max_total_tokens=tokens, max_running_requests=4,
    )  # fmt: skip
    # Both over the same KV dtype: fp8 KV is compared with the reference reading an fp8 cache too.
    fast = ModelRunner(ServerArgs(**common, kv_cache_dtype=args.kv_cache_dtype))
    ref = ModelRunner(ServerArgs(
        **common, kv_cache_dtype=args.kv_cache_dtype, moe_runner_backend="torch", attention_backend="torch_native",
        disable_cuda_graph=True,
    ))  # fmt: skip
    return fast, ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)

    fast, ref = build_runners(args)
    vocab = fast.model_config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(110, vocab, (args.prompt_len,), generator=gen).tolist()
    result = run_pair(fast, ref, prompt, args.decode_len)
    device = torch.cuda.get_device_name() if fast.device.startswith("cuda") else "cpu"
    record = {"device": device, **vars(args), **dataclasses.asdict(result), "passed": result.passed()}
    print(json.dumps(record))
    for name, a in (("free", result.free), ("replayed", result.replayed)):
        print(f"{device} {name}: {a.positions} positions, cosine min {a.min_cosine:.5f} mean {a.mean_cosine:.5f}, "
              f"top-1 {100 * a.top1:.1f}%")  # fmt: skip
    print(f"kv {args.kv_cache_dtype}: {'PASS' if result.passed() else 'FAIL'}")
    if args.out:
        with open(os.path.join(args.out, "check_model_accuracy.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if result.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
