"""Messages between the TokenizerManager (main process) and the Scheduler (child process).

Plain dataclasses pickled over ZMQ. The user-facing `GenerateReqInput` lives here too because the
HTTP server and the Engine both hand it to the TokenizerManager.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.sampling.sampling_params import SamplingParams

# ------------------------------------------------------------------ user input


@dataclass
class GenerateReqInput:
    """One prompt or a batch of prompts, as text or token ids (exactly one of the two)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    top_logprobs_num: int | list[int] = 0
    # With return_logprob: also the prompt's logprobs from this position on (SGLang's; -1: none).
    logprob_start_len: int | list[int] = -1

    def __post_init__(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if self.text is not None:
            self.is_single = isinstance(self.text, str)
        else:
            self.is_single = not self.input_ids or not isinstance(self.input_ids[0], list)
        self.batch_size = 1 if self.is_single else len(self.text if self.text is not None else self.input_ids)
        if not self.is_single and self.batch_size == 0:
            raise ValueError("the batch of prompts is empty")

    def __getitem__(self, i: int) -> "GenerateReqInput":
        """The i-th request of a batch as a single request."""
        if self.is_single:
            return self
        pick = lambda v: v[i] if isinstance(v, list) else v  # noqa: E731 - broadcast scalars
        return GenerateReqInput(
            text=self.text[i] if self.text is not None else None,
            input_ids=self.input_ids[i] if self.input_ids is not None else None,
            sampling_params=pick(self.sampling_params),
            rid=self.rid[i] if isinstance(self.rid, list) else None,
            stream=self.stream,
            return_logprob=pick(self.return_logprob),
            top_logprobs_num=pick(self.top_logprobs_num),
            logprob_start_len=pick(self.logprob_start_len),
        )


def new_rid() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------ to the scheduler


@dataclass
class TokenizedGenerateReqInput:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # prompt logprobs from this position on; -1: none


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    pass


@dataclass
class GetInternalStateReq:
    pass


# ------------------------------------------------------------------ from the scheduler


@dataclass
class ReqOutput:
    """New tokens of one request since its previous ReqOutput."""

    rid: str
    new_token_ids: list[int]
    finished_reason: dict | None  # {"type": "stop"|"length"|"abort", ...} once finished
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # (logprob, token_id) per new token and the top alternatives, when requested
    token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    # The prompt's, from logprob_start_len on (the first prompt token's is None), in the first output.
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)


@dataclass
class BatchTokenIDOut:
    outputs: list[ReqOutput]


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""


@dataclass
class GetInternalStateReqOutput:
    state: dict[str, Any]


@dataclass
class SchedulerCrashed:
    """Sent once, best effort, when the scheduler loop dies; the process then exits non-zero."""

    message: str
