"""Gemma 4 text model (dense or MoE) over a flat batch of tokens and a paged KV cache.

One decoder layer (see gemma4.md):
  h = r + post_attention_norm(attn(input_norm(r)))
  dense = post_ffw_norm_1(mlp(pre_ffw_norm(h)));  moe = post_ffw_norm_2(experts(pre_ffw_norm_2(h)))
  out = (h + post_ffw_norm(dense + moe)) * layer_scalar     (the router reads the raw h)

Small ops run as fused Triton kernels on CUDA (sglang.srt.layers.triton_ops; the torch code next to
each call is the CPU path and the reference): per layer one kernel for q/k/v norms + rope, which also
stores k and v in the KV cache, one for the residual add and the three norms after attention, one for
GELU * up, one for routing, and one for the FFN combine, which also sums the experts' per-pair terms
and computes the next layer's input norm (so each layer receives it).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Iterable

import torch
import torch.nn.functional as F

from sglang.srt.configs.model_config import LayerSpec
from sglang.srt.layers.activation import FUSED_AND_MUL, get_act_and_mul_fn
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import MergedColumnLinear, ReplicatedLinear, WeightShapeError, check_shape, dense_linear
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang.srt.layers.moe.topk import gemma4_topk
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import RotaryEmbedding
from sglang.srt.layers.triton_ops import fused_ops_enabled
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, LogitsProcessorOutput
from sglang.srt.model_loader.load_report import LoadReport
from sglang.srt.utils import to_device

logger = logging.getLogger(__name__)

# Steps with this many tokens run each MoE layer's dense MLP on a second CUDA stream (_alt_stream).
# H200, 26B-A4B NVFP4 (dummy weights), fp8 KV, 1k contexts, decode graph replayed back to back
# (benchmark/bench_dual_stream.py): 2-6% slower at 1 token (the MLP's GEMVs lose their PDL overlap);
# faster by 9% at 2 tokens, 6% at 8, 4-5% at 16, 1% at 32, 2-3% at 64, even at 4.
# SGLANG_DISABLE_DUAL_STREAM=1 turns it off.
DUAL_STREAM_TOKENS = range(0) if os.environ.get("SGLANG_DISABLE_DUAL_STREAM") == "1" else range(2, 65)

# layers.<i>.self_attn.[k_proj.|v_proj.|attn.]<k|v>_scale
_KV_SCALE_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(?:[kv]_proj\.|attn\.)?([kv])_scale$")


def default_weight_loader(param: torch.nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
    check_shape(name, param.shape, loaded)
    param.data.copy_(loaded.to(param.dtype))


def _param(shape, dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.ones(shape, dtype=dtype), requires_grad=False)


class Gemma4Attention(torch.nn.Module):
    def __init__(self, cfg: dict, spec: LayerSpec, layer_id: int, dtype, quant_config, prefix: str):
        super().__init__()
        self.spec = spec
        self.num_heads = cfg["num_attention_heads"]
        hidden, d, kvh = cfg["hidden_size"], spec.head_dim, spec.num_kv_heads
        shards = ["q_proj", "k_proj"] + ([] if spec.k_eq_v else ["v_proj"])
        sizes = [self.num_heads * d, kvh * d] + ([] if spec.k_eq_v else [kvh * d])
        self.qkv_proj = MergedColumnLinear(hidden, sizes, dtype, quant_config, f"{prefix}.qkv_proj", shards)
        self.o_proj = ReplicatedLinear(self.num_heads * d, hidden, dtype, quant_config, f"{prefix}.o_proj")
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(d, eps, params_dtype=dtype)
        self.k_norm = RMSNorm(d, eps, params_dtype=dtype)
        self.v_norm = RMSNorm(d, eps, with_scale=False)
        window = cfg.get("sliding_window") if spec.is_sliding else None
        # q_norm and k_norm take the place of 1/sqrt(d): the attention scale is 1.
        self.attn = RadixAttention(self.num_heads, d, 1.0, kvh, layer_id, sliding_window=window)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        q, k, v = self.norm_rope(self.qkv_proj(x), rope, forward_batch)
        return self.o_proj(self.attn(q, k, v, forward_batch, save_kv_cache=k is not None))

    def norm_rope(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], forward_batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """rope(q_norm(q)), rope(k_norm(k)), v_norm(v) from the fused projection (k doubles as v with
        k_eq_v). The fused kernel stores k and v in the KV cache itself and returns them as None."""
        d, kvh = self.spec.head_dim, self.spec.num_kv_heads
        cos, sin = rope
        if fused_ops_enabled(qkv):
            from sglang.srt.layers.triton_ops.qkv_norm_rope import qkv_norm_rope

            q = qkv_norm_rope(
                qkv, self.num_heads, kvh, d, self.spec.k_eq_v, self.q_norm.weight, self.k_norm.weight, cos, sin,
                self.q_norm.eps, self.attn.kv_write(forward_batch),
            )  # fmt: skip
            return q, None, None
        q = qkv[:, : self.num_heads * d].view(-1, self.num_heads, d)
        k = qkv[:, self.num_heads * d : (self.num_heads + kvh) * d].view(-1, kvh, d)
        v = k if self.spec.k_eq_v else qkv[:, (self.num_heads + kvh) * d :].view(-1, kvh, d)
        q = RotaryEmbedding.apply(self.q_norm(q), cos, sin)
        k_roped = RotaryEmbedding.apply(self.k_norm(k), cos, sin)
        return q, k_roped, self.v_norm(v)


class Gemma4MLP(torch.nn.Module):
    def __init__(self, hidden: int, inter: int, act: str, dtype, quant_config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnLinear(
            hidden, [inter, inter], dtype, quant_config, f"{prefix}.gate_up_proj", ["gate_proj", "up_proj"]
        )
        self.down_proj = ReplicatedLinear(inter, hidden, dtype, quant_config, f"{prefix}.down_proj")
        self.act_and_mul = get_act_and_mul_fn(act)
        self.gelu_tanh = act in FUSED_AND_MUL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj.forward_gelu_tanh_and_mul(x) if self.gelu_tanh else None
        if h is None:
            h = self.act_and_mul(self.gate_up_proj(x))
        return self.down_proj(h)


class Gemma4Router(torch.nn.Module):
    """logits = proj(rmsnorm(x) * scale / sqrt(H)); routing in gemma4_topk."""

    def __init__(self, cfg: dict, dtype, quant_config, prefix: str):
        super().__init__()
        hidden, experts = cfg["hidden_size"], cfg["num_experts"]
        self.norm = RMSNorm(hidden, cfg.get("rms_norm_eps", 1e-6), with_scale=False)
        self.proj = ReplicatedLinear(hidden, experts, dtype, quant_config, f"{prefix}.proj")
        self.scale = _param((hidden,), dtype)
        self.per_expert_scale = _param((experts,), dtype)
        self.root_size = hidden**-0.5

    def scaled_input(self, x: torch.Tensor) -> torch.Tensor:
        """rmsnorm(x) * scale * root_size, the projection's input (fused into post_attention_norms on GPU)."""
        return self.norm(x) * self.scale * self.root_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.scaled_input(x))


