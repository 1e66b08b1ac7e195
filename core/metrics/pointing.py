"""Does a heatmap find the tumor better than the brightest spot does? The pointing game and intensity baselines.

A fluorescence heatmap earns its place only if it points at tumor where the image alone would not: on a cohort where
tumor is simply the brightest region, any map that peaks on the brightest spot "localises" perfectly. So every
figure here comes with the baseline that needs no model at all.

- Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016, section 5.1): a map
  scores a hit when its maximum lies inside the ground-truth region, within ``tolerance`` pixels (Zhang et al. use
  15 px at their 224 px input; the default here is 0: the peak pixel itself must lie in the mask, the strict
  reading). The score is hits / specimens, with a percentile bootstrap 95 % CI over specimens. Maps are compared
  at the image's own resolution: map them back (:class:`core.predict.Predictor` does) before calling these.
- Brightest smoothed pixel (:func:`brightest_point`): the location of the maximum of the Gaussian-smoothed image
  inside the tissue, the pointing game's no-model baseline. Smoothing (sigma 1 % of the shorter side, at least 2 px)
  keeps single hot pixels, the paper's "randomly appeared white noises", from deciding it.
- Intensity statistics (:func:`intensity_statistics`, :func:`intensity_aucs`): per image, background-subtracted mean
  and percentiles of the tissue, its smoothed maximum and two heterogeneity measures; each one's ROC AUC as a tumor
  score. The best is the no-model baseline a classifier's AUC has to beat. Each statistic's direction (higher or
  lower means tumor) is taken from the same data, so the best AUC is, if anything, optimistic for the baseline.

The tissue, when no mask of it is known, is estimated from the image (:func:`tissue_mask`: Otsu's threshold on the
smoothed image, the largest bright component, holes filled). Pure numpy/scipy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core.metrics.classification import auc

__all__ = [
    "INTENSITY_STATISTICS",
    "HitRate",
    "brightest_point",
    "hit_rate",
    "intensity_aucs",
    "intensity_statistics",
    "peak",
    "point_in_mask",
    "tissue_mask",
]

INTENSITY_STATISTICS = {
    "mean": "mean intensity of the tissue above background",
    "p50": "median intensity of the tissue above background",
    "p90": "90th percentile of the tissue above background",
    "p99": "99th percentile of the tissue above background",
    "max": "brightest smoothed pixel above background",
    "spread": "heterogeneity (p90 - p10) / (p50 above background)",
    "cv": "coefficient of variation (SD / mean above background)",
}


@dataclass(frozen=True)
class HitRate:
    """Pointing-game score: ``hits`` of ``n`` specimens, the rate and its bootstrap CI (None when ``n`` is 0)."""

    hits: int
    n: int
    rate: float | None
    ci: tuple[float, float] | None

    def to_dict(self) -> dict[str, object]:
        return {"hits": self.hits, "n": self.n, "rate": self.rate, "ci": list(self.ci) if self.ci else None}


def _smooth_sigma(shape: tuple[int, ...], sigma: float | None) -> float:
    return max(2.0, 0.01 * min(shape[:2])) if sigma is None else float(sigma)


def _grey(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3:
        x = x.mean(axis=2)
    if x.ndim != 2:
        raise ValueError(f"expected a (H, W) or (H, W, C) image, not shape {np.shape(image)}")
    return x


def peak(heatmap: np.ndarray, within: np.ndarray | None = None) -> tuple[int, int]:
    """(row, column) of the map's maximum, restricted to ``within`` when given (ties: the first in row-major order).

    A ``within`` with no pixel set is ignored: the whole map is searched."""
    values = np.asarray(heatmap, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"a heatmap is a non-empty (H, W) array, not shape {values.shape}")
    if within is not None:
        region = np.asarray(within, dtype=bool)
        if region.shape != values.shape:
            raise ValueError(f"region {region.shape} and map {values.shape} differ in shape")
        if region.any():
            values = np.where(region, values, -np.inf)
    row, column = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(row), int(column)


def point_in_mask(point: tuple[int, int], mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether ``point`` lies in the mask (pixels > 0) or within ``tolerance`` pixels (Euclidean) of it."""
    region = np.asarray(mask) > 0
    row, column = point
    if not (0 <= row < region.shape[0] and 0 <= column < region.shape[1]):
        raise ValueError(f"point {point} lies outside the {region.shape} mask")
    if region[row, column] or tolerance <= 0 or not region.any():
        return bool(region[row, column])
    return bool(ndimage.distance_transform_edt(~region)[row, column] <= tolerance)


