"""Synthetic confocal laser endomicroscopy (CLE) frames of glioma with two scales of pixel labels.

Why: the CLE images of Izadyyazdanabadi et al., "Weakly-supervised learning-based feature localization in confocal
laser endomicroscopy glioma images" (MLCAM-LICI, seed paper 000) cannot be downloaded. The paper trains on
image-level labels (diagnostic vs nondiagnostic, section 3) and scores localisation against neurosurgeons' masks
drawn at two scales, medium-sized "intermediate" regions and small "restrictive" fine features (Set2-I, Set2-R).
These frames have both masks by construction, so weakly supervised heatmaps can be scored at both scales.

What it models (lengths below are for ``size=128`` and scale with ``size``):

* Contrast convention: fluorescein is an extracellular agent, so the interstitial space fluoresces and cells, whose
  membranes exclude the dye, appear as dark shapes on a bright ground (the convention of fluorescein CLE of brain
  tumors). Nuclei are therefore dark, never bright.
* Nondiagnostic tissue: a textured fluorescent ground (smooth random fields at two scales) crossed by a few thin bright
  fibres, with sparse small, nearly round dark cells (radius 2-3 px).
* Diagnostic regions (diagnostic frames only): 1-3 irregular blobs, 8-25 % of the frame in total, of hypercellularity:
  densely packed, pleomorphic (elliptic, wobbly-edged, radius 4-6 px) dark nuclei with bright seams between them. The
  ground inside is brightened so that the local mean (Gaussian window of 8 px) matches the tissue that would have been
  there: the cue is the shape, size and packing of the nuclei (section 1: "large nucleus, ... hypercellularity"),
  not brightness.
* Annotations, as the paper's surgeons drew the same images at two scales: ``intermediate`` is 255 on the regions,
  128 (unlabeled) in a thin band (1 px either side at 128 px) along their edges where a drawn outline is uncertain,
  0 elsewhere; ``restrictive`` is 255 exactly on the pixels of the large nuclei, 0 elsewhere.
* Artefacts (section 1: "red blood cells and motion distortion"), whether a frame has them drawn before anything
  that depends on the class, so they are equally likely in both classes and no class cue: red blood cells (0.4), a
  cluster or a streak along a bright plasma-filled vessel of uniform round discs (radius 3-4 px) with a dark centre and
  a bright rim, kept off the diagnostic regions so that they are label 0 in both masks; motion blur (probability 0.3),
  a linear blur of random angle and length (4-12 px) over the whole frame or over a band of scan lines. Every frame
  also has a slow gain field, vignetting and multiplicative noise.
* The image-level label follows the paper's rule: a frame is diagnostic if it shows any diagnostic feature, i.e. if
  ``intermediate`` has any 255 pixel.

Clips (:func:`make_cle_clip`): a probe streaming up to 20 frames/s over a biopsy site, as triage sees it: the probe
dwells on diagnostic tissue and sweeps fast (motion blur, more blood) over nondiagnostic tissue between, so labels come
in stretches and neighbouring frames are near copies. :func:`write_clip` writes one as a multi-page TIFF, an MP4 or AVI
video or a zip of PNG frames, the containers :mod:`core.data.clips` reads.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import tifffile
from scipy import ndimage as ndi

from core.data.io import Image, encode_clean
from core.data.synth_rcm import NEGATIVE, POSITIVE, UNLABELED, _smooth_field

__all__ = [
    "NEGATIVE",
    "POSITIVE",
    "UNLABELED",
    "CLEClip",
    "CLEFrame",
    "make_cle_clip",
    "make_cle_frame",
    "make_cle_frames",
    "write_clip",
    "write_cle_cohort",
]

_REFERENCE_SIZE = 128
_RBC_PROBABILITY = 0.4
_MOTION_PROBABILITY = 0.3
_RBC_TRIES = 20
_SPECKLE = 0.08
# Clips: the probe dwells on diagnostic sites and sweeps between them (speeds in px/s at the 128 px reference).
_DWELL_SECONDS = 2.5
_DWELL_SPEED = (8.0, 30.0)
_SWEEP_SPEED = (50.0, 160.0)
_BLOOD_PROBABILITY = 0.7
_TILE_OVERLAP = 16
_BLUR_FROM = 1.5


@dataclass(frozen=True)
class CLEClip:
    """A synthetic CLE clip: ``frames`` (N, size, size) uint8, ``labels`` (N,) 1 diagnostic / 0 nondiagnostic, and
    the frame rate it was made for."""

    frames: np.ndarray
    labels: np.ndarray
    fps: float


@dataclass(frozen=True)
class CLEFrame:
    """One grayscale CLE frame (uint8) with its intermediate (0/128/255) and restrictive (0/255) masks.

    ``label`` is 1 for a diagnostic frame (``intermediate`` has a 255 pixel), else 0; ``artefacts`` names the
    artefacts drawn into it, a subset of ``("rbc", "motion")``.
    """

    image: np.ndarray
    intermediate: np.ndarray
    restrictive: np.ndarray
    label: int
    artefacts: tuple[str, ...]


def _stamp_cells(
    rng: np.random.Generator,
    size: int,
    centres: np.ndarray,
    radii: np.ndarray,
    *,
    aspect: tuple[float, float],
    wobble: float,
    depth: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Darkening field (max over cells, 0-1) and boolean footprint of elliptic cells with wobbly edges.

    Each cell is an ellipse of mean radius ``radii[i]``, axis ratio drawn from ``aspect``, random orientation and a
    radius modulated by second and third angular harmonics of relative amplitude up to ``wobble`` (pleomorphism);
    its edge is anti-aliased over about one pixel and its darkness is drawn from ``depth``.
    """
    dark = np.zeros((size, size), dtype=np.float32)
    footprint = np.zeros((size, size), dtype=bool)
    for (cy, cx), radius in zip(centres, radii, strict=True):
        ratio = np.sqrt(rng.uniform(*aspect))
        angle = rng.uniform(0.0, np.pi)
        harmonics = rng.uniform(0.0, wobble, size=2)
        phases = rng.uniform(0.0, 2.0 * np.pi, size=2)
        strength = rng.uniform(*depth)
        reach = int(np.ceil(radius * (max(ratio, 1.0 / ratio) + wobble) + 2.0))
        y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, size)
        x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        u = dy * np.cos(angle) + dx * np.sin(angle)
        v = -dy * np.sin(angle) + dx * np.cos(angle)
        phi = np.arctan2(v, u)
        edge = radius * (
            1.0 + harmonics[0] * np.cos(2.0 * phi + phases[0]) + harmonics[1] * np.cos(3.0 * phi + phases[1])
        )
        distance = np.sqrt((u * ratio) ** 2 + (v / ratio) ** 2) - edge
        profile = np.clip(0.5 - distance, 0.0, 1.0) * strength
        np.maximum(dark[y0:y1, x0:x1], profile, out=dark[y0:y1, x0:x1])
        footprint[y0:y1, x0:x1] |= distance <= 0.0
    return dark, footprint


