"""What a reader's browser receives for a case: the rendered picture, its cache, and the cases rendered ahead."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image as PILImage

from core.reading import blind_png, reader_order, windowed
from db import repo
from db.session import session_scope
from services import studies
from services.studies import CASE_CACHE
from tests.conftest import reader_study


def test_the_default_view_is_rendered_once_and_served_from_the_cache(use_trained):
    study, _, (reader,) = reader_study(1)
    with session_scope() as s:
        case = studies.reader_state(s, study.id, reader).case
    folder = use_trained / CASE_CACHE

    def copies(data: bytes) -> list:
        return [p for p in folder.rglob("*.png") if p.read_bytes() == data] if folder.exists() else []

    fresh = studies.case_png(case.image_path, case.modality, cache=False)
    for stale in copies(fresh):  # other tests (and the page's read-ahead) may have rendered it already
        stale.unlink()
    first = studies.case_png(case.image_path, case.modality)
    (kept,) = copies(first)
    assert first == fresh
    kept.write_bytes(b"served from the cache")
    assert studies.case_png(case.image_path, case.modality) == b"served from the cache"
    assert studies.case_png(case.image_path, case.modality, cache=False) == first
    kept.unlink()
    picture = np.asarray(PILImage.open(io.BytesIO(first)))
    assert picture.ndim == 3 and picture.shape[2] == 3  # FL through a colormap
    narrow = studies.case_png(case.image_path, case.modality, window=(0.2, 0.6))
    assert narrow != first and copies(narrow) == []  # adjusted windows are not cached
    gray = studies.case_png(case.image_path, case.modality, colormap="Gray")
    assert np.ptp(np.asarray(PILImage.open(io.BytesIO(gray))).astype(int), axis=2).max() == 0


def test_the_cases_after_the_current_one_are_the_next_ones_served(use_trained):
    study, _, (reader,) = reader_study(1)
    with session_scope() as s:
        ahead = studies.upcoming_images(s, study.id, reader, count=2)
        case = studies.reader_state(s, study.id, reader).case
    assert len(ahead) == 2 and all(modality == "FL" for _, modality in ahead)
    studies.record_read(study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=1, rating=3)
    with session_scope() as s:
        nxt = studies.reader_state(s, study.id, reader).case
        assert (nxt.image_path, nxt.modality) == ahead[0]
        outsider = repo.create_user(s, f"out-{uuid.uuid4().hex[:6]}", "pw-reader-1", "reader").id
        assert studies.upcoming_images(s, study.id, outsider) == []


def test_windowing_and_the_png_carry_only_pixels():
    gray = np.linspace(0, 1, 64 * 80, dtype=np.float32).reshape(64, 80)
    picture = windowed(gray, 0.25, 0.75, "Gray")
    assert (
        picture[0, 0, 0] == 0
        and picture[-1, -1, 0] == 255
        and int(picture[32, 40, 0]) == round((gray[32, 40] - 0.25) / 0.5 * 255)
    )
    for low, high in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.2)):
        with pytest.raises(ValueError, match="window"):
            windowed(gray, low, high)
    with pytest.raises(ValueError, match="colormap"):
        windowed(gray, 0, 1, "Rainbow")
    data = blind_png(picture)
    image = PILImage.open(io.BytesIO(data))
    assert image.info == {} or set(image.info) <= {"dpi"} and not image.getexif()
    assert not any(chunk in data for chunk in (b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"tIME", b"iCCP"))


def test_reader_order_is_stable_per_reader_and_arm_and_ignores_input_order():
    ids = list(range(100, 150))
    order = reader_order(ids, 1, 7, 3)
    assert sorted(order) == ids and order != ids
    assert reader_order(ids[::-1], 1, 7, 3) == order
    assert reader_order(ids, 1, 8, 3) != order and reader_order(ids, 1, 7, 4) != order
    assert reader_order(ids, 2, 7, 3) != order
