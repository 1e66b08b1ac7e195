"""The study database: SQLAlchemy 2.0 typed ORM models.

A *specimen* is a physical tissue piece of a patient, with one pathology label row and one image per modality
(``FL``, ``WL``, ``CLE``, ``RCM``). Image files are stored content-addressed (sha256 of the metadata-free
re-encoding) under the workspace; rows keep the path relative to the workspace so a workspace can move.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "MODALITIES",
    "RATING_SCALES",
    "ROLES",
    "SPLITS",
    "STUDY_STATUSES",
    "JOB_STATES",
    "STUDY_QUESTIONS",
    "Annotation",
    "ArmCase",
    "AuditEvent",
    "Base",
    "Job",
    "Label",
    "ModelEvaluation",
    "ModelRecord",
    "Patient",
    "Prediction",
    "Read",
    "SignInAttempt",
    "Specimen",
    "SpecimenImage",
    "Study",
    "StudyArm",
    "StudyCase",
    "StudyReader",
    "Upload",
    "User",
    "UtcDateTime",
    "utcnow",
]

ROLES = ("pi", "clinician", "reader")
MODALITIES = ("FL", "WL", "CLE", "RCM")
SPLITS = ("train", "val", "test")
RATING_SCALES = ("five", "hundred")  # 1-5 confidence, or 0-100
STUDY_STATUSES = ("open", "closed")
STUDY_QUESTIONS = ("label", "regions")  # answer a label, or draw the regions that carry the diagnosis
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


def utcnow() -> datetime:
    """Timezone-aware now, the one clock every row uses."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A moment, stored in UTC and read back timezone-aware in UTC on every backend.

    SQLite has no time zones: SQLAlchemy would store an aware time's wall clock and drop its offset (10:00+02:00
    would read back as 10:00, two hours off). Here it is converted to UTC first; a naive time is taken as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UtcDateTime()}


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(f"role IN {ROLES}", name="ck_users_role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the next sign-in must set a new password first (reset by an administrator, published demo passwords)
    must_change_password: Mapped[bool] = mapped_column(default=False, server_default=false())
    # sessions signed in before this moment end (password changed or reset, role changed, deactivated)
    credentials_changed_at: Mapped[datetime | None]


class SignInAttempt(Base):
    """One sign-in attempt, kept for throttling (per account and per client) whether or not the name exists."""

    __tablename__ = "sign_in_attempts"
    __table_args__ = (
        Index("ix_sign_in_attempts_username_at", "username", "at"),
        Index("ix_sign_in_attempts_client_at", "client", "at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    username: Mapped[str] = mapped_column(String(64))  # as typed (lower-cased), known or not
    client: Mapped[str] = mapped_column(String(64))  # the client address as the server saw it
    success: Mapped[bool]


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    specimens: Mapped[list[Specimen]] = relationship(back_populates="patient")


class Specimen(Base):
    __tablename__ = "specimens"
    __table_args__ = (CheckConstraint(f"split IS NULL OR split IN {SPLITS}", name="ck_specimens_split"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="RESTRICT"), index=True)
    split: Mapped[str | None] = mapped_column(String(8))
    site: Mapped[str | None] = mapped_column(String(64))  # the biopsy site within the patient (CLE), if known
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="specimens")
    images: Mapped[list[SpecimenImage]] = relationship(back_populates="specimen")
    label: Mapped[Label | None] = relationship(back_populates="specimen")


class SpecimenImage(Base):
    """One stored image of a specimen in one modality."""

    __tablename__ = "specimen_images"
    __table_args__ = (
        UniqueConstraint("specimen_id", "modality", name="uq_specimen_images_specimen_modality"),
        CheckConstraint(f"modality IN {MODALITIES}", name="ck_specimen_images_modality"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    specimen_id: Mapped[int] = mapped_column(ForeignKey("specimens.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    height: Mapped[int]
    width: Mapped[int]
    mask_path: Mapped[str | None] = mapped_column(String(512))
    # a CLE frame imported from a clip: the clip it was decoded from and its 0-based frame index there
    clip_id: Mapped[int | None] = mapped_column(ForeignKey("clips.id", ondelete="SET NULL"), index=True)
    frame: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    specimen: Mapped[Specimen] = relationship(back_populates="images")


class Label(Base):
    """Ground truth of a specimen; each field may be unknown (NULL). ``tumor``, ``grade`` and ``ki67`` come from
    pathology; ``diagnostic`` is a CLE frame's (does it show diagnostic tissue features, seed 000) and ``aspecific`` an
    RCM mosaic's (does it hold an aspecific region, seed 002)."""

    __tablename__ = "labels"
    __table_args__ = (
        CheckConstraint("grade IS NULL OR grade IN ('DLGG', 'GBM')", name="ck_labels_grade"),
        CheckConstraint("ki67 IS NULL OR ki67 IN ('<10', '>=10')", name="ck_labels_ki67"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    specimen_id: Mapped[int] = mapped_column(ForeignKey("specimens.id", ondelete="CASCADE"), unique=True)
    tumor: Mapped[bool | None]
    grade: Mapped[str | None] = mapped_column(String(8))
    ki67: Mapped[str | None] = mapped_column(String(8))
    diagnostic: Mapped[bool | None]
    aspecific: Mapped[bool | None]
    source: Mapped[str] = mapped_column(String(64), default="pathology")

    specimen: Mapped[Specimen] = relationship(back_populates="label")


class ModelRecord(Base):
    """A registered, trained model: what it does, where its weights are, and how it decides."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    architecture: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str] = mapped_column(String(8))
    image_size: Mapped[int]
    checkpoint_path: Mapped[str] = mapped_column(String(512))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    threshold_policy: Mapped[str] = mapped_column(String(32))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelEvaluation(Base):
    """An evaluation stored with a model: what it was scored on (``dataset``) and the report, e.g. a localisation
    table whose rows compare the model's maps, its ablations and baselines against ground-truth masks."""

    __tablename__ = "model_evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    dataset: Mapped[dict[str, Any]] = mapped_column(default=dict)
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Upload(Base):
    """An image a user uploaded for an on-demand diagnosis."""

    __tablename__ = "uploads"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    original_name: Mapped[str] = mapped_column(String(255))
    modality: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    height: Mapped[int]
    width: Mapped[int]

    user: Mapped[User | None] = relationship()


class Prediction(Base):
    """One model output on one image: a specimen image or an upload, never both."""

    __tablename__ = "predictions"
    __table_args__ = (
        CheckConstraint("(image_id IS NULL) <> (upload_id IS NULL)", name="ck_predictions_exactly_one_target"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("specimen_images.id", ondelete="CASCADE"), index=True)
    upload_id: Mapped[int | None] = mapped_column(ForeignKey("uploads.id", ondelete="CASCADE"), index=True)
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    decision: Mapped[bool]
    heatmap_method: Mapped[str | None] = mapped_column(String(32))
    heatmap_path: Mapped[str | None] = mapped_column(String(512))
    device: Mapped[str | None] = mapped_column(String(16))
    seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[ModelRecord] = relationship()
    upload: Mapped[Upload | None] = relationship()
    image: Mapped[SpecimenImage | None] = relationship()


class Clip(Base):
    """A clip a user uploaded (CLE frames: a multi-page TIFF, a video, or a zip of frames), kept as uploaded."""

    __tablename__ = "clips"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    original_name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(8))  # tiff | video | frames
    modality: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    n_frames: Mapped[int]
    fps: Mapped[float | None] = mapped_column(Float)
    height: Mapped[int]
    width: Mapped[int]

    user: Mapped[User | None] = relationship()


class ClipTriage(Base):
    """One model's triage of a clip: a probability per frame (a .npy file in the workspace), how many frames were
    diagnostic at the model's threshold, and the top frames (``top``: index, probability, frame PNG, heatmap .npy)."""

    __tablename__ = "clip_triages"

    id: Mapped[int] = mapped_column(primary_key=True)
    clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    threshold: Mapped[float] = mapped_column(Float)
    n_frames: Mapped[int]
    n_positive: Mapped[int]
    max_probability: Mapped[float] = mapped_column(Float)
    probabilities_path: Mapped[str] = mapped_column(String(512))
    heatmap_method: Mapped[str | None] = mapped_column(String(32))
    top: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    device: Mapped[str | None] = mapped_column(String(16))
    seconds: Mapped[float | None] = mapped_column(Float)

    clip: Mapped[Clip] = relationship()
    model: Mapped[ModelRecord] = relationship()


class Study(Base):
    """A blind reader study: cases read by invited readers in one or more arms, frozen once the first read exists."""

    __tablename__ = "studies"
    __table_args__ = (
        CheckConstraint(f"rating_scale IN {RATING_SCALES}", name="ck_studies_rating_scale"),
        CheckConstraint(f"status IN {STUDY_STATUSES}", name="ck_studies_status"),
        CheckConstraint(f"question IN {STUDY_QUESTIONS}", name="ck_studies_question"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    task: Mapped[str] = mapped_column(String(16))
    rating_scale: Mapped[str] = mapped_column(String(8), default="five")
    allow_revisions: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(8), default="open")
    simulated: Mapped[bool] = mapped_column(default=False)  # reads generated by a program, never by people
    question: Mapped[str] = mapped_column(String(8), default="label", server_default="label")
    layers: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["region"])  # what readers draw (regions)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    frozen_at: Mapped[datetime | None]  # the first read; cases and arms cannot change after it
    closed_at: Mapped[datetime | None]

    arms: Mapped[list[StudyArm]] = relationship(order_by="StudyArm.position", back_populates="study")


class StudyArm(Base):
    """What a reader sees in one reading condition: a modality, and optionally the AI's output from one model."""

    __tablename__ = "study_arms"
    __table_args__ = (
        UniqueConstraint("study_id", "position", name="uq_study_arms_position"),
        UniqueConstraint("study_id", "name", name="uq_study_arms_name"),
        CheckConstraint(f"modality IN {MODALITIES}", name="ck_study_arms_modality"),
        CheckConstraint("washout_days >= 0", name="ck_study_arms_washout"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    position: Mapped[int]
    name: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(8))
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"))
    show_probability: Mapped[bool] = mapped_column(default=False)
    show_decision: Mapped[bool] = mapped_column(default=False)
    heatmap_method: Mapped[str | None] = mapped_column(String(32))
    washout_days: Mapped[int] = mapped_column(default=0)  # days since the reader finished the previous arm
    # an AI-aided annotation arm: the model's heatmap at this level is the reader's editable start
    start_threshold: Mapped[float | None] = mapped_column(Float)

    study: Mapped[Study] = relationship(back_populates="arms")


class StudyCase(Base):
    """A specimen in a study. Readers' browsers never see its id: in each arm a case has its own random token
    (:class:`ArmCase`), so nothing a reader is sent links the same specimen across arms."""

    __tablename__ = "study_cases"
    __table_args__ = (UniqueConstraint("study_id", "specimen_id", name="uq_study_cases_specimen"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    specimen_id: Mapped[int] = mapped_column(ForeignKey("specimens.id", ondelete="RESTRICT"))
    position: Mapped[int]
    training: Mapped[bool] = mapped_column(default=False)  # shown with its truth before reading starts


class ArmCase(Base):
    """A study case as one arm addresses it: the opaque ``token`` a reader's browser gets for it in that arm."""

    __tablename__ = "study_arm_cases"
    __table_args__ = (UniqueConstraint("arm_id", "case_id", name="uq_study_arm_cases_arm_case"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    arm_id: Mapped[int] = mapped_column(ForeignKey("study_arms.id", ondelete="CASCADE"), index=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("study_cases.id", ondelete="CASCADE"), index=True)
    token: Mapped[str] = mapped_column(String(32), unique=True)


class StudyReader(Base):
    __tablename__ = "study_readers"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), primary_key=True)
    invited_at: Mapped[datetime] = mapped_column(default=utcnow)


class Read(Base):
    """One answer of one reader on one case in one arm. A correction is a new row with the next ``version``;
    no row is ever updated or deleted, so the answer history is the table itself."""

    __tablename__ = "reads"
    __table_args__ = (
        UniqueConstraint("arm_id", "case_id", "reader_id", "version", name="uq_reads_version"),
        Index("ix_reads_reader_arm", "reader_id", "arm_id", "case_id"),  # covers a reader's answered cases
        CheckConstraint("version >= 1", name="ck_reads_version"),
        CheckConstraint("label IN (0, 1)", name="ck_reads_label"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="RESTRICT"), index=True)
    arm_id: Mapped[int] = mapped_column(ForeignKey("study_arms.id", ondelete="RESTRICT"))
    case_id: Mapped[int] = mapped_column(ForeignKey("study_cases.id", ondelete="RESTRICT"))
    reader_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    version: Mapped[int] = mapped_column(default=1)
    label: Mapped[int]
    rating: Mapped[int | None]
    comment: Mapped[str | None] = mapped_column(Text)
    shown_at: Mapped[datetime | None]
    answered_at: Mapped[datetime] = mapped_column(default=utcnow)
    duration_s: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(16), default="browser")  # browser | import | simulated
    row_hash: Mapped[str] = mapped_column(String(64))  # the hash chain (db.chain), set on insert


class Annotation(Base):
    """The regions one reader drew on one case in one arm of a ``regions`` study: the masks of the read they answer
    (``read_id``; the read's label is 1 when any region was drawn). ``layers`` maps each layer the study asks for
    to its mask, a 0/255 PNG at the case image's size under ``annotations/`` (content-addressed), and its area in
    pixels. ``empty`` is the reader's explicit "no region". Append-only and hash-chained like the reads."""

    __tablename__ = "annotations"
    __table_args__ = (Index("ix_annotations_study_arm", "study_id", "arm_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    read_id: Mapped[int] = mapped_column(ForeignKey("reads.id", ondelete="RESTRICT"), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="RESTRICT"))
    arm_id: Mapped[int] = mapped_column(ForeignKey("study_arms.id", ondelete="RESTRICT"))
    case_id: Mapped[int] = mapped_column(ForeignKey("study_cases.id", ondelete="RESTRICT"))
    reader_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    version: Mapped[int]
    layers: Mapped[dict[str, Any]] = mapped_column(JSON)
    height: Mapped[int]
    width: Mapped[int]
    empty: Mapped[bool]
    started_from_ai: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    row_hash: Mapped[str] = mapped_column(String(64))  # the hash chain (db.chain), set on insert


class AuditEvent(Base):
    """Who did what, when: sign-ins, study changes, case views, reads, exports and imports. Append-only."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    username: Mapped[str | None] = mapped_column(String(64))  # as typed, for failed sign-ins
    action: Mapped[str] = mapped_column(String(32), index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    row_hash: Mapped[str] = mapped_column(String(64))  # the hash chain (db.chain), set on insert


class Job(Base):
    """Long work run on the cluster (``services.jobs``): what, for whom, how far, where, and what it produced.

    ``params`` are the submitted parameters (JSON); ``result`` names what the job stored (model, prediction,
    evaluation, ...). ``progress`` is a fraction in [0, 1] with a one-line ``message``; ``log_tail`` keeps the end
    of the job's output. Every state change is audited (``job_<state>``)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"state IN {JOB_STATES}", name="ck_jobs_state"),
        Index("ix_jobs_state_id", "state", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    title: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    log_tail: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    submitted_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    retry_of: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    device: Mapped[str | None] = mapped_column(String(80))
    host: Mapped[str | None] = mapped_column(String(200))
    worker_pid: Mapped[int | None]
