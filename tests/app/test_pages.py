"""Page tests with Streamlit's AppTest: sign-in, role-based navigation and refusals, Diagnose and Data."""

import os
from pathlib import Path

import pytest
import skimage.data
from streamlit.testing.v1 import AppTest

from core.text import md_escape
from db import repo
from db.models import Job
from db.session import init_db, session_scope
from services.diagnose import diagnose_files, load_predictor
from services.mosaic import diagnose_mosaic

ROOT = Path(__file__).resolve().parents[2]
MAIN = str(ROOT / "app" / "main.py")


def _users():
    init_db()
    ids = {}
    with session_scope() as s:
        for name, role in (("pat", "pi"), ("cleo", "clinician"), ("rita", "reader")):
            existing = [u for u in repo.list_users(s) if u.username == name]
            ids[role] = existing[0].id if existing else repo.create_user(s, name, f"{name}-pw", role).id
    return ids


def _app(user_id=None):
    at = AppTest.from_file(MAIN, default_timeout=60)
    if user_id is not None:
        at.session_state["auth_user_id"] = user_id
    return at.run()


def test_sign_in_with_wrong_then_right_password(workspace):
    _users()
    at = _app()
    assert not at.exception
    at.text_input(key="signin_username").input("cleo")
    at.text_input(key="signin_password").input("nope")
    at.button[0].click().run()
    assert any("wrong password" in e.value for e in at.error)
    at.text_input(key="signin_username").input("cleo")
    at.text_input(key="signin_password").input("cleo-pw")
    at.button[0].click().run()
    assert not at.exception
    assert at.session_state["auth_user_id"] > 0
    assert any("Signed in as" in m.value for m in at.markdown)


@pytest.mark.parametrize(("role", "page"), [("clinician", "data.py"), ("reader", "diagnose.py"), ("reader", "data.py")])
def test_pages_refuse_roles_that_may_not_use_them(workspace, role, page):
    """Run the page script itself, as a typed URL would: the page's own check refuses, whatever the navigation."""
    ids = _users()
    at = AppTest.from_file(str(ROOT / "pages" / page), default_timeout=60)
    at.session_state["auth_user_id"] = ids[role]
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == [f"This page is not available to the {role} role."]
    assert not at.title and not at.dataframe


def test_navigation_offers_each_role_only_its_pages(workspace):
    ids = _users()
    at = _app(ids["clinician"])
    with pytest.raises(ValueError):
        at.switch_page("../pages/data.py").run()  # not a registered page for this role
    at = _app(ids["pi"])
    at.switch_page("../pages/data.py").run()
    assert not at.exception and at.title[0].value == "Data"


def test_signed_out_pages_ask_to_sign_in(workspace):
    _users()
    at = AppTest.from_file(str(ROOT / "pages" / "diagnose.py"), default_timeout=60).run()
    assert [e.value for e in at.error] == ["Please sign in first."]


def test_forged_or_stale_session_state_is_signed_out(workspace):
    _users()
    at = _app(user_id=99999)
    assert not at.exception
    assert at.text_input(key="signin_username") is not None
    assert "auth_user_id" not in at.session_state


@pytest.fixture
def clinician_diagnosis(use_trained):
    """The demo users, and a clinician's stored WL diagnosis of scikit-image's retina photo."""
    ids = _users()
    with session_scope() as s:
        model = repo.find_model(s, "tiny-WL")
    retina = os.path.join(skimage.data.data_dir, "retina.jpg")
    (outcome,) = diagnose_files(load_predictor(model), model, [("retina.jpg", retina)], user_id=ids["clinician"])
    return ids, outcome


def test_diagnose_page_shows_models_and_reopens_earlier_results(clinician_diagnosis):
    ids, outcome = clinician_diagnosis
    at = _app(ids["clinician"])
    at.switch_page("../pages/diagnose.py").run()
    assert not at.exception
    assert at.title[0].value == "Diagnose"
    assert at.radio(key="diagnose_modality").options == ["FL", "WL"]
    at.radio(key="diagnose_modality").set_value("WL").run()
    assert "tiny-WL" in at.selectbox(key="diagnose_model").format_func(at.selectbox(key="diagnose_model").value)
    assert f"#{outcome.prediction_id} · retina.jpg" in at.selectbox(key="diagnose_history_pick").options
    assert any(md_escape("retina.jpg") in m.value for m in at.markdown)
    assert at.slider(key="diagnose_history_view_opacity").value == pytest.approx(0.45)


