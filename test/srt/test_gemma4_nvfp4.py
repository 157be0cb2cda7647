"""Gemma 4 MoE (bf16 and ModelOpt NVFP4) against transformers' Gemma 4, on CPU in fp32.

Reference: transformers' own Gemma 4 classes, built from the written config and given the
checkpoint's exact weights (NVFP4 experts dequantized exactly, gate and up each with its own
global scale). Tolerance: 1e-3 max abs on fp32 logits; greedy continuations must be identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sglang.srt.configs.model_config import ModelConfig, gemma4_layer_specs
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang.srt.layers.moe.topk import gemma4_topk
from sglang.srt.layers.quantization.fp4_utils import (
    dequantize_nvfp4,
    e2m1_to_float,
    float_to_e2m1,
    pack_fp4,
    quantize_nvfp4,
    unpack_fp4,
)
from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.model_loader.load_report import CheckpointLoadError
from sglang.srt.server_args import ServerArgs
from sglang.test.make_gemma4_checkpoint import reference_state_dict, tiny_text_config, write_checkpoint
from sglang.test.static_batch import greedy_generate, prefill, release

LOGIT_ATOL = 1e-3
GREEDY_TOKENS = 32


def _runner(path: Path, **kw) -> ModelRunner:
    return ModelRunner(ServerArgs(model_path=str(path), dtype="float32", device="cpu", **kw))


def _reference(path: Path) -> torch.nn.Module:
    cfg = transformers.AutoConfig.from_pretrained(path)
    model = getattr(transformers, cfg.architectures[0])(cfg).float().eval()
    model.load_state_dict(reference_state_dict(path), strict=True)
    return model


def _prompts(vocab: int, lengths=(27, 13), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ids above the special-token range; 27 tokens is over three sliding windows of 8.
    return [torch.randint(110, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _ref_logits(ref, ids: list[int]) -> torch.Tensor:
    return ref(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def _ref_greedy(ref, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(_ref_logits(ref, seq)[-1].argmax()))
    return seq[len(ids) :]


def _all_logits(runner, prompts) -> list[torch.Tensor]:
    batch, out = prefill(runner, prompts, return_all_logits=True)
    release(runner, batch)
    return list(out.all_logits.split([len(p) for p in prompts]))


CASES = {
    # name: (layout, writer kwargs)
    "nvfp4-mm-keqv": ("nvfp4-per-expert", dict(architecture="Gemma4ForConditionalGeneration")),
    "nvfp4-dense-quantized": ("nvfp4-per-expert", dict(quantize_dense_mlp=True, config_style="per_layer_config")),
    "bf16-causal-no-keqv": (
        "bf16-fused",
        dict(architecture="Gemma4ForCausalLM", text_config=tiny_text_config(attention_k_eq_v=False)),
    ),
    "bf16-per-expert-per-layer-config": ("bf16-per-expert", dict(config_style="per_layer_config")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma4")
    return {name: write_checkpoint(root / name, layout, seed=3, **kw) for name, (layout, kw) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(checkpoints, case):
    path = checkpoints[case]
    runner, ref = _runner(path), _reference(path)
    prompts = _prompts(runner.model_config.vocab_size)
    for ids, ours in zip(prompts, _all_logits(runner, prompts)):
        theirs = _ref_logits(ref, ids)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < LOGIT_ATOL
    # Batched greedy decoding through the paged cache equals full recomputation by the reference.
    ours = greedy_generate(runner, prompts, GREEDY_TOKENS)
    assert ours == [_ref_greedy(ref, ids, GREEDY_TOKENS) for ids in prompts]
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


def test_three_layouts_give_identical_logits(tmp_path):
    """One model in all three layouts. Global scales rounded to powers of two make every NVFP4
    value exactly representable in bf16, so the bf16 layouts can hold the very same weights."""
    fp4 = write_checkpoint(tmp_path / "fp4", "nvfp4-per-expert", seed=5)
    _edit_shards(fp4, _round_global_scales_to_powers_of_two)
    exact = reference_state_dict(fp4)
    fused = write_checkpoint(tmp_path / "fused", "bf16-fused", seed=5)
    per_expert = write_checkpoint(tmp_path / "per_expert", "bf16-per-expert", seed=5)
    _overwrite_experts(fused, exact, fused_layout=True)
    _overwrite_experts(per_expert, exact, fused_layout=False)
    runners = [_runner(p) for p in (fused, per_expert, fp4)]
    for name in ("w13_weight", "w2_weight"):
        bf16 = [getattr(r.model.model.layers[1].experts, name).float() for r in runners[:2]]
        assert torch.equal(bf16[0], bf16[1])
    prompts = _prompts(512, (19,))
    logits = [_all_logits(r, prompts)[0] for r in runners]
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(logits[0], logits[2])


def _round_global_scales_to_powers_of_two(tensors: dict) -> None:
    for name, t in tensors.items():
        if name.endswith("weight_scale_2"):
            tensors[name] = torch.exp2(torch.log2(t).round())


def _overwrite_experts(ckpt: Path, exact: dict, fused_layout: bool) -> None:
    for shard in sorted(ckpt.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in list(tensors):
            if ".experts." not in name:
                continue
            layer = name.split(".experts.")[0]
            if fused_layout:
                tensors[name] = exact[name].to(torch.bfloat16)
            else:
                expert, proj = name.split(".experts.")[1].split(".")[:2]
                gate_up = exact[f"{layer}.experts.gate_up_proj"][int(expert)]
                inter = gate_up.shape[0] // 2
                value = {
                    "gate_proj": gate_up[:inter],
                    "up_proj": gate_up[inter:],
                    "down_proj": exact[f"{layer}.experts.down_proj"][int(expert)],
                }[proj]
                tensors[name] = value.to(torch.bfloat16)
        save_file(tensors, shard, metadata={"format": "pt"})


# ---- config parsing ----------------------------------------------------------------------


def test_both_config_spellings_give_the_same_layers(checkpoints):
    released = ModelConfig(str(checkpoints["nvfp4-mm-keqv"]))
    newer = ModelConfig(str(checkpoints["bf16-per-expert-per-layer-config"]))
    assert released.layer_specs == newer.layer_specs
    full = [s for s in released.layer_specs if not s.is_sliding]
    sliding = [s for s in released.layer_specs if s.is_sliding]
    assert full and sliding and all(s.k_eq_v for s in full) and not any(s.k_eq_v for s in sliding)
    assert {s.head_dim for s in full} != {s.head_dim for s in sliding}
    assert released.quantization == "modelopt_fp4" and newer.quantization is None


def test_real_26b_config_geometry():
    text = {
        "num_hidden_layers": 30, "head_dim": 256, "num_key_value_heads": 8, "global_head_dim": 512,
        "num_global_key_value_heads": 2, "attention_k_eq_v": True,
    }
    specs = gemma4_layer_specs(text)
    assert [i for i, s in enumerate(specs) if not s.is_sliding] == [5, 11, 17, 23, 29]
    assert (specs[5].head_dim, specs[5].num_kv_heads, specs[5].rope_type, specs[5].partial_rotary_factor) == (512, 2, "proportional", 0.25)
    assert (specs[0].head_dim, specs[0].num_kv_heads, specs[0].rope_theta) == (256, 8, 10_000.0)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"hidden_size_per_layer_input": 256}, "per-layer input embeddings"),
        ({"num_kv_shared_layers": 2}, "KV sharing"),
        ({"hidden_activation": "gelu"}, "gelu_pytorch_tanh"),
    ],
)
def test_unsupported_features_are_rejected(tmp_path, override, message):
    path = write_checkpoint(tmp_path / "ck", "bf16-fused", seed=0)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"].update(override)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        ModelConfig(str(path))


def test_quantization_read_from_config_json_alone(checkpoints, tmp_path):
    """Without hf_quant_config.json, config.json's quantization_config is used (same exclusions)."""
    path = tmp_path / "ck"
    shutil.copytree(checkpoints["nvfp4-mm-keqv"], path)
    (path / "hf_quant_config.json").unlink()
    cfg = ModelConfig(str(path))
    assert cfg.quantization == "modelopt_fp4"
    assert ModelOptFp4Config.from_config(cfg.quant_config).is_excluded("model.layers.0.router.proj")
    prompts = _prompts(cfg.vocab_size, (9,))
    a = _all_logits(_runner(path), prompts)[0]
    b = _all_logits(_runner(checkpoints["nvfp4-mm-keqv"]), prompts)[0]
    assert torch.equal(a, b)


