"""Drive a ModelRunner directly with a static batch: prefill every prompt, then decode in lockstep.

No scheduler involved: tests use it to compare the model with a reference, and bench_one_batch
uses it to time prefill and decode steps. With a hybrid sliding-window pool it also does the
scheduler's swa bookkeeping: each new token gets a swa slot, and after every step the slots that fell
out of the window are freed (so swa use per request stays at window - 1 between steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sglang.srt.mem_cache.memory_pool import SwaRelease, free_swa_outside_window, swa_keep_from
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode, LogitsProcessorOutput


@dataclass
class StaticBatch:
    rows: list[int]
    seq_lens: list[int]
    # Per row: positions below this have had their swa slots freed (hybrid pool only).
    swa_freed_upto: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.swa_freed_upto:
            self.swa_freed_upto = [0] * len(self.rows)


def _alloc(allocator, n: int) -> torch.Tensor:
    slots = allocator.alloc(n)
    if slots is None:
        raise RuntimeError("KV cache too small for this static batch")
    return slots


def _slots_for(runner, batch: StaticBatch, new_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full slots (and swa slots with a hybrid pool) for the new tokens, written into the tables."""
    pool = runner.req_to_token_pool
    slots = _alloc(runner.token_to_kv_pool_allocator, sum(new_lens))
    swa_alloc = getattr(runner, "swa_allocator", None)
    swa_slots = _alloc(swa_alloc, sum(new_lens)) if swa_alloc is not None else None
    start = 0
    for row, old, n in zip(batch.rows, batch.seq_lens, new_lens):
        pool.req_to_token[row, old : old + n] = slots[start : start + n]
        if swa_slots is not None:
            pool.req_to_swa_token[row, old : old + n] = swa_slots[start : start + n]
        start += n
    return slots, swa_slots


def _free_outside_window(runner, batch: StaticBatch) -> None:
    if getattr(runner, "swa_allocator", None) is None:
        return
    keep = [swa_keep_from(n, runner.sliding_window) for n in batch.seq_lens]
    releases = [SwaRelease(row, lo, hi) for row, lo, hi in zip(batch.rows, batch.swa_freed_upto, keep)]
    free_swa_outside_window(runner.req_to_token_pool, runner.swa_allocator, releases)
    batch.swa_freed_upto = [max(lo, hi) for lo, hi in zip(batch.swa_freed_upto, keep)]


def prefill(runner, prompts: list[list[int]], return_all_logits: bool = False) -> tuple[StaticBatch, LogitsProcessorOutput]:
    rows = [runner.req_to_token_pool.alloc() for _ in prompts]
    if any(r is None for r in rows):
        raise RuntimeError("too many requests for the request pool")
    batch = StaticBatch(rows, [0] * len(prompts))
    lens = [len(p) for p in prompts]
    slots, swa_slots = _slots_for(runner, batch, lens)
    dev = runner.device
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND,
        input_ids=torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=dev),
        positions=torch.cat([torch.arange(n) for n in lens]).to(dev),
        req_pool_indices=torch.tensor(rows, dtype=torch.int64, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int64, device=dev),
        extend_seq_lens=torch.tensor(lens, dtype=torch.int64, device=dev),
        out_cache_loc=slots,
        swa_out_cache_loc=swa_slots,
        return_all_logits=return_all_logits,
    )
    batch.seq_lens = lens
    out = runner.forward(fb)
    _free_outside_window(runner, batch)
    return batch, out


def decode_step(runner, batch: StaticBatch, next_ids: list[int], free_swa_window: bool = True) -> LogitsProcessorOutput:
    slots, swa_slots = _slots_for(runner, batch, [1] * len(batch.rows))
    dev = runner.device
    new_lens = [n + 1 for n in batch.seq_lens]
    fb = ForwardBatch(
        forward_mode=ForwardMode.DECODE,
        input_ids=torch.tensor(next_ids, dtype=torch.int64, device=dev),
        positions=torch.tensor(batch.seq_lens, dtype=torch.int64, device=dev),
        req_pool_indices=torch.tensor(batch.rows, dtype=torch.int64, device=dev),
        seq_lens=torch.tensor(new_lens, dtype=torch.int64, device=dev),
        extend_seq_lens=torch.ones(len(new_lens), dtype=torch.int64, device=dev),
        out_cache_loc=slots,
        swa_out_cache_loc=swa_slots,
    )
    batch.seq_lens = new_lens
    out = runner.forward(fb)
    if free_swa_window:
        _free_outside_window(runner, batch)
    return out


def release(runner, batch: StaticBatch) -> None:
    pool = runner.req_to_token_pool
    for row, n, freed in zip(batch.rows, batch.seq_lens, batch.swa_freed_upto):
        runner.token_to_kv_pool_allocator.free(pool.req_to_token[row, :n].clone())
        if getattr(runner, "swa_allocator", None) is not None:
            runner.swa_allocator.free(pool.req_to_swa_token[row, freed:n].clone())
        pool.free(row)


def greedy_generate(runner, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    batch, out = prefill(runner, prompts)
    generated = [[] for _ in prompts]
    try:
        for step in range(max_new_tokens):
            next_ids = out.next_token_logits.argmax(dim=-1).tolist()
            for g, t in zip(generated, next_ids):
                g.append(t)
            if step + 1 < max_new_tokens:
                out = decode_step(runner, batch, next_ids)
    finally:
        release(runner, batch)
    return generated
