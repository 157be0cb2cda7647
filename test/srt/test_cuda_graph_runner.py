"""Decode through CudaGraphRunner's static buffers and padding equals plain decoding.

On CPU the graph is an eager double (capture records the step, replay reruns it into the captured
output tensor), so everything but the CUDA capture itself is exercised: static input buffers, the
choice of graph size, padding rows, and that padding never writes into a live request's KV. Triton
kernels run under the interpreter (set by conftest), the attention backend a graph can capture.
"""

from __future__ import annotations

import pytest
import torch

from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner, capture_batch_sizes
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.server_args import ServerArgs
from sglang.test.make_gemma4_checkpoint import write_checkpoint
from sglang.test.static_batch import decode_step, prefill


class EagerGraph:
    def __init__(self, pool=None):
        self.fn, self.out = None, None

    def capture(self, fn):
        self.fn = fn
        self.out = fn().clone()
        return self.out

    def replay(self):
        self.out.copy_(self.fn())

    def memory_pool(self):
        return None


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("graph") / "ck", "nvfp4-per-expert", seed=7)
    # The Triton attention backend needs a GPU or the interpreter (which conftest enables only without one).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = ServerArgs(model_path=str(path), dtype="float32", device=device, attention_backend="triton")
    return ModelRunner(args)


def test_capture_sizes_cover_every_batch():
    sizes = capture_batch_sizes(160)
    assert sizes[0] == 1 and sizes[-1] == 160 and sizes == sorted(set(sizes))
    assert capture_batch_sizes(5) == [1, 2, 4, 5]


def _live_kv(runner, row: int, seq_len: int) -> list[torch.Tensor]:
    """Each layer's K of a request's readable tokens (sliding layers of a hybrid pool: its window, in swa slots)."""
    pool, window = runner.req_to_token_pool, runner.sliding_window
    out = []
    for i, layer in enumerate(runner.model_config.layer_specs):
        if layer.is_sliding and pool.hybrid_swa:
            slots = pool.req_to_swa_token[row, max(0, seq_len - window + 1) : seq_len]
        else:
            slots = pool.req_to_token[row, :seq_len]
        out.append(runner.kv_cache.k_buffer[i][slots].clone())
    return out


def test_graph_decode_equals_eager_and_padding_spares_live_kv(runner):
    assert runner.req_to_token_pool.hybrid_swa  # the default: swa buffers go through the graph too
    prompts = [[120 + i for i in range(n)] for n in (11, 5, 17, 9)]
    batch, out = prefill(runner, prompts)
    graphs = CudaGraphRunner(runner, max_bs=4, graph_cls=EagerGraph)
    assert graphs.bs_list == [1, 2, 4] and graphs.swa_out_cache_loc is not None
    # Decode the first three requests only: they run on the 4-row graph with one padding row,
    # while request 3's KV must stay untouched.
    sub = type(batch)(batch.rows[:3], batch.seq_lens[:3], batch.swa_freed_upto[:3])
    kv_before = _live_kv(runner, batch.rows[3], batch.seq_lens[3])
    next_ids = out.next_token_logits[:3].argmax(-1).tolist()
    pool = runner.req_to_token_pool
    for _ in range(4):
        lens_before = list(sub.seq_lens)
        runner.graph_runner = graphs
        # Keep the window's oldest slot: the eager rerun of this same step still reads it.
        graph_logits = decode_step(runner, sub, next_ids, free_swa_window=False).next_token_logits.clone()
        # Same step again, eagerly, over the same KV slots: identical inputs, so logits must agree.
        runner.graph_runner = None
        sub.seq_lens = lens_before
        runner.token_to_kv_pool_allocator.free(torch.stack([pool.req_to_token[r, n] for r, n in zip(sub.rows, lens_before)]))
        runner.swa_allocator.free(torch.stack([pool.req_to_swa_token[r, n] for r, n in zip(sub.rows, lens_before)]))
        eager_logits = decode_step(runner, sub, next_ids).next_token_logits
        assert graph_logits.shape == eager_logits.shape == (3, runner.model_config.vocab_size)
        # fp32; a padded batch may block its matmuls differently, hence not bit-equal.
        torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-4, atol=1e-4)
        assert graph_logits.argmax(-1).tolist() == eager_logits.argmax(-1).tolist()
        next_ids = eager_logits.argmax(-1).tolist()
    for before, after in zip(kv_before, _live_kv(runner, batch.rows[3], batch.seq_lens[3])):
        assert torch.equal(after, before)
    runner.graph_runner = None


