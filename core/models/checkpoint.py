"""Checkpoints as ``model.safetensors`` plus ``config.json`` side by side, identified by the weights' sha256.

safetensors holds only tensors (no pickled code runs on load); the JSON config says how to rebuild the network
(architecture, input channels, image size, modality, task) and carries the training record.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.models.registry import create_model

__all__ = ["Checkpoint", "load_checkpoint", "load_state_dict", "save_checkpoint", "sha256_file"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the .safetensors file
    sha256: str
    config: dict[str, Any]


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(model: nn.Module, config: dict[str, Any], directory: str | os.PathLike[str]) -> Checkpoint:
    """Write weights and config into ``directory`` (created); written to temporary names, then renamed."""
    if "architecture" not in config or "in_chans" not in config:
        raise ValueError("a checkpoint config needs at least 'architecture' and 'in_chans'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights, cfg = directory / WEIGHTS, directory / CONFIG
    save_file(state, str(weights.with_suffix(".tmp")), metadata={"architecture": str(config["architecture"])})
    cfg.with_suffix(".tmp").write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(weights.with_suffix(".tmp"), weights)
    os.replace(cfg.with_suffix(".tmp"), cfg)
    return Checkpoint(weights, sha256_file(weights), dict(config))


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU."""
    return load_file(str(path), device="cpu")


def load_checkpoint(
    path: str | os.PathLike[str], expected_sha256: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from ``model.safetensors`` (or its folder) and its config; eval mode, CPU.

    With ``expected_sha256`` the weights must be exactly the registered ones, so a swapped file is refused.
    """
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {weights} does not exist")
    if expected_sha256 and sha256_file(weights) != expected_sha256:
        raise ValueError(f"checkpoint {weights} does not match its registered sha256; it was changed on disk")
    config = json.loads((weights.parent / CONFIG).read_text())
    model = create_model(config["architecture"], in_chans=int(config["in_chans"]), **config.get("model_kwargs", {}))
    model.load_state_dict(load_state_dict(weights))
    return model.eval(), config
