"""Hybrid sliding-window KV pool (issue 7 item 2): sizing, the radix tree's swa bookkeeping, the
scheduler with a fake model (reclaiming, admission, prefix reuse, retraction, abort), and the real
tiny model on both attention backends giving the same logits with the pool on and off."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import FakeModelRunner, reference_continuation
from sglang.srt.configs.model_config import gemma4_layer_specs
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.mem_cache.memory_pool import (
    LayerKVSpec,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    hybrid_pool_sizes,
    split_bytes_per_token,
)
from sglang.srt.mem_cache.radix_cache import RadixCache, usable_prefix_len
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.server_args import ServerArgs
from sglang.test.make_gemma4_checkpoint import write_checkpoint
from sglang.test.static_batch import decode_step, prefill, release
from test_scheduler import make_args, prompt, run_to_completion, submit

W = 8  # the tiny model's window, and the fake runner's

REAL_CONFIG = Path(__file__).parents[2] / "python/sglang/srt/configs/data/nvidia--Gemma-4-26B-A4B-NVFP4/config.json"


# ------------------------------------------------------------------ sizing


def test_real_26b_config_bytes_and_capacity():
    cfg = json.loads(REAL_CONFIG.read_text())
    specs = [LayerKVSpec(s.num_kv_heads, s.head_dim, s.is_sliding) for s in gemma4_layer_specs(cfg.get("text_config", cfg))]
    assert sum(s.is_sliding for s in specs) == 25 and len(specs) == 30
    full_bpt, swa_bpt = split_bytes_per_token(specs, torch.bfloat16)
    assert (full_bpt, swa_bpt) == (5 * 2 * 2 * 512 * 2, 25 * 2 * 8 * 256 * 2)  # 20 KiB, 200 KiB
    budget = 60 * 2**30
    single = budget // (full_bpt + swa_bpt)
    sizes = hybrid_pool_sizes(budget, full_bpt, swa_bpt, 0.8)
    assert sizes.swa_tokens == int(0.8 * sizes.full_tokens)
    assert sizes.full_tokens * full_bpt + sizes.swa_tokens * swa_bpt <= budget
    assert sizes.full_tokens / single == pytest.approx((full_bpt + swa_bpt) / (full_bpt + 0.8 * swa_bpt), rel=1e-4)


def test_pool_sizes_flags_and_log(tiny_ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="sglang.srt.model_executor.model_runner"):
        on = ModelRunner(ServerArgs(model_path=str(tiny_ckpt), device="cpu", max_total_tokens=1000, swa_full_tokens_ratio=0.25))
    assert (on.max_total_num_tokens, on.max_total_num_swa_tokens, on.sliding_window) == (1000, 250, W)
    assert on.kv_cache.k_buffer[0].shape[0] == 251 and on.kv_cache.k_buffer[-1].shape[0] == 1001
    assert "full layers 1000 tokens, sliding layers 250 tokens" in caplog.text
    off = ModelRunner(ServerArgs(model_path=str(tiny_ckpt), device="cpu", max_total_tokens=1000, disable_hybrid_swa_memory=True))
    assert off.swa_allocator is None and off.req_to_token_pool.req_to_swa_token is None
    assert all(b.shape[0] == 1001 for b in off.kv_cache.k_buffer)
    with pytest.raises(ValueError, match="cannot hold one window"):
        ModelRunner(ServerArgs(model_path=str(tiny_ckpt), device="cpu", max_total_tokens=100, swa_full_tokens_ratio=0.1))
    with pytest.raises(ValueError, match="swa-full-tokens-ratio"):
        ServerArgs(model_path=str(tiny_ckpt), device="cpu", swa_full_tokens_ratio=0)


# ------------------------------------------------------------------ radix tree


def test_usable_prefix_len_needs_the_window_before_it():
    held = lambda bits: torch.tensor([7 if b == "x" else 0 for b in bits])  # noqa: E731
    assert usable_prefix_len(held(""), 4) == 0
    assert usable_prefix_len(held("xxxxx"), 4) == 5
    assert usable_prefix_len(held("xx.xxx"), 4) == 6  # the query at 6 reads 3..5
    assert usable_prefix_len(held("xx.xx"), 4) == 2  # the query at 5 would read 2..4, at 3 reads 0..2
    assert usable_prefix_len(held("..."), 4) == 0
    assert usable_prefix_len(held("..."), 1) == 3  # window 1: a query reads only its own key


def make_hybrid_cache(full: int = 64, swa: int = 64) -> RadixCache:
    pool = ReqToTokenPool(4, 64, "cpu", hybrid_swa=True)
    return RadixCache(pool, TokenToKVPoolAllocator(full, "cpu"), swa_allocator=TokenToKVPoolAllocator(swa, "cpu"), sliding_window=4)


def put_hybrid(c: RadixCache, key: list[int], held: str) -> None:
    """Insert key with swa slots where `held` has 'x' (tombstones elsewhere), like a finished request."""
    full = c.allocator.alloc(len(key))
    swa = torch.zeros(len(key), dtype=torch.int64)
    mask = torch.tensor([h == "x" for h in held])
    swa[mask] = c.swa_allocator.alloc(int(mask.sum()))
    already = c.insert(key, full, swa)
    assert already == 0


def test_hybrid_match_truncates_locks_window_and_tombstones():
    c = make_hybrid_cache()
    key = list(range(10, 22))  # 12 tokens, swa held only at the end (like a finished long request)
    put_hybrid(c, key, "......xxxxxx")
    assert c.swa_evictable_size() == 6 and c.evictable_size() == 12
    assert len(c.match(key + [99])) == 12
    m = c.match(key[:8] + [99])  # full match 8, but the query at 8 needs 5..7: 5 is a tombstone
    assert len(m) == 0 and m.node is c.root
    m = c.match(key[:10] + [99])  # window 7..9 held
    assert len(m) == 10 and m.swa.tolist()[7:] == m.swa.tolist()[7:10] and (m.swa[7:] != 0).all()
    c.inc_lock_ref(m.node)
    # Full slots of the whole path are protected, swa only of the last W - 1 = 3 tokens.
    assert c.protected_size() == 10 and c.swa_protected_size() == 3 and c.swa_evictable_size() == 3
    free_before = c.swa_allocator.available_size()
    c.evict(0, 100)  # tombstones every unlocked swa slot, keeps every node
    assert c.swa_allocator.available_size() == free_before + 3 and c.total_size() == 12
    assert len(c.match(key[:10] + [99])) == 10  # the locked window survived
    assert len(c.match(key + [99])) == 10  # the end's window was tombstoned; the locked one is left
    c.dec_lock_ref(m.node)
    assert c.swa_protected_size() == 0 and c.swa_evictable_size() == 3 and c.protected_size() == 0
    c.evict(100)
    assert c.total_size() == 0 and c.swa_evictable_size() == 0
    assert c.allocator.available_size() == 64 and c.swa_allocator.available_size() == 64


def test_tombstoning_spares_node_ends_first():
    c = make_hybrid_cache()
    put_hybrid(c, [1, 2, 3, 4, 5, 6, 7, 8], "xxxxxxxx")
    put_hybrid(c, [9, 10, 11, 12, 13, 14, 15, 16], "xxxxxxxx")
    assert c.swa_evictable_size() == 16
    c.evict(0, 10)  # first pass takes 5 from each node, sparing its last 3
    assert len(c.match([1, 2, 3, 4, 5, 6, 7, 8, 0])) == 8 and len(c.match([9, 10, 11, 12, 13, 14, 15, 16, 0])) == 8
    assert len(c.match([1, 2, 3, 4, 0])) == 0
    c.evict(0, 6)
    assert c.swa_evictable_size() == 0 and c.swa_allocator.available_size() == 64


# ------------------------------------------------------------------ scheduler (fake model)


def hybrid_scheduler(full: int = 512, swa: int = 64, running: int = 16, **args) -> Scheduler:
    runner = FakeModelRunner(max_total_tokens=full, max_running_requests=running, sliding_window=W, swa_tokens=swa)
    return Scheduler(make_args(**args), model_runner=runner)


def assert_both_pools_clean(s: Scheduler) -> None:
    assert s.check_memory() and s.kv_used_tokens() == 0 and s.swa_used_tokens() == 0
    assert s.req_to_token_pool.available_size() == s.req_to_token_pool.size
    assert s.flush_cache().success
    assert s.allocator.available_size() == s.max_total_num_tokens and s.swa_allocator.available_size() == s.swa_allocator.size


def test_many_long_requests_with_a_tiny_swa_pool(overlap_mode):
    # 10 requests x (70 prompt + 20 output) = 900 tokens; the swa pool holds 48.
    s = hybrid_scheduler(full=2048, swa=48, chunked_prefill_size=16)
    for i in range(10):
        submit(s, f"r{i}", prompt(i, 70), max_new=20)
    res = run_to_completion(s)
    for i in range(10):
        assert res[f"r{i}"]["ids"] == reference_continuation(prompt(i, 70), 20), i
    assert s.model_runner.max_swa_in_use <= 48 and s.stats["swa_reclaimed_total"] > 0
    assert_both_pools_clean(s)


def test_long_prompt_without_chunking_is_chunked_to_fit_the_swa_pool(overlap_mode):
    s = hybrid_scheduler(swa=40, chunked_prefill_size=-1)
    assert s.chunked_prefill_size == 40 - W
    submit(s, "long", prompt(3, 150), max_new=5)
    assert run_to_completion(s)["long"]["ids"] == reference_continuation(prompt(3, 150), 5)
    assert_both_pools_clean(s)


def test_prefix_reuse_reports_cached_tokens_only_where_the_window_is_held(overlap_mode):
    a = prompt(20, 60)
    # Roomy swa pool: nothing is reclaimed, so every prefix of a finished request is reusable.
    roomy = hybrid_scheduler(swa=512)
    submit(roomy, "a", a, max_new=4)
    run_to_completion(roomy)
    submit(roomy, "mid", a[:30] + [5, 6, 7], max_new=4)
    assert run_to_completion(roomy)["mid"]["last"].cached_tokens == 30
    # Tiny swa pool: a's prompt is reclaimed chunk by chunk; only its end keeps a window.
    tight = hybrid_scheduler(swa=40, chunked_prefill_size=16)
    submit(tight, "a", a, max_new=4)
    out_a = run_to_completion(tight)["a"]["ids"]
    turn2 = a + out_a[:3] + [9, 9, 9]  # next turn: a's whole sequence (kv of 63 tokens) + new text
    mid = a[:30] + [5, 6, 7]
    submit(tight, "turn2", turn2, max_new=4)
    res = run_to_completion(tight)
    assert res["turn2"]["last"].cached_tokens == 63
    submit(tight, "mid", mid, max_new=4)
    res.update(run_to_completion(tight))
    assert res["mid"]["last"].cached_tokens < 30  # truncated to where a's window is held (here 0)
    for rid, p in (("turn2", turn2), ("mid", mid)):
        assert res[rid]["ids"] == reference_continuation(p, 4), rid
    assert_both_pools_clean(tight)


def test_retraction_and_abort_free_both_pools(overlap_mode):
    s = hybrid_scheduler(full=160, swa=40, schedule_conservativeness=0.3, chunked_prefill_size=16)
    for i in range(8):
        submit(s, f"r{i}", prompt(i, 30), max_new=30)
    res = run_to_completion(s)
    for i in range(8):
        assert res[f"r{i}"]["ids"] == reference_continuation(prompt(i, 30), 30), i
    assert s.stats["num_retractions"] > 0
    assert_both_pools_clean(s)
    submit(s, "run", prompt(10), max_new=100)
    submit(s, "chunk", prompt(11, 60), max_new=100)
    for _ in range(4):
        s.step()
    for rid in ("chunk", "run"):
        s.abort_request(rid)
    s.step()
    assert s.is_idle()
    assert_both_pools_clean(s)


def test_lone_request_drops_a_prefix_whose_pinned_windows_do_not_fit(overlap_mode):
    # t1's last window stays in the tree; locked as t2's prefix it leaves 24 - 7 swa slots, less
    # than t2's window + chunk (7 + 16), so t2 (alone) runs without the prefix instead of waiting.
    s = hybrid_scheduler(swa=W + 16, chunked_prefill_size=16)
    base = prompt(30, 20)
    submit(s, "t1", base, max_new=2)
    t1 = run_to_completion(s)["t1"]["ids"]
    long_turn = base + t1 + prompt(31, 40)
    submit(s, "t2", long_turn, max_new=2)
    res = run_to_completion(s)
    assert res["t2"]["ids"] == reference_continuation(long_turn, 2)
    assert res["t2"]["last"].cached_tokens == 0
    assert_both_pools_clean(s)


# ------------------------------------------------------------------ real tiny model, both backends


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("swa") / "ck", "nvfp4-per-expert", seed=11)


# The Triton backend needs a GPU or the interpreter (which conftest enables only without one).
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _runner(ckpt: Path, backend: str, hybrid: bool) -> ModelRunner:
    args = ServerArgs(
        model_path=str(ckpt), dtype="float32", device=_DEVICE, attention_backend=backend, max_total_tokens=512,
        swa_full_tokens_ratio=0.125, disable_hybrid_swa_memory=not hybrid, max_running_requests=4,
    )  # fmt: skip
    return ModelRunner(args)


def _poison_free_swa_slots(runner: ModelRunner) -> None:
    """NaN into every swa slot not handed out: reading a freed slot would poison the logits."""
    free = runner.swa_allocator._free
    for i, spec in enumerate(runner.model_config.layer_specs):
        if spec.is_sliding:
            runner.kv_cache.k_buffer[i][free] = float("nan")
            runner.kv_cache.v_buffer[i][free] = float("nan")


def _generate(runner: ModelRunner, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Greedy decode; returns each step's logits and (full, swa) slots in use after it."""
    batch, out = prefill(runner, prompts, return_all_logits=True)
    logits, usage = [out.all_logits], []
    swa = runner.swa_allocator

    def record():
        used_full = runner.token_to_kv_pool_allocator.size - runner.token_to_kv_pool_allocator.available_size()
        usage.append((used_full, swa.size - swa.available_size() if swa is not None else 0))
        if swa is not None:
            _poison_free_swa_slots(runner)

    record()
    for _ in range(steps):
        out = decode_step(runner, batch, out.next_token_logits.argmax(-1).tolist())
        logits.append(out.next_token_logits)
        record()
    release(runner, batch)
    return logits, usage


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_long_request_same_logits_with_and_without_hybrid_pool(tiny_ckpt, backend):
    prompts = [[100 + (7 * j) % 300 for j in range(40)], [50 + (3 * j) % 200 for j in range(23)]]  # 5x and 3x the window
    steps = 12
    on_runner = _runner(tiny_ckpt, backend, hybrid=True)
    on, usage = _generate(on_runner, prompts, steps)
    off, _ = _generate(_runner(tiny_ckpt, backend, hybrid=False), prompts, steps)
    for a, b in zip(on, off):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
    # Full slots grow with the sequence; swa slots stay at W - 1 per request between steps.
    assert [u[0] for u in usage] == [63 + 2 * i for i in range(steps + 1)]
    assert all(u[1] == 2 * (W - 1) for u in usage)
    assert on_runner.swa_allocator.available_size() == on_runner.swa_allocator.size


