"""Setting up a reader study (PI): eligible specimens, arms, cases, readers; changes, status and progress."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.stats.ratings import RATING_SCALES as RATING_RANGES  # scale -> (lowest, highest) rating
from core.train import DECISIONS, task_label
from db.audit import log_event
from db.models import (
    MODALITIES,
    RATING_SCALES,
    SPLITS,
    STUDY_QUESTIONS,
    ArmCase,
    Label,
    ModelRecord,
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
from db.session import reads, writes

__all__ = [
    "ArmInfo",
    "ArmSpec",
    "MAX_COMMENT",
    "RATING_RANGES",
    "STUDY_TASKS",
    "StudyError",
    "CasePools",
    "StudyInfo",
    "case_pools",
    "create_study",
    "eligible_specimens",
    "get_study",
    "invite_readers",
    "list_studies",
    "reader_studies",
    "sample_cases",
    "set_status",
    "study_progress",
    "update_study",
]

MAX_COMMENT = 2000


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
    start_threshold: float | None = None  # regions studies: the model's heatmap at this level is the editable start

    @property
    def aided(self) -> bool:
        return self.show_probability or self.show_decision or bool(self.heatmap_method) or self.starts_from_ai

    @property
    def starts_from_ai(self) -> bool:
        return self.start_threshold is not None


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
            start_threshold=arm.start_threshold,
        )

    def describe(self) -> str:
        shown = [w for w, on in (("probability", self.show_probability), ("decision", self.show_decision)) if on]
        if self.heatmap_method:
            shown.append(f"{self.heatmap_method} heatmap")
        if self.starts_from_ai:
            shown.append(f"drawing starts from the heatmap at {self.start_threshold:g}")
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
    question: str = "label"  # label: readers answer a label; regions: they draw the regions (issue 16)
    layers: tuple[str, ...] = ("region",)  # what readers draw in a regions study

    @property
    def labels(self) -> tuple[str, str]:
        """The answer words, negative first (label 0, label 1)."""
        return DECISIONS[self.task]

    def arm(self, arm_id: int) -> ArmInfo | None:
        return next((a for a in self.arms if a.id == arm_id), None)


# ----------------------------------------------------------------------------------------------------- set-up


# the questions a reader study can ask: the FL-CNN cascade's (seed 003) of specimens, whether a CLE frame is
# diagnostic (seed 000), whether an RCM mosaic holds an aspecific region (seed 002); the modalities each fits best
STUDY_TASKS: dict[str, tuple[str, ...]] = {
    "tumor": ("FL", "WL", "CLE", "RCM"),
    "grade": ("FL", "WL", "CLE"),
    "ki67": ("FL", "WL", "CLE"),
    "diagnostic": ("CLE",),
    "aspecific": ("RCM",),
}


def _truth(task: str, label: Label | None) -> int | None:
    if label is None:
        return None
    if task in ("diagnostic", "aspecific"):  # image-level truths of frames and mosaics, not of the pathology
        value = getattr(label, task)
        return None if value is None else int(bool(value))
    return task_label(task, {"tumor": label.tumor, "grade": label.grade, "ki67": label.ki67})


@reads
def eligible_specimens(
    session: Session, *, task: str, modalities: Sequence[str], splits: Sequence[str] = ("test",)
) -> pd.DataFrame:
    """Specimens a study can use: in ``splits``, with an image in every modality of ``modalities`` and a known
    label for ``task``. Columns: specimen_id, specimen, split, truth."""
    if task not in STUDY_TASKS:
        raise StudyError(f"reader studies ask one of {', '.join(STUDY_TASKS)} (not {task!r})")
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


@dataclass(frozen=True)
class CasePools:
    """The specimens a new study can draw from: ``eligible`` (in the chosen splits) and ``training`` (train-split
    specimens not among them, to show with their truth first). Columns: specimen_id, specimen, split, truth."""

    eligible: pd.DataFrame
    training: pd.DataFrame


@reads
def case_pools(session: Session, *, task: str, modalities: Sequence[str], splits: Sequence[str]) -> CasePools:
    """What :func:`sample_cases` draws from, for the arms' ``modalities``."""
    eligible = eligible_specimens(session, task=task, modalities=modalities, splits=splits)
    pool = eligible_specimens(session, task=task, modalities=modalities, splits=("train",))
    return CasePools(eligible, pool[~pool["specimen_id"].isin(eligible["specimen_id"])].reset_index(drop=True))


