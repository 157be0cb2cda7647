"""Benchmark of the Triton paged attention kernels at Gemma 4 26B-A4B shapes, on one GPU.

  python benchmark/bench_attention.py            # table (default tiles) + tile/split sweep
  python benchmark/bench_attention.py --quick    # table only
  python benchmark/bench_attention.py --aot      # no GPU: compile for sm_90, print regs/spills/SASS ops

Geometries (16 query heads): sliding = 8 KV heads x 256, window 1024; full = 2 KV heads x 512.
Decode: one layer's attention (split-K stage 1 + merge) for B requests all at context C; bytes
counted are the K and V rows the layer must read (B * min(C, W) * KVH * d * 2 * elem) and the
fraction printed is that over time, divided by the device-to-device copy bandwidth measured in the
same run (bytes read + written). Extend: one layer over a 1000-token prompt (and a 1000-token chunk
on a 7000-token prefix), TFLOP/s counting only visible (causal / window) score entries.

Timing: each point captures N calls in one CUDA graph (serving decodes under graphs; Triton's
Python launch cost would otherwise dominate) cycling over enough distinct KV pools that the data
does not sit in L2 (50-60 MB), replays it, and takes the median over replays divided by N.
Requests' KV slots are contiguous per request (what a fresh allocator hands out). Random data only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from sglang.srt.layers.attention.triton_ops.decode_attention import (
    DecodeConfig, decode_attention_fwd, decode_num_splits, default_decode_config, num_sms,
)  # fmt: skip
from sglang.srt.layers.attention.triton_ops.extend_attention import (
    ExtendConfig, default_extend_config, extend_attention_fwd,
)  # fmt: skip

HEADS = 16


@dataclass(frozen=True)
class Geom:
    name: str
    kv_heads: int
    head_dim: int
    window: int | None


SLIDING = Geom("sliding", 8, 256, 1024)
FULL = Geom("full", 2, 512, None)
L2_ROTATE_BYTES = 256 << 20  # touch at least this much distinct KV per graph to defeat L2


# ----------------------------------------------------------------------------- setup and timing


@dataclass
class Pools:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    req_to_token: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor


def kv_read_bytes(g: Geom, batch: int, ctx: int, elem: int) -> int:
    kv_len = min(ctx, g.window) if g.window else ctx
    return batch * kv_len * g.kv_heads * g.head_dim * 2 * elem


def make_pools(g: Geom, seq_lens: list[int], kv_dtype: torch.dtype, read_bytes: int) -> Pools:
    """Distinct K/V buffers (one per simulated layer) so that a graph cycling over them reads
    at least L2_ROTATE_BYTES; request i owns slots [1 + sum(seq_lens[:i]), ...)."""
    total = sum(seq_lens)
    copies = max(1, min(32, -(-L2_ROTATE_BYTES // max(read_bytes, 1))))
    ks, vs = [], []
    for _ in range(copies):
        for bufs in (ks, vs):
            t = torch.randn(total + 1, g.kv_heads, g.head_dim, device="cuda") * g.head_dim**-0.25
            bufs.append(t.to(kv_dtype))
    r2t = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int64, device="cuda")
    start = 1
    for i, s in enumerate(seq_lens):
        r2t[i, :s] = torch.arange(start, start + s, device="cuda")
        start += s
    rows = torch.arange(len(seq_lens), device="cuda")
    return Pools(ks, vs, r2t, rows, torch.tensor(seq_lens, device="cuda"))


def graph_time_us(fn, n_layers: int, calls: int = 32, replays: int = 15) -> float:
    """Median over replays of a graph of `calls` invocations fn(i % n_layers), per invocation."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(2):  # warm-up: compile and allocate outside the capture
            fn(i % n_layers)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % n_layers)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB: (bytes read + bytes written) / time."""
    src = torch.randn(512 << 20, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- measurements


def bench_decode(
    g: Geom, batch: int, ctx: int, kv_dtype: torch.dtype, copy_gbs: float,
    cfg: DecodeConfig | None = None, splits: int | None = None,
) -> dict:  # fmt: skip
    elem = torch.empty((), dtype=kv_dtype).element_size()
    nbytes = kv_read_bytes(g, batch, ctx, elem)
    pools = make_pools(g, [ctx] * batch, kv_dtype, nbytes)
    q = torch.randn(batch, HEADS, g.head_dim, device="cuda").bfloat16()
    out = torch.empty_like(q)
    splits = splits or decode_num_splits(batch, g.kv_heads, num_sms("cuda"))

    def call(i: int) -> None:
        decode_attention_fwd(
            q, pools.k[i], pools.v[i], out, pools.req_to_token, pools.req_pool_indices, pools.seq_lens,
            1.0, splits, g.window, config=cfg,
        )  # fmt: skip

    us = graph_time_us(call, len(pools.k))
    gbs = nbytes / (us * 1e-6) / 1e9
    cfg = cfg or default_decode_config(g.head_dim, batch, kv_dtype == torch.float8_e4m3fn)
    return dict(kind="decode", geom=g.name, batch=batch, ctx=ctx, kv=str(kv_dtype).split(".")[-1],
                splits=splits, cfg=asdict(cfg), us=us, kv_mb=nbytes / 1e6, gbs=gbs, frac_copy=gbs / copy_gbs)  # fmt: skip


def visible_pairs(g: Geom, prefix: int, new: int) -> int:
    """Score entries a causal (windowed) extend must compute, per query head."""
    w = g.window or 1 << 62
    return sum(min(p + 1, w) for p in range(prefix, prefix + new))


def bench_extend(g: Geom, prefix: int, new: int, cfg: ExtendConfig | None = None) -> dict:
    seq = prefix + new
    pools = make_pools(g, [seq], torch.bfloat16, seq * g.kv_heads * g.head_dim * 4)
    q = torch.randn(new, HEADS, g.head_dim, device="cuda").bfloat16() * g.head_dim**-0.25
    out = torch.empty_like(q)
    ext = torch.tensor([new], device="cuda")
    q_starts = torch.zeros(1, dtype=torch.int64, device="cuda")

    def call(i: int) -> None:
        extend_attention_fwd(
            q, pools.k[i], pools.v[i], out, pools.req_to_token, pools.req_pool_indices, pools.seq_lens,
            ext, q_starts, new, 1.0, g.window, config=cfg,
        )  # fmt: skip

    us = graph_time_us(call, len(pools.k), calls=8, replays=10)
    flops = 4 * HEADS * g.head_dim * visible_pairs(g, prefix, new)
    cfg = cfg or default_extend_config(g.head_dim)
    return dict(kind="extend", geom=g.name, prefix=prefix, new=new, cfg=asdict(cfg), us=us, tflops=flops / (us * 1e-6) / 1e12)  # fmt: skip


# ----------------------------------------------------------------------------- driver


def decode_table(copy_gbs: float, results: list[dict]) -> None:
    print(f"\n## decode, one layer, default tiles (copy bandwidth {copy_gbs:.0f} GB/s)")
    print("| geometry | KV | batch | context | splits | time us | KV MB read | GB/s | / copy bw |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for g in (SLIDING, FULL):
            for batch in (1, 16, 64):
                for ctx in (1024, 8192):
                    if kv_dtype != torch.bfloat16 and (batch == 16 or ctx != 8192):
                        continue
                    r = bench_decode(g, batch, ctx, kv_dtype, copy_gbs)
                    results.append(r)
                    print(f"| {g.name} | {r['kv']} | {batch} | {ctx} | {r['splits']} | {r['us']:.1f} | {r['kv_mb']:.1f} | {r['gbs']:.0f} | {r['frac_copy']:.2f} |", flush=True)  # fmt: skip


def extend_table(results: list[dict]) -> None:
    print("\n## extend, one layer, bf16 KV, default tiles")
    print("| geometry | prefix | new tokens | time us | TFLOP/s |")
    print("|---|---|---|---|---|")
    for g in (SLIDING, FULL):
        for prefix in (0, 7000):
            r = bench_extend(g, prefix, 1000)
            results.append(r)
            print(f"| {g.name} | {prefix} | 1000 | {r['us']:.1f} | {r['tflops']:.1f} |", flush=True)


# Sweep points: (geometry, batch, context, kv dtype, tiles or None, splits or None); extend: tiles.
BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn
DECODE_SWEEP = [
    (FULL, 1, 8192, BF16, DecodeConfig(32, 4, 4, 128), None),
    (FULL, 1, 8192, BF16, DecodeConfig(32, 4, 3, 64), None),
    (FULL, 1, 8192, BF16, DecodeConfig(16, 4, 3, 128), None),
    (FULL, 1, 8192, BF16, None, 128),
    (FULL, 64, 8192, BF16, DecodeConfig(32, 4, 4, 128), None),
    (FULL, 64, 8192, BF16, DecodeConfig(32, 8, 3, 128), None),
    (FULL, 64, 8192, BF16, DecodeConfig(16, 4, 4, 128), None),
    (SLIDING, 64, 8192, BF16, DecodeConfig(32, 4, 4, 64), None),
    (SLIDING, 64, 8192, BF16, DecodeConfig(16, 4, 3, 64), None),
    (SLIDING, 1, 8192, BF16, DecodeConfig(32, 4, 3, 128), None),
    (SLIDING, 1, 8192, BF16, DecodeConfig(32, 4, 3, 32), None),
    (FULL, 64, 8192, FP8, DecodeConfig(32, 4, 4, 128), None),
    (FULL, 64, 8192, FP8, DecodeConfig(64, 4, 3, 128), None),
    (SLIDING, 64, 8192, FP8, DecodeConfig(64, 4, 3, 64), None),
    # fp8 sliding defaults to 2 warps from batch 16, and splits round down: the alternatives.
    (SLIDING, 64, 1024, FP8, DecodeConfig(32, 4, 3, 32), None),
    (SLIDING, 64, 1024, FP8, DecodeConfig(64, 4, 3, 32), None),
    (FULL, 64, 1024, FP8, None, 3),
    (FULL, 64, 1024, BF16, None, 3),
]  # fmt: skip
EXTEND_SWEEP = [
    (SLIDING, ExtendConfig(64, 32, 8, 3)),
    (FULL, ExtendConfig(16, 32, 4, 2)),
    (FULL, ExtendConfig(32, 32, 4, 3)),
]  # fmt: skip


def sweep(copy_gbs: float, results: list[dict], deadline: float) -> None:
    """Alternative tiles and split counts; a point that fails (e.g. out of shared memory) is
    reported and skipped; stops early (saying so) past the deadline."""
    print("\n## sweep: decode tiles / splits, extend tiles (1000-token prompt)")
    print("| point | tiles (block_n/m, warps, stages, min_chunk) | splits | time us | / copy bw or TFLOP/s |")
    print("|---|---|---|---|---|")
    points = [("decode", p) for p in DECODE_SWEEP] + [("extend", p) for p in EXTEND_SWEEP]
    for kind, p in points:
        if time.time() > deadline:
            print("| (sweep stopped at the time budget) | | | | |")
            return
        try:
            if kind == "decode":
                g, batch, ctx, kv, cfg, splits = p
                r = bench_decode(g, batch, ctx, kv, copy_gbs, cfg=cfg, splits=splits)
                label, ratio = f"decode {g.name} {r['kv']} b{batch} c{ctx}", r["frac_copy"]
            else:
                g, cfg = p
                r = bench_extend(g, 0, 1000, cfg=cfg)
                label, ratio = f"extend {g.name} 1000", r["tflops"]
        except Exception as e:  # noqa: BLE001 - a tile that does not fit is a result too
            print(f"| {kind} {p[0].name} | {p[-2] if kind == 'decode' else p[1]} | failed: {type(e).__name__} | | |", flush=True)
            continue
        results.append(r)
        print(f"| {label} | {tuple(r['cfg'].values())} | {r.get('splits', '-')} | {r['us']:.1f} | {ratio:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="table only, no sweep")
    ap.add_argument("--aot", action="store_true", help="compile for sm_90 without a GPU and report resources")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no sweep point after this")
    args = ap.parse_args()
    if args.aot:
        return aot_report()
    deadline = time.time() + args.budget_s
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    results: list[dict] = []
    decode_table(copy_gbs, results)
    extend_table(results)
    if not args.quick:
        sweep(copy_gbs, results, deadline)
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(dict(device=props.name, copy_gbs=copy_gbs, results=results), f, indent=1)


# ----------------------------------------------------------------------------- CPU-side compile report


def aot_report() -> None:
    """Build each kernel for sm_90 with the JIT's usual specialisation (aligned pointers, strides
    divisible by 16) and print registers, stack (spills) and the count of key SASS instructions."""
    import subprocess
    import tempfile

    import triton

    from sglang.srt.layers.attention.triton_ops import decode_attention as D
    from sglang.srt.layers.attention.triton_ops import extend_attention as E
    from sm90_build import build_sm90

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

    def build(fn, types: dict, consts: dict, warps: int, stages: int) -> str:
        k = build_sm90(fn, types, consts, warps, stages)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([f"{bindir}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([f"{bindir}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
        usage = [t for t in res.split() if t.startswith(("REG:", "STACK:"))]
        ops = {op: sass.count(op) for op in ("LDGSTS", "LDG.E.128", "HMMA", "HGMMA", "STL", "LDL", " F2F.")}
        return f"{' '.join(usage)} shared={k.metadata.shared} {ops}"

    common = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "req_to_token": "*i64", "req_pool_indices": "*i64",
              "seq_lens": "*i64", "scale_log2": "fp32", "v_scale": "fp32"}  # fmt: skip
    for g in (SLIDING, FULL):
        group, d, sliding = HEADS // g.kv_heads, g.head_dim, g.window is not None
        c = D.default_decode_config(d)
        consts = dict(NUM_HEADS=HEADS, GROUP=group, BLOCK_H=16, HEAD_DIM=d, BLOCK_D=d, BLOCK_N=c.block_n,
                      SLIDING=sliding, DOT_PRECISION="tf32", DIRECT_OUT=False, FP8_KV=False)  # fmt: skip
        types = dict(common, MidO="*fp32", MidLse="*fp32", O="*bf16")
        print(f"decode {g.name} {c}: {build(D._decode_stage1, types, consts, c.num_warps, c.num_stages)}")
        fp8 = dict(types, K="*fp8e4nv", V="*fp8e4nv")
        fp8_consts = dict(consts, FP8_KV=True, V_PAIRS=True)
        print(f"decode {g.name} fp8 KV: {build(D._decode_stage1, fp8, fp8_consts, c.num_warps, c.num_stages)}")
        e = E.default_extend_config(d)
        consts = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=d, BLOCK_M=e.block_m, BLOCK_N=e.block_n,
                      SLIDING=sliding, DOT_PRECISION="tf32", FP8_KV=False)  # fmt: skip
        types = dict(common, O="*bf16", extend_lens="*i64", q_starts="*i64")
        print(f"extend {g.name} {e}: {build(E._extend_kernel, types, consts, e.num_warps, e.num_stages)}")


if __name__ == "__main__":
    main()