def test_scheduler_with_real_model_chunked_prefill_under_swa_pressure(tiny_ckpt, overlap_mode):
    """Extend over a prefix whose early swa slots were reclaimed (chunks of 12 over W = 8), via the
    triton extend kernel, equals the single-pool run."""
    prompts = {f"r{i}": [60 + (5 * j + 11 * i) % 250 for j in range(37 + 9 * i)] for i in range(3)}

    def serve(hybrid: bool) -> dict:
        runner = _runner(tiny_ckpt, "triton", hybrid)
        args = make_args(chunked_prefill_size=12, max_running_requests=4)
        s = Scheduler(args, model_runner=runner)
        for rid, p in prompts.items():
            submit(s, rid, p, max_new=6)
        res = {rid: r["ids"] for rid, r in run_to_completion(s).items()}
        assert s.check_memory()
        assert (s.stats["swa_reclaimed_total"] > 0) == hybrid  # the window really was recycled
        return res

    assert serve(hybrid=True) == serve(hybrid=False)


def test_mixed_chunk_with_the_real_model_equals_separate_steps(tiny_ckpt, overlap_mode):
    """--enable-mixed-chunk on the tiny model (triton kernels, hybrid pool, window 8): decode rows of
    one token over long prefixes run through the extend kernel next to a prompt's chunks and give
    the tokens of separate prefill and decode steps."""
    prompts = {f"r{i}": [40 + (7 * j + 13 * i) % 260 for j in range(30 + 8 * i)] for i in range(3)}

    def serve(mixed: bool) -> tuple[dict, list]:
        s = Scheduler(make_args(chunked_prefill_size=12, max_running_requests=4, enable_mixed_chunk=mixed),
                      model_runner=_runner(tiny_ckpt, "triton", hybrid=True))  # fmt: skip
        mixed_steps, launch = [], s.launch_batch

        def spy(batch, input_ids=None):
            lens = [r.extend_len for r in batch.reqs]
            if batch.forward_mode.is_extend() and 1 in lens and max(lens) > 1:
                mixed_steps.append(lens)
            return launch(batch, input_ids)

        s.launch_batch = spy
        submit(s, "r0", prompts["r0"], max_new=10)
        while not s.running_reqs:
            s.step()
        s.step()
        submit(s, "r1", prompts["r1"], max_new=6)
        submit(s, "r2", prompts["r2"], max_new=6)
        res = {rid: r["ids"] for rid, r in run_to_completion(s).items()}
        assert s.check_memory() and s.kv_used_tokens() == 0
        return res, mixed_steps

    (mixed, steps), (plain, no_steps) = serve(True), serve(False)
    assert mixed == plain
    assert len(steps) >= 3 and not no_steps
