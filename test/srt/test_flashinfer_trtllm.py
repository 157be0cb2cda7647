"""FlashInfer TRT-LLM NVFP4 MoE runner, verified on CPU by emulating the kernel's arithmetic.

The runner's own preparation (row reorder, padding, per-expert scalars, activation quantization,
routing arguments) feeds a torch emulation of the kernel; only FlashInfer's shuffles, pure memory
layouts, are bypassed and tested separately as invertible permutations. Everything here passes
without FlashInfer; tests that need the real package skip when it cannot be imported.
"""

from __future__ import annotations

import enum
import importlib
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from sglang.srt.layers.moe.moe_runner import flashinfer_trtllm as fit
from sglang.srt.layers.moe.moe_runner.base import get_moe_runner
from sglang.srt.layers.moe.moe_runner.flashinfer_emulation import (
    emulate_fp4_quantize,
    emulate_routing,
    emulate_trtllm_fp4_moe,
)
from sglang.srt.layers.moe.topk import gemma4_topk
from sglang.srt.layers.quantization.fp4_utils import dequantize_nvfp4, quantize_nvfp4

HIDDEN, EXPERTS, TOP_K, TOKENS = 256, 8, 2, 32
CALIBRATION_MARGIN = 1.1  # calibrated amax sits a little above what the test batch reaches


def _has_flashinfer() -> bool:
    try:
        importlib.import_module("flashinfer")
        return True
    except ImportError:
        return False


needs_flashinfer = pytest.mark.skipif(not _has_flashinfer(), reason="FlashInfer not importable here")


# ----------------------------------------------------------------------------- fixtures


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, N, K] -> packed, block scales, one global scale per expert."""
    parts = [quantize_nvfp4(w[e]) for e in range(w.shape[0])]
    return tuple(torch.stack(p) for p in zip(*parts))


def _calibrate_inputs(layer, x: torch.Tensor, gate, up, inter: int) -> None:
    """ModelOpt-style static input scales amax / (6 * 448), per expert, from this batch."""
    amax_x = x.float().abs().max()
    jitter = 1.0 + 0.1 * torch.rand(EXPERTS, 2, generator=torch.Generator().manual_seed(7))
    layer.w13_input_scale = torch.nn.Parameter(amax_x * CALIBRATION_MARGIN * jitter / 2688, requires_grad=False)
    xf = x.float()
    h = torch.stack([F.gelu(xf @ gate[e].t(), approximate="tanh") * (xf @ up[e].t()) for e in range(EXPERTS)])
    layer.w2_input_scale = torch.nn.Parameter(h.abs().amax(dim=(1, 2)) * CALIBRATION_MARGIN / 2688, requires_grad=False)


def make_layer(inter: int, up_gain: float = 4.0, per_expert_scale: bool = True, seed: int = 0):
    """FusedMoE stand-in with NVFP4 experts; `up_gain` makes up's weight_scale_2 differ from gate's.

    Returns (layer, x, topk)."""
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(EXPERTS, inter, HIDDEN, generator=gen) * 0.05
    up = torch.randn(EXPERTS, inter, HIDDEN, generator=gen) * 0.05 * up_gain
    down = torch.randn(EXPERTS, HIDDEN, inter, generator=gen) * 0.03
    layer = torch.nn.Module()
    layer.num_experts, layer.top_k, layer.hidden_size = EXPERTS, TOP_K, HIDDEN
    layer.intermediate_size_per_partition, layer.activation = inter, "gelu_pytorch_tanh"
    pg, sg, gg = _quantize(gate)
    pu, su, gu = _quantize(up)
    p2, s2, g2 = _quantize(down)

    def param(t):
        return torch.nn.Parameter(t, requires_grad=False)

    layer.w13_weight, layer.w13_weight_scale = param(torch.cat([pg, pu], 1)), param(torch.cat([sg, su], 1))
    layer.w13_weight_scale_2 = param(torch.stack([gg, gu], 1))
    layer.w2_weight, layer.w2_weight_scale, layer.w2_weight_scale_2 = param(p2), param(s2), param(g2)
    pes = 0.5 + torch.rand(EXPERTS, generator=gen) if per_expert_scale else None
    layer.router_per_expert_scale = pes
    x = (torch.randn(TOKENS, HIDDEN, generator=gen) * 2.0).bfloat16()
    _calibrate_inputs(layer, x, gate, up, inter)
    logits = torch.randn(TOKENS, EXPERTS, generator=gen) * 2.0
    return layer, x, gemma4_topk(logits, TOP_K, pes)


def _checkpoint_copy(layer) -> dict[str, torch.Tensor]:
    names = ["w13_weight", "w13_weight_scale", "w13_weight_scale_2", "w2_weight", "w2_weight_scale",
             "w2_weight_scale_2", "w13_input_scale", "w2_input_scale"]  # fmt: skip
    return {n: getattr(layer, n).detach().clone() for n in names}


def emulating_runner() -> fit.FlashInferTrtllmNvFp4MoeRunner:
    """The production runner class with FlashInfer's shuffles bypassed and the kernel emulated."""
    return fit.FlashInferTrtllmNvFp4MoeRunner(
        shuffle=None, quantize=emulate_fp4_quantize, launch=emulate_trtllm_fp4_moe
    )


