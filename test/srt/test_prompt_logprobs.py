"""Prompt logprobs (logprob_start_len) through the real Scheduler with a fake model, in both
scheduling modes: every prompt position from the start scored exactly once, from the right row, across
prefill chunks, prefix-cache hits and retraction (the real model's values: test_server_compat.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FakeModelRunner, reference_continuation
from test_scheduler import make_scheduler, prompt, run_to_completion

from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.sampling.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap_mode")

VOCAB = 97
# The fake model's logits are +20 on its next token and -20 elsewhere.
LSE = 20 + math.log1p((VOCAB - 1) * math.exp(-40))


class ScoringRunner(FakeModelRunner):
    """FakeModelRunner that also scores the rows the scheduler asks for, each from the tokens its
    request has in the KV up to that row's position (so a wrong row or target changes the value)."""

    def forward(self, fb):
        out = super().forward(fb)
        if fb.logprob_rows is not None:
            starts = [0]
            for n in fb.extend_seq_lens_cpu:
                starts.append(starts[-1] + n)
            values = []
            for row, target in zip(fb.logprob_rows.tolist(), fb.logprob_targets.tolist()):
                i = max(j for j in range(len(starts) - 1) if starts[j] <= row)
                pos = int(fb.positions[row])
                slots = self.req_to_token_pool.req_to_token[int(fb.req_pool_indices[i]), : pos + 1]
                predicted = self.next_token(self.kv[slots][:, 0].tolist(), VOCAB)
                values.append((20.0 if target == predicted else -20.0) - LSE)
            out.input_logprobs = torch.tensor(values)
        return out


def expected(ids: list[int], start: int) -> list[float | None]:
    out = [None] if start == 0 else []
    return out + [(20.0 if ids[p] == FakeModelRunner.next_token(ids[:p], VOCAB) else -20.0) - LSE for p in range(max(start, 1), len(ids))]


def submit(s, rid: str, ids: list[int], start: int, max_new: int = 4) -> None:
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    s.add_request(TokenizedGenerateReqInput(rid, ids, params, return_logprob=True, logprob_start_len=start))


def scheduler(**kw):
    s = make_scheduler(**kw)
    s.model_runner.__class__ = ScoringRunner
    return s


def test_chunked_prompts_are_scored_once_from_the_start():
    s = scheduler(chunked_prefill_size=16)
    base = prompt(1, 30)
    ids = base + reference_continuation(base, 20)  # the model's own continuation scores ~0, the rest -40
    for start in (0, 7, 35):
        submit(s, f"s{start}", ids, start)
    res = run_to_completion(s)
    for start in (0, 7, 35):
        pairs = res[f"s{start}"]["last"].input_token_logprobs
        assert [t for _, t in pairs] == ids[start:]
        got, want = [lp for lp, _ in pairs], expected(ids, start)
        if start == 0:
            assert got[0] is None
            got, want = got[1:], want[1:]
        assert got == pytest.approx(want, abs=1e-4)
        if start < len(base):  # both parts scored, and they really score apart
            assert max(got) > -1 and min(got) < -30


def test_prefix_cache_stops_short_of_the_scored_rows():
    s = scheduler()
    ids = prompt(2, 40)
    submit(s, "first", ids, -1)
    run_to_completion(s)
    submit(s, "again", ids, 25)
    out = run_to_completion(s)["again"]["last"]
    assert 0 < out.cached_tokens <= 24
    assert [lp for lp, _ in out.input_token_logprobs] == pytest.approx(expected(ids, 25), abs=1e-4)


def test_retracted_requests_are_not_scored_twice():
    s = scheduler(runner_kw={"max_total_tokens": 128}, schedule_conservativeness=0.3)
    for i in range(10):
        submit(s, f"r{i}", prompt(i), 0, max_new=30)
    res = run_to_completion(s)
    assert s.stats["num_retractions"] > 0
    for i in range(10):
        out = res[f"r{i}"]
        assert out["ids"] == reference_continuation(prompt(i), 30)
        got = [lp for lp, _ in out["last"].input_token_logprobs]
        assert len(got) == len(prompt(i)) and got[0] is None
        assert got[1:] == pytest.approx(expected(prompt(i), 0)[1:], abs=1e-4)


def test_the_lm_head_runs_a_slice_of_rows_at_a_time_with_the_same_result():
    from types import SimpleNamespace

    from sglang.srt.models.gemma4_causal import Gemma4ForCausalLM

    gen = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(10, 8, generator=gen), torch.randn(8, VOCAB, generator=gen)
    model = SimpleNamespace(compute_logits=lambda h: h @ head)
    fb = SimpleNamespace(logprob_rows=torch.tensor([0, 2, 3, 5, 6, 9, 1]), logprob_targets=torch.tensor([4, 8, 15, 16, 23, 42, 7]),
                         logprob_top_k=3)  # fmt: skip
    full = torch.log_softmax(hidden[fb.logprob_rows] @ head, dim=-1)
    for rows_per_slice in (2, 3, 256):
        out = Gemma4ForCausalLM._prompt_logprobs(model, hidden, fb, rows_per_slice=rows_per_slice)
        assert torch.allclose(out["input_logprobs"], full.gather(1, fb.logprob_targets[:, None]).squeeze(1))
        assert torch.allclose(out["input_top_logprobs"], full.topk(3).values)
        assert torch.equal(out["input_top_ids"], full.topk(3).indices)
