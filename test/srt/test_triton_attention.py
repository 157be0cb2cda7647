"""Triton attention backend (paged decode + extend) against the torch reference backend.

Every check builds one ForwardBatch over a paged pool (shuffled slots, several requests, mixed
cached-prefix lengths), runs TritonAttnBackend.forward (which stores the new K/V, then attends) and
compares with TorchNativeAttnBackend on the same pool.

On a CPU host the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before
Triton is imported) at tiny shapes; on a GPU host the same code runs at Gemma 4 shapes.

Tolerance: outputs are bf16 (rounding 2^-8 relative) and the kernels feed softmax weights to the PV
product in bf16, so for bf16 we accept max |out - ref| <= 2e-2 with |ref| <= ~3, and
||out - ref|| / ||ref|| <= 1e-2; fp32 runs (CPU tiny model) must agree to 1e-4.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import ptxas_available, run_compile_child  # noqa: E402

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from sglang.srt.layers.attention.triton_ops import (  # noqa: E402
    DecodeConfig, ExtendConfig, decode_attention_fwd, extend_attention_fwd,
)  # fmt: skip
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import KVCache, LayerKVSpec, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@dataclass
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None


def tol(dtype: torch.dtype) -> tuple[float, float]:
    """(max abs, relative norm) accepted for outputs of this dtype."""
    return (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 1e-2)


def make_batch(
    geoms: list[Geometry], prefix_lens: list[int], extend_lens: list[int], kv_dtype: torch.dtype,
    act_dtype: torch.dtype, seed: int = 0, kv_scales: tuple[float, float] = (1.0, 1.0),
) -> tuple[ForwardBatch, list[RadixAttention], list[tuple[torch.Tensor, ...]]]:  # fmt: skip
    """A pool with every request's prefix already cached at shuffled slots, a ForwardBatch for the
    new tokens, one layer per geometry (layer i uses geoms[i]) and its (q, k, v) inputs."""
    gen = torch.Generator(device=DEV).manual_seed(seed)  # on the device: GPU-sized pools are GBs
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    total = sum(seq_lens)
    specs = [LayerKVSpec(g.kv_heads, g.head_dim) for g in geoms]
    pool = KVCache(total + 8, specs, kv_dtype, DEV)
    r2t = ReqToTokenPool(len(seq_lens) + 2, max(seq_lens) + 4, DEV)
    slots = torch.randperm(total, generator=gen, device=DEV) + 1  # slot 0 is the padding sink
    rows = torch.tensor(random.Random(seed).sample(range(r2t.size), len(seq_lens)), device=DEV)
    out_loc, off = [], 0
    for row, p, s in zip(rows.tolist(), prefix_lens, seq_lens):
        r2t.req_to_token[row, :s] = slots[off : off + s]
        out_loc.append(slots[off + p : off + s])
        off += s
    layers, inputs = [], []
    for i, g in enumerate(geoms):
        layer = RadixAttention(g.heads, g.head_dim, 1.0, g.kv_heads, i, sliding_window=g.window)
        layer.k_scale, layer.v_scale = kv_scales
        layers.append(layer)
        amp = 1.5 * g.head_dim**-0.25  # scores ~ N(0, 1.5^2): softmax neither flat nor one-hot
        kv_all = [torch.randn(total + 9, g.kv_heads, g.head_dim, generator=gen, device=DEV) for _ in range(2)]
        pool.k_buffer[i].copy_((kv_all[0] * amp / kv_scales[0]).to(kv_dtype))
        pool.v_buffer[i].copy_((kv_all[1] / kv_scales[1]).to(kv_dtype))
        n_new = sum(extend_lens)
        q = (torch.randn(n_new, g.heads, g.head_dim, generator=gen, device=DEV) * amp).to(act_dtype)
        k = (torch.randn(n_new, g.kv_heads, g.head_dim, generator=gen, device=DEV) * amp).to(act_dtype)
        v = torch.randn(n_new, g.kv_heads, g.head_dim, generator=gen, device=DEV).to(act_dtype)
        inputs.append((q, k, v))
    decode = all(e == 1 for e in extend_lens) and min(prefix_lens) > 0
    batch = ForwardBatch(
        forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
        input_ids=torch.zeros(sum(extend_lens), dtype=torch.int64, device=DEV),
        positions=torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens)]).to(DEV),
        req_pool_indices=rows,
        seq_lens=torch.tensor(seq_lens, device=DEV),
        extend_seq_lens=torch.tensor(extend_lens, device=DEV),
        out_cache_loc=torch.cat(out_loc),
    )  # fmt: skip
    batch.req_to_token_pool, batch.token_to_kv_pool = r2t, pool
    return batch, layers, inputs


def reference(batch: ForwardBatch, layer: RadixAttention, q: torch.Tensor) -> torch.Tensor:
    """Torch backend on a float32 copy of the pool with the KV scales applied (real values)."""
    pool = batch.token_to_kv_pool
    ref_pool = KVCache(pool.size, [LayerKVSpec(1, 1)], torch.float32, DEV)
    i = layer.layer_id
    ref_pool.k_buffer, ref_pool.v_buffer = list(pool.k_buffer), list(pool.v_buffer)
    ref_pool.k_buffer[i] = pool.k_buffer[i].float() * layer.k_scale
    ref_pool.v_buffer[i] = pool.v_buffer[i].float() * layer.v_scale
    ref_batch = ForwardBatch(**{f: getattr(batch, f) for f in batch.__dataclass_fields__})
    ref_batch.token_to_kv_pool = ref_pool
    return TorchNativeAttnBackend().forward_extend(q.float(), layer, ref_batch)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    max_abs, rel = tol(dtype)
    assert out.shape == ref.shape and not out.isnan().any()
    err = (out.float() - ref.float()).abs().max().item()
    rel_err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err <= max_abs and rel_err <= rel, f"max abs {err:.3g}, rel {rel_err:.3g}"


def check_backend(batch, layers, inputs, act_dtype, kv_dtype) -> None:
    backend = TritonAttnBackend()
    backend.init_forward_metadata(batch)
    for layer, (q, k, v) in zip(layers, inputs):
        out = backend.forward(q, k, v, layer, batch)
        assert out.dtype == q.dtype
        # The reference reads what triton's forward() stored: same quantised values.
        assert_close(out, reference(batch, layer, q), act_dtype if kv_dtype != torch.float8_e4m3fn else torch.bfloat16)


# ----------------------------------------------------------------------------- CPU (interpreter) + GPU

TINY = [Geometry(4, 2, 32, 5), Geometry(8, 1, 16, None), Geometry(4, 4, 24, 3)]  # 24: non-power-of-2 dim


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_extend_tiny(act_dtype):
    """Mixed prefixes: fresh prompt, chunk over a long prefix (window < prefix), single-token extend."""
    batch, layers, inputs = make_batch(TINY, [0, 11, 3], [9, 6, 1], act_dtype, act_dtype, seed=1)
    check_backend(batch, layers, inputs, act_dtype, act_dtype)


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_decode_tiny(act_dtype):
    batch, layers, inputs = make_batch(TINY, [1, 17, 6, 40], [1, 1, 1, 1], act_dtype, act_dtype, seed=2)
    check_backend(batch, layers, inputs, act_dtype, act_dtype)


def test_fp8_kv_with_scales_tiny():
    geoms = TINY[:2]
    for prefix, ext in (([5, 12], [4, 3]), ([9, 30], [1, 1])):
        batch, layers, inputs = make_batch(
            geoms, prefix, ext, torch.float8_e4m3fn, torch.bfloat16, seed=3, kv_scales=(0.5, 2.0)
        )
        check_backend(batch, layers, inputs, torch.bfloat16, torch.float8_e4m3fn)


def test_decode_splits_and_tiles_tiny():
    """Split-K with chunks smaller than the context, several key tiles per split, empty splits."""
    geoms = [Geometry(4, 2, 32, 7), Geometry(4, 1, 16, None)]
    batch, layers, inputs = make_batch(geoms, [3, 37, 20], [1, 1, 1], torch.float32, torch.float32, seed=4)
    for layer, (q, k, v) in zip(layers, inputs):
        batch.token_to_kv_pool.set_kv_buffer(layer.layer_id, batch.out_cache_loc, k, v)
        ref = reference(batch, layer, q)
        k_buf, v_buf = batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        for splits, cfg in ((5, DecodeConfig(16, 4, 1, 16)), (3, DecodeConfig(16, 4, 1, 4)), (1, DecodeConfig(16, 4, 1, 16))):
            out = torch.empty_like(q)
            decode_attention_fwd(
                q, k_buf, v_buf, out, batch.req_to_token_pool.req_to_token, batch.req_pool_indices,
                batch.seq_lens, 1.0, splits, layer.sliding_window, config=cfg,
            )  # fmt: skip
            assert_close(out.view(len(q), -1), ref, torch.float32)


def test_extend_tiles_tiny():
    """Small query/key tiles: blocks straddling requests' group rows, window edges, unmasked middles."""
    geoms = [Geometry(4, 2, 16, 6), Geometry(4, 1, 16, None)]
    batch, layers, inputs = make_batch(geoms, [0, 21], [13, 10], torch.float32, torch.float32, seed=5)
    ext = batch.extend_seq_lens
    for layer, (q, k, v) in zip(layers, inputs):
        batch.token_to_kv_pool.set_kv_buffer(layer.layer_id, batch.out_cache_loc, k, v)
        ref = reference(batch, layer, q)
        k_buf, v_buf = batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        out = torch.empty_like(q)
        extend_attention_fwd(
            q, k_buf, v_buf, out, batch.req_to_token_pool.req_to_token, batch.req_pool_indices,
            batch.seq_lens, ext, torch.cumsum(ext, 0) - ext, 13, 1.0, layer.sliding_window,
            config=ExtendConfig(16, 16, 4, 1),
        )  # fmt: skip
        assert_close(out.view(len(q), -1), ref, torch.float32)


