"""Activations by their Hugging Face names; Gemma 4 uses the tanh form of GELU."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sglang.srt.layers.triton_ops import fused_ops_enabled

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": lambda x: F.gelu(x),
    "silu": F.silu,
    "relu": F.relu,
}
# Activations the fused act(gate) * up kernels compute (tanh-GELU).
FUSED_AND_MUL = ("gelu_pytorch_tanh", "gelu_tanh")


def get_act_fn(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def get_act_and_mul_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """gate_up [..., 2I] = [gate | up] -> act(gate) * up [..., I], fused into one kernel when enabled."""
    act = get_act_fn(name)
    fusable = name in FUSED_AND_MUL

    def act_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        if fusable and fused_ops_enabled(gate_up):
            from sglang.srt.layers.triton_ops.gelu_and_mul import gelu_tanh_and_mul

            return gelu_tanh_and_mul(gate_up)
        inter = gate_up.shape[-1] // 2
        return act(gate_up[..., :inter]) * gate_up[..., inter:]

    return act_and_mul
