"""bf16 GEMV y = x @ W^T for a single row: the dense layers of a batch-1 decode step.

At batch 1 a linear layer is one pass over its weight. On Gemma 4's 1-26 M-element matrices
cuBLAS picks split-K kernels plus a reduction kernel and reaches 45-75% of the H200's copy bandwidth
(benchmark/bench_gemv.py). Here each program owns BLOCK_N output columns and walks the whole K: W
rows are read once, coalesced along K, products are kept per lane in fp32 and summed once at the
end, so there is no second kernel and no atomics. Small programs keep several resident per SM,
which keeps enough loads in flight. From two rows on cuBLAS's tiles win, so only M = 1 comes here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.triton_ops.common import allow_dependents, pdl_launch, round_to, wait_for_previous
from sglang.srt.layers.triton_ops.gelu_and_mul import gelu_tanh


@triton.jit
def _load_k(ptrs, k_ok, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=k_ok, other=0.0)


@triton.jit
def _load_step(w_ptrs, x_ptr, offs_k, k0, K, EVEN_K: tl.constexpr):
    """Step k0's weight tile and x slice; a step at or past K reads zeros (no memory traffic)."""
    k_ok = (k0 + offs_k) < K
    return _load_k(w_ptrs + k0, k_ok[None, :], EVEN_K), _load_k(x_ptr + k0 + offs_k, k_ok, EVEN_K)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, N, K, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr,
    STAGES: tl.constexpr = 1,
):  # fmt: skip
    """y = x @ W^T over BLOCK_N weight rows a program. GATED: W = [gate; up] (N rows each) and
    y = gelu_tanh(x @ gate^T) * (x @ up^T); a program's rows are its BLOCK_N / 2 outputs' gate and
    up rows interleaved, so the dense MLP needs no separate activation kernel.
    STAGES (1-3): K steps in flight. 1 loads each step's tile where it is multiplied; 2 and 3 also
    have the next one or two steps' tiles on their way (by hand: Triton's pipeliner leaves loads
    that feed no dot synchronous), for matrices whose few programs per SM leave the memory system
    idle between steps. ptxas issues a step-ahead load late in the iteration (it lengthens no
    dependency there), so 2 buys little over 1 and 3 keeps about one step's math ahead."""
    if GATED:
        r = tl.arange(0, BLOCK_N)
        offs_y = tl.program_id(0) * (BLOCK_N // 2) + r // 2
        rows = offs_y + (r % 2) * N
    else:
        offs_y = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_y
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past the end re-read row 0 (always valid) and are dropped at the store: no load mask needed.
    w_ptrs = w_ptr + tl.where(offs_y < N, rows, 0).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    # No kernel writes the weights: under PDL the first tiles stream in while the kernel producing x
    # is still finishing. Steps ahead may lie past K: their loads are masked off.
    w = _load_k(w_ptrs, (offs_k < K)[None, :], EVEN_K)
    w1, w2 = w, w
    if STAGES >= 2:
        w1 = _load_k(w_ptrs + BLOCK_K, ((BLOCK_K + offs_k) < K)[None, :], False)
    if STAGES >= 3:
        w2 = _load_k(w_ptrs + 2 * BLOCK_K, ((2 * BLOCK_K + offs_k) < K)[None, :], False)
    wait_for_previous(PDL)
    allow_dependents(PDL)
    x = _load_k(x_ptr + offs_k, offs_k < K, EVEN_K)
    x1, x2 = x, x
    if STAGES >= 2:
        x1 = _load_k(x_ptr + BLOCK_K + offs_k, (BLOCK_K + offs_k) < K, False)
    if STAGES >= 3:
        x2 = _load_k(x_ptr + 2 * BLOCK_K + offs_k, (2 * BLOCK_K + offs_k) < K, False)
    acc = w.to(tl.float32) * x.to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        if STAGES == 1:
            w, x = _load_step(w_ptrs, x_ptr, offs_k, k0, K, EVEN_K)
        elif STAGES == 2:
            w, x = w1, x1
            w1, x1 = _load_step(w_ptrs, x_ptr, offs_k, k0 + BLOCK_K, K, False)
        else:
            w, x, w1, x1 = w1, x1, w2, x2
            w2, x2 = _load_step(w_ptrs, x_ptr, offs_k, k0 + 2 * BLOCK_K, K, False)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    y = round_to(tl.sum(acc, axis=1), DTYPE)
    if GATED:
        # torch: gate_up stored in DTYPE, F.gelu's output rounded, then the product rounded.
        gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        y = round_to(round_to(gelu_tanh(gate), DTYPE) * up, DTYPE)
        offs_y = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(y_ptr + offs_y, y, mask=offs_y < N)


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, stages), from the H200 sweep of bench_gemv.py --tune: 8
    columns a program for matrices of 8 M elements and up (4 below, so small N still fills the SMs);
    1024-wide K steps except for the widest outputs, where more programs already cover the latency.
    (That sweep passed num_stages 3 to Triton, whose PTX for these loops is the same as with 1 in
    Triton 3.6 and 3.9: one step in flight.)"""
    block_n = 8 if n * k >= 8 << 20 else 4
    block_k = 256 if n >= 8192 else 1024
    return block_n, block_k, 4, 1


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` computes F.linear(x, weight) for these tensors."""
    return (
        x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype == torch.bfloat16
        and weight.dim() == 2 and weight.stride(1) == 1 and x.shape[1] == weight.shape[1]
    )  # fmt: skip


def gemv(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T -> [1, N] in x's dtype, fp32 accumulation, rounded once."""
    return _launch(x, weight, weight.shape[0], config, gated=False)


def gemv_gelu_tanh_and_mul(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """gelu_tanh(x @ gate^T) * (x @ up^T) -> [1, N] for weight = [gate; up] [2N, K], rounded as
    F.linear, F.gelu and the product are in torch (one launch instead of GEMV + gelu_tanh_and_mul)."""
    if weight.shape[0] % 2:
        raise ValueError(f"gate_up weight needs an even number of rows, got {weight.shape[0]}")
    return _launch(x, weight, weight.shape[0] // 2, config, gated=True)


def _launch(x: torch.Tensor, weight: torch.Tensor, n_out: int, config: tuple[int, int, int, int] | None, gated: bool) -> torch.Tensor:
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty((1, n_out), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = config or gemv_config(n, k)
    if stages not in (1, 2, 3):
        raise ValueError(f"GEMV stages (K steps in flight) must be 1, 2 or 3, got {stages}")
    if gated:
        block_n = max(block_n, 2)  # rows a program: gate and up of block_n / 2 outputs
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, n_out, k, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, GATED=gated, STAGES=stages, num_warps=warps,
        num_stages=1, **pdl_launch(x.device),
    )  # fmt: skip
    return y
