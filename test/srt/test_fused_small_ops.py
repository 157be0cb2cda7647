"""Fused Triton small-op kernels (sglang.srt.layers.triton_ops) against the torch code they replace.

Every check calls the real dispatch site (RMSNorm, Gemma4Attention with its KV store, the decoder
layer's _post_attention / _combine, FusedMoE, the MLP's act_and_mul, gemma4_topk, compute_logits) once
with the fused kernels forced off (torch: the reference) and once forced on, on the same inputs. On a
CPU host the kernels run under Triton's interpreter at tiny, odd shapes (hidden 48, head dims 32 and
64 with a partial rotary factor, non-power-of-two row counts).

Tolerances. fp32: max |out - ref| <= 2e-6 * max(1, max |ref|) (fp32 reduction order, reciprocal vs
division, last-bit tanh). bf16: the kernels round wherever torch stores a bf16 tensor, so at least 95%
of the elements must be bit-identical and the rest within 2 bf16 ulps (|ref| * 2^-7, plus 1e-6 for
GELU's far negative tail, where 1 + tanh cancels); a missed or extra rounding point breaks the
bit-identical share. Router ids must be equal (logits without ties).
The KV cache the fused norm kernel fills must match the backend's store just as closely (fp8 caches:
the same share of identical codes, the rest within one e4m3 step); its fp8 store of a given value
(division by the scale, e4m3 cast) is bit-exact.
The tiny generated model: fp32 logits within 1e-4 and identical greedy tokens with the kernels on
and off.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from conftest import ptxas_available, run_compile_child  # noqa: E402

from sglang.srt.configs.model_config import LayerSpec  # noqa: E402
from sglang.srt.layers.activation import get_act_and_mul_fn  # noqa: E402
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from sglang.srt.layers.layernorm import RMSNorm  # noqa: E402
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE  # noqa: E402
from sglang.srt.layers.moe.topk import gemma4_topk  # noqa: E402
from sglang.srt.layers.rotary_embedding import RotaryEmbedding  # noqa: E402
from sglang.srt.layers.triton_ops import fused_ops  # noqa: E402
from sglang.srt.layers.triton_ops.qkv_norm_rope import _cache_value  # noqa: E402
from sglang.srt.mem_cache.memory_pool import KVCache, LayerKVSpec, ReqToTokenPool, fp32_reciprocal  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402
from sglang.srt.model_executor.model_runner import ModelRunner  # noqa: E402
from sglang.srt.models.gemma4_causal import Gemma4Attention, Gemma4DecoderLayer, Gemma4ForCausalLM  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.test.make_gemma4_checkpoint import tiny_text_config, write_checkpoint  # noqa: E402
from sglang.test.static_batch import greedy_generate, prefill, release  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
HIDDEN = 48


def both(fn, *args):
    """(fused, torch) results of fn(*args)."""
    with fused_ops(False):
        ref = fn(*args)
    with fused_ops(True):
        out = fn(*args)
    return out, ref


def assert_matches(out, ref) -> None:
    """Tensors, or tuples of tensors / None, agree within the tolerances of the module docstring."""
    if isinstance(ref, (tuple, list)):
        assert len(out) == len(ref)
        for o, r in zip(out, ref):
            assert_matches(o, r)
        return
    if ref is None:
        assert out is None
        return
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    o, r = out.float(), ref.float()
    if ref.dtype == torch.float32:
        assert (o - r).abs().max().item() <= 2e-6 * max(1.0, r.abs().max().item())
        return
    same = (o == r).float().mean().item()
    assert same >= 0.95, f"only {same:.3f} of the elements are bit-identical"
    assert ((o - r).abs() <= r.abs() * 2**-7 + 1e-6).all()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _randn(gen, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, device=DEV) * scale).to(dtype)


def _randomize_norms(module: torch.nn.Module, gen) -> None:
    """Random weights for every RMSNorm (and the router's scales), so no weight is a no-op."""
    for m in module.modules():
        if isinstance(m, RMSNorm) and m.weight is not None:
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen, device=DEV) + 0.5)
    for name in ("scale", "per_expert_scale", "layer_scalar"):
        for m in module.modules():
            p = getattr(m, name, None)
            if isinstance(p, torch.nn.Parameter):
                p.data.copy_(torch.rand(p.shape, generator=gen, device=DEV) + 0.5)


