"""CSV files a person downloads: built in one place, escaped against spreadsheet formulas (``core.text.csv_bytes``)
and audited (who, which table or study, how many rows; the audit row's time says when).

Pages and widgets hand these to ``st.download_button(data=<callable>, on_click="ignore")``: Streamlit calls it only
when the person clicks, so the file is built and the audit row written for a real download, not on every rerun, and
no page writes audit rows itself.
"""

from __future__ import annotations

import pandas as pd

from core.text import csv_bytes
from db.audit import log_event
from db.session import run_transaction
from services import studies

__all__ = [
    "EXPERT_TABLES",
    "cases_csv",
    "cases_export",
    "clip_frames_csv",
    "clip_top_frames",
    "experts_csv",
    "predictions_csv",
    "reads_csv",
    "reads_export",
    "table_csv",
]


def _audited(action: str, *, user_id: int | None, study_id: int | None, **detail: object) -> None:
    """The audit row of one download, in its own short write transaction: the data was read in a read-only one,
    so a large export never holds the database's write lock while it is built."""
    run_transaction(lambda session: log_event(session, action, user_id=user_id, study_id=study_id, **detail))


def table_csv(frame: pd.DataFrame, *, what: str, user_id: int | None, study_id: int | None = None) -> bytes:
    """``frame`` (a table as shown, filters applied) as a CSV file, audited as ``csv_downloaded`` with ``what`` it
    is (e.g. ``"audit log"``, ``"patients"``) and its rows."""
    data = csv_bytes(frame)
    _audited("csv_downloaded", user_id=user_id, study_id=study_id, table=what, rows=len(frame))
    return data


def reads_export(study_id: int, *, user_id: int | None, history: bool = False) -> pd.DataFrame:
    """A study's reads export (latest answers, or every version with ``history``), audited as ``reads_exported``."""
    frame = studies.export_reads(study_id, history=history)
    _audited("reads_exported", user_id=user_id, study_id=study_id, rows=len(frame), history=history)
    return frame


def cases_export(study_id: int, *, user_id: int | None) -> pd.DataFrame:
    """A study's cases with their truth, audited as ``cases_exported``."""
    frame = studies.export_cases(study_id)
    _audited("cases_exported", user_id=user_id, study_id=study_id, rows=len(frame))
    return frame


def reads_csv(study_id: int, *, user_id: int | None, history: bool = False) -> bytes:
    """:func:`reads_export` as a CSV file."""
    return csv_bytes(reads_export(study_id, user_id=user_id, history=history))


def cases_csv(study_id: int, *, user_id: int | None) -> bytes:
    """:func:`cases_export` as a CSV file."""
    return csv_bytes(cases_export(study_id, user_id=user_id))


def predictions_csv(study_id: int, arm: str, *, model: int | str | None, user_id: int | None) -> bytes:
    """The model's scores on one arm's cases (the predictions file of ``python -m core analyze``), audited as
    ``predictions_exported`` (``services.results.export_predictions``)."""
    from services.results import export_predictions

    frame, _ = export_predictions(study_id, arm, model=model, user_id=user_id)
    return csv_bytes(frame)


def clip_frames_csv(view: dict[str, object], *, user_id: int | None) -> bytes:
    """A stored clip triage's per-frame table (``frame,probability,decision``, as ``python -m core clip`` writes it),
    audited as ``csv_downloaded``."""
    from services.clips import triage_csv

    data = triage_csv(view).encode()
    _audited("csv_downloaded", user_id=user_id, study_id=None, table="clip frames", triage=view["id"])
    return data


def clip_top_frames(view: dict[str, object], *, user_id: int | None) -> bytes:
    """A stored clip triage's top frames and their overlays as PNGs in a zip, audited as ``frames_downloaded``."""
    from services.clips import top_frames_zip

    data = top_frames_zip(view)
    _audited("frames_downloaded", user_id=user_id, study_id=None, triage=view["id"], frames=len(view["top"]))
    return data


EXPERT_TABLES = {
    "table": "models and readers against the experts",
    "per_reader": "models against each reader",
    "pairwise": "pairwise reader agreement",
    "staple": "readers' STAPLE sensitivity and specificity",
}


def experts_csv(report: studies.ExpertsReport, table: str, *, user_id: int | None) -> bytes:
    """One table of a heatmaps-against-the-experts report (:func:`services.studies.heatmaps_vs_experts`) as a CSV
    file: ``table`` is the model-vs-expert ``table``, ``per_reader``, the readers' ``pairwise`` agreement or their
    ``staple`` sensitivity and specificity. Audited as ``experts_exported`` with the study, arm, layer and rows."""
    if table not in EXPERT_TABLES:
        raise ValueError(f"unknown table {table!r}; one of {', '.join(EXPERT_TABLES)}")
    frame = getattr(report, table)
    data = csv_bytes(frame)
    _audited(
        "experts_exported",
        user_id=user_id,
        study_id=report.study_id,
        table=EXPERT_TABLES[table],
        arm=report.arm,
        layer=report.layer,
        rows=len(frame),
    )
    return data
