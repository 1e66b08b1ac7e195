"""The reader protocol: which case a reader is served, what they are sent, and how an answer is stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.reading import reader_order
from core.train import DECISIONS
from db.audit import log_event
from db.models import (
    Annotation,
    ArmCase,
    AuditEvent,
    Label,
    ModelRecord,
    Prediction,
    Read,
    SpecimenImage,
    Study,
    StudyArm,
    StudyCase,
    StudyReader,
    User,
    utcnow,
)
from db.session import reads, run_transaction, writes
from services.studies.setup import MAX_COMMENT, RATING_RANGES, ArmInfo, StudyError, StudyInfo, _truth, get_study

__all__ = [
    "AiShown",
    "DrawnRegions",
    "ReadResult",
    "ReaderCase",
    "ReaderState",
    "case_for_revision",
    "complete_training",
    "note_case_shown",
    "reader_state",
    "record_read",
    "revisable_cases",
    "training_cases",
]


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

    ``token`` is the case's own random token in this arm (a case has another in every other arm, so nothing a
    reader is sent links one specimen across arms); the page keeps it on the server (form callbacks, session
    state), never in an element key or a URL. ``image_path`` is used by the server to render pixels; it is never
    shown (stored names are sha256 digests of the re-encoded pixels, which carry no metadata either).
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
    layers: tuple[str, ...] = ()  # a regions study: the layers the reader draws (a label study: none)
    starts_from_ai: bool = False  # a regions study's aided arm: the drawing starts from the model's heatmap


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


# ------------------------------------------------------------------------------------------------------ reading

NOT_ASSIGNED = "This study is not assigned to you."
_NO_CASE = "No such case in this study."


def _case_ids(session: Session, study_id: int) -> list[int]:
    return list(
        session.scalars(select(StudyCase.id).where(StudyCase.study_id == study_id, StudyCase.training.is_(False))).all()
    )


def _answered(session: Session, reader_id: int, arm_id: int) -> set[int]:
    """The cases this reader answered in this arm.

    Only the case ids: a reader far into a large study has thousands of reads, and reading their times back would
    parse thousands of timestamps per served case. ``ix_reads_reader_arm`` (reader, arm, case) answers it alone, with
    this reader's rows of the arm only; without it SQLite (no ANALYZE statistics) walks every reader's reads of the
    arm through the unique (arm, case, reader, version) index, 10 ms more per served case at 100 readers x 2,000
    cases (see bench/README.md)."""
    return set(session.scalars(select(Read.case_id).where(Read.reader_id == reader_id, Read.arm_id == arm_id)))


def _invitation(session: Session, study_id: int, reader_id: int) -> StudyReader | None:
    """The invitation of an active reader account (a deactivated or demoted one has none any more)."""
    user = session.get(User, reader_id)
    if user is None or not user.active or user.role != "reader":
        return None
    return session.get(StudyReader, (study_id, reader_id))


@dataclass(frozen=True)
class _Position:
    """Where a reader is: the first arm they have not finished (None: all done), the cases they answered in it, and
    when it opens to them (None: open; a time: its wash-out runs until then)."""

    arm: ArmInfo | None
    answered: set[int]
    available_at: datetime | None

    def open(self, now: datetime) -> bool:
        return self.arm is not None and (self.available_at is None or now >= self.available_at)


def _position(session: Session, study: StudyInfo, reader_id: int, case_ids: list[int]) -> _Position:
    previous: ArmInfo | None = None
    for arm in study.arms:
        answered = _answered(session, reader_id, arm.id)
        if len(answered) < len(case_ids):
            available = None
            if arm.washout_days and previous is not None and not answered:
                # the wash-out runs from the reader's last first answer in the arm before (corrections don't count)
                finished = session.scalar(
                    select(func.max(Read.answered_at)).where(
                        Read.reader_id == reader_id, Read.arm_id == previous.id, Read.version == 1
                    )
                )
                available = None if finished is None else finished + timedelta(days=arm.washout_days)
            return _Position(arm, answered, available)
        previous = arm
    return _Position(None, set(), None)


def _revisable_arm(session: Session, study: StudyInfo, reader_id: int, now: datetime) -> ArmInfo | None:
    """The one arm in which this reader may correct answers now, if any.

    Corrections stay inside the arm the reader is in: the arm they are reading, or, while the next arm's wash-out
    runs (or after the last arm), the arm they finished last; never an arm before an opened one. And never an
    unaided arm once the reader has been shown AI output (an aided arm came before it)."""
    if not study.allow_revisions or study.status != "open":
        return None
    where = _position(session, study, reader_id, _case_ids(session, study.id))
    if where.arm is not None and where.open(now):
        arm = where.arm
    else:
        finished = where.arm.position - 1 if where.arm is not None else len(study.arms) - 1
        arm = study.arms[finished] if finished >= 0 else None
    if arm is None or (not arm.aided and any(a.aided for a in study.arms[: arm.position])):
        return None
    return arm


def _arm_case(session: Session, study_id: int, arm_id: int, token: str) -> StudyCase | None:
    """The study case ``token`` names in this arm (and only in this arm)."""
    return session.scalar(
        select(StudyCase)
        .join(ArmCase, ArmCase.case_id == StudyCase.id)
        .where(
            ArmCase.token == token,
            ArmCase.arm_id == arm_id,
            StudyCase.study_id == study_id,
            StudyCase.training.is_(False),
        )
    )


def _tokens(session: Session, arm_id: int, case_ids: list[int]) -> dict[int, str]:
    return dict(
        session.execute(
            select(ArmCase.case_id, ArmCase.token).where(ArmCase.arm_id == arm_id, ArmCase.case_id.in_(case_ids))
        ).all()
    )


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
        token=_tokens(session, arm.id, [case.id])[case.id],
        k=k,
        n=n,
        modality=arm.modality,
        image_path=image.path,
        ai=_ai_shown(session, arm, image.id),
        previous=previous,
        layers=study.layers if study.question == "regions" else (),
        starts_from_ai=study.question == "regions" and arm.starts_from_ai,
    )


@dataclass(frozen=True)
class _Next:
    """What the server serves an invited reader now: ``kind`` is closed | training | done | washout | case; for a
    case, its arm, study case id and place ``k`` of ``n`` in the reader's order."""

    kind: str
    arm: ArmInfo | None = None
    case_id: int | None = None
    k: int = 0
    n: int = 0
    available_at: datetime | None = None


