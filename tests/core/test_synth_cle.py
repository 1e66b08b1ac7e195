"""Synthetic CLE frames (MLCAM-LICI, seed paper 000): determinism, array and mask contracts, and a cue that is texture.

The diagnostic regions must not be findable by brightness alone (a local-mean detector stays near chance) while a
local-variance detector finds them well: that is what forces a weakly supervised model to learn the morphology.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.stats import rankdata

from core.data.synth_cle import NEGATIVE, POSITIVE, UNLABELED, CLEFrame, make_cle_frame, make_cle_frames


@pytest.fixture(scope="module")
def frames() -> list[CLEFrame]:
    return make_cle_frames(60, 128, seed=1)


@pytest.fixture(scope="module")
def small() -> list[CLEFrame]:
    return make_cle_frames(40, 64, seed=2)


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores ``positive`` against ``negative`` (Mann-Whitney, ties averaged)."""
    ranks = rankdata(np.concatenate([positive, negative]))
    return float(
        (ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2) / (positive.size * negative.size)
    )


def test_same_seed_gives_the_same_frame() -> None:
    for diagnostic in (True, False):
        a, b = make_cle_frame(5, 64, diagnostic=diagnostic), make_cle_frame(5, 64, diagnostic=diagnostic)
        for name in ("image", "intermediate", "restrictive"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert (a.label, a.artefacts) == (b.label, b.artefacts)
    assert not np.array_equal(
        make_cle_frame(5, 64, diagnostic=True).image, make_cle_frame(6, 64, diagnostic=True).image
    )


@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_dtypes_and_mask_values(size: int) -> None:
    for diagnostic in (True, False):
        frame = make_cle_frame(3, size, diagnostic=diagnostic)
        for array in (frame.image, frame.intermediate, frame.restrictive):
            assert array.shape == (size, size)
            assert array.dtype == np.uint8
        assert set(np.unique(frame.intermediate)) <= {NEGATIVE, UNLABELED, POSITIVE}
        assert set(np.unique(frame.restrictive)) <= {NEGATIVE, POSITIVE}
        assert frame.label == int(diagnostic)
        assert set(frame.artefacts) <= {"rbc", "motion"}
        assert 20 < frame.image.mean() < 200 and frame.image.std() > 10


def test_too_small_a_frame_is_refused() -> None:
    with pytest.raises(ValueError, match="32"):
        make_cle_frame(0, 16, diagnostic=True)


def test_labels_follow_the_masks(small: list[CLEFrame]) -> None:
    assert {f.label for f in small} == {0, 1}
    for frame in small:
        assert frame.label == int(np.any(frame.intermediate == POSITIVE))
        if frame.label:
            assert np.any(frame.restrictive == POSITIVE)
            assert np.all(frame.intermediate[frame.restrictive == POSITIVE] != NEGATIVE)
        else:
            assert not frame.intermediate.any() and not frame.restrictive.any()


def test_unlabeled_band_is_thin_and_on_region_edges(frames: list[CLEFrame]) -> None:
    for frame in (f for f in frames if f.label):
        band = frame.intermediate == UNLABELED
        assert band.any()
        # The band is 1 px either side of the edge at 128 px: every band pixel lies within 3 px of a positive pixel
        # and of a negative one (or of the frame's border, where a region may leave only a sliver of background), and
        # it holds at most about two pixels per boundary pixel of the positive part.
        near_positive = ndi.binary_dilation(frame.intermediate == POSITIVE, iterations=3)
        near_negative = ndi.binary_dilation(frame.intermediate == NEGATIVE, iterations=3, border_value=1)
        assert np.all(near_positive[band] & near_negative[band])
        edge = (frame.intermediate == POSITIVE) & ~ndi.binary_erosion(frame.intermediate == POSITIVE)
        assert band.sum() <= 3 * edge.sum()


def test_regions_cover_8_to_25_percent(frames: list[CLEFrame]) -> None:
    positive = [f for f in frames if f.label]
    assert len(positive) == 30
    for frame in positive:
        drawn = (frame.intermediate != NEGATIVE).mean()
        assert 0.08 <= drawn <= 0.30
        assert 0.04 <= (frame.intermediate == POSITIVE).mean() <= 0.25
        labels, count = ndi.label(frame.intermediate == POSITIVE)
        assert 1 <= count <= 6


def _nucleus_radius(frames: list[CLEFrame]) -> float:
    """Median equivalent radius (px) of the connected nuclei of the restrictive masks."""
    areas = []
    for frame in frames:
        labels, count = ndi.label(frame.restrictive == POSITIVE)
        areas.append(np.bincount(labels.ravel())[1:])
    return float(np.sqrt(np.median(np.concatenate(areas)) / np.pi))


def test_restrictive_nuclei_are_large_and_scale_with_size(frames: list[CLEFrame]) -> None:
    at_128 = _nucleus_radius([f for f in frames if f.label])
    at_256 = _nucleus_radius([make_cle_frame(s, 256, diagnostic=True) for s in range(4)])
    assert 4.0 <= at_128 <= 6.5
    assert 1.6 <= at_256 / at_128 <= 2.4
    for frame in (f for f in frames if f.label):
        share = (frame.restrictive == POSITIVE).sum() / (frame.intermediate == POSITIVE).sum()
        assert 0.2 <= share <= 0.8


def test_brightness_is_not_the_cue_but_texture_is(frames: list[CLEFrame]) -> None:
    """Region pixels against the tissue around them (an 8 px ring): the 9 px local mean must not tell them apart
    (AUC 0.4-0.6), the local variance must (AUC > 0.8).

    Per frame, the region's and the ring's mean grey levels differ by about 0.25 of the frame's standard deviation
    (sd over frames): vignetting, the gain field and nearby red blood cells shift them by a few grey levels even with
    perfect matching. So the average difference must stay within 0.15 and nine frames in ten within 0.5 standard
    deviations; unmatched, the packed dark nuclei would make the regions about one standard deviation darker.
    """
    means: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    variances: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    differences = []
    for frame in (f for f in frames if f.label):
        image = frame.image.astype(np.float64)
        region = frame.intermediate == POSITIVE
        ring = ndi.binary_dilation(frame.intermediate != NEGATIVE, iterations=8) & (frame.intermediate == NEGATIVE)
        mean = ndi.uniform_filter(image, 9)
        variance = ndi.uniform_filter(image**2, 9) - mean**2
        for store, values in ((means, mean), (variances, variance)):
            store[0].append(values[region])
            store[1].append(values[ring])
        differences.append((image[region].mean() - image[ring].mean()) / image.std())
    mean_auc = _auc(np.concatenate(means[0]), np.concatenate(means[1]))
    variance_auc = _auc(np.concatenate(variances[0]), np.concatenate(variances[1]))
    assert 0.4 <= mean_auc <= 0.6
    assert abs(np.mean(differences)) < 0.15
    assert np.percentile(np.abs(differences), 90) < 0.5
    assert variance_auc > 0.8


def test_artefacts_are_equally_likely_in_both_classes(frames: list[CLEFrame]) -> None:
    for label in (0, 1):
        drawn = [f.artefacts for f in frames if f.label == label]
        rbc = np.mean(["rbc" in a for a in drawn])
        motion = np.mean(["motion" in a for a in drawn])
        assert 0.15 <= rbc <= 0.65, (label, rbc)
        assert 0.1 <= motion <= 0.55, (label, motion)
    # Artefacts are drawn before anything class-dependent, so one seed has the same ones in both classes.
    same = [
        make_cle_frame(s, 64, diagnostic=True).artefacts == make_cle_frame(s, 64, diagnostic=False).artefacts
        for s in range(20)
    ]
    assert np.mean(same) >= 0.9


@pytest.mark.parametrize(("n", "fraction", "positives"), [(10, 0.5, 5), (7, 0.3, 2), (5, 0.0, 0), (4, 1.0, 4)])
def test_make_cle_frames_has_exact_positive_counts(n: int, fraction: float, positives: int) -> None:
    frames = make_cle_frames(n, 32, seed=4, positive_fraction=fraction)
    assert len(frames) == n
    assert sum(f.label for f in frames) == positives


def test_make_cle_frames_shuffles_and_draws_independent_frames() -> None:
    frames = make_cle_frames(20, 32, seed=9)
    labels = [f.label for f in frames]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)
    images = {f.image.tobytes() for f in frames}
    assert len(images) == 20
    again = make_cle_frames(20, 32, seed=9)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(frames, again, strict=True))
    other = make_cle_frames(20, 32, seed=10)
    assert not np.array_equal(frames[0].image, other[0].image)
    with pytest.raises(ValueError):
        make_cle_frames(4, 32, positive_fraction=1.5)
