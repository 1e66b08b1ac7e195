"""Tissue MIL: a small fully convolutional network that scores every place of the specimen and calls the image by
its best-scoring places (multiple-instance learning from image labels).

Why (issue 17): on the honest FL cohort (``CohortConfig(confounders=1)``) the FL-CNN paper's network, an
EfficientNet-B0 with global average pooling, or a ResNet-18, learns the image label but not where it comes from:
each last-layer cell sees the whole frame (a receptive field of several hundred pixels at 128 px), the pooled
average lets the evidence sit anywhere, and its Grad-CAM peaks beside the specimen as often as on the tumor
(bench/README.md). Max pooling of the location scores (Oquab et al. 2015, :mod:`core.models.pooling`) does not help
when every location sees everything: the decisive location was then the drape beside the specimen.

The label "this specimen contains tumor" is a statement about some places of the tissue, which is the
multiple-instance reading of weak labels (Ilse et al. 2018; Campanella et al., Nat Med 2019, top-k instances;
Durand et al. 2017, WILDCAT's k-max pooling). This network makes it literal:

- Instances are the cells of a stride-8 feature map (stride 4 with ``stem_stride=1``) whose receptive field is
  local (``RECEPTIVE_FIELD``: 71 px, about a quarter of the 256 px input the demo uses), so a cell's score
  describes the tissue around it, not the whole frame. The stem's stride 2 keeps the input's full resolution for
  the first layer only: thin vessels, clots and glare, which the honest cohort adds to normal tissue, are resolved
  there and cost little after it.
- Only tissue cells are instances. The tissue is estimated from the input itself (:func:`tissue_cells`: Otsu's
  threshold on the smoothed intensity, as :func:`core.metrics.pointing.tissue_mask` does for the pointing game), so
  the model needs no mask at inference. Features outside the tissue are set to zero: the drape cannot carry
  evidence, and every heatmap of the model is zero there.
- The image logit is the mean of the ``top_k`` share (10 %) of the highest tissue-cell scores: a tumor call rests on
  a region of that size, a non-tumor call requires every region to score low.

Its own map (``tissue_map``, the ``tissue-mil`` heatmap method and the model's default) is the cell scores
themselves, whatever the call. Grad-CAM of the ``masked`` layer is the same map without the bias, above zero.
It trains by the ``flmil`` recipe (:mod:`core.train.recipe`): the FL-CNN's Adam and schedule with random
90-degree rotations and flips but no brightness or contrast jitter.

Measured on the demo's honest cohort (``python -m bench.pointing``, test split, 249 specimens, 152 tumor; best
intensity statistic AUC 0.833, brightest pixel in the tumor 67 %): at 256 px, 12 epochs, training seeds 0 / 1 / 2
(``--fl-seed``), test AUC 0.909 / 0.854 / 0.895 and the map's peak in the tumor for 84.9 / 82.2 / 86.8 % of tumor
specimens. At 128 px with a stride-1 stem (and a tissue estimate that still counted the square padding): AUC
0.900, peak 79.6 %; without the rotations and flips 0.886 / 74.3 %; with the FL paper's brightness and contrast
jitter 0.791 / 77.0 % (bench/README.md).

Limits: the tissue estimate needs a specimen brighter than its background, true of FL frames; on WL photos (tissue
on a bright gauze) pass ``tissue=False`` and every cell is an instance. The network is small (``width`` 32: about
0.2 M parameters) and trains from scratch; it has no pretrained weights. It is not the FL paper's architecture:
seed 003's EfficientNet-B0 stays one ``--architecture efficientnet_b0`` away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.models.checkpoint import load_state_dict
from core.models.registry import register_model

__all__ = ["RECEPTIVE_FIELD", "TissueMIL", "flmil", "tissue_cells", "top_k_mean"]

# receptive field of a feature cell in input pixels, by stem stride (3x3 convolutions at strides 1, 2, 2, 4, 4 and
# one dilated by 2 at stride 4; with a stride-2 stem every stride after it doubles)
RECEPTIVE_FIELD = {1: 37, 2: 71}
_OTSU_BINS = 64


def _otsu(values: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Per-row Otsu threshold of ``values`` (B, N) in [0, 1] over the ``counted`` ones (B, N bool): (B, 1), the
    lower edge of the first bin of the brighter class."""
    bins = (values * _OTSU_BINS).long().clamp_(0, _OTSU_BINS - 1)
    counts = torch.zeros(values.shape[0], _OTSU_BINS, device=values.device).scatter_add_(1, bins, counted.float())
    centres = (torch.arange(_OTSU_BINS, device=values.device, dtype=torch.float32) + 0.5) / _OTSU_BINS
    below = counts.cumsum(1)[:, :-1]
    mass = (counts * centres).cumsum(1)
    above = counts.sum(1, keepdim=True) - below
    mean_below = mass[:, :-1] / below.clamp_min(1)
    mean_above = (mass[:, -1:] - mass[:, :-1]) / above.clamp_min(1)
    between = below * above * (mean_below - mean_above) ** 2
    return (between.argmax(1, keepdim=True) + 1).float() / _OTSU_BINS


