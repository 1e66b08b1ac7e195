"""The one predict-and-store service: files then rows in one write transaction, the job guard, and loaded models."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from core.data.io import read_image
from core.data.store import png_bytes, store_image
from core.settings import pointing_at
from db import repo
from db.models import AuditEvent, Job, Prediction, Upload
from db.repo import ModelInfo
from db.session import init_db, read_scope, session_scope
from services.jobs.context import JobStopped, RunningJob, running_job
from services.predictions import (
    PredictorCache,
    SpecimenTarget,
    UploadTarget,
    cached_predictor,
    extras_path,
    heatmap_path,
    load_predictor,
    mosaic_map_path,
    store_prediction,
)
from services.study_ai import predict_images

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 255, (32, 40), dtype=np.uint8)


@pytest.fixture
def stored_db(workspace: Path) -> dict:
    """A fresh database with one registered model (its checkpoint is never loaded) and one specimen image."""
    init_db()
    with session_scope() as s:
        model = repo.register_model(
            s,
            name="fake-FL",
            architecture="tiny_cnn",
            task="tumor",
            modality="FL",
            image_size=32,
            checkpoint_path="models/fake.pt",
            checkpoint_sha256="ab" * 32,
            threshold=0.5,
            threshold_policy="sens90",
            metrics={},
            config={},
        )
        specimen = repo.add_specimen(s, "P1", "S1", split="test", tumor=True)
        image_id = repo.add_specimen_image(s, specimen, "FL", "images/cd/s1.png", "cd" * 32, 32, 40)
    return {"model": model, "image_id": image_id, "image_sha256": "cd" * 32}


def _counts() -> tuple[int, int, int]:
    with read_scope() as s:
        return tuple(s.scalar(select(func.count()).select_from(table)) for table in (Upload, Prediction, AuditEvent))


def _audit(action: str) -> list[tuple[int | None, dict]]:
    with read_scope() as s:
        rows = s.execute(select(AuditEvent.user_id, AuditEvent.detail).where(AuditEvent.action == action)).all()
    return [tuple(row) for row in rows]


def _job(state: str) -> RunningJob:
    with session_scope() as s:
        job = Job(kind="mosaic", title="a mosaic", state=state)
        s.add(job)
        s.flush()
        return RunningJob(id=job.id, kind="mosaic", submitted_by=None)


def _job_result(job_id: int) -> dict:
    with read_scope() as s:
        return s.get(Job, job_id).result


def test_an_upload_is_stored_with_its_map_extras_upload_prediction_and_audit_rows(stored_db, workspace):
    model = stored_db["model"]
    heatmap = RNG.random((32, 40))  # float64 in, float32 stored
    extras = {"guided": RNG.standard_normal((3, 32, 40)).astype(np.float32)}
    stored = store_prediction(
        model,
        UploadTarget(read_image(png_bytes(PIXELS), "spec 1.png"), user_id=None),
        probability=0.8,
        threshold=0.5,
        method="gradcam",
        heatmap=heatmap,
        extras=extras,
        device="cpu",
        seconds=0.25,
    )
    image_sha = Path(stored.image_path).stem
    assert stored.map_path == heatmap_path(image_sha, model, "gradcam")
    kept = np.load(workspace / stored.map_path)
    assert kept.dtype == np.float32 and np.allclose(kept, heatmap, atol=1e-6)
    with np.load(workspace / extras_path(stored.map_path)) as saved:
        assert saved["guided"].dtype == np.float16 and saved["guided"].shape == (3, 32, 40)
    assert np.array_equal(read_image(workspace / stored.image_path).array, PIXELS)
    view = repo.prediction_view(stored.prediction_id)
    assert (view["name"], view["image_path"], view["heatmap_method"]) == ("spec 1.png", stored.image_path, "gradcam")
    assert view["decision"] and view["device"] == "cpu" and view["seconds"] == pytest.approx(0.25)
    assert _counts() == (1, 1, 1)
    assert _audit("diagnosis_stored") == [
        (
            None,
            {
                "upload": stored.upload_id,
                "prediction": stored.prediction_id,
                "model": "fake-FL",
                "image_sha256": image_sha,
            },
        )
    ]


def test_a_specimen_image_prediction_has_no_upload_and_is_audited(stored_db, workspace):
    model, image_id = stored_db["model"], stored_db["image_id"]
    heatmap = RNG.random((32, 40)).astype(np.float32)
    stored = store_prediction(
        model,
        SpecimenTarget(image_id, user_id=None),
        probability=0.2,
        threshold=0.5,
        method="cam",
        heatmap=heatmap,
        device="cpu",
        seconds=0.1,
    )
    assert stored.upload_id is None and stored.image_path is None
    assert stored.map_path == heatmap_path(stored_db["image_sha256"], model, "cam")
    assert np.array_equal(np.load(workspace / stored.map_path), heatmap)
    assert not (workspace / extras_path(stored.map_path)).exists()
    with read_scope() as s:
        row = s.get(Prediction, stored.prediction_id)
        assert (row.image_id, row.upload_id, row.decision, row.heatmap_method) == (image_id, None, False, "cam")
    without_map = store_prediction(model, SpecimenTarget(image_id), probability=0.7, threshold=0.5)
    assert without_map.map_path is None
    assert _counts() == (0, 2, 2)
    assert _audit("prediction_stored") == [
        (None, {"prediction": stored.prediction_id, "model": "fake-FL", "image": image_id, "method": "cam"}),
        (None, {"prediction": without_map.prediction_id, "model": "fake-FL", "image": image_id, "method": None}),
    ]


def test_a_mosaic_map_goes_under_mosaics_and_keeps_float16(stored_db, workspace):
    model = stored_db["model"]
    reduced = RNG.random((16, 20)).astype(np.float16)
    stored = store_prediction(
        model,
        UploadTarget(read_image(png_bytes(PIXELS), "mosaic.png"), user_id=None),
        probability=0.9,
        threshold=0.5,
        method="cam",
        heatmap=reduced,
        mosaic_step=16,
    )
    assert stored.map_path == mosaic_map_path(Path(stored.image_path).stem, model, "cam", 16)
    assert np.load(workspace / stored.map_path).dtype == np.float16
    assert repo.prediction_view(stored.prediction_id)["mosaic"]


def test_a_heatmap_without_its_method_or_an_unknown_image_stores_nothing(stored_db, workspace):
    with pytest.raises(ValueError, match="method"):
        store_prediction(
            stored_db["model"], SpecimenTarget(stored_db["image_id"]), probability=0.5, threshold=0.5, heatmap=PIXELS
        )
    with pytest.raises(ValueError, match="no specimen image"):
        store_prediction(
            stored_db["model"], SpecimenTarget(999), probability=0.5, threshold=0.5, method="cam", heatmap=PIXELS
        )
    assert _counts() == (0, 0, 0) and not (workspace / "heatmaps").exists()


def test_a_running_job_lists_what_it_stored(stored_db):
    job = _job("running")
    with running_job(job):
        upload = store_prediction(
            stored_db["model"],
            UploadTarget(read_image(png_bytes(PIXELS), "a.png"), user_id=None),
            probability=0.6,
            threshold=0.5,
        )
        specimen = store_prediction(
            stored_db["model"], SpecimenTarget(stored_db["image_id"]), probability=0.6, threshold=0.5
        )
    assert _job_result(job.id) == {
        "uploads": [upload.upload_id],
        "predictions": [upload.prediction_id, specimen.prediction_id],
    }
    assert _counts() == (1, 2, 2)


@pytest.mark.parametrize("target", ["upload", "specimen"])
def test_a_cancelled_job_stores_no_row(stored_db, target):
    job = _job("cancelled")
    where = (
        UploadTarget(read_image(png_bytes(PIXELS), "a.png"), user_id=None)
        if target == "upload"
        else SpecimenTarget(stored_db["image_id"])
    )
    with running_job(job), pytest.raises(JobStopped, match="cancelled"):
        store_prediction(
            stored_db["model"], where, probability=0.6, threshold=0.5, method="cam", heatmap=RNG.random((32, 40))
        )
    assert _counts() == (0, 0, 0)
    assert _job_result(job.id) == {}
    stored = store_prediction(stored_db["model"], where, probability=0.6, threshold=0.5)  # outside the job: stored
    assert _counts()[1:] == (1, 1) and stored.prediction_id


@pytest.fixture
def copied_model(trained_workspace: Path, workspace: Path) -> ModelInfo:
    """The trained workspace's tiny FL model, registered in a fresh workspace (its checkpoint folder copied over)."""
    with pointing_at(trained_workspace):
        trained = repo.find_model("tiny-FL")
    folder = Path(trained.checkpoint_path).parent
    shutil.copytree(trained_workspace / folder, workspace / folder)
    init_db()
    fields = {f.name: getattr(trained, f.name) for f in dataclasses.fields(trained)} | {"name": "copied-FL"}
    del fields["id"]
    with session_scope() as s:
        return repo.register_model(s, **fields)