# ---- kernels one by one ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scale", [True, False])
def test_rmsnorm(dtype, with_scale):
    gen = _gen(0)
    norm = RMSNorm(HIDDEN, 1e-6, with_scale=with_scale, params_dtype=dtype).to(DEV)
    _randomize_norms(norm, gen)
    assert_matches(*both(norm, _randn(gen, 7, HIDDEN, dtype=dtype, scale=3.0)))
    # per-head norm of a strided view [T, heads, d], as q_norm sees it
    qkv = _randn(gen, 5, 3 * 40, dtype=dtype)
    assert_matches(*both(RMSNorm(40, 1e-6, with_scale=with_scale, params_dtype=dtype).to(DEV), qkv[:, :80].view(5, 2, 40)))


ATTENTION_CASES = {
    # name: (layer type, head_dim, rope_type, partial_rotary_factor, k_eq_v)
    "sliding-d32": ("sliding_attention", 32, "default", 1.0, False),
    "full-d64-partial-keqv": ("full_attention", 64, "proportional", 0.25, True),
    "full-d64-partial": ("full_attention", 64, "proportional", 0.25, False),
}
# name: (KV dtype, None = the model's; (k_scale, v_scale); hybrid sliding-window pool; decode batch)
KV_CASES = {
    "hybrid-extend": (None, (1.0, 1.0), True, False),
    "flat-decode": (None, (1.0, 1.0), False, True),
    "fp8-scaled-hybrid-decode": (torch.float8_e4m3fn, (0.5, 2.0), True, True),
    "fp8-scaled-flat-extend": (torch.float8_e4m3fn, (0.75, 3.0), False, False),
}


def _place_tokens(table: torch.Tensor, slots: int, rows: list[int], prefix: list[int], seq: list[int], gen) -> torch.Tensor:
    """Shuffled slots out of 1..slots for every token of each request, written into the slot table;
    returns the new tokens' slots."""
    shuffled, start, new = torch.randperm(slots, generator=gen, device=DEV)[: sum(seq)] + 1, 0, []
    for row, p, n in zip(rows, prefix, seq):
        table[row, :n] = shuffled[start : start + n]
        new.append(shuffled[start + p : start + n])
        start += n
    return torch.cat(new)


def _kv_batch(attn: Gemma4Attention, kv_dtype: torch.dtype, hybrid: bool, decode: bool, gen) -> ForwardBatch:
    """A one-layer paged pool holding random KV at shuffled slots and a batch of 5 new tokens over it:
    5 requests with cached prefixes (decode) or fresh prompts of 3 and 2 tokens (extend). A hybrid pool
    gives every token a swa slot too, from a smaller slot space."""
    prefix, new = ([1, 4, 2, 7, 3], [1] * 5) if decode else ([0, 0], [3, 2])
    seq = [p + n for p, n in zip(prefix, new)]
    spec = attn.spec
    layer_kv = LayerKVSpec(spec.num_kv_heads, spec.head_dim, spec.is_sliding)
    pool = KVCache(48, [layer_kv], kv_dtype, DEV, swa_size=24 if hybrid else None)
    for buf in (*pool.k_buffer, *pool.v_buffer):
        buf.copy_(_randn(gen, *buf.shape, scale=2.0).to(kv_dtype))
    r2t = ReqToTokenPool(len(seq) + 1, max(seq) + 2, DEV, hybrid_swa=hybrid)
    rows = list(range(1, len(seq) + 1))
    fb = ForwardBatch(
        forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
        input_ids=torch.zeros(sum(new), dtype=torch.int64, device=DEV),
        positions=torch.cat([torch.arange(p, n) for p, n in zip(prefix, seq)]).to(DEV),
        req_pool_indices=torch.tensor(rows, device=DEV),
        seq_lens=torch.tensor(seq, device=DEV),
        extend_seq_lens=torch.tensor(new, device=DEV),
        out_cache_loc=_place_tokens(r2t.req_to_token, 48, rows, prefix, seq, gen),
        swa_out_cache_loc=_place_tokens(r2t.req_to_swa_token, 24, rows, prefix, seq, gen) if hybrid else None,
    )  # fmt: skip
    fb.req_to_token_pool, fb.token_to_kv_pool, fb.attn_backend = r2t, pool, TritonAttnBackend()
    return fb


