"""Bookkeeping for one checkpoint load, so every problem is reported at once.

Each load records which piece of which parameter it filled: a whole tensor, one stacked shard
(q/k/v, gate/up), or one expert's shard. Whatever the model expects and nobody filled is missing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


class CheckpointLoadError(ValueError):
    pass


@dataclass
class LoadReport:
    loaded: dict[str, set] = field(default_factory=lambda: defaultdict(set))
    unexpected: list[str] = field(default_factory=list)
    shape_errors: list[str] = field(default_factory=list)

    def record(self, param_name: str, piece=None) -> None:
        self.loaded[param_name].add(piece)

    def expected_pieces(self, param_name: str, module: torch.nn.Module) -> set:
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

        if isinstance(module, FusedMoE):
            shards = ("w1", "w3") if param_name.rsplit(".", 1)[-1].startswith("w13_") else ("w2",)
            return {(e, s) for e in range(module.num_experts) for s in shards}
        if isinstance(module, LinearBase) and len(module.output_sizes) > 1:
            return set(module.shard_names)
        return {None}

    def missing(self, model: torch.nn.Module, skip: set[str]) -> list[str]:
        modules = dict(model.named_modules())
        out = []
        for name, _ in model.named_parameters():
            if name in skip:
                continue
            got = self.loaded.get(name, set())
            if None in got:
                continue
            module = modules[name.rsplit(".", 1)[0]] if "." in name else model
            lacking = self.expected_pieces(name, module) - got
            out += [self._describe(name, p) for p in sorted(lacking, key=str)]
        return out

    @staticmethod
    def _describe(name: str, piece) -> str:
        if piece is None:
            return name
        if isinstance(piece, tuple):
            return f"{name} (expert {piece[0]}, shard {piece[1]})"
        return f"{name} (shard {piece})"

    def raise_if_failed(self, model: torch.nn.Module, skip: set[str] = frozenset()) -> None:
        missing = self.missing(model, set(skip))
        problems = []
        if missing:
            problems.append(f"missing tensors ({len(missing)}): " + ", ".join(missing[:50]) + (" ..." if len(missing) > 50 else ""))
        if self.unexpected:
            problems.append(f"unexpected tensors ({len(self.unexpected)}): " + ", ".join(self.unexpected[:50]))
        if self.shape_errors:
            problems.append(f"mis-shaped tensors ({len(self.shape_errors)}): " + "; ".join(self.shape_errors[:50]))
        if problems:
            raise CheckpointLoadError("checkpoint does not match the model: " + " | ".join(problems))
