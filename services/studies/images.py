"""Case images as a reader receives them: re-rendered PNGs without metadata, cached, rendered ahead."""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data.io import MOSAIC_MAX_PIXELS, read_image
from core.data.preprocess import display_image
from core.data.store import write_atomic
from core.heatmaps.render import overlay, resize_map, to_uint8
from core.reading import DEFAULT_COLORMAP, blind_png, fit_side, reader_order, windowed
from core.settings import workspace_dir
from db.models import SpecimenImage, StudyCase
from db.session import reads
from services.studies.protocol import _case_ids, _invitation, _position
from services.studies.setup import get_study

__all__ = ["CASE_CACHE", "VIEW_SIDE", "case_png", "upcoming_images"]

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


@reads
def upcoming_images(session: Session, study_id: int, reader_id: int, count: int = 2) -> list[tuple[str, str]]:
    """(image path, modality) of the ``count`` cases after the one this reader is on, in their own order: what the
    reading page renders ahead, in the background, while the reader looks at the current case."""
    study = get_study(session, study_id)
    if study is None or _invitation(session, study_id, reader_id) is None or study.status != "open":
        return []
    case_ids = _case_ids(session, study_id)
    where = _position(session, study, reader_id, case_ids)
    arm = where.arm
    if arm is None:
        return []
    order = [i for i in reader_order(case_ids, study_id, reader_id, arm.id) if i not in where.answered][1 : 1 + count]
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
