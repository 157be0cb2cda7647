"""Exact reference MoE on any device: dequantize the touched experts, fp32 math, loop over experts.

Slow by design; it is the CPU path and the yardstick the GPU kernels are checked against.
"""

from __future__ import annotations

import torch

from sglang.srt.layers.activation import get_act_fn
from sglang.srt.layers.moe.moe_runner.base import BF16, NVFP4, MoeRunner, register_moe_runner
from sglang.srt.layers.moe.topk import TopKOutput
from sglang.srt.layers.quantization.fp4_utils import dequantize_nvfp4


def _moe_reference(x, topk: TopKOutput, expert_weights, activation: str) -> torch.Tensor:
    """expert_weights(e) -> (gate [I, H], up [I, H], down [H, I]) in fp32."""
    act = get_act_fn(activation)
    xf = x.float()
    out = torch.zeros_like(xf)
    ids = topk.topk_ids.long()
    for e in torch.unique(ids).tolist():
        token_idx, slot = torch.where(ids == e)
        gate, up, down = expert_weights(e)
        h = xf[token_idx]
        inter = act(h @ gate.t()) * (h @ up.t())
        y = (inter @ down.t()) * topk.topk_weights[token_idx, slot, None].float()
        out.index_add_(0, token_idx, y)
    return out.to(x.dtype)


@register_moe_runner
class TorchNativeBf16MoeRunner(MoeRunner):
    backend = "torch"
    weight_format = BF16

    def apply(self, layer, x, topk):
        inter = layer.intermediate_size_per_partition

        def weights(e):
            w13 = layer.w13_weight[e].float()
            return w13[:inter], w13[inter:], layer.w2_weight[e].float()

        return _moe_reference(x, topk, weights, layer.activation)


@register_moe_runner
class TorchNativeNvFp4MoeRunner(MoeRunner):
    backend = "torch"
    weight_format = NVFP4

    def apply(self, layer, x, topk):
        inter = layer.intermediate_size_per_partition

        def weights(e):
            gs13 = layer.w13_weight_scale_2[e]
            w13 = layer.w13_weight[e]
            s13 = layer.w13_weight_scale[e]
            gate = dequantize_nvfp4(w13[:inter], s13[:inter], gs13[0])
            up = dequantize_nvfp4(w13[inter:], s13[inter:], gs13[1])
            down = dequantize_nvfp4(layer.w2_weight[e], layer.w2_weight_scale[e], layer.w2_weight_scale_2[e])
            return gate, up, down

        return _moe_reference(x, topk, weights, layer.activation)
