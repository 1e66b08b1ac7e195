"""The AI output an aided arm shows: one stored prediction (and heatmap) per case image and arm model.

Computed when the PI creates the study (``prepare_study_ai``, with progress) and, should one be missing, on the
reader's first view of the case (``ensure_case_ai``). Predictions on specimen images are ordinary ``predictions``
rows (``image_id`` set), so the Data page and the Results page see them too; they are stored (and audited,
``prediction_stored``) by :func:`services.predictions.store_prediction`, with the models kept loaded by
:func:`services.predictions.cached_predictor`.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select

from core.data.io import MOSAIC_MAX_PIXELS, ImageError, read_image
from core.settings import workspace_dir
from db import repo
from db.models import ArmCase, Prediction, SpecimenImage, StudyArm, StudyCase
from db.session import read_scope
from services.mosaic import mosaic_array, stitch_and_store, study_step
from services.predictions import SpecimenTarget, cached_predictor, store_prediction

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
    for done, (arm_id, image_id) in enumerate(todo, start=1):
        _compute_one(arm_id, image_id)
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
        _compute_one(arm_id, image_id)


def _compute_one(arm_id: int, image_id: int) -> None:
    """Predict one specimen image with an arm's model (and its heatmap method) and store it."""
    with read_scope() as session:
        arm = session.get(StudyArm, arm_id)
        model_id, method = arm.model_id, arm.heatmap_method
    _predict_one(model_id, image_id, method)


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
    for count, image_id in enumerate(todo, start=1):
        _predict_one(model_id, image_id, None)
        if progress:
            progress(count, len(todo))
    return len(todo)


def _predict_one(model_id: int, image_id: int, method: str | None) -> None:
    """Predict one specimen image with a model (and a heatmap method, if any) and store it."""
    with read_scope() as session:
        image = session.get(SpecimenImage, image_id)
        model = repo.find_model(session, model_id)
        path, modality = image.path, image.modality
    predictor = cached_predictor(model)
    if model.task == "aspecific":  # an RCM patch classifier: its map is stitched over the whole mosaic (seed 002)
        mosaic = mosaic_array(read_image(workspace_dir() / path, max_pixels=MOSAIC_MAX_PIXELS), modality)
        window = predictor.image_size
        if min(mosaic.shape) < window:
            raise ImageError(path, f"the mosaic is smaller than one {window} px window of {model.name}")
        stitch_and_store(
            predictor, model, mosaic, SpecimenTarget(image_id), step=study_step(window), method=method or "cam"
        )
        return
    (result,) = predictor.diagnose([read_image(workspace_dir() / path)], heatmap=method)
    if isinstance(result, ImageError):
        raise result
    store_prediction(
        model,
        SpecimenTarget(image_id),
        probability=result.probability,
        threshold=result.threshold,
        method=result.method,
        heatmap=result.heatmap,
        device=result.device,
        seconds=result.seconds,
    )
