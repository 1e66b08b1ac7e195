"""Class activation mapping, CAM (Zhou et al., CVPR 2016, section 2).

For a network whose last convolutional feature maps f_k feed global average pooling and then a linear classifier,
the map of class c is ``M_c(x, y) = sum_k w_k^c f_k(x, y)`` (eq. 2 of the paper), with w^c the classifier's weights
for class c; the bias is left out as in the paper. For one-logit binary models class 1 uses w and class 0 uses -w.
No gradient is needed, so CAM is the cheapest method: one forward pass, under ``torch.no_grad``. On such networks
Grad-CAM of the last stage equals CAM up to a positive factor (the gradient of the score is w / Z), which the
cross-check with pytorch-grad-cam uses. The seed-002 mosaic stitching uses CAM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.heatmaps.base import Explainer, HeatmapResult, as_numpy, fuse, register_method

__all__ = ["CAM", "class_weights"]


def _classifier(model: nn.Module) -> nn.Linear | None:
    getter = getattr(model, "get_classifier", None)
    classifier = getter() if callable(getter) else None
    return classifier if isinstance(classifier, nn.Linear) else None


def class_weights(model: nn.Module, targets: Sequence[int] | None, batch: int) -> torch.Tensor:
    """``(B, C)`` classifier weights of each image's target class (one-logit models: +w for 1, -w for 0)."""
    classifier = _classifier(model)
    if classifier is None:
        raise ValueError("CAM needs a linear classifier after global pooling (model.get_classifier())")
    chosen = torch.as_tensor(list(targets) if targets is not None else [1] * batch, device=classifier.weight.device)
    if chosen.shape[0] != batch:
        raise ValueError(f"{chosen.shape[0]} targets given for a batch of {batch}")
    weight = classifier.weight.detach()
    if weight.shape[0] == 1:
        return torch.where(chosen[:, None] == 1, weight[0][None], -weight[0][None])
    return weight[chosen]


@register_method("cam", title="CAM")
class CAM(Explainer):
    """Class activation map from the classifier weights (Zhou et al. 2016, eq. 2)."""

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        if _classifier(model) is None:
            return "it has no linear classifier after global pooling"
        return None

    def _attach(self) -> None:
        self._features: torch.Tensor | None = None
        self._hook(self.target_layer.register_forward_hook(self._keep))

    def _keep(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._features = output.detach()

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        self._features = None
        with torch.no_grad():
            logits = self.model(x)
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("the target layer was not reached by the forward pass")
        weights = class_weights(self.model, targets, x.shape[0])
        if weights.shape[1] != features.shape[1]:
            raise ValueError(
                f"the target layer has {features.shape[1]} channels but the classifier takes {weights.shape[1]}: "
                "CAM needs the layer that feeds global pooling"
            )
        raw = torch.relu(torch.einsum("bc,bchw->bhw", weights.to(features.dtype), features)).float()
        return HeatmapResult(as_numpy(fuse([raw], tuple(x.shape[-2:]))), as_numpy(raw), as_numpy(logits))
