"""CELM, the cancerous evidence localisation map of CELNet (seed 001, section 2.2).

1. Cancer activation map: Grad-CAM of the last two layers (CAM2, CAM3), each min-max normalised, fused as
   ``M^c = alpha f_u(M_3^c) + (1 - alpha) f_u(M_2^c)`` with f_u bilinear upsampling, then min-max normalised.
2. Cancer saliency map: the guided-backpropagation gradient w of the score (``core.heatmaps.guided``, whose rule
   also covers SiLU networks), normalised to [0, 1] over the whole image (min-max of the signed gradient, so zero
   gradient sits in the middle), converted to grey (ITU-R 601 luma for three channels, the mean otherwise) and
   Gaussian-smoothed with ``sigma`` pixels at model input resolution.
3. Complementary fusion ``M = beta (M^c ⊙ M^s) + (1 - beta) M^c``, min-max normalised for display.

alpha and beta are "confirmed by validation" in the paper; the defaults 0.5 / 0.5 are a neutral starting point and
both are options. ``raw`` holds M before the final normalisation; ``extras`` hold ``cam`` (M^c) and ``saliency``
(M^s).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.heatmaps.base import Explainer, HeatmapResult, as_numpy, minmax, register_method
from core.heatmaps.gradcam import GradCAMMulti
from core.heatmaps.guided import GuidedBackprop

__all__ = ["CELM", "gaussian_blur", "grey"]

_LUMA = (0.299, 0.587, 0.114)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, H, W)`` maps (kernel radius 3 sigma, reflected borders)."""
    if sigma <= 0:
        return maps
    radius = min(max(1, round(3 * sigma)), min(maps.shape[-2:]) - 1)
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[:, 0]


def grey(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B, H, W)``: luma for RGB, the channel mean otherwise."""
    if images.shape[1] == 3:
        weights = torch.tensor(_LUMA, device=images.device, dtype=images.dtype)
        return torch.einsum("bchw,c->bhw", images, weights)
    return images.mean(dim=1)


@register_method("celm", title="CELM")
class CELM(Explainer):
    """CELNet's evidence localisation map: two-layer Grad-CAM fused with a guided-backprop saliency map (seed 001)."""

    def __init__(
        self,
        model: nn.Module,
        layers: nn.Module | Sequence[nn.Module] | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
        sigma: float = 2.0,
    ) -> None:
        super().__init__(model, layers)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.alpha, self.beta, self.sigma = alpha, beta, sigma

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        with GradCAMMulti(self.model, self.layers, fusion="celnet", alpha=self.alpha) as gradcam:
            cam, _, logits = gradcam.fused(x, targets)
        with GuidedBackprop(self.model) as guided:
            gradient, _ = guided.gradient(x, targets)
        flat = gradient.flatten(1)
        low = flat.min(dim=1).values[:, None, None, None]
        span = (flat.max(dim=1).values[:, None, None, None] - low).clamp_min(1e-12)
        saliency = gaussian_blur(grey((gradient - low) / span), self.sigma)
        raw = self.beta * cam * saliency + (1.0 - self.beta) * cam
        extras = {"cam": as_numpy(cam), "saliency": as_numpy(saliency)}
        return HeatmapResult(as_numpy(minmax(raw)), as_numpy(raw), as_numpy(logits), extras)
