"""Scheduler logic in-process with a fake model (see conftest.FakeModelRunner): batching, chunked
prefill, prefix reuse, admission control, retraction, abort, stop conditions, memory accounting."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import FakeModelRunner, reference_continuation
from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.managers.scheduler import Scheduler, init_moe_gemm_config
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs

pytestmark = pytest.mark.usefixtures("overlap_mode")


def make_args(**overrides) -> SimpleNamespace:
    """ServerArgs' defaults without reading a model (the scheduler only reads these fields)."""
    args = {f.name: f.default for f in dataclasses.fields(ServerArgs) if f.default is not dataclasses.MISSING}
    args.update(model_path="fake", chunked_prefill_size=-1, skip_tokenizer_init=True, random_seed=0)
    args.update(overrides)
    return SimpleNamespace(**args)


def make_scheduler(runner_kw=None, **args) -> Scheduler:
    return Scheduler(make_args(**args), model_runner=FakeModelRunner(**(runner_kw or {})))


def submit(s: Scheduler, rid: str, prompt: list[int], max_new: int = 8, stream: bool = False, **params) -> None:
    sp = SamplingParams(max_new_tokens=max_new, temperature=0, **params)
    s.add_request(TokenizedGenerateReqInput(rid, prompt, sp, stream=stream))


def run_to_completion(s: Scheduler, max_steps: int = 10_000) -> dict[str, dict]:
    """Step until idle; returns per rid the concatenated tokens and the final output."""
    results: dict[str, dict] = {}
    for _ in range(max_steps):
        for out in s.step():
            r = results.setdefault(out.rid, {"ids": []})
            r["ids"] += out.new_token_ids
            r["last"] = out
        if s.is_idle():
            return results
    raise AssertionError("scheduler did not finish")


def prompt(i: int, n: int = 20) -> list[int]:
    return [(i * 13 + j * 5) % 90 + 3 for j in range(n)]


def assert_pool_clean(s: Scheduler) -> None:
    assert s.check_memory()
    assert s.kv_used_tokens() == 0
    assert s.req_to_token_pool.available_size() == s.req_to_token_pool.size


def test_single_request_matches_reference():
    s = make_scheduler()
    submit(s, "a", prompt(0), max_new=10)
    res = run_to_completion(s)
    assert res["a"]["ids"] == reference_continuation(prompt(0), 10)
    assert res["a"]["last"].finished_reason == {"type": "length", "length": 10}
    assert res["a"]["last"].completion_tokens == 10 and res["a"]["last"].prompt_tokens == 20
    assert_pool_clean(s)


def test_batched_requests_are_continuous():
    s = make_scheduler()
    for i in range(6):
        submit(s, f"r{i}", prompt(i), max_new=5 + i)
    res = run_to_completion(s)
    for i in range(6):
        assert res[f"r{i}"]["ids"] == reference_continuation(prompt(i), 5 + i)
    modes = [m for m, _ in s.model_runner.forward_calls]
    assert modes[0] == ForwardMode.EXTEND and modes.count(ForwardMode.EXTEND) == 1  # one prefill batch
    assert max(len(lens) for m, lens in s.model_runner.forward_calls if m == ForwardMode.DECODE) == 6
    assert_pool_clean(s)


def test_new_request_joins_running_batch():
    s = make_scheduler()
    submit(s, "early", prompt(1), max_new=12)
    for _ in range(3):
        s.step()
    submit(s, "late", prompt(2), max_new=4)
    res = run_to_completion(s)
    assert res["early"]["ids"] == reference_continuation(prompt(1), 12)
    assert res["late"]["ids"] == reference_continuation(prompt(2), 4)
    decode_sizes = [len(lens) for m, lens in s.model_runner.forward_calls if m == ForwardMode.DECODE]
    assert 2 in decode_sizes


def test_streaming_outputs_arrive_every_step():
    s = make_scheduler()
    submit(s, "s", prompt(3), max_new=5, stream=True)
    chunks = []
    while not s.is_idle():
        chunks += [o.new_token_ids for o in s.step()]
    assert chunks == [[t] for t in reference_continuation(prompt(3), 5)]


