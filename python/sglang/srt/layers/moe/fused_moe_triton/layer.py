"""FusedMoE: all experts of one layer as stacked parameters, computed by a pluggable runner.

Stacked layout (E experts, hidden H, intermediate I): `w13_*` holds gate rows [0, I) (shard "w1")
and up rows [I, 2I) (shard "w3"); `w2_*` holds down (shard "w2"). Checkpoints name experts one by
one (`experts.7.gate_proj.weight_scale`) or fused (`experts.gate_up_proj`); both land here through
the parameters' `weight_loader`.
"""

from __future__ import annotations

import torch

from sglang.srt.layers.linear import check_shape
from sglang.srt.layers.moe.moe_runner import BF16, get_moe_runner
from sglang.srt.layers.moe.topk import TopKOutput
from sglang.srt.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase, new_param

_SHARDS = ("w1", "w2", "w3")


class UnquantizedFusedMoEMethod(QuantizeMethodBase):
    def __init__(self):
        self.runner = None

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size: int, params_dtype, **_):
        E, H, I = num_experts, hidden_size, intermediate_size
        loader = layer.weight_loader
        layer.w13_weight = new_param((E, 2 * I, H), params_dtype, moe_kind="weight", weight_loader=loader)
        layer.w2_weight = new_param((E, H, I), params_dtype, moe_kind="weight", weight_loader=loader)

    def process_weights_after_loading(self, layer) -> None:
        self.runner = get_moe_runner(layer.moe_runner_backend, BF16)
        self.runner.process_weights_after_loading(layer)

    def apply(self, layer, x, topk):
        return self.runner.apply(layer, x, topk)


class FusedMoE(torch.nn.Module):
    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        params_dtype: torch.dtype,
        activation: str = "gelu_pytorch_tanh",
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        moe_runner_backend: str = "torch",
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"{prefix}: top_k={top_k} must be within 1..num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size_per_partition = intermediate_size
        self.activation = activation
        self.prefix = prefix
        self.moe_runner_backend = moe_runner_backend
        # Runners that route inside their kernel fold the router's per-expert scale themselves.
        self.router_per_expert_scale: torch.Tensor | None = None
        method = quant_config.get_quant_method(self, prefix) if quant_config else None
        self.quant_method: QuantizeMethodBase = method or UnquantizedFusedMoEMethod()
        self.quant_method.create_weights(
            self,
            num_experts=num_experts,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            params_dtype=params_dtype,
        )

    @classmethod
    def make_expert_params_mapping(
        cls, ckpt_gate_proj_name: str, ckpt_down_proj_name: str, ckpt_up_proj_name: str, num_experts: int
    ) -> list[tuple[str, str, int, str]]:
        """(param_name, weight_name, expert_id, shard_id); the trailing dots let one tuple cover
        every suffix (weight, weight_scale, weight_scale_2, input_scale)."""
        mapping = []
        for expert_id in range(num_experts):
            for shard_id, ckpt_name in (("w1", ckpt_gate_proj_name), ("w2", ckpt_down_proj_name), ("w3", ckpt_up_proj_name)):
                param_name = "experts.w13_" if shard_id in ("w1", "w3") else "experts.w2_"
                mapping.append((param_name, f"experts.{expert_id}.{ckpt_name}.", expert_id, shard_id))
        return mapping

    def weight_loader(
        self,
        param: torch.nn.Parameter,
        loaded_weight: torch.Tensor,
        weight_name: str,
        shard_id: str,
        expert_id: int | None,
    ) -> None:
        """Place one checkpoint tensor; expert_id None means it holds every expert (fused layout)."""
        if shard_id not in _SHARDS and shard_id != "w13":
            raise ValueError(f"{weight_name}: shard_id must be one of {_SHARDS + ('w13',)}, got {shard_id!r}")
        target = param.data if expert_id is None else param.data[expert_id]
        if param.moe_kind == "scalar":
            # One fp32 per checkpoint tensor: column 0 gate, column 1 up for w13.
            if shard_id in ("w1", "w3") and target.dim() >= 1 and target.shape[-1] == 2:
                target = target[..., 0 if shard_id == "w1" else 1]
            loaded_weight = loaded_weight.reshape(target.shape) if loaded_weight.numel() == target.numel() else loaded_weight
        elif shard_id in ("w1", "w3"):
            rows = self.intermediate_size_per_partition
            target = target.narrow(-2, 0 if shard_id == "w1" else rows, rows)
        check_shape(weight_name, target.shape, loaded_weight)
        target.copy_(loaded_weight.to(target.dtype))

    def forward(self, x: torch.Tensor, topk: TopKOutput, keep_pairs: bool = False) -> torch.Tensor:
        """[M, H]. keep_pairs: the runner's unsummed per-pair terms [M, top_k, H] where it has them
        (MoeRunner.apply_pairs), [M, H] otherwise; the caller sums."""
        if keep_pairs:
            # Every MoE quant method computes through a runner, picked after loading.
            return self.quant_method.runner.apply_pairs(self, x, topk)
        return self.quant_method.apply(self, x, topk)
