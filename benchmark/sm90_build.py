"""Compile a Triton kernel for sm_90 on any machine (no GPU needed), specialised as the JIT would
specialise it at the real shapes, for the scripts that read its PTX, SASS or resources."""

from __future__ import annotations

import inspect
from collections.abc import Collection


def build_sm90(fn, types: dict, consts: dict, warps: int, stages: int, divisible: Collection[str] = ()):
    """The compiled kernel of `fn` (a triton.jit function). types: parameter -> Triton type (others
    i32); consts: constexprs (those not given keep their defaults, so a runtime type never compiles
    both branches). Pointers, strides and the integers named in `divisible` are taken as multiples of
    16, as the JIT finds them for aligned tensors and the model's sizes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = inspect.signature(fn.fn).parameters
    consts = {**{n: p.default for n, p in params.items()
                 if "constexpr" in str(p.annotation) and p.default is not inspect.Parameter.empty}, **consts}  # fmt: skip
    sig = {p: "constexpr" if p in consts else types.get(p, "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if p not in consts and (sig[p].startswith("*") or p.startswith("stride") or p in divisible)}  # fmt: skip
    return triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})  # fmt: skip
