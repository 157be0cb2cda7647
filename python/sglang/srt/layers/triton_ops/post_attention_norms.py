"""After attention, one pass over each row of the residual stream:

  h      = h + post_attention_layernorm(attn)
  x_mlp  = pre_feedforward_layernorm(h)                 (dense MLP input)
  x_moe  = pre_feedforward_layernorm_2(h)               (MoE layers: expert input)
  x_rout = norm(h) * router.scale * router.root_size    (MoE layers: router input, unweighted norm)

The three norms of h share one rms. Every intermediate torch would store in the model dtype is rounded
to it here too (h, each norm's output, each product of the router input).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import (
    inv_count, inv_rms, load_row, pdl_launch, pdl_start, rmsnorm_row, round_to, row_lanes, row_warps, scale_row, unit_stride_rows,
)  # fmt: skip


@triton.jit
def _post_attention_norms_kernel(
    h_ptr, attn_ptr, w_post_ptr, w_mlp_ptr, w_moe_ptr, router_scale_ptr,
    h_out, mlp_out, moe_out, router_out,
    stride_h, stride_attn, n_cols, inv_n, eps, root_size,
    HAS_MOE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    row, offs, mask = row_lanes(n_cols, BLOCK)
    # Weights before the wait (see ffn_combine); dense layers pass w_mlp for w_moe and router_scale.
    w_post = load_row(w_post_ptr, offs, mask)
    w_mlp = load_row(w_mlp_ptr, offs, mask)
    w_moe = load_row(w_moe_ptr, offs, mask)
    router_scale = load_row(router_scale_ptr, offs, mask)
    pdl_start(PDL)
    DTYPE: tl.constexpr = h_out.dtype.element_ty
    attn = load_row(attn_ptr + row * stride_attn, offs, mask)
    h = load_row(h_ptr + row * stride_h, offs, mask)
    h = round_to(h + rmsnorm_row(attn, w_post, inv_n, eps, True, DTYPE), DTYPE)
    out = row * n_cols + offs
    tl.store(h_out + out, h, mask=mask)
    r = inv_rms(tl.sum(h * h, axis=0), inv_n, eps)
    tl.store(mlp_out + out, scale_row(h, r, w_mlp, True, DTYPE), mask=mask)
    if HAS_MOE:
        tl.store(moe_out + out, scale_row(h, r, w_moe, True, DTYPE), mask=mask)
        x = scale_row(h, r, w_moe, False, DTYPE)
        x = round_to(x * router_scale, DTYPE)
        tl.store(router_out + out, round_to(x * root_size, DTYPE), mask=mask)


def post_attention_norms(
    h: torch.Tensor, attn: torch.Tensor, w_post: torch.Tensor, w_mlp: torch.Tensor,
    w_moe: torch.Tensor | None, router_scale: torch.Tensor | None, root_size: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(h, x_mlp, x_moe, x_router); the last two are None unless w_moe and router_scale are given."""
    tokens, hidden = h.shape
    h, attn = unit_stride_rows(h), unit_stride_rows(attn)
    has_moe = w_moe is not None
    if has_moe != (router_scale is not None):
        raise ValueError("w_moe and router_scale come together (MoE layers) or not at all")
    outs = [torch.empty_like(h, memory_format=torch.contiguous_format) for _ in range(4 if has_moe else 2)]
    if tokens > 0:
        block = triton.next_power_of_2(hidden)
        h_out, mlp_out = outs[:2]
        moe_out, router_out = outs[2:] if has_moe else (h_out, h_out)
        _post_attention_norms_kernel[(tokens,)](
            h, attn, w_post, w_mlp, w_moe if has_moe else w_mlp, router_scale if has_moe else w_mlp,
            h_out, mlp_out, moe_out, router_out, h.stride(0), attn.stride(0), hidden, inv_count(hidden), eps,
            root_size, HAS_MOE=has_moe, BLOCK=block, num_warps=row_warps(block), enable_fp_fusion=False,
            **pdl_launch(h.device),
        )  # fmt: skip
    return (*outs, None, None) if not has_moe else tuple(outs)
