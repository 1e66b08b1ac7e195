"""The Diagnose cascade of seed 003 (FL-CNN): a tumor call is followed by the grade and Ki-67 models of the same
modality, stored and audited on the same upload; a non-tumor call is not; a missing model is said."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sqlalchemy import select

from core.data.io import read_image
from core.settings import workspace_dir
from core.triage import default_method
from db import repo
from db.models import AuditEvent, Prediction
from db.session import init_db, read_scope, session_scope
from services.diagnose import (
    ASSESSED,
    NO_MODEL,
    NOT_ASSESSED,
    CascadeCall,
    cascade_lines,
    cascade_models,
    diagnose_files,
    load_predictor,
)


def _models(*names):
    with read_scope() as session:
        return [repo.find_model(session, name) for name in names]


def _clinician():
    init_db()
    with session_scope() as s:
        existing = [u for u in repo.list_users(s) if u.username == "cascade-clin"]
        return existing[0].id if existing else repo.create_user(s, "cascade-clin", "cascade-pw", "clinician").id


def _fl_image():
    """A test-split FL specimen image of the workspace: (name, path)."""
    with read_scope() as session:
        frame = repo.specimen_images(session, "FL", ("test",))
    path = workspace_dir() / frame["path"].iloc[0]
    return path.name, path


def _stages(*names):
    return {m.task: (load_predictor(m), m) for m in _models(*names)}


def _tumor(threshold: float):
    """The FL tumor model deciding at ``threshold`` (0: every image is called tumor; above 1: none is)."""
    (model,) = _models("casc-FL-tumor")
    return dataclasses.replace(model, threshold=threshold)


def test_cascade_models_are_the_newest_of_each_task_and_modality(use_cascade):
    tumor, grade = _models("casc-WL-tumor", "casc-FL-grade")
    found = cascade_models(tumor)
    assert {task: m.name for task, m in found.items()} == {"grade": "casc-WL-grade", "ki67": "casc-WL-ki67"}
    (fl_tumor,) = _models("casc-FL-tumor")
    assert cascade_models(fl_tumor)["grade"].name == "casc-FL-grade"  # not the older casc-FL-grade-older
    assert cascade_models(grade) == {}  # only a tumor call is followed


def test_without_registered_grade_and_ki67_models_there_is_nothing_to_follow(use_trained):
    (tumor,) = _models("tiny-FL")
    assert cascade_models(tumor) == {"grade": None, "ki67": None}


def test_a_tumor_call_runs_grade_and_ki67_and_stores_them_on_the_upload(use_cascade):
    user = _clinician()
    tumor = _tumor(0.0)
    name, path = _fl_image()
    stages = _stages("casc-FL-grade", "casc-FL-ki67")
    (outcome,) = diagnose_files(load_predictor(tumor), tumor, [(name, path)], user_id=user, cascade=stages)
    assert outcome.error is None and outcome.decision is True
    assert [(c.task, c.status, c.model) for c in outcome.cascade] == [
        ("grade", ASSESSED, "casc-FL-grade"),
        ("ki67", ASSESSED, "casc-FL-ki67"),
    ]
    image = read_image(path, name)
    for call in outcome.cascade:
        predictor, model = stages[call.task]
        (expected,) = predictor.diagnose([image], heatmap=None)
        assert call.probability == pytest.approx(expected.probability, abs=1e-5)
        assert call.threshold == model.threshold and call.decision == (call.probability >= model.threshold)
    with read_scope() as session:
        rows = session.scalars(select(Prediction).where(Prediction.upload_id == outcome.upload_id)).all()
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "diagnosis_stored").order_by(AuditEvent.id.desc()).limit(3)
        ).all()
    by_id = {row.id: row for row in rows}
    assert set(by_id) == {outcome.prediction_id, *(c.prediction_id for c in outcome.cascade)}
    for call in outcome.cascade:
        row = by_id[call.prediction_id]
        assert row.model_id == stages[call.task][1].id and row.heatmap_path == call.heatmap
        assert row.probability == pytest.approx(call.probability)
    followers = {e.detail["prediction"]: e.detail for e in events if e.detail.get("follows")}
    assert set(followers) == {c.prediction_id for c in outcome.cascade}
    assert all(d["follows"] == outcome.prediction_id and d["upload"] == outcome.upload_id for d in followers.values())
    assert {d["model"] for d in followers.values()} == {"casc-FL-grade", "casc-FL-ki67"}
    assert all(e.user_id == user for e in events)


def test_each_cascade_call_stores_its_own_models_default_heatmap(use_cascade):
    """The grade and Ki-67 models' own maps (their default method), kept as the tumor call's map is: a file over the
    image's pixels, named in the call and in its stored prediction, with the method."""
    tumor = _tumor(0.0)
    name, path = _fl_image()
    stages = _stages("casc-FL-grade", "casc-FL-ki67")
    (outcome,) = diagnose_files(
        load_predictor(tumor), tumor, [(name, path)], user_id=None, heatmap="gradcam", cascade=stages
    )
    image = read_image(path, name)
    assert image.height != image.width  # the map must follow the image's own shape, not the model's square input
    with read_scope() as session:
        rows = {p.id: p for p in session.scalars(select(Prediction).where(Prediction.upload_id == outcome.upload_id))}
    maps = {}
    for call in outcome.cascade:
        predictor, model = stages[call.task]
        method = default_method(predictor.methods, model.architecture)
        assert call.status == ASSESSED and call.method == method and call.heatmap
        assert call.heatmap not in (outcome.heatmap, *maps.values())  # a map of its own, not the tumor call's
        row = rows[call.prediction_id]
        assert (row.heatmap_path, row.heatmap_method) == (call.heatmap, method)
        stored = np.load(workspace_dir() / call.heatmap)
        assert stored.shape == (image.height, image.width)
        assert stored.min() >= 0.0 and stored.max() <= 1.0
        (expected,) = predictor.diagnose([image], heatmap=method)
        np.testing.assert_allclose(stored, expected.heatmap, atol=1e-5)
        maps[call.task] = call.heatmap
    assert dataclasses.asdict(outcome)["cascade"][0]["heatmap"] == maps["grade"]  # kept in a job's result as is


