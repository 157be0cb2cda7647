"""The sampling knobs of one batch as tensors, built from its requests right before sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatchInfo:
    # The tensors are None when every row is greedy (all_greedy).
    temperatures: torch.Tensor | None  # [B, 1] fp32; 1.0 on greedy rows so division stays finite
    top_ps: torch.Tensor | None  # [B] fp32
    top_ks: torch.Tensor | None  # [B] int64; the vocab size where top-k is off
    min_ps: torch.Tensor | None  # [B] fp32
    is_greedy: torch.Tensor | None  # [B] bool
    uniforms: torch.Tensor | None  # [B] fp32, one draw per request from its own generator
    all_greedy: bool

    @classmethod
    def from_reqs(cls, reqs: list, vocab_size: int, device: str | torch.device) -> "SamplingBatchInfo":
        params = [r.sampling_params for r in reqs]
        greedy = [p.is_greedy for p in params]
        if all(greedy):
            # The sampler only takes the argmax: skip six host-to-device copies per step.
            return cls(*([None] * 6), all_greedy=True)
        # Every request draws exactly one uniform per sampled token from its own generator, so a
        # seeded request samples the same tokens whatever else shares its batch.
        uniforms = [0.0 if g else float(torch.rand((), generator=r.generator)) for r, g in zip(reqs, greedy)]
        top_ks = [vocab_size if (p.top_k is None or p.top_k <= 0) else min(p.top_k, vocab_size) for p in params]
        return cls(
            temperatures=torch.tensor([[1.0 if g else p.temperature] for p, g in zip(params, greedy)], dtype=torch.float32, device=device),
            top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            top_ks=torch.tensor(top_ks, dtype=torch.int64, device=device),
            min_ps=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            uniforms=torch.tensor(uniforms, dtype=torch.float32, device=device),
            all_greedy=all(greedy),
        )
