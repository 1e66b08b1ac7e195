"""Slide-level evaluation of Camelyon16 (Bejnordi et al., JAMA 2017), as seed 001's Table 2 reports it: the slide
AUC of a slide score and the FROC score of detected tumour regions.

- ``slide_auc``: the ROC AUC of one score per slide (seed 001 and Liu et al. 2017: the maximum of the slide's
  tumour probability map, :func:`core.heatmaps.regions.slide_score`) against the slide labels; the Mann-Whitney
  statistic, ties counted 1/2.
- ``match_detections``: Camelyon16's rule for one slide. Each detection is a point with a probability; it is a true
  positive of the tumour region whose label it falls on (``regions[y, x] = k > 0``), else a false positive. A region
  hit by several detections keeps the highest probability and is counted once; the other detections on it are
  neither true nor false positives (the challenge's evaluation code, ``computeITCList``/``compute_FP_TP_Probs``,
  without its exclusion of isolated tumour cells, which synthetic lesions do not have).
- ``froc``: every detection probability, pooled over the slides, is a threshold; at each, the sensitivity is the
  fraction of all tumour regions (all slides) with a true positive at or above it and the false positives per slide
  are those at or above it divided by the number of slides (normal slides included). The curve starts at (0, 0)
  above the highest probability. The sensitivities at 1/4, 1/2, 1, 2, 4 and 8 false positives per slide are read off
  by linear interpolation over the curve (``np.interp``, as the challenge's code does), keeping for each
  false-positive rate its highest sensitivity; beyond the largest rate reached the last sensitivity holds. The FROC
  score is their mean.

Pure NumPy; coordinates are ``(y, x)`` in the pixels of the region label image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["FP_RATES", "FROC", "SlideMatch", "froc", "match_detections", "slide_auc"]

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class SlideMatch:
    """One slide's detections matched to its tumour regions: ``region_probabilities[k - 1]`` is the highest
    probability of a detection on region k (``-inf`` when none hit it); ``false_positives`` the probabilities of the
    detections outside every region."""

    region_probabilities: np.ndarray
    false_positives: np.ndarray


@dataclass(frozen=True)
class FROC:
    """The FROC curve (``fps_per_slide`` and ``sensitivity`` at each threshold, from the highest threshold down),
    the sensitivities at :data:`FP_RATES` and their mean, the score."""

    thresholds: np.ndarray
    fps_per_slide: np.ndarray
    sensitivity: np.ndarray
    rates: tuple[float, ...]
    sensitivities: tuple[float, ...]
    score: float
    n_slides: int
    n_regions: int


def match_detections(detections: ArrayLike, regions: ArrayLike) -> SlideMatch:
    """Camelyon16's matching for one slide (module docstring). ``detections`` is ``(n, 3)``: rows ``(y, x,
    probability)``, pixel coordinates of ``regions``, an integer label image (0 outside tumour, 1..K one label per
    tumour region)."""
    labels = np.asarray(regions)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise ValueError("regions must be a 2-D label image of non-negative integers")
    points = np.asarray(detections, dtype=np.float64).reshape(-1, 3)
    count = int(labels.max()) if labels.size else 0
    best = np.full(count, -np.inf)
    false_positives = []
    for y, x, probability in points:
        row, col = int(round(y)), int(round(x))
        if not (0 <= row < labels.shape[0] and 0 <= col < labels.shape[1]):
            raise ValueError(f"detection ({y}, {x}) lies outside the {labels.shape} slide")
        label = int(labels[row, col])
        if label:
            best[label - 1] = max(best[label - 1], probability)
        else:
            false_positives.append(probability)
    return SlideMatch(best, np.asarray(false_positives, dtype=np.float64))


def froc(matches: Sequence[SlideMatch], rates: Sequence[float] = FP_RATES) -> FROC:
    """The FROC curve and score over slides (module docstring); needs at least one slide and one tumour region."""
    if not matches:
        raise ValueError("FROC needs at least one slide")
    hits = np.concatenate([m.region_probabilities for m in matches])
    false = np.concatenate([m.false_positives for m in matches])
    if hits.size == 0:
        raise ValueError("FROC needs at least one tumour region among the slides")
    found = hits[np.isfinite(hits)]
    thresholds = np.unique(np.concatenate([found, false]))[::-1]
    n_slides = len(matches)
    fps = np.array([0.0, *((false[:, None] >= thresholds).sum(axis=0) / n_slides)])
    sens = np.array([0.0, *((found[:, None] >= thresholds).sum(axis=0) / hits.size)])
    levels = np.unique(fps)
    best = np.array([sens[fps == level].max() for level in levels])
    at = tuple(float(v) for v in np.interp(np.asarray(rates, dtype=np.float64), levels, best))
    return FROC(
        thresholds=np.array([np.inf, *thresholds]),
        fps_per_slide=fps,
        sensitivity=sens,
        rates=tuple(float(r) for r in rates),
        sensitivities=at,
        score=float(np.mean(at)),
        n_slides=n_slides,
        n_regions=int(hits.size),
    )


def slide_auc(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """ROC AUC of slide scores against 0/1 slide labels (Mann-Whitney, ties 1/2); None with only one class."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(labels).astype(bool).ravel()
    if values.shape != truth.shape:
        raise ValueError(f"{values.size} scores for {truth.size} labels")
    positive, negative = values[truth], values[~truth]
    if positive.size == 0 or negative.size == 0:
        return None
    greater = (positive[:, None] > negative[None, :]).sum()
    ties = (positive[:, None] == negative[None, :]).sum()
    return float((greater + 0.5 * ties) / (positive.size * negative.size))
