"""The Diagnose page's cascade (seed 003): it names the grade and Ki-67 models a tumor call goes on to, and shows
each image's grade and Ki-67 calls, or why they were not assessed. (AppTest cannot upload files: the results are
put in the page's session state as the page's own Diagnose button leaves them.)"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

from streamlit.testing.v1 import AppTest

from core.data.io import read_image
from core.settings import workspace_dir
from core.text import md_escape
from db import repo
from db.session import init_db, read_scope, session_scope
from services.diagnose import diagnose_files, load_predictor

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _clinician() -> int:
    init_db()
    with session_scope() as s:
        existing = [u for u in repo.list_users(s) if u.username == "cascade-page"]
        return existing[0].id if existing else repo.create_user(s, "cascade-page", "cascade-pw", "clinician").id


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
