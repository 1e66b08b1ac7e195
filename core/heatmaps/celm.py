"""CELM, the cancerous evidence localisation map of CELNet (seed 001, section 2.2).

1. Cancer activation map: Grad-CAM of the last two layers (CAM2, CAM3), each min-max normalised, fused as
   ``M^c = alpha f_u(M_3^c) + (1 - alpha) f_u(M_2^c)`` with f_u bilinear upsampling, then min-max normalised.
2. Cancer saliency map: the guided-backpropagation gradient w of the score (``core.heatmaps.guided``, whose rule
   also covers SiLU networks), normalised to [0, 1] over the whole image, converted to grey (ITU-R 601 luma for three
   channels, the mean otherwise) and Gaussian-smoothed with ``sigma`` pixels at model input resolution. Two readings
   of "normalise w to [0, 1]" (``saliency``):

   - ``"signed"`` (default): min-max of the signed gradient, the paper's words taken literally ("normalize w to
     [0, 1]", in contrast with [7]'s maximum magnitude): zero gradient lands between 0 and 1, so pixels that do not
     matter keep a middling saliency and the product ``M^c ⊙ M^s`` damps the CAM there rather than erasing it.
   - ``"magnitude"``: ``|w| / max |w|``, zero gradient at 0, so the product erases whatever the saliency does not
     mark: a sharper, smaller map.

   Measured on synthetic CLE frames (``core.data.synth_cle``, 64 px; CELNet width 8 trained 6 epochs on 240
   frames, validation AUC 0.99; the 60 positive of 120 other frames, intermediate masks, alpha = beta = 0.5): the
   two rank pixels alike (pixel AUC 0.960 signed, 0.961 magnitude; best Dice over thresholds 0.813 and 0.808), but
   at the table's threshold 0.5 the signed map localises better (Dice 0.544 against 0.397; region recall 0.92
   against 0.87, precision 0.98 against 0.99): the magnitude's product leaves less of the evidence above 0.5. Hence
   the default, which is also the paper's reading. The validation search (below) picked beta 0.25 for the signed
   map (Dice 0.548) and beta 0 for the magnitude (0.547, the CAM alone).
3. Complementary fusion ``M = beta (M^c ⊙ M^s) + (1 - beta) M^c``, min-max normalised for display.

alpha and beta are "confirmed by validation" / "estimated by cross-validation" in the paper. :func:`search_weights`
does that search: a grid over both (default {0, 0.25, 0.5, 0.75, 1}^2) on validation images with masks, keeping
the pair of highest Dice at the evaluation threshold. A model carries its chosen pair as the attributes
``celm_alpha`` and ``celm_beta`` (CELNet takes them as builder options, so they live in its checkpoint config);
CELM uses them when it is given no explicit ``alpha`` / ``beta``, else 0.5 / 0.5, a neutral starting point.
``raw`` holds M before the final normalisation; ``extras`` hold ``cam`` (M^c) and ``saliency`` (M^s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.heatmaps.base import Explainer, HeatmapResult, as_numpy, minmax, register_method, upsample
from core.heatmaps.gradcam import GradCAMMulti
from core.heatmaps.guided import GuidedBackprop

__all__ = [
    "CELM",
    "SALIENCY",
    "WEIGHT_GRID",
    "WeightSearch",
    "fusion_weights",
    "gaussian_blur",
    "grey",
    "search_weights",
]

_LUMA = (0.299, 0.587, 0.114)
SALIENCY = ("signed", "magnitude")
WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
_NEUTRAL = 0.5


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


def _unit(gradient: torch.Tensor, saliency: str) -> torch.Tensor:
    """The gradient ``(B, C, H, W)`` normalised to [0, 1] per image: signed min-max, or ``|w| / max |w|``."""
    flat = gradient.flatten(1)
    if saliency == "magnitude":
        scale = flat.abs().amax(dim=1).clamp_min(1e-12)[:, None, None, None]
        return gradient.abs() / scale
    low = flat.min(dim=1).values[:, None, None, None]
    span = (flat.max(dim=1).values[:, None, None, None] - low).clamp_min(1e-12)
    return (gradient - low) / span


def fusion_weights(model: nn.Module, alpha: float | None = None, beta: float | None = None) -> tuple[float, float]:
    """The (alpha, beta) CELM uses for ``model``: the explicit values, else the model's stored ``celm_alpha`` /
    ``celm_beta`` (chosen on validation by :func:`search_weights`), else 0.5."""

    def pick(value: float | None, stored: object) -> float:
        chosen = value if value is not None else stored if isinstance(stored, int | float) else _NEUTRAL
        return float(chosen)

    chosen = pick(alpha, getattr(model, "celm_alpha", None)), pick(beta, getattr(model, "celm_beta", None))
    for name, value in zip(("alpha", "beta"), chosen, strict=True):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    return chosen


def _cam(cam2: torch.Tensor, cam3: torch.Tensor, alpha: float) -> torch.Tensor:
    """M^c: ``alpha CAM3 + (1 - alpha) CAM2`` of the upsampled, normalised maps, ReLU'd and min-max normalised."""
    return minmax(torch.relu((1.0 - alpha) * cam2 + alpha * cam3))


def _fuse(cam: torch.Tensor, saliency: torch.Tensor, beta: float) -> torch.Tensor:
    """The raw CELM ``beta (M^c ⊙ M^s) + (1 - beta) M^c``."""
    return beta * cam * saliency + (1.0 - beta) * cam


