"""Synthetic reflectance confocal microscopy (RCM) mosaics with pixel labels, for the mosaic heatmap pipeline.

Why: the RCM mosaics of D'Alonzo et al., "Semantic segmentation of reflectance confocal microscopy mosaics of
pigmented lesions using weak labels" (seed paper 002: grayscale mosaics at the dermal-epidermal junction up to
12,000 x 12,000 px, an EfficientNet-B2 patch classifier on 256 px patches, CAMs stitched over the mosaic) cannot be
downloaded, so tests and benchmarks draw mosaics that behave like them: deterministic by seed, with the pixel ground
truth the paper's clinicians drew.

What it models:

* Benign background: a meshwork of bright lines, the zero-crossing contours of band-pass filtered noise (cells of
  about 15-30 px), modulated by slow contour rings, like the meshwork and ring patterns of RCM, with a few bright
  granules.
* A few "aspecific" regions ("loss of regular architecture"): irregular blobs (Gaussian bumps perturbed by smooth
  noise) where the meshwork gives way, by a smoothly varying 30-95 %, to dense bright granules on a dim ground. The
  mean grey level matches the background, so only texture tells the regions apart; the edge is blended over a few
  pixels so it is not a step. A patch classifier cannot be perfect here: tiny_cnn trained for a second on 64 px
  patches reaches a pixel AUC of 0.95-0.99 on stitched maps.
* Mosaic acquisition: the mosaic is stitched from square fields of view (``field_of_view`` px) each darkening
  towards its corners (vignetting), under a slowly varying gain (+-15 %), plus multiplicative speckle.
* Labels: 255 inside the aspecific regions, 0 elsewhere, 128 (unlabeled) in a band of ``unlabeled_band`` px around
  every region boundary, where an annotator's line is uncertain (the paper leaves ambiguous areas, "mild atypia or
  disruption", unlabeled).

:func:`sample_patches` draws training patches with the image-level label of their centre pixel, as the paper's
patch classifier was trained (a patch is "aspecific" or "benign"); unlabeled centres are skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from core.data.store import png_bytes, write_atomic

__all__ = [
    "NEGATIVE",
    "POSITIVE",
    "UNLABELED",
    "make_rcm_mosaic",
    "mosaic_seeds",
    "sample_patches",
    "write_mosaic_folder",
    "write_rcm_cohort",
]

NEGATIVE = 0
UNLABELED = 128
POSITIVE = 255


def _bspline_matrix(size: int, cell: float) -> np.ndarray:
    """(size, nodes) weights of a cubic B-spline with knots every ``cell`` px, evaluated at pixel centres."""
    nodes = int(np.ceil(size / cell)) + 4
    distance = np.abs((np.arange(size)[:, None] + 0.5) / cell + 1.0 - np.arange(nodes)[None, :])
    near = (2.0 / 3.0 - distance**2 + distance**3 / 2.0) * (distance < 1.0)
    far = (2.0 - distance) ** 3 / 6.0 * ((distance >= 1.0) & (distance < 2.0))
    return (near + far).astype(np.float32)


def _smooth_field(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field with correlation length about ``cell`` px (float32).

    White noise on a coarse knot grid taken as cubic B-spline coefficients, evaluated by two small matrix products:
    far cheaper than filtering full-size noise or spline interpolation.
    """
    cell = max(float(cell), 1.0)
    rows, cols = _bspline_matrix(height, cell), _bspline_matrix(width, cell)
    grid = rng.standard_normal((rows.shape[1], cols.shape[1]), dtype=np.float32)
    return _unit(rows @ grid @ cols.T)


def _unit(x: np.ndarray) -> np.ndarray:
    """Standardise to zero mean and unit variance."""
    return (x - x.mean()) / (x.std() + 1e-6)


def _blobs(rng: np.random.Generator, height: int, width: int, count: int, radius: tuple[float, float]) -> np.ndarray:
    """Boolean mask of ``count`` irregular blobs with radii drawn from ``radius`` (fractions of the shorter side)."""
    side = min(height, width)
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    field = np.zeros((height, width), dtype=np.float32)
    for _ in range(count):
        r = rng.uniform(*radius) * side
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        aspect = rng.uniform(0.6, 1.6)
        np.maximum(field, np.exp(-(((yy - cy) * aspect) ** 2 + ((xx - cx) / aspect) ** 2) / (2 * r * r)), out=field)
    wobble = _smooth_field(rng, height, width, radius[0] * side * 0.6)
    return field + 0.12 * wobble > 0.45