def sample_cases(pools: CasePools, n_cases: int, n_training: int = 0, seed: int = 0) -> tuple[list[int], list[int]]:
    """(case specimen ids, training specimen ids): every eligible specimen, or a random sample of ``n_cases`` of them
    (reproducible by ``seed``), and ``n_training`` random training specimens."""
    if not 1 <= n_cases <= len(pools.eligible):
        raise StudyError(f"choose between 1 and {len(pools.eligible)} cases")
    if not 0 <= n_training <= len(pools.training):
        raise StudyError(f"choose between 0 and {len(pools.training)} training cases")
    chosen = pools.eligible
    if n_cases < len(chosen):
        chosen = chosen.sample(n=n_cases, random_state=seed)
    training = pools.training.sample(n=n_training, random_state=seed) if n_training else pools.training.head(0)
    return [int(i) for i in chosen["specimen_id"]], [int(i) for i in training["specimen_id"]]


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
            _arm_method(model, arm)


# the model's own map where its architecture computes one (as core.triage.default_method picks it), else Grad-CAM
_OWN_MAPS = {"mlcam_lici": "mlcam-lici", "compsegnet": "compsegnet", "celnet": "celm"}
_MOSAIC_MAPS = ("cam", "scorecam")  # seed 002 stitches CAM or Score-CAM over the mosaic


def _arm_method(model: ModelRecord | None, arm: ArmSpec) -> str | None:
    """The heatmap method an arm stores: ``default`` resolved to the model's own map (CAM for an RCM patch
    classifier, stitched over the mosaic); a method a mosaic cannot be stitched with is refused."""
    method = arm.heatmap_method or None
    if method is None or model is None or not arm.aided:
        return method
    if model.task == "aspecific":
        if method == "default":
            return "cam"
        if method not in _MOSAIC_MAPS:
            raise StudyError(
                f"arm {arm.name}: an RCM mosaic's map is stitched from CAM or Score-CAM windows (seed 002); "
                f"choose cam, scorecam or default, not {method}"
            )
        return method
    return _OWN_MAPS.get(model.architecture, "gradcam") if method == "default" else method


MAX_LAYERS = 2  # seed 000's intermediate and restrictive features
_LAYER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def _check_question(question: str, layers: Sequence[str], arms: Sequence[ArmSpec]) -> tuple[str, ...]:
    """The study's layers, checked against its question; refuses start thresholds outside a regions study."""
    if question not in STUDY_QUESTIONS:
        raise StudyError(f"the question must be one of {', '.join(STUDY_QUESTIONS)}, not {question!r}")
    names = tuple(str(name).strip().lower() for name in layers)
    if question == "regions":
        if not 1 <= len(names) <= MAX_LAYERS or len(set(names)) != len(names):
            raise StudyError(f"a regions study asks for 1 to {MAX_LAYERS} layers with different names")
        bad = [n for n in names if not _LAYER_NAME.match(n)]
        if bad:
            raise StudyError(f"layer names are short lower-case words (letters, digits, - and _), not {bad[0]!r}")
    for arm in arms:
        if arm.start_threshold is None:
            continue
        if question != "regions":
            raise StudyError(f"arm {arm.name}: only a regions study starts readers from the AI's heatmap")
        if not arm.heatmap_method or arm.model_id is None:
            raise StudyError(f"arm {arm.name}: starting from the AI's heatmap needs a model and a heatmap method")
        if not 0.0 < float(arm.start_threshold) < 1.0:
            raise StudyError(f"arm {arm.name}: the start threshold must lie between 0 and 1, not {arm.start_threshold}")
    return names if question == "regions" else ("region",)


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
        session.add(StudyCase(study_id=study_id, specimen_id=specimen_id, position=start + offset, training=training))


