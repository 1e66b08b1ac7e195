"""Repository functions: the only place that knows the schema's queries.

Every function takes the session first and never commits; the caller's ``session_scope`` does, so a batch either
lands whole or not at all. Functions return plain values or small dataclasses, never ORM objects that outlive the
session, so pages can keep results in ``st.session_state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from db.audit import audit_table
from db.models import (
    MODALITIES,
    ROLES,
    SPLITS,
    Clip,
    ClipTriage,
    Label,
    ModelEvaluation,
    ModelRecord,
    Patient,
    Prediction,
    SignInAttempt,
    Specimen,
    SpecimenImage,
    Upload,
    User,
)
from db.session import reads

__all__ = [
    "TABLES",
    "Credentials",
    "ModelInfo",
    "UserInfo",
    "active_pi_ids",
    "add_evaluation",
    "add_inactive_reader",
    "add_prediction",
    "add_sign_in_attempt",
    "add_specimen",
    "add_specimen_image",
    "add_upload",
    "create_user",
    "find_credentials",
    "find_model",
    "get_user",
    "hash_password",
    "list_models",
    "list_users",
    "model_evaluations",
    "model_for",
    "prediction_view",
    "recent_predictions",
    "register_model",
    "rehash_password",
    "set_password",
    "set_user_active",
    "set_user_role",
    "sign_in_attempts",
    "specimen_images",
    "table",
    "verify_password",
]

_hasher = PasswordHasher()


@dataclass(frozen=True)
class UserInfo:
    id: int
    username: str
    display_name: str
    role: str
    active: bool = True
    must_change_password: bool = False
    credentials_changed_at: datetime | None = None  # sessions signed in before this moment end
    can_sign_in: bool = True  # False for imported or simulated readers (no password, ever)

    @classmethod
    def of(cls, user: User) -> UserInfo:
        return cls(
            id=user.id,
            username=user.username,
            display_name=user.display_name,
            role=user.role,
            active=user.active,
            must_change_password=user.must_change_password,
            credentials_changed_at=user.credentials_changed_at,
            can_sign_in=user.password_hash.startswith("$argon2"),
        )


@dataclass(frozen=True)
class Credentials:
    """An account (active or not) and its stored hash, read for a password check outside any write transaction."""

    user: UserInfo
    password_hash: str


@dataclass(frozen=True)
class ModelInfo:
    id: int
    name: str
    architecture: str
    task: str
    modality: str
    image_size: int
    checkpoint_path: str
    checkpoint_sha256: str
    threshold: float
    threshold_policy: str
    metrics: dict[str, Any]
    config: dict[str, Any]

    @classmethod
    def of(cls, row: ModelRecord) -> ModelInfo:
        return cls(
            id=row.id,
            name=row.name,
            architecture=row.architecture,
            task=row.task,
            modality=row.modality,
            image_size=row.image_size,
            checkpoint_path=row.checkpoint_path,
            checkpoint_sha256=row.checkpoint_sha256,
            threshold=row.threshold,
            threshold_policy=row.threshold_policy,
            metrics=dict(row.metrics or {}),
            config=dict(row.config or {}),
        )

    def summary(self) -> dict[str, Any]:
        """One flat row for tables and ``models --json``."""
        return {
            "id": self.id,
            "name": self.name,
            "task": self.task,
            "modality": self.modality,
            "architecture": self.architecture,
            "image_size": self.image_size,
            "threshold": self.threshold,
            "threshold_policy": self.threshold_policy,
            "val_auc": self.metrics.get("val_auc"),
            "test_auc": self.metrics.get("test_auc"),
            "checkpoint_sha256": self.checkpoint_sha256,
        }


def create_user(
    session: Session,
    username: str,
    password: str,
    role: str,
    display_name: str = "",
    *,
    must_change_password: bool = False,
) -> UserInfo:
    """Add an account; the password is stored only as an Argon2id hash. No password policy here (tests and the
    demo build use short passwords); people's accounts are added through ``services.accounts``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if not username or not password:
        raise ValueError("username and password must not be empty")
    user = User(
        username=username,
        display_name=display_name or username,
        role=role,
        password_hash=_hasher.hash(password),
        must_change_password=must_change_password,
    )
    session.add(user)
    session.flush()
    return UserInfo.of(user)


