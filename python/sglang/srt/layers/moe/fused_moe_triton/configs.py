"""Tile configurations for the fused-MoE Triton kernels, chosen per token-count bucket.

`get_moe_config` looks up a measured table for (card, weight format, E, H, I, top-k) and falls back to
`default_moe_config`, a shape-agnostic heuristic. Tables come from `benchmark/bench_moe_nvfp4.py --tune`
(see benchmark/README_moe.md for the run that produced them).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemmTile:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool
    # GEMM1 only: up to this many programs per output tile, each over a slice of K (whole block_k
    # steps), summed by a second kernel (`fused_moe.moe_gemm1`). For few tokens, where one program
    # per tile leaves most SMs idle.
    split_k: int = 1
    # Neighbouring N tiles one program computes in one loop (needs K a multiple of block_k and, for
    # GEMM1, split_k 1; otherwise 1 is used): short programs (GEMM2's K = I is 11 steps of 64)
    # then pay their set-up and pipeline fill once for several tiles.
    group_n: int = 1


@dataclass(frozen=True)
class MoeTileConfig:
    """block_m is shared: both GEMMs walk the same per-expert padded token list."""

    block_m: int
    gemm1: GemmTile
    gemm2: GemmTile

    def __post_init__(self) -> None:
        if self.gemm2.split_k != 1:
            raise ValueError("split_k is implemented for GEMM1 only")


@dataclass(frozen=True)
class GemvTile:
    """One program: block_n output columns of one (token, slot) pair, block_k of K per step.
    num_stages: Triton's pipeline stages for bf16 weights; for NVFP4 the number of steps (1-3) whose
    tiles are loaded ahead of the one being multiplied (moe_gemv._fp4_gemv)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 2


@dataclass(frozen=True)
class MoeGemvConfig:
    """The per-pair GEMV path (moe_gemv.py), taken for up to max_pairs (token, slot) pairs."""

    max_pairs: int
    gemm1: GemvTile
    gemm2: GemvTile


def tile(
    block_n: int, block_k: int, num_warps: int, num_stages: int, swap_ab: int, split_k: int = 1, group_n: int = 1
) -> GemmTile:
    """From the tables' tuples (block_n, block_k, num_warps, num_stages, swap_ab[, split_k[, group_n]])."""
    return GemmTile(block_n, block_k, num_warps, num_stages, bool(swap_ab), split_k, group_n)


def default_moe_config(num_tokens: int, num_experts: int, top_k: int, weight_format: str) -> MoeTileConfig:
    """Heuristic: block_m follows the mean tokens per expert; small batches use narrow N tiles so that
    enough programs stream weights concurrently (the regime is memory-bound), large ones use
    128-wide tiles for tensor-core efficiency. NVFP4: the H200 sweep's shape-independent favourite,
    64x64 tiles (decoded straight into mma.sync registers below 64 tokens a block, swapped above)."""
    per_expert = num_tokens * top_k / max(num_experts, 1)
    if weight_format == "nvfp4":
        if per_expert <= 48:
            return MoeTileConfig(16 if per_expert <= 16 else 32, tile(64, 64, 4, 4, 0), tile(64, 64, 4, 4, 0))
        return MoeTileConfig(128, tile(64, 64, 4, 4, 1), tile(64, 64, 4, 3, 1))
    if per_expert <= 16:
        return MoeTileConfig(16, tile(32, 128, 4, 4, 1), tile(64, 128, 4, 4, 1))
    if per_expert <= 48:
        return MoeTileConfig(32, tile(64, 128, 4, 4, 1), tile(64, 128, 4, 4, 1))
    if per_expert <= 96:
        return MoeTileConfig(64, tile(64, 128, 4, 3, 0), tile(128, 64, 4, 3, 0))
    return MoeTileConfig(128, tile(128, 64, 8, 3, 0), tile(128, 64, 8, 3, 0))


def _bucketed(rows: list[tuple[int, int, tuple, tuple]]) -> list[tuple[int, MoeTileConfig]]:
    return [(max_m, MoeTileConfig(bm, tile(*g1), tile(*g2))) for max_m, bm, g1, g2 in rows]


