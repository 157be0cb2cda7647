"""Fused Triton kernels for the small per-token ops of a Gemma 4 layer (norms, rope, residuals,
GELU*up, router top-k, logit softcap). One concept per module; each wrapper is capturable in a CUDA
graph (no host syncs, shapes fixed by the inputs).

This package's __init__ imports no Triton (it is optional on CPU installs): callers ask
`fused_ops_enabled(x)` and import the kernel module only on the fused path. The torch code in the
layers stays the CPU path and the reference the kernels are tested against.

Default: fused on CUDA tensors, torch elsewhere. `SGLANG_FUSED_OPS=1` forces the kernels (the CPU
tests run them under TRITON_INTERPRET=1), `SGLANG_FUSED_OPS=0` forces torch (A/B on a GPU);
`fused_ops(enabled)` overrides both inside a with-block.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def _env_override() -> bool | None:
    value = os.environ.get("SGLANG_FUSED_OPS", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "on"):
        return True
    if value in ("0", "false", "off"):
        return False
    raise ValueError(f"SGLANG_FUSED_OPS must be 1, 0 or auto, got {value!r}")


_override: bool | None = _env_override()


def fused_ops_enabled(x: torch.Tensor) -> bool:
    """Whether the fused Triton kernels should compute ops on `x`."""
    return x.is_cuda if _override is None else _override


@contextlib.contextmanager
def fused_ops(enabled: bool | None) -> Iterator[None]:
    """Force the fused kernels on (True) or off (False), or back to auto (None), for a block."""
    global _override
    saved, _override = _override, enabled
    try:
        yield
    finally:
        _override = saved