@torch.no_grad()
def tissue_cells(x: torch.Tensor, cells: tuple[int, int], smooth: int = 5) -> torch.Tensor:
    """(B, 1, *cells) bool: the cells at least half covered by the specimen, estimated from ``x`` (B, C, H, W).

    The channel mean is smoothed (a ``smooth`` px box), scaled to [0, 1] per image and split at Otsu's threshold;
    the specimen is the brighter class. The estimate is tight: the dim rim of a specimen falls outside it, which
    keeps the cells that see the specimen's edge against the drape from being instances (square-rooting the
    intensity first, as :func:`core.metrics.pointing.tissue_mask` does, takes in the rim, and the demo model's map
    then peaked in the tumor for 57 % of tumor specimens instead of 85 %). Pixels at the image's exact minimum stay
    out of the histogram: the zero padding that squares a frame (:func:`core.data.preprocess.pad_to_square`, a
    fifth of a 256 x 320 frame) would otherwise be one class and the drape and specimen the other (for small, dim
    specimens the whole drape was then called tissue). An image without contrast, or whose estimate covers no cell,
    counts every cell as tissue, so the model still answers."""
    grey = x.float().mean(1, keepdim=True)
    floor = grey.flatten(1).min(1).values
    counted = (grey.flatten(1) > floor[:, None] + 1e-6).view_as(grey)
    grey = F.avg_pool2d(grey, smooth, stride=1, padding=smooth // 2, count_include_pad=False)
    flat = grey.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    scaled = (flat - low) / span.clamp_min(1e-6)
    bright = (scaled >= _otsu(scaled, counted.flatten(1))).float().view_as(grey)
    covered = F.adaptive_avg_pool2d(bright, cells) >= 0.5
    empty = (~covered.flatten(1).any(1)) | (span.squeeze(1) <= 1e-6)
    covered[empty] = True
    return covered


def top_k_mean(scores: torch.Tensor, valid: torch.Tensor, share: float) -> torch.Tensor:
    """Mean of the highest ``share`` of each row's valid ``scores`` (B, N), at least one each: (B,). A row without
    a valid score counts all of its scores."""
    valid = valid | ~valid.any(1, keepdim=True)
    counts = valid.sum(1)
    k = torch.clamp(torch.ceil(counts.float() * share), min=1).long()
    ranked = scores.masked_fill(~valid, float("-inf")).sort(1, descending=True).values
    keep = torch.arange(scores.shape[1], device=scores.device)[None, :] < k[:, None]
    return torch.where(keep, ranked, torch.zeros_like(ranked)).sum(1) / k


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Masked(nn.Module):
    """Features times the tissue cells: the heatmaps' target layer (a module so hooks can reach its output; the mask
    is an argument, not state, so one model can serve several threads)."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return features * mask.to(features.dtype)


class TissueMIL(nn.Module):
    """Local features (stride 8, or 4 with ``stem_stride=1``), masked to the tissue, scored per cell by a 1x1
    convolution, top-k pooled."""

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 1,
        width: int = 32,
        top_k: float = 0.1,
        drop_rate: float = 0.1,
        tissue: bool = True,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        if not 0.0 < top_k <= 1.0:
            raise ValueError(f"top_k is a share of the tissue cells in (0, 1], not {top_k!r}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, not {stem_stride!r}")
        self.top_k = float(top_k)
        self.tissue = bool(tissue)
        self.trunk = nn.Sequential(
            _block(in_chans, width, stride=stem_stride),
            _block(width, width, stride=2),
            _block(width, 2 * width),
            _block(2 * width, 2 * width, stride=2),
            _block(2 * width, 3 * width),
        )
        self.features = _block(3 * width, 3 * width, dilation=2)
        self.masked = _Masked()
        self.drop = nn.Dropout2d(drop_rate)
        self.classifier = nn.Conv2d(3 * width, num_classes, 1)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def cell_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, classes, h, w), tissue cells (B, 1, h, w) bool) of ``x``; scores are 0 off the tissue."""
        features = self.features(self.trunk(x))
        valid = (
            tissue_cells(x, tuple(features.shape[-2:]))
            if self.tissue
            else torch.ones_like(features[:, :1], dtype=torch.bool)
        )
        scores = self.classifier(self.drop(self.masked(features, valid)))
        return scores * valid, valid

    def tissue_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own map (the ``tissue-mil`` heatmap method): ((B, h, w) first-class cell scores, logits).

        The raw scores, negative values included, whatever the call: the peak is the most tumor-like place also
        where the specimen was called non-tumor (Grad-CAM of the call would then map the evidence against tumor, and
        its ReLU drops cells below zero). Cells off the tissue get the lowest tissue score, so they are 0 after
        min-max normalisation and do not stretch it."""
        scores, valid = self.cell_scores(x)
        logits = self._pool(scores, valid)
        first, inside = scores[:, 0], valid[:, 0]
        floor = first.masked_fill(~inside, float("inf")).flatten(1).min(1).values
        return torch.where(inside, first, floor[:, None, None]), logits

    def _pool(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        flat_valid = valid.flatten(1)
        return torch.stack(
            [top_k_mean(scores[:, c].flatten(1), flat_valid, self.top_k) for c in range(scores.shape[1])], dim=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, valid = self.cell_scores(x)
        return self._pool(scores, valid)


@register_model("flmil", target_layer=lambda model: model.masked)
def flmil(
    in_chans: int = 1,
    num_classes: int = 1,
    pretrained_file: str | None = None,
    width: int = 32,
    top_k: float = 0.1,
    drop_rate: float = 0.1,
    tissue: bool = True,
    stem_stride: int = 2,
) -> nn.Module:
    """Tissue MIL: local cell scores over the estimated specimen, top-k pooled (about 0.2 M parameters at width 32)."""
    model = TissueMIL(in_chans, num_classes, width, top_k, drop_rate, tissue, stem_stride)
    if pretrained_file:
        model.load_state_dict(load_state_dict(pretrained_file))
    return model
