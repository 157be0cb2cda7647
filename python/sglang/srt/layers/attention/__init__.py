"""Attention backends by name (ServerArgs.attention_backend)."""

from __future__ import annotations

_BACKENDS = {
    "torch_native": "sglang.srt.layers.attention.torch_native_backend:TorchNativeAttnBackend",
    "triton": "sglang.srt.layers.attention.triton_backend:TritonAttnBackend",
}


def get_attention_backend(name: str):
    import importlib

    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as e:
        raise ValueError(f"attention backend {name!r} is not available: {e}") from e