class Gemma4DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: dict, spec: LayerSpec, layer_id: int, dtype, quant_config, prefix: str, moe_backend: str):
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6)
        act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
        self.self_attn = Gemma4Attention(cfg, spec, layer_id, dtype, quant_config, f"{prefix}.self_attn")
        self.mlp = Gemma4MLP(hidden, cfg["intermediate_size"], act, dtype, quant_config, f"{prefix}.mlp")
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
        self.enable_moe = bool(cfg.get("enable_moe_block", False))
        if self.enable_moe:
            norms += ["pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"]
            self.router = Gemma4Router(cfg, dtype, quant_config, f"{prefix}.router")
            self.experts = FusedMoE(
                cfg["num_experts"], cfg["top_k_experts"], hidden, cfg["moe_intermediate_size"], dtype,
                act, quant_config, f"{prefix}.experts", moe_backend,
            )
        for name in norms:
            setattr(self, name, RMSNorm(hidden, eps, params_dtype=dtype))
        self.layer_scalar = _param((1,), dtype)

    def forward(
        self, rope, h: torch.Tensor, x: torch.Tensor, forward_batch, next_norm: RMSNorm,
        alt_stream: torch.cuda.Stream | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """h: the residual stream; x: input_layernorm(h). Returns the new h and next_norm(h), the next
        layer's x (or the model's output), which the fused combine kernel computes in the same pass.
        With `alt_stream` the dense MLP runs on it, beside the router and experts."""
        attn = self.self_attn(rope, x, forward_batch)
        h, x_mlp, x_moe, x_router = self._post_attention(h, attn)
        if not self.enable_moe:
            return self._combine(h, self.mlp(x_mlp), None, next_norm)
        if alt_stream is None:
            dense = self.mlp(x_mlp)
            moe = self._moe(x_moe, x_router)
        else:
            main = torch.cuda.current_stream()
            alt_stream.wait_stream(main)
            with torch.cuda.stream(alt_stream):
                dense = self.mlp(x_mlp)
            moe = self._moe(x_moe, x_router)
            main.wait_stream(alt_stream)
        return self._combine(h, dense, moe, next_norm)

    def _moe(self, x_moe: torch.Tensor, x_router: torch.Tensor) -> torch.Tensor:
        topk = gemma4_topk(self.router.proj(x_router), self.experts.top_k, self.router.per_expert_scale)
        # The fused combine sums the experts' per-pair terms itself (one reduce kernel fewer).
        return self.experts(x_moe, topk, keep_pairs=fused_ops_enabled(x_moe))

    def _post_attention(self, h: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """h + post_attention_layernorm(attn), then the inputs of the dense MLP, the experts and the
        router (the last two None on dense layers)."""
        moe = self.enable_moe
        if fused_ops_enabled(h):
            from sglang.srt.layers.triton_ops.post_attention_norms import post_attention_norms

            return post_attention_norms(
                h, attn, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
                self.pre_feedforward_layernorm_2.weight if moe else None, self.router.scale if moe else None,
                self.router.root_size if moe else 0.0, self.post_attention_layernorm.eps,
            )  # fmt: skip
        h = h + self.post_attention_layernorm(attn)
        if not moe:
            return h, self.pre_feedforward_layernorm(h), None, None
        return h, self.pre_feedforward_layernorm(h), self.pre_feedforward_layernorm_2(h), self.router.scaled_input(h)

    def _combine(
        self, h: torch.Tensor, dense: torch.Tensor, moe: torch.Tensor | None, next_norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h = (h + post_feedforward_layernorm(ffw)) * layer_scalar and next_norm(h); ffw is the dense
        output, or post_feedforward_layernorm_1(dense) + post_feedforward_layernorm_2(moe). On the fused
        path moe may be the experts' unsummed per-pair terms [T, top_k, H]."""
        if fused_ops_enabled(h):
            from sglang.srt.layers.triton_ops.ffn_combine import ffn_combine

            w_dense = self.post_feedforward_layernorm_1.weight if moe is not None else None
            w_moe = self.post_feedforward_layernorm_2.weight if moe is not None else None
            return ffn_combine(
                h, dense, moe, w_dense, w_moe, self.post_feedforward_layernorm.weight, self.layer_scalar,
                next_norm.weight, self.post_feedforward_layernorm.eps,
            )  # fmt: skip
        ffw = dense if moe is None else self.post_feedforward_layernorm_1(dense) + self.post_feedforward_layernorm_2(moe)
        h = (h + self.post_feedforward_layernorm(ffw)) * self.layer_scalar
        return h, next_norm(h)


class Gemma4TextModel(torch.nn.Module):
    def __init__(self, cfg: dict, specs: list[LayerSpec], dtype, quant_config, prefix: str, moe_backend: str):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(cfg["vocab_size"], cfg["hidden_size"], dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = torch.nn.ModuleList(
            Gemma4DecoderLayer(cfg, spec, i, dtype, quant_config, f"{prefix}.layers.{i}", moe_backend)
            for i, spec in enumerate(specs)
        )
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6), params_dtype=dtype)
        # One rotary table per distinct rope geometry (two for Gemma 4): cos/sin are computed once per
        # step, not once per layer.
        geometries = [(s.head_dim, s.rope_theta, s.rope_type, s.partial_rotary_factor) for s in specs]
        distinct = list(dict.fromkeys(geometries))
        self.rotary = torch.nn.ModuleList(RotaryEmbedding(*g) for g in distinct)
        self.rotary_of_layer = [distinct.index(g) for g in geometries]
        # sqrt(H) rounded to the weight dtype first, as the reference does; a Python float keeps the
        # forward free of host tensors (CUDA graph capture).
        self.embed_scale = float(torch.tensor(cfg["hidden_size"] ** 0.5, dtype=dtype))
        self._stream: torch.cuda.Stream | None = None  # see _alt_stream

    def forward(self, input_ids, positions, forward_batch) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed_tokens.weight) * self.embed_scale
        ropes = [rotary.cos_sin(positions) for rotary in self.rotary]
        x = self.layers[0].input_layernorm(h)
        alt_stream = self._alt_stream(h)
        for i, (layer, rope) in enumerate(zip(self.layers, self.rotary_of_layer)):
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, x = layer(ropes[rope], h, x, forward_batch, next_norm, alt_stream)
        return x  # the final norm of h

    def _alt_stream(self, h: torch.Tensor) -> torch.cuda.Stream | None:
        """A second CUDA stream for the dense MLP of MoE layers on steps of DUAL_STREAM_TOKENS
        tokens: there the MLP's matmuls and the experts' small grids each leave SMs idle, so
        running them side by side shortens the layer (SGLang runs DeepSeek's shared experts so)."""
        if not h.is_cuda or h.shape[0] not in DUAL_STREAM_TOKENS:
            return None
        if self._stream is None or self._stream.device != h.device:
            self._stream = torch.cuda.Stream(h.device)
        return self._stream


class Gemma4ForCausalLM(torch.nn.Module):
    # Checkpoint prefix of the text weights; the multimodal class overrides it.
    checkpoint_prefix = "model."

    def __init__(self, model_config, quant_config=None, moe_runner_backend: str = "torch"):
        super().__init__()
        cfg = model_config.text_config
        self.config = cfg
        dtype = model_config.dtype
        self.model = Gemma4TextModel(
            cfg, model_config.layer_specs, dtype, quant_config, self.checkpoint_prefix.rstrip("."), moe_runner_backend
        )
        self.tie_word_embeddings = cfg.get("tie_word_embeddings", True)
        if not self.tie_word_embeddings:
            self.lm_head = torch.nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False, dtype=dtype)
            self.lm_head.weight.requires_grad_(False)
        self.final_logit_softcapping = cfg.get("final_logit_softcapping")

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    @torch.no_grad()
    def forward(self, input_ids, positions, forward_batch: ForwardBatch) -> LogitsProcessorOutput:
        hidden = self.model(input_ids, positions, forward_batch)
        if forward_batch.return_all_logits:
            all_logits = self.compute_logits(hidden)
            return LogitsProcessorOutput(all_logits[self._last_token_index(forward_batch, hidden)], all_logits)
        prompt = self._prompt_logprobs(hidden, forward_batch) if forward_batch.logprob_rows is not None else {}
        if not forward_batch.forward_mode.is_decode():
            hidden = hidden[self._last_token_index(forward_batch, hidden)]
        return LogitsProcessorOutput(next_token_logits=self.compute_logits(hidden), **prompt)

    def _prompt_logprobs(self, hidden: torch.Tensor, fb: ForwardBatch, rows_per_slice: int = 256) -> dict:
        """log p(target) and the top-k for the rows fb.logprob_rows, a slice of rows at a time so that
        a long prompt never holds [T, vocab] logits at once (256 rows of Gemma 4's 262k vocabulary:
        ~270 MB of fp32 logprobs)."""
        lps, tops, ids = [], [], []
        for start in range(0, len(fb.logprob_rows), rows_per_slice):
            rows = fb.logprob_rows[start : start + rows_per_slice]
            logprobs = torch.log_softmax(self.compute_logits(hidden[rows]).float(), dim=-1)
            lps.append(logprobs.gather(1, fb.logprob_targets[start : start + rows_per_slice, None]).squeeze(1))
            if fb.logprob_top_k:
                top = logprobs.topk(fb.logprob_top_k, dim=-1)
                tops.append(top.values)
                ids.append(top.indices)
        return {
            "input_logprobs": torch.cat(lps),
            "input_top_logprobs": torch.cat(tops) if tops else None,
            "input_top_ids": torch.cat(ids) if ids else None,
        }

    @staticmethod
    def _last_token_index(forward_batch: ForwardBatch, hidden: torch.Tensor) -> torch.Tensor:
        return to_device(torch.tensor(forward_batch.extend_seq_lens_cpu), hidden.device).cumsum(0) - 1

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = dense_linear(hidden, self.lm_head_weight())
        cap = self.final_logit_softcapping
        if cap and fused_ops_enabled(logits):
            from sglang.srt.layers.triton_ops.softcap import softcap

            return softcap(logits, cap)
        logits = logits.float()
        return cap * torch.tanh(logits / cap) if cap else logits

    # ---- weight loading -------------------------------------------------------------------
    # (param name, checkpoint name, shard id): stacked tensors sharing one parameter.
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q_proj"),
        ("qkv_proj", "k_proj", "k_proj"),
        ("qkv_proj", "v_proj", "v_proj"),
        ("gate_up_proj", "gate_proj", "gate_proj"),
        ("gate_up_proj", "up_proj", "up_proj"),
    ]
    # Checkpoint prefixes that hold no text weights; skipped with one log line.
    skipped_prefixes: tuple[str, ...] = ()

    def _to_param_name(self, ckpt_name: str) -> str | None:
        # Our text model is `self.model`, whatever the checkpoint calls it.
        if ckpt_name == "lm_head.weight":
            return ckpt_name
        if ckpt_name.startswith(self.checkpoint_prefix):
            return "model." + ckpt_name[len(self.checkpoint_prefix) :]
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        params = dict(self.named_parameters())
        report = LoadReport()
        expert_mapping = FusedMoE.make_expert_params_mapping(
            "gate_proj", "down_proj", "up_proj", int(self.config.get("num_experts") or 0)
        )
        skipped = 0
        for ckpt_name, tensor in weights:
            if ckpt_name.startswith(self.skipped_prefixes):
                skipped += 1
                continue
            name = self._to_param_name(ckpt_name)
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied to embed_tokens
            if name is None:
                report.unexpected.append(ckpt_name)
                continue
            try:
                if not self._load_one(name, ckpt_name, tensor, params, expert_mapping, report):
                    report.unexpected.append(ckpt_name)
            except WeightShapeError as e:
                report.shape_errors.append(f"{ckpt_name}: {e}")
        if skipped:
            logger.info("skipped %d non-text tensors (%s); the vision/audio towers are not served yet", skipped, ", ".join(self.skipped_prefixes))
        report.raise_if_failed(self)
        return report

    def _load_kv_scale(self, name: str, tensor: torch.Tensor) -> bool:
        """FP8 KV-cache scales (`self_attn.k_proj.k_scale`, `self_attn.k_scale`, ...) become floats on
        the attention layer; the backend applies them when the KV cache is fp8."""
        match = _KV_SCALE_NAME.search(name)
        if match is None:
            return False
        attn = self.model.layers[int(match.group(1))].self_attn.attn
        setattr(attn, f"{match.group(2)}_scale", float(tensor.float().reshape(-1)[0]))
        return True

    def _load_one(self, name, ckpt_name, tensor, params, expert_mapping, report) -> bool:
        if self._load_kv_scale(name, tensor):
            return True
        # 1. per-expert tensors (NVFP4, bf16 per expert)
        for param_part, weight_part, expert_id, shard_id in expert_mapping:
            if weight_part in name:
                pname = name.replace(weight_part, param_part)
                if pname not in params:
                    return False
                p = params[pname]
                p.weight_loader(p, tensor, ckpt_name, shard_id, expert_id)
                report.record(pname, (expert_id, shard_id))
                return True
        # 2. fused bf16 experts (Hugging Face layout)
        for suffix, pname_suffix, shards in (
            ("experts.gate_up_proj", "experts.w13_weight", ("w1", "w3")),
            ("experts.down_proj", "experts.w2_weight", ("w2",)),
        ):
            if name.endswith(suffix):
                pname = name[: -len(suffix)] + pname_suffix
                if pname not in params:
                    return False
                p = params[pname]
                p.weight_loader(p, tensor, ckpt_name, "w13" if len(shards) == 2 else "w2", None)
                for e in range(p.shape[0]):
                    for s in shards:
                        report.record(pname, (e, s))
                return True
        # 3. stacked q/k/v and gate/up, then everything else
        for param_part, weight_part, shard_id in self.stacked_params_mapping:
            if f".{weight_part}." in name:
                pname = name.replace(f".{weight_part}.", f".{param_part}.")
                if pname not in params:
                    return False
                p = params[pname]
                p.weight_loader(p, tensor, shard_id)
                report.record(pname, shard_id)
                return True
        if name not in params:
            return False
        p = params[name]
        if hasattr(p, "weight_loader"):
            p.weight_loader(p, tensor)
        else:
            default_weight_loader(p, tensor, ckpt_name)
        report.record(name)
        return True

    def post_load_weights(self) -> None:
        """Repack for the chosen kernels; hand each MoE layer its router's per-expert scale."""
        for layer in self.model.layers:
            if layer.enable_moe:
                layer.experts.router_per_expert_scale = layer.router.per_expert_scale.data.float()
        for module in self.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)


EntryClass = Gemma4ForCausalLM