def hit_rate(hits: Sequence[bool], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> HitRate:
    """Share of hits with a percentile bootstrap CI, resampling specimens with replacement."""
    values = np.asarray(hits, dtype=bool)
    n = int(values.size)
    if n == 0:
        return HitRate(0, 0, None, None)
    rate = float(values.mean())
    if resamples < 1:
        return HitRate(int(values.sum()), n, rate, None)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return HitRate(int(values.sum()), n, rate, (float(low), float(high)))


def tissue_mask(image: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """The specimen, estimated: Otsu's threshold on the square root of the smoothed image (so that bright vessels
    and glare do not set it), its largest bright component, holes filled. The rim comes out a little generous.

    For a specimen photographed on a darker background (the FL frames here); an image without two intensity
    classes gives all True, so callers still get a usable region."""
    smooth = ndimage.gaussian_filter(_grey(image), _smooth_sigma(np.shape(image), sigma))
    smooth = np.sqrt(smooth - smooth.min())
    counts, edges = np.histogram(smooth, bins=256)
    if counts.sum() == 0 or edges[-1] <= edges[0]:
        return np.ones(smooth.shape, dtype=bool)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centres)
    below, above = weight[:-1], weight[-1] - weight[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (mean[:-1] / below - (mean[-1] - mean[:-1]) / above) ** 2
    threshold = centres[int(np.nanargmax(np.where(np.isfinite(between), between, -1.0)))]
    bright = smooth > threshold
    labels, n = ndimage.label(bright)
    if n == 0:
        return np.ones(smooth.shape, dtype=bool)
    largest = 1 + int(np.argmax(ndimage.sum_labels(bright, labels, range(1, n + 1))))
    return ndimage.binary_fill_holes(labels == largest)


def brightest_point(image: np.ndarray, tissue: np.ndarray | None = None, sigma: float | None = None) -> tuple[int, int]:
    """(row, column) of the brightest Gaussian-smoothed pixel inside ``tissue`` (estimated when not given)."""
    sigma = _smooth_sigma(np.shape(image), sigma)
    smooth = ndimage.gaussian_filter(_grey(image), sigma)
    region = tissue_mask(image, sigma) if tissue is None else np.asarray(tissue) > 0
    return peak(smooth, region)


def intensity_statistics(
    image: np.ndarray, tissue: np.ndarray | None = None, sigma: float | None = None
) -> dict[str, float]:
    """The :data:`INTENSITY_STATISTICS` of one image: tissue intensities minus the background's median."""
    grey = _grey(image)
    sigma = _smooth_sigma(grey.shape, sigma)
    region = tissue_mask(grey, sigma) if tissue is None else np.asarray(tissue) > 0
    if not region.any():
        raise ValueError("the tissue mask is empty")
    background = float(np.median(grey[~region])) if (~region).any() else 0.0
    values = grey[region].astype(np.float64) - background
    p10, p50, p90, p99 = np.percentile(values, [10, 50, 90, 99])
    mean = float(values.mean())
    smooth_max = float(ndimage.gaussian_filter(grey, sigma)[region].max()) - background
    return {
        "mean": mean,
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": smooth_max,
        "spread": float((p90 - p10) / max(p50, 1e-6 * max(abs(p90), 1.0))),
        "cv": float(values.std() / max(abs(mean), 1e-6 * max(abs(p90), 1.0))),
    }


def intensity_aucs(truth: Sequence[int], statistics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """ROC AUC of each statistic as a score for ``truth`` (1 = tumor), in its better direction (max(AUC, 1 - AUC)).

    Needs both classes; a statistic missing from any image is left out."""
    labels = np.asarray(truth, dtype=int)
    if len(labels) != len(statistics):
        raise ValueError(f"{len(labels)} labels but {len(statistics)} images")
    if labels.min(initial=1) == labels.max(initial=0) or len(labels) == 0:
        raise ValueError("intensity AUCs need tumor and non-tumor images")
    names = [k for k in INTENSITY_STATISTICS if all(k in s for s in statistics)]
    out = {}
    for name in names:
        value = auc(labels, np.array([s[name] for s in statistics], dtype=np.float64))
        out[name] = float(max(value, 1.0 - value))
    return out
