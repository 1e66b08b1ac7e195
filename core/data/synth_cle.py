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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from core.data.synth_rcm import NEGATIVE, POSITIVE, UNLABELED, _smooth_field

__all__ = ["NEGATIVE", "POSITIVE", "UNLABELED", "CLEFrame", "make_cle_frame", "make_cle_frames"]

_REFERENCE_SIZE = 128
_RBC_PROBABILITY = 0.4
_MOTION_PROBABILITY = 0.3
_RBC_TRIES = 20


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


def make_cle_frame(seed: int, size: int = 128, *, diagnostic: bool) -> CLEFrame:
    """One synthetic CLE frame with its masks; the same ``seed``, ``size`` and ``diagnostic`` give the same frame.

    A diagnostic frame carries 1-3 hypercellular regions with large pleomorphic nuclei, a nondiagnostic frame none;
    artefacts are drawn first, with the same probabilities in both. Lengths scale with ``size`` (128 px reference).
    """
    if size < 32:
        raise ValueError(f"a CLE frame needs at least 32 x 32 px, not {size}")
    rng = np.random.default_rng(seed)
    scale = size / _REFERENCE_SIZE
    with_rbc = rng.random() < _RBC_PROBABILITY
    with_motion = rng.random() < _MOTION_PROBABILITY

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

    yy = (np.arange(size, dtype=np.float32) + 0.5) / size - rng.uniform(0.45, 0.55)
    xx = (np.arange(size, dtype=np.float32) + 0.5) / size - rng.uniform(0.45, 0.55)
    vignette = 1.0 - 1.2 * (yy[:, None] ** 2 + xx[None, :] ** 2)
    gain_field = 1.0 + 0.1 * _smooth_field(rng, size, size, 0.5 * size)
    speckle = 1.0 + 0.08 * rng.standard_normal((size, size), dtype=np.float32)
    image = np.clip(image * vignette * gain_field * speckle, 0.0, 1.0)

    intermediate = np.where(region, POSITIVE, NEGATIVE).astype(np.uint8)
    band = _band(size)
    edge = ndi.binary_dilation(region, iterations=band) & ~ndi.binary_erosion(region, iterations=band, border_value=1)
    intermediate[edge] = UNLABELED
    restrictive = np.where(nuclei, POSITIVE, NEGATIVE).astype(np.uint8)
    return CLEFrame(
        image=np.round(image * 255.0).astype(np.uint8),
        intermediate=intermediate,
        restrictive=restrictive,
        label=int(np.any(intermediate == POSITIVE)),
        artefacts=tuple(artefacts),
    )


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
