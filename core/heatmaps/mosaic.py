"""Whole-mosaic heatmaps: sliding-window class activation maps stitched with Gaussian weights.

Implements "Inference of segmentation labels in mosaics" of D'Alonzo et al., "Semantic segmentation of reflectance
confocal microscopy mosaics of pigmented lesions using weak labels" (seed paper 002). A patch classifier trained on
256 px patches is slid over the mosaic ("Sliding window processing", steps of 25, 50 or 100 px); each window's CAM
C_w is min-max normalised, multiplied by the window's class probability p_w ("boost the CAMs for aspecific patches
while suppressing those for benign patches"), weighted by a 2-D Gaussian g_w centred on the window ("Gaussian
weighting") and averaged where windows overlap:

    M(x) = sum_w g_w(x) p_w C_w(x) / sum_w g_w(x),        M(x) = 0 where no window covers x.

Readings of what the paper leaves open:

* Windows sit at ``top = 0, step, 2 step, ...`` while they fit; there is no extra window flush with the far edge,
  so a margin narrower than ``step`` can stay uncovered (and 0). 2048 px, window 256, step 25: 72 x 72 = 5,184.
* ``sigma``: the paper's Table 2 tries sigma = 1 ... 10 on 256 px windows, finds sigma = 1 indistinguishable from no
  Gaussian, the AUC falling off beyond 8, and "unrealistic" results beyond 10. Read in pixels, sigma = 1 would be a
  needle, the opposite of no Gaussian; read as a multiple of the window it would be flat throughout. The reading
  consistent with the table is a concentration: the Gaussian's standard deviation is ``window / sigma`` px (sigma =
  1: 256 px, edge weight 0.88, nearly uniform; sigma = 5: 51 px; sigma = 10: 25.6 px, edge weight 4e-6).
  ``sigma=None`` is the paper's "no Gaussian" (plain averaging). The weight is ``exp(-d^2 / (2 (window/sigma)^2))``
  per axis, d measured from the window centre ``(window - 1) / 2``, floored at 1e-12 so a pixel seen only by
  window edges keeps a defined value.
* p_w: the sigmoid of a one-logit binary model's logit (the paper's "aspecific" probability), or the softmax
  probability of class 1 for a multi-class model; C_w explains class 1 (the registry's default target).
* Preprocessing: the mosaic is scaled to [0, 1] by its dtype range as :func:`core.data.preprocess.to_model_array`
  does for RCM (uint8 / 255, uint16 / 65535, floats in [0, 1] kept, other floats min-max stretched over the whole
  mosaic), then :func:`core.data.preprocess.standardize` (``(x - 0.5) / 0.25`` for single-channel modalities). This
  is per pixel, so a window cut from the standardised mosaic equals a 256 px training patch standardised on its own.

Modes:

* ``exact`` (the reference): every window is cropped and explained by a registered heatmap method
  (:func:`core.heatmaps.get_method`), ``batch_size`` windows per forward pass; ``loop`` does the same one window
  at a time (batch 1). Both accumulate chunk by chunk into the output, never holding all windows' maps.
* ``fast``: the network is convolutional, so overlapping windows share most of their computation. The trunk's
  first stages run once over the whole mosaic, in tiles of ``tile`` px with a ``halo`` of context (default: one
  window, so every feature sees at least the context a window would give it). How much is shared is ``share``:

  - Partly shared (default, ``share=16``): the stages up to stride 16 run once; per window, its footprint on that
    feature map (starting at the node nearest its corner: exact at multiples of 16, else shifted by at most 8 px)
    runs through the remaining stages, then CAM, the registry's normalisation and the weighted average, as in exact
    mode. Why not share everything: a network trained on isolated patches learns its deep features with the
    patch's zero-padded border around them, and computed with the mosaic around them instead they stop localising.
    Measured on an EfficientNet-B2 trained for four epochs on 128 px synthetic patches (``python -m bench.mosaic
    --b2``: 768 px mosaic, step 32): pixel AUC 0.983 exact, 0.770 with the whole trunk shared, 0.975 with share=16,
    0.985 with 8, 0.981 with 4, at 3.2, 2.0 and 1.7 x less time than exact. tiny_cnn (receptive field 15 px)
    localises the same either way. Window probabilities still differ (by up to 0.69 with share=16, 0.44 with 8): the
    shared stages see context. A classifier trained with context (``services.mosaic.train_patch_classifier(...,
    context=32)``: the trunk over the window and 32 px of mosaic around it, only the window's feature cells pooled)
    learns features that hold with the mosaic around them: whole trunk shared, pixel AUC 0.984 against 0.983 for the
    plain network's per-window loop, in 68 x less time than the loop (step 16, ``python -m bench.mosaic --parity``).
  - Whole trunk shared (``share=None``, or a share at least the trunk's stride, as for tiny_cnn): the required
    design, cheapest by far. The classifier weights reduce each tile's features at once to the CAM of Zhou et al.
    (CVPR 2016, eq. 2: M_c = sum_k w_k^c f_k), so only a (classes, H/s, W/s) map is kept (s, the trunk's stride, is
    read from the first window's feature map), and per window, from that map alone:

    - p_w: the classifier on the window's mean feature vector, which (the head being linear) is the mean of the
      CAM over the window's own feature centres plus the bias. For windows at offsets not divisible by s, the map
      is sampled bilinearly there (``torchvision.ops.roi_align`` with ``aligned=True`` and one sample per bin,
      written as small interpolation matrices).
    - C_w: R, the ReLU'd CAM upsampled bilinearly once for the whole mosaic (``align_corners=False``, as the
      registry upsamples each window), restricted to the window and min-max normalised over it. m_w and M_w are
      the exact extremes of R over the window's box, found without forming R: R is bilinear between feature-node
      centres, so they lie on the pixels beside node centres or on the box edges (a few dozen per axis).

    The stitched sum then has a closed form: with C_w(x) = (R(x) - m_w) / (M_w - m_w),

        sum_w g_w(x) p_w C_w(x) = R(x) S1(x) - S2(x),   S1 = sum_w g_w a_w,  S2 = sum_w g_w b_w,
        a_w = p_w / (M_w - m_w),  b_w = p_w m_w / (M_w - m_w)   (0 for a flat window, as the registry's min-max),

    and S1, S2 and the denominator are separable sums of the window kernel over the window grid: banded matrix
    products (Ky^T A Kx), evaluated in float64 (a nearly flat window has a huge a_w whose terms must cancel) band
    by band at full resolution. No window's 256 x 256 map is ever formed.

  Sampling phase (whole trunk shared): a stride-s trunk sees a window that starts at an offset not divisible by s
  at another sampling phase, and its map is not an interpolation of the phase-0 map but a different, shifted one;
  exact mode averages those phases, which smooths the stitched map (exact's pixel AUC rises at such steps).
  ``phases=P`` runs the trunk P x P times, on the mosaic shifted by multiples of s / P px in each axis, and serves
  each window from the pass nearest its own phase; R then differs per pass, so the closed form sums R_q S1_q over
  passes (S2 and the denominator are shared). P = s / gcd(step, s) puts every window at its own phase at P^2 times
  the trunk cost (tiny_cnn, stride 8, step 25: pixel AUC 0.972 with P = 1, 0.979 with 2, 0.982 with 4, 0.986 with
  8, exact 0.986); steps that are multiples of s need P = 1. Tried and dropped: one shift-and-stitch map at stride
  s / 2 for all windows (finer R) lowered the AUC.

  Fast mode computes CAM; for a model whose head is global average pooling and one linear layer (every registered
  model; checked on the first window) Grad-CAM's channel weights are w_k / (h w) (Selvaraju et al. 2017, sec. 3.1),
  the same map up to a positive factor that min-max removes, so ``method`` may be ``cam`` or ``gradcam``. Score-CAM
  and other methods need ``mode="exact"``. Partly sharing needs the trunk as a sequence of stages: recognised for
  the registry's EfficientNets and ``model.features`` trunks, checked against ``forward_features``. What still
  differs from exact, by design: shared stages see the mosaic around a window instead of zero padding (the
  "boundary conditions" the paper's Gaussian compensates), and with the whole trunk shared, within s/2 px of a
  window edge R interpolates towards the neighbouring feature where a window's own upsampling clamps.

Memory (12,000 x 12,000 px): the output map (float32, 576 MB) is the only full-size array; the mosaic is read and
standardised tile by tile (so a ``numpy.memmap`` works) and the trunk holds one tile's activations. The shared
features are kept whole: the (classes, H/s, W/s) CAMs (tiny), or with ``share=16`` the stride-16 feature map
(EfficientNet-B2: 120 channels, 270 MB float32 at 12,000 px). The closed form writes the map band by band (about
2 M pixels per band, float64 working arrays); the per-window modes accumulate chunk by chunk into the map itself and
divide by the separable denominator at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.data.preprocess import channels_for, standardize
from core.heatmaps.base import as_numpy, fuse, get_method

__all__ = [
    "FAST_METHODS",
    "MODES",
    "MosaicResult",
    "WindowGrid",
    "gaussian_profile",
    "stitch_mosaic",
    "window_probability_map",
]

MODES = ("fast", "exact", "loop")
FAST_METHODS = ("cam", "gradcam")
_WEIGHT_FLOOR = 1e-12
_FLAT_SPAN = 1e-12
_HEAD_RTOL = 1e-3
_BAND_PIXELS = 1 << 21
_SAMPLE_BUDGET = 1 << 22


@dataclass(frozen=True)
class MosaicResult:
    """A stitched mosaic heatmap.

    ``map`` is (H, W) float32 in [0, 1]; ``window_probabilities`` is (rows, cols) float32, the class probability of
    the window whose top-left corner is ``(row * step, col * step)``; ``seconds`` is the wall time of the call;
    ``share`` and ``phases`` are the fast mode's settings (None and 1 for the exact modes).
    """

    map: np.ndarray
    window_probabilities: np.ndarray
    seconds: float
    device: str
    mode: str
    method: str
    window: int
    step: int
    sigma: float | None
    share: int | None = None
    phases: int = 1


@dataclass(frozen=True)
class WindowGrid:
    """The sliding windows over an ``height`` x ``width`` mosaic: top-left corners every ``step`` px while the
    ``window`` still fits (no extra window flush with the far edge)."""

    height: int
    width: int
    window: int
    step: int

    def __post_init__(self) -> None:
        if self.window < 1 or self.step < 1:
            raise ValueError(f"window and step must be positive, not {self.window} and {self.step}")
        if self.window > min(self.height, self.width):
            raise ValueError(f"a {self.window} px window does not fit a {self.height} x {self.width} mosaic")

    @property
    def tops(self) -> np.ndarray:
        return np.arange(0, self.height - self.window + 1, self.step)

    @property
    def lefts(self) -> np.ndarray:
        return np.arange(0, self.width - self.window + 1, self.step)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.tops), len(self.lefts)

    @property
    def count(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def corner(self, index: int) -> tuple[int, int]:
        """(top, left) of window ``index`` in row-major order."""
        row, col = divmod(index, self.shape[1])
        return int(self.tops[row]), int(self.lefts[col])


def gaussian_profile(window: int, sigma: float | None) -> np.ndarray:
    """The per-axis window weight (float64, length ``window``); the 2-D weight is its outer product.

    ``exp(-d^2 / (2 (window / sigma)^2))`` with d the distance to the window centre, floored at 1e-12; all ones for
    ``sigma=None`` (the paper's "no Gaussian"). See the module docstring for why the deviation is window / sigma.
    """
    if sigma is None:
        return np.ones(window, dtype=np.float64)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive (or None for no Gaussian), not {sigma}")
    distance = np.arange(window, dtype=np.float64) - (window - 1) / 2.0
    return np.maximum(np.exp(-0.5 * (distance * sigma / window) ** 2), _WEIGHT_FLOOR)


def stitch_mosaic(
    model: nn.Module,
    image: np.ndarray,
    *,
    window: int = 256,
    step: int = 50,
    sigma: float | None = 5.0,
    mode: str = "fast",
    method: str = "cam",
    target_layer: nn.Module | Sequence[nn.Module] | None = None,
    batch_size: int = 32,
    tile: int = 1024,
    halo: int | None = None,
    share: int | None = 16,
    phases: int = 1,
    modality: str = "RCM",
    progress: Callable[[int, int], None] | None = None,
) -> MosaicResult:
    """The stitched class-1 heatmap of a whole mosaic (D'Alonzo et al., "Sliding window processing" and "Gaussian
    weighting"; module docstring for the equation, the reading of ``sigma`` and the modes).

    ``image`` is (H, W) or (C, H, W), uint8, uint16 or float, with C the modality's channels. The model runs where
    its parameters are (CPU or CUDA), in eval mode (its train/eval flag is restored afterwards). ``mode``: ``fast``
    (shared trunk, closed-form stitching; ``method`` must be in :data:`FAST_METHODS`), ``exact`` (every window
    through ``get_method(method)``, ``batch_size`` at a time) or ``loop`` (the same, one window at a time).
    ``target_layer`` is the layer (or, for multi-layer methods, the layers) exact-mode methods hook; None means the
    trunk output (``forward_features``), the layer the model registry names for every registered architecture.
    ``tile`` and ``halo`` (default: one window) bound the fast trunk's memory: its input is at most ``tile + 2 halo``
    px square. ``share`` (fast): the trunk stages up to this stride run once over the mosaic and the rest per
    window; None shares the whole trunk (closed form; also taken when ``share`` reaches the trunk's stride).
    ``phases`` (closed form only): trunk passes per axis at shifts of stride / phases px, each window served by the
    pass nearest its sampling phase (cost x phases^2). ``progress(done, total)`` is called as trunk tiles, output
    bands or windows complete, ending at ``(total, total)``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "fast" and method not in FAST_METHODS:
        raise ValueError(f"fast mode computes CAM ({', '.join(FAST_METHODS)}); use mode='exact' for {method!r}")
    if batch_size < 1 or tile < 1 or phases < 1 or (halo is not None and halo < 0):
        raise ValueError("batch_size, tile and phases must be positive and halo non-negative")
    source = _Source(image, modality)
    grid = WindowGrid(source.height, source.width, window, step)
    profile = gaussian_profile(window, sigma)
    device = next(model.parameters()).device
    was_training = model.training
    began = time.perf_counter()
    model.eval()
    try:
        if mode == "fast":
            heatmap, probabilities = _fast(
                model,
                source,
                grid,
                profile,
                tile,
                window if halo is None else halo,
                share,
                phases,
                batch_size,
                progress,
            )
        else:
            size = 1 if mode == "loop" else batch_size
            heatmap, probabilities = _exact(model, source, grid, profile, method, target_layer, size, progress)
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return MosaicResult(
        map=heatmap,
        window_probabilities=probabilities.reshape(grid.shape).astype(np.float32),
        seconds=time.perf_counter() - began,
        device=device.type,
        mode=mode,
        method=method,
        window=window,
        step=step,
        sigma=sigma,
        share=share if mode == "fast" else None,
        phases=phases if mode == "fast" else 1,
    )


def window_probability_map(result: MosaicResult, height: int, width: int) -> np.ndarray:
    """The sliding-window classifier's own map, without any CAM: each window's probability spread over the window by
    the same Gaussian weighting, ``M(x) = sum_w g_w(x) p_w / sum_w g_w(x)`` (0 where no window reaches), (H, W)
    float32. It is the baseline a CAM must beat to add localisation beyond classifying overlapping windows."""
    grid = WindowGrid(height, width, result.window, result.step)
    if result.window_probabilities.shape != grid.shape:
        raise ValueError(f"{result.window_probabilities.shape} window probabilities for a {grid.shape} window grid")
    kernel = torch.as_tensor(gaussian_profile(result.window, result.sigma), dtype=torch.float64)
    down = _placement(grid.tops, grid.window, height, kernel)
    across = _placement(grid.lefts, grid.window, width, kernel)
    probabilities = torch.as_tensor(result.window_probabilities, dtype=torch.float64)
    numerator = down.T @ probabilities @ across
    denominator = down.sum(dim=0)[:, None] * across.sum(dim=0)[None, :]
    heatmap = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), 0.0)
    return heatmap.clamp(0.0, 1.0).float().numpy()


class _Source:
    """The mosaic as (C, H, W) in its own dtype, cut and standardised on demand (never copied whole)."""

    def __init__(self, image: np.ndarray, modality: str) -> None:
        array = image[None] if image.ndim == 2 else image
        channels = channels_for(modality)
        if array.ndim != 3 or array.shape[0] != channels:
            raise ValueError(f"{modality} mosaics are (H, W) or ({channels}, H, W), not {tuple(image.shape)}")
        self.array = array
        self.modality = modality
        self.channels, self.height, self.width = (int(n) for n in array.shape)
        self.offset, self.scale = _unit_scale(array)

    def crops(self, corners: list[tuple[int, int]], height: int, width: int, device: torch.device) -> torch.Tensor:
        """Standardised (B, C, height, width) float32 crops with the given top-left corners, on ``device``."""
        stack = np.stack([self.array[:, t : t + height, s : s + width] for t, s in corners])
        return self._standardise(torch.from_numpy(stack).to(device))

    def region(self, top: int, bottom: int, left: int, right: int, device: torch.device) -> torch.Tensor:
        """The standardised (1, C, h, w) region ``[top:bottom, left:right]``."""
        return self._standardise(
            torch.from_numpy(np.ascontiguousarray(self.array[:, top:bottom, left:right]))[None].to(device)
        )

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        unit = (x.float() - self.offset) * self.scale
        return standardize(unit.clamp_(0.0, 1.0), self.modality)


def _unit_scale(array: np.ndarray) -> tuple[float, float]:
    """(offset, scale) mapping the mosaic to [0, 1] as ``to_model_array`` maps CLE/RCM images: by the dtype range,
    floats in [0, 1] as they are, other floats min-max stretched (over the whole mosaic, not per tile)."""
    if array.dtype == np.uint8:
        return 0.0, 1.0 / 255.0
    if array.dtype == np.uint16:
        return 0.0, 1.0 / 65535.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"mosaics are uint8, uint16 or float, not {array.dtype}")
    low, high = float(array.min()), float(array.max())
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    return low, 1.0 / (high - low) if high > low else 0.0


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class-1 probability of (B, K) logits: sigmoid of a single logit, else softmax."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)[:, 1]