def test_chunked_prefill_splits_long_prompts():
    s = make_scheduler(runner_kw={"max_total_tokens": 512}, chunked_prefill_size=16)
    long_prompt = prompt(4, 70)
    submit(s, "long", long_prompt, max_new=4)
    submit(s, "short", prompt(5), max_new=4)
    res = run_to_completion(s)
    assert res["long"]["ids"] == reference_continuation(long_prompt, 4)
    assert res["short"]["ids"] == reference_continuation(prompt(5), 4)
    extend_tokens = [sum(lens) for m, lens in s.model_runner.forward_calls if m == ForwardMode.EXTEND]
    assert max(extend_tokens) <= 16 and sum(extend_tokens) == 70 + 20
    assert_pool_clean(s)


def _mixed_steps(s: Scheduler) -> list[list[int]]:
    """Extend steps that carried decode tokens (rows of one token) next to a prefill chunk."""
    return [lens for m, lens in s.model_runner.forward_calls if m == ForwardMode.EXTEND and 1 in lens and max(lens) > 1]


@pytest.mark.parametrize("mixed", [False, True])
def test_mixed_chunk_runs_decodes_inside_prefill_steps(mixed):
    """--enable-mixed-chunk: running requests decode in the steps that prefill a newcomer's chunks,
    with the same tokens as without it and the chunk budget covering both."""
    s = make_scheduler(runner_kw={"max_total_tokens": 1024}, chunked_prefill_size=32, enable_mixed_chunk=mixed)
    for i in range(3):
        submit(s, f"early{i}", prompt(i, 8), max_new=30)
    for _ in range(4):
        s.step()
    long_prompt = prompt(9, 70)
    submit(s, "long", long_prompt, max_new=6)
    res = run_to_completion(s)
    for i in range(3):
        assert res[f"early{i}"]["ids"] == reference_continuation(prompt(i, 8), 30)
    assert res["long"]["ids"] == reference_continuation(long_prompt, 6)
    extend_steps = [lens for m, lens in s.model_runner.forward_calls if m == ForwardMode.EXTEND]
    assert max(sum(lens) for lens in extend_steps) <= 32
    if mixed:
        # 70 prompt tokens in chunks of 32 - 3, each next to the three early requests' decode tokens
        assert [lens for lens in _mixed_steps(s) if lens.count(1) == 3] == [[29, 1, 1, 1], [29, 1, 1, 1], [12, 1, 1, 1]]
    else:
        assert not _mixed_steps(s)
    # Prefill accounting counts prompt tokens only, not the decode tokens mixed in.
    assert s.stats["prefill_computed_tokens_total"] == 3 * 8 + 70
    assert_pool_clean(s)


def test_mixed_chunk_with_a_full_pool_still_completes():
    """Too little KV for a prefill and every running request's next token: the step prefills alone,
    decodes (with retraction) follow as usual, and every request still gets the reference tokens."""
    s = make_scheduler(runner_kw={"max_total_tokens": 160}, chunked_prefill_size=32, enable_mixed_chunk=True)
    for i in range(6):
        submit(s, f"r{i}", prompt(i), max_new=12)
    res = run_to_completion(s)
    for i in range(6):
        assert res[f"r{i}"]["ids"] == reference_continuation(prompt(i), 12)
    assert_pool_clean(s)


def test_mixed_chunk_leaves_room_for_the_rest_of_a_chunked_prompt():
    """Found by fuzzing: decode tokens mixed into chunk steps used up the slots the chunked prompt's
    later chunks were admitted with, and a chunk step cannot retract (allocation failure, scheduler
    crash). Mixing now stops while the rest of the prompt would not fit."""
    s = make_scheduler(runner_kw={"max_total_tokens": 46}, chunked_prefill_size=2, enable_mixed_chunk=True)
    submit(s, "R", prompt(0, 5), max_new=25)
    while not s.running_reqs:
        s.step()
    submit(s, "L", prompt(1, 22), max_new=1)
    res = run_to_completion(s)
    assert res["R"]["ids"] == reference_continuation(prompt(0, 5), 25)
    assert res["L"]["ids"] == reference_continuation(prompt(1, 22), 1)
    assert_pool_clean(s)


