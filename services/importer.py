"""Import a cohort (a folder of images, clips and mosaics plus a CSV manifest) into the workspace and the database.

A manifest row (:mod:`core.data.manifest`) is one image of one specimen, or, for CLE, a clip: a video, a multi-page
TIFF, or a zip or folder of frames. A clip is kept whole by content (``clips/``, one ``clips`` row, shared by every
row that names the same file) and the frames its row picks become one specimen each, ``<specimen_id>-f<frame>``
(frame 0-based, five digits), with the row's labels, site and patient; their images name the clip and the frame.
Frames are decoded one at a time, so a long clip never sits in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data.clips import open_clip
from core.data.io import MOSAIC_MAX_PIXELS, FileError, Image, read_image
from core.data.manifest import ManifestRow, patient_split, read_manifest
from core.data.store import StoredImage, store_image
from core.settings import workspace_dir
from db import repo
from db.models import Clip
from db.session import init_db, session_scope
from services.clips import keep_clip
from services.jobs.context import claim

__all__ = ["CLIP_SUFFIXES", "ImportReport", "frame_code", "import_manifest"]

CLIP_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".zip")  # always clips; a TIFF is one when it has pages
_MAX_CODE = 64


@dataclass
class ImportReport:
    specimens: int = 0
    images: int = 0
    clips: int = 0
    errors: list[str] = field(default_factory=list)


def frame_code(specimen_id: str, frame: int) -> str:
    """The specimen code of frame ``frame`` (0-based) of a clip imported as ``specimen_id``."""
    return f"{specimen_id}-f{frame:05d}"


def import_manifest(
    manifest: str | Path,
    *,
    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25),
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Store every valid row's image (metadata stripped, content-addressed) or clip frames, with specimen, patient
    and labels.

    Rows without a split get a patient-level split by ``fractions`` (every frame and site of a patient lands in the
    same split). Bad rows (unreadable image or clip, bad label, frames past a clip's end, a frame listed twice) are
    reported by line and skipped, each row whole: no frame of a refused clip row is kept. The good rows are committed
    together, so a crash leaves no partial import.
    """
    rows, errors = read_manifest(manifest)
    report = ImportReport(errors=list(errors))
    unsplit = {r.patient_id for r in rows if r.split is None}
    assigned = patient_split(unsplit, fractions, seed) if unsplit else {}
    root = workspace_dir()
    init_db()
    specimens: set[str] = set()
    clips: set[int] = set()
    groups: dict[Path, list[ManifestRow]] = {}  # a clip file -> the rows that pick its frames, decoded once for all
    with session_scope() as session:
        for done, row in enumerate(rows, start=1):
            try:
                if _is_clip(row):
                    groups.setdefault(row.path.resolve(), []).append(row)
                    continue
                _import_row(session, row, assigned, root)
                specimens.add(row.specimen_id)
                report.images += 1
            except (FileError, ValueError) as error:
                report.errors.append(f"line {row.line}: {error}")
            finally:
                if progress:
                    progress(done, len(rows) + len(groups))
        for done, group in enumerate(groups.values(), start=len(rows) + 1):
            codes, clip_id, errors = _import_clip(session, group, assigned, root)
            report.errors.extend(errors)
            specimens.update(codes)
            report.images += len(codes)
            if clip_id is not None:
                clips.add(clip_id)
            if progress:
                progress(done, len(rows) + len(groups))
        claim(session, imported_images=report.images, imported_specimens=len(specimens), imported_clips=len(clips))
    report.specimens, report.clips = len(specimens), len(clips)
    return report


def _is_clip(row: ManifestRow) -> bool:
    """A row's path is a clip when the row picks frames, it is a folder or a video or zip, or a TIFF with pages."""
    if row.frames_given or row.path.is_dir() or row.path.suffix.lower() in CLIP_SUFFIXES:
        return True
    if row.modality != "CLE" or row.path.suffix.lower() not in (".tif", ".tiff"):
        return False
    with contextlib.suppress(Exception), tifffile.TiffFile(row.path) as tif:  # unreadable: read_image says why
        return sum(not getattr(page, "is_reduced", False) for page in tif.pages) > 1
    return False


def _labels(row: ManifestRow) -> dict[str, object]:
    return {
        "tumor": row.tumor,
        "grade": row.grade,
        "ki67": row.ki67,
        "diagnostic": row.diagnostic,
        "aspecific": row.aspecific,
        "site": row.site,
    }


