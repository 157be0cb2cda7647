"""Gemma 4 RMSNorm: fp32 math, `x * (mean(x^2) + eps)^-0.5 * weight` (no `1 + weight`)."""

from __future__ import annotations

import torch

from sglang.srt.layers.triton_ops import fused_ops_enabled


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True, params_dtype=torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=params_dtype), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops_enabled(x):
            from sglang.srt.layers.triton_ops.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        xf = x.float()
        out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.to(x.dtype)
