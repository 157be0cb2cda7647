"""gelu_tanh(gate) * up for the dense MLP: gate_up [T, 2I] -> [T, I]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import pdl_launch, pdl_start, round_to, tanh, unit_stride_rows

_BLOCK = 1024
# sqrt(2 / pi) and the cubic coefficient, as torch's tanh-GELU kernels spell them.
_BETA = tl.constexpr(0.7978845608028654)
_KAPPA = tl.constexpr(0.044715)


@triton.jit
def gelu_tanh(x):
    inner = _BETA * (x + _KAPPA * (x * x * x))
    return 0.5 * x * (1.0 + tanh(inner))


@triton.jit
def _gelu_tanh_and_mul_kernel(gu_ptr, out_ptr, stride_gu, n_inter, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_inter
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    gate = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_inter + offs, mask=mask, other=0.0).to(tl.float32)
    # torch rounds F.gelu's result to the dtype before the product.
    act = round_to(gelu_tanh(gate), DTYPE)
    tl.store(out_ptr + row * n_inter + offs, round_to(act * up, DTYPE), mask=mask)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.gelu(gate, approximate="tanh") * up for gate_up = [gate | up] along the last dim."""
    tokens, width = gate_up.shape
    inter = width // 2
    gate_up = unit_stride_rows(gate_up)
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0:
        return out
    grid = (tokens, triton.cdiv(inter, _BLOCK))
    # FP fusion on: torch's GELU kernel is built by nvcc, which contracts into FMAs as well.
    _gelu_tanh_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), inter, BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=True,
                                     **pdl_launch(gate_up.device))
    return out
