"""Start-up's parallel Triton compilation: dry passes compile without running, then the real passes
find every kernel compiled; off CUDA (and when disabled) the dry passes are not run at all."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from sglang.srt.model_executor.parallel_compile import compile_only, parallel_compile_enabled, precompile


@triton.jit
def _fill_kernel(out_ptr, value, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.zeros((N,), tl.float32) + value)


def test_off_cuda_the_dry_passes_do_not_run(monkeypatch):
    ran = []
    precompile([lambda: ran.append(1)], "cpu", "test")
    assert ran == [] and not parallel_compile_enabled("cpu")
    monkeypatch.setenv("SGLANG_DISABLE_PARALLEL_COMPILE", "1")
    assert not parallel_compile_enabled("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_only_compiles_every_variant_and_runs_none():
    sizes = (16, 32, 64)
    outs = {n: torch.zeros(n, device="cuda") for n in sizes}
    with compile_only(4):
        for n in sizes:
            _fill_kernel[(1,)](outs[n], 2.5, N=n)
    torch.cuda.synchronize()
    assert all(bool((o == 0).all()) for o in outs.values())  # nothing ran
    kernel_cache = _fill_kernel.device_caches[torch.cuda.current_device()][0]
    compiled = [k for k in kernel_cache.values() if not hasattr(k, "result")]
    assert len(compiled) >= len(sizes)
    for n in sizes:  # launches after the block run the compiled variants
        _fill_kernel[(1,)](outs[n], 2.5, N=n)
    torch.cuda.synchronize()
    assert all(bool((o == 2.5).all()) for o in outs.values())
    assert len(kernel_cache) == len(compiled)  # and compiled nothing more
