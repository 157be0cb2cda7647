"""Shared fixtures: real servers on the tiny demo model (CPU, 127.0.0.1 only).

`demo_server` is one server for the whole test session; tests that need special flags start their
own with `start_server`. Every server is stopped with SIGTERM and must exit cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import httpx
import pytest
import torch

# Triton reads this when its kernels are first decorated: on a CPU host every test that reaches a
# Triton kernel, whichever file imports it first, must see the interpreter switched on.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
        # One compute thread: CI has 2 cores shared with pytest and the server's main process, and
        # oversubscribed OpenMP barriers make the tiny model's steps 10x slower.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
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
    # Small chunks so long prompts really go through chunked prefill. fp32, because bf16 CPU kernels
    # are not batch-invariant, and the tests compare batched greedy outputs with single ones.
    return start_server("--enable-metrics", "--chunked-prefill-size", "64", "--max-total-tokens", "8192", "--dtype", "float32")


# ------------------------------------------------------------------ a fake model for scheduler tests


class FakeModelRunner:
    """Stands in for ModelRunner with the same attributes and forward contract.

    Its "KV cache" stores (token, position) per slot, and its next token is a hash of the whole
    sequence read back through req_to_token, so any bookkeeping mistake (wrong slot, stale prefix,
    lost chunk) changes the output or trips an assertion.

    With `sliding_window` and `swa_tokens` it has a hybrid pool: every new token also gets a swa
    slot, and each step checks that the window its first new token reads (through req_to_swa_token)
    holds exactly the sequence's tokens, so a freed, reused or missing swa slot trips an assertion.
    """

    def __init__(
        self, max_total_tokens: int = 256, max_running_requests: int = 16, vocab_size: int = 97, context_len: int = 512, eos: int = 1,
        sliding_window: int | None = None, swa_tokens: int | None = None,
    ):  # fmt: skip
        import torch
        from types import SimpleNamespace

        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator

        self.device = "cpu"
        self.model_config = SimpleNamespace(
            context_len=context_len, vocab_size=vocab_size, model_path="fake", architectures=["Gemma4ForCausalLM"],
            hf_config={"top_k_experts": 2, "num_experts": 4}, hf_text_config={"eos_token_id": eos}, hf_generation_config=None,
        )
        self.max_total_num_tokens = max_total_tokens
        self.max_running_requests = max_running_requests
        hybrid = swa_tokens is not None
        self.req_to_token_pool = ReqToTokenPool(max_running_requests, context_len + 8, "cpu", hybrid_swa=hybrid)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(max_total_tokens, "cpu")
        self.kv = torch.full((max_total_tokens + 1, 2), -1, dtype=torch.int64)
        self.sliding_window = sliding_window
        self.max_total_num_swa_tokens = swa_tokens
        self.swa_allocator = TokenToKVPoolAllocator(swa_tokens, "cpu") if hybrid else None
        self.swa_kv = torch.full(((swa_tokens or 0) + 1, 2), -1, dtype=torch.int64)
        self.max_swa_in_use = 0  # most swa slots handed out at once (peak of the pool)
        self.forward_calls: list = []

    @staticmethod
    def next_token(seq: list[int], vocab_size: int) -> int:
        h = 0
        for t in seq:
            h = (h * 31 + t + 7) % 1_000_003
        return 2 + h % (vocab_size - 2)  # never 0/1, so EOS only comes when a test asks for it

    def forward(self, fb):
        import torch

        from sglang.srt.model_executor.forward_batch_info import LogitsProcessorOutput

        self.forward_calls.append((fb.forward_mode, list(fb.extend_seq_lens_cpu)))
        assert len(set(fb.out_cache_loc.tolist())) == fb.out_cache_loc.numel(), "slot handed out twice"
        assert int(fb.out_cache_loc.min()) >= 1, "slot 0 is reserved"
        self.kv[fb.out_cache_loc] = torch.stack([fb.input_ids, fb.positions], dim=1)
        vocab = self.model_config.vocab_size
        logits = torch.full((fb.batch_size, vocab), -20.0)
        for i, (row, seq_len) in enumerate(zip(fb.req_pool_indices.tolist(), fb.seq_lens_cpu)):
            slots = self.req_to_token_pool.req_to_token[row, :seq_len]
            stored = self.kv[slots]
            assert stored[:, 1].tolist() == list(range(seq_len)), f"positions in KV are wrong: {stored[:, 1].tolist()}"
            logits[i, self.next_token(stored[:, 0].tolist(), vocab)] = 20.0
        if self.swa_allocator is not None:
            self._check_swa(fb)
        return LogitsProcessorOutput(next_token_logits=logits)

    def _check_swa(self, fb) -> None:
        import torch

        locs = fb.swa_out_cache_loc
        assert locs is not None and len(set(locs.tolist())) == locs.numel() and int(locs.min()) >= 1, "bad swa slots"
        self.swa_kv[locs] = torch.stack([fb.input_ids, fb.positions], dim=1)
        self.max_swa_in_use = max(self.max_swa_in_use, self.swa_allocator.size - self.swa_allocator.available_size())
        for row, seq_len, ext in zip(fb.req_pool_indices.tolist(), fb.seq_lens_cpu, fb.extend_seq_lens_cpu):
            lo = max(0, seq_len - ext - self.sliding_window + 1)
            full = self.kv[self.req_to_token_pool.req_to_token[row, lo:seq_len]]
            window = self.swa_kv[self.req_to_token_pool.req_to_swa_token[row, lo:seq_len]]
            assert torch.equal(window, full), f"swa window of row {row} at {lo}:{seq_len} is wrong: {window.tolist()} vs {full.tolist()}"


def _pointers_read_before_wait(ptx: str) -> set[int]:
    """Indices of the pointer parameters that global loads before griddepcontrol.wait read through:
    each load's address traced back through the PTX registers it is computed from (straight-line
    code, so every register's sources are known) to the parameters at the roots."""
    head = re.sub(r"//[^\n]*", "", ptx[: ptx.find("griddepcontrol.wait")])
    pointers = {int(i) for i in re.findall(r"\.param \.u64 \.ptr[^,\n]*_param_(\d+)", ptx)}
    sources: dict[str, set[str]] = {}
    roots: dict[str, int] = {}
    reached: set[int] = set()

    def params_of(regs: list[str]) -> set[int]:
        seen, todo, found = set(), list(regs), set()
        while todo:
            reg = todo.pop()
            if reg not in seen:
                seen.add(reg)
                found |= {roots[reg]} if reg in roots else set()
                todo.extend(sources.get(reg, ()))
        return found

    for line in head.splitlines():  # PTX: one instruction a line
        instr = re.sub(r"^[\s{}]*(@!?%\w+\s+)?", "", line)  # braces of inline asm, predicate guard
        if m := re.match(r"ld\.param\S*\s+(%\w+),\s*\[\w+_param_(\d+)\]", instr):
            roots[m[1]] = int(m[2])
        elif instr.startswith(("ld.global", "cp.async")):
            address = re.findall(r"%\w+", " ".join(re.findall(r"\[([^\]]*)\]", instr)))
            reached |= params_of(address)
            for dest in re.findall(r"%\w+", instr.split("[")[0]):  # a loaded pointer leads back too
                sources.setdefault(dest, set()).update(address)
        elif regs := re.findall(r"%\w+", instr):
            sources.setdefault(regs[0], set()).update(regs[1:])
    return reached & pointers