def test_study_ai_scores_are_stored_and_audited_once(copied_model, workspace):
    image_ids = []
    with session_scope() as s:
        for i in range(2):
            pixels = (RNG.random((48, 64)) * 4000).astype(np.uint16)
            image = store_image(read_image(pixels, f"fl{i}"), workspace)
            specimen = repo.add_specimen(s, "P1", f"S{i}", split="test", tumor=bool(i))
            image_ids.append(
                repo.add_specimen_image(s, specimen, "FL", image.path, image.sha256, image.height, image.width)
            )
    assert predict_images(copied_model.id, image_ids) == 2
    assert predict_images(copied_model.id, image_ids) == 0  # already there: nothing recomputed, nothing audited
    with read_scope() as s:
        rows = s.scalars(select(Prediction).where(Prediction.image_id.in_(image_ids))).all()
        assert sorted(r.image_id for r in rows) == image_ids and all(0.0 <= r.probability <= 1.0 for r in rows)
        predictions = sorted(r.id for r in rows)
    audited = _audit("prediction_stored")
    assert sorted(detail["prediction"] for _, detail in audited) == predictions
    assert {(detail["model"], detail["method"]) for _, detail in audited} == {("copied-FL", None)}


def test_cached_predictor_keeps_one_loaded_model(use_trained):
    fl = repo.find_model("tiny-FL")
    first = cached_predictor(fl, "cpu")
    assert cached_predictor(fl, "cpu") is first
    assert load_predictor(fl, "cpu") is not first  # uncached: a fresh copy
    assert cached_predictor(dataclasses.replace(fl, threshold=0.01), "cpu").threshold == pytest.approx(0.01)


