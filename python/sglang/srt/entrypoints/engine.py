"""The offline Engine, and the launcher it shares with the HTTP server.

Both run the same process layout: the Scheduler (with the ModelRunner) in a child process, the
TokenizerManager in this one, ZMQ in between. The Engine drives the TokenizerManager from its own
event loop, so a list of prompts is one batch for the scheduler.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import os
from typing import Any

from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.scheduler import SchedulerPorts, run_scheduler_process
from sglang.srt.managers.tokenizer_manager import TokenizerManager, load_tokenizer
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import ipc_endpoint, terminate_process

logger = logging.getLogger(__name__)


def launch_subprocesses(server_args: ServerArgs) -> tuple[TokenizerManager, mp.Process]:
    """Start the scheduler process, wait until its model is loaded, then build the TokenizerManager."""
    ports = SchedulerPorts(scheduler_input=ipc_endpoint("scheduler"), tokenizer_input=ipc_endpoint("tokenizer"))
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch/CUDA state
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_scheduler_process, args=(server_args, ports, writer, os.getpid()), name="sglang-scheduler", daemon=True)
    proc.start()
    writer.close()
    try:
        tokenizer = load_tokenizer(server_args)  # overlaps with the model load in the child
        info = _wait_ready(reader, proc)
    except BaseException:
        terminate_process(proc)
        raise
    tm = TokenizerManager(server_args, ports.tokenizer_input, ports.scheduler_input, info, tokenizer)
    tm.scheduler_proc = proc
    return tm, proc


def _wait_ready(reader, proc: mp.Process) -> dict:
    while not reader.poll(0.5):
        if not proc.is_alive():
            raise RuntimeError(f"the scheduler process died during startup (exit code {proc.exitcode}); see its log above")
    try:
        msg = reader.recv()
    except EOFError:
        proc.join(5)
        raise RuntimeError(f"the scheduler process died during startup (exit code {proc.exitcode}); see its log above") from None
    if msg.get("status") != "ready":
        raise RuntimeError(f"the scheduler failed to start: {msg.get('message')}")
    return msg


class Engine:
    """Offline generation: `Engine(model_path=..., **server_args).generate(prompt=..., sampling_params=...)`."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("log_level", "warning")
        self.server_args = ServerArgs(**kwargs)
        from sglang.srt.utils import configure_logger

        configure_logger(self.server_args.log_level)
        self.loop = asyncio.new_event_loop()
        self.tokenizer_manager, self.scheduler_proc = launch_subprocesses(self.server_args)
        self.tokenizer = self.tokenizer_manager.tokenizer
        self._closed = False
        atexit.register(self.shutdown)

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        top_logprobs_num: int | list[int] = 0,
        logprob_start_len: int | list[int] = -1,
    ) -> dict | list[dict]:
        """One dict per prompt: text (with a tokenizer), output_ids (generated ids only), meta_info
        (with return_logprob, the output's logprobs, and the prompt's from logprob_start_len on)."""
        obj = GenerateReqInput(
            text=prompt, input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len,
        )  # fmt: skip
        return self.loop.run_until_complete(self._collect(obj))

    async def _collect(self, obj: GenerateReqInput):
        result = None
        async for result in self.tokenizer_manager.generate_request(obj):
            pass
        for item in result if isinstance(result, list) else [result]:
            reason = item["meta_info"]["finish_reason"] or {}
            if reason.get("type") == "abort":
                # A rejected request is the caller's error; a dead scheduler is ours.
                error = ValueError if reason.get("status_code") == 400 else RuntimeError
                raise error(reason.get("message"))
        return result

    def flush_cache(self) -> bool:
        return self.loop.run_until_complete(self.tokenizer_manager.flush_cache()).success

    def get_server_info(self) -> dict:
        state = self.loop.run_until_complete(self.tokenizer_manager.get_internal_state())
        return {**vars(self.server_args), "internal_states": [state]}

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        terminate_process(self.scheduler_proc)
        self.tokenizer_manager.close()
        self.loop.run_until_complete(asyncio.sleep(0))  # let cancelled background tasks finish
        self.loop.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