def _next(session: Session, study: StudyInfo, reader_id: int, now: datetime) -> _Next:
    if study.status != "open":
        return _Next("closed")
    if study.n_training and not _training_done(session, study.id, reader_id):
        return _Next("training")
    case_ids = _case_ids(session, study.id)
    where = _position(session, study, reader_id, case_ids)
    if where.arm is None:
        return _Next("done")
    if not where.open(now):
        return _Next("washout", where.arm, available_at=where.available_at)
    order = reader_order(case_ids, study.id, reader_id, where.arm.id)
    next_id = next(i for i in order if i not in where.answered)
    return _Next("case", where.arm, next_id, len(where.answered) + 1, len(order))


@reads
def reader_state(session: Session, study_id: int, reader_id: int, now: datetime | None = None) -> ReaderState:
    """What this reader should see now: the first unanswered case of their current arm (in their own order), the
    training cases, a wash-out wait, or the end."""
    study = get_study(session, study_id)
    if study is None or _invitation(session, study_id, reader_id) is None:
        return ReaderState("refused", NOT_ASSIGNED)
    served = _next(session, study, reader_id, now or utcnow())
    arm = served.arm
    if served.kind == "closed":
        return ReaderState("closed", "This study is closed. Thank you for taking part.")
    if served.kind == "training":
        return ReaderState("training", f"First, {study.n_training} training cases with their truth.")
    if served.kind == "done":
        return ReaderState("done", "You have read every case of this study. Thank you.")
    if served.kind == "washout":
        return ReaderState(
            "washout",
            f"Arm {arm.position + 1} ({arm.name}) opens after a {arm.washout_days}-day wash-out, on "
            f"{served.available_at:%Y-%m-%d %H:%M} UTC. Please come back then.",
            available_at=served.available_at,
        )
    case = session.get(StudyCase, served.case_id)
    return ReaderState("case", case=_reader_case(session, study, arm, case, served.k, served.n))


def _training_done(session: Session, study_id: int, reader_id: int) -> bool:
    return (
        session.scalar(
            select(AuditEvent.id).where(
                AuditEvent.study_id == study_id, AuditEvent.user_id == reader_id, AuditEvent.action == "training_done"
            )
        )
        is not None
    )


