"""Write small, deterministic Gemma 4 MoE checkpoints in every layout the loaders must accept.

    python -m sglang.test.make_gemma4_checkpoint OUT --layout {bf16-fused,bf16-per-expert,nvfp4-per-expert}
    python -m sglang.test.make_gemma4_checkpoint --demo      # prints the cached demo model's path

Layouts (see ../shared/reference/gemma4.md and nvfp4.md):
- bf16-fused: the HF/transformers format, `experts.gate_up_proj` [E, 2I, H] (gate rows first) and
  `experts.down_proj` [E, H, I].
- bf16-per-expert: `experts.<e>.{gate_proj,up_proj,down_proj}.weight`.
- nvfp4-per-expert: ModelOpt NVFP4 for the routed experts (and optionally the dense MLP), everything else
  bf16, with `hf_quant_config.json` and `quantization_config` in config.json.

All three are derived from one bf16 state dict, so they describe the same model up to NVFP4 rounding;
`reference_state_dict` reads any of them back into the fused fp32 form transformers loads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sglang.srt.layers.quantization.fp4_utils import (
    E2M1_MAX,
    E4M3_MAX,
    FP4_BLOCK_SIZE,
    dequantize_nvfp4,
    quantize_nvfp4,
)
from sglang.test.tokenizer_data import TOOL_RESPONSE_ID, TURN_END_ID, VOCAB_SIZE, write_tokenizer

LAYOUTS = ("bf16-fused", "bf16-per-expert", "nvfp4-per-expert")
ARCHITECTURES = ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM")
CONFIG_STYLES = ("released", "per_layer_config")

DEMO_MODEL_NAME = "sglang-demo/gemma4-tiny-nvfp4"
# Bump whenever the writer's output changes, so cached demo models are regenerated.
DEMO_MODEL_VERSION = "1"
_DEMO_VERSION_FILE = "sglang_demo_version"

MODELOPT_VERSION = "0.37.0"
_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
# Up-projection weights are drawn with a different spread than gate ones so that their NVFP4 global
# scales (amax / (6 * 448)) always differ, which is what the real export shows and loaders get wrong.
_UP_PROJ_STD_FACTOR = 0.7


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def tiny_text_config(**overrides) -> dict:
    """A small Gemma 4 MoE text config (released spelling: `global_head_dim` etc. at top level).

    Dimensions are multiples of 16 where NVFP4 needs it; 6 experts (not a power of two); the window of
    8 is shorter than typical test prompts so sliding attention is really exercised.
    """
    num_layers = overrides.pop("num_hidden_layers", 5)
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"] * num_layers
    layer_types = layer_types[:num_layers]
    layer_types[-1] = "full_attention"
    cfg = {
        "model_type": "gemma4_text",
        "vocab_size": VOCAB_SIZE,
        "vocab_size_per_layer_input": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 48,
        "num_hidden_layers": num_layers,
        "layer_types": layer_types,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_global_key_value_heads": 1,
        "attention_k_eq_v": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": 8,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "enable_moe_block": True,
        "num_experts": 6,
        "top_k_experts": 2,
        "moe_intermediate_size": 32,
        "use_double_wide_mlp": False,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "final_logit_softcapping": 30.0,
        "use_bidirectional_attention": None,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": [1, TURN_END_ID],
        "bos_token_id": 2,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def layer_attention_dims(text_config: dict, layer_idx: int) -> tuple[int, int]:
    """(head_dim, num_key_value_heads) of one layer, from either config spelling.

    Mirrors transformers 5.24: full layers use `global_head_dim`; `num_global_key_value_heads` applies
    only when `attention_k_eq_v` is set (otherwise full layers keep `num_key_value_heads`).
    """
    overrides = _per_layer_overrides(text_config).get(layer_idx, {})
    head_dim = overrides.get("head_dim", text_config["head_dim"])
    kv_heads = overrides.get("num_key_value_heads", text_config["num_key_value_heads"])
    return head_dim, kv_heads


def _per_layer_overrides(text_config: dict) -> dict[int, dict]:
    if "per_layer_config" in text_config:
        return {int(k): v for k, v in text_config["per_layer_config"].items()}
    override: dict = {"head_dim": text_config.get("global_head_dim", 512)}
    global_kv = text_config.get("num_global_key_value_heads")
    if global_kv is not None and text_config.get("attention_k_eq_v", False):
        override["num_key_value_heads"] = global_kv
    return {
        i: dict(override) for i, kind in enumerate(text_config["layer_types"]) if kind == "full_attention"
    }


def styled_text_config(text_config: dict, config_style: str) -> dict:
    """Return the text config in the requested spelling ("released" or "per_layer_config")."""
    if config_style not in CONFIG_STYLES:
        raise ValueError(f"config_style must be one of {CONFIG_STYLES}, got {config_style!r}")
    cfg = copy.deepcopy(text_config)
    if config_style == "released":
        if "per_layer_config" in cfg:
            raise ValueError("cannot express a per_layer_config text config in the released spelling")
        return cfg
    overrides = _per_layer_overrides(cfg)
    cfg.pop("global_head_dim", None)
    cfg.pop("num_global_key_value_heads", None)
    # transformers serializes the map with string keys (JSON object keys).
    cfg["per_layer_config"] = {str(i): v for i, v in sorted(overrides.items())}
    return cfg


def text_prefix(architecture: str) -> str:
    """Key prefix of the text model's weights for an architecture."""
    if architecture == "Gemma4ForConditionalGeneration":
        return "model.language_model."
    if architecture == "Gemma4ForCausalLM":
        return "model."
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


