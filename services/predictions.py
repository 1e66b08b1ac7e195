"""Predict and store: the one place a model's output on an image is written, and the models that stay loaded.

:func:`store_prediction` keeps one model output on one image, whoever computed it (the Diagnose page, a whole-mosaic
stitch, a study's AI arm, the Results page's scores, a job on the cluster). Its files are written first, each
atomically under its final, content-derived name (the uploaded image, the heatmap, Guided Grad-CAM's extras), then
its rows land in ONE write transaction: the upload (uploads only), the prediction, and their audit entry, with the
job guard :func:`services.jobs.context.claim` inside it, so a cancelled job stores nothing and a running one lists
what it stored. A further model's output on an upload already stored (the Diagnose cascade's grade and Ki-67 calls
after a tumor call, seed 003) is kept on that same upload and audited the same way, naming the call it follows. A
transaction that fails leaves only files that a retry writes again under the same names.

:func:`cached_predictor` keeps a few loaded models per process (least recently used goes first), so a worker that
runs one heatmap or mosaic job after another with the same model loads it once.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from core.data.io import Image
from core.data.store import npy_bytes, store_image, write_atomic
from core.predict import Predictor
from core.settings import workspace_dir
from core.train.recipe import pick_device
from db import repo
from db.audit import log_event
from db.models import SpecimenImage, Upload
from db.repo import ModelInfo
from db.session import read_scope, run_transaction
from services.jobs.context import claim

__all__ = [
    "PREDICTOR_CACHE_SIZE",
    "PredictorCache",
    "SpecimenTarget",
    "StoredPrediction",
    "StoredUploadTarget",
    "UploadTarget",
    "cached_predictor",
    "extras_path",
    "heatmap_path",
    "load_predictor",
    "mosaic_map_path",
    "store_prediction",
]

PREDICTOR_CACHE_SIZE = 4


@dataclass(frozen=True)
class UploadTarget:
    """An uploaded image: stored with its prediction, as an ``uploads`` row in the uploader's name."""

    image: Image
    user_id: int | None


@dataclass(frozen=True)
class SpecimenTarget:
    """A cohort's specimen image, already stored; ``user_id`` is who asked for the prediction, if anyone."""

    image_id: int
    user_id: int | None = None


@dataclass(frozen=True)
class StoredUploadTarget:
    """An upload already stored with an earlier prediction: a further model's output on the same image (the grade
    and Ki-67 calls of the Diagnose cascade); ``follows`` is the prediction that led to it (the tumor call)."""

    upload_id: int
    user_id: int | None
    follows: int | None = None


@dataclass(frozen=True)
class StoredPrediction:
    """What :func:`store_prediction` wrote: row ids and workspace-relative paths."""

    prediction_id: int
    upload_id: int | None = None  # uploads only
    image_path: str | None = None  # the stored upload (uploads only)
    map_path: str | None = None  # the heatmap .npy, when one was given


def load_predictor(model: ModelInfo, device: str = "auto") -> Predictor:
    """Load a registered model's checkpoint, checking its sha256 (a fresh copy; see :func:`cached_predictor`)."""
    return Predictor.from_checkpoint(
        workspace_dir() / model.checkpoint_path, model.threshold, sha256=model.checkpoint_sha256, device=device
    )


class PredictorCache:
    """At most ``size`` loaded predictors, keyed by checkpoint sha256, device and operating threshold (a Predictor
    decides with its own threshold); the least recently used is dropped first. Thread-safe: a model is loaded once
    even when several threads ask for it at the same time. Callers share what it returns and never change it (a
    Predictor holds its own lock while it computes)."""

    def __init__(
        self, size: int = PREDICTOR_CACHE_SIZE, load: Callable[[ModelInfo, str], Predictor] = load_predictor
    ) -> None:
        if size < 1:
            raise ValueError("a predictor cache holds at least one model")
        self.size = size
        self._load = load
        self._lock = threading.Lock()
        self._predictors: OrderedDict[tuple[str, str, float], Predictor] = OrderedDict()

    def get(self, model: ModelInfo, device: str = "auto") -> Predictor:
        """The loaded predictor of ``model`` on ``device`` ("auto": CUDA when there is one), loaded on first use."""
        resolved = str(pick_device(device))
        key = (model.checkpoint_sha256, resolved, float(model.threshold))
        with self._lock:
            predictor = self._predictors.get(key)
            if predictor is None:
                predictor = self._load(model, resolved)
                self._predictors[key] = predictor
                while len(self._predictors) > self.size:
                    self._predictors.popitem(last=False)
            else:
                self._predictors.move_to_end(key)
            return predictor


_cache = PredictorCache()


def cached_predictor(model: ModelInfo, device: str = "auto") -> Predictor:
    """This process's shared predictor of ``model`` (at most :data:`PREDICTOR_CACHE_SIZE` kept loaded)."""
    return _cache.get(model, device)


def heatmap_path(image_sha256: str, model: ModelInfo, method: str) -> str:
    """Where a model's map of an image is kept (workspace-relative); same image, model and method -> same file."""
    return f"heatmaps/{image_sha256[:2]}/{image_sha256}-{model.checkpoint_sha256[:16]}-{method}.npy"


