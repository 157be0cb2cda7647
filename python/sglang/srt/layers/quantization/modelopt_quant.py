"""NVIDIA ModelOpt NVFP4 checkpoints: which modules are quantized, and the methods that own them.

Weights are e2m1 codes packed two per byte with one e4m3 scale per 16 inputs and an fp32 global
scale per checkpoint tensor. Stacked layers (gate/up, q/k/v) keep one global scale per stacked
tensor: exporters give gate and up different ones, and merging them would lose accuracy.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sglang.srt.layers.moe.moe_runner import NVFP4, get_moe_runner
from sglang.srt.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase, new_param
from sglang.srt.layers.quantization.fp4_utils import FP4_BLOCK_SIZE, dequantize_nvfp4

logger = logging.getLogger(__name__)


def _strip_language_model(name: str) -> str:
    return name.replace("language_model.", "")


@dataclass
class ModelOptFp4Config(QuantizationConfig):
    group_size: int = FP4_BLOCK_SIZE
    exclude_modules: list[str] = field(default_factory=list)
    kv_cache_quant_algo: str | None = None
    name: str = "modelopt_fp4"

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelOptFp4Config":
        group_size = int(cfg.get("group_size", FP4_BLOCK_SIZE))
        if group_size != FP4_BLOCK_SIZE:
            raise ValueError(f"ModelOpt NVFP4 group_size must be {FP4_BLOCK_SIZE}, got {group_size}")
        exclude = cfg.get("exclude_modules") or cfg.get("ignore") or []
        return cls(group_size, list(exclude), cfg.get("kv_cache_quant_algo"))

    def is_excluded(self, prefix: str) -> bool:
        """Glob match, with or without the multimodal `language_model.` part on either side."""
        name = _strip_language_model(prefix)
        for pattern in self.exclude_modules:
            pat = _strip_language_model(pattern)
            if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, pat + ".*"):
                return True
        return False

    def get_quant_method(self, layer, prefix: str):
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

        if isinstance(layer, FusedMoE):
            return None if self.is_excluded(prefix) else ModelOptNvFp4FusedMoEMethod(self)
        if isinstance(layer, LinearBase):
            excluded = [self.is_excluded(p) for p in layer.shard_prefixes]
            if any(excluded) and not all(excluded):
                raise ValueError(
                    f"{prefix}: stacked tensors {layer.shard_prefixes} are partly excluded from NVFP4; "
                    "a fused layer needs them all quantized or all unquantized"
                )
            return None if all(excluded) else ModelOptFp4LinearMethod(self)
        return None


def _check_global_scales(name: str, scales: torch.Tensor) -> None:
    bad = ~torch.isfinite(scales) | (scales <= 0)
    if bool(bad.any()):
        raise ValueError(f"{name}: NVFP4 global scales must be positive and finite, got {scales[bad].tolist()[:4]}")


class ModelOptFp4LinearMethod(QuantizeMethodBase):
    """W4A16 dense linear: dequantized in a Triton kernel on GPU, exactly in torch elsewhere."""

    def __init__(self, config: ModelOptFp4Config):
        self.config = config

    def create_weights(self, layer, input_size: int, output_size: int, params_dtype, **_):
        if input_size % FP4_BLOCK_SIZE:
            raise ValueError(f"{layer.prefix}: NVFP4 input size {input_size} is not a multiple of {FP4_BLOCK_SIZE}")
        n_shards = len(layer.output_sizes)
        loader = layer.weight_loader
        layer.weight = new_param((output_size, input_size // 2), torch.uint8, output_dim=0, weight_loader=loader)
        layer.weight_scale = new_param(
            (output_size, input_size // FP4_BLOCK_SIZE), torch.float8_e4m3fn, output_dim=0, weight_loader=loader
        )
        layer.weight_scale_2 = new_param((n_shards,), torch.float32, per_shard=True, weight_loader=loader)
        layer.input_scale = new_param((n_shards,), torch.float32, per_shard=True, weight_loader=loader)

    def process_weights_after_loading(self, layer) -> None:
        _check_global_scales(f"{layer.prefix}.weight_scale_2", layer.weight_scale_2.data)
        layer.nvfp4_kernel = None
        if layer.weight.is_cuda:
            try:
                from sglang.srt.layers.quantization.nvfp4_linear_triton import nvfp4_linear

                layer.nvfp4_kernel = nvfp4_linear
            except ImportError:
                logger.warning("Triton NVFP4 linear kernel unavailable; using the torch reference")

    def _shards(self, layer):
        start = 0
        for i, size in enumerate(layer.output_sizes):
            yield i, slice(start, start + size)
            start += size

    def apply(self, layer, x):
        if layer.nvfp4_kernel is not None:
            outs = [
                layer.nvfp4_kernel(x, layer.weight[rows], layer.weight_scale[rows], layer.weight_scale_2[i])
                for i, rows in self._shards(layer)
            ]
            return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        w = torch.cat(
            [
                dequantize_nvfp4(layer.weight[rows], layer.weight_scale[rows], layer.weight_scale_2[i])
                for i, rows in self._shards(layer)
            ]
        )
        return F.linear(x.float(), w).to(x.dtype)


class ModelOptNvFp4FusedMoEMethod(QuantizeMethodBase):
    """NVFP4 experts; the math is delegated to the MoE runner chosen by --moe-runner-backend."""

    def __init__(self, config: ModelOptFp4Config):
        self.config = config
        self.runner = None

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size: int, **_):
        for dim, what in ((hidden_size, "hidden_size"), (intermediate_size, "moe_intermediate_size")):
            if dim % FP4_BLOCK_SIZE:
                raise ValueError(f"{layer.prefix}: NVFP4 experts need {what} divisible by {FP4_BLOCK_SIZE}, got {dim}")
        E, H, I = num_experts, hidden_size, intermediate_size
        loader = layer.weight_loader
        shapes = {
            "w13_weight": ((E, 2 * I, H // 2), torch.uint8, "weight"),
            "w2_weight": ((E, H, I // 2), torch.uint8, "weight"),
            "w13_weight_scale": ((E, 2 * I, H // FP4_BLOCK_SIZE), torch.float8_e4m3fn, "weight"),
            "w2_weight_scale": ((E, H, I // FP4_BLOCK_SIZE), torch.float8_e4m3fn, "weight"),
            "w13_weight_scale_2": ((E, 2), torch.float32, "scalar"),
            "w2_weight_scale_2": ((E,), torch.float32, "scalar"),
            "w13_input_scale": ((E, 2), torch.float32, "scalar"),
            "w2_input_scale": ((E,), torch.float32, "scalar"),
        }
        for name, (shape, dtype, kind) in shapes.items():
            layer.register_parameter(name, new_param(shape, dtype, moe_kind=kind, weight_loader=loader))

    def process_weights_after_loading(self, layer) -> None:
        _check_global_scales(f"{layer.prefix}.w13_weight_scale_2", layer.w13_weight_scale_2.data)
        _check_global_scales(f"{layer.prefix}.w2_weight_scale_2", layer.w2_weight_scale_2.data)
        self.runner = get_moe_runner(layer.moe_runner_backend, NVFP4)
        self.runner.process_weights_after_loading(layer)

    def apply(self, layer, x, topk):
        return self.runner.apply(layer, x, topk)
