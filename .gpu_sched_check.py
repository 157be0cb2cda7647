import sys, time, torch
sys.path.insert(0, "python")
from sglang.srt.server_args import ServerArgs
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.sampling.sampling_params import SamplingParams
print("cuda", torch.cuda.get_device_name(0))
a = ServerArgs(model_path="sglang-demo/gemma4-tiny-nvfp4", device="cuda", max_total_tokens=192, dtype="float32", chunked_prefill_size=16, schedule_conservativeness=0.3, log_level="warning")
print("backends", a.moe_runner_backend, a.attention_backend)
s = Scheduler(a)
def run(prompts, **kw):
    for i, p in enumerate(prompts):
        s.add_request(TokenizedGenerateReqInput(str(i), p, SamplingParams(max_new_tokens=24, ignore_eos=True, **kw)))
    outs = {}
    while not s.is_idle():
        for o in s.step():
            outs.setdefault(o.rid, []).extend(o.new_token_ids)
    return [outs[str(i)] for i in range(len(prompts))]
prompts = [[2] + [(i * 31 + j * 7) % 700 + 5 for j in range(23)] for i in range(20)]
t = time.time(); alone = [run([p], temperature=0)[0] for p in prompts]; print("alone", time.time() - t)
t = time.time(); batched = run(prompts, temperature=0); print("batched", time.time() - t)
print("equal", sum(x == y for x, y in zip(alone, batched)), "/ 20", "retractions", s.stats["num_retractions"], "memory_ok", s.check_memory(), "used", s.kv_used_tokens())
seeded = run(prompts[:4], temperature=1.0, top_p=0.9, top_k=50, seed=5); again = run(prompts[:4], temperature=1.0, top_p=0.9, top_k=50, seed=5)
print("seeded equal", seeded == again)
