"""Clips: an uploaded CLE clip triaged by a model, stored, and shown again (issue 15).

:func:`triage_and_store` keeps the clip file by content (``clips/<sha>/clip<suffix>``), triages it as a stream
(:func:`core.triage.triage_clip`), writes its files (per-frame probabilities as .npy, each top frame as PNG with its
heatmap as .npy), then its rows in ONE write transaction: the ``clips`` row, the ``clip_triages`` row and their audit
entry, with the job guard (:func:`services.jobs.context.claim`) inside, so a cancelled job stores no row and a clip
that is refused (:class:`core.data.clips.ClipError`) stores nothing at all. Files are written under content-derived
names, so a retried triage writes the same files again.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data.clips import ClipError, ClipLimits, open_clip
from core.data.io import Image
from core.data.preprocess import display_image
from core.data.store import npy_bytes, png_bytes, write_atomic
from core.heatmaps.render import to_uint8
from core.predict import Predictor
from core.settings import workspace_dir
from core.triage import Triage, frames_csv, triage_clip
from db.audit import log_event
from db.models import Clip, ClipTriage, ModelRecord, User
from db.repo import ModelInfo
from db.session import reads, run_transaction
from services.jobs.context import claim

__all__ = [
    "LiveSource",
    "StoredTriage",
    "clip_folder",
    "clip_frame",
    "live_source",
    "keep_clip",
    "keep_clip_file",
    "recent_triages",
    "triage_and_store",
    "triage_csv",
    "triage_probabilities",
    "top_frames_zip",
    "triage_view",
]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredTriage:
    """What :func:`triage_and_store` wrote: the rows' ids and the triage itself (top frames included)."""

    clip_id: int
    triage_id: int
    triage: Triage


@dataclass(frozen=True)
class LiveSource:
    """What the live view of a stored triage plays: the kept clip file, the name people see, its stated rate, and
    the triage's model."""

    triage_id: int
    path: Path
    name: str
    fps: float | None
    model: ModelInfo


def clip_folder(sha256: str) -> str:
    """The workspace-relative folder of a clip's files (the clip, its triages' probabilities and top frames)."""
    return f"clips/{sha256[:2]}/{sha256}"


