"""SGLang's launch_server flags: accepted in SGLang's spelling and meaning, or refused with a clear error.

Checkpoints are the config-only directories of test_server_args (max_position_embeddings 256); the
tokenizer is mocked, so nothing here loads weights or touches a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
from unittest import mock

import pytest
from test_server_args import write_checkpoint

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.managers.tokenizer_manager import load_tokenizer
from sglang.srt.server_args import ServerArgs, prepare_server_args

ALLOW_LONGER = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "ckpt", architecture="Gemma4ForCausalLM", nvfp4=False)


def cli(ckpt, *argv):
    return prepare_server_args(["--model-path", ckpt, "--device", "cpu", *argv])


def cli_error(ckpt, capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli(ckpt, *argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def tokenizer_with(args):
    """load_tokenizer(args) with AutoTokenizer mocked; returns (tokenizer, from_pretrained mock)."""
    with mock.patch("transformers.AutoTokenizer.from_pretrained", return_value=mock.MagicMock(chat_template=None)) as fp:
        return load_tokenizer(args), fp


# ------------------------------------------------------------------ flags SGLang users pass


def test_sglang_flags_are_accepted(ckpt):
    args = cli(
        ckpt, "--trust-remote-code", "--tensor-parallel-size", "1", "--dp-size", "1", "--data-parallel-size", "1",
        "--page-size", "1", "--dtype", "half",
    )  # fmt: skip
    assert args.trust_remote_code is True
    assert (args.tp_size, args.dp_size, args.page_size, args.dtype) == (1, 1, 1, "float16")
    defaults = cli(ckpt)
    assert (defaults.trust_remote_code, defaults.dp_size, defaults.page_size, defaults.enable_torch_compile) == (False, 1, 1, False)


@pytest.mark.parametrize("given,expected", [("half", "float16"), ("float", "float32"), ("float16", "float16"), ("auto", "auto")])
def test_sglang_dtype_spellings_are_normalised(ckpt, given, expected):
    assert cli(ckpt, "--dtype", given).dtype == expected
    assert ServerArgs(model_path=ckpt, device="cpu", dtype=given).dtype == expected


def test_trust_remote_code_reaches_the_tokenizer(ckpt):
    for flags, expected in (((), False), (("--trust-remote-code",), True)):
        _, from_pretrained = tokenizer_with(cli(ckpt, *flags))
        assert from_pretrained.call_args.kwargs["trust_remote_code"] is expected


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tensor-parallel-size", "2"], "--tp-size 2: tensor parallelism is not supported"),
        (["--dp-size", "2"], "--dp-size 2: data parallelism is not supported; use 1"),
        (["--data-parallel-size", "4"], "--dp-size 4: data parallelism is not supported; use 1"),
        (["--page-size", "16"], "--page-size 16: the KV pool allocates one token slot at a time (page size 1); use 1"),
        (["--page-size", "0"], "--page-size 0"),
        (["--dtype", "int8"], "invalid choice"),
    ],
)
def test_unsupported_sglang_values_are_rejected(ckpt, capsys, argv, message):
    assert message in cli_error(ckpt, capsys, *argv)


def test_enable_torch_compile_warns_once_that_it_has_no_effect(ckpt, caplog):
    with caplog.at_level(logging.WARNING, logger="sglang.srt.server_args"):
        args = cli(ckpt, "--enable-torch-compile")
    assert args.enable_torch_compile is True
    warnings = [r.getMessage() for r in caplog.records if "torch-compile" in r.getMessage()]
    assert len(warnings) == 1 and "no effect" in warnings[0] and "CUDA graphs" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sglang.srt.server_args"):
        cli(ckpt)
    assert not [r for r in caplog.records if "torch-compile" in r.getMessage()]


def test_random_seed_defaults_to_a_random_one_and_an_explicit_one_is_kept(ckpt):
    seeds = {cli(ckpt).random_seed for _ in range(3)}
    assert all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds)
    assert len(seeds) > 1  # chosen at start-up, not a fixed default (3 equal draws of 2**31: never)
    assert cli(ckpt, "--random-seed", "0").random_seed == 0
    assert ServerArgs(model_path=ckpt, device="cpu", random_seed=5).random_seed == 5
    args = ServerArgs(model_path=ckpt, device="cpu")
    assert dataclasses.replace(args).random_seed == args.random_seed  # resolution is idempotent


def test_dummy_weights_stay_the_same_across_starts(ckpt):
    """A random sampling seed must not give every --load-format dummy start new weights (benchmark
    runs compare on the same ones): seed 0 unless --random-seed or --dummy-weight-seed says otherwise."""
    assert {cli(ckpt).dummy_weight_seed for _ in range(3)} == {0}
    assert cli(ckpt, "--random-seed", "9").dummy_weight_seed == 9
    assert cli(ckpt, "--random-seed", "9", "--dummy-weight-seed", "3").dummy_weight_seed == 3


# ------------------------------------------------------------------ --chat-template


def test_chat_template_file_is_read(ckpt, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    tokenizer, _ = tokenizer_with(cli(ckpt, "--chat-template", str(path)))
    assert tokenizer.chat_template == TEMPLATE


@pytest.mark.parametrize("template", [TEMPLATE, "{{ messages[0]['content'] }}", TEMPLATE * 20], ids=["loop", "expression", "longer-than-a-file-name"])
def test_inline_jinja_chat_template_is_used(ckpt, template):
    tokenizer, _ = tokenizer_with(cli(ckpt, "--chat-template", template))
    assert tokenizer.chat_template == template


def test_no_chat_template_keeps_the_tokenizers(ckpt):
    tokenizer, _ = tokenizer_with(cli(ckpt))
    assert tokenizer.chat_template is None


@pytest.mark.parametrize("value", ["chatml", "llama-3-instruct", "templates/missing.jinja", "/no/such/dir/template.jinja"])
def test_chat_template_neither_file_nor_jinja_is_rejected(ckpt, capsys, value):
    err = cli_error(ckpt, capsys, "--chat-template", value)
    assert f"--chat-template '{value}' is neither an existing file nor a Jinja template" in err
    assert "'chatml' are not supported" in err
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        ServerArgs(model_path=ckpt, device="cpu", chat_template=value)


def test_chat_template_directory_is_rejected(ckpt, tmp_path):
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        ServerArgs(model_path=ckpt, device="cpu", chat_template=str(tmp_path))


def test_sglang_json_chat_template_is_rejected(ckpt, capsys, tmp_path):
    path = tmp_path / "my_template.json"
    path.write_text('{"name": "chatml", "system": "{{ x }}"}')
    err = cli_error(ckpt, capsys, "--chat-template", str(path))
    assert "JSON conversation templates are not supported here; use a Jinja template file" in err
    assert str(path) in err


# ------------------------------------------------------------------ --context-length


def test_context_length_up_to_the_model_limit_is_accepted(ckpt, monkeypatch):
    monkeypatch.delenv(ALLOW_LONGER, raising=False)
    assert cli(ckpt, "--context-length", "256").context_length == 256
    assert ModelConfig(ckpt, context_length=100).context_len == 100
    assert ModelConfig(ckpt).context_len == 256


def test_context_length_beyond_the_model_is_refused_without_the_env_var(ckpt, capsys, monkeypatch):
    monkeypatch.delenv(ALLOW_LONGER, raising=False)
    err = cli_error(ckpt, capsys, "--context-length", "300")
    assert "--context-length 300" in err and "max_position_embeddings 256" in err and f"{ALLOW_LONGER}=1" in err
    with pytest.raises(ValueError, match=rf"300.*256.*{ALLOW_LONGER}=1"):
        ModelConfig(ckpt, context_length=300)
    monkeypatch.setenv(ALLOW_LONGER, "0")
    with pytest.raises(ValueError, match=ALLOW_LONGER):
        ModelConfig(ckpt, context_length=300)


def test_context_length_beyond_the_model_is_used_with_the_env_var(ckpt, monkeypatch, caplog):
    monkeypatch.setenv(ALLOW_LONGER, "1")
    with caplog.at_level(logging.WARNING, logger="sglang.srt.configs.model_config"):
        args = cli(ckpt, "--context-length", "300")
        assert ModelConfig.from_server_args(args).context_len == 300
    assert any("300" in r.getMessage() and "256" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ --sampling-defaults, --enable-cache-report


@pytest.mark.parametrize("mode,expected", [("model", (0.0, 64)), ("openai", (1.0, -1))])
def test_sampling_defaults_come_from_the_model_or_openai(mode, expected):
    from conftest import FakeModelRunner
    from test_scheduler import make_args

    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.sampling.sampling_params import SamplingParams

    runner = FakeModelRunner()
    runner.model_config.hf_generation_config = {"do_sample": False, "top_k": 64}
    s = Scheduler(make_args(sampling_defaults=mode), model_runner=runner)
    s.add_request(TokenizedGenerateReqInput("r", [2, 3, 4], SamplingParams(max_new_tokens=2)))
    params = s.waiting_queue[0].sampling_params
    assert (params.temperature, params.top_k) == expected


def test_enable_cache_report_sampling_defaults_and_reasoning_parser_flags_parse(ckpt, capsys):
    args = cli(ckpt, "--enable-cache-report", "--sampling-defaults", "openai", "--reasoning-parser", "gemma4")
    assert args.enable_cache_report is True and args.sampling_defaults == "openai" and args.reasoning_parser == "gemma4"
    assert "invalid choice" in cli_error(ckpt, capsys, "--sampling-defaults", "vllm")
    assert "invalid choice" in cli_error(ckpt, capsys, "--reasoning-parser", "qwen3")