def _import_row(session: Session, row: ManifestRow, assigned: dict[str, str], root: Path) -> None:
    """One image row in its own savepoint: its specimen, label and image land together or not at all."""
    limit = {"max_pixels": MOSAIC_MAX_PIXELS} if row.modality == "RCM" else {}
    image = read_image(row.path, row.path.name, **limit)
    mask = read_image(row.mask_path, row.mask_path.name, **limit) if row.mask_path else None
    if mask is not None and mask.array.shape[:2] != image.array.shape[:2]:
        raise ValueError(
            f"the mask is {mask.width} x {mask.height} px but the image {image.width} x {image.height} px; "
            "export the mask at the image's size"
        )
    labels = _labels(row)
    if row.modality == "RCM" and labels["aspecific"] is None and mask is not None:
        labels["aspecific"] = _mask_has_region(mask.array)
    with session.begin_nested():
        stored = store_image(image, root)
        stored_mask = store_image(mask, root, folder="masks").path if mask is not None else None
        specimen_id = repo.add_specimen(
            session, row.patient_id, row.specimen_id, split=row.split or assigned.get(row.patient_id), **labels
        )
        repo.add_specimen_image(
            session, specimen_id, row.modality, stored.path, stored.sha256, stored.height, stored.width, stored_mask
        )


def _mask_has_region(mask: np.ndarray) -> bool:
    """Whether a mosaic's mask marks any region: pixels at 255 (0 background, 128 unlabeled), or at 1 in 0/1 masks."""
    top = int(mask.max()) if mask.size else 0
    return bool(top == 1 or (mask == 255).any()) if top else False


def _import_clip(
    session: Session, group: list[ManifestRow], assigned: dict[str, str], root: Path
) -> tuple[list[str], int | None, list[str]]:
    """The rows naming one clip file: the clip decoded once, frame by frame, each picked frame stored, then each row
    in its own savepoint (its frames as specimens with its labels, or nothing of it). Returns (the frames' specimen
    codes, the clip's id or None when no row was imported, one message per refused row)."""
    errors: list[str] = []
    rows = []
    for row in group:
        if row.modality != "CLE":
            errors.append(f"line {row.line}: {row.path.name} is a clip; clips are imported as CLE, not {row.modality}")
        elif len(frame_code(row.specimen_id, 0)) > _MAX_CODE:
            errors.append(f"line {row.line}: specimen_id is too long for frame codes; keep it to {_MAX_CODE - 7}")
        else:
            rows.append(row)
    if not rows:
        return [], None, errors
    name = rows[0].path.name
    picked: dict[int, list[tuple[int, StoredImage]]] = {row.line: [] for row in rows}
    owner: dict[int, int] = {}  # frame -> the line that picked it first
    clashes: dict[int, str] = {}
    count = 0
    try:
        with open_clip(rows[0].path, name) as clip:
            info = clip.info
            for index, frame in enumerate(clip.frames()):
                count = index + 1
                here = [row for row in rows if row.frames is None or index in row.frames]
                if not here:
                    continue
                stored = store_image(Image(np.ascontiguousarray(frame), f"{name} frame {index}", "NPY"), root)
                for row in here:
                    first = owner.setdefault(index, row.line)
                    if first != row.line:
                        clashes.setdefault(row.line, f"frame {index} of {name} is also on line {first}; pick it once")
                    picked[row.line].append((index, stored))
    except FileError as error:
        return [], None, errors + [f"line {row.line}: {error}" for row in rows]
    good = []
    for row in rows:
        beyond = row.frames.beyond(count) if row.frames is not None else []
        if row.line in clashes:
            errors.append(f"line {row.line}: {clashes[row.line]}")
        elif beyond:
            errors.append(
                f"line {row.line}: {name} has {count} frames (0-{count - 1}); {', '.join(beyond)} is past its end"
            )
        elif not picked[row.line]:
            errors.append(f"line {row.line}: the row picks none of the {count} frames of {name}; check its frames")
        else:
            good.append(row)
    if not good:
        return [], None, errors
    clip_row = _clip_row(session, rows[0].path, info.kind, info.fps, info.height, info.width, count)
    codes: list[str] = []
    for row in good:
        split = row.split or assigned.get(row.patient_id)
        try:
            with session.begin_nested():
                for index, stored in picked[row.line]:
                    code = frame_code(row.specimen_id, index)
                    specimen_id = repo.add_specimen(session, row.patient_id, code, split=split, **_labels(row))
                    repo.add_specimen_image(
                        session, specimen_id, "CLE", stored.path, stored.sha256, stored.height, stored.width,
                        clip_id=clip_row.id, frame=index,
                    )  # fmt: skip
        except ValueError as error:
            errors.append(f"line {row.line}: {error}")
            continue
        codes.extend(frame_code(row.specimen_id, index) for index, _ in picked[row.line])
    return codes, clip_row.id, errors


def _clip_row(
    session: Session, path: Path, kind: str, fps: float | None, height: int, width: int, n_frames: int
) -> Clip:
    """The ``clips`` row of a cohort clip (no uploader), shared by every import of the same file content."""
    relative, sha256 = keep_clip(path, path.name, kind)
    found = session.scalar(select(Clip).where(Clip.sha256 == sha256, Clip.user_id.is_(None), Clip.path == relative))
    if found is not None:
        return found
    found = Clip(
        user_id=None, original_name=path.name[:255], kind=kind, modality="CLE", path=relative, sha256=sha256,
        n_frames=n_frames, fps=fps, height=height, width=width,
    )  # fmt: skip
    session.add(found)
    session.flush()
    return found