@reads
def training_cases(session: Session, study_id: int, reader_id: int) -> list[tuple[str, str, str]]:
    """The training cases an invited reader reviews first: (image path, modality, truth word), for the first arm's
    modality. Their truth is the point of them; they are never study cases."""
    study = get_study(session, study_id)
    if study is None or _invitation(session, study_id, reader_id) is None:
        raise StudyError(NOT_ASSIGNED)
    modality = study.arms[0].modality
    rows = session.execute(
        select(SpecimenImage.path, Label)
        .join(StudyCase, StudyCase.specimen_id == SpecimenImage.specimen_id)
        .outerjoin(Label, Label.specimen_id == StudyCase.specimen_id)
        .where(StudyCase.study_id == study_id, StudyCase.training.is_(True), SpecimenImage.modality == modality)
        .order_by(StudyCase.position)
    ).all()
    return [(path, modality, study.labels[_truth(study.task, label)]) for path, label in rows]


@writes
def complete_training(session: Session, study_id: int, reader_id: int) -> None:
    """Mark the training cases as reviewed by this reader (once)."""
    if _invitation(session, study_id, reader_id) is None:
        raise StudyError(NOT_ASSIGNED)
    if not _training_done(session, study_id, reader_id):
        log_event(session, "training_done", user_id=reader_id, study_id=study_id)


@writes
def note_case_shown(session: Session, study_id: int, reader_id: int, arm_id: int, token: str) -> None:
    """Audit that this reader was shown this case (the page calls it once per case and browser session)."""
    arm = session.get(StudyArm, arm_id)
    if arm is None or arm.study_id != study_id or _arm_case(session, study_id, arm_id, token) is None:
        raise StudyError(_NO_CASE)
    log_event(session, "case_shown", user_id=reader_id, study_id=study_id, arm=arm.name, case=token)


@reads
def revisable_cases(
    session: Session, study_id: int, reader_id: int, now: datetime | None = None
) -> list[tuple[int, str, str, int, str]]:
    """The cases this reader may go back to and correct now (only those of the arm they are in, see
    ``_revisable_arm``): (arm id, arm name, token, k in the reader's order, current answer in words)."""
    study = get_study(session, study_id)
    if study is None or _invitation(session, study_id, reader_id) is None:
        return []
    arm = _revisable_arm(session, study, reader_id, now or utcnow())
    if arm is None:
        return []
    latest = _latest_reads(session, reader_id, arm.id)
    order = reader_order(_case_ids(session, study_id), study_id, reader_id, arm.id)
    tokens = _tokens(session, arm.id, list(latest))
    out = []
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


def _check_revision(session: Session, study: StudyInfo, reader_id: int, arm_id: int, now: datetime) -> None:
    if not study.allow_revisions:
        raise StudyError("This study does not allow changing answers.")
    arm = _revisable_arm(session, study, reader_id, now)
    if arm is None or arm.id != arm_id:
        raise StudyError(
            "Answers can only be corrected in the arm you are reading now, and never in an unaided arm after the AI "
            "output was shown to you; this answer stays as it is."
        )


@reads
def case_for_revision(
    session: Session, study_id: int, reader_id: int, arm_id: int, token: str, now: datetime | None = None
) -> ReaderCase:
    """A case this reader already answered, with their current answer, to correct it (where allowed)."""
    study = get_study(session, study_id)
    if study is None or _invitation(session, study_id, reader_id) is None:
        raise StudyError(NOT_ASSIGNED)
    arm = study.arm(arm_id)
    case = _arm_case(session, study_id, arm_id, token) if arm is not None else None
    if case is None:
        raise StudyError(_NO_CASE)
    _check_revision(session, study, reader_id, arm_id, now or utcnow())
    latest = _latest_reads(session, reader_id, arm_id, case.id).get(case.id)
    if latest is None:
        raise StudyError("You have not answered this case yet; answer it in order first.")
    order = reader_order(_case_ids(session, study_id), study_id, reader_id, arm_id)
    return _reader_case(
        session, study, arm, case, order.index(case.id) + 1, len(order), (latest.label, latest.rating, latest.comment)
    )


