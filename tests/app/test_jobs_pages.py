"""The pages that start, follow and cancel jobs, with Streamlit's AppTest: the Jobs page (job rows written straight into
the table, and real jobs on the session's Ray cluster), the Models page's forms, the Data page's cohort import, the
Diagnose page's mosaic and Score-CAM jobs with "Your jobs", and ``services.jobs.incoming``."""

from __future__ import annotations

import io
import re
import uuid
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path, PurePosixPath

import pytest
import skimage.data
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from core.text import md_escape
from db import repo
from db.models import AuditEvent, Job, utcnow
from db.session import init_db, read_scope, session_scope
from services.jobs import engine, service, store
from services.jobs.incoming import FOLDER, MAX_UPLOAD_BYTES, discard_upload, keep_upload

ROOT = Path(__file__).resolve().parents[2]
MAIN = str(ROOT / "app" / "main.py")
HOSTILE = "**x** <script>alert(1)</script> [y](http://host/a) :red[z]"
TINY = {"architecture": "tiny_cnn", "task": "tumor", "modality": "FL", "image_size": 32, "batch_size": 8}
PNG = Path(skimage.data.data_dir, "camera.png").read_bytes()


def _user(role: str) -> int:
    init_db()
    with session_scope() as s:
        return repo.create_user(s, f"{role}-{uuid.uuid4().hex[:6]}", "pw-long-enough-1", role).id


def _page(user_id: int, script: str) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.session_state["auth_user_id"] = user_id
    at.run()
    return at.switch_page(script).run()


def _add(**fields) -> int:
    with session_scope() as s:
        job = Job(**fields)
        s.add(job)
        s.flush()
        return job.id


def _texts(at: AppTest) -> list[str]:
    """Every markdown-rendered string on screen: markdown, captions, alerts and progress texts."""
    elements = [*at.markdown, *at.caption, *at.error, *at.warning, *at.info, *at.success]
    return [e.value for e in elements] + [p.text for p in at.progress]


def _cancels(job_id: int) -> int:
    with read_scope() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == "job_cancelled")).all()
        return sum((r.detail or {}).get("job") == job_id for r in rows)


@pytest.fixture
def cluster(ray_cluster: str) -> Iterator[str]:
    """The session's cluster for one test on its own database; that database's supervisor is removed after."""
    yield ray_cluster
    engine.stop_supervisor()


# --- the Jobs page -----------------------------------------------------------------------------------------------


