"""Heatmaps against the experts (issue 16): in a regions study, every model's maps of the cases held against the
readers' drawings, beside the readers held against each other (:mod:`core.metrics.experts` has the figures, the
references, the handling of cases whose consensus is empty and the rule for "within the range of the experts").

- **Masks.** The latest drawing of each reader of one arm (default: the first) in one layer (default: the first),
  on the study's analysed cases (training cases left out). Only readers who drew every analysed case of the arm
  enter, as on the rest of the Results page; the others are named in ``notes`` with their progress. Two such
  readers at least are needed.
- **Rows.** Every registered model of the arm's modality (default), and for each every heatmap method that applies
  to it (default; ``"own"`` names the model's own map, :func:`core.triage.default_method`). An RCM patch classifier
  (task ``aspecific``) has its map stitched over the whole mosaic in fast mode, so only CAM and Grad-CAM apply.
- **Thresholds.** A model's thresholds are the ones its architecture's localisation study scores it at
  (:data:`services.localization.STUDIES`: 0.03 for intermediate and 0.2 for restrictive features for MLCAM-LICI, seed
  000; 0.5 for CELNet; 0.35 for CompSegNet) and 0.5 for any other. Every row is scored at every threshold of the
  table (their union), like seed 000's Table 2 holds all models to the same thresholds. A row's operating threshold,
  the one its Dice and the range rule use, is the threshold its study gives the study's layer of that name
  (``restrictive``: 0.2 for MLCAM-LICI), else its first.
- **Maps** are what :meth:`core.predict.Predictor.diagnose` gives (the input's own size, per-image min-max
  normalised like every method; MLCAM-LICI's final DFM already is, so its thresholds mean what they mean in the
  localisation study) resized to the case's mask size, and are kept as float32 ``.npy`` under ``expert-maps/``,
  keyed by image sha256, checkpoint sha256, method and mask size (:func:`expert_map_path`), so the page does not
  compute them again. A map the study's AI arm or the Diagnose page already stored for the image is reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data.io import MOSAIC_MAX_PIXELS, ImageError, read_image
from core.data.store import npy_bytes, write_atomic
from core.heatmaps import method_title
from core.heatmaps.mosaic import FAST_METHODS
from core.heatmaps.render import resize_map
from core.metrics.agreement import pairwise_agreement
from core.metrics.experts import RULE, compare_with_experts
from core.reading import view_size
from core.settings import workspace_dir
from core.stats.report import jsonable
from core.triage import default_method
from db import repo
from db.models import SpecimenImage, StudyCase
from db.repo import ModelInfo
from db.session import read_scope
from services.localization import MOSAIC_STUDIES, STUDIES
from services.predictions import cached_predictor, heatmap_path
from services.studies.annotations import latest_annotations, load_mask, regions_arm_and_layer
from services.studies.exchange import export_cases
from services.studies.images import VIEW_SIDE
from services.studies.setup import ArmInfo, StudyError, get_study

__all__ = [
    "DEFAULT_THRESHOLD",
    "EXPERT_MAPS",
    "OWN_MAP",
    "ExpertsReport",
    "MapRow",
    "architecture_thresholds",
    "expert_map_path",
    "expert_map_rows",
    "heatmaps_vs_experts",
    "prepare_expert_maps",
]

EXPERT_MAPS = "expert-maps"  # workspace folder of the maps at mask size; safe to delete (they are recomputed)
OWN_MAP = "own"  # in ``methods``: each model's own map (core.triage.default_method)
DEFAULT_THRESHOLD = 0.5
_BATCH = 8


def architecture_thresholds() -> dict[str, dict[str, float]]:
    """architecture -> {mask set (layer) name: threshold}, from the localisation studies' tables (their main model;
    services.localization): the thresholds each architecture's own maps are scored at."""
    out: dict[str, dict[str, float]] = {}
    for spec in STUDIES.values():
        out.setdefault(spec.models[spec.main].architecture, {t.mask_set: t.threshold for t in spec.tables})
    for mosaic in MOSAIC_STUDIES.values():
        out.setdefault(mosaic.models[mosaic.main].architecture, {mosaic.mask_set: mosaic.threshold})
    return out


