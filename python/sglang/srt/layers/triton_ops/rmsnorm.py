"""RMSNorm over the last dim (Gemma 4 form: optional weight, fp32 math, output in the input dtype)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import inv_count, load_row, rmsnorm_row, row_lanes, row_warps, unit_stride_rows


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, stride_x, n_cols, inv_n, eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row, offs, mask = row_lanes(n_cols, BLOCK)
    x = load_row(x_ptr + row * stride_x, offs, mask)
    w = load_row(w_ptr, offs, mask)  # without a weight the host passes x: a valid, unused row
    out = rmsnorm_row(x, w, inv_n, eps, HAS_W, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n_cols + offs, out, mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., n] -> RMSNorm(x) [..., n] in x.dtype (new contiguous tensor)."""
    n = x.shape[-1]
    rows = unit_stride_rows(x.reshape(-1, n))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out
    block = triton.next_power_of_2(n)
    _rmsnorm_kernel[(rows.shape[0],)](
        rows, weight if weight is not None else rows, out, rows.stride(0), n, inv_count(n), eps,
        HAS_W=weight is not None, BLOCK=block, num_warps=row_warps(block), enable_fp_fusion=False,
    )  # fmt: skip
    return out
