"""Grad-CAM (Selvaraju et al., ICCV 2017, eqs. 1-2) on one layer, and on several layers fused.

Channel weights are the spatially averaged gradients of the target score y^c with respect to the feature maps
A^k of a layer, ``alpha_k^c = 1/Z * sum_ij dy^c / dA^k_ij`` (eq. 1), and the map is
``L^c = ReLU(sum_k alpha_k^c A^k)`` (eq. 2). The FL-CNN paper (seed 003) uses the last stage as target layer.

Only the layers after the shallowest hooked layer need a graph: the forward pass runs without autograd up to it,
whose hook hands on a copy of its output that requires grad and switches autograd on for the rest of the pass
(grad mode is thread-local, and the surrounding ``no_grad`` restores it). Peak memory is then that of inference plus
the head, not of a whole training step (7.3 GB -> 1.3 GB for a batch of 16 at 512 px on EfficientNet-B0).
Gradients come from ``torch.autograd.grad``, so no ``.grad`` is left on parameters. Not usable inside
``torch.inference_mode``, which no hook can lift.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from core.heatmaps.base import Explainer, HeatmapResult, as_numpy, fuse, register_method, target_scores

__all__ = ["GradCAM", "GradCAMMulti"]


class _LayerGradients(Explainer):
    """Hooks that keep the used layers' activations, with autograd starting at the first one the pass reaches."""

    def _used(self) -> list[nn.Module]:
        return [self.target_layer]

    def _attach(self) -> None:
        self._activations: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self._used()):
            self._hook(layer.register_forward_hook(partial(self._keep, index)))

    def _keep(self, index: int, _module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # the first hooked layer reached: the graph starts here
            torch.set_grad_enabled(True)
            leaf = output.detach().requires_grad_(True)
            self._activations[index] = leaf
            return leaf.clone()  # later in-place ops change the clone, never the leaf
        self._activations[index] = output
        return output

    def layer_maps(self, x: torch.Tensor, targets: Sequence[int] | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Raw Grad-CAM maps ``ReLU(sum_k alpha_k A^k)`` per used layer (feature resolution), and the logits."""
        self._activations = {}
        try:
            with torch.no_grad():
                logits = self.model(x)  # the first hook turns autograd on
            used = len(self._used())
            if len(self._activations) != used:
                raise RuntimeError("a target layer was not reached by the forward pass")
            activations = [self._activations[i] for i in range(used)]
            with torch.enable_grad():
                gradients = torch.autograd.grad(target_scores(logits, targets).sum(), activations)
            raws = [
                torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)).detach()
                for g, a in zip(gradients, activations, strict=True)
            ]
            return raws, logits.detach()
        finally:
            self._activations = {}


@register_method("gradcam", title="Grad-CAM")
class GradCAM(_LayerGradients):
    """Grad-CAM on the target layer (Selvaraju et al. 2017, eqs. 1-2)."""

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        (raw,), logits = self.layer_maps(x, targets)
        return HeatmapResult(as_numpy(fuse([raw], tuple(x.shape[-2:]))), as_numpy(raw), as_numpy(logits))


@register_method("gradcam-multi", title="Grad-CAM, layers fused")
class GradCAMMulti(_LayerGradients):
    """Grad-CAM on several layers fused: the mean, or CELNet's alpha * up(CAM3) + (1 - alpha) * up(CAM2).

    ``fusion="mean"`` averages the per-layer maps after the shared normalisation (pytorch-grad-cam's aggregation).
    ``fusion="celnet"`` is seed 001's unified cancer activation map ``M^c = alpha f_u(M_3^c) + (1 - alpha)
    f_u(M_2^c)`` (section 2.2) on the last two layers, ``f_u`` bilinear upsampling of each min-max normalised map;
    with ``alpha = 0.5`` it equals the mean of two layers. ``raw`` holds the deepest layer's raw map; every layer's
    raw map is in ``extras["raw_<i>"]``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: nn.Module | Sequence[nn.Module] | None = None,
        fusion: str = "mean",
        alpha: float = 0.5,
    ) -> None:
        super().__init__(model, layers)
        if fusion not in ("mean", "celnet"):
            raise ValueError(f"fusion must be 'mean' or 'celnet', not {fusion!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.fusion, self.alpha = fusion, alpha

    def _used(self) -> list[nn.Module]:
        return self.layers[-2:] if self.fusion == "celnet" else self.layers

    def fused(
        self, x: torch.Tensor, targets: Sequence[int] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The fused map at input resolution, the raw per-layer maps and the logits."""
        raws, logits = self.layer_maps(x, targets)
        weights = [1.0 - self.alpha, self.alpha] if self.fusion == "celnet" and len(raws) == 2 else None
        return fuse(raws, tuple(x.shape[-2:]), weights), raws, logits

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        maps, raws, logits = self.fused(x, targets)
        extras = {f"raw_{i}": as_numpy(raw) for i, raw in enumerate(raws)}
        return HeatmapResult(as_numpy(maps), as_numpy(raws[-1]), as_numpy(logits), extras)