def test_jobs_page_lists_every_job_with_its_text_shown_as_text(workspace):
    pi = _user("pi")
    now = utcnow()
    running = _add(
        kind="train", title=f"Train {HOSTILE}", state="running", progress=0.4, message=f"epoch 2/5 {HOSTILE}",
        log_tail=f"line one\n{HOSTILE}\n", submitted_by=pi, started_at=now - timedelta(seconds=90),
        device="cpu", host="node-7",
    )  # fmt: skip
    failed = _add(
        kind="import", title="Import cohort c.zip", state="failed", error=f"ValueError: bad row {HOSTILE}",
        started_at=now - timedelta(minutes=5), finished_at=now - timedelta(minutes=4), submitted_by=pi,
    )  # fmt: skip
    done = _add(
        kind="train", title="Train m1", state="succeeded", progress=1.0, message="done", submitted_by=pi,
        result={"model": "m1", "models": ["m1"], "model_id": 1}, started_at=now - timedelta(hours=1),
        finished_at=now - timedelta(minutes=50),
    )  # fmt: skip
    imported = _add(
        kind="import", title="Import cohort x", state="succeeded", progress=1.0,
        result={"specimens": 12, "images": 24, "skipped": 2}, started_at=now, finished_at=now,
    )  # fmt: skip
    at = _page(pi, "../pages/jobs.py")
    assert not at.exception
    assert at.title[0].value == "Jobs"
    texts = _texts(at)
    assert any(
        t.startswith(":blue-badge[:material/autorenew: running] **Job") and md_escape(HOSTILE) in t for t in texts
    )
    assert any(":red-badge[:material/error: failed]" in t and "Import cohort c" in t for t in texts)
    assert not [t for t in texts if HOSTILE in t]  # every piece of job text is escaped, none is live markup
    bars = {p.text: p.value for p in at.progress}
    assert bars[md_escape(f"epoch 2/5 {HOSTILE}")] == 40
    assert any(md_escape("ValueError: bad row") in e.value for e in at.error)
    assert any(
        re.search(r"run time 1 min \d+ s", c.value) and md_escape("on cpu at node-7") in c.value for c in at.caption
    )
    logs = [c.value for c in at.code]
    assert f"line one\n{HOSTILE}" in logs  # the log as plain text
    assert any("Registered model **m1**" in m.value for m in at.markdown)
    assert any("Imported 12 specimens and 24 images (2 rows skipped" in m.value for m in at.markdown)
    assert at.button(key=f"jobs_cancel_{running}").label == "Cancel"
    assert at.button(key=f"jobs_retry_{failed}").label == "Retry"
    keys = {b.key for b in at.button}
    assert (
        f"jobs_cancel_{done}" not in keys and f"jobs_retry_{done}" not in keys and f"jobs_retry_{imported}" not in keys
    )
    # newest first; then filtered by state and by kind
    shown = [int(m) for m in re.findall(r"\*\*Job (\d+)\*\*", " ".join(at.markdown.values))]
    assert shown == [imported, done, failed, running]
    at.multiselect(key="jobs_states").set_value(["failed"]).run()
    assert re.findall(r"\*\*Job (\d+)\*\*", " ".join(at.markdown.values)) == [str(failed)]
    at.multiselect(key="jobs_states").set_value([]).run()
    at.multiselect(key="jobs_kinds").set_value(["train"]).run()
    assert re.findall(r"\*\*Job (\d+)\*\*", " ".join(at.markdown.values)) == [str(done), str(running)]


def test_clinicians_and_readers_cannot_open_the_jobs_page(workspace):
    for role in ("clinician", "reader"):
        user = _user(role)
        at = AppTest.from_file(str(ROOT / "pages" / "jobs.py"), default_timeout=60)
        at.session_state["auth_user_id"] = user
        at.run()
        assert not at.exception
        assert [e.value for e in at.error] == [f"This page is not available to the {role} role."]
        assert not at.title and not at.button
        nav = AppTest.from_file(MAIN, default_timeout=60)
        nav.session_state["auth_user_id"] = user
        nav.run()
        with pytest.raises(ValueError):
            nav.switch_page("../pages/jobs.py").run()


def test_cancel_on_a_running_job_marks_it_cancelled_once(workspace, cluster):
    pi = _user("pi")
    job_id = _add(kind="train", title="Train long", state="running", progress=0.2, message="epoch 1/400",
                  submitted_by=pi, started_at=utcnow())  # fmt: skip
    at = _page(pi, "../pages/jobs.py")
    at.button(key=f"jobs_cancel_{job_id}").click().run()
    assert not at.exception
    job = store.get_job(job_id)
    assert job.state == "cancelled" and job.finished_at is not None
    assert any(i.value == md_escape(f"Job {job_id} is cancelled.") for i in at.info)
    assert any(":orange-badge[:material/block: cancelled]" in m.value for m in at.markdown)
    keys = {b.key for b in at.button}
    assert f"jobs_cancel_{job_id}" not in keys and f"jobs_retry_{job_id}" in keys
    assert service.cancel(job_id, user_id=pi) == "cancelled"  # a late second click changes nothing
    assert _cancels(job_id) == 1


def test_retry_queues_one_new_job_and_a_second_click_is_refused(cohort_workspace, cluster):
    pi = _user("pi")
    failed = _add(kind="train", title="Train again", state="failed", error="worker died", submitted_by=pi,
                  params={**TINY, "epochs": 400, "name": "again"}, finished_at=utcnow())  # fmt: skip
    at = _page(pi, "../pages/jobs.py")
    at.button(key=f"jobs_retry_{failed}").click().run()
    assert not at.exception
    (retry,) = [j for j in store.list_jobs() if j.retry_of == failed]
    assert any(s.value == md_escape(f"Job {failed} is retried as job {retry.id}.") for s in at.success)
    assert at.button(key=f"jobs_cancel_{retry.id}").label == "Cancel"
    at.button(key=f"jobs_retry_{failed}").click().run()  # the double click
    assert any(md_escape(f"already being retried as job {retry.id}") in e.value for e in at.error)
    assert [j.id for j in store.list_jobs() if j.retry_of == failed] == [retry.id]
    at.button(key=f"jobs_cancel_{retry.id}").click().run()
    assert store.get_job(retry.id).state == "cancelled"