def test_captures_run_without_garbage_collection(runner):
    """A collection inside a capture could destroy a dead graph, which invalidates the capture: the
    collector is off while capturing and back on afterwards, also when a capture fails."""
    import gc

    seen = []

    class GcCheckingGraph(EagerGraph):
        def capture(self, fn):
            seen.append(gc.isenabled())
            return super().capture(fn)

    class FailingGraph(EagerGraph):
        def capture(self, fn):
            raise RuntimeError("operation failed due to a previous error during capture")

    pool = runner.req_to_token_pool
    free_rows = list(pool._free)
    assert gc.isenabled()
    CudaGraphRunner(runner, max_bs=2, graph_cls=GcCheckingGraph)
    assert seen == [False, False] and gc.isenabled()
    with pytest.raises(RuntimeError, match="batch size 2.*--disable-cuda-graph"):
        CudaGraphRunner(runner, max_bs=2, graph_cls=FailingGraph)
    assert gc.isenabled()
    pool._free = free_rows  # give back the two padding rows the runners reserved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_graphs_match_eager_on_gpu(tmp_path):
    from sglang.test.static_batch import greedy_generate

    path = write_checkpoint(tmp_path / "ck", "nvfp4-per-expert", seed=7)
    common = dict(model_path=str(path), dtype="float32", device="cuda", cuda_graph_max_bs=8, max_total_tokens=4096)
    with_graphs = ModelRunner(ServerArgs(**common))
    eager = ModelRunner(ServerArgs(**common, disable_cuda_graph=True))
    assert with_graphs.graph_runner is not None and eager.graph_runner is None
    prompts = [[120 + (7 * i + j) % 500 for j in range(n)] for i, n in enumerate((11, 5, 17))]
    assert greedy_generate(with_graphs, prompts, 24) == greedy_generate(eager, prompts, 24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_mlp_on_a_second_stream_gives_the_same_logits_on_gpu(tmp_path, monkeypatch):
    """Steps of 2..64 tokens run each MoE layer's dense MLP on a second CUDA stream, also inside the
    captured decode graphs: prefill and graph-replayed decode logits must be the same bits as with
    one stream (same kernels, only their order across SMs differs)."""
    from sglang.srt.models import gemma4_causal

    path = write_checkpoint(tmp_path / "ck", "nvfp4-per-expert", seed=7)
    common = dict(model_path=str(path), dtype="bfloat16", device="cuda", cuda_graph_max_bs=8, max_total_tokens=4096)
    prompts = [[120 + (7 * i + j) % 500 for j in range(n)] for i, n in enumerate((11, 5, 17))]
    logits = {}
    for name, tokens in (("one", range(0)), ("two", range(2, 65))):
        monkeypatch.setattr(gemma4_causal, "DUAL_STREAM_TOKENS", tokens)
        runner = ModelRunner(ServerArgs(**common))
        assert runner.graph_runner is not None
        batch, out = prefill(runner, prompts)
        steps = [out.next_token_logits]
        for _ in range(6):
            out = decode_step(runner, batch, steps[-1].argmax(-1).tolist())
            steps.append(out.next_token_logits)
        logits[name] = torch.stack(steps)
        assert (runner.model.model._stream is not None) == (name == "two")
    assert torch.equal(logits["one"], logits["two"])