# (card, weight format, E, H, I, top_k) -> [(largest M in bucket, config), ...] ascending in M.
# Gemma 4 26B-A4B on H200: the fastest of the sweep in `bench_moe_nvfp4.py --tune`, measured
# 2026-11-28 at M = 1, 4, 16, 64, 256, 1024, 4096, 8192 (each bucket reaches halfway to the next).
# NVFP4 from FP4_DEQUANT_MIN_TOKENS (4096) on runs the bf16 kernels on expanded experts (bf16 rows);
# its rows here are the in-loop decode's best, used only if that threshold is raised.
# H100 (80GB HBM3): the same sweep on 2026-12-07 at M = 16, 64, 256, 1024 (NVFP4) and 16 ... 8192
# (bf16); rows of buckets it did not reach (M <= 8, where the per-pair GEMV path runs by default, and
# NVFP4 from 4096 on, which runs the bf16 rows) are the H200 ones.
# Tiles are (block_n, block_k, num_warps, num_stages, swap_ab[, split_k[, group_n]]). The split-K
# sweep (M = 1, 4, 16, 64; 2026-11-28) won only at M = 1; from M = 4 on the unsplit tile was fastest.
# Tile groups (group_n) were swept on the H200 on 2026-12-07 (NVFP4 at M = 16, 64, 256; bf16 at 4096,
# 8192): pairs of GEMM2 N tiles won at 16 and 64; at 256 (32-row blocks) and for bf16 the one-tile
# programs stayed fastest. On the H100 (same day) pairs won GEMM2's sweep at 16 and 64 but the layer
# was no faster than with one tile (146.3 / 213.8 vs 144.7 / 214.9 us), so its rows keep one tile.
TUNED_MOE_CONFIGS: dict[tuple[str, str, int, int, int, int], list[tuple[int, MoeTileConfig]]] = {
    ("H200", "nvfp4", 128, 2816, 704, 8): _bucketed([
        (2, 16, (64, 64, 4, 4, 0, 4), (64, 64, 4, 4, 0)),  # split-K 4: GEMM1 17.0 vs 19.6 us at M=1
        (8, 16, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0)),
        (32, 16, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0, 1, 2)),  # GEMM2 in tile pairs: 58.1 -> 54.1 us at M=16
        (128, 16, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0, 1, 2)),  # 85.3 -> 79.3 us at 64
        (512, 32, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0)),
        (2048, 32, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0)),
        (6144, 128, (64, 64, 4, 4, 1), (64, 64, 4, 3, 1)),
        (1 << 30, 128, (64, 64, 4, 4, 1), (64, 64, 4, 3, 1)),
    ]),
    ("H200", "bf16", 128, 2816, 704, 8): _bucketed([
        (2, 16, (64, 128, 4, 4, 1), (64, 128, 4, 4, 0)),
        (8, 16, (32, 128, 4, 4, 0), (64, 128, 4, 4, 0)),
        (32, 16, (32, 128, 4, 4, 0), (64, 128, 4, 4, 0)),
        (128, 16, (128, 128, 4, 3, 1), (64, 128, 4, 4, 0)),
        (512, 32, (128, 128, 4, 3, 1), (64, 128, 4, 4, 0)),
        (2048, 64, (128, 64, 4, 4, 0), (128, 64, 4, 4, 0)),
        (6144, 128, (128, 64, 8, 4, 1), (256, 64, 8, 3, 0)),
        (1 << 30, 128, (128, 64, 8, 3, 0), (256, 64, 8, 3, 0)),
    ]),
    ("H100", "nvfp4", 128, 2816, 704, 8): _bucketed([
        (2, 16, (64, 64, 4, 4, 0, 4), (64, 64, 4, 4, 0)),
        (8, 16, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0)),
        (32, 16, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0)),  # 142.4 us at M=16
        (128, 16, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0)),  # 211.2 us at 64
        (512, 32, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0)),  # 280.2 us at 256
        (2048, 32, (64, 64, 4, 4, 0), (64, 64, 4, 4, 0)),  # 649.1 us at 1024 (default_moe_config: 128, swapped)
        (6144, 128, (64, 64, 4, 4, 1), (64, 64, 4, 3, 1)),
        (1 << 30, 128, (64, 64, 4, 4, 1), (64, 64, 4, 3, 1)),
    ]),
    ("H100", "bf16", 128, 2816, 704, 8): _bucketed([
        (2, 16, (64, 128, 4, 4, 1), (64, 128, 4, 4, 0)),
        (8, 16, (32, 128, 4, 4, 0), (64, 128, 4, 4, 0)),
        (32, 16, (64, 128, 4, 4, 1), (64, 128, 4, 4, 0)),  # 332.9 us at M=16
        (128, 16, (64, 128, 4, 4, 1), (64, 128, 4, 4, 0)),  # 499.1 us at 64
        (512, 32, (64, 128, 4, 4, 1), (64, 128, 4, 4, 0)),  # 536.4 us at 256
        (2048, 64, (64, 128, 4, 4, 1), (128, 64, 4, 4, 0)),  # 588.7 us at 1024
        (6144, 128, (128, 64, 8, 4, 1), (256, 64, 8, 3, 0)),  # 963.4 us at 4096
        (1 << 30, 128, (128, 64, 8, 4, 1), (256, 64, 8, 3, 0)),  # 1655.1 us at 8192
    ]),
}  # fmt: skip


