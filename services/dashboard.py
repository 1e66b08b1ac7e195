"""The home dashboard's figures, per role: reader-study progress (PI), a reader's own progress, recent diagnoses and
the registered models' held-out figures.

A reader's figures are their own answered counts and where the protocol has them (``studies.reader_state``):
nothing here tells a reader the truth, the AI's output or another reader's answers. The PI's progress is the
Studies page's own (``studies.study_progress``), so both pages always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.train import DECISIONS
from db import repo
from db.models import ModelRecord, Prediction, Read, Study, StudyArm, StudyCase, Upload, User
from db.session import reads
from services import studies

__all__ = [
    "ArmProgress",
    "Diagnosis",
    "ModelFigures",
    "ReaderRow",
    "ReaderStudy",
    "StudyProgress",
    "model_figures",
    "reader_progress",
    "recent_diagnoses",
    "study_progress",
]


@dataclass(frozen=True)
class ReaderRow:
    """One invited reader of a study: the cases they answered in each arm, in arm order."""

    username: str
    name: str
    answered: tuple[int, ...]


@dataclass(frozen=True)
class StudyProgress:
    """An open study as the PI follows it: each invited reader's answered cases per arm, of ``n_cases``."""

    id: int
    title: str
    arms: tuple[str, ...]
    n_cases: int
    readers: tuple[ReaderRow, ...]

    @property
    def done(self) -> float:
        """The fraction of all first reads (readers x arms x cases) that are in."""
        total = len(self.readers) * len(self.arms) * self.n_cases
        return sum(sum(r.answered) for r in self.readers) / total if total else 0.0


@dataclass(frozen=True)
class ArmProgress:
    """One arm of a study as its reader stands in it. ``state`` is done | open | training (the training cases come
    first) | washout (opens at ``opens_at``) | later (after the arm before it)."""

    name: str
    answered: int
    total: int
    state: str
    opens_at: datetime | None = None


@dataclass(frozen=True)
class ReaderStudy:
    """An open study a reader is invited to, and how far they are in each arm."""

    id: int
    title: str
    arms: tuple[ArmProgress, ...]


@dataclass(frozen=True)
class Diagnosis:
    """One prediction on an uploaded image (the Diagnose page's work)."""

    id: int
    at: datetime
    image: str
    model: str
    probability: float
    threshold: float
    decision: str
    user: str | None  # the uploader's display name (None: the account is gone)


@dataclass(frozen=True)
class ModelFigures:
    """A registered model and its figures on held-out data: the test split's when it was scored on one (``split``
    ``test``), else the validation split's (``val``, which also chose the threshold)."""

    id: int
    name: str
    task: str
    modality: str
    architecture: str
    split: str
    n: int | None
    auc: float | None
    sensitivity: float | None
    specificity: float | None
    threshold: float
    threshold_policy: str


@reads
def study_progress(session: Session) -> list[StudyProgress]:
    """Every open study, newest first, with each invited reader's answered cases per arm (the Studies page's
    ``studies.study_progress``, one study at a time; arms and case counts of all open studies in one query each)."""
    open_studies = session.execute(
        select(Study.id, Study.title).where(Study.status == "open").order_by(Study.created_at.desc(), Study.id.desc())
    ).all()
    ids = [study_id for study_id, _ in open_studies]
    arms: dict[int, list[str]] = {study_id: [] for study_id in ids}
    for study_id, name in session.execute(
        select(StudyArm.study_id, StudyArm.name).where(StudyArm.study_id.in_(ids)).order_by(StudyArm.position)
    ):
        arms[study_id].append(name)
    cases = dict(
        session.execute(
            select(StudyCase.study_id, func.count())
            .where(StudyCase.study_id.in_(ids), StudyCase.training.is_(False))
            .group_by(StudyCase.study_id)
        ).all()
    )
    out = []
    for study_id, title in open_studies:
        answered: dict[tuple[str, str], int] = {}
        names: dict[str, str] = {}
        for row in studies.study_progress(session, study_id).itertuples():
            answered[row.reader, row.arm] = int(row.answered)
            names[row.reader] = str(row.name)
        readers = tuple(
            ReaderRow(username, name, tuple(answered[username, arm] for arm in arms[study_id]))
            for username, name in names.items()
        )
        out.append(StudyProgress(study_id, title, tuple(arms[study_id]), int(cases.get(study_id, 0)), readers))
    return out


