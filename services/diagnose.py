"""On-demand diagnosis of uploaded files: validate, predict, and store through :mod:`services.predictions`.

Each file is its own unit of work: a refused file stores nothing and does not stop the others; an accepted file's
image, upload row, heatmap and prediction row land together. ``load_predictor``, ``heatmap_path`` and
``extras_path`` live in :mod:`services.predictions` and are importable from here too.

The cascade of the FL-CNN paper (Shen et al. 2021, seed 003, Methods: "Specimen images were firstly fed into CNN 1
to classify whether they were tumor or non-tumor. Then, images of tumor specimens were fed into CNN 2 and CNN 3 in
parallel to predict their grade and Ki-67 level"): after a tumor model's call, an image called tumor goes on to the
grade and Ki-67 models of the same modality (:func:`cascade_models`: the newest registered of each task, as the
Diagnose page's default tumor model is the newest), each at its registered threshold. Their calls are stored as
further predictions on the same upload (audited ``diagnosis_stored``, naming the tumor call they follow); an image
called non-tumor is not assessed for grade and Ki-67, and a task without a registered model is said to have none.
Each assessed call gets its model's own default heatmap (:func:`core.triage.default_method`, usually Grad-CAM),
stored with it as the tumor call's map is, so a clinician sees where the grade or Ki-67 model's evidence lies; when
the tumor call is made without a heatmap, its cascade has none either. The page's direct path and its Score-CAM jobs
(``services.jobs.kinds``, the calls in the job's result) both run it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from core.data.io import Image, ImageError, read_image
from core.predict import Predictor
from core.triage import default_method
from db import repo
from db.repo import ModelInfo
from db.session import read_scope
from services.predictions import (
    StoredUploadTarget,
    UploadTarget,
    extras_path,
    heatmap_path,
    load_predictor,
    store_prediction,
)

__all__ = [
    "CASCADE_TASKS",
    "CascadeCall",
    "Outcome",
    "cascade_lines",
    "cascade_models",
    "diagnose_files",
    "extras_path",
    "heatmap_path",
    "load_predictor",
]


CASCADE_TASKS = ("grade", "ki67")  # what a tumor call is followed by (seed 003's CNN 2 and CNN 3)
ASSESSED, NOT_ASSESSED, NO_MODEL = "assessed", "not assessed", "no model"
_SHOWN = {"grade": ("Grade", ("DLGG", "GBM")), "ki67": ("Ki-67", ("< 10 %", ">= 10 %"))}  # title, (neg, pos)


@dataclass(frozen=True)
class CascadeCall:
    """One cascade task's outcome on one image: ``status`` is "assessed" (with the model's call, its stored
    prediction and, when the tumor call had one, its heatmap and the heatmap's method), "not assessed" (the image was
    called non-tumor) or "no model" (none registered for the task and modality; ``model`` is then None)."""

    task: str
    status: str
    model: str | None = None
    prediction_id: int | None = None
    probability: float | None = None
    threshold: float | None = None
    decision: bool | None = None
    heatmap: str | None = None  # workspace-relative .npy path, as Outcome.heatmap
    method: str | None = None  # the heatmap's method (the model's default, core.triage.default_method)


_CALL_FIELDS = frozenset(f.name for f in fields(CascadeCall))


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
    cascade: tuple[CascadeCall, ...] = ()  # grade and Ki-67 after a tumor model's call; empty for other tasks


def cascade_models(model: ModelInfo) -> dict[str, ModelInfo | None]:
    """The models a tumor model's call is followed by: per cascade task, the newest registered model of the same
    modality (None when there is none); empty for a model of another task."""
    if model.task != "tumor":
        return {}
    with read_scope() as session:
        return {task: repo.model_for(session, task, model.modality) for task in CASCADE_TASKS}


def cascade_lines(calls: Sequence[CascadeCall | Mapping[str, Any]], modality: str) -> list[str]:
    """What a clinician reads of an image's cascade, one plain-text line per task (e.g. "Grade: GBM (p=0.71,
    threshold 0.42) · model FL-grade"), or one line when the image was called non-tumor. Stored calls (dicts) may
    lack newer keys or carry keys this version does not know."""
    calls = [c if isinstance(c, CascadeCall) else _call(c) for c in calls]
    if calls and all(c.status == NOT_ASSESSED for c in calls):
        return ["Grade and Ki-67 were not assessed: the specimen was called non-tumor."]
    lines = []
    for call in calls:
        title, decisions = _SHOWN[call.task]
        if call.status == ASSESSED:
            lines.append(
                f"{title}: {decisions[int(bool(call.decision))]} (p={call.probability:.2f}, threshold "
                f"{call.threshold:.2f}) · model {call.model}"
            )
        elif call.status == NOT_ASSESSED:
            lines.append(f"{title}: not assessed, as the specimen was called non-tumor")
        else:
            named = "grade" if call.task == "grade" else title
            lines.append(f"{title}: not assessed, as no {modality} {named} model is registered")
    return lines


def _call(stored: Mapping[str, Any]) -> CascadeCall:
    """A call kept as a dict (a job's result): keys of an older or newer version are tolerated."""
    return CascadeCall(**{key: value for key, value in stored.items() if key in _CALL_FIELDS})


def _cascade(
    image: Image,
    tumor: bool,
    stages: Mapping[str, tuple[Predictor, ModelInfo] | None],
    upload_id: int,
    prediction_id: int,
    user_id: int | None,
    with_maps: bool,
) -> tuple[CascadeCall, ...]:
    """The grade and Ki-67 calls on an image the tumor model called ``tumor``, each stored on the upload with, when
    ``with_maps`` (the tumor call had a heatmap), its model's default heatmap; nothing is computed for an image called
    non-tumor."""
    calls = []
    for task in CASCADE_TASKS:
        stage = stages.get(task)
        if stage is None:
            calls.append(CascadeCall(task, NO_MODEL))
            continue
        predictor, model = stage
        if not tumor:
            calls.append(CascadeCall(task, NOT_ASSESSED, model.name))
            continue
        method = default_method(predictor.methods, model.architecture) if with_maps else None
        (result,) = predictor.diagnose([image], heatmap=method)
        if isinstance(result, ImageError):
            raise result
        stored = store_prediction(
            model,
            StoredUploadTarget(upload_id, user_id, follows=prediction_id),
            probability=result.probability,
            threshold=result.threshold,
            method=result.method,
            heatmap=result.heatmap,
            extras=result.extras,
            device=result.device,
            seconds=result.seconds,
        )
        calls.append(
            CascadeCall(
                task,
                ASSESSED,
                model.name,
                prediction_id=stored.prediction_id,
                probability=result.probability,
                threshold=result.threshold,
                decision=result.decision,
                heatmap=stored.map_path,
                method=result.method if stored.map_path else None,
            )
        )
    return tuple(calls)


def _check_cascade(model: ModelInfo, cascade: Mapping[str, tuple[Predictor, ModelInfo] | None]) -> None:
    if model.task != "tumor":
        raise ValueError(f"only a tumor call is followed by grade and Ki-67; {model.name} is a {model.task} model")
    for task, stage in cascade.items():
        if task not in CASCADE_TASKS:
            raise ValueError(f"unknown cascade task {task!r}; expected one of {', '.join(CASCADE_TASKS)}")
        if stage is not None:
            predictor, info = stage
            if (info.task, info.modality, predictor.modality) != (task, model.modality, model.modality):
                raise ValueError(f"{info.name} is not a {model.modality} {task} model with its predictor")


def diagnose_files(
    predictor: Predictor,
    model: ModelInfo,
    files: Sequence[tuple[str, bytes | str | Path]],
    *,
    user_id: int | None,
    heatmap: str | None = "gradcam",
    progress: Callable[[int, int], None] | None = None,
    options: dict | None = None,
    cascade: Mapping[str, tuple[Predictor, ModelInfo] | None] | None = None,
) -> list[Outcome]:
    """Diagnose ``(original name, bytes or path)`` pairs in order; one Outcome per file, refused ones included.

    ``options`` go to the heatmap method (e.g. Score-CAM's own ``progress`` callback). ``cascade`` (a tumor model
    only) maps each of :data:`CASCADE_TASKS` to its (predictor, model), or to None when none is registered (see
    :func:`cascade_models`): each image's tumor call is then followed by its grade and Ki-67 calls, with their
    models' default heatmaps when ``heatmap`` is not None."""
    if predictor.modality != model.modality:
        raise ValueError(f"predictor modality {predictor.modality} does not match model {model.name}")
    if cascade is not None:
        _check_cascade(model, cascade)
    outcomes: list[Outcome] = []
    for done, (name, source) in enumerate(files, start=1):
        try:
            image = read_image(source, name)
            (result,) = predictor.diagnose([image], heatmap=heatmap, options=options)
            if isinstance(result, ImageError):
                raise result
            stored = store_prediction(
                model,
                UploadTarget(image, user_id),
                probability=result.probability,
                threshold=result.threshold,
                method=result.method,
                heatmap=result.heatmap,
                extras=result.extras,
                device=result.device,
                seconds=result.seconds,
            )
            calls = ()
            if cascade is not None:
                calls = _cascade(
                    image,
                    result.decision,
                    cascade,
                    stored.upload_id,
                    stored.prediction_id,
                    user_id,
                    with_maps=heatmap is not None,
                )
            outcomes.append(
                Outcome(
                    name=image.name,
                    upload_id=stored.upload_id,
                    prediction_id=stored.prediction_id,
                    probability=result.probability,
                    threshold=result.threshold,
                    decision=result.decision,
                    heatmap=stored.map_path,
                    image=stored.image_path,
                    device=result.device,
                    seconds=result.seconds,
                    cascade=calls,
                )
            )
        except ImageError as error:
            outcomes.append(Outcome(name=name, error=error.reason))
        if progress:
            progress(done, len(files))
    return outcomes