def test_quantization_flag_must_match_checkpoint(checkpoints):
    with pytest.raises(ValueError, match="does not match"):
        ModelConfig(str(checkpoints["bf16-causal-no-keqv"]), quantization="modelopt_fp4")


# ---- FusedMoE mapping and loading --------------------------------------------------------


def test_expert_params_mapping_tuples_and_suffix_folding():
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", num_experts=8)
    assert len(mapping) == 24
    assert ("experts.w13_", "experts.7.gate_proj.", 7, "w1") in mapping
    assert ("experts.w13_", "experts.7.up_proj.", 7, "w3") in mapping
    assert ("experts.w2_", "experts.0.down_proj.", 0, "w2") in mapping
    name = "model.language_model.layers.3.experts.7.gate_proj.weight_scale_2"
    param, weight, _, _ = next(m for m in mapping if m[1] in name)
    assert name.replace(weight, param) == "model.language_model.layers.3.experts.w13_weight_scale_2"
    # experts.1. must not match experts.11.
    hits = [m for m in FusedMoE.make_expert_params_mapping("g", "d", "u", 12) if m[1] in "layers.0.experts.11.g.weight"]
    assert [h[2] for h in hits] == [11]


def _nvfp4_moe(E=3, H=32, I=16, top_k=2) -> FusedMoE:
    return FusedMoE(E, top_k, H, I, torch.float32, quant_config=ModelOptFp4Config(), prefix="layers.0.experts")