@register_method("celm", title="CELM")
class CELM(Explainer):
    """CELNet's evidence localisation map: two-layer Grad-CAM fused with a guided-backprop saliency map (seed 001)."""

    def __init__(
        self,
        model: nn.Module,
        layers: nn.Module | Sequence[nn.Module] | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        sigma: float = 2.0,
        saliency: str = "signed",
    ) -> None:
        super().__init__(model, layers)
        if saliency not in SALIENCY:
            raise ValueError(f"saliency must be one of {', '.join(SALIENCY)}, not {saliency!r}")
        self.alpha, self.beta = fusion_weights(model, alpha, beta)
        self.sigma, self.saliency = sigma, saliency

    def components(
        self, x: torch.Tensor, targets: Sequence[int] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What alpha and beta weigh, at input resolution: CAM2 and CAM3 (each ReLU'd, min-max normalised and
        upsampled), the saliency map M^s, and the logits."""
        with GradCAMMulti(self.model, self.layers, fusion="celnet") as gradcam:
            raws, logits = gradcam.layer_maps(x, targets)
        size = tuple(x.shape[-2:])
        cams = [upsample(minmax(torch.relu(raw.float())), size) for raw in raws[-2:]]
        cam2, cam3 = cams[0], cams[-1]  # one layer given: M^c is its map whatever alpha
        with GuidedBackprop(self.model) as guided:
            gradient, _ = guided.gradient(x, targets)
        saliency = gaussian_blur(grey(_unit(gradient, self.saliency)), self.sigma)
        return cam2, cam3, saliency, logits

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        cam2, cam3, saliency, logits = self.components(x, targets)
        cam = _cam(cam2, cam3, self.alpha)
        raw = _fuse(cam, saliency, self.beta)
        extras = {"cam": as_numpy(cam), "saliency": as_numpy(saliency)}
        return HeatmapResult(as_numpy(minmax(raw)), as_numpy(raw), as_numpy(logits), extras)


@dataclass(frozen=True)
class WeightSearch:
    """The outcome of :func:`search_weights`: the chosen pair, the criterion, and its value at every grid point
    (``scores[(alpha, beta)]``; None where no labeled pixel was scored)."""

    alpha: float
    beta: float
    criterion: str
    threshold: float
    scores: dict[tuple[float, float], float | None]

    def record(self) -> dict[str, object]:
        """A JSON-ready summary, for a study report."""
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "criterion": self.criterion,
            "threshold": self.threshold,
            "grid": [{"alpha": a, "beta": b, "score": s} for (a, b), s in self.scores.items()],
        }


def _dice(maps: torch.Tensor, masks: np.ndarray, threshold: float) -> float | None:
    """Dice ``2TP / (2TP + FP + FN)`` of ``map >= threshold`` over the labeled pixels of all images pooled
    (masks 1 positive, 0 negative, anything else unlabeled)."""
    predicted = maps.numpy() >= threshold
    positive, negative = masks == 1, masks == 0
    tp = int((predicted & positive).sum())
    fp = int((predicted & negative).sum())
    fn = int((~predicted & positive).sum())
    return None if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def search_weights(
    model: nn.Module,
    layers: Sequence[nn.Module],
    images: torch.Tensor,
    masks: np.ndarray,
    *,
    threshold: float = 0.5,
    grid: Sequence[float] = WEIGHT_GRID,
    sigma: float = 2.0,
    saliency: str = "signed",
    batch: int = 16,
) -> WeightSearch:
    """Choose CELM's alpha and beta on validation images (seed 001, section 2.2: "confirmed by validation").

    ``images`` are network input ``(N, C, H, W)`` and ``masks`` ``(N, H, W)`` int labels (1 positive, 0 negative,
    -1 unlabeled; :func:`core.metrics.localization.mask_labels`), normally the positive validation images. Every
    ``(alpha, beta)`` of ``grid`` x ``grid`` is scored by the pooled Dice of its min-max normalised map at
    ``threshold`` (the threshold the study's table scores at); the highest wins, ties going to the pair nearest
    (0.5, 0.5), then to the first in grid order. The network runs once per image: CAM2, CAM3 and the saliency do
    not depend on the weights.
    """
    if len(images) == 0 or len(images) != len(masks):
        raise ValueError(f"need as many masks as images (at least one), got {len(images)} and {len(masks)}")
    parts: list[tuple[torch.Tensor, ...]] = []
    with CELM(model, layers, alpha=_NEUTRAL, beta=_NEUTRAL, sigma=sigma, saliency=saliency) as celm:
        model.eval()
        for start in range(0, len(images), batch):
            parts.append(celm.components(images[start : start + batch], None)[:3])
    cam2, cam3, sal = (torch.cat([p[i] for p in parts]) for i in range(3))
    labels = np.asarray(masks)
    scores: dict[tuple[float, float], float | None] = {}
    for alpha in grid:
        cam = _cam(cam2, cam3, float(alpha))
        for beta in grid:
            fused = minmax(_fuse(cam, sal, float(beta)))
            scores[(float(alpha), float(beta))] = _dice(fused, labels, threshold)
    scored = [(pair, value) for pair, value in scores.items() if value is not None]
    if not scored:
        best = (_NEUTRAL, _NEUTRAL)
    else:
        top = max(value for _, value in scored)
        tied = [pair for pair, value in scored if value >= top - 1e-12]
        best = min(tied, key=lambda pair: abs(pair[0] - _NEUTRAL) + abs(pair[1] - _NEUTRAL))
    return WeightSearch(best[0], best[1], "pooled Dice at the threshold", float(threshold), scores)