def assert_kv_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Cache buffers agree as assert_matches says; fp8 ones (the bf16 rule for the values they were
    cast from, carried over) at least 95% bit-identical and the rest within 1 e4m3 step."""
    if ref.dtype != torch.float8_e4m3fn:
        return assert_matches(out, ref)
    same = (out.view(torch.uint8) == ref.view(torch.uint8)).float().mean().item()
    assert same >= 0.95, f"only {same:.3f} of the fp8 codes are identical"
    o, r = out.float(), ref.float()
    assert ((o - r).abs() <= r.abs() * 2**-3 + 2**-9).all()


@pytest.mark.parametrize(
    "dtype, kv",
    [
        pytest.param(d, kv, id=f"{kv}-{str(d).removeprefix('torch.')}")
        for kv, case in KV_CASES.items()
        for d in DTYPES
        if case[0] is None or d == torch.bfloat16  # fp8 KV goes with bf16 models
    ],
)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_qkv_norm_rope_stores_kv(dtype, kv, case):
    """The whole attention layer (projection, q/k/v norms + rope, KV store, Triton attention, o_proj):
    fused, the norm kernel stores k/v itself; the output and every cache row must match the torch path,
    where the backend stores them."""
    kv_dtype, scales, hybrid, decode = KV_CASES[kv]
    layer_type, head_dim, rope_type, factor, k_eq_v = ATTENTION_CASES[case]
    spec = LayerSpec(layer_type, head_dim, 2, rope_type, 10_000.0, factor, k_eq_v)
    cfg = {"num_attention_heads": 6, "hidden_size": HIDDEN, "rms_norm_eps": 1e-6, "sliding_window": 4}
    attn = Gemma4Attention(cfg, spec, 0, dtype, None, "layers.0.self_attn").to(DEV)
    gen = _gen(1)
    _randomize_norms(attn, gen)
    for p in (attn.qkv_proj.weight, attn.o_proj.weight):
        p.data.copy_(_randn(gen, *p.shape, scale=0.3, dtype=dtype))
    attn.attn.k_scale, attn.attn.v_scale = scales
    x = _randn(gen, 5, HIDDEN, dtype=dtype)
    positions = torch.tensor([0, 1, 7, 300, 4095], device=DEV)  # for rope only: attention goes by seq_lens
    rope = RotaryEmbedding(head_dim, 10_000.0, rope_type, factor).to(DEV).cos_sin(positions)

    def run():
        fb = _kv_batch(attn, kv_dtype or dtype, hybrid, decode, _gen(8))
        return attn(rope, x, fb), fb.token_to_kv_pool

    (out, pool), (ref, ref_pool) = both(run)
    assert_matches(out, ref)
    assert_kv_matches(pool.k_buffer[0], ref_pool.k_buffer[0])
    assert_kv_matches(pool.v_buffer[0], ref_pool.v_buffer[0])


@triton.jit
def _fp8_store_kernel(x_ptr, out_ptr, n, inv_scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, _cache_value(x, inv_scale, x_ptr.dtype.element_ty, tl.uint8), mask=mask)


@pytest.mark.filterwarnings("ignore:.*encountered in multiply:RuntimeWarning")  # the interpreter's numpy, inf/NaN
@pytest.mark.parametrize("scale", [1.0, 0.75, 3.0, 0.0173])
def test_fp8_store_is_bit_exact(scale):
    """The fused kernel's fp8 store of a value against KVCache.set_kv_buffer's, bit for bit but for the
    sign of NaNs: every bf16 value (NaNs, infs, subnormals included; divided by the scale in bf16),
    random fp32 bit patterns and the e4m3 rounding edges (ties at the subnormal step, 464 = the tie
    above 448, 480 and up)."""
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    bits = torch.randint(-(2**31), 2**31, (2**14,), generator=torch.Generator().manual_seed(9), dtype=torch.int64)
    edges = torch.tensor([448.0, 464.0, 464.00003, 479.99997, 480.0, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-10, -0.0])
    for x in (every_bf16.to(DEV), torch.cat([bits.to(torch.int32).view(torch.float32), edges]).to(DEV)):
        pool = KVCache(x.numel(), [LayerKVSpec(1, 1)], torch.float8_e4m3fn, DEV)
        rows = x.view(-1, 1, 1)
        pool.set_kv_buffer(0, torch.arange(1, x.numel() + 1, device=DEV), rows, rows, scale, scale)
        out = torch.empty(x.shape, dtype=torch.uint8, device=DEV)
        _fp8_store_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), fp32_reciprocal(scale), BLOCK=4096)
        ref = pool.k_buffer[0][1:].view(torch.uint8).flatten()
        # a NaN's sign after the multiply depends on the device (CUDA's NaN is canonical, positive)
        both_nan = (out & 0x7F == 0x7F) & (ref & 0x7F == 0x7F)
        assert ((out == ref) | both_nan).all()


def _layer(dtype, enable_moe: bool) -> Gemma4DecoderLayer:
    cfg = {
        "hidden_size": HIDDEN, "num_attention_heads": 2, "intermediate_size": 40, "rms_norm_eps": 1e-6,
        "enable_moe_block": enable_moe, "num_experts": 6, "top_k_experts": 2, "moe_intermediate_size": 16,
    }  # fmt: skip
    spec = LayerSpec("sliding_attention", 16, 1, "default", 10_000.0, 1.0, False)
    layer = Gemma4DecoderLayer(cfg, spec, 0, dtype, None, "layers.0", "torch").to(DEV)
    _randomize_norms(layer, _gen(2))
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("enable_moe", [True, False])
def test_post_attention_norms(dtype, enable_moe):
    layer = _layer(dtype, enable_moe)
    gen = _gen(3)
    h, attn = _randn(gen, 7, HIDDEN, dtype=dtype, scale=4.0), _randn(gen, 7, HIDDEN, dtype=dtype)
    out, ref = both(layer._post_attention, h, attn)
    assert (out[2] is None) == (not enable_moe)
    assert_matches(out, ref)


def _combine_inputs(dtype, gen) -> tuple[RMSNorm, torch.Tensor, torch.Tensor]:
    """(next_norm, h, dense) for a combine of 5 tokens."""
    next_norm = RMSNorm(HIDDEN, 1e-6, params_dtype=dtype).to(DEV)
    _randomize_norms(next_norm, gen)
    return next_norm, _randn(gen, 5, HIDDEN, dtype=dtype, scale=4.0), _randn(gen, 5, HIDDEN, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("enable_moe", [True, False])
def test_ffn_combine(dtype, enable_moe):
    layer = _layer(dtype, enable_moe)
    gen = _gen(4)
    next_norm, h, dense = _combine_inputs(dtype, gen)
    moe = _randn(gen, 5, HIDDEN, dtype=dtype, scale=0.3) if enable_moe else None
    assert_matches(*both(layer._combine, h, dense, moe, next_norm))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_ffn_combine_sums_moe_pairs(dtype, top_k):
    """Given the experts' unsummed pair terms [T, top_k, H], the fused combine sums them itself: as the
    torch combine of their torch sum."""
    layer = _layer(dtype, True)
    gen = _gen(4)
    next_norm, h, dense = _combine_inputs(dtype, gen)
    pairs = _randn(gen, 5, top_k, HIDDEN, dtype=dtype, scale=0.3)
    with fused_ops(True):
        out = layer._combine(h, dense, pairs, next_norm)
    with fused_ops(False):
        ref = layer._combine(h, dense, pairs.sum(dim=1), next_norm)
    assert_matches(out, ref)


@pytest.mark.parametrize("backend, top_k", [("triton", 3), ("triton", 1), ("torch", 3)])
def test_moe_keep_pairs(backend, top_k):
    """FusedMoE(keep_pairs=True): the triton runner's weighted pair terms [M, top_k, H], which sum (as
    fused_experts sums them) to its usual output bit for bit; top-k 1 and runners without pair terms
    (torch) return that output [M, H] itself."""
    gen = _gen(10)
    moe = FusedMoE(5, top_k, HIDDEN, 32, torch.bfloat16, moe_runner_backend=backend).to(DEV)
    for w in (moe.w13_weight, moe.w2_weight):
        w.data.copy_(_randn(gen, *w.shape, scale=0.1))
    moe.quant_method.process_weights_after_loading(moe)
    x = _randn(gen, 7, HIDDEN, dtype=torch.bfloat16)
    topk = gemma4_topk(_distinct_logits(7, 5, seed=10), top_k)
    out, pairs = moe(x, topk), moe(x, topk, keep_pairs=True)
    if backend == "triton" and top_k > 1:
        assert pairs.shape == (7, top_k, HIDDEN)
        pairs = pairs.sum(dim=1)
    assert torch.equal(pairs, out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_and_mul(dtype):
    act_and_mul = get_act_and_mul_fn("gelu_pytorch_tanh")
    gen = _gen(5)
    for tokens, inter in ((3, 40), (2, 1100)):  # 1100: more than one column block
        assert_matches(*both(act_and_mul, _randn(gen, tokens, 2 * inter, dtype=dtype, scale=2.0)))


def _distinct_logits(tokens: int, experts: int, seed: int) -> torch.Tensor:
    """Logits without ties, exact in bf16: each row a random permutation of i / 16 - 4."""
    g = torch.Generator().manual_seed(seed)
    return (torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)]).float() / 16 - 4).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts, top_k", [(6, 2), (128, 8)])
def test_router_topk(dtype, experts, top_k):
    gen = _gen(6)
    logits = _distinct_logits(9, experts, seed=6).to(dtype)
    scale = (torch.rand(experts, generator=gen, device=DEV) + 0.5).to(dtype)
    out, ref = both(gemma4_topk, logits, top_k, scale)
    assert torch.equal(out.topk_ids, ref.topk_ids) and out.topk_ids.dtype == torch.int32
    assert torch.equal(out.router_logits, ref.router_logits)
    torch.testing.assert_close(out.topk_weights, ref.topk_weights, rtol=2e-6, atol=1e-7)
    no_scale, _ = both(gemma4_topk, logits, top_k, None)
    scaled = no_scale.topk_weights * scale.float()[ref.topk_ids.long()]
    torch.testing.assert_close(scaled, ref.topk_weights, rtol=2e-6, atol=1e-7)


def test_router_topk_ties_pick_the_lowest_expert_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, 1.0]], device=DEV)
    with fused_ops(True):
        out = gemma4_topk(logits, 4)
    assert out.topk_ids.tolist() == [[1, 3, 2, 4]]
    e = torch.tensor([2.0, 2.0, 1.0, 1.0]).exp()
    torch.testing.assert_close(out.topk_weights.cpu(), (e / e.sum())[None])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_logits(dtype):
    gen = _gen(7)
    model = SimpleNamespace(final_logit_softcapping=30.0)
    weight = _randn(gen, 50, HIDDEN, dtype=dtype, scale=0.5)
    model.lm_head_weight = lambda: weight
    hidden = _randn(gen, 3, HIDDEN, dtype=dtype, scale=4.0)
    out, ref = both(Gemma4ForCausalLM.compute_logits, model, hidden)
    assert out.dtype == torch.float32 and ref.abs().max() > 15  # the cap really bends some logits
    assert_matches(out, ref)


@pytest.mark.parametrize("n, k", [(37, 100), (130, 2112), (9, 64)])
@pytest.mark.parametrize("config", [None, (4, 64, 4, 2), (8, 128, 4, 3), (8, 32, 2, 3)])
def test_gemv_single_row(n, k, config):
    """The batch-1 dense GEMV through the linear layers' dispatch (one bf16 row), with the shape's
    default tiles and with forced ones (K multiple of the block or not, N not a multiple; 2 and 3
    steps in flight, also with fewer steps than that)."""
    from sglang.srt.layers.linear import dense_linear
    from sglang.srt.layers.triton_ops.gemv import gemv

    gen = _gen(11)
    weight = _randn(gen, n, k, dtype=torch.bfloat16, scale=0.1)
    x = _randn(gen, 1, k, dtype=torch.bfloat16)
    out, ref = both(dense_linear, x, weight)
    assert_matches(out, ref)
    assert_matches(gemv(x, weight, config), ref)


@pytest.mark.parametrize("inter, k, config", [(40, 100, None), (1100, 64, None), (37, 130, (8, 64, 4, 2)), (5, 96, (2, 32, 4, 1))])
def test_gemv_gelu_tanh_and_mul(inter, k, config):
    """The dense MLP's gate_up projection with tanh-GELU(gate) * up in the GEMV's epilogue, through
    Gemma4MLP's dispatch and with forced tiles (inter not a multiple of the outputs a program)."""
    from sglang.srt.layers.triton_ops.gemv import gemv_gelu_tanh_and_mul
    from sglang.srt.models.gemma4_causal import Gemma4MLP

    gen = _gen(12)
    mlp = Gemma4MLP(k, inter, "gelu_pytorch_tanh", torch.bfloat16, None, "mlp").to(DEV)
    for param in mlp.parameters():
        param.data.copy_(_randn(gen, *param.shape, dtype=torch.bfloat16, scale=0.2))
    x = _randn(gen, 1, k, dtype=torch.bfloat16)
    assert_matches(*both(mlp, x))
    ref = get_act_and_mul_fn("gelu_pytorch_tanh")(torch.nn.functional.linear(x, mlp.gate_up_proj.weight))
    assert_matches(gemv_gelu_tanh_and_mul(x, mlp.gate_up_proj.weight, config), ref)
    with fused_ops(True):  # the fused launch is what the MLP takes for one row, and only there
        assert mlp.gate_up_proj.forward_gelu_tanh_and_mul(x) is not None
        assert mlp.gate_up_proj.forward_gelu_tanh_and_mul(x.repeat(2, 1)) is None


