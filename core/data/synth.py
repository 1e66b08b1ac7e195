"""Synthetic intraoperative glioma cohort: paired NIR-II fluorescence and white-light specimen images with masks.

Why: the cohort of Shen et al., "Real-time intraoperative glioma diagnosis using fluorescence imaging and deep
convolutional neural networks" (Eur J Nucl Med Mol Imaging 2021; 23 patients, 1874 specimens, 1324 tumor), cannot be
downloaded, so the project generates one that looks like it, deterministic by seed and with the pixel-level ground
truth the study had to pay pathologists for.

What it models, following the paper's "Study design", "Surgical protocol" and "Data preprocessing" sections:

* A specimen is a resected piece of tissue, an irregular blob on a drape, 5-40 % of the frame.
* FL (uint16, an InGaAs NIR-II frame): an ambient-light offset over the whole frame plus ICG fluorescence of the
  tissue. Tumor tissue fluoresces more strongly and more patchily than normal tissue, but only *relatively*: patient
  ICG uptake and specimen distance scale the signal, ambient light lifts the whole frame, the exposure is shortened
  for bright specimens, and random white noise pixels sit on top: the confounders the paper's preprocessing
  (autocontrast, denoising, brightness/contrast augmentation) had to fight.
* Realistic confusion: some non-tumor specimens fluoresce (reactive tissue, ICG leakage; the neurosurgeons reading
  FL had specificity 0.61) and some tumors take up little ICG.
* Brightness is not specificity. ICG is given 48 h before surgery and tumor retains it behind leaky vessels, but
  normal tissue retains it too where its barrier was broken: the normal tissue of any specimen, tumor or not, can
  carry bright streaks along damaged vessels, ICG-laden clots at the cut margin and smooth reactive uptake; the
  room lights leave specular glare on wet tissue, and the excitation light falls off across the field. Each comes at
  the same rate whatever the label, so the brightest spot is often not the tumor and overall brightness is a weak
  cue; what stays specific is the tumor's patchy uptake over a region (issue 17). ``CohortConfig.confounders``
  turns this on (1, the demo's cohort, ``services.demo.DemoConfig``); the default, 0, is the earlier cohort draw
  for draw, so that tests and studies built on it keep their figures (see ``CohortConfig``).
* WL (RGB uint8): the same specimen photographed on a green drape or gauze; tumor is only weakly greyer and more
  purple-red with more vessels, so WL is less informative than FL (WL-CNN AUC 0.87 vs FL-CNN 0.945).
* Grade and Ki-67 leave weak traces: GBM is more heterogeneous with necrotic dark cores, Ki-67 >= 10 % is very
  slightly brighter. Labels cluster by patient (a patient-level tendency), which matters because splits are by
  patient.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.special import betaincinv, expit

__all__ = ["CohortConfig", "Specimen", "iter_specimens", "make_specimen", "write_cohort"]

_U16_MAX = 65535.0
_MANIFEST_HEADER = ("patient_id", "specimen_id", "modality", "path", "tumor", "grade", "ki67", "split", "mask_path")

# Patient-level label tendencies are Beta distributed around the configured rates; the concentration says how
# strongly specimens of one patient share labels (small = strongly clustered).
_TUMOR_CONCENTRATION = 8.0
_GBM_CONCENTRATION = 2.0
_KI67_CONCENTRATION = 4.0

# Fluorescence confusion and label traces (see _fluorescence): fractions of specimens whose FL misleads, and the
# signal gain of GBM and of Ki-67 >= 10 % tumor tissue.
_ICG_NEGATIVE_TUMOR = 0.04
_TUMOR_LIKE_NORMAL = 0.06
_FLUORESCENT_NORMAL = 0.2
# Non-specific signal, drawn at the same rates for tumor and non-tumor specimens (times ``CohortConfig.confounders``)
# so that none of it is a label cue: smooth uptake of reactive normal tissue, ICG along damaged vessels of normal
# tissue, ICG-laden clots at the cut margin, and specular glare of the room lights.
_NONSPECIFIC_UPTAKE = 0.35
_NORMAL_VESSELS = 0.3
_MARGIN_BLOOD = 0.6
_GLARE = 0.4
_GBM_GAIN = 1.3
_KI67_GAIN = 1.3
# Non-tumor specimens with a contused or cauterised, tumor-coloured patch in WL.
_DUSKY_NORMAL = 0.25
# Auto-exposure: the brightest tissue (99th percentile) is kept below this many counts, so frames rarely saturate.
_EXPOSURE_TARGET = 40000.0


@dataclass(frozen=True)
class CohortConfig:
    """Size, label rates and difficulty of a synthetic cohort.

    Label rates follow the paper: 1324/1874 specimens tumor, 99/932 graded tumors GBM, 364/869 Ki-67 >= 10 %.
    ``specimens_per_patient`` is an inclusive range drawn per patient (the paper took about 80 per patient).

    Difficulty knobs and how they move it:

    * ``contrast``: median tumor-to-normal fluorescence ratio. Higher makes tumor brighter than normal tissue and the
      task easier; 1.0 (or less) removes the intensity cue and leaves only texture.
    * ``noise``: scales detector shot/read noise and the density of white noise pixels (in FL) and sensor noise (in
      WL). Higher is harder; 0 gives clean images.
    * ``lesion_size``: mean fraction of a tumor specimen covered by tumor tissue (the mask). Smaller lesions dilute the
      tumor signal and make the task harder; near 1.0 whole specimens are tumor.
    * ``confounders``: scales the rates of non-specific FL signal (streaks along damaged vessels, clots at the cut
      margin, reactive uptake, glare), uneven excitation light and a wider spread of specimen gain. 0 (default) is
      the earlier cohort, where the tumor is simply the brightest region, draw for draw; 1 is the honest one.

    Cohort label rates vary by a few points between seeds because labels cluster by patient (over seeds 0-29: tumor
    0.70 +- 0.01, GBM 0.12 +- 0.02, Ki-67 >= 10 % 0.42 +- 0.03).

    Measured with the defaults (seed 0: 1249 specimens at 256 x 320; AUCs over all specimens, no patient split):

    * tumor vs non-tumor, simple statistics: background-subtracted 90th percentile of FL in the tissue 0.87, FL
      heterogeneity (p90 - p10) / (p50 - background) 0.92, logistic regression on five FL statistics 0.92 (5-fold
      CV), WL tissue hue (B - G) / R 0.75;
    * GBM vs DLGG among tumors: FL heterogeneity 0.82; Ki-67 >= 10 % vs < 10 %: FL 90th percentile 0.61;
    * a small CNN (four conv blocks, 64 x 80 input, 20 epochs from scratch, five held-out patients) reached test
      AUC 0.92 / 0.94 on FL and 0.91 / 0.91 on WL for seeds 0 / 1 (run-to-run spread about +-0.02): informative,
      short of perfect, FL ahead of WL but by less than in the paper (0.945 vs 0.873). ICG-negative tumors and
      tumor-like normals cap FL near 0.95.
    * the tumor is simply the brightest region: the brightest smoothed tissue pixel lies in the tumor mask for 99 %
      of the demo's test tumor specimens (issue 17).

    The same with ``confounders=1`` (seed 0, all 1249 specimens, measured when clots at the cut margin came at rate
    0.5): 90th percentile 0.76, heterogeneity 0.86, logistic regression on the five FL statistics 0.86, WL hue 0.74;
    GBM vs DLGG 0.80, Ki-67 0.59; the brightest smoothed tissue pixel (sigma 2.6 px) lay in the tumor for 72 % of
    tumor specimens (70.4 % on the demo's test split, one specimen over issue 17's 70 %). At the present rate, 0.6,
    on the demo's test split (249 specimens, 152 tumor): brightest pixel in the tumor 67 % (102 / 152), best
    intensity statistic the spread (p90 - p10), AUC 0.833. The
    FL paper's network did not learn it: on the demo's test split EfficientNet-B0 (128 px, 12 epochs) reached AUC
    0.73 against 0.84 for the best intensity statistic, and its Grad-CAM peak lay in the tumor for 12 % of tumor
    specimens. The demo's FL model, Tissue MIL at 256 px (:mod:`core.models.flmil`), beats the statistics and points
    at the tumor (``python -m bench.pointing``, figures in bench/README.md).
    """

    n_patients: int = 16
    specimens_per_patient: tuple[int, int] = (50, 100)
    height: int = 256
    width: int = 320
    tumor_rate: float = 0.7
    gbm_rate: float = 0.12
    ki67_high_rate: float = 0.42
    contrast: float = 3.0
    noise: float = 1.0
    lesion_size: float = 0.6
    confounders: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject configurations that cannot make a cohort, before any image is drawn."""
        lo, hi = self.specimens_per_patient
        if self.n_patients < 1 or not 1 <= lo <= hi:
            raise ValueError("need at least one patient and 1 <= specimens_per_patient[0] <= [1]")
        if min(self.height, self.width) < 16:
            raise ValueError("frames smaller than 16 px cannot hold a specimen")
        if not all(0.0 <= r <= 1.0 for r in (self.tumor_rate, self.gbm_rate, self.ki67_high_rate, self.lesion_size)):
            raise ValueError("rates and lesion_size must lie in [0, 1]")
        if self.contrast <= 0.0 or self.noise < 0.0 or self.confounders < 0.0:
            raise ValueError("contrast must be positive, noise and confounders non-negative")


