"""Blind reader studies: set-up (PI), reading (reader), progress, export and import.

The rules live here, not in the pages, so every way in (browser, CLI, tests, a tampered session) meets them:

- A reader only reaches studies they are invited to, only the case the server chose for them (the first unanswered
  one in their own stable order), addressed by an opaque token; what they are sent (:class:`ReaderCase`) carries
  no truth, no specimen or patient code, no file name, and AI output only in an aided arm.
- One read per reader, case and arm: the database's unique key on (arm, case, reader, version) settles double
  clicks, resubmitted forms and two tabs; a correction (where the study allows it) is a new version, never an
  overwrite.
- Cases, arms and the rating scale are frozen by the first read; every change, read, export and import is in the
  audit log.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.data.io import MOSAIC_MAX_PIXELS, read_image
from core.data.preprocess import display_image
from core.data.store import write_atomic
from core.heatmaps.render import overlay, resize_map, to_uint8
from core.reading import DEFAULT_COLORMAP, blind_png, fit_side, reader_order, windowed
from core.settings import workspace_dir
from core.train import DECISIONS, TASKS, task_label
from db import repo
from db.audit import log_event, run_transaction
from db.models import (
    MODALITIES,
    RATING_SCALES,
    SPLITS,
    AuditEvent,
    Label,
    ModelRecord,
    Prediction,
    Read,
    Specimen,
    SpecimenImage,
    Study,
    StudyArm,
    StudyCase,
    StudyReader,
    User,
    utcnow,
)

__all__ = [
    "EXPORT_COLUMNS",
    "RATING_RANGES",
    "AiShown",
    "ArmInfo",
    "ArmSpec",
    "ImportReport",
    "ReadResult",
    "ReaderCase",
    "ReaderState",
    "StudyError",
    "StudyInfo",
    "case_for_revision",
    "case_png",
    "complete_training",
    "create_study",
    "eligible_specimens",
    "export_cases",
    "export_reads",
    "get_study",
    "import_reads",
    "invite_readers",
    "list_studies",
    "reader_state",
    "reader_studies",
    "record_read",
    "revisable_cases",
    "set_status",
    "study_progress",
    "training_cases",
    "upcoming_images",
    "update_study",
]

RATING_RANGES = {"five": (1, 5), "hundred": (0, 100)}
MAX_COMMENT = 2000
EXPORT_COLUMNS = (
    "case_id",
    "reader_id",
    "arm",
    "label",
    "rating",
    "comment",
    "modality",
    "version",
    "shown_at",
    "answered_at",
    "duration_s",
    "source",
)


class StudyError(ValueError):
    """A refused request, with a message that says what to do."""


@dataclass(frozen=True)
class ArmSpec:
    """One arm as a PI sets it up."""

    name: str
    modality: str
    model_id: int | None = None
    show_probability: bool = False
    show_decision: bool = False
    heatmap_method: str | None = None
    washout_days: int = 0

    @property
    def aided(self) -> bool:
        return self.show_probability or self.show_decision or bool(self.heatmap_method)


@dataclass(frozen=True)
class ArmInfo(ArmSpec):
    id: int = 0
    position: int = 0

    @classmethod
    def of(cls, arm: StudyArm) -> ArmInfo:
        return cls(
            id=arm.id,
            position=arm.position,
            name=arm.name,
            modality=arm.modality,
            model_id=arm.model_id,
            show_probability=arm.show_probability,
            show_decision=arm.show_decision,
            heatmap_method=arm.heatmap_method,
            washout_days=arm.washout_days,
        )

    def describe(self) -> str:
        shown = [w for w, on in (("probability", self.show_probability), ("decision", self.show_decision)) if on]
        if self.heatmap_method:
            shown.append(f"{self.heatmap_method} heatmap")
        ai = f"AI-aided ({', '.join(shown)})" if shown else "unaided"
        wait = f", after a {self.washout_days}-day wash-out" if self.washout_days else ""
        return f"{self.name}: {self.modality}, {ai}{wait}"


@dataclass(frozen=True)
class StudyInfo:
    id: int
    title: str
    description: str
    task: str
    rating_scale: str
    allow_revisions: bool
    status: str
    simulated: bool
    frozen: bool
    created_at: datetime
    arms: tuple[ArmInfo, ...]
    n_cases: int
    n_training: int
    reader_ids: tuple[int, ...]

    @property
    def labels(self) -> tuple[str, str]:
        """The answer words, negative first (label 0, label 1)."""
        return DECISIONS[self.task]

    def arm(self, arm_id: int) -> ArmInfo | None:
        return next((a for a in self.arms if a.id == arm_id), None)


@dataclass(frozen=True)
class AiShown:
    """The AI output an aided arm shows: only the parts the arm asks for are filled in."""

    probability: float | None = None
    decision: str | None = None
    heatmap_path: str | None = None  # workspace-relative, rendered server-side
    model_name: str = ""


@dataclass(frozen=True)
class ReaderCase:
    """Everything the reading page needs for one case, and nothing a reader must not see.

    ``image_path`` is used by the server to render pixels; it is never shown (stored names are sha256 digests of
    the re-encoded pixels, which carry no metadata either).
    """

    study_id: int
    arm_id: int
    arm_name: str
    arm_number: int  # 1-based
    n_arms: int
    token: str
    k: int  # 1-based position in this reader's order
    n: int
    modality: str
    image_path: str = field(repr=False)
    ai: AiShown | None = None
    previous: tuple[int, int | None, str | None] | None = None  # (label, rating, comment) when revising


@dataclass(frozen=True)
class ReaderState:
    """Where a reader stands in a study: ``kind`` is case | training | washout | done | closed | refused."""

    kind: str
    message: str = ""
    case: ReaderCase | None = None
    available_at: datetime | None = None


@dataclass(frozen=True)
class ReadResult:
    """``status`` is recorded | revised | duplicate (the case already had this reader's answer; nothing stored)."""

    status: str
    version: int
    message: str


@dataclass
class ImportReport:
    rows: int = 0
    imported: int = 0
    created_readers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------- set-up


def _truth(task: str, label: Label | None) -> int | None:
    if label is None:
        return None
    return task_label(task, {"tumor": label.tumor, "grade": label.grade, "ki67": label.ki67})


def eligible_specimens(
    session: Session, *, task: str, modalities: Sequence[str], splits: Sequence[str] = ("test",)
) -> pd.DataFrame:
    """Specimens a study can use: in ``splits``, with an image in every modality of ``modalities`` and a known
    label for ``task``. Columns: specimen_id, specimen, split, truth."""
    if task not in DECISIONS or task == "aspecific":
        raise StudyError(f"reader studies need a specimen-level task: one of tumor, grade, ki67 (not {task!r})")
    wanted = sorted(set(modalities))
    counts = (
        select(SpecimenImage.specimen_id, func.count(SpecimenImage.id).label("n"))
        .where(SpecimenImage.modality.in_(wanted))
        .group_by(SpecimenImage.specimen_id)
        .subquery()
    )
    stmt = (
        select(Specimen, Label)
        .join(counts, counts.c.specimen_id == Specimen.id)
        .outerjoin(Label, Label.specimen_id == Specimen.id)
        .where(counts.c.n == len(wanted), Specimen.split.in_(list(splits)))
        .order_by(Specimen.code)
    )
    rows = []
    for specimen, label in session.execute(stmt):
        truth = _truth(task, label)
        if truth is not None:
            rows.append(
                {"specimen_id": specimen.id, "specimen": specimen.code, "split": specimen.split, "truth": truth}
            )
    return pd.DataFrame(rows, columns=["specimen_id", "specimen", "split", "truth"])


def _check_arms(session: Session, task: str, arms: Sequence[ArmSpec]) -> None:
    if not arms:
        raise StudyError("a study needs at least one arm (what the readers see)")
    names = [a.name.strip() for a in arms]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise StudyError("every arm needs a name, and the names must differ")
    for arm in arms:
        if arm.modality not in MODALITIES:
            raise StudyError(f"arm {arm.name}: modality {arm.modality!r} is not one of {', '.join(MODALITIES)}")
        if arm.washout_days < 0:
            raise StudyError(f"arm {arm.name}: the wash-out cannot be negative")
        if arm.aided:
            if arm.model_id is None:
                raise StudyError(f"arm {arm.name} shows AI output: choose the model it comes from")
            model = session.get(ModelRecord, arm.model_id)
            if model is None:
                raise StudyError(f"arm {arm.name}: model #{arm.model_id} is not registered")
            if model.modality != arm.modality or model.task != task:
                raise StudyError(
                    f"arm {arm.name}: model {model.name} reads {model.modality} for {model.task}, "
                    f"but the arm shows {arm.modality} for {task}"
                )


def _check_specimens(session: Session, task: str, arms: Sequence[ArmSpec], specimen_ids: Sequence[int]) -> None:
    if len(set(specimen_ids)) != len(specimen_ids):
        raise StudyError("a specimen is listed twice")
    eligible = eligible_specimens(session, task=task, modalities=[a.modality for a in arms], splits=SPLITS)
    missing = sorted(set(specimen_ids) - set(eligible["specimen_id"]))
    if missing:
        codes = session.scalars(select(Specimen.code).where(Specimen.id.in_(missing[:5]))).all()
        raise StudyError(
            f"{len(missing)} specimen(s) lack an image in one of the arms' modalities or a known {task} label "
            f"(e.g. {', '.join(codes) or missing[:5]}); choose them from the eligible list"
        )


def _check_readers(session: Session, reader_ids: Sequence[int]) -> None:
    for user_id in reader_ids:
        user = session.get(User, user_id)
        if user is None or user.role != "reader":
            raise StudyError(f"user #{user_id} is not a reader account; only readers can be invited")


def _add_cases(session: Session, study_id: int, specimen_ids: Sequence[int], training: bool, start: int) -> None:
    for offset, specimen_id in enumerate(specimen_ids):
        session.add(
            StudyCase(
                study_id=study_id,
                specimen_id=specimen_id,
                token=secrets.token_urlsafe(12),
                position=start + offset,
                training=training,
            )
        )


def _add_arms(session: Session, study_id: int, arms: Sequence[ArmSpec]) -> None:
    for position, arm in enumerate(arms):
        session.add(
            StudyArm(
                study_id=study_id,
                position=position,
                name=arm.name.strip(),
                modality=arm.modality,
                model_id=arm.model_id if arm.aided else None,
                show_probability=arm.show_probability,
                show_decision=arm.show_decision,
                heatmap_method=arm.heatmap_method or None,
                washout_days=int(arm.washout_days),
            )
        )


def create_study(
    session: Session,
    *,
    title: str,
    task: str,
    specimen_ids: Sequence[int],
    arms: Sequence[ArmSpec],
    description: str = "",
    rating_scale: str = "five",
    allow_revisions: bool = False,
    training_specimen_ids: Sequence[int] = (),
    reader_ids: Sequence[int] = (),
    created_by: int | None = None,
    simulated: bool = False,
) -> StudyInfo:
    """Set up a study in one transaction (the caller's); refused with a :class:`StudyError` saying what to fix."""
    title = title.strip()
    if not title:
        raise StudyError("give the study a title")
    if session.scalar(select(Study.id).where(Study.title == title)) is not None:
        raise StudyError(f"a study titled {title!r} exists already; choose another title")
    if task not in TASKS:
        raise StudyError(f"unknown task {task!r}")
    if rating_scale not in RATING_SCALES:
        raise StudyError(f"rating scale must be one of {', '.join(RATING_SCALES)}")
    if not specimen_ids:
        raise StudyError("choose at least one case")
    if set(training_specimen_ids) & set(specimen_ids):
        raise StudyError("a training case (shown with its truth) cannot also be a study case")
    _check_arms(session, task, arms)
    _check_specimens(session, task, arms, list(specimen_ids) + list(training_specimen_ids))
    _check_readers(session, reader_ids)
    study = Study(
        title=title,
        description=description.strip(),
        task=task,
        rating_scale=rating_scale,
        allow_revisions=allow_revisions,
        simulated=simulated,
        created_by=created_by,
    )
    session.add(study)
    session.flush()
    _add_arms(session, study.id, arms)
    _add_cases(session, study.id, training_specimen_ids, True, 0)
    _add_cases(session, study.id, specimen_ids, False, len(training_specimen_ids))
    for user_id in dict.fromkeys(reader_ids):
        session.add(StudyReader(study_id=study.id, user_id=user_id))
    session.flush()
    log_event(
        session,
        "study_created",
        user_id=created_by,
        study_id=study.id,
        title=title,
        cases=len(specimen_ids),
        arms=[a.name for a in arms],
        readers=len(reader_ids),
    )
    return get_study(session, study.id)


def update_study(
    session: Session,
    study_id: int,
    *,
    user_id: int | None,
    title: str | None = None,
    description: str | None = None,
    allow_revisions: bool | None = None,
    rating_scale: str | None = None,
    specimen_ids: Sequence[int] | None = None,
    arms: Sequence[ArmSpec] | None = None,
) -> StudyInfo:
    """Change a study. Cases, arms and the rating scale cannot change once a read exists (make a new study)."""
    study = _study(session, study_id, lock=True)
    changes: dict[str, Any] = {}
    frozen_change = specimen_ids is not None or arms is not None or (rating_scale not in (None, study.rating_scale))
    if frozen_change and study.frozen_at is not None:
        raise StudyError(
            "this study's cases, arms and rating scale are frozen since its first read; create a new study instead"
        )
    if title is not None and title.strip() != study.title:
        if not title.strip():
            raise StudyError("give the study a title")
        if session.scalar(select(Study.id).where(Study.title == title.strip(), Study.id != study_id)) is not None:
            raise StudyError(f"a study titled {title.strip()!r} exists already; choose another title")
        changes["title"] = study.title = title.strip()
    if description is not None and description.strip() != study.description:
        study.description = description.strip()
        changes["description"] = True
    if allow_revisions is not None and allow_revisions != study.allow_revisions:
        changes["allow_revisions"] = study.allow_revisions = allow_revisions
    if rating_scale is not None and rating_scale != study.rating_scale:
        if rating_scale not in RATING_SCALES:
            raise StudyError(f"rating scale must be one of {', '.join(RATING_SCALES)}")
        changes["rating_scale"] = study.rating_scale = rating_scale
    current_arms = arms if arms is not None else [ArmInfo.of(a) for a in study.arms]
    if arms is not None:
        _check_arms(session, study.task, arms)
    if specimen_ids is not None or arms is not None:
        cases = session.scalars(select(StudyCase).where(StudyCase.study_id == study_id)).all()
        test_ids = list(specimen_ids) if specimen_ids is not None else [c.specimen_id for c in cases if not c.training]
        training_ids = [c.specimen_id for c in cases if c.training]
        if not test_ids:
            raise StudyError("choose at least one case")
        _check_specimens(session, study.task, current_arms, test_ids + training_ids)
        if specimen_ids is not None:
            for case in cases:
                if not case.training:
                    session.delete(case)
            session.flush()
            _add_cases(session, study_id, test_ids, False, len(training_ids))
            changes["cases"] = len(test_ids)
        if arms is not None:
            for arm in list(study.arms):
                session.delete(arm)
            session.flush()
            _add_arms(session, study_id, arms)
            changes["arms"] = [a.name for a in arms]
    session.flush()
    session.expire(study)
    if changes:
        log_event(session, "study_updated", user_id=user_id, study_id=study_id, **changes)
    return get_study(session, study_id)


def invite_readers(session: Session, study_id: int, reader_ids: Sequence[int], *, user_id: int | None) -> StudyInfo:
    """Add readers (allowed at any time: it changes neither cases nor arms)."""
    _study(session, study_id)
    _check_readers(session, reader_ids)
    present = set(session.scalars(select(StudyReader.user_id).where(StudyReader.study_id == study_id)))
    added = [r for r in dict.fromkeys(reader_ids) if r not in present]
    for reader_id in added:
        session.add(StudyReader(study_id=study_id, user_id=reader_id))
    if added:
        log_event(session, "readers_invited", user_id=user_id, study_id=study_id, readers=added)
    session.flush()
    return get_study(session, study_id)


def set_status(session: Session, study_id: int, status: str, *, user_id: int | None) -> StudyInfo:
    """Close a study (no more reads) or reopen it."""
    if status not in ("open", "closed"):
        raise StudyError("a study is either open or closed")
    study = _study(session, study_id, lock=True)
    if study.status != status:
        study.status = status
        study.closed_at = utcnow() if status == "closed" else None
        action = "study_closed" if status == "closed" else "study_reopened"
        log_event(session, action, user_id=user_id, study_id=study_id)
    session.flush()
    return get_study(session, study_id)


def _study(session: Session, study_id: int, lock: bool = False) -> Study:
    stmt = select(Study).where(Study.id == study_id)
    if lock:
        stmt = stmt.with_for_update()
    study = session.scalar(stmt)
    if study is None:
        raise StudyError(f"there is no study #{study_id}")
    return study


def get_study(session: Session, study_id: int) -> StudyInfo | None:
    study = session.get(Study, study_id)
    if study is None:
        return None
    counts = dict(
        session.execute(
            select(StudyCase.training, func.count()).where(StudyCase.study_id == study_id).group_by(StudyCase.training)
        ).all()
    )
    readers = session.scalars(
        select(StudyReader.user_id).where(StudyReader.study_id == study_id).order_by(StudyReader.user_id)
    ).all()
    arms = session.scalars(select(StudyArm).where(StudyArm.study_id == study_id).order_by(StudyArm.position)).all()
    return StudyInfo(
        id=study.id,
        title=study.title,
        description=study.description,
        task=study.task,
        rating_scale=study.rating_scale,
        allow_revisions=study.allow_revisions,
        status=study.status,
        simulated=study.simulated,
        frozen=study.frozen_at is not None,
        created_at=study.created_at,
        arms=tuple(ArmInfo.of(a) for a in arms),
        n_cases=int(counts.get(False, 0)),
        n_training=int(counts.get(True, 0)),
        reader_ids=tuple(readers),
    )


def list_studies(session: Session) -> list[StudyInfo]:
    """All studies, newest first (PI)."""
    ids = session.scalars(select(Study.id).order_by(Study.created_at.desc(), Study.id.desc())).all()
    return [get_study(session, i) for i in ids]


def reader_studies(session: Session, reader_id: int) -> list[StudyInfo]:
    """The studies a reader is invited to, open ones first."""
    ids = session.scalars(
        select(Study.id)
        .join(StudyReader, StudyReader.study_id == Study.id)
        .where(StudyReader.user_id == reader_id)
        .order_by(Study.status.desc(), Study.created_at.desc())
    ).all()
    return [get_study(session, i) for i in ids]


# ------------------------------------------------------------------------------------------------------ reading


def _case_ids(session: Session, study_id: int) -> list[int]:
    return list(
        session.scalars(select(StudyCase.id).where(StudyCase.study_id == study_id, StudyCase.training.is_(False))).all()
    )


def _answered(session: Session, reader_id: int, arm_id: int) -> dict[int, datetime]:
    """case id -> when this reader first answered it in this arm.

    No GROUP BY on purpose: with one, SQLite (no ANALYZE statistics) walks every reader's reads of the arm through
    the unique (arm, case, reader, version) index to get them in case order, 9 ms at 100 readers x 2,000 cases;
    without it, ``ix_reads_reader_arm`` serves only this reader's rows (0.7 ms). See bench/README.md."""
    first: dict[int, datetime] = {}
    for case_id, at in session.execute(
        select(Read.case_id, Read.answered_at).where(Read.reader_id == reader_id, Read.arm_id == arm_id)
    ):
        if case_id not in first or at < first[case_id]:
            first[case_id] = at
    return first


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


def _invitation(session: Session, study_id: int, reader_id: int) -> StudyReader | None:
    return session.get(StudyReader, (study_id, reader_id))


def _current_arm(
    session: Session, study: StudyInfo, reader_id: int, case_ids: list[int]
) -> tuple[ArmInfo | None, dict[int, datetime], datetime | None]:
    """The first arm this reader has not finished, its answers, and when they finished the arm before it."""
    previous_end: datetime | None = None
    for arm in study.arms:
        answered = _answered(session, reader_id, arm.id)
        if len(answered) < len(case_ids):
            return arm, answered, previous_end
        previous_end = max(answered.values()) if answered else previous_end
    return None, {}, previous_end


def _ai_shown(session: Session, arm: ArmInfo, image_id: int) -> AiShown | None:
    if not arm.aided:
        return None
    stmt = (
        select(Prediction, ModelRecord)
        .join(ModelRecord, Prediction.model_id == ModelRecord.id)
        .where(Prediction.image_id == image_id, Prediction.model_id == arm.model_id)
        .order_by(Prediction.id.desc())
    )
    if arm.heatmap_method:
        stmt = stmt.where(Prediction.heatmap_method == arm.heatmap_method)
    row = session.execute(stmt.limit(1)).first()
    if row is None:
        return AiShown(model_name="")  # not computed yet: services.study_ai fills it in
    prediction, model = row
    return AiShown(
        probability=prediction.probability if arm.show_probability else None,
        decision=DECISIONS[model.task][int(prediction.decision)] if arm.show_decision else None,
        heatmap_path=prediction.heatmap_path if arm.heatmap_method else None,
        model_name=model.name,
    )


def _reader_case(
    session: Session, study: StudyInfo, arm: ArmInfo, case: StudyCase, k: int, n: int, previous=None
) -> ReaderCase:
    image = session.scalar(
        select(SpecimenImage).where(
            SpecimenImage.specimen_id == case.specimen_id, SpecimenImage.modality == arm.modality
        )
    )
    return ReaderCase(
        study_id=study.id,
        arm_id=arm.id,
        arm_name=arm.name,
        arm_number=arm.position + 1,
        n_arms=len(study.arms),
        token=case.token,
        k=k,
        n=n,
        modality=arm.modality,
        image_path=image.path,
        ai=_ai_shown(session, arm, image.id),
        previous=previous,
    )


def reader_state(session: Session, study_id: int, reader_id: int, now: datetime | None = None) -> ReaderState:
    """What this reader should see now: the first unanswered case of their current arm (in their own order), the
    training cases, a wash-out wait, or the end. Read-only."""
    now = now or utcnow()
    study = get_study(session, study_id)
    invitation = _invitation(session, study_id, reader_id) if study else None
    if study is None or invitation is None:
        return ReaderState("refused", "This study is not assigned to you.")
    if study.status != "open":
        return ReaderState("closed", "This study is closed. Thank you for taking part.")
    if study.n_training and not _training_done(session, study_id, reader_id):
        return ReaderState("training", f"First, {study.n_training} training cases with their truth.")
    case_ids = _case_ids(session, study_id)
    arm, answered, previous_end = _current_arm(session, study, reader_id, case_ids)
    if arm is None:
        return ReaderState("done", "You have read every case of this study. Thank you.")
    if arm.washout_days and previous_end is not None and not answered:
        available = _aware(previous_end) + timedelta(days=arm.washout_days)
        if now < available:
            return ReaderState(
                "washout",
                f"Arm {arm.position + 1} ({arm.name}) opens after a {arm.washout_days}-day wash-out, on "
                f"{available:%Y-%m-%d %H:%M} UTC. Please come back then.",
                available_at=available,
            )
    order = reader_order(case_ids, study_id, reader_id, arm.id)
    next_id = next(i for i in order if i not in answered)
    case = session.get(StudyCase, next_id)
    return ReaderState("case", case=_reader_case(session, study, arm, case, len(answered) + 1, len(order)))


def _training_done(session: Session, study_id: int, reader_id: int) -> bool:
    return (
        session.scalar(
            select(AuditEvent.id).where(
                AuditEvent.study_id == study_id, AuditEvent.user_id == reader_id, AuditEvent.action == "training_done"
            )
        )
        is not None
    )


def training_cases(session: Session, study_id: int, reader_id: int) -> list[tuple[str, str, str]]:
    """The training cases an invited reader reviews first: (image path, modality, truth word), for the first arm's
    modality. Their truth is the point of them; they are never study cases."""
    study = get_study(session, study_id)
    if study is None or _invitation(session, study_id, reader_id) is None:
        raise StudyError("This study is not assigned to you.")
    modality = study.arms[0].modality
    rows = session.execute(
        select(SpecimenImage.path, Label)
        .join(StudyCase, StudyCase.specimen_id == SpecimenImage.specimen_id)
        .outerjoin(Label, Label.specimen_id == StudyCase.specimen_id)
        .where(StudyCase.study_id == study_id, StudyCase.training.is_(True), SpecimenImage.modality == modality)
        .order_by(StudyCase.position)
    ).all()
    return [(path, modality, study.labels[_truth(study.task, label)]) for path, label in rows]


def complete_training(session: Session, study_id: int, reader_id: int) -> None:
    """Mark the training cases as reviewed by this reader (once)."""
    if _invitation(session, study_id, reader_id) is None:
        raise StudyError("This study is not assigned to you.")
    if not _training_done(session, study_id, reader_id):
        log_event(session, "training_done", user_id=reader_id, study_id=study_id)


def revisable_cases(session: Session, study_id: int, reader_id: int) -> list[tuple[int, str, str, int, str]]:
    """The cases this reader answered, for going back where the study allows it:
    (arm id, arm name, token, k in the reader's order, current answer in words). Empty when revisions are off."""
    study = get_study(session, study_id)
    if study is None or not study.allow_revisions or study.status != "open":
        return []
    if _invitation(session, study_id, reader_id) is None:
        return []
    case_ids = _case_ids(session, study_id)
    out = []
    for arm in study.arms:
        latest = _latest_reads(session, reader_id, arm.id)
        if not latest:
            continue
        order = reader_order(case_ids, study_id, reader_id, arm.id)
        tokens = dict(session.execute(select(StudyCase.id, StudyCase.token).where(StudyCase.id.in_(latest))).all())
        for k, case_id in enumerate(order, start=1):
            if case_id in latest:
                read = latest[case_id]
                rating = "" if read.rating is None else f", confidence {read.rating}"
                out.append((arm.id, arm.name, tokens[case_id], k, f"{study.labels[read.label]}{rating}"))
    return out


def _latest_reads(session: Session, reader_id: int, arm_id: int, case_id: int | None = None) -> dict[int, Read]:
    stmt = select(Read).where(Read.reader_id == reader_id, Read.arm_id == arm_id).order_by(Read.version)
    if case_id is not None:
        stmt = stmt.where(Read.case_id == case_id)
    return {read.case_id: read for read in session.scalars(stmt)}


def case_for_revision(session: Session, study_id: int, reader_id: int, arm_id: int, token: str) -> ReaderCase:
    """A case this reader already answered, with their current answer, to correct it (where allowed)."""
    study = get_study(session, study_id)
    if study is None or _invitation(session, study_id, reader_id) is None:
        raise StudyError("This study is not assigned to you.")
    if not study.allow_revisions:
        raise StudyError("This study does not allow changing answers.")
    arm = study.arm(arm_id)
    case = session.scalar(select(StudyCase).where(StudyCase.token == token, StudyCase.study_id == study_id))
    if arm is None or case is None or case.training:
        raise StudyError("No such case in this study.")
    latest = _latest_reads(session, reader_id, arm_id, case.id).get(case.id)
    if latest is None:
        raise StudyError("You have not answered this case yet; answer it in order first.")
    order = reader_order(_case_ids(session, study_id), study_id, reader_id, arm_id)
    return _reader_case(
        session, study, arm, case, order.index(case.id) + 1, len(order), (latest.label, latest.rating, latest.comment)
    )


def _check_answer(study: Study, label: int, rating: int | None, comment: str | None) -> None:
    if label not in (0, 1):
        raise StudyError("choose a diagnosis")
    low, high = RATING_RANGES[study.rating_scale]
    if rating is None or not low <= int(rating) <= high:
        raise StudyError(f"choose a confidence from {low} to {high}")
    if comment is not None and len(comment) > MAX_COMMENT:
        raise StudyError(f"the comment is longer than {MAX_COMMENT} characters; please shorten it")


def record_read(
    *,
    study_id: int,
    reader_id: int,
    arm_id: int,
    token: str,
    label: int,
    rating: int | None,
    comment: str | None = None,
    shown_at: datetime | None = None,
    revise: bool = False,
    database: str | None = None,
    now: datetime | None = None,
) -> ReadResult:
    """Store one answer, in its own transaction (retried if it lost a race for the database).

    The case must be the one the server would serve this reader now (or, with ``revise``, one they already answered
    in a study that allows corrections). A second first answer for the same case (double click, resubmitted form,
    another tab) stores nothing and returns ``duplicate``. Raises :class:`StudyError` for a refused answer.
    """
    comment = (comment or "").strip() or None

    def work(session: Session) -> ReadResult:
        moment = now or utcnow()
        study = session.get(Study, study_id)
        if study is None or _invitation(session, study_id, reader_id) is None:
            raise StudyError("This study is not assigned to you.")
        if study.status != "open":
            raise StudyError("This study is closed; no more answers are taken.")
        case = session.scalar(select(StudyCase).where(StudyCase.token == token, StudyCase.study_id == study_id))
        arm = session.get(StudyArm, arm_id)
        if case is None or case.training or arm is None or arm.study_id != study_id:
            raise StudyError("No such case in this study.")
        _check_answer(study, label, rating, comment)
        versions = session.scalars(
            select(Read.version).where(Read.reader_id == reader_id, Read.arm_id == arm_id, Read.case_id == case.id)
        ).all()
        if revise:
            if not study.allow_revisions:
                raise StudyError("This study does not allow changing answers.")
            if not versions:
                raise StudyError("You have not answered this case yet; answer it in order first.")
            version = max(versions) + 1
        else:
            if versions:
                return ReadResult("duplicate", max(versions), "This case was already answered; nothing was changed.")
            state = reader_state(session, study_id, reader_id, now=moment)
            if state.kind != "case" or state.case.token != token or state.case.arm_id != arm_id:
                if _latest_reads(session, reader_id, arm_id, case.id):  # answered meanwhile (PostgreSQL sees it now)
                    return ReadResult("duplicate", 1, "This case was already answered; nothing was changed.")
                raise StudyError("This is not the case you were shown; the page has been refreshed to your next case.")
            version = 1
        duration = None
        if shown_at is not None:
            duration = max(0.0, (moment - _aware(shown_at)).total_seconds())
        read = Read(
            study_id=study_id,
            arm_id=arm_id,
            case_id=case.id,
            reader_id=reader_id,
            version=version,
            label=int(label),
            rating=None if rating is None else int(rating),
            comment=comment,
            shown_at=shown_at,
            answered_at=moment,
            duration_s=duration,
        )
        try:
            with session.begin_nested():  # a savepoint: a lost race leaves the transaction usable
                session.add(read)
                session.flush()
        except IntegrityError:
            if not revise:
                return ReadResult("duplicate", 1, "This case was already answered; nothing was changed.")
            raise
        if study.frozen_at is None:
            session.execute(
                update(Study).where(Study.id == study_id, Study.frozen_at.is_(None)).values(frozen_at=moment)
            )
        log_event(
            session,
            "read_revised" if revise else "read_recorded",
            user_id=reader_id,
            study_id=study_id,
            arm=arm.name,
            case=token,
            version=version,
        )
        return ReadResult("revised" if revise else "recorded", version, "Answer saved.")

    return run_transaction(work, database)


VIEW_SIDE = 2048  # the most pixels per side a reader's browser gets (mosaics are far larger)
CASE_CACHE = "cache/cases"  # rendered default views, workspace-relative; safe to delete at any time
_RENDER_VERSION = 1  # bump when the display pipeline changes, so old renderings are not served


def case_png(
    image_path: str,
    modality: str,
    *,
    window: tuple[float, float] = (0.0, 1.0),
    colormap: str = DEFAULT_COLORMAP,
    heatmap_path: str | None = None,
    alpha: float = 0.4,
    side: int = VIEW_SIDE,
    cache: bool = True,
) -> bytes:
    """The PNG a reader's browser receives for a case: the stored image as displayed for its modality (single-channel
    ones through the intensity ``window`` and ``colormap``), optionally with an aided arm's heatmap over it, at most
    ``side`` pixels a side, and with no metadata at all.

    The full-window view without heatmap (what every reader first sees) is kept under ``CASE_CACHE``: stored images
    never change (content-addressed), every reader is shown every case, and rendering a large photo costs far more
    than reading the file back (see bench/README.md)."""
    root = workspace_dir()
    target = None
    if cache and heatmap_path is None and tuple(window) == (0.0, 1.0):
        key = hashlib.sha256(f"{_RENDER_VERSION}|{image_path}|{modality}|{colormap}|{side}".encode()).hexdigest()
        target = root / CASE_CACHE / key[:2] / f"{key}.png"
        with contextlib.suppress(FileNotFoundError):
            return target.read_bytes()
    shown = display_image(read_image(root / image_path, max_pixels=MOSAIC_MAX_PIXELS), modality)
    picture = windowed(shown, *window, colormap) if shown.ndim == 2 else to_uint8(shown)
    if heatmap_path:
        heatmap = resize_map(np.load(root / heatmap_path), picture.shape[:2])
        picture = overlay(picture.astype(np.float32) / 255.0, heatmap, alpha)
    data = blind_png(fit_side(picture, side))
    if target is not None:
        write_atomic(target, data)
    return data


def upcoming_images(session: Session, study_id: int, reader_id: int, count: int = 2) -> list[tuple[str, str]]:
    """(image path, modality) of the ``count`` cases after the one this reader is on, in their own order: what the
    reading page renders ahead, in the background, while the reader looks at the current case."""
    study = get_study(session, study_id)
    if study is None or _invitation(session, study_id, reader_id) is None or study.status != "open":
        return []
    case_ids = _case_ids(session, study_id)
    arm, answered, _ = _current_arm(session, study, reader_id, case_ids)
    if arm is None:
        return []
    order = [i for i in reader_order(case_ids, study_id, reader_id, arm.id) if i not in answered][1 : 1 + count]
    if not order:
        return []
    paths = dict(
        session.execute(
            select(StudyCase.id, SpecimenImage.path)
            .join(SpecimenImage, SpecimenImage.specimen_id == StudyCase.specimen_id)
            .where(StudyCase.id.in_(order), SpecimenImage.modality == arm.modality)
        ).all()
    )
    return [(paths[i], arm.modality) for i in order if i in paths]


# ----------------------------------------------------------------------------------------------- PI: progress


def study_progress(session: Session, study_id: int) -> pd.DataFrame:
    """One row per invited reader and arm: answered of n, corrections, median seconds per case, last answer."""
    study = get_study(session, study_id)
    if study is None:
        raise StudyError(f"there is no study #{study_id}")
    readers = session.execute(
        select(User.id, User.username, User.display_name)
        .join(StudyReader, StudyReader.user_id == User.id)
        .where(StudyReader.study_id == study_id)
        .order_by(User.username)
    ).all()
    stats = {
        (reader, arm): (answered, versions, median, last)
        for reader, arm, answered, versions, median, last in session.execute(
            select(
                Read.reader_id,
                Read.arm_id,
                func.count(func.distinct(Read.case_id)),
                func.count(Read.id),
                func.avg(Read.duration_s),
                func.max(Read.answered_at),
            )
            .where(Read.study_id == study_id)
            .group_by(Read.reader_id, Read.arm_id)
        ).all()
    }
    rows = []
    for reader_id, username, display in readers:
        for arm in study.arms:
            answered, versions, mean, last = stats.get((reader_id, arm.id), (0, 0, None, None))
            rows.append(
                {
                    "reader": username,
                    "name": display,
                    "arm": arm.name,
                    "answered": int(answered),
                    "cases": study.n_cases,
                    "done": f"{answered / max(study.n_cases, 1):.0%}",
                    "corrections": int(versions - answered),
                    "mean_s_per_case": None if mean is None else round(float(mean), 1),
                    "last_answer": last,
                }
            )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- export and import


def export_reads(
    session: Session, study_id: int, *, user_id: int | None, history: bool = False, audit: bool = True
) -> pd.DataFrame:
    """The study's reads in the long format the analysis takes (``EXPORT_COLUMNS``): ``case_id`` is the specimen
    code, ``reader_id`` the username, ``label`` 0/1 (1 = the task's positive answer). Only the latest version of
    each answer unless ``history``. Audited (``audit=False`` for internal use, e.g. the Results page, which audits
    its own view)."""
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
    frame = pd.DataFrame(session.execute(stmt).mappings().all(), columns=[*EXPORT_COLUMNS, "_case", "_arm", "_reader"])
    if not history and not frame.empty:
        frame = frame.drop_duplicates(["_case", "_arm", "_reader"], keep="last")
    if audit:
        log_event(session, "reads_exported", user_id=user_id, study_id=study_id, rows=len(frame), history=history)
    return frame[list(EXPORT_COLUMNS)].reset_index(drop=True)


def export_cases(session: Session, study_id: int, *, user_id: int | None, audit: bool = True) -> pd.DataFrame:
    """The study's cases with their truth (PI only): case_id, truth (0/1), split, training. Audited."""
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
    if audit:
        log_event(session, "cases_exported", user_id=user_id, study_id=study_id, rows=len(rows))
    return pd.DataFrame(
        [
            {"case_id": code, "truth": _truth(study.task, label), "split": split, "training": training}
            for code, split, training, label in rows
        ],
        columns=["case_id", "truth", "split", "training"],
    )


def _parse_time(value: Any) -> datetime | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    stamp = pd.Timestamp(str(value).strip())
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return stamp.to_pydatetime()


def import_reads(
    session: Session,
    study_id: int,
    source: bytes | str | pd.DataFrame,
    *,
    user_id: int | None,
    create_readers: bool = False,
) -> ImportReport:
    """Import reads collected elsewhere (e.g. on paper) in the export format: ``case_id, reader_id, arm, label``
    and ``rating`` required, ``comment, answered_at, duration_s`` optional.

    Every row is checked first; any error (named by its CSV line) imports nothing. Readers must exist unless
    ``create_readers``, which adds them as inactive reader accounts (they cannot sign in). Imported answers are
    version 1 with source ``import``; a case a reader already answered in that arm is an error, not an overwrite.
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
        label_text = str(row.get("label", "")).strip()
        if label_text not in ("0", "1"):
            errors.append(f"label must be 0 or 1, not {label_text!r}")
        rating_text = str(row.get("rating", "")).strip()
        try:
            rating = int(float(rating_text))
            if rating != float(rating_text) or not low <= rating <= high:
                raise ValueError
        except ValueError:
            rating = None
            errors.append(f"rating must be a whole number from {low} to {high}, not {rating_text!r}")
        try:
            answered_at = _parse_time(row.get("answered_at"))
        except ValueError:
            answered_at = None
            errors.append(f"answered_at {row.get('answered_at')!r} is not a date and time (use ISO 8601)")
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
    moment = utcnow()
    for case_id, arm, reader, label, rating, comment, answered_at, duration in parsed:
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
    )
    return report
