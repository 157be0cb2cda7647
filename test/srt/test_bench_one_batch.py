"""sglang.bench_one_batch on CPU: the demo checkpoint, and a config-only tiny model with
--load-format dummy (the way the real 26B config is benchmarked on a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sglang import bench_one_batch
from sglang.bench_one_batch import BenchArgs, RunResult, StepTimer, format_table, random_prompts
from sglang.test.make_gemma4_checkpoint import model_config, quant_configs, tiny_text_config

RECORD_FIELDS = {
    "run_name", "batch_size", "input_len", "output_len", "prefill_latency", "prefill_throughput",
    "median_decode_latency", "median_decode_throughput", "total_latency", "overall_throughput",
    "decode_steps", "model_path", "load_format", "dtype", "device", "moe_runner_backend", "date",
}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_record(rec: dict, bs: int, input_len: int, output_len: int) -> None:
    assert RECORD_FIELDS <= set(rec)
    assert (rec["batch_size"], rec["input_len"], rec["output_len"]) == (bs, input_len, output_len)
    assert rec["decode_steps"] == output_len - 1
    assert rec["prefill_latency"] > 0 and rec["median_decode_latency"] > 0
    assert rec["prefill_throughput"] == pytest.approx(bs * input_len / rec["prefill_latency"])
    assert rec["median_decode_throughput"] == pytest.approx(bs / rec["median_decode_latency"])
    assert rec["overall_throughput"] == pytest.approx(bs * (input_len + output_len) / rec["total_latency"])
    assert rec["total_latency"] >= rec["prefill_latency"] + rec["median_decode_latency"]


def test_demo_model_several_batch_sizes(tmp_path, capsys):
    out = tmp_path / "result.jsonl"
    argv = ["--model-path", "sglang-demo/gemma4-tiny-nvfp4", "--device", "cpu", "--batch-size", "1", "4",
            "--input-len", "24", "--output-len", "4", "--result-filename", str(out), "--run-name", "demo"]
    results = bench_one_batch.main(argv)
    assert [r.batch_size for r in results] == [1, 4]
    records = _records(out)
    assert len(records) == 2 and {r["run_name"] for r in records} == {"demo"}
    for rec, bs in zip(records, (1, 4)):
        _check_record(rec, bs, 24, 4)
        assert rec["quantization"] == "modelopt_fp4" and rec["device"] == "cpu"
    text = capsys.readouterr().out
    assert "Prefill. latency:" in text and "Decode.  median latency:" in text
    assert "prefill tok/s" in text and "decode tok/s" in text  # the table
    bench_one_batch.main(argv[:-4] + ["--result-filename", str(out)])  # appends
    assert len(_records(out)) == 4


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "nvfp4"])
def test_dummy_weights_from_config_only(tmp_path, quantized):
    """Only config.json: no weights, no tokenizer, as with the real config and --load-format dummy."""
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    tc = tiny_text_config()
    config = model_config(tc, "Gemma4ForCausalLM")
    if quantized:
        hf_quant, config["quantization_config"] = quant_configs("Gemma4ForCausalLM", tc["num_hidden_layers"], False)
        (model_dir / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "r.jsonl"
    bench_one_batch.main(["--model-path", str(model_dir), "--load-format", "dummy", "--device", "cpu",
                          "--dtype", "float32", "--moe-runner-backend", "torch", "--batch-size", "3",
                          "--input-len", "20", "--output-len", "3", "--result-filename", str(out)])
    (rec,) = _records(out)
    _check_record(rec, 3, 20, 3)
    assert rec["load_format"] == "dummy" and rec["dtype"] == "float32"
    assert rec["quantization"] == ("modelopt_fp4" if quantized else None)


def test_prompts_are_random_and_seeded():
    p = random_prompts(4, 50, 768, seed=3)
    assert len(p) == 4 and all(len(row) == 50 for row in p)
    flat = [t for row in p for t in row]
    assert min(flat) >= 110 and max(flat) < 768 and len(set(flat)) > 50
    assert p == random_prompts(4, 50, 768, seed=3) and p != random_prompts(4, 50, 768, seed=4)


def test_cpu_timer_and_table():
    seconds, value = StepTimer("cpu").time(lambda: sum(range(1000)))
    assert value == sum(range(1000)) and seconds > 0
    table = format_table([RunResult(8, 128, 5, 0.5, [0.01, 0.02, 0.03, 0.04])])
    assert "8    128      5" in table and "2048.0" in table and "320.0" in table  # 8*128/0.5, 8/0.025


def test_cli_defaults_and_context_check(tmp_path):
    args = bench_one_batch.build_parser().parse_args(["--model-path", "m"])
    assert BenchArgs.from_cli_args(args) == BenchArgs()
    with pytest.raises(SystemExit):  # 4096-token demo context
        bench_one_batch.main(["--model-path", "sglang-demo/gemma4-tiny-nvfp4", "--device", "cpu",
                              "--input-len", "4090", "--output-len", "16", "--result-filename", str(tmp_path / "x")])