def add_inactive_reader(session: Session, username: str, display_name: str, why: str) -> int:
    """A reader account that can never sign in (no password hash, inactive): readers whose answers came from
    elsewhere (an imported CSV) or from a program (simulated reads). ``why`` is kept in place of the hash."""
    user = User(username=username, display_name=display_name, role="reader", password_hash=f"!{why}", active=False)
    session.add(user)
    session.flush()
    return user.id


_DUMMY_HASH = _hasher.hash("not-a-real-password")


def find_credentials(session: Session, username: str) -> Credentials | None:
    """The account named ``username`` (or, failing that, its lower-case spelling), active or not, with its hash."""
    names = [username] if username == username.lower() else [username, username.lower()]
    for name in names:
        user = session.scalar(select(User).where(User.username == name))
        if user is not None:
            return Credentials(UserInfo.of(user), user.password_hash)
    return None


def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches the Argon2 hash ``stored``. With no usable hash (unknown or imported account)
    a dummy hash is verified instead, so the answer takes the same time either way."""
    usable = stored is not None and stored.startswith("$argon2")
    try:
        _hasher.verify(stored if usable else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return False
    return usable


def rehash_password(session: Session, user_id: int, verified_hash: str, password: str) -> None:
    """Store a fresh hash of ``password`` when ``verified_hash`` (just verified) used older Argon2 parameters and is
    still the account's hash."""
    user = session.get(User, user_id)
    if user is not None and user.password_hash == verified_hash and _hasher.check_needs_rehash(verified_hash):
        user.password_hash = _hasher.hash(password)


def hash_password(password: str) -> str:
    """The Argon2id hash to store for ``password`` (slow on purpose: compute it outside a write transaction)."""
    return _hasher.hash(password)


def set_password(
    session: Session, user_id: int, password_hash: str, *, must_change: bool, changed_at: datetime
) -> None:
    """Replace the account's password by ``password_hash`` (from :func:`hash_password`); sessions signed in before
    ``changed_at`` end."""
    user = session.get(User, user_id)
    if user is None:
        raise ValueError(f"no account with id {user_id}")
    user.password_hash = password_hash
    user.must_change_password = must_change
    user.credentials_changed_at = changed_at


def set_user_active(session: Session, user_id: int, active: bool, *, changed_at: datetime | None) -> None:
    """Activate or deactivate the account; with ``changed_at``, its open sessions end."""
    user = session.get(User, user_id)
    if user is None:
        raise ValueError(f"no account with id {user_id}")
    user.active = active
    if changed_at is not None:
        user.credentials_changed_at = changed_at


