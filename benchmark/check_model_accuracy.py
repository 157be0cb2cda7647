"""Whole-model agreement of the fast GPU path with the reference path, on the same weights.

Fast path: the server's defaults on the device (Triton MoE, Triton attention, CUDA graphs, the chosen
KV dtype, fused Triton small ops). Reference: the torch MoE runner (exact W4A16, fp32 math), the torch
attention backend over a bf16 KV cache and the torch small ops (norms, rope, router, combine). Both
load the same dummy weights (same seed), read one random prompt, then the fast path decodes greedily
and the reference is teacher-forced along the same tokens, so every position compares logits for
identical inputs.

  python benchmark/check_model_accuracy.py --model-path nvidia/Gemma-4-26B-A4B-NVFP4 --load-format dummy \
      --prompt-len 1000 --decode-len 64 --kv-cache-dtype auto        # then fp8_e4m3
Pass criteria (issue 7): cosine similarity >= 0.999 and top-1 agreement >= 99% over all positions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch

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

    def passed(self) -> bool:
        return self.min_cosine >= MIN_COSINE and self.top1 >= MIN_TOP1


def compare(fast: list[torch.Tensor], ref: list[torch.Tensor]) -> Agreement:
    a, b = torch.cat(fast).float(), torch.cat(ref).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean()
    return Agreement(a.shape[0], cos.min().item(), cos.mean().item(), top1.item())


def run_pair(fast: ModelRunner, ref: ModelRunner, prompt: list[int], decode_len: int) -> Agreement:
    """Prompt logits at every position, then decode_len greedy steps of the fast path."""
    fb, fout = prefill(fast, [prompt], return_all_logits=True)
    with fused_ops(False):
        rb, rout = prefill(ref, [prompt], return_all_logits=True)
    fast_logits, ref_logits = [fout.all_logits], [rout.all_logits]
    token = int(fout.next_token_logits[0].argmax())
    for _ in range(decode_len):
        f = decode_step(fast, fb, [token]).next_token_logits
        with fused_ops(False):
            r = decode_step(ref, rb, [token]).next_token_logits
        fast_logits.append(f)
        ref_logits.append(r)
        token = int(f[0].argmax())
    release(fast, fb)
    release(ref, rb)
    return compare(fast_logits, ref_logits)


def build_runners(args) -> tuple[ModelRunner, ModelRunner]:
    # Two 26B runners share the GPU, so size the KV pools by the sequence, not by free memory; the
    # sliding-window pool is swa_full_tokens_ratio of the full one and must hold the sequence too.
    need = args.prompt_len + args.decode_len + 64
    tokens = math.ceil(need / min(1.0, ServerArgs.swa_full_tokens_ratio)) + 64
    common = dict(
        model_path=args.model_path, load_format=args.load_format, dtype=args.dtype, device=args.device,
        random_seed=args.seed, max_total_tokens=tokens, max_running_requests=4,
    )  # fmt: skip
    fast = ModelRunner(ServerArgs(**common, kv_cache_dtype=args.kv_cache_dtype))
    ref = ModelRunner(
        ServerArgs(**common, moe_runner_backend="torch", attention_backend="torch_native", disable_cuda_graph=True)
    )
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
    print(
        f"{device}: {result.positions} positions, cosine min {result.min_cosine:.5f} mean {result.mean_cosine:.5f}, "
        f"top-1 {100 * result.top1:.1f}% -> {'PASS' if result.passed() else 'FAIL'}"
    )
    if args.out:
        with open(os.path.join(args.out, "check_model_accuracy.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if result.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
