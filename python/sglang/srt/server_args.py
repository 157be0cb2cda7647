"""ServerArgs: the single source of settings for the server, the Engine and the benchmarks.

The CLI is generated from the dataclass fields (help, choices and aliases live in each field's
metadata). Construction validates the values and resolves every `auto`/None default into a concrete
value, reading the model's config and the GPU generation (`utils.get_device_sm`) but never touching a
GPU, so the same resolution is testable on a CPU-only machine.
"""

from __future__ import annotations

import os

import argparse
import dataclasses
import importlib.util
import logging
import random
import typing
from dataclasses import dataclass, field
from pathlib import Path

from sglang.srt import utils

logger = logging.getLogger(__name__)

GEMMA4_ARCHITECTURES = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
MOE_RUNNER_BACKENDS = ("auto", "torch", "triton", "flashinfer_trtllm")
ATTENTION_BACKENDS = ("torch_native", "triton")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # SGLang's spellings


def _opt(default, help: str, choices=None, aliases=(), **kw):
    """A dataclass field carrying its CLI help, choices and extra flag spellings."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases, **kw})


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str = field(metadata={"help": "Local checkpoint dir, hub repo id, or the demo model name.", "aliases": ("--model",)})
    tokenizer_path: str | None = _opt(None, "Tokenizer dir or repo id (default: the model path).")
    revision: str | None = _opt(None, "Hub revision of the model.")
    download_dir: str | None = _opt(None, "Cache dir for hub downloads.")
    load_format: str = _opt("auto", "Weight format; dummy = random weights of the real shapes.", ("auto", "safetensors", "dummy"))
    dtype: str = _opt(
        "auto", "Activation/weight dtype of the non-quantized parts (half = float16, float = float32).",
        ("auto", "bfloat16", "float16", "float32", *DTYPE_ALIASES),
    )  # fmt: skip
    quantization: str | None = _opt(None, "Weight quantization (default: detected from the checkpoint).", ("modelopt_fp4",))
    device: str | None = _opt(None, "cuda or cpu (default: cuda when available).", ("cuda", "cpu"))
    context_length: int | None = _opt(None, "Max tokens per request, prompt + output (default: the model's).")
    skip_tokenizer_init: bool = _opt(False, "Do not load a tokenizer; requests must carry input_ids.")
    trust_remote_code: bool = _opt(False, "Let the tokenizer run custom code shipped with the checkpoint.")
    chat_template: str | None = _opt(None, "Jinja chat template file, or an inline Jinja template, overriding the tokenizer's.")
    # Memory and scheduling
    mem_fraction_static: float | None = _opt(None, "Fraction of GPU memory for weights + KV pool.")
    max_total_tokens: int | None = _opt(None, "KV pool size in tokens (overrides --mem-fraction-static).")
    max_running_requests: int | None = _opt(None, "Max requests decoding at once.")
    max_prefill_tokens: int = _opt(16384, "Max new prompt tokens in one prefill batch.")
    chunked_prefill_size: int | None = _opt(None, "Max prompt tokens of one request per step; -1 disables chunking.")
    schedule_policy: str = _opt("fcfs", "Waiting-queue order: first come first served, or longest prefix match.", ("fcfs", "lpm"))
    schedule_conservativeness: float = _opt(1.0, "Higher reserves more KV for future output tokens.")
    disable_radix_cache: bool = _opt(False, "Disable prefix caching.")
    kv_cache_dtype: str = _opt(
        "auto",
        "KV cache dtype; auto: fp8_e4m3 on GPU when the checkpoint is calibrated for it (kv_cache_quant_algo FP8), "
        "else the model dtype.",
        ("auto", "bf16", "bfloat16", "fp8_e4m3"),
    )
    swa_full_tokens_ratio: float = _opt(0.8, "Sliding-window layers' KV pool size as a fraction of the full layers' pool (tokens).")
    disable_hybrid_swa_memory: bool = _opt(False, "One KV pool for all layers (sliding layers keep every token's KV).")
    page_size: int = _opt(1, "Tokens per KV page; the KV pool allocates one token slot at a time, so only 1.")
    # Kernels
    attention_backend: str | None = _opt(None, "Attention kernels (default: torch_native on CPU).", ATTENTION_BACKENDS)
    moe_runner_backend: str = _opt("auto", "MoE expert kernels.", MOE_RUNNER_BACKENDS)
    disable_cuda_graph: bool = _opt(False, "Run decode without CUDA graphs.")
    cuda_graph_max_bs: int | None = _opt(None, "Largest decode batch captured in a CUDA graph.")
    skip_server_warmup: bool = _opt(False, "Start serving without first compiling the prefill kernels (the first prefills of each size class then compile them, stalling running requests).")
    disable_overlap_schedule: bool = _opt(False, "Finish each step before scheduling the next (on CUDA the next decode is launched while the previous one's results are processed).")
    enable_mixed_chunk: bool = _opt(False, "Run the running requests' decode tokens in the same step as a prefill chunk, so a prefill no longer stalls them.")
    enable_torch_compile: bool = _opt(False, "Accepted for SGLang compatibility; no effect (decode runs Triton kernels under CUDA graphs).")
    tp_size: int = _opt(1, "Tensor parallel size.", aliases=("--tensor-parallel-size",))
    dp_size: int = _opt(1, "Data parallel size (only 1).", aliases=("--data-parallel-size",))
    random_seed: int | None = _opt(None, "Seed for unseeded sampling (default: random at start-up, as in SGLang).")
    dummy_weight_seed: int | None = _opt(None, "Seed of the --load-format dummy weights (default: --random-seed when given, else 0, so that runs compare on the same weights).")
    # HTTP server
    host: str = _opt("127.0.0.1", "HTTP host.")
    port: int = _opt(30000, "HTTP port.")
    served_model_name: str | None = _opt(None, "Model name reported by the API (default: the model path).")
    api_key: str | None = _opt(None, "Require `Authorization: Bearer <key>` on every endpoint but /health.")
    enable_metrics: bool = _opt(False, "Serve Prometheus metrics at /metrics.")
    enable_cache_report: bool = _opt(False, "Accepted for SGLang compatibility: usage.prompt_tokens_details.cached_tokens is always reported.")
    reasoning_parser: str | None = _opt(None, "Split the model's thinking into reasoning_content (chat completions).", ("gemma4",))
    sampling_defaults: str = _opt(
        "model", "Defaults of unset sampling knobs: the model's generation_config, or OpenAI's (temperature 1, top_p 1).",
        ("model", "openai"),
    )  # fmt: skip
    log_level: str = _opt("info", "Logging level.", ("debug", "info", "warning", "error", "critical"))
    log_requests: bool = _opt(False, "Log every request's inputs and outputs.")
    decode_log_interval: int = _opt(40, "Log a decode batch line (running requests, tokens, generation rate) every this many decode steps.")

    def __post_init__(self):
        self._validate()
        self._resolve_defaults()
        self._handle_model_specific_adjustments()

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{_flag(f.name)} must be one of {list(choices)}, got {value!r}")
        if not self.model_path:
            raise ValueError("--model-path is required")
        _check(self.tp_size == 1, f"--tp-size {self.tp_size}: tensor parallelism is not supported yet; use 1")
        _check(self.dp_size == 1, f"--dp-size {self.dp_size}: data parallelism is not supported; use 1")
        _check(
            self.page_size == 1,
            f"--page-size {self.page_size}: the KV pool allocates one token slot at a time (page size 1); use 1",
        )
        if self.chat_template:
            read_chat_template(self.chat_template)
        _check(1 <= self.port <= 65535, f"--port must be in 1..65535, got {self.port}")
        _positive(self, "context_length", "max_total_tokens", "max_running_requests", "max_prefill_tokens", "cuda_graph_max_bs",
                  "decode_log_interval")
        if self.mem_fraction_static is not None:
            _check(0.0 < self.mem_fraction_static < 1.0, f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        if self.chunked_prefill_size is not None:
            _check(
                self.chunked_prefill_size > 0 or self.chunked_prefill_size == -1,
                f"--chunked-prefill-size must be positive or -1 (disabled), got {self.chunked_prefill_size}",
            )
        _check(self.schedule_conservativeness > 0, "--schedule-conservativeness must be positive")
        _check(self.swa_full_tokens_ratio > 0, f"--swa-full-tokens-ratio must be positive, got {self.swa_full_tokens_ratio}")
        if self.device == "cpu":
            _check(self.kv_cache_dtype != "fp8_e4m3", "--kv-cache-dtype fp8_e4m3 needs a GPU; use auto on CPU")
            # Triton's interpreter runs the kernels on the CPU (slowly): tests use it.
            _check(
                self.attention_backend != "triton" or os.environ.get("TRITON_INTERPRET") == "1",
                "--attention-backend triton needs a GPU (or TRITON_INTERPRET=1); use torch_native on CPU",
            )

    # ---------------------------------------------------------------- defaults
    def _resolve_defaults(self) -> None:
        if self.device is None:
            self.device = "cuda" if utils.is_cuda_available() else "cpu"
        on_gpu = self.device == "cuda"
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path
        if self.served_model_name is None:
            self.served_model_name = self.model_path
        if self.attention_backend is None:
            self.attention_backend = "triton" if on_gpu and _module_exists("sglang.srt.layers.attention.triton_backend") else "torch_native"
        if self.chunked_prefill_size is None:
            # CPU steps are slow, so smaller chunks keep decode latency of other requests bounded.
            self.chunked_prefill_size = 8192 if on_gpu else 2048
        if self.mem_fraction_static is None and on_gpu:
            self.mem_fraction_static = 0.85
        if self.cuda_graph_max_bs is None and on_gpu:
            self.cuda_graph_max_bs = 160
        if not on_gpu:
            self.disable_cuda_graph = True
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.dummy_weight_seed is None:
            self.dummy_weight_seed = 0 if self.random_seed is None else self.random_seed
        if self.random_seed is None:
            self.random_seed = random.SystemRandom().randrange(2**31)
        if self.enable_torch_compile:
            logger.warning(
                "--enable-torch-compile has no effect here: this runtime does not use torch.compile "
                "(decode runs Triton kernels under CUDA graphs)"
            )

    def _handle_model_specific_adjustments(self) -> None:
        """Resolve `auto` backends from the model's architecture, its quantization and the GPU."""
        info = _read_model_info(self)
        if info is None:
            architectures, quantization = [], self.quantization
        else:
            architectures, quantization = info
            if self.quantization is None:
                self.quantization = quantization
        sm = utils.get_device_sm() if self.device == "cuda" else 0
        _check(
            self.kv_cache_dtype != "fp8_e4m3" or self.device != "cuda" or sm >= utils.FP8_KV_MIN_SM,
            f"--kv-cache-dtype fp8_e4m3 needs fp8 support (SM{utils.FP8_KV_MIN_SM}+, Ada/Hopper or newer); "
            f"this GPU is SM{sm}: use bf16",
        )
        if set(architectures) & set(GEMMA4_ARCHITECTURES):
            self.moe_runner_backend = _gemma4_moe_backend(self.moe_runner_backend, self.device, sm, quantization)
        elif self.moe_runner_backend == "auto":
            self.moe_runner_backend = "triton" if self.device == "cuda" else "torch"
        _check_moe_backend_possible(self.moe_runner_backend, self.device, sm)

    # ---------------------------------------------------------------- CLI
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        hints = typing.get_type_hints(ServerArgs)
        for f in dataclasses.fields(ServerArgs):
            flags = [f"--{_flag(f.name)}", *f.metadata.get("aliases", ())]
            kind = _scalar_type(hints[f.name])
            kw: dict = {"dest": f.name, "help": f.metadata.get("help")}
            if kind is bool:
                kw["action"] = "store_true"
            else:
                kw["type"] = kind
                if f.metadata.get("choices"):
                    kw["choices"] = list(f.metadata["choices"])
            if f.default is dataclasses.MISSING:
                kw["required"] = True
            else:
                kw["default"] = f.default
            parser.add_argument(*flags, **kw)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


