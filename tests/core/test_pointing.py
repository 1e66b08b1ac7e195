"""The pointing game and its no-model baselines on constructed maps, masks and images whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from core.metrics.pointing import (
    INTENSITY_STATISTICS,
    brightest_point,
    hit_rate,
    intensity_aucs,
    intensity_statistics,
    peak,
    point_in_mask,
    tissue_mask,
)


def _disk(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_peak_is_the_maximum_and_respects_a_region() -> None:
    heatmap = np.zeros((20, 30))
    heatmap[3, 4] = 1.0
    heatmap[15, 25] = 0.5
    assert peak(heatmap) == (3, 4)
    region = np.zeros((20, 30), dtype=bool)
    region[10:, 20:] = True
    assert peak(heatmap, region) == (15, 25)
    assert peak(heatmap, np.zeros((20, 30), dtype=bool)) == (3, 4)  # an empty region searches everywhere
    with pytest.raises(ValueError):
        peak(heatmap, region[:5])


def test_point_in_mask_with_and_without_tolerance() -> None:
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:10, 5:10] = 255
    assert point_in_mask((7, 7), mask)
    assert not point_in_mask((7, 12), mask)  # 3 px right of the mask's last column
    assert point_in_mask((7, 12), mask, tolerance=3)
    assert not point_in_mask((7, 12), mask, tolerance=2.5)
    assert not point_in_mask((0, 0), np.zeros((20, 20)), tolerance=5)  # nothing to hit
    with pytest.raises(ValueError):
        point_in_mask((25, 0), mask)


def test_hit_rate_and_its_bootstrap_interval() -> None:
    perfect = hit_rate([True] * 10)
    assert (perfect.hits, perfect.n, perfect.rate, perfect.ci) == (10, 10, 1.0, (1.0, 1.0))
    half = hit_rate([True, False] * 20, resamples=500, seed=1)
    assert half.rate == 0.5 and half.ci[0] < 0.5 < half.ci[1]
    assert half.ci[0] > 0.25 and half.ci[1] < 0.75
    assert hit_rate([True, False] * 20, resamples=500, seed=1) == half  # seeded
    assert hit_rate([]).rate is None and hit_rate([]).n == 0
    assert hit_rate([True, False], resamples=0).ci is None
    assert half.to_dict()["ci"] == list(half.ci)


def test_tissue_mask_finds_a_bright_specimen_on_a_dark_drape() -> None:
    rng = np.random.default_rng(0)
    truth = _disk((64, 80), (30, 45), 15)
    image = 1000 + 50 * rng.standard_normal((64, 80)) + 3000 * truth
    found = tissue_mask(image.astype(np.uint16))
    assert (found & truth).sum() / truth.sum() > 0.95  # all of it, and a smoothed rim more at most
    assert (found & truth).sum() / (found | truth).sum() > 0.8
    assert tissue_mask(np.full((10, 10), 7.0)).all()  # nothing to separate: everything


def test_the_brightest_smoothed_pixel_ignores_hot_pixels_and_stays_in_the_tissue() -> None:
    tissue = _disk((64, 80), (32, 40), 25)
    image = np.where(tissue, 2000.0, 500.0)
    image += 2500.0 * _disk((64, 80), (25, 50), 6)  # a tumor-like bright patch in the tissue
    image[40, 30] = 30000.0  # one white noise pixel, brightest of all before smoothing
    image[2:8, 2:8] = 9000.0  # a bright spot off the specimen
    point = brightest_point(image, tissue)
    assert _disk((64, 80), (25, 50), 6)[point]
    assert brightest_point(image, tissue, sigma=0) == (40, 30)  # unsmoothed, the hot pixel wins


def test_intensity_statistics_of_a_known_image() -> None:
    tissue = np.zeros((10, 10), dtype=bool)
    tissue[2:8, 2:8] = True
    image = np.where(tissue, 300.0, 100.0)
    stats = intensity_statistics(image, tissue, sigma=0.5)
    assert set(stats) == set(INTENSITY_STATISTICS)
    assert stats["mean"] == pytest.approx(200) and stats["p50"] == pytest.approx(200)
    assert stats["p99"] == pytest.approx(200) and stats["max"] == pytest.approx(200, abs=1e-3)
    assert stats["spread"] == pytest.approx(0) and stats["cv"] == pytest.approx(0)
    with pytest.raises(ValueError):
        intensity_statistics(image, np.zeros((10, 10), dtype=bool))


def test_intensity_aucs_take_each_statistic_in_its_better_direction() -> None:
    truth = [0, 0, 0, 1, 1, 1]
    statistics = [
        {"mean": m, "p50": -m, "p90": 1.0, "p99": float(i % 2), "max": m, "spread": 0.0, "cv": 0.0}
        for i, m in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    ]
    aucs = intensity_aucs(truth, statistics)
    assert aucs["mean"] == 1.0 and aucs["p50"] == 1.0  # brighter means tumor, or darker: both count
    assert aucs["p90"] == 0.5  # a constant carries nothing
    assert 0.5 <= aucs["p99"] < 1.0
    with pytest.raises(ValueError):
        intensity_aucs([1, 1], statistics[:2])
    with pytest.raises(ValueError):
        intensity_aucs(truth, statistics[:3])
