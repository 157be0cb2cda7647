"""Model classes by the architecture name in config.json."""

from __future__ import annotations


def get_model_class(architectures: list[str]):
    from sglang.srt.models.gemma4_causal import Gemma4ForCausalLM
    from sglang.srt.models.gemma4_mm import Gemma4ForConditionalGeneration

    known = {cls.__name__: cls for cls in (Gemma4ForCausalLM, Gemma4ForConditionalGeneration)}
    for arch in architectures:
        if arch in known:
            return known[arch]
    raise ValueError(f"unsupported architectures {architectures}; supported: {sorted(known)}")
