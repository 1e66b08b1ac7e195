"""On-demand diagnosis of uploaded files: validate, store, predict, keep the heatmap, record everything.

Each file is its own unit of work: a refused file stores nothing and does not stop the others; an accepted file's
image, upload row, heatmap and prediction row land together.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from core.data.io import Image, ImageError, read_image
from core.data.store import StoredImage, npy_bytes, store_image, write_atomic
from core.predict import Diagnosis, Predictor
from core.settings import workspace_dir
from db import repo
from db.audit import log_event
from db.repo import ModelInfo
from db.session import run_transaction

__all__ = [
    "Outcome",
    "diagnose_files",
    "extras_path",
    "heatmap_path",
    "load_predictor",
    "record_prediction",
]


@dataclass(frozen=True)
class Outcome:
    """What happened to one uploaded file; ``error`` is set when it was refused."""

    name: str
    error: str | None = None
    upload_id: int | None = None
    prediction_id: int | None = None
    probability: float | None = None
    threshold: float | None = None
    decision: bool | None = None
    heatmap: str | None = None  # workspace-relative .npy path
    image: str | None = None  # workspace-relative stored image path
    device: str | None = None
    seconds: float | None = None


def load_predictor(model: ModelInfo, device: str = "auto") -> Predictor:
    """Load a registered model's checkpoint, checking its sha256."""
    return Predictor.from_checkpoint(
        workspace_dir() / model.checkpoint_path, model.threshold, sha256=model.checkpoint_sha256, device=device
    )


def heatmap_path(image_sha256: str, model: ModelInfo, method: str) -> str:
    """Where a model's map of an image is kept (workspace-relative); same image, model and method -> same file."""
    return f"heatmaps/{image_sha256[:2]}/{image_sha256}-{model.checkpoint_sha256[:16]}-{method}.npy"


def extras_path(map_path: str) -> str:
    """Where a heatmap's per-pixel extras (Guided Grad-CAM's gradients for the five views) are kept."""
    return map_path.removesuffix(".npy") + ".extras.npz"


def diagnose_files(
    predictor: Predictor,
    model: ModelInfo,
    files: Sequence[tuple[str, bytes | str | Path]],
    *,
    user_id: int | None,
    heatmap: str | None = "gradcam",
    progress: Callable[[int, int], None] | None = None,
    options: dict | None = None,
) -> list[Outcome]:
    """Diagnose ``(original name, bytes or path)`` pairs in order; one Outcome per file, refused ones included.

    ``options`` go to the heatmap method (e.g. Score-CAM's own ``progress`` callback)."""
    if predictor.modality != model.modality:
        raise ValueError(f"predictor modality {predictor.modality} does not match model {model.name}")
    outcomes: list[Outcome] = []
    for done, (name, source) in enumerate(files, start=1):
        try:
            image = read_image(source, name)
            (result,) = predictor.diagnose([image], heatmap=heatmap, options=options)
            if isinstance(result, ImageError):
                raise result
            outcomes.append(_record(image, result, model, user_id))
        except ImageError as error:
            outcomes.append(Outcome(name=name, error=error.reason))
        if progress:
            progress(done, len(files))
    return outcomes


def _record(image: Image, result: Diagnosis, model: ModelInfo, user_id: int | None) -> Outcome:
    root = workspace_dir()
    stored = store_image(image, root)
    map_path = None
    if result.heatmap is not None and result.method:
        map_path = heatmap_path(stored.sha256, model, result.method)
        write_atomic(root / map_path, npy_bytes(result.heatmap.astype(np.float32)))
        if result.extras:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **{k: v.astype(np.float16) for k, v in result.extras.items()})
            write_atomic(root / extras_path(map_path), buffer.getvalue())
    upload_id, prediction_id = record_prediction(
        stored,
        image.name,
        model,
        user_id,
        result.probability,
        result.threshold,
        result.method,
        map_path,
        result.device,
        result.seconds,
    )
    return Outcome(
        name=image.name,
        upload_id=upload_id,
        prediction_id=prediction_id,
        probability=result.probability,
        threshold=result.threshold,
        decision=result.decision,
        heatmap=map_path,
        image=stored.path,
        device=result.device,
        seconds=result.seconds,
    )


def record_prediction(
    stored: StoredImage,
    original_name: str,
    model: ModelInfo,
    user_id: int | None,
    probability: float,
    threshold: float,
    method: str | None,
    map_path: str | None,
    device: str | None,
    seconds: float | None,
) -> tuple[int, int]:
    """The upload row of a stored image, its prediction row and their audit entry, in one write transaction:
    ``(upload_id, prediction_id)``."""

    def work(session: Session) -> tuple[int, int]:
        upload_id = repo.add_upload(
            session,
            user_id=user_id,
            original_name=original_name,
            modality=model.modality,
            path=stored.path,
            sha256=stored.sha256,
            height=stored.height,
            width=stored.width,
        )
        prediction_id = repo.add_prediction(
            session,
            model_id=model.id,
            upload_id=upload_id,
            probability=probability,
            threshold=threshold,
            heatmap_method=method,
            heatmap_path=map_path,
            device=device,
            seconds=seconds,
        )
        log_event(
            session,
            "diagnosis_stored",
            user_id=user_id,
            upload=upload_id,
            prediction=prediction_id,
            model=model.name,
            image_sha256=stored.sha256,
        )
        return upload_id, prediction_id

    return run_transaction(work)