def assert_pdl_waits_first(ptx: str, name: str, params: Sequence[str] = (), weights: Collection[str] = ()) -> None:
    """A kernel launched with programmatic dependent launch may start before its predecessor ends, so
    its PTX must wait (griddepcontrol.wait) before any global store, and before any global load
    except through the pointer parameters named in `weights` (constant weights that a kernel reads
    early on purpose); `params` are the kernel's parameter names in order."""
    at = ptx.find("griddepcontrol.wait")
    assert at >= 0, f"{name}: no griddepcontrol.wait in the PTX"
    early = [k for k in ("st.global", "atom.global", "red.global") if k in ptx[:at]]
    assert not early, f"{name}: {early} before griddepcontrol.wait"
    read = {params[i] if i < len(params) else f"param {i}" for i in _pointers_read_before_wait(ptx)}
    assert read <= set(weights), f"{name}: reads {sorted(read - set(weights))} before griddepcontrol.wait"


def ptxas_available() -> bool:
    """Whether Triton can compile for sm_90 here (its wheel ships ptxas; no GPU needed)."""
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def compile_for_sm90(fn, args: dict, consts: dict, weights: Collection[str] = (), arch: int = 90, **options) -> str:
    """PTX of Triton kernel `fn` compiled for sm_90 (or sm_`arch`; run without TRITON_INTERPRET) with
    parameter types `args` (name -> type, in order) and constexprs `consts`; a PDL variant (PDL=True)
    must pass assert_pdl_waits_first, reading only `weights` before its wait."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**args, **{name: "constexpr" for name in consts}}, constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]
    if consts.get("PDL"):
        assert_pdl_waits_first(ptx, fn.__name__, list(args), weights)
    return ptx


def run_compile_child(test_file: str) -> None:
    """Run `test_file` as a script with --compile-sm90 in a child process without the interpreter
    (a module's kernels are decorated for one mode only) and fail with its stderr."""
    child = subprocess.run([sys.executable, test_file, "--compile-sm90"], env={**os.environ, "TRITON_INTERPRET": "0"},
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr[-4000:]


def reference_continuation(prompt: list[int], n: int, vocab_size: int = 97) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = FakeModelRunner.next_token(seq, vocab_size)
        out.append(t)
        seq.append(t)
    return out


@pytest.fixture(params=["sync", "overlap"])
def overlap_mode(request, monkeypatch):
    """Run a scheduler test both ways: finishing each step before the next, and with the next decode
    launched before the previous results are read (the CUDA default), here forced on the CPU."""
    from sglang.srt.managers.scheduler import Scheduler

    if request.param == "overlap":
        monkeypatch.setattr(Scheduler, "OVERLAP_DEVICE_TYPES", ("cuda", "cpu"))
    return request.param
