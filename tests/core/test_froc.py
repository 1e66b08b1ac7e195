"""Camelyon16's slide-level scores (seed 001, Table 2): detections matched to tumour regions, the FROC curve and
score, and the slide AUC, on constructed detections whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from core.metrics.froc import FP_RATES, froc, match_detections, slide_auc


def two_regions() -> np.ndarray:
    """A 10 x 10 slide with region 1 in the top-left corner and region 2 in the bottom-right."""
    regions = np.zeros((10, 10), dtype=np.int32)
    regions[0:3, 0:3] = 1
    regions[7:10, 7:10] = 2
    return regions


def test_a_detection_counts_for_the_region_it_falls_in_once_at_its_highest_probability():
    detections = [(1, 1, 0.9), (2, 0, 0.6), (5, 5, 0.8), (8, 8, 0.3)]  # two on region 1, one outside, one on 2
    match = match_detections(detections, two_regions())
    assert match.region_probabilities.tolist() == [0.9, 0.3]
    assert match.false_positives.tolist() == [0.8]  # the second hit on region 1 is neither TP nor FP
    missed = match_detections([(5, 5, 0.4)], two_regions())
    assert np.isneginf(missed.region_probabilities).all() and missed.false_positives.tolist() == [0.4]
    with pytest.raises(ValueError, match="outside"):
        match_detections([(10, 0, 0.5)], two_regions())


def test_froc_on_a_tumour_and_a_normal_slide():
    """Region probabilities 0.9 and 0.3; false positives 0.8 (tumour slide), 0.7 and 0.2 (normal slide). Thresholds
    0.9, 0.8, 0.7, 0.3, 0.2 give (FP/slide, sensitivity) = (0, .5), (.5, .5), (1, .5), (1, 1), (1.5, 1)."""
    tumour = match_detections([(1, 1, 0.9), (2, 0, 0.6), (5, 5, 0.8), (8, 8, 0.3)], two_regions())
    normal = match_detections([(4, 4, 0.7), (0, 9, 0.2)], np.zeros((10, 10), dtype=np.int32))
    result = froc([tumour, normal])
    assert result.n_slides == 2 and result.n_regions == 2
    assert result.fps_per_slide.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0, 1.5]
    assert result.sensitivity.tolist() == [0.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    assert result.rates == FP_RATES == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert result.sensitivities == pytest.approx((0.5, 0.5, 1.0, 1.0, 1.0, 1.0))
    assert result.score == pytest.approx(5 / 6)


def test_froc_interpolates_between_operating_points_and_holds_the_last_beyond_them():
    """One slide: FP 0.9, region 1 hit at 0.8, FP 0.7, region 2 missed: curve (0, 0), (1, 0), (1, .5), (2, .5)."""
    match = match_detections([(5, 5, 0.9), (1, 1, 0.8), (5, 6, 0.7)], two_regions())
    result = froc([match])
    assert result.sensitivities == pytest.approx((0.125, 0.25, 0.5, 0.5, 0.5, 0.5))
    assert result.score == pytest.approx((0.125 + 0.25 + 0.5 * 4) / 6)


def test_froc_is_zero_without_detections_and_needs_a_region():
    silent = match_detections(np.zeros((0, 3)), two_regions())
    assert froc([silent]).score == 0.0
    with pytest.raises(ValueError, match="tumour region"):
        froc([match_detections([(1, 1, 0.5)], np.zeros((4, 4), dtype=np.int32))])


def test_slide_auc_counts_ties_one_half_and_is_undefined_with_one_class():
    assert slide_auc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert slide_auc([0.2, 0.8], [1, 0]) == 0.0
    assert slide_auc([0.2, 0.8], [1, 1]) is None
