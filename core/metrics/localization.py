"""Pixel-level evaluation of heatmaps against expert masks: pixel AUC, Dice sweep, FCN scores, region localization.

Inputs are maps with values in [0, 1] and masks coded 0 = negative, 255 = positive, anything else = unlabeled.
Unlabeled pixels are excluded from every score (seed 002 masks them out the same way). Every pooled score pools
the labeled pixels of all images, as if the images were one large image:

- ``pixel_auc``: the exact ROC AUC of the pooled pixels (ties count 1/2, the Mann-Whitney statistic), from one sort
  of the pixel values. Its percentile CI resamples *images* with replacement (seed 002, Fig. 11: "we randomly
  selected with replacement 31 mosaics"). The pooled AUC is ``sum_ij U_ij / (P N)`` with ``U_ij`` the number of
  (positive pixel of image i, negative pixel of image j) pairs ranked correctly; a resample drawing image i
  ``w_i`` times has ``AUC = w'Uw / ((w'p)(w'n))``, so all resamples are exact and one matrix product.
- ``dice_sweep``: Dice of ``map >= t`` for t = 0, 0.02, ..., 1 (seed 002: "calculated for all thresholds between
  0 and 1 in increments of 0.02, and the optimal score was selected"), from per-level cumulative counts: one pass.
- ``segmentation_scores``: mean accuracy, mean IU and frequency-weighted IU (Long, Shelhamer and Darrell, "Fully
  Convolutional Networks for Semantic Segmentation", CVPR 2015, section 5; the metrics of seed 000) of the 2 x 2
  confusion matrix summed over all images, both classes (negative, positive) counted.
- ``localization_scores``: seed 001's region precision and recall with the 75 % rule (see its docstring).

Per image rather than pooled (seed 004 reports Dice as "µ = .42 (σ = .19)" over its 20 cancer spots, and ranks
spots by their share of tumour pixels for its ROC, Figure S3):

- ``dice_per_image``: Dice of ``map >= threshold`` image by image, with mean and SD over the images.
- ``fraction_above``: each image's share of labeled pixels at or above a threshold (seed 004's sample score).
- ``roc_points`` / ``pixel_roc``: ROC points (FPR, TPR, thresholds) and AUC of scores against 0/1 truth, for images
  or for the pooled labeled pixels.
- ``bootstrap_pixel_roc``: seed 002's Fig. 11, the pooled pixel ROC of images resampled with replacement, its mean
  and percentile band on a fixed FPR grid.

Maps and masks must have the same shape: nothing is resized, because interpolating a mask invents labels at its
borders; a mismatch is refused with the file named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from scipy import ndimage
from sklearn.metrics import roc_curve

from core.stats.compare import bootstrap_ci, bootstrap_counts

__all__ = [
    "DICE_THRESHOLDS",
    "MAP_SUFFIXES",
    "OVERLAP",
    "FPR_GRID",
    "Pair",
    "bootstrap_pixel_roc",
    "dice_sweep",
    "dice_per_image",
    "evaluate_localization",
    "fraction_above",
    "load_map",
    "load_mask",
    "localization_scores",
    "mask_labels",
    "match_files",
    "pixel_auc",
    "pixel_roc",
    "roc_points",
    "score_maps",
    "segmentation_scores",
]

DICE_THRESHOLDS = np.arange(51) / 50.0  # 0, 0.02, ..., 1 (k / 50 is the nearest double to each step)
FPR_GRID = np.arange(201) / 200.0  # 0, 0.005, ..., 1: where bootstrap ROC curves are read off and averaged
MAP_SUFFIXES = (".npy", ".png")
OVERLAP = 0.75
UNLABELED = -1
_STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connected regions


@dataclass(frozen=True)
class Pair:
    """A map file and the mask with the same stem."""

    stem: str
    map: Path
    mask: Path


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def load_map(path: str | Path) -> np.ndarray:
    """A 2-D float64 map: ``.npy`` as stored (must lie in [0, 1], no NaN) or an 8-bit grayscale ``.png`` / 255."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MAP_SUFFIXES:
        raise ValueError(f"{path}: maps must be .npy or .png")
    mode = "npy"
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with PILImage.open(path) as pil:
                mode = pil.mode
                array = np.asarray(pil)
    except (OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: unreadable map ({error})") from None
    if suffix == ".png":
        if mode != "L":
            raise ValueError(f"{path}: a PNG map must be 8-bit grayscale, not mode {mode}")
        array = array / 255.0
    if array.ndim != 2:
        raise ValueError(f"{path}: a map must be 2-D (height, width), not shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{path}: a map must hold numbers, not dtype {array.dtype}")
    array = array.astype(np.float64)
    if np.isnan(array).any():
        raise ValueError(f"{path}: the map holds NaN values")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(f"{path}: map values must lie in [0, 1], found [{array.min():g}, {array.max():g}]")
    return array


def load_mask(path: str | Path) -> np.ndarray:
    """An int8 label image from an 8-bit grayscale (or 1-bit) PNG: 1 where 255, 0 where 0, -1 (unlabeled) elsewhere."""
    path = Path(path)
    try:
        with PILImage.open(path) as pil:
            if pil.mode not in ("L", "1"):
                raise ValueError(f"{path}: a mask must be an 8-bit grayscale PNG, not mode {pil.mode}")
            pixels = np.asarray(pil.convert("L"))
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: unreadable mask ({error})") from None
    labels = mask_labels(pixels)
    if not (labels >= 0).any():
        raise ValueError(f"{path}: the mask has no labeled pixels (0 = negative, 255 = positive)")
    return labels


def mask_labels(pixels: np.ndarray) -> np.ndarray:
    """int8 labels of a uint8 mask: 1 where 255, 0 where 0, -1 (unlabeled) elsewhere."""
    labels = np.full(pixels.shape, UNLABELED, dtype=np.int8)
    labels[pixels == 0] = 0
    labels[pixels == 255] = 1
    return labels


def match_files(maps_dir: str | Path, masks_dir: str | Path) -> list[Pair]:
    """Maps (``.npy`` or ``.png``) and mask PNGs paired by file stem; files with other suffixes are ignored.

    Refuses maps without masks and masks without maps (naming them), a stem with both a ``.npy`` and a ``.png``
    map, and folders with nothing to pair."""
    maps_dir, masks_dir = Path(maps_dir), Path(masks_dir)
    for folder in (maps_dir, masks_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
    maps: dict[str, Path] = {}
    for file in sorted(maps_dir.iterdir()):
        if file.is_file() and file.suffix.lower() in MAP_SUFFIXES:
            if file.stem in maps:
                raise ValueError(f"two maps for {file.stem!r}: {maps[file.stem].name} and {file.name}; keep one")
            maps[file.stem] = file
    masks = {f.stem: f for f in sorted(masks_dir.iterdir()) if f.is_file() and f.suffix.lower() == ".png"}
    problems = []
    if missing := sorted(maps.keys() - masks.keys()):
        problems.append(f"maps without masks: {', '.join(maps[s].name for s in missing)}")
    if missing := sorted(masks.keys() - maps.keys()):
        problems.append(f"masks without maps: {', '.join(masks[s].name for s in missing)}")
    if problems:
        raise ValueError("; ".join(problems))
    if not maps:
        raise ValueError(f"no maps (.npy, .png) in {maps_dir} and no masks (.png) in {masks_dir}")
    return [Pair(stem, maps[stem], masks[stem]) for stem in sorted(maps)]


def _check(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], names: Sequence[str] | None = None) -> None:
    if len(maps) != len(masks) or not maps:
        raise ValueError(f"need as many masks as maps (at least one), got {len(maps)} maps and {len(masks)} masks")
    for i, (m, k) in enumerate(zip(maps, masks, strict=True)):
        if np.shape(m) != np.shape(k):
            name = names[i] if names else f"image {i}"
            raise ValueError(f"{name}: map shape {np.shape(m)} differs from mask shape {np.shape(k)}; not resized")


def _pool(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labeled pixels of all images: values, positive flags and image index, in image order."""
    _check(maps, masks)
    labeled = [np.asarray(k) >= 0 for k in masks]
    values = np.concatenate([np.asarray(m, dtype=np.float64)[sel] for m, sel in zip(maps, labeled, strict=True)])
    positive = np.concatenate([np.asarray(k)[sel] == 1 for k, sel in zip(masks, labeled, strict=True)])
    image = np.repeat(np.arange(len(maps)), [int(sel.sum()) for sel in labeled])
    return values, positive, image


def _pair_matrix(levels: np.ndarray, positive: np.ndarray, image: np.ndarray, n: int) -> np.ndarray:
    """``U[i, j]``: correctly ranked (positive of image i, negative of image j) pixel pairs, ties counted 1/2."""
    n_levels = int(levels.max()) + 1 if levels.size else 0
    pos_levels, pos_image = levels[positive], image[positive]
    pairs = np.zeros((n, n))
    for j in np.unique(image[~positive]):
        hist = np.bincount(levels[~positive & (image == j)], minlength=n_levels).astype(np.float64)
        below = np.cumsum(hist) - hist
        score = below[pos_levels] + 0.5 * hist[pos_levels]
        pairs[:, j] = np.bincount(pos_image, weights=score, minlength=n)
    return pairs


def pixel_auc(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Exact ROC AUC of all labeled pixels pooled over the images, with a percentile CI from ``bootstrap``
    resamples of the images (seeded). ``masks`` hold 1 / 0 / -1 (unlabeled). Without positive or without negative
    pixels the AUC is undefined: ``estimate`` and ``ci`` are None and ``note`` says why.

    Cost: one sort of the pixel values, then O(images x pixels) vector work for the pair matrix; each resample is
    O(images^2)."""
    values, positive, image = _pool(maps, masks)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    result: dict[str, Any] = {"estimate": None, "ci": None, "level": level, "bootstrap": bootstrap, "seed": seed}
    result.update(n_positive=n_pos, n_negative=n_neg, pooled="all labeled pixels of all images")
    if not n_pos or not n_neg:
        result["note"] = "AUC undefined: the masks hold no " + ("positive" if not n_pos else "negative") + " pixels"
        return result
    _, levels = np.unique(values, return_inverse=True)
    n = len(maps)
    pairs = _pair_matrix(levels.ravel(), positive, image, n)
    result["estimate"] = float(pairs.sum() / (n_pos * n_neg))
    if bootstrap > 0:
        pos_per = np.bincount(image[positive], minlength=n).astype(np.float64)
        neg_per = np.bincount(image[~positive], minlength=n).astype(np.float64)
        weights = bootstrap_counts(np.random.default_rng(seed).integers(0, n, (bootstrap, n)), n)
        numerator = np.einsum("bi,ij,bj->b", weights, pairs, weights)
        denominator = (weights @ pos_per) * (weights @ neg_per)
        with np.errstate(invalid="ignore", divide="ignore"):
            samples = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)
        low, high = bootstrap_ci(samples, level)
        result["ci"] = [_num(low), _num(high)]
        result["undefined_resamples"] = int(np.isnan(samples).sum())
    return result


def dice_sweep(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], thresholds: np.ndarray = DICE_THRESHOLDS
) -> dict[str, Any]:
    """Dice ``2TP / (2TP + FP + FN)`` of ``map >= t`` over all labeled pixels pooled, for each threshold t.

    The pixel values are sorted into levels once; the counts at or above every threshold are suffix sums at
    ``searchsorted`` positions, so the sweep costs one pass over the pixels. The best threshold is the first with
    the highest Dice; Dice is None where 0/0 (no positive pixels and nothing predicted)."""
    values, positive, _ = _pool(maps, masks)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    unique, levels = np.unique(values, return_inverse=True)
    levels = levels.ravel()
    above_pos = np.concatenate([np.cumsum(np.bincount(levels[positive], minlength=unique.size)[::-1])[::-1], [0]])
    above_neg = np.concatenate([np.cumsum(np.bincount(levels[~positive], minlength=unique.size)[::-1])[::-1], [0]])
    start = np.searchsorted(unique, thresholds, side="left")
    tp, fp = above_pos[start].astype(np.float64), above_neg[start].astype(np.float64)
    fn = positive.sum() - tp
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), np.nan)
    best = int(np.nanargmax(dice)) if np.isfinite(dice).any() else None
    return {
        "best_threshold": None if best is None else float(thresholds[best]),
        "dice": None if best is None else float(dice[best]),
        "thresholds": [float(t) for t in thresholds],
        "curve": [_num(d) for d in dice],
    }


