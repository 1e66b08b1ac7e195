"""The plain gradient saliency map of Simonyan, Vedaldi and Zisserman ("Deep inside convolutional networks",
ICLR 2014 workshop, section 3.1): ``w = d S_c / d I`` by ordinary backpropagation, and the map
``M_ij = max_c |w_c,ij|`` (eq. 3 for a multi-channel image; the magnitude itself for one channel).

It is the "Backprop" baseline of seed 001's Table 3 (CELNet, reference [7]), which the paper contrasts with its own
guided-backpropagation saliency (``core.heatmaps.guided``). No hooks: the model is differentiated as it is, so every
architecture is supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.heatmaps.base import Explainer, HeatmapResult, as_numpy, minmax, register_method, target_scores

__all__ = ["Gradient"]


@register_method("gradient", title="Backprop (plain gradient)")
class Gradient(Explainer):
    """Plain-gradient saliency, max over channels of |d score / d input| (Simonyan et al. 2014, eq. 3).

    ``raw`` is the magnitude before min-max normalisation; the signed gradient ``(B, C, H, W)`` is in
    ``extras["gradient"]``.
    """

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        leaf = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(leaf)
            (gradient,) = torch.autograd.grad(target_scores(logits, targets).sum(), leaf)
        raw = gradient.abs().amax(dim=1)
        return HeatmapResult(as_numpy(minmax(raw)), as_numpy(raw), as_numpy(logits), {"gradient": as_numpy(gradient)})
