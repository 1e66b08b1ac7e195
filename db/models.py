"""The study database: SQLAlchemy 2.0 typed ORM models.

A *specimen* is a physical tissue piece of a patient, with one pathology label row and one image per modality
(``FL``, ``WL``, ``CLE``, ``RCM``). Image files are stored content-addressed (sha256 of the metadata-free
re-encoding) under the workspace; rows keep the path relative to the workspace so a workspace can move.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, DateTime, Float, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "MODALITIES",
    "ROLES",
    "SPLITS",
    "Base",
    "Label",
    "ModelRecord",
    "Patient",
    "Prediction",
    "Specimen",
    "SpecimenImage",
    "Upload",
    "User",
    "utcnow",
]

ROLES = ("pi", "clinician", "reader")
MODALITIES = ("FL", "WL", "CLE", "RCM")
SPLITS = ("train", "val", "test")


def utcnow() -> datetime:
    """Timezone-aware now, the one clock every row uses."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


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
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    specimen: Mapped[Specimen] = relationship(back_populates="images")


class Label(Base):
    """Pathology ground truth of a specimen; each field may be unknown (NULL)."""

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
