"""Large synthetic slides with tumour lesions, for the slide-level evaluation of seed 001's Table 2 (Camelyon16).

Why: Camelyon16's whole-slide images cannot be downloaded here, and seed 001 evaluates CELNet on them as Liu et al.
(2017) do: the patch classifier slid over each slide gives a tumour probability map; the slide's score is its
maximum and tumour regions are read from it by non-maximum suppression (:mod:`core.heatmaps.regions`), scored by
slide AUC and FROC (:mod:`core.metrics.froc`).

What a slide is: a square of ``size`` px tiled by ``tile`` px synthetic CLE frames (:mod:`core.data.synth_cle`),
the same tissue the patch classifier is trained on, so a window of one tile at a tile boundary sees the same kind of
texture it was trained on (the seams between independently drawn tiles are a cue in neither class: every slide has
them). A normal slide has only nondiagnostic frames. A tumour slide has 1-3 lesions (``lesions``), each a
4-connected cluster of 1-4 diagnostic frames (``lesion_tiles``), lesions at least one tile apart; each diagnostic
frame carries its 1-3 hypercellular regions (8-25 % of the frame), so a lesion is a group of tumour foci, as a
metastasis in a lymph node section is. Ground truth:

- ``mask``: the frames' intermediate masks side by side (255 tumour, 128 an unlabeled band along region edges,
  0 normal tissue), for pixel-level scores;
- ``regions``: the FROC evaluation mask, one integer label per lesion (0 elsewhere): the lesion's tumour pixels
  dilated by ``tolerance`` px (default a quarter tile, about five nuclei), as the Camelyon16 evaluation masks dilate
  the annotated regions by 75 µm ("the size of 5 tumour cells") so that a detection at the edge of a region counts.

Seeds: ``make_slide(seed, ...)`` is deterministic; ``make_slides`` spawns one independent seed per slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from core.data.synth_cle import POSITIVE, make_cle_frame

__all__ = ["SyntheticSlide", "make_slide", "make_slides"]


@dataclass(frozen=True)
class SyntheticSlide:
    """One synthetic slide: ``image`` (size, size) uint8, ``mask`` (size, size) uint8 (255 / 128 / 0),
    ``regions`` (size, size) int32 lesion labels (0 outside), ``label`` 1 for a tumour slide, ``lesions`` their count
    and ``tile`` the frame side it was assembled from."""

    image: np.ndarray
    mask: np.ndarray
    regions: np.ndarray
    label: int
    lesions: int
    tile: int


def _grow_lesion(rng: np.random.Generator, free: np.ndarray, tiles: int) -> list[tuple[int, int]]:
    """A 4-connected cluster of up to ``tiles`` free grid cells from a random free start (empty when none is free)."""
    starts = np.argwhere(free)
    if len(starts) == 0:
        return []
    cluster = [tuple(int(v) for v in starts[rng.integers(len(starts))])]
    while len(cluster) < tiles:
        border = {
            (r + dr, c + dc)
            for r, c in cluster
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
            if 0 <= r + dr < free.shape[0] and 0 <= c + dc < free.shape[1] and free[r + dr, c + dc]
        } - set(cluster)
        if not border:
            break
        options = sorted(border)
        cluster.append(options[int(rng.integers(len(options)))])
    return cluster


def make_slide(
    seed: int,
    size: int = 2048,
    tile: int = 64,
    *,
    tumor: bool,
    lesions: tuple[int, int] = (1, 3),
    lesion_tiles: tuple[int, int] = (1, 4),
    tolerance: int | None = None,
) -> SyntheticSlide:
    """One slide (module docstring); the same arguments give the same slide. ``size`` must be a multiple of
    ``tile`` (at least 32 px, the smallest CLE frame) with room for two tiles per side."""
    if tile < 32 or size % tile or size // tile < 2:
        raise ValueError(f"size must be a multiple of tile (>= 32 px) with at least 2 tiles a side, not {size}, {tile}")
    if not 1 <= lesions[0] <= lesions[1] or not 1 <= lesion_tiles[0] <= lesion_tiles[1]:
        raise ValueError(f"lesion counts must be ranges of positive integers, not {lesions} and {lesion_tiles}")
    tolerance = tile // 4 if tolerance is None else tolerance
    rng = np.random.default_rng(seed)
    cells = size // tile
    lesion_of = np.zeros((cells, cells), dtype=np.int32)
    if tumor:
        free = np.ones((cells, cells), dtype=bool)
        for number in range(1, int(rng.integers(lesions[0], lesions[1] + 1)) + 1):
            cluster = _grow_lesion(rng, free, int(rng.integers(lesion_tiles[0], lesion_tiles[1] + 1)))
            if not cluster:
                break
            for r, c in cluster:
                lesion_of[r, c] = number
            taken = lesion_of == number
            free &= ~ndimage.binary_dilation(taken, structure=np.ones((3, 3), dtype=bool))
    frame_seeds = rng.integers(0, 2**31 - 1, size=(cells, cells))
    image = np.empty((size, size), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    for r in range(cells):
        for c in range(cells):
            frame = make_cle_frame(int(frame_seeds[r, c]), tile, diagnostic=bool(lesion_of[r, c]))
            window = np.s_[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
            image[window] = frame.image
            mask[window] = frame.intermediate
    count = int(lesion_of.max())
    regions = np.zeros((size, size), dtype=np.int32)
    tumour = mask == POSITIVE
    for number in range(1, count + 1):
        own = tumour & np.kron(lesion_of == number, np.ones((tile, tile), dtype=bool))
        if tolerance > 0:
            own = ndimage.binary_dilation(own, iterations=tolerance)
        regions[own & (regions == 0)] = number
    return SyntheticSlide(image, mask, regions, int(count > 0), count, tile)


def make_slides(
    n: int, size: int = 2048, tile: int = 64, *, seed: int = 0, tumor_fraction: float = 0.5
) -> list[SyntheticSlide]:
    """``n`` slides, the first ``round(n * tumor_fraction)`` with tumour, each from its own spawned seed."""
    if n < 0 or not 0.0 <= tumor_fraction <= 1.0:
        raise ValueError(f"need n >= 0 and tumor_fraction in [0, 1], not {n} and {tumor_fraction}")
    tumours = round(n * tumor_fraction)
    children = np.random.SeedSequence(seed).spawn(n)
    return [
        make_slide(int(child.generate_state(1, np.uint32)[0]), size, tile, tumor=index < tumours)
        for index, child in enumerate(children)
    ]