# ----------------------------------------------------------------------------- sm_90 build (no GPU)


def _compile_decode_for_sm90() -> None:
    """Both decode kernels as the backend launches them at Gemma 4's shapes (the default tiles at
    batch 1 and 64, bf16 and fp8 KV), built for sm_90 with PDL: each must wait before any global
    access. Run without TRITON_INTERPRET."""
    import inspect

    from conftest import compile_for_sm90

    from sglang.srt.layers.attention.triton_ops import decode_attention as D

    def types(fn, **pointers) -> dict:
        """Runtime parameters in order: the pointers given, two fp32 scales, the rest int32."""
        params = [n for n, p in inspect.signature(fn.fn).parameters.items() if "constexpr" not in str(p.annotation)]
        return {p: pointers.get(p, "fp32" if p in ("scale_log2", "v_scale") else "i32") for p in params}

    for head_dim, kv_heads, sliding in ((256, 8, True), (512, 2, False)):
        for kv, batch in (("*bf16", 1), ("*bf16", 64), ("*fp8e4nv", 1), ("*fp8e4nv", 64)):
            cfg = D.default_decode_config(head_dim, batch, kv == "*fp8e4nv")
            args = types(
                D._decode_stage1, Q="*bf16", K=kv, V=kv, MidO="*fp32", MidLse="*fp32", O="*bf16",
                req_to_token="*i64", req_pool_indices="*i64", seq_lens="*i64",
            )  # fmt: skip
            consts = dict(NUM_HEADS=16, GROUP=16 // kv_heads, BLOCK_H=16, HEAD_DIM=head_dim, BLOCK_D=head_dim,
                          BLOCK_N=cfg.block_n, SLIDING=sliding, DOT_PRECISION="tf32", DIRECT_OUT=batch > 1,
                          FP8_KV=kv == "*fp8e4nv", V_PAIRS=kv == "*fp8e4nv", PDL=True)  # fmt: skip
            compile_for_sm90(D._decode_stage1, args, consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        merge = types(D._decode_stage2, MidO="*fp32", MidLse="*fp32", O="*bf16")
        consts = dict(NUM_HEADS=16, HEAD_DIM=head_dim, BLOCK_DC=64, BLOCK_S=64, PDL=True)
        compile_for_sm90(D._decode_stage2, merge, consts, num_warps=4)


@pytest.mark.skipif(not ptxas_available(), reason="triton ships no ptxas here")
def test_decode_kernels_compile_for_sm90():
    run_compile_child(__file__)


# ----------------------------------------------------------------------------- GPU, Gemma 4 shapes

SLIDING = Geometry(16, 8, 256, 1024)
FULL = Geometry(16, 2, 512, None)


@gpu_only
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_extend_gemma4_shapes(kv_dtype):
    """A 1000-token prompt; a 400-token chunk over a 1600-token prefix (past the window); a mix."""
    for prefix, ext in (([0], [1000]), ([1600], [400]), ([0, 300, 2000], [700, 129, 1])):
        batch, layers, inputs = make_batch([SLIDING, FULL], prefix, ext, kv_dtype, torch.bfloat16, seed=6)
        check_backend(batch, layers, inputs, torch.bfloat16, kv_dtype)


@gpu_only
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("batch_size,context", [(1, 1000), (1, 8192), (64, 1000), (64, 8192)])
def test_decode_gemma4_shapes(kv_dtype, batch_size, context):
    rng = random.Random(batch_size * context)
    prefix = [context - 1] + [rng.randint(1, context - 1) for _ in range(batch_size - 1)]
    batch, layers, inputs = make_batch([SLIDING, FULL], prefix, [1] * batch_size, kv_dtype, torch.bfloat16, seed=7)
    check_backend(batch, layers, inputs, torch.bfloat16, kv_dtype)


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    _compile_decode_for_sm90()
