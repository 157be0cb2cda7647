"""Compile the prefill path's kernels at start-up instead of in the middle of serving.

Triton compiles a kernel variant the first time a shape class needs it. Decode shapes are all met
while the CUDA graphs are captured, but a prefill of a new size class (another MoE tile bucket, the
fp4 -> bf16 expansion of large batches) compiles for seconds while every running request waits: on an
H200 each concurrency-64 serving run had one 3.5-6 s gap between two tokens, and its p99 TTFT was
6-12 s, against ~1 s for the median. So the runner prefills once per power of two of tokens and once
per 1.5x a power of two, up to the largest prefill batch, with every slot given back afterwards. The
1.5x sizes matter: the MoE tile buckets end halfway between the powers of two they were tuned at
(2048 < M <= 6144 is one bucket), and NVFP4 experts leave the in-loop decode at 4096 tokens, so
prefills of 2049-4095 tokens run a path no power of two meets. Sizes only cover what varies by size
class: what Triton specialises on beyond that must not follow the token count, so batch tensors start
16-byte aligned (schedule_batch.pack_to_device) and the MoE kernels do not specialise on pair counts.
`--skip-server-warmup` skips it.
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.parallel_compile import precompile

logger = logging.getLogger(__name__)

MIN_WARMUP_TOKENS = 256  # smaller prefills share the tiles of the decode batches captured in graphs


def warmup_sizes(max_tokens: int, min_tokens: int = MIN_WARMUP_TOKENS) -> list[int]:
    """min_tokens, 1.5 * min_tokens, 2 * min_tokens, 3 * min_tokens, ... below max_tokens, then max_tokens."""
    sizes, n = [], min_tokens
    while n < max_tokens:
        sizes += [s for s in (n, n * 3 // 2) if s < max_tokens]
        n *= 2
    return sizes + [max_tokens]


def warmup_token_budget(runner, max_prefill_tokens: int) -> int:
    """The largest prefill batch the runner can be given: the scheduler's cap, within the pools."""
    limits = [max_prefill_tokens, runner.token_to_kv_pool_allocator.available_size(), runner.model_config.context_len - 1]
    if runner.swa_allocator is not None:
        limits.append(runner.swa_allocator.available_size())
    return max(1, min(limits))


@torch.no_grad()
def warmup_prefill(runner, max_tokens: int, min_tokens: int = MIN_WARMUP_TOKENS) -> None:
    """One single-request prefill of each size in `warmup_sizes` on `runner` (a ModelRunner): token
    ids are arbitrary, the KV slots and the request row come from the pools and go back to them.
    Their Triton kernels are compiled in parallel first (parallel_compile) where the backends
    allow a dry pass."""
    pool = runner.req_to_token_pool
    row = pool.alloc()
    if row is None:
        raise RuntimeError("no request row free for the prefill warm-up")
    sizes = warmup_sizes(max_tokens, min_tokens)
    try:
        if not runner.reads_device_values_on_host:
            precompile([lambda n=n: _prefill(runner, row, n) for n in sizes], runner.device, "prefill warm-up sizes")
        for n in tqdm(sizes, desc="Warming up prefill kernels"):
            _prefill(runner, row, n)
    finally:
        pool.free(row)
    if torch.device(runner.device).type == "cuda":
        torch.cuda.synchronize()


def _prefill(runner, row: int, n: int) -> None:
    """Prefill n arbitrary tokens into request row `row`, on slots taken from the pools and given back."""
    pool, dev = runner.req_to_token_pool, runner.device
    slots = runner.token_to_kv_pool_allocator.alloc(n)
    swa = runner.swa_allocator.alloc(n) if runner.swa_allocator is not None else None
    pool.req_to_token[row, :n] = slots
    if swa is not None:
        pool.req_to_swa_token[row, :n] = swa
    positions = torch.arange(n, device=dev)
    lens = torch.tensor([n], device=dev)
    batch = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, input_ids=(positions * 7919) % runner.model_config.vocab_size,
        positions=positions, req_pool_indices=torch.tensor([row], device=dev), seq_lens=lens,
        extend_seq_lens=lens, out_cache_loc=slots, swa_out_cache_loc=swa, seq_lens_cpu=[n], extend_seq_lens_cpu=[n],
    )  # fmt: skip
    try:
        runner.forward_eager(batch)
    finally:
        # The host-side free lists may hand these slots out at once: later kernels that write them
        # run after this forward on the same stream.
        runner.token_to_kv_pool_allocator.free(slots)
        if swa is not None:
            runner.swa_allocator.free(swa)
