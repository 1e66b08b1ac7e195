"""Synthetic hyperspectral infrared tissue-microarray spots with tumor masks, for sample-label segmentation research.

Why: the infrared TMA spots of Ebbers et al., "A generic neural network approach to infer segmenting classifiers for
disease-associated regions in medical images" (CompSegNet, seed paper 004) cannot be downloaded. The paper (section
2) trains a U-Net from sample-level labels (cancer vs cancer-free) on Mie-corrected spectra of 1800-948 cm^-1 in 450
channels, with pixels not covered by the sample masked as background; these spots mimic that data with the pixel
ground truth the paper only had for its test spots.

What it models:

* Layout: a roughly circular tissue spot (an irregular disk, 70-90 % of the frame diameter) of stroma crossed by
  crypts, rings of epithelium around empty lumens. A cancer spot also holds tumor, 1-2 smooth irregular regions
  covering a fraction U(0.1, 0.6) of the tissue pixels (the paper's alpha = 0.1 is the minimum tumor share of a
  cancer spot); a cancer-free spot has none. Lumens and everything outside the spot carry no sample.
* Spectra: every component has a base absorbance spectrum, a sum of Gaussian bands (amide I ~1655, amide II ~1545,
  CH2/CH3 1452, COO- 1398, amide III, phosphate 1236/1082, carbohydrate/mucin 1040-1075, ester 1740 cm^-1), scaled
  to a mean absorbance of 0.1 over the range. Stroma adds the collagen triplet (1338/1282/1204 cm^-1) and a 5 cm^-1
  higher amide I; epithelium carries mucin. Tumor is epithelium with subtle, systematic changes (Figure S1:
  differences "seemingly very small" in the averages): 12 % more phosphate (nucleic acids), 30 % less mucin, 4 %
  more amide II and a 1.5 cm^-1 lower amide I/II.
* Pixel variability: each pixel's composition varies along the same four directions (band shift, phosphate, mucin,
  amide II) by two-thirds to five-sixths of tumor's difference from epithelium, half spatially smooth (about 3 px)
  and half per pixel, on top of a spot-level (patient) offset; a thickness factor scales the whole spectrum, a
  smooth baseline (offset and slope) remains after Mie correction, and white noise of 0.004 absorbance is added. The
  optical point spread mixes neighbouring pixels (Gaussian, 0.7 px).
* Per-pixel separability: tumor vs epithelium is learnable but not trivial. A nearest-mean classifier on
  vector-normalised spectra of interior pixels (no other component in the 3 x 3 neighbourhood), with class means
  from other spots, gets about 0.8 (0.78-0.82) of them right, about the same at 16 and at 450 channels because the
  confusion is structured, not white noise. With identical tumor and epithelium spectra it would get 0.5-0.6: thin
  crypt epithelium is mixed with stroma at its edges, solid tumor is not.
* Background (no sample) pixels hold only baseline and noise, and are masked as unlabeled (128), following the
  paper's masking of spectra "not covered by sample". The mask is 255 on tumor pixels, 0 on other tissue. The
  background mask itself (``SpectralSpot.tissue``, :func:`tissue_mask`) is what the paper had for every spot,
  training spots included: it says where a sample is, not where tumor is, so CompSegNet may pool over it in training
  (:func:`core.models.compsegnet.mask_background`) without seeing a pixel label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from core.data.synth_rcm import NEGATIVE, POSITIVE, UNLABELED, _smooth_field

__all__ = ["SpectralSpot", "make_spectral_spot", "make_spectral_spots", "tissue_mask", "wavenumbers"]

_HIGH, _LOW = 1800.0, 948.0
_MEAN_ABSORBANCE = 0.1
_NOISE = 0.004
_PSF_SIGMA = 0.7

# Layout codes of _layout; the order is also the row order of the component spectra (background has none).
_BACKGROUND, _STROMA, _EPITHELIUM, _TUMOR = 0, 1, 2, 3

# Bands as (centre cm^-1, sigma cm^-1, amplitude); amplitudes are relative to amide I before normalisation.
_PROTEIN = ((1452.0, 12.0, 0.12), (1398.0, 14.0, 0.1), (1300.0, 20.0, 0.06))
_PHOSPHATE = ((1236.0, 16.0, 0.1), (1082.0, 16.0, 0.09))
_MUCIN = ((1040.0, 20.0, 0.12), (1075.0, 16.0, 0.08), (1372.0, 12.0, 0.04))
_COLLAGEN = ((1338.0, 8.0, 0.06), (1282.0, 10.0, 0.07), (1204.0, 10.0, 0.06), (1032.0, 18.0, 0.07))
_ESTER = ((1740.0, 10.0, 0.02),)

# Tumor vs epithelium: relative changes of the phosphate, mucin and amide II bands and a shift of amide I and II.
_TUMOR_PHOSPHATE, _TUMOR_MUCIN, _TUMOR_AMIDE_II, _TUMOR_SHIFT = 0.12, -0.3, 0.04, -1.5
# Per-pixel standard deviations along the same directions (relative change, and cm^-1 for the shift).
_VARY_PHOSPHATE, _VARY_MUCIN, _VARY_AMIDE_II, _VARY_SHIFT = 0.08, 0.2, 0.03, 1.25


@dataclass(frozen=True)
class SpectralSpot:
    """One TMA spot: absorbance image (channels, size, size) float32, mask (0/128/255 uint8), sample label.

    ``label`` is 1 for a cancer spot (the mask has a tumor pixel), else 0; ``tumor_fraction`` is the share of the
    tissue (non-background) pixels that are tumor.
    """

    image: np.ndarray
    mask: np.ndarray
    label: int
    tumor_fraction: float

    @property
    def tissue(self) -> np.ndarray:
        """(size, size) bool, True where the spot has sample: the background mask of section 2, inverted."""
        return tissue_mask(self.mask)


def tissue_mask(mask: np.ndarray) -> np.ndarray:
    """Where a spot's mask (0 / 128 / 255, or a set's mask read from disk) has sample: True on tumor (255) and
    other tissue (0), False on the background (128 or any other value: no sample, unlabeled)."""
    mask = np.asarray(mask)
    return (mask == NEGATIVE) | (mask == POSITIVE)


def wavenumbers(channels: int = 450) -> np.ndarray:
    """The channel axis in cm^-1, evenly spaced and descending from 1800 to 948 (450 channels as in the paper)."""
    if channels < 2:
        raise ValueError(f"a spectrum needs at least 2 channels, not {channels}")
    return np.linspace(_HIGH, _LOW, channels)


def _bands(axis: np.ndarray, bands: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    """Sum of Gaussian absorption bands evaluated on ``axis``."""
    centres, sigmas, amplitudes = (np.array(column)[:, None] for column in zip(*bands, strict=True))
    return (amplitudes * np.exp(-0.5 * ((axis[None, :] - centres) / sigmas) ** 2)).sum(axis=0)


def _area(bands: tuple[tuple[float, float, float], ...]) -> float:
    """Integrated absorbance of ``bands`` (analytic, so normalisation does not depend on the channel count)."""
    return float(sum(amplitude * sigma * np.sqrt(2.0 * np.pi) for _, sigma, amplitude in bands))


def _scaled(bands: tuple[tuple[float, float, float], ...], factor: float) -> tuple[tuple[float, float, float], ...]:
    """``bands`` with every amplitude multiplied by ``factor``."""
    return tuple((centre, sigma, amplitude * factor) for centre, sigma, amplitude in bands)


def _epithelial_bands(
    phosphate: float = 0.0, mucin: float = 0.0, amide_ii: float = 0.0, shift: float = 0.0
) -> tuple[tuple[float, float, float], ...]:
    """Epithelium bands with relative changes of phosphate, mucin and amide II and amide I/II moved by ``shift``."""
    amide = ((1655.0 + shift, 16.0, 1.0), (1545.0 + shift, 18.0, 0.55 * (1.0 + amide_ii)))
    return amide + _PROTEIN + _scaled(_PHOSPHATE, 1.0 + phosphate) + _scaled(_MUCIN, 1.0 + mucin) + _ESTER


def _spectra(channels: int) -> np.ndarray:
    """(7, channels) float32: stroma, epithelium and tumor spectra, then four directions of pixel variability.

    Each component is normalised to a mean absorbance of ``_MEAN_ABSORBANCE`` over 1800-948 cm^-1 (analytically, so
    that the channel count does not change it); a direction is the change of the epithelium spectrum for one standard
    deviation of pixel variability in band shift, phosphate, mucin or amide II content.
    """
    axis = wavenumbers(channels)
    scale = _MEAN_ABSORBANCE * (_HIGH - _LOW)

    def normalised(bands: tuple[tuple[float, float, float], ...]) -> np.ndarray:
        return _bands(axis, bands) * scale / _area(bands)

    stroma = ((1660.0, 17.0, 1.0), (1550.0, 18.0, 0.5)) + _PROTEIN + _scaled(_PHOSPHATE, 0.6) + _COLLAGEN + _ESTER
    epithelium = normalised(_epithelial_bands())
    tumor = normalised(_epithelial_bands(_TUMOR_PHOSPHATE, _TUMOR_MUCIN, _TUMOR_AMIDE_II, _TUMOR_SHIFT))
    rows = [normalised(stroma), epithelium, tumor]
    for change in (
        {"shift": _VARY_SHIFT},
        {"phosphate": _VARY_PHOSPHATE},
        {"mucin": _VARY_MUCIN},
        {"amide_ii": _VARY_AMIDE_II},
    ):
        rows.append(normalised(_epithelial_bands(**change)) - epithelium)
    return np.stack(rows).astype(np.float32)


def _layout(rng: np.random.Generator, size: int, cancer: bool) -> np.ndarray:
    """(size, size) int8 map of _BACKGROUND, _STROMA, _EPITHELIUM and _TUMOR pixels of one spot.

    The spot is a disk of radius U(0.35, 0.45) * size with a wobbly edge; crypts are the band 0.5 < f < 1.4 of a
    smooth field f (epithelium) around its peaks f >= 1.4 (lumen, no sample); tumor takes the top quantile of a field
    of 1-2 smooth bumps over the tissue, so that it covers exactly the drawn fraction of it.
    """
    yy = np.arange(size, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(size, dtype=np.float32)[None, :] + 0.5
    cy, cx = (0.5 + rng.uniform(-0.03, 0.03, size=2)) * size
    radius = rng.uniform(0.35, 0.45) * size
    edge = radius * (1.0 + 0.04 * _smooth_field(rng, size, size, size / 4.0))
    spot = np.hypot(yy - cy, xx - cx) < edge
    crypts = _smooth_field(rng, size, size, size / 12.0)
    layout = np.where(spot, _STROMA, _BACKGROUND).astype(np.int8)
    layout[spot & (crypts > 0.5)] = _EPITHELIUM
    layout[spot & (crypts >= 1.4)] = _BACKGROUND
    if cancer:
        tissue = layout != _BACKGROUND
        field = np.zeros((size, size), dtype=np.float32)
        for _ in range(int(rng.integers(1, 3))):
            angle, distance = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.0, 0.7) * radius
            by, bx = cy + distance * np.sin(angle), cx + distance * np.cos(angle)
            spread = rng.uniform(0.3, 0.6) * radius
            np.maximum(field, np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2.0 * spread**2)), out=field)
        field += 0.15 * _smooth_field(rng, size, size, size / 6.0)
        threshold = np.quantile(field[tissue], 1.0 - rng.uniform(0.1, 0.6))
        layout[tissue & (field > threshold)] = _TUMOR
    return layout


def _fields(rng: np.random.Generator, count: int, size: int, sigma: float) -> np.ndarray:
    """(count, size, size) zero-mean, unit-variance smooth random fields: white noise blurred by ``sigma`` px."""
    fields = ndi.gaussian_filter(rng.standard_normal((count, size, size), dtype=np.float32), (0.0, sigma, sigma))
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-6
    return fields


def _render(rng: np.random.Generator, layout: np.ndarray, channels: int) -> np.ndarray:
    """(channels, size, size) float32 absorbance image of ``layout``: one matrix product of spectra and weights.

    Weights per pixel: the three component abundances (blurred by the point spread) and the four variability
    coordinates, all times the thickness, then the baseline offset and slope; white noise is added last.
    """
    size = layout.shape[0]
    pixels = size * size
    abundance = np.stack([(layout == code).astype(np.float32) for code in (_STROMA, _EPITHELIUM, _TUMOR)])
    abundance = ndi.gaussian_filter(abundance, (0.0, _PSF_SIGMA, _PSF_SIGMA)).reshape(3, pixels)
    patient = 0.3 * rng.standard_normal((4, 1)).astype(np.float32)
    pixel = (_fields(rng, 4, size, 3.0) + rng.standard_normal((4, size, size), dtype=np.float32)) / np.sqrt(2.0)
    variation = (patient + pixel.reshape(4, pixels)) * abundance.sum(axis=0)
    thickness = rng.uniform(0.7, 1.3) * np.exp(0.2 * _fields(rng, 1, size, size / 8.0).reshape(pixels))
    thickness *= 1.0 + 0.05 * rng.standard_normal(pixels, dtype=np.float32)
    baseline = 0.005 * rng.standard_normal((2, 1)) + 0.003 * _fields(rng, 2, size, size / 6.0).reshape(2, pixels)
    weights = np.concatenate([np.concatenate([abundance, variation]) * thickness, baseline]).astype(np.float32)
    ramp = np.linspace(1.0, -1.0, channels, dtype=np.float32)[:, None]
    basis = np.concatenate([_spectra(channels).T, np.ones((channels, 1), np.float32), ramp], axis=1)
    image = basis @ weights
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= _NOISE
    image += noise
    return image.reshape(channels, size, size)


def make_spectral_spot(seed: int, size: int = 64, channels: int = 450, *, cancer: bool) -> SpectralSpot:
    """One synthetic infrared TMA spot; the same arguments give the same spot, and the mask does not depend on
    ``channels`` (the layout is drawn first).

    A cancer spot holds tumor on 10-60 % of its tissue pixels, a cancer-free spot none.
    """
    if size < 16:
        raise ValueError(f"a spot needs at least 16 x 16 px, not {size}")
    rng = np.random.default_rng(seed)
    layout = _layout(rng, size, cancer)
    image = _render(rng, layout, channels)
    mask = np.full((size, size), NEGATIVE, dtype=np.uint8)
    mask[layout == _BACKGROUND] = UNLABELED
    mask[layout == _TUMOR] = POSITIVE
    tissue = int(np.count_nonzero(layout != _BACKGROUND))
    tumor = int(np.count_nonzero(layout == _TUMOR))
    return SpectralSpot(image=image, mask=mask, label=int(tumor > 0), tumor_fraction=tumor / max(tissue, 1))


def make_spectral_spots(
    n: int, size: int = 64, channels: int = 450, *, seed: int = 0, positive_fraction: float = 0.5
) -> list[SpectralSpot]:
    """``n`` spots, exactly ``round(n * positive_fraction)`` of them cancer spots, in a shuffled order.

    Each spot gets its own independent seed spawned from ``seed`` (``numpy.random.SeedSequence``).
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, not {n}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must lie in [0, 1], not {positive_fraction}")
    order, *children = np.random.SeedSequence(seed).spawn(n + 1)
    cancer = np.random.default_rng(order).permutation(np.arange(n) < round(n * positive_fraction))
    return [
        make_spectral_spot(int(child.generate_state(1, np.uint64)[0]), size, channels, cancer=bool(flag))
        for child, flag in zip(children, cancer, strict=True)
    ]
