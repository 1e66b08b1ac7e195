"""On-demand diagnosis: a loaded model that turns images into probabilities, decisions and heatmaps.

A ``Predictor`` owns one eval-mode model and a lock: hook-based heatmap methods attach hooks to the shared
model, so concurrent callers (Streamlit sessions, threads) take turns instead of seeing each other's hooks.
The model is kept in channels_last memory format (faster convolutions on CPUs and GPUs alike). Maps, and the
per-pixel extras some methods return (Guided Grad-CAM's gradients for its five views), are computed on the
zero-padded square the model sees and mapped back to the input's own height and width.

Scores without a heatmap (a clip's triage, the live view) run through an inference copy of the model with every
batch norm folded into its convolution (:func:`core.models.fold.folded_copy`, made on the first such call and used
only if it reproduces the model's logits on that batch): one pass over memory less per layer, 10-25 % faster for
EfficientNet-B0 on a 2-core CPU (bench/README.md, CLE clips), with the model's probabilities to float rounding.
Heatmaps run on the model itself, whose hooks and gradients they need.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from scipy.special import expit
from torch import nn

from core.data.io import Image, ImageError
from core.data.preprocess import display_image, prepare, square_box
from core.heatmaps import colorize, five_views, get_method, list_methods, overlay
from core.heatmaps.mosaic import MosaicResult, stitch_mosaic
from core.models import get_spec, load_checkpoint
from core.models.fold import folded_copy
from core.runtime import tune_allocator
from core.train.recipe import pick_device

__all__ = ["Diagnosis", "Predictor", "views_of", "write_heatmap_files"]


@dataclass(frozen=True)
class Diagnosis:
    name: str
    probability: float
    threshold: float
    decision: bool
    heatmap: np.ndarray | None  # (H, W) float32 in [0, 1], the input's own size
    method: str | None
    device: str
    seconds: float  # this image's share of its batch's wall time
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # per-pixel method extras, (..., H, W)


class Predictor:
    """A model ready for diagnosis: modality, input size, operating threshold and a lock for shared use."""

    def __init__(self, model: nn.Module, config: dict[str, Any], threshold: float, device: str = "auto") -> None:
        tune_allocator()  # activations stay in the heap between calls (core/runtime.py): no page faults per call
        self.device = pick_device(device)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.config = dict(config)
        self.threshold = float(threshold)
        self.modality: str = config["modality"]
        self.image_size: int = int(config["image_size"])
        self.layers = get_spec(config["architecture"]).layers(self.model)
        self.methods: dict[str, str] = list_methods(self.model)  # the heatmap methods that apply to this model
        self._lock = threading.Lock()
        self._scorer: nn.Module | None = None  # the folded inference copy, made by the first no-heatmap call

    @property
    def device_name(self) -> str:
        """What the page shows: ``CPU`` or the GPU's name."""
        if self.device.type == "cuda":
            return f"GPU ({torch.cuda.get_device_name(self.device)})"
        return "CPU"

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, threshold: float, sha256: str | None = None, device: str = "auto"
    ) -> Predictor:
        """Load a registered checkpoint (refusing one whose sha256 changed)."""
        model, config = load_checkpoint(path, expected_sha256=sha256)
        return cls(model, config, threshold, device)

    def stitch(self, mosaic: np.ndarray, **options: Any) -> MosaicResult:
        """The stitched heatmap of a whole mosaic by sliding this model's input-sized window over it
        (:func:`core.heatmaps.mosaic.stitch_mosaic`; ``options``: step, sigma, mode, method, progress, ...)."""
        with self._lock:
            return stitch_mosaic(
                self.model,
                mosaic,
                window=self.image_size,
                modality=self.modality,
                target_layer=self.layers,  # multi-layer methods (celm, gradcam-multi) fuse all of them
                **options,
            )

    def _logits_and_maps(
        self, x: torch.Tensor, method: str | None, options: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        if method is None:
            if self._scorer is None:  # made outside inference mode: its parameters are ordinary tensors
                self._scorer = folded_copy(self.model, x)
            with torch.inference_mode():
                return self._scorer(x)[:, 0].float().cpu().numpy(), None, {}
        with get_method(method)(self.model, self.layers, **options) as explainer:
            result = explainer(x)
        side = x.shape[-1]
        extras = {k: v for k, v in result.extras.items() if v.shape[-2:] == (side, side)}
        return result.logits[:, 0], result.maps, extras

    def diagnose(
        self,
        images: Sequence[Image],
        heatmap: str | None = "gradcam",
        batch_size: int = 16,
        options: dict[str, Any] | None = None,
    ) -> list[Diagnosis | ImageError]:
        """One result per image, in order: a Diagnosis, or the ImageError that says why it was refused.

        ``options`` go to the heatmap method (e.g. Score-CAM's ``progress`` callback, CELM's ``alpha``)."""
        if heatmap is not None:
            get_method(heatmap)  # unknown names fail before any work
            if heatmap not in self.methods:
                raise ValueError(
                    f"{get_method(heatmap).title} does not apply to this model; use one of: {', '.join(self.methods)}"
                )
        results: list[Diagnosis | ImageError | None] = [None] * len(images)
        ready: list[tuple[int, torch.Tensor]] = []
        for i, image in enumerate(images):
            try:
                ready.append((i, prepare(image, self.modality, self.image_size)))
            except ImageError as error:
                results[i] = error
        for start in range(0, len(ready), batch_size):
            chunk = ready[start : start + batch_size]
            began = time.perf_counter()
            with self._lock:
                logits, maps, extras = self._logits_and_maps(
                    torch.stack([t for _, t in chunk]), heatmap, dict(options or {})
                )
            share = (time.perf_counter() - began) / len(chunk)
            for j, (i, _) in enumerate(chunk):
                probability = float(expit(float(logits[j])))  # no overflow for logits below -709
                results[i] = Diagnosis(
                    name=images[i].name,
                    probability=probability,
                    threshold=self.threshold,
                    decision=probability >= self.threshold,
                    heatmap=None if maps is None else _to_image_frame(maps[j], images[i].height, images[i].width),
                    method=heatmap,
                    device=self.device.type,
                    seconds=share,
                    extras={k: _to_image_frame(v[j], images[i].height, images[i].width) for k, v in extras.items()},
                )
        return results  # type: ignore[return-value]


def _to_image_frame(square_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo zero-padding to a square and resizing: the ``(H, W)`` or ``(C, H, W)`` map over the original
    ``height x width`` pixels. Maps in [0, 1] stay there; signed extras (gradients) keep their sign."""
    planes = torch.from_numpy(np.ascontiguousarray(square_map)).float()
    planes = planes[None] if planes.ndim == 2 else planes
    top, left, side = square_box(height, width)
    resized = F.interpolate(planes[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    cropped = resized[:, top : top + height, left : left + width]
    if square_map.ndim == 2:
        return cropped[0].clamp(0.0, 1.0).numpy().astype(np.float32)
    return cropped.numpy().astype(np.float32)


def views_of(image: Image, modality: str, extras: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The FL-CNN paper's five Grad-CAM views when a Guided Grad-CAM diagnosis carries them, else none."""
    if "gradcam" not in extras or "guided" not in extras:
        return {}
    return five_views(display_image(image, modality), extras["gradcam"], extras["guided"])


def write_heatmap_files(
    image: Image,
    modality: str,
    heatmap: np.ndarray,
    directory: str | Path,
    stem: str,
    alpha: float = 0.4,
    extras: dict[str, np.ndarray] | None = None,
) -> dict[str, str]:
    """Write ``stem.npy`` (float32 map), ``stem_heatmap.png`` (coloured) and ``stem_overlay.png`` (over the image);
    for Guided Grad-CAM also the five views as ``stem_<view>.png``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "npy": directory / f"{stem}.npy",
        "png": directory / f"{stem}_heatmap.png",
        "overlay": directory / f"{stem}_overlay.png",
    }
    np.save(paths["npy"], heatmap.astype(np.float32))
    PILImage.fromarray(colorize(heatmap)).save(paths["png"])
    PILImage.fromarray(overlay(display_image(image, modality), heatmap, alpha)).save(paths["overlay"])
    for title, picture in views_of(image, modality, extras or {}).items():
        key = "".join(c if c.isalnum() else "_" for c in title.lower().replace(" × ", "_x_")).strip("_")
        paths[key] = directory / f"{stem}_{key}.png"
        PILImage.fromarray(picture).save(paths[key])
    return {key: str(path) for key, path in paths.items()}