@dataclass(frozen=True)
class MapRow:
    """One model and one heatmap method: a row of the table."""

    model: ModelInfo
    method: str
    own: bool  # the model's own map (core.triage.default_method)

    @property
    def title(self) -> str:
        return method_title(self.method)

    @property
    def label(self) -> str:
        return f"{self.model.name} · {self.title}"

    def thresholds(self) -> dict[str, float]:
        return architecture_thresholds().get(self.model.architecture, {}) or {"": DEFAULT_THRESHOLD}

    def operating_threshold(self, layer: str) -> float:
        own = self.thresholds()
        return own.get(layer, next(iter(own.values())))


@dataclass(frozen=True)
class ExpertsReport:
    """What the Results page shows for one arm and layer of a regions study (all plain data: cacheable)."""

    study_id: int
    arm: str
    layer: str
    readers: list[str]
    thresholds: list[float]
    table: pd.DataFrame  # one row per model + method and per reader (module docstring of core.metrics.experts)
    per_reader: pd.DataFrame  # each model + method against each reader alone
    pairwise: pd.DataFrame  # reader pairs: Dice and IoU with CIs
    staple: pd.DataFrame  # each reader's STAPLE sensitivity and specificity
    report: dict[str, Any]  # core.metrics.experts.compare_with_experts, strict-JSON ready
    rule: str = RULE
    notes: list[str] = field(default_factory=list)

    @property
    def answer(self) -> dict[str, bool | None]:
        """Per model + method row: whether it localises within (or above) the range of the experts (by Dice)."""
        return {m["row"]: m["range"]["dice"]["answer"] for m in self.report["models"]}


def expert_map_path(image_sha256: str, model: ModelInfo, method: str, size: tuple[int, int]) -> str:
    """Where a model's map of an image, at a mask size, is kept (workspace-relative); same inputs -> same file."""
    height, width = size
    return (
        f"{EXPERT_MAPS}/{image_sha256[:2]}/{image_sha256}-{model.checkpoint_sha256[:16]}-{method}-{height}x{width}.npy"
    )


def expert_map_rows(
    study_id: int,
    arm: str | None = None,
    *,
    models: Sequence[str | int] | None = None,
    methods: Sequence[str] | None = None,
) -> list[MapRow]:
    """The model + method rows of an arm: ``models`` (names or ids; default every registered model of the arm's
    modality, newest first) and, of each, the ``methods`` that apply (default: all; ``"own"``: its own map).
    Loads the models (kept loaded by :func:`services.predictions.cached_predictor`) to know what applies."""
    with read_scope() as session:
        study = get_study(session, study_id)
        chosen, _ = regions_arm_and_layer(study, study_id, arm, None)
        if models is None:
            infos = repo.list_models(session, modality=chosen.modality)
        else:
            infos = []
            for name in models:
                info = repo.find_model(session, name)
                if info is None:
                    raise StudyError(f"no model {name!r}")
                if info.modality != chosen.modality:
                    raise StudyError(
                        f"model {info.name} is a {info.modality} model; arm {chosen.name} shows {chosen.modality}"
                    )
                infos.append(info)
    rows = []
    for info in infos:
        applies = list(cached_predictor(info).methods)
        if info.task == "aspecific":  # stitched in fast mode (services.mosaic): CAM and Grad-CAM only
            applies = [m for m in applies if m in FAST_METHODS]
        own = default_method(applies, info.architecture)
        wanted = (
            applies if methods is None else [m for m in applies if m in methods or (m == own and OWN_MAP in methods)]
        )
        rows.extend(MapRow(info, method, method == own) for method in wanted)
    return rows


@dataclass(frozen=True)
class _Inputs:
    arm: ArmInfo
    layer: str
    drawn: list[dict[str, Any]]  # the latest drawing of each finished reader and analysed case (annotation rows)
    images: dict[str, dict[str, Any]]  # case code -> path, sha256 and mask size of its image in the arm's modality
    notes: list[str]

    @property
    def readers(self) -> list[str]:
        return sorted({record["reader"] for record in self.drawn})

    def masks(self) -> dict[str, dict[str, np.ndarray]]:
        """{reader: {case: mask}} of the layer, readers sorted."""
        masks: dict[str, dict[str, np.ndarray]] = {reader: {} for reader in self.readers}
        for record in self.drawn:
            masks[record["reader"]][record["case"]] = load_mask(record[f"{self.layer}_path"])
        return masks


def _inputs(session: Session, study_id: int, arm: str | None, layer: str | None) -> _Inputs:
    """The arm and layer, the finished readers' latest drawings, the case images, and who was left out."""
    study = get_study(session, study_id)
    chosen, chosen_layer = regions_arm_and_layer(study, study_id, arm, layer)
    cases = export_cases(session, study_id)
    analysed = set(cases.loc[~cases["training"], "case_id"])
    table = latest_annotations(session, study_id)
    if not table.empty:
        table = table[(table["arm_id"] == chosen.id) & table["case"].isin(analysed)]
    notes = []
    counts = table.groupby("reader")["case"].nunique() if not table.empty else pd.Series(dtype=int)
    finished = sorted(r for r, n in counts.items() if n == len(analysed))
    unfinished = {r: int(n) for r, n in counts.items() if r not in finished}
    if unfinished:
        notes.append(
            f"Not in this comparison (drew fewer than the {len(analysed)} cases of arm {chosen.name}): "
            + ", ".join(f"{r} ({n})" for r, n in sorted(unfinished.items()))
        )
    drawn = table[table["reader"].isin(finished)].to_dict("records") if finished else []
    images = {}
    if drawn:
        rows = session.execute(
            select(StudyCase.id, SpecimenImage.path, SpecimenImage.sha256, SpecimenImage.height, SpecimenImage.width)
            .join(SpecimenImage, SpecimenImage.specimen_id == StudyCase.specimen_id)
            .where(StudyCase.study_id == study_id, SpecimenImage.modality == chosen.modality)
        ).all()
        by_id = {row[0]: row[1:] for row in rows}
        codes = {record["case"]: int(record["case_id"]) for record in drawn}
        for code in sorted(analysed):
            path, sha256, height, width = by_id[codes[code]]
            images[code] = {"path": path, "sha256": sha256, "size": view_size(height, width, VIEW_SIDE)}
    return _Inputs(chosen, chosen_layer, drawn, images, notes)


def _kept(row: MapRow, image: dict[str, Any]) -> bool:
    return (workspace_dir() / expert_map_path(image["sha256"], row.model, row.method, image["size"])).is_file()


def _keep(row: MapRow, image: dict[str, Any], heatmap: np.ndarray) -> None:
    resized = resize_map(np.asarray(heatmap, dtype=np.float32), image["size"])
    path = expert_map_path(image["sha256"], row.model, row.method, image["size"])
    write_atomic(workspace_dir() / path, npy_bytes(resized.astype(np.float32)))


def _compute(row: MapRow, cases: list[str], images: dict[str, dict[str, Any]], arm: ArmInfo) -> None:
    """Compute and keep ``row``'s maps of ``cases`` at their mask sizes (a stored full-size map is reused)."""
    from services.mosaic import mosaic_array, study_step  # services.mosaic trains too: imported when needed

    root = workspace_dir()
    todo = []
    for case in cases:
        stored = root / heatmap_path(images[case]["sha256"], row.model, row.method)
        if stored.is_file():
            _keep(row, images[case], np.load(stored))
        else:
            todo.append(case)
    if not todo:
        return
    predictor = cached_predictor(row.model)
    try:
        if row.model.task == "aspecific":
            for case in todo:
                mosaic = mosaic_array(
                    read_image(root / images[case]["path"], max_pixels=MOSAIC_MAX_PIXELS), arm.modality
                )
                stitched = predictor.stitch(mosaic, step=study_step(predictor.image_size), method=row.method)
                _keep(row, images[case], stitched.map)
            return
        results = predictor.diagnose([read_image(root / images[c]["path"]) for c in todo], heatmap=row.method)
    except ImageError as error:
        raise StudyError(f"{row.label}: a case image cannot be mapped ({error})") from error
    for case, result in zip(todo, results, strict=True):
        if isinstance(result, ImageError):
            raise StudyError(f"{row.label}: case {case} cannot be mapped ({result})")
        _keep(row, images[case], result.heatmap)


def _prepare(
    rows: Sequence[MapRow],
    images: dict[str, dict[str, Any]],
    arm: ArmInfo,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Compute the rows' maps not kept yet, ``_BATCH`` cases at a time; how many were computed."""
    plan = [(row, [case for case, image in images.items() if not _kept(row, image)]) for row in rows]
    total = sum(len(cases) for _, cases in plan)
    done = 0
    for row, cases in plan:
        for start in range(0, len(cases), _BATCH):
            chunk = cases[start : start + _BATCH]
            _compute(row, chunk, images, arm)
            done += len(chunk)
            if progress:
                progress(done, total)
    return total


def prepare_expert_maps(
    study_id: int,
    arm: str | None = None,
    layer: str | None = None,
    *,
    models: Sequence[str | int] | None = None,
    methods: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Compute the maps :func:`heatmaps_vs_experts` needs and does not find kept; returns how many were computed.
    ``progress(done, total)`` after each batch of cases. Nothing to do before two readers have finished the arm."""
    with read_scope() as session:
        inputs = _inputs(session, study_id, arm, layer)
    if len(inputs.readers) < 2:
        return 0
    rows = expert_map_rows(study_id, inputs.arm.name, models=models, methods=methods)
    return _prepare(rows, inputs.images, inputs.arm, progress)


def heatmaps_vs_experts(
    study_id: int,
    arm: str | None = None,
    layer: str | None = None,
    models: Sequence[str | int] | None = None,
    methods: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ExpertsReport:
    """Every model + method row against the finished readers of one arm and layer, and the readers against each
    other (module docstring). Missing maps are computed first (``progress(done, total)``). Raises
    :class:`StudyError` for a label study, an unknown arm or layer, or fewer than two finished readers."""
    with read_scope() as session:
        inputs = _inputs(session, study_id, arm, layer)
    chosen, chosen_layer, images, notes = inputs.arm, inputs.layer, inputs.images, inputs.notes
    if len(inputs.readers) < 2:
        raise StudyError(
            f"Holding maps against the experts needs two readers or more who drew every case of arm {chosen.name}; "
            f"{len(inputs.readers)} did so far."
        )
    masks = inputs.masks()
    rows = expert_map_rows(study_id, chosen.name, models=models, methods=methods)
    _prepare(rows, images, chosen, progress)
    if not rows:
        notes.append(f"No registered {chosen.modality} model has a heatmap: readers only.")
    thresholds = sorted({t for row in rows for t in row.thresholds().values()} or {DEFAULT_THRESHOLD})
    root = workspace_dir()
    maps = {
        row.label: {
            case: np.load(root / expert_map_path(image["sha256"], row.model, row.method, image["size"]))
            for case, image in images.items()
        }
        for row in rows
    }
    try:
        report = compare_with_experts(
            maps,
            masks,
            thresholds=thresholds,
            operating={row.label: row.operating_threshold(chosen_layer) for row in rows},
            n_boot=n_boot,
            seed=seed,
            level=level,
        )
    except ValueError as error:
        raise StudyError(f"Arm {chosen.name}, layer {chosen_layer}: {error}.") from error
    report = jsonable(report)
    if report["cases"]["incomplete"]:
        notes.append(f"Cases not every reader drew, left out: {', '.join(report['cases']['incomplete'])}")
    if report["cases"]["empty"]:
        notes.append(
            f"{len(report['cases']['empty'])} case(s) with no region in the readers' consensus count only in the "
            "no-region columns (share of cases left clear, share of pixels left unmarked)."
        )
    readers = sorted(masks)
    return ExpertsReport(
        study_id=study_id,
        arm=chosen.name,
        layer=chosen_layer,
        readers=readers,
        thresholds=[float(t) for t in thresholds],
        table=_table(report, rows, len(readers)),
        per_reader=_per_reader(report, rows),
        pairwise=_pairwise(masks, n_boot, seed, level),
        staple=pd.DataFrame(
            [
                {"reader": r["reader"], "sensitivity": r["staple_sensitivity"], "specificity": r["staple_specificity"]}
                for r in report["readers"]
            ]
        ),
        report=report,
        notes=notes,
    )


def _figure_columns(figures: dict[str, Any], thresholds: list[float]) -> dict[str, Any]:
    """The table's columns of one row's figures against its reference."""
    table2 = {t["threshold"]: t for t in figures["table2"]}
    out: dict[str, Any] = {}
    for t in thresholds:
        for metric in ("mean_acc", "mean_iu", "fw_iu"):
            out[f"{metric} @{t:g}"] = table2[t][metric]
    low, high = figures["pixel_auc_ci"] or (None, None)
    out |= {"pixel_auc": figures["pixel_auc"], "pixel_auc_low": low, "pixel_auc_high": high}
    out |= {"best_dice": figures["best_dice"], "best_dice_threshold": figures["best_dice_threshold"]}
    for metric in ("dice", "iou"):
        low, high = figures[f"{metric}_ci"] or (None, None)
        out |= {metric: figures[metric], f"{metric}_low": low, f"{metric}_high": high}
    out |= {"mean_iu (operating)": figures["operating"]["mean_iu"], "n_cases": figures["n_cases"]}
    return out


def _table(report: dict[str, Any], rows: Sequence[MapRow], n_readers: int) -> pd.DataFrame:
    """The one table: a row per model + method (against the consensus of all readers) and per reader (against the
    consensus of the others), Table 2 figures at every threshold, pixel AUC, best Dice, Dice and IoU, the no-region
    figures and the model rows' place in the readers' range."""
    thresholds = report["thresholds"]
    out = []
    for row, scored in zip(rows, report["models"], strict=True):
        verdict = scored["range"]
        out.append(
            {
                "row": row.label,
                "kind": "model",
                "model": row.model.name,
                "method": row.method,
                "own map": row.own,
                "reference": f"STAPLE of all {n_readers} readers",
                "operating threshold": scored["operating_threshold"],
                **_figure_columns(scored["vs_consensus"], thresholds),
                "no-region cases": scored["empty"]["n_cases"],
                "no-region cleared": scored["empty"]["clear"],
                "no-region pixel specificity": scored["empty"]["specificity"],
                "experts' range (Dice)": verdict["dice"]["verdict"],
                "experts' range (mean IU)": verdict["mean_iu"]["verdict"],
            }
        )
    for reader in report["readers"]:
        others = reader["others"]
        reference = f"STAPLE of the other {len(others)} readers" if reader["reference"] == "staple" else others[0]
        out.append(
            {
                "row": reader["reader"],
                "kind": "reader",
                "model": None,
                "method": None,
                "own map": None,
                "reference": reference,
                "operating threshold": None,
                **_figure_columns(reader, thresholds),
                "no-region cases": reader["empty"]["n_cases"],
                "no-region cleared": reader["empty"]["clear"],
                "no-region pixel specificity": reader["empty"]["specificity"],
                "experts' range (Dice)": None,
                "experts' range (mean IU)": None,
            }
        )
    return pd.DataFrame(out)


def _per_reader(report: dict[str, Any], rows: Sequence[MapRow]) -> pd.DataFrame:
    out = []
    for row, scored in zip(rows, report["models"], strict=True):
        for reader, figures in scored["vs_readers"].items():
            out.append({"row": row.label, "reader": reader, **_figure_columns(figures, report["thresholds"])})
    return pd.DataFrame(out)


def _pairwise(masks: dict[str, dict[str, np.ndarray]], n_boot: int, seed: int, level: float) -> pd.DataFrame:
    """Reader pairs on the analysed cases: mean Dice and IoU over the cases not both empty, with CIs."""
    out = []
    for pair in pairwise_agreement(masks, n_boot=n_boot, seed=seed, level=level):
        row = {"reader a": pair["a"], "reader b": pair["b"]}
        for metric in ("dice", "iou"):
            low, high = pair[f"{metric}_ci"] or (None, None)
            row |= {metric: pair[metric], f"{metric}_low": low, f"{metric}_high": high}
        row |= {"n_cases": pair["n_cases"], "both empty": pair["n_both_empty"]}
        out.append(row)
    return pd.DataFrame(out)
