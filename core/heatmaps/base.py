"""The heatmap method registry, the ``Explainer`` base every method derives from, and their shared conventions.

Conventions (those of pytorch-grad-cam, so results can be cross-checked): each layer's raw map is ReLU'd at feature
resolution, min-max normalised per image, upsampled bilinearly (``align_corners=False``) to the input size; layers
are fused (mean by default), ReLU'd and min-max normalised again. A map with no positive evidence stays all zeros
instead of dividing by zero.

An explainer is a context manager built from ``(model, layers)``: hooks are attached on entry and always released
on exit, so no state is left on the model. Called on a batch ``(B, C, H, W)`` with one target per image it returns
a ``HeatmapResult`` with one map per image. ``layers`` is one module or a list ordered shallow to deep; single-layer
methods use the last (the target layer), multi-layer methods all of them. An explainer is not thread-safe: callers
sharing one model between threads hold a lock while it is entered (``core.predict.Predictor`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Explainer",
    "HeatmapResult",
    "as_numpy",
    "fuse",
    "get_method",
    "list_methods",
    "method_title",
    "minmax",
    "register_method",
    "register_model_map",
    "target_scores",
    "upsample",
]


@dataclass(frozen=True)
class HeatmapResult:
    maps: np.ndarray  # (B, H, W) float32 in [0, 1] at input resolution
    raw: np.ndarray  # (B, h, w) float32, unnormalised (ReLU'd where the method says so), at the method's resolution
    logits: np.ndarray  # (B, num_classes) float32, from the same forward pass
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # method-specific arrays, e.g. input gradients


class Explainer:
    """Base class of heatmap methods: holds the model and layers, attaches hooks on ``__enter__``, always removes
    them on ``__exit__``. Subclasses implement ``_attach`` (register hooks through ``self._hook``) and ``explain``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""

    def __init__(self, model: nn.Module, layers: nn.Module | Sequence[nn.Module] | None = None) -> None:
        self.model = model
        self.layers: list[nn.Module] = [layers] if isinstance(layers, nn.Module) else list(layers or [])
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._entered = False

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        """Why this method cannot explain ``model``, or ``None`` when it can."""
        return None

    @property
    def target_layer(self) -> nn.Module:
        if not self.layers:
            raise ValueError(f"{self.title or type(self).__name__} needs a target layer")
        return self.layers[-1]

    def _hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def _attach(self) -> None:
        """Register the method's hooks (through ``self._hook``); the default has none."""

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._entered = False

    def __enter__(self) -> Self:
        reason = self.unsupported(self.model)
        if reason:
            raise ValueError(f"{self.title} cannot explain this model: {reason}")
        try:
            self._attach()
        except BaseException:
            self._release()
            raise
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()

    def __call__(self, x: torch.Tensor, targets: Sequence[int] | None = None) -> HeatmapResult:
        if not self._entered:
            raise RuntimeError(
                f"use {type(self).__name__} as a context manager: `with get_method({self.name!r})(model, layers) "
                "as explainer: explainer(x)`"
            )
        if x.ndim != 4:
            raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
        return self.explain(x, targets)

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        raise NotImplementedError


_METHODS: dict[str, type[Explainer]] = {}


def register_method(name: str, title: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Register a heatmap method class under its CLI name, with the title people see (e.g. ``Grad-CAM``)."""

    def decorator(cls: type[Explainer]) -> type[Explainer]:
        if name in _METHODS:
            raise ValueError(f"heatmap method {name!r} is registered twice")
        _METHODS[name] = cls
        cls.name, cls.title = name, title
        return cls

    return decorator


def get_method(name: str) -> type[Explainer]:
    """The method class registered as ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown heatmap method {name!r}; available: {', '.join(sorted(_METHODS))}") from None


def list_methods(model: nn.Module | None = None) -> dict[str, str]:
    """Registered method names with the first line of their docstring; with ``model``, only those that apply."""
    return {
        name: (cls.__doc__ or "").strip().splitlines()[0]
        for name, cls in sorted(_METHODS.items())
        if model is None or cls.unsupported(model) is None
    }


def method_title(name: str) -> str:
    """The display title of a registered method."""
    return get_method(name).title


def register_model_map(name: str, title: str, attribute: str, doc: str) -> type[Explainer]:
    """Register a model's own localisation map as a heatmap method.

    Weakly supervised localisation models (MLCAM-LICI's final diagnostic feature map, seed 000 eq. 5; CompSegNet's
    activation map, seed 004) compute their map themselves: the model implements a method named ``attribute``,
    ``(x) -> (maps, logits)`` with maps ``(B, h, w)`` (``fdfm``, ``activation_map``), and the heatmap method applies
    only to models that have it, so each model's name must be its own. The maps are min-max normalised
    and upsampled with the shared conventions, so pages, CLI and evaluation treat them like any other method.
    """

    class ModelMap(Explainer):
        __doc__ = doc

        @classmethod
        def unsupported(cls, model: nn.Module) -> str | None:
            if callable(getattr(model, attribute, None)):
                return None
            return f"the model has no {attribute}() map"

        def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
            with torch.no_grad():
                raw, logits = getattr(self.model, attribute)(x)
            maps = minmax(upsample(minmax(raw.float()), tuple(x.shape[-2:])))
            return HeatmapResult(as_numpy(maps), as_numpy(raw), as_numpy(logits))

    ModelMap.__name__ = ModelMap.__qualname__ = "".join(part.title() for part in name.split("-")) + "Map"
    return register_method(name, title)(ModelMap)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation of ``(B, H, W)`` maps to [0, 1]; constant maps become zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low).clamp_min(1e-12)
    return torch.where(span > 1e-12, (maps - low) / span, torch.zeros_like(maps))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``(B, h, w)`` maps to ``size`` (align_corners=False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def fuse(raws: Sequence[torch.Tensor], size: tuple[int, int], weights: Sequence[float] | None = None) -> torch.Tensor:
    """The shared convention from raw per-layer maps to one map per image: ReLU, min-max at feature resolution,
    upsample to ``size``, weighted sum over layers (mean by default), ReLU, min-max."""
    weights = [1.0 / len(raws)] * len(raws) if weights is None else list(weights)
    if len(weights) != len(raws):
        raise ValueError(f"{len(weights)} weights for {len(raws)} layers")
    total = sum(w * upsample(minmax(torch.relu(raw.float())), size) for w, raw in zip(weights, raws, strict=True))
    return minmax(torch.relu(total))


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
