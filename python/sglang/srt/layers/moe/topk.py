"""Expert selection. Gemma 4 routes with top-k of the logits, a softmax over those k, then a
per-expert scale; equal to softmax-over-all, top-k, renormalise, scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.srt.layers.triton_ops import fused_ops_enabled


@dataclass
class TopKOutput:
    topk_weights: torch.Tensor  # [M, k] fp32, per-expert scale already folded in
    topk_ids: torch.Tensor  # [M, k] int32
    router_logits: torch.Tensor  # [M, E] fp32, for runners that route inside their kernel


def gemma4_topk(
    router_logits: torch.Tensor, top_k: int, per_expert_scale: torch.Tensor | None = None
) -> TopKOutput:
    if fused_ops_enabled(router_logits):
        from sglang.srt.layers.triton_ops.router_topk import router_topk

        return TopKOutput(*router_topk(router_logits, top_k, per_expert_scale))
    logits = router_logits.float()
    top_logits, topk_ids = torch.topk(logits, k=top_k, dim=-1)
    weights = torch.softmax(top_logits, dim=-1)
    if per_expert_scale is not None:
        weights = weights * per_expert_scale.float()[topk_ids]
    return TopKOutput(topk_weights=weights, topk_ids=topk_ids.to(torch.int32), router_logits=logits)