def mosaic_map_path(image_sha256: str, model: ModelInfo, method: str, step: int) -> str:
    """Where a model's map stitched over a whole mosaic with windows ``step`` px apart is kept; the ``mosaics/``
    folder is what marks a prediction as a whole mosaic's."""
    return f"mosaics/{image_sha256[:2]}/{image_sha256}-{model.checkpoint_sha256[:16]}-{method}-{step}.npy"


def extras_path(map_path: str) -> str:
    """Where a heatmap's per-pixel extras (Guided Grad-CAM's gradients for the five views) are kept."""
    return map_path.removesuffix(".npy") + ".extras.npz"


def _specimen_sha256(image_id: int) -> str:
    with read_scope() as session:
        image = session.get(SpecimenImage, image_id)
        if image is None:
            raise ValueError(f"no specimen image with id {image_id}")
        return image.sha256


def _upload_sha256(upload_id: int) -> str:
    with read_scope() as session:
        upload = session.get(Upload, upload_id)
        if upload is None:
            raise ValueError(f"no upload with id {upload_id}")
        return upload.sha256


def _write_maps(map_path: str, heatmap: np.ndarray, extras: Mapping[str, np.ndarray] | None) -> None:
    root = workspace_dir()
    array = heatmap if heatmap.dtype == np.float16 else heatmap.astype(np.float32)
    write_atomic(root / map_path, npy_bytes(array))
    if extras:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: v.astype(np.float16) for k, v in extras.items()})
        write_atomic(root / extras_path(map_path), buffer.getvalue())


def store_prediction(
    model: ModelInfo,
    target: UploadTarget | StoredUploadTarget | SpecimenTarget,
    *,
    probability: float,
    threshold: float,
    method: str | None = None,
    heatmap: np.ndarray | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
    mosaic_step: int | None = None,
    device: str | None = None,
    seconds: float | None = None,
) -> StoredPrediction:
    """Store ``model``'s output on ``target``: its files, then its rows in one write transaction.

    An upload's image is stored by content first. ``heatmap`` (with its ``method``) is kept as float32 .npy, or as
    given when float16 (a reduced mosaic map), at :func:`heatmap_path`, or at :func:`mosaic_map_path` when
    ``mosaic_step`` says it was stitched over a whole mosaic; ``extras`` go next to it as float16 .npz. The method is
    recorded with its map only. Audit: ``diagnosis_stored`` for an upload (new, or already stored, then with the
    prediction it ``follows``), ``prediction_stored`` for a specimen image.
    Inside a job that was cancelled, :class:`services.jobs.context.JobStopped` is raised and no row is stored.
    """
    if heatmap is not None and not method:
        raise ValueError("a stored heatmap needs the name of its method")
    stored = store_image(target.image, workspace_dir()) if isinstance(target, UploadTarget) else None
    upload_sha256 = _upload_sha256(target.upload_id) if isinstance(target, StoredUploadTarget) else None
    map_path = None
    if heatmap is not None:
        if stored is not None:
            sha256 = stored.sha256
        else:
            sha256 = upload_sha256 if upload_sha256 is not None else _specimen_sha256(target.image_id)
        if mosaic_step is None:
            map_path = heatmap_path(sha256, model, method)
        else:
            map_path = mosaic_map_path(sha256, model, method, mosaic_step)
        _write_maps(map_path, heatmap, extras)

    def work(session: Session) -> StoredPrediction:
        upload_id = image_id = None
        if isinstance(target, UploadTarget):
            upload_id = repo.add_upload(
                session,
                user_id=target.user_id,
                original_name=target.image.name,
                modality=model.modality,
                path=stored.path,
                sha256=stored.sha256,
                height=stored.height,
                width=stored.width,
            )
        elif isinstance(target, StoredUploadTarget):
            upload_id = target.upload_id
        else:
            image_id = target.image_id
        prediction_id = repo.add_prediction(
            session,
            model_id=model.id,
            upload_id=upload_id,
            image_id=image_id,
            probability=probability,
            threshold=threshold,
            heatmap_method=method if map_path else None,
            heatmap_path=map_path,
            device=device,
            seconds=seconds,
        )
        if upload_id is not None:  # a new upload, or one already stored (then naming the call it follows)
            new = stored is not None
            claim(session, **({"uploads": [upload_id]} if new else {}), predictions=[prediction_id])
            log_event(
                session,
                "diagnosis_stored",
                user_id=target.user_id,
                upload=upload_id,
                prediction=prediction_id,
                model=model.name,
                image_sha256=stored.sha256 if new else upload_sha256,
                **({} if new else {"follows": target.follows}),
            )
        else:
            claim(session, predictions=[prediction_id])
            log_event(
                session,
                "prediction_stored",
                user_id=target.user_id,
                prediction=prediction_id,
                model=model.name,
                image=image_id,
                method=method if map_path else None,
            )
        return StoredPrediction(
            prediction_id=prediction_id,
            upload_id=upload_id,
            image_path=stored.path if stored is not None else None,
            map_path=map_path,
        )

    return run_transaction(work)
