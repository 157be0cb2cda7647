"""Is a dummy-weight model well-conditioned enough to compare two implementations? (CPU, ~8 min per init)

    python benchmark/dummy_init_sensitivity.py [--layers 30] [--inits old post-norms-1 current]

check_model_accuracy.py compares the fast GPU path with the torch reference on dummy weights. If the
random model is chaotic (a last-bit difference anywhere changes the output), no two correct
implementations agree and the check measures nothing. This script builds a mid-size Gemma 4 (the
26B-A4B config with hidden 1024, vocab 8192 and `--layers` layers; real head dims 256/512, 128 experts,
top-8) and compares the torch reference in fp32 and in bf16 (a proxy for two implementations) over a
200-token prompt, for earlier dummy inits and the current one:
- old: unit q/k norms (attention logits of std sqrt(head_dim)), router std 0.02 (near-ties among the
  128 experts), unit post-norms;
- post-norms-1: the current q/k norms and router, unit post-attention / post-feedforward norms;
- current: `fill_dummy_weights` as it is.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.server_args import ServerArgs
from sglang.test.static_batch import prefill, release

CONFIG = Path(__file__).resolve().parents[1] / "python/sglang/srt/configs/data/google--gemma-4-26b-a4b/config.json"
POST_NORMS = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")


def mid_size_config(out: Path, layers: int) -> Path:
    cfg = json.loads(CONFIG.read_text())
    cfg["text_config"].update(
        vocab_size=8192, hidden_size=1024, intermediate_size=768, num_hidden_layers=layers,
        moe_intermediate_size=256, sliding_window=128,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * (layers // 6),
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def post_norms_1(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if name.endswith(POST_NORMS):
            p.data.fill_(1.0)


def old_init(model: torch.nn.Module) -> None:
    post_norms_1(model)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.data.fill_(1.0)
        elif name.endswith("router.proj.weight"):
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


INITS = {"old": old_init, "post-norms-1": post_norms_1, "current": lambda model: None}


def logits(path: Path, dtype: str, prompt: list[int], init) -> torch.Tensor:
    args = ServerArgs(model_path=str(path), load_format="dummy", dtype=dtype, device="cpu", max_total_tokens=2048)
    runner = ModelRunner(args)
    init(runner.model)
    batch, out = prefill(runner, [prompt], return_all_logits=True)
    release(runner, batch)
    return out.all_logits.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="a multiple of 6 (5 sliding + 1 full)")
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    args = ap.parse_args()
    prompt = torch.randint(110, 8192, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = mid_size_config(Path(tmp), args.layers)
        for label in args.inits:
            a, b = (logits(path, dt, prompt, INITS[label]) for dt in ("float32", "bfloat16"))
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            print(f"{label} ({args.layers} layers): fp32 vs bf16 reference, {len(prompt)} positions: cosine min "
                  f"{cos.min():.4f} mean {cos.mean():.4f}, top-1 {top1:.1%}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
