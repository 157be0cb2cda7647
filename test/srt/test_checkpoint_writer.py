"""Tests of the Gemma 4 test-checkpoint writer (sglang.test.make_gemma4_checkpoint) and its tokenizer."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

from sglang.test import make_gemma4_checkpoint as mk

NVFP4_REL_ERROR_BOUND = 0.15  # relative Frobenius error of a quantized weight vs its bf16 source
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
MM_PREFIX = "model.language_model."


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """One multimodal checkpoint per layout (seed 0), plus a text-only one."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {layout: mk.write_checkpoint(root / layout, layout) for layout in mk.LAYOUTS}
    out["causal"] = mk.write_checkpoint(root / "causal", "bf16-fused", architecture="Gemma4ForCausalLM")
    return out


@pytest.fixture(scope="module")
def refs(ckpts) -> dict[str, dict[str, torch.Tensor]]:
    return {layout: mk.reference_state_dict(ckpts[layout]) for layout in mk.LAYOUTS}


def _raw(ckpt: Path) -> dict[str, torch.Tensor]:
    return mk.load_checkpoint_tensors(ckpt)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_tiny_config_shape():
    tc = mk.tiny_text_config()
    types = tc["layer_types"]
    assert types[-1] == "full_attention" and "sliding_attention" in types[:-1]
    assert 4 <= tc["num_hidden_layers"] <= 6 and len(types) == tc["num_hidden_layers"]
    assert tc["num_experts"] & (tc["num_experts"] - 1) != 0, "num_experts should not be a power of two"
    assert tc["hidden_size"] % 16 == 0 and tc["moe_intermediate_size"] % 16 == 0 and tc["intermediate_size"] % 16 == 0
    assert tc["sliding_window"] == 8 and tc["attention_k_eq_v"] is True
    assert mk.tiny_text_config(attention_k_eq_v=False)["attention_k_eq_v"] is False
    assert mk.tiny_text_config(num_hidden_layers=4)["layer_types"][-1] == "full_attention"


@pytest.mark.parametrize("k_eq_v", [True, False])
def test_per_layer_config_matches_transformers(k_eq_v):
    released = mk.tiny_text_config(attention_k_eq_v=k_eq_v)
    hf = Gemma4TextConfig(**{k: v for k, v in released.items() if k != "model_type"}).to_dict()
    assert mk.styled_text_config(released, "per_layer_config")["per_layer_config"] == hf["per_layer_config"]
    hf_cfg = Gemma4TextConfig(**{k: v for k, v in released.items() if k != "model_type"})
    for i in range(released["num_hidden_layers"]):
        layer = hf_cfg.per_layer_config[i]
        assert mk.layer_attention_dims(released, i) == (layer.head_dim, layer.num_key_value_heads)


def _layer_dims(cfg) -> list[tuple[int, int]]:
    text = cfg.get_text_config()
    layers = [text.per_layer_config[i] for i in range(text.num_hidden_layers)]
    return [(layer.head_dim, layer.num_key_value_heads) for layer in layers]


@pytest.mark.parametrize("architecture", mk.ARCHITECTURES)
def test_config_styles_give_same_dims(tmp_path, architecture):
    dims = []
    for style in mk.CONFIG_STYLES:
        path = mk.write_checkpoint(
            tmp_path / style, "bf16-fused", architecture=architecture, config_style=style, num_shards=1
        )
        raw = json.loads((path / "config.json").read_text())
        text = raw.get("text_config", raw)
        assert ("per_layer_config" in text) == (style == "per_layer_config")
        assert ("global_head_dim" in text) == (style == "released")
        dims.append(_layer_dims(AutoConfig.from_pretrained(path)))
    assert dims[0] == dims[1]
    assert dims[0][-1] == (32, 1) and dims[0][0] == (16, 2)


# ------------------------------------------------------------------------------------------------
# Strict loading into transformers, and sane activations
# ------------------------------------------------------------------------------------------------


