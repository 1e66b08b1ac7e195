"""A registry of architectures, timm-style: ``@register_model(name, target_layer=...)`` on a builder function.

Each entry knows how to build the network and which layer its class activation maps are taken from, so heatmap
methods never guess at a model's internals.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "ModelSpec",
    "check_model_options",
    "create_model",
    "get_spec",
    "list_models",
    "model_options",
    "register_model",
]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    target_layer: Callable[[nn.Module], nn.Module]
    description: str
    cam_layers: Callable[[nn.Module], list[nn.Module]] | None = None

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The layers heatmap methods use, shallow to deep; the last is the target layer. Multi-layer methods
        (``gradcam-multi``, ``celm``) fuse all of them, single-layer methods use the last."""
        if self.cam_layers is None:
            return [self.target_layer(model)]
        return list(self.cam_layers(model))


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    target_layer: Callable[[nn.Module], nn.Module],
    cam_layers: Callable[[nn.Module], list[nn.Module]] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``builder(in_chans, num_classes, pretrained_file, **kwargs) -> nn.Module`` under ``name``.

    ``target_layer`` picks the layer single-layer heatmaps use; ``cam_layers`` (optional) the layers, shallow to
    deep and ending with the target layer, that multi-layer heatmaps fuse."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        doc = (builder.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelSpec(name, builder, target_layer, doc[0] if doc else "", cam_layers)
        return builder

    return decorator


def get_spec(name: str) -> ModelSpec:
    """The registered entry for ``name``; a clear error lists what exists."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def list_models() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_REGISTRY)


def create_model(
    name: str, *, in_chans: int, num_classes: int = 1, pretrained_file: str | None = None, **kwargs: object
) -> nn.Module:
    """Build a registered architecture. Weights are random unless ``pretrained_file`` names a local checkpoint."""
    return get_spec(name).builder(in_chans=in_chans, num_classes=num_classes, pretrained_file=pretrained_file, **kwargs)


_BUILDER_ARGUMENTS = ("in_chans", "num_classes", "pretrained_file")
_TYPES: dict[str, tuple[type, ...]] = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def model_options(name: str) -> dict[str, Any]:
    """The options an architecture's builder takes besides channels, classes and checkpoint: name -> default."""
    signature = inspect.signature(get_spec(name).builder)
    return {
        key: parameter.default
        for key, parameter in signature.parameters.items()
        if key not in _BUILDER_ARGUMENTS and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    }


def check_model_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against the builder of ``name`` before any training starts: each must be one of its
    options (:func:`model_options`) and of the type its annotation allows (an int passes for a float); ``drop_rate``
    must lie in [0, 1). Returns them as a plain dict; ``ValueError`` says what to change."""
    known = model_options(name)
    annotations = {k: str(p.annotation) for k, p in inspect.signature(get_spec(name).builder).parameters.items()}
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in known:
            offered = ", ".join(f"{k} (default {v!r})" for k, v in known.items()) or "none"
            raise ValueError(f"architecture {name} has no option {key!r}; its options: {offered}")
        words = set(re.findall(r"\b(bool|int|float|str|None)\b", annotations[key]))
        allowed = tuple(t for word in words for t in _TYPES.get(word, ()))
        fits = (value is None and "None" in words) or (
            isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        )
        if words and not fits:
            raise ValueError(f"option {key} of {name} must be {annotations[key]}, not {value!r}")
        if key == "drop_rate" and not 0.0 <= float(value) < 1.0:
            raise ValueError(f"drop_rate (dropout) must lie in [0, 1), not {value!r}")
        checked[key] = value
    return checked
