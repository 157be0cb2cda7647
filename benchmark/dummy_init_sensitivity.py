"""Is a dummy-weight model well-conditioned enough to compare two implementations? (CPU, ~5 min)

    python benchmark/dummy_init_sensitivity.py

check_model_accuracy.py compares the fast GPU path with the torch reference on dummy weights. If the
random model is chaotic (a last-bit difference anywhere changes the output), no two correct
implementations agree and the check measures nothing. This script builds a mid-size Gemma 4 (the
26B-A4B config with hidden 1024, 12 layers, vocab 8192; real head dims 256/512, 128 experts, top-8)
and compares the torch reference in fp32 and in bf16 (a proxy for two implementations) over a
300-token prompt, for the old dummy init (unit q/k norms, router std 0.02) and the current one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.server_args import ServerArgs
from sglang.test.static_batch import prefill, release

CONFIG = Path(__file__).resolve().parents[1] / "python/sglang/srt/configs/data/google--gemma-4-26b-a4b/config.json"


def mid_size_config(out: Path) -> Path:
    cfg = json.loads(CONFIG.read_text())
    cfg["text_config"].update(
        vocab_size=8192, hidden_size=1024, intermediate_size=768, num_hidden_layers=12,
        moe_intermediate_size=256, sliding_window=128,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 2,
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def old_init(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            p.data.fill_(1.0)
        elif name.endswith("router.proj.weight"):
            p.data.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def logits(path: Path, dtype: str, prompt: list[int], use_old_init: bool) -> torch.Tensor:
    args = ServerArgs(model_path=str(path), load_format="dummy", dtype=dtype, device="cpu", max_total_tokens=2048)
    runner = ModelRunner(args)
    if use_old_init:
        old_init(runner.model)
    batch, out = prefill(runner, [prompt], return_all_logits=True)
    release(runner, batch)
    return out.all_logits.float()


def main() -> None:
    prompt = torch.randint(110, 8192, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        path = mid_size_config(Path(tmp))
        for label, use_old in (("old dummy init", True), ("current dummy init", False)):
            a, b = (logits(path, dt, prompt, use_old) for dt in ("float32", "bfloat16"))
            cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
            print(f"{label}: fp32 vs bf16 reference, {len(prompt)} positions: cosine min {cos.min():.4f} "
                  f"mean {cos.mean():.4f}, top-1 {top1:.1%}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
