"""The sampling knobs of one batch as tensors, built from its requests right before sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.srt.utils import to_device


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
        # One host-to-device copy; fp32 holds every top-k exactly (vocab sizes are far below 2^24).
        rows = [[1.0 if g else p.temperature for p, g in zip(params, greedy)], [p.top_p for p in params], top_ks,
                [p.min_p for p in params], greedy, uniforms]  # fmt: skip
        temps, top_ps, top_ks_f, min_ps, is_greedy, uniforms_t = to_device(torch.tensor(rows, dtype=torch.float32), device)
        return cls(
            temperatures=temps[:, None],
            top_ps=top_ps,
            top_ks=top_ks_f.long(),
            min_ps=min_ps,
            is_greedy=is_greedy.bool(),
            uniforms=uniforms_t,
            all_greedy=False,
        )
