"""Repetition, frequency and presence penalties, logit_bias and min_new_tokens, applied to a batch's
logits before sampling, with vLLM's and OpenAI's meanings, in this order:

    logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r    for t in the prompt or the output
    logits[t] -= frequency * count(t in output) + presence * (t in output)
    logits[t] += logit_bias[t]
    logits[eos and stop ids] = -inf                                    while fewer than min_new_tokens

A request's output counts live on the device and are updated from the sampled ids there, never read
back: with overlapped scheduling the next step is launched before the host has seen this step's
token. Requests without any of these knobs cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PenaltyState:
    counts: torch.Tensor  # [V] int32: how often each token was sampled
    in_prompt: torch.Tensor | None  # [V] bool, only with a repetition penalty
    bias: torch.Tensor | None  # [V] fp32, only with a logit_bias
    sampled: int = 0  # tokens sampled so far (launched; not necessarily read back yet)

    @classmethod
    def for_request(cls, params, prompt_ids: list[int], vocab_size: int, device) -> PenaltyState | None:
        if not params.adjusts_logits:
            return None
        in_prompt = bias = None
        if params.repetition_penalty != 1.0:
            in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            in_prompt[torch.tensor(prompt_ids, device=device)] = True
        if params.logit_bias:
            bias = torch.zeros(vocab_size, dtype=torch.float32)
            bias[[int(t) for t in params.logit_bias]] = torch.tensor([float(b) for b in params.logit_bias.values()])
            bias = bias.to(device)
        return cls(torch.zeros(vocab_size, dtype=torch.int32, device=device), in_prompt, bias)


def apply_penalties(logits: torch.Tensor, reqs: list, stop_ids: set[int]) -> torch.Tensor:
    """The logits to sample from ([B, V], row i for reqs[i]); the input itself when no request has
    penalties, else a copy (the raw logits stay for logprobs)."""
    rows = [i for i, r in enumerate(reqs) if r.penalty is not None]
    if not rows:
        return logits
    logits = logits.float().clone()
    device = logits.device
    params = [reqs[i].sampling_params for i in rows]
    index = torch.tensor(rows, device=device)
    sub = logits[index]
    counts = torch.stack([reqs[i].penalty.counts for i in rows]).float()
    knobs = torch.tensor([[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params], device=device)
    rep, freq, pres = (knobs[:, j : j + 1] for j in range(3))
    seen = counts > 0
    for j, i in enumerate(rows):
        if reqs[i].penalty.in_prompt is not None:
            seen[j] |= reqs[i].penalty.in_prompt
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0)
    for j, i in enumerate(rows):
        req = reqs[i]
        if req.penalty.bias is not None:
            sub[j] += req.penalty.bias
        if req.penalty.sampled < req.sampling_params.min_new_tokens:
            banned = set(req.sampling_params.stop_token_ids) | (set() if req.sampling_params.ignore_eos else stop_ids)
            if banned:
                sub[j, torch.tensor(sorted(banned), device=device)] = float("-inf")
    logits[index] = sub
    return logits


def record_sampled(reqs: list, ids: torch.Tensor) -> None:
    """Count each penalized request's sampled token (ids [B] on the device, row i for reqs[i])."""
    for i, req in enumerate(reqs):
        if req.penalty is not None:
            req.penalty.counts.index_add_(0, ids[i : i + 1], torch.ones(1, dtype=torch.int32, device=ids.device))
            req.penalty.sampled += 1