def _add_tokens(session: Session, study_id: int) -> None:
    """A random token for every study case in every arm that has none yet (training cases are never addressed by
    token): what a reader's browser calls the case, different in each arm."""
    session.flush()
    have = set(
        session.execute(
            select(ArmCase.arm_id, ArmCase.case_id).join(StudyArm, StudyArm.id == ArmCase.arm_id)
            .where(StudyArm.study_id == study_id)
        ).all()
    )  # fmt: skip
    arms = session.scalars(select(StudyArm.id).where(StudyArm.study_id == study_id)).all()
    cases = session.scalars(
        select(StudyCase.id).where(StudyCase.study_id == study_id, StudyCase.training.is_(False))
    ).all()
    for arm_id in arms:
        for case_id in cases:
            if (arm_id, case_id) not in have:
                session.add(ArmCase(arm_id=arm_id, case_id=case_id, token=secrets.token_urlsafe(12)))
    session.flush()


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
                heatmap_method=_arm_method(session.get(ModelRecord, arm.model_id) if arm.model_id else None, arm),
                washout_days=int(arm.washout_days),
                start_threshold=None if arm.start_threshold is None else float(arm.start_threshold),
            )
        )


@writes
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
    question: str = "label",
    layers: Sequence[str] = ("region",),
) -> StudyInfo:
    """Set up a study in one transaction (the caller's); refused with a :class:`StudyError` saying what to fix.

    ``question`` is ``label`` (readers answer the task's label with a confidence) or ``regions`` (readers draw the
    regions that carry the diagnosis in each of ``layers``, or say there is none)."""
    title = title.strip()
    if not title:
        raise StudyError("give the study a title")
    if session.scalar(select(Study.id).where(Study.title == title)) is not None:
        raise StudyError(f"a study titled {title!r} exists already; choose another title")
    if task not in STUDY_TASKS:
        raise StudyError(f"unknown task {task!r}; reader studies ask one of {', '.join(STUDY_TASKS)}")
    if rating_scale not in RATING_SCALES:
        raise StudyError(f"rating scale must be one of {', '.join(RATING_SCALES)}")
    if not specimen_ids:
        raise StudyError("choose at least one case")
    if set(training_specimen_ids) & set(specimen_ids):
        raise StudyError("a training case (shown with its truth) cannot also be a study case")
    layers = _check_question(question, layers, arms)
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
        question=question,
        layers=list(layers),
    )
    session.add(study)
    session.flush()
    _add_arms(session, study.id, arms)
    _add_cases(session, study.id, training_specimen_ids, True, 0)
    _add_cases(session, study.id, specimen_ids, False, len(training_specimen_ids))
    _add_tokens(session, study.id)
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


@writes
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
        _check_question(study.question, study.layers, arms)
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
        _add_tokens(session, study_id)
    session.flush()
    session.expire(study)
    if changes:
        log_event(session, "study_updated", user_id=user_id, study_id=study_id, **changes)
    return get_study(session, study_id)


@writes
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


@writes
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


@reads
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
        question=study.question,
        layers=tuple(study.layers or ("region",)),
    )


@reads
def list_studies(session: Session) -> list[StudyInfo]:
    """All studies, newest first (PI)."""
    ids = session.scalars(select(Study.id).order_by(Study.created_at.desc(), Study.id.desc())).all()
    return [get_study(session, i) for i in ids]


@reads
def reader_studies(session: Session, reader_id: int) -> list[StudyInfo]:
    """The studies a reader is invited to, open ones first."""
    ids = session.scalars(
        select(Study.id)
        .join(StudyReader, StudyReader.study_id == Study.id)
        .where(StudyReader.user_id == reader_id)
        .order_by(Study.status.desc(), Study.created_at.desc())
    ).all()
    return [get_study(session, i) for i in ids]


# ----------------------------------------------------------------------------------------------- PI: progress


@reads
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
