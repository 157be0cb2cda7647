"""Gemma 4 routing in one launch: router logits [T, E] -> top-k expert ids, softmax over the k chosen
logits, times per_expert_scale[id]; also the logits in fp32 (TopKOutput.router_logits).

Selection is k rounds of "largest logit not yet taken". Experts come out in descending logit order,
as torch.topk(sorted=True) returns them; among equal logits the lowest expert id wins (torch.topk
leaves the order of ties unspecified; with real-valued logits ties have measure zero). A NaN logit
can never be picked here, while torch.topk treats NaN as the largest value; ids always stay in
[0, E) so the expert kernels never read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import exp, pdl_launch, pdl_start, unit_stride_rows


@triton.jit
def _router_topk_kernel(
    logits_ptr, scale_ptr, weights_ptr, ids_ptr, logits_out_ptr, stride_logits, num_experts,
    HAS_SCALE: tl.constexpr, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    x = tl.load(logits_ptr + row * stride_logits + offs, mask=valid, other=float("-inf")).to(tl.float32)
    tl.store(logits_out_ptr + row * num_experts + offs, x, mask=valid)
    slots = tl.arange(0, BLOCK_K)
    top = tl.full([BLOCK_K], float("-inf"), tl.float32)
    ids = tl.zeros([BLOCK_K], tl.int32)
    taken = ~valid
    for j in tl.static_range(TOP_K):
        best = tl.max(tl.where(taken, float("-inf"), x), axis=0)
        pick = tl.min(tl.where(~taken & (x == best), offs, BLOCK_E), axis=0)
        pick = tl.minimum(pick, num_experts - 1)  # only reached with NaN logits
        taken = taken | (offs == pick)
        top = tl.where(slots == j, best, top)
        ids = tl.where(slots == j, pick, ids)
    # softmax over the k chosen logits (the first one is their maximum)
    in_k = slots < TOP_K
    e = tl.where(in_k, exp(top - tl.max(top, axis=0)), 0.0)
    w = tl.math.div_rn(e, tl.sum(e, axis=0))
    if HAS_SCALE:
        w = w * tl.load(scale_ptr + ids, mask=in_k, other=0.0).to(tl.float32)
    out = row * TOP_K + slots
    tl.store(weights_ptr + out, w, mask=in_k)
    tl.store(ids_ptr + out, ids, mask=in_k)


def router_topk(
    logits: torch.Tensor, top_k: int, per_expert_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, ids [T, k] int32, logits [T, E] fp32)."""
    tokens, num_experts = logits.shape
    logits = unit_stride_rows(logits)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=logits.device)
    logits_f32 = torch.empty(tokens, num_experts, dtype=torch.float32, device=logits.device)
    if tokens > 0:
        has_scale = per_expert_scale is not None
        _router_topk_kernel[(tokens,)](
            logits, per_expert_scale if has_scale else logits, weights, ids, logits_f32, logits.stride(0),
            num_experts, HAS_SCALE=has_scale, TOP_K=top_k,
            BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_K=triton.next_power_of_2(top_k), num_warps=1,
            enable_fp_fusion=False, **pdl_launch(logits.device),
        )  # fmt: skip
    return weights, ids, logits_f32