# The GEMV path's tiles and crossover per weight format, from the H200 sweeps
# (`bench_moe_nvfp4.py --tune-gemv`, 2026-11-28, E=128 H=2816 I=704 top-8; whole layer, GEMV vs the
# tuned grouped GEMMs). bf16 experts win up to 4 tokens (32.9 vs 38.9 us at M=1, 96.5 vs 105.0 at
# M=4; 179.8 vs 163.2 at M=8). NVFP4 experts win up to 8 tokens (21.0 vs 25.4 us at M=1, 39.3 vs 45.8
# at 2, 52.1 vs 64.8 at 4, 91.8 vs 100.6 at 8); in the model (decode graph replayed, batch 1/2/4/8)
# 0.93/0.91/0.86/0.98 of the grouped path's step time. NVFP4 tiles: 256-K steps were the fastest
# GEMM1 at every M, also once wider steps lost their masked tail (the last step moves back): on H100
# 2026-12-07, M=1 GEMM1 11.4 us at 256-K steps, 12.5 at 512, 12.8 at 1024.
GEMV_CONFIGS: dict[str, MoeGemvConfig] = {
    "bf16": MoeGemvConfig(32, GemvTile(32, 128, 8, 3), GemvTile(32, 128, 8, 1)),
    "nvfp4": MoeGemvConfig(64, GemvTile(16, 256, 4, 1), GemvTile(32, 256, 4, 1)),
}


@functools.lru_cache(maxsize=1)
def device_key() -> str:
    """'H100' / 'H200' / ... from the CUDA device name; '' without a GPU."""
    if not torch.cuda.is_available():
        return ""
    name = torch.cuda.get_device_name()
    for key in ("H200", "H100", "H20", "H800", "A100"):
        if key in name:
            return key
    return name


def read_config_file(path: str) -> dict[tuple, list[tuple[int, MoeTileConfig]]]:
    """Tables in the form `bench_moe_nvfp4.py --tune` writes (moe_configs.json): a list of
    {"device": "H200", "format": "nvfp4", "shape": [E, H, I, top_k], "rows": [[max_m, block_m, gemm1, gemm2], ...]}
    with tiles as in TUNED_MOE_CONFIGS. Returns {table key: rows}."""
    try:
        with open(path) as f:
            entries = json.load(f)
        tables = {}
        for e in entries:
            if e["format"] not in ("nvfp4", "bf16") or len(e["shape"]) != 4:
                raise ValueError(f"entry for {e['device']}: format must be nvfp4 or bf16 and shape [E, H, I, top_k]")
            key = (str(e["device"]), e["format"], *(_positive_int(v) for v in e["shape"]))
            tables[key] = [(_positive_int(m), _checked_config(e["format"], bm, g1, g2)) for m, bm, g1, g2 in e["rows"]]
        return tables
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"SGLANG_MOE_CONFIG_FILE {path!r}: {type(exc).__name__}: {exc}") from exc


def _positive_int(v) -> int:
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return v


def _checked_tile(fmt: str, values: list) -> GemmTile:
    """(block_n, block_k, num_warps, num_stages, swap_ab[, split_k[, group_n]]), swap_ab 0 or 1, the
    rest positive; rejected when the file is read rather than at the first forward."""
    if not 5 <= len(values) <= 7 or values[4] not in (0, 1):
        raise ValueError(f"tile {values!r}: expected (block_n, block_k, warps, stages, swap_ab 0/1[, split_k[, group_n]])")
    t = tile(*(v if i == 4 else _positive_int(v) for i, v in enumerate(values)))
    if fmt == "nvfp4" and t.block_k % 64:
        raise ValueError(f"tile {values!r}: NVFP4 tiles need block_k a multiple of 64")
    return t


def _checked_config(fmt: str, block_m, g1: list, g2: list) -> MoeTileConfig:
    return MoeTileConfig(_positive_int(block_m), _checked_tile(fmt, g1), _checked_tile(fmt, g2))


@functools.lru_cache(maxsize=1)
def tuned_tables() -> dict[tuple, list[tuple[int, MoeTileConfig]]]:
    """TUNED_MOE_CONFIGS with the rows of SGLANG_MOE_CONFIG_FILE (if set) in place of the built-in
    rows of the same bucket: a tuning run on another card or shape is used without editing code."""
    tables = {k: list(v) for k, v in TUNED_MOE_CONFIGS.items()}
    path = os.environ.get("SGLANG_MOE_CONFIG_FILE")
    for key, rows in (read_config_file(path) if path else {}).items():
        merged = dict(tables.get(key, []))
        merged.update(rows)
        tables[key] = sorted(merged.items())
    return tables


def get_moe_config(
    num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, weight_format: str
) -> MoeTileConfig:
    table = tuned_tables().get((device_key(), weight_format, num_experts, hidden, inter, top_k))
    if table:
        for max_m, cfg in table:
            if num_tokens <= max_m:
                return cfg
        return table[-1][1]
    return default_moe_config(num_tokens, num_experts, top_k, weight_format)


def get_moe_gemv_config(num_pairs: int, weight_format: str) -> MoeGemvConfig | None:
    """The GEMV path's config if it should run this many (token, slot) pairs, else None (grouped
    GEMMs). SGLANG_MOE_GEMV_MAX_PAIRS overrides the crossover (0 turns the path off)."""
    cfg = GEMV_CONFIGS[weight_format]
    limit = int(os.environ.get("SGLANG_MOE_GEMV_MAX_PAIRS", cfg.max_pairs))
    return cfg if num_pairs <= limit else None
