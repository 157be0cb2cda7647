"""Linear layers whose output may be several checkpoint tensors stacked (q/k/v, gate/up).

Each parameter carries its own `weight_loader(param, loaded, shard_id=None)`. Parameters with an
`output_dim` attribute are split along it by shard; parameters marked `per_shard` hold one value per
shard (NVFP4 global and input scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang.srt.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase, new_param
from sglang.srt.layers.triton_ops import fused_ops_enabled


class WeightShapeError(ValueError):
    """A checkpoint tensor does not fit the parameter it maps to."""


def check_shape(name: str, expected: tuple, loaded: torch.Tensor) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise WeightShapeError(f"{name}: expected shape {tuple(expected)}, got {tuple(loaded.shape)}")


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One bf16 row on the GPU (batch-1 decode), where our Triton GEMV beats cuBLAS."""
    if not (x.dim() == 2 and x.shape[0] == 1 and fused_ops_enabled(x)):
        return False
    from sglang.srt.layers.triton_ops.gemv import supports

    return supports(x, weight)


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T: our Triton GEMV for one bf16 row on the GPU (batch-1 decode, where cuBLAS
    leaves bandwidth unused), cuBLAS / torch otherwise."""
    if _takes_gemv(x, weight):
        from sglang.srt.layers.triton_ops.gemv import gemv

        return gemv(x, weight)
    return F.linear(x, weight)


class UnquantizedLinearMethod(QuantizeMethodBase):
    def create_weights(self, layer, input_size: int, output_size: int, params_dtype: torch.dtype, **_):
        layer.weight = new_param((output_size, input_size), params_dtype, output_dim=0, weight_loader=layer.weight_loader)

    def apply(self, layer, x):
        return dense_linear(x, layer.weight)


class LinearBase(torch.nn.Module):
    """out = x @ W^T for W = concat(shards); shard i has output_sizes[i] rows."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        params_dtype: torch.dtype,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
        shard_names: list[str] | None = None,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(output_sizes)
        self.shard_names = shard_names or [str(i) for i in range(len(output_sizes))]
        self.prefix = prefix
        # Checkpoint paths of the stacked tensors, so exclude lists written per tensor still match.
        parent = prefix.rsplit(".", 1)[0]
        self.shard_prefixes = [f"{parent}.{n}" for n in shard_names] if shard_names else [prefix]
        method = quant_config.get_quant_method(self, prefix) if quant_config else None
        self.quant_method: QuantizeMethodBase = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(
            self, input_size=input_size, output_size=self.output_size, params_dtype=params_dtype
        )

    def shard_index(self, shard_id) -> int | None:
        if shard_id is None or isinstance(shard_id, int):
            return shard_id
        return self.shard_names.index(shard_id)

    def weight_loader(self, param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy one checkpoint tensor into its rows (a stacked shard) or the whole parameter."""
        idx = self.shard_index(shard_id)
        target = param.data
        if getattr(param, "per_shard", False):
            # One scalar per checkpoint tensor (NVFP4 global/input scale).
            loaded = loaded.reshape(-1)
            if idx is not None:
                target = target[idx : idx + 1]
            elif loaded.numel() == 1:
                loaded = loaded.expand(target.shape)
        elif idx is not None:
            start = sum(self.output_sizes[:idx])
            target = target.narrow(param.output_dim, start, self.output_sizes[idx])
        check_shape(f"{self.prefix}.{self._param_name(param)}", target.shape, loaded)
        target.copy_(loaded.to(target.dtype))

    def _param_name(self, param) -> str:
        for name, p in self.named_parameters(recurse=False):
            if p is param:
                return name
        return "?"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, params_dtype, quant_config=None, prefix: str = ""):
        super().__init__(input_size, [output_size], params_dtype, quant_config, prefix)


class MergedColumnLinear(LinearBase):
    """Several projections of the same input computed as one matmul (q/k/v, gate/up)."""

    def forward_gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """gelu_tanh(x @ gate^T) * (x @ up^T) for an unquantized [gate; up] pair in one GEMV launch
        with the activation in its epilogue (batch-1 decode); None where that path does not apply."""
        two_halves = len(self.output_sizes) == 2 and self.output_sizes[0] == self.output_sizes[1]
        if not (two_halves and isinstance(self.quant_method, UnquantizedLinearMethod) and _takes_gemv(x, self.weight)):
            return None
        from sglang.srt.layers.triton_ops.gemv import gemv_gelu_tanh_and_mul

        return gemv_gelu_tanh_and_mul(x, self.weight)