def test_prefix_cache_reuses_kv_and_reports_cached_tokens():
    s = make_scheduler(runner_kw={"max_total_tokens": 512})
    base = prompt(6, 40)
    submit(s, "first", base, max_new=3)
    first = run_to_completion(s)["first"]
    assert first["last"].cached_tokens == 0
    submit(s, "second", base[:30] + [7, 8, 9], max_new=3)
    second = run_to_completion(s)["second"]
    assert second["last"].cached_tokens == 30
    assert second["ids"] == reference_continuation(base[:30] + [7, 8, 9], 3)
    computed = [sum(lens) for m, lens in s.model_runner.forward_calls if m == ForwardMode.EXTEND]
    assert computed[-1] == 3  # only the new suffix was prefilled
    # An identical prompt reuses all but the last token (its logits are needed).
    submit(s, "same", base, max_new=3)
    same = run_to_completion(s)["same"]
    assert same["last"].cached_tokens == 39 and same["ids"] == first["ids"]
    assert_pool_clean(s)


def test_batch_log_lines(caplog):
    """SGLang's log format: a line per prefill batch (new sequences and tokens, prefix hits, queue)
    and one per --decode-log-interval decode steps with the generation rate."""
    s = make_scheduler(decode_log_interval=4, max_running_requests=2)
    base = prompt(8, 30)
    submit(s, "a", base, max_new=9)
    run_to_completion(s)
    with caplog.at_level("INFO", logger="sglang.srt.managers.scheduler"):
        for i, p in enumerate([base[:20] + [5, 6], prompt(9), prompt(10)]):
            submit(s, f"r{i}", p, max_new=9)
        run_to_completion(s)
    lines = [r.getMessage() for r in caplog.records]
    prefills = [m for m in lines if m.startswith("Prefill batch.")]
    # Two rows are free: r0 (20 of 22 tokens cached) and r1 run, r2 waits for a row. The usage counts
    # the slots held before the batch's own: r0's locked prefix.
    usage = 20 / s.max_total_num_tokens
    assert prefills[0] == (f"Prefill batch. #new-seq: 2, #new-token: 22, #cached-token: 20, token usage: {usage:.2f}, "
                           "#running-req: 0, #queue-req: 1")  # fmt: skip
    assert prefills[1].startswith("Prefill batch. #new-seq: 1, #new-token: 20, #cached-token: 0,")
    decodes = [m for m in lines if m.startswith("Decode batch.")]
    # 8 decode steps each for a, then r0 and r1 together, then r2: lines at steps 12, 16, 20, 24.
    assert s.batch_log.decode_steps == 24 and len(decodes) == 4
    assert all(re.search(r"gen throughput \(token/s\): \d+\.\d\d, #queue-req: \d$", m) for m in decodes)


def test_disable_radix_cache():
    s = make_scheduler(disable_radix_cache=True)
    submit(s, "a", prompt(7), max_new=3)
    run_to_completion(s)
    submit(s, "b", prompt(7), max_new=3)
    assert run_to_completion(s)["b"]["last"].cached_tokens == 0
    assert s.allocator.available_size() == s.max_total_num_tokens
    assert_pool_clean(s)


def test_admission_control_and_retraction_under_tiny_pool():
    # 12 requests x (20 prompt + 30 output) need 600 slots; the pool has 128.
    s = make_scheduler(runner_kw={"max_total_tokens": 128}, schedule_conservativeness=0.3)
    for i in range(12):
        submit(s, f"r{i}", prompt(i), max_new=30)
    res = run_to_completion(s)
    for i in range(12):
        assert res[f"r{i}"]["ids"] == reference_continuation(prompt(i), 30), i
    assert s.stats["num_retractions"] > 0
    assert_pool_clean(s)


def test_retraction_with_radix_cache_disabled():
    s = make_scheduler(runner_kw={"max_total_tokens": 100}, schedule_conservativeness=0.3, disable_radix_cache=True, chunked_prefill_size=8)
    for i in range(8):
        submit(s, f"r{i}", prompt(i), max_new=25)
    res = run_to_completion(s)
    for i in range(8):
        assert res[f"r{i}"]["ids"] == reference_continuation(prompt(i), 25)
    assert s.stats["num_retractions"] > 0
    assert s.allocator.available_size() == 100


def test_max_new_tokens_is_clipped_to_the_pool():
    s = make_scheduler(runner_kw={"max_total_tokens": 64})
    submit(s, "big", prompt(8, 40), max_new=500)
    res = run_to_completion(s)
    assert len(res["big"]["ids"]) == 64 - 40
    assert res["big"]["last"].finished_reason["type"] == "length"