def test_without_a_heatmap_for_the_tumor_call_the_cascade_computes_none(use_cascade):
    tumor = _tumor(0.0)
    name, path = _fl_image()
    stages = _stages("casc-FL-grade", "casc-FL-ki67")
    asked = []
    for predictor, _model in stages.values():
        diagnose = predictor.diagnose

        def spy(images, heatmap="gradcam", *args, _diagnose=diagnose, **kwargs):
            asked.append(heatmap)
            return _diagnose(images, heatmap, *args, **kwargs)

        predictor.diagnose = spy
    predictor = load_predictor(tumor)
    (outcome,) = diagnose_files(predictor, tumor, [(name, path)], user_id=None, heatmap=None, cascade=stages)
    assert outcome.heatmap is None and asked == [None, None]
    assert [(c.status, c.heatmap, c.method) for c in outcome.cascade] == [(ASSESSED, None, None)] * 2
    with read_scope() as session:
        rows = session.scalars(select(Prediction).where(Prediction.upload_id == outcome.upload_id)).all()
    assert len(rows) == 3 and all(row.heatmap_path is None and row.heatmap_method is None for row in rows)


def test_stored_calls_of_older_or_newer_versions_still_read(use_cascade):
    """A job's result kept before calls had heatmaps, and one with a key this version does not know."""
    older = {"task": "grade", "status": ASSESSED, "model": "m", "prediction_id": 1, "probability": 0.7}
    older |= {"threshold": 0.5, "decision": True}
    newer = {"task": "ki67", "status": NO_MODEL, "model": None, "heatmap": None, "method": None, "shown_as": "x"}
    assert cascade_lines([older, newer], "FL") == [
        "Grade: GBM (p=0.70, threshold 0.50) · model m",
        "Ki-67: not assessed, as no FL Ki-67 model is registered",
    ]