def _coverage(grid: WindowGrid, profile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis sums of the window weight over the grid: the denominator is their outer product (0 = uncovered)."""
    rows = np.zeros(grid.height, dtype=np.float64)
    cols = np.zeros(grid.width, dtype=np.float64)
    for top in grid.tops:
        rows[top : top + grid.window] += profile
    for left in grid.lefts:
        cols[left : left + grid.window] += profile
    return rows, cols


class _Trunk(nn.Module):
    """``model.forward_features`` as a module of its own, so exact-mode hooks attach here and not on the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _Split(nn.Module):
    """The model as ``forward_head(trunk(x))``: the same logits and classifier, with the trunk output as a hookable
    layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.trunk = _Trunk(model)

    def get_classifier(self) -> nn.Module:
        return self.trunk.model.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.model.forward_head(self.trunk(x))


def _exact(
    model: nn.Module,
    source: _Source,
    grid: WindowGrid,
    profile: np.ndarray,
    method: str,
    target_layer: nn.Module | Sequence[nn.Module] | None,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every window through the registered method, accumulated chunk by chunk (:func:`_stitch_windows`)."""
    device = next(model.parameters()).device
    network, layer = (model, target_layer) if target_layer is not None else _split(model)
    size = grid.window
    with get_method(method)(network, layer) as explain:

        def windows(corners: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                batch = source.crops(corners, size, size, device)
            result = explain(batch)
            return _probabilities(torch.from_numpy(result.logits)).numpy(), result.maps

        return _stitch_windows(windows, grid, profile, batch_size, 0, progress)


def _stitch_windows(
    windows: Callable[[list[tuple[int, int]]], tuple[np.ndarray, np.ndarray]],
    grid: WindowGrid,
    profile: np.ndarray,
    batch_size: int,
    done: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's weighted average, window by window: ``windows(corners)`` gives a chunk's probabilities and
    (B, window, window) maps in [0, 1]; ``g p C`` is added to the numerator, which is divided by the separable
    denominator at the end. ``done`` steps of ``progress`` precede the windows."""
    weight = np.outer(profile, profile).astype(np.float32)
    numerator = np.zeros((grid.height, grid.width), dtype=np.float32)
    probabilities = np.zeros(grid.count, dtype=np.float32)
    size = grid.window
    for start in range(0, grid.count, batch_size):
        corners = [grid.corner(i) for i in range(start, min(start + batch_size, grid.count))]
        chosen, maps = windows(corners)
        probabilities[start : start + len(corners)] = chosen
        for (top, left), p, heat in zip(corners, chosen, maps, strict=True):
            numerator[top : top + size, left : left + size] += (p * weight) * heat
        if progress:
            progress(done + start + len(corners), done + grid.count)
    rows, cols = _coverage(grid, profile)
    band = max(1, _BAND_PIXELS // grid.width)
    for top in range(0, grid.height, band):
        denominator = np.outer(rows[top : top + band], cols)
        covered = denominator > 0
        numerator[top : top + band] = np.where(
            covered, numerator[top : top + band] / np.where(covered, denominator, 1), 0
        )
    return numerator, probabilities


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module | Sequence[nn.Module]]:
    """The model wrapped so that its trunk output is a layer, and that layer."""
    adapter = _Split(model)
    return adapter, adapter.trunk


def _fast(
    model: nn.Module,
    source: _Source,
    grid: WindowGrid,
    profile: np.ndarray,
    tile: int,
    halo: int,
    share: int | None,
    phases: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The trunk's stages up to stride ``share`` once over the mosaic and the rest per window
    (:func:`_partly_shared`), or, when every stage is shared, CAM at feature resolution and closed-form stitching
    (module docstring)."""
    device = next(model.parameters()).device
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise ValueError("fast mode needs a linear classifier after global average pooling; use mode='exact'")
    with torch.inference_mode():
        probe = source.crops([(0, 0)], grid.window, grid.window, device)
        stride = _stride(model, classifier, probe)
        if share is not None and share < stride:
            if phases != 1:
                raise ValueError("phases apply when the whole trunk is shared (share=None)")
            return _partly_shared(model, classifier, source, grid, profile, tile, halo, share, batch_size, progress)
        if stride % phases:
            raise ValueError(f"phases={phases} does not divide the trunk's stride {stride}")
        groups = _phase_groups(grid, stride, phases)
        tiles = [_tiles(source, group.dy, group.dx, tile, stride) for group in groups]
        total = sum(len(corners) for corners in tiles) + math.ceil(source.height / max(1, _BAND_PIXELS // source.width))
        tick = _counter(total, progress)
        weight = classifier.weight.float()

        def cams(x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("kc,bchw->bkhw", weight, model.forward_features(x).float())

        for group, corners in zip(groups, tiles, strict=True):
            group.cams = _tiled(cams, source, group.dy, group.dx, corners, tile, halo, stride, device, tick)
        positive = 0 if classifier.out_features == 1 else 1
        rows, cols = grid.shape
        logits = torch.zeros((classifier.out_features, rows, cols), dtype=torch.float64, device=device)
        low = torch.zeros((rows, cols), dtype=torch.float64, device=device)
        high = torch.zeros_like(low)
        for group in groups:
            cell = np.ix_(group.rows, group.cols)
            tops, lefts = grid.tops[group.rows] - group.dy, grid.lefts[group.cols] - group.dx
            logits[(slice(None), *cell)] = _window_logits(group.cams, classifier, tops, lefts, grid.window, stride)
            group.relu = torch.relu(group.cams[positive].double())
            low[cell], high[cell] = _window_range(group.relu, tops, lefts, grid.window, stride)
        probabilities = _probabilities(logits.permute(1, 2, 0).reshape(-1, logits.shape[0])).reshape(grid.shape)
        span = high - low
        flat = span <= _FLAT_SPAN
        a = torch.where(flat, 0.0, probabilities / torch.where(flat, 1.0, span))
        b = a * low
        heatmap = _closed_form(groups, a, b, grid, profile, stride, tick)
    return heatmap, probabilities.float().cpu().numpy().ravel()


def _counter(total: int, progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    """A ``tick()`` that reports one more step of ``total`` to ``progress``."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    return tick


def _partly_shared(
    model: nn.Module,
    classifier: nn.Linear,
    source: _Source,
    grid: WindowGrid,
    profile: np.ndarray,
    tile: int,
    halo: int,
    share: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stages up to stride ``share`` once over the mosaic (tiles with halo); per window, its footprint on that
    feature map runs through the remaining stages, so the deep layers see the window's own borders as in training;
    then CAM, the registry's normalisation (:func:`core.heatmaps.base.fuse`) and the paper's weighted average.

    The footprint starts at the feature node nearest the window's corner: exact at multiples of the stride, else
    the window's content shifted by at most stride / 2 px (its map stays at the window's true position). Sampling
    the footprint bilinearly instead (``roi_align``) feeds the deep layers blurred features they never saw in
    training: measured worse once (trained EfficientNet-B2, step 25, share 8: pixel AUC 0.958 against 0.982
    nearest, exact 0.989)."""
    device = next(model.parameters()).device
    stages = _stages(model, source.crops([(0, 0)], grid.window, grid.window, device))
    shared = [stage for stage, stride in stages if stride <= share]
    if not shared:
        raise ValueError(f"share={share} px is below the stride of the trunk's first stage ({stages[0][1]})")
    stride = stages[len(shared) - 1][1]
    lower, upper = nn.Sequential(*shared), nn.Sequential(*(stage for stage, _ in stages[len(shared) :]))
    corners = _tiles(source, 0, 0, tile, stride)
    tick = _counter(len(corners) + grid.count, progress)
    features = _tiled(lower, source, 0, 0, corners, tile, halo, stride, device, tick)
    positive = 0 if classifier.out_features == 1 else 1
    count = grid.window // stride

    last_row, last_col = features.shape[1] - count, features.shape[2] - count

    def windows(chunk: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        nodes = [
            (min((top + stride // 2) // stride, last_row), min((left + stride // 2) // stride, last_col))
            for top, left in chunk
        ]
        crops = torch.stack([features[:, r : r + count, c : c + count] for r, c in nodes])
        deep = upper(crops).float()
        chosen = _probabilities(classifier(deep.mean(dim=(2, 3))))
        raw = torch.relu(torch.einsum("c,bchw->bhw", classifier.weight[positive].float(), deep))
        return as_numpy(chosen), as_numpy(fuse([raw], (grid.window, grid.window)))

    return _stitch_windows(windows, grid, profile, batch_size, len(corners), progress)


def _stages(model: nn.Module, probe: torch.Tensor) -> list[tuple[nn.Module, int]]:
    """The trunk as a sequence of stages with the stride of each one's output, for the registry's architectures:
    timm EfficientNets (stem, blocks, head) and models whose trunk is ``model.features`` (tiny_cnn). Checked
    against ``forward_features`` on ``probe``."""
    parts = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
    if all(hasattr(model, name) for name in parts) and isinstance(model.blocks, nn.Sequential):
        stages = [nn.Sequential(model.conv_stem, model.bn1), *model.blocks, nn.Sequential(model.conv_head, model.bn2)]
    elif isinstance(getattr(model, "features", None), nn.Sequential):
        stages = list(model.features)
    else:
        raise ValueError("sharing part of the trunk needs an EfficientNet or a model.features trunk; use share=None")
    x, strides = probe, []
    for stage in stages:
        x = stage(x)
        strides.append(probe.shape[-1] // x.shape[-1])
    if not torch.allclose(x, model.forward_features(probe), rtol=1e-4, atol=1e-4):
        raise ValueError("the model's trunk is not the sequence of its stages; use share=None")
    return list(zip(stages, strides, strict=True))


@dataclass
class _Phase:
    """The windows served by one trunk pass over the mosaic shifted by (dy, dx) px: their row and column indices
    in the grid, and once computed the pass's CAMs (K, h, w) and ReLU'd class map (float64)."""

    dy: int
    dx: int
    rows: np.ndarray
    cols: np.ndarray
    cams: torch.Tensor | None = None
    relu: torch.Tensor | None = None


def _phase_groups(grid: WindowGrid, stride: int, phases: int) -> list[_Phase]:
    """Windows grouped by the trunk pass that serves them: each axis offset ``start mod stride`` is rounded to the
    nearest multiple of ``stride / phases`` (the pass's shift; never beyond the window's own start)."""

    def assign(starts: np.ndarray) -> np.ndarray:
        unit = stride // phases
        shift = (np.round((starts % stride) / unit).astype(np.int64) % phases) * unit
        return np.where(shift > starts, 0, shift)

    down, across = assign(grid.tops), assign(grid.lefts)
    return [
        _Phase(int(dy), int(dx), np.flatnonzero(down == dy), np.flatnonzero(across == dx))
        for dy in np.unique(down)
        for dx in np.unique(across)
    ]


def _stride(model: nn.Module, classifier: nn.Linear, probe: torch.Tensor) -> int:
    """The trunk's stride, read from the first window's feature map, after checking the head is GAP + linear."""
    window = probe.shape[-1]
    features = model.forward_features(probe)
    height, width = features.shape[-2:]
    if height != width or window % height:
        raise ValueError(f"a {window} px window gives a {height} x {width} feature map: not an integer stride")
    direct = model(probe)
    pooled = classifier(features.mean(dim=(2, 3)))
    if not torch.allclose(direct, pooled, rtol=_HEAD_RTOL, atol=_HEAD_RTOL * float(direct.abs().max().clamp_min(1))):
        raise ValueError("the model's head is not global average pooling + its classifier; use mode='exact'")
    return window // height


def _tiles(source: _Source, dy: int, dx: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the trunk tiles over the mosaic shifted by (dy, dx); ``tile`` rounded to the stride."""
    tile = max(stride, tile // stride * stride)
    return [(top, left) for top in range(0, source.height - dy, tile) for left in range(0, source.width - dx, tile)]


def _tiled(
    trunk: Callable[[torch.Tensor], torch.Tensor],
    source: _Source,
    dy: int,
    dx: int,
    corners: list[tuple[int, int]],
    tile: int,
    halo: int,
    stride: int,
    device: torch.device,
    tick: Callable[[], None],
) -> torch.Tensor:
    """``trunk`` (stride ``stride``) over the mosaic shifted by (dy, dx), tile by tile: each tile runs with ``halo``
    px of context on every side (rounded up to the stride) and keeps its own part of the output. Returns the
    (channels, ceil(h / stride), ceil(w / stride)) map of the shifted mosaic; ``tick()`` after each tile."""
    tile, halo = max(stride, tile // stride * stride), math.ceil(halo / stride) * stride
    height, width = source.height - dy, source.width - dx
    output = torch.empty(0)
    for top, left in corners:
        bottom, right = min(top + tile, height), min(left + tile, width)
        y0, x0 = max(0, top - halo), max(0, left - halo)
        y1, x1 = min(height, bottom + halo), min(width, right + halo)
        result = trunk(source.region(dy + y0, dy + y1, dx + x0, dx + x1, device))[0]
        if result.shape[-2] * stride < y1 - y0 or result.shape[-1] * stride < x1 - x0:
            raise ValueError(f"the trunk maps {y1 - y0} x {x1 - x0} px to {tuple(result.shape[-2:])}, not 1/{stride}")
        if not output.numel():
            shape = (result.shape[0], math.ceil(height / stride), math.ceil(width / stride))
            output = torch.zeros(shape, dtype=result.dtype, device=result.device)
        r0, c0 = top // stride, left // stride
        r1, c1 = math.ceil(bottom / stride), math.ceil(right / stride)
        oy, ox = (top - y0) // stride, (left - x0) // stride
        output[:, r0:r1, c0:c1] = result[:, oy : oy + r1 - r0, ox : ox + c1 - c0]
        tick()
    return output


def _bilinear(positions: torch.Tensor, size: int) -> torch.Tensor:
    """(*positions.shape, size) float64 weights interpolating an axis of ``size`` nodes linearly at fractional node
    ``positions`` (clamped to the first and last node, as ``align_corners=False`` upsampling clamps)."""
    position = positions.clamp(0.0, size - 1)
    lower = position.floor()
    fraction = position - lower
    upper = (lower + 1).clamp(max=size - 1)
    weights = torch.zeros((*position.shape, size), dtype=torch.float64, device=position.device)
    weights.scatter_add_(-1, lower.long()[..., None], (1.0 - fraction)[..., None])
    weights.scatter_add_(-1, upper.long()[..., None], fraction[..., None])
    return weights


def _window_logits(
    cams: torch.Tensor, classifier: nn.Linear, tops: np.ndarray, lefts: np.ndarray, window: int, stride: int
) -> torch.Tensor:
    """(K, rows, cols) logits of the windows at ``tops`` x ``lefts`` (in the CAMs' pixel frame): the classifier on
    each window's mean feature vector, which (being linear) is the mean of the CAMs sampled at the window's own
    feature centres ``top / stride + t`` in node units, plus the bias (roi_align with aligned=True and one sample
    per bin; exact for windows at multiples of the stride)."""
    device = cams.device
    steps = torch.arange(window // stride, dtype=torch.float64, device=device)
    down = torch.as_tensor(tops, dtype=torch.float64, device=device)[:, None] / stride + steps
    across = torch.as_tensor(lefts, dtype=torch.float64, device=device)[:, None] / stride + steps
    down, across = _bilinear(down, cams.shape[1]).mean(dim=1), _bilinear(across, cams.shape[2]).mean(dim=1)
    logits = torch.einsum("ia,kab,jb->kij", down, cams.double(), across)
    return logits if classifier.bias is None else logits + classifier.bias.double()[:, None, None]


def _box_candidates(starts: np.ndarray, window: int, stride: int) -> np.ndarray:
    """(windows, 2 (window / stride + 1) + 2) pixel positions where the extremes of a map upsampled bilinearly from
    stride ``stride`` over ``[start, start + window)`` can lie: the pixels on either side of every node centre
    inside, and the two ends. Between them the map is linear along this axis."""
    nodes = starts[:, None] // stride + np.arange(window // stride + 1)[None, :]
    centres = stride * nodes + (stride - 1) / 2.0
    ends = np.stack([starts, starts + window - 1], axis=1)
    candidates = np.concatenate([np.floor(centres), np.ceil(centres), ends], axis=1)
    return np.clip(candidates, starts[:, None], starts[:, None] + window - 1).astype(np.int64)


def _window_range(
    relu: torch.Tensor, tops: np.ndarray, lefts: np.ndarray, window: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) min and max of R, ``relu`` upsampled bilinearly to full resolution, over the box of each window
    at ``tops`` x ``lefts`` (in the map's pixel frame).

    Exact, without forming R: R is bilinear between node centres, so its extremes over a box lie on the product of
    the per-axis candidates of :func:`_box_candidates`. R is evaluated on the union of candidate rows x columns,
    reduced over each window's columns, then over its rows."""
    device = relu.device
    rows = _box_candidates(tops, window, stride)
    cols = _box_candidates(lefts, window, stride)
    ys, y_index = np.unique(rows, return_inverse=True)
    xs, x_index = np.unique(cols, return_inverse=True)

    def nodes(pixels: np.ndarray) -> torch.Tensor:
        return (torch.as_tensor(pixels, dtype=torch.float64, device=device) + 0.5) / stride - 0.5

    values = _bilinear(nodes(ys), relu.shape[0]) @ relu @ _bilinear(nodes(xs), relu.shape[1]).T
    x_index = torch.as_tensor(x_index.reshape(cols.shape), device=device)
    low_by_row = torch.empty((len(ys), len(lefts)), dtype=torch.float64, device=device)
    high_by_row = torch.empty_like(low_by_row)
    chunk = max(1, _SAMPLE_BUDGET // x_index.numel())
    for start in range(0, len(ys), chunk):
        block = values[start : start + chunk][:, x_index]
        low_by_row[start : start + chunk] = block.amin(dim=2)
        high_by_row[start : start + chunk] = block.amax(dim=2)
    y_index = torch.as_tensor(y_index.reshape(rows.shape), device=device)
    return low_by_row[y_index].amin(dim=1), high_by_row[y_index].amax(dim=1)


def _closed_form(
    groups: list[_Phase],
    a: torch.Tensor,
    b: torch.Tensor,
    grid: WindowGrid,
    profile: np.ndarray,
    stride: int,
    tick: Callable[[], None],
) -> np.ndarray:
    """M = (sum_phases R S1 - S2) / D band by band at full resolution (module docstring), clipped to [0, 1]; each
    phase's R multiplies the S1 of the windows it serves."""
    device = a.device
    kernel = torch.as_tensor(profile, dtype=torch.float64, device=device)
    down = _placement(grid.tops, grid.window, grid.height, kernel)
    across = _placement(grid.lefts, grid.window, grid.width, kernel)
    firsts = [a[np.ix_(group.rows, group.cols)] @ across[group.cols] for group in groups]
    second = b @ across
    rows_weight, cols_weight = down.sum(dim=0), across.sum(dim=0)
    heatmap = np.zeros((grid.height, grid.width), dtype=np.float32)
    band = max(1, _BAND_PIXELS // grid.width)
    for top in range(0, grid.height, band):
        bottom = min(top + band, grid.height)
        near = np.flatnonzero((grid.tops < bottom) & (grid.tops + grid.window > top))
        if near.size:
            value = -(down[near, top:bottom].T @ second[near])
            for group, first in zip(groups, firsts, strict=True):
                mine = np.flatnonzero((grid.tops[group.rows] < bottom) & (grid.tops[group.rows] + grid.window > top))
                if mine.size:
                    s1 = down[group.rows[mine], top:bottom].T @ first[mine]
                    value += s1 * _upsample_rows(group.relu, top, bottom, grid.width, stride, group.dy, group.dx)
            denominator = rows_weight[top:bottom, None] * cols_weight[None, :]
            value = torch.where(denominator > 0, (value / denominator.clamp_min(1e-300)).clamp(0.0, 1.0), 0.0)
            heatmap[top:bottom] = value.float().cpu().numpy()
        tick()
    return heatmap


def _placement(starts: np.ndarray, window: int, length: int, kernel: torch.Tensor) -> torch.Tensor:
    """(windows, length) float64: row w holds the window kernel at ``starts[w]``, zeros elsewhere."""
    placed = torch.zeros((len(starts), length), dtype=torch.float64, device=kernel.device)
    index = torch.as_tensor(starts, device=kernel.device)[:, None] + torch.arange(window, device=kernel.device)
    placed.scatter_(1, index, kernel.expand(len(starts), window).contiguous())
    return placed


def _upsample_rows(
    relu: torch.Tensor, top: int, bottom: int, width: int, stride: int, dy: int, dx: int
) -> torch.Tensor:
    """Rows ``top:bottom`` (first ``width`` columns) of R: ``relu``, computed on the mosaic shifted by (dy, dx),
    upsampled by ``stride`` (bilinear, align_corners=False) and moved back by (dy, dx). Only the few feature rows
    needed are upsampled; outside the shifted mosaic the edge is replicated (no window of the phase reaches there)."""
    start, stop = top - dy, bottom - dy
    first = min(max(0, start // stride - 1), relu.shape[0] - 1)
    last = max(min(relu.shape[0], math.ceil(stop / stride) + 1), first + 1)
    rows = F.interpolate(relu[None, None, first:last], scale_factor=stride, mode="bilinear", align_corners=False)
    pad_top, pad_bottom = max(0, first * stride - start), max(0, stop - last * stride)
    pad_right = max(0, width - dx - rows.shape[-1])
    if pad_top or pad_bottom or dx or pad_right:
        rows = F.pad(rows, (dx, pad_right, pad_top, pad_bottom), mode="replicate")
    begin = start - first * stride + pad_top
    return rows[0, 0, begin : begin + bottom - top, :width]
