"""One sliding-window pass over a mosaic, stitched with several Gaussian weightings at once (seed 002, Table 2).

D'Alonzo et al. (seed paper 002) sweep the Gaussian weighting's sigma (none, 1, 2.5, 5-10) at each step. The
weighting only changes how the same windows' maps are averaged, ``M_s(x) = sum_w g_s,w(x) p_w C_w(x) / sum_w
g_s,w(x)`` (:mod:`core.heatmaps.mosaic`), so every sigma row of a step can come from one pass of the network over
the windows: for Score-CAM on EfficientNet-B2 (1,408 masked passes per window) that is the whole cost of the row.

:func:`core.heatmaps.mosaic.stitch_mosaic` takes one sigma and keeps no window's map, so the windows are run
through it as a *strip*: ``k`` windows cut from the mosaic and laid side by side, stitched with ``step = window``
and no Gaussian, so no two windows overlap and the strip's map is each window's ``p_w C_w`` in place (the exact
modes crop and explain every window on its own, so its neighbours in the strip do not matter). Each window's map is
then added, once per sigma, with that sigma's weights into the sigma's numerator; the denominators are the
separable coverage sums. The result equals ``stitch_mosaic(..., mode="exact", sigma=s)`` for every s (float32
rounding aside), for one network pass instead of one per sigma. Mosaics stored as floats outside [0, 1] are scaled
to [0, 1] over the whole mosaic first, as ``stitch_mosaic`` scales them, so a strip is not stretched on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from core.heatmaps.mosaic import MosaicResult, WindowGrid, gaussian_profile, stitch_mosaic

__all__ = ["stitch_sigmas"]

_STRIP_WINDOWS = 64  # windows per strip: a (window, 64 window) image, cut and explained batch_size at a time


def _unit(image: np.ndarray) -> np.ndarray:
    """The mosaic as ``stitch_mosaic`` reads it: integers kept (scaled by their dtype range), floats in [0, 1] kept,
    other floats min-max stretched over the whole mosaic to float32 [0, 1]."""
    if not np.issubdtype(image.dtype, np.floating):
        return image
    low, high = float(image.min()), float(image.max())
    if low >= 0.0 and high <= 1.0:
        return image
    scale = 1.0 / (high - low) if high > low else 0.0
    return ((image.astype(np.float32) - low) * scale).clip(0.0, 1.0).astype(np.float32)


def stitch_sigmas(
    model: nn.Module,
    image: np.ndarray,
    *,
    window: int,
    step: int,
    sigmas: Sequence[float | None],
    method: str = "cam",
    target_layer: nn.Module | Sequence[nn.Module] | None = None,
    batch_size: int = 32,
    modality: str = "RCM",
    progress: Callable[[int, int], None] | None = None,
) -> dict[float | None, MosaicResult]:
    """The exact-mode stitched map of ``image`` for each of ``sigmas`` (None: no Gaussian), from one pass of
    ``method`` over the windows (module docstring); keyed by sigma. Every result carries the same window
    probabilities and, as ``seconds``, the wall time of the whole shared call. ``progress(done, total)`` counts
    windows."""
    if not sigmas:
        raise ValueError("give at least one sigma (None for no Gaussian)")
    began = time.perf_counter()
    source = _unit(image)
    array = source[None] if source.ndim == 2 else source
    grid = WindowGrid(array.shape[-2], array.shape[-1], window, step)
    profiles = {sigma: gaussian_profile(window, sigma) for sigma in dict.fromkeys(sigmas)}
    weights = {sigma: np.outer(p, p).astype(np.float32) for sigma, p in profiles.items()}
    numerators = {sigma: np.zeros((grid.height, grid.width), dtype=np.float32) for sigma in profiles}
    probabilities = np.zeros(grid.count, dtype=np.float32)
    for start in range(0, grid.count, _STRIP_WINDOWS):
        corners = [grid.corner(i) for i in range(start, min(start + _STRIP_WINDOWS, grid.count))]
        strip = np.concatenate([array[:, t : t + window, s : s + window] for t, s in corners], axis=-1)
        result = stitch_mosaic(
            model,
            strip[0] if source.ndim == 2 else strip,
            window=window,
            step=window,
            sigma=None,
            mode="exact",
            method=method,
            target_layer=target_layer,
            batch_size=batch_size,
            modality=modality,
        )
        probabilities[start : start + len(corners)] = result.window_probabilities.ravel()
        for index, (top, left) in enumerate(corners):
            weighted = result.map[:, index * window : (index + 1) * window]  # p_w C_w
            for sigma, numerator in numerators.items():
                numerator[top : top + window, left : left + window] += weights[sigma] * weighted
        if progress:
            progress(start + len(corners), grid.count)
    seconds = time.perf_counter() - began
    shaped = probabilities.reshape(grid.shape)
    results = {}
    for sigma, numerator in numerators.items():
        rows, cols = np.zeros(grid.height), np.zeros(grid.width)
        for top in grid.tops:
            rows[top : top + window] += profiles[sigma]
        for left in grid.lefts:
            cols[left : left + window] += profiles[sigma]
        denominator = np.outer(rows, cols)
        covered = denominator > 0
        heatmap = np.where(covered, numerator / np.where(covered, denominator, 1.0), 0.0).astype(np.float32)
        results[sigma] = MosaicResult(
            map=heatmap,
            window_probabilities=shaped,
            seconds=seconds,
            device=result.device,
            mode="exact",
            method=method,
            window=window,
            step=step,
            sigma=sigma,
        )
    return results