def set_user_role(session: Session, user_id: int, role: str, *, changed_at: datetime) -> None:
    """Give the account another role; its open sessions end."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    user = session.get(User, user_id)
    if user is None:
        raise ValueError(f"no account with id {user_id}")
    user.role = role
    user.credentials_changed_at = changed_at


def active_pi_ids(session: Session) -> list[int]:
    """The active principal investigators' ids, rows locked until the transaction ends where the database can
    (PostgreSQL ``FOR UPDATE``; a SQLite write transaction already holds the whole database)."""
    stmt = select(User.id).where(User.role == "pi", User.active.is_(True)).order_by(User.id).with_for_update()
    return list(session.scalars(stmt))


def add_sign_in_attempt(session: Session, username: str, client: str, success: bool, at: datetime) -> None:
    """Record one sign-in attempt (``username`` as typed, lower-cased) for throttling."""
    session.add(SignInAttempt(at=at, username=username.lower()[:64], client=client[:64], success=success))


def sign_in_attempts(
    session: Session, *, since: datetime, username: str | None = None, client: str | None = None
) -> list[tuple[datetime, bool]]:
    """(moment, success) of the attempts for one typed username or from one client since ``since``, oldest first."""
    stmt = select(SignInAttempt.at, SignInAttempt.success).where(SignInAttempt.at >= since)
    if username is not None:
        stmt = stmt.where(SignInAttempt.username == username.lower()[:64])
    if client is not None:
        stmt = stmt.where(SignInAttempt.client == client[:64])
    return [(at, success) for at, success in session.execute(stmt.order_by(SignInAttempt.at, SignInAttempt.id))]


@reads
def list_users(session: Session) -> list[UserInfo]:
    """All accounts, by username."""
    return [UserInfo.of(u) for u in session.scalars(select(User).order_by(User.username))]


def add_specimen(
    session: Session,
    patient_code: str,
    specimen_code: str,
    *,
    split: str | None = None,
    tumor: bool | None = None,
    grade: str | None = None,
    ki67: str | None = None,
    diagnostic: bool | None = None,
    aspecific: bool | None = None,
    site: str | None = None,
) -> int:
    """Get or create the patient and the specimen (with its label row); returns the specimen id.

    Re-importing the same specimen updates its split, site and label instead of duplicating it.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    patient = session.scalar(select(Patient).where(Patient.code == patient_code))
    if patient is None:
        patient = Patient(code=patient_code)
        session.add(patient)
        session.flush()
    specimen = session.scalar(select(Specimen).where(Specimen.code == specimen_code))
    if specimen is None:
        specimen = Specimen(code=specimen_code, patient_id=patient.id, split=split, site=site)
        session.add(specimen)
        session.flush()
    elif specimen.patient_id != patient.id:
        raise ValueError(f"specimen {specimen_code} already belongs to another patient")
    else:
        specimen.split, specimen.site = split, site
    truth = {"tumor": tumor, "grade": grade, "ki67": ki67, "diagnostic": diagnostic, "aspecific": aspecific}
    label = session.scalar(select(Label).where(Label.specimen_id == specimen.id))
    if label is None:
        session.add(Label(specimen_id=specimen.id, **truth))
    else:
        for field, value in truth.items():
            setattr(label, field, value)
    return specimen.id