def model_config(text_config: dict, architecture: str) -> dict:
    """config.json contents (without quantization_config) for an architecture."""
    text_prefix(architecture)  # validates the name
    if architecture == "Gemma4ForCausalLM":
        return {"architectures": [architecture], **text_config}
    return {
        "architectures": [architecture],
        "model_type": "gemma4",
        "text_config": text_config,
        "vision_config": None,
        "audio_config": None,
        "tie_word_embeddings": text_config.get("tie_word_embeddings", True),
        "initializer_range": 0.02,
        "dtype": "bfloat16",
    }


def generation_config(text_config: dict) -> dict:
    return {
        "bos_token_id": text_config["bos_token_id"],
        "pad_token_id": text_config["pad_token_id"],
        "eos_token_id": [1, TURN_END_ID, TOOL_RESPONSE_ID],
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
    }


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per tensor name: a tensor's values don't depend on which other tensors exist.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed, name)) * std


def _uniform(seed: int, name: str, shape: tuple[int, ...], lo: float = 0.5, hi: float = 1.5) -> torch.Tensor:
    # Non-trivial (far from 1.0 and from each other) so a dropped or misapplied scale changes outputs.
    return lo + (hi - lo) * torch.rand(shape, generator=_generator(seed, name))


def _scalar_away_from_one(seed: int, name: str) -> torch.Tensor:
    # A single scalar drawn from [0.5, 0.8] or [1.2, 1.5]: never close enough to 1 to hide a bug.
    g = _generator(seed, name)
    offset = 0.2 + 0.3 * torch.rand((1,), generator=g)
    sign = torch.where(torch.rand((1,), generator=g) < 0.5, -1.0, 1.0)
    return 1.0 + sign * offset


