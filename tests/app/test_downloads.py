"""Every CSV a person downloads is built only when they click (a deferred ``st.download_button``), escaped against
spreadsheet formulas and audited with who, which table or study and how many rows (issue 13, items 4 and 7).

AppTest has no browser to click with, so the callables the pages hand to Streamlit are caught where Streamlit
registers them (``MediaFileManager.add_deferred``) and called as Streamlit calls them on a click."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from db import repo
from db.models import AuditEvent
from db.session import init_db, session_scope
from services import exports, studies
from tests.conftest import reader_study

ROOT = Path(__file__).resolve().parents[2]


def _page(name: str, user_id: int) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / name), default_timeout=60)
    at.session_state["auth_user_id"] = user_id
    return at.run()


def _downloaded() -> list[tuple]:
    with session_scope() as s:
        return [
            (e.user_id, e.study_id, e.detail.get("table"), e.detail.get("rows"))
            for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "csv_downloaded").order_by(AuditEvent.id))
        ]


def test_a_data_table_download_is_escaped_and_audited_only_when_clicked(workspace, downloads):
    init_db()
    with session_scope() as s:
        pi = repo.create_user(s, "pat", "pat-password", "pi").id
        repo.add_specimen(s, "=cmd|' /C calc'!A0", "@S1", split="test", tumor=True)
    at = _page("data.py", pi)
    assert not at.exception
    assert set(downloads) == {"patients.csv", "specimens.csv"}  # the other tables are empty
    assert _downloaded() == []  # showing the page downloads nothing
    data = downloads["specimens.csv"]()
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    assert len(rows) == 1 and "'=cmd|' /C calc'!A0" in rows[0].values() and "'@S1" in rows[0].values()
    assert _downloaded() == [(pi, None, "specimens", 1)]
    at.run()  # the audit log now has that row, and its own download button
    log = downloads["audit.csv"]().decode()
    assert "csv_downloaded" in log and "table=specimens" in log
    assert _downloaded() == [(pi, None, "specimens", 1), (pi, None, "audit", 1)]


def test_the_studies_page_downloads_reads_cases_and_audit_log_through_audited_exports(use_trained, downloads):
    study, pi, readers = reader_study(1)
    with session_scope() as s:
        case = studies.reader_state(s, study.id, readers[0]).case
    studies.record_read(
        study_id=study.id, reader_id=readers[0], arm_id=case.arm_id, token=case.token, label=1, rating=4,
        comment="=HYPERLINK(\"http://evil.example\")",
    )  # fmt: skip
    at = _page("studies.py", pi)
    at.selectbox(key="studies_pick").set_value(study.id).run()
    assert not at.exception
    names = {f"study-{study.id}-reads.csv", f"study-{study.id}-history.csv", f"study-{study.id}-cases.csv"}
    assert names | {"audit.csv"} <= set(downloads)
    with session_scope() as s:
        before = s.scalars(select(AuditEvent.action).where(AuditEvent.study_id == study.id)).all()
    assert "reads_exported" not in before and "cases_exported" not in before
    reads = downloads[f"study-{study.id}-reads.csv"]()
    assert b"'=HYPERLINK" in reads and b"rating_scale,score" in reads
    downloads[f"study-{study.id}-cases.csv"]()
    downloads["audit.csv"]()
    with session_scope() as s:
        events = s.execute(
            select(AuditEvent.action, AuditEvent.user_id, AuditEvent.detail)
            .where(AuditEvent.study_id == study.id)
            .order_by(AuditEvent.id)
        ).all()
    tail = [(action, user, detail.get("table")) for action, user, detail in events[-3:]]
    assert tail == [("reads_exported", pi, None), ("cases_exported", pi, None), ("csv_downloaded", pi, "audit log")]


def test_table_csv_is_the_escaped_file_with_its_audit_row(workspace):
    init_db()
    with session_scope() as s:
        pi = repo.create_user(s, "pat", "pat-password", "pi").id
    frame = pd.DataFrame({"user": ["@evil", "-x"], "detail": ["=1+1", "ok"], "n": [-1, 2]})
    assert exports.table_csv(frame, what="audit log", user_id=pi).decode().splitlines() == [
        "user,detail,n",
        "'@evil,'=1+1,-1",
        "'-x,ok,2",
    ]
    assert _downloaded() == [(pi, None, "audit log", 2)]


def test_tables_built_in_export_is_off_so_every_download_is_one_of_ours():
    """``st.dataframe``'s own toolbar would download CSV in the browser: unescaped and never audited."""
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["disableDataExport"] is True