def test_data_page_lists_tables_and_filters(clinician_diagnosis):
    ids, outcome = clinician_diagnosis
    at = _app(ids["pi"])
    at.switch_page("../pages/data.py").run()
    assert not at.exception
    assert [t.label for t in at.tabs] == ["Patients", "Specimens", "Models", "Uploads", "Predictions", "Clips", "Audit"]
    total = at.caption[1].value
    at.text_input(key="data_specimens_text").input("P001").run()
    assert not at.exception
    assert at.caption[1].value != total
    # the PI reopens a clinician's prediction, heatmap included
    at.selectbox(key="data_open_pick").set_value(outcome.prediction_id).run()
    assert not at.exception
    assert any(md_escape("retina.jpg") in m.value and md_escape("tiny-WL") in m.value for m in at.markdown)
    assert at.slider(key="data_open_view_opacity").value == pytest.approx(0.45)


def test_a_guided_gradcam_diagnosis_reopens_with_its_five_views(use_trained):
    ids = _users()
    with session_scope() as s:
        model = repo.find_model(s, "tiny-WL")
    retina = os.path.join(skimage.data.data_dir, "retina.jpg")
    (outcome,) = diagnose_files(
        load_predictor(model), model, [("retina.jpg", retina)], user_id=ids["clinician"], heatmap="guided-gradcam"
    )
    at = _app(ids["clinician"])
    at.switch_page("../pages/diagnose.py").run()
    at.selectbox(key="diagnose_history_pick").set_value(outcome.prediction_id).run()
    assert not at.exception
    assert any("five Grad-CAM views" in m.value for m in at.markdown)
    assert any("Computed on CPU" in c.value for c in at.caption)
    assert "Score-CAM" in at.selectbox(key="diagnose_method").options
    # The patient's pictures travel inside the page (data: URIs), never as st.image files, which Streamlit serves
    # at /media URLs that work without signing in for as long as it keeps them.
    assert len(at.get("imgs")) == 0
    embedded = [h.proto.body for h in at.get("html") if "data:image/png;base64," in h.proto.body]
    assert len(embedded) == 2 + 5  # original, overlay and the five views
    assert any("<figcaption" in body and "Original" in body for body in embedded)


def test_a_patch_classifier_turns_the_page_into_the_mosaic_flow(rcm_workspace, monkeypatch):
    """The mosaic form, and a stitched result as a finished mosaic job leaves it: listed under "Your jobs", opened
    there with pan and zoom (the job itself runs on the cluster: tests/app/test_jobs_pages.py)."""
    root, info = rcm_workspace
    monkeypatch.setenv("IOAI_WORKSPACE", str(root))
    monkeypatch.setenv("IOAI_DATABASE_URL", f"sqlite:///{root / 'study.db'}")
    ids = _users()
    outcome = diagnose_mosaic(
        load_predictor(info), info, "mosaic.png", root / "mosaic.png", user_id=ids["clinician"], step=32
    )
    with session_scope() as s:
        job = Job(kind="mosaic", title="Mosaic heatmap of mosaic.png with tiny-RCM", state="succeeded", progress=1.0,
                  submitted_by=ids["clinician"], result={"prediction_id": outcome.prediction_id})  # fmt: skip
        s.add(job)
        s.flush()
        job_id = job.id
    at = _app(ids["clinician"])
    at.switch_page("../pages/diagnose.py").run()
    assert not at.exception
    assert at.radio(key="diagnose_modality").value == "RCM"
    assert any("patch classifier for whole mosaics" in i.value for i in at.info)
    assert at.select_slider(key="mosaic_step").value == 50 and at.radio(key="mosaic_mode").options == ["fast", "exact"]
    assert any(s.value == "Your jobs" for s in at.subheader)
    at.button(key=f"diagnose_job_open_{job_id}").click().run()
    assert not at.exception
    assert any(md_escape("mosaic.png") in m.value and md_escape("tiny-RCM") in m.value for m in at.markdown)
    assert len(at.get("plotly_chart")) == 2  # the stitched map with pan and zoom, the job's result and in the history