@dataclass(frozen=True)
class Specimen:
    """One resected specimen: labels, its FL and WL images, and pixel-level ground truth.

    ``mask`` is 255 on tumor tissue (all zero for non-tumor specimens) and always lies inside ``tissue``.
    """

    patient_id: str
    specimen_id: str
    tumor: bool
    grade: str | None
    ki67: str | None
    fl: np.ndarray
    wl: np.ndarray
    mask: np.ndarray
    tissue: np.ndarray


@dataclass(frozen=True)
class _Patient:
    """Imaging conditions shared by all specimens of one patient (ICG uptake, room light, drape, camera)."""

    ambient: float
    uptake: float
    drape: tuple[float, float, float]
    gauze: bool
    white_balance: tuple[float, float, float]


@dataclass(frozen=True)
class _Geometry:
    """Specimen outline. ``tissue`` and ``soft`` (anti-aliased) cover the frame; the rest covers only ``box``.

    ``box`` is the specimen's bounding box with room for blur and shadow: tissue texture is drawn only there, which
    keeps generation fast. ``rho`` is the normalised radius (< 1 inside), ``dx``/``dy`` the offsets from the centre.
    """

    tissue: np.ndarray
    soft: np.ndarray
    box: tuple[slice, slice]
    rho: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    r0: float

    @property
    def inside(self) -> np.ndarray:
        """Tissue mask cropped to ``box``."""
        return self.tissue[self.box]


