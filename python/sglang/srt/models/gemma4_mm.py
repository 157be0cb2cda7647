"""Gemma4ForConditionalGeneration: the released checkpoints' class.

Text weights live under `model.language_model.`; the vision (and, on small variants, audio)
towers are skipped with one log line until the vision work lands, so text serving works today.
"""

from __future__ import annotations

from sglang.srt.models.gemma4_causal import Gemma4ForCausalLM


class Gemma4ForConditionalGeneration(Gemma4ForCausalLM):
    checkpoint_prefix = "model.language_model."
    skipped_prefixes = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")


EntryClass = Gemma4ForConditionalGeneration
