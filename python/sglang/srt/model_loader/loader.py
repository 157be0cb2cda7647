"""Build the model on its device and fill it: from safetensors shards, or with dummy weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from sglang.srt.layers.quantization import get_quantization_config
from sglang.srt.model_loader.weight_utils import safetensors_files, safetensors_weights_iterator
from sglang.srt.models.registry import get_model_class

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")


def fill_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights of the real shapes, sane enough that activations stay finite.

    NVFP4 codes are any nibble (every e2m1 code is a valid number), block scales near 1 and
    global scales chosen so dequantized weights have a std of about 0.02, like the bf16 ones.
    Attention, routing and the residual stream are kept well-conditioned (see below) so that
    dummy models can be compared across implementations (benchmark/check_model_accuracy.py).
    """
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        # Drawn on the parameter's own device: filling a 26B model from the CPU would take minutes.
        gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        like = dict(generator=gen, device=p.device)
        leaf = name.rsplit(".", 1)[-1]
        if p.dtype == torch.uint8:
            data = torch.randint(0, 256, p.shape, dtype=torch.uint8, **like)
        elif p.dtype == torch.float8_e4m3fn:
            data = (0.5 + torch.rand(p.shape, **like)).to(torch.float8_e4m3fn)
        elif leaf.endswith("weight_scale_2"):
            data = torch.full(p.shape, 0.008, device=p.device)
        elif leaf.endswith("input_scale"):
            data = torch.full(p.shape, 1.0 / (6 * 448), device=p.device)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            # Unit q/k norms with attention scale 1 give logits of std sqrt(head_dim): softmax becomes
            # an argmax whose choice flips with the last bit of any input (a chaotic model that no two
            # correct implementations agree on). head_dim^-1/4 on both gives unit-std logits.
            data = torch.full(p.shape, p.shape[0] ** -0.25, device=p.device)
        elif name.endswith("router.proj.weight"):
            # The router reads rmsnorm(h) / sqrt(H): std-4 logits make the routing decisive, as in a
            # trained model, instead of a near-tie among 128 experts at every token.
            data = torch.randn(p.shape, **like) * 4.0
        elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            # These set the size of what each layer adds to the residual stream. At 1 each branch adds
            # as much as the embedding holds and the random network amplifies rounding noise layer
            # after layer (on the 26B shapes, no two correct implementations agree to cosine 0.999);
            # at 0.25 the 60 branches still outweigh the embedding, and the whole-model check tells a
            # correct fast path from a planted scale bug (benchmark/README_accuracy.md).
            data = torch.full(p.shape, 0.25, device=p.device)
        elif p.dim() == 1 or leaf in ("layer_scalar", "scale", "per_expert_scale"):
            data = torch.ones(p.shape, device=p.device)
        else:
            data = torch.randn(p.shape, **like) * 0.02
        p.data.copy_(data.to(p.dtype))


def load_model(model_config, load_format: str = "auto", device: str = "cpu", moe_runner_backend: str = "torch", seed: int = 0) -> torch.nn.Module:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unsupported load format {load_format!r}; choose from {LOAD_FORMATS}")
    quant_config = get_quantization_config(model_config.quantization, model_config.quant_config)
    model_cls = get_model_class(model_config.architectures)
    with torch.device(device):
        model = model_cls(model_config, quant_config=quant_config, moe_runner_backend=moe_runner_backend)
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    else:
        files = safetensors_files(Path(model_config.model_path))
        model.load_weights(_iter_with_bar(files))
    model.post_load_weights()
    return model.eval()


def _iter_with_bar(files: list[Path]):
    for path in tqdm(files, desc="Loading safetensors shards", disable=len(files) < 4):
        yield from safetensors_weights_iterator([path])
