"""The Diagnose page's cascade (seed 003): it names the grade and Ki-67 models a tumor call goes on to, and shows
each image's grade and Ki-67 calls with their own heatmaps, or why they were not assessed. (Most tests put the results
in the page's session state as the page's own Diagnose button leaves them.)"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from streamlit.testing.v1 import AppTest

from core.data.io import read_image
from core.settings import workspace_dir
from core.text import md_escape
from db import repo
from db.models import Job
from db.session import init_db, read_scope, session_scope
from services.diagnose import diagnose_files, load_predictor

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _clinician(username: str = "cascade-page") -> int:
    init_db()
    with session_scope() as s:
        existing = [u for u in repo.list_users(s) if u.username == username]
        return existing[0].id if existing else repo.create_user(s, username, "cascade-pw", "clinician").id


def _diagnosed(user: int, threshold: float) -> dict:
    """One FL test image diagnosed by the FL tumor model at ``threshold``, with the cascade; the page's state."""
    with read_scope() as session:
        tumor = dataclasses.replace(repo.find_model(session, "casc-FL-tumor"), threshold=threshold)
        followers = [repo.find_model(session, name) for name in ("casc-FL-grade", "casc-FL-ki67")]
        path = workspace_dir() / repo.specimen_images(session, "FL", ("test",))["path"].iloc[0]
    cascade = {m.task: (load_predictor(m), m) for m in followers}
    (outcome,) = diagnose_files(load_predictor(tumor), tumor, [(path.name, path)], user_id=user, cascade=cascade)
    return asdict(outcome)


def _page(user: int, outcome: dict) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state["auth_user_id"] = user
    at.session_state["diagnose_last"] = [outcome]
    at.session_state["diagnose_last_task"] = "tumor"
    at.session_state["diagnose_last_modality"] = "FL"
    at.run()
    return at.switch_page("../pages/diagnose.py").run()


def test_a_tumor_call_shows_grade_and_ki67_with_their_models(use_cascade):
    user = _clinician()
    outcome = _diagnosed(user, 0.0)
    at = _page(user, outcome)
    assert not at.exception
    model = at.selectbox(key="diagnose_model")
    assert "casc-FL-tumor" in model.format_func(model.value)  # the page's default: the FL tumor model
    captions = [c.value for c in at.caption]
    assert any(
        "goes on to grade" in c and md_escape("casc-FL-grade") in c and md_escape("casc-FL-ki67") in c for c in captions
    )
    grade, ki67 = outcome["cascade"]
    line = next(m.value for m in at.markdown if md_escape("Grade:") in m.value)
    assert md_escape(outcome["name"]) in line
    assert md_escape(f"Grade: {'GBM' if grade['decision'] else 'DLGG'} (p={grade['probability']:.2f}") in line
    ki67_call = ">= 10 %" if ki67["decision"] else "< 10 %"
    assert md_escape(f"Ki-67: {ki67_call} (p={ki67['probability']:.2f}") in line
    assert md_escape("model casc-FL-ki67") in line


def _pictures(at: Any, caption: str) -> list[np.ndarray]:
    """The pictures embedded in the page or one of its blocks (app.widgets.picture) captioned ``caption``, decoded."""
    found = []
    for element in at.get("html"):
        body = element.proto.body
        if "data:image/png;base64," in body and f">{html.escape(caption)}</figcaption>" in body:
            data = body.split("data:image/png;base64,", 1)[1].split('"', 1)[0]
            found.append(np.asarray(PILImage.open(io.BytesIO(base64.b64decode(data)))))
    return found


def test_each_grade_and_ki67_call_shows_its_own_heatmap(use_cascade):
    user = _clinician()
    outcome = _diagnosed(user, 0.0)
    outcome["name"] = "**bold** [link](http://x).png"  # what a user named the file is shown as text
    at = _page(user, outcome)
    assert not at.exception
    grade, ki67 = outcome["cascade"]
    assert grade["heatmap"] and ki67["heatmap"] and grade["method"] == ki67["method"] == "gradcam"
    (expander,) = [e for e in at.expander if "evidence lies" in e.label]
    assert expander.label.endswith(md_escape(outcome["name"]))
    labels = [m.value for m in expander.markdown]
    assert f"**{md_escape('Grade model (Grad-CAM)')}**" == labels[0]
    assert f"**{md_escape('Ki-67 model (Grad-CAM)')}**" in labels
    assert any(md_escape("casc-FL-grade") in m for m in labels) and any(md_escape("casc-FL-ki67") in m for m in labels)
    for call in (grade, ki67):  # each with its own opacity slider, in the tumor call's viewer
        assert at.slider(key=f"diagnose_cascade_{outcome['prediction_id']}_{call['prediction_id']}_opacity")
    (tumor_map,) = _pictures(at, "Grad-CAM: warm colours = strongest evidence for tumor")
    (grade_map,) = _pictures(expander, "Grad-CAM: warm colours = strongest evidence for GBM")
    (ki67_map,) = _pictures(expander, "Grad-CAM: warm colours = strongest evidence for Ki-67 >= 10 %")
    assert grade_map.shape == tumor_map.shape == ki67_map.shape
    assert not np.array_equal(grade_map, tumor_map) and not np.array_equal(ki67_map, grade_map)  # maps of their own