# --- the Models page's forms -------------------------------------------------------------------------------------


def _train_form(at: AppTest, **values) -> AppTest:
    for key, value in values.items():
        kind = {"name": at.text_input, "architecture": at.selectbox}.get(key, at.number_input)
        kind(key=f"models_train_{key}").set_value(value)
    next(b for b in at.button if b.label == "Queue training").click()
    return at.run()


def test_the_train_form_refuses_a_bad_name_and_queues_nothing(cohort_workspace):
    at = _page(_user("pi"), "../pages/models.py")
    assert any("No models yet: train one with the form below" in i.value for i in at.info)
    assert "tiny_cnn" in at.selectbox(key="models_train_architecture").options
    _train_form(at, architecture="tiny_cnn", image_size=32, epochs=1, name="../evil")
    assert not at.exception
    assert any("Nothing was queued" in e.value and "may only contain" in e.value for e in at.error)
    assert store.list_jobs() == [] and not at.success


def test_the_train_form_queues_a_job_that_trains_and_registers_the_model(cohort_workspace, cluster):
    pi = _user("pi")
    at = _page(pi, "../pages/models.py")
    _train_form(at, architecture="tiny_cnn", image_size=32, epochs=1, batch_size=8, name="from-the-form")
    assert not at.exception, at.exception
    (job,) = store.list_jobs()
    assert (job.kind, job.submitted_by, job.params["architecture"], job.params["epochs"]) == (
        "train",
        pi,
        "tiny_cnn",
        1,
    )
    assert job.params["threshold_policy"] is None  # the task's rule: sens90 for tumor, closest for grade and Ki-67
    assert any(f"Job {job.id} queued" in s.value for s in at.success)
    assert [link.proto.page for link in at.get("page_link")][-1] == "jobs"  # follow it on the Jobs page
    done = service.wait(job.id, timeout=240)
    assert done.state == "succeeded", (done.error, done.log_tail)
    assert [m.name for m in repo.list_models()] == ["from-the-form"]
    assert repo.list_models()[0].threshold_policy == "sens90"
    at = _page(pi, "../pages/jobs.py")
    assert any("Registered model **from\\-the\\-form**" in m.value for m in at.markdown)
    assert any(":green-badge[:material/check_circle: succeeded]" in m.value for m in at.markdown)


def test_the_study_form_checks_its_counts_before_queuing(workspace):
    at = _page(_user("pi"), "../pages/models.py")
    at.number_input(key="models_study_train").set_value(10)
    next(b for b in at.button if b.label == "Queue study").click()
    at.run()
    assert any("give all three image counts" in e.value for e in at.error)
    assert store.list_jobs() == []


# --- the Data page's cohort import -------------------------------------------------------------------------------


def _import(at: AppTest, name: str, data: bytes) -> AppTest:
    at.file_uploader(key="data_import_zip").set_value((name, data, "application/zip"))
    next(b for b in at.button if b.label == "Import").click()
    return at.run()


def test_the_import_form_shows_why_a_file_is_not_a_cohort_and_queues_nothing(workspace):
    at = _page(_user("pi"), "../pages/data.py")
    assert not at.exception
    _import(at, "cohort.zip", b"these are not the bytes of a zip")
    assert any("Nothing was imported" in e.value and "not a zip archive" in e.value for e in at.error)
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as bundle:
        bundle.writestr("cohort/readme.txt", "no manifest here")
    _import(at, "cohort.zip", empty.getvalue())
    assert any(md_escape("the zip has no manifest.csv") in e.value for e in at.error)
    assert store.list_jobs() == []
    assert not list((workspace / FOLDER).iterdir())  # refused uploads are not kept


