"""Sampler and SamplingParams: greedy, temperature, top-k/top-p/min-p cuts, per-request seeds, logprobs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sglang.srt.layers.sampler import Sampler
from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglang.srt.sampling.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap_mode")


def req(seed=None, **params):
    p = SamplingParams(seed=seed, **params)
    p.fill_defaults(None)
    return SimpleNamespace(sampling_params=p, generator=torch.Generator().manual_seed(seed or 0))


def sample(reqs, logits, **kw):
    info = SamplingBatchInfo.from_reqs(reqs, logits.shape[-1], "cpu")
    return Sampler()(logits, info, **kw)


def test_greedy_is_argmax_and_mixes_with_sampling():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = sample([req(temperature=0), req(temperature=1.0, seed=1), req(top_k=1, temperature=5.0)], logits)
    assert out.next_token_ids[0] == logits[0].argmax() and out.next_token_ids[2] == logits[2].argmax()


def test_all_greedy_batch_is_argmax_without_sampling_tensors():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    reqs = [req(temperature=0), req(top_k=1, temperature=0)] * 2
    info = SamplingBatchInfo.from_reqs(reqs, 50, "cpu")
    assert info.all_greedy and info.temperatures is None and info.uniforms is None
    assert torch.equal(Sampler()(logits, info).next_token_ids, logits.argmax(-1))


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    def support(**params):
        reqs = [req(seed=i, temperature=1.0, **params) for i in range(400)]
        return set(sample(reqs, logits).next_token_ids.tolist())
    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {0, 1}
    assert support(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert support(top_p=0.45) == {0}
    assert support(min_p=0.5) == {0, 1}  # p >= 0.25


def test_seed_makes_a_request_reproducible_in_any_batch():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    alone = [sample([req(seed=9, temperature=1.0)], logits[1:2]).next_token_ids.item() for _ in range(1)]
    r = req(seed=9, temperature=1.0)
    batched = sample([req(seed=1, temperature=1.0), r, req(temperature=0)], logits[:3]).next_token_ids[1].item()
    assert batched == alone[0]


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(300, 1)
    cold = sample([req(seed=i, temperature=0.05) for i in range(300)], logits).next_token_ids
    assert (cold == 0).all()


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    out = sample([req(temperature=0), req(temperature=0.3, seed=3)], logits, return_logprob=True, top_logprobs_num=3)
    ref = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.next_token_ids[:, None]).squeeze(1))
    assert torch.allclose(out.top_logprobs, ref.topk(3).values)


@pytest.mark.parametrize(
    "params,field",
    [
        ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"bogus": 1}, "unsupported"),
        ({"temperature": "hot"}, "temperature"), ({"max_new_tokens": 2.5}, "max_new_tokens"), ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"stop": 5}, "stop"),
    ],
)
def test_sampling_params_validation(params, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict(params)


def test_defaults_come_from_generation_config():
    p = SamplingParams.from_dict({"top_p": 0.5, "stop": "x"})
    p.fill_defaults({"temperature": 0.7, "top_p": 0.95, "top_k": 64})
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.stop) == (0.7, 0.5, 64, 0.0, ["x"])
    q = SamplingParams()
    q.fill_defaults({"do_sample": False})
    assert q.is_greedy