def test_prompt_too_long_for_pool_or_context_is_rejected():
    s = make_scheduler(runner_kw={"max_total_tokens": 64, "context_len": 512})
    submit(s, "pool", prompt(9, 80))
    submit(s, "ctx", prompt(9, 600))
    submit(s, "empty", [])
    outs = {o.rid: o for o in s.step()}
    assert outs["pool"].finished_reason["type"] == "abort" and outs["pool"].finished_reason["status_code"] == 400
    assert "context length" in outs["ctx"].finished_reason["message"]
    assert outs["empty"].finished_reason["status_code"] == 400
    assert s.is_idle()


def test_abort_waiting_running_and_chunked_requests_frees_everything():
    s = make_scheduler(runner_kw={"max_total_tokens": 512, "max_running_requests": 2}, chunked_prefill_size=8)
    submit(s, "run", prompt(10), max_new=100)
    submit(s, "chunk", prompt(11, 60), max_new=100)
    submit(s, "wait", prompt(12), max_new=100)
    for _ in range(6):  # with overlap, "run" joins the running list a step later
        s.step()
        if s.chunked_req is not None and s.running_reqs and s.waiting_queue:
            break
    assert s.chunked_req is not None and s.running_reqs and s.waiting_queue
    for rid in ("wait", "chunk", "run"):
        s.abort_request(rid)
    outs = {o.rid: o for o in s.step()}
    assert {rid: o.finished_reason["type"] for rid, o in outs.items()} == {"wait": "abort", "chunk": "abort", "run": "abort"}
    assert s.is_idle()
    assert_pool_clean(s)


def test_abort_of_a_request_whose_prefill_is_in_flight(overlap_mode):
    s = make_scheduler()
    submit(s, "a", prompt(0), max_new=50, stream=True)
    submit(s, "b", prompt(1), max_new=5)
    s.step()
    s.abort_request("a")  # with overlap its prefill has been launched but not processed yet
    res = run_to_completion(s)
    assert res["a"]["last"].finished_reason["type"] == "abort"
    assert res["b"]["ids"] == reference_continuation(prompt(1), 5)
    assert_pool_clean(s)


def test_overlap_launches_the_next_decode_before_reading_the_last(overlap_mode):
    """Same tokens either way; with overlap, decode steps run one ahead, so a request stopped by EOS
    costs one extra step (dropped), and one stopped by its length costs none."""
    ref = reference_continuation(prompt(13), 10)
    s = make_scheduler(runner_kw={"eos": ref[4]})
    submit(s, "eos", prompt(13), max_new=10)
    submit(s, "len", prompt(14), max_new=3)
    res = run_to_completion(s)
    assert res["eos"]["ids"] == ref[:5] and res["len"]["ids"] == reference_continuation(prompt(14), 3)
    decode_sizes = [len(lens) for m, lens in s.model_runner.forward_calls if m == ForwardMode.DECODE]
    # sync: 2 requests x 2 steps, then "eos" alone 2 more; overlap: "eos" decodes once more (dropped)
    assert decode_sizes == ([2, 2, 1, 1] if overlap_mode == "sync" else [2, 2, 1, 1, 1])
    assert s.stats["generation_tokens_total"] == 8
    assert_pool_clean(s)


def test_idle_and_counts_are_right_between_steps(overlap_mode):
    """With overlap a prefill is in flight between steps (its requests in no list yet), and a step
    launched ahead may hold only requests that just stopped: the state must still count the first
    and be idle (flush allowed, memory checked) once the last output is out."""
    s = make_scheduler()
    submit(s, "a", prompt(0), max_new=50)
    s.step()
    state = s.internal_state()
    assert state["num_running_reqs"] + state["num_waiting_reqs"] == 1
    s.abort_request("a")
    run_to_completion(s)
    ref = reference_continuation(prompt(13), 10)
    s = make_scheduler(runner_kw={"eos": ref[4]})
    submit(s, "eos", prompt(13), max_new=10)
    while not any(o.finished_reason for o in s.step()):
        pass
    assert s.is_idle() and s.flush_cache().success
    assert s.internal_state()["memory_ok"] is True


def test_stop_token_ids_eos_and_ignore_eos():
    ref = reference_continuation(prompt(13), 10)
    s = make_scheduler(runner_kw={"eos": ref[4]})
    submit(s, "eos", prompt(13), max_new=10)
    submit(s, "ignore", prompt(13), max_new=10, ignore_eos=True)
    submit(s, "stop_id", prompt(13), max_new=10, ignore_eos=True, stop_token_ids=[ref[2]])
    res = run_to_completion(s)
    assert res["eos"]["ids"] == ref[:5] and res["eos"]["last"].finished_reason == {"type": "stop", "matched": ref[4]}
    assert res["ignore"]["ids"] == ref
    k = ref.index(ref[2])
    assert res["stop_id"]["ids"] == ref[: k + 1]


