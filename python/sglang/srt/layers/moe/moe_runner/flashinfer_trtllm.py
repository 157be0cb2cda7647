"""Blackwell (SM100/SM103) NVFP4 MoE through FlashInfer's TRT-LLM fused MoE kernel.

One kernel call routes (top-k of the router logits, softmax over those k), quantizes nothing itself
(the caller hands it NVFP4 activations), runs GEMM1 with a fused gated activation, requantizes the
intermediate to NVFP4, runs GEMM2 and sums the k expert outputs with their routing weights.

Facts this module relies on, read in FlashInfer 0.6.13 (the version `sglang[flashinfer]` pins):
- `trtllm_fp4_block_scale_moe` in `flashinfer/fused_moe/core.py`; hidden-state block scales are
  passed in the linear (unswizzled) layout, weight block scales in the 128x4 swizzled layout.
- GEMM1 rows are [up; gate]. The gated epilogue (`KernelRunner.h`, ActType::GeGlu / SwiGlu) computes
  `output1_scale * x0 * act(output1_scale_gate * x1)` with x0 the raw up accumulator and x1 the raw
  gate accumulator, then quantizes that to NVFP4 with block scales only (no extra global scale).
  So gate and up keep separate weight global scales: one lives in output1_scale_gate, the other in
  output1_scale. GEMM2's raw accumulator is multiplied by output2_scale per expert.
- `RoutingMethodType.Renormalize` is "TopK -> Softmax"; routing weights are kept in bf16.
- The TRT-LLM runner (`csrc/trtllm_fused_moe_runner.cu`) accepts only Swiglu and Geglu as gated
  activations; 0.7.2.post1 adds SwigluStep and Situ. `ActivationType.GegluTanh` exists from 0.7
  on but that runner rejects it, so Gemma 4's tanh-GELU runs as the erf-GELU `Geglu` there.
- `ActivationType` integer values differ between releases (Identity is 8 in 0.6.13, 9 in 0.7.2),
  hence members are always looked up by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Collection, Optional

import torch

from sglang.srt.layers.moe.moe_runner.base import NVFP4, MoeRunner, register_moe_runner
from sglang.srt.layers.moe.topk import TopKOutput
from sglang.srt.layers.quantization.fp4_utils import FP4_BLOCK_SIZE

logger = logging.getLogger(__name__)

PINNED_FLASHINFER_VERSION = "0.6.13"
INSTALL_HINT = 'pip install "sglang[flashinfer]"'

# The TRT-LLM MoE cubins are built for the SM100 family (B200/GB200 = 100, B300/GB300 = 103).
MIN_DEVICE_SM = 100
MAX_DEVICE_SM_EXCLUSIVE = 110

# FlashInfer shuffles weight rows in tiles of this many rows; 2I and H must be multiples of it.
EPILOGUE_TILE_M = 128
# Per-shard intermediate size is padded to this so the fused [up; gate] GEMM1 has 2I % 128 == 0.
INTERMEDIATE_ALIGNMENT = EPILOGUE_TILE_M // 2
# Hidden sizes the kernel's tiles cover without activation padding (Gemma 4: 2816 = 11 * 256).
HIDDEN_ALIGNMENT = 256

ROUTING_METHOD = "Renormalize"

_GATED_MEMBERS = {"silu": "Swiglu", "gelu": "Geglu"}
_NON_GATED_MEMBERS = {"silu": "Silu", "gelu": "Gelu", "relu2": "Relu2"}
_TANH_GELU_NAMES = ("gelu_pytorch_tanh", "gelu_tanh")
# A tanh-GELU gated member would be preferred if the TRT-LLM runner accepted one.
_TANH_GEGLU_MEMBERS = ("GegluTanh",)
# Gated members that FlashInfer's TRT-LLM FP4 MoE runner dispatches (union over 0.6.13 and
# 0.7.2.post1). Add a tanh member here only after reading the runner's switch at the new version.
TRTLLM_GATED_MEMBERS = frozenset({"Swiglu", "Geglu", "SwigluStep", "Situ"})

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def require_flashinfer() -> ModuleType:
    """Import FlashInfer or fail with the install command; warns on an unpinned version."""
    try:
        flashinfer = importlib.import_module("flashinfer")
    except ImportError as e:
        raise ImportError(
            "the flashinfer_trtllm MoE backend needs FlashInfer "
            f"(flashinfer-python and flashinfer-cubin {PINNED_FLASHINFER_VERSION}); "
            f"install it with: {INSTALL_HINT}"
        ) from e
    version = getattr(flashinfer, "__version__", "unknown")
    if version != PINNED_FLASHINFER_VERSION:
        _warn_once(
            "version",
            f"FlashInfer {version} is installed; the flashinfer_trtllm MoE backend was verified "
            f"against {PINNED_FLASHINFER_VERSION} ({INSTALL_HINT} installs that one)",
        )
    return flashinfer


def check_flashinfer_trtllm_supported(device_sm: int) -> None:
    """Startup check: raise with a clear message unless this backend can run on `device_sm`.

    `device_sm` is major * 10 + minor of the GPU (100 for B200), or 0 when there is no GPU.
    """
    if device_sm <= 0:
        raise RuntimeError(
            "the flashinfer_trtllm MoE backend needs an NVIDIA Blackwell GPU (SM100/SM103); "
            "no CUDA GPU was found. Choose the torch MoE runner backend on CPU."
        )
    if not MIN_DEVICE_SM <= device_sm < MAX_DEVICE_SM_EXCLUSIVE:
        raise RuntimeError(
            f"the flashinfer_trtllm MoE backend needs an SM100-family GPU (B200/GB200/B300, "
            f"SM100/SM103), but this GPU is SM{device_sm}: FlashInfer's TRT-LLM MoE kernels use "
            "Blackwell FP4 tensor cores. Choose another MoE runner backend for this GPU."
        )
    require_flashinfer()
    if importlib.util.find_spec("flashinfer_cubin") is None:
        _warn_once(
            "cubin",
            "flashinfer-cubin is not installed: FlashInfer will download its TRT-LLM MoE kernels "
            f"at first use, which fails on an offline host ({INSTALL_HINT} installs them)",
        )


# ----------------------------------------------------------------------------- activation mapping


def _valid_activation_names(is_gated: bool) -> list[str]:
    table = _GATED_MEMBERS if is_gated else _NON_GATED_MEMBERS
    return sorted(table) + list(_TANH_GELU_NAMES)


def resolve_activation_member(
    activation: str, is_gated: bool = True, members: Optional[Collection[str]] = None
) -> str:
    """Name of the FlashInfer `ActivationType` member for an HF activation name.

    `members` are the member names the installed enum has (None: assume no tanh-GELU member).
    """
    table = _GATED_MEMBERS if is_gated else _NON_GATED_MEMBERS
    if activation in _TANH_GELU_NAMES:
        if is_gated:
            for name in _TANH_GEGLU_MEMBERS:
                if members is not None and name in members and name in TRTLLM_GATED_MEMBERS:
                    return name
        _warn_once(
            f"tanh-gelu-{is_gated}",
            f"activation {activation!r} is the tanh approximation of GELU, but FlashInfer's "
            f"TRT-LLM FP4 MoE runs {table['gelu']!r}, which computes the erf form; outputs differ "
            "from the checkpoint's activation by at most about 5e-4 per element of the gate",
        )
        return table["gelu"]
    if activation not in table:
        raise ValueError(
            f"no FlashInfer ActivationType for activation={activation!r} with is_gated={is_gated}; "
            f"valid choices: {_valid_activation_names(is_gated)}"
        )
    return table[activation]


def get_activation_type(activation: str, is_gated: bool = True) -> int:
    """FlashInfer's `ActivationType` member (an IntEnum, so an int) for this activation, by name."""
    enum = require_flashinfer().ActivationType
    name = resolve_activation_member(activation, is_gated, set(enum.__members__))
    return enum[name]


