"""Whole RCM mosaics: train a patch classifier from mosaic pixel labels, and diagnose a mosaic with a stitched map.

Seed 002 trains a patch classifier on 256 px patches labelled by the clinicians' masks and slides it over whole
mosaics (:mod:`core.heatmaps.mosaic`). Here a patch takes its centre pixel's label (:mod:`core.data.synth_rcm`), the
model's input size is the sliding window, and a mosaic's result is stored like any other prediction: the upload, the
stitched map (at most ``MAP_SIDE`` px a side, float16, under ``mosaics/``) and a prediction row whose probability is
the highest window probability: a mosaic is called aspecific when any window is.

Context training (``context=`` px, :func:`fit_patch_classifier`): a classifier trained on isolated, zero-padded
patches can find the patch centre, whose pixel is the label, only through the border; computed over a whole mosaic
(the stitcher's whole-trunk fast mode, ``share=None``) there is no border and its deep features stop localising
(EfficientNet-B2: pixel AUC 0.77 against 0.98 per window, ``python -m bench.mosaic --b2``). With context, each
training sample is the window plus ``context`` px of the mosaic around it; the trunk runs over the whole crop and
global average pooling and the linear head see only the feature cells of the central window (:class:`CentreCells`).
That is exactly what the whole-trunk stitcher computes for a window's probability, so the network learns features
that mean the same with the mosaic around them. The saved network is the plain registry architecture.

Random padding (``padded_fraction=``, issue 17: "context crops from the mosaic, random padding"): a context network
is weaker as a single-window classifier (the Diagnose page, exact and loop stitching), which never saw a window
without its mosaic. With probability ``padded_fraction`` per training sample, :class:`PaddedOrContext` gives the
plain model's logits on the crop's central window alone, which the network zero-pads at its border exactly as at
test time, instead of the crop's central cells; the other samples keep their context. Filling the context ring with
the standardised 0 instead would only imitate the first convolution's padding: deeper layers pad their activations
with zeros, which the activations of a zero ring are not (biases, batch norm), so the exact forward is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.data.io import MOSAIC_MAX_PIXELS, Image, ImageError, read_image
from core.data.preprocess import channels_for, standardize, to_model_array
from core.data.synth_rcm import NEGATIVE, POSITIVE, UNLABELED, sample_patches
from core.heatmaps.mosaic import MosaicResult
from core.models import create_model
from core.predict import Predictor
from core.train import Progress, TrainConfig, TrainResult, fit
from db.repo import ModelInfo
from services.predictions import SpecimenTarget, StoredPrediction, UploadTarget, store_prediction
from services.training import check_model_name, register_trained

__all__ = [
    "MAP_SIDE",
    "MOSAIC_SPLITS",
    "CentreCells",
    "MosaicOutcome",
    "PaddedOrContext",
    "context_stride",
    "diagnose_mosaic",
    "fit_patch_classifier",
    "mosaic_array",
    "patch_tensors",
    "read_mosaic_folder",
    "stitch_and_store",
    "study_step",
    "train_patch_classifier",
]

MAP_SIDE = 4096
MOSAIC_SPLITS = ("train", "val", "test")
_MOSAIC_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


@dataclass(frozen=True)
class MosaicOutcome:
    """What happened to one mosaic; ``error`` is set when it was refused."""

    name: str
    error: str | None = None
    upload_id: int | None = None
    prediction_id: int | None = None
    probability: float | None = None  # the highest window probability
    positive_windows: float | None = None  # fraction of windows at or above the threshold
    threshold: float | None = None
    decision: bool | None = None
    heatmap: str | None = None  # workspace-relative .npy path (reduced resolution)
    image: str | None = None
    device: str | None = None
    seconds: float | None = None
    windows: int | None = None
    mode: str | None = None


def mosaic_array(image: Image, modality: str) -> np.ndarray:
    """A single-channel mosaic as (H, W) float32 in [0, 1], by the modality's preprocessing rule."""
    if channels_for(modality) != 1:
        raise ImageError(image.name, f"whole-mosaic stitching needs a single-channel model, not {modality}")
    return to_model_array(image, modality)[..., 0]


