"""A request's life inside the scheduler (Req) and one model step over several requests (ScheduleBatch).

KV bookkeeping invariant: `req.kv_len` tokens of `req.fill_ids` have KV in the pool, and
`req_to_token[req.req_pool_idx, :kv_len]` lists their slots. The first `len(req.prefix_indices)` of
those slots belong to the radix tree (locked via `req.last_node`); the rest are the request's own. A
decoding request always has kv_len == len(fill_ids) - 1: the newest sampled token gets its KV in the
next step, when it is the input.

Hybrid sliding-window pool: `req_to_swa_token[row, :kv_len]` lists the swa slots of the same tokens.
The request's own swa slots of positions in [len(prefix_indices), swa_freed_upto) were freed (table
entries 0) because no later query reads them; the prefix's swa slots belong to the tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import torch

from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.utils import to_device

_EMPTY = torch.empty((0,), dtype=torch.int64)


# ------------------------------------------------------------------ finish reasons


@dataclass
class FinishReason:
    def to_json(self) -> dict:
        raise NotImplementedError


@dataclass
class FINISH_MATCHED_TOKEN(FinishReason):
    matched: int

    def to_json(self) -> dict:
        return {"type": "stop", "matched": self.matched}


@dataclass
class FINISH_MATCHED_STR(FinishReason):
    matched: str

    def to_json(self) -> dict:
        return {"type": "stop", "matched": self.matched}


@dataclass
class FINISH_LENGTH(FinishReason):
    length: int

    def to_json(self) -> dict:
        return {"type": "length", "length": self.length}


@dataclass
class FINISH_ABORT(FinishReason):
    message: str = "aborted"
    status_code: int | None = None  # set when the abort is the client's fault (e.g. 400)

    def to_json(self) -> dict:
        return {"type": "abort", "message": self.message, "status_code": self.status_code}


# ------------------------------------------------------------------ request


class Req:
    def __init__(
        self,
        rid: str,
        input_ids: list[int],
        sampling_params: SamplingParams,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        seed: int = 0,
        logprob_start_len: int = -1,
    ):
        self.rid = rid
        self.origin_input_ids = list(input_ids)
        self.output_ids: list[int] = []
        self.sampling_params = sampling_params
        self.stream = stream
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        # Own generator: a seeded request samples identically whatever batch it lands in.
        self.generator = torch.Generator().manual_seed(sampling_params.seed if sampling_params.seed is not None else seed)
        self.penalty = None  # sampling/penalizer.PenaltyState when the request has penalties

        # Memory
        self.req_pool_idx: int | None = None
        self.prefix_indices: torch.Tensor = _EMPTY  # slots of the radix-tree prefix this req holds
        self.prefix_swa: torch.Tensor | None = None  # hybrid pool: the prefix's swa slots (0 = tombstone)
        self.last_node = None  # radix node locked for that prefix
        self.kv_len = 0
        self.extend_len = 0  # new tokens in the current step
        # Hybrid pool: positions below this (and >= len(prefix_indices)) had their swa slots freed.
        self.swa_freed_upto = 0
        self.cached_tokens = 0  # prompt tokens served from the prefix cache (first admission)
        self.is_first_admission = True
        self.retractions = 0

        # Output
        self.finished_reason: FinishReason | None = None
        self.to_abort: FinishReason | None = None
        self.sent_len = 0  # output tokens already reported to the TokenizerManager
        self.token_logprobs: list[tuple[float, int]] = []
        self.top_logprobs: list[list[tuple[float, int]]] = []
        # Prompt logprobs from logprob_start_len on (managers/prompt_logprobs.py); position 0 has none.
        self.input_token_logprobs: list[tuple[float | None, int]] = []
        self.input_top_logprobs: list[list[tuple[float, int]] | None] = []
        self.input_logprob_next: int | None = None  # the next prompt position still to score
        if return_logprob and logprob_start_len >= 0:
            if logprob_start_len == 0:
                self.input_token_logprobs.append((None, self.origin_input_ids[0]))
                if top_logprobs_num:
                    self.input_top_logprobs.append(None)
            first = max(logprob_start_len, 1)
            self.input_logprob_next = first if first < len(self.origin_input_ids) else None

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    def fill_slice(self, lo: int, hi: int) -> list[int]:
        """fill_ids[lo:hi] without building fill_ids (a copy of the whole sequence per step)."""
        n = len(self.origin_input_ids)
        if hi <= n:
            return self.origin_input_ids[lo:hi]
        if lo >= n:
            return self.output_ids[lo - n : hi - n]
        return self.origin_input_ids[lo:] + self.output_ids[: hi - n]

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def finished(self) -> bool:
        return self.finished_reason is not None

    def is_prefill_done_after_step(self) -> bool:
        """Whether this step computes the last missing token, so its logits give the next token."""
        return self.kv_len + self.extend_len == self.seq_len

    def check_finished(self, eos_ids: set[int], stop_checker=None) -> None:
        """Set finished_reason after a token was appended."""
        params, last = self.sampling_params, self.output_ids[-1]
        if len(self.output_ids) < params.min_new_tokens:
            return  # min_new_tokens <= max_new_tokens; EOS and stop ids were masked before sampling
        if not params.ignore_eos and last in eos_ids:
            self.finished_reason = FINISH_MATCHED_TOKEN(last)
        elif last in params.stop_token_ids:
            self.finished_reason = FINISH_MATCHED_TOKEN(last)
        elif params.stop and stop_checker is not None and (s := stop_checker(self)) is not None:
            self.finished_reason = FINISH_MATCHED_STR(s)
        elif len(self.output_ids) >= params.max_new_tokens:
            self.finished_reason = FINISH_LENGTH(params.max_new_tokens)

    def reset_for_retract(self) -> None:
        self.kv_len = 0
        self.extend_len = 0
        self.retractions += 1

    def __repr__(self) -> str:
        return f"Req(rid={self.rid}, in={len(self.origin_input_ids)}, out={len(self.output_ids)}, kv={self.kv_len})"


# ------------------------------------------------------------------ batch


@dataclass
class ScheduleBatch:
    """The requests of one model step and the tensors the ModelRunner needs for it."""

    reqs: list[Req]
    forward_mode: ForwardMode
    out_cache_loc: torch.Tensor = field(default_factory=lambda: _EMPTY)
    swa_out_cache_loc: torch.Tensor | None = None  # hybrid pool: each new token's swa slot

    @property
    def batch_size(self) -> int:
        return len(self.reqs)

    def input_token_count(self) -> int:
        return sum(r.extend_len for r in self.reqs)

    def to_forward_batch(self, device: str | torch.device, input_ids: torch.Tensor | None = None) -> ForwardBatch:
        """`input_ids` (on `device`) replaces the host token ids: the overlapped scheduler launches a
        decode step whose inputs are the previous step's samples, not yet read back."""
        host_ids, positions = [], []
        for r in self.reqs:
            if input_ids is None:
                host_ids.extend(r.fill_slice(r.kv_len, r.kv_len + r.extend_len))
            positions.extend(range(r.kv_len, r.kv_len + r.extend_len))
        seq_lens = [r.kv_len + r.extend_len for r in self.reqs]
        extend_lens = [r.extend_len for r in self.reqs]
        rows = [r.req_pool_idx for r in self.reqs]
        ids_t, positions_t, rows_t, seq_lens_t, extend_lens_t = pack_to_device(
            [host_ids, positions, rows, seq_lens, extend_lens], device
        )
        return ForwardBatch(
            forward_mode=self.forward_mode,
            input_ids=ids_t if input_ids is None else input_ids,
            positions=positions_t,
            req_pool_indices=rows_t,
            seq_lens=seq_lens_t,
            extend_seq_lens=extend_lens_t,
            out_cache_loc=self.out_cache_loc.to(device),
            swa_out_cache_loc=None if self.swa_out_cache_loc is None else self.swa_out_cache_loc.to(device),
            seq_lens_cpu=seq_lens,
            extend_seq_lens_cpu=extend_lens,
        )

    def commit(self) -> None:
        """After the forward: the new tokens' KV is now in the pool."""
        for r in self.reqs:
            r.kv_len += r.extend_len
            r.extend_len = 0


