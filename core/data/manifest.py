"""Cohort manifests (CSV) and patient-level splits.

A manifest has one row per image: ``patient_id, specimen_id, modality, path`` and at least one label column of
``tumor, grade, ki67, diagnostic, aspecific``; optionally ``split``, ``mask_path``, ``site`` and ``frames``. Paths are
relative to the manifest's folder (or absolute). Labels may be empty (unknown); a missing label column is unknown for
every row. Validation reports every bad row by its line number instead of failing at the first.

CLE cohorts (seed 000): ``site`` names the biopsy site within the patient, ``diagnostic`` (1/0) says whether a frame
shows diagnostic features, and ``path`` may be a clip (a video, a multi-page TIFF, a zip or folder of frames) whose
frames become one specimen each, ``<specimen_id>-f<frame>``, with the row's labels. ``frames`` picks them (0-based):
``0-99``, ``120``, ``200-``, ``0-999/10`` (every tenth), several joined by ``;`` (empty: every frame); give a clip
several rows with disjoint frame ranges to label its stretches differently. RCM mosaics (seed 002): ``aspecific``
(1/0) says whether the mosaic holds an aspecific region; left empty with a mask given, the mask decides (any pixel at
its region value, 255).
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.data.preprocess import MODALITIES

__all__ = [
    "LABEL_COLUMNS",
    "REQUIRED_COLUMNS",
    "FrameSelection",
    "ManifestRow",
    "parse_frames",
    "patient_split",
    "read_manifest",
]

REQUIRED_COLUMNS = ("patient_id", "specimen_id", "modality", "path")
LABEL_COLUMNS = ("tumor", "grade", "ki67", "diagnostic", "aspecific")
_TRUE = {"1", "yes", "true", "tumor", "y"}
_FALSE = {"0", "no", "false", "non-tumor", "nontumor", "n"}
_GRADES = {"dlgg": "DLGG", "gbm": "GBM"}
_KI67 = {"<10": "<10", ">=10": ">=10", "low": "<10", "high": ">=10"}
_SPLITS = ("train", "val", "test")
_FRAME_ITEM = re.compile(r"^(\d+)(?:(-)(\d+)?)?(?:/(\d+))?$")
_MAX_CODE = 64


@dataclass(frozen=True)
class FrameSelection:
    """Frames of a clip picked by a manifest's ``frames`` cell: (first, last or None for the end, step) ranges."""

    ranges: tuple[tuple[int, int | None, int], ...]

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        return any(
            index >= first and (last is None or index <= last) and (index - first) % step == 0
            for first, last, step in self.ranges
        )

    def beyond(self, n_frames: int) -> list[str]:
        """The ranges that start at or after frame ``n_frames`` (a clip that is shorter than the manifest says)."""
        return [_range_text(r) for r in self.ranges if r[0] >= n_frames]


def _range_text(item: tuple[int, int | None, int]) -> str:
    first, last, step = item
    text = str(first) if last == first else f"{first}-{'' if last is None else last}"
    return text + (f"/{step}" if step != 1 else "")


def parse_frames(text: str) -> FrameSelection | None:
    """A ``frames`` cell as a :class:`FrameSelection`; None for an empty cell or ``all`` (every frame)."""
    text = (text or "").strip()
    if not text or text.lower() in ("all", "*"):
        return None
    ranges = []
    for item in re.split(r"[;,\s]+", text):
        match = _FRAME_ITEM.match(item)
        if not match:
            raise ValueError(f"frames {item!r} is not a frame (12), a range (0-99, 200-) or a stepped range (0-99/5)")
        first = int(match[1])
        last = first if match[2] is None else (int(match[3]) if match[3] is not None else None)
        step = int(match[4]) if match[4] is not None else 1
        if last is not None and last < first:
            raise ValueError(f"frames {item!r} ends before it starts")
        if step < 1:
            raise ValueError(f"frames {item!r}: the step must be 1 or more")
        ranges.append((first, last, step))
    return FrameSelection(tuple(ranges))


@dataclass(frozen=True)
class ManifestRow:
    line: int
    patient_id: str
    specimen_id: str
    modality: str
    path: Path
    tumor: bool | None
    grade: str | None
    ki67: str | None
    split: str | None
    mask_path: Path | None
    diagnostic: bool | None = None
    aspecific: bool | None = None
    site: str | None = None
    frames: FrameSelection | None = None  # the frames of a clip to import (None: every frame, or not a clip)
    frames_given: bool = False  # the row's ``frames`` cell was filled in: its path must be a clip


def _optional(value: str | None, mapping: dict[str, str], what: str) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        return mapping[value.lower()]
    except KeyError:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(sorted(set(mapping.values())))}") from None