def patch_tensors(patches: np.ndarray, modality: str = "RCM") -> torch.Tensor:
    """uint8 (N, S, S) patches as the standardised (N, 1, S, S) tensors the stitcher's windows are."""
    return standardize(torch.from_numpy(patches).float().div_(255.0)[:, None], modality)


def read_mosaic_folder(folder: str | Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Labelled mosaics for :func:`train_patch_classifier` from ``folder/{train,val,test}/``: each ``<name>.png``
    (or .tif/.tiff/.npy) with its mask ``<name>-mask.png`` (255 aspecific, 0 benign, anything else unlabeled), as
    ``python -m core synth rcm`` writes them. Mosaics are scaled to uint8 by the RCM preprocessing rule; ``test``
    may be absent. A problem is refused naming the file and what to do."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; give one with train/, val/ (and test/) mosaics and their masks")
    splits: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for split in MOSAIC_SPLITS:
        files = sorted(
            p for p in (root / split).glob("*") if p.suffix.lower() in _MOSAIC_SUFFIXES and not p.stem.endswith("-mask")
        )
        for path in files:
            mask_path = path.with_name(f"{path.stem}-mask.png")
            if not mask_path.is_file():
                raise ValueError(
                    f"{path} has no mask {mask_path.name}: draw one (255 aspecific, 0 benign, else unlabeled)"
                )
            try:
                image = mosaic_array(read_image(path, path.name, max_pixels=MOSAIC_MAX_PIXELS), "RCM")
                mask = read_image(mask_path, mask_path.name, max_pixels=MOSAIC_MAX_PIXELS).array
            except ImageError as error:
                raise ValueError(f"{path.parent / error.name}: {error.reason}") from None
            if mask.ndim != 2 or mask.dtype != np.uint8:
                raise ValueError(f"{mask_path}: a mask is an 8-bit greyscale PNG")
            if mask.shape != image.shape:
                raise ValueError(
                    f"{mask_path}: mask {mask.shape[::-1]} px does not match mosaic {image.shape[::-1]} px"
                )
            labels = np.where(mask == 255, POSITIVE, np.where(mask == 0, NEGATIVE, UNLABELED)).astype(np.uint8)
            splits.setdefault(split, []).append((np.round(image * 255.0).astype(np.uint8), labels))
    for split in ("train", "val"):
        if not splits.get(split):
            raise ValueError(f"{root / split} holds no mosaics; train and val need at least one each")
    return splits


@dataclass(frozen=True)
class CentreCells:
    """The logits of the central window of a batch of context crops (``fit``'s ``train_logits``): the trunk runs over
    the whole crop, then the model's head (global average pooling, dropout, linear) over the feature map without its
    outer ``cells`` rows and columns on every side, i.e. over the window's own feature cells. For a window at a
    multiple of the stride this is the probability the whole-trunk stitcher gives it (:mod:`core.heatmaps.mosaic`:
    the classifier on the mean of the window's feature centres)."""

    cells: int

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        features = model.forward_features(batch)
        height, width = features.shape[-2:]
        if min(height, width) <= 2 * self.cells:
            raise ValueError(f"a {height} x {width} feature map has no cells inside a margin of {self.cells}")
        inner = features[..., self.cells : height - self.cells, self.cells : width - self.cells]
        return model.forward_head(inner)


_PADDED_STREAM = 17  # issue 17: PaddedOrContext's draws are a stream of their own, not fit's order and augmentation


