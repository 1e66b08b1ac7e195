"""Whole RCM mosaics: train a patch classifier from mosaic pixel labels, and diagnose a mosaic with a stitched map.

Seed 002 trains a patch classifier on 256 px patches labelled by the clinicians' masks and slides it over whole
mosaics (:mod:`core.heatmaps.mosaic`). Here a patch takes its centre pixel's label (:mod:`core.data.synth_rcm`), the
model's input size is the sliding window, and a mosaic's result is stored like any other prediction: the upload, the
stitched map (at most ``MAP_SIDE`` px a side, float16, under ``mosaics/``) and a prediction row whose probability is
the highest window probability: a mosaic is called aspecific when any window is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.data.io import MOSAIC_MAX_PIXELS, Image, ImageError, read_image
from core.data.preprocess import channels_for, standardize, to_model_array
from core.data.synth_rcm import NEGATIVE, POSITIVE, UNLABELED, sample_patches
from core.heatmaps.mosaic import MosaicResult
from core.predict import Predictor
from core.train import Progress, TrainConfig, fit
from db.repo import ModelInfo
from services.predictions import SpecimenTarget, StoredPrediction, UploadTarget, store_prediction
from services.training import check_model_name, register_trained

__all__ = [
    "MAP_SIDE",
    "MOSAIC_SPLITS",
    "MosaicOutcome",
    "diagnose_mosaic",
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


def train_patch_classifier(
    config: TrainConfig,
    mosaics: Sequence[tuple[np.ndarray, np.ndarray]] | Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]],
    *,
    name: str,
    patches_per_mosaic: int = 200,
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[ModelInfo, nn.Module]:
    """Train and register a patch classifier (task ``aspecific``) on uint8 mosaics with 0/128/255 masks; returns
    the registered model and the trained network.

    The mosaics are split by mosaic, never by patch: ``mosaics`` maps ``train``, ``val`` (operating threshold) and
    optionally ``test`` to their mosaics; a plain sequence is split as the last for validation, the one before it for
    test, the rest for training. Mosaic ``i`` (counting train, then test, then val) draws its patches with seed
    ``seed + i``.
    """
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
    check_model_name(name)
    size = config.image_size
    ordered = [(split, pair) for split in ("train", "test", "val") for pair in mosaics.get(split) or ()]
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for index, (split, (image, mask)) in enumerate(ordered):
        patches = sample_patches(image, mask, patches_per_mosaic, size=size, seed=seed + index)
        parts.setdefault(split, []).append(patches)
    tensors = {
        split: (
            patch_tensors(np.concatenate([p for p, _ in items]), config.modality),
            torch.from_numpy(np.concatenate([y for _, y in items])).float(),
        )
        for split, items in parts.items()
    }
    log(f"training {config.architecture} on {len(tensors['train'][1])} {size} px {config.modality} patches")
    result = fit(config, *tensors["train"], *tensors["val"], progress=progress)
    info = register_trained(config, result, name, tensors.get("test"), log=log, extra_config={"window": size})
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
