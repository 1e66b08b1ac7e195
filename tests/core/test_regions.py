"""Slide score and Liu et al.'s non-maximum suppression (seed 001, section 3.1), checked against the literal loop."""

from __future__ import annotations

import time

import numpy as np
import pytest

from core.heatmaps.regions import Region, nms_regions, slide_score


def literal_nms(probability_map: np.ndarray, threshold: float, radius: int) -> list[Region]:
    """The procedure as described: arg-max, record, zero the square around it, until nothing reaches the threshold."""
    remaining = probability_map.astype(np.float64).copy()
    regions = []
    while remaining.size:
        y, x = np.unravel_index(int(np.argmax(remaining)), remaining.shape)
        if remaining[y, x] < threshold:
            break
        regions.append(Region(int(y), int(x), float(remaining[y, x])))
        remaining[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = 0.0
    return regions


def test_slide_score_is_the_maximum_patch_probability():
    assert slide_score(np.array([[0.1, 0.7], [0.93, 0.2]])) == pytest.approx(0.93)
    assert isinstance(slide_score(np.zeros((3, 3), dtype=np.float32)), float)


def test_known_peaks_are_found_highest_first():
    probability = np.zeros((20, 30))
    peaks = {(3, 4): 0.9, (15, 25): 0.95, (10, 12): 0.6}
    for (y, x), value in peaks.items():
        probability[y, x] = value
        probability[y, x + 1] = value - 0.05  # a shoulder inside the suppressed square
    regions = nms_regions(probability, threshold=0.5, radius=2)
    assert [(r.y, r.x) for r in regions] == [(15, 25), (3, 4), (10, 12)]
    assert [r.probability for r in regions] == pytest.approx([0.95, 0.9, 0.6])
    assert all(isinstance(r.y, int) and isinstance(r.x, int) for r in regions)


def test_suppression_square_has_the_given_radius():
    probability = np.zeros((1, 12))
    probability[0, 0] = 0.9
    probability[0, 3] = 0.8  # 3 cells away
    assert [r.x for r in nms_regions(probability, radius=2)] == [0, 3]
    assert [r.x for r in nms_regions(probability, radius=3)] == [0]
    # The square is Chebyshev: a diagonal neighbour at (2, 2) is inside radius 2, at (3, 3) outside.
    diagonal = np.zeros((8, 8))
    diagonal[0, 0], diagonal[2, 2], diagonal[5, 5] = 0.9, 0.8, 0.7
    assert [(r.y, r.x) for r in nms_regions(diagonal, radius=2)] == [(0, 0), (5, 5)]


def test_a_value_beside_a_suppressed_larger_one_is_still_found():
    # 0.8 is suppressed by 0.9; 0.7, although not a local maximum, is then 2 cells from the only recorded region.
    probability = np.array([[0.9, 0.8, 0.7]])
    assert [r.x for r in nms_regions(probability, radius=1)] == [0, 2]


def test_threshold_is_respected_and_inclusive():
    probability = np.array([[0.49, 0.0, 0.0, 0.5, 0.0, 0.0, 0.51]])
    assert [r.x for r in nms_regions(probability, threshold=0.5, radius=1)] == [6, 3]
    assert [r.x for r in nms_regions(probability, threshold=0.505, radius=1)] == [6]
    assert nms_regions(probability, threshold=0.6) == []


def test_empty_and_all_low_maps_give_no_regions():
    assert nms_regions(np.zeros((0, 0))) == []
    assert nms_regions(np.zeros((5, 7))) == []
    with pytest.raises(ValueError, match="empty"):
        slide_score(np.zeros((0, 4)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused(bad):
    probability = np.full((4, 4), 0.2)
    probability[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        nms_regions(probability)
    with pytest.raises(ValueError, match="NaN or infinite"):
        slide_score(probability)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        nms_regions(np.zeros(5))
    with pytest.raises(ValueError, match="threshold"):
        nms_regions(np.zeros((3, 3)), threshold=0.0)
    with pytest.raises(ValueError, match="radius"):
        nms_regions(np.zeros((3, 3)), radius=-1)


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_literal_loop_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(5, 60, size=2))
    probability = rng.random(shape)
    if seed % 2:  # coarse values: many ties, broken in row-major order like argmax
        probability = np.round(probability * 8) / 8
    threshold, radius = float(rng.uniform(0.2, 0.8)), int(rng.integers(0, 5))
    expected = literal_nms(probability, threshold, radius)
    assert expected  # the comparison is not vacuous
    assert nms_regions(probability, threshold=threshold, radius=radius) == expected


def test_large_map_is_fast():
    probability = np.random.default_rng(0).random((1000, 1000))
    began = time.perf_counter()
    regions = nms_regions(probability, threshold=0.5, radius=2)
    elapsed = time.perf_counter() - began
    assert len(regions) > 10_000
    assert elapsed < 2.0, f"{elapsed:.2f} s for a 1000 x 1000 map (about 0.2 s expected, 6 s for the literal loop)"