def test_gemv_rejects_bad_stages():
    from sglang.srt.layers.triton_ops.gemv import gemv

    with pytest.raises(ValueError, match="stages"):
        gemv(torch.randn(1, 64, device=DEV).bfloat16(), torch.randn(8, 64, device=DEV).bfloat16(), (4, 64, 4, 4))


def test_gemv_is_used_only_where_it_applies():
    from sglang.srt.layers.triton_ops.gemv import supports

    w = torch.empty(16, 32, dtype=torch.bfloat16)
    assert supports(torch.empty(1, 32, dtype=torch.bfloat16), w)
    assert not supports(torch.empty(2, 32, dtype=torch.bfloat16), w)  # two rows: cuBLAS
    assert not supports(torch.empty(1, 32), w.float())  # fp32
    assert not supports(torch.empty(1, 32, dtype=torch.bfloat16), w.t().contiguous().t()[:, :32][:16])  # K-strided


# ---- the whole model ---------------------------------------------------------------------------


E2E_CASES = {
    # name: (attention backend, hybrid sliding-window pool, MoE runner)
    "torch-attention-hybrid-torch-moe": ("torch_native", True, "torch"),
    "triton-attention-flat-triton-moe": ("triton", False, "triton"),
}


def _use_triton_moe(runner: ModelRunner) -> None:
    """Repack every layer's experts for the triton runner (loaded for torch: ServerArgs refuses triton
    on CPU)."""
    for layer in runner.model.model.layers:
        layer.experts.moe_runner_backend = "triton"
        layer.experts.quant_method.process_weights_after_loading(layer.experts)