def test_a_non_tumor_call_is_not_assessed_for_grade_or_ki67(use_cascade):
    user = _clinician()
    tumor = _tumor(1.5)
    name, path = _fl_image()
    stages = _stages("casc-FL-grade", "casc-FL-ki67")
    (outcome,) = diagnose_files(load_predictor(tumor), tumor, [(name, path)], user_id=user, cascade=stages)
    assert outcome.decision is False
    assert outcome.cascade == (
        CascadeCall("grade", NOT_ASSESSED, "casc-FL-grade"),
        CascadeCall("ki67", NOT_ASSESSED, "casc-FL-ki67"),
    )
    assert cascade_lines(outcome.cascade, "FL") == [
        "Grade and Ki-67 were not assessed: the specimen was called non-tumor."
    ]
    with read_scope() as session:
        stored = session.scalars(select(Prediction.id).where(Prediction.upload_id == outcome.upload_id)).all()
    assert stored == [outcome.prediction_id]


def test_a_missing_model_is_said_and_the_others_still_run(use_cascade):
    tumor = _tumor(0.0)
    name, path = _fl_image()
    stages = _stages("casc-FL-grade") | {"ki67": None}
    (outcome,) = diagnose_files(load_predictor(tumor), tumor, [(name, path)], user_id=None, cascade=stages)
    grade, ki67 = outcome.cascade
    assert grade.status == ASSESSED and grade.prediction_id is not None
    assert ki67 == CascadeCall("ki67", NO_MODEL)
    assert cascade_lines(outcome.cascade, "FL") == [
        f"Grade: {'GBM' if grade.decision else 'DLGG'} (p={grade.probability:.2f}, threshold {grade.threshold:.2f}) "
        "· model casc-FL-grade",
        "Ki-67: not assessed, as no FL Ki-67 model is registered",
    ]
    (plain,) = diagnose_files(load_predictor(tumor), tumor, [(name, path)], user_id=None)
    assert plain.cascade == ()  # no cascade asked for: the tumor call alone, as before


def test_a_cascade_of_another_modality_or_after_another_task_is_refused(use_cascade):
    tumor = _tumor(0.0)
    name, path = _fl_image()
    with pytest.raises(ValueError, match="not a FL grade model"):
        diagnose_files(load_predictor(tumor), tumor, [(name, path)], user_id=None, cascade=_stages("casc-WL-grade"))
    (grade,) = _models("casc-FL-grade")
    with pytest.raises(ValueError, match="only a tumor call"):
        diagnose_files(load_predictor(grade), grade, [(name, path)], user_id=None, cascade={"ki67": None})


def test_a_score_cam_job_runs_the_cascade_too_and_keeps_its_calls_in_the_result(use_cascade):
    from db.models import Job
    from services.jobs import store
    from services.jobs.kinds import check_params
    from services.jobs.runner import execute

    user = _clinician()
    name, path = _fl_image()
    incoming = workspace_dir() / "incoming" / "cascade-job.png"
    incoming.parent.mkdir(parents=True, exist_ok=True)
    incoming.write_bytes(path.read_bytes())
    _, params = check_params(
        "scorecam", {"model": "casc-FL-tumor", "file": "incoming/cascade-job.png", "name": name, "method": "gradcam"}
    )
    with session_scope() as session:
        job = Job(kind="scorecam", title="gradcam", params=params, state="queued", submitted_by=user)
        session.add(job)
        session.flush()
        job_id = job.id
    assert execute(job_id) == "succeeded"
    result = store.get_job(job_id).result
    calls = [CascadeCall(**call) for call in result["cascade"]]
    assert result["modality"] == "FL" and [c.task for c in calls] == ["grade", "ki67"]
    with read_scope() as session:
        tumor = session.get(Prediction, result["prediction_id"])
        stored = session.scalars(select(Prediction).where(Prediction.upload_id == result["upload_id"])).all()
    called_tumor = tumor.probability >= tumor.threshold
    assert {c.status for c in calls} == {ASSESSED if called_tumor else NOT_ASSESSED}
    assert len(stored) == (3 if called_tumor else 1)  # the calls land on the job's upload
    maps = {row.id: row.heatmap_path for row in stored}
    for call in calls:  # a Grad-CAM job: each assessed call has its own model's map too
        assert (call.heatmap is not None) == (call.method is not None) == called_tumor
        assert call.heatmap is None or maps[call.prediction_id] == call.heatmap
    assert cascade_lines(calls, "FL")  # what the page shows under the job's heatmap