def _model_for(ckpt: Path) -> torch.nn.Module:
    cfg = AutoConfig.from_pretrained(ckpt)
    cls = Gemma4ForCausalLM if cfg.architectures == ["Gemma4ForCausalLM"] else Gemma4ForConditionalGeneration
    return cls(cfg).float().eval()


@pytest.mark.parametrize("which", ["bf16-fused", "causal"])
def test_fused_checkpoint_loads_strictly(ckpts, which):
    ckpt = ckpts[which]
    model = _model_for(ckpt)
    raw = _raw(ckpt)
    # The files hold exactly the model's tensors, minus the tied LM head.
    assert set(model.state_dict()) - set(raw) == {"lm_head.weight"}
    assert all(t.dtype == torch.bfloat16 for t in raw.values())
    model.load_state_dict(mk.reference_state_dict(ckpt), strict=True)
    prefix = MM_PREFIX if which == "bf16-fused" else "model."
    assert isinstance(model.get_submodule(f"{prefix}layers.0").layer_scalar, torch.Tensor)
    assert f"{prefix}layers.0.layer_scalar" in dict(model.named_buffers())

    ids = torch.randint(0, 700, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    # Well inside the 30 softcap, and spread enough to give a clear argmax.
    assert logits.abs().max() < 20 and logits.std() > 1.0


def test_both_architectures_hold_the_same_model(ckpts, refs):
    causal = mk.reference_state_dict(ckpts["causal"])
    mm = {k.replace(MM_PREFIX, "model."): v for k, v in refs["bf16-fused"].items()}
    assert causal.keys() == mm.keys()
    assert all(torch.equal(causal[k], mm[k]) for k in causal)


def test_weights_nontrivial(refs):
    sd = refs["bf16-fused"]
    scales = [k for k in sd if re.search(r"(norm\.weight|router\.scale|per_expert_scale|layer_scalar)$", k)]
    assert any(k.endswith("layer_scalar") for k in scales) and any(k.endswith("per_expert_scale") for k in scales)
    for k in scales:
        t = sd[k]
        assert t.min() >= 0.5 and t.max() <= 1.5, k
        assert t.numel() == 1 or t.std() > 0.1, k
        assert not torch.allclose(t, torch.ones_like(t), atol=0.15), k
    gate_up = sd[f"{MM_PREFIX}layers.0.experts.gate_up_proj"]
    inter = gate_up.shape[1] // 2
    assert gate_up[:, :inter].std() > gate_up[:, inter:].std() * 1.2  # up drawn with a smaller spread


# ------------------------------------------------------------------------------------------------
# Layouts agree
# ------------------------------------------------------------------------------------------------


def test_bf16_layouts_equal(refs):
    a, b = refs["bf16-fused"], refs["bf16-per-expert"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nvfp4_layout_close(refs):
    a, q = refs["bf16-fused"], refs["nvfp4-per-expert"]
    assert a.keys() == q.keys()
    for k in a:
        assert q[k].dtype == torch.float32
        if ".experts." in k:
            rel = ((a[k] - q[k]).norm() / a[k].norm()).item()
            assert 0 < rel < NVFP4_REL_ERROR_BOUND, (k, rel)
        else:
            assert torch.equal(a[k], q[k]), k


def _dequant_by_hand(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    # Independent of fp4_utils: low nibble = even element, bit 3 = sign, 16-wide blocks along K.
    lut = torch.tensor(E2M1 + [-v for v in E2M1])
    codes = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.long)
    codes[:, 0::2] = (packed & 0xF).long()
    codes[:, 1::2] = (packed >> 4).long()
    scales = block_scale.float().repeat_interleave(16, dim=1)
    return lut[codes] * scales * global_scale.float()


def test_nvfp4_tensors_and_exact_dequant(ckpts, refs):
    raw = _raw(ckpts["nvfp4-per-expert"])
    tc = mk.tiny_text_config()
    hidden, inter = tc["hidden_size"], tc["moe_intermediate_size"]
    layer, expert = 2, 5
    base = f"{MM_PREFIX}layers.{layer}.experts.{expert}."
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    deq = {}
    for proj, (n, k) in shapes.items():
        m = base + proj
        assert raw[f"{m}.weight"].dtype == torch.uint8 and raw[f"{m}.weight"].shape == (n, k // 2)
        assert raw[f"{m}.weight_scale"].dtype == torch.float8_e4m3fn and raw[f"{m}.weight_scale"].shape == (n, k // 16)
        for s in ("weight_scale_2", "input_scale"):
            assert raw[f"{m}.{s}"].dtype == torch.float32 and raw[f"{m}.{s}"].shape == ()
            assert raw[f"{m}.{s}"] > 0
        deq[proj] = _dequant_by_hand(raw[f"{m}.weight"], raw[f"{m}.weight_scale"], raw[f"{m}.weight_scale_2"])
    ref = refs["nvfp4-per-expert"]
    gate_up = ref[f"{MM_PREFIX}layers.{layer}.experts.gate_up_proj"][expert]
    assert torch.equal(gate_up[:inter], deq["gate_proj"]) and torch.equal(gate_up[inter:], deq["up_proj"])
    assert torch.equal(ref[f"{MM_PREFIX}layers.{layer}.experts.down_proj"][expert], deq["down_proj"])
    # Non-expert weights stay bf16 in the NVFP4 export.
    assert raw[f"{MM_PREFIX}layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16
    assert raw[f"{MM_PREFIX}layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_gate_and_up_global_scales_differ(ckpts):
    raw = _raw(ckpts["nvfp4-per-expert"])
    gates = [k for k in raw if k.endswith("gate_proj.weight_scale_2")]
    tc = mk.tiny_text_config()
    assert len(gates) == tc["num_hidden_layers"] * tc["num_experts"]
    for k in gates:
        assert not torch.equal(raw[k], raw[k.replace("gate_proj", "up_proj")]), k


# ------------------------------------------------------------------------------------------------
# Quantization config and exclude globs
# ------------------------------------------------------------------------------------------------


def _excluded(module: str, patterns: list[str]) -> bool:
    names = {module, module.replace("model.language_model.", "model.")}
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _quant_files(ckpt: Path) -> tuple[dict, dict]:
    hf = json.loads((ckpt / "hf_quant_config.json").read_text())
    return hf, json.loads((ckpt / "config.json").read_text())["quantization_config"]


def _linear_modules(ckpt: Path) -> list[str]:
    model = _model_for(ckpt)
    mods = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, module in model.named_modules():
        if name.endswith(".experts"):  # fused in transformers, one module per expert and projection on disk
            projs = ("gate_proj", "up_proj", "down_proj")
            mods += [f"{name}.{e}.{p}" for e in range(module.num_experts) for p in projs]
    return mods


@pytest.mark.parametrize("dense", [False, True])
def test_quant_config_and_excludes(tmp_path, ckpts, dense):
    ckpt = ckpts["nvfp4-per-expert"]
    if dense:
        ckpt = mk.write_checkpoint(tmp_path / "q", "nvfp4-per-expert", quantize_dense_mlp=True)
    hf, qc = _quant_files(ckpt)
    assert hf["producer"]["name"] == "modelopt" and hf["producer"]["version"]
    q = hf["quantization"]
    assert q["quant_algo"] == "NVFP4" and q["group_size"] == 16 and q["kv_cache_quant_algo"] is None
    assert qc["quant_method"] == "modelopt"
    assert {k: qc[k] for k in q} == q
    patterns = q["exclude_modules"]
    assert "lm_head" in patterns
    # At least one pattern that only matches once `language_model.` is stripped from the module path.
    assert any(p.startswith("model.") and "language_model" not in p for p in patterns if "layers" in p)
    raw = _raw(ckpt)
    for module in _linear_modules(ckpt):
        quantized = f"{module}.weight_scale" in raw
        assert quantized != _excluded(module, patterns), module
        is_expert = ".experts." in module
        assert quantized == (is_expert or (dense and ".mlp." in module)), module


def test_quantize_dense_mlp_needs_nvfp4(tmp_path):
    with pytest.raises(ValueError):
        mk.write_checkpoint(tmp_path, "bf16-fused", quantize_dense_mlp=True)
    with pytest.raises(ValueError):
        mk.write_checkpoint(tmp_path, "fp8")


# ------------------------------------------------------------------------------------------------
# Files, determinism, shards
# ------------------------------------------------------------------------------------------------


def _file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_deterministic(tmp_path, ckpts):
    again = mk.write_checkpoint(tmp_path / "again", "nvfp4-per-expert")
    assert _file_bytes(again) == _file_bytes(ckpts["nvfp4-per-expert"])
    other = mk.write_checkpoint(tmp_path / "other", "nvfp4-per-expert", seed=1)
    shard = "model-00001-of-00002.safetensors"
    assert _file_bytes(other)[shard] != _file_bytes(again)[shard]


def test_shards_index_and_files(tmp_path, ckpts):
    ckpt = ckpts["bf16-per-expert"]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for shard in shards:
        with safe_open(str(ckpt / shard), framework="pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == shard} == set(f.keys())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _raw(ckpt).values())
    assert re.search(r"experts\.0\.gate_proj\.weight", " ".join(index["weight_map"]))
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106, 50] and gen["top_k"] == 64
    assert gen["top_p"] == 0.95 and gen["temperature"] == 1.0
    single = mk.write_checkpoint(tmp_path / "one", "bf16-fused", num_shards=1)
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    # Rewriting with more shards removes the old single file.
    mk.write_checkpoint(single, "bf16-fused", num_shards=3)
    assert not (single / "model.safetensors").exists() and len(list(single.glob("*.safetensors"))) == 3


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def test_tokenizer(ckpts):
    tok = AutoTokenizer.from_pretrained(ckpts["bf16-fused"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|turn>": 105, "<turn|>": 106}
    assert 512 <= len(tok) <= mk.tiny_text_config()["vocab_size"] <= 1024
    texts = ["Hello world!", "  two  spaces\n\ttab", "naïve café ☕ 你好，世界 🎉🚀👩‍👩‍👧", "The capital of France is Paris."]
    for text in texts:
        encoded = tok.encode(text)
        assert encoded[0] != tok.bos_token_id
        assert tok.decode(encoded) == text
    assert tok.encode("<|turn>user\n")[0] == 105


def test_chat_template(ckpts):
    tok = AutoTokenizer.from_pretrained(ckpts["bf16-fused"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi there<turn|>\n"
        "<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n"
    )
    no_prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("Hi there<turn|>\n")
    ids = tok.apply_chat_template(messages[1:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[:2] == [2, 105] and ids.count(2) == 1


# ------------------------------------------------------------------------------------------------
# Demo model and CLI
# ------------------------------------------------------------------------------------------------


def test_demo_model_cached(tmp_path):
    path = mk.ensure_demo_model(tmp_path)
    assert path == tmp_path / mk.DEMO_MODEL_NAME
    assert json.loads((path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    stamp = (path / "config.json").stat().st_mtime_ns
    assert mk.ensure_demo_model(tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left behind
    (path / mk._DEMO_VERSION_FILE).write_text("stale\n")
    assert mk.ensure_demo_model(tmp_path) == path and mk._demo_is_current(path)


def test_cli(tmp_path):
    env_cache = tmp_path / "cache"
    out = tmp_path / "cli"
    cli = [sys.executable, "-m", "sglang.test.make_gemma4_checkpoint"]
    args = ["--layout", "nvfp4-per-expert", "--architecture", "Gemma4ForCausalLM"]
    args += ["--config-style", "per_layer_config", "--quantize-dense-mlp", "--seed", "3"]
    cmd = [*cli, str(out), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    raw = _raw(out)
    assert "model.layers.0.mlp.down_proj.weight_scale_2" in raw
    assert "per_layer_config" in json.loads((out / "config.json").read_text())
    env = {**os.environ, "SGLANG_CACHE_DIR": str(env_cache)}
    demo = subprocess.run([*cli, "--demo"], check=True, capture_output=True, text=True, env=env)
    assert Path(demo.stdout.strip()) == env_cache / mk.DEMO_MODEL_NAME