def add_specimen_image(
    session: Session,
    specimen_id: int,
    modality: str,
    path: str,
    sha256: str,
    height: int,
    width: int,
    mask_path: str | None = None,
    *,
    clip_id: int | None = None,
    frame: int | None = None,
) -> int:
    """Attach (or replace) the specimen's image in one modality; returns the image id. A CLE frame decoded from a
    stored clip names it (``clip_id``) and its 0-based ``frame`` index."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    image = session.scalar(
        select(SpecimenImage).where(SpecimenImage.specimen_id == specimen_id, SpecimenImage.modality == modality)
    )
    if image is None:
        image = SpecimenImage(specimen_id=specimen_id, modality=modality)
        session.add(image)
    image.path, image.sha256, image.height, image.width, image.mask_path = path, sha256, height, width, mask_path
    image.clip_id, image.frame = clip_id, frame
    session.flush()
    return image.id


@reads
def specimen_images(session: Session, modality: str, splits: tuple[str, ...] = SPLITS) -> pd.DataFrame:
    """Images of one modality with their specimen, patient, split, mask (if any) and labels (one row per image)."""
    stmt = (
        select(
            SpecimenImage.id.label("image_id"),
            Specimen.code.label("specimen"),
            Patient.code.label("patient"),
            Specimen.split,
            SpecimenImage.path,
            SpecimenImage.mask_path,
            Label.tumor,
            Label.grade,
            Label.ki67,
        )
        .join(Specimen, SpecimenImage.specimen_id == Specimen.id)
        .join(Patient, Specimen.patient_id == Patient.id)
        .outerjoin(Label, Label.specimen_id == Specimen.id)
        .where(SpecimenImage.modality == modality, Specimen.split.in_(splits))
        .order_by(Specimen.code)
    )
    return pd.DataFrame(session.execute(stmt).mappings().all())


def register_model(
    session: Session,
    *,
    name: str,
    architecture: str,
    task: str,
    modality: str,
    image_size: int,
    checkpoint_path: str,
    checkpoint_sha256: str,
    threshold: float,
    threshold_policy: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
) -> ModelInfo:
    """Register a trained checkpoint under a unique name."""
    if session.scalar(select(ModelRecord.id).where(ModelRecord.name == name)) is not None:
        raise ValueError(f"a model named {name!r} is already registered; choose another --name")
    row = ModelRecord(
        name=name,
        architecture=architecture,
        task=task,
        modality=modality,
        image_size=image_size,
        checkpoint_path=checkpoint_path,
        checkpoint_sha256=checkpoint_sha256,
        threshold=float(threshold),
        threshold_policy=threshold_policy,
        metrics=metrics,
        config=config,
    )
    session.add(row)
    session.flush()
    return ModelInfo.of(row)


@reads
def list_models(session: Session, task: str | None = None, modality: str | None = None) -> list[ModelInfo]:
    """Registered models, newest first, optionally filtered."""
    stmt = select(ModelRecord).order_by(ModelRecord.created_at.desc(), ModelRecord.id.desc())
    if task:
        stmt = stmt.where(ModelRecord.task == task)
    if modality:
        stmt = stmt.where(ModelRecord.modality == modality)
    return [ModelInfo.of(row) for row in session.scalars(stmt)]


@reads
def find_model(session: Session, name_or_id: str | int) -> ModelInfo | None:
    """A model by its name or numeric id."""
    row = session.scalar(select(ModelRecord).where(ModelRecord.name == str(name_or_id)))
    if row is None and str(name_or_id).isdigit():
        row = session.get(ModelRecord, int(name_or_id))
    return ModelInfo.of(row) if row else None


@reads
def model_for(session: Session, task: str, modality: str) -> ModelInfo | None:
    """The default model for a task and modality: the newest registered one."""
    models = list_models(session, task=task, modality=modality)
    return models[0] if models else None


def add_evaluation(
    session: Session, model_id: int, *, title: str, dataset: dict[str, Any], report: dict[str, Any]
) -> int:
    """Store an evaluation with a registered model; returns its id."""
    if session.get(ModelRecord, model_id) is None:
        raise ValueError(f"no model with id {model_id}")
    row = ModelEvaluation(model_id=model_id, title=title, dataset=dataset, report=report)
    session.add(row)
    session.flush()
    return row.id


@reads
def model_evaluations(session: Session, model_id: int) -> list[dict[str, Any]]:
    """A model's stored evaluations, newest first: id, title, created_at, dataset, report."""
    rows = session.scalars(
        select(ModelEvaluation)
        .where(ModelEvaluation.model_id == model_id)
        .order_by(ModelEvaluation.created_at.desc(), ModelEvaluation.id.desc())
    )
    return [
        {"id": r.id, "title": r.title, "created_at": r.created_at, "dataset": dict(r.dataset), "report": dict(r.report)}
        for r in rows
    ]


def add_upload(
    session: Session,
    *,
    user_id: int | None,
    original_name: str,
    modality: str,
    path: str,
    sha256: str,
    height: int,
    width: int,
) -> int:
    """Record an upload (who, when, original name, stored path, sha256); returns its id."""
    row = Upload(
        user_id=user_id,
        original_name=original_name[:255],
        modality=modality,
        path=path,
        sha256=sha256,
        height=height,
        width=width,
    )
    session.add(row)
    session.flush()
    return row.id


