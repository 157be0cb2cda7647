"""Host time of one scheduler decode step, with the model taken out.

On the GPU a decode step is one CUDA-graph replay; whatever the scheduler does in Python around it
(batch tensors, slot tables, sampling inputs, outputs) is time the GPU waits, step after step. This
runs the real Scheduler over a stub model runner whose forward returns constant logits at once, so
the measured time is the scheduler's own: `batch` greedy requests of `--input-len` prompt tokens,
decoding in lockstep, streaming.

With `--gpu-step-us T` (CUDA) the stub's forward also keeps the GPU busy for T us (a spin kernel), as
a real step would, and the step time is reported with the overlapped scheduler and without it: sync
costs host + T, overlap should cost max(host, T).

    python benchmark/bench_scheduler_host.py --batch-size 1 64 [--device cuda] [--vocab 1024] [--gpu-step-us 3400]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from types import SimpleNamespace

import torch

from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
from sglang.srt.model_executor.forward_batch_info import LogitsProcessorOutput
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs


class StubModelRunner:
    """ModelRunner's attributes and forward contract; forward returns a preset logits tensor."""

    def __init__(self, device: str, max_running: int, context_len: int, window: int, vocab: int, gpu_cycles: int = 0):
        self.gpu_cycles = gpu_cycles
        tokens = max_running * context_len
        self.device = device
        self.model_config = SimpleNamespace(
            context_len=context_len, vocab_size=vocab, model_path="stub", architectures=["Gemma4ForCausalLM"],
            hf_config={"top_k_experts": 8, "num_experts": 128}, hf_text_config={"eos_token_id": 1},
            hf_generation_config=None,
        )  # fmt: skip
        self.max_total_num_tokens = tokens
        self.max_running_requests = max_running
        self.req_to_token_pool = ReqToTokenPool(max_running, context_len + 8, device, hybrid_swa=True)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(tokens, device)
        self.sliding_window = window
        self.max_total_num_swa_tokens = tokens
        self.swa_allocator = TokenToKVPoolAllocator(tokens, device)
        self.logits = torch.zeros(max_running, vocab, device=device)
        self.logits[:, 7] = 1.0

    def forward(self, fb) -> LogitsProcessorOutput:
        if self.gpu_cycles:
            torch.cuda._sleep(self.gpu_cycles)
        return LogitsProcessorOutput(next_token_logits=self.logits[: fb.batch_size])


def spin_cycles_per_us() -> float:
    """GPU clock cycles per microsecond, as torch.cuda._sleep counts them."""
    torch.cuda._sleep(1_000_000)  # clocks up
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    torch.cuda._sleep(10_000_000)
    t1.record()
    torch.cuda.synchronize()
    return 10_000_000 / (t0.elapsed_time(t1) * 1e3)


def decode_step_times(device: str, batch: int, input_len: int, steps: int, vocab: int, gpu_cycles: int = 0, overlap: bool = False) -> list[float]:
    args = {f.name: f.default for f in dataclasses.fields(ServerArgs) if f.default is not dataclasses.MISSING}
    args.update(model_path="stub", chunked_prefill_size=-1, skip_tokenizer_init=True, max_prefill_tokens=1 << 30, random_seed=0)
    args.update(disable_overlap_schedule=not overlap)
    runner = StubModelRunner(device, batch, input_len + steps + 64, window=min(1024, input_len), vocab=vocab, gpu_cycles=gpu_cycles)
    sched = Scheduler(SimpleNamespace(**args), model_runner=runner)
    prompt = list(range(2, input_len + 2))
    for i in range(batch):
        sp = SamplingParams(max_new_tokens=steps + 8, temperature=0, ignore_eos=True)
        sched.add_request(TokenizedGenerateReqInput(f"r{i}", prompt, sp, stream=True))
    while len(sched.running_reqs) < batch:  # the prefills
        sched.step()
    times = []
    for _ in range(steps):
        if device.startswith("cuda") and not (gpu_cycles or overlap):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sched.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    # Gemma 4's vocab by default; on the CPU the sampler's argmax over it is real compute that a GPU
    # does in microseconds, so a small vocab isolates the Python side there.
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--gpu-step-us", type=float, default=0.0, help="GPU time of the stub's forward (CUDA only)")
    args = ap.parse_args()
    for bs in args.batch_size:
        times = decode_step_times(args.device, bs, args.input_len, args.steps, args.vocab)[20:]  # after warm-up
        print(f"{args.device} batch {bs}: scheduler decode step host time median {1e6 * statistics.median(times):.0f} us "
              f"(p90 {1e6 * sorted(times)[int(0.9 * len(times))]:.0f} us)", flush=True)  # fmt: skip
        if args.gpu_step_us > 0:
            cycles = int(args.gpu_step_us * spin_cycles_per_us())
            for overlap in (False, True):
                t = decode_step_times(args.device, bs, args.input_len, args.steps, args.vocab, cycles, overlap)[20:]
                print(f"  with {args.gpu_step_us:.0f} us of GPU work per step, {'overlap' if overlap else 'sync   '}: "
                      f"step {1e6 * statistics.median(t):.0f} us", flush=True)


if __name__ == "__main__":
    main()