def test_weight_loader_keeps_separate_gate_and_up_global_scales():
    E, H, I = 3, 32, 16
    moe = _nvfp4_moe(E, H, I)
    params = dict(moe.named_parameters())
    g = torch.Generator().manual_seed(0)
    dense = {}
    for e in range(E):
        for proj, shard, shape, gain in (("gate_proj", "w1", (I, H), 1.0), ("up_proj", "w3", (I, H), 5.0), ("down_proj", "w2", (H, I), 1.0)):
            w = torch.randn(shape, generator=g) * gain
            packed, bs, gs = quantize_nvfp4(w)
            dense[(e, proj)] = dequantize_nvfp4(packed, bs, gs)
            base = "experts.w13_" if shard != "w2" else "experts.w2_"
            for suffix, t in (("weight", packed), ("weight_scale", bs), ("weight_scale_2", gs), ("input_scale", torch.tensor(0.01))):
                p = params[(base + suffix).removeprefix("experts.")]
                p.weight_loader(p, t, f"experts.{e}.{proj}.{suffix}", shard, e)
    gs13 = moe.w13_weight_scale_2.data
    assert (gs13[:, 1] > 3 * gs13[:, 0]).all()  # up's scale differs from gate's and is kept
    moe.quant_method.process_weights_after_loading(moe)
    x = torch.randn(5, H, generator=g)
    topk = gemma4_topk(torch.randn(5, E, generator=g), 2, torch.tensor([0.5, 1.0, 2.0]))
    out = moe(x, topk)
    expected = torch.zeros(5, H)
    for m in range(5):
        for j in range(2):
            e = int(topk.topk_ids[m, j])
            gate, up = x[m] @ dense[(e, "gate_proj")].t(), x[m] @ dense[(e, "up_proj")].t()
            inter = torch.nn.functional.gelu(gate, approximate="tanh") * up
            expected[m] += topk.topk_weights[m, j] * (inter @ dense[(e, "down_proj")].t())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)  # fp32, different summation order