def add_prediction(
    session: Session,
    *,
    model_id: int,
    probability: float,
    threshold: float,
    upload_id: int | None = None,
    image_id: int | None = None,
    heatmap_method: str | None = None,
    heatmap_path: str | None = None,
    device: str | None = None,
    seconds: float | None = None,
) -> int:
    """Record a model output on exactly one upload or specimen image; returns its id."""
    if (upload_id is None) == (image_id is None):
        raise ValueError("a prediction belongs to exactly one upload or specimen image")
    row = Prediction(
        model_id=model_id,
        upload_id=upload_id,
        image_id=image_id,
        probability=float(probability),
        threshold=float(threshold),
        decision=bool(probability >= threshold),
        heatmap_method=heatmap_method,
        heatmap_path=heatmap_path,
        device=device,
        seconds=seconds,
    )
    session.add(row)
    session.flush()
    return row.id


@reads
def prediction_view(session: Session, prediction_id: int) -> dict[str, Any] | None:
    """Everything needed to show one stored prediction again: image, heatmap, model, decision, who and when."""
    prediction = session.get(Prediction, prediction_id)
    if prediction is None:
        return None
    model = prediction.model
    if prediction.upload is not None:
        name, path, user_id = prediction.upload.original_name, prediction.upload.path, prediction.upload.user_id
    else:
        image = prediction.image
        name, path, user_id = f"{image.specimen.code} ({image.modality})", image.path, None
    return {
        "id": prediction.id,
        "name": name,
        "image_path": path,
        "user_id": user_id,
        "modality": model.modality,
        "model": model.name,
        "model_id": model.id,
        "task": model.task,
        "probability": prediction.probability,
        "threshold": prediction.threshold,
        "decision": prediction.decision,
        "heatmap_method": prediction.heatmap_method,
        "heatmap_path": prediction.heatmap_path,
        "mosaic": (prediction.heatmap_path or "").startswith("mosaics/"),  # stitched over a whole mosaic
        "device": prediction.device,
        "seconds": prediction.seconds,
        "created_at": prediction.created_at,
    }


@reads
def recent_predictions(session: Session, user_id: int | None = None, limit: int = 50) -> pd.DataFrame:
    """The newest predictions on uploads, optionally only one user's."""
    stmt = (
        select(
            Prediction.id,
            Prediction.created_at,
            Upload.original_name.label("image"),
            ModelRecord.name.label("model"),
            Prediction.probability,
            Prediction.decision,
        )
        .join(Upload, Prediction.upload_id == Upload.id)
        .join(ModelRecord, Prediction.model_id == ModelRecord.id)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(limit)
    )
    if user_id is not None:
        stmt = stmt.where(Upload.user_id == user_id)
    return pd.DataFrame(session.execute(stmt).mappings().all())


def get_user(session: Session, user_id: int, *, active_only: bool = True) -> UserInfo | None:
    """The (active) account with this id, read fresh from the database (roles are never taken from the client)."""
    user = session.get(User, user_id)
    if user is None or (active_only and not user.active):
        return None
    return UserInfo.of(user)


def _patients(session: Session) -> pd.DataFrame:
    n_specimens = func.count(Specimen.id)
    stmt = (
        select(Patient.id, Patient.code.label("patient"), n_specimens.label("specimens"), Patient.created_at)
        .outerjoin(Specimen, Specimen.patient_id == Patient.id)
        .group_by(Patient.id)
        .order_by(Patient.code)
    )
    return pd.DataFrame(session.execute(stmt).mappings().all())