def _fine_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance fine-grained random field: white noise blurred by a Gaussian of ``sigma`` px.

    For correlation lengths of a few pixels this is cheaper than the B-spline field of :mod:`core.data.synth_rcm`.
    """
    field = ndi.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-6)


def _fibres(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A few thin, gently curving bright fibres (axon bundles, vessel walls), 0-1, as smooth random walks."""
    count = int(rng.integers(2, 7))
    steps = int(1.2 * size)
    step = 0.5
    heading = rng.uniform(0.0, 2.0 * np.pi, size=(count, 1)) + np.cumsum(
        rng.normal(0.0, 0.04, size=(count, steps)), axis=1
    )
    start = rng.uniform(0.0, size, size=(count, 2))
    ys = start[:, :1] + np.cumsum(step * np.sin(heading), axis=1)
    xs = start[:, 1:] + np.cumsum(step * np.cos(heading), axis=1)
    inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    flat = ys[inside].astype(np.int64) * size + xs[inside].astype(np.int64)
    canvas = np.bincount(flat, minlength=size * size).reshape(size, size).astype(np.float32)
    sigma = 0.3 + 0.5 * scale
    return np.clip(ndi.gaussian_filter(canvas, sigma) * step * np.sqrt(2.0 * np.pi) * sigma, 0.0, 1.0)


