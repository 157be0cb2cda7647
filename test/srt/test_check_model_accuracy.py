"""The whole-model accuracy check (benchmark/check_model_accuracy.py) on the tiny model on CPU: its
comparison logic passes for a faithful fast path and fails for a broken one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))

import check_model_accuracy as cma  # noqa: E402

from sglang.srt.model_executor.model_runner import ModelRunner  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.test.make_gemma4_checkpoint import write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("acc") / "ck", "nvfp4-per-expert", seed=11)


def _runner(path: Path, **kw) -> ModelRunner:
    return ModelRunner(ServerArgs(model_path=str(path), device="cpu", dtype="float32", max_total_tokens=512, **kw))


def test_triton_attention_path_agrees_with_reference(ckpt):
    # Triton attention under the interpreter vs the torch reference: same weights, same tokens.
    fast, ref = _runner(ckpt, attention_backend="triton"), _runner(ckpt)
    prompt = list(range(120, 150))
    result = cma.run_pair(fast, ref, prompt, decode_len=6)
    assert result.free.positions == result.replayed.positions == len(prompt) + 6
    assert result.passed() and min(result.free.min_cosine, result.replayed.min_cosine) > 0.9999
    assert fast.token_to_kv_pool_allocator.available_size() == fast.max_total_num_tokens


def test_check_fails_on_a_perturbed_model(ckpt):
    fast, ref = _runner(ckpt), _runner(ckpt)
    # The classic NVFP4 mistake: gate and up global scales swapped (a uniform rescale would not do,
    # the RMSNorm after the experts removes it).
    gs = fast.model.model.layers[1].experts.w13_weight_scale_2.data
    gs.copy_(gs.flip(-1))
    result = cma.run_pair(fast, ref, list(range(120, 140)), decode_len=4)
    assert not result.passed()


def test_replay_routes_through_the_recorded_experts(ckpt):
    # Replaying a path's own routing changes nothing; replaying other experts changes the logits.
    fast, ref = _runner(ckpt), _runner(ckpt)
    prompt = list(range(120, 140))
    log: dict = {}
    _, ref_logits, tokens = cma.free_pass(fast, ref, prompt, 3, log)
    assert sorted(log) == [i for i, _ in cma._moe_layers(ref)] and all(len(v) == 4 for v in log.values())
    same = cma.replay_pass(ref, prompt, tokens, log)
    assert all(torch.equal(a, b) for a, b in zip(same, ref_logits))
    experts = ref.model_config.text_config["num_experts"]
    shifted = {i: [(ids + 1) % experts for ids in calls] for i, calls in log.items()}
    moved = cma.replay_pass(ref, prompt, tokens, shifted)
    assert cma.compare(moved, ref_logits).min_cosine < 0.99


def test_cli_reports_and_returns_status(ckpt, tmp_path, capsys):
    rc = cma.main(["--model-path", str(ckpt), "--load-format", "auto", "--device", "cpu", "--dtype", "float32",
                   "--prompt-len", "24", "--decode-len", "3", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    assert "PASS" in capsys.readouterr().out
    assert (tmp_path / "check_model_accuracy.jsonl").read_text().count("\n") == 1