@pytest.mark.parametrize("case", list(E2E_CASES))
def test_tiny_model_fused_vs_torch(tmp_path, case):
    """Fused on: k/v stored by the norm kernel (swa slots of a hybrid pool, or one pool), and with the
    triton MoE runner the experts' pair terms summed in the combine kernel."""
    attention, hybrid, moe = E2E_CASES[case]
    # Two layers: sliding, full (k_eq_v, partial rope), both MoE.
    path = write_checkpoint(tmp_path / "ck", "nvfp4-per-expert", seed=5, text_config=tiny_text_config(num_hidden_layers=2))
    # Eager: a CUDA graph would replay whichever path it captured.
    args = ServerArgs(
        model_path=str(path), dtype="float32", device=DEV, max_total_tokens=256, disable_cuda_graph=True,
        attention_backend=attention, disable_hybrid_swa_memory=not hybrid, moe_runner_backend="torch",
    )  # fmt: skip
    runner = ModelRunner(args)
    assert (runner.swa_allocator is not None) == hybrid
    if moe == "triton":
        _use_triton_moe(runner)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(110, runner.model_config.vocab_size, (n,), generator=g).tolist() for n in (7, 3)]

    def run():
        batch, out = prefill(runner, prompts, return_all_logits=True)
        release(runner, batch)
        return out.all_logits, greedy_generate(runner, prompts, 4)

    (logits, tokens), (ref_logits, ref_tokens) = both(run)
    # On a GPU the triton MoE kernels multiply fp32 activations on TF32 tensor cores (10-bit
    # mantissa), so the fused ops' last-bit differences come out of the experts ~1e-3 large.
    tol = 1e-2 if moe == "triton" and DEV == "cuda" else 1e-4
    assert (logits - ref_logits).abs().max().item() < tol
    assert tokens == ref_tokens


