"""Building blocks shared by the fused kernels: torch's rounding points and RMSNorm math.

Numerics contract: every helper reproduces one torch op of the reference path in fp32 (the math
torch does for bf16 tensors too), and `round_to` marks the points where torch stores a tensor in the
model dtype. What can still differ from torch is fp32 reduction order and, for tanh/exp under the
interpreter, the last fp32 bit.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Under TRITON_INTERPRET=1 libdevice calls are unavailable, and fp32 -> bf16 casts truncate instead of
# rounding to nearest even as the GPU (and torch) do; the helpers below take another route there.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 `x` rounded to DTYPE (nearest even) and widened back: a torch `.to(dtype)` point."""
    if DTYPE == tl.float32:
        return x
    elif INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def e4m3_bits(x):
    """fp32 `x` as float8_e4m3fn bits (uint8), as KVCache stores it (clamp to +-448, then torch's cast):
    nearest even; finite overflow and inf saturate to 448, NaN stays NaN, the sign is kept."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # Below 2^-6 (e4m3 subnormals): adding 2^14 makes the fp32 adder round at the subnormal step
    # (clamped first, so that lanes taking another branch add no inf or NaN).
    sub = (tl.minimum(mag, 121 << 23).to(tl.float32, bitcast=True) + 16384.0).to(tl.uint32, bitcast=True) - (141 << 23)
    # Normal: rebias the exponent (127 -> 7) and round the 20 dropped mantissa bits to nearest even;
    # rounding up into the NaN code (0x7F) saturates.
    normal = tl.minimum((mag - (120 << 23) + 0x7FFFF + ((mag >> 20) & 1)) >> 20, 0x7E)
    out = tl.where(mag < (121 << 23), sub, normal)
    out = tl.where(mag >= (1087 << 20), tl.where(mag > 0x7F800000, 0x7F, 0x7E), out)  # |x| >= 480, inf, NaN
    return (out | sign).to(tl.uint8)


@triton.jit
def tanh(x):
    """tanhf, as torch's CUDA kernels call it."""
    if INTERPRET:
        # fp64 keeps this within the last fp32 bit of a correctly rounded tanh.
        xd = x.to(tl.float64)
        t = tl.exp(-2.0 * tl.abs(xd))
        y = (1.0 - t) / (1.0 + t)
        return tl.where(xd < 0, -y, y).to(tl.float32)
    else:
        return libdevice.tanh(x)


@triton.jit
def exp(x):
    """expf (tl.exp is the faster, less exact ex2-based one)."""
    if INTERPRET:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def inv_rms(sum_sq, inv_n, eps):
    """torch.pow(mean(x^2) + eps, -0.5); mean is sum * fp32(1/n), as torch's CUDA mean computes it."""
    return tl.math.rsqrt(sum_sq * inv_n + eps)


@triton.jit
def scale_row(x, r, w, HAS_W: tl.constexpr, DTYPE: tl.constexpr):
    """(x * r) [* w] rounded to DTYPE: the tail of RMSNorm.forward; w is the weight row already
    loaded as fp32 (the kernels load weight rows first, ahead of their PDL wait)."""
    out = x * r
    if HAS_W:
        out = out * w
    return round_to(out, DTYPE)


@triton.jit
def rmsnorm_row(x, w, inv_n, eps, HAS_W: tl.constexpr, DTYPE: tl.constexpr):
    """RMSNorm of one fp32 row (masked lanes zero) with the loaded weight row w, rounded to DTYPE,
    returned as fp32."""
    return scale_row(x, inv_rms(tl.sum(x * x, axis=0), inv_n, eps), w, HAS_W, DTYPE)


@triton.jit
def row_lanes(n_cols, BLOCK: tl.constexpr):
    """(row, offs, mask) of a one-program-per-row kernel; the row index is int64 (T * width can pass 2^31)."""
    offs = tl.arange(0, BLOCK)
    return tl.program_id(0).to(tl.int64), offs, offs < n_cols


@triton.jit
def load_row(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@functools.lru_cache(maxsize=None)
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` use programmatic dependent launch (sm_90+; SGLANG_DISABLE_PDL=1,
    read once per process, turns it off). A kernel launched with it may start while the previous
    kernel in the stream is still running, once that one has called `allow_dependents`; it must call
    `wait_for_previous` before touching anything an earlier kernel writes or reads (only constant
    weights may be read before). Triton >= 3.6 keeps memory accesses after the wait when the wait
    comes before any loop (its software pipeliner may hoist loads above a wait inside a loop)."""
    if INTERPRET or device.type != "cuda" or os.environ.get("SGLANG_DISABLE_PDL", "0") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_launch(device: torch.device) -> dict:
    """Launch kwargs of a kernel taking a PDL constexpr that waits for its predecessor itself."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@triton.jit
def allow_dependents(PDL: tl.constexpr):
    """Let a PDL-launched next kernel start its independent prologue (weight loads) now."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has finished and its writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First thing in a kernel launched with `pdl_launch` that has nothing to do before its inputs
    are ready: wait for them, then let the next kernel launch (its blocks take free SM slots and
    get past their own launch while this one runs)."""
    wait_for_previous(PDL)
    allow_dependents(PDL)


def inv_count(n: int) -> float:
    """fp32(1 / n), computed in fp32 as torch's mean does."""
    return float(np.float32(1.0) / np.float32(n))


def row_warps(block: int) -> int:
    """Warps for one program per row of `block` lanes: 8-16 elements a thread, 1..8 warps."""
    return max(1, min(8, block // 512))


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """x when its last dim is contiguous (rows may have any stride), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
