"""Triton fused-MoE runners (bf16 and W4A16 NVFP4 experts) for SM80/SM90, where no FP4 MMA exists.

Both run the same kernels (sglang.srt.layers.moe.fused_moe_triton): tokens sorted per expert, GEMM1
over [gate; up] with act(gate) * up fused into its epilogue, GEMM2 with the routing weight, top-k sum
(apply_pairs leaves the sum to the model's FFN combine kernel).
NVFP4 experts are repacked once in process_weights_after_loading (`prepare_nvfp4_experts`: int32 code
words in a bit order that decodes in a few instructions and re-encoded block scales, together in
contiguous 16-row blocks); the layer's checkpoint-layout tensors are replaced (the block scales by
empty tensors: they now live inside the blocks), so no second copy stays alive.
"""

from __future__ import annotations

import torch

from sglang.srt.layers.moe.fused_moe_triton.configs import tuned_tables
from sglang.srt.layers.moe.fused_moe_triton.fused_moe import ExpertWeights, fused_experts, prepare_nvfp4_experts
from sglang.srt.layers.moe.moe_runner.base import BF16, NVFP4, MoeRunner, register_moe_runner
from sglang.srt.layers.moe.topk import TopKOutput


def _set_param(layer: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter's data in place of the attribute, keeping it a frozen Parameter."""
    old = getattr(layer, name)
    if value is old or (value.data_ptr() == old.data_ptr() and value.dtype == old.dtype and value.shape == old.shape):
        return
    setattr(layer, name, torch.nn.Parameter(value, requires_grad=False))


class _TritonMoeRunnerBase(MoeRunner):
    backend = "triton"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        tuned_tables()  # a bad SGLANG_MOE_CONFIG_FILE fails at load, not at the first request
        self._prepare(layer)

    def _prepare(self, layer: torch.nn.Module) -> None:
        raise NotImplementedError

    def _weights(self, layer: torch.nn.Module) -> ExpertWeights:
        raise NotImplementedError

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk: TopKOutput) -> torch.Tensor:
        return self._run(layer, x, topk, sum_pairs=True)

    def apply_pairs(self, layer: torch.nn.Module, x: torch.Tensor, topk: TopKOutput) -> torch.Tensor:
        return self._run(layer, x, topk, sum_pairs=False)

    def _run(self, layer: torch.nn.Module, x: torch.Tensor, topk: TopKOutput, sum_pairs: bool) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.empty_like(x)
        w = self._weights(layer)
        return fused_experts(x, w, topk.topk_weights, topk.topk_ids, layer.activation, sum_pairs=sum_pairs)


@register_moe_runner
class TritonBf16MoeRunner(_TritonMoeRunnerBase):
    weight_format = BF16

    def _prepare(self, layer: torch.nn.Module) -> None:
        for name in ("w13_weight", "w2_weight"):
            _set_param(layer, name, getattr(layer, name).data.to(torch.bfloat16).contiguous())

    def _weights(self, layer: torch.nn.Module) -> ExpertWeights:
        return ExpertWeights(layer.w13_weight, layer.w2_weight)


@register_moe_runner
class TritonNvFp4MoeRunner(_TritonMoeRunnerBase):
    weight_format = NVFP4

    def _prepare(self, layer: torch.nn.Module) -> None:
        if not getattr(layer, "nvfp4_triton_layout", False):
            w = prepare_nvfp4_experts(
                layer.w13_weight.data, layer.w2_weight.data, layer.w13_weight_scale.data,
                layer.w2_weight_scale.data, layer.w13_weight_scale_2.data, layer.w2_weight_scale_2.data,
            )  # fmt: skip
            _set_param(layer, "w13_weight", w.w13)
            _set_param(layer, "w2_weight", w.w2)
            for name in ("w13_weight_scale", "w2_weight_scale"):
                _set_param(layer, name, torch.empty(0, dtype=torch.uint8, device=w.w13.device))
            layer.nvfp4_triton_layout = True
        _set_param(layer, "w13_weight_scale_2", layer.w13_weight_scale_2.data.float().reshape(-1, 2).contiguous())
        _set_param(layer, "w2_weight_scale_2", layer.w2_weight_scale_2.data.float().reshape(-1).contiguous())

    def _weights(self, layer: torch.nn.Module) -> ExpertWeights:
        return ExpertWeights(layer.w13_weight, layer.w2_weight, layer.w13_weight_scale_2, layer.w2_weight_scale_2)