def _expert_weights(ckpt, e: int, inter: int):
    w13, s13, g13 = ckpt["w13_weight"][e], ckpt["w13_weight_scale"][e], ckpt["w13_weight_scale_2"][e]
    gate = dequantize_nvfp4(w13[:inter], s13[:inter], g13[0])
    up = dequantize_nvfp4(w13[inter:], s13[inter:], g13[1])
    down = dequantize_nvfp4(ckpt["w2_weight"][e], ckpt["w2_weight_scale"][e], ckpt["w2_weight_scale_2"][e])
    return gate, up, down


def _fake_quant(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round trip through NVFP4 with global scale `scale` (fp4_utils' quantizer, not the emulation's)."""
    packed, block, gs = quantize_nvfp4(v, global_scale=scale)
    return dequantize_nvfp4(packed, block, gs)


def moe_reference(ckpt, x, topk, inter: int, w4a4: bool, gelu_tanh: bool) -> torch.Tensor:
    """Independent fp32 MoE on the checkpoint tensors. w4a4=True quantizes the GEMM inputs as the
    kernel's recipe says (one input scale for GEMM1, per-expert for GEMM2); False is exact W4A16."""
    xf = x.float()
    if w4a4:
        xf = _fake_quant(xf, ckpt["w13_input_scale"].max())
    out = torch.zeros_like(xf)
    ids = topk.topk_ids.long()
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        gate, up, down = _expert_weights(ckpt, e, inter)
        g = xf[tok] @ gate.t()
        h = (F.gelu(g, approximate="tanh") if gelu_tanh else F.gelu(g)) * (xf[tok] @ up.t())
        if w4a4:
            h = _fake_quant(h, ckpt["w2_input_scale"][e])
        out.index_add_(0, tok, (h @ down.t()) * topk.topk_weights[tok, slot, None])
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_emulated(inter: int, **kw):
    layer, x, topk = make_layer(inter, **kw)
    ckpt = _checkpoint_copy(layer)
    runner = emulating_runner()
    runner.process_weights_after_loading(layer)
    return layer, ckpt, x, topk, runner.apply(layer, x, topk)


# ----------------------------------------------------------------------------- weight preparation


@pytest.mark.parametrize("inter", [96, 128])
def test_prepare_reorders_pads_and_scales(inter):
    layer, _, _ = make_layer(inter)
    ckpt = _checkpoint_copy(layer)
    w = fit.prepare_trtllm_fp4_weights(layer)
    padded = fit.padded_intermediate_size(inter)
    assert padded % 64 == 0 and (2 * padded) % 128 == 0 and padded >= inter
    assert w.intermediate_size == padded
    assert w.gemm1_weights.shape == (EXPERTS, 2 * padded, HIDDEN // 2)
    # [up; gate], each half zero padded at its end
    assert torch.equal(w.gemm1_weights[:, :inter], ckpt["w13_weight"][:, inter:])
    assert torch.equal(w.gemm1_weights[:, padded : padded + inter], ckpt["w13_weight"][:, :inter])
    assert torch.equal(w.gemm1_scales[:, :inter].float(), ckpt["w13_weight_scale"][:, inter:].float())
    for t in (w.gemm1_weights[:, inter:padded], w.gemm1_weights[:, padded + inter :]):
        assert not t.any()
    assert not w.gemm1_scales[:, inter:padded].float().any()
    assert w.gemm2_weights.shape == (EXPERTS, HIDDEN, padded // 2)
    assert torch.equal(w.gemm2_weights[..., : inter // 2], ckpt["w2_weight"])
    assert not w.gemm2_weights[..., inter // 2 :].any() and not w.gemm2_scales[..., inter // 16 :].float().any()
    # The three per-expert scalars (nvfp4.md's gs = 1/scale formulas), gate and up kept apart.
    a1 = ckpt["w13_input_scale"].max()
    gate_ws2, up_ws2 = ckpt["w13_weight_scale_2"][:, 0], ckpt["w13_weight_scale_2"][:, 1]
    a2, w2_ws2 = ckpt["w2_input_scale"], ckpt["w2_weight_scale_2"]
    assert not torch.allclose(gate_ws2, up_ws2, rtol=0.5)  # the fixture really has distinct scales
    torch.testing.assert_close(w.output1_scale_gate, 1 / ((1 / gate_ws2) * (1 / a1)), rtol=1e-6, atol=0)
    torch.testing.assert_close(w.output1_scale, (1 / a2) / ((1 / up_ws2) * (1 / a1)), rtol=1e-6, atol=0)
    pes = layer.router_per_expert_scale
    torch.testing.assert_close(w.output2_scale, pes / ((1 / a2) * (1 / w2_ws2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(w.hidden_global_scale, (1 / a1).reshape(1))


def test_output2_without_per_expert_scale():
    layer, _, _ = make_layer(96, per_expert_scale=False)
    w = fit.prepare_trtllm_fp4_weights(layer)
    expected = layer.w2_input_scale.float() * layer.w2_weight_scale_2.float()
    torch.testing.assert_close(w.output2_scale, expected, rtol=0, atol=0)


def test_shape_checks_are_clear():
    layer, _, _ = make_layer(96)
    layer.hidden_size = 200
    with pytest.raises(ValueError, match="hidden_size"):
        fit.prepare_trtllm_fp4_weights(layer)
    layer.hidden_size, layer.num_experts = HIDDEN, 6
    with pytest.raises(ValueError, match="num_experts"):
        fit.prepare_trtllm_fp4_weights(layer)


# ----------------------------------------------------------------------------- emulation vs references


@pytest.mark.parametrize("inter", [96, 128])
def test_emulation_equals_independent_w4a4_reference(inter):
    """Same W4A4 recipe computed independently from the untouched checkpoint tensors (fp4_utils'
    quantizer, routing weights with per_expert_scale, gate/up dequantized with their own scales,
    erf-GELU as Geglu runs): only bf16 storage of routing weights and outputs separates them."""
    _, ckpt, x, topk, out = run_emulated(inter)
    ref = moe_reference(ckpt, x, topk, inter, w4a4=True, gelu_tanh=False)
    err = rel_err(out, ref)
    assert err < 4e-3, err  # three bf16 roundings (2^-9 each) on the way


def _nvfp4_roundtrip_error(v: torch.Tensor, scale: torch.Tensor) -> float:
    return rel_err(_fake_quant(v, scale), v)


def test_emulation_error_vs_exact_w4a16_is_what_w4a4_explains():
    """Bound: rel_err <= 1.3 * sqrt(2 * eps_x**2 + eps_h**2) + 0.01, with eps_x, eps_h the measured
    NVFP4 round-trip errors (relative Frobenius) of GEMM1's and GEMM2's inputs. Why: rounding noise
    uncorrelated with the weights passes a GEMM at about its relative size; eps_x reaches both the
    gate and the up product, whose product h = gelu(gate) * up so carries about sqrt(2) * eps_x;
    requantizing h adds eps_h independently; GEMM2 passes the sum on. 1.3 is slack for GELU's
    slope away from 1 and the few large terms, 0.01 covers erf- vs tanh-GELU (<= 5e-4 per gate
    element) and bf16 storage. Measured here: err ~0.17 with eps_x ~0.095, eps_h ~0.09 (bound ~0.22)."""
    inter = 96
    _, ckpt, x, topk, out = run_emulated(inter)
    exact = moe_reference(ckpt, x, topk, inter, w4a4=False, gelu_tanh=True)
    eps_x = _nvfp4_roundtrip_error(x.float(), ckpt["w13_input_scale"].max())
    hs = []
    for e in range(EXPERTS):
        gate, up, _ = _expert_weights(ckpt, e, inter)
        h = F.gelu(x.float() @ gate.t(), approximate="tanh") * (x.float() @ up.t())
        hs.append(_nvfp4_roundtrip_error(h, ckpt["w2_input_scale"][e]))
    eps_h = max(hs)
    err = rel_err(out, exact)
    bound = 1.3 * (2 * eps_x**2 + eps_h**2) ** 0.5 + 0.01
    assert err <= bound, (err, eps_x, eps_h)
    assert err > 0.5 * (eps_x**2 + eps_h**2) ** 0.5  # W4A4 really ran (activations were quantized)


def test_torch_native_runner_is_the_w4a16_reference():
    """The yardstick used above equals the project's torch_native NVFP4 runner."""
    inter = 96
    layer, x, topk = make_layer(inter)
    ckpt = _checkpoint_copy(layer)
    native = get_moe_runner("torch", "nvfp4").apply(layer, x, topk)
    ref = moe_reference(ckpt, x, topk, inter, w4a4=False, gelu_tanh=True)
    assert rel_err(native, ref) < 4e-3


def test_routing_is_gemma4_routing():
    """Kernel routing (Renormalize on the logits) selects the same experts as gemma4_topk, and its
    weights times per_expert_scale (folded into output2) equal gemma4_topk's weights."""
    layer, x, topk = make_layer(96)
    runner = emulating_runner()
    runner.process_weights_after_loading(layer)
    call = fit.prepare_trtllm_fp4_call(layer, x, topk, emulate_fp4_quantize)
    assert call.routing_method == "Renormalize"
    ids, weights = emulate_routing(call.routing_logits, call.top_k, call.routing_method)
    order_k = torch.argsort(ids, dim=-1)
    order_r = torch.argsort(topk.topk_ids, dim=-1)
    assert torch.equal(ids.gather(1, order_k), topk.topk_ids.gather(1, order_r))
    pes = layer.router_per_expert_scale
    folded = weights.float() * pes[ids.long()]
    torch.testing.assert_close(folded.gather(1, order_k), topk.topk_weights.gather(1, order_r), rtol=2**-8, atol=0)
    # The output2 scalar carries pes per expert, nothing else does.
    unfolded = layer.trtllm_output2_scale / pes
    torch.testing.assert_close(unfolded, layer.w2_input_scale * layer.w2_weight_scale_2, rtol=1e-6, atol=0)


def test_swapped_gate_up_scales_are_detected():
    """Negative control: giving both halves one weight scale (the pitfall) breaks the match."""
    inter = 96
    layer, x, topk = make_layer(inter, up_gain=4.0)
    ckpt = _checkpoint_copy(layer)
    runner = emulating_runner()
    runner.process_weights_after_loading(layer)
    a1 = ckpt["w13_input_scale"].max()
    layer.trtllm_output1_scale_gate = a1 * ckpt["w13_weight_scale_2"][:, 1]  # up's scale on gate
    ref = moe_reference(ckpt, x, topk, inter, w4a4=True, gelu_tanh=False)
    assert rel_err(runner.apply(layer, x, topk), ref) > 0.1


def test_emulated_quantizer_matches_fp4_utils():
    """fp4_quantize's recipe (gs = 1/input_scale) and fp4_utils' (global = input_scale) agree."""
    x = (torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(3)) * 3).bfloat16()
    scale = x.float().abs().max() / 2688
    codes, sf = emulate_fp4_quantize(x, (1 / scale).reshape(1))
    packed, block, _ = quantize_nvfp4(x.float(), global_scale=scale)
    assert torch.equal(sf.float(), block.float())
    assert (codes == packed).float().mean() > 0.999


def test_apply_returns_input_dtype_and_handles_empty_batch():
    layer, x, topk = make_layer(96)
    runner = emulating_runner()
    runner.process_weights_after_loading(layer)
    assert runner.apply(layer, x.float(), topk).dtype == torch.float32
    empty = runner.apply(layer, x[:0], topk)
    assert empty.shape == (0, HIDDEN)


# ----------------------------------------------------------------------------- activation mapping


class _Enum0613(enum.IntEnum):  # member names (and values) of FlashInfer 0.6.13
    Gelu, Relu, Silu, Swiglu, Geglu, SwigluBias, Relu2, SwigluStep, Identity, InvalidType = range(10)


class _Enum072(enum.IntEnum):  # 0.7.2.post1: GegluTanh inserted, later members renumbered
    Gelu, Relu, Silu, Swiglu, Geglu, SwigluBias, Relu2, SwigluStep, GegluTanh, Identity, Situ, InvalidType = range(12)


@pytest.fixture
def fake_flashinfer(monkeypatch):
    def install(enum_cls, version=fit.PINNED_FLASHINFER_VERSION):
        mod = types.ModuleType("flashinfer")
        mod.ActivationType, mod.__version__ = enum_cls, version
        monkeypatch.setitem(sys.modules, "flashinfer", mod)
        return mod

    monkeypatch.setattr(fit, "_warned", set())
    return install


@pytest.mark.parametrize("enum_cls", [_Enum0613, _Enum072])
def test_activation_type_by_name(fake_flashinfer, enum_cls):
    fake_flashinfer(enum_cls)
    cases = {("silu", True): "Swiglu", ("gelu", True): "Geglu", ("silu", False): "Silu",
             ("gelu", False): "Gelu", ("relu2", False): "Relu2"}  # fmt: skip
    for (act, gated), name in cases.items():
        got = fit.get_activation_type(act, is_gated=gated)
        assert got is enum_cls[name] and int(got) == enum_cls[name].value


@pytest.mark.parametrize("enum_cls", [_Enum0613, _Enum072])
def test_tanh_gelu_falls_back_to_geglu_with_one_warning(fake_flashinfer, enum_cls, caplog):
    """Even where GegluTanh exists (0.7.x), the TRT-LLM FP4 runner rejects it, so Geglu is used."""
    fake_flashinfer(enum_cls)
    with caplog.at_level(logging.WARNING, logger=fit.logger.name):
        for name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_pytorch_tanh"):
            assert fit.get_activation_type(name) is enum_cls.Geglu
    warnings = [r for r in caplog.records if "erf" in r.getMessage()]
    assert len(warnings) == 1


def test_tanh_member_used_once_runner_accepts_it(fake_flashinfer, monkeypatch):
    fake_flashinfer(_Enum072)
    monkeypatch.setattr(fit, "TRTLLM_GATED_MEMBERS", fit.TRTLLM_GATED_MEMBERS | {"GegluTanh"})
    assert fit.get_activation_type("gelu_pytorch_tanh") is _Enum072.GegluTanh


@pytest.mark.parametrize("act,gated", [("relu2", True), ("swish", False), ("tanh", True)])
def test_unknown_activation_error_names_everything(fake_flashinfer, act, gated):
    fake_flashinfer(_Enum0613)
    with pytest.raises(ValueError) as info:
        fit.get_activation_type(act, is_gated=gated)
    msg = str(info.value)
    assert repr(act) in msg and f"is_gated={gated}" in msg and "silu" in msg and "gelu" in msg


@needs_flashinfer
def test_activation_type_against_real_flashinfer(monkeypatch):
    monkeypatch.setattr(fit, "_warned", set())
    real = importlib.import_module("flashinfer").ActivationType
    assert fit.get_activation_type("silu") is real.Swiglu
    assert fit.get_activation_type("gelu_pytorch_tanh") is real.Geglu
    assert fit.get_activation_type("relu2", is_gated=False) is real.Relu2
    assert set(fit.TRTLLM_GATED_MEMBERS) & set(real.__members__) >= {"Swiglu", "Geglu"}


# ----------------------------------------------------------------------------- availability checks


def test_missing_flashinfer_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # makes `import flashinfer` raise
    with pytest.raises(ImportError, match=r"sglang\[flashinfer\]"):
        fit.require_flashinfer()
    with pytest.raises(ImportError, match=r"sglang\[flashinfer\]"):
        fit.check_flashinfer_trtllm_supported(100)
    layer, _, _ = make_layer(96)
    with pytest.raises(ImportError, match=r"sglang\[flashinfer\]"):
        get_moe_runner("flashinfer_trtllm", "nvfp4").process_weights_after_loading(layer)


@pytest.mark.parametrize("sm", [0, 80, 90, 120])
def test_refuses_below_or_outside_sm100(sm):
    with pytest.raises(RuntimeError, match="SM100"):
        fit.check_flashinfer_trtllm_supported(sm)


@pytest.mark.parametrize("sm", [100, 103])
def test_accepts_sm100_family(fake_flashinfer, sm):
    fake_flashinfer(_Enum0613)
    fit.check_flashinfer_trtllm_supported(sm)


def test_registered_under_backend_name():
    runner = get_moe_runner("flashinfer_trtllm", "nvfp4")
    assert isinstance(runner, fit.FlashInferTrtllmNvFp4MoeRunner)
    assert runner.shuffle is fit.flashinfer_shuffle


# ----------------------------------------------------------------------------- FlashInfer shuffles


def _assert_permutation(perm: torch.Tensor, n: int) -> None:
    assert perm.shape == (n,) and torch.equal(torch.sort(perm).values, torch.arange(n))


@needs_flashinfer
def test_flashinfer_row_shuffles_are_invertible_permutations():
    padded = fit.padded_intermediate_size(96)
    perm1, perm2 = fit.flashinfer_row_permutations(2 * padded, HIDDEN // 2, HIDDEN, padded // 2)
    _assert_permutation(perm1, 2 * padded)
    _assert_permutation(perm2, HIDDEN)
    rows = torch.arange(2 * padded)
    assert torch.equal(rows[perm1][torch.argsort(perm1)], rows)
    # Inside each 32-row tile the gated layout holds up row r and gate row r together: the tile
    # shuffle moves rows only within tiles, and the interleave pairs row r with row r + padded.
    tiles = perm1.reshape(-1, 32)
    for tile in tiles:
        ups = set(t for t in tile.tolist() if t < padded)
        gates = set(t - padded for t in tile.tolist() if t >= padded)
        assert ups == gates


@needs_flashinfer
def test_flashinfer_shuffle_is_undone_by_inverse_rows(monkeypatch):
    """Weights and their block scales get the same row order; the swizzle is a layout of its own
    (CUDA-only in FlashInfer), replaced here by the identity to check our composition."""
    flashinfer = importlib.import_module("flashinfer")
    monkeypatch.setattr(flashinfer, "block_scale_interleave", lambda t: t.reshape(-1).clone())
    layer, _, _ = make_layer(96)
    w = fit.prepare_trtllm_fp4_weights(layer)
    s = fit.flashinfer_shuffle(w)
    perm1, perm2 = fit.flashinfer_row_permutations(
        w.gemm1_weights.shape[1], w.gemm1_weights.shape[2], w.gemm2_weights.shape[1], w.gemm2_weights.shape[2]
    )
    inv1, inv2 = torch.argsort(perm1), torch.argsort(perm2)
    assert torch.equal(s.gemm1_weights[:, inv1], w.gemm1_weights)
    assert torch.equal(s.gemm1_scales[:, inv1].float(), w.gemm1_scales.float())
    assert torch.equal(s.gemm2_weights[:, inv2], w.gemm2_weights)
    assert torch.equal(s.gemm2_scales[:, inv2].float(), w.gemm2_scales.float())
    assert s.output1_scale is w.output1_scale and s.intermediate_size == w.intermediate_size


def _swizzled_128x4_offsets(rows: int, cols: int) -> torch.Tensor:
    """Offset of scale (r, c) in the 128x4 layout (rows % 128 == 0, cols % 4 == 0)."""
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    return (r // 128) * 128 * cols + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4


@needs_flashinfer
@pytest.mark.skipif(not torch.cuda.is_available(), reason="block_scale_interleave is a CUDA op")
def test_block_scale_swizzle_is_an_invertible_permutation():
    flashinfer = importlib.import_module("flashinfer")
    rows, cols = 256, 16
    sf = torch.randint(0, 255, (2, rows, cols), dtype=torch.uint8, device="cuda")
    out = flashinfer.block_scale_interleave(sf).reshape(2, -1).cpu()
    offsets = _swizzled_128x4_offsets(rows, cols).reshape(-1)
    _assert_permutation(offsets, rows * cols)
    assert torch.equal(out[:, offsets].reshape(2, rows, cols), sf.cpu())
