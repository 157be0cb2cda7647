"""Kernel variants first met after warm-up are logged once, with their specialisation and time, and
hooks installed earlier keep working (their answer to skip a kernel included)."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch

from sglang.srt.model_executor.compile_watch import LateCompileWatch, watch_late_compiles


def _hook_kwargs(name: str, key: tuple) -> dict:
    """What Triton (3.6) passes its runtime hooks (JITFunction._call_hook): a variant of
    `name(x_ptr, n, top_k, BLOCK: tl.constexpr)` with x_ptr 16-byte aligned, n not divisible by 16 and
    top_k specialised to 1."""
    params = [SimpleNamespace(name=p, is_constexpr=p == "BLOCK") for p in ("x_ptr", "n", "top_k", "BLOCK")]
    return {
        "key": key,
        "repr": f"{name}[num_warps=4, num_ctas=1, num_stages=3](x_ptr: (",
        "fn": SimpleNamespace(module="sglang.kernels", name=name, jit_function=SimpleNamespace(params=params)),
        "compile": {
            "key": key,
            "signature": {"x_ptr": "*bf16", "n": "i32", "top_k": "constexpr", "BLOCK": "constexpr"},
            "constants": {(2,): 1, (3,): 64},
            "configs": [{(0,): [["tt.divisibility", 16]]}],
            "num_warps": 4,
            "num_stages": 3,
        },
        "is_manual_warmup": False,
        "already_compiled": False,
    }


@pytest.fixture
def runtime():
    return SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)


def test_late_variant_is_logged_with_its_specialisation(runtime, caplog):
    watch = LateCompileWatch(runtime)
    kwargs = _hook_kwargs("moe_gemm2_kernel", ("i32D", 64))
    with caplog.at_level(logging.WARNING, logger="sglang.srt.model_executor.compile_watch"):
        assert not watch.on_cache_miss(**kwargs)  # the kernel must still run
        watch.on_compiled(**kwargs)
    (record,) = caplog.records
    message = record.getMessage()
    assert "after warm-up" in message
    assert "moe_gemm2_kernel[num_warps=4, num_stages=3](x_ptr: *bf16 %16, n: i32, top_k=1)" in message
    assert " s while serving" in message and "nan s" not in message
    assert watch.count == 1


def test_earlier_hooks_stay_in_force(runtime):
    seen = []
    runtime.jit_cache_hook = lambda **kw: seen.append(("miss", kw["fn"].name)) or True  # asks to skip
    runtime.jit_post_compile_hook = lambda **kw: seen.append(("compiled", kw["fn"].name))
    earlier = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
    watch = LateCompileWatch(runtime)
    kwargs = _hook_kwargs("gemv_kernel", (1,))
    assert watch.on_cache_miss(**kwargs) is True
    watch.on_compiled(**kwargs)
    assert seen == [("miss", "gemv_kernel"), ("compiled", "gemv_kernel")]
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = watch.on_cache_miss, watch.on_compiled
    watch.uninstall()
    assert (runtime.jit_cache_hook, runtime.jit_post_compile_hook) == earlier


def test_installs_into_tritons_runtime_knobs():
    knobs = pytest.importorskip("triton").knobs.runtime
    before = (knobs.jit_cache_hook, knobs.jit_post_compile_hook)
    watch = watch_late_compiles()
    try:
        assert knobs.jit_cache_hook == watch.on_cache_miss
        assert knobs.jit_post_compile_hook == watch.on_compiled
        assert watch_late_compiles() is watch  # installed once per process, however many schedulers
    finally:
        watch.uninstall()
    assert (knobs.jit_cache_hook, knobs.jit_post_compile_hook) == before


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs a CUDA GPU")
def test_real_compile_is_logged_once(caplog):
    """Through Triton itself: a variant never launched before is logged once; its second launch and
    an already compiled variant are not."""
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(x_ptr, n, SALT: tl.constexpr):
        offs = tl.arange(0, 64)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1 + SALT * 0, mask=offs < n)

    x = torch.zeros(64, device="cuda")
    _add_one[(1,)](x, 64, SALT=0)  # compiled before the watch: warm-up's share
    watch = watch_late_compiles()
    seen_before = watch.count  # an earlier test's scheduler may have installed it
    try:
        with caplog.at_level(logging.WARNING, logger="sglang.srt.model_executor.compile_watch"):
            _add_one[(1,)](x, 64, SALT=0)
            _add_one[(1,)](x, 63, SALT=0)  # n no longer divisible by 16: a new specialisation
            _add_one[(1,)](x, 63, SALT=0)
    finally:
        watch.uninstall()
    torch.cuda.synchronize()
    assert watch.count - seen_before == 1 and len(caplog.records) == 1
    # the variant named as Triton specialised it: x 16-byte aligned, n (63) not divisible by 16
    assert "_add_one[num_warps=4, num_stages=3](x_ptr: *fp32 %16, n: i32)" in caplog.records[0].getMessage()
    assert x[:63].eq(4).all() and x[63].item() == 2
