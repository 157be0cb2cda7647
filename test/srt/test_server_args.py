"""ServerArgs: CLI generation, validation, and the Gemma 4 backend choice per GPU generation.

Checkpoints here are config-only directories (no weights): ServerArgs reads config.json and
hf_quant_config.json and never touches a GPU; the GPU generation comes from a patched get_device_sm.
"""

from __future__ import annotations

import json
from unittest import mock

import pytest

from sglang.srt.server_args import ServerArgs, prepare_server_args

NVFP4_QUANT = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}


def _text_config() -> dict:
    return {
        "model_type": "gemma4_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"], "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
        "sliding_window": 8, "hidden_activation": "gelu_pytorch_tanh", "enable_moe_block": True, "num_experts": 4,
        "top_k_experts": 2, "moe_intermediate_size": 16, "max_position_embeddings": 256,
    }


def write_checkpoint(path, architecture: str = "Gemma4ForConditionalGeneration", nvfp4: bool = True):
    config = {"architectures": [architecture]}
    if architecture == "Gemma4ForConditionalGeneration":
        config.update(model_type="gemma4", text_config=_text_config())
    else:
        config.update(_text_config())
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if nvfp4:
        (path / "hf_quant_config.json").write_text(json.dumps(NVFP4_QUANT))
    return str(path)


@pytest.fixture
def nvfp4_ckpt(tmp_path):
    return write_checkpoint(tmp_path / "nvfp4")


@pytest.fixture
def bf16_ckpt(tmp_path):
    return write_checkpoint(tmp_path / "bf16", architecture="Gemma4ForCausalLM", nvfp4=False)


def on_sm(sm: int):
    return mock.patch("sglang.srt.utils.get_device_sm", return_value=sm)


# ------------------------------------------------------------------ backend choice


@pytest.mark.parametrize("sm,expected", [(100, "flashinfer_trtllm"), (103, "flashinfer_trtllm"), (90, "triton"), (80, "triton"), (120, "triton")])
def test_gemma4_nvfp4_auto_backend_per_gpu(nvfp4_ckpt, sm, expected):
    with on_sm(sm), mock.patch("torch.cuda.is_available", side_effect=AssertionError("must not touch the GPU")):
        args = ServerArgs(model_path=nvfp4_ckpt, device="cuda")
    assert args.quantization == "modelopt_fp4"
    assert args.moe_runner_backend == expected


def test_gemma4_nvfp4_on_cpu_uses_torch(nvfp4_ckpt):
    args = ServerArgs(model_path=nvfp4_ckpt, device="cpu")
    assert args.moe_runner_backend == "torch"
    assert args.attention_backend == "torch_native"
    assert args.disable_cuda_graph is True


@pytest.mark.parametrize("architecture", ["Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"])
def test_both_gemma4_architectures_are_recognised(tmp_path, architecture):
    ckpt = write_checkpoint(tmp_path / architecture, architecture=architecture)
    with on_sm(100):
        assert ServerArgs(model_path=ckpt, device="cuda").moe_runner_backend == "flashinfer_trtllm"


@pytest.mark.parametrize("sm,device,expected", [(100, "cuda", "triton"), (90, "cuda", "triton"), (0, "cpu", "torch")])
def test_gemma4_bf16_experts(bf16_ckpt, sm, device, expected):
    with on_sm(sm):
        args = ServerArgs(model_path=bf16_ckpt, device=device)
    assert args.quantization is None
    assert args.moe_runner_backend == expected


@pytest.mark.parametrize("sm,choice", [(100, "triton"), (100, "torch"), (90, "torch"), (90, "triton")])
def test_explicit_backend_is_kept(nvfp4_ckpt, sm, choice):
    with on_sm(sm):
        assert ServerArgs(model_path=nvfp4_ckpt, device="cuda", moe_runner_backend=choice).moe_runner_backend == choice


@pytest.mark.parametrize("sm", [90, 80])
def test_flashinfer_trtllm_below_sm100_is_rejected_with_reason(nvfp4_ckpt, sm):
    with on_sm(sm), pytest.raises(ValueError, match=rf"SM100.*SM{sm}"):
        ServerArgs(model_path=nvfp4_ckpt, device="cuda", moe_runner_backend="flashinfer_trtllm")


