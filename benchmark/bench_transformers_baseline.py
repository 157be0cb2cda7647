"""Baseline for issue 7: `transformers` Gemma 4 in bf16 (experts dequantised, i.e. bf16 experts), batch 1.

    python benchmark/bench_transformers_baseline.py [--config DIR] [--input-len 1000] [--decode-steps 32]

Builds `Gemma4ForCausalLM` from the text config of google/gemma-4-26b-a4b (shipped in the package, so
no download) with random bf16 weights on the GPU, prefills one random prompt, then times greedy decode
steps with the KV cache (CUDA events around each step, median). Appends one JSON line to --out.
The NVFP4 checkpoint's experts dequantise to exactly these bf16 shapes, so this is the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "python/sglang/srt/configs/data/google--gemma-4-26b-a4b"


def build_model(config_dir: Path, device: str, experts_impl: str):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(config_dir)
    text_cfg = getattr(cfg, "text_config", cfg)
    text_cfg._attn_implementation = "sdpa"
    # A model built from a config (not from_pretrained) would otherwise loop over experts in Python.
    text_cfg._experts_implementation = experts_impl
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Gemma4ForCausalLM(text_cfg).to(torch.bfloat16)
    return model.eval(), text_cfg


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def run(model, vocab: int, input_len: int, steps: int, device: str) -> dict:
    ids = torch.randint(110, vocab, (1, input_len), device=device)
    for _ in range(2):  # warm-up: kernel selection, allocator growth
        out = model(input_ids=ids, use_cache=True)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    step_s = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        step_s.append(time.perf_counter() - t0)
        cache = out.past_key_values
    med = statistics.median(step_s)
    return {"prefill_ms": prefill_s * 1e3, "decode_step_ms": med * 1e3, "decode_tok_s": 1.0 / med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--experts-implementation", default="grouped_mm", help="transformers experts kernel")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "transformers_baseline.jsonl"))
    args = ap.parse_args()
    import transformers

    model, text_cfg = build_model(args.config, args.device, args.experts_implementation)
    result = run(model, text_cfg.vocab_size, args.input_len, args.decode_steps, args.device)
    result.update(
        config=str(args.config), experts_implementation=args.experts_implementation, input_len=args.input_len, batch_size=1, dtype="bfloat16",
        transformers=transformers.__version__, torch=torch.__version__,
        device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        date=datetime.now().isoformat(timespec="seconds"),
    )  # fmt: skip
    print(json.dumps(result))
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
