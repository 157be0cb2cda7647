"""Compile the Triton kernels of start-up's forward passes many at a time, before running them.

On a fresh machine Triton's cache is empty, and CUDA-graph capture and the prefill warm-up meet each
kernel variant for the first time one after the other (on an H100: 27.5 s of capture and 14 s of
warm-up, against 7.5 s and 1.9 s with every kernel compiled). `precompile` first runs the same
passes with every Triton launch turned into a compile request for a thread pool (Triton's
async-compile mode; ptxas runs as a subprocess and much of the rest overlaps too: the decode set
compiled in 5.9 s there), waits for all of them, and only then lets the caller run the passes for
real, each kernel now found in its in-memory cache.

During those dry passes no Triton kernel runs; the torch ops between them do, on whatever the
skipped kernels' output buffers held. That is harmless for the model's forward passes on the
graph-capturable backends (triton MoE and attention): their host side reads no device values and no
torch op there indexes with a Triton kernel's output. The torch reference backends do both, so
callers skip the dry passes there (`ModelRunner.reads_device_values_on_host`).
SGLANG_DISABLE_PARALLEL_COMPILE=1 turns it off (the passes then compile as they go).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger(__name__)

MAX_WORKERS = 16


def _async_compile_support():
    """(AsyncCompileMode, JITFunction) where this Triton has both (3.5+), else None."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    return AsyncCompileMode, JITFunction


def parallel_compile_enabled(device: str | torch.device) -> bool:
    if torch.device(device).type != "cuda" or os.environ.get("SGLANG_DISABLE_PARALLEL_COMPILE", "0") == "1":
        return False
    # The interpreter's kernels are no JITFunctions: a dry pass would run them.
    return os.environ.get("TRITON_INTERPRET", "0") != "1" and _async_compile_support() is not None


@contextlib.contextmanager
def compile_only(workers: int) -> Iterator[None]:
    """Inside, a Triton launch submits its kernel's compilation (once per variant) and returns
    without running it; leaving waits for every compilation. A failed one is left for the real
    launch to report, where its error has its context."""
    async_compile_mode, jit_function = _async_compile_support()
    run = jit_function.run

    def compile_without_launch(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        with async_compile_mode(pool, ignore_errors=True):
            jit_function.run = compile_without_launch
            try:
                yield
            finally:
                jit_function.run = run


def precompile(passes: Iterable[Callable[[], object]], device: str | torch.device, what: str) -> None:
    """Run `passes` dry under `compile_only` (see the module docstring), so that their Triton kernels
    are compiled in parallel; a no-op off CUDA, without Triton's async compilation, or when disabled."""
    if not parallel_compile_enabled(device):
        return
    start = time.perf_counter()
    try:
        with compile_only(min(MAX_WORKERS, os.cpu_count() or 1)):
            for run_pass in passes:
                run_pass()
        torch.cuda.synchronize()
    except Exception as exc:  # the real passes compile whatever is missing, and report real errors
        logger.warning("parallel compilation of the Triton kernels of %s stopped: %r", what, exc, exc_info=True)
        return
    logger.info("compiled the Triton kernels of %s in %.1f s", what, time.perf_counter() - start)
