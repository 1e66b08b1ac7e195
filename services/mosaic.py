"""Whole RCM mosaics: train a patch classifier from mosaic pixel labels, and diagnose a mosaic with a stitched map.

Seed 002 trains a patch classifier on 256 px patches labelled by the clinicians' masks and slides it over whole
mosaics (:mod:`core.heatmaps.mosaic`). Here a patch takes its centre pixel's label (:mod:`core.data.synth_rcm`), the
model's input size is the sliding window, and a mosaic's result is stored like any other prediction: the upload, the
stitched map (at most ``MAP_SIDE`` px a side, float16, under ``mosaics/``) and a prediction row whose probability is
the highest window probability: a mosaic is called aspecific when any window is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.data.io import MOSAIC_MAX_PIXELS, Image, ImageError, read_image
from core.data.preprocess import channels_for, standardize, to_model_array
from core.data.store import npy_bytes, store_image, write_atomic
from core.data.synth_rcm import sample_patches
from core.predict import Predictor
from core.settings import workspace_dir
from core.train import Progress, TrainConfig, fit
from db import repo
from db.repo import ModelInfo
from db.session import init_db, session_scope
from services.diagnose import record_prediction
from services.training import check_model_name, register_trained

__all__ = ["MAP_SIDE", "MosaicOutcome", "diagnose_mosaic", "mosaic_array", "patch_tensors", "train_patch_classifier"]

MAP_SIDE = 4096


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


def train_patch_classifier(
    config: TrainConfig,
    mosaics: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    name: str,
    patches_per_mosaic: int = 200,
    seed: int = 0,
    val_mosaics: int = 1,
    database: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[ModelInfo, nn.Module]:
    """Train and register a patch classifier (task ``aspecific``) on uint8 mosaics with 0/128/255 masks; returns
    the registered model and the trained network.

    The mosaics are split by mosaic, never by patch: the last ``val_mosaics`` give the validation patches
    (operating threshold), the one before them the test patches, the rest the training patches.
    """
    if val_mosaics < 1 or len(mosaics) < val_mosaics + 2:
        raise ValueError("give at least three mosaics: training, validation and test patches come from different ones")
    check_model_name(name)
    init_db(database)
    with session_scope(database) as session:
        if repo.find_model(session, name) is not None:
            raise ValueError(f"a model named {name!r} is already registered; choose another name")
    size = config.image_size
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": [], "val": []}
    for index, (image, mask) in enumerate(mosaics):
        position = len(mosaics) - index  # 1 for the last mosaic
        split = "val" if position <= val_mosaics else "test" if position == val_mosaics + 1 else "train"
        parts[split].append(sample_patches(image, mask, patches_per_mosaic, size=size, seed=seed + index))
    tensors = {
        split: (
            patch_tensors(np.concatenate([p for p, _ in items]), config.modality),
            torch.from_numpy(np.concatenate([y for _, y in items])).float(),
        )
        for split, items in parts.items()
    }
    log(f"training {config.architecture} on {len(tensors['train'][1])} {size} px {config.modality} patches")
    result = fit(config, *tensors["train"], *tensors["val"], progress=progress)
    info = register_trained(
        config, result, name, tensors["test"], database=database, log=log, extra_config={"window": size}
    )
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
    database: str | None = None,
) -> MosaicOutcome:
    """Stitch ``model``'s map over a whole mosaic and store upload, map and prediction together."""
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
    result = predictor.stitch(mosaic, step=step, sigma=sigma, mode=mode, method=method, progress=progress)
    probabilities = result.window_probabilities
    probability = float(probabilities.max())
    root = workspace_dir()
    stored = store_image(image, root)
    map_path = f"mosaics/{stored.sha256[:2]}/{stored.sha256}-{model.checkpoint_sha256[:16]}-{method}-{step}.npy"
    write_atomic(root / map_path, npy_bytes(_reduced(result.map)))
    upload_id, prediction_id = record_prediction(
        stored,
        image.name,
        model,
        user_id,
        probability,
        model.threshold,
        method,
        map_path,
        result.device,
        result.seconds,
        database,
    )
    return MosaicOutcome(
        name=image.name,
        upload_id=upload_id,
        prediction_id=prediction_id,
        probability=probability,
        positive_windows=float((probabilities >= model.threshold).mean()),
        threshold=model.threshold,
        decision=probability >= model.threshold,
        heatmap=map_path,
        image=stored.path,
        device=result.device,
        seconds=result.seconds,
        windows=int(probabilities.size),
        mode=result.mode,
    )
