"""Cohort manifests (CSV) and patient-level splits.

A manifest has one row per image: ``patient_id, specimen_id, modality, path, tumor, grade, ki67, split`` and
optionally ``mask_path``. Paths are relative to the manifest's folder (or absolute). Labels may be empty
(unknown). Validation reports every bad row by its line number instead of failing at the first.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.data.preprocess import MODALITIES

__all__ = ["REQUIRED_COLUMNS", "ManifestRow", "patient_split", "read_manifest"]

REQUIRED_COLUMNS = ("patient_id", "specimen_id", "modality", "path", "tumor", "grade", "ki67", "split")
_TRUE = {"1", "yes", "true", "tumor", "y"}
_FALSE = {"0", "no", "false", "non-tumor", "nontumor", "n"}
_GRADES = {"dlgg": "DLGG", "gbm": "GBM"}
_KI67 = {"<10": "<10", ">=10": ">=10", "low": "<10", "high": ">=10"}
_SPLITS = ("train", "val", "test")


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


def _optional(value: str | None, mapping: dict[str, str], what: str) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        return mapping[value.lower()]
    except KeyError:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(sorted(set(mapping.values())))}") from None


def _tumor(value: str | None) -> bool | None:
    value = (value or "").strip().lower()
    if not value:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"tumor {value!r} must be 1/0 (or yes/no), or empty when unknown")


def read_manifest(path: str | Path) -> tuple[list[ManifestRow], list[str]]:
    """Parse and validate a manifest: (good rows, one message per bad row or missing column)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        return [], [f"{path.name}: cannot read the manifest ({error}); save it as UTF-8 CSV"]
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        return [], [f"{path.name}: missing column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)}"]
    rows: list[ManifestRow] = []
    errors: list[str] = []
    seen: set[tuple[str, str]] = set()
    for line, record in enumerate(reader, start=2):
        try:
            patient, specimen = (record["patient_id"] or "").strip(), (record["specimen_id"] or "").strip()
            modality = (record["modality"] or "").strip().upper()
            if not patient or not specimen:
                raise ValueError("patient_id and specimen_id must not be empty")
            if modality not in MODALITIES:
                raise ValueError(f"modality {record['modality']!r} is not one of {', '.join(MODALITIES)}")
            if (specimen, modality) in seen:
                raise ValueError(f"specimen {specimen} has a second {modality} image")
            split = (record["split"] or "").strip().lower() or None
            if split is not None and split not in _SPLITS:
                raise ValueError(f"split {split!r} is not one of {', '.join(_SPLITS)} (or empty)")
            if not (record["path"] or "").strip():
                raise ValueError("path is empty")
            image = Path(record["path"].strip())
            mask = (record.get("mask_path") or "").strip()
            rows.append(
                ManifestRow(
                    line=line,
                    patient_id=patient,
                    specimen_id=specimen,
                    modality=modality,
                    path=image if image.is_absolute() else path.parent / image,
                    tumor=_tumor(record["tumor"]),
                    grade=_optional(record["grade"], _GRADES, "grade"),
                    ki67=_optional(record["ki67"], _KI67, "ki67"),
                    split=split,
                    mask_path=(Path(mask) if Path(mask).is_absolute() else path.parent / mask) if mask else None,
                )
            )
            seen.add((specimen, modality))
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