def test_max_new_tokens_zero_finishes_without_compute():
    s = make_scheduler()
    submit(s, "zero", prompt(14), max_new=0)
    outs = s.step()
    assert outs[0].finished_reason == {"type": "length", "length": 0} and outs[0].new_token_ids == []
    assert s.model_runner.forward_calls == []


def test_flush_cache_only_when_idle():
    s = make_scheduler()
    submit(s, "a", prompt(15), max_new=5)
    s.step()
    assert not s.flush_cache().success
    run_to_completion(s)
    assert s.tree_cache.total_size() > 0
    assert s.flush_cache().success
    assert s.tree_cache.total_size() == 0 and s.allocator.available_size() == s.max_total_num_tokens


def test_max_running_requests_is_respected():
    s = make_scheduler(runner_kw={"max_running_requests": 16}, max_running_requests=3)
    for i in range(7):
        submit(s, f"r{i}", prompt(i), max_new=6)
    res = run_to_completion(s)
    assert len(res) == 7
    assert max(len(lens) for _, lens in s.model_runner.forward_calls) <= 3


def test_seeded_sampling_does_not_depend_on_the_batch():
    def sample(batch_with: int) -> list[int]:
        s = make_scheduler()
        sp = lambda seed: SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed)  # noqa: E731
        # Flatten the fake model's one-hot logits so sampling really is random.
        forward = s.model_runner.forward
        s.model_runner.forward = lambda fb: type(out := forward(fb))(next_token_logits=out.next_token_logits / 40)
        for i in range(batch_with):
            s.add_request(TokenizedGenerateReqInput(f"other{i}", prompt(i + 20), sp(i)))
        s.add_request(TokenizedGenerateReqInput("me", prompt(30), sp(42)))
        return run_to_completion(s)["me"]["ids"]

    mine = sample(0)
    assert mine == sample(5)
    assert mine != reference_continuation(prompt(30), 8)  # it did sample, not argmax


@pytest.mark.parametrize("key", ["num_experts_per_tok", "num_experts_per_token", "top_k_experts", "moe_top_k"])
def test_init_moe_gemm_config_reads_every_top_k_spelling(key):
    assert init_moe_gemm_config({key: 8, "num_experts": 128}).top_k == 8
    nested = {"architectures": ["Gemma4ForConditionalGeneration"], "text_config": {key: 4, "num_experts": 16}}
    cfg = init_moe_gemm_config(nested)
    assert (cfg.top_k, cfg.num_experts) == (4, 16)
    # Works on config objects as well as dicts.
    assert init_moe_gemm_config(SimpleNamespace(text_config=SimpleNamespace(**{key: 2}))).top_k == 2


def test_init_moe_gemm_config_without_moe():
    assert init_moe_gemm_config({"hidden_size": 8}).top_k is None