def _regions(rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean mask of 1-3 irregular blobs covering a fraction U(0.08, 0.25) of the frame.

    Gaussian bumps perturbed by a smooth field, thresholded at the quantile that gives the drawn area, then cleaned of
    slivers (which changes the area by a few percent).
    """
    count = int(rng.integers(1, 4))
    fraction = rng.uniform(0.08, 0.25)
    yy = np.arange(size, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(size, dtype=np.float32)[None, :] + 0.5
    field = np.zeros((size, size), dtype=np.float32)
    spread = size * np.sqrt(fraction / (np.pi * count))
    for _ in range(count):
        cy, cx = rng.uniform(0.15, 0.85, size=2) * size
        aspect = rng.uniform(0.7, 1.4)
        bump = np.exp(-(((yy - cy) * aspect) ** 2 + ((xx - cx) / aspect) ** 2) / (2.0 * spread**2))
        np.maximum(field, bump, out=field)
    field += 0.15 * _smooth_field(rng, size, size, 0.6 * spread)
    return _clean(field > np.quantile(field, 1.0 - fraction), 1 + _band(size))


def _clean(region: np.ndarray, radius: int) -> np.ndarray:
    """``region`` without parts, necks, inlets or holes thinner than about ``2 * radius + 1`` px.

    A closing, an opening and hole filling on a mirror-padded copy (so the frame border neither erodes nor grows the
    region, and slivers along it go too): away from the border, every remaining region pixel, and every pixel
    outside, then lies within ``radius`` px of a pixel of its own kind that is more than a band's width from the
    edge, so the unlabeled band never swallows a whole part.
    """
    pad = radius + 1
    padded = np.pad(region, pad, mode="symmetric")
    padded = ndi.binary_opening(ndi.binary_closing(padded, iterations=radius), iterations=radius)
    return ndi.binary_fill_holes(padded)[pad:-pad, pad:-pad]


def _band(size: int) -> int:
    """Half-width (px) of the unlabeled band along region edges: 1 px at 128 px, scaled with ``size``."""
    return max(1, round(size / _REFERENCE_SIZE))


def _packed_centres(rng: np.random.Generator, region: np.ndarray, spacing: float) -> np.ndarray:
    """Centres (N, 2) of densely packed nuclei: a randomly rotated, jittered hexagonal lattice inside ``region``."""
    size = region.shape[0]
    reach = int(np.ceil(size * 0.75 / spacing)) + 1
    i, j = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1), indexing="ij")
    lattice = np.stack([i * np.sqrt(3.0) / 2.0, j + 0.5 * (i % 2)], axis=-1).reshape(-1, 2) * spacing
    angle = rng.uniform(0.0, np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = lattice @ rotation.T + size / 2.0 + rng.uniform(0.0, spacing, size=2)
    points += rng.uniform(-0.2, 0.2, size=points.shape) * spacing
    pixel = np.floor(points).astype(np.int64)
    inside = np.all((pixel >= 0) & (pixel < size), axis=1)
    points, pixel = points[inside], pixel[inside]
    keep = region[pixel[:, 0], pixel[:, 1]] & (rng.random(len(points)) < 0.9)
    return points[keep]


def _line_kernel(length: float, angle: float) -> np.ndarray:
    """Normalised kernel of a linear motion blur ``length`` px long at ``angle`` (bilinear rasterised segment)."""
    half = int(np.ceil(length / 2.0)) + 1
    kernel = np.zeros((2 * half + 1, 2 * half + 1), dtype=np.float32)
    t = np.linspace(-length / 2.0, length / 2.0, int(np.ceil(4 * length)) + 1)
    ys, xs = half + t * np.sin(angle), half + t * np.cos(angle)
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = (ys - y0).astype(np.float32), (xs - x0).astype(np.float32)
    for oy, ox, weight in ((0, 0, (1 - fy) * (1 - fx)), (1, 0, fy * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 1, fy * fx)):
        np.add.at(kernel, (y0 + oy, x0 + ox), weight)
    return kernel / kernel.sum()


def _motion_blur(rng: np.random.Generator, image: np.ndarray, scale: float) -> np.ndarray:
    """Blur ``image`` along a random direction, over the whole frame or (half of the time) a band of scan lines."""
    size = image.shape[0]
    blurred = ndi.convolve(image, _line_kernel(rng.uniform(4.0, 12.0) * scale, rng.uniform(0.0, np.pi)), mode="reflect")
    if rng.random() < 0.5:
        return blurred
    height = rng.uniform(0.25, 0.6) * size
    top = rng.uniform(0.0, size - height)
    rows = np.arange(size, dtype=np.float32) + 0.5
    band = np.clip(np.minimum(rows - top, top + height - rows) / (3.0 * scale) + 0.5, 0.0, 1.0)[:, None]
    return image * (1.0 - band) + blurred * band


def _red_blood_cells(
    rng: np.random.Generator, image: np.ndarray, keep_out: np.ndarray, scale: float
) -> tuple[np.ndarray, bool]:
    """Draw a cluster or a vessel streak of red blood cells outside ``keep_out``; False if none fitted in 20 tries.

    Red blood cells exclude fluorescein, so each is a uniform round disc with a dark centre; the plasma around it
    fluoresces, drawn as a bright rim, and a streak also brightens the vessel lumen it flows in.
    """
    size = image.shape[0]
    count = int(rng.integers(6, 21))
    radius = rng.uniform(3.0, 4.0) * scale
    yy = np.arange(size, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(size, dtype=np.float32)[None, :] + 0.5
    streak = rng.random() < 0.5
    for _ in range(_RBC_TRIES):
        centre = rng.uniform(0.15, 0.85, size=2) * size
        if streak:
            angle = rng.uniform(0.0, np.pi)
            direction = np.array([np.sin(angle), np.cos(angle)])
            along = rng.uniform(-0.45, 0.45, size=count)[:, None] * size * direction
            points = (
                centre
                + along
                + rng.normal(0.0, 0.6 * radius, size=(count, 1)) * np.array([direction[1], -direction[0]])
            )
        else:
            points = centre + rng.normal(0.0, 2.5 * radius, size=(count, 2))
        pixel = np.floor(points).astype(np.int64)
        inside = np.all((pixel >= 0) & (pixel < size), axis=1)
        points, pixel = points[inside], pixel[inside]
        points = points[~keep_out[pixel[:, 0], pixel[:, 1]]]
        if len(points) >= 3:
            break
    else:
        return image, False
    if streak:
        across = np.abs((yy - centre[0]) * direction[1] - (xx - centre[1]) * direction[0])
        outside = 1.0 - ndi.gaussian_filter(keep_out.astype(np.float32), 2.0)
        image = image * (1.0 + 0.25 * np.exp(-((across / (2.0 * radius)) ** 2)) * outside)
    centre_dark, _ = _stamp_cells(
        rng, size, points, np.full(len(points), 0.65 * radius), aspect=(0.9, 1.1), wobble=0.0, depth=(0.5, 0.6)
    )
    disc, _ = _stamp_cells(
        rng, size, points, np.full(len(points), radius), aspect=(0.9, 1.1), wobble=0.0, depth=(1.0, 1.0)
    )
    rim = np.clip(disc - ndi.grey_erosion(disc, size=3), 0.0, 1.0)
    return image * (1.0 - centre_dark) * (1.0 + 0.35 * rim), True


def _tissue(
    rng: np.random.Generator, size: int, scale: float, *, diagnostic: bool, with_rbc: bool, with_motion: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Tissue as it reaches the probe's optics: (image, region, nuclei, artefacts), the image a float field near 0-1.

    The ground with its fibres and small cells, the hypercellular regions of a diagnostic frame with their large
    nuclei, then the artefacts asked for (red blood cells kept off the regions, motion blur).
    """
    ground = 0.5 + 0.07 * _smooth_field(rng, size, size, 24.0 * scale) + 0.04 * _fine_field(rng, size, 2.0 * scale)
    ground += 0.3 * _fibres(rng, size, scale)
    count = rng.poisson(size * size / 450.0)
    cells, _ = _stamp_cells(
        rng,
        size,
        rng.uniform(0.0, size, size=(count, 2)),
        rng.uniform(2.0, 3.0, size=count) * scale,
        aspect=(0.8, 1.25),
        wobble=0.05,
        depth=(0.35, 0.55),
    )
    image = ground * (1.0 - cells)

    region = _regions(rng, size) if diagnostic else np.zeros((size, size), dtype=bool)
    nuclei = np.zeros((size, size), dtype=bool)
    if diagnostic:
        centres = _packed_centres(rng, region, 13.0 * scale)
        dark, nuclei = _stamp_cells(
            rng,
            size,
            centres,
            rng.uniform(4.0, 6.0, size=len(centres)) * scale,
            aspect=(0.7, 1.4),
            wobble=0.15,
            depth=(0.55, 0.75),
        )
        chromatin = 1.0 + 0.12 * _fine_field(rng, size, 0.7 * scale)
        hypercellular = ground * (1.0 - np.clip(dark * chromatin, 0.0, 0.95))
        soft = ndi.gaussian_filter(region.astype(np.float32), 0.8 * scale)
        window = 8.0 * scale
        gain = ndi.gaussian_filter(image * soft, window) / (ndi.gaussian_filter(hypercellular * soft, window) + 1e-6)
        image = image * (1.0 - soft) + hypercellular * gain * soft
        nuclei &= region

    artefacts: list[str] = []
    if with_rbc:
        keep_out = ndi.binary_dilation(region, iterations=int(np.ceil(6.0 * scale))) if diagnostic else region
        image, drawn = _red_blood_cells(rng, image, keep_out, scale)
        if drawn:
            artefacts.append("rbc")
    if with_motion:
        image = _motion_blur(rng, image, scale)
        artefacts.append("motion")
    return image, region, nuclei, tuple(artefacts)


def _optics(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The probe's vignetting (centre drawn near the middle) and slow gain field, both multiplicative."""
    yy = (np.arange(size, dtype=np.float32) + 0.5) / size - rng.uniform(0.45, 0.55)
    xx = (np.arange(size, dtype=np.float32) + 0.5) / size - rng.uniform(0.45, 0.55)
    vignette = 1.0 - 1.2 * (yy[:, None] ** 2 + xx[None, :] ** 2)
    return vignette, 1.0 + 0.1 * _smooth_field(rng, size, size, 0.5 * size)


def _speckle(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multiplicative detector noise of one frame."""
    return 1.0 + _SPECKLE * rng.standard_normal((size, size), dtype=np.float32)


def _masks(region: np.ndarray, nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The intermediate (0/128/255, unlabeled band along region edges) and restrictive (0/255) masks."""
    intermediate = np.where(region, POSITIVE, NEGATIVE).astype(np.uint8)
    band = _band(region.shape[0])
    edge = ndi.binary_dilation(region, iterations=band) & ~ndi.binary_erosion(region, iterations=band, border_value=1)
    intermediate[edge] = UNLABELED
    return intermediate, np.where(nuclei, POSITIVE, NEGATIVE).astype(np.uint8)


def make_cle_frame(seed: int, size: int = 128, *, diagnostic: bool) -> CLEFrame:
    """One synthetic CLE frame with its masks; the same ``seed``, ``size`` and ``diagnostic`` give the same frame.

    A diagnostic frame carries 1-3 hypercellular regions with large pleomorphic nuclei, a nondiagnostic frame none;
    artefacts are drawn first, with the same probabilities in both. Lengths scale with ``size`` (128 px reference).
    """
    _check_size(size)
    rng = np.random.default_rng(seed)
    scale = size / _REFERENCE_SIZE
    with_rbc = rng.random() < _RBC_PROBABILITY
    with_motion = rng.random() < _MOTION_PROBABILITY
    image, region, nuclei, artefacts = _tissue(
        rng, size, scale, diagnostic=diagnostic, with_rbc=with_rbc, with_motion=with_motion
    )
    vignette, gain_field = _optics(rng, size)
    image = np.clip(image * vignette * gain_field * _speckle(rng, size), 0.0, 1.0)
    intermediate, restrictive = _masks(region, nuclei)
    return CLEFrame(
        image=np.round(image * 255.0).astype(np.uint8),
        intermediate=intermediate,
        restrictive=restrictive,
        label=int(np.any(intermediate == POSITIVE)),
        artefacts=artefacts,
    )


def _check_size(size: int) -> None:
    """Refuse frames too small to hold the model's structures."""
    if size < 32:
        raise ValueError(f"a CLE frame needs at least 32 x 32 px, not {size}")


def make_cle_frames(n: int, size: int = 128, *, seed: int = 0, positive_fraction: float = 0.5) -> list[CLEFrame]:
    """``n`` frames, exactly ``round(n * positive_fraction)`` of them diagnostic, in a shuffled order.

    Each frame gets its own independent seed spawned from ``seed`` (``numpy.random.SeedSequence``), so frame ``i``'s
    seed does not depend on ``n`` or on the other frames' draws; the class order is drawn from a seed of its own.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, not {n}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must lie in [0, 1], not {positive_fraction}")
    order, *children = np.random.SeedSequence(seed).spawn(n + 1)
    positives = round(n * positive_fraction)
    diagnostic = np.random.default_rng(order).permutation(np.arange(n) < positives)
    return [
        make_cle_frame(int(child.generate_state(1, np.uint64)[0]), size, diagnostic=bool(flag))
        for child, flag in zip(children, diagnostic, strict=True)
    ]


def make_cle_clip(
    n_frames: int, size: int = 128, *, seed: int = 0, fps: float = 20.0, diagnostic_fraction: float = 0.3
) -> CLEClip:
    """A clip of a probe moving over tissue: dwells on diagnostic sites, sweeps across nondiagnostic tissue between.

    The clip is a sequence of stretches, nondiagnostic and diagnostic in turn (nondiagnostic first and last),
    ``round(n_frames * diagnostic_fraction)`` frames in diagnostic stretches of about 2.5 s each. Each stretch is one
    pass of the probe over a strip of tissue made of frames of :func:`make_cle_frame`'s tissue placed side by side
    and blended over 16 px: the probe dwells over diagnostic tissue (8-30 px/s at 128 px) and sweeps nondiagnostic
    tissue fast (50-160 px/s), which blurs it along the sweep, and that tissue has red blood cells more often (0.7
    against 0.4). Between stretches the probe jumps (a cut), and each stretch runs in one of four directions. The
    probe's vignetting and gain field are the same in every frame; detector noise is drawn per frame.

    A frame's label follows :func:`make_cle_frame`'s rule on the part of the strip it shows: 1 when that part holds
    a pixel of a diagnostic region (255 in the intermediate mask), so a diagnostic stretch can have frames between
    regions labelled 0. The same arguments give the same clip.
    """
    if n_frames < 1:
        raise ValueError(f"a clip needs at least one frame, not {n_frames}")
    if not 0.0 <= diagnostic_fraction <= 1.0:
        raise ValueError(f"diagnostic_fraction must lie in [0, 1], not {diagnostic_fraction}")
    if not fps > 0.0:
        raise ValueError(f"fps must be positive, not {fps}")
    _check_size(size)
    rng = np.random.default_rng(seed)
    scale = size / _REFERENCE_SIZE
    vignette, gain_field = _optics(rng, size)
    frames = np.empty((n_frames, size, size), dtype=np.uint8)
    labels = np.empty(n_frames, dtype=np.int64)
    start = 0
    for diagnostic, length in _stretches(rng, n_frames, diagnostic_fraction, fps):
        for crop, positive in _pass(rng, size, scale, length, fps, diagnostic=diagnostic):
            image = np.clip(crop * vignette * gain_field * _speckle(rng, size), 0.0, 1.0)
            frames[start] = np.round(image * 255.0).astype(np.uint8)
            labels[start] = int(positive)
            start += 1
    return CLEClip(frames=frames, labels=labels, fps=float(fps))


def _stretches(rng: np.random.Generator, n_frames: int, fraction: float, fps: float) -> list[tuple[bool, int]]:
    """(diagnostic, frames) of each stretch, in clip order: nondiagnostic and diagnostic in turn, lengths random."""
    diagnostic = round(n_frames * fraction)
    sites = 0 if diagnostic == 0 else max(1, round(diagnostic / (_DWELL_SECONDS * fps)))
    dwells = _split(rng, diagnostic, sites)
    sweeps = _split(rng, n_frames - diagnostic, len(dwells) + 1)
    order = [(False, sweeps[0])] if sweeps else []
    for index, dwell in enumerate(dwells):
        order.append((True, dwell))
        if index + 1 < len(sweeps):
            order.append((False, sweeps[index + 1]))
    return order


def _split(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    """``total`` as a uniformly random sum of ``min(parts, total)`` positive integers."""
    parts = min(parts, total)
    if parts == 0:
        return []
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()


def _pass(
    rng: np.random.Generator, size: int, scale: float, length: int, fps: float, *, diagnostic: bool
) -> list[tuple[np.ndarray, bool]]:
    """One pass of the probe over a strip of tissue: (tissue seen, any diagnostic pixel in it) per frame."""
    speed = rng.uniform(*(_DWELL_SPEED if diagnostic else _SWEEP_SPEED)) * scale / fps
    step = size - round(_TILE_OVERLAP * scale)
    travel = speed * (length - 1)
    tiles = 1 + math.ceil((travel + 1.0) / step)
    strip, positive = _strip(rng, size, scale, tiles, diagnostic=diagnostic)
    if speed > _BLUR_FROM:
        strip = ndi.convolve(strip, _line_kernel(speed, 0.0), mode="reflect")
    slack = strip.shape[1] - size - travel
    offsets = np.round(rng.uniform(0.0, slack) + speed * np.arange(length)).astype(int)
    offsets = np.clip(offsets, 0, strip.shape[1] - size)
    transpose, flip = bool(rng.integers(2)), bool(rng.integers(2))
    out = []
    for offset in offsets:
        crop = strip[:, offset : offset + size]
        crop = crop[:, ::-1] if flip else crop
        out.append((crop.T if transpose else crop, bool(positive[:, offset : offset + size].any())))
    return out


def _strip(
    rng: np.random.Generator, size: int, scale: float, tiles: int, *, diagnostic: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``tiles`` frames of tissue side by side, cross-faded where they overlap, and where they are diagnostic.

    The second array is True on the pixels that are 255 in a tile's intermediate mask, taken from the tile nearer
    in the overlaps.
    """
    overlap = round(_TILE_OVERLAP * scale)
    step = size - overlap
    width = size + (tiles - 1) * step
    image = np.zeros((size, width), dtype=np.float32)
    positive = np.zeros((size, width), dtype=bool)
    weight = np.ones(size, dtype=np.float32)
    weight[:overlap] = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    blood = _RBC_PROBABILITY if diagnostic else _BLOOD_PROBABILITY
    for index in range(tiles):
        tile_rng = np.random.default_rng(rng.integers(2**63))
        tissue, region, nuclei, _ = _tissue(
            tile_rng, size, scale, diagnostic=diagnostic, with_rbc=bool(rng.random() < blood), with_motion=False
        )
        intermediate, _ = _masks(region, nuclei)
        left = index * step
        ramp = weight if index else np.ones(size, dtype=np.float32)
        window = image[:, left : left + size]
        image[:, left : left + size] = window * (1.0 - ramp) + tissue * ramp
        cut = overlap // 2 if index else 0
        positive[:, left + cut : left + size] = intermediate[:, cut:] == POSITIVE
    return image, positive


def write_clip(clip_frames: np.ndarray, path: Path, *, fps: float = 20.0) -> Path:
    """Write frames (N, H, W) or (N, H, W, 3) to ``path`` in the format its suffix names; returns ``path``.

    ``.tif``/``.tiff``: a multi-page ImageJ TIFF (tifffile, lossless) stating ``fps``; ``.mp4``: H.264 (or MPEG-4
    part 2 where this PyAV has no H.264 encoder), moov atom first; ``.avi``: MPEG-4 part 2 (or Motion JPEG); ``.zip``:
    lossless PNG entries ``frame00001.png``, ... Videos take uint8 frames of even width and height, grey frames
    encoded as YUV 4:2:0 with neutral chroma; TIFF and zip also take uint16 grey frames.
    """
    frames = np.asarray(clip_frames)
    path = Path(path)
    if frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[3] != 3) or len(frames) == 0:
        raise ValueError(f"frames must have shape (N, H, W) or (N, H, W, 3) with N >= 1, not {frames.shape}")
    if frames.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"frames must be uint8 or uint16, not {frames.dtype}")
    if not fps > 0.0:
        raise ValueError(f"fps must be positive, not {fps}")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        axes = "TYXS" if frames.ndim == 4 else "TYX"
        tifffile.imwrite(path, frames, imagej=True, metadata={"axes": axes, "fps": float(fps), "finterval": 1.0 / fps})
    elif suffix == ".zip":
        digits = max(5, len(str(len(frames))))
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
            for index, frame in enumerate(frames, start=1):
                data, extension = encode_clean(Image(array=np.ascontiguousarray(frame), name=path.name, format="NPY"))
                archive.writestr(f"frame{index:0{digits}d}{extension}", data)
    elif suffix in (".mp4", ".avi"):
        _write_video(frames, path, fps, ("libx264", "mpeg4") if suffix == ".mp4" else ("mpeg4", "mjpeg"))
    else:
        raise ValueError(f"cannot write a clip as {suffix or 'a file without suffix'}: use .tif, .mp4, .avi or .zip")
    return path


def _write_video(frames: np.ndarray, path: Path, fps: float, encoders: tuple[str, ...]) -> None:
    """Encode frames with the first of ``encoders`` this PyAV has, at high quality."""
    height, width = frames.shape[1:3]
    if frames.dtype != np.uint8 or height % 2 or width % 2:
        raise ValueError(f"a video takes uint8 frames of even width and height, not {frames.dtype} {width} x {height}")
    codec = next((name for name in encoders if _has_encoder(name)), None)
    if codec is None:
        raise ValueError(f"this PyAV has none of the encoders {', '.join(encoders)}")
    options = {"movflags": "faststart"} if path.suffix.lower() == ".mp4" else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "16", "preset": "fast"}
        else:
            stream.bit_rate = 4 * width * height * max(1, round(fps))
        source = "rgb24" if frames.ndim == 4 else "gray"
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=source)
            container.mux(stream.encode(picture.reformat(format=stream.pix_fmt)))
        container.mux(stream.encode())


