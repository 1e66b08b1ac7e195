"""One pass over a mosaic's windows stitched with several Gaussian sigmas (seed 002, Table 2): the same maps as one
``stitch_mosaic`` call per sigma, for the network cost of one. tiny_cnn, 64-80 px mosaics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.data.synth_rcm import make_rcm_mosaic
from core.heatmaps.mosaic import stitch_mosaic
from core.heatmaps.mosaic_sigmas import stitch_sigmas
from core.models import create_model

SIGMAS = (None, 2.5, 10.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_cnn", in_chans=1).eval()


@pytest.mark.parametrize("method", ["cam", "scorecam"])
def test_every_sigma_equals_its_own_exact_stitch_from_one_pass(model, method):
    image, _ = make_rcm_mosaic(56, 64, seed=3)
    seen: list[int] = []
    handle = model.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    try:
        shared = stitch_sigmas(model, image, window=24, step=8, sigmas=SIGMAS, method=method, batch_size=8)
        once, seen[:] = sum(seen), []
        references = {}
        for sigma in SIGMAS:
            references[sigma] = stitch_mosaic(
                model, image, window=24, step=8, sigma=sigma, mode="exact", method=method, batch_size=8
            )
            if sigma is None:
                assert once == sum(seen)  # three sigmas cost the network what one stitch costs
    finally:
        handle.remove()
    assert list(shared) == list(SIGMAS)
    for sigma, result in shared.items():
        np.testing.assert_allclose(result.map, references[sigma].map, rtol=0, atol=2e-6)
        np.testing.assert_array_equal(result.window_probabilities, references[sigma].window_probabilities)
        assert (result.sigma, result.step, result.window, result.mode) == (sigma, 8, 24, "exact")
    assert shared[None].window_probabilities.shape == (5, 6)
    # the sigmas do differ: the weighting is applied, not one map copied
    assert np.abs(shared[None].map - shared[10.0].map).max() > 1e-3


def test_float_mosaics_are_scaled_over_the_whole_mosaic_not_per_strip(model):
    image, _ = make_rcm_mosaic(64, 64, seed=4)
    stored = image.astype(np.float32) * 40.0 - 7.0  # floats outside [0, 1]: min-max stretched over the mosaic
    shared = stitch_sigmas(model, stored, window=32, step=8, sigmas=[None, 5.0])
    for sigma, result in shared.items():
        reference = stitch_mosaic(model, stored, window=32, step=8, sigma=sigma, mode="exact")
        np.testing.assert_allclose(result.map, reference.map, rtol=0, atol=2e-6)


def test_progress_counts_windows_and_nothing_to_stitch_is_refused(model):
    image, _ = make_rcm_mosaic(64, 64, seed=5)
    calls: list[tuple[int, int]] = []
    stitch_sigmas(model, image, window=16, step=4, sigmas=[None], progress=lambda *counts: calls.append(counts))
    assert calls[-1] == (169, 169) and calls[0] == (64, 169)  # 13 x 13 windows, 64 per strip
    with pytest.raises(ValueError, match="at least one sigma"):
        stitch_sigmas(model, image, window=16, step=4, sigmas=[])
