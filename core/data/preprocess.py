"""Modality preprocessing and training augmentation for the specimen classifiers.

Implements the "Data preprocessing" section of the FL-CNN paper (EfficientNet-B0 on fluorescence (FL) and white-light
(WL) specimen images): FL intensities are normalised nonlinearly, autocontrasted and denoised; at training time FL
batches get random brightness and contrast "with a range of factor 1.0", random vertical flips and crops "with a
padding of 16", WL batches random flips, rotations and crops; at test time non-square images are zero-padded to a
square. The paper leaves most details open; each function's docstring says which reading was chosen and why.

One pipeline serves both training and inference, so the two cannot drift apart:
``image -> to_model_array -> pad_to_square -> resize -> standardize`` (:func:`prepare`), and at training time
``train_augment(...)(prepare_batch(...), generator)``. :func:`display_image` is what a person sees and what heatmaps
are drawn on: the same pixels the model saw, before padding and resizing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core.data.io import Image, ImageError

__all__ = [
    "AUGMENT_POLICIES",
    "MODALITIES",
    "autocontrast",
    "channels_for",
    "denoise",
    "display_image",
    "fl_normalize",
    "pad_to_square",
    "prepare",
    "prepare_batch",
    "square_box",
    "standardize",
    "to_model_array",
    "train_augment",
]

MODALITIES = ("FL", "WL", "CLE", "RCM")

_DESCRIPTIONS = {
    "FL": "fluorescence intensity",
    "CLE": "confocal laser endomicroscopy",
    "RCM": "reflectance confocal microscopy",
}
_FL_FLOOR_PERCENTILE = 1.0
_FL_PEAK_PERCENTILE = 99.9
_GREY_LEVELS_UINT8 = 2
_GREY_FRACTION = 0.01
_INTENSITY_MEAN = 0.5
_INTENSITY_STD = 0.25
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)
# compare-exchange pairs whose result leaves the median of nine values in position 4
_MEDIAN9_NETWORK = (
    (1, 2),
    (4, 5),
    (7, 8),
    (0, 1),
    (3, 4),
    (6, 7),
    (1, 2),
    (4, 5),
    (7, 8),
    (0, 3),
    (5, 8),
    (4, 7),
    (3, 6),
    (1, 4),
    (2, 5),
    (4, 7),
    (4, 2),
    (6, 4),
    (4, 2),
)


def _modality(modality: str) -> str:
    """The canonical (upper-case) modality name; unknown names are a programming error."""
    canonical = modality.upper()
    if canonical not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    return canonical


def channels_for(modality: str) -> int:
    """Input channels of a modality's model: 3 for WL colour photos, 1 for intensity images (FL, CLE, RCM)."""
    return 3 if _modality(modality) == "WL" else 1


def fl_normalize(array: np.ndarray) -> np.ndarray:
    """Nonlinear normalisation of fluorescence intensities to float32 in [0, 1].

    The paper says only that FL pixel values are detector intensities, not 0-255 grey levels, that they "must be
    normalized nonlinearly", and that ambient light raises the whole image. The reading chosen here, in three steps:

    1. Ambient floor: subtract the 1st percentile. Ambient light and the camera's dark level add a near-constant
       offset to every pixel, and the darkest percent of a specimen photo is background, so this removes the offset
       whatever its size (a percentile, not the minimum, so a few dead pixels do not set it).
    2. Robust scale: divide by the 99.9th percentile minus the floor and clip to [0, 1]. A fixed detector range
       (65535) would leave a weak 16-bit signal as a nearly black image; the maximum would let a single hot pixel (the
       paper's "randomly appeared white noises") darken everything. Absolute brightness is deliberately given up: the
       paper calls the tumour/non-tumour differences "only relative, not absolute", and its training jitters
       brightness by a factor up to 2 anyway.
    3. Square-root compression (gamma 0.5). Fluorescence counts are Poisson, and the square root is the
       variance-stabilising transform (Anscombe): noise becomes about equally strong at all intensities, so faint
       tissue signal is lifted without the dark-noise blow-up of a logarithm, and the 3x3 median in :func:`denoise`
       sees uniform noise.

    Every step is monotone non-decreasing in the input and deterministic. An image without contrast (all zero or
    constant) maps to all zeros instead of dividing by zero. Works on any shape; percentiles pool all values.
    """
    x = np.asarray(array, dtype=np.float32)
    if x.size == 0:
        return x.copy()
    floor, peak = (float(v) for v in np.percentile(x, [_FL_FLOOR_PERCENTILE, _FL_PEAK_PERCENTILE]))
    span = peak - floor
    if not span > 0:
        span = float(x.max()) - floor
    if not span > 0:
        return np.zeros(x.shape, dtype=np.float32)
    y = np.clip((x - np.float32(floor)) / np.float32(span), 0.0, 1.0)
    return np.sqrt(y).astype(np.float32, copy=False)


