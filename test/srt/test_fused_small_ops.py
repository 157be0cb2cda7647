"""Fused Triton small-op kernels (sglang.srt.layers.triton_ops) against the torch code they replace.

Every check calls the real dispatch site (RMSNorm, Gemma4Attention.norm_rope, the decoder layer's
_post_attention / _combine, the MLP's act_and_mul, gemma4_topk, compute_logits) once with the fused
kernels forced off (torch: the reference) and once forced on, on the same inputs. On a CPU host the
kernels run under Triton's interpreter at tiny, odd shapes (hidden 48, head dims 32 and 64 with a
partial rotary factor, non-power-of-two row counts).

Tolerances. fp32: max |out - ref| <= 2e-6 * max(1, max |ref|) (fp32 reduction order, reciprocal vs
division, last-bit tanh). bf16: the kernels round wherever torch stores a bf16 tensor, so at least 95%
of the elements must be bit-identical and the rest within 2 bf16 ulps (|ref| * 2^-7, plus 1e-6 for
GELU's far negative tail, where 1 + tanh cancels); a missed or extra rounding point breaks the
bit-identical share. Router ids must be equal (logits without ties).
The tiny generated model: fp32 logits within 1e-4 and identical greedy tokens with the kernels on
and off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sglang.srt.configs.model_config import LayerSpec  # noqa: E402
from sglang.srt.layers.activation import get_act_and_mul_fn  # noqa: E402
from sglang.srt.layers.layernorm import RMSNorm  # noqa: E402
from sglang.srt.layers.moe.topk import gemma4_topk  # noqa: E402
from sglang.srt.layers.rotary_embedding import RotaryEmbedding  # noqa: E402
from sglang.srt.layers.triton_ops import fused_ops  # noqa: E402
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
    # name: (head_dim, rope_type, partial_rotary_factor, k_eq_v)
    "sliding-d32": (32, "default", 1.0, False),
    "full-d64-partial-keqv": (64, "proportional", 0.25, True),
    "full-d64-partial": (64, "proportional", 0.25, False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_qkv_norm_rope(dtype, case):
    head_dim, rope_type, factor, k_eq_v = ATTENTION_CASES[case]
    spec = LayerSpec("full_attention", head_dim, 2, rope_type, 10_000.0, factor, k_eq_v)
    cfg = {"num_attention_heads": 3, "hidden_size": HIDDEN, "rms_norm_eps": 1e-6}
    attn = Gemma4Attention(cfg, spec, 0, dtype, None, "layers.0.self_attn").to(DEV)
    gen = _gen(1)
    _randomize_norms(attn, gen)
    tokens = 5
    width = (3 + (1 if k_eq_v else 2) * 2) * head_dim
    qkv = _randn(gen, tokens, width, dtype=dtype, scale=2.0)
    positions = torch.tensor([0, 1, 7, 300, 4095], device=DEV)
    rope = RotaryEmbedding(head_dim, 10_000.0, rope_type, factor).to(DEV).cos_sin(positions)
    out, ref = both(attn.norm_rope, qkv, rope)
    assert [t.shape for t in out] == [(tokens, 3, head_dim), (tokens, 2, head_dim), (tokens, 2, head_dim)]
    assert_matches(out, ref)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("enable_moe", [True, False])
def test_ffn_combine(dtype, enable_moe):
    layer = _layer(dtype, enable_moe)
    next_norm = RMSNorm(HIDDEN, 1e-6, params_dtype=dtype).to(DEV)
    gen = _gen(4)
    _randomize_norms(next_norm, gen)
    h, dense = _randn(gen, 5, HIDDEN, dtype=dtype, scale=4.0), _randn(gen, 5, HIDDEN, dtype=dtype)
    moe = _randn(gen, 5, HIDDEN, dtype=dtype, scale=0.3) if enable_moe else None
    assert_matches(*both(layer._combine, h, dense, moe, next_norm))


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


# ---- the whole model ---------------------------------------------------------------------------


def test_tiny_model_fused_vs_torch(tmp_path):
    # Three layers: sliding, sliding, full (k_eq_v, partial rope), all MoE.
    path = write_checkpoint(tmp_path / "ck", "nvfp4-per-expert", seed=5, text_config=tiny_text_config(num_hidden_layers=3))
    # Eager: a CUDA graph would replay whichever path it captured.
    args = ServerArgs(model_path=str(path), dtype="float32", device=DEV, max_total_tokens=256, disable_cuda_graph=True)
    runner = ModelRunner(args)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(110, runner.model_config.vocab_size, (n,), generator=g).tolist() for n in (7, 3)]

    def run():
        batch, out = prefill(runner, prompts, return_all_logits=True)
        release(runner, batch)
        return out.all_logits, greedy_generate(runner, prompts, 4)

    (logits, tokens), (ref_logits, ref_tokens) = both(run)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert tokens == ref_tokens


# ---- GPU compilation (no GPU needed) -----------------------------------------------------------
# The interpreter never compiles the kernels, so this compiles each for sm_90 at the 26B model's
# shapes (hidden 2816, 16 heads, head dims 256 and 512, 128 experts, top-8) with the GPU branches of
# the helpers, in a subprocess without TRITON_INTERPRET.


def _compile_for_sm90() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sglang.srt.layers.triton_ops import (
        ffn_combine, gelu_and_mul, post_attention_norms, qkv_norm_rope, rmsnorm, router_topk, softcap,
    )  # fmt: skip

    bf, f32, i32 = "*bf16", "fp32", "i32"

    def compile_one(fn, args: dict, consts: dict, num_warps: int) -> None:
        sig = {**args, **{name: "constexpr" for name in consts}}
        opts = {"num_warps": num_warps, "enable_fp_fusion": False}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=opts)

    norm = dict(x_ptr=bf, w_ptr=bf, out_ptr=bf, stride_x=i32, n_cols=i32, inv_n=f32, eps=f32)
    compile_one(rmsnorm._rmsnorm_kernel, norm, {"HAS_W": True, "BLOCK": 4096}, 8)
    compile_one(softcap._softcap_kernel, dict(x_ptr=bf, out_ptr="*fp32", n=i32, cap=f32, inv_cap=f32), {"BLOCK": 1024}, 4)
    gelu = dict(gu_ptr=bf, out_ptr=bf, stride_gu=i32, n_inter=i32)
    compile_one(gelu_and_mul._gelu_tanh_and_mul_kernel, gelu, {"BLOCK": 1024}, 4)
    qkv = dict(
        qkv_ptr=bf, q_ptr=bf, k_ptr=bf, v_ptr=bf, qw_ptr=bf, kw_ptr=bf, cos_ptr="*fp32", sin_ptr="*fp32", stride_qkv=i32,
        stride_cs=i32, num_heads=i32, num_kv_heads=i32, v_col=i32, inv_d=f32, eps=f32,
    )  # fmt: skip
    for head_dim in (256, 512):
        consts = {"HEAD_DIM": head_dim, "BLOCK_H": 16, "BLOCK_HALF": head_dim // 2}
        compile_one(qkv_norm_rope._qkv_norm_rope_kernel, qkv, consts, 8)
    post = dict(
        h_ptr=bf, attn_ptr=bf, w_post_ptr=bf, w_mlp_ptr=bf, w_moe_ptr=bf, router_scale_ptr=bf, h_out=bf, mlp_out=bf,
        moe_out=bf, router_out=bf, stride_h=i32, stride_attn=i32, n_cols=i32, inv_n=f32, eps=f32, root_size=f32,
    )  # fmt: skip
    combine = dict(
        h_ptr=bf, dense_ptr=bf, moe_ptr=bf, w_dense_ptr=bf, w_moe_ptr=bf, w_post_ptr=bf, scalar_ptr=bf, w_next_ptr=bf,
        h_out=bf, next_out=bf, stride_h=i32, stride_dense=i32, stride_moe=i32, n_cols=i32, inv_n=f32, eps=f32,
    )  # fmt: skip
    for has_moe in (True, False):
        compile_one(post_attention_norms._post_attention_norms_kernel, post, {"HAS_MOE": has_moe, "BLOCK": 4096}, 8)
        compile_one(ffn_combine._ffn_combine_kernel, combine, {"HAS_MOE": has_moe, "BLOCK": 4096}, 8)
    topk = dict(
        logits_ptr=bf, scale_ptr=bf, weights_ptr="*fp32", ids_ptr="*i32", logits_out_ptr="*fp32", stride_logits=i32,
        num_experts=i32,
    )  # fmt: skip
    compile_one(router_topk._router_topk_kernel, topk, {"HAS_SCALE": True, "TOP_K": 8, "BLOCK_E": 128, "BLOCK_K": 8}, 1)


def _ptxas_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton ships no ptxas here")
def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_fused_small_ops as t; t._compile_for_sm90()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
