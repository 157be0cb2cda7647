"""Model configuration: where the checkpoint is, what architecture it has, how it is quantized.

Gemma 4 configs come in two spellings: released files carry `global_head_dim` and
`num_global_key_value_heads` in `text_config`; newer transformers writes a `per_layer_config` map of
overrides. Both are read from the raw JSON here, so the result does not depend on the installed
transformers version.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sglang.srt.model_loader.weight_utils import resolve_model_path

logger = logging.getLogger(__name__)

GEMMA4_ARCHITECTURES = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "half": torch.float16, "float": torch.float32}


@dataclass(frozen=True)
class LayerSpec:
    layer_type: str  # "sliding_attention" | "full_attention"
    head_dim: int
    num_kv_heads: int
    rope_type: str
    rope_theta: float
    partial_rotary_factor: float
    k_eq_v: bool  # full layers with attention_k_eq_v reuse k_proj's output as V

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == "sliding_attention"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _layer_types(text: dict) -> list[str]:
    n = text["num_hidden_layers"]
    types = text.get("layer_types") or [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)
    ]
    if len(types) != n:
        raise ValueError(f"config has {len(types)} layer_types for {n} layers")
    bad = set(types) - {"sliding_attention", "full_attention"}
    if bad:
        raise ValueError(f"unsupported layer types {sorted(bad)}")
    return list(types)


def _rope_for(text: dict, layer_type: str) -> dict:
    defaults = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    params = (text.get("rope_parameters") or defaults).get(layer_type) or defaults[layer_type]
    if params.get("rope_type", "default") not in ("default", "proportional"):
        raise ValueError(f"unsupported rope_type {params['rope_type']!r} for {layer_type} layers")
    if float(params.get("factor", 1.0)) != 1.0:
        raise ValueError(f"rope scaling factor {params['factor']} is not supported")
    return params


def gemma4_layer_specs(text: dict) -> list[LayerSpec]:
    """Per-layer attention geometry, from either config spelling."""
    per_layer = text.get("per_layer_config") or {}
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    specs = []
    for i, layer_type in enumerate(_layer_types(text)):
        head_dim, kv_heads = text.get("head_dim", 256), text.get("num_key_value_heads")
        full = layer_type == "full_attention"
        if per_layer:
            override = per_layer.get(str(i), per_layer.get(i, {})) or {}
            head_dim = override.get("head_dim", head_dim)
            kv_heads = override.get("num_key_value_heads", kv_heads)
        elif full:
            head_dim = text.get("global_head_dim", 512)
            if k_eq_v and text.get("num_global_key_value_heads") is not None:
                kv_heads = text["num_global_key_value_heads"]
        rope = _rope_for(text, layer_type)
        specs.append(
            LayerSpec(
                layer_type=layer_type,
                head_dim=int(head_dim),
                num_kv_heads=int(kv_heads),
                rope_type=rope.get("rope_type", "default"),
                rope_theta=float(rope["rope_theta"]),
                partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
                k_eq_v=k_eq_v and full,
            )
        )
    return specs


def _check_supported_text_config(text: dict) -> None:
    if text.get("hidden_size_per_layer_input"):
        raise ValueError(
            "per-layer input embeddings (hidden_size_per_layer_input > 0, the small E2B/E4B Gemma 4 "
            "variants) are not supported yet"
        )
    if text.get("num_kv_shared_layers"):
        raise ValueError("KV sharing across layers (num_kv_shared_layers > 0) is not supported yet")
    if text.get("use_bidirectional_attention") == "all":
        raise ValueError("use_bidirectional_attention='all' (encoder-style Gemma 4) is not supported")
    if text.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported for Gemma 4")
    act = text.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"Gemma 4 expects hidden_activation gelu_pytorch_tanh, got {act!r}")


def read_quant_config(model_dir: Path, config: dict) -> dict | None:
    """ModelOpt settings from hf_quant_config.json, else config.json's quantization_config."""
    hf_quant = _read_json(model_dir / "hf_quant_config.json")
    if hf_quant is not None:
        return {"producer": hf_quant.get("producer", {}), **hf_quant.get("quantization", hf_quant)}
    return config.get("quantization_config")


