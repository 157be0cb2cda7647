"""ModelRunner: owns the model, the KV memory and the attention backend; runs one step at a time."""

from __future__ import annotations

import logging

import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.attention import get_attention_backend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVCache, LayerKVSpec, ReqToTokenPool, TokenToKVPoolAllocator
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, LogitsProcessorOutput
from sglang.srt.model_loader.loader import load_model

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


def resolve_kv_cache_dtype(choice: str, model_dtype: torch.dtype, ckpt_kv_algo: str | None) -> torch.dtype:
    """'auto' keeps the model dtype. A checkpoint calibrated for an FP8 KV cache only gets a hint:
    the fp8 path has not yet passed the whole-model accuracy check on GPU (issue 7)."""
    if choice not in _KV_DTYPES:
        raise ValueError(f"unsupported kv_cache_dtype {choice!r}; choose from {sorted(_KV_DTYPES)}")
    if choice == "auto":
        if str(ckpt_kv_algo or "").upper() == "FP8":
            logger.info("the checkpoint is calibrated for an FP8 KV cache; --kv-cache-dtype fp8_e4m3 halves KV memory")
        return model_dtype
    return _KV_DTYPES[choice]


class ModelRunner:
    def __init__(self, server_args, model_config: ModelConfig | None = None):
        self.server_args = server_args
        self.device = resolve_device(server_args.device)
        self.model_config = model_config or ModelConfig.from_server_args(server_args)
        self.dtype = self.model_config.dtype
        torch.manual_seed(server_args.random_seed)
        # ServerArgs has resolved 'auto' backends for this model and GPU.
        self.moe_runner_backend = server_args.moe_runner_backend
        if self.moe_runner_backend == "flashinfer_trtllm":
            # Fail before a long weight load, not after it.
            from sglang.srt.layers.moe.moe_runner.flashinfer_trtllm import check_flashinfer_trtllm_supported
            from sglang.srt.utils import get_device_sm

            check_flashinfer_trtllm_supported(get_device_sm())
        self.model = load_model(
            self.model_config, server_args.load_format, self.device, self.moe_runner_backend, server_args.random_seed
        )
        self.attn_backend = get_attention_backend(server_args.attention_backend)
        self._init_memory_pools()
        self.graph_runner = self._init_cuda_graphs()

    def _init_cuda_graphs(self):
        args = self.server_args
        if not self.device.startswith("cuda") or getattr(args, "disable_cuda_graph", False):
            return None
        # The reference backends look at host-side lengths and expert lists, which a graph would freeze.
        if self.moe_runner_backend == "torch" or isinstance(self.attn_backend, TorchNativeAttnBackend):
            logger.info("CUDA graphs off: the torch reference MoE runner / attention backend cannot be captured")
            return None
        from sglang.srt.model_executor.cuda_graph_runner import CudaGraphRunner

        max_bs = min(getattr(args, "cuda_graph_max_bs", None) or 160, self.max_running_requests)
        return CudaGraphRunner(self, max_bs)

    def _kv_dtype(self) -> torch.dtype:
        quant = self.model_config.quant_config or {}
        return resolve_kv_cache_dtype(self.server_args.kv_cache_dtype, self.dtype, quant.get("kv_cache_quant_algo"))

    def _kv_capacity(self, bytes_per_token: int) -> int:
        if self.server_args.max_total_tokens:
            return int(self.server_args.max_total_tokens)
        if not self.device.startswith("cuda"):
            return _CPU_DEFAULT_KV_TOKENS
        free, total = torch.cuda.mem_get_info()
        fraction = self.server_args.mem_fraction_static or _DEFAULT_MEM_FRACTION
        budget = free - (1 - fraction) * total
        if budget <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache after loading the model "
                f"(free {free / 2**30:.1f} GiB of {total / 2**30:.1f}); raise --mem-fraction-static"
            )
        return int(budget // bytes_per_token)

    def _init_memory_pools(self) -> None:
        specs = [LayerKVSpec(s.num_kv_heads, s.head_dim) for s in self.model_config.layer_specs]
        kv_dtype = self._kv_dtype()
        self.max_total_num_tokens = self._kv_capacity(KVCache.bytes_per_token(specs, kv_dtype))
        if self.max_total_num_tokens < 16:
            raise ValueError(f"KV cache of {self.max_total_num_tokens} tokens is too small to serve")
        self.max_running_requests = int(self.server_args.max_running_requests or 256)
        max_context = min(self.model_config.context_len, self.max_total_num_tokens) + 8
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests + 1, max_context, self.device)
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(self.max_total_num_tokens, self.device)
        self.kv_cache = KVCache(self.max_total_num_tokens, specs, kv_dtype, self.device)
        logger.info(
            "KV cache: %d tokens (%s), max running requests %d",
            self.max_total_num_tokens, kv_dtype, self.max_running_requests,
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
        self.attn_backend.init_forward_metadata(batch)
        return self.model(batch.input_ids, batch.positions, batch)
