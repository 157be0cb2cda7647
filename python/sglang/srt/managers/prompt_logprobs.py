"""Prompt logprobs (SGLang's `logprob_start_len`): which rows of an extend step score the prompt
tokens a request still wants, and where their results go.

Row q of a request's new tokens holds the logits that predict its token q + 1, so prompt position p
is scored by row p - 1 (position 0 has no logprob: None). The plan is made when the step is launched
and advances `input_logprob_next` at once, because the overlapped scheduler may launch the next chunk
of the same prompt before this step's results are read; `store` appends them later, in step order.
The prefix cache may not cover the rows still to score (Scheduler._match_prefix stops short of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sglang.srt.managers.schedule_batch import Req


@dataclass
class PromptLogprobPlan:
    positions: list[tuple[Req, list[int]]] = field(default_factory=list)  # per request, the positions scored
    rows: list[int] = field(default_factory=list)  # into the step's new tokens
    targets: list[int] = field(default_factory=list)  # the token each row scores
    top_k: int = 0


def plan(reqs: list[Req]) -> PromptLogprobPlan | None:
    """The rows of an extend step (requests in batch order, kv_len/extend_len not yet committed)."""
    out, offset = PromptLogprobPlan(), 0
    for r in reqs:
        nxt, length = r.input_logprob_next, len(r.origin_input_ids)
        if nxt is not None:
            lo, hi = max(nxt - 1, r.kv_len), min(length - 2, r.kv_len + r.extend_len - 1)
            if lo <= hi:
                positions = list(range(lo + 1, hi + 2))
                out.positions.append((r, positions))
                out.rows += [offset + q - r.kv_len for q in range(lo, hi + 1)]
                out.targets += [r.origin_input_ids[p] for p in positions]
                out.top_k = max(out.top_k, r.top_logprobs_num)
                r.input_logprob_next = hi + 2 if hi + 2 < length else None
        offset += r.extend_len
    return out if out.rows else None


def store(p: PromptLogprobPlan, output) -> None:
    """Append the step's results (a LogitsProcessorOutput) to each planned request."""
    lps = output.input_logprobs.tolist()
    top_vals = output.input_top_logprobs.tolist() if output.input_top_logprobs is not None else None
    top_ids = output.input_top_ids.tolist() if output.input_top_ids is not None else None
    k = 0
    for req, positions in p.positions:
        for pos in positions:
            req.input_token_logprobs.append((lps[k], req.origin_input_ids[pos]))
            if req.top_logprobs_num:
                n = req.top_logprobs_num
                req.input_top_logprobs.append(list(zip(top_vals[k][:n], top_ids[k][:n])))
            k += 1