def test_a_zipped_cohort_is_imported_by_a_job(workspace, cluster, tmp_path):
    from core.data.synth import CohortConfig, write_cohort

    manifest = write_cohort(CohortConfig(n_patients=2, specimens_per_patient=(2, 3), height=32, width=40, seed=2),
                            tmp_path / "cohort")  # fmt: skip
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w") as archive:
        for path in manifest.parent.rglob("*"):
            if path.is_file():
                archive.write(path, Path("cohort") / path.relative_to(manifest.parent))
    pi = _user("pi")
    at = _import(_page(pi, "../pages/data.py"), "my cohort.zip", bundle.getvalue())
    assert not at.exception and not at.error
    (job,) = store.list_jobs()
    assert any(f"Job {job.id} queued" in s.value for s in at.success)
    assert job.params["zip"].startswith(f"{FOLDER}/") and job.params["name"] == "my cohort.zip"
    done = service.wait(job.id, timeout=240)
    assert done.state == "succeeded", (done.error, done.log_tail)
    at = _page(pi, "../pages/jobs.py")
    assert any(re.search(r"Imported \d+ specimens and \d+ images: see the Data page", m.value) for m in at.markdown)


# --- the Diagnose page: mosaics and Score-CAM as jobs ------------------------------------------------------------


def test_a_mosaic_is_stitched_by_a_job_that_only_its_owner_sees_and_opens(in_rcm, cluster):
    root, _ = in_rcm
    owner, other = _user("clinician"), _user("clinician")
    at = _page(owner, "../pages/diagnose.py")
    at.file_uploader(key="mosaic_file").set_value(("mosaic.png", (root / "mosaic.png").read_bytes(), "image/png"))
    next(b for b in at.button if b.label == "Stitch heatmap").click()
    at.run()
    assert not at.exception
    (job,) = store.list_jobs(user_id=owner)
    assert job.kind == "mosaic" and job.params["name"] == "mosaic.png" and job.params["file"].startswith(FOLDER)
    assert any(f"queued as job {job.id}" in s.value for s in at.success)
    assert at.button(key=f"diagnose_job_cancel_{job.id}").label == "Cancel"
    done = service.wait(job.id, timeout=240)
    assert done.state == "succeeded", (done.error, done.log_tail)
    assert not (root / job.params["file"]).exists()  # the kept upload is gone once stored
    at.run()  # as the fragment's rerun does once the job ended: the result opens
    assert not at.exception
    assert any(":green-badge[:material/check_circle: succeeded]" in m.value for m in at.markdown)
    assert len(at.get("plotly_chart")) == 2  # the stitched map with pan and zoom, opened and in the history
    assert any(md_escape("mosaic.png") in m.value for m in at.markdown)
    assert at.button(key=f"diagnose_job_open_{job.id}").label == "Open result"
    # another clinician sees neither the job nor a way to cancel or open it
    theirs = _page(other, "../pages/diagnose.py")
    assert not any(s.value == "Your jobs" for s in theirs.subheader)
    assert not any(str(b.key).startswith("diagnose_job_") for b in theirs.button)
    running = _add(kind="mosaic", title="Mosaic of theirs", state="running", submitted_by=owner, started_at=utcnow())
    theirs.run()
    assert f"diagnose_job_cancel_{running}" not in {b.key for b in theirs.button}
    mine = _page(owner, "../pages/diagnose.py")
    mine.button(key=f"diagnose_job_cancel_{running}").click().run()
    assert store.get_job(running).state == "cancelled"
    # the PI opens what the job produced from the Jobs page
    jobs = _page(_user("pi"), "../pages/jobs.py")
    prediction = done.result["prediction_id"]
    jobs.button(key=f"jobs_open_{job.id}_{prediction}").click().run()
    assert not jobs.exception
    assert any(s.value == f"Prediction #{prediction}" for s in jobs.subheader)
    assert len(jobs.get("plotly_chart")) == 1 and any(md_escape("mosaic.png") in m.value for m in jobs.markdown)


