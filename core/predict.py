"""On-demand diagnosis: a loaded model that turns images into probabilities, decisions and heatmaps.

A ``Predictor`` owns one eval-mode model and a lock: hook-based heatmap methods attach hooks to the shared
model, so concurrent callers (Streamlit sessions, threads) take turns instead of seeing each other's hooks.
Maps are computed on the zero-padded square the model sees and mapped back to the input's own height and width.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torch import nn

from core.data.io import Image, ImageError
from core.data.preprocess import display_image, prepare, square_box
from core.heatmaps import colorize, get_method, overlay
from core.models import get_spec, load_checkpoint
from core.train.recipe import pick_device

__all__ = ["Diagnosis", "Predictor", "write_heatmap_files"]


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


class Predictor:
    """A model ready for diagnosis: modality, input size, operating threshold and a lock for shared use."""

    def __init__(self, model: nn.Module, config: dict[str, Any], threshold: float, device: str = "auto") -> None:
        self.device = pick_device(device)
        self.model = model.eval().to(self.device)
        self.config = dict(config)
        self.threshold = float(threshold)
        self.modality: str = config["modality"]
        self.image_size: int = int(config["image_size"])
        self.target_layer = get_spec(config["architecture"]).target_layer(self.model)
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, threshold: float, sha256: str | None = None, device: str = "auto"
    ) -> Predictor:
        """Load a registered checkpoint (refusing one whose sha256 changed)."""
        model, config = load_checkpoint(path, expected_sha256=sha256)
        return cls(model, config, threshold, device)

    def _logits_and_maps(self, x: torch.Tensor, method: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        x = x.to(self.device)
        if method is None:
            with torch.inference_mode():
                return self.model(x)[:, 0].float().cpu().numpy(), None
        with get_method(method)(self.model, self.target_layer) as explainer:
            result = explainer(x)
        return result.logits[:, 0], result.maps

    def diagnose(
        self, images: Sequence[Image], heatmap: str | None = "gradcam", batch_size: int = 16
    ) -> list[Diagnosis | ImageError]:
        """One result per image, in order: a Diagnosis, or the ImageError that says why it was refused."""
        if heatmap is not None:
            get_method(heatmap)  # unknown names fail before any work
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
                logits, maps = self._logits_and_maps(torch.stack([t for _, t in chunk]), heatmap)
            share = (time.perf_counter() - began) / len(chunk)
            for j, (i, _) in enumerate(chunk):
                probability = float(1.0 / (1.0 + np.exp(-float(logits[j]))))
                results[i] = Diagnosis(
                    name=images[i].name,
                    probability=probability,
                    threshold=self.threshold,
                    decision=probability >= self.threshold,
                    heatmap=None if maps is None else _to_image_frame(maps[j], images[i].height, images[i].width),
                    method=heatmap,
                    device=self.device.type,
                    seconds=share,
                )
        return results  # type: ignore[return-value]


def _to_image_frame(square_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo zero-padding to a square and resizing: the map over the original ``height x width`` pixels."""
    top, left, side = square_box(height, width)
    resized = F.interpolate(
        torch.from_numpy(square_map)[None, None], size=(side, side), mode="bilinear", align_corners=False
    )[0, 0]
    return resized[top : top + height, left : left + width].clamp(0.0, 1.0).numpy().astype(np.float32)


def write_heatmap_files(
    image: Image, modality: str, heatmap: np.ndarray, directory: str | Path, stem: str, alpha: float = 0.4
) -> dict[str, str]:
    """Write ``stem.npy`` (float32 map), ``stem_heatmap.png`` (coloured) and ``stem_overlay.png`` (over the image)."""
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
    return {key: str(path) for key, path in paths.items()}
