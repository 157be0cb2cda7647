"""Finding a checkpoint and streaming its tensors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors import SafetensorError

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "data"


def shipped_config_dir(repo_id: str) -> Path | None:
    """Config-only copies of the real checkpoints, so `--load-format dummy` needs no network."""
    path = SHIPPED_CONFIGS / repo_id.replace("/", "--")
    return path if (path / "config.json").is_file() else None


def resolve_model_path(
    model_path: str, revision: str | None = None, download_dir: str | None = None, load_format: str = "auto"
) -> Path:
    """A local directory, the built-in demo model's name, or a Hugging Face repo id (downloaded)."""
    from sglang.test.make_gemma4_checkpoint import DEMO_MODEL_NAME, ensure_demo_model

    if model_path == DEMO_MODEL_NAME:
        return ensure_demo_model()
    local = Path(model_path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or model_path.startswith((".", "/")) or model_path.count("/") != 1:
        raise FileNotFoundError(f"model path {model_path!r} is neither a checkpoint directory nor a hub repo id")
    if load_format == "dummy" and shipped_config_dir(model_path):
        return shipped_config_dir(model_path)
    return _download(model_path, revision, download_dir)


def resolve_tokenizer_path(server_args) -> str:
    """The tokenizer directory. Dummy-weight runs on a shipped config-only model fall back to the
    demo tokenizer: their output is meaningless text anyway, and benchmarks count tokens."""
    path = server_args.tokenizer_path
    if path != server_args.model_path:
        return path
    load_format = getattr(server_args, "load_format", "auto")
    resolved = resolve_model_path(path, server_args.revision, server_args.download_dir, load_format)
    if load_format == "dummy" and not any(resolved.glob("tokenizer*")):
        from sglang.test.make_gemma4_checkpoint import ensure_demo_model

        logger.warning("%s ships no tokenizer; using the demo tokenizer for dummy weights", resolved)
        return str(ensure_demo_model())
    return str(resolved)


def _download(repo_id: str, revision: str | None, download_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, cache_dir=download_dir, allow_patterns=_HUB_PATTERNS)
        )
    except Exception as e:  # the hub client raises many types; the user needs one clear message
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 is set and the model is not in the local cache"
            if offline
            else "the hub could not be reached or the repo does not exist; pass a local directory instead"
        )
        raise RuntimeError(f"could not fetch model {repo_id!r}: {hint} ({type(e).__name__}: {e})") from e


def safetensors_files(model_dir: Path) -> list[Path]:
    """Shards named by model.safetensors.index.json, else every *.safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def safetensors_weights_iterator(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"checkpoint file {path} is corrupt or truncated: {e}") from e