def make_rcm_mosaic(
    height: int = 2048,
    width: int = 2048,
    *,
    seed: int = 0,
    blobs: int = 4,
    blob_radius: tuple[float, float] = (0.06, 0.14),
    field_of_view: int = 512,
    unlabeled_band: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic RCM mosaic and its label mask, both uint8 (H, W); the same seed gives the same arrays.

    ``blobs`` aspecific regions with radii drawn from ``blob_radius`` (fractions of the shorter side) sit on a
    benign meshwork; the mask is 255 inside them, 0 outside and 128 within ``unlabeled_band`` px of their edges.
    About one second for 2048 x 2048 px.
    """
    if min(height, width) < 16:
        raise ValueError(f"a mosaic needs at least 16 x 16 px, not {height} x {width}")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((height, width), dtype=np.float32)
    band = _unit(ndi.gaussian_filter(noise, 3.0, truncate=3.0) - ndi.gaussian_filter(noise, 7.0, truncate=3.0))
    mesh = np.exp(-((band / 0.3) ** 2))
    rings = 0.5 + 0.5 * np.cos(2.0 * np.pi * 0.8 * _smooth_field(rng, height, width, 64.0))
    grains = _unit(ndi.gaussian_filter(rng.standard_normal((height, width), dtype=np.float32), 1.5))
    benign = 0.12 + 0.55 * mesh * (0.6 + 0.4 * rings) + 0.3 * np.clip(grains - 1.8, 0.0, None)
    aspecific = 0.16 + 0.3 * np.clip(grains - 0.5, 0.0, None) + 0.04 * _smooth_field(rng, height, width, 64.0)

    region = _blobs(rng, height, width, blobs, blob_radius)
    disruption = np.clip(0.6 + 0.25 * _smooth_field(rng, height, width, 48.0), 0.3, 0.95)
    soft = ndi.gaussian_filter(region.astype(np.float32), 2.0) * disruption
    image = benign * (1.0 - soft) + aspecific * soft
    image *= 1.0 + 0.15 * _smooth_field(rng, height, width, 256.0)

    fy = (np.arange(height) % field_of_view + 0.5) / field_of_view - 0.5
    fx = (np.arange(width) % field_of_view + 0.5) / field_of_view - 0.5
    vignette = np.outer(1.0 - 0.6 * fy**2, 1.0 - 0.6 * fx**2).astype(np.float32)
    speckle = 1.0 + 0.12 * rng.standard_normal((height, width), dtype=np.float32)
    image = np.clip(image * vignette * speckle, 0.0, 1.0)

    mask = np.where(region, POSITIVE, NEGATIVE).astype(np.uint8)
    if unlabeled_band > 0:
        near = ndi.binary_dilation(region, iterations=unlabeled_band) & ~ndi.binary_erosion(
            region, iterations=unlabeled_band
        )
        mask[near] = UNLABELED
    return np.round(image * 255.0).astype(np.uint8), mask


def sample_patches(
    image: np.ndarray,
    mask: np.ndarray,
    count: int,
    *,
    size: int = 256,
    seed: int = 0,
    balanced: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` patches (N, size, size) of ``image`` and their labels (N,) int64, 1 = positive, 0 = negative.

    A patch's label is that of its centre pixel (``mask[top + size // 2, left + size // 2]``); patches whose centre
    is unlabeled are skipped. ``balanced`` draws half of the patches from each class (the positive half rounded
    down); otherwise centres are uniform over the labeled pixels. Deterministic by ``seed``.
    """
    height, width = image.shape[:2]
    if mask.shape != (height, width):
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    if size > min(height, width):
        raise ValueError(f"patches of {size} px do not fit a {height} x {width} mosaic")
    rng = np.random.default_rng(seed)
    half = size // 2
    centre = mask[half : height - size + half + 1, half : width - size + half + 1]
    wanted = {POSITIVE: count // 2, NEGATIVE: count - count // 2} if balanced else None
    tops: list[np.ndarray] = []
    lefts: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for value in (POSITIVE, NEGATIVE) if balanced else (None,):
        need = wanted[value] if wanted is not None else count
        if need == 0:
            continue
        ys, xs = np.nonzero(centre == value) if value is not None else np.nonzero(centre != UNLABELED)
        if ys.size == 0:
            raise ValueError(f"no {'labeled' if value is None else 'class ' + str(value)} centre to sample from")
        pick = rng.integers(0, ys.size, size=need)
        tops.append(ys[pick])
        lefts.append(xs[pick])
        labels.append(centre[ys[pick], xs[pick]] == POSITIVE)
    top, left = np.concatenate(tops), np.concatenate(lefts)
    order = rng.permutation(top.size)
    top, left = top[order], left[order]
    patches = np.stack([image[t : t + size, s : s + size] for t, s in zip(top, left, strict=True)])
    return patches, np.concatenate(labels)[order].astype(np.int64)


def mosaic_seeds(counts: tuple[int, int, int], seed: int = 0) -> dict[str, list[int]]:
    """The mosaic seeds of ``counts`` (train, val, test) mosaics drawn with ``seed``: consecutive from
    ``7000 + 100 * seed``, training first, then validation, then test (the ``rcm`` study and ``synth rcm`` alike)."""
    first = 7000 + 100 * seed
    starts = np.concatenate([[0], np.cumsum(counts)])
    return {
        split: list(range(first + int(start), first + int(start) + count))
        for split, start, count in zip(("train", "val", "test"), starts, counts, strict=False)
    }


def write_mosaic_folder(
    out: str | Path,
    *,
    counts: tuple[int, int, int] = (6, 1, 2),
    size: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, list[Path]]:
    """Write ``counts`` (train, val, test) synthetic mosaics with masks as ``out/<split>/mosaic-<seed>.png`` and
    ``mosaic-<seed>-mask.png``, the folder ``python -m core train --mosaics`` reads, seeded by :func:`mosaic_seeds`
    as the ``rcm`` study draws them. The folder is written under a temporary name and renamed when complete; returns
    the mosaic paths per split."""
    root = Path(out)
    if min(counts) < 0 or counts[0] < 1 or counts[1] < 1:
        raise ValueError(f"counts must give at least one training and one validation mosaic, not {counts}")
    if root.exists():
        if not overwrite:
            raise ValueError(f"{root} already exists; choose another folder or overwrite it")
        shutil.rmtree(root)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    seeds = {split: numbers for split, numbers in mosaic_seeds(counts, seed).items() if numbers}
    for split, numbers in seeds.items():
        for number in numbers:
            image, mask = make_rcm_mosaic(size, size, seed=number)
            write_atomic(partial / split / f"mosaic-{number}.png", png_bytes(image))
            write_atomic(partial / split / f"mosaic-{number}-mask.png", png_bytes(mask))
    partial.rename(root)
    return {split: [root / split / f"mosaic-{number}.png" for number in numbers] for split, numbers in seeds.items()}


def write_rcm_cohort(out: str | Path, *, mosaics: int = 4, size: int = 384, seed: int = 0) -> Path:
    """RCM mosaics as a cohort to import: ``mosaics`` synthetic mosaics (every other one benign, without aspecific
    regions) with their masks as PNG, one patient each, and ``out/manifest.csv`` saying whether each holds an
    aspecific region (seed 002). Returns the manifest's path."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["patient_id,specimen_id,modality,path,mask_path,aspecific"]
    for number in range(1, mosaics + 1):
        blobs = 0 if number % 2 == 0 else 3
        image, mask = make_rcm_mosaic(size, size, seed=seed * 100 + 8000 + number, blobs=blobs)
        name = f"mosaic-{number:02d}"
        write_atomic(root / f"{name}.png", png_bytes(image))
        write_atomic(root / f"{name}-mask.png", png_bytes(mask))
        lines.append(f"RCM-P{number:02d},RCM-M{number:02d},RCM,{name}.png,{name}-mask.png,{int(blobs > 0)}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest
