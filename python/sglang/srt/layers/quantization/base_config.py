"""How a layer asks its quantization config for the code that owns its weights."""

from __future__ import annotations

import torch


class QuantizeMethodBase:
    """Registers a layer's parameters, repacks them once after loading, and runs the layer."""

    def create_weights(self, layer: torch.nn.Module, **kwargs) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        raise NotImplementedError


class QuantizationConfig:
    name: str = ""

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """The method for `layer` at checkpoint path `prefix`; None means unquantized."""
        raise NotImplementedError


def set_weight_attrs(param: torch.nn.Parameter, attrs: dict) -> None:
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"parameter already has attribute {key!r}")
        setattr(param, key, value)


def new_param(shape, dtype, device=None, **attrs) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    set_weight_attrs(param, attrs)
    return param
