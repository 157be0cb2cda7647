"""Where models and tokenizers come from: local dirs, the demo name, shipped real configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.weight_utils import resolve_model_path, resolve_tokenizer_path
from sglang.srt.server_args import ServerArgs
from sglang.test.make_gemma4_checkpoint import DEMO_MODEL_NAME, ensure_demo_model


@pytest.mark.parametrize("repo", ["nvidia/Gemma-4-26B-A4B-NVFP4", "google/gemma-4-26b-a4b"])
def test_dummy_load_uses_shipped_real_config_without_network(repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(repo, load_format="dummy")
    assert Path(cfg.model_path).is_relative_to(Path(__file__).resolve().parents[2] / "python")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (2816, 30, 262144)
    assert (cfg.text_config["num_experts"], cfg.text_config["top_k_experts"]) == (128, 8)
    assert cfg.quantization == ("modelopt_fp4" if repo.startswith("nvidia") else None)
    full = [i for i, s in enumerate(cfg.layer_specs) if not s.is_sliding]
    assert full == [5, 11, 17, 23, 29] and cfg.layer_specs[5].head_dim == 512


def test_real_weights_of_a_hub_id_still_go_to_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not fetch model"):
        resolve_model_path("nvidia/Gemma-4-26B-A4B-NVFP4")


def test_tokenizer_for_dummy_shipped_config_falls_back_to_demo():
    args = ServerArgs(model_path="nvidia/Gemma-4-26B-A4B-NVFP4", load_format="dummy", device="cpu")
    assert resolve_tokenizer_path(args) == str(ensure_demo_model())


def test_demo_name_and_explicit_tokenizer_paths(tmp_path):
    args = ServerArgs(model_path=DEMO_MODEL_NAME, device="cpu")
    assert resolve_tokenizer_path(args) == str(ensure_demo_model())
    args = ServerArgs(model_path=DEMO_MODEL_NAME, tokenizer_path=str(tmp_path), device="cpu")
    assert resolve_tokenizer_path(args) == str(tmp_path)
