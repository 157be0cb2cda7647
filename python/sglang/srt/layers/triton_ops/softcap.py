"""Final logit softcap fused with the fp32 cast: cap * tanh(float(x) / cap)."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import tanh

_BLOCK = 1024


@triton.jit
def _softcap_kernel(x_ptr, out_ptr, n, cap, inv_cap, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # torch's CUDA division by a Python scalar multiplies by its fp32 reciprocal.
    tl.store(out_ptr + offs, cap * tanh(x * inv_cap), mask=mask)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """logits (any float dtype) -> fp32 cap * tanh(logits / cap), same shape."""
    x = logits.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    inv_cap = float(np.float32(1.0) / np.float32(cap))
    _softcap_kernel[(triton.cdiv(n, _BLOCK),)](x, out, n, cap, inv_cap, BLOCK=_BLOCK, num_warps=4, enable_fp_fusion=False)
    return out