# -------------------------------------------------------------------- helpers


def prepare_server_args(argv: list[str]) -> ServerArgs:
    """Parse a command line into resolved ServerArgs; bad values end with an argparse error."""
    parser = argparse.ArgumentParser(prog="python -m sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    try:
        return ServerArgs.from_cli_args(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


def read_chat_template(value: str) -> str:
    """The Jinja text of --chat-template: a file's contents, or the value itself if it is Jinja."""
    path = Path(value)
    if os.path.isfile(value):  # False, not OSError, for an inline template longer than a file name may be
        _check(
            path.suffix != ".json",
            f"--chat-template {value}: SGLang's JSON conversation templates are not supported here; use a Jinja template file",
        )
        return path.read_text()
    _check(
        "{{" in value or "{%" in value,
        f"--chat-template {value!r} is neither an existing file nor a Jinja template "
        "(built-in template names such as SGLang's 'chatml' are not supported; pass a Jinja file)",
    )
    return value


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(args: ServerArgs, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        _check(value is None or value > 0, f"--{_flag(name)} must be positive, got {value}")


def _scalar_type(hint) -> type:
    """`int | None` -> int; bool stays bool."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _read_model_info(args: ServerArgs) -> tuple[list[str], str | None] | None:
    """(architectures, detected quantization) from the checkpoint's config files.

    A model that cannot be located yet (an unreachable hub id) resolves generically with a warning;
    the loader reports the real problem later. A config that is found but wrong raises here.
    """
    from sglang.srt.configs.model_config import ModelConfig

    try:
        config = ModelConfig(
            args.model_path, revision=args.revision, quantization=args.quantization,
            download_dir=args.download_dir, load_format=args.load_format, context_length=args.context_length,
        )  # fmt: skip
    except (FileNotFoundError, RuntimeError, OSError) as e:
        logger.warning("could not read the model config of %s (%s); backends resolve without it", args.model_path, e)
        return None
    return config.architectures, config.quantization


def _gemma4_moe_backend(requested: str, device: str, sm: int, quantization: str | None) -> str:
    """Gemma 4 expert kernels: the explicit choice, else the fastest one this GPU generation has."""
    if requested != "auto":
        return requested
    if device != "cuda":
        return "torch"
    if quantization == "modelopt_fp4":
        if sm // 10 == 10:  # SM100 family (B200/GB200 100, B300 103): TRT-LLM-gen NVFP4 MoE kernels
            return "flashinfer_trtllm"
        if sm >= 80:  # Ampere/Hopper (and consumer Blackwell SM120): Triton W4A16 kernels
            return "triton"
        logger.warning("GPU SM%d is older than SM80; NVFP4 experts use the torch reference runner", sm)
        return "torch"
    return "triton"


def _check_moe_backend_possible(backend: str, device: str, sm: int) -> None:
    if backend == "flashinfer_trtllm":
        _check(device == "cuda", "--moe-runner-backend flashinfer_trtllm needs a GPU; use torch on CPU")
        _check(
            sm // 10 == 10,
            f"--moe-runner-backend flashinfer_trtllm needs an SM100-family GPU (B200/GB200/B300); this GPU "
            f"is SM{sm}, whose NVFP4 MoE path is --moe-runner-backend triton",
        )
    if backend == "triton":
        _check(device == "cuda", "--moe-runner-backend triton needs a GPU; use torch on CPU")