def autocontrast(x: np.ndarray, cutoff: float = 0.5) -> np.ndarray:
    """Percentile stretch to [0, 1], ignoring ``cutoff`` percent of the values at each tail (float32 out).

    The paper's "autocontrast" to normalise the whole contrast of the image, read as Pillow's
    ``ImageOps.autocontrast(cutoff=...)`` on float data: the ``cutoff`` and ``100 - cutoff`` percentiles map to 0 and
    1, values beyond are clipped. Percentiles pool all channels, so a colour image keeps its colour balance. An image
    without contrast between those percentiles is returned clipped to [0, 1] but otherwise unchanged, as Pillow does.
    """
    if not 0.0 <= cutoff < 50.0:
        raise ValueError(f"cutoff is a percentage per tail in [0, 50), not {cutoff}")
    values = np.asarray(x, dtype=np.float32)
    if values.size == 0:
        return values.copy()
    low, high = (float(v) for v in np.percentile(values, [cutoff, 100.0 - cutoff]))
    if not high > low:
        return np.clip(values, 0.0, 1.0)
    return np.clip((values - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32, copy=False)


def denoise(x: np.ndarray) -> np.ndarray:
    """Remove isolated white-noise pixels with a 3x3 median filter (per channel; dtype kept).

    The paper's "image denoising" of randomly appearing white noise, read as impulse noise: a single outlier pixel
    never survives a 3x3 median, while edges between specimen and background are kept (a mean or Gaussian filter
    would smear the outlier instead). The cost, some texture at the one-pixel scale, is lost anyway when the image is
    resized to the network input. Borders are mirrored so the edge of the image is not darkened.

    Computed exactly, as ``scipy.ndimage.median_filter(size=3, mode="reflect")`` would, but by the 19
    compare-exchange sorting network for nine values (Paeth, Graphics Gems 1990) on shifted views: about ten times
    faster, which matters because the filter is most of an FL diagnosis's preprocessing time.
    """
    values = np.asarray(x)
    height, width = values.shape[:2]
    padded = np.pad(values, [(1, 1), (1, 1)] + [(0, 0)] * (values.ndim - 2), mode="symmetric")
    v = [padded[i : i + height, j : j + width] for i in range(3) for j in range(3)]
    for i, j in _MEDIAN9_NETWORK:
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
    return np.ascontiguousarray(v[4])


def square_box(height: int, width: int) -> tuple[int, int, int]:
    """``(top, left, side)``: where an image of this size sits inside its centred, zero-padded square.

    The one definition of the padding geometry, so heatmaps computed on the padded square can be cropped back to the
    image (``square[top:top + height, left:left + width]``). An odd margin puts the extra pixel at the bottom/right.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, not {height} x {width}")
    side = max(height, width)
    return (side - height) // 2, (side - width) // 2, side


def pad_to_square(x: np.ndarray) -> np.ndarray:
    """Zero-pad (H, W) or (H, W, C) to a centred square, as the paper does for non-square images at test time.

    Zero here is black in [0, 1] intensity space, before standardisation: it matches the dark background of
    fluorescence images and the zero padding of the training crops, rather than the dataset mean.
    """
    height, width = x.shape[:2]
    top, left, side = square_box(height, width)
    square = np.zeros((side, side) + x.shape[2:], dtype=x.dtype)
    square[top : top + height, left : left + width] = x
    return square


def to_model_array(image: Image, modality: str) -> np.ndarray:
    """The image as float32 (H, W, C) in [0, 1] with C = ``channels_for(modality)``, before padding and resizing.

    The modality rule:

    - FL, CLE and RCM models take single-channel intensity. A single-channel image is used as is. An RGB image whose
      channels agree (grey saved as RGB: channel spread at most 2 of 255 levels, or 1 % of the range for 16-bit and
      float) is reduced to the channel mean. A real colour photo is refused with an :class:`ImageError` that says to
      upload the right image or choose a WL model, because a photo would otherwise be scored as if it were
      fluorescence.
    - FL intensity: uint16/float through :func:`fl_normalize`, :func:`autocontrast` and :func:`denoise`. A uint8 FL
      image is already a display rendering made by the imaging software, so it is only scaled by 1/255 before the
      same autocontrast and denoise (a second nonlinear compression would distort it). The paper applies
      autocontrast and denoising "when needed" without a criterion; here they are always applied, which makes the
      result deterministic and is harmless on an already clean, full-range image.
    - CLE and RCM (not part of the FL paper): linear scaling by the dtype range (uint8 /255, uint16 /65535); float
      images already in [0, 1] are kept, other floats are min-max stretched. No nonlinear step, because these
      microscopes already deliver display-ready grey levels.
    - WL models take RGB: uint8 /255, uint16 /65535, float32 must already lie in [0, 1]. A uint8 single-channel image
      is replicated to three channels (a grey photo is a photo without colour). A 16-bit or float single-channel
      image is refused: it is a fluorescence intensity map, not a photo.
    """
    canonical = _modality(modality)
    array = image.array
    if channels_for(canonical) == 1:
        if array.ndim == 3:
            if not _is_grey_rgb(array):
                raise ImageError(
                    image.name,
                    f"this is a colour (RGB) photo, but {canonical} models take single-channel "
                    f"{_DESCRIPTIONS[canonical]} images; upload the {canonical} image, or choose a WL model",
                )
            array = _channel_mean(array)
        unit = _fl_unit(array) if canonical == "FL" else _linear_unit(array)
        return unit[..., None]
    if array.ndim == 2:
        if array.dtype != np.uint8:
            kind = "16-bit" if array.dtype == np.uint16 else "float"
            raise ImageError(
                image.name,
                f"this looks like a fluorescence intensity image ({kind}), but WL models take colour photos; "
                "choose an FL model",
            )
        array = np.repeat(array[..., None], 3, axis=2)
    return _rgb_unit(array, image.name)


def display_image(image: Image, modality: str) -> np.ndarray:
    """What a person sees and heatmaps are overlaid on: float32 in [0, 1], original H x W.

    (H, W) for single-channel modalities, (H, W, 3) for WL. These are exactly the pixels the model sees before
    padding and resizing (for FL after fl_normalize, autocontrast and denoise), so a heatmap cropped back with
    :func:`square_box` lines up with them.
    """
    array = to_model_array(image, modality)
    return array[..., 0] if array.shape[2] == 1 else array


def standardize(x: torch.Tensor, modality: str) -> torch.Tensor:
    """Standardise a [0, 1] tensor (C, H, W) or (B, C, H, W) for the network; the one place these constants live.

    WL uses the ImageNet mean and std, as the EfficientNet-B0 was pretrained on ImageNet photos. Single-channel
    modalities use ``(x - 0.5) / 0.25``: ImageNet colour statistics say nothing about fluorescence intensity, and this
    maps [0, 1] to [-2, 2], the range of standardised ImageNet inputs.
    """
    channels = channels_for(modality)
    if x.ndim not in (3, 4) or x.shape[-3] != channels:
        raise ValueError(f"{modality} expects (C, H, W) or (B, C, H, W) with C = {channels}, not {tuple(x.shape)}")
    mean, std = _stats(modality, x)
    return (x - mean) / std


def prepare(image: Image, modality: str, size: int) -> torch.Tensor:
    """Test-time input: (C, size, size) float32, standardised.

    ``to_model_array`` -> ``pad_to_square`` -> antialiased bilinear resize to ``size`` x ``size`` -> ``standardize``.
    Padding before resizing keeps the aspect ratio (the paper zero-pads non-square images rather than stretching
    them); antialiasing avoids aliasing when a multi-megapixel image shrinks to the network input. Training feeds the
    same tensors to :func:`train_augment`, so train and test preprocessing cannot diverge.
    """
    if size < 1:
        raise ValueError(f"size must be positive, not {size}")
    square = pad_to_square(to_model_array(image, modality))
    tensor = torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1).unsqueeze(0)
    if tensor.shape[-1] != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return standardize(tensor.clamp(0.0, 1.0)[0], modality).contiguous()


def prepare_batch(images: Sequence[Image], modality: str, size: int) -> torch.Tensor:
    """:func:`prepare` for each image, stacked to (B, C, size, size); an empty sequence gives B = 0."""
    if not images:
        return torch.empty((0, channels_for(modality), size, size), dtype=torch.float32)
    return torch.stack([prepare(image, modality, size) for image in images])


AUGMENT_POLICIES = ("modality", "pcam")


def train_augment(
    modality: str, size: int, padding: int = 16, *, policy: str = "modality", noise: float = 0.0, blur: float = 0.0
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The paper's training augmentation as a function ``(batch, generator) -> batch``.

    ``policy="modality"`` (the default) is the modality's own paper, below. ``policy="pcam"`` is the PCam
    augmentation of seed 001 (CELNet, section 3, after Veeling et al. 2018): a random rotation by a multiple of 90
    degrees and a random horizontal flip per sample, nothing else (no crop, no intensity change), so the batch keeps
    its pixels and its size (which must be ``size``); it works on the standardised batch directly, since a
    per-channel standardisation commutes with moving pixels.

    The batch is (B, C, S, S) *standardised*, exactly what :func:`prepare_batch` returns; the function undoes the
    standardisation, augments in [0, 1] space (where brightness, contrast and zero padding mean what they say), and
    returns a standardised (B, C, size, size) float32 batch. The input is not modified. Every sample draws its own
    parameters from ``generator`` in a fixed order, so a seed reproduces a batch exactly; draws happen on the
    generator's device and are moved to the batch's device.

    - FL (and the other single-channel modalities, for want of a recipe of their own): brightness and contrast
      factors uniform in [0, 2] ("a range of factor 1.0" in torchvision ColorJitter's convention,
      [max(0, 1 - 1.0), 1 + 1.0]), brightness first; random vertical flip; random crop of ``size`` from the image
      zero-padded by ``padding`` on each side. No horizontal flip or rotation: the paper lists only the vertical flip.
    - RCM (seed 002): brightness and contrast factors in [0.8, 1.2], horizontal and vertical flips, the padded crop.
    - WL: random horizontal and vertical flips, random rotation by a multiple of 90 degrees and the same padded crop:
      the paper's "conventional data augmentation including random flip, rotate, and crop", and nothing else. No
      colour jitter: a contrast change blends towards grey, and a greyer hue is exactly the weak cue that tells
      tumor from normal tissue in a white-light photo (demo cohort, one seed each: test AUC 0.62-0.69 with a 0.2
      jitter, 0.83 without).

    Colour jitter comes before the crop, so the crop's padding stays black, like the test-time padding.

    ``noise`` and ``blur`` are seed 002's "noise, and blurring" ("Model training"; the paper gives no strengths), for
    the modality policies, off (0) by default so a batch is augmented draw for draw as without them. Per sample, after
    the jitter and before the flips: a Gaussian blur whose SD is drawn uniformly in [0, ``blur``] px (separable,
    edges replicated, kernel radius ``ceil(3 blur)``), then additive Gaussian noise whose SD is drawn uniformly in
    [0, ``noise``] grey levels of the [0, 1] scale, clipped to [0, 1]. Their draws come after the jitter's.
    """
    canonical = _modality(modality)
    if size < 1 or padding < 0:
        raise ValueError(f"size must be positive and padding non-negative, not {size} and {padding}")
    if policy not in AUGMENT_POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; expected one of {', '.join(AUGMENT_POLICIES)}")
    for name, value in (("noise", noise), ("blur", blur)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < _MAX_STRENGTH[name]:
            raise ValueError(f"{name} must be a number in [0, {_MAX_STRENGTH[name]:g}), not {value!r}")
    if policy == "pcam":
        if noise or blur:
            raise ValueError("the pcam policy only rotates and flips; noise and blur apply to the modality policies")
        return _Rot90Flip(canonical, size)
    extra = {"noise": float(noise), "blur": float(blur)}
    if canonical == "WL":
        return _BatchAugment(canonical, size, padding, brightness=0.0, contrast=0.0, hflip=True, rotate=True, **extra)
    if canonical == "RCM":  # seed 002: random crop, horizontal and vertical flips, grey-level jitter, noise, blurring
        return _BatchAugment(canonical, size, padding, brightness=0.2, contrast=0.2, hflip=True, rotate=False, **extra)
    return _BatchAugment(canonical, size, padding, brightness=1.0, contrast=1.0, hflip=False, rotate=False, **extra)


_MAX_STRENGTH = {"noise": 1.0, "blur": 64.0}  # noise: SD in [0, 1] grey levels; blur: SD in px


@dataclass(frozen=True)
class _BatchAugment:
    """The augmentation returned by :func:`train_augment`; a dataclass rather than a closure so it can be pickled."""

    modality: str
    size: int
    padding: int
    brightness: float
    contrast: float
    hflip: bool
    rotate: bool
    noise: float = 0.0
    blur: float = 0.0

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment one standardised (B, C, S, S) batch with per-sample parameters drawn from ``generator``."""
        channels = channels_for(self.modality)
        if batch.ndim != 4 or batch.shape[1] != channels or batch.shape[2] != batch.shape[3]:
            raise ValueError(f"expected a (B, {channels}, S, S) batch, not {tuple(batch.shape)}")
        side = batch.shape[-1]
        if side + 2 * self.padding < self.size:
            raise ValueError(f"a {side} px batch padded by {self.padding} is smaller than the crop size {self.size}")
        mean, std = _stats(self.modality, batch)
        x = batch.float() * std + mean
        count = x.shape[0]

        def draw(low: float, high: float) -> torch.Tensor:
            values = torch.rand(count, generator=generator, device=generator.device).to(x.device)
            return (low + (high - low) * values).view(count, 1, 1, 1)

        def coin() -> torch.Tensor:
            return (torch.rand(count, generator=generator, device=generator.device) < 0.5).to(x.device)

        if self.brightness > 0:
            x = (x * draw(max(0.0, 1.0 - self.brightness), 1.0 + self.brightness)).clamp(0.0, 1.0)
        if self.contrast > 0:
            factor = draw(max(0.0, 1.0 - self.contrast), 1.0 + self.contrast)
            grey_mean = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)
            x = (factor * x + (1.0 - factor) * grey_mean).clamp(0.0, 1.0)
        if self.blur > 0:
            x = _blur(x, draw(0.0, self.blur).view(count), self.blur)
        if self.noise > 0:
            spread = draw(0.0, self.noise)
            pixels = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
            x = (x + spread * pixels).clamp(0.0, 1.0)
        if self.hflip:
            x = torch.where(coin().view(count, 1, 1, 1), x.flip(-1), x)
        x = torch.where(coin().view(count, 1, 1, 1), x.flip(-2), x)
        if self.rotate:
            turns = torch.randint(0, 4, (count,), generator=generator, device=generator.device).to(x.device)
            x = x.clone()
            for k in (1, 2, 3):
                chosen = turns == k
                if bool(chosen.any()):
                    x[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
        return standardize(self._crop(x, generator), self.modality).contiguous()

    def _crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random ``size`` x ``size`` window per sample from the batch zero-padded by ``padding`` (torchvision's
        ``RandomCrop(size, padding)``), gathered for the whole batch with one indexing operation."""
        count, side, pad = x.shape[0], x.shape[-1], self.padding
        padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
        room = side + 2 * pad - self.size + 1
        top = torch.randint(0, room, (count,), generator=generator, device=generator.device).to(x.device)
        left = torch.randint(0, room, (count,), generator=generator, device=generator.device).to(x.device)
        steps = torch.arange(self.size, device=x.device)
        rows = (top[:, None] + steps)[:, :, None]
        cols = (left[:, None] + steps)[:, None, :]
        samples = torch.arange(count, device=x.device)[:, None, None]
        return padded[samples, :, rows, cols].permute(0, 3, 1, 2)


def _blur(x: torch.Tensor, sigmas: torch.Tensor, largest: float) -> torch.Tensor:
    """Each sample of (B, C, H, W) ``x`` blurred by a separable Gaussian of its own SD ``sigmas[b]`` px (0: kept as
    it is), one kernel of radius ``ceil(3 largest)`` for the batch, edges replicated."""
    count, channels, height, width = x.shape
    radius = max(1, math.ceil(3.0 * largest))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    spread = sigmas.to(x.device).float().view(count, 1)
    kernel = torch.exp(-0.5 * (offsets / spread.clamp_min(1e-6)) ** 2)
    kernel = torch.where(spread > 0, kernel, (offsets == 0).float())
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = F.pad(x.reshape(1, count * channels, height, width), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, kernel.view(-1, 1, 2 * radius + 1, 1), groups=count * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, 2 * radius + 1), groups=count * channels)
    return flat.view(count, channels, height, width).clamp(0.0, 1.0)


@dataclass(frozen=True)
class _Rot90Flip:
    """The PCam augmentation of :func:`train_augment` (``policy="pcam"``): per sample a horizontal flip with
    probability 1/2, then a rotation by k x 90 degrees, k uniform in {0, 1, 2, 3}; both drawn from ``generator``
    (flips first, then turns)."""

    modality: str
    size: int

    def __call__(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flip and rotate one (B, C, size, size) batch; the input is not modified."""
        channels = channels_for(self.modality)
        if batch.ndim != 4 or batch.shape[1] != channels or batch.shape[2:] != (self.size, self.size):
            raise ValueError(f"expected a (B, {channels}, {self.size}, {self.size}) batch, not {tuple(batch.shape)}")
        count = batch.shape[0]
        flips = (torch.rand(count, generator=generator, device=generator.device) < 0.5).to(batch.device)
        turns = torch.randint(0, 4, (count,), generator=generator, device=generator.device).to(batch.device)
        x = torch.where(flips.view(count, 1, 1, 1), batch.flip(-1), batch).float().clone()
        for k in (1, 2, 3):
            chosen = turns == k
            if bool(chosen.any()):
                x[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
        return x.contiguous()


def _stats(modality: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of :func:`standardize` as (C, 1, 1) tensors on ``like``'s device, in float32."""
    if channels_for(modality) == 3:
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    else:
        mean, std = (_INTENSITY_MEAN,), (_INTENSITY_STD,)
    options = {"dtype": torch.float32, "device": like.device}
    return torch.tensor(mean, **options).view(-1, 1, 1), torch.tensor(std, **options).view(-1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma of a (B, C, H, W) batch as (B, 1, H, W), with torchvision's weights; single channel is its own luma."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _is_grey_rgb(array: np.ndarray) -> bool:
    """True when an (H, W, 3) image is grey saved as colour: channel spread within 2/255 levels or 1 % of range."""
    spread = float(np.ptp(array, axis=2).max()) if array.size else 0.0
    if array.dtype == np.uint8:
        return spread <= _GREY_LEVELS_UINT8
    if array.dtype == np.uint16:
        return spread <= _GREY_FRACTION * 65535
    value_range = float(array.max() - array.min()) if array.size else 0.0
    return spread <= _GREY_FRACTION * value_range


def _channel_mean(array: np.ndarray) -> np.ndarray:
    """Mean of the channels of a grey RGB image, in the input dtype (rounded for integers)."""
    mean = array.mean(axis=2, dtype=np.float32)
    return np.rint(mean).astype(array.dtype) if array.dtype.kind == "u" else mean


def _fl_unit(array: np.ndarray) -> np.ndarray:
    """FL intensity to [0, 1]: see :func:`to_model_array` for why uint8 skips :func:`fl_normalize`."""
    scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else fl_normalize(array)
    return denoise(autocontrast(scaled))


def _by_dtype_range(array: np.ndarray) -> np.ndarray:
    """Integer pixels divided by their dtype's full range (uint8 /255, uint16 /65535); floats as they are."""
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(array.dtype, 1.0)
    return array.astype(np.float32) / np.float32(scale)


def _linear_unit(array: np.ndarray) -> np.ndarray:
    """CLE/RCM grey levels to [0, 1] by the dtype range; floats outside [0, 1] are min-max stretched."""
    values = _by_dtype_range(array)
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        return autocontrast(values, cutoff=0.0)
    return values


def _rgb_unit(array: np.ndarray, name: str) -> np.ndarray:
    """An RGB photo to [0, 1] by its dtype range."""
    values = _by_dtype_range(array)
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ImageError(name, "float colour values must lie in 0..1; save the photo as an 8-bit PNG or JPEG")
    return values
