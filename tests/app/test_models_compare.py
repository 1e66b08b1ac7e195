"""The Models page's comparison of two models (seed 003, Table 2 / Fig. 4): a PI queues it as a job (once, however
often the button is pressed), the job runs, and the page shows the stored table, the figure and the CSV; the page's
other roles never see the section."""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.text import md_escape
from db import repo
from db.session import session_scope
from services.jobs import engine, store
from services.jobs.runner import execute
from services.model_compare import compare_models, comparison_table, stored_comparisons, table_csv

MAIN = str(Path(__file__).resolve().parents[2] / "app" / "main.py")
HEADING = "Compare two models (seed 003, Table 2 / Fig. 4)"


@pytest.fixture
def compare_ws(cascade_copy: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A private copy of the cascade workspace; jobs are queued but not sent to a cluster (the test runs them).
    The ids of the jobs the page tried to launch."""
    launched: list[int] = []
    monkeypatch.setattr(engine, "launch", lambda job_id: launched.append(job_id) or True)
    return launched


def _page(role: str) -> AppTest:
    with session_scope() as s:
        user = repo.create_user(s, f"{role}-{uuid.uuid4().hex[:6]}", "pw-long-enough-1", role).id
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.session_state["auth_user_id"] = user
    at.run()
    return at.switch_page("../pages/models.py").run()


def _queue(at: AppTest) -> AppTest:
    next(b for b in at.button if b.label == "Queue comparison").click()
    return at.run()


def test_a_pi_queues_a_comparison_and_sees_its_table_figure_and_csv(compare_ws, downloads):
    at = _page("pi")
    assert not at.exception, at.exception
    assert HEADING in [h.value for h in at.subheader]
    assert at.selectbox(key="models_compare_task").options == [
        "tumor (vs non-tumor)",
        "GBM (vs DLGG)",
        "Ki-67 >= 10 % (vs < 10 %)",
    ]
    assert any("No comparison is stored yet" in c.value for c in at.caption)
    models = {m.name: m.id for m in repo.list_models()}
    at.selectbox(key="models_compare_task").set_value("grade").run()
    at.selectbox(key="models_compare_a").set_value(models["casc-FL-grade"]).run()
    options = at.selectbox(key="models_compare_b").options  # model B: another model of the task
    assert "casc-WL-grade (WL, tiny_cnn)" in options and "casc-FL-grade-older (FL, tiny_cnn)" in options
    assert not any(o.startswith("casc-FL-grade (") or "tumor" in o for o in options)
    at.selectbox(key="models_compare_b").set_value(models["casc-WL-grade"])
    at.number_input(key="models_compare_bootstrap").set_value(100)
    at.number_input(key="models_compare_permutations").set_value(200)
    at.number_input(key="models_compare_seed").set_value(3)
    _queue(at)
    assert not at.exception, at.exception
    (job,) = store.list_jobs()
    assert (job.kind, job.params) == (
        "compare-models",
        {
            "model_a": "casc-FL-grade",
            "model_b": "casc-WL-grade",
            "split": "test",
            "bootstrap": 100,
            "permutations": 200,
            "seed": 3,
        },
    )
    assert compare_ws == [job.id] and any(f"Job {job.id} queued" in s.value for s in at.success)
    _queue(at)  # a second press while the job is still queued queues nothing
    assert len(store.list_jobs()) == 1 and compare_ws == [job.id]
    assert any(f"Job {job.id} with these settings is already queued" in i.value for i in at.info)

    assert execute(job.id) == "succeeded", store.get_job(job.id).error
    (stored,) = stored_comparisons()
    at = _page("pi")
    assert not at.exception, at.exception
    expected = comparison_table(stored["report"])
    (shown,) = [d.value for d in at.dataframe if "p (permutation)" in d.value.columns]
    pd.testing.assert_frame_equal(shown.reset_index(drop=True), expected, check_dtype=False)
    assert list(shown["metric"]) == ["auc", "accuracy", "sensitivity", "specificity", "f1"]
    assert {"casc-FL-grade", "casc-WL-grade"} <= set(shown.columns)
    own = compare_models("casc-FL-grade", "casc-WL-grade", resamples=100, permutations=200, seed=3)
    p_values = [own["metrics"][m]["p_value"] for m in shown["metric"]]
    assert list(shown["p (permutation)"]) == pytest.approx(p_values)
    assert any("casc\\-FL\\-grade" in m.value and "test specimens" in m.value for m in at.markdown)
    assert len(at.get("plotly_chart")) >= 1
    assert md_escape(stored["title"]) not in [h.value for h in at.subheader]  # not also listed as an evaluation
    csv = downloads[f"comparison-{stored['id']}.csv"]()
    assert csv == table_csv(stored["report"])


@pytest.mark.parametrize("role", ["reader", "clinician"])
def test_readers_and_surgeons_do_not_see_the_comparison(compare_ws, role):
    """The page script run as a typed URL would: its own check refuses before the section, whatever the navigation."""
    assert stored_comparisons() == [] and len({m.task for m in repo.list_models()}) == 3  # the section would show
    with session_scope() as s:
        user = repo.create_user(s, f"{role}-{uuid.uuid4().hex[:6]}", "pw-long-enough-1", role).id
    at = AppTest.from_file(str(Path(MAIN).parents[1] / "pages" / "models.py"), default_timeout=120)
    at.session_state["auth_user_id"] = user
    at.run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == [f"This page is not available to the {role} role."]
    assert HEADING not in [h.value for h in at.subheader]
    assert not [b for b in at.button if b.label == "Queue comparison"] and not at.selectbox