# ---- GPU compilation (no GPU needed) -----------------------------------------------------------
# The interpreter never compiles the kernels, so this compiles each for sm_90 at the 26B model's
# shapes (hidden 2816, 16 heads, head dims 256 and 512, 128 experts, top-8) with the GPU branches of
# the helpers, in a subprocess without TRITON_INTERPRET.


def _compile_for_sm90() -> None:
    from conftest import compile_for_sm90

    from sglang.srt.layers.triton_ops import (
        ffn_combine, gelu_and_mul, gemv, post_attention_norms, qkv_norm_rope, rmsnorm, router_topk, softcap,
    )  # fmt: skip

    bf, f32, i32 = "*bf16", "fp32", "i32"

    # Constant weights each PDL kernel loads before waiting for its predecessor, on purpose.
    early_reads = {
        gemv._gemv_kernel: ("w_ptr",),
        ffn_combine._ffn_combine_kernel: ("w_dense_ptr", "w_moe_ptr", "w_post_ptr", "w_next_ptr", "scalar_ptr"),
        post_attention_norms._post_attention_norms_kernel: ("w_post_ptr", "w_mlp_ptr", "w_moe_ptr", "router_scale_ptr"),
        qkv_norm_rope._qkv_norm_rope_kernel: ("qw_ptr", "kw_ptr"),
    }

    def compile_one(fn, args: dict, consts: dict, num_warps: int) -> None:
        compile_for_sm90(fn, args, consts, early_reads.get(fn, ()), num_warps=num_warps, enable_fp_fusion=False)

    norm = dict(x_ptr=bf, w_ptr=bf, out_ptr=bf, stride_x=i32, n_cols=i32, inv_n=f32, eps=f32)
    compile_one(rmsnorm._rmsnorm_kernel, norm, {"HAS_W": True, "BLOCK": 4096}, 8)
    compile_one(softcap._softcap_kernel, dict(x_ptr=bf, out_ptr="*fp32", n=i32, cap=f32, inv_cap=f32), {"BLOCK": 1024}, 4)
    gelu = dict(gu_ptr=bf, out_ptr=bf, stride_gu=i32, n_inter=i32)
    compile_one(gelu_and_mul._gelu_tanh_and_mul_kernel, gelu, {"BLOCK": 1024, "PDL": True}, 4)
    for cache in (bf, "*u8"):  # bf16 or fp8 KV cache
        qkv = dict(
            qkv_ptr=bf, q_ptr=bf, k_cache=cache, v_cache=cache, loc_ptr="*i64", qw_ptr=bf, kw_ptr=bf, cos_ptr="*fp32",
            sin_ptr="*fp32", stride_qkv=i32, stride_cs=i32, stride_k_cache=i32, stride_v_cache=i32, num_heads=i32,
            num_kv_heads=i32, v_col=i32, inv_d=f32, eps=f32, inv_k_scale=f32, inv_v_scale=f32,
        )  # fmt: skip
        for head_dim in (256, 512):
            consts = {"HEAD_DIM": head_dim, "BLOCK_H": 16, "BLOCK_HALF": head_dim // 2, "PDL": True}
            compile_one(qkv_norm_rope._qkv_norm_rope_kernel, qkv, consts, 8)
    post = dict(
        h_ptr=bf, attn_ptr=bf, w_post_ptr=bf, w_mlp_ptr=bf, w_moe_ptr=bf, router_scale_ptr=bf, h_out=bf, mlp_out=bf,
        moe_out=bf, router_out=bf, stride_h=i32, stride_attn=i32, n_cols=i32, inv_n=f32, eps=f32, root_size=f32,
    )  # fmt: skip
    combine = dict(
        h_ptr=bf, dense_ptr=bf, moe_ptr=bf, w_dense_ptr=bf, w_moe_ptr=bf, w_post_ptr=bf, scalar_ptr=bf, w_next_ptr=bf,
        h_out=bf, next_out=bf, stride_h=i32, stride_dense=i32, stride_moe=i32, stride_pair=i32, n_cols=i32, inv_n=f32,
        eps=f32,
    )  # fmt: skip
    for has_moe in (True, False):
        consts = {"HAS_MOE": has_moe, "BLOCK": 4096, "PDL": True}
        compile_one(post_attention_norms._post_attention_norms_kernel, post, consts, 8)
        consts = {"HAS_MOE": has_moe, "TOP_K": 8 if has_moe else 1, "BLOCK": 4096, "PDL": True}  # MoE: 8 pair rows
        compile_one(ffn_combine._ffn_combine_kernel, combine, consts, 8)
    topk = dict(
        logits_ptr=bf, scale_ptr=bf, weights_ptr="*fp32", ids_ptr="*i32", logits_out_ptr="*fp32", stride_logits=i32,
        num_experts=i32,
    )  # fmt: skip
    compile_one(router_topk._router_topk_kernel, topk, {"HAS_SCALE": True, "TOP_K": 8, "BLOCK_E": 128, "BLOCK_K": 8, "PDL": True}, 1)
    gemv_args = dict(x_ptr=bf, w_ptr=bf, y_ptr=bf, N=i32, K=i32, stride_wn=i32)
    tiles = ((8, 256, False, True, 3), (4, 1024, False, False, 1), (8, 1024, True, True, 2))
    for block_n, block_k, gated, pdl, stages in tiles:
        consts = dict(BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=False, GATED=gated, PDL=pdl, STAGES=stages)
        compile_one(gemv._gemv_kernel, gemv_args, consts, 4)


_PDL_PTX = """
    .param .u64 .ptr .global .align 1 k_param_0,
    .param .u64 .ptr .global .align 1 k_param_1,
    .param .u32 k_param_2
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_1];
    ld.param.b32 %r1, [k_param_2];
    mul.wide.s32 %rd3, %r1, 2;
    add.s64 %rd4, %rd1, %rd3;
    @%p1 ld.global.b16 { %rs1 }, [ %rd4 + 0 ];  // EARLY
    griddepcontrol.wait ;
    ld.global.b16 { %rs2 }, [ %rd2 + 0 ];
"""


def test_pdl_check_traces_early_loads_to_their_pointer_parameters():
    """The PTX check of the compile tests: a load before the wait passes only when the pointer its
    address is computed from is a named weight; a store before the wait never does."""
    from conftest import assert_pdl_waits_first

    params = ["w_ptr", "x_ptr", "n"]
    assert_pdl_waits_first(_PDL_PTX, "k", params, ["w_ptr"])
    with pytest.raises(AssertionError, match="w_ptr"):
        assert_pdl_waits_first(_PDL_PTX, "k", params)
    activation_early = _PDL_PTX.replace("// EARLY", "ld.global.b16 { %rs3 }, [ %rd2 + 0 ];")
    with pytest.raises(AssertionError, match="x_ptr"):
        assert_pdl_waits_first(activation_early, "k", params, ["w_ptr"])
    store_early = _PDL_PTX.replace("// EARLY", "st.global.b16 [ %rd4 + 0 ], %rs1;")
    with pytest.raises(AssertionError, match="st.global"):
        assert_pdl_waits_first(store_early, "k", params, ["w_ptr"])


@pytest.mark.skipif(not ptxas_available(), reason="triton ships no ptxas here")
def test_kernels_compile_for_sm90():
    run_compile_child(__file__)


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    _compile_for_sm90()
