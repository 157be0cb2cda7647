"""Small helpers shared by the server processes. Nothing here imports the model code."""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile

logger = logging.getLogger(__name__)

# First GPU generation with fp8 (Ada SM89, Hopper SM90): Triton's float8_e4m3 loads and conversions
# need it, so an fp8 KV cache does too.
FP8_KV_MIN_SM = 89


def get_device_sm() -> int:
    """GPU generation as major*10+minor (100 Blackwell, 90 Hopper, 80 Ampere); 0 without a GPU.

    The one place the code asks which GPU it runs on, so backend choices can be tested on a CPU-only
    machine by patching this function.
    """
    import torch

    if not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def to_device(host, device):
    """A CPU tensor on `device` without blocking the host: on CUDA it goes through pinned memory with
    an async copy. A plain `.to("cuda")` waits for the GPU to drain the stream, which would stall the
    overlapped scheduler behind the step in flight. torch's pinned-memory cache keeps the staging
    buffer until the copy has run, so the caller may drop `host` at once."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def is_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_logger(log_level: str, prefix: str = "") -> None:
    fmt = f"[%(asctime)s{prefix}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format=fmt, force=True)


def ipc_endpoint(tag: str) -> str:
    """A fresh ZMQ IPC address in the temp dir (unique per call, so two servers never collide)."""
    fd, path = tempfile.mkstemp(prefix=f"sglang-{tag}-", suffix=".ipc")
    os.close(fd)
    os.unlink(path)
    return f"ipc://{path}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parent_is_alive(parent_pid: int) -> bool:
    # A re-parented child (parent died) sees a different ppid; that is how a child avoids orphanhood.
    return os.getppid() == parent_pid


def terminate_process(proc, timeout: float = 5.0) -> None:
    """SIGTERM a multiprocessing.Process, escalating to SIGKILL if it does not exit in time."""
    if proc is None or not proc.is_alive():
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    proc.join(timeout)
    if proc.is_alive():
        logger.warning("process %d did not exit on SIGTERM; killing it", proc.pid)
        proc.kill()
        proc.join(timeout)