def pack_to_device(lists: list[list[int]], device: str | torch.device) -> list[torch.Tensor]:
    """int64 tensors of `lists` on `device` through one host-to-device copy. Each starts on a 16-byte
    boundary of the shared buffer, as a tensor of its own would: Triton compiles a kernel variant per
    pointer alignment, so slices whose alignment followed the token count made the first prefill of
    an odd length (or of a prefix hit) compile attention kernels for seconds while serving."""
    padded = [values + [0] * (len(values) % 2) for values in lists]
    packed = to_device(torch.tensor(list(chain.from_iterable(padded)), dtype=torch.int64), device)
    chunks = packed.split([len(values) for values in padded])
    return [chunk[: len(values)] for chunk, values in zip(chunks, lists)]


def write_req_to_token(fb: ForwardBatch, req_to_token: torch.Tensor, req_to_swa_token: torch.Tensor | None = None) -> None:
    """Record each new token's slot (and swa slot) in its request's row, before the forward reads it.
    A new token's column is its position. One scatter per table: an assignment per request would
    cost a kernel launch each."""
    rows = fb.req_pool_indices.repeat_interleave(fb.extend_seq_lens, output_size=fb.positions.numel())
    req_to_token[rows, fb.positions] = fb.out_cache_loc
    if req_to_swa_token is not None:
        req_to_swa_token[rows, fb.positions] = fb.swa_out_cache_loc