def _linear(seed: int, name: str, out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
    # 1/sqrt(fan_in) keeps every projection's output O(1).
    return _normal(seed, name, (out_f, in_f), gain / in_f**0.5)


def _attention_weights(tc: dict, seed: int, p: str, layer_idx: int) -> dict[str, torch.Tensor]:
    hidden, heads = tc["hidden_size"], tc["num_attention_heads"]
    head_dim, kv_heads = layer_attention_dims(tc, layer_idx)
    is_full = tc["layer_types"][layer_idx] == "full_attention"
    out = {
        f"{p}q_proj.weight": _linear(seed, f"{p}q_proj", heads * head_dim, hidden),
        f"{p}k_proj.weight": _linear(seed, f"{p}k_proj", kv_heads * head_dim, hidden),
        f"{p}o_proj.weight": _linear(seed, f"{p}o_proj", hidden, heads * head_dim),
        f"{p}q_norm.weight": _uniform(seed, f"{p}q_norm", (head_dim,)),
        f"{p}k_norm.weight": _uniform(seed, f"{p}k_norm", (head_dim,)),
    }
    if not (is_full and tc.get("attention_k_eq_v", False)):
        out[f"{p}v_proj.weight"] = _linear(seed, f"{p}v_proj", kv_heads * head_dim, hidden)
    return out


def _moe_weights(tc: dict, seed: int, p: str) -> dict[str, torch.Tensor]:
    hidden, inter, experts = tc["hidden_size"], tc["moe_intermediate_size"], tc["num_experts"]
    gate = _normal(seed, f"{p}experts.gate", (experts, inter, hidden), hidden**-0.5)
    up = _normal(seed, f"{p}experts.up", (experts, inter, hidden), _UP_PROJ_STD_FACTOR * hidden**-0.5)
    return {
        # Router logits of std ~1.5 make top-k choices clear-cut rather than near ties.
        f"{p}router.proj.weight": _linear(seed, f"{p}router.proj", experts, hidden, gain=1.5),
        f"{p}router.scale": _uniform(seed, f"{p}router.scale", (hidden,)),
        f"{p}router.per_expert_scale": _uniform(seed, f"{p}router.per_expert_scale", (experts,)),
        f"{p}experts.gate_up_proj": torch.cat([gate, up], dim=1),
        f"{p}experts.down_proj": _normal(seed, f"{p}experts.down", (experts, hidden, inter), inter**-0.5),
    }


def _layer_weights(tc: dict, seed: int, p: str, layer_idx: int) -> dict[str, torch.Tensor]:
    hidden, inter = tc["hidden_size"], tc["intermediate_size"]
    norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    if tc.get("enable_moe_block", False):
        norms += ["pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"]
    out = {f"{p}{n}.weight": _uniform(seed, f"{p}{n}", (hidden,)) for n in norms}
    out[f"{p}layer_scalar"] = _scalar_away_from_one(seed, f"{p}layer_scalar")
    out.update(_attention_weights(tc, seed, f"{p}self_attn.", layer_idx))
    out[f"{p}mlp.gate_proj.weight"] = _linear(seed, f"{p}mlp.gate_proj", inter, hidden)
    out[f"{p}mlp.up_proj.weight"] = _linear(seed, f"{p}mlp.up_proj", inter, hidden, gain=_UP_PROJ_STD_FACTOR)
    out[f"{p}mlp.down_proj.weight"] = _linear(seed, f"{p}mlp.down_proj", hidden, inter)
    if tc.get("enable_moe_block", False):
        out.update(_moe_weights(tc, seed, p))
    return out


def _check_supported(tc: dict) -> None:
    # The writer covers the MoE family only; PLE and KV sharing would need tensors it doesn't emit.
    if tc.get("hidden_size_per_layer_input"):
        raise ValueError("hidden_size_per_layer_input > 0 (per-layer embeddings) is not supported by the writer")
    if tc.get("num_kv_shared_layers"):
        raise ValueError("num_kv_shared_layers > 0 is not supported by the writer")


def build_state_dict(text_config: dict, seed: int, prefix: str) -> dict[str, torch.Tensor]:
    """HF-format (fused experts) bf16 weights of the text model, keys prefixed with `prefix`.

    Tied embeddings: no `lm_head.weight` is emitted (as in the released checkpoints).
    """
    _check_supported(text_config)
    hidden, vocab = text_config["hidden_size"], text_config["vocab_size"]
    # Values are drawn under prefix-free names, so both architectures hold the same model.
    sd = {
        # std 2/sqrt(H): after the sqrt(H) embedding scale the residual stream starts at O(1), and the
        # tied LM head gives logits of std ~2 (clear argmax margins), far from the 30 softcap.
        "embed_tokens.weight": _normal(seed, "embed_tokens", (vocab, hidden), 2 * hidden**-0.5),
        "norm.weight": _uniform(seed, "norm", (hidden,)),
    }
    for i in range(text_config["num_hidden_layers"]):
        sd.update(_layer_weights(text_config, seed, f"layers.{i}.", i))
    out = {f"{prefix}{k}": v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    if not text_config.get("tie_word_embeddings", True):
        out["lm_head.weight"] = _normal(seed, "lm_head", (vocab, hidden), 2 * hidden**-0.5).to(torch.bfloat16)
    return out


def _split_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused `experts.gate_up_proj`/`experts.down_proj` -> per-expert `experts.<e>.<proj>.weight`."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith("experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = gate[e].contiguous()
                out[f"{base}{e}.up_proj.weight"] = up[e].contiguous()
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t
    return out


def _calibration_input_scale(seed: int, name: str, in_features: int) -> torch.Tensor:
    # Stand-in for ModelOpt calibration: amax of a batch of O(1) activations with a per-module spread.
    spread = _uniform(seed, f"{name}.act_spread", (1,), 0.5, 2.0)
    acts = _normal(seed, f"{name}.acts", (64, in_features), 1.0) * spread
    return (acts.abs().amax() / (E2M1_MAX * E4M3_MAX)).float().reshape(())


def _quantize_linear(module: str, w: torch.Tensor, input_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    packed, block_scale, global_scale = quantize_nvfp4(w.float())
    return {
        f"{module}.weight": packed.contiguous(),
        f"{module}.weight_scale": block_scale.contiguous(),
        f"{module}.weight_scale_2": global_scale.float().reshape(()).contiguous(),
        f"{module}.input_scale": input_scale.reshape(()).contiguous(),
    }


def _is_quantized_module(module: str, quantize_dense_mlp: bool) -> bool:
    if re.search(r"\.experts\.\d+\.(gate|up|down)_proj$", module):
        return True
    return quantize_dense_mlp and re.search(r"\.mlp\.(gate|up|down)_proj$", module) is not None


def quantize_state_dict(
    per_expert_sd: dict[str, torch.Tensor], seed: int, quantize_dense_mlp: bool = False
) -> dict[str, torch.Tensor]:
    """NVFP4-quantize the routed experts (and optionally the dense MLP) of a per-expert state dict."""
    out: dict[str, torch.Tensor] = {}
    for name, t in per_expert_sd.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is None or not _is_quantized_module(module, quantize_dense_mlp):
            out[name] = t
            continue
        # gate and up read the same activations, so they share one calibrated input scale.
        act_key = re.sub(r"\.(gate|up)_proj$", ".gate_up_input", module)
        out.update(_quantize_linear(module, t, _calibration_input_scale(seed, act_key, t.shape[1])))
    _check_gate_up_scales_differ(out)
    return out


def _check_gate_up_scales_differ(sd: dict[str, torch.Tensor]) -> None:
    for name, gate_scale in sd.items():
        if name.endswith("gate_proj.weight_scale_2"):
            up_scale = sd[name.replace("gate_proj.", "up_proj.")]
            if torch.equal(gate_scale, up_scale):
                raise AssertionError(f"gate and up weight_scale_2 coincide at {name}; tests need them to differ")


def exclude_modules(architecture: str, num_layers: int, quantize_dense_mlp: bool) -> list[str]:
    """ModelOpt-style exclude globs, like NVIDIA's Gemma 4 export (only experts quantized).

    For the multimodal layout the router pattern is written without `language_model.`, as some
    exports do, so loaders must also match the stripped module path.
    """
    p = text_prefix(architecture)
    patterns = ["lm_head", f"{p}embed_tokens", f"{p}layers.*.self_attn*", "model.layers.*.router*"]
    if not quantize_dense_mlp:
        patterns.append(f"{p}layers.*.mlp*")
    if architecture == "Gemma4ForConditionalGeneration":
        patterns += ["model.vision_tower*", "model.embed_vision*", "model.audio_tower*", "model.embed_audio*"]
        # One explicit per-layer entry in the long spelling, as ModelOpt emits for the last layer.
        patterns.append(f"{p}layers.{num_layers - 1}.router")
    return patterns


def quant_configs(architecture: str, num_layers: int, quantize_dense_mlp: bool) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json's quantization_config) for the NVFP4 export."""
    excludes = exclude_modules(architecture, num_layers, quantize_dense_mlp)
    producer = {"name": "modelopt", "version": MODELOPT_VERSION}
    quant = {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": FP4_BLOCK_SIZE,
        "exclude_modules": excludes,
    }
    hf_quant_config = {"producer": producer, "quantization": quant}
    return hf_quant_config, {"quant_method": "modelopt", "producer": producer, **quant}


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _dump_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _shard_names(sd: dict[str, torch.Tensor], num_shards: int) -> list[list[str]]:
    """Split sorted keys into `num_shards` contiguous groups of roughly equal bytes (deterministic)."""
    names = sorted(sd)
    num_shards = max(1, min(num_shards, len(names)))
    total = sum(sd[n].numel() * sd[n].element_size() for n in names)
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    seen = 0
    for i, n in enumerate(names):
        idx = min(num_shards - 1, seen * num_shards // max(total, 1))
        # Never leave a later shard empty: the remaining names must cover the remaining shards.
        idx = max(idx, num_shards - (len(names) - i))
        shards[idx].append(n)
        seen += sd[n].numel() * sd[n].element_size()
    return shards


def write_safetensors(out_dir: Path, sd: dict[str, torch.Tensor], num_shards: int) -> list[Path]:
    """Write `model.safetensors` (one shard) or `model-0000i-of-0000n.safetensors` + index."""
    groups = _shard_names(sd, num_shards)
    if len(groups) == 1:
        path = out_dir / "model.safetensors"
        save_file({n: sd[n] for n in groups[0]}, str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for i, group in enumerate(groups):
        path = out_dir / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: sd[n] for n in group}, str(path), metadata={"format": "pt"})
        weight_map.update({n: path.name for n in group})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    _dump_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return paths


def _clear_old_weights(out_dir: Path) -> None:
    # A previous write with another shard count would leave stray shards a loader might pick up.
    extras = [out_dir / "model.safetensors.index.json", out_dir / "hf_quant_config.json"]
    for path in list(out_dir.glob("*.safetensors")) + extras:
        if path.is_file():
            path.unlink()


def layout_state_dict(
    sd: dict[str, torch.Tensor], layout: str, seed: int, quantize_dense_mlp: bool
) -> dict[str, torch.Tensor]:
    """Convert the fused bf16 state dict to the tensors stored for `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if quantize_dense_mlp and layout != "nvfp4-per-expert":
        raise ValueError("quantize_dense_mlp needs layout 'nvfp4-per-expert'")
    if layout == "bf16-fused":
        return sd
    per_expert = _split_experts(sd)
    if layout == "bf16-per-expert":
        return per_expert
    return quantize_state_dict(per_expert, seed, quantize_dense_mlp)


def write_checkpoint(
    out_dir: str | Path,
    layout: str,
    *,
    seed: int = 0,
    text_config: dict | None = None,
    architecture: str = "Gemma4ForConditionalGeneration",
    config_style: str = "released",
    quantize_dense_mlp: bool = False,
    num_shards: int = 2,
) -> Path:
    """Write a complete checkpoint directory and return its path.

    `text_config` defaults to `tiny_text_config()` and is given in the released spelling (or already
    with a `per_layer_config`, then only config_style "per_layer_config" is possible).
    """
    tc = copy.deepcopy(text_config) if text_config is not None else tiny_text_config()
    prefix = text_prefix(architecture)
    styled = styled_text_config(tc, config_style)
    tensors = layout_state_dict(build_state_dict(tc, seed, prefix), layout, seed, quantize_dense_mlp)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_old_weights(out)
    config = model_config(styled, architecture)
    if layout == "nvfp4-per-expert":
        hf_quant, quant_cfg = quant_configs(architecture, tc["num_hidden_layers"], quantize_dense_mlp)
        config["quantization_config"] = quant_cfg
        _dump_json(out / "hf_quant_config.json", hf_quant)
    _dump_json(out / "config.json", config)
    _dump_json(out / "generation_config.json", generation_config(tc))
    vocab = write_tokenizer(out)
    if vocab > tc["vocab_size"]:
        raise ValueError(f"tokenizer has {vocab} tokens but the model's vocab_size is {tc['vocab_size']}")
    write_safetensors(out, tensors, num_shards)
    return out


# ----------------------------------------------------------------------------------------------
# Reading back
# ----------------------------------------------------------------------------------------------


def load_checkpoint_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, as stored."""
    ckpt = Path(ckpt_dir)
    index = ckpt / "model.safetensors.index.json"
    files: Iterable[str]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(ckpt / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _dequantize_modules(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every NVFP4 linear (weight/weight_scale/weight_scale_2/input_scale) by its fp32 weight."""
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and f"{module}.weight_scale" in raw:
            t = dequantize_nvfp4(t, raw[f"{module}.weight_scale"], raw[f"{module}.weight_scale_2"])
        out[name] = t.float()
    return out


def _fuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert `experts.<e>.<proj>.weight` -> fused `experts.gate_up_proj` / `experts.down_proj`."""
    pattern = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        m = pattern.match(name)
        if m is None:
            out[name] = t
            continue
        groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
    for base, projs in groups.items():
        out[f"{base}.gate_up_proj"] = torch.cat([_stack(projs["gate_proj"]), _stack(projs["up_proj"])], dim=1)
        out[f"{base}.down_proj"] = _stack(projs["down_proj"])
    return out


def _stack(by_expert: dict[int, torch.Tensor]) -> torch.Tensor:
    missing = sorted(set(range(len(by_expert))) - set(by_expert))
    if missing:
        raise ValueError(f"per-expert tensors missing for experts {missing}")
    return torch.stack([by_expert[e] for e in range(len(by_expert))])


def reference_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint as a transformers-ready fp32 state dict (fused experts, exact NVFP4 dequant).

    Includes `lm_head.weight` (a copy of the embedding when tied) so that `load_state_dict(strict=True)`
    works on `Gemma4ForConditionalGeneration` / `Gemma4ForCausalLM` built from the same config.
    """
    ckpt = Path(ckpt_dir)
    config = json.loads((ckpt / "config.json").read_text())
    architecture = config["architectures"][0]
    sd = _fuse_experts(_dequantize_modules(load_checkpoint_tensors(ckpt)))
    embed = f"{text_prefix(architecture)}embed_tokens.weight"
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd[embed].clone()
    return dict(sorted(sd.items()))


# ----------------------------------------------------------------------------------------------
# Demo model
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("SGLANG_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sglang"


def _demo_is_current(path: Path) -> bool:
    marker = path / _DEMO_VERSION_FILE
    return marker.is_file() and marker.read_text().strip() == DEMO_MODEL_VERSION


def ensure_demo_model(cache_dir: str | Path | None = None) -> Path:
    """Path of the built-in demo model (tiny config, seed 0, NVFP4 experts), generating it on first use.

    Generation writes into a temporary sibling directory and renames it into place, so concurrent
    callers never see a half-written checkpoint.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target / DEMO_MODEL_NAME
    if _demo_is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-demo-", dir=target.parent))
    try:
        write_checkpoint(tmp, "nvfp4-per-expert", seed=0)
        (tmp / _DEMO_VERSION_FILE).write_text(DEMO_MODEL_VERSION + "\n")
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        if _demo_is_current(target):  # another process finished first
            return
        # Stale (older writer version or interrupted): move aside before swapping in the new one.
        stale = Path(tempfile.mkdtemp(prefix=".stale-demo-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(new, target)
    except OSError:
        if not _demo_is_current(target):
            raise


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.test.make_gemma4_checkpoint", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out", nargs="?", help="output directory")
    parser.add_argument("--layout", choices=LAYOUTS, default="nvfp4-per-expert")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architecture", choices=ARCHITECTURES, default="Gemma4ForConditionalGeneration")
    parser.add_argument("--config-style", choices=CONFIG_STYLES, default="released")
    parser.add_argument(
        "--quantize-dense-mlp", action="store_true", help="also NVFP4-quantize mlp.{gate,up,down}_proj"
    )
    parser.add_argument("--num-shards", type=int, default=2)
    parser.add_argument(
        "--demo", action="store_true", help=f"generate (if needed) and print the {DEMO_MODEL_NAME} path"
    )
    args = parser.parse_args(argv)
    if not args.demo and args.out is None:
        parser.error("OUT is required unless --demo is given")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.demo:
        print(ensure_demo_model())
        return
    path = write_checkpoint(
        args.out,
        args.layout,
        seed=args.seed,
        architecture=args.architecture,
        config_style=args.config_style,
        quantize_dense_mlp=args.quantize_dense_mlp,
        num_shards=args.num_shards,
    )
    print(path)


if __name__ == "__main__":
    main()
