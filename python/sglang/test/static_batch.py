"""Drive a ModelRunner directly with a static batch: prefill every prompt, then decode in lockstep.

No scheduler involved: tests use it to compare the model with a reference, and bench_one_batch
uses it to time prefill and decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode, LogitsProcessorOutput


@dataclass
class StaticBatch:
    rows: list[int]
    seq_lens: list[int]


def _slots_for(runner, batch: StaticBatch, new_lens: list[int]) -> torch.Tensor:
    slots = runner.token_to_kv_pool_allocator.alloc(sum(new_lens))
    if slots is None:
        raise RuntimeError("KV cache too small for this static batch")
    start = 0
    for row, old, n in zip(batch.rows, batch.seq_lens, new_lens):
        runner.req_to_token_pool.req_to_token[row, old : old + n] = slots[start : start + n]
        start += n
    return slots


def prefill(runner, prompts: list[list[int]], return_all_logits: bool = False) -> tuple[StaticBatch, LogitsProcessorOutput]:
    rows = [runner.req_to_token_pool.alloc() for _ in prompts]
    if any(r is None for r in rows):
        raise RuntimeError("too many requests for the request pool")
    batch = StaticBatch(rows, [0] * len(prompts))
    lens = [len(p) for p in prompts]
    slots = _slots_for(runner, batch, lens)
    dev = runner.device
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND,
        input_ids=torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=dev),
        positions=torch.cat([torch.arange(n) for n in lens]).to(dev),
        req_pool_indices=torch.tensor(rows, dtype=torch.int64, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int64, device=dev),
        extend_seq_lens=torch.tensor(lens, dtype=torch.int64, device=dev),
        out_cache_loc=slots,
        return_all_logits=return_all_logits,
    )
    batch.seq_lens = lens
    return batch, runner.forward(fb)


def decode_step(runner, batch: StaticBatch, next_ids: list[int]) -> LogitsProcessorOutput:
    slots = _slots_for(runner, batch, [1] * len(batch.rows))
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
    )
    batch.seq_lens = new_lens
    return runner.forward(fb)


def release(runner, batch: StaticBatch) -> None:
    for row, n in zip(batch.rows, batch.seq_lens):
        runner.token_to_kv_pool_allocator.free(runner.req_to_token_pool.req_to_token[row, :n].clone())
        runner.req_to_token_pool.free(row)


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
