"""What one model step needs to know: the flat tokens of every request in the step and where their
KV lives. Built by the scheduler, consumed by ModelRunner, the attention backend and the model.

With the hybrid sliding-window pool, every new token has two slots: `out_cache_loc` (full layers) and
`swa_out_cache_loc` (sliding layers). Backends ask `cache_loc(layer)` / `req_to_token(layer)` rather
than reading the fields, so the choice of slot space lives in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch


class ForwardMode(IntEnum):
    EXTEND = 1  # prefill, or a chunk of it, on top of an already cached prefix
    DECODE = 2  # one new token per request

    def is_extend(self) -> bool:
        return self == ForwardMode.EXTEND

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64, new tokens of all requests, request after request
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    req_pool_indices: torch.Tensor  # [B] int64, row of each request in ReqToTokenPool
    seq_lens: torch.Tensor  # [B] int64, tokens with KV after this step (prefix + new)
    extend_seq_lens: torch.Tensor  # [B] int64, new tokens per request (1 when decoding)
    out_cache_loc: torch.Tensor  # [T] int64, KV slot each new token writes
    # [T] int64, swa slot of each new token on sliding layers; None when the pool has one slot space.
    swa_out_cache_loc: torch.Tensor | None = None
    # When set, logits for every new token come back (tests); else the last only.
    return_all_logits: bool = False
    # Prompt logprobs: rows of the new tokens whose next token's logprob is wanted, those next tokens,
    # and how many top alternatives (the LM head runs on these rows only, a slice at a time).
    logprob_rows: torch.Tensor | None = None
    logprob_targets: torch.Tensor | None = None
    logprob_top_k: int = 0
    # Host copies, so attention metadata needs no device sync.
    seq_lens_cpu: list[int] = field(default_factory=list)
    extend_seq_lens_cpu: list[int] = field(default_factory=list)
    # Filled in by ModelRunner before the model runs.
    attn_backend: Any = None
    req_to_token_pool: Any = None
    token_to_kv_pool: Any = None

    def __post_init__(self):
        if not self.seq_lens_cpu:
            self.seq_lens_cpu = self.seq_lens.tolist()
        if not self.extend_seq_lens_cpu:
            self.extend_seq_lens_cpu = self.extend_seq_lens.tolist()

    def uses_swa(self, layer) -> bool:
        return self.swa_out_cache_loc is not None and layer.sliding_window is not None

    def cache_loc(self, layer) -> torch.Tensor:
        """Where this step's k/v of `layer` are written."""
        return self.swa_out_cache_loc if self.uses_swa(layer) else self.out_cache_loc

    def req_to_token(self, layer) -> torch.Tensor:
        """The (row, position) -> slot table `layer` reads its keys through."""
        return self.req_to_token_pool.table(self.uses_swa(layer))

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def extend_prefix_lens_cpu(self) -> list[int]:
        return [s - e for s, e in zip(self.seq_lens_cpu, self.extend_seq_lens_cpu)]


@dataclass
class LogitsProcessorOutput:
    next_token_logits: torch.Tensor  # [B, V] fp32, last new token of each request
    all_logits: torch.Tensor | None = None  # [T, V] fp32 when ForwardBatch.return_all_logits
    # For ForwardBatch.logprob_rows [R]: the targets' logprobs [R] and the top-k [R, k] (values, ids).
    input_logprobs: torch.Tensor | None = None
    input_top_logprobs: torch.Tensor | None = None
    input_top_ids: torch.Tensor | None = None