# ----------------------------------------------------------------------------- weight preparation


@dataclass
class TrtllmFp4MoeWeights:
    """Everything the kernel consumes per layer, in kernel row order (before FlashInfer's shuffles).

    Scales are NVFP4 block scales without global factor; every global factor lives in the three
    per-expert scalars and in `hidden_global_scale`.
    """

    gemm1_weights: torch.Tensor  # uint8 [E, 2Ip, H/2], rows [up (Ip); gate (Ip)], zero padded
    gemm1_scales: torch.Tensor  # e4m3 [E, 2Ip, H/16]
    gemm2_weights: torch.Tensor  # uint8 [E, H, Ip/2]
    gemm2_scales: torch.Tensor  # e4m3 [E, H, Ip/16]
    output1_scale: torch.Tensor  # fp32 [E]: a1_scale * up_ws2 / a2_scale (multiplies the up half)
    output1_scale_gate: torch.Tensor  # fp32 [E]: a1_scale * gate_ws2 (multiplies the gate half)
    output2_scale: torch.Tensor  # fp32 [E]: a2_scale * w2_ws2 * per_expert_scale
    hidden_global_scale: torch.Tensor  # fp32 [1]: 1 / a1_scale, fp4_quantize's global scale
    intermediate_size: int  # padded Ip


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def padded_intermediate_size(intermediate_size: int) -> int:
    return round_up(intermediate_size, INTERMEDIATE_ALIGNMENT)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad dim 1 of [E, R, C] to `rows`; zero codes and zero block scales contribute nothing."""
    if t.shape[1] == rows:
        return t
    out = torch.zeros((t.shape[0], rows, t.shape[2]), dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    if t.shape[2] == cols:
        return t
    out = torch.zeros((t.shape[0], t.shape[1], cols), dtype=t.dtype, device=t.device)
    out[:, :, : t.shape[2]] = t
    return out


def _up_gate_rows(w13: torch.Tensor, inter: int, padded: int) -> torch.Tensor:
    """[E, 2I, C] checkpoint order [gate; up] -> [E, 2Ip, C] kernel order [up; gate], each half padded."""
    gate, up = w13[:, :inter], w13[:, inter:]
    return torch.cat([_pad_rows(up, padded), _pad_rows(gate, padded)], dim=1).contiguous()


def compute_output_scales(
    layer: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output1_scale, output1_scale_gate, output2_scale, hidden_global_scale) from the checkpoint.

    The kernel quantizes the hidden states once for all experts, so GEMM1's input scale is the
    largest calibrated one (no expert's inputs saturate); each expert's scalars use that same value.
    """
    a1_scale = layer.w13_input_scale.float().max()
    ws2_13 = layer.w13_weight_scale_2.float().reshape(-1, 2)
    gate_ws2, up_ws2 = ws2_13[:, 0], ws2_13[:, 1]
    a2_scale = layer.w2_input_scale.float().reshape(-1)
    w2_ws2 = layer.w2_weight_scale_2.float().reshape(-1)
    per_expert = getattr(layer, "router_per_expert_scale", None)
    pes = torch.ones_like(w2_ws2) if per_expert is None else per_expert.float().to(w2_ws2.device)
    output1_scale_gate = a1_scale * gate_ws2
    # The intermediate is requantized with global scale 1/a2_scale, folded in here ...
    output1_scale = a1_scale * up_ws2 / a2_scale
    # ... and undone here, together with GEMM2's weight scale and the router's per-expert scale.
    output2_scale = a2_scale * w2_ws2 * pes
    hidden_global_scale = (1.0 / a1_scale).reshape(1)
    return output1_scale, output1_scale_gate, output2_scale, hidden_global_scale