def test_schedule_batch_tables_and_inputs():
    """write_req_to_token's single scatter and to_forward_batch's packed copy put every new token where
    the per-request definition says: row req_pool_idx, columns from kv_len, ids fill_ids[kv_len:]."""
    import torch

    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch, write_req_to_token

    def req(rid, prompt, output, row, kv_len, extend_len):
        r = Req(rid, prompt, SamplingParams())
        r.output_ids, r.req_pool_idx, r.kv_len, r.extend_len = output, row, kv_len, extend_len
        return r

    reqs = [
        req("a", [5, 6, 7, 8], [9, 10], 3, 2, 3),  # a chunk across the prompt/output boundary: 7 8 9
        req("b", [1, 2], [3], 0, 2, 1),  # a decode step: 3
        req("c", [4, 4, 4, 4, 11], [], 1, 0, 5),  # a fresh prefill
    ]
    batch = ScheduleBatch(reqs, ForwardMode.EXTEND, torch.arange(100, 109), torch.arange(200, 209))
    table, swa = torch.zeros(4, 8, dtype=torch.int64), torch.zeros(4, 8, dtype=torch.int64)
    write_req_to_token(batch.to_forward_batch("cpu"), table, swa)
    expected, expected_swa, offset = torch.zeros_like(table), torch.zeros_like(swa), 0
    for r in reqs:
        cols = slice(r.kv_len, r.kv_len + r.extend_len)
        expected[r.req_pool_idx, cols] = torch.arange(100, 109)[offset : offset + r.extend_len]
        expected_swa[r.req_pool_idx, cols] = torch.arange(200, 209)[offset : offset + r.extend_len]
        offset += r.extend_len
    assert torch.equal(table, expected) and torch.equal(swa, expected_swa)

    fb = batch.to_forward_batch("cpu")
    assert fb.input_ids.tolist() == [7, 8, 9, 3, 4, 4, 4, 4, 11]
    assert fb.positions.tolist() == [2, 3, 4, 2, 0, 1, 2, 3, 4]
    assert fb.req_pool_indices.tolist() == [3, 0, 1]
    assert fb.seq_lens.tolist() == fb.seq_lens_cpu == [5, 3, 5]
    assert fb.extend_seq_lens.tolist() == fb.extend_seq_lens_cpu == [3, 1, 5]
    for r in reqs:
        n = len(r.fill_ids)
        assert all(r.fill_slice(lo, hi) == r.fill_ids[lo:hi] for lo in range(n + 1) for hi in range(lo, n + 1))


def test_scheduler_host_benchmark_drives_the_real_scheduler():
    # benchmark/bench_scheduler_host.py's stub runner keeps up with the Scheduler's runner contract.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))
    import bench_scheduler_host

    times = bench_scheduler_host.decode_step_times("cpu", batch=3, input_len=40, steps=25, vocab=64)
    assert len(times) == 25 and all(t > 0 for t in times)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlap_on_gpu_matches_sync_and_never_waits_for_the_gpu(tmp_path):
    """The real model on the GPU: overlapped and synchronous scheduling give the same tokens, and a
    decode launched ahead does nothing that waits for the step in flight (sync debug mode raises)."""
    from sglang.test.make_gemma4_checkpoint import write_checkpoint

    path = write_checkpoint(tmp_path / "ck", "nvfp4-per-expert", seed=7)
    common = dict(model_path=str(path), dtype="float32", device="cuda", cuda_graph_max_bs=8, max_total_tokens=4096, skip_tokenizer_init=True)
    results, ahead_launches = {}, []
    for mode in ("sync", "overlap"):
        s = Scheduler(ServerArgs(**common, disable_overlap_schedule=mode == "sync"))
        assert s.overlap == (mode == "overlap")
        launch = s.launch_batch

        def strict_launch(batch, input_ids=None):
            if input_ids is None:
                return launch(batch)
            ahead_launches.append(len(batch.reqs))
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(batch, input_ids)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        s.launch_batch = strict_launch
        for i, n in enumerate((11, 5, 17)):
            submit(s, f"g{i}", [120 + (7 * i + j) % 500 for j in range(n)], max_new=12 + 4 * i, ignore_eos=True)
        sp = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
        s.add_request(TokenizedGenerateReqInput("sampled", list(range(200, 230)), sp))
        results[mode] = {rid: r["ids"] for rid, r in run_to_completion(s).items()}
        assert s.check_memory() and s.kv_used_tokens() == 0
        # every request row back, but the one the CUDA graphs keep for their padding rows
        assert s.req_to_token_pool.available_size() == s.req_to_token_pool.size - 1
        del s
    assert results["overlap"] == results["sync"]
    # the longest requests have 19 decode steps; all but the first (right after the prefill) run ahead
    assert len(ahead_launches) == 18


def test_forward_batch_index_tensors_start_16_byte_aligned():
    """One host-to-device copy carries all of a batch's index lists, yet each tensor starts 16-byte
    aligned as a tensor of its own would: Triton compiles a variant per pointer alignment, and before,
    an odd token count shifted the later lists and the first such prefill compiled attention kernels
    while serving (seen on an H100: 2.3 + 4.5 s on a fresh server)."""
    from sglang.srt.managers.schedule_batch import pack_to_device

    for lists in ([[7, 8, 9], [0, 1, 2], [4], [3], [3]], [[], [5], [1, 2], [9, 9, 9], [1]]):
        tensors = pack_to_device(lists, "cpu")
        assert [t.tolist() for t in tensors] == lists
        assert all(t.dtype == torch.int64 and t.data_ptr() % 16 == 0 for t in tensors)