def _specimens(session: Session) -> pd.DataFrame:
    fl, wl = aliased(SpecimenImage), aliased(SpecimenImage)
    stmt = (
        select(
            Specimen.id,
            Specimen.code.label("specimen"),
            Patient.code.label("patient"),
            Specimen.site,
            Specimen.split,
            Label.tumor,
            Label.grade,
            Label.ki67,
            Label.diagnostic,
            Label.aspecific,
            fl.sha256.label("fl_sha256"),
            wl.sha256.label("wl_sha256"),
        )
        .join(Patient, Specimen.patient_id == Patient.id)
        .outerjoin(Label, Label.specimen_id == Specimen.id)
        .outerjoin(fl, (fl.specimen_id == Specimen.id) & (fl.modality == "FL"))
        .outerjoin(wl, (wl.specimen_id == Specimen.id) & (wl.modality == "WL"))
        .order_by(Specimen.code)
    )
    table = pd.DataFrame(session.execute(stmt).mappings().all())
    if table.empty:
        return table
    images: dict[int, list[str]] = {}
    for specimen_id, modality, clip_id, frame in session.execute(
        select(SpecimenImage.specimen_id, SpecimenImage.modality, SpecimenImage.clip_id, SpecimenImage.frame)
        .order_by(SpecimenImage.specimen_id, SpecimenImage.modality)
    ):  # fmt: skip
        where = f" (clip #{clip_id} frame {frame})" if clip_id is not None else ""
        images.setdefault(specimen_id, []).append(modality + where)
    table.insert(4, "images", [", ".join(images.get(int(i), [])) for i in table["id"]])
    return table


def _models(session: Session) -> pd.DataFrame:
    return pd.DataFrame([m.summary() for m in list_models(session)])


def _uploads(session: Session) -> pd.DataFrame:
    stmt = (
        select(
            Upload.id,
            Upload.created_at,
            User.username.label("user"),
            Upload.original_name,
            Upload.modality,
            Upload.width,
            Upload.height,
            Upload.sha256,
        )
        .outerjoin(User, Upload.user_id == User.id)
        .order_by(Upload.created_at.desc(), Upload.id.desc())
    )
    return pd.DataFrame(session.execute(stmt).mappings().all())


def _clips(session: Session) -> pd.DataFrame:
    """Each triage of an uploaded clip: the clip, the model, and how many of its frames were diagnostic."""
    stmt = (
        select(
            ClipTriage.id,
            ClipTriage.created_at,
            User.username.label("user"),
            Clip.original_name.label("clip"),
            Clip.kind,
            ClipTriage.n_frames.label("frames"),
            Clip.fps,
            ModelRecord.name.label("model"),
            ClipTriage.n_positive.label("diagnostic_frames"),
            ClipTriage.max_probability,
            ClipTriage.threshold,
            Clip.sha256,
        )
        .join(Clip, ClipTriage.clip_id == Clip.id)
        .join(ModelRecord, ClipTriage.model_id == ModelRecord.id)
        .outerjoin(User, ClipTriage.user_id == User.id)
        .order_by(ClipTriage.created_at.desc(), ClipTriage.id.desc())
    )
    return pd.DataFrame(session.execute(stmt).mappings().all())


def _predictions(session: Session) -> pd.DataFrame:
    stmt = (
        select(
            Prediction.id,
            Prediction.created_at,
            ModelRecord.name.label("model"),
            ModelRecord.task,
            func.coalesce(Upload.original_name, Specimen.code).label("image"),
            Upload.id.label("upload_id"),
            Specimen.code.label("specimen"),
            Prediction.probability,
            Prediction.threshold,
            Prediction.decision,
            Prediction.heatmap_method,
            Prediction.device,
            Prediction.seconds,
        )
        .join(ModelRecord, Prediction.model_id == ModelRecord.id)
        .outerjoin(Upload, Prediction.upload_id == Upload.id)
        .outerjoin(SpecimenImage, Prediction.image_id == SpecimenImage.id)
        .outerjoin(Specimen, SpecimenImage.specimen_id == Specimen.id)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
    )
    frame = pd.DataFrame(session.execute(stmt).mappings().all())
    if "upload_id" in frame:  # NULL for predictions on specimen images: keep the ids integers, not 5.0
        frame["upload_id"] = frame["upload_id"].astype("Int64")
    return frame


TABLES = {
    "patients": _patients,
    "specimens": _specimens,
    "models": _models,
    "uploads": _uploads,
    "predictions": _predictions,
    "clips": _clips,
    "audit": audit_table,
}


@reads
def table(session: Session, name: str) -> pd.DataFrame:
    """One of the browsable tables (``TABLES``) as a DataFrame."""
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; expected one of {', '.join(TABLES)}")
    return TABLES[name](session)
