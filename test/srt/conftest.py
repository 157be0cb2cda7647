"""Shared fixtures: real servers on the tiny demo model (CPU, 127.0.0.1 only).

`demo_server` is one server for the whole test session; tests that need special flags start their
own with `start_server`. Every server is stopped with SIGTERM and must exit cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

DEMO_MODEL = "sglang-demo/gemma4-tiny-nvfp4"
STARTUP_TIMEOUT_S = 180


def _free_port() -> int:
    from sglang.srt.utils import free_port

    return free_port()


class ServerProcess:
    def __init__(self, *extra_args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="sglang-test-server-", suffix=".log")[1])
        cmd = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", DEMO_MODEL, "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *extra_args,
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_healthy()

    def log(self) -> str:
        return self.log_path.read_text()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def server_info(self, **headers) -> dict:
        return httpx.get(self.url + "/get_server_info", headers=headers, timeout=30).json()

    def internal_state(self, **headers) -> dict:
        return self.server_info(**headers)["internal_states"][0]

    def wait_idle(self, timeout: float = 60.0, **headers) -> dict:
        """Poll until no request runs or waits; returns the scheduler state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.internal_state(**headers)
            if state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {state}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once its parent has exited.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def start_server():
    """Factory: start_server(*flags) -> ServerProcess, stopped at the end of the session."""
    started: list[ServerProcess] = []

    def start(*flags: str) -> ServerProcess:
        server = ServerProcess(*flags)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def demo_server(start_server) -> ServerProcess:
    # Small chunks so long prompts really go through chunked prefill.
    return start_server("--enable-metrics", "--chunked-prefill-size", "64", "--max-total-tokens", "8192")
