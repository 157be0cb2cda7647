"""Torch emulation of FlashInfer's TRT-LLM NVFP4 fused MoE arithmetic, for machines without Blackwell.

It consumes a `TrtllmFp4MoeCall` exactly as `flashinfer_trtllm.prepare_trtllm_fp4_call` builds it
for the real kernel, with one difference: the weights must be in kernel row order but NOT passed
through FlashInfer's shuffles (tile row shuffle, [up; gate] interleave, 128x4 scale swizzle), which
are memory layouts only. What is emulated, step by step (facts from FlashInfer 0.6.13's sources):

1. `fp4_quantize(x, gs)`: per 16 elements sf = e4m3(gs * amax / 6), code = e2m1_rne(x * gs / sf).
2. Routing `Renormalize`: top-k of the fp32 logits, softmax over those k, weights stored in bf16.
3. GEMM1 over the NVFP4 operands in fp32 (e2m1 x e4m3 products are exact); rows [up; gate].
4. Gated epilogue: `output1_scale * up * act(output1_scale_gate * gate)`; Geglu is erf-GELU,
   Swiglu is SiLU; the result is quantized to NVFP4 with block scales e4m3(amax / 6) only.
5. GEMM2 in fp32, times `output2_scale[e]`, stored as bf16.
6. Finalize: sum over the k experts of bf16 weight x GEMM2 output, in fp32, stored as bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang.srt.layers.moe.moe_runner.flashinfer_trtllm import TrtllmFp4MoeCall
from sglang.srt.layers.quantization.fp4_utils import (
    E2M1_MAX,
    E4M3_MAX,
    FP4_BLOCK_SIZE,
    e2m1_to_float,
    float_to_e2m1,
    pack_fp4,
    unpack_fp4,
)

_GATED_ACTIVATIONS = {
    "Swiglu": F.silu,
    "Geglu": F.gelu,  # erf form: what the TRT-LLM GeGlu epilogue computes
    "GegluTanh": lambda v: F.gelu(v, approximate="tanh"),
}


def _block_quantize(x: torch.Tensor, global_scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 with e4m3 block scales of 16 along the last dim: (codes uint8 [..., K], scales e4m3)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, FP4_BLOCK_SIZE)
    amax = blocks.abs().amax(dim=-1)
    scales = (amax * (torch.as_tensor(global_scale, dtype=torch.float32) / E2M1_MAX)).clamp(max=E4M3_MAX)
    scales = scales.to(torch.float8_e4m3fn)
    sf = scales.float().unsqueeze(-1)
    # A zero scale (zero block or underflow) encodes the block as zeros, as the kernel does.
    multiplier = torch.where(sf > 0, torch.as_tensor(global_scale, dtype=torch.float32) / sf.clamp(min=1e-30), 0.0)
    codes = float_to_e2m1(blocks * multiplier).reshape(x.shape)
    return codes, scales


def emulate_fp4_quantize(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`flashinfer.fp4_quantize(x, global_scale, 16, is_sf_swizzled_layout=False)` in torch."""
    codes, scales = _block_quantize(x, global_scale.float().reshape(()))
    return pack_fp4(codes), scales


def dequantize_blocks(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e2m1(code) * block scale, fp32, without any global factor (the kernel's operand values)."""
    values = e2m1_to_float(unpack_fp4(packed))
    return values * scales.float().repeat_interleave(FP4_BLOCK_SIZE, dim=-1)


def emulate_routing(logits: torch.Tensor, top_k: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids int32 [M, k], weights bf16 [M, k]) as the kernel's routing stage computes them."""
    if method != "Renormalize":
        raise NotImplementedError(f"routing method {method!r} is not emulated (only Renormalize)")
    top_logits, ids = torch.topk(logits.float(), k=top_k, dim=-1)
    weights = torch.softmax(top_logits, dim=-1).to(torch.bfloat16)
    return ids.to(torch.int32), weights


def _requantize_intermediate(h: torch.Tensor) -> torch.Tensor:
    """The GEMM1 epilogue stores NVFP4 with unit global scale (the global one is in output1_scale)."""
    codes, scales = _block_quantize(h, 1.0)
    return e2m1_to_float(codes) * scales.float().repeat_interleave(FP4_BLOCK_SIZE, dim=-1)


def _expert_output(call: TrtllmFp4MoeCall, e: int, xq: torch.Tensor) -> torch.Tensor:
    """GEMM1 -> gated activation -> NVFP4 requantization -> GEMM2 for the tokens xq of expert e."""
    w = call.weights
    inter = w.intermediate_size
    w1 = dequantize_blocks(w.gemm1_weights[e], w.gemm1_scales[e])
    x0 = xq @ w1[:inter].t()  # up half
    x1 = xq @ w1[inter:].t()  # gate half
    act = _GATED_ACTIVATIONS[call.activation]
    h = w.output1_scale[e] * x0 * act(w.output1_scale_gate[e] * x1)
    w2 = dequantize_blocks(w.gemm2_weights[e], w.gemm2_scales[e])
    y = (_requantize_intermediate(h) @ w2.t()) * w.output2_scale[e]
    return y.to(torch.bfloat16)


def emulate_trtllm_fp4_moe(call: TrtllmFp4MoeCall) -> torch.Tensor:
    """The fused MoE's result [M, H] in call.out_dtype, computed from the unshuffled call."""
    ids, weights = emulate_routing(call.routing_logits, call.top_k, call.routing_method)
    xq = dequantize_blocks(call.hidden_states, call.hidden_states_scale)
    out = torch.zeros(xq.shape, dtype=torch.float32, device=xq.device)
    ids_long = ids.long()
    for e in torch.unique(ids_long).tolist():
        token_idx, slot = torch.where(ids_long == e)
        y = _expert_output(call, e, xq[token_idx]).float()
        out.index_add_(0, token_idx, y * weights[token_idx, slot, None].float())
    return out.to(torch.bfloat16).to(call.out_dtype)
