"""Rotary position embedding in the rotate-half layout.

"proportional" (Gemma 4 full layers) rotates only the first `partial_rotary_factor` of the
frequency pairs, with exponents over the whole head dim; the rest get frequency 0 (pass through).
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", partial_rotary_factor: float = 1.0) -> torch.Tensor:
    if rope_type == "default":
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope_type == "proportional":
        rotated = int(partial_rotary_factor * head_dim // 2)
        inv = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float32) / head_dim))
        return torch.cat([inv, torch.zeros(head_dim // 2 - rotated)])
    raise ValueError(f"unsupported rope_type {rope_type!r}")


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, rope_type: str = "default", partial_rotary_factor: float = 1.0):
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, rope_type, partial_rotary_factor), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim]; cos/sin [T, head_dim] in fp32."""
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)