def _yes_no(value: str | None, what: str = "tumor") -> bool | None:
    value = (value or "").strip().lower()
    if not value:
        return None
    if value in _TRUE or (what == "diagnostic" and value == "diagnostic"):
        return True
    if value in _FALSE or (what == "diagnostic" and value in ("nondiagnostic", "non-diagnostic")):
        return False
    raise ValueError(f"{what} {value!r} must be 1/0 (or yes/no), or empty when unknown")


def _code(value: str | None, what: str) -> str:
    value = (value or "").strip()
    if len(value) > _MAX_CODE:
        raise ValueError(f"{what} is {len(value)} characters long; keep it to {_MAX_CODE}")
    return value


def read_manifest(path: str | Path) -> tuple[list[ManifestRow], list[str]]:
    """Parse and validate a manifest: (good rows, one message per bad row or missing column)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        return [], [f"{path.name}: cannot read the manifest ({error}); save it as UTF-8 CSV"]
    reader = csv.DictReader(text.splitlines())
    header = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = header
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        return [], [f"{path.name}: missing column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)}"]
    if not any(c in header for c in LABEL_COLUMNS):
        return [], [f"{path.name}: no label column; add at least one of {', '.join(LABEL_COLUMNS)}"]
    rows: list[ManifestRow] = []
    errors: list[str] = []
    whole: dict[tuple[str, str], int] = {}  # (specimen, modality) -> line of a row that takes the whole image or clip
    parts: dict[tuple[str, str], int] = {}  # (specimen, modality) -> line of a row that picks frames of a clip
    for line, record in enumerate(reader, start=2):
        try:
            patient, specimen = _code(record["patient_id"], "patient_id"), _code(record["specimen_id"], "specimen_id")
            modality = (record["modality"] or "").strip().upper()
            if not patient or not specimen:
                raise ValueError("patient_id and specimen_id must not be empty")
            if modality not in MODALITIES:
                raise ValueError(f"modality {record['modality']!r} is not one of {', '.join(MODALITIES)}")
            frames_text = (record.get("frames") or "").strip()
            frames = parse_frames(frames_text)
            key = (specimen, modality)
            if frames_text and modality != "CLE":
                raise ValueError(f"frames are picked from CLE clips only, not from a {modality} image")
            if key in whole or (not frames_text and key in parts):
                first = whole.get(key) or parts[key]
                raise ValueError(f"specimen {specimen} has a second {modality} image (line {first})")
            split = (record.get("split") or "").strip().lower() or None
            if split is not None and split not in _SPLITS:
                raise ValueError(f"split {split!r} is not one of {', '.join(_SPLITS)} (or empty)")
            if not (record["path"] or "").strip():
                raise ValueError("path is empty")
            image = Path(record["path"].strip())
            mask = (record.get("mask_path") or "").strip()
            if mask and frames_text:
                raise ValueError("a mask belongs to one image: give each masked frame its own row and image file")
            rows.append(
                ManifestRow(
                    line=line,
                    patient_id=patient,
                    specimen_id=specimen,
                    modality=modality,
                    path=image if image.is_absolute() else path.parent / image,
                    tumor=_yes_no(record.get("tumor")),
                    grade=_optional(record.get("grade"), _GRADES, "grade"),
                    ki67=_optional(record.get("ki67"), _KI67, "ki67"),
                    split=split,
                    mask_path=(Path(mask) if Path(mask).is_absolute() else path.parent / mask) if mask else None,
                    diagnostic=_yes_no(record.get("diagnostic"), "diagnostic"),
                    aspecific=_yes_no(record.get("aspecific"), "aspecific"),
                    site=_code(record.get("site"), "site") or None,
                    frames=frames,
                    frames_given=bool(frames_text),
                )
            )
            (parts if frames_text else whole).setdefault(key, line)
        except ValueError as error:
            errors.append(f"{path.name} line {line}: {error}")
    return rows, errors


def patient_split(
    patients: Iterable[str], fractions: Sequence[float] = (0.6, 0.15, 0.25), seed: int = 0
) -> dict[str, str]:
    """Assign every patient (never a specimen) to train/val/test, shuffled by ``seed``.

    Each split gets at least one patient when there are three or more, so no specimen of a patient ever appears
    in two splits (the FL-CNN paper's patient-level split).
    """
    unique = sorted(set(patients))
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError("fractions must be three non-negative numbers (train, val, test)")
    random.Random(seed).shuffle(unique)
    total = sum(fractions)
    n = len(unique)
    n_val = round(n * fractions[1] / total)
    n_test = round(n * fractions[2] / total)
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    n_train = max(0, n - n_val - n_test)
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return dict(zip(unique, names, strict=True))
