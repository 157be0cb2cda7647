"""Repetition, frequency and presence penalties and min_new_tokens (sampling/penalizer.py): against a
plain-Python oracle of their definitions, through the real Scheduler in both scheduling modes (the
counts live on the device and must see every token, including those of a step launched ahead)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FakeModelRunner
from test_scheduler import make_args, run_to_completion

from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.sampling.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap_mode")

VOCAB = 40
EOS = 1


def base_logits(vocab: int = VOCAB) -> list[float]:
    """The same logits every step: a slope, so penalties decide which token comes next."""
    return [3.0 - 0.25 * t if t != EOS else -5.0 for t in range(vocab)]


class FixedLogitsRunner(FakeModelRunner):
    """FakeModelRunner (real KV bookkeeping) whose logits are `base_logits` plus `boost` on
    selected tokens, the same at every step."""

    def __init__(self, boost: dict[int, float] | None = None):
        super().__init__(vocab_size=VOCAB, eos=EOS)
        self.row = torch.tensor(base_logits())
        for t, b in (boost or {}).items():
            self.row[t] += b

    def forward(self, fb):
        out = super().forward(fb)
        out.next_token_logits = self.row.repeat(fb.batch_size, 1)
        return out


def oracle(prompt: list[int], steps: int, rep: float = 1.0, freq: float = 0.0, pres: float = 0.0,
           bias: dict[int, float] | None = None, boost: dict[int, float] | None = None) -> list[int]:  # fmt: skip
    """Greedy tokens under the penalties' definitions, computed element by element."""
    row = base_logits()
    for t, b in (boost or {}).items():
        row[t] += b
    out: list[int] = []
    for _ in range(steps):
        scores = []
        for t, x in enumerate(row):
            n = out.count(t)
            if n or t in prompt:
                x = x / rep if x > 0 else x * rep
            scores.append(x - freq * n - pres * (n > 0) + (bias or {}).get(t, 0.0))
        out.append(max(range(len(scores)), key=lambda t: (scores[t], -t)))
    return out


def run(reqs: list[tuple[str, list[int], dict]], boost=None) -> dict[str, dict]:
    s = Scheduler(make_args(), model_runner=FixedLogitsRunner(boost))
    for rid, prompt, params in reqs:
        s.add_request(TokenizedGenerateReqInput(rid, prompt, SamplingParams(temperature=0, **params)))
    return run_to_completion(s)


@pytest.mark.parametrize(
    "knobs",
    [dict(freq=0.6), dict(pres=0.9), dict(rep=1.8), dict(rep=1.3, freq=0.3, pres=0.2, bias={5: 0.7, 0: -1.2}),
     dict(freq=-0.5), dict(bias={0: -100, 11: 4.5})],
    ids=["frequency", "presence", "repetition", "all", "negative-frequency", "logit-bias"],
)  # fmt: skip
def test_greedy_tokens_follow_the_penalty_definitions(knobs):
    prompt = [2, 3, 9, 9]
    params = dict(max_new_tokens=12, repetition_penalty=knobs.get("rep", 1.0), frequency_penalty=knobs.get("freq", 0.0),
                  presence_penalty=knobs.get("pres", 0.0), logit_bias={str(t): b for t, b in knobs.get("bias", {}).items()})  # fmt: skip
    out = run([("p", prompt, params), ("plain", prompt, dict(max_new_tokens=12))])
    assert out["p"]["ids"] == oracle(prompt, 12, **knobs)
    assert out["plain"]["ids"] == [0] * 12  # a request without penalties in the same batch is untouched
    if knobs.get("freq", 0) >= 0:  # (a negative frequency penalty only reinforces the top token here)
        assert out["p"]["ids"] != out["plain"]["ids"]


def test_min_new_tokens_holds_back_eos_and_stop_ids():
    boost = {EOS: 20.0, 7: 10.0}  # EOS is the top token, then 7
    out = run([("min", [2, 3], dict(max_new_tokens=10, min_new_tokens=4)), ("none", [2, 3], dict(max_new_tokens=10))], boost)
    assert out["min"]["ids"] == [7, 7, 7, 7, EOS]
    assert out["none"]["ids"] == [EOS]
    out = run([("stop", [2, 3], dict(max_new_tokens=10, min_new_tokens=3, stop_token_ids=[7]))], {7: 10.0})
    assert out["stop"]["ids"] == [0, 0, 0, 7]  # the stop id (the top token) held back for 3 tokens


def test_logprobs_stay_those_of_the_raw_logits():
    s = Scheduler(make_args(), model_runner=FixedLogitsRunner())
    params = SamplingParams(temperature=0, max_new_tokens=4, frequency_penalty=2.0)
    s.add_request(TokenizedGenerateReqInput("r", [2, 3], params, return_logprob=True))
    out = run_to_completion(s)["r"]
    raw = torch.log_softmax(torch.tensor(base_logits()), -1)
    assert out["ids"] == oracle([2, 3], 4, freq=2.0)
    for (lp, token), expected in zip(out["last"].token_logprobs, out["ids"]):
        assert token == expected and math.isclose(lp, raw[token].item(), rel_tol=1e-5)


@pytest.mark.parametrize(
    "params,field",
    [
        ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"frequency_penalty": 2.1}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty"),
        ({"presence_penalty": "high"}, "presence_penalty"), ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 9, "max_new_tokens": 8}, "min_new_tokens"), ({"min_new_tokens": 1.5}, "min_new_tokens"),
        ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"3": 100.5}}, "logit_bias"),
        ({"logit_bias": {"3": "up"}}, "logit_bias"), ({"logit_bias": [3]}, "logit_bias"),
    ],
)  # fmt: skip
def test_penalty_values_are_checked(params, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict(params)


def test_logit_bias_token_ids_are_checked_against_the_vocabulary():
    SamplingParams(logit_bias={"39": 1.0}).verify(VOCAB)
    with pytest.raises(ValueError, match="invalid token id '40'"):
        SamplingParams(logit_bias={"40": 1.0}).verify(VOCAB)


def test_null_penalties_mean_the_defaults():
    p = SamplingParams.from_dict({"repetition_penalty": None, "frequency_penalty": None, "min_new_tokens": None})
    assert (p.repetition_penalty, p.frequency_penalty, p.min_new_tokens, p.adjusts_logits) == (1.0, 0.0, 0, False)