def test_weight_loader_names_the_tensor_on_shape_mismatch():
    moe = _nvfp4_moe()
    p = moe.w13_weight
    with pytest.raises(ValueError, match=r"experts\.1\.up_proj\.weight.*expected shape \(16, 16\)"):
        p.weight_loader(p, torch.zeros(16, 8, dtype=torch.uint8), "experts.1.up_proj.weight", "w3", 1)


def test_gemma4_routing_matches_softmax_topk_renormalise_scale():
    logits = torch.randn(7, 6)
    scale = torch.rand(6) + 0.5
    out = gemma4_topk(logits, 3, scale)
    probs = torch.softmax(logits, -1)
    w, ids = torch.topk(probs, 3)
    w = w / w.sum(-1, keepdim=True) * scale[ids]
    assert torch.equal(out.topk_ids.long(), ids)
    torch.testing.assert_close(out.topk_weights, w)


# ---- NVFP4 utilities ---------------------------------------------------------------------


def test_fp4_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)
    # element 2i in the low nibble, 2i+1 in the high nibble
    assert pack_fp4(torch.tensor([[0x3, 0xA]], dtype=torch.uint8)).item() == 0xA3


def test_e2m1_rounding_is_nearest_with_ties_to_even():
    x = torch.tensor([0.24, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 100.0, -0.75, -5.0, -0.1])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0, 0.0])
    assert torch.equal(e2m1_to_float(float_to_e2m1(x)), want)


def test_quantize_dequantize_error_bound_and_idempotence():
    w = torch.randn(64, 128) * 0.05
    w[3, :16] = 0.0  # an all-zero block stays zero
    packed, bs, gs = quantize_nvfp4(w)
    dq = dequantize_nvfp4(packed, bs, gs)
    assert torch.equal(dq[3, :16], torch.zeros(16))
    # Per element the error is at most half the widest e2m1 gap (2 -> 1.0) in block units, plus
    # what e4m3 rounding of the block scale moves.
    step = bs.float().repeat_interleave(16, -1) * gs
    assert ((dq - w).abs() <= step * 1.0 + 1e-7 + w.abs() * 0.07).all()
    assert ((dq - w).norm() / w.norm()).item() < 0.12
    # Representable values survive a second round trip unchanged.
    p2, b2, g2 = quantize_nvfp4(dq, gs)
    assert torch.equal(dequantize_nvfp4(p2, b2, g2), dq)


def test_exclude_globs_with_and_without_language_model():
    cfg = ModelOptFp4Config(exclude_modules=["model.language_model.layers.*.self_attn*", "model.layers.*.router*", "lm_head"])
    assert cfg.is_excluded("model.language_model.layers.3.self_attn.qkv_proj")
    assert cfg.is_excluded("model.layers.3.self_attn.o_proj")
    assert cfg.is_excluded("model.language_model.layers.0.router.proj")
    assert cfg.is_excluded("lm_head")
    assert not cfg.is_excluded("model.language_model.layers.0.mlp.gate_up_proj")
    assert not cfg.is_excluded("model.language_model.layers.0.experts")


# ---- loader errors -----------------------------------------------------------------------


@pytest.fixture()
def fp4_copy(checkpoints, tmp_path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(checkpoints["nvfp4-mm-keqv"], dst)
    return dst


def _edit_shards(path: Path, edit) -> None:
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})


def test_missing_expert_tensor_is_named(fp4_copy):
    name = "model.language_model.layers.1.experts.4.up_proj.weight_scale"
    _edit_shards(fp4_copy, lambda t: t.pop(name, None))
    with pytest.raises(CheckpointLoadError, match=r"missing tensors.*layers\.1\.experts\.w13_weight_scale \(expert 4, shard w3\)"):
        _runner(fp4_copy)


