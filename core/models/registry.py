"""A registry of architectures, timm-style: ``@register_model(name, target_layer=...)`` on a builder function.

Each entry knows how to build the network and which layer its class activation maps are taken from, so heatmap
methods never guess at a model's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["ModelSpec", "create_model", "get_spec", "list_models", "register_model"]


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