@pytest.mark.parametrize("sm", [80, 86])
def test_fp8_kv_cache_below_sm89_is_rejected_with_reason(nvfp4_ckpt, sm):
    with on_sm(sm), pytest.raises(ValueError, match=rf"fp8_e4m3 needs fp8 support \(SM89\+.*SM{sm}"):
        ServerArgs(model_path=nvfp4_ckpt, device="cuda", kv_cache_dtype="fp8_e4m3")
    with on_sm(sm):  # auto (and bf16) stay allowed: the runner keeps the model dtype there
        assert ServerArgs(model_path=nvfp4_ckpt, device="cuda").kv_cache_dtype == "auto"


@pytest.mark.parametrize("sm", [89, 90, 100])
def test_fp8_kv_cache_from_sm89_is_accepted(nvfp4_ckpt, sm):
    with on_sm(sm):
        assert ServerArgs(model_path=nvfp4_ckpt, device="cuda", kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8_e4m3"


def test_gpu_backends_on_cpu_are_rejected(nvfp4_ckpt):
    with pytest.raises(ValueError, match="needs a GPU"):
        ServerArgs(model_path=nvfp4_ckpt, device="cpu", moe_runner_backend="flashinfer_trtllm")
    with pytest.raises(ValueError, match="needs a GPU"):
        ServerArgs(model_path=nvfp4_ckpt, device="cpu", moe_runner_backend="triton")


def test_quantization_mismatch_is_rejected(bf16_ckpt):
    with pytest.raises(ValueError, match="does not match"):
        ServerArgs(model_path=bf16_ckpt, device="cpu", quantization="modelopt_fp4")


def test_resolution_is_idempotent(nvfp4_ckpt):
    import dataclasses

    with on_sm(100):
        args = ServerArgs(model_path=nvfp4_ckpt, device="cuda")
        again = dataclasses.replace(args)
    assert again == args


# ------------------------------------------------------------------ CLI and validation


def test_cli_is_generated_from_the_dataclass(nvfp4_ckpt):
    args = prepare_server_args([
        "--model", nvfp4_ckpt, "--device", "cpu", "--port", "31000", "--max-total-tokens", "4096",
        "--chunked-prefill-size", "-1", "--disable-radix-cache", "--enable-metrics", "--api-key", "k",
        "--served-model-name", "m", "--dtype", "float32", "--tp-size", "1", "--random-seed", "7",
    ])
    assert args.model_path == nvfp4_ckpt and args.port == 31000 and args.max_total_tokens == 4096
    assert args.chunked_prefill_size == -1 and args.disable_radix_cache and args.enable_metrics
    assert (args.api_key, args.served_model_name, args.dtype, args.random_seed) == ("k", "m", "float32", 7)
    assert prepare_server_args(["--model-path", nvfp4_ckpt, "--device", "cpu"]).served_model_name == nvfp4_ckpt


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--mem-fraction-static", "1.5"], "mem-fraction-static"),
        (["--max-total-tokens", "0"], "max-total-tokens"),
        (["--tp-size", "2"], "tensor parallelism"),
        (["--port", "70000"], "port"),
        (["--chunked-prefill-size", "0"], "chunked-prefill-size"),
        (["--decode-log-interval", "0"], "decode-log-interval must be positive"),
        (["--moe-runner-backend", "magic"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_values_with_clear_errors(nvfp4_ckpt, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        prepare_server_args(["--model-path", nvfp4_ckpt, "--device", "cpu", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_path_is_an_error(capsys):
    with pytest.raises(SystemExit):
        prepare_server_args([])
    assert "--model-path" in capsys.readouterr().err


def test_direct_construction_validates(nvfp4_ckpt):
    with pytest.raises(ValueError, match="dtype"):
        ServerArgs(model_path=nvfp4_ckpt, device="cpu", dtype="int3")
    with pytest.raises(ValueError, match="schedule-conservativeness"):
        ServerArgs(model_path=nvfp4_ckpt, device="cpu", schedule_conservativeness=0)
