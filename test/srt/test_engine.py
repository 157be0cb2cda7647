"""sglang.Engine, the offline API, on the demo model (CPU): same scheduler, batched."""

from __future__ import annotations

import os

import pytest

import sglang
from conftest import DEMO_MODEL, pid_alive

GREEDY = {"temperature": 0, "ignore_eos": True}


def make_engine(**kw):
    # One compute thread in the scheduler child (CI has 2 cores); fp32 for batch-invariant kernels.
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return sglang.Engine(model_path=DEMO_MODEL, device="cpu", dtype="float32", **kw)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="module")
def engine():
    with make_engine(chunked_prefill_size=32) as e:
        yield e


PROMPTS = ["The capital of France is", "List three fruits:", "def fibonacci(n):", "Once upon a time"]


def test_single_prompt_returns_a_dict(engine):
    out = engine.generate(prompt=PROMPTS[0], sampling_params={"max_new_tokens": 7, **GREEDY})
    assert isinstance(out, dict)
    assert len(out["output_ids"]) == 7 and isinstance(out["text"], str)
    meta = out["meta_info"]
    assert meta["completion_tokens"] == 7 and meta["prompt_tokens"] == len(engine.tokenizer.encode(PROMPTS[0]))
    assert meta["finish_reason"] == {"type": "length", "length": 7}
    assert "cached_tokens" in meta


def test_batch_is_list_in_list_out_and_matches_single_runs(engine):
    params = {"max_new_tokens": 8, **GREEDY}
    batch = engine.generate(prompt=PROMPTS, sampling_params=params)
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    singles = [engine.generate(prompt=p, sampling_params=params) for p in PROMPTS]
    assert [b["output_ids"] for b in batch] == [s["output_ids"] for s in singles]
    assert [b["text"] for b in batch] == [s["text"] for s in singles]
    again = engine.generate(prompt=PROMPTS, sampling_params=params)
    assert [a["output_ids"] for a in again] == [b["output_ids"] for b in batch]  # greedy is deterministic


def test_per_prompt_sampling_params_and_max_new_tokens(engine):
    outs = engine.generate(prompt=PROMPTS[:3], sampling_params=[{"max_new_tokens": n, **GREEDY} for n in (1, 4, 9)])
    assert [len(o["output_ids"]) for o in outs] == [1, 4, 9]


def test_input_ids_in_and_generated_ids_only_out(engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    by_text = engine.generate(prompt=PROMPTS[1], sampling_params={"max_new_tokens": 5, **GREEDY})
    by_ids = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 5, **GREEDY})
    assert by_ids["output_ids"] == by_text["output_ids"]
    assert len(by_ids["output_ids"]) == 5  # the prompt is not echoed
    many = engine.generate(input_ids=[ids, ids[:3]], sampling_params={"max_new_tokens": 2, **GREEDY})
    assert len(many) == 2 and many[0]["output_ids"] == by_text["output_ids"][:2]


def test_stop_strings(engine):
    base = engine.generate(prompt=PROMPTS[2], sampling_params={"max_new_tokens": 24, **GREEDY})
    text = base["text"]
    stop = next(text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2])
    out = engine.generate(prompt=PROMPTS[2], sampling_params={"max_new_tokens": 24, "stop": stop, **GREEDY})
    assert out["text"] == text[: text.index(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = engine.generate(prompt=PROMPTS[2], sampling_params={"max_new_tokens": 24, "stop": [stop], "no_stop_trim": True, **GREEDY})
    assert kept["text"] == text[: text.index(stop) + len(stop)]


def test_seeded_sampling_reproducible(engine):
    params = {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.02, "seed": 7, "ignore_eos": True}
    a = engine.generate(prompt=PROMPTS[3], sampling_params=params)
    b = engine.generate(prompt=[PROMPTS[0], PROMPTS[3]], sampling_params=params)[1]
    assert a["output_ids"] == b["output_ids"]


def test_logprobs(engine):
    out = engine.generate(prompt=PROMPTS[0], sampling_params={"max_new_tokens": 4, **GREEDY}, return_logprob=True, top_logprobs_num=2)
    lps = out["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in lps] == out["output_ids"]
    tops = out["meta_info"]["output_top_logprobs"]
    assert all(len(t) == 2 and t[0][1] == tok for t, tok in zip(tops, out["output_ids"]))
    # The prompt's too, from logprob_start_len on (values: test_server_compat.py)
    scored = engine.generate(prompt=PROMPTS[0], sampling_params={"max_new_tokens": 1, **GREEDY}, return_logprob=True,
                             logprob_start_len=2)  # fmt: skip
    prompt_ids = engine.tokenizer_manager.tokenizer.encode(PROMPTS[0])
    assert [t for _, t, _ in scored["meta_info"]["input_token_logprobs"]] == prompt_ids[2:]


def test_prefix_cache_hits_show_in_meta_info(engine):
    prefix = " ".join(f"item{i}" for i in range(40))
    engine.generate(prompt=prefix + " first", sampling_params={"max_new_tokens": 2, **GREEDY})
    out = engine.generate(prompt=prefix + " second", sampling_params={"max_new_tokens": 2, **GREEDY})
    assert out["meta_info"]["cached_tokens"] > 40


def test_invalid_requests_raise_value_error(engine):
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompt="x", sampling_params={"temperature": -1})
    with pytest.raises(ValueError, match="unsupported sampling parameter"):
        engine.generate(prompt="x", sampling_params={"temperature_typo": 1})
    with pytest.raises(ValueError, match="exactly one"):
        engine.generate()
    # Still works afterwards.
    assert len(engine.generate(prompt="x", sampling_params={"max_new_tokens": 1})["output_ids"]) == 1


def test_flush_cache_and_server_info(engine):
    assert engine.flush_cache()
    state = engine.get_server_info()["internal_states"][0]
    assert state["kv_available_tokens"] == state["max_total_num_tokens"] and state["kv_used_tokens"] == 0


def test_skip_tokenizer_init_and_shutdown():
    engine = make_engine(skip_tokenizer_init=True)
    try:
        out = engine.generate(input_ids=[[2, 10, 11, 12], [2, 20]], sampling_params={"max_new_tokens": 3, **GREEDY})
        assert all("text" not in o and len(o["output_ids"]) == 3 for o in out)
        with pytest.raises(ValueError, match="input_ids"):
            engine.generate(prompt="text needs a tokenizer")
        pid = engine.scheduler_proc.pid
    finally:
        engine.shutdown()
    assert not pid_alive(pid)
    engine.shutdown()  # idempotent
