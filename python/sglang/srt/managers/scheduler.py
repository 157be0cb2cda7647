"""The Scheduler: continuous batching over a paged KV pool with a prefix cache.

Each step runs either one prefill (extend) batch, made of new requests and the next chunk of a
chunked prefill, or one decode batch of every running request. Prefill goes first when something
can be admitted (SGLang's default policy). When decode runs out of KV slots, the most recently
admitted requests are retracted: their KV moves into the radix tree (evictable) and they go back to
the front of the queue, to resume from whatever of that KV survives.

`Scheduler` is a plain object driven by `step()`, so tests can run it in-process with a fake model
runner; `run_scheduler_process` wraps it in the ZMQ event loop of the scheduler child process.

Sliding-window layers (hybrid KV pool, when the runner has `swa_allocator`): every new token gets a
full slot and a swa slot. A request's swa slots of positions no later query reads (< kv_len - W + 1;
a chunk starting at kv_len needs the W - 1 keys before it) are *reclaimable*: when the swa pool runs
short, every running request is trimmed to its window (`_trim_swa`) before the tree is evicted, so
under pressure a request holds at most W - 1 swa slots between steps. Until then they stay, so a
finished request gives the radix tree swa KV for every prefix of its sequence (shared system prompts
stay reusable). Admission (`SwaPolicy`: pinned window + one step), `_can_alloc` before decode, and
eviction count both pools, reclaimable slots as free; prompts are chunked to at most swa pool - W
tokens so one request always fits. The tree only offers prefixes whose last window is held (see
radix_cache). Nothing else changes: outputs are the same with and without the hybrid pool.

Overlap (on CUDA unless `--disable-overlap-schedule`): a step is launched and its sampled tokens are
read back only in the next `step()`. When the step in flight is a decode and nothing waits for
prefill, the next decode is launched first, its input ids being the in-flight step's samples still on
the GPU, and only then are the in-flight results read and processed: the host's bookkeeping (and the
graph launch) runs while the GPU computes. A request that turns out to have finished in the earlier
step (EOS, stop) has one extra token computed; it is dropped, and that token's KV goes to the tree
with the rest. Requests that will finish by length are left out of the speculative step. Every GPU
op is on one stream, so slots freed meanwhile are reused only after the step in flight is done.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from sglang.srt.layers.sampler import Sampler, SamplerOutput
from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    ReqOutput,
    SchedulerCrashed,
    TokenizedGenerateReqInput,
)
from sglang.srt.managers import prompt_logprobs
from sglang.srt.managers.schedule_batch import (
    FINISH_ABORT,
    FINISH_LENGTH,
    Req,
    ScheduleBatch,
    pack_to_device,
    write_req_to_token,
)
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder, SwaPolicy, order_waiting_queue
from sglang.srt.managers.scheduler_log import SchedulerLog
from sglang.srt.mem_cache.memory_pool import free_swa_outside_window
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.model_executor.forward_batch_info import ForwardMode, LogitsProcessorOutput
from sglang.srt.sampling.penalizer import PenaltyState, apply_penalties, record_sampled
from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglang.srt.utils import to_device

logger = logging.getLogger(__name__)

# new_token_ratio: start optimistic, decay towards MIN while decoding, bump up after a retraction.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY_STEPS = 600
RETRACT_RATIO_BUMP = 0.3

_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "top_k_experts", "moe_top_k")


# ------------------------------------------------------------------ model facts


@dataclass
class MoeGemmConfig:
    top_k: int | None
    num_experts: int | None


def _cfg_get(cfg: Any, key: str):
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def init_moe_gemm_config(hf_config: Any) -> MoeGemmConfig:
    """MoE top-k and expert count from an HF config (dict or object), looking in text_config first.

    Exporters spell top-k differently; every known spelling is accepted.
    """
    text = _cfg_get(hf_config, "text_config") or hf_config
    top_k = next((v for k in _TOP_K_KEYS for cfg in (text, hf_config) if (v := _cfg_get(cfg, k)) is not None), None)
    num_experts = next((v for k in ("num_experts", "num_local_experts", "n_routed_experts") for cfg in (text, hf_config) if (v := _cfg_get(cfg, k)) is not None), None)
    return MoeGemmConfig(top_k=int(top_k) if top_k is not None else None, num_experts=int(num_experts) if num_experts is not None else None)


def _as_id_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def eos_token_ids(model_config, tokenizer=None) -> set[int]:
    ids = _as_id_set(_cfg_get(model_config.hf_text_config, "eos_token_id"))
    ids |= _as_id_set((model_config.hf_generation_config or {}).get("eos_token_id"))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def sampling_defaults(model_config) -> dict:
    gen = model_config.hf_generation_config or {}
    return {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p", "do_sample") if k in gen}


# ------------------------------------------------------------------ scheduler


@dataclass
class InflightStep:
    """A launched step whose samples (still on the device) have not been read back."""

    batch: ScheduleBatch
    sample_reqs: list[Req]
    sampled: SamplerOutput | None  # on the device: a decode launched ahead takes its input ids here
    sampled_host: SamplerOutput | None  # the same, being copied to the host
    prompt_logprobs: tuple[prompt_logprobs.PromptLogprobPlan, LogitsProcessorOutput] | None = None


class Scheduler:
    # Overlap pays only where the device runs asynchronously to the host (tests add "cpu").
    OVERLAP_DEVICE_TYPES = ("cuda",)

    def __init__(self, server_args, model_runner=None, tokenizer=None):
        self.server_args = server_args
        if model_runner is None:
            from sglang.srt.model_executor.model_runner import ModelRunner

            model_runner = ModelRunner(server_args)
        self.model_runner = model_runner
        self.model_config = model_runner.model_config
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.allocator = model_runner.token_to_kv_pool_allocator
        self.max_total_num_tokens = int(model_runner.max_total_num_tokens)
        self.max_running_requests = int(min(
            server_args.max_running_requests or math.inf,
            model_runner.max_running_requests,
            self.req_to_token_pool.size,
        ))
        self.context_len = int(self.model_config.context_len)
        self.vocab_size = int(self.model_config.vocab_size)
        self.swa_allocator = getattr(model_runner, "swa_allocator", None)
        self.sliding_window = int(model_runner.sliding_window) if self.swa_allocator is not None else None
        self.tree_cache = RadixCache(
            self.req_to_token_pool, self.allocator, disable=server_args.disable_radix_cache,
            swa_allocator=self.swa_allocator, sliding_window=self.sliding_window,
        )  # fmt: skip
        chunk = server_args.chunked_prefill_size
        self.chunked_prefill_size = None if chunk is None or chunk <= 0 else int(chunk)
        self.swa_policy = self._init_swa_policy()
        self.max_prefill_tokens = int(server_args.max_prefill_tokens)
        self._tokenizer = tokenizer
        self.eos_ids = eos_token_ids(self.model_config, tokenizer)
        self.generation_defaults = sampling_defaults(self.model_config) if server_args.sampling_defaults == "model" else {}
        self.moe_gemm_config = init_moe_gemm_config(self.model_config.hf_config)
        self.sampler = Sampler()
        self.device_type = torch.device(self.device).type
        self.overlap = self.device_type in self.OVERLAP_DEVICE_TYPES and not server_args.disable_overlap_schedule
        self.inflight: InflightStep | None = None

        self.waiting_queue: list[Req] = []
        self.running_reqs: list[Req] = []
        self.chunked_req: Req | None = None
        self.outbox: list[ReqOutput] = []
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO * server_args.schedule_conservativeness
        self.min_new_token_ratio = min(MIN_NEW_TOKEN_RATIO * server_args.schedule_conservativeness, 1.0)
        self.ratio_decay = (self.new_token_ratio - self.min_new_token_ratio) / NEW_TOKEN_RATIO_DECAY_STEPS
        self.stats = {"num_retractions": 0, "prefill_computed_tokens_total": 0, "generation_tokens_total": 0, "cached_tokens_total": 0, "forward_steps": 0, "swa_reclaimed_total": 0}
        self._seed_counter = server_args.random_seed
        self.batch_log = SchedulerLog(server_args.decode_log_interval)
        logger.info(
            "scheduler ready: max_total_num_tokens=%d max_running_requests=%d context_len=%d chunked_prefill_size=%s moe_top_k=%s",
            self.max_total_num_tokens, self.max_running_requests, self.context_len, self.chunked_prefill_size, self.moe_gemm_config.top_k,
        )

    def _init_swa_policy(self) -> SwaPolicy | None:
        if self.swa_allocator is None:
            return None
        # A request holds up to W - 1 swa slots between steps; its step must fit beside them.
        step_cap = self.swa_allocator.size - self.sliding_window
        if step_cap < 1:
            raise ValueError(f"swa pool of {self.swa_allocator.size} tokens cannot hold a window of {self.sliding_window}")
        if self.chunked_prefill_size is None or self.chunked_prefill_size > step_cap:
            logger.info("chunked prefill capped at %d tokens by the sliding-window KV pool", step_cap)
            self.chunked_prefill_size = step_cap
        return SwaPolicy(self.swa_allocator, self.sliding_window, self.chunked_prefill_size)

    def warmup(self) -> None:
        """Compile the prefill kernels before serving (GPU only; see model_executor/warmup.py)."""
        if self.device_type != "cuda" or self.server_args.skip_server_warmup:
            return
        from sglang.srt.model_executor.compile_watch import watch_late_compiles
        from sglang.srt.model_executor.warmup import warmup_prefill, warmup_token_budget

        warmup_prefill(self.model_runner, warmup_token_budget(self.model_runner, self.max_prefill_tokens))
        watch_late_compiles()  # from now on a first-met kernel variant stalls requests: log it

    @property
    def tokenizer(self):
        """Loaded on first use: the scheduler decodes only to spot stop strings (to free KV at once)."""
        if self._tokenizer is None and not self.server_args.skip_tokenizer_init:
            from sglang.srt.managers.tokenizer_manager import load_tokenizer

            self._tokenizer = load_tokenizer(self.server_args)
        return self._tokenizer

    def info(self) -> dict:
        """Facts the TokenizerManager needs to validate requests."""
        return {
            "max_total_num_tokens": self.max_total_num_tokens,
            "max_running_requests": self.max_running_requests,
            "context_len": self.context_len,
            "vocab_size": self.vocab_size,
            "eos_token_ids": sorted(self.eos_ids),
            "architectures": list(self.model_config.architectures),
            "model_path": self.model_config.model_path,
            "moe_top_k": self.moe_gemm_config.top_k,
            "moe_num_experts": self.moe_gemm_config.num_experts,
        }

    # -------------------------------------------------------------- inputs
    def handle_request(self, recv: Any) -> Any:
        """Process one message from the TokenizerManager; returns a direct reply or None."""
        if isinstance(recv, TokenizedGenerateReqInput):
            self.add_request(recv)
        elif isinstance(recv, AbortReq):
            self.abort_request(recv.rid)
        elif isinstance(recv, FlushCacheReq):
            return self.flush_cache()
        elif isinstance(recv, GetInternalStateReq):
            return GetInternalStateReqOutput(self.internal_state())
        else:
            logger.error("unknown message %r", type(recv))
        return None

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        params = recv.sampling_params
        params.fill_defaults(self.generation_defaults)
        req = Req(recv.rid, recv.input_ids, params, recv.stream, recv.return_logprob, recv.top_logprobs_num,
                  seed=self._next_seed(), logprob_start_len=recv.logprob_start_len)  # fmt: skip
        error = self._validate(req)
        if error is not None:
            self._finish(req, FINISH_ABORT(error, status_code=400))
            return
        req.penalty = PenaltyState.for_request(params, req.origin_input_ids, self.vocab_size, self.device)
        # Never plan more output than the context window or the KV pool can hold.
        limit = min(self.context_len, self.max_total_num_tokens) - len(req.origin_input_ids)
        params.max_new_tokens = limit if params.max_new_tokens is None else min(params.max_new_tokens, limit)
        if params.max_new_tokens == 0:
            self._finish(req, FINISH_LENGTH(0))
            return
        self.waiting_queue.append(req)

    def _validate(self, req: Req) -> str | None:
        n = len(req.origin_input_ids)
        if n == 0:
            return "the prompt is empty"
        if n >= self.context_len:
            return f"the prompt has {n} tokens, but the context length is {self.context_len}"
        if n >= self.max_total_num_tokens:
            return f"the prompt has {n} tokens, more than the KV cache holds ({self.max_total_num_tokens} tokens)"
        if min(req.origin_input_ids) < 0 or max(req.origin_input_ids) >= self.vocab_size:
            return f"input_ids must be in [0, {self.vocab_size})"
        try:
            req.sampling_params.verify(self.vocab_size)
        except ValueError as e:
            return str(e)
        if req.sampling_params.stop and self.tokenizer is None:
            return "stop strings need a tokenizer; the server runs with --skip-tokenizer-init"
        return None

    def _next_seed(self) -> int:
        self._seed_counter += 1
        return self._seed_counter

    def abort_request(self, rid: str) -> None:
        for req in self.waiting_queue:
            if req.rid == rid:
                self.waiting_queue.remove(req)
                self._finish(req, FINISH_ABORT())
                return
        # No batch is in flight between steps, so running requests can be released right away.
        for req in self.running_reqs:
            if req.rid == rid:
                self.running_reqs.remove(req)
                self._release(req)
                self._finish(req, FINISH_ABORT())
                return
        if self.chunked_req is not None and self.chunked_req.rid == rid:
            req, self.chunked_req = self.chunked_req, None
            self._release(req)
            self._finish(req, FINISH_ABORT())
            return
        # A prefill in flight: its requests are in no list until its results are processed.
        for req in self.inflight.batch.reqs if self.inflight is not None else ():
            if req.rid == rid:
                req.to_abort = FINISH_ABORT()

    # -------------------------------------------------------------- stepping
    def is_idle(self) -> bool:
        return not self.waiting_queue and not self.running_reqs and self.chunked_req is None and self.inflight is None

    def step(self) -> list[ReqOutput]:
        """Run at most one model step (launch one, finish one with overlap); return the outputs
        produced since the last call."""
        if self.overlap:
            self._step_overlapped()
        else:
            batch = self.get_next_batch_to_run()
            if batch is not None:
                self.run_batch(batch)
            elif self.is_idle():
                self.check_memory()
        outputs, self.outbox = self.outbox, []
        return outputs

    def _step_overlapped(self) -> None:
        prev, self.inflight = self.inflight, None
        ahead = self._decode_ahead(prev) if prev is not None else None
        if ahead is not None:
            batch, input_ids = ahead
            self.inflight = self.launch_batch(batch, input_ids)
        if prev is not None:
            self.process_batch_result(prev)
        if self.inflight is not None and all(r.finished() for r in self.inflight.batch.reqs):
            # Everyone in the step launched ahead stopped in prev (EOS, stop, abort): drop it now, so
            # that the scheduler is idle (flush_cache, memory checks) as soon as the last output is out.
            self.process_batch_result(self.inflight)
            self.inflight = None
        if self.inflight is None:
            batch = self.get_next_batch_to_run()
            if batch is not None:
                self.inflight = self.launch_batch(batch)
            elif self.is_idle():
                self.check_memory()

    def _decode_ahead(self, prev: InflightStep) -> tuple[ScheduleBatch, torch.Tensor] | None:
        """The decode step after `prev` and its input ids (prev's samples, on the device), when it
        can be launched before prev's results are known: prev decoded, no prefill is due, and the
        slots fit without retracting."""
        if not prev.batch.forward_mode.is_decode() or self.waiting_queue or self.chunked_req is not None:
            return None
        # prev's token is the last one for requests at their length limit; aborted ones are gone.
        running = {id(r) for r in self.running_reqs}
        keep = [i for i, r in enumerate(prev.sample_reqs)
                if id(r) in running and len(r.output_ids) + 1 < r.sampling_params.max_new_tokens]  # fmt: skip
        if not keep or not self._can_alloc(len(keep)):
            return None
        ids = prev.sampled.next_token_ids
        if len(keep) < len(prev.sample_reqs):
            ids = ids[to_device(torch.tensor(keep), ids.device)]
        return self._decode_batch([prev.sample_reqs[i] for i in keep]), ids

    def get_next_batch_to_run(self) -> ScheduleBatch | None:
        batch = self.get_new_batch_prefill()
        if batch is not None:
            return self._mix_with_running(batch)
        if self.running_reqs:
            return self.prepare_decode_batch()
        return None

    def _mix_with_running(self, prefill: ScheduleBatch) -> ScheduleBatch:
        """--enable-mixed-chunk: the running requests' next decode tokens join the prefill step as
        one-token extends (the step costs about what the prefill alone does, and nobody waits a
        step). Skipped when the pool cannot hold both, or when the decode tokens would eat into the
        slots a chunked prompt's later chunks need (admission reserved those only against a prefill
        that no decode interrupts, and a chunk step cannot retract); the next step then runs the
        prefill alone and decodes follow, retracting as usual."""
        if not (self.server_args.enable_mixed_chunk and self.running_reqs):
            return prefill
        need = prefill.input_token_count() + len(self.running_reqs)
        chunked = self.chunked_req
        rest = chunked.seq_len - chunked.kv_len - chunked.extend_len if chunked is not None else 0
        full_free = self.allocator.available_size() + self.tree_cache.evictable_size()
        if not self._can_alloc(need) or full_free < need + rest:
            return prefill
        decode = self._decode_batch(list(self.running_reqs))
        return ScheduleBatch(prefill.reqs + decode.reqs, ForwardMode.EXTEND)

    def _prefill_budget(self, tokens: int | None) -> int | None:
        """A per-step token budget less what mixed-in decode tokens will take."""
        if tokens is None or tokens <= 0 or not (self.server_args.enable_mixed_chunk and self.running_reqs):
            return tokens
        return max(1, tokens - len(self.running_reqs))

    def get_new_batch_prefill(self) -> ScheduleBatch | None:
        if not self.waiting_queue and self.chunked_req is None:
            return None
        adder = PrefillAdder(
            self.tree_cache, self.allocator, self.req_to_token_pool, self.running_reqs, self.chunked_req,
            self.new_token_ratio, self._prefill_budget(self.max_prefill_tokens),
            self._prefill_budget(self.chunked_prefill_size), self.swa_policy,
        )
        if self.chunked_req is not None:
            adder.add_chunked_req(self.chunked_req)
        self.waiting_queue = order_waiting_queue(self.server_args.schedule_policy, self.waiting_queue, self.tree_cache)
        for req in self.waiting_queue:
            if len(self.running_reqs) + len(adder.can_run) >= self.max_running_requests:
                break
            self._match_prefix(req)
            result = adder.add_one_req(req)
            if result == AddReqResult.NO_TOKEN and self._alone(adder) and len(req.prefix_indices):
                # Locking its prefix can pin swa slots (earlier windows on the path) that a lone
                # request then lacks; without the prefix everything else is evictable, so it fits.
                self._drop_prefix(req)
                result = adder.add_one_req(req)
            if result != AddReqResult.CONTINUE:
                break
        if not adder.can_run:
            return None
        admitted = {id(r) for r in adder.can_run}
        self.waiting_queue = [r for r in self.waiting_queue if id(r) not in admitted]
        first = [r for r in adder.can_run if r.is_first_admission]
        for req in adder.can_run:
            self._admit(req)
        self.chunked_req = adder.new_chunked_req
        self.batch_log.prefill(
            len(adder.can_run), sum(r.extend_len for r in adder.can_run), sum(r.cached_tokens for r in first),
            self._token_usage(), len(self.running_reqs), len(self.waiting_queue),
        )  # fmt: skip
        return ScheduleBatch(adder.can_run, ForwardMode.EXTEND)

    def _match_prefix(self, req: Req) -> None:
        if req.req_pool_idx is not None:
            return  # a chunked request continues from its own KV
        # The last token is left out so at least one token is computed, giving the next logits; the
        # rows still to score prompt logprobs must be computed too.
        key = req.fill_ids[:-1]
        if req.input_logprob_next is not None:
            key = key[: max(req.input_logprob_next - 1, 0)]
        match = self.tree_cache.match(key)
        req.prefix_indices, req.prefix_swa, req.last_node = match.full, match.swa, match.node
        req.kv_len = len(req.prefix_indices)

    def _alone(self, adder: PrefillAdder) -> bool:
        return not adder.can_run and not self.running_reqs and self.chunked_req is None

    def _drop_prefix(self, req: Req) -> None:
        empty = torch.empty((0,), dtype=torch.int64)
        req.prefix_indices, req.last_node, req.kv_len = empty, self.tree_cache.root, 0
        req.prefix_swa = empty if self.swa_allocator is not None else None

    def _admit(self, req: Req) -> None:
        if req.req_pool_idx is not None:
            return
        req.req_pool_idx = self.req_to_token_pool.alloc()
        assert req.req_pool_idx is not None, "PrefillAdder admitted more requests than pool rows"
        n = len(req.prefix_indices)
        pool = self.req_to_token_pool
        if n:
            pool.req_to_token[req.req_pool_idx, :n] = req.prefix_indices.to(pool.req_to_token.device)
            if pool.req_to_swa_token is not None:
                pool.req_to_swa_token[req.req_pool_idx, :n] = req.prefix_swa.to(pool.req_to_swa_token.device)
        req.swa_freed_upto = n  # the request's own swa slots start after the tree's prefix
        if req.is_first_admission:
            req.is_first_admission = False
            req.cached_tokens = min(n, len(req.origin_input_ids))
            self.stats["cached_tokens_total"] += req.cached_tokens

    def prepare_decode_batch(self) -> ScheduleBatch | None:
        self.retract_until_fits()
        if not self.running_reqs:
            return None
        return self._decode_batch(list(self.running_reqs))

    def _decode_batch(self, reqs: list[Req]) -> ScheduleBatch:
        for req in reqs:
            req.extend_len = 1
        self.new_token_ratio = max(self.min_new_token_ratio, self.new_token_ratio - self.ratio_decay)
        return ScheduleBatch(reqs, ForwardMode.DECODE)

    def retract_until_fits(self) -> None:
        """Free KV for one decode step of every running request by sending the newest back to wait."""
        retracted = []
        while self.running_reqs and not self._can_alloc(len(self.running_reqs)):
            if len(self.running_reqs) == 1 and self.chunked_req is not None:
                victim, self.chunked_req = self.chunked_req, None
            elif len(self.running_reqs) > 1:
                victim = self.running_reqs.pop()
            else:
                # Unreachable while max_new_tokens is clipped to the pool size; fail the request, not the server.
                victim = self.running_reqs.pop()
                self._release(victim)
                self._finish(victim, FINISH_ABORT("the KV cache is too small for this request", status_code=500))
                continue
            self._release(victim)
            victim.reset_for_retract()
            retracted.append(victim)
        if retracted:
            self.stats["num_retractions"] += len(retracted)
            self.waiting_queue = retracted[::-1] + self.waiting_queue
            self.new_token_ratio = min(1.0, self.new_token_ratio + RETRACT_RATIO_BUMP)
            logger.info("KV cache full: retracted %d request(s); new_token_ratio=%.2f", len(retracted), self.new_token_ratio)

    def _can_alloc(self, n: int) -> bool:
        full_ok = self.allocator.available_size() + self.tree_cache.evictable_size() >= n
        if self.swa_allocator is None:
            return full_ok
        swa_free = self.swa_allocator.available_size() + self.tree_cache.swa_evictable_size() + self._swa_reclaimable()
        return full_ok and swa_free >= n

    def _swa_holders(self, extra: list[Req] = ()) -> list[Req]:
        """Requests holding a pool row: running, being chunked, or in the batch about to run (a
        request whose last chunk runs now is neither running nor chunked)."""
        holders = self.running_reqs + ([self.chunked_req] if self.chunked_req is not None else [])
        seen = {id(r) for r in holders}
        return holders + [r for r in extra if id(r) not in seen and r.req_pool_idx is not None]

    def _swa_reclaimable(self) -> int:
        return sum(self.swa_policy.reclaimable(r) for r in self._swa_holders())

    def _trim_swa(self, batch_reqs: list[Req]) -> int:
        """Free every holder's swa slots outside its window; returns how many."""
        releases = [rel for r in self._swa_holders(batch_reqs) if (rel := self.swa_policy.release(r)) is not None]
        freed = free_swa_outside_window(self.req_to_token_pool, self.swa_allocator, releases)
        self.stats["swa_reclaimed_total"] += freed
        return freed

    def _alloc_slots(self, n: int, batch_reqs: list[Req]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n full slots and, with the hybrid pool, n swa slots: reclaiming requests' out-of-window
        swa slots, then evicting cache entries, as needed."""
        if self.allocator.available_size() < n:
            self.tree_cache.evict(n - self.allocator.available_size())
        swa = self.swa_allocator
        if swa is not None and swa.available_size() < n:
            self._trim_swa(batch_reqs)
            if swa.available_size() < n:
                self.tree_cache.evict(0, n - swa.available_size())
        slots = self.allocator.alloc(n)
        swa_slots = swa.alloc(n) if swa is not None else None
        if slots is None or (swa is not None and swa_slots is None):
            raise RuntimeError(f"KV allocation of {n} slots failed after admission control; this is a scheduler bug")
        return slots, swa_slots

    def run_batch(self, batch: ScheduleBatch) -> None:
        self.process_batch_result(self.launch_batch(batch))

    def launch_batch(self, batch: ScheduleBatch, input_ids: torch.Tensor | None = None) -> InflightStep:
        """Allocate KV, run the model and sample, without reading anything back to the host.
        With `input_ids` (a decode launched ahead) every request samples."""
        batch.out_cache_loc, batch.swa_out_cache_loc = self._alloc_slots(batch.input_token_count(), batch.reqs)
        fb = batch.to_forward_batch(self.device, input_ids)
        write_req_to_token(fb, self.req_to_token_pool.req_to_token, self.req_to_token_pool.req_to_swa_token)
        sample_rows = [i for i, r in enumerate(batch.reqs) if input_ids is not None or r.is_prefill_done_after_step()]
        scored = prompt_logprobs.plan(batch.reqs) if batch.forward_mode.is_extend() else None
        if scored is not None:
            fb.logprob_rows, fb.logprob_targets = pack_to_device([scored.rows, scored.targets], self.device)
            fb.logprob_top_k = scored.top_k
        output = self.model_runner.forward(fb)
        if batch.forward_mode.is_extend():
            running = {id(r) for r in self.running_reqs}
            self.stats["prefill_computed_tokens_total"] += sum(r.extend_len for r in batch.reqs if id(r) not in running)
        batch.commit()
        self.stats["forward_steps"] += 1
        if batch.forward_mode.is_decode() and self.batch_log.count_decode():
            self.batch_log.decode(
                self.stats["generation_tokens_total"], len(batch.reqs), self.kv_used_tokens(), self._token_usage(),
                len(self.waiting_queue),
            )  # fmt: skip
        sample_reqs = [batch.reqs[i] for i in sample_rows]
        sampled = None
        if sample_reqs:
            logits = output.next_token_logits
            # Decode samples every row: indexing would copy the whole [B, vocab] logits.
            sampled = self._sample(sample_reqs, logits if len(sample_rows) == len(logits) else logits[sample_rows])
        return InflightStep(batch, sample_reqs, sampled, sampled.to_host_async() if sampled is not None else None,
                            (scored, output) if scored is not None else None)  # fmt: skip

    def process_batch_result(self, step: InflightStep) -> None:
        """Read a launched step's samples back, append them, and finish, keep or emit each request.
        Requests that finished meanwhile (a decode launched ahead of their last token, an abort)
        are skipped."""
        if step.prompt_logprobs is not None:
            prompt_logprobs.store(*step.prompt_logprobs)
        for req in step.batch.reqs:
            if req.to_abort is not None and not req.finished():
                self._release(req)
                self._finish(req, req.to_abort)
        live = [i for i, r in enumerate(step.sample_reqs) if not r.finished()]
        if live:
            self._append_tokens(step.sample_reqs, step.sampled_host, live)
        # Decoding requests are running already; a prefill's (also those mixed into one) join now.
        running = {id(r) for r in self.running_reqs}
        for req in (step.sample_reqs[i] for i in live):
            if req.finished():
                if id(req) in running:
                    self.running_reqs.remove(req)
                self._release(req)
            elif id(req) not in running:
                self.running_reqs.append(req)
            self._emit(req)

    def _sample(self, reqs: list[Req], logits: torch.Tensor) -> SamplerOutput:
        info = SamplingBatchInfo.from_reqs(reqs, logits.shape[-1], logits.device)
        want_logprob = any(r.return_logprob for r in reqs)
        top_n = max((r.top_logprobs_num for r in reqs if r.return_logprob), default=0)
        penalized = apply_penalties(logits, reqs, self.eos_ids)
        out = self.sampler(penalized, info, return_logprob=want_logprob, top_logprobs_num=top_n, raw_logits=logits)
        record_sampled(reqs, out.next_token_ids)
        return out

    def _append_tokens(self, reqs: list[Req], out: SamplerOutput, rows: list[int]) -> None:
        out.wait()
        ids = out.next_token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top_vals = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        top_ids = out.top_logprob_ids.tolist() if out.top_logprob_ids is not None else None
        for i in rows:
            req, token = reqs[i], ids[i]
            req.output_ids.append(token)
            self.stats["generation_tokens_total"] += 1
            if req.return_logprob:
                req.token_logprobs.append((logprobs[i], token))
                if req.top_logprobs_num:
                    k = req.top_logprobs_num
                    req.top_logprobs.append(list(zip(top_vals[i][:k], top_ids[i][:k])))
            req.check_finished(self.eos_ids, self._match_stop_str)

    def _match_stop_str(self, req: Req) -> str | None:
        stops = req.sampling_params.stop
        # Each token decodes to at least one character, so the tail this long covers any new match.
        tail = req.output_ids[-(max(len(s) for s in stops) + 1) :]
        text = self.tokenizer.decode(tail, skip_special_tokens=req.sampling_params.skip_special_tokens)
        return next((s for s in stops if s in text), None)

    # -------------------------------------------------------------- outputs and memory
    def _release(self, req: Req) -> None:
        if req.req_pool_idx is not None:
            self.tree_cache.cache_finished_req(req)

    def _finish(self, req: Req, reason) -> None:
        req.finished_reason = reason
        self._emit(req)

    def _emit(self, req: Req) -> None:
        if not (req.stream or req.finished()):
            return
        start = req.sent_len
        self.outbox.append(
            ReqOutput(
                rid=req.rid,
                new_token_ids=req.output_ids[start:],
                finished_reason=req.finished_reason.to_json() if req.finished() else None,
                prompt_tokens=len(req.origin_input_ids),
                completion_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens,
                token_logprobs=req.token_logprobs[start:],
                top_logprobs=req.top_logprobs[start:],
                input_token_logprobs=req.input_token_logprobs if start == 0 else [],
                input_top_logprobs=req.input_top_logprobs if start == 0 else [],
            )
        )
        req.sent_len = len(req.output_ids)

    def _token_usage(self) -> float:
        return self.kv_used_tokens() / self.max_total_num_tokens

    def kv_used_tokens(self) -> int:
        """Slots held by requests (not counting unlocked cache entries, which are reclaimable)."""
        return self.max_total_num_tokens - self.allocator.available_size() - self.tree_cache.evictable_size()

    def swa_used_tokens(self) -> int:
        """Swa slots held by requests (0 without the hybrid pool)."""
        if self.swa_allocator is None:
            return 0
        return self.swa_allocator.size - self.swa_allocator.available_size() - self.tree_cache.swa_evictable_size()

    def check_memory(self) -> bool:
        """When idle every slot (of both pools) is either free or in the tree; anything else is a leak."""
        leaked = self.kv_used_tokens() != 0 or self.tree_cache.protected_size() != 0
        leaked |= self.swa_used_tokens() != 0 or self.tree_cache.swa_protected_size() != 0
        if leaked:
            logger.error(
                "KV leak while idle: available=%d evictable=%d protected=%d total=%d swa_used=%d swa_protected=%d",
                self.allocator.available_size(), self.tree_cache.evictable_size(), self.tree_cache.protected_size(),
                self.max_total_num_tokens, self.swa_used_tokens(), self.tree_cache.swa_protected_size(),
            )
        return not leaked

    def flush_cache(self) -> FlushCacheReqOutput:
        if not self.is_idle():
            return FlushCacheReqOutput(False, "Cache not flushed: requests are still running or waiting.")
        self.tree_cache.reset()
        self.allocator.clear()
        if self.swa_allocator is not None:
            self.swa_allocator.clear()
        return FlushCacheReqOutput(True, "Cache flushed.")

    def _swa_state(self) -> dict:
        if self.swa_allocator is None:
            return {"hybrid_swa_memory": False}
        return {
            "hybrid_swa_memory": True,
            "sliding_window": self.sliding_window,
            "max_total_num_swa_tokens": self.swa_allocator.size,
            "swa_available_tokens": self.swa_allocator.available_size(),
            "swa_cached_tokens": self.tree_cache.swa_evictable_size() + self.tree_cache.swa_protected_size(),
            "swa_used_tokens": self.swa_used_tokens(),
            "swa_reclaimable_tokens": self._swa_reclaimable(),
        }

    def _num_running(self) -> int:
        """Requests holding KV: running, being chunked, or in a prefill in flight (in no list yet)."""
        held = {id(r) for r in self.running_reqs} | ({id(self.chunked_req)} if self.chunked_req is not None else set())
        in_flight = self.inflight.batch.reqs if self.inflight is not None else []
        return len(held) + sum(1 for r in in_flight if id(r) not in held and not r.finished())

    def internal_state(self) -> dict:
        used = self.kv_used_tokens()
        return {
            "num_running_reqs": self._num_running(),
            "num_waiting_reqs": len(self.waiting_queue),
            "max_total_num_tokens": self.max_total_num_tokens,
            "kv_available_tokens": self.allocator.available_size(),
            "kv_cached_tokens": self.tree_cache.total_size(),
            "kv_evictable_tokens": self.tree_cache.evictable_size(),
            "kv_used_tokens": used,
            "token_usage": used / self.max_total_num_tokens,
            "new_token_ratio": self.new_token_ratio,
            "memory_ok": self.check_memory() if self.is_idle() else None,
            "scheduler_pid": os.getpid(),
            **self._swa_state(),
            "gen_throughput": self.batch_log.gen_throughput,
            "cache_hit_rate": self.batch_log.cache_hit_rate,
            **self.stats,
            **self.info(),
        }

    # -------------------------------------------------------------- process loop
    def event_loop(self, recv_socket, send_socket, parent_pid: int | None) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(recv_socket, zmq.POLLIN)
        while True:
            timeout_ms = 1000 if self.is_idle() else 0
            while poller.poll(timeout_ms):
                reply = self.handle_request(recv_socket.recv_pyobj())
                if reply is not None:
                    send_socket.send_pyobj(reply)
                timeout_ms = 0
            outputs = self.step()
            if outputs:
                send_socket.send_pyobj(BatchTokenIDOut(outputs))
            if parent_pid is not None and self.is_idle() and os.getppid() != parent_pid:
                logger.info("parent process is gone; scheduler exits")
                return


@dataclass
class SchedulerPorts:
    scheduler_input: str  # the scheduler PULLs requests here
    tokenizer_input: str  # the TokenizerManager PULLs outputs here


def run_scheduler_process(server_args, ports: SchedulerPorts, ready_pipe, parent_pid: int) -> None:
    """Entry point of the scheduler child process."""
    import zmq

    from sglang.srt.utils import configure_logger

    configure_logger(server_args.log_level, prefix=" scheduler")
    # Ctrl-C reaches the whole process group; the parent decides when we stop (it sends SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    recv_socket = ctx.socket(zmq.PULL)
    recv_socket.bind(ports.scheduler_input)
    send_socket = ctx.socket(zmq.PUSH)
    send_socket.setsockopt(zmq.LINGER, 2000)
    send_socket.connect(ports.tokenizer_input)
    try:
        torch.manual_seed(server_args.random_seed)
        scheduler = Scheduler(server_args)
        scheduler.warmup()
        ready_pipe.send({"status": "ready", **scheduler.info()})
    except Exception as e:
        logger.error("scheduler failed to start:\n%s", traceback.format_exc())
        ready_pipe.send({"status": "error", "message": f"{type(e).__name__}: {e}"})
        sys.exit(1)
    try:
        scheduler.event_loop(recv_socket, send_socket, parent_pid)
    except Exception as e:
        logger.error("scheduler crashed:\n%s", traceback.format_exc())
        try:
            send_socket.send_pyobj(SchedulerCrashed(f"scheduler crashed: {type(e).__name__}: {e}"), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        time.sleep(0.2)  # let the crash notice leave before the socket dies with us
        os._exit(1)
