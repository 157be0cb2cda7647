"""W4A16 NVFP4 dense linear on GPUs without FP4 MMA (SM80/SM90): y = x @ dequant(W)^T.

The weight stays in the checkpoint layout (uint8 [N, K/2] codes, e4m3 [N, K/16] block scales) and is
dequantised in registers; e2m1 x e4m3 is exact in bf16, and weight_scale_2 is applied to the fp32
accumulator, so the result matches the dequantised weight up to accumulation order.
"""

from __future__ import annotations

import torch
import triton

from sglang.srt.layers.moe.fused_moe_triton.kernels import dense_w4a16_kernel


def _tile_for(m: int) -> tuple[int, int, int, int, int, bool]:
    """(BM, BN, BK, num_warps, num_stages, swap_ab): decode sizes stream weights through narrow N tiles
    with tokens on the MMA's narrow side; large M uses square-ish tensor-core tiles."""
    if m <= 16:
        return 16, 64, 128, 4, 4, True
    if m <= 64:
        return 64, 64, 128, 4, 4, True
    return 128, 128, 64, 8, 3, False


def nvfp4_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor
) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) -> [M, N] in x.dtype, for weight uint8 [N, K/2], e4m3 scales [N, K/16]."""
    if weight.dtype != torch.uint8:
        raise TypeError(f"NVFP4 weight must be packed uint8, got {weight.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    if weight.shape[1] * 2 != k or weight_scale.shape != (n, k // 16):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, scale {tuple(weight_scale.shape)}"
        )
    weight = weight.contiguous()
    weight_scale = weight_scale.contiguous()
    gs = weight_scale_2.reshape(1).float()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    bm, bn, bk, warps, stages, swap = _tile_for(m)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    dense_w4a16_kernel[grid](
        x2, weight, weight_scale, gs, y, m, n, k,
        x2.stride(0), weight.stride(0), weight_scale.stride(0), y.stride(0),
        BM=bm, BN=bn, BK=bk, W_FP4=True, SWAP_AB=swap, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y.reshape(*lead, n)