def _confusion(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """``n[i, j]``: labeled pixels of class i (0 negative, 1 positive) predicted j (``map >= threshold``)."""
    _check(maps, masks)
    counts = np.zeros((2, 2), dtype=np.int64)
    for m, k in zip(maps, masks, strict=True):
        k = np.asarray(k)
        labeled = k >= 0
        counts += np.bincount(2 * k[labeled] + (np.asarray(m)[labeled] >= threshold), minlength=4).reshape(2, 2)
    return counts


def segmentation_scores(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> dict[str, Any]:
    """Long et al. 2015 (FCN, section 5) on ``map >= threshold``, from the confusion matrix ``n_ij`` summed over
    all images, with ``t_i = sum_j n_ij`` and ``n_cl = 2`` classes (negative and positive):

    - pixel accuracy ``sum_i n_ii / sum_i t_i``
    - mean accuracy ``(1 / n_cl) sum_i n_ii / t_i``
    - mean IU ``(1 / n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)``
    - frequency-weighted IU ``(sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)``

    As in the FCN reference code, a class whose ratio is 0/0 is left out of the means (None if both are)."""
    n = _confusion(maps, masks, threshold).astype(np.float64)
    t = n.sum(axis=1)
    union = t + n.sum(axis=0) - np.diag(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.diag(n) / t
        iu = np.diag(n) / union
    defined = union > 0
    tp, fp, fn = n[1, 1], n[0, 1], n[1, 0]
    return {
        "threshold": float(threshold),
        "pixel_acc": _ratio(np.trace(n), n.sum()),
        "mean_acc": float(np.nanmean(acc)) if np.isfinite(acc).any() else None,
        "mean_iu": float(np.nanmean(iu)) if defined.any() else None,
        "fw_iu": _ratio(float((t[defined] * iu[defined]).sum()), n.sum()),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "confusion": {"tn": int(n[0, 0]), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def localization_scores(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float, overlap: float = OVERLAP
) -> dict[str, Any]:
    """Region precision and recall by seed 001 (CELNet, "Metrics"): "If a segmentation mask intersects with the
    cancerous region by at least 75%, it is defined as a true positive. Otherwise, if a segmentation mask intersects
    with the normal region by at least 75%, it is considered as a false positive."

    Read here as: a predicted region is an 8-connected component of ``map >= threshold``; its fraction is taken
    over its *labeled* pixels. It is a true positive when at least ``overlap`` of them are positive, a false
    positive when at least ``overlap`` are negative; regions in between (mixed) and regions with no labeled pixel
    count as neither and are reported apart. The paper thresholds *and smooths*; maps are used here as given.
    Precision = TP / (TP + FP). The paper does not define recall; here it is the fraction of ground-truth regions
    (8-connected components of the positive mask) that share at least one pixel with a true-positive region.
    None where a ratio is 0/0."""
    _check(maps, masks)
    counts = {"tp": 0, "fp": 0, "mixed": 0, "unlabeled": 0, "gt_regions": 0, "gt_hit": 0}
    for m, k in zip(maps, masks, strict=True):
        k = np.asarray(k)
        regions, n_regions = ndimage.label(np.asarray(m) >= threshold, structure=_STRUCTURE)
        pos = np.bincount(regions.ravel(), weights=(k == 1).ravel(), minlength=n_regions + 1)[1:]
        neg = np.bincount(regions.ravel(), weights=(k == 0).ravel(), minlength=n_regions + 1)[1:]
        labeled = pos + neg
        true_pos = (labeled > 0) & (pos >= overlap * labeled)
        false_pos = (labeled > 0) & (neg >= overlap * labeled) & ~true_pos
        counts["tp"] += int(true_pos.sum())
        counts["fp"] += int(false_pos.sum())
        counts["unlabeled"] += int((labeled == 0).sum())
        counts["mixed"] += int(((labeled > 0) & ~true_pos & ~false_pos).sum())
        truth, n_truth = ndimage.label(k == 1, structure=_STRUCTURE)
        hit = np.concatenate([[False], true_pos])[regions]
        counts["gt_regions"] += n_truth
        counts["gt_hit"] += int(np.unique(truth[hit & (truth > 0)]).size)
    return {
        "threshold": float(threshold),
        "overlap": overlap,
        "precision": _ratio(counts["tp"], counts["tp"] + counts["fp"]),
        "recall": _ratio(counts["gt_hit"], counts["gt_regions"]),
        "regions": counts,
    }


def dice_per_image(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> dict[str, Any]:
    """Dice ``2TP / (2TP + FP + FN)`` of ``map >= threshold`` over each image's labeled pixels, and its mean and
    SD over the images (seed 004, section 4: "an average Dice score of µ = .42 (σ = .19)" over 20 cancer spots).

    The SD is the sample SD (``ddof = 1``; the paper does not say which), None for fewer than two images. An image
    whose Dice is 0/0 (no positive pixel and nothing predicted) is None in ``per_image`` and left out of the mean
    and SD; ``n`` counts the images that entered them."""
    _check(maps, masks)
    per_image: list[float | None] = []
    for m, k in zip(maps, masks, strict=True):
        k = np.asarray(k)
        labeled = k >= 0
        predicted, truth = np.asarray(m)[labeled] >= threshold, k[labeled] == 1
        tp = int((predicted & truth).sum())
        per_image.append(_ratio(2 * tp, int(predicted.sum()) + int(truth.sum())))
    defined = np.array([d for d in per_image if d is not None], dtype=np.float64)
    return {
        "threshold": float(threshold),
        "per_image": per_image,
        "n": int(defined.size),
        "mean": float(defined.mean()) if defined.size else None,
        "sd": float(defined.std(ddof=1)) if defined.size > 1 else None,
    }


def fraction_above(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """float64 ``(N,)``: each image's share of labeled pixels with ``map >= threshold`` (0 for an image without
    labeled pixels). Seed 004 (section 4, Figure S3) thresholds its activation maps at .35 and classifies a spot
    by this share of its tissue pixels; with a set's masks, labeled means covered by sample."""
    _check(maps, masks)
    shares = []
    for m, k in zip(maps, masks, strict=True):
        labeled = np.asarray(k) >= 0
        shares.append(float((np.asarray(m)[labeled] >= threshold).sum()) / max(int(labeled.sum()), 1))
    return np.asarray(shares, dtype=np.float64)


def roc_points(truth: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """The ROC of ``scores`` against 0/1 ``truth``: ``fpr``, ``tpr`` and the ``thresholds`` (``score >=
    threshold`` is called positive) of its corners, from (0, 0) to (1, 1), and the ``auc`` under them (ties count
    1/2, so it equals the Mann-Whitney AUC). The first threshold is just above the highest score (sklearn's +inf,
    made strict-JSON ready). Without positive or without negative cases the ROC is undefined: empty lists, ``auc``
    None and a ``note``."""
    truth, scores = np.asarray(truth).astype(bool).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if truth.shape != scores.shape:
        raise ValueError(f"need one score per case, got {scores.size} scores for {truth.size} cases")
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    result: dict[str, Any] = {"n_positive": n_pos, "n_negative": n_neg}
    if not n_pos or not n_neg:
        note = "ROC undefined: no " + ("positive" if not n_pos else "negative") + " cases"
        return {**result, "fpr": [], "tpr": [], "thresholds": [], "auc": None, "note": note}
    fpr, tpr, thresholds = roc_curve(truth, scores)
    thresholds[0] = np.nextafter(scores.max(), np.inf)
    return {
        **result,
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "thresholds": thresholds.tolist(),
        "auc": float(np.trapezoid(tpr, fpr)),
    }


def pixel_roc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_points: int | None = None) -> dict[str, Any]:
    """:func:`roc_points` of the labeled pixels of all images pooled (map value as score, mask as truth): the
    curve whose area is :func:`pixel_auc`'s estimate. Pooled pixels can give tens of thousands of corners; with
    ``max_points`` at most that many are kept, evenly spaced along the curve and always the first and the last
    (each kept point is an exact point of the curve; ``auc`` is of the full curve, ``points`` its corner count)."""
    values, positive, _ = _pool(maps, masks)
    roc = roc_points(positive, values)
    roc["points"] = len(roc["fpr"])
    if max_points is not None and roc["points"] > max(max_points, 2):
        keep = np.unique(np.linspace(0, roc["points"] - 1, max(max_points, 2)).round().astype(int))
        for key in ("fpr", "tpr", "thresholds"):
            roc[key] = [roc[key][i] for i in keep]
    return roc


def bootstrap_pixel_roc(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    grid: np.ndarray = FPR_GRID,
    max_thresholds: int = 2048,
) -> dict[str, Any]:
    """Seed 002, Fig. 11: "1000 bootstrapping experiments, where we randomly selected with replacement 31 mosaics
    from the test set and calculated the ROC for each realization. The average ROC (solid lines) and 95% confidence
    interval (dashed lines)".

    Each of ``bootstrap`` resamples draws the images with replacement (seeded, as :func:`pixel_auc` draws them) and
    pools the labeled pixels of the drawn images (an image drawn twice counts twice); its ROC is read off at the
    false positive rates of ``grid`` by linear interpolation between its points, taking the highest TPR where the
    curve rises vertically. ``tpr_mean`` is the mean over the resamples, ``tpr_low`` / ``tpr_high`` the percentile
    band at ``level``; resamples without positive or without negative pixels are left out (counted in
    ``undefined_resamples``). ``bootstrap=0`` gives the ROC of the images as they are, without a band.

    The ROC points are those at every distinct map value when there are at most ``max_thresholds`` of them, else
    at that many quantiles of the pooled values (each still an exact point of the resample's ROC): per image the
    pixels at or above each threshold are counted once, and a resample's counts are one matrix product."""
    values, positive, image = _pool(maps, masks)
    n = len(maps)
    unique = np.unique(values)
    if unique.size > max_thresholds:
        unique = np.unique(np.quantile(values, np.linspace(0.0, 1.0, max_thresholds)))
    thresholds = unique[::-1]  # descending: the ROC from (0, 0) towards (1, 1)

    def at_or_above(selected: np.ndarray) -> np.ndarray:
        counts = np.zeros((n, thresholds.size + 1))
        for i in range(n):
            ordered = np.sort(values[selected & (image == i)])
            counts[i, 1:] = ordered.size - np.searchsorted(ordered, thresholds, side="left")
        return counts  # column 0: a threshold above every value, nothing called positive

    pos, neg = at_or_above(positive), at_or_above(~positive)
    if bootstrap > 0:
        weights = bootstrap_counts(np.random.default_rng(seed).integers(0, n, (bootstrap, n)), n)
    else:
        weights = np.ones((1, n))
    grid = np.asarray(grid, dtype=np.float64)
    curves = []
    for start in range(0, len(weights), 256):
        chunk = weights[start : start + 256]
        tp, fp = chunk @ pos, chunk @ neg
        for tp_row, fp_row in zip(tp, fp, strict=True):
            if tp_row[-1] <= 0 or fp_row[-1] <= 0:
                continue
            fpr, tpr = fp_row / fp_row[-1], tp_row / tp_row[-1]
            last = np.r_[fpr[1:] != fpr[:-1], True]  # the top of each vertical run
            curves.append(np.interp(grid, fpr[last], tpr[last]))
    result: dict[str, Any] = {
        "fpr": grid.tolist(),
        "bootstrap": bootstrap,
        "seed": seed,
        "level": level,
        "resamples": len(curves),
        "undefined_resamples": len(weights) - len(curves),
        "thresholds": int(thresholds.size),
    }
    if not curves:
        return {**result, "tpr_mean": None, "tpr_low": None, "tpr_high": None, "auc_mean": None,
                "note": "ROC undefined: no resample holds both positive and negative pixels"}  # fmt: skip
    stack = np.stack(curves)
    mean = stack.mean(axis=0)
    band = (None, None)
    if bootstrap > 0:
        low, high = np.percentile(stack, [50 * (1 - level), 50 * (1 + level)], axis=0)
        band = (low.tolist(), high.tolist())
    return {
        **result,
        "tpr_mean": mean.tolist(),
        "tpr_low": band[0],
        "tpr_high": band[1],
        "auc_mean": float(np.trapezoid(mean, grid)),
    }


def evaluate_localization(
    maps_dir: str | Path,
    masks_dir: str | Path,
    *,
    threshold: float = 0.5,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The full report for a folder of maps and a folder of masks paired by stem (see the module docstring);
    strict-JSON ready (None for undefined values). Raises ValueError with a message naming the file."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must lie in [0, 1], not {threshold}")
    if bootstrap < 0:
        raise ValueError(f"--bootstrap must be 0 or more, not {bootstrap}")
    pairs = match_files(maps_dir, masks_dir)
    maps = [load_map(p.map) for p in pairs]
    masks = [load_mask(p.mask) for p in pairs]
    _check(maps, masks, [p.map.name for p in pairs])
    files = [{"stem": p.stem, "map": str(p.map), "mask": str(p.mask)} for p in pairs]
    return {**score_maps(maps, masks, threshold=threshold, bootstrap=bootstrap, seed=seed), "files": files}


def score_maps(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    threshold: float = 0.5,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The report of :func:`evaluate_localization` for maps and int8 masks (1 / 0 / -1) already in memory."""
    _check(maps, masks)
    return {
        "n_images": len(maps),
        "n_labeled_pixels": int(sum(int((np.asarray(k) >= 0).sum()) for k in masks)),
        "pixel_auc": pixel_auc(maps, masks, bootstrap=bootstrap, seed=seed),
        "dice": dice_sweep(maps, masks),
        "at_threshold": segmentation_scores(maps, masks, threshold),
        "localization": localization_scores(maps, masks, threshold),
    }