def quantization_name(quant: dict | None) -> str | None:
    if not quant:
        return None
    algo = str(quant.get("quant_algo", "")).upper()
    method = str(quant.get("quant_method", "")).lower()
    if algo == "NVFP4" and method in ("", "modelopt", "modelopt_fp4"):
        return "modelopt_fp4"
    raise ValueError(
        f"unsupported quantization (quant_method={method or None!r}, quant_algo={algo or None!r}); "
        "supported: ModelOpt NVFP4"
    )


class ModelConfig:
    def __init__(
        self,
        model_path: str,
        revision: str | None = None,
        context_length: int | None = None,
        dtype: str = "auto",
        quantization: str | None = None,
        download_dir: str | None = None,
        load_format: str = "auto",
    ):
        self.model_path = str(resolve_model_path(model_path, revision, download_dir, load_format))
        model_dir = Path(self.model_path)
        config = _read_json(model_dir / "config.json")
        if config is None:
            raise FileNotFoundError(f"no config.json in {model_dir}")
        self.config_dict = config
        self.architectures = list(config.get("architectures") or [])
        if not set(self.architectures) & set(GEMMA4_ARCHITECTURES):
            raise ValueError(
                f"unsupported architecture {self.architectures}; this runtime serves {list(GEMMA4_ARCHITECTURES)}"
            )
        self.is_multimodal = "Gemma4ForConditionalGeneration" in self.architectures
        self.text_config = config.get("text_config", config) if self.is_multimodal else config
        _check_supported_text_config(self.text_config)
        self.layer_specs = gemma4_layer_specs(self.text_config)
        self.quant_config = read_quant_config(model_dir, config)
        detected = quantization_name(self.quant_config)
        if quantization is not None and quantization != detected:
            raise ValueError(f"--quantization {quantization} does not match the checkpoint ({detected or 'unquantized'})")
        self.quantization = detected
        self.dtype = self._resolve_dtype(dtype)
        self.context_len = self._resolve_context_len(context_length)
        self.hf_generation_config = _read_json(model_dir / "generation_config.json")

    @classmethod
    def from_server_args(cls, server_args) -> "ModelConfig":
        return cls(
            server_args.model_path,
            revision=server_args.revision,
            context_length=server_args.context_length,
            dtype=server_args.dtype,
            quantization=server_args.quantization,
            download_dir=getattr(server_args, "download_dir", None),
            load_format=getattr(server_args, "load_format", "auto"),
        )

    def _resolve_dtype(self, dtype: str) -> torch.dtype:
        if dtype == "auto":
            keys = ("dtype", "torch_dtype")
            name = next((c[k] for c in (self.text_config, self.config_dict) for k in keys if c.get(k)), "bfloat16")
            # fp32 checkpoints serve in bf16 by default, as SGLang does.
            return torch.bfloat16 if name in ("float32", "float") else _DTYPES.get(name, torch.bfloat16)
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose auto, bfloat16, float16 or float32")
        return _DTYPES[dtype]

    def _resolve_context_len(self, requested: int | None) -> int:
        native = int(self.text_config.get("max_position_embeddings", 8192))
        if requested is None:
            return native
        if requested <= 0:
            raise ValueError(f"context_length must be positive, got {requested}")
        if requested > native:
            # SGLang's rule: a longer context than the model was trained for only on explicit request.
            if os.environ.get("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN") != "1":
                raise ValueError(
                    f"--context-length {requested} is longer than the model's max_position_embeddings {native}; "
                    "set SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1 to use it anyway (outputs may be wrong)"
                )
            logger.warning(
                "context_length %d exceeds the model's max_position_embeddings %d; used because "
                "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1", requested, native,
            )  # fmt: skip
        return requested

    # Convenience views used across the runtime.
    @property
    def hf_text_config(self) -> dict:
        return self.text_config

    @property
    def hf_config(self) -> dict:
        return self.config_dict

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])

    @property
    def num_hidden_layers(self) -> int:
        return int(self.text_config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])
