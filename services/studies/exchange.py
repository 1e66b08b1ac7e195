"""Reads and cases in and out: CSV export for analysis, import of reads collected elsewhere.

The reads export carries what an analysis needs besides the answer and the confidence: the study's ``rating_scale``
and each read's ROC ``score`` by the one rule of ``core.stats.ratings``, so ``python -m core analyze`` and the
Results page's uploaded-CSV path rank the reads as the Results page does. Files are written for people through
``core.text.csv_bytes`` (cells that would start a spreadsheet formula are escaped); the import reads that escaped
form back as it was typed.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.stats.ratings import reader_score
from core.text import csv_as_typed
from db import repo
from db.audit import log_event
from db.models import (
    Label,
    Read,
    Specimen,
    Study,
    StudyArm,
    StudyCase,
    StudyReader,
    User,
    utcnow,
)
from db.session import reads, writes
from services.studies.setup import MAX_COMMENT, RATING_RANGES, StudyError, _truth, get_study

__all__ = ["EXPORT_COLUMNS", "ImportReport", "export_cases", "export_reads", "import_reads"]

EXPORT_COLUMNS = (
    "case_id",
    "reader_id",
    "arm",
    "label",
    "rating",
    "rating_scale",
    "score",
    "comment",
    "modality",
    "version",
    "shown_at",
    "answered_at",
    "duration_s",
    "source",
)


@dataclass
class ImportReport:
    rows: int = 0
    imported: int = 0
    created_readers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- export and import


@reads
def export_reads(session: Session, study_id: int, *, history: bool = False) -> pd.DataFrame:
    """The study's reads in the long format the analysis takes (``EXPORT_COLUMNS``): ``case_id`` is the specimen
    code, ``reader_id`` the username, ``label`` 0/1 (1 = the task's positive answer), ``rating`` the confidence on
    the study's ``rating_scale`` and ``score`` the read's ROC score (``core.stats.ratings.reader_score``). Only the
    latest version of each answer unless ``history``. A read: a person's download of it goes through
    ``services.exports``, which audits it."""
    study = get_study(session, study_id)
    if study is None:
        raise StudyError(f"there is no study #{study_id}")
    stmt = (
        select(
            Specimen.code.label("case_id"),
            User.username.label("reader_id"),
            StudyArm.name.label("arm"),
            Read.label,
            Read.rating,
            Read.comment,
            StudyArm.modality,
            Read.version,
            Read.shown_at,
            Read.answered_at,
            Read.duration_s,
            Read.source,
            Read.case_id.label("_case"),
            Read.arm_id.label("_arm"),
            Read.reader_id.label("_reader"),
        )
        .join(StudyCase, Read.case_id == StudyCase.id)
        .join(Specimen, StudyCase.specimen_id == Specimen.id)
        .join(User, Read.reader_id == User.id)
        .join(StudyArm, Read.arm_id == StudyArm.id)
        .where(Read.study_id == study_id)
        .order_by(StudyArm.position, User.username, Specimen.code, Read.version)
    )
    selected = [c for c in EXPORT_COLUMNS if c not in ("rating_scale", "score")]
    frame = pd.DataFrame(session.execute(stmt).mappings().all(), columns=[*selected, "_case", "_arm", "_reader"])
    frame["rating_scale"] = study.rating_scale
    frame["score"] = reader_score(frame["label"], frame["rating"], study.rating_scale)
    if not history and not frame.empty:
        frame = frame.drop_duplicates(["_case", "_arm", "_reader"], keep="last")
    return frame[list(EXPORT_COLUMNS)].reset_index(drop=True)


@reads
def export_cases(session: Session, study_id: int) -> pd.DataFrame:
    """The study's cases with their truth (PI only): case_id, truth (0/1), split, training. A read: a person's
    download of it goes through ``services.exports``, which audits it."""
    study = get_study(session, study_id)
    if study is None:
        raise StudyError(f"there is no study #{study_id}")
    rows = session.execute(
        select(Specimen.code, Specimen.split, StudyCase.training, Label)
        .join(StudyCase, StudyCase.specimen_id == Specimen.id)
        .outerjoin(Label, Label.specimen_id == Specimen.id)
        .where(StudyCase.study_id == study_id)
        .order_by(StudyCase.position)
    ).all()
    return pd.DataFrame(
        [
            {"case_id": code, "truth": _truth(study.task, label), "split": split, "training": training}
            for code, split, training, label in rows
        ],
        columns=["case_id", "truth", "split", "training"],
    )


def _parse_time(value: Any) -> datetime | None:
    """An ISO 8601 date and time as the same instant in UTC (a time without an offset is taken as UTC); None when
    empty. ``ValueError`` for anything else."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    stamp = datetime.fromisoformat(str(value).strip())
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


def _can_sign_in(user: User) -> bool:
    """Whether the account is a live one (active, with a password), not one made for imported or simulated reads."""
    return bool(user.active) and not user.password_hash.startswith("!")


@writes
def import_reads(
    session: Session,
    study_id: int,
    source: bytes | str | pd.DataFrame,
    *,
    user_id: int | None,
    create_readers: bool = False,
    allow_active_readers: bool = False,
) -> ImportReport:
    """Import reads collected elsewhere (e.g. on paper) in the export format: ``case_id, reader_id, arm, label``
    and ``rating`` required, ``comment, answered_at, duration_s`` optional; ``rating_scale``, when given, must be
    the study's, and ``score`` is derived from the answer and the rating (it is not imported). Cells escaped against
    spreadsheet formulas by an export are read back as typed. ``answered_at`` is stored as the same instant in UTC.

    Every row is checked first; any error (named by its CSV line) imports nothing. Readers must exist unless
    ``create_readers``, which adds them as inactive reader accounts (they cannot sign in). Reads under a live reader
    account (active, able to sign in) are refused unless ``allow_active_readers``: answers put in someone's name who
    could have given them; when allowed, the audit event names those readers and the cases imported under them.
    Imported answers are version 1 with source ``import``; a case a reader already answered in that arm is an error,
    not an overwrite.
    """
    report = ImportReport()
    if isinstance(source, pd.DataFrame):
        frame = source.copy()
    else:
        try:
            raw = source.encode() if isinstance(source, str) else source
            frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            report.errors.append(f"the file is not a readable CSV ({error}); save it as comma-separated UTF-8 text")
            return report
        frame = csv_as_typed(frame)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in ("case_id", "reader_id", "arm", "label", "rating") if c not in frame.columns]
    if missing:
        report.errors.append(
            f"missing column(s) {', '.join(missing)}; the header must name case_id, reader_id, arm, label, rating"
        )
        return report
    study = session.get(Study, study_id)
    if study is None:
        raise StudyError(f"there is no study #{study_id}")
    if study.status != "open":
        report.errors.append("the study is closed; reopen it to import reads")
        return report
    if study.question == "regions":
        report.errors.append("this study's readers draw regions; labels alone cannot be imported into it")
        return report
    info = get_study(session, study_id)
    arms = {a.name: a for a in info.arms}
    cases = dict(
        session.execute(
            select(Specimen.code, StudyCase.id)
            .join(StudyCase, StudyCase.specimen_id == Specimen.id)
            .where(StudyCase.study_id == study_id, StudyCase.training.is_(False))
        ).all()
    )
    users = {u.username: u for u in session.scalars(select(User))}
    existing = set(
        session.execute(select(Read.case_id, Read.arm_id, Read.reader_id).where(Read.study_id == study_id)).all()
    )
    low, high = RATING_RANGES[study.rating_scale]
    seen: dict[tuple[str, str, str], int] = {}
    parsed = []
    report.rows = len(frame)
    for index, row in enumerate(frame.to_dict("records")):
        line = index + 2  # the header is line 1
        errors = []
        case_code, reader, arm_name = (str(row.get(k, "")).strip() for k in ("case_id", "reader_id", "arm"))
        case_id = cases.get(case_code)
        if case_id is None:
            errors.append(f"unknown case_id {case_code!r} (not a study case)")
        arm = arms.get(arm_name)
        if arm is None:
            errors.append(f"unknown arm {arm_name!r}; this study's arms are {', '.join(arms)}")
        user = users.get(reader)
        if not reader:
            errors.append("empty reader_id")
        elif user is not None and user.role != "reader":
            errors.append(f"{reader!r} is a {user.role} account, not a reader")
        elif user is None and not create_readers:
            errors.append(f"unknown reader {reader!r}; create the account or allow creating readers")
        elif user is not None and _can_sign_in(user) and not allow_active_readers:
            errors.append(
                f"{reader!r} is an active reader account (they can sign in and read themselves); import under it "
                "only if these are their answers, by allowing imports under active readers"
            )
        label_text = str(row.get("label", "")).strip()
        if label_text not in ("0", "1"):
            errors.append(f"label must be 0 or 1, not {label_text!r}")
        rating_text = str(row.get("rating", "")).strip()
        try:
            value = float(rating_text)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value == int(value) and low <= value <= high:
            rating = int(value)
        else:
            rating = None
            errors.append(f"rating must be a whole number from {low} to {high}, not {rating_text!r}")
        scale_text = str(row.get("rating_scale", "") or "").strip()
        if scale_text and scale_text != study.rating_scale:
            errors.append(f"rating_scale {scale_text!r} is not this study's ({study.rating_scale!r})")
        try:
            answered_at = _parse_time(row.get("answered_at"))
        except ValueError:
            answered_at = None
            errors.append(
                f"answered_at {row.get('answered_at')!r} is not a date and time (use ISO 8601, e.g. "
                "2026-01-02T10:00:00+02:00)"
            )
        duration_text = str(row.get("duration_s", "") or "").strip()
        try:
            duration = float(duration_text) if duration_text else None
            if duration is not None and not (np.isfinite(duration) and duration >= 0):
                raise ValueError
        except ValueError:
            duration = None
            errors.append(f"duration_s must be a non-negative number of seconds, not {duration_text!r}")
        comment = str(row.get("comment", "") or "").strip() or None
        if comment and len(comment) > MAX_COMMENT:
            errors.append(f"comment longer than {MAX_COMMENT} characters")
        key = (case_code, reader, arm_name)
        if key in seen:
            errors.append(f"duplicate read: line {seen[key]} has the same case_id, reader_id and arm")
        seen.setdefault(key, line)
        if user is not None and case_id is not None and arm is not None and (case_id, arm.id, user.id) in existing:
            errors.append(f"{reader} already answered {case_code} in arm {arm_name}")
        if errors:
            report.errors.append(f"line {line}: " + "; ".join(errors))
        else:
            parsed.append((case_id, arm, reader, int(label_text), rating, comment, answered_at, duration))
    if report.errors or not parsed:
        if not parsed and not report.errors:
            report.errors.append("the file has no rows")
        return report
    for reader in sorted({p[2] for p in parsed} - set(users)):
        users[reader] = session.get(User, repo.add_inactive_reader(session, reader, reader, "imported-reader"))
        report.created_readers.append(reader)
    invited = set(session.scalars(select(StudyReader.user_id).where(StudyReader.study_id == study_id)))
    codes = {case_id: code for code, case_id in cases.items()}
    under_active: dict[str, set[str]] = defaultdict(set)
    moment = utcnow()
    for case_id, arm, reader, label, rating, comment, answered_at, duration in parsed:
        if _can_sign_in(users[reader]):
            under_active[reader].add(codes[case_id])
        reader_id = users[reader].id
        if reader_id not in invited:
            session.add(StudyReader(study_id=study_id, user_id=reader_id))
            invited.add(reader_id)
        session.add(
            Read(
                study_id=study_id,
                arm_id=arm.id,
                case_id=case_id,
                reader_id=reader_id,
                version=1,
                label=label,
                rating=rating,
                comment=comment,
                answered_at=answered_at or moment,
                duration_s=duration,
                source="import",
            )
        )
    session.flush()
    if study.frozen_at is None:
        study.frozen_at = moment
    report.imported = len(parsed)
    log_event(
        session,
        "reads_imported",
        user_id=user_id,
        study_id=study_id,
        rows=report.imported,
        created_readers=report.created_readers,
        active_readers={
            reader: {"reads": sum(p[2] == reader for p in parsed), "cases": sorted(under_active[reader])}
            for reader in sorted(under_active)
        },
    )
    return report
