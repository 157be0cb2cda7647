"""TokenizerManager: the main process's side of every request.

It validates and tokenizes inputs, sends them to the scheduler process over ZMQ, turns the token ids
coming back into text (one IncrementalDetokenizer per request) and hands results to whoever awaits
them: the HTTP handlers or the offline Engine. It also notices when the scheduler dies and fails every
waiting request instead of letting it hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import zmq
import zmq.asyncio

from sglang.srt.managers.detokenizer_manager import IncrementalDetokenizer
from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    FlushCacheReq,
    FlushCacheReqOutput,
    GenerateReqInput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    ReqOutput,
    SchedulerCrashed,
    TokenizedGenerateReqInput,
    new_rid,
)
from sglang.srt.managers.metrics_collector import MetricsCollector
from sglang.srt.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class SchedulerDeadError(RuntimeError):
    """The scheduler process is gone; no request can be served any more."""


@dataclass
class ReqState:
    rid: str
    detok: IncrementalDetokenizer | None
    return_logprob: bool
    event: asyncio.Event = field(default_factory=asyncio.Event)
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: dict | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    created: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    last_token_time: float | None = None


def load_tokenizer(server_args):
    """The request tokenizer (None with --skip-tokenizer-init), chat template override applied."""
    if server_args.skip_tokenizer_init:
        return None
    from transformers import AutoTokenizer

    from sglang.srt.model_loader.weight_utils import resolve_tokenizer_path
    from sglang.srt.server_args import read_chat_template

    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer_path(server_args), trust_remote_code=server_args.trust_remote_code)
    if server_args.chat_template:
        tokenizer.chat_template = read_chat_template(server_args.chat_template)
    return tokenizer


class TokenizerManager:
    def __init__(self, server_args, tokenizer_input: str, scheduler_input: str, scheduler_info: dict, tokenizer=None):
        self.server_args = server_args
        self.scheduler_info = scheduler_info
        self.context_len = int(scheduler_info["context_len"])
        self.vocab_size = int(scheduler_info["vocab_size"])
        self.tokenizer = tokenizer
        self.ctx = zmq.asyncio.Context()
        self.recv_from_scheduler = self.ctx.socket(zmq.PULL)
        self.recv_from_scheduler.bind(tokenizer_input)
        self.send_to_scheduler = self.ctx.socket(zmq.PUSH)
        self.send_to_scheduler.setsockopt(zmq.LINGER, 0)
        self.send_to_scheduler.connect(scheduler_input)
        self.rid_to_state: dict[str, ReqState] = {}
        self.pending_replies: dict[type, deque[asyncio.Future]] = {FlushCacheReqOutput: deque(), GetInternalStateReqOutput: deque()}
        self.metrics = MetricsCollector(server_args.served_model_name)
        self.dead_reason: str | None = None
        self.scheduler_proc = None  # set by the launcher, watched for an unexpected exit
        self.on_scheduler_death: Callable[[str], None] | None = None
        self._tasks: list[asyncio.Task] = []
        self._token_text: dict[int, str] = {}

    # -------------------------------------------------------------- background tasks
    def ensure_background_tasks(self) -> None:
        """Start the receive loop and the scheduler watchdog on the running event loop (once)."""
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._handle_loop()), loop.create_task(self._watchdog())]

    async def _handle_loop(self) -> None:
        while True:
            msg = await self.recv_from_scheduler.recv_pyobj()
            if isinstance(msg, BatchTokenIDOut):
                for out in msg.outputs:
                    self._on_req_output(out)
            elif isinstance(msg, SchedulerCrashed):
                self._mark_dead(msg.message)
            elif type(msg) in self.pending_replies:
                waiters = self.pending_replies[type(msg)]
                if waiters:
                    fut = waiters.popleft()
                    if not fut.done():
                        fut.set_result(msg)
            else:
                logger.error("unexpected message from the scheduler: %r", type(msg))

    async def _watchdog(self) -> None:
        while self.dead_reason is None:
            await asyncio.sleep(0.25)
            proc = self.scheduler_proc
            if proc is not None and not proc.is_alive():
                self._mark_dead(f"the scheduler process exited unexpectedly (exit code {proc.exitcode})")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        logger.error("%s; failing %d in-flight request(s)", reason, len(self.rid_to_state))
        self.dead_reason = reason
        for state in self.rid_to_state.values():
            state.finished = True
            state.finish_reason = {"type": "abort", "message": reason, "status_code": 500}
            state.event.set()
        for waiters in self.pending_replies.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(SchedulerDeadError(reason))
            waiters.clear()
        if self.on_scheduler_death is not None:
            self.on_scheduler_death(reason)

    def _on_req_output(self, out: ReqOutput) -> None:
        state = self.rid_to_state.get(out.rid)
        if state is None:  # aborted by us meanwhile
            return
        now = time.perf_counter()
        ids = out.new_token_ids
        state.output_ids.extend(ids)
        state.prompt_tokens, state.completion_tokens, state.cached_tokens = out.prompt_tokens, out.completion_tokens, out.cached_tokens
        state.token_logprobs.extend(out.token_logprobs)
        state.top_logprobs.extend(out.top_logprobs)
        state.input_token_logprobs.extend(out.input_token_logprobs)
        state.input_top_logprobs.extend(out.input_top_logprobs)
        self.metrics.observe_tokens(len(ids), now - state.created, None if state.last_token_time is None else now - state.last_token_time)
        if ids:
            state.first_token_time = state.first_token_time or now
            state.last_token_time = now
        if state.detok is not None:
            reason = out.finished_reason
            if reason and reason.get("type") == "stop" and isinstance(reason.get("matched"), int) and not state.detok.no_stop_trim and ids:
                ids = ids[:-1]  # the matched stop token never becomes text
            state.detok.append(ids)
        if out.finished_reason is not None:
            state.finished, state.finish_reason = True, out.finished_reason
            if state.detok is not None:
                state.detok.finish()
            aborted = out.finished_reason.get("type") == "abort"
            tpot = None
            if state.completion_tokens > 1 and state.first_token_time is not None:
                tpot = (now - state.first_token_time) / (state.completion_tokens - 1)
            self.metrics.observe_finished(out.prompt_tokens, out.cached_tokens, now - state.created, aborted, tpot)
        state.event.set()

    # -------------------------------------------------------------- requests
    def tokenize_request(self, obj: GenerateReqInput) -> TokenizedGenerateReqInput:
        """Validate one (non-batch) request; ValueError carries a message fit for a 400 answer."""
        if obj.input_ids is not None:
            input_ids = list(obj.input_ids)
            if not all(isinstance(t, int) for t in input_ids):
                raise ValueError("input_ids must be a list of integers")
        else:
            if self.tokenizer is None:
                raise ValueError("this server runs with --skip-tokenizer-init; send input_ids instead of text")
            input_ids = self.tokenizer.encode(obj.text)
        params = obj.sampling_params if isinstance(obj.sampling_params, SamplingParams) else SamplingParams.from_dict(obj.sampling_params)
        params.verify(self.vocab_size)
        n = len(input_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if any(t < 0 or t >= self.vocab_size for t in input_ids):
            raise ValueError(f"input_ids must be in [0, {self.vocab_size})")
        if n >= self.context_len:
            raise ValueError(f"The input ({n} tokens) is longer than the model's context length ({self.context_len} tokens).")
        if params.max_new_tokens is not None and n + params.max_new_tokens > self.context_len:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {self.context_len} tokens. "
                f"You requested a total of {n + params.max_new_tokens} tokens: {n} tokens from the input messages "
                f"and {params.max_new_tokens} tokens for the completion. Please reduce the number of tokens in the "
                "input messages or the completion to fit within the limit."
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this server runs with --skip-tokenizer-init")
        top_n = int(obj.top_logprobs_num or 0)
        if top_n < 0 or top_n > self.vocab_size:
            raise ValueError(f"top_logprobs_num must be in [0, {self.vocab_size}]")
        start = obj.logprob_start_len if obj.logprob_start_len is not None else -1
        if not isinstance(start, int) or isinstance(start, bool) or not -1 <= start < n:
            raise ValueError(f"logprob_start_len must be -1 (no prompt logprobs) or in [0, {n}) for this prompt, got {start!r}")
        return TokenizedGenerateReqInput(
            rid=obj.rid if isinstance(obj.rid, str) else new_rid(),
            input_ids=input_ids,
            sampling_params=params,
            stream=obj.stream,
            return_logprob=bool(obj.return_logprob),
            top_logprobs_num=top_n if obj.return_logprob else 0,
            logprob_start_len=start if obj.return_logprob else -1,
        )

    async def generate_request(self, obj: GenerateReqInput) -> AsyncIterator[dict | list[dict]]:
        """Yield results: for a single request its output dicts (each update when streaming, else one);
        for a batch, one list of dicts, or when streaming each item's updates tagged with "index"."""
        self._check_alive()
        if obj.is_single:
            async for out in self._generate_one(self.tokenize_request(obj)):
                yield out
            return
        # Validate the whole batch before sending anything, so a bad item rejects the batch cleanly.
        items = [self.tokenize_request(obj[i]) for i in range(obj.batch_size)]
        if not obj.stream:
            results = await asyncio.gather(*(self._last(self._generate_one(t)) for t in items))
            yield list(results)
            return
        async for out in self.merge_streams([self._generate_one(t) for t in items]):
            yield out

    async def generate_tokenized(self, tokenized: TokenizedGenerateReqInput) -> AsyncIterator[dict]:
        """Run one request that `tokenize_request` already validated (so HTTP errors come before any
        streamed byte); yields each update when streaming, else only the final output."""
        async for out in self._generate_one(tokenized):
            yield out

    async def _generate_one(self, tokenized: TokenizedGenerateReqInput) -> AsyncIterator[dict]:
        self._check_alive()
        self.ensure_background_tasks()
        state = self._new_state(tokenized)
        self.rid_to_state[tokenized.rid] = state
        self._log_request(tokenized)
        await self.send_to_scheduler.send_pyobj(tokenized)
        try:
            while True:
                await state.event.wait()
                state.event.clear()
                out = self._make_output(state)
                if state.finished:
                    self.rid_to_state.pop(tokenized.rid, None)
                    yield out
                    return
                if tokenized.stream:
                    yield out
        finally:
            if not state.finished:  # the consumer went away (client disconnect, cancellation)
                await self.abort_request(tokenized.rid)

    def _new_state(self, tokenized: TokenizedGenerateReqInput) -> ReqState:
        params = tokenized.sampling_params
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens, params.stop, params.no_stop_trim)
        return ReqState(rid=tokenized.rid, detok=detok, return_logprob=tokenized.return_logprob, prompt_tokens=len(tokenized.input_ids))

    def _make_output(self, state: ReqState) -> dict:
        meta: dict[str, Any] = {
            "id": state.rid,
            "prompt_tokens": state.prompt_tokens,
            "completion_tokens": state.completion_tokens,
            "cached_tokens": state.cached_tokens,
            "finish_reason": state.finish_reason,
            "e2e_latency": time.perf_counter() - state.created,
        }
        if state.return_logprob:
            meta["output_token_logprobs"] = self._with_text(state.token_logprobs)
            meta["output_top_logprobs"] = [self._with_text(top) for top in state.top_logprobs]
            if state.input_token_logprobs:
                meta["input_token_logprobs"] = self._with_text(state.input_token_logprobs)
                meta["input_top_logprobs"] = [None if top is None else self._with_text(top) for top in state.input_top_logprobs]
        out: dict[str, Any] = {"output_ids": list(state.output_ids), "meta_info": meta}
        if state.detok is not None:
            out["text"] = state.detok.visible_text()
        return out

    def _with_text(self, pairs: list[tuple[float | None, int]]) -> list[tuple[float | None, int, str | None]]:
        """(logprob, token id) pairs with each token's text, as SGLang's meta_info lists them."""
        return [(lp, t, self.token_text(t)) for lp, t in pairs]

    def token_text(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    @staticmethod
    async def _last(gen: AsyncIterator[dict]) -> dict:
        last = None
        async for last in gen:
            pass
        return last

    @staticmethod
    async def merge_streams(gens: list[AsyncIterator[dict]]) -> AsyncIterator[dict]:
        """Interleave several request streams; each item is tagged with its position."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, gen: AsyncIterator[dict]) -> None:
            try:
                async for out in gen:
                    await queue.put({**out, "index": i})
            finally:
                await queue.put(done)

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def abort_by_client(self, rid: str | None) -> None:
        """/abort_request: stop `rid` (None: every request) and let its waiter see the abort as its
        finish (abort_request below is for a waiter that is gone)."""
        if self.dead_reason is not None:
            return
        for r in list(self.rid_to_state) if rid is None else [rid] if rid in self.rid_to_state else []:
            await self.send_to_scheduler.send_pyobj(AbortReq(r))

    async def abort_request(self, rid: str) -> None:
        if self.rid_to_state.pop(rid, None) is None or self.dead_reason is not None:
            return
        await self.send_to_scheduler.send_pyobj(AbortReq(rid))

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise SchedulerDeadError(self.dead_reason)

    def _log_request(self, tokenized: TokenizedGenerateReqInput) -> None:
        if self.server_args.log_requests:
            logger.info("request %s: %d prompt tokens, %s", tokenized.rid, len(tokenized.input_ids), tokenized.sampling_params)

    # -------------------------------------------------------------- control
    async def _ask_scheduler(self, msg: Any, reply_type: type):
        self._check_alive()
        self.ensure_background_tasks()
        fut = asyncio.get_running_loop().create_future()
        self.pending_replies[reply_type].append(fut)
        await self.send_to_scheduler.send_pyobj(msg)
        return await fut

    async def flush_cache(self) -> FlushCacheReqOutput:
        return await self._ask_scheduler(FlushCacheReq(), FlushCacheReqOutput)

    async def get_internal_state(self) -> dict:
        return (await self._ask_scheduler(GetInternalStateReq(), GetInternalStateReqOutput)).state

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        self.recv_from_scheduler.close(linger=0)
        self.send_to_scheduler.close(linger=0)
        self.ctx.term()
