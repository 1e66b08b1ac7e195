"""The Results page of a regions study (issue 16): below the label analysis, "Localisation against the experts"
answers in one table and one figure whether the model's heatmaps localise within the range of the readers, with
the readers' agreement, and its CSVs are built and audited only when downloaded."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from sqlalchemy import func, select
from streamlit.testing.v1 import AppTest

from db.models import AuditEvent
from db.session import read_scope
from tests.services.test_experts import draw_all, regions_study

RESULTS = str(Path(__file__).resolve().parents[2] / "pages" / "results.py")


def test_the_results_page_holds_the_heatmaps_against_the_experts(in_frames, downloads) -> None:
    study, pi, readers = regions_study(n_readers=3)
    drawn = draw_all(study, readers)
    at = AppTest.from_file(RESULTS, default_timeout=240)
    at.session_state["auth_user_id"] = pi
    at.run()
    at.selectbox(key="results_study").set_value(study.id).run()
    at.multiselect(key=f"results_experts_models_{study.id}_CLE").set_value(["tiny-MLCAM"]).run()
    assert not at.exception, at.exception
    assert [t.label for t in at.tabs] == ["Arm CLE"]  # the label analysis of the same reads is still there
    assert any(h.value == "Localisation against the experts" for h in at.subheader)
    shown = [m.value.replace("\\", "") for m in at.markdown]
    (verdict,) = [m for m in shown if m.startswith("**tiny-MLCAM · MLCAM-LICI**")]
    assert "threshold 0.03" in verdict and "experts' range**" in verdict
    tables = [d.value for d in at.dataframe]
    (table,) = [t for t in tables if "experts' range (Dice)" in t.columns]
    assert list(table["kind"]) == ["model", "reader", "reader", "reader"]
    assert sorted(table.loc[table["kind"] == "reader", "row"]) == sorted(drawn)
    assert table["dice"].between(0, 1).all() and table["mean_iu @0.2"].notna().all()
    assert any(list(t.columns[:2]) == ["reader a", "reader b"] and len(t) == 3 for t in tables)  # pairwise
    assert any(list(t.columns) == ["reader", "sensitivity", "specificity"] for t in tables)  # STAPLE
    (figure,) = [str(e.proto) for e in at.get("plotly_chart") if "against the consensus of the others" in str(e.proto)]
    assert "tiny-MLCAM" in figure and "range" in figure and "models, against the consensus of all readers" in figure

    name = f"study-{study.id}-CLE-region-table.csv"
    with read_scope() as s:
        before = s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "experts_exported"))
    data = downloads[name]()
    assert list(pd.read_csv(io.BytesIO(data))["row"]) == list(table["row"])
    with read_scope() as s:
        after = s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "experts_exported"))
    assert after == before + 1


def test_a_regions_study_without_two_finished_readers_says_what_is_missing(in_frames) -> None:
    study, pi, readers = regions_study(n_readers=2, n_cases=1)
    draw_all(study, readers, limit={readers[1]: 1})
    at = AppTest.from_file(RESULTS, default_timeout=120)
    at.session_state["auth_user_id"] = pi
    at.run()
    at.selectbox(key="results_study").set_value(study.id).run()
    assert not at.exception, at.exception
    infos = [i.value.replace("\\", "") for i in at.info]
    assert any("two readers or more who drew every case of arm CLE" in i for i in infos)
