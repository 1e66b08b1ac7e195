"""Seed 002's Fig. 11: the pooled pixel ROC of bootstrap resamples of the images, its mean and 95 % band, checked
against sklearn's ROC of the same pixels (concatenated as a resample draws them) on seeded toy maps."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from core.metrics.localization import FPR_GRID, bootstrap_pixel_roc, dice_sweep, pixel_auc


def _toy(seed: int = 0, count: int = 4, side: int = 12) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Maps that rank positives higher on average, with ties (values on a 1/20 grid) and unlabeled pixels."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(count):
        mask = (rng.random((side, side)) < 0.3).astype(np.int8)
        mask[rng.random((side, side)) < 0.1] = -1
        maps.append(np.clip(np.round((0.35 * mask + rng.random((side, side)) * 0.65) * 20) / 20, 0, 1))
        masks.append(mask)
    return maps, masks


def _sklearn_curve(maps: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """sklearn's ROC of the pooled labeled pixels, read at FPR_GRID (top of each vertical run)."""
    values = np.concatenate([m[k >= 0] for m, k in zip(maps, masks, strict=True)])
    truth = np.concatenate([k[k >= 0] == 1 for k in masks])
    fpr, tpr, _ = roc_curve(truth, values, drop_intermediate=False)
    tops = {f: t for f, t in zip(fpr, tpr, strict=True)}  # the last (highest) TPR at each FPR
    xs = np.array(sorted(tops))
    return np.interp(FPR_GRID, xs, [tops[x] for x in xs])


def test_without_resampling_the_curve_is_the_pooled_roc():
    maps, masks = _toy()
    curve = bootstrap_pixel_roc(maps, masks, bootstrap=0)
    np.testing.assert_allclose(curve["tpr_mean"], _sklearn_curve(maps, masks), atol=1e-12)
    assert curve["tpr_low"] is None and curve["tpr_high"] is None and curve["resamples"] == 1
    assert curve["auc_mean"] == pytest.approx(pixel_auc(maps, masks, bootstrap=0)["estimate"], abs=2e-3)


def test_one_resample_is_the_roc_of_the_images_it_drew_and_the_band_holds_the_mean():
    maps, masks = _toy(seed=1, count=5)
    drawn = np.random.default_rng(7).integers(0, 5, (1, 5))[0]  # the draw pixel_auc's resamples make
    single = bootstrap_pixel_roc(maps, masks, bootstrap=1, seed=7)
    expected = _sklearn_curve([maps[i] for i in drawn], [masks[i] for i in drawn])
    np.testing.assert_allclose(single["tpr_mean"], expected, atol=1e-12)

    many = bootstrap_pixel_roc(maps, masks, bootstrap=300, seed=2)
    mean, low, high = (np.array(many[k]) for k in ("tpr_mean", "tpr_low", "tpr_high"))
    assert many["resamples"] == 300 and many["undefined_resamples"] == 0
    assert np.all(low <= high)
    # where the resamples spread, the mean lies in the band (where 97.5 % of them agree, a few outliers can pull
    # the mean just outside a band of one value)
    spread = high - low > 1e-9
    assert spread.sum() > 50 and np.all((low <= mean)[spread] & (mean <= high)[spread])
    assert np.all(np.diff(mean) >= -1e-12) and mean[-1] == pytest.approx(1.0)
    assert (high - low).max() > 0.01  # five different images: the resamples do differ
    assert many["tpr_mean"] == bootstrap_pixel_roc(maps, masks, bootstrap=300, seed=2)["tpr_mean"]


def test_resamples_without_both_classes_are_left_out_and_counted():
    positive, negative = np.ones((4, 4), np.int8), np.zeros((4, 4), np.int8)
    maps = [np.full((4, 4), 0.8), np.full((4, 4), 0.2)]
    curve = bootstrap_pixel_roc(maps, [positive, negative], bootstrap=200, seed=3)
    draws = np.random.default_rng(3).integers(0, 2, (200, 2))
    one_class = int((draws[:, 0] == draws[:, 1]).sum())
    assert curve["undefined_resamples"] == one_class and curve["resamples"] == 200 - one_class
    assert curve["tpr_mean"] == pytest.approx(np.ones(FPR_GRID.size))  # perfectly separated: TPR 1 from FPR 0
    undefined = bootstrap_pixel_roc([maps[0]], [positive], bootstrap=5)
    assert undefined["tpr_mean"] is None and "undefined" in undefined["note"]


def test_many_distinct_values_are_read_at_quantile_thresholds_close_to_the_exact_curve():
    rng = np.random.default_rng(4)
    masks = [(rng.random((40, 40)) < 0.4).astype(np.int8) for _ in range(3)]
    maps = [np.clip(0.3 * k + 0.7 * rng.random(k.shape), 0, 1) for k in masks]
    coarse = bootstrap_pixel_roc(maps, masks, bootstrap=0, max_thresholds=200)
    assert coarse["thresholds"] <= 200
    assert np.abs(np.array(coarse["tpr_mean"]) - _sklearn_curve(maps, masks)).max() < 0.02


def test_best_dice_is_the_brute_force_best_over_the_papers_thresholds():
    maps, masks = _toy(seed=5)
    brute = []
    for threshold in np.arange(51) / 50:
        tp = sum(int(((m >= threshold) & (k == 1)).sum()) for m, k in zip(maps, masks, strict=True))
        called = sum(int(((m >= threshold) & (k >= 0)).sum()) for m, k in zip(maps, masks, strict=True))
        truth = sum(int((k == 1).sum()) for k in masks)
        brute.append(2 * tp / (called + truth))
    swept = dice_sweep(maps, masks)
    assert swept["dice"] == pytest.approx(max(brute))
    assert swept["best_threshold"] == pytest.approx(np.argmax(brute) / 50)