def test_wrong_shape_is_named(fp4_copy):
    name = "model.language_model.layers.0.self_attn.o_proj.weight"

    def edit(t):
        if name in t:
            t[name] = t[name][:, :-1].contiguous()

    _edit_shards(fp4_copy, edit)
    with pytest.raises(CheckpointLoadError, match=r"mis-shaped.*o_proj\.weight.*expected shape"):
        _runner(fp4_copy)


def test_unexpected_tensor_is_named(fp4_copy):
    _edit_shards(fp4_copy, lambda t: t.setdefault("model.language_model.layers.0.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointLoadError, match=r"unexpected tensors.*layers\.0\.bogus\.weight"):
        _runner(fp4_copy)


def test_truncated_safetensors_file_is_reported(fp4_copy):
    shard = sorted(fp4_copy.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shard.name} is corrupt or truncated"):
        _runner(fp4_copy)


def test_offline_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not fetch model 'nobody/no-such-gemma4'.*HF_HUB_OFFLINE"):
        ModelConfig("nobody/no-such-gemma4")


def test_dummy_weights_serve_real_shapes(checkpoints):
    runner = _runner(checkpoints["nvfp4-dense-quantized"], load_format="dummy")
    prompts = _prompts(runner.model_config.vocab_size, (12,))
    logits = _all_logits(runner, prompts)[0]
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert runner.model.model.layers[0].experts.w13_weight.dtype == torch.uint8


def test_fp8_kv_scales_in_checkpoint_are_loaded(fp4_copy):
    """ModelOpt FP8-KV exports carry per-layer k/v scales; they land on the attention layers."""

    def edit(t):
        if "model.language_model.layers.0.self_attn.q_proj.weight" in t:
            t["model.language_model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(0.25)
            t["model.language_model.layers.2.self_attn.v_scale"] = torch.tensor([0.5])

    _edit_shards(fp4_copy, edit)
    layers = _runner(fp4_copy).model.model.layers
    assert layers[0].self_attn.attn.k_scale == 0.25
    assert layers[2].self_attn.attn.v_scale == 0.5


def test_kv_cache_dtype_resolution():
    from sglang.srt.model_executor.model_runner import resolve_kv_cache_dtype

    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("auto", bf16, "FP8") == fp8  # the checkpoint asks for an FP8 KV cache
    assert resolve_kv_cache_dtype("auto", bf16, None) == bf16
    assert resolve_kv_cache_dtype("auto", torch.float32, None) == torch.float32
    assert resolve_kv_cache_dtype("bf16", torch.float32, "FP8") == bf16
    assert resolve_kv_cache_dtype("fp8_e4m3", bf16, None) == fp8
    # A GPU without fp8 (below SM89) keeps the model dtype even when the checkpoint asks for FP8.
    assert resolve_kv_cache_dtype("auto", bf16, "FP8", fp8_supported=False) == bf16
    with pytest.raises(ValueError, match="unsupported kv_cache_dtype"):
        resolve_kv_cache_dtype("int4", bf16, None)


def test_flashinfer_backend_fails_fast_without_blackwell(checkpoints, monkeypatch):
    """Chosen explicitly on a machine that cannot run it, the runner refuses before loading weights."""
    from types import SimpleNamespace

    from sglang.srt.model_executor import model_runner

    monkeypatch.setattr(model_runner, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    args = ServerArgs(model_path=str(checkpoints["nvfp4-mm-keqv"]), device="cpu")
    fake = SimpleNamespace(**{**vars(args), "moe_runner_backend": "flashinfer_trtllm"})
    with pytest.raises(RuntimeError, match="flashinfer_trtllm MoE backend needs an (NVIDIA Blackwell|SM100-family) GPU"):
        ModelRunner(fake)
