"""ModelRunner: owns the model, the KV memory and the attention backend; runs one step at a time.

KV memory: with sliding and full layers (Gemma 4) the pool is hybrid by default: full layers get
`max_total_num_tokens` slots and sliding layers their own `max_total_num_swa_tokens` =
swa_full_tokens_ratio x that, with the byte budget split so both together fill it (see
memory_pool.hybrid_pool_sizes). `--max-total-tokens` (and the CPU default) sets the full pool; the swa
pool follows from the ratio. `--disable-hybrid-swa-memory`, or a model whose layers are all of one
kind, gives one slot space as before.
"""

from __future__ import annotations

import logging

import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.attention import get_attention_backend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import (
    KVCache,
    KVPoolSizes,
    LayerKVSpec,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    hybrid_pool_sizes,
    split_bytes_per_token,
)
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, LogitsProcessorOutput
from sglang.srt.model_loader.loader import load_model
from sglang.srt.utils import FP8_KV_MIN_SM, get_device_sm

logger = logging.getLogger(__name__)

_CPU_DEFAULT_KV_TOKENS = 32768
_DEFAULT_MEM_FRACTION = 0.85
_KV_DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available")
    return device


def resolve_kv_cache_dtype(
    choice: str, model_dtype: torch.dtype, ckpt_kv_algo: str | None, fp8_supported: bool = True
) -> torch.dtype:
    """'auto': an FP8 KV cache when the checkpoint was calibrated for one (`kv_cache_quant_algo: FP8`,
    whose k/v scales the attention layers load) and the GPU has fp8 (`fp8_supported`), else the
    model dtype."""
    if choice not in _KV_DTYPES:
        raise ValueError(f"unsupported kv_cache_dtype {choice!r}; choose from {sorted(_KV_DTYPES)}")
    if choice == "auto":
        if str(ckpt_kv_algo or "").upper() == "FP8":
            if not fp8_supported:
                logger.warning("the checkpoint is calibrated for an FP8 KV cache, but this GPU has no fp8 "
                               f"(SM{FP8_KV_MIN_SM}+): using {str(model_dtype).removeprefix('torch.')}")  # fmt: skip
                return model_dtype
            logger.info("the checkpoint is calibrated for an FP8 KV cache: using fp8_e4m3 (--kv-cache-dtype bf16 keeps bf16)")
            return _KV_DTYPES["fp8_e4m3"]
        return model_dtype
    return _KV_DTYPES[choice]


