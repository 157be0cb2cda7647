"""Log each Triton kernel variant that is first met after start-up's warm-up.

Start-up compiles the kernel variants that CUDA-graph capture and the prefill warm-up meet
(parallel_compile.py, warmup.py). A variant first met while serving (an integer argument that
specialises differently, say a token count not divisible by 16, or a path warm-up missed) is
compiled inside some request's step, and on an empty Triton cache that stalls every running request
for up to seconds. Each such variant is logged once, with how Triton specialised each argument
(`describe_variant`) and the time its compilation (or load from Triton's disk cache) took, so that the
warm-up can be taught to cover it. Triton calls the hooks on a miss of its in-memory kernel cache
only, so serving's hot path pays nothing.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class LateCompileWatch:
    """Triton's jit_cache_hook / jit_post_compile_hook pair; hooks installed before stay in force."""

    def __init__(self, knobs) -> None:
        self._knobs = knobs
        self._previous = (knobs.jit_cache_hook, knobs.jit_post_compile_hook)
        self._started: dict[tuple, float] = {}
        self.count = 0

    def on_cache_miss(self, **kwargs):
        self._started[self._id(kwargs)] = time.perf_counter()
        previous = self._previous[0]
        # A true result tells Triton to skip the kernel: only an earlier hook may ask for that.
        return previous(**kwargs) if previous else None

    def on_compiled(self, **kwargs):
        started = self._started.pop(self._id(kwargs), None)
        seconds = time.perf_counter() - started if started is not None else float("nan")
        self.count += 1
        logger.warning(
            "Triton kernel %s met for the first time after warm-up, compiled or loaded in %.2f s while "
            "serving: %s", kwargs["fn"].name, seconds, describe_variant(kwargs),
        )  # fmt: skip
        previous = self._previous[1]
        return previous(**kwargs) if previous else None

    def uninstall(self) -> None:
        self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = self._previous

    @staticmethod
    def _id(kwargs: dict) -> tuple:
        return kwargs["fn"].module, kwargs["fn"].name, kwargs["key"]


def describe_variant(kwargs: dict) -> str:
    """`name[options](arg: type, ...)` for the variant a hook call is about: %16 marks an argument
    specialised as divisible by 16 (a pointer: 16-byte aligned), `arg=1` an integer specialised to
    its value; tl.constexpr parameters are left out. (Triton's own `repr` lists the arguments'
    types only in some versions.)"""
    info = kwargs.get("compile") or {}
    signature = info.get("signature")
    if not signature:
        return kwargs["repr"]
    attrs = (info.get("configs") or [{}])[0]
    divisible = {path[0] for path, a in attrs.items() if any(name == "tt.divisibility" for name, _ in a)}
    jit_fn = getattr(kwargs["fn"], "jit_function", None)
    declared = {p.name for p in jit_fn.params if p.is_constexpr} if jit_fn is not None else set()
    constants = info.get("constants") or {}
    args = []
    for i, (name, ty) in enumerate(signature.items()):
        if name in declared:
            continue
        if ty == "constexpr":
            args.append(f"{name}={constants.get((i,))}")
        else:
            args.append(f"{name}: {ty}{' %16' if i in divisible else ''}")
    options = f"num_warps={info.get('num_warps')}, num_stages={info.get('num_stages')}"
    return f"{kwargs['fn'].name}[{options}]({', '.join(args)})"


def watch_late_compiles() -> LateCompileWatch | None:
    """Install the watch (after warm-up); None where this Triton has no runtime hooks (before 3.4)."""
    try:
        from triton import knobs
    except ImportError:
        return None
    runtime = knobs.runtime
    if not hasattr(runtime, "jit_post_compile_hook"):
        return None
    installed = getattr(runtime.jit_cache_hook, "__self__", None)
    if isinstance(installed, LateCompileWatch):  # another scheduler in this process: log each variant once
        return installed
    watch = LateCompileWatch(runtime)
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = watch.on_cache_miss, watch.on_compiled
    return watch
