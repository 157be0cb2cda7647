"""Turn next-token logits into token ids (and logprobs) for a whole batch at once.

Sampling is inverse-CDF over the filtered distribution with one uniform per request, drawn by the
request's own generator (see SamplingBatchInfo), which keeps seeded requests reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] fp32, log p(chosen token) under the raw model distribution
    top_logprobs: torch.Tensor | None = None  # [B, K] fp32
    top_logprob_ids: torch.Tensor | None = None  # [B, K] int64
    copied: torch.cuda.Event | None = None  # set by to_host_async: the host copies are valid once it fires

    def to_host_async(self) -> "SamplerOutput":
        """These results copied into pinned host memory without waiting for them; call `wait()`
        before reading. The overlapped scheduler copies right after sampling: a copy requested
        later would queue behind the next step, launched meanwhile on the same stream."""
        if self.next_token_ids.device.type != "cuda":
            return self

        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        event = torch.cuda.Event()
        out = SamplerOutput(*(copy(t) for t in (self.next_token_ids, self.logprobs, self.top_logprobs, self.top_logprob_ids)), copied=event)
        event.record()
        return out

    def wait(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        info: SamplingBatchInfo,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        raw_logits: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Samples from `logits`; logprobs come from `raw_logits` when given (the logits before
        penalties), else from `logits`."""
        logits = logits.float()
        greedy_ids = logits.argmax(dim=-1)
        if info.all_greedy:
            ids = greedy_ids
        else:
            ids = torch.where(info.is_greedy, greedy_ids, self._sample(logits, info))
        out = SamplerOutput(next_token_ids=ids)
        if return_logprob:
            # Logprobs describe the model's distribution, not the temperature-scaled one (OpenAI's meaning).
            logprobs = torch.log_softmax(logits if raw_logits is None else raw_logits.float(), dim=-1)
            out.logprobs = logprobs.gather(1, ids[:, None]).squeeze(1)
            if top_logprobs_num > 0:
                out.top_logprobs, out.top_logprob_ids = logprobs.topk(top_logprobs_num, dim=-1)
        return out

    @staticmethod
    def _sample(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        probs = torch.softmax(logits / info.temperatures, dim=-1)
        sorted_p, sorted_ids = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=probs.device)
        # The most likely token always survives each cut, so no row is ever left empty.
        drop = rank[None, :] >= info.top_ks[:, None]
        drop |= (sorted_p.cumsum(dim=-1) - sorted_p) > info.top_ps[:, None]
        drop |= sorted_p < info.min_ps[:, None] * sorted_p[:, :1]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        cdf = sorted_p.cumsum(dim=-1)
        target = (info.uniforms * cdf[:, -1]).unsqueeze(1)
        pos = torch.searchsorted(cdf, target, right=True)
        # Rounding can put the target at the very top of the cdf; stay on a surviving token.
        pos = torch.minimum(pos, (~drop).sum(dim=-1, keepdim=True) - 1)
        return sorted_ids.gather(1, pos).squeeze(1)