def keep_clip_file(source: Path, suffix: str) -> tuple[str, str]:
    """Copy ``source`` into the workspace by content (streamed: hashed while copied); (relative path, sha256)."""
    root = workspace_dir()
    incoming = root / "clips" / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=incoming, delete=False) as out, source.open("rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    temp = Path(out.name)
    sha256 = digest.hexdigest()
    relative = f"{clip_folder(sha256)}/clip{suffix}"
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        temp.unlink()
    else:
        temp.replace(target)
    return relative, sha256


def keep_clip(source: Path, name: str, kind: str) -> tuple[str, str]:
    """Keep a clip file (or a folder of frames, zipped) in the workspace by content; (relative path, sha256).
    ``name`` and ``kind`` (:class:`core.data.clips.ClipInfo`) choose the kept file's suffix."""
    if source.is_dir():
        archive = Path(tempfile.mkdtemp(prefix="ioai-clip-")) / "frames"
        try:
            return keep_clip_file(Path(shutil.make_archive(str(archive), "zip", source)), ".zip")
        finally:
            shutil.rmtree(archive.parent, ignore_errors=True)
    return keep_clip_file(source, _suffix(name, kind))


def _suffix(name: str, kind: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in (".tif", ".tiff", ".mp4", ".avi", ".mov", ".mkv", ".webm", ".zip"):
        return suffix
    return {"tiff": ".tif", "video": ".mp4", "frames": ".zip"}.get(kind, ".bin")


def _frame_png(frame: np.ndarray, name: str) -> bytes:
    shown = display_image(Image(np.ascontiguousarray(frame), name=name, format="NPY"), "CLE")
    return png_bytes(to_uint8(shown))


def triage_and_store(
    predictor: Predictor,
    model: ModelInfo,
    source: str | Path,
    *,
    name: str | None = None,
    user_id: int | None = None,
    batch_size: int = 8,
    top_k: int = 5,
    heatmap: str | None = "default",
    limits: ClipLimits | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> StoredTriage:
    """Triage the clip at ``source`` (a file, or a folder of frames) with ``model`` and store it; ``name`` is what
    people see (default: the file's name). :class:`core.data.clips.ClipError` says why a clip is refused; nothing is
    stored then. Audit: ``clip_triaged``."""
    source = Path(source)
    shown_name = name or source.name
    with open_clip(source, shown_name, limits=limits or ClipLimits()) as clip:
        info = clip.info
        triage = triage_clip(predictor, clip, batch_size=batch_size, top_k=top_k, heatmap=heatmap, progress=progress)
    if triage.n_frames == 0:
        raise ClipError(shown_name, "the clip holds no frames; export it again")
    clip_path, sha256 = keep_clip(source, shown_name, info.kind)
    root = workspace_dir()
    folder = clip_folder(sha256)
    tag = f"{model.checkpoint_sha256[:16]}"
    probabilities_path = f"{folder}/{tag}-probabilities.npy"
    write_atomic(root / probabilities_path, npy_bytes(triage.probabilities.astype(np.float32)))
    top: list[dict[str, Any]] = []
    for frame in triage.top:
        image_path = f"{folder}/frame-{frame.index:06d}.png"
        write_atomic(root / image_path, _frame_png(frame.frame, f"{shown_name} frame {frame.index}"))
        map_path = None
        if frame.heatmap is not None:
            map_path = f"{folder}/frame-{frame.index:06d}-{tag}-{triage.method}.npy"
            write_atomic(root / map_path, npy_bytes(frame.heatmap.astype(np.float32)))
        top.append(
            {"frame": frame.index, "probability": frame.probability, "image_path": image_path, "heatmap_path": map_path}
        )

    def work(session: Session) -> tuple[int, int]:
        row = Clip(
            user_id=user_id,
            original_name=shown_name[:255],
            kind=info.kind,
            modality=model.modality,
            path=clip_path,
            sha256=sha256,
            n_frames=triage.n_frames,
            fps=triage.fps,
            height=info.height,
            width=info.width,
        )
        session.add(row)
        session.flush()
        stored = ClipTriage(
            clip_id=row.id,
            model_id=model.id,
            user_id=user_id,
            threshold=triage.threshold,
            n_frames=triage.n_frames,
            n_positive=triage.n_positive,
            max_probability=float(triage.probabilities.max()),
            probabilities_path=probabilities_path,
            heatmap_method=triage.method,
            top=top,
            device=triage.device,
            seconds=triage.seconds,
        )
        session.add(stored)
        session.flush()
        claim(session, clips=[row.id], triages=[stored.id])
        log_event(
            session,
            "clip_triaged",
            user_id=user_id,
            clip=row.id,
            triage=stored.id,
            model=model.name,
            clip_sha256=sha256,
            frames=triage.n_frames,
            diagnostic=triage.n_positive,
        )
        return row.id, stored.id

    clip_id, triage_id = run_transaction(work)
    return StoredTriage(clip_id=clip_id, triage_id=triage_id, triage=triage)


@reads
def triage_view(session: Session, triage_id: int) -> dict[str, Any] | None:
    """Everything needed to show one stored triage again: the clip, the model, the figures, the top frames."""
    row = session.get(ClipTriage, triage_id)
    if row is None:
        return None
    clip, model = row.clip, row.model
    return {
        "id": row.id,
        "clip_id": clip.id,
        "name": clip.original_name,
        "user_id": clip.user_id,
        "kind": clip.kind,
        "fps": clip.fps,
        "height": clip.height,
        "width": clip.width,
        "model": model.name,
        "model_id": model.id,
        "task": model.task,
        "threshold": row.threshold,
        "n_frames": row.n_frames,
        "n_positive": row.n_positive,
        "max_probability": row.max_probability,
        "probabilities_path": row.probabilities_path,
        "heatmap_method": row.heatmap_method,
        "top": list(row.top or []),
        "device": row.device,
        "seconds": row.seconds,
        "created_at": row.created_at,
    }


def triage_probabilities(view: dict[str, Any]) -> np.ndarray:
    """A stored triage's per-frame probabilities."""
    return np.load(workspace_dir() / view["probabilities_path"], allow_pickle=False)


@reads
def clip_frame(session: Session, view: dict[str, Any], index: int) -> np.ndarray:
    """Frame ``index`` (0-based) of a stored triage's clip, decoded from the kept clip file (a TIFF or zip seeks,
    a video decodes up to it)."""
    clip = session.get(Clip, view["clip_id"])
    if clip is None or not 0 <= index < clip.n_frames:
        raise ValueError(f"no frame {index} in this clip")
    with open_clip(workspace_dir() / clip.path, clip.original_name) as opened:
        for number, frame in enumerate(opened.frames()):
            if number == index:
                return np.asarray(frame)
    raise ValueError(f"no frame {index} in this clip")


def top_frames_zip(view: dict[str, Any]) -> bytes:
    """The stored top frames of a triage as PNGs in a zip (``frame-000012.png``), with their heatmap overlays."""
    from core.heatmaps import overlay

    root = workspace_dir()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as bundle:
        for top in view["top"]:
            picture = root / top["image_path"]
            if not picture.is_file():
                continue
            bundle.writestr(picture.name, picture.read_bytes())
            if top.get("heatmap_path") and (root / top["heatmap_path"]).is_file():
                shown = np.asarray(PILImage.open(picture), dtype=np.float32) / 255.0
                heatmap = np.load(root / top["heatmap_path"], allow_pickle=False)
                bundle.writestr(picture.stem + "-overlay.png", png_bytes(overlay(shown, heatmap, 0.4)))
    return buffer.getvalue()


def triage_csv(view: dict[str, Any]) -> str:
    """A stored triage's per-frame table (``frame,probability,decision``), as the ``clip`` command writes it."""
    return frames_csv(triage_probabilities(view), view["threshold"])


@reads
def recent_triages(session: Session, user_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest clip triages, optionally only one user's: id, when, clip name, model, frames, diagnostic frames."""
    stmt = (
        select(
            ClipTriage.id,
            ClipTriage.created_at,
            Clip.original_name,
            ModelRecord.name,
            ClipTriage.n_frames,
            ClipTriage.n_positive,
            ClipTriage.max_probability,
            User.username,
        )
        .join(Clip, Clip.id == ClipTriage.clip_id)
        .join(ModelRecord, ModelRecord.id == ClipTriage.model_id)
        .outerjoin(User, User.id == ClipTriage.user_id)
        .order_by(ClipTriage.id.desc())
        .limit(limit)
    )
    if user_id is not None:
        stmt = stmt.where(ClipTriage.user_id == user_id)
    keys = ("id", "created_at", "clip", "model", "frames", "diagnostic_frames", "max_probability", "by")
    return [dict(zip(keys, row, strict=True)) for row in session.execute(stmt)]


def live_source(user_id: int, triage_id: int) -> LiveSource | None:
    """The clip and model of triage ``triage_id`` to replay live (:class:`core.live.Replay`), for its owner only: None
    when there is no such triage, or its clip is not ``user_id``'s (a forged id gets nothing and is not told which).
    Audit: ``clip_played``, with the triage, the clip and the model."""

    def work(session: Session) -> LiveSource | None:
        row = session.get(ClipTriage, int(triage_id))
        if row is None or row.clip.user_id is None or row.clip.user_id != user_id:
            return None
        clip, model = row.clip, row.model
        log_event(session, "clip_played", user_id=user_id, clip=clip.id, triage=row.id, model=model.name)
        return LiveSource(
            triage_id=row.id,
            path=workspace_dir() / clip.path,
            name=clip.original_name,
            fps=clip.fps,
            model=ModelInfo.of(model),
        )

    return run_transaction(work)
