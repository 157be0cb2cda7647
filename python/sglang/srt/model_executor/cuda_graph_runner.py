"""CUDA graphs for decode steps.

A decode step of the 26B model launches thousands of small kernels; replaying a captured graph removes
the host-side cost of each launch. One graph per captured batch size, all reading static input buffers.
A batch runs on the smallest graph that fits it; the extra rows are padding that point at a reserved
request row whose only token lives in KV slot 0 (the pool's sink), so they touch no real request's KV.
With the hybrid sliding-window pool the same holds for the swa slot space: a static `swa_out_cache_loc`
buffer, padding rows writing swa slot 0, and the reserved row zeroed in both tables.
"""

from __future__ import annotations

import gc
import logging
from typing import Callable

import torch
from tqdm import tqdm

from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode, LogitsProcessorOutput
from sglang.srt.model_executor.parallel_compile import precompile

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> list[int]:
    """Dense where batches are small (padding there costs the most), sparser above."""
    sizes = [1, 2, 4, 8] + list(range(16, 64, 16)) + list(range(64, 256 + 1, 32))
    return sorted({b for b in sizes if b <= max_bs} | {max_bs})


class _CudaGraph:
    """torch.cuda.CUDAGraph behind the two calls the runner needs (tests swap in an eager double)."""

    def __init__(self, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()

    def memory_pool(self):
        return self.graph.pool()


class CudaGraphRunner:
    def __init__(self, model_runner, max_bs: int, graph_cls=_CudaGraph):
        self.model_runner = model_runner
        self.bs_list = capture_batch_sizes(max_bs)
        self.max_bs = self.bs_list[-1]
        dev = model_runner.device
        pool = model_runner.req_to_token_pool
        self.pad_row = pool.alloc()
        if self.pad_row is None:
            raise RuntimeError("no request row left to reserve for CUDA graph padding")
        pool.req_to_token[self.pad_row].zero_()
        if pool.req_to_swa_token is not None:
            pool.req_to_swa_token[self.pad_row].zero_()

        def buf(fill: int) -> torch.Tensor:
            return torch.full((self.max_bs,), fill, dtype=torch.int64, device=dev)

        self.input_ids, self.positions, self.out_cache_loc = buf(0), buf(0), buf(0)
        self.swa_out_cache_loc = buf(0) if pool.hybrid_swa else None
        self.req_pool_indices, self.seq_lens, self.extend_seq_lens = buf(self.pad_row), buf(1), buf(1)
        self.graphs: dict[int, object] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all(graph_cls)

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            extend_seq_lens=self.extend_seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            swa_out_cache_loc=None if self.swa_out_cache_loc is None else self.swa_out_cache_loc[:bs],
            # Host copies are only shape information here; the kernels read the device tensors.
            seq_lens_cpu=[1] * bs,
            extend_seq_lens_cpu=[1] * bs,
        )

    def _capture_all(self, graph_cls) -> None:
        # A garbage collection during a capture may free an unreferenced CUDA graph (e.g. of a runner
        # dropped earlier in the process), and destroying a graph is not allowed while a stream
        # captures: the capture is invalidated. torch's graph context no longer collects first, so
        # collect once here and keep the collector off until every size is captured.
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._capture_sizes(graph_cls)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _capture_sizes(self, graph_cls) -> None:
        batches = {bs: self._static_batch(bs) for bs in self.bs_list}
        precompile([lambda b=b: self.model_runner.forward_eager(b) for b in batches.values()], self.model_runner.device,
                   "decode batch sizes")  # fmt: skip
        pool = None
        # Largest first, so the smaller graphs fit in the memory pool the largest one reserved.
        for bs in tqdm(self.bs_list[::-1], desc="Capturing CUDA graphs", disable=len(self.bs_list) < 2):
            batch = batches[bs]
            for _ in range(2):  # compile Triton kernels and settle allocations outside the capture
                self.model_runner.forward_eager(batch)
            graph = graph_cls(pool)
            try:
                out = graph.capture(lambda b=batch: self.model_runner.forward_eager(b).next_token_logits)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"CUDA graph capture failed at decode batch size {bs}: {exc}. Serving works without"
                    " graphs (--disable-cuda-graph)."
                ) from exc
            pool = graph.memory_pool()
            self.graphs[bs], self.logits[bs] = graph, out
        logger.info("captured CUDA graphs for decode batch sizes %s", self.bs_list)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.forward_mode.is_decode() and batch.batch_size <= self.max_bs and not batch.return_all_logits

    def replay(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        bs = batch.batch_size
        graph_bs = next(b for b in self.bs_list if b >= bs)
        for static, live in (
            (self.input_ids, batch.input_ids),
            (self.positions, batch.positions),
            (self.req_pool_indices, batch.req_pool_indices),
            (self.seq_lens, batch.seq_lens),
            (self.out_cache_loc, batch.out_cache_loc),
        ):
            static[:bs].copy_(live)
        if self.swa_out_cache_loc is not None:
            self.swa_out_cache_loc[:bs].copy_(batch.swa_out_cache_loc)
            self.swa_out_cache_loc[bs:graph_bs].zero_()
        # Padding rows must be reset every time: stale rows would write into live requests' KV.
        self.input_ids[bs:graph_bs].zero_()
        self.positions[bs:graph_bs].zero_()
        self.out_cache_loc[bs:graph_bs].zero_()
        self.req_pool_indices[bs:graph_bs].fill_(self.pad_row)
        self.seq_lens[bs:graph_bs].fill_(1)
        self.graphs[graph_bs].replay()
        return LogitsProcessorOutput(next_token_logits=self.logits[graph_bs][:bs])
