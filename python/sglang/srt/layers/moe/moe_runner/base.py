"""The contract every MoE runner keeps, and the registry that picks one by name.

A runner is chosen once per FusedMoE layer from (backend name, weight format). It may repack the
layer's parameters once in `process_weights_after_loading` and then computes, for tokens x [M, H],
sum_k topk_weights[m, k] * expert_{topk_ids[m, k]}(x[m]) with expert(x) = down(act(gate(x)) * up(x)).
"""

from __future__ import annotations

from typing import Callable

import torch

from sglang.srt.layers.moe.topk import TopKOutput

# Weight formats a runner can serve.
BF16 = "bf16"
NVFP4 = "nvfp4"


class MoeRunner:
    """Base class. Subclasses set `backend` and `weight_format` and implement `apply`."""

    backend: str = ""
    weight_format: str = ""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Repack the layer's parameters for this runner (runs once, after loading)."""

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk: TopKOutput) -> torch.Tensor:
        raise NotImplementedError

    def apply_pairs(self, layer: torch.nn.Module, x: torch.Tensor, topk: TopKOutput) -> torch.Tensor:
        """The weighted per-pair terms [M, top_k, H] unsummed, for a caller that sums them in a kernel
        of its own; a runner without them returns the sum [M, H] (one pair per token)."""
        return self.apply(layer, x, topk)


_RUNNERS: dict[tuple[str, str], Callable[[], MoeRunner]] = {}


def register_moe_runner(cls):
    _RUNNERS[(cls.backend, cls.weight_format)] = cls
    return cls


def _import_builtin_runners() -> None:
    # Importing registers; optional runners fail softly here and loudly in get_moe_runner.
    import importlib

    for mod in ("torch_native", "triton", "flashinfer_trtllm"):
        try:
            importlib.import_module(f"sglang.srt.layers.moe.moe_runner.{mod}")
        except ImportError:
            pass


def get_moe_runner(backend: str, weight_format: str) -> MoeRunner:
    _import_builtin_runners()
    key = (backend, weight_format)
    if key not in _RUNNERS:
        known = sorted(f"{b}/{f}" for b, f in _RUNNERS)
        raise ValueError(
            f"no MoE runner for backend {backend!r} with {weight_format} experts; available: {known}"
        )
    return _RUNNERS[key]()
