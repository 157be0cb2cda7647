"""End of a decoder layer, one pass over each row:

  moe    = sum over j of pairs[:, j]      (MoE layers given the experts' unsummed per-pair outputs
           [T, top_k, H]: summed in fp32 in slot order and rounded once, as torch's sum does)
  ffw    = post_feedforward_layernorm_1(dense) + post_feedforward_layernorm_2(moe)   (MoE layers;
           dense layers take ffw = dense)
  h      = (h + post_feedforward_layernorm(ffw)) * layer_scalar
  x_next = next_norm(h)      (the next layer's input_layernorm, or the model's final norm)

Each intermediate torch stores in the model dtype is rounded to it here too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import (
    inv_count, load_row, pdl_launch, pdl_start, rmsnorm_row, round_to, row_lanes, row_warps,
    unit_stride_rows,
)  # fmt: skip


@triton.jit
def _sum_pairs(ptr, stride_pair, offs, mask, TOP_K: tl.constexpr, DTYPE: tl.constexpr):
    """One token's TOP_K pair rows summed in fp32, in slot order, rounded to DTYPE."""
    acc = load_row(ptr, offs, mask)
    for j in tl.static_range(1, TOP_K):
        acc += load_row(ptr + j * stride_pair, offs, mask)
    return round_to(acc, DTYPE)


@triton.jit
def _ffn_combine_kernel(
    h_ptr, dense_ptr, moe_ptr, w_dense_ptr, w_moe_ptr, w_post_ptr, scalar_ptr, w_next_ptr,
    h_out, next_out, stride_h, stride_dense, stride_moe, stride_pair, n_cols, inv_n, eps,
    HAS_MOE: tl.constexpr, TOP_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    row, offs, mask = row_lanes(n_cols, BLOCK)
    # Weights first: no kernel writes them, so under PDL their loads overlap the previous kernel's
    # tail, and after the wait one round trip fetches the activations. (Dense layers pass w_post as
    # w_dense and w_moe: loaded, unused.)
    w_dense = load_row(w_dense_ptr, offs, mask)
    w_moe = load_row(w_moe_ptr, offs, mask)
    w_post = load_row(w_post_ptr, offs, mask)
    w_next = load_row(w_next_ptr, offs, mask)
    scalar = tl.load(scalar_ptr).to(tl.float32)
    pdl_start(PDL)
    DTYPE: tl.constexpr = h_out.dtype.element_ty
    ffw = load_row(dense_ptr + row * stride_dense, offs, mask)
    h = load_row(h_ptr + row * stride_h, offs, mask)
    if HAS_MOE:
        moe = _sum_pairs(moe_ptr + row * stride_moe, stride_pair, offs, mask, TOP_K, DTYPE)
        ffw = rmsnorm_row(ffw, w_dense, inv_n, eps, True, DTYPE)
        ffw = round_to(ffw + rmsnorm_row(moe, w_moe, inv_n, eps, True, DTYPE), DTYPE)
    h = round_to(h + rmsnorm_row(ffw, w_post, inv_n, eps, True, DTYPE), DTYPE)
    h = round_to(h * scalar, DTYPE)
    out = row * n_cols + offs
    tl.store(h_out + out, h, mask=mask)
    tl.store(next_out + out, rmsnorm_row(h, w_next, inv_n, eps, True, DTYPE), mask=mask)


def ffn_combine(
    h: torch.Tensor, dense: torch.Tensor, moe: torch.Tensor | None, w_dense: torch.Tensor | None,
    w_moe: torch.Tensor | None, w_post: torch.Tensor, layer_scalar: torch.Tensor, w_next: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(h, x_next). moe, w_dense and w_moe are given together (MoE layers) or are all None; moe is the
    experts' output [T, H] or their unsummed per-pair outputs [T, top_k, H]."""
    tokens, hidden = h.shape
    has_moe = moe is not None
    if not (has_moe == (w_dense is not None) == (w_moe is not None)):
        raise ValueError("moe, w_dense and w_moe come together (MoE layers) or not at all")
    h, dense = unit_stride_rows(h), unit_stride_rows(dense)
    # The kernel reads TOP_K pair rows a token: [T, H] is one pair (dense layers pass a dummy).
    pairs = (moe if moe.dim() == 3 else moe.unsqueeze(1)) if has_moe else dense.unsqueeze(1)
    pairs = unit_stride_rows(pairs)
    h_out = torch.empty_like(h, memory_format=torch.contiguous_format)
    next_out = torch.empty_like(h_out)
    if tokens > 0:
        block = triton.next_power_of_2(hidden)
        _ffn_combine_kernel[(tokens,)](
            h, dense, pairs, w_dense if has_moe else w_post, w_moe if has_moe else w_post, w_post, layer_scalar,
            w_next, h_out, next_out, h.stride(0), dense.stride(0), pairs.stride(0), pairs.stride(1), hidden,
            inv_count(hidden), eps, HAS_MOE=has_moe, TOP_K=pairs.shape[1], BLOCK=block, num_warps=row_warps(block),
            enable_fp_fusion=False, **pdl_launch(h.device),
        )  # fmt: skip
    return h_out, next_out