def test_an_opened_job_shows_its_cascade_heatmaps_and_an_older_result_without_them(cascade_copy):
    # the job goes into a private copy: the compare-models page test copies the shared workspace and counts jobs
    """A Score-CAM job's result opened under Your jobs: its grade and Ki-67 calls (kept as dicts in the job's
    result) with their heatmaps; a result kept before calls had heatmaps shows the lines alone."""
    user = _clinician("cascade-page-jobs")
    outcome = _diagnosed(user, 0.0)
    result = {k: outcome[k] for k in ("prediction_id", "upload_id", "probability")}
    with session_scope() as session:
        session.add(
            Job(
                kind="scorecam",
                title="Score-CAM heatmap",
                params={},
                state="succeeded",
                progress=1.0,
                result={**result, "modality": "FL", "cascade": outcome["cascade"]},
                submitted_by=user,
            )
        )
    older = [{k: v for k, v in call.items() if k not in ("heatmap", "method")} for call in outcome["cascade"]]
    for calls, shown in ((outcome["cascade"], True), (older, False)):
        at = AppTest.from_file(MAIN, default_timeout=60)
        at.session_state["auth_user_id"] = user
        at.session_state["diagnose_job_open"] = outcome["prediction_id"]
        at.session_state["diagnose_job_cascade"] = (calls, "FL")
        at.run()
        at.switch_page("../pages/diagnose.py").run()
        assert not at.exception
        assert any(md_escape("Grade:") in m.value and md_escape("model casc-FL-ki67") in m.value for m in at.markdown)
        labels = [m.value for m in at.markdown]
        assert (f"**{md_escape('Grade model (Grad-CAM)')}**" in labels) == shown
        assert (f"**{md_escape('Ki-67 model (Grad-CAM)')}**" in labels) == shown
        assert len(_pictures(at, "Grad-CAM: warm colours = strongest evidence for GBM")) == int(shown)


def test_diagnosing_an_upload_runs_the_cascade_on_a_tumor_call(use_cascade):
    """The whole flow: the file uploaded, Diagnose clicked, the registered FL tumor model's tumor call followed by
    the grade and Ki-67 models' calls, shown with their models."""
    user = _clinician()
    with read_scope() as session:
        tumor = repo.find_model(session, "casc-FL-tumor")
        paths = [workspace_dir() / p for p in repo.specimen_images(session, "FL")["path"]]
    predictor = load_predictor(tumor)
    path = next(p for p in paths if predictor.diagnose([read_image(p)], heatmap=None)[0].decision)
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state["auth_user_id"] = user
    at.run()
    at.switch_page("../pages/diagnose.py").run()
    at.file_uploader(key="diagnose_files").set_value([(path.name, path.read_bytes(), "image/png")])
    next(b for b in at.button if b.label == "Diagnose").click()
    at.run()
    assert not at.exception
    (outcome,) = at.session_state["diagnose_last"]
    assert outcome["decision"] and [(c["task"], c["model"]) for c in outcome["cascade"]] == [
        ("grade", "casc-FL-grade"),
        ("ki67", "casc-FL-ki67"),
    ]
    line = next(m.value for m in at.markdown if md_escape("Grade:") in m.value)
    assert md_escape(path.name) in line and md_escape("model casc-FL-grade") in line
    assert md_escape("Ki-67:") in line and md_escape("model casc-FL-ki67") in line


def test_a_non_tumor_call_says_grade_and_ki67_were_not_assessed(use_cascade):
    user = _clinician()
    at = _page(user, _diagnosed(user, 1.5))
    assert not at.exception
    assert any(
        md_escape("Grade and Ki-67 were not assessed: the specimen was called non-tumor.") in m.value
        for m in at.markdown
    )
    assert not any(md_escape("Grade:") in m.value for m in at.markdown)


def test_without_grade_and_ki67_models_the_page_says_so(use_trained):
    user = _clinician()
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state["auth_user_id"] = user
    at.run()
    at.switch_page("../pages/diagnose.py").run()
    assert not at.exception
    assert any(
        "goes on to grade (no FL model registered) and Ki-67 (no FL model registered)" in c.value for c in at.caption
    )
