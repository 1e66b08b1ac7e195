"""Weakly supervised localisation: train on a localisation data set, score maps against its masks, run the seeds'
comparisons and store them with the model.

A *study* reproduces one seed paper's localisation table on a synthetic set with known masks (the papers' own data
cannot be downloaded): it trains the seed model, its ablations and a standard-backbone baseline from image-level
labels only, maps the held-out images with each method, scores the maps against the masks
(:func:`core.metrics.localization.score_maps`) and stores the table, with example maps, as an evaluation of the seed
model (``model_evaluations``). The claim each table tests: the seed model localises better than plain CAM or Grad-CAM
on a standard backbone trained on the same images. The rows report whatever comes out.

- ``mlcam`` (seed 000, Table 2): MLCAM-LICI's final map and its inference-time ablations (no LI, no CI with one
  layer, single layers), against CAM and Grad-CAM on ResNet-18 (the M10 row: plain CAM of a GAP network), on CLE
  frames, intermediate masks at threshold 0.03 and restrictive masks at 0.2 (the paper's thresholds).
- ``celnet`` (seed 001, Table 3): CELNet + CELM, without the attention module, without deep supervision, CELNet +
  Grad-CAM, against ResNet-18 + Grad-CAM and ResNet-18 + backprop saliency, on the same CLE frames (the paper's
  "large nucleus and hypercellularity" evidence), region precision and recall by the 75 % rule at threshold 0.5.
- ``compsegnet`` (seed 004): the U-Net's activation map thresholded at 0.35 against CAM on ResNet-18 with the same
  many-channel input, on spectral spots; the sample-level ROC is over the tumor fraction.

Segmentation scores are computed on the positive held-out images (the papers' segmentation sets are annotated
diagnostic or cancer images); image-level AUCs use every held-out image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.data.localization_set import KINDS, LocalizationSet, generate_set, read_set
from core.data.store import png_bytes, write_atomic
from core.heatmaps import get_method, method_title, overlay
from core.metrics.localization import mask_labels, score_maps
from core.models import get_spec
from core.models.mlcam import ABLATIONS
from core.settings import workspace_dir
from core.stats.report import jsonable
from core.train import DATASET_TASKS, Progress, TrainConfig, fit
from db import repo
from db.repo import ModelInfo
from db.session import init_db, session_scope
from services.training import check_model_name, default_name, print_progress, register_trained

__all__ = [
    "STUDIES",
    "MapSpec",
    "ModelPlan",
    "StudySpec",
    "TableSpec",
    "compute_maps",
    "run_study",
    "score_rows",
    "train_on_set",
]

_EXAMPLES = 4


def train_on_set(
    config: TrainConfig,
    data: LocalizationSet,
    *,
    name: str | None = None,
    database: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = None,
) -> tuple[ModelInfo, nn.Module]:
    """Train on the set's train split by the architecture's recipe, keep the threshold chosen on val, score the test
    split's image-level AUC, save and register. The config's task, modality, channels and size follow the set."""
    task = next(t for t, kind in DATASET_TASKS.items() if kind == data.kind)
    config = replace(config, task=task, modality=data.modality, in_chans=data.channels, image_size=data.size)
    name = name or default_name(config)
    check_model_name(name)
    init_db(database)
    with session_scope(database) as session:
        if repo.find_model(session, name) is not None:
            raise ValueError(f"a model named {name!r} is already registered; choose another --name")
    train, val = data.tensors("train"), data.tensors("val")
    log(f"training {config.architecture} ({name}) on {len(train[1])} {data.modality} images of {data.size} px")
    result = fit(config, *train, *val, progress=progress)
    extra: dict[str, Any] = {"dataset": data.describe()}
    if data.channel_mean is not None:
        extra.update(channel_mean=data.channel_mean.tolist(), channel_std=data.channel_std.tolist())
    info = register_trained(config, result, name, data.tensors("test"), database=database, log=log, extra_config=extra)
    return info, result.model


@dataclass(frozen=True)
class MapSpec:
    """One row of a table: which trained model, and how its map is made: ``method`` (a registered heatmap method),
    ``fdfm`` (an MLCAM-LICI ablation by name, :data:`core.models.mlcam.ABLATIONS`) or ``segment`` (CompSegNet's
    activation map, used as is: its threshold is absolute)."""

    label: str
    model: str
    method: str | None = None
    fdfm: str | None = None
    segment: bool = False

    def describe(self) -> str:
        if self.fdfm:
            return f"final DFM, {self.fdfm}"
        if self.segment:
            return "activation map (sigmoid output)"
        return method_title(self.method or "cam")


@dataclass(frozen=True)
class TableSpec:
    mask_set: str
    threshold: float
    rows: tuple[MapSpec, ...]


@dataclass(frozen=True)
class ModelPlan:
    """A model a study trains: architecture, builder options, and training settings scaled to a CPU run."""

    architecture: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    epochs: int = 12
    batch_size: int = 16
    augment: bool = False


@dataclass(frozen=True)
class StudySpec:
    title: str
    kind: str
    main: str  # the key of the model the evaluation is stored with
    models: dict[str, ModelPlan]
    tables: tuple[TableSpec, ...]
    counts: tuple[int, int, int]
    size: int
    channels: int = 1


_MLCAM_ROWS = (
    *(MapSpec(name, "main", fdfm=name) for name in ABLATIONS),
    MapSpec("M10 (ResNet-18 + CAM)", "baseline", method="cam"),
    MapSpec("ResNet-18 + Grad-CAM", "baseline", method="gradcam"),
)

_CELNET_ROWS = (
    MapSpec("CELNet + CELM (ours)", "main", method="celm"),
    MapSpec("CELNet w/o MAM + CELM", "no_mam", method="celm"),
    MapSpec("CELNet w/o DS + CELM", "no_ds", method="celm"),
    MapSpec("CELNet + Grad-CAM", "main", method="gradcam"),
    MapSpec("ResNet-18 + Grad-CAM", "baseline", method="gradcam"),
    MapSpec("ResNet-18 + Backprop", "baseline", method="guided-backprop"),
)

_CLE_BASELINE = ModelPlan("resnet18", lr=1e-3, epochs=12, batch_size=32)

STUDIES: dict[str, StudySpec] = {
    "mlcam": StudySpec(
        title="MLCAM-LICI ablation on synthetic CLE frames (seed 000, Table 2)",
        kind="cle",
        main="main",
        models={"main": ModelPlan("mlcam_lici", lr=0.01, epochs=12, batch_size=16), "baseline": _CLE_BASELINE},
        tables=(TableSpec("intermediate", 0.03, _MLCAM_ROWS), TableSpec("restrictive", 0.2, _MLCAM_ROWS)),
        counts=(600, 150, 200),
        size=128,
    ),
    "celnet": StudySpec(
        title="CELNet + CELM ablation on synthetic CLE frames (seed 001, Table 3)",
        kind="cle",
        main="main",
        models={
            "main": ModelPlan("celnet", lr=0.01, epochs=12, batch_size=32),
            "no_mam": ModelPlan("celnet", {"attention": False}, lr=0.01, epochs=12, batch_size=32),
            "no_ds": ModelPlan("celnet", {"deep_supervision": False}, lr=0.01, epochs=12, batch_size=32),
            "baseline": _CLE_BASELINE,
        },
        tables=(TableSpec("intermediate", 0.5, _CELNET_ROWS),),
        counts=(600, 150, 200),
        size=128,
    ),
    "compsegnet": StudySpec(
        title="CompSegNet on synthetic spectral spots (seed 004)",
        kind="spectral",
        main="main",
        models={
            "main": ModelPlan("compsegnet", lr=1e-3, epochs=20, batch_size=7),
            "baseline": ModelPlan("resnet18", lr=1e-3, epochs=20, batch_size=16),
        },
        tables=(
            TableSpec(
                "tumor",
                0.35,
                (
                    MapSpec("CompSegNet activation map", "main", segment=True),
                    MapSpec("ResNet-18 + CAM", "baseline", method="cam"),
                    MapSpec("ResNet-18 + Grad-CAM", "baseline", method="gradcam"),
                ),
            ),
        ),
        counts=(100, 20, 40),
        size=64,
        channels=128,
    ),
}


def compute_maps(model: nn.Module, architecture: str, spec: MapSpec, x: torch.Tensor, batch: int = 16) -> np.ndarray:
    """(N, H, W) float32 maps in [0, 1] of ``spec`` for network input ``x``, computed ``batch`` images at a time."""
    model = model.eval()
    out = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        if spec.fdfm:
            with torch.no_grad():
                maps, _ = model.fdfm(chunk, **ABLATIONS[spec.fdfm])
        elif spec.segment:
            with torch.no_grad():
                maps = model.segment(chunk)
        else:
            layers = get_spec(architecture).layers(model)
            with get_method(spec.method or "cam")(model, layers) as explainer:
                maps = torch.from_numpy(explainer(chunk).maps)
        out.append(maps.detach().float().clamp(0.0, 1.0).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *x.shape[-2:]), np.float32)


def score_rows(
    trained: dict[str, tuple[ModelInfo, nn.Module]],
    data: LocalizationSet,
    table: TableSpec,
    *,
    bootstrap: int = 500,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """One table on the test split: a row per map spec with image AUC (the model's registered test AUC), pixel AUC
    (CI over images), best Dice and its threshold, the FCN scores, Dice and region precision/recall at the table's
    threshold; and the maps, for the examples."""
    positive = data.rows("test")["label"].to_numpy() == 1
    x, _ = data.tensors("test")
    masks = [mask_labels(m) for m in data.masks("test", table.mask_set)[positive]]
    rows, all_maps = [], {}
    for spec in table.rows:
        info, model = trained[spec.model]
        maps = compute_maps(model, info.architecture, spec, x[positive])
        all_maps[spec.label] = maps
        report = score_maps(list(maps), masks, threshold=table.threshold, bootstrap=bootstrap, seed=seed)
        at, loc = report["at_threshold"], report["localization"]
        rows.append(
            {
                "row": spec.label,
                "model": info.name,
                "architecture": info.architecture,
                "map": spec.describe(),
                "image_auc": info.metrics.get("test_auc"),
                "pixel_auc": report["pixel_auc"]["estimate"],
                "pixel_auc_ci": report["pixel_auc"]["ci"],
                "best_dice": report["dice"]["dice"],
                "best_dice_threshold": report["dice"]["best_threshold"],
                "threshold": table.threshold,
                "mean_acc": at["mean_acc"],
                "mean_iu": at["mean_iu"],
                "fw_iu": at["fw_iu"],
                "dice": at["dice"],
                "precision": loc["precision"],
                "recall": loc["recall"],
            }
        )
    return rows, all_maps


def _display(data: LocalizationSet, raw: np.ndarray) -> np.ndarray:
    """What a person sees of a stored image: grey levels in [0, 1] (spectra: the mean absorbance, stretched)."""
    if data.kind == "cle":
        return raw.astype(np.float32) / 255.0
    mean = raw.mean(axis=0)
    low, high = np.percentile(mean, [1, 99])
    return np.clip((mean - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def _write_examples(
    data: LocalizationSet, table: TableSpec, maps: dict[str, np.ndarray], folder: Path
) -> list[dict[str, Any]]:
    """Overlays of each row's map (``maps``: one stack per row, over the positive test images in order) on the first
    positive test images, with the image and its mask."""
    rows_frame = data.rows("test")
    positive = np.flatnonzero(rows_frame["label"].to_numpy() == 1)[:_EXAMPLES]
    raw = data.raw("test")
    masks = data.masks("test", table.mask_set)
    root = workspace_dir()
    examples = []
    for order, index in enumerate(positive):
        image_id = str(rows_frame["image_id"][index])
        shown = _display(data, raw[index])
        base = folder / table.mask_set / image_id
        write_atomic(base / "image.png", png_bytes(np.round(shown * 255).astype(np.uint8)))
        write_atomic(base / "mask.png", png_bytes(masks[index]))
        entry = {
            "image_id": image_id,
            "image": (base / "image.png").relative_to(root).as_posix(),
            "mask": (base / "mask.png").relative_to(root).as_posix(),
            "maps": {},
        }
        for number, (label, stack) in enumerate(maps.items()):
            path = base / f"map-{number:02d}.png"
            write_atomic(path, png_bytes(overlay(shown, stack[order], alpha=0.5)))
            entry["maps"][label] = path.relative_to(root).as_posix()
        examples.append(entry)
    return examples


def run_study(
    study: str,
    *,
    data_dir: str | Path | None = None,
    counts: tuple[int, int, int] | None = None,
    size: int | None = None,
    channels: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    bootstrap: int = 500,
    prefix: str | None = None,
    database: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = print_progress,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run one study end to end (module docstring) and store its tables with the seed model; returns the stored
    report. ``data_dir`` reuses a set on disk (or is where a new one is written; default: the workspace's
    ``datasets/<kind>-<size>px-seed<seed>``); ``counts``/``size``/``channels``/``epochs`` shrink it for tests.
    ``overrides`` patches a model plan's fields by key (e.g. ``{"main": {"lr": 0.05}}``)."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; expected one of {', '.join(STUDIES)}")
    spec = STUDIES[study]
    size = size or spec.size
    channels = channels or spec.channels
    init_db(database)
    root = Path(data_dir) if data_dir else workspace_dir() / "datasets" / f"{spec.kind}-{size}px-seed{seed}"
    if (root / "dataset.json").is_file():
        data = read_set(root)
        if data.kind != spec.kind:
            raise ValueError(f"{root} holds a {data.kind} set; the {study} study needs {spec.kind}")
        log(f"using the {data.kind} set in {root}")
    else:
        log(f"writing a synthetic {spec.kind} set to {root}")
        data = generate_set(
            spec.kind, root, counts=counts or spec.counts, size=size, channels=channels, seed=seed, overwrite=False
        )
    stamp = prefix or f"{KINDS[spec.kind]}-{study}-{datetime.now():%Y%m%d-%H%M%S}"
    trained: dict[str, tuple[ModelInfo, nn.Module]] = {}
    for key, plan in spec.models.items():
        plan = replace(plan, **(overrides or {}).get(key, {}))
        config = TrainConfig(
            architecture=plan.architecture,
            epochs=epochs or plan.epochs,
            batch_size=plan.batch_size,
            lr=plan.lr,
            augment=plan.augment,
            seed=seed,
            model_kwargs=dict(plan.model_kwargs),
        )
        trained[key] = train_on_set(config, data, name=f"{stamp}-{key}", database=database, log=log, progress=progress)
    main_info = trained[spec.main][0]
    folder = workspace_dir() / "models" / main_info.name / "examples"
    tables = []
    for table in spec.tables:
        log(f"scoring maps against the {table.mask_set} masks at threshold {table.threshold}")
        rows, maps = score_rows(trained, data, table, bootstrap=bootstrap, seed=seed)
        tables.append(
            {
                "mask_set": table.mask_set,
                "threshold": table.threshold,
                "rows": rows,
                "examples": _write_examples(data, table, maps, folder),
            }
        )
    report = {
        "study": study,
        "title": spec.title,
        "models": {key: info.name for key, (info, _) in trained.items()},
        "tables": tables,
        "scored_on": "positive test images (segmentation); all test images (image AUC)",
    }
    with session_scope(database) as session:
        report["evaluation_id"] = repo.add_evaluation(
            session, main_info.id, title=spec.title, dataset=data.describe(), report=jsonable(report)
        )
    return report
