"""The AI output an aided arm shows: one stored prediction (and heatmap) per case image and arm model.

Computed when the PI creates the study (``prepare_study_ai``, with progress) and, should one be missing, on the
reader's first view of the case (``ensure_case_ai``). Predictions on specimen images are ordinary ``predictions``
rows (``image_id`` set), so the Data page and the Results page see them too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sqlalchemy import select

from core.data.io import read_image
from core.data.store import npy_bytes, write_atomic
from core.predict import Predictor
from core.settings import workspace_dir
from db import repo
from db.models import ArmCase, Prediction, SpecimenImage, StudyArm, StudyCase
from db.session import read_scope, session_scope
from services.diagnose import heatmap_path, load_predictor

__all__ = ["ensure_case_ai", "missing_ai", "predict_images", "prepare_study_ai"]


def missing_ai(study_id: int) -> list[tuple[int, int]]:
    """(arm id, specimen image id) pairs of aided arms that have no stored AI output yet."""
    with read_scope() as session:
        arms = session.scalars(select(StudyArm).where(StudyArm.study_id == study_id)).all()
        out = []
        for arm in arms:
            if arm.model_id is None:
                continue
            images = session.scalars(
                select(SpecimenImage.id)
                .join(StudyCase, StudyCase.specimen_id == SpecimenImage.specimen_id)
                .where(
                    StudyCase.study_id == study_id,
                    StudyCase.training.is_(False),
                    SpecimenImage.modality == arm.modality,
                )
            ).all()
            stmt = select(Prediction.image_id).where(
                Prediction.model_id == arm.model_id, Prediction.image_id.in_(images)
            )
            if arm.heatmap_method:
                stmt = stmt.where(Prediction.heatmap_method == arm.heatmap_method)
            done = set(session.scalars(stmt))
            out.extend((arm.id, image_id) for image_id in images if image_id not in done)
    return out


def prepare_study_ai(study_id: int, *, progress: Callable[[int, int], None] | None = None) -> int:
    """Compute and store every missing AI output of the study's aided arms; returns how many were computed."""
    todo = missing_ai(study_id)
    predictors: dict[str, Predictor] = {}
    for done, (arm_id, image_id) in enumerate(todo, start=1):
        _compute_one(arm_id, image_id, predictors)
        if progress:
            progress(done, len(todo))
    return len(todo)


def ensure_case_ai(study_id: int, arm_id: int, token: str) -> None:
    """Compute the AI output of one case in one aided arm if it is missing (a reader's first view of it)."""
    with read_scope() as session:
        case = session.scalar(
            select(StudyCase)
            .join(ArmCase, ArmCase.case_id == StudyCase.id)
            .where(ArmCase.token == token, ArmCase.arm_id == arm_id, StudyCase.study_id == study_id)
        )
        arm = session.get(StudyArm, arm_id)
        if case is None or arm is None or arm.model_id is None:
            return
        image_id = session.scalar(
            select(SpecimenImage.id).where(
                SpecimenImage.specimen_id == case.specimen_id, SpecimenImage.modality == arm.modality
            )
        )
    if (arm_id, image_id) in set(missing_ai(study_id)):
        _compute_one(arm_id, image_id, {})


def _compute_one(arm_id: int, image_id: int, predictors: dict[str, Predictor]) -> None:
    """Predict one specimen image with an arm's model (and its heatmap method) and store it."""
    with read_scope() as session:
        arm = session.get(StudyArm, arm_id)
        model_id, method = arm.model_id, arm.heatmap_method
    _predict_one(model_id, image_id, method, predictors)


def predict_images(
    model_id: int,
    image_ids: list[int],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Store a model's prediction (no heatmap) on each specimen image that has none from it yet; returns how many
    were computed (the Results page's scores)."""
    with read_scope() as session:
        done = set(
            session.scalars(
                select(Prediction.image_id).where(Prediction.model_id == model_id, Prediction.image_id.in_(image_ids))
            )
        )
    todo = [i for i in image_ids if i not in done]
    predictors: dict[str, Predictor] = {}
    for count, image_id in enumerate(todo, start=1):
        _predict_one(model_id, image_id, None, predictors)
        if progress:
            progress(count, len(todo))
    return len(todo)


def _predict_one(model_id: int, image_id: int, method: str | None, predictors: dict[str, Predictor]) -> None:
    root = workspace_dir()
    with read_scope() as session:
        image = session.get(SpecimenImage, image_id)
        model = repo.find_model(session, model_id)
        path, sha = image.path, image.sha256
    if model.checkpoint_sha256 not in predictors:
        predictors[model.checkpoint_sha256] = load_predictor(model)
    (result,) = predictors[model.checkpoint_sha256].diagnose([read_image(root / path)], heatmap=method)
    map_path = None
    if method and result.heatmap is not None:
        map_path = heatmap_path(sha, model, method)
        write_atomic(root / map_path, npy_bytes(result.heatmap.astype(np.float32)))
    with session_scope() as session:
        repo.add_prediction(
            session,
            model_id=model.id,
            image_id=image_id,
            probability=result.probability,
            threshold=result.threshold,
            heatmap_method=method if map_path else None,
            heatmap_path=map_path,
            device=result.device,
            seconds=result.seconds,
        )
