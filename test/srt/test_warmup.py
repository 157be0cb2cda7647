"""The start-up prefill warm-up (model_executor/warmup.py): the sizes it runs, the budget it stays in,
and that it leaves the pools as it found them and changes no later output."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_executor.warmup import MIN_WARMUP_TOKENS, warmup_prefill, warmup_sizes, warmup_token_budget
from sglang.srt.server_args import ServerArgs
from sglang.test.make_gemma4_checkpoint import write_checkpoint
from sglang.test.static_batch import greedy_generate


def test_sizes_are_powers_of_two_and_their_halfway_points():
    assert warmup_sizes(8192) == [256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
    assert warmup_sizes(5000) == [256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 5000]
    assert warmup_sizes(100) == [100]
    assert warmup_sizes(64, min_tokens=16) == [16, 24, 32, 48, 64]


@pytest.mark.parametrize("card", ["H100", "H200", "unknown"])
@pytest.mark.parametrize("weight_format", ["nvfp4", "bf16"])
def test_every_moe_kernel_variant_of_a_prefill_is_warmed_up(card, weight_format, monkeypatch):
    """Each (path, tile config) a prefill of 256..8192 tokens can run for the 26B-A4B experts is met
    by some warm-up size: a variant first met while serving compiles for seconds inside a step
    (on the H200, NVFP4 prefills of 2049-4095 tokens ran the in-loop decode with a tile no power of two
    reached)."""
    from sglang.srt.layers.moe.fused_moe_triton import configs
    from sglang.srt.layers.moe.fused_moe_triton.fused_moe import grouped_format

    monkeypatch.setattr(configs, "device_key", lambda: card)

    def variant(m: int) -> tuple:
        fmt = grouped_format(weight_format, m)
        return fmt, configs.get_moe_config(m, 128, 2816, 704, 8, fmt)

    served = {variant(m) for m in range(MIN_WARMUP_TOKENS, 8193)}
    assert served == {variant(m) for m in warmup_sizes(8192)}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("warmup") / "ck", "nvfp4-per-expert", seed=3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ModelRunner(ServerArgs(model_path=str(path), dtype="float32", device=device, max_total_tokens=512))


def test_budget_is_the_prefill_cap_within_the_pools(runner):
    assert warmup_token_budget(runner, 100) == 100
    pools = [runner.token_to_kv_pool_allocator.available_size()]
    if runner.swa_allocator is not None:
        pools.append(runner.swa_allocator.available_size())
    assert warmup_token_budget(runner, 1 << 20) == min(pools + [runner.model_config.context_len - 1])


def test_warmup_leaves_pools_and_outputs_unchanged(runner):
    prompts = [[5 + (3 * i + j) % 200 for j in range(n)] for i, n in enumerate((9, 14))]
    before = greedy_generate(runner, prompts, 6)
    free = runner.token_to_kv_pool_allocator.available_size()
    swa_free = runner.swa_allocator.available_size() if runner.swa_allocator is not None else None
    rows = runner.req_to_token_pool.available_size()
    warmup_prefill(runner, warmup_token_budget(runner, 64), min_tokens=16)  # prefills of 16, 32, 64 tokens
    assert runner.token_to_kv_pool_allocator.available_size() == free
    assert (runner.swa_allocator.available_size() if runner.swa_allocator is not None else None) == swa_free
    assert runner.req_to_token_pool.available_size() == rows
    assert greedy_generate(runner, prompts, 6) == before


def test_a_failing_warmup_prefill_gives_its_slots_back(runner, monkeypatch):
    """A prefill that raises (e.g. a dry pass of parallel_compile, whose errors start-up survives)
    still returns its KV slots and request row: none may stay taken while the server is idle."""
    free = runner.token_to_kv_pool_allocator.available_size()
    swa_free = runner.swa_allocator.available_size() if runner.swa_allocator is not None else None
    rows = runner.req_to_token_pool.available_size()

    def fail(batch):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(runner, "forward_eager", fail)
    with pytest.raises(RuntimeError, match="forward failed"):
        warmup_prefill(runner, 32, min_tokens=16)
    assert runner.token_to_kv_pool_allocator.available_size() == free
    assert (runner.swa_allocator.available_size() if runner.swa_allocator is not None else None) == swa_free
    assert runner.req_to_token_pool.available_size() == rows


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs a CUDA GPU")
def test_serving_after_startup_compiles_no_triton_kernel(tmp_path, caplog):
    """Start-up (graph capture, prefill warm-up) compiles every Triton kernel variant that serving
    meets: prompts of odd and even lengths, a prompt that extends a cached prefix, the same prompt
    again (bench_serving's warm-up request, then its first one), several prompts prefilled together.
    A variant compiled while serving stalls every running request, for seconds on an empty cache."""
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.model_executor.compile_watch import watch_late_compiles
    from test_scheduler import prompt, run_to_completion, submit

    path = write_checkpoint(tmp_path / "ck", "nvfp4-per-expert", seed=7)
    s = Scheduler(ServerArgs(model_path=str(path), dtype="bfloat16", device="cuda", max_total_tokens=16384, skip_tokenizer_init=True))

    def serve(prompts: dict[str, list[int]]) -> None:
        for rid, ids in prompts.items():
            submit(s, rid, ids, max_new=5)
        results = run_to_completion(s)
        assert set(results) == set(prompts) and all(r["last"].finished_reason is not None for r in results.values())

    s.warmup()
    watch = watch_late_compiles()
    before = watch.count
    try:
        with caplog.at_level(logging.WARNING, logger="sglang.srt.model_executor.compile_watch"):
            for i, n in enumerate((37, 300, 255, 1000, 2049)):
                serve({f"one{i}": prompt(i, n)})
            serve({"hit": prompt(1, 300) + [5, 6, 7]})
            serve({"again": prompt(3, 1000)})
            serve({f"many{i}": prompt(10 + i, n) for i, n in enumerate((19, 40, 77, 333))})
    finally:
        watch.uninstall()
    assert watch.count == before, [r.getMessage() for r in caplog.records]