class PaddedOrContext:
    """Training logits for a batch of context crops (``fit``'s ``train_logits``), each sample either with its context or
    as a lone window: with probability ``fraction`` the plain model on the crop's central window alone (its outer
    ``context`` px cut off; the network zero-pads the window at its border, as the Diagnose page and loop stitching do),
    otherwise :class:`CentreCells` over the whole crop. The two subsets run as two forward passes (crop and window sizes
    differ), so in training mode each subset's batch norm normalises by its own batch statistics and updates the running
    ones once per subset. The choice is drawn per sample and batch from a ``torch.Generator`` of its own, seeded from
    ``seed`` (the training config's): the same seed draws the same choices. ``fraction`` 0 is :class:`CentreCells`, 1
    plain training on the windows."""

    def __init__(self, cells: int, context: int, fraction: float, seed: int) -> None:
        self.cells, self.context, self.fraction = cells, context, fraction
        self.generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, _PADDED_STREAM]).generate_state(1)[0])
        )

    def __repr__(self) -> str:
        return f"PaddedOrContext(cells={self.cells}, context={self.context}, fraction={self.fraction})"

    def choose(self, count: int) -> torch.Tensor:
        """The next ``count`` choices: True where the sample is a lone, zero-padded window."""
        return torch.rand(count, generator=self.generator) < self.fraction

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        lone = self.choose(len(batch))
        order = torch.cat([torch.nonzero(~lone)[:, 0], torch.nonzero(lone)[:, 0]]).to(batch.device)
        parts = []
        if not lone.all():
            parts.append(CentreCells(self.cells)(model, batch[(~lone).to(batch.device)]))
        if lone.any():
            edge = self.context
            windows = batch[lone.to(batch.device)][..., edge : batch.shape[-2] - edge, edge : batch.shape[-1] - edge]
            parts.append(model(windows))
        return torch.cat(parts)[torch.argsort(order)]


def _check_padded_fraction(padded_fraction: float, context: int) -> None:
    """``ValueError`` unless ``padded_fraction`` is a probability, and 0 without context."""
    number = isinstance(padded_fraction, int | float) and not isinstance(padded_fraction, bool)
    if not number or not 0 <= padded_fraction <= 1:
        raise ValueError(f"padded_fraction is a probability between 0 and 1, not {padded_fraction!r}")
    if padded_fraction and not context:
        raise ValueError(
            f"padded_fraction {padded_fraction} needs context > 0: without context every training window is "
            "already zero-padded at its border"
        )


