"""The heatmap method registry and the conventions every method shares.

Conventions (those of pytorch-grad-cam, so results can be cross-checked): the raw map is ReLU'd at feature
resolution, min-max normalised per image, upsampled bilinearly (``align_corners=False``) to the input size, and
min-max normalised again. A map with no positive evidence stays all zeros instead of dividing by zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "HeatmapResult",
    "as_numpy",
    "get_method",
    "list_methods",
    "method_title",
    "minmax",
    "register_method",
    "target_scores",
    "upsample",
]


@dataclass(frozen=True)
class HeatmapResult:
    maps: np.ndarray  # (B, H, W) float32 in [0, 1] at input resolution
    raw: np.ndarray  # (B, h, w) float32, unnormalised, at feature resolution
    logits: np.ndarray  # (B, num_classes) float32, from the same forward pass


_METHODS: dict[str, type] = {}


def register_method(name: str, title: str) -> Callable[[type], type]:
    """Register a heatmap method class under its CLI name, with the title people see (e.g. ``Grad-CAM``)."""

    def decorator(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"heatmap method {name!r} is registered twice")
        _METHODS[name] = cls
        cls.name, cls.title = name, title
        return cls

    return decorator


def get_method(name: str) -> type:
    """The method class registered as ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown heatmap method {name!r}; available: {', '.join(sorted(_METHODS))}") from None


def list_methods() -> dict[str, str]:
    """Registered method names with the first line of their docstring."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in sorted(_METHODS.items())}


def method_title(name: str) -> str:
    """The display title of a registered method."""
    return get_method(name).title


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of ``(B, H, W)`` maps to [0, 1]; constant maps become zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low).clamp_min(1e-12)
    return torch.where(span > 1e-12, (maps - low) / span, torch.zeros_like(maps))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``(B, h, w)`` maps to ``size`` (align_corners=False)."""
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def target_scores(logits: torch.Tensor, targets: Sequence[int] | None) -> torch.Tensor:
    """The score each image's map explains: for one-logit binary models class 1 is the logit and class 0 its
    negation; otherwise the logit of the target class. ``None`` means the positive class (1)."""
    batch = logits.shape[0]
    chosen = torch.as_tensor(list(targets) if targets is not None else [1] * batch, device=logits.device)
    if chosen.shape[0] != batch:
        raise ValueError(f"{chosen.shape[0]} targets given for a batch of {batch}")
    if logits.shape[1] == 1:
        return torch.where(chosen == 1, logits[:, 0], -logits[:, 0])
    return logits.gather(1, chosen[:, None])[:, 0]


def as_numpy(tensor: torch.Tensor) -> Any:
    """A detached float32 NumPy copy."""
    return tensor.detach().float().cpu().numpy().astype(np.float32)