def test_score_cam_runs_as_one_job_per_image_and_bad_files_are_refused_at_once(use_trained, cluster):
    clinician = _user("clinician")
    at = _page(clinician, "../pages/diagnose.py")
    at.radio(key="diagnose_modality").set_value("WL").run()
    at.selectbox(key="diagnose_method").set_value("scorecam").run()
    retina = Path(skimage.data.data_dir, "retina.jpg").read_bytes()
    at.file_uploader(key="diagnose_files").set_value(
        [("retina.jpg", retina, "image/jpeg"), ("notes.png", b"not an image at all", "image/png")]
    )
    next(b for b in at.button if b.label == "Diagnose").click()
    at.run()
    assert not at.exception
    assert any(md_escape("notes.png") in e.value and "not an image" in e.value for e in at.error)
    (job,) = store.list_jobs(user_id=clinician)
    assert (job.kind, job.params["method"], job.params["name"]) == ("scorecam", "scorecam", "retina.jpg")
    assert any(f"Score-CAM is queued as job {job.id}" in s.value for s in at.success)
    done = service.wait(job.id, timeout=240)
    assert done.state == "succeeded", (done.error, done.log_tail)
    at.run()
    view = repo.prediction_view(done.result["prediction_id"])
    assert view["heatmap_method"] == "scorecam" and view["user_id"] == clinician
    assert any(md_escape("retina.jpg") in m.value and "probability" in m.value for m in at.markdown)
    # the job ran seed 003's cascade as the direct path does: this workspace has no WL grade or Ki-67 model
    assert [call["status"] for call in done.result["cascade"]] == ["no model", "no model"]
    assert any("no WL grade model is registered" in m.value for m in at.markdown)


# --- services.jobs.incoming --------------------------------------------------------------------------------------


def test_keep_upload_keeps_allowed_files_under_a_random_name_in_the_workspace(workspace):
    kept = keep_upload(PNG, "../../etc/Scan One.PNG", kind="image")
    path = PurePosixPath(kept)
    assert path.parent.as_posix() == FOLDER and re.fullmatch(r"[0-9a-f]{32}\.png", path.name)
    full = (workspace / kept).resolve()
    assert full.is_relative_to(workspace.resolve()) and full.read_bytes() == PNG
    assert keep_upload(PNG, "scan.png", kind="image") != kept
    assert keep_upload(b"PK\x03\x04 anything", r"C:\\cohorts\\c.ZIP", kind="cohort").endswith(".zip")
    discard_upload(kept)
    assert not full.exists()


@pytest.mark.parametrize(
    ("data", "name", "kind", "message"),
    [
        (PNG, "scan.exe", "image", r"only \.png, \.jpg"),
        (PNG, "scan", "image", "only"),
        (PNG, "scan.png.sh", "image", "only"),
        (PNG, "scan.jpg", "mosaic", r"only \.png, \.tif, \.tiff, \.npy"),
        (PNG, "cohort.png", "cohort", r"only \.zip"),
        (b"", "scan.png", "image", "is empty"),
        (b"GIF89a....", "scan.png", "image", "is not an image"),
        (PNG, "scan.png", "spreadsheet", "unknown kind of upload"),
    ],
)
def test_keep_upload_refuses_what_no_job_may_read(workspace, data, name, kind, message):
    with pytest.raises(ValueError, match=message):
        keep_upload(data, name, kind=kind)
    assert not (workspace / FOLDER).exists() or not list((workspace / FOLDER).iterdir())


def test_keep_upload_refuses_files_over_the_limit(workspace):
    assert MAX_UPLOAD_BYTES == 200 * 1024 * 1024
    with pytest.raises(ValueError, match=r"files up to 1 MiB are accepted"):
        keep_upload(PNG[:8] + bytes(1024 * 1024), "big.png", kind="image", max_bytes=1024 * 1024)
    assert keep_upload(PNG[:8] + bytes(1000), "small.png", kind="image", max_bytes=1024 * 1024)


def test_discard_upload_only_removes_kept_uploads(workspace):
    (workspace / "study.keep").write_text("x")
    for bad in ("study.keep", "../study.keep", f"{FOLDER}/../study.keep", f"{FOLDER}/sub/x.png", f"/{FOLDER}/x.png"):
        with pytest.raises(ValueError, match="not a kept upload"):
            discard_upload(bad)
    assert (workspace / "study.keep").exists()