def _has_encoder(name: str) -> bool:
    """Whether this PyAV build can encode with codec ``name``."""
    try:
        av.codec.Codec(name, "w")
    except ValueError:
        return False
    return True


def write_cle_cohort(
    out: str | Path,
    *,
    patients: int = 3,
    sites_per_patient: int = 2,
    frames_per_clip: int = 60,
    size: int = 64,
    step: int = 3,
    seed: int = 0,
    formats: tuple[str, ...] = (".tif", ".mp4"),
    fps: float = 20.0,
) -> Path:
    """A CLE cohort as a surgeon's team would hand it over: one clip per biopsy site (:func:`make_cle_clip`, written
    in ``formats`` in turn) and ``out/manifest.csv`` with one row per stretch of frames that share a label (seed
    000's diagnostic / nondiagnostic), picking every ``step``-th frame of it (``frames`` as ``first-last/step``), with
    the patient, the site and no split (the import splits by patient). Returns the manifest's path."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["patient_id,specimen_id,site,modality,path,diagnostic,frames"]
    number = 0
    for patient in range(1, patients + 1):
        for site in range(1, sites_per_patient + 1):
            clip = make_cle_clip(frames_per_clip, size, seed=seed * 1000 + patient * 10 + site, fps=fps)
            name = f"P{patient:02d}-site{site}{formats[number % len(formats)]}"
            number += 1
            write_clip(clip.frames, root / name, fps=clip.fps)
            changes = np.flatnonzero(np.diff(clip.labels)) + 1
            for first, last in zip(np.r_[0, changes], np.r_[changes, len(clip.labels)] - 1, strict=True):
                lines.append(
                    f"CLE-P{patient:02d},CLE-P{patient:02d}-S{site},site {site},CLE,{name},"
                    f"{int(clip.labels[first])},{first}-{last}/{step}"
                )
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest
