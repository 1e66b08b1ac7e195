"""Regions studies (issue 16): the regions readers draw, stored with their reads, and given back to the PI.

A reader of a ``regions`` study draws, on each case as it is shown to them (the case image fitted into
:data:`services.studies.images.VIEW_SIDE`, so every reader's mask of a case has the same size), the regions that
carry the diagnosis in each of the study's layers, or says there is none. :func:`record_annotation` checks the
drawing against the case, stores each layer as a 0/255 PNG under ``annotations/`` (content-addressed) and then the
read (label 1 when any region was drawn) with its :class:`db.models.Annotation` in one transaction, through the same
protocol as every read (:func:`services.studies.protocol.record_read`): the case must be the one the server serves
the reader, a double submit stores nothing, a correction is a new version.

An aided arm may start each case from the model's heatmap at the arm's ``start_threshold``
(:func:`start_masks`); an unaided arm never sees it. Only the PI gets masks of other readers
(:func:`latest_annotations`, :func:`export_masks`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data.store import png_bytes, write_atomic
from core.heatmaps.render import resize_map
from core.reading import view_size
from core.settings import workspace_dir
from db.audit import log_event
from db.models import Annotation, Read, Specimen, SpecimenImage, StudyArm, StudyCase, User
from db.session import reads, writes
from services.studies.images import VIEW_SIDE
from services.studies.protocol import (
    NOT_ASSIGNED,
    DrawnRegions,
    ReadResult,
    _ai_shown,
    _arm_case,
    _invitation,
    record_read,
)
from services.studies.setup import ArmInfo, StudyError, StudyInfo, get_study

__all__ = [
    "ANNOTATIONS",
    "arm_comparison",
    "case_mask_size",
    "coco_masks",
    "export_masks",
    "latest_annotations",
    "load_mask",
    "masks_zip",
    "own_masks",
    "regions_arm_and_layer",
    "record_annotation",
    "start_masks",
]

ANNOTATIONS = "annotations"  # workspace folder of the drawn masks
_SAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


def _served_case(session: Session, study_id: int, reader_id: int, arm_id: int, token: str):
    """(study, arm, case, case image) for an invited reader, or StudyError."""
    study = get_study(session, study_id)
    if study is None or _invitation(session, study_id, reader_id) is None:
        raise StudyError(NOT_ASSIGNED)
    arm = study.arm(arm_id)
    case = _arm_case(session, study_id, arm_id, token) if arm is not None else None
    if case is None:
        raise StudyError("No such case in this study.")
    image = session.scalar(
        select(SpecimenImage).where(
            SpecimenImage.specimen_id == case.specimen_id, SpecimenImage.modality == arm.modality
        )
    )
    return study, arm, case, image


@reads
def case_mask_size(session: Session, study_id: int, reader_id: int, arm_id: int, token: str) -> tuple[int, int]:
    """(height, width) of this case's masks: the case image as the reader is shown it."""
    _, _, _, image = _served_case(session, study_id, reader_id, arm_id, token)
    return view_size(image.height, image.width, VIEW_SIDE)


def _mask_png(mask: np.ndarray) -> tuple[str, int]:
    """Store a boolean mask as a 0/255 PNG under ``annotations/`` by content; (relative path, area in pixels)."""
    pixels = np.where(mask, 255, 0).astype(np.uint8)
    data = png_bytes(pixels)
    digest = hashlib.sha256(data).hexdigest()
    relative = f"{ANNOTATIONS}/{digest[:2]}/{digest}.png"
    target = workspace_dir() / relative
    if not target.exists():
        write_atomic(target, data)
    return relative, int(mask.sum())


def load_mask(relative: str) -> np.ndarray:
    """A stored mask (workspace-relative path) as a boolean array."""
    with PILImage.open(workspace_dir() / relative) as image:
        return np.asarray(image.convert("L")) >= 128


def record_annotation(
    *,
    study_id: int,
    reader_id: int,
    arm_id: int,
    token: str,
    masks: Mapping[str, np.ndarray | None],
    empty: bool,
    shown_at: datetime | None = None,
    started_from_ai: bool = False,
    revise: bool = False,
    now: datetime | None = None,
) -> ReadResult:
    """Store what a reader drew on a case: a mask per layer of the study (None: nothing drawn in it) at the case's
    mask size (:func:`case_mask_size`), or ``empty`` for an explicit "no region" (then every mask must be empty).
    Raises :class:`StudyError` with what to do for anything refused; nothing is stored then."""
    study, _, _, image = _read_case(study_id, reader_id, arm_id, token)
    if study.question != "regions":
        raise StudyError("This study asks for a diagnosis, not a drawing.")
    height, width = view_size(image[0], image[1], VIEW_SIDE)
    unknown = sorted(set(masks) - set(study.layers))
    if unknown:
        raise StudyError(f"this study has no layer {unknown[0]!r}; draw in {', '.join(study.layers)}")
    checked: dict[str, np.ndarray] = {}
    for layer in study.layers:
        mask = masks.get(layer)
        if mask is None:
            mask = np.zeros((height, width), dtype=bool)
        mask = np.asarray(mask)
        if mask.shape != (height, width):
            raise StudyError(
                f"the drawing of layer {layer} has shape {mask.shape}, not the case's {height} x {width} px; "
                "reload the page and draw again"
            )
        checked[layer] = mask.astype(bool)
    drawn = any(m.any() for m in checked.values())
    if empty and drawn:
        raise StudyError("You chose 'No region' but the drawing has regions; clear them or undo 'No region'.")
    if not empty and not drawn:
        raise StudyError("Draw the regions that carry the diagnosis, or press 'No region' if there is none.")
    regions = DrawnRegions(
        layers={layer: _mask_png(mask) for layer, mask in checked.items()},
        height=height,
        width=width,
        empty=bool(empty),
        started_from_ai=bool(started_from_ai),
    )
    return record_read(
        study_id=study_id,
        reader_id=reader_id,
        arm_id=arm_id,
        token=token,
        label=regions.label,
        rating=None,
        shown_at=shown_at,
        revise=revise,
        now=now,
        regions=regions,
    )


@reads
def _read_case(session: Session, study_id: int, reader_id: int, arm_id: int, token: str):
    study, arm, case, image = _served_case(session, study_id, reader_id, arm_id, token)
    return study, arm, case.id, (image.height, image.width)


@reads
def start_masks(
    session: Session, study_id: int, reader_id: int, arm_id: int, token: str
) -> dict[str, np.ndarray] | None:
    """The editable start of an aided arm that starts from the AI: the model's heatmap of the case at the arm's
    threshold, in the study's first layer, at the case's mask size. None for any other arm (an unaided arm never
    gets the AI's map) or while the AI output is not computed yet."""
    study, arm, case, image = _served_case(session, study_id, reader_id, arm_id, token)
    if study.question != "regions" or not arm.starts_from_ai:
        return None
    shown = _ai_shown(session, arm, image.id)
    if shown is None or not shown.heatmap_path:
        return None
    heatmap = np.load(workspace_dir() / shown.heatmap_path).astype(np.float32)
    size = view_size(image.height, image.width, VIEW_SIDE)
    start = resize_map(heatmap, size) >= float(arm.start_threshold)
    return {layer: start if i == 0 else np.zeros(size, dtype=bool) for i, layer in enumerate(study.layers)}


@reads
def own_masks(
    session: Session, study_id: int, reader_id: int, arm_id: int, token: str
) -> tuple[dict[str, np.ndarray], bool] | None:
    """The reader's own latest drawing of this case in this arm (masks, "no region"), for a correction; None if they
    have not drawn it."""
    _, _, case, _ = _served_case(session, study_id, reader_id, arm_id, token)
    row = session.scalar(
        select(Annotation)
        .where(Annotation.reader_id == reader_id, Annotation.arm_id == arm_id, Annotation.case_id == case.id)
        .order_by(Annotation.version.desc())
        .limit(1)
    )
    if row is None:
        return None
    return {layer: load_mask(entry["path"]) for layer, entry in row.layers.items()}, row.empty


@reads
def latest_annotations(session: Session, study_id: int) -> pd.DataFrame:
    """Every reader's latest drawing of every case in every arm (PI): reader, reader_id, arm, arm_id, case (the
    specimen code), case_id, version, empty, started_from_ai, height, width, duration_s, and per layer
    ``<layer>_path`` and ``<layer>_pixels``."""
    rows = session.execute(
        select(Annotation, User.username, StudyArm.name, Specimen.code, Read.duration_s)
        .join(User, User.id == Annotation.reader_id)
        .join(StudyArm, StudyArm.id == Annotation.arm_id)
        .join(StudyCase, StudyCase.id == Annotation.case_id)
        .join(Specimen, Specimen.id == StudyCase.specimen_id)
        .join(Read, Read.id == Annotation.read_id)
        .where(Annotation.study_id == study_id)
        .order_by(Annotation.id)
    ).all()
    latest: dict[tuple[int, int, int], dict[str, Any]] = {}
    for annotation, username, arm, code, duration in rows:
        record: dict[str, Any] = {
            "reader": username,
            "reader_id": annotation.reader_id,
            "arm": arm,
            "arm_id": annotation.arm_id,
            "case": code,
            "case_id": annotation.case_id,
            "version": annotation.version,
            "empty": annotation.empty,
            "started_from_ai": annotation.started_from_ai,
            "height": annotation.height,
            "width": annotation.width,
            "duration_s": duration,
        }
        for layer, entry in annotation.layers.items():
            record[f"{layer}_path"], record[f"{layer}_pixels"] = entry["path"], entry["pixels"]
        latest[(annotation.reader_id, annotation.arm_id, annotation.case_id)] = record  # ids ascend: the newest wins
    return pd.DataFrame(list(latest.values()))


def _safe(name: str) -> str:
    """A file or folder name from a username or specimen code: only letters, digits and ``._@+-``."""
    cleaned = _SAFE.sub("_", name).strip("._") or "_"
    return cleaned[:100]


def regions_arm_and_layer(
    study: StudyInfo | None, study_id: int, arm: str | None, layer: str | None
) -> tuple[ArmInfo, str]:
    """The arm (by name; default: the first) and layer (default: the first) of a regions study, or a StudyError
    that says what exists."""
    if study is None:
        raise StudyError(f"there is no study #{study_id}")
    if study.question != "regions":
        raise StudyError(f"study #{study_id} asks for a label; only a regions study has drawn masks")
    chosen = next((a for a in study.arms if a.name == arm), None) if arm else study.arms[0]
    if chosen is None:
        raise StudyError(f"study #{study_id} has no arm {arm!r}; one of {', '.join(a.name for a in study.arms)}")
    chosen_layer = layer or study.layers[0]
    if chosen_layer not in study.layers:
        raise StudyError(f"study #{study_id} has no layer {chosen_layer!r}; one of {', '.join(study.layers)}")
    return chosen, chosen_layer


def coco_masks(table: pd.DataFrame, layers: tuple[str, ...]) -> dict[str, Any]:
    """The drawings of :func:`latest_annotations` as one COCO-style document: an image per case, a category per
    layer, an annotation per reader, arm, case and layer with the mask in COCO's compressed RLE (``iscrowd`` 1, as
    COCO stores RLE masks) and the reader, arm, version and "no region" under ``attributes``."""
    from core.metrics.agreement import rle_encode

    categories = [{"id": number, "name": layer} for number, layer in enumerate(layers, start=1)]
    images: dict[str, dict[str, Any]] = {}
    annotations = []
    for record in table.to_dict("records") if not table.empty else []:
        image = images.setdefault(
            record["case"],
            {"id": len(images) + 1, "file_name": record["case"], "height": record["height"], "width": record["width"]},
        )
        for category in categories:
            mask = load_mask(record[f"{category['name']}_path"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": category["id"],
                    "segmentation": rle_encode(mask),
                    "area": int(mask.sum()),
                    "iscrowd": 1,
                    "attributes": {
                        "reader": record["reader"],
                        "arm": record["arm"],
                        "version": int(record["version"]),
                        "no_region": bool(record["empty"]),
                        "started_from_ai": bool(record["started_from_ai"]),
                    },
                }
            )
    return {"images": list(images.values()), "categories": categories, "annotations": annotations}


@writes
def export_masks(
    session: Session,
    study_id: int,
    out: str | Path,
    *,
    user_id: int | None,
    arm: str | None = None,
    layer: str | None = None,
    coco: str | Path | None = None,
) -> dict[str, Any]:
    """Write the latest masks of one arm (default: the first) and one layer (default: the first) as
    ``out/<reader>/<case>.png`` (0 background, 255 region; "no region" as an all-zero mask), the layout
    ``python -m core agreement`` reads, and with ``coco`` every arm's and layer's drawings as one COCO RLE JSON
    file (:func:`coco_masks`). Audited (``masks_exported``). Returns what was written."""
    study = get_study(session, study_id)
    chosen_arm, chosen_layer = regions_arm_and_layer(study, study_id, arm, layer)
    every = latest_annotations(session, study_id)
    table = every[every["arm_id"] == chosen_arm.id] if not every.empty else every
    root = Path(out)
    written = 0
    for record in table.to_dict("records"):
        mask = load_mask(record[f"{chosen_layer}_path"])
        target = root / _safe(record["reader"]) / f"{_safe(record['case'])}.png"
        write_atomic(target, png_bytes(np.where(mask, 255, 0).astype(np.uint8)))
        written += 1
    if coco is not None:
        write_atomic(Path(coco), json.dumps(coco_masks(every, study.layers)).encode())
    log_event(
        session,
        "masks_exported",
        user_id=user_id,
        study_id=study_id,
        arm=chosen_arm.name,
        layer=chosen_layer,
        masks=written,
        coco=coco is not None,
    )
    readers = sorted(set(table["reader"])) if written else []
    return {"arm": chosen_arm.name, "layer": chosen_layer, "masks": written, "readers": readers, "out": str(root)}


@writes
def masks_zip(session: Session, study_id: int, *, user_id: int | None) -> bytes:
    """Every arm's and layer's latest drawings as one zip (PI): ``<arm>/<layer>/<reader>/<case>.png`` (0/255, the
    layout ``python -m core agreement`` reads per arm and layer) and ``masks.coco.json`` (:func:`coco_masks`).
    Audited (``masks_exported``)."""
    import io
    import zipfile

    study = get_study(session, study_id)
    if study is None or study.question != "regions":
        raise StudyError(f"study #{study_id} has no drawn masks")
    table = latest_annotations(session, study_id)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for record in table.to_dict("records") if not table.empty else []:
            for layer in study.layers:
                mask = load_mask(record[f"{layer}_path"])
                name = f"{_safe(record['arm'])}/{_safe(layer)}/{_safe(record['reader'])}/{_safe(record['case'])}.png"
                archive.writestr(name, png_bytes(np.where(mask, 255, 0).astype(np.uint8)))
        archive.writestr("masks.coco.json", json.dumps(coco_masks(table, study.layers)))
    log_event(session, "masks_exported", user_id=user_id, study_id=study_id, masks=len(table), zip=True)
    return buffer.getvalue()


def _drawings(table: pd.DataFrame, arm_id: int, layer: str) -> dict[str, dict[str, np.ndarray]]:
    """reader -> case -> mask of one arm's latest drawings in ``layer``."""
    masks: dict[str, dict[str, np.ndarray]] = {}
    for record in table[table["arm_id"] == arm_id].to_dict("records"):
        masks.setdefault(record["reader"], {})[record["case"]] = load_mask(record[f"{layer}_path"])
    return masks


@reads
def arm_comparison(
    session: Session, study_id: int, *, layer: str | None = None, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """The arms of a regions study side by side (PI; the AI-aided annotation arm against the unaided one): per arm,
    the drawings, the readers, time per case (median and mean seconds, from showing the case to submitting), the
    share of drawings started from the AI's map, the readers' agreement with each other (mean of the pairwise mean
    Dice, :func:`core.metrics.agreement.pairwise_agreement`) and every drawing's Dice against the STAPLE consensus
    of the first arm's readers (the unaided reference), with a bootstrap CI over drawings."""
    from core.metrics.agreement import pairwise_agreement, staple

    study = get_study(session, study_id)
    _, layer = regions_arm_and_layer(study, study_id, None, layer)
    table = latest_annotations(session, study_id)
    columns = ["arm", "drawings", "readers", "median_s", "mean_s", "from_ai", "pairwise_dice", "dice_vs_reference"]
    if table.empty:
        return pd.DataFrame(columns=[*columns, "dice_vs_reference_ci", "n_vs_reference"])
    reference_masks = _drawings(table, study.arms[0].id, layer)
    reference = staple(reference_masks).consensus if len(reference_masks) >= 2 else {}
    rows = []
    for arm in study.arms:
        drawn = table[table["arm_id"] == arm.id]
        masks = _drawings(table, arm.id, layer)
        pairs = pairwise_agreement(masks, n_boot=0) if len(masks) >= 2 else []
        dice = [p["dice"] for p in pairs if p["dice"] is not None]
        against = {
            f"{reader}/{case}": mask
            for reader, cases in masks.items()
            for case, mask in cases.items()
            if case in reference
        }
        versus: dict[str, Any] = {"dice": None, "dice_ci": None, "n_cases": 0}
        if against:
            reference_side = {key: reference[key.split("/", 1)[1]] for key in against}
            (versus,) = pairwise_agreement({"arm": against, "reference": reference_side}, n_boot=n_boot, seed=seed)
        seconds = drawn["duration_s"].dropna()
        rows.append(
            {
                "arm": arm.name,
                "drawings": len(drawn),
                "readers": drawn["reader_id"].nunique(),
                "median_s": float(seconds.median()) if len(seconds) else None,
                "mean_s": float(seconds.mean()) if len(seconds) else None,
                "from_ai": float(drawn["started_from_ai"].mean()) if len(drawn) else None,
                "pairwise_dice": float(np.mean(dice)) if dice else None,
                "dice_vs_reference": versus["dice"],
                "dice_vs_reference_ci": versus["dice_ci"],
                "n_vs_reference": versus["n_cases"],
            }
        )
    return pd.DataFrame(rows)