@dataclass(frozen=True)
class DrawnRegions:
    """What a reader drew on a case of a regions study, its masks already stored: ``layers`` maps each layer to
    (mask file, area in pixels), at ``height`` x ``width`` (the case as the reader was shown it)."""

    layers: dict[str, tuple[str, int]]
    height: int
    width: int
    empty: bool
    started_from_ai: bool = False

    def as_json(self) -> dict[str, dict[str, object]]:
        """The ``annotations.layers`` value: layer -> {path, pixels}."""
        return {layer: {"path": path, "pixels": int(area)} for layer, (path, area) in self.layers.items()}

    @property
    def label(self) -> int:
        """The read's label: 1 when any region was drawn."""
        return int(any(area > 0 for _, area in self.layers.values()))


def _check_answer(study: StudyInfo, label: int, rating: int | None, comment: str | None) -> None:
    if label not in (0, 1):
        raise StudyError("choose a diagnosis")
    low, high = RATING_RANGES[study.rating_scale]
    if study.question == "regions" and rating is None:
        pass  # a drawing needs no confidence
    elif rating is None or not low <= int(rating) <= high:
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
    now: datetime | None = None,
    regions: DrawnRegions | None = None,
) -> ReadResult:
    """Store one answer, in its own transaction (retried if it lost a race for the database).

    A regions study's answer is a drawing: ``regions`` (stored with the read, as an :class:`Annotation`, in the
    same savepoint; see :func:`services.studies.annotations.record_annotation`), never a bare label, and a label
    study takes no drawing.

    The reader's account must still be active, and the case must be the one the server would serve this reader now
    (or, with ``revise``, one they already answered in the arm they may correct, see ``_revisable_arm``). A second
    first answer for the same case (double click, resubmitted form, another tab) stores nothing and returns
    ``duplicate``. Raises :class:`StudyError` for a refused answer.
    """
    comment = (comment or "").strip() or None

    def work(session: Session) -> ReadResult:
        moment = now or utcnow()
        user = session.get(User, reader_id)
        if user is None or not user.active:
            raise StudyError(
                "Your account has been deactivated, so this answer was not saved. Ask your study coordinator."
            )
        study = get_study(session, study_id)
        if study is None or _invitation(session, study_id, reader_id) is None:
            raise StudyError(NOT_ASSIGNED)
        if study.status != "open":
            raise StudyError("This study is closed; no more answers are taken.")
        arm = study.arm(arm_id)
        case = _arm_case(session, study_id, arm_id, token) if arm is not None else None
        if case is None:
            raise StudyError(_NO_CASE)
        if (study.question == "regions") != (regions is not None):
            raise StudyError(
                "This study asks you to draw the regions; use the drawing tools."
                if regions is None
                else "This study asks for a diagnosis, not a drawing."
            )
        _check_answer(study, label, rating, comment)
        versions = session.scalars(
            select(Read.version).where(Read.reader_id == reader_id, Read.arm_id == arm_id, Read.case_id == case.id)
        ).all()
        if revise:
            _check_revision(session, study, reader_id, arm_id, moment)
            if not versions:
                raise StudyError("You have not answered this case yet; answer it in order first.")
            version = max(versions) + 1
        else:
            if versions:
                return ReadResult("duplicate", max(versions), "This case was already answered; nothing was changed.")
            served = _next(session, study, reader_id, moment)
            if served.kind != "case" or served.case_id != case.id or served.arm.id != arm_id:
                if _latest_reads(session, reader_id, arm_id, case.id):  # answered meanwhile (PostgreSQL sees it now)
                    return ReadResult("duplicate", 1, "This case was already answered; nothing was changed.")
                raise StudyError("This is not the case you were shown; the page has been refreshed to your next case.")
            version = 1
        duration = None
        if shown_at is not None:
            started = shown_at if shown_at.tzinfo else shown_at.replace(tzinfo=moment.tzinfo)
            duration = max(0.0, (moment - started).total_seconds())
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
                if regions is not None:
                    session.add(
                        Annotation(
                            read_id=read.id, study_id=study_id, arm_id=arm_id, case_id=case.id, reader_id=reader_id,
                            version=version, layers=regions.as_json(),
                            height=regions.height, width=regions.width, empty=regions.empty,
                            started_from_ai=regions.started_from_ai, created_at=moment,
                        )
                    )  # fmt: skip
                    session.flush()
        except IntegrityError:
            if not revise:
                return ReadResult("duplicate", 1, "This case was already answered; nothing was changed.")
            raise
        if not study.frozen:
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

    return run_transaction(work)