def _arm_states(info: studies.StudyInfo, answered: dict[int, int], state: studies.ReaderState) -> list[ArmProgress]:
    """Each arm's state for a reader: the arms before the first unfinished one are done, that one is where the
    protocol has the reader now, the ones after it wait for it."""
    arms, current = [], None
    for arm in info.arms:
        done = answered.get(arm.id, 0)
        if done >= info.n_cases:
            kind, opens_at = "done", None
        elif current is None:
            current = arm
            kind = {"case": "open", "training": "training", "washout": "washout"}.get(state.kind, "open")
            opens_at = state.available_at if kind == "washout" else None
        else:
            kind, opens_at = "later", None
        arms.append(ArmProgress(arm.name, done, info.n_cases, kind, opens_at))
    return arms


@reads
def reader_progress(session: Session, user_id: int, now: datetime | None = None) -> list[ReaderStudy]:
    """The open studies this reader is invited to, with their own answered cases per arm and which arm is open."""
    mine = [s for s in studies.reader_studies(session, user_id) if s.status == "open"]
    arm_ids = [a.id for s in mine for a in s.arms]
    answered = dict(
        session.execute(
            select(Read.arm_id, func.count(func.distinct(Read.case_id)))
            .where(Read.reader_id == user_id, Read.arm_id.in_(arm_ids))
            .group_by(Read.arm_id)
        ).all()
    )
    out = []
    for info in mine:
        state = studies.reader_state(session, info.id, user_id, now=now)
        out.append(ReaderStudy(info.id, info.title, tuple(_arm_states(info, answered, state))))
    return out


@reads
def recent_diagnoses(session: Session, user_id: int | None = None, limit: int = 10) -> list[Diagnosis]:
    """The newest predictions on uploaded images, newest first: everyone's, or only ``user_id``'s uploads."""
    stmt = (
        select(
            Prediction.id,
            Prediction.created_at,
            Upload.original_name,
            ModelRecord.name,
            ModelRecord.task,
            Prediction.probability,
            Prediction.threshold,
            Prediction.decision,
            User.display_name,
        )
        .join(Upload, Prediction.upload_id == Upload.id)
        .join(ModelRecord, Prediction.model_id == ModelRecord.id)
        .outerjoin(User, Upload.user_id == User.id)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(limit)
    )
    if user_id is not None:
        stmt = stmt.where(Upload.user_id == user_id)
    return [
        Diagnosis(pid, at, image, model, probability, threshold, DECISIONS[task][int(decision)], who)
        for pid, at, image, model, task, probability, threshold, decision, who in session.execute(stmt)
    ]


def _figure(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return None if math.isnan(value) else value


@reads
def model_figures(session: Session) -> list[ModelFigures]:
    """Every registered model, newest first, with AUC, sensitivity and specificity (at its threshold) on the test
    split when it was scored on one, else on the validation split."""
    out = []
    for model in repo.list_models(session):
        split = "test" if _figure(model.metrics, "test_auc") is not None else "val"
        n = model.metrics.get(f"{split}_n")
        out.append(
            ModelFigures(
                id=model.id,
                name=model.name,
                task=model.task,
                modality=model.modality,
                architecture=model.architecture,
                split=split,
                n=int(n) if isinstance(n, int | float) else None,
                auc=_figure(model.metrics, f"{split}_auc"),
                sensitivity=_figure(model.metrics, f"{split}_sensitivity"),
                specificity=_figure(model.metrics, f"{split}_specificity"),
                threshold=model.threshold,
                threshold_policy=model.threshold_policy,
            )
        )
    return out
