"""Quantization configs by the name ServerArgs.quantization / the checkpoint uses."""

from __future__ import annotations

from sglang.srt.layers.quantization.base_config import QuantizationConfig


def get_quantization_config(name: str | None, quant_dict: dict | None) -> QuantizationConfig | None:
    if name is None:
        return None
    if name == "modelopt_fp4":
        from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config

        return ModelOptFp4Config.from_config(quant_dict or {})
    raise ValueError(f"unsupported quantization {name!r}; supported: modelopt_fp4")