def _check_shapes(layer: torch.nn.Module) -> None:
    hidden, inter = layer.hidden_size, layer.intermediate_size_per_partition
    if hidden % HIDDEN_ALIGNMENT:
        raise ValueError(
            f"flashinfer_trtllm MoE needs hidden_size % {HIDDEN_ALIGNMENT} == 0, got {hidden}"
        )
    if inter % FP4_BLOCK_SIZE:
        raise ValueError(f"NVFP4 experts need intermediate size % 16 == 0, got {inter}")
    experts, top_k = layer.num_experts, layer.top_k
    # Limits of the Renormalize routing kernel (trtllm_fused_moe_kernel_launcher.cu).
    if experts % 4 or not 0 < top_k <= min(32, experts - 1):
        raise ValueError(
            f"flashinfer_trtllm routing needs num_experts % 4 == 0 and 0 < top_k <= 32, "
            f"top_k < num_experts; got num_experts={experts}, top_k={top_k}"
        )


def prepare_trtllm_fp4_weights(layer: torch.nn.Module) -> TrtllmFp4MoeWeights:
    """Reorder GEMM1 to [up; gate], pad the intermediate size, and compute the per-expert scalars."""
    _check_shapes(layer)
    inter = layer.intermediate_size_per_partition
    padded = padded_intermediate_size(inter)
    out1, out1_gate, out2, hidden_gs = compute_output_scales(layer)
    return TrtllmFp4MoeWeights(
        gemm1_weights=_up_gate_rows(layer.w13_weight.data, inter, padded),
        gemm1_scales=_up_gate_rows(layer.w13_weight_scale.data, inter, padded),
        gemm2_weights=_pad_cols(layer.w2_weight.data, padded // 2).contiguous(),
        gemm2_scales=_pad_cols(layer.w2_weight_scale.data, padded // FP4_BLOCK_SIZE).contiguous(),
        output1_scale=out1.contiguous(),
        output1_scale_gate=out1_gate.contiguous(),
        output2_scale=out2.contiguous(),
        hidden_global_scale=hidden_gs.contiguous(),
        intermediate_size=padded,
    )


# ----------------------------------------------------------------------------- FlashInfer shuffles


def flashinfer_row_permutations(
    gemm1_rows: int, gemm1_cols: int, gemm2_rows: int, gemm2_cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row orders (new_row -> old_row) FlashInfer's helpers give GEMM1 ([up; gate] interleaved,
    then tile-shuffled) and GEMM2 (tile-shuffled). Weights and their block scales share them."""
    require_flashinfer()
    core = importlib.import_module("flashinfer.fused_moe.core")
    # The helpers look only at the shape (and cache by it), so a CPU placeholder is enough.
    w13_like = torch.empty((gemm1_rows, gemm1_cols), dtype=torch.uint8)
    w2_like = torch.empty((gemm2_rows, gemm2_cols), dtype=torch.uint8)
    perm1 = core._maybe_get_cached_w3_w1_permute_indices({}, w13_like, EPILOGUE_TILE_M)
    perm2 = core.get_w2_permute_indices_with_cache({}, w2_like, EPILOGUE_TILE_M)
    return perm1.long(), perm2.long()


def _shuffle_block_scales(scales: torch.Tensor, perm: torch.Tensor, interleave: Callable) -> torch.Tensor:
    """Row-permute [E, R, C] e4m3 scales, then FlashInfer's 128x4 swizzle, viewed back as [E, R, C]
    (R % 128 == 0 and C % 4 == 0 hold here, so the swizzle adds no padding). Bytes are moved as
    uint8 because the swizzle takes uint8 and float8 indexing is not supported everywhere."""
    flat = interleave(scales.view(torch.uint8)[:, perm].contiguous())
    return flat.reshape(scales.shape).view(torch.float8_e4m3fn)


def flashinfer_shuffle(weights: TrtllmFp4MoeWeights) -> TrtllmFp4MoeWeights:
    """Apply FlashInfer's row shuffles and block-scale swizzle (GPU: the swizzle is a CUDA op)."""
    flashinfer = require_flashinfer()
    _, rows1, cols1 = weights.gemm1_weights.shape
    _, rows2, cols2 = weights.gemm2_weights.shape
    perm1, perm2 = flashinfer_row_permutations(rows1, cols1, rows2, cols2)
    perm1, perm2 = perm1.to(weights.gemm1_weights.device), perm2.to(weights.gemm2_weights.device)
    interleave = flashinfer.block_scale_interleave
    return TrtllmFp4MoeWeights(
        gemm1_weights=weights.gemm1_weights[:, perm1].contiguous(),
        gemm1_scales=_shuffle_block_scales(weights.gemm1_scales, perm1, interleave),
        gemm2_weights=weights.gemm2_weights[:, perm2].contiguous(),
        gemm2_scales=_shuffle_block_scales(weights.gemm2_scales, perm2, interleave),
        output1_scale=weights.output1_scale,
        output1_scale_gate=weights.output1_scale_gate,
        output2_scale=weights.output2_scale,
        hidden_global_scale=weights.hidden_global_scale,
        intermediate_size=weights.intermediate_size,
    )


# ----------------------------------------------------------------------------- per-call preparation


@dataclass
class TrtllmFp4MoeCall:
    """The exact arguments of one `trtllm_fp4_block_scale_moe` call (enums by member name)."""

    routing_logits: torch.Tensor  # fp32 [M, E]
    hidden_states: torch.Tensor  # uint8 [M, H/2] NVFP4 codes
    hidden_states_scale: torch.Tensor  # e4m3 [M, H/16], linear layout
    weights: TrtllmFp4MoeWeights
    num_experts: int
    top_k: int
    routing_method: str  # RoutingMethodType member name
    activation: str  # ActivationType member name
    out_dtype: torch.dtype


# (x [M, H] bf16/fp16, global scale fp32 [1]) -> (uint8 [M, H/2], e4m3 [M, H/16] linear layout)
QuantizeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def flashinfer_fp4_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's NVFP4 activation quantizer: e4m3 block scales of 16, linear scale layout."""
    flashinfer = require_flashinfer()
    codes, scales = flashinfer.fp4_quantize(
        x, global_scale, FP4_BLOCK_SIZE, sf_use_ue8m0=False, is_sf_swizzled_layout=False
    )
    rows, hidden = x.shape
    return codes.view(torch.uint8).reshape(rows, hidden // 2), scales.view(torch.float8_e4m3fn).reshape(
        rows, hidden // FP4_BLOCK_SIZE
    )


def _kernel_weights(layer: torch.nn.Module) -> TrtllmFp4MoeWeights:
    return TrtllmFp4MoeWeights(
        gemm1_weights=layer.w13_weight.data,
        gemm1_scales=layer.w13_weight_scale.data,
        gemm2_weights=layer.w2_weight.data,
        gemm2_scales=layer.w2_weight_scale.data,
        output1_scale=layer.trtllm_output1_scale,
        output1_scale_gate=layer.trtllm_output1_scale_gate,
        output2_scale=layer.trtllm_output2_scale,
        hidden_global_scale=layer.trtllm_hidden_global_scale,
        intermediate_size=layer.trtllm_intermediate_size,
    )


def prepare_trtllm_fp4_call(
    layer: torch.nn.Module, x: torch.Tensor, topk: TopKOutput, quantize: QuantizeFn
) -> TrtllmFp4MoeCall:
    """Quantize the activations and collect every kernel argument (shared by kernel and emulation)."""
    # The quantizer reads 16-bit floats; fp32 callers (tests, CPU) go through bf16 like the model.
    x16 = x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)
    codes, scales = quantize(x16.contiguous(), layer.trtllm_hidden_global_scale)
    # The kernel routes from the logits itself: Renormalize = top-k then softmax over the k; the
    # per-expert scale of Gemma 4's router is already inside output2_scale.
    return TrtllmFp4MoeCall(
        routing_logits=topk.router_logits.float().contiguous(),
        hidden_states=codes,
        hidden_states_scale=scales,
        weights=_kernel_weights(layer),
        num_experts=layer.num_experts,
        top_k=layer.top_k,
        routing_method=ROUTING_METHOD,
        activation=layer.trtllm_activation,
        out_dtype=x.dtype,
    )


def launch_trtllm_fp4_moe(call: TrtllmFp4MoeCall) -> torch.Tensor:
    """Run FlashInfer's fused NVFP4 MoE on the prepared call; returns [M, H] in call.out_dtype."""
    flashinfer = require_flashinfer()
    fused_moe = importlib.import_module("flashinfer.fused_moe")
    w = call.weights
    result = fused_moe.trtllm_fp4_block_scale_moe(
        routing_logits=call.routing_logits,
        routing_bias=None,
        hidden_states=call.hidden_states,
        hidden_states_scale=call.hidden_states_scale,
        gemm1_weights=w.gemm1_weights,
        gemm1_weights_scale=w.gemm1_scales,
        gemm1_bias=None,
        gemm1_alpha=None,
        gemm1_beta=None,
        gemm1_clamp_limit=None,
        gemm2_weights=w.gemm2_weights,
        gemm2_weights_scale=w.gemm2_scales,
        gemm2_bias=None,
        output1_scale_scalar=w.output1_scale,
        output1_scale_gate_scalar=w.output1_scale_gate,
        output2_scale_scalar=w.output2_scale,
        num_experts=call.num_experts,
        top_k=call.top_k,
        n_group=None,
        topk_group=None,
        intermediate_size=w.intermediate_size,
        local_expert_offset=0,
        local_num_experts=call.num_experts,
        routed_scaling_factor=None,
        routing_method_type=int(flashinfer.RoutingMethodType[call.routing_method]),
        do_finalize=True,
        activation_type=int(flashinfer.ActivationType[call.activation]),
    )
    return result[0].to(call.out_dtype)


# ----------------------------------------------------------------------------- the runner


def _set_param(layer: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(layer, name, torch.nn.Parameter(value, requires_grad=False))


def install_kernel_weights(layer: torch.nn.Module, weights: TrtllmFp4MoeWeights, activation: str) -> None:
    """Replace the checkpoint-layout expert tensors by the kernel's (no second copy stays alive)."""
    _set_param(layer, "w13_weight", weights.gemm1_weights)
    _set_param(layer, "w13_weight_scale", weights.gemm1_scales)
    _set_param(layer, "w2_weight", weights.gemm2_weights)
    _set_param(layer, "w2_weight_scale", weights.gemm2_scales)
    layer.trtllm_output1_scale = weights.output1_scale
    layer.trtllm_output1_scale_gate = weights.output1_scale_gate
    layer.trtllm_output2_scale = weights.output2_scale
    layer.trtllm_hidden_global_scale = weights.hidden_global_scale
    layer.trtllm_intermediate_size = weights.intermediate_size
    layer.trtllm_activation = activation


def _installed_activation_members() -> Optional[set[str]]:
    try:
        return set(importlib.import_module("flashinfer").ActivationType.__members__)
    except ImportError:
        return None


ShuffleFn = Callable[[TrtllmFp4MoeWeights], TrtllmFp4MoeWeights]
LaunchFn = Callable[[TrtllmFp4MoeCall], torch.Tensor]


@register_moe_runner
class FlashInferTrtllmNvFp4MoeRunner(MoeRunner):
    """NVFP4 experts on Blackwell through `flashinfer.fused_moe.trtllm_fp4_block_scale_moe`.

    The three stages are injectable so the CPU tests can drive the very same preparation with
    FlashInfer's shuffles bypassed and the kernel replaced by its torch emulation.
    """

    backend = "flashinfer_trtllm"
    weight_format = NVFP4

    def __init__(
        self,
        shuffle: Optional[ShuffleFn] = flashinfer_shuffle,
        quantize: QuantizeFn = flashinfer_fp4_quantize,
        launch: LaunchFn = launch_trtllm_fp4_moe,
    ) -> None:
        self.shuffle = shuffle
        self.quantize = quantize
        self.launch = launch

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        activation = resolve_activation_member(layer.activation, True, _installed_activation_members())
        if activation not in TRTLLM_GATED_MEMBERS:
            raise ValueError(f"FlashInfer's TRT-LLM FP4 MoE does not run gated activation {activation}")
        weights = prepare_trtllm_fp4_weights(layer)
        if self.shuffle is not None:
            weights = self.shuffle(weights)
        install_kernel_weights(layer, weights, activation)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk: TopKOutput) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.empty_like(x)
        return self.launch(prepare_trtllm_fp4_call(layer, x, topk, self.quantize))
