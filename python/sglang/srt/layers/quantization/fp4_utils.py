"""NVFP4 (E2M1 codes, E4M3 block scales, fp32 global scale) packing and exact reference math.

Layout facts (see nvfp4.md): two codes per byte along the last (K) axis, element 2i in the low
nibble; one e4m3 block scale per 16 consecutive K elements; value = e2m1 * block_scale * global.
"""

from __future__ import annotations

import torch

FP4_BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0

# Magnitudes of codes 0..7; codes 8..15 are the same with bit 3 as the sign.
_E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1_VALUES = torch.tensor(_E2M1_MAGNITUDES + [-m for m in _E2M1_MAGNITUDES], dtype=torch.float32)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 codes [..., K]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed FP4 tensor must be uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (K even) -> uint8 [..., K/2]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_VALUES.to(codes.device)[codes.long()]


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to the even code, saturating at +-6."""
    a = x.abs().float()
    # Each comparison marks one step of the grid 0, .5, 1, 1.5, 2, 3, 4, 6; '>' at a midpoint keeps
    # the lower (even) code, '>=' moves to the upper (even) code.
    mag = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    ).to(torch.uint8)
    sign = ((x < 0) & (mag > 0)).to(torch.uint8) << 3
    return mag | sign


def global_scale_for(w: torch.Tensor) -> torch.Tensor:
    """The exporter's per-tensor scale: amax / (6 * 448), never zero."""
    amax = w.abs().amax().float()
    return torch.clamp(amax / (E2M1_MAX * E4M3_MAX), min=torch.finfo(torch.float32).tiny)


def quantize_nvfp4(
    w: torch.Tensor, global_scale: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize [..., K] to (packed uint8 [..., K/2], e4m3 block scales [..., K/16], fp32 scalar)."""
    if w.shape[-1] % FP4_BLOCK_SIZE:
        raise ValueError(f"NVFP4 needs K divisible by {FP4_BLOCK_SIZE}, got shape {tuple(w.shape)}")
    w = w.float()
    gs = global_scale_for(w) if global_scale is None else torch.as_tensor(global_scale, dtype=torch.float32)
    blocks = w.reshape(*w.shape[:-1], -1, FP4_BLOCK_SIZE)
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = (block_amax / (E2M1_MAX * gs)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = block_scale.float().unsqueeze(-1) * gs
    # All-zero blocks (or blocks whose scale underflowed to zero) dequantize to zero regardless.
    scaled = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, 1.0), 0.0)
    codes = float_to_e2m1(scaled).reshape(w.shape)
    return pack_fp4(codes), block_scale, gs.reshape(())


def dequantize_nvfp4(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor | float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Exact dequantization in fp32 (then cast): e2m1(code) * block_scale * global_scale."""
    values = e2m1_to_float(unpack_fp4(packed))
    k = values.shape[-1]
    if block_scale.shape[-1] * FP4_BLOCK_SIZE != k:
        raise ValueError(
            f"block scale shape {tuple(block_scale.shape)} does not cover K={k} in blocks of {FP4_BLOCK_SIZE}"
        )
    scales = block_scale.float().repeat_interleave(FP4_BLOCK_SIZE, dim=-1)
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=values.device)
    return (values * scales * gs).to(dtype)