@dataclass(frozen=True)
class _Planned:
    """Labels and random stream of one specimen, fixed before any image is drawn."""

    patient_id: str
    specimen_id: str
    tumor: bool
    grade: str | None
    ki67: str | None
    seed: np.random.SeedSequence


def _field(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth zero-mean, unit-variance random field with correlation length ``cell`` pixels.

    Bicubic upsampling of a coarse white-noise grid: far cheaper than filtering a full-size frame.
    """
    cell = max(cell, 1.0)
    gh, gw = int(np.ceil(h / cell)) + 2, int(np.ceil(w / cell)) + 2
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    up = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC, box=(1, 1, gw - 1, gh - 1)))
    return (up - up.mean()) / (up.std() + 1e-6)


def _patient(seed: int, patient_id: str) -> _Patient:
    """Patient-level imaging conditions, derived from the cohort seed and the patient id alone.

    Deriving them from the id (not from the specimen stream) lets ``make_specimen`` be called on its own and still
    give every specimen of one patient the same ICG uptake, ambient light and drape.
    """
    rng = np.random.default_rng([seed, zlib.crc32(patient_id.encode())])
    drapes = ((0.12, 0.33, 0.22), (0.07, 0.22, 0.14), (0.09, 0.22, 0.34))
    gauze = bool(rng.random() < 0.2)
    drape = drapes[int(rng.integers(len(drapes)))]
    return _Patient(
        ambient=float(np.exp(rng.uniform(np.log(1000.0), np.log(4000.0)))),
        uptake=float(np.exp(rng.normal(0.0, 0.3))),
        drape=(0.78, 0.78, 0.76) if gauze else drape,
        gauze=gauze,
        white_balance=tuple(float(v) for v in np.exp(rng.normal(0.0, 0.04, 3))),
    )


def _geometry(rng: np.random.Generator, h: int, w: int) -> _Geometry:
    """Irregular specimen outline from a random radial Fourier contour with a rough, noisy edge."""
    frac = float(np.exp(rng.uniform(np.log(0.06), np.log(0.34))))
    r0 = float(np.sqrt(frac * h * w / np.pi))
    k = np.arange(2, 8)
    amp = rng.normal(0.0, 0.17, k.size) / k**0.8
    phase = rng.uniform(0.0, 2 * np.pi, k.size)
    theta = np.linspace(-np.pi, np.pi, 721)
    r_tab = np.maximum(1.0 + (amp[:, None] * np.cos(k[:, None] * theta + phase[:, None])).sum(0), 0.45)
    xs, ys = r_tab * np.cos(theta) * 1.12, r_tab * np.sin(theta) * 1.12  # 1.12: room for the rough edge
    margin = 3.0
    scale = min(r0, (w - 2 * margin) / np.ptp(xs), (h - 2 * margin) / np.ptp(ys))
    lo_x, lo_y = margin - scale * xs.min(), margin - scale * ys.min()
    cx = rng.uniform(lo_x, max(lo_x, w - margin - scale * xs.max()))
    cy = rng.uniform(lo_y, max(lo_y, h - margin - scale * ys.max()))
    pad = 6.0 + scale / 4
    y0, y1 = max(0, int(cy + scale * ys.min() - pad)), min(h, int(np.ceil(cy + scale * ys.max() + pad)))
    x0, x1 = max(0, int(cx + scale * xs.min() - pad)), min(w, int(np.ceil(cx + scale * xs.max() + pad)))
    dy, dx = np.ogrid[y0:y1, x0:x1]
    dx = (dx - cx).astype(np.float32)
    dy = (dy - cy).astype(np.float32)
    radius = np.interp(np.arctan2(dy, dx), theta, r_tab).astype(np.float32)
    rho = np.hypot(dx, dy) / (scale * radius)
    rho += 0.05 * np.clip(_field(rng, y1 - y0, x1 - x0, max(2.0, scale / 5)), -2.0, 2.0)
    box = (slice(y0, y1), slice(x0, x1))
    tissue = np.zeros((h, w), dtype=bool)
    tissue[box] = rho < 1.0
    soft = np.zeros((h, w), dtype=np.float32)
    soft[box] = gaussian_filter(tissue[box].astype(np.float32), 0.7)
    return _Geometry(tissue=tissue, soft=soft, box=box, rho=rho, dx=dx, dy=dy, r0=float(scale))


def _region(rng: np.random.Generator, geo: _Geometry, coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth sub-region covering about ``coverage`` of the tissue, in ``geo.box``: (hard mask, soft 0..1 weight).

    Infiltration comes from one side (a ramp in a random direction) plus smooth noise, so regions look like
    tumor margins rather than random speckle.
    """
    if coverage >= 0.97:
        return geo.inside.copy(), geo.soft[geo.box]
    angle = rng.uniform(0.0, 2 * np.pi)
    ramp = (geo.dx * np.cos(angle) + geo.dy * np.sin(angle)) / geo.r0
    score = _field(rng, *geo.rho.shape, geo.r0 * 0.6) + 1.6 * ramp
    q = float(np.quantile(score[geo.inside], 1.0 - coverage))
    return geo.inside & (score > q), expit((score - q) / 0.15)


def _blobs(rng: np.random.Generator, where: np.ndarray, n: int, radius: tuple[float, float]) -> np.ndarray:
    """Sum of ``n`` Gaussian blobs (peak 1) centred on random pixels of ``where``: necrotic cores, ICG spots."""
    out = np.zeros(where.shape, dtype=np.float32)
    pixels = np.flatnonzero(where)
    if n == 0 or pixels.size == 0:
        return out
    h, w = where.shape
    for flat in rng.choice(pixels, size=n):
        cy, cx = divmod(int(flat), w)
        r = rng.uniform(*radius)
        reach = int(3 * r) + 1
        window = (slice(max(0, cy - reach), min(h, cy + reach + 1)), slice(max(0, cx - reach), min(w, cx + reach + 1)))
        yy, xx = np.ogrid[window]
        out[window] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return out


def _coverage(rng: np.random.Generator, lesion_size: float) -> float:
    """Fraction of a specimen covered by a (tumor or tumor-like) region: Beta around ``lesion_size``, >0.9 -> all."""
    mean = float(np.clip(lesion_size, 0.05, 0.95))
    cover = float(np.clip(rng.beta(4.0 * mean, 4.0 * (1.0 - mean)), 0.15, 1.0))
    return 1.0 if cover > 0.9 else cover


def _patchy(rng: np.random.Generator, geo: _Geometry, ratio: float, het: float, cell: float) -> np.ndarray:
    """Relative ICG signal ``ratio`` x a mean-one log-normal texture of strength ``het`` (patchy uptake)."""
    h, w = geo.rho.shape
    texture = 0.9 * _field(rng, h, w, cell * geo.r0) + 0.44 * _field(rng, h, w, max(1.5, cell * geo.r0 / 4))
    return ratio * np.exp(het * texture - het * het / 2)


def _ramp(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Linear illumination gradient across the frame in a random direction, -0.5..0.5 corner to corner."""
    angle = rng.uniform(0.0, 2 * np.pi)
    yy, xx = np.ogrid[:h, :w]
    return ((xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle)).astype(np.float32) / max(h, w)


def _vessels(rng: np.random.Generator, geo: _Geometry) -> np.ndarray:
    """Branching curvilinear ridges (peak 1, 1-3 px wide) over a random share of ``geo.box``: damaged vessels.

    Ridges are the zero crossings of a smooth random field, gated by a second field so that vessels cover only part
    of the tissue.
    """
    ch, cw = geo.rho.shape
    ridge = np.exp(-((_field(rng, ch, cw, max(2.0, geo.r0 * 0.35)) / rng.uniform(0.06, 0.12)) ** 2))
    return ridge * expit(4.0 * (_field(rng, ch, cw, geo.r0 * 0.6) + rng.uniform(-0.3, 0.5)))


def _glare(rng: np.random.Generator, geo: _Geometry, h: int, w: int) -> np.ndarray:
    """Specular reflections of the room lights on wet tissue: 1-3 small spots near saturation, on the tissue's dome.

    Not fluorescence: added to the frame after the exposure is set, so they sit at 40-100 % of the detector range
    whatever the specimen's signal.
    """
    frame = np.zeros((h, w), dtype=np.float32)
    spots = _blobs(rng, geo.inside & (geo.rho < 0.7), int(rng.integers(1, 4)), (1.2, 2.5))
    frame[geo.box] = np.minimum(spots, 1.0) * geo.inside * rng.uniform(0.4, 1.0) * _U16_MAX
    return frame


def _nonspecific(
    rng: np.random.Generator, geo: _Geometry, soft: np.ndarray | None, contrast: float, rate: float
) -> np.ndarray:
    """Relative ICG signal of normal tissue that is not tumor: what makes "the brightest spot" a poor tumor finder.

    ICG was given 48 h before surgery (Shen et al. 2021, "Surgical protocol"), so a frame shows the dye that tissue
    retained: tumor retains it behind its leaky vessels, diffusely and patchily (:func:`_patchy`). Normal tissue
    retains it too wherever its barrier was broken, in forms unlike tumor: bright streaks along damaged and
    cauterised vessels, blood clots at the cut margin, and smooth uptake of reactive, oedematous tissue. These are
    drawn on the normal part of any specimen, tumor or not, each with its rate times ``rate`` whatever the label,
    and the streaks and clots can be brighter than tumor (a modelling choice: the paper reports only that FL
    specificity was limited, 0.61 for neurosurgeons). Returns the level to add in ``geo.box``.
    """
    ch, cw = geo.rho.shape
    normal = geo.inside.astype(np.float32) if soft is None else (1.0 - soft) * geo.inside
    extra = np.zeros((ch, cw), dtype=np.float32)
    if rng.random() < _NONSPECIFIC_UPTAKE * rate:
        _, region = _region(rng, geo, rng.uniform(0.3, 1.0))
        ratio = np.exp(rng.normal(0.6 * np.log(contrast), 0.3))
        extra += (_patchy(rng, geo, ratio, rng.uniform(0.05, 0.15), 0.6) - 1.0) * region * normal
    if rng.random() < _NORMAL_VESSELS * rate:
        extra += contrast * np.exp(rng.normal(0.6, 0.4)) * _vessels(rng, geo) * normal
    if rng.random() < _MARGIN_BLOOD * rate:
        margin = geo.inside & (geo.rho > 0.6) & (normal > 0.5)
        pools = _blobs(rng, margin, int(rng.integers(1, 4)), (1.5, 3.5))
        extra += contrast * np.exp(rng.normal(1.6, 0.4)) * np.minimum(pools, 1.0) * geo.inside
    return extra


def _fluorescence(
    rng: np.random.Generator,
    geo: _Geometry,
    soft: np.ndarray | None,
    grade: str | None,
    ki67: str | None,
    patient: _Patient,
    config: CohortConfig,
) -> np.ndarray:
    """NIR-II frame: ambient offset + gain x excitation x relative ICG signal + glare, shot, read and white noise.

    The relative signal is 1 on normal tissue. Tumor is ``contrast`` times brighter (log-normal spread) and
    patchier; GBM more so with necrotic dark cores, Ki-67 >= 10 % slightly brighter. Confusion the way the paper
    saw it: ICG-negative tumors look normal, and some non-tumor specimens fluoresce like tumor. Non-specific signal
    (:func:`_nonspecific`: vessels, blood, reactive uptake) and glare can outshine the tumor, and the excitation
    light falls off across the field, so neither the brightest spot nor the overall brightness is the tumor.
    """
    h, w = config.height, config.width
    ch, cw = geo.rho.shape
    r0 = geo.r0
    contrast = max(config.contrast, 1.0)
    level = 1.0 + rng.uniform(0.08, 0.3) * _field(rng, ch, cw, r0 * rng.uniform(0.2, 0.45))
    level += 0.06 * _field(rng, ch, cw, max(1.5, r0 * 0.06))
    if config.confounders > 0:  # nothing is drawn without them: confounders=0 is the earlier cohort, draw for draw
        level += _nonspecific(rng, geo, soft, contrast, config.confounders)
    if soft is not None:
        gbm = grade == "GBM"
        if rng.random() < _ICG_NEGATIVE_TUMOR:
            tumor = _patchy(rng, geo, np.exp(rng.normal(0.15, 0.2)), rng.uniform(0.1, 0.3), 0.3)
        else:
            ratio = contrast * np.exp(rng.normal(0.0, 0.4)) * (_GBM_GAIN if gbm else 1.0)
            ratio *= _KI67_GAIN if ki67 == ">=10" else 1.0
            tumor = _patchy(rng, geo, ratio, rng.uniform(0.45, 0.85) if gbm else rng.uniform(0.2, 0.55), 0.22)
        if rng.random() < (0.75 if gbm else 0.1):
            cores = _blobs(rng, soft > 0.5, int(rng.integers(1, 4)), (0.08 * r0, 0.2 * r0))
            tumor *= 1.0 - 0.85 * np.minimum(cores, 1.0)
        level += (tumor - level) * soft
    else:
        kind = rng.random()
        if kind < _TUMOR_LIKE_NORMAL:
            _, fp_soft = _region(rng, geo, _coverage(rng, config.lesion_size))
            fp = _patchy(rng, geo, contrast * np.exp(rng.normal(0.0, 0.4)), rng.uniform(0.2, 0.55), 0.22)
            level += (fp - level) * fp_soft
        elif kind < _TUMOR_LIKE_NORMAL + _FLUORESCENT_NORMAL:
            _, fp_soft = _region(rng, geo, rng.uniform(0.3, 1.0))
            fp = _patchy(rng, geo, np.exp(rng.normal(0.5 * np.log(contrast), 0.35)), rng.uniform(0.1, 0.35), 0.3)
            level += (fp - level) * fp_soft
    if rng.random() < 0.35:
        level += rng.uniform(1.5, 5.0) * _blobs(rng, geo.inside, int(rng.integers(1, 5)), (1.0, max(1.5, r0 * 0.05)))
    thickness = 0.4 + 0.6 * np.sqrt(np.clip((1.0 - geo.rho) / 0.3, 0.0, 1.0))
    excitation = 1.0
    if config.confounders > 0:  # the laser spot is not flat
        excitation = np.exp(min(config.confounders, 1.0) * rng.uniform(0.3, 0.8) * 2.0 * _ramp(rng, h, w))[geo.box]
    # distance, angle and drying of the specimen vary: more so in the honest cohort
    gain = 5000.0 * patient.uptake * np.exp(rng.normal(0.0, 0.25 + 0.25 * min(config.confounders, 1.0)))
    ambient = patient.ambient * np.exp(rng.normal(0.0, 0.2))
    frame = ambient * (1.0 + 0.3 * _ramp(rng, h, w) + 0.04 * _field(rng, h, w, max(h, w) / 4))
    tissue_soft = geo.soft[geo.box]
    signal = gaussian_filter(gain * excitation * np.maximum(level, 0.05) * thickness * tissue_soft, 1.0)
    frame[geo.box] += ambient * rng.uniform(0.05, 0.3) * tissue_soft + signal
    peak = np.percentile(frame[geo.box][geo.inside], 99) if geo.inside.any() else 0.0
    if peak > _EXPOSURE_TARGET:  # the operator shortens the exposure: absolute intensity is lost, ratios are kept
        frame *= _EXPOSURE_TARGET / peak
    if config.confounders > 0 and rng.random() < _GLARE * config.confounders:
        frame = np.maximum(frame, _glare(rng, geo, h, w))
    frame += config.noise * (np.sqrt(4.0 * frame) + 40.0) * rng.standard_normal((h, w), dtype=np.float32)
    n_white = rng.poisson(config.noise * 0.0015 * h * w)
    frame.flat[rng.integers(0, h * w, n_white)] = rng.uniform(0.25, 1.0, n_white) * _U16_MAX
    return np.clip(np.rint(frame), 0, _U16_MAX).astype(np.uint16)


def _white_light(
    rng: np.random.Generator,
    geo: _Geometry,
    soft: np.ndarray | None,
    grade: str | None,
    patient: _Patient,
    config: CohortConfig,
) -> np.ndarray:
    """RGB photo: drape or gauze, a shaded pink-white specimen with vessels and blood spots, weak tumor tint.

    Tumor tissue is tinted greyer and more purple-red ("dusky"), a little more granular and richer in vessels and
    blood spots (GBM most), each by a random amount; some normal specimens carry a dusky contusion too. So WL
    carries less tumor information than FL.
    """
    h, w = config.height, config.width
    ch, cw = geo.rho.shape
    r0 = geo.r0
    folds = 1.0 + 0.12 * _field(rng, h, w, max(h, w) / 4) + 0.05 * _field(rng, h, w, max(h, w) / 12)
    weave = 0.03 * rng.standard_normal((h, w), dtype=np.float32)
    if patient.gauze:
        yy, xx = np.ogrid[:h, :w]
        weave += 0.07 * np.sin(xx * 1.9) * np.sin(yy * 1.9)
    photo = np.asarray(patient.drape, dtype=np.float32) * (folds + weave)[..., None]
    shadow = gaussian_filter(np.roll(geo.inside.astype(np.float32), (2, 3), axis=(0, 1)), max(1.0, r0 / 12))
    photo[geo.box] *= (1.0 - 0.45 * shadow)[..., None]

    white = np.array([0.93, 0.81, 0.75], np.float32) * np.exp(rng.normal(0.0, 0.03, 3)).astype(np.float32)
    grey = np.array([0.80, 0.56, 0.53], np.float32) * np.exp(rng.normal(0.0, 0.04, 3)).astype(np.float32)
    mix = expit(1.5 * _field(rng, ch, cw, r0 * 0.35) + rng.normal(0.0, 1.0))[..., None]
    tissue = white + (grey - white) * mix
    grain, vessel_width, spot_level = 0.03, 0.04, rng.uniform(2.0, 2.8)
    dusky = np.array([0.68, 0.50, 0.56], np.float32)
    if soft is not None:
        tissue += (dusky - tissue) * (rng.uniform(0.2, 0.65) * soft[..., None])
        grain += 0.03 * rng.random()
        vessel_width += 0.03 * rng.random()
        spot_level -= 0.3 + (0.25 if grade == "GBM" else 0.0)
    elif rng.random() < _DUSKY_NORMAL:
        _, bruise = _region(rng, geo, rng.uniform(0.2, 0.8))
        tissue += (dusky - tissue) * (rng.uniform(0.1, 0.5) * bruise[..., None])
    tissue *= (1.0 + grain * _field(rng, ch, cw, max(1.5, r0 * 0.05)))[..., None]
    gate = _field(rng, ch, cw, r0 * 0.6) > 0.3
    vessels = np.exp(-((_field(rng, ch, cw, r0 * 0.45) / vessel_width) ** 2)) * gate
    tissue += (np.array([0.60, 0.16, 0.17], np.float32) - tissue) * (rng.uniform(0.3, 0.7) * vessels)[..., None]
    blood = _field(rng, ch, cw, max(1.5, r0 * 0.1)) + 0.35 * _field(rng, ch, cw, max(1.5, r0 * 0.03))
    spots = expit((blood - spot_level) * 8.0)
    tissue += (np.array([0.42, 0.07, 0.08], np.float32) - tissue) * (0.85 * spots)[..., None]

    dome = np.clip(1.0 - geo.rho, 0.0, 1.0)
    dome *= 2.0 - dome
    gy, gx = np.gradient(dome)
    shade = np.clip(0.82 + 0.18 * dome - 0.12 * (gx + gy) * r0, 0.6, 1.1)
    specular = np.clip(_field(rng, ch, cw, max(1.5, r0 * 0.04)) - 2.5, 0.0, None) * (dome > 0.3)
    tissue = tissue * shade[..., None] + 0.8 * specular[..., None]
    crop = photo[geo.box]
    crop += (tissue - crop) * geo.soft[geo.box][..., None]

    light = rng.uniform(0.85, 1.1) * (1.0 + 0.2 * _ramp(rng, h, w))
    photo *= light[..., None] * np.asarray(patient.white_balance, np.float32)
    photo += config.noise * 0.012 * rng.standard_normal((h, w, 3), dtype=np.float32)
    return np.clip(np.rint(photo * 255.0), 0, 255).astype(np.uint8)


def make_specimen(
    rng: np.random.Generator,
    tumor: bool,
    grade: str | None,
    ki67: str | None,
    config: CohortConfig,
    patient_id: str = "P000",
    specimen_id: str = "P000-S000",
) -> Specimen:
    """Draw one specimen with the given labels: outline, tumor region, FL and WL images and masks.

    Patient-level conditions (ICG uptake, ambient light, drape) come from ``config.seed`` and ``patient_id``, so
    specimens of one patient share them however they are generated.
    """
    if tumor != (grade is not None) or tumor != (ki67 is not None):
        raise ValueError("grade and ki67 must be given exactly for tumor specimens")
    h, w = config.height, config.width
    patient = _patient(config.seed, patient_id)
    geo = _geometry(rng, h, w)
    mask = np.zeros((h, w), dtype=bool)
    soft = None
    if tumor:
        mask[geo.box], soft = _region(rng, geo, _coverage(rng, config.lesion_size))
    fl = _fluorescence(rng, geo, soft, grade, ki67, patient, config)
    wl = _white_light(rng, geo, soft, grade, patient, config)
    return Specimen(
        patient_id=patient_id,
        specimen_id=specimen_id,
        tumor=tumor,
        grade=grade,
        ki67=ki67,
        fl=fl,
        wl=wl,
        mask=mask.astype(np.uint8) * 255,
        tissue=geo.tissue.astype(np.uint8) * 255,
    )


def _tendencies(rng: np.random.Generator, n: int, mean: float, concentration: float) -> np.ndarray:
    """Per-patient probabilities from Beta(mean, concentration), stratified so the cohort mean stays near ``mean``.

    Plain Beta draws over 16 patients would let a clustered label (GBM) swing between 3 % and 25 %; stratified
    quantiles keep the clustering but not the swing.
    """
    if mean <= 0.0 or mean >= 1.0:
        return np.full(n, float(np.clip(mean, 0.0, 1.0)))
    u = (rng.permutation(n) + rng.random(n)) / n
    return betaincinv(mean * concentration, (1.0 - mean) * concentration, u)


def _plan(config: CohortConfig) -> list[_Planned]:
    """Labels and per-specimen seeds of the whole cohort, drawn before any image (so the total is known)."""
    labels_ss, images_ss = np.random.SeedSequence(config.seed).spawn(2)
    rng = np.random.default_rng(labels_ss)
    n = config.n_patients
    lo, hi = config.specimens_per_patient
    counts = rng.integers(lo, hi + 1, n)
    p_tumor = _tendencies(rng, n, config.tumor_rate, _TUMOR_CONCENTRATION)
    p_gbm = _tendencies(rng, n, config.gbm_rate, _GBM_CONCENTRATION)
    p_ki67 = _tendencies(rng, n, config.ki67_high_rate, _KI67_CONCENTRATION)
    plan = []
    for i, patient_ss in enumerate(images_ss.spawn(n)):
        patient_id = f"P{i + 1:03d}"
        for j, specimen_ss in enumerate(patient_ss.spawn(int(counts[i]))):
            tumor = bool(rng.random() < p_tumor[i])
            gbm, ki67_high = rng.random() < p_gbm[i], rng.random() < p_ki67[i]
            plan.append(
                _Planned(
                    patient_id=patient_id,
                    specimen_id=f"{patient_id}-S{j + 1:03d}",
                    tumor=tumor,
                    grade=("GBM" if gbm else "DLGG") if tumor else None,
                    ki67=(">=10" if ki67_high else "<10") if tumor else None,
                    seed=specimen_ss,
                )
            )
    return plan


def _draw(planned: _Planned, config: CohortConfig) -> Specimen:
    """Render one planned specimen from its own random stream."""
    rng = np.random.default_rng(planned.seed)
    labels = (planned.tumor, planned.grade, planned.ki67)
    return make_specimen(rng, *labels, config, planned.patient_id, planned.specimen_id)


def iter_specimens(config: CohortConfig) -> Iterator[Specimen]:
    """Yield the cohort's specimens patient by patient; the same ``config`` always yields the same specimens.

    Every specimen has its own seed spawned from ``config.seed``, so a specimen does not change when another
    patient's specimen count does.
    """
    for planned in _plan(config):
        yield _draw(planned, config)


def write_cohort(config: CohortConfig, out_dir: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the cohort as PNGs (16-bit FL, RGB WL, 0/255 masks) plus ``manifest.csv``; return the manifest path.

    The manifest has one FL and one WL row per specimen with paths relative to ``out_dir``; ``split`` is left empty
    because splits are assigned per patient by the caller.
    """
    out_dir = Path(out_dir)
    for sub in ("fl", "wl", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    plan = _plan(config)
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_MANIFEST_HEADER)
        for done, planned in enumerate(plan, start=1):
            s = _draw(planned, config)
            mask_path = f"masks/{s.specimen_id}.png"
            Image.fromarray(s.fl).save(out_dir / "fl" / f"{s.specimen_id}.png", compress_level=1)
            Image.fromarray(s.wl).save(out_dir / "wl" / f"{s.specimen_id}.png", compress_level=1)
            Image.fromarray(s.mask).save(out_dir / mask_path, compress_level=1)
            for modality in ("FL", "WL"):
                writer.writerow(
                    (
                        s.patient_id,
                        s.specimen_id,
                        modality,
                        f"{modality.lower()}/{s.specimen_id}.png",
                        int(s.tumor),
                        s.grade or "",
                        s.ki67 or "",
                        "",
                        mask_path,
                    )
                )
            if progress is not None:
                progress(done, len(plan))
    return manifest