def test_the_least_recently_used_predictor_is_evicted(use_trained):
    loads = []

    def counting(model: ModelInfo, device: str):
        loads.append((model.name, model.threshold))
        return load_predictor(model, device)

    fl, wl = repo.find_model("tiny-FL"), repo.find_model("tiny-WL")
    cache = PredictorCache(size=2, load=counting)
    a, b = cache.get(fl, "cpu"), cache.get(wl, "cpu")
    assert cache.get(fl, "cpu") is a  # touched: now the most recent
    other = dataclasses.replace(fl, threshold=fl.threshold / 2)  # same weights, another operating point
    assert cache.get(other, "cpu") is not a
    assert cache.get(fl, "cpu") is a
    new_b = cache.get(wl, "cpu")  # evicted when the third model came in: loaded again
    assert new_b is not b and new_b.modality == "WL"
    assert [name for name, _ in loads] == ["tiny-FL", "tiny-WL", "tiny-FL", "tiny-WL"]
    assert loads[2] == ("tiny-FL", other.threshold)


def test_threads_asking_for_one_model_at_once_load_it_once(use_trained):
    loads = []

    def counting(model: ModelInfo, device: str):
        loads.append(model.name)
        return load_predictor(model, device)

    fl = repo.find_model("tiny-FL")
    cache = PredictorCache(size=1, load=counting)
    start = threading.Barrier(6)
    got = []

    def ask() -> None:
        start.wait()
        got.append(cache.get(fl, "cpu"))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["tiny-FL"] and len(got) == 6 and all(p is got[0] for p in got)
    with pytest.raises(ValueError, match="at least one"):
        PredictorCache(size=0)
