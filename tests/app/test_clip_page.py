"""The Diagnose page's clip flow: a CLE clip becomes a triage job on a real Ray cluster, its result opens as a timeline
with the top frames and downloads, only for its owner; a file that is no clip is refused at once; the PI opens the
triage from the Jobs page; the Data page lists it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.data.localization_set import generate_set
from core.data.synth_cle import make_cle_clip, write_clip
from core.text import md_escape
from core.train import TrainConfig
from services.clips import recent_triages
from services.jobs import engine, service, store
from services.jobs.incoming import FOLDER
from services.localization import train_on_set
from tests.app.test_jobs_pages import _page, _user

ROOT = Path(__file__).resolve().parents[2]
MAIN = str(ROOT / "app" / "main.py")
N_FRAMES = 30
NAME = "biopsy <b>site</b> *1*.tif"


@pytest.fixture(scope="module")
def cle_set(tmp_path_factory: pytest.TempPathFactory):
    return generate_set("cle", tmp_path_factory.mktemp("sets") / "cle", counts=(16, 8, 8), size=64, seed=3)


@pytest.fixture
def cle_workspace(workspace: Path, cle_set, ray_cluster: str) -> Iterator[Path]:
    """A workspace with a tiny CLE model registered, attached to the session's cluster (its supervisor removed
    after)."""
    config = TrainConfig(architecture="mlcam_lici", epochs=1, batch_size=8, lr=0.01, model_kwargs={"width": 8})
    train_on_set(config, cle_set, name="cle-clips", log=lambda _: None)
    yield workspace
    engine.stop_supervisor()


def _clip_page(user_id: int) -> AppTest:
    at = _page(user_id, "../pages/diagnose.py")
    assert not at.exception
    at.radio(key="diagnose_cle_what").set_value("A clip").run()
    assert not at.exception
    return at


def test_a_clip_is_triaged_by_a_job_and_opens_as_a_timeline_for_its_owner_only(cle_workspace, tmp_path) -> None:
    clip = make_cle_clip(N_FRAMES, 64, seed=2, fps=20.0)
    data = write_clip(clip.frames, tmp_path / "site.tif", fps=clip.fps).read_bytes()
    owner, other = _user("clinician"), _user("clinician")
    at = _clip_page(owner)
    at.file_uploader(key="clip_file").set_value((NAME, data, "image/tiff"))
    at.number_input(key="clip_top").set_value(3)
    next(b for b in at.button if b.label == "Triage clip").click()
    at.run()
    assert not at.exception
    (job,) = store.list_jobs(user_id=owner)
    assert job.kind == "clip" and job.params["top"] == 3 and job.params["file"].startswith(FOLDER)
    assert any(f"queued as job {job.id}" in s.value for s in at.success)
    done = service.wait(job.id, timeout=240)
    assert done.state == "succeeded", (done.error, done.log_tail)
    assert not (cle_workspace / job.params["file"]).exists()  # the kept upload is gone once stored
    assert done.result["frames"] == N_FRAMES and done.result["triages"] == [done.result["triage_id"]]

    at.run()  # as the fragment's rerun does once the job ended: the triage opens
    assert not at.exception
    assert any(f"{N_FRAMES} frames at 20 frames/s" in m.value for m in at.markdown)
    assert any(md_escape(NAME) in m.value for m in at.markdown)  # the name shown as text
    assert at.get("plotly_chart"), "the timeline"
    slider = at.slider(key=f"diagnose_job_clip_{done.result['triage_id']}_frame")
    assert slider.min == 0 and slider.max == N_FRAMES - 1
    slider.set_value(N_FRAMES - 1).run()  # scrub to a frame that is no top frame: decoded from the stored clip
    assert not at.exception
    labels = {getattr(b, "label", None) for b in at.get("download_button")}
    assert {"Per-frame CSV", "Top frames (PNG, zip)"} <= labels

    # the other clinician sees no job, no clip in the history, and cannot open it by forging the session
    theirs = _clip_page(other)
    assert recent_triages(user_id=other) == []
    theirs.session_state["diagnose_clip_open"] = done.result["triage_id"]
    theirs.run()
    assert not theirs.exception and not theirs.get("plotly_chart")
    # the PI opens it from the Jobs page, and the Data page lists it
    pi = _user("pi")
    jobs = _page(pi, "../pages/jobs.py")
    jobs.button(key=f"jobs_open_clip_{job.id}_{done.result['triage_id']}").click().run()
    assert not jobs.exception and jobs.get("plotly_chart")
    data_page = _page(pi, "../pages/data.py")
    assert not data_page.exception and any(t.label == "Clips" for t in data_page.tabs)


def test_a_file_that_is_no_clip_is_refused_at_once_and_nothing_is_queued(cle_workspace) -> None:
    owner = _user("clinician")
    at = _clip_page(owner)
    at.file_uploader(key="clip_file").set_value(("notes.zip", b"this is not a zip", "application/zip"))
    next(b for b in at.button if b.label == "Triage clip").click()
    at.run()
    assert not at.exception
    assert any("is not a clip" in e.value for e in at.error)
    assert store.list_jobs(user_id=owner) == []
    assert not (cle_workspace / FOLDER).exists() or not list((cle_workspace / FOLDER).iterdir())


def test_a_click_on_the_timeline_names_the_frame_whatever_form_the_point_takes() -> None:
    from app.widgets import clicked_frames

    assert clicked_frames({"selection": {"points": [{"curve_number": 1, "point_index": 0, "customdata": [17]}]}}) == [
        17
    ]
    assert clicked_frames({"selection": {"points": [{"curve_number": 0, "point_index": 4, "customdata": 4}]}}) == [4]
    assert clicked_frames({"selection": {"points": [{"curve_number": 0, "point_index": 9}]}}) == [9]
    assert clicked_frames({"selection": {"points": [{"curve_number": 1, "point_index": 2}]}}) == []  # no frame
    assert clicked_frames({"selection": {"points": []}}) == [] == clicked_frames(None) == clicked_frames({})