def context_stride(config: TrainConfig, context: int) -> int:
    """The trunk stride of ``config``'s architecture, after checking that context training can use it: a network
    with a global-average-pooling head (``forward_features``, ``forward_head``, no loss of its own), and a window
    and a ``context`` that are multiples of the stride, so the window's feature cells are whole cells of the crop's
    feature map. ``ValueError`` says what to change."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"context is a whole number of pixels (0 for none), not {context!r}")
    channels = config.in_chans or channels_for(config.modality)
    model = create_model(config.architecture, in_chans=channels, **config.model_kwargs)
    if callable(getattr(model, "loss", None)) or not all(
        callable(getattr(model, name, None)) for name in ("forward_features", "forward_head")
    ):
        raise ValueError(
            f"context training needs a classifier with a global-average-pooling head and no loss of its own; "
            f"{config.architecture} is not one (train it with context=0)"
        )
    window = config.image_size
    with torch.no_grad():
        features = model.eval().forward_features(torch.zeros(1, channels, window, window))
    side = features.shape[-1]
    if features.shape[-2] != side or window % side:
        raise ValueError(f"a {window} px window gives a {tuple(features.shape[-2:])} feature map: no integer stride")
    stride = window // side
    if context % stride:
        raise ValueError(
            f"context must be a multiple of {config.architecture}'s stride ({stride} px), not {context}; "
            f"try {max(stride, round(context / stride) * stride)}"
        )
    return stride


def _splits(
    mosaics: Sequence[tuple[np.ndarray, np.ndarray]] | Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
) -> Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]:
    """``mosaics`` as train/val/test splits (a plain sequence: the last for validation, the one before for test)."""
    if not isinstance(mosaics, Mapping):
        if len(mosaics) < 3:
            raise ValueError(
                "give at least three mosaics: training, validation and test patches come from different ones"
            )
        mosaics = {"train": mosaics[:-2], "test": mosaics[-2:-1], "val": mosaics[-1:]}
    if set(mosaics) - set(MOSAIC_SPLITS):
        raise ValueError(f"mosaic splits must be {', '.join(MOSAIC_SPLITS)}, not {', '.join(sorted(mosaics))}")
    if not mosaics.get("train") or not mosaics.get("val"):
        raise ValueError("give at least one training and one validation mosaic: their patches must not mix")
    return mosaics


def fit_patch_classifier(
    config: TrainConfig,
    mosaics: Sequence[tuple[np.ndarray, np.ndarray]] | Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
    *,
    patches_per_mosaic: int = 200,
    seed: int = 0,
    context: int = 0,
    padded_fraction: float = 0.0,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[TrainResult, tuple[torch.Tensor, torch.Tensor] | None]:
    """Train a patch classifier on uint8 mosaics with 0/128/255 masks (the splits as in
    :func:`train_patch_classifier`) without registering it; returns the training result and the test split's
    standardised patches and labels (None without test mosaics).

    Every patch is a ``config.image_size`` px window labelled by its centre pixel. ``context=0`` (the default) trains
    on the windows alone, zero-padded by the network at their border as today. ``context > 0`` (a multiple of the
    trunk's stride, :func:`context_stride`) trains on crops of ``window + 2 context`` px whose central window is the
    patch: the trunk sees the mosaic around the window, and only the window's own feature cells are pooled
    (:class:`CentreCells`), which is what whole-trunk stitching computes, so the features stop depending on a border
    the mosaic does not have (module docstring). The recipe's augmentation runs on the whole crop (its padded random
    crop shifts the window by up to 16 px against the pooled cells and sometimes puts a zero border in the context).
    Training mosaics must hold the crop; validation and test patches stay plain windows, so the threshold and the
    test metrics are those of the classifier applied to a single patch (the Diagnose page, exact stitching).

    ``padded_fraction`` (with context only) is the probability that a training sample is seen as a lone window
    instead, zero-padded at its border as at test time (:class:`PaddedOrContext`, drawn from ``config.seed``), so the
    network learns both situations; 0 (the default) is context training as above. The augmentation still runs on the
    whole crop, so a lone window's random shift brings in mosaic pixels where plain training brings in zeros.
    """
    _check_padded_fraction(padded_fraction, context)
    mosaics = _splits(mosaics)
    size = config.image_size
    cells = context // context_stride(config, context) if context else 0
    crop = size + 2 * context
    ordered = [(split, pair) for split in ("train", "test", "val") for pair in mosaics.get(split) or ()]
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for index, (split, (image, mask)) in enumerate(ordered):
        side = crop if split == "train" else size
        if side > min(image.shape[:2]):
            raise ValueError(
                f"a {image.shape[0]} x {image.shape[1]} px {split} mosaic does not hold a {side} px "
                + ("crop (window + 2 x context): lower context" if side > size else "window")
            )
        patches = sample_patches(image, mask, patches_per_mosaic, size=side, seed=seed + index)
        parts.setdefault(split, []).append(patches)
    tensors = {
        split: (
            patch_tensors(np.concatenate([p for p, _ in items]), config.modality),
            torch.from_numpy(np.concatenate([y for _, y in items])).float(),
        )
        for split, items in parts.items()
    }
    if cells:
        padded = f", {padded_fraction:.0%} of them as lone windows" if padded_fraction else ""
        log(
            f"training {config.architecture} on {len(tensors['train'][1])} {size} px {config.modality} patches "
            f"in {crop} px context crops{padded}"
        )
        logits = (
            PaddedOrContext(cells, context, padded_fraction, config.seed) if padded_fraction else CentreCells(cells)
        )
        trained = fit(
            replace(config, image_size=crop), *tensors["train"], *tensors["val"], progress=progress,
            train_logits=logits,
        )  # fmt: skip
        trained = replace(trained, config=config)
    else:
        log(f"training {config.architecture} on {len(tensors['train'][1])} {size} px {config.modality} patches")
        trained = fit(config, *tensors["train"], *tensors["val"], progress=progress)
    return trained, tensors.get("test")


def train_patch_classifier(
    config: TrainConfig,
    mosaics: Sequence[tuple[np.ndarray, np.ndarray]] | Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
    *,
    name: str,
    patches_per_mosaic: int = 200,
    seed: int = 0,
    context: int = 0,
    padded_fraction: float = 0.0,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[ModelInfo, nn.Module]:
    """Train and register a patch classifier (task ``aspecific``) on uint8 mosaics with 0/128/255 masks; returns
    the registered model and the trained network.

    The mosaics are split by mosaic, never by patch: ``mosaics`` maps ``train``, ``val`` (operating threshold) and
    optionally ``test`` to their mosaics; a plain sequence is split as the last for validation, the one before it for
    test, the rest for training. Mosaic ``i`` (counting train, then test, then val) draws its patches with seed
    ``seed + i``. ``context`` px of mosaic around each training window make the features border-independent, for
    whole-trunk stitching (:func:`fit_patch_classifier`; 0, the default, trains on the windows alone); with it,
    ``padded_fraction`` of the training samples are seen as lone zero-padded windows instead, for single-window use.
    Both are recorded in the checkpoint's config when set. The registered network is the plain architecture either way.
    """
    mosaics = _splits(mosaics)
    check_model_name(name)
    result, test = fit_patch_classifier(
        config, mosaics, patches_per_mosaic=patches_per_mosaic, seed=seed, context=context,
        padded_fraction=padded_fraction, log=log, progress=progress,
    )  # fmt: skip
    extra = {
        "window": config.image_size,
        **({"context": context} if context else {}),
        **({"padded_fraction": padded_fraction} if padded_fraction else {}),
    }
    info = register_trained(config, result, name, test, log=log, extra_config=extra)
    return info, result.model


def _reduced(heatmap: np.ndarray, side: int = MAP_SIDE) -> np.ndarray:
    """The map at most ``side`` px a side (area averaging), float16."""
    height, width = heatmap.shape
    scale = side / max(height, width)
    if scale >= 1.0:
        return heatmap.astype(np.float16)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    reduced = F.interpolate(torch.from_numpy(heatmap)[None, None], size=size, mode="area")[0, 0]
    return reduced.numpy().astype(np.float16)


def study_step(window: int) -> int:
    """The window step a study's mosaics are stitched with: seed 002's 50 px for its 256 px windows, a fifth of a
    smaller window."""
    return max(1, min(50, window // 5))


def stitch_and_store(
    predictor: Predictor,
    model: ModelInfo,
    mosaic: np.ndarray,
    target: UploadTarget | SpecimenTarget,
    *,
    step: int = 50,
    sigma: float | None = 5.0,
    mode: str = "fast",
    method: str = "cam",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[StoredPrediction, MosaicResult]:
    """Stitch ``model``'s map over ``mosaic`` (:meth:`core.predict.Predictor.stitch`) and store it for ``target``: the
    map reduced to ``MAP_SIDE`` and a prediction whose probability is the highest window's (a mosaic is aspecific
    when any window is)."""
    result = predictor.stitch(mosaic, step=step, sigma=sigma, mode=mode, method=method, progress=progress)
    stored = store_prediction(
        model,
        target,
        probability=float(result.window_probabilities.max()),
        threshold=model.threshold,
        method=method,
        heatmap=_reduced(result.map),
        mosaic_step=step,
        device=result.device,
        seconds=result.seconds,
    )
    return stored, result


def diagnose_mosaic(
    predictor: Predictor,
    model: ModelInfo,
    name: str,
    source: bytes | str | Path,
    *,
    user_id: int | None,
    step: int = 50,
    sigma: float | None = 5.0,
    mode: str = "fast",
    method: str = "cam",
    progress: Callable[[int, int], None] | None = None,
) -> MosaicOutcome:
    """Stitch ``model``'s map over a whole mosaic and store upload, map and prediction together
    (:func:`services.predictions.store_prediction`)."""
    try:
        image = read_image(source, name, max_pixels=MOSAIC_MAX_PIXELS)
        mosaic = mosaic_array(image, model.modality)
        if min(mosaic.shape) < predictor.image_size:
            raise ImageError(
                name,
                f"the image ({mosaic.shape[1]} x {mosaic.shape[0]} px) is smaller than one {predictor.image_size} px "
                "window; upload it as a specimen image instead",
            )
    except ImageError as error:
        return MosaicOutcome(name=name, error=error.reason)
    stored, result = stitch_and_store(
        predictor, model, mosaic, UploadTarget(image, user_id), step=step, sigma=sigma, mode=mode, method=method,
        progress=progress,
    )  # fmt: skip
    probabilities = result.window_probabilities
    probability = float(probabilities.max())
    return MosaicOutcome(
        name=image.name,
        upload_id=stored.upload_id,
        prediction_id=stored.prediction_id,
        probability=probability,
        positive_windows=float((probabilities >= model.threshold).mean()),
        threshold=model.threshold,
        decision=probability >= model.threshold,
        heatmap=stored.map_path,
        image=stored.image_path,
        device=result.device,
        seconds=result.seconds,
        windows=int(probabilities.size),
        mode=result.mode,
    )