class ModelRunner:
    def __init__(self, server_args, model_config: ModelConfig | None = None):
        self.server_args = server_args
        self.device = resolve_device(server_args.device)
        self.model_config = model_config or ModelConfig.from_server_args(server_args)
        self.dtype = self.model_config.dtype
        torch.manual_seed(server_args.dummy_weight_seed)
        # ServerArgs has resolved 'auto' backends for this model and GPU.
        self.moe_runner_backend = server_args.moe_runner_backend
        if self.moe_runner_backend == "flashinfer_trtllm":
            # Fail before a long weight load, not after it.
            from sglang.srt.layers.moe.moe_runner.flashinfer_trtllm import check_flashinfer_trtllm_supported

            check_flashinfer_trtllm_supported(get_device_sm())
        self.model = load_model(
            self.model_config, server_args.load_format, self.device, self.moe_runner_backend, server_args.dummy_weight_seed
        )
        self.attn_backend = get_attention_backend(server_args.attention_backend)
        self._init_memory_pools()
        self.graph_runner = self._init_cuda_graphs()

    def _init_cuda_graphs(self):
        args = self.server_args
        if not self.device.startswith("cuda") or getattr(args, "disable_cuda_graph", False):
            return None
        if self.reads_device_values_on_host:
            logger.info("CUDA graphs off: the torch reference MoE runner / attention backend cannot be captured")
            return None
        from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner

        max_bs = min(getattr(args, "cuda_graph_max_bs", None) or 160, self.max_running_requests)
        return CudaGraphRunner(self, max_bs)

    @property
    def reads_device_values_on_host(self) -> bool:
        """The reference backends look at host-side lengths and expert lists: a CUDA graph would
        freeze them, and a dry pass (parallel_compile) would hand them garbage."""
        return self.moe_runner_backend == "torch" or isinstance(self.attn_backend, TorchNativeAttnBackend)

    def _kv_dtype(self) -> torch.dtype:
        # The fp8 cache is a GPU feature (ServerArgs refuses fp8_e4m3 on CPU), so 'auto' ignores the
        # checkpoint's FP8 calibration there.
        quant = self.model_config.quant_config or {}
        algo = quant.get("kv_cache_quant_algo") if self.device.startswith("cuda") else None
        fp8 = self.device.startswith("cuda") and get_device_sm() >= FP8_KV_MIN_SM
        return resolve_kv_cache_dtype(self.server_args.kv_cache_dtype, self.dtype, algo, fp8)

    def _kv_budget_bytes(self) -> float:
        free, total = torch.cuda.mem_get_info()
        fraction = self.server_args.mem_fraction_static or _DEFAULT_MEM_FRACTION
        budget = free - (1 - fraction) * total
        if budget <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache after loading the model "
                f"(free {free / 2**30:.1f} GiB of {total / 2**30:.1f}); raise --mem-fraction-static"
            )
        return budget

    def _use_hybrid_swa(self, specs: list[LayerKVSpec]) -> bool:
        kinds = {s.is_sliding for s in specs}
        wanted = not getattr(self.server_args, "disable_hybrid_swa_memory", False)
        return wanted and kinds == {True, False} and self.sliding_window is not None

    def _pool_sizes(self, specs: list[LayerKVSpec], kv_dtype: torch.dtype) -> KVPoolSizes:
        full_bpt, swa_bpt = split_bytes_per_token(specs, kv_dtype)
        hybrid = self._use_hybrid_swa(specs)
        ratio = float(getattr(self.server_args, "swa_full_tokens_ratio", 0.8))
        if self.server_args.max_total_tokens or not self.device.startswith("cuda"):
            full = int(self.server_args.max_total_tokens or _CPU_DEFAULT_KV_TOKENS)
            return KVPoolSizes(full, int(full * ratio) if hybrid else None)
        budget = self._kv_budget_bytes()
        if hybrid:
            # The second slot table (int64 per request row and position) comes out of the same memory.
            budget -= (self.max_running_requests + 1) * (self.model_config.context_len + 8) * 8
            return hybrid_pool_sizes(budget, full_bpt, swa_bpt, ratio)
        return KVPoolSizes(int(budget // (full_bpt + swa_bpt)))

    def _check_pool_sizes(self, sizes: KVPoolSizes) -> None:
        if sizes.full_tokens < 16:
            raise ValueError(f"KV cache of {sizes.full_tokens} tokens is too small to serve")
        # A request holds up to window - 1 swa slots between steps, plus the tokens of one step.
        if sizes.hybrid and sizes.swa_tokens < self.sliding_window + 16:
            raise ValueError(
                f"sliding-window KV pool of {sizes.swa_tokens} tokens cannot hold one window of "
                f"{self.sliding_window} tokens; raise --swa-full-tokens-ratio or --max-total-tokens, "
                f"or pass --disable-hybrid-swa-memory"
            )

    def _init_memory_pools(self) -> None:
        specs = [LayerKVSpec(s.num_kv_heads, s.head_dim, s.is_sliding) for s in self.model_config.layer_specs]
        kv_dtype = self._kv_dtype()
        window = self.model_config.text_config.get("sliding_window")
        self.sliding_window = int(window) if window and any(s.is_sliding for s in specs) else None
        self.max_running_requests = int(self.server_args.max_running_requests or 256)
        sizes = self._pool_sizes(specs, kv_dtype)
        self._check_pool_sizes(sizes)
        self.max_total_num_tokens = sizes.full_tokens
        self.max_total_num_swa_tokens = sizes.swa_tokens
        max_context = min(self.model_config.context_len, self.max_total_num_tokens) + 8
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests + 1, max_context, self.device, hybrid_swa=sizes.hybrid)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(sizes.full_tokens, self.device)
        self.swa_allocator = TokenToKVPoolAllocator(sizes.swa_tokens, self.device) if sizes.hybrid else None
        self.kv_cache = KVCache(sizes.full_tokens, specs, kv_dtype, self.device, swa_size=sizes.swa_tokens)
        self._log_pool_sizes(sizes, specs, kv_dtype)

    def _log_pool_sizes(self, sizes: KVPoolSizes, specs: list[LayerKVSpec], kv_dtype: torch.dtype) -> None:
        full_bpt, swa_bpt = split_bytes_per_token(specs, kv_dtype)
        if sizes.hybrid:
            gib = (sizes.full_tokens * full_bpt + sizes.swa_tokens * swa_bpt) / 2**30
            logger.info(
                "KV cache (hybrid sliding-window pool): full layers %d tokens, sliding layers %d tokens "
                "(window %d), %.2f GiB (%s), max running requests %d",
                sizes.full_tokens, sizes.swa_tokens, self.sliding_window, gib, kv_dtype, self.max_running_requests,
            )
        else:
            logger.info(
                "KV cache: %d tokens (%s, %.2f GiB), max running requests %d",
                sizes.full_tokens, kv_dtype, sizes.full_tokens * (full_bpt + swa_bpt) / 2**30, self.max_running_requests,
            )

    def forward(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.replay(batch)
        return self.forward_eager(batch)

    @torch.no_grad()
    def forward_eager(self, batch: ForwardBatch) -> LogitsProcessorOutput:
        batch.attn_backend = self.attn_backend
        batch.req_to_token_pool = self.req_to_token_pool
        batch.token_to_kv_pool = self.kv_cache
        if (batch.swa_out_cache_loc is None) != (self.swa_allocator is None):
            raise ValueError(
                "ForwardBatch.swa_out_cache_loc must be set exactly when the KV pool is hybrid "
                f"(hybrid={self.swa_allocator is not None})"
            )
        self.attn_backend.init_forward_metadata(batch)
        return self.model(batch.input_ids, batch.positions, batch)
