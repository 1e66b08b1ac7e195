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
- ``celnet`` (seed 001, Table 3): CELNet + CELM, without the attention module, with CBAM in its place (Table 1),
  without deep supervision, CELNet + Grad-CAM, against ResNet-18 + Grad-CAM and ResNet-18 + backprop saliency (the
  plain gradient, ``gradient``), on the same CLE frames (the paper's "large nucleus and hypercellularity" evidence),
  region precision and recall by the 75 % rule at threshold 0.5. Every model trains by the paper's recipe with its
  PCam rotations and flips; each CELNet's CELM alpha and beta are chosen on the validation split
  (:func:`tune_celm`), stored in its checkpoint and recorded under ``celm_weights``; ``classification`` holds Table
  1 (each model's test accuracy, AUC and parameter count). ``celnet-slides`` (seed 001, Table 2: slide AUC and
  FROC on large synthetic slides) is :mod:`services.slides`.
- ``compsegnet`` (seed 004): the U-Net's activation map thresholded at 0.35 against CAM on ResNet-18 with the same
  many-channel input, on spectral spots; the sample-level ROC is over the tumor fraction. CompSegNet trains and
  maps with the background masked in its input (``ModelPlan.mask_background``), so its pooling neuron counts tissue
  pixels only (section 2). Each row also gets Dice per cancer spot (mean and SD, section 4), and the table the
  paper's Figure S3 -- the ROC of the spots' share of tissue pixels at or above the threshold, over every test spot
  -- and the pixel ROC behind the pixel AUC, each as CSV and plotly JSON (:func:`spot_figures`).
- ``rcm`` (seed 002, Table 2): an EfficientNet-B2 patch classifier trained on patches labelled by their centre pixel,
  slid over whole held-out mosaics (:mod:`core.heatmaps.mosaic`): CAM at several steps, with and without the
  Gaussian weighting, Score-CAM, CAM by the fast mode the Diagnose page runs, the windows' probabilities alone (no
  CAM: what a CAM must beat to add localisation), and CAM of a ResNet-18 trained on the same patches. Mosaics are
  drawn from the seed (:func:`core.data.synth_rcm.make_rcm_mosaic`), not kept as a set; every scored mosaic is held
  out from training, and the image-level AUC is the patch AUC on one of them.
- ``rcm-grid`` (seed 002, Table 2 whole and Fig. 11): the same B2's CAM and Score-CAM at steps 25, 50 and 100 px of
  a 256 px window (scaled with the window) and sigma none, 1, 2.5, 5-10, 54 rows; each (method, step) is one pass
  over the windows stitched with all nine sigmas (:mod:`core.heatmaps.mosaic_sigmas`).

Every mosaic row also holds each test mosaic's own pixel AUC and Dice (``mosaic_auc``, ``mosaic_dice`` at the row's
best pooled threshold; None where a mosaic holds one class, as the paper's Figs. 9-10) and its model's patch accuracy
at 0.5 (:func:`mosaic_patch_accuracy`); the table's figure ``bootstrap_roc`` is Fig. 11, the mean pixel ROC of the
best CAM and Score-CAM rows over bootstrap resamples of the test mosaics with its 95 % band
(:func:`core.metrics.localization.bootstrap_pixel_roc`). Best Dice is over thresholds 0, 0.02, ..., 1 as the paper's.

Segmentation scores are computed on the positive held-out images (the papers' segmentation sets are annotated
diagnostic or cancer images); image-level AUCs use every held-out image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from scipy.special import expit
from torch import nn

from core.data.localization_set import KINDS, MISLABELLED, LocalizationSet, generate_set, read_set
from core.data.store import png_bytes, write_atomic
from core.data.synth_rcm import POSITIVE, make_rcm_mosaic, mosaic_seeds, sample_patches
from core.data.synth_spectral import tissue_mask
from core.heatmaps import get_method, method_title, overlay
from core.heatmaps.celm import WeightSearch, search_weights
from core.heatmaps.mosaic import MosaicResult, stitch_mosaic, window_probability_map
from core.heatmaps.mosaic_sigmas import stitch_sigmas
from core.metrics.localization import (
    bootstrap_pixel_roc,
    dice_per_image,
    fraction_above,
    mask_labels,
    pixel_auc,
    pixel_roc,
    roc_points,
    score_maps,
)
from core.models import get_spec
from core.models.compsegnet import mask_background
from core.models.mlcam import ABLATIONS
from core.settings import workspace_dir
from core.stats.report import jsonable
from core.train import DATASET_TASKS, Progress, TrainConfig, fit, predict_logits
from db import repo
from db.repo import ModelInfo
from db.session import init_db, session_scope
from services.jobs.context import claim
from services.training import check_model_name, default_name, print_progress, register_trained

__all__ = [
    "MOSAIC_STUDIES",
    "STUDIES",
    "MapSpec",
    "ModelPlan",
    "MosaicMapSpec",
    "MosaicStudySpec",
    "StudySpec",
    "TableSpec",
    "classification_rows",
    "compute_maps",
    "mosaic_patch_accuracy",
    "per_mosaic_scores",
    "run_mosaic_study",
    "run_study",
    "score_rows",
    "spot_figures",
    "study_titles",
    "train_on_set",
    "tune_celm",
    "write_example",
]

_EXAMPLES = 4


def train_on_set(
    config: TrainConfig,
    data: LocalizationSet,
    *,
    name: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = None,
    tune: Callable[[nn.Module, LocalizationSet], dict[str, Any]] | None = None,
) -> tuple[ModelInfo, nn.Module]:
    """Train on the set's train split by the architecture's recipe, keep the threshold chosen on val, score the test
    split's image-level AUC, save and register. The config's task, modality, channels and size follow the set.
    ``tune(model, data)``, when given, runs before registering and returns builder options chosen on val (CELM's
    alpha and beta, :func:`tune_celm`), stored in the checkpoint's ``model_kwargs`` and set on the model."""
    task = next(t for t, kind in DATASET_TASKS.items() if kind == data.kind)
    config = replace(config, task=task, modality=data.modality, in_chans=data.channels, image_size=data.size)
    name = name or default_name(config)
    check_model_name(name)
    train, val = data.tensors("train"), data.tensors("val")
    log(f"training {config.architecture} ({name}) on {len(train[1])} {data.modality} images of {data.size} px")
    result = fit(config, *train, *val, progress=progress)
    if tune is not None:
        chosen = tune(result.model, data)
        config = replace(config, model_kwargs={**config.model_kwargs, **chosen})
        for option, value in chosen.items():
            setattr(result.model, option, value)
    extra: dict[str, Any] = {"dataset": data.describe()}
    if data.channel_mean is not None:
        extra.update(channel_mean=data.channel_mean.tolist(), channel_std=data.channel_std.tolist())
    info = register_trained(config, result, name, data.tensors("test"), log=log, extra_config=extra)
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
    title: str | None = None  # how the map column names it, when the method's title would not say

    def describe(self) -> str:
        if self.title:
            return self.title
        if self.fdfm:
            return f"final DFM, {self.fdfm}"
        if self.segment:
            return "activation map (sigmoid output)"
        return method_title(self.method or "cam")


@dataclass(frozen=True)
class TableSpec:
    """One table: the maps of ``rows`` against the ``mask_set`` masks at ``threshold``, on the images of ``split``
    that hold the feature (the positives; every image of the ``mislabelled`` split), the first ``limit`` of them;
    ``title`` names the paper's set (seed 000's Set1-Set4)."""

    mask_set: str
    threshold: float
    rows: tuple[MapSpec, ...]
    split: str = "test"
    title: str | None = None
    limit: int | None = None

    @property
    def key(self) -> str:
        """The table's name in folders and logs: its set's title, else its mask set."""
        return self.title or self.mask_set

    def scored(self, data: LocalizationSet) -> np.ndarray:
        """Indices of the images of ``split`` this table scores."""
        labels = data.rows(self.split)["label"].to_numpy()
        chosen = np.arange(len(labels)) if self.split == MISLABELLED else np.flatnonzero(labels == 1)
        return chosen[: self.limit]


@dataclass(frozen=True)
class ModelPlan:
    """A model a study trains: architecture, builder options, and training settings scaled to a CPU run."""

    architecture: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-3
    epochs: int = 12
    batch_size: int = 16
    augment: bool = False
    recipe: str | None = None  # None: the architecture's own
    weight_decay: float | None = None  # None: the recipe's own
    mask_background: bool = False  # spectral sets: NaN spectra where no sample is, in this model's input (seed 004)
    noise: float = 0.0  # augmentation noise, max SD in [0, 1] grey levels (TrainConfig.noise; seed 002)
    blur: float = 0.0  # augmentation blur, max SD in px (TrainConfig.blur; seed 002)
    context: int = 0  # mosaic studies: px of mosaic around each training window (services.mosaic, whole-trunk parity)

    def config(self, *, epochs: int | None, seed: int, **fields: Any) -> TrainConfig:
        """The training config of this plan (``epochs`` overrides the plan's; ``fields`` set the data's task etc.)."""
        return TrainConfig(
            architecture=self.architecture,
            epochs=epochs or self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            recipe=self.recipe,
            augment=self.augment,
            noise=self.noise,
            blur=self.blur,
            seed=seed,
            model_kwargs=dict(self.model_kwargs),
            **fields,
        )


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
    mislabelled: int = 0  # images holding the feature but labelled negative, scored only (seed 000's Set4)


# Seed 000's Table 2: M1 (MLGAP, its own network), M2-M9 as variants of the trained MLCAM-LICI, M4-M9 also as the
# single-depth networks MLCAM_k trained alone (the paper trained every ablated model), M10 a ResNet-18 with CAM.
_SINGLE_DEPTH = {
    name: f"depth{options['layers'][0] + 1}" for name, options in ABLATIONS.items() if len(options["layers"]) == 1
}
_MLCAM_ROWS = (
    MapSpec("M1 (MLGAP)", "mlgap", method="mlcam-lici", title="combined DFM (MLGAP: CAMs merged before one GAP)"),
    *(MapSpec(name, "main", fdfm=name) for name in ABLATIONS),
    *(MapSpec(f"{name}, trained alone", key, fdfm=name) for name, key in _SINGLE_DEPTH.items()),
    MapSpec("M10 (ResNet-18 + CAM)", "baseline", method="cam"),
    MapSpec("ResNet-18 + Grad-CAM", "baseline", method="gradcam"),
)
# Seed 000's sets: Set1 (30 training images), Set2 (validation, intermediate and restrictive features), Set3 (test),
# Set4 (frames with features labelled nondiagnostic); the test split's restrictive table is kept as well.
_MLCAM_TABLES = (
    TableSpec("intermediate", 0.03, _MLCAM_ROWS, split="train", title="Set1", limit=30),
    TableSpec("intermediate", 0.03, _MLCAM_ROWS, split="val", title="Set2-I"),
    TableSpec("restrictive", 0.2, _MLCAM_ROWS, split="val", title="Set2-R"),
    TableSpec("intermediate", 0.03, _MLCAM_ROWS, split="test", title="Set3"),
    TableSpec("restrictive", 0.2, _MLCAM_ROWS, split="test", title="Set3-R"),
    TableSpec("intermediate", 0.03, _MLCAM_ROWS, split=MISLABELLED, title="Set4"),
)
_MLCAM_PLAN = {"lr": 0.01, "epochs": 12, "batch_size": 16}

_CELNET_ROWS = (
    MapSpec("CELNet + CELM (ours)", "main", method="celm"),
    MapSpec("CELNet w/o MAM + CELM", "no_mam", method="celm"),
    MapSpec("CELNet w/o MAM + CBAM + CELM", "cbam", method="celm"),
    MapSpec("CELNet w/o DS + CELM", "no_ds", method="celm"),
    MapSpec("CELNet + Grad-CAM", "main", method="gradcam"),
    MapSpec("ResNet-18 + Grad-CAM", "baseline", method="gradcam"),
    MapSpec("ResNet-18 + Backprop", "baseline", method="gradient"),
)

# Seed 001 trains every model it compares the same way (section 3: "all models are trained using binary cross-entropy
# ... SGD with Nesterov momentum", PCam's rotations and flips): the celnet recipe, augmentation on.
_CELNET_PLAN = {"lr": 0.01, "epochs": 12, "batch_size": 32, "augment": True}

# A ResNet-18 trained by a seed's SGD recipe needs a higher rate than the seed's small network in a run this short:
# 240 synthetic CLE frames of 64 px, 8 epochs, test AUC 0.72 / 0.82 / 0.97 at rates 0.01 / 0.05 / 0.1 by the mlcam
# recipe (Adam by the FL-CNN recipe: 0.97), 0.86 / 0.995 at 0.01 / 0.05 by the celnet recipe with augmentation. The
# baselines keep their seed's optimiser, schedule and kept epoch, at the rate that trains them.
MLCAM_BASELINE_LR = 0.1
CELNET_BASELINE_LR = 0.05

STUDIES: dict[str, StudySpec] = {
    "mlcam": StudySpec(
        title="MLCAM-LICI ablation on synthetic CLE frames (seed 000, Table 2)",
        kind="cle",
        main="main",
        models={
            "main": ModelPlan("mlcam_lici", **_MLCAM_PLAN),
            "mlgap": ModelPlan("mlcam_lici", {"pooling": "combined"}, **_MLCAM_PLAN),
            **{f"depth{k}": ModelPlan("mlcam_lici", {"depth": k}, **_MLCAM_PLAN) for k in (1, 2, 3)},
            # "All models were trained and tested on the same data with the same parameters": the seed's recipe
            "baseline": ModelPlan("resnet18", recipe="mlcam", **{**_MLCAM_PLAN, "lr": MLCAM_BASELINE_LR}),
        },
        tables=_MLCAM_TABLES,
        counts=(600, 150, 200),
        size=128,
        mislabelled=55,
    ),
    "celnet": StudySpec(
        title="CELNet + CELM ablation on synthetic CLE frames (seed 001, Table 3)",
        kind="cle",
        main="main",
        models={
            "main": ModelPlan("celnet", **_CELNET_PLAN),
            "no_mam": ModelPlan("celnet", {"attention": False}, **_CELNET_PLAN),
            "cbam": ModelPlan("celnet", {"attention": "cbam"}, **_CELNET_PLAN),
            "no_ds": ModelPlan("celnet", {"deep_supervision": False}, **_CELNET_PLAN),
            "baseline": ModelPlan("resnet18", recipe="celnet", **{**_CELNET_PLAN, "lr": CELNET_BASELINE_LR}),
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
            # The compsegnet recipe starts RMSprop gently (TensorFlow's decay 0.9, a 4-epoch linear warm-up; see
            # core.models.compsegnet, "Recipe"): at PyTorch's decay 0.99 and a constant 1e-3 the first steps (10 x lr)
            # saturated the map on seeds 2 (all on) and 4 (all off). Dice per cancer spot at .35, mean +- SD over the
            # 20 test spots, seeds 0 / 1 / 2 / 3 / 4, before: .840 +- .111 / .867 +- .086 / .566 +- .164 (collapsed) /
            # .868 +- .136 / 0 (collapsed); after: .873 +- .076 / .829 +- .151 / .882 +- .085 / .844 +- .149 /
            # .849 +- .116. A 1-epoch warm-up alone (decay 0.99) collapsed seeds 0 and 1 (all off); decay 0.9 with a
            # 1-epoch warm-up still collapsed seed 4 (all off, about step 27).
            "main": ModelPlan("compsegnet", lr=1e-3, epochs=20, batch_size=7, mask_background=True),
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
    inputs: dict[str, LocalizationSet] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """One table on its split's images with the feature (:meth:`TableSpec.scored`): a row per map spec of a trained
    model with image AUC (the model's registered test AUC), pixel AUC (CI over images), best Dice and its threshold,
    the FCN scores, Dice and region precision/recall at the table's threshold; and the maps, for the examples.
    ``inputs`` gives a model key the set its input comes from, as in its training (:func:`background_masked`); the
    others read ``data``. Rows of models not in ``trained`` are left out."""
    scored = table.scored(data)
    masks = [mask_labels(m) for m in data.masks(table.split, table.mask_set)[scored]]
    rows, all_maps = [], {}
    for spec in table.rows:
        if spec.model not in trained:
            continue
        info, model = trained[spec.model]
        x = _test_input(data, inputs, spec.model, table.split)
        maps = compute_maps(model, info.architecture, spec, x[scored])
        all_maps[spec.label] = maps
        report = score_maps(list(maps), masks, threshold=table.threshold, bootstrap=bootstrap, seed=seed)
        rows.append(_table_row(spec.label, spec.describe(), info, table.threshold, report))
    return rows, all_maps


def _test_input(
    data: LocalizationSet, inputs: dict[str, LocalizationSet] | None, key: str, split: str = "test"
) -> torch.Tensor:
    """A split's network input for the model ``key``: from its own set in ``inputs``, else from ``data``."""
    return (inputs or {}).get(key, data).tensors(split)[0]


class _BackgroundMaskedSet(LocalizationSet):
    """A spectral set whose network input is NaN wherever no sample is (seed 004, section 2: spectra "not covered by
    sample were masked as background"); :func:`core.models.compsegnet.tissue_of` reads it, so CompSegNet's pooling
    neuron counts tissue pixels only while the training loop still passes images alone. The background is the
    unlabeled part of the set's first mask set: it says where a sample is, never where tumor is."""

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().tensors(split)
        tissue = np.stack([tissue_mask(m) for m in self.masks(split, self.mask_sets[0])])
        return mask_background(x, torch.from_numpy(tissue)), y

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "input": "background (no sample) spectra masked as NaN; pooled over tissue"}


def background_masked(data: LocalizationSet) -> LocalizationSet:
    """``data`` with its network input masked as background (NaN) where its masks have no sample (seed 004)."""
    if data.kind != "spectral":
        raise ValueError(f"only spectral sets have a background to mask, not {data.kind} sets")
    return _BackgroundMaskedSet(**{f.name: getattr(data, f.name) for f in fields(LocalizationSet)})


def spot_figures(
    trained: dict[str, tuple[ModelInfo, nn.Module]],
    data: LocalizationSet,
    table: TableSpec,
    folder: Path,
    *,
    inputs: dict[str, LocalizationSet] | None = None,
    max_points: int = 1000,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Seed 004's per-spot evaluation of a spectral table on its split, for every row of a trained model (each
    model maps its own input, as in :func:`score_rows`): the columns ``dice_spot_mean``, ``dice_spot_sd`` and
    ``dice_spots`` (Dice of ``map >= threshold`` per cancer spot, its mean and sample SD, section 4: "µ = .42
    (σ = .19)") and ``spot_auc`` (the area of Figure S3), one dict per row; and the figures written under
    ``folder``, as workspace-relative paths:

    - ``spot_roc`` (Figure S3): every spot of the split scored by the share of its tissue pixels at or above the
      table's threshold, the ROC over that share against the spot labels (cancer / cancer-free);
    - ``pixel_roc``: the cancer spots' tissue pixels pooled, map value against tumor mask (the curve of the
      table's pixel AUC), at most ``max_points`` exact points of it.

    Each is a CSV (``row``, ``threshold``, ``fpr``, ``tpr``) and a plotly figure as JSON, one curve per row."""
    labels = data.rows(table.split)["label"].to_numpy() == 1
    masks = [mask_labels(m) for m in data.masks(table.split, table.mask_set)]
    cancer = [masks[i] for i in np.flatnonzero(labels)]
    columns, spot_curves, pixel_curves = [], {}, {}
    for spec in table.rows:
        if spec.model not in trained:  # left out of the table, as in score_rows
            continue
        info, model = trained[spec.model]
        x = _test_input(data, inputs, spec.model, table.split)
        maps = list(compute_maps(model, info.architecture, spec, x))
        cancer_maps = [maps[i] for i in np.flatnonzero(labels)]
        dice = dice_per_image(cancer_maps, cancer, table.threshold)
        spot_curves[spec.label] = roc_points(labels, fraction_above(maps, masks, table.threshold))
        pixel_curves[spec.label] = pixel_roc(cancer_maps, cancer, max_points=max_points)
        columns.append(
            {
                "dice_spot_mean": dice["mean"],
                "dice_spot_sd": dice["sd"],
                "dice_spots": dice["n"],
                "spot_auc": spot_curves[spec.label]["auc"],
            }
        )
    figures = {
        "spot_roc": _write_roc(
            folder / "spot-roc",
            spot_curves,
            f"Spots by their share of tissue pixels at or above {table.threshold:g} (Figure S3)",
            "tumor share threshold",
        ),
        "pixel_roc": _write_roc(
            folder / "pixel-roc", pixel_curves, f"Tissue pixels of the cancer {table.split} spots", "map threshold"
        ),
    }
    figures["spot_roc"]["scored_on"] = f"{labels.size} {table.split} spots ({int(labels.sum())} cancer)"
    figures["pixel_roc"]["scored_on"] = f"tissue pixels of the {int(labels.sum())} cancer {table.split} spots"
    return columns, figures


def _write_roc(base: Path, curves: dict[str, dict[str, Any]], title: str, threshold_name: str) -> dict[str, Any]:
    """``base``.csv and ``base``.plotly.json: the curves (row label -> :func:`roc_points` result); returns their
    workspace-relative paths, the title and each row's AUC."""
    frame = pd.DataFrame(
        [
            {"row": label, "threshold": t, "fpr": f, "tpr": r}
            for label, curve in curves.items()
            for t, f, r in zip(curve["thresholds"], curve["fpr"], curve["tpr"], strict=True)
        ],
        columns=["row", "threshold", "fpr", "tpr"],
    )
    figure = go.Figure(
        [
            go.Scatter(x=curve["fpr"], y=curve["tpr"], mode="lines", name=_roc_name(label, curve["auc"]))
            for label, curve in curves.items()
        ]
    )
    figure.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot", "color": "grey"})
    written = _write_roc_files(base, frame, figure, title, f"row (AUC); {threshold_name} varied")
    return {**written, "auc": {label: curve["auc"] for label, curve in curves.items()}}


def _write_roc_files(base: Path, frame: pd.DataFrame, figure: go.Figure, title: str, legend: str) -> dict[str, str]:
    """An ROC figure's axes and titles set, then written as ``base``.csv (``frame``) and ``base``.plotly.json;
    its title and the workspace-relative paths, for the table's ``figures``."""
    figure.update_layout(
        title=title,
        xaxis={"title": "false positive rate", "range": [0, 1], "constrain": "domain"},
        yaxis={"title": "true positive rate", "range": [0, 1], "scaleanchor": "x"},
        legend={"title": {"text": legend}},
    )
    csv, plot = base.with_suffix(".csv"), base.with_suffix(".plotly.json")
    write_atomic(csv, frame.to_csv(index=False).encode())
    write_atomic(plot, figure.to_json().encode())
    root = workspace_dir()
    return {"title": title, "csv": csv.relative_to(root).as_posix(), "figure": plot.relative_to(root).as_posix()}


def _roc_name(label: str, value: float | None) -> str:
    return f"{label} (AUC {value:.3f})" if value is not None else f"{label} (AUC undefined)"


def _table_row(
    label: str, described: str, info: ModelInfo, threshold: float, report: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """One stored table row: which model and map, the model's image AUC (its registered test AUC), and the
    :func:`core.metrics.localization.score_maps` figures of its maps; ``extra`` columns go after the map's name."""
    at, loc = report["at_threshold"], report["localization"]
    return {
        "row": label,
        "model": info.name,
        "architecture": info.architecture,
        "map": described,
        **extra,
        "image_auc": info.metrics.get("test_auc"),
        "pixel_auc": report["pixel_auc"]["estimate"],
        "pixel_auc_ci": report["pixel_auc"]["ci"],
        "best_dice": report["dice"]["dice"],
        "best_dice_threshold": report["dice"]["best_threshold"],
        "threshold": threshold,
        "mean_acc": at["mean_acc"],
        "mean_iu": at["mean_iu"],
        "fw_iu": at["fw_iu"],
        "dice": at["dice"],
        "precision": loc["precision"],
        "recall": loc["recall"],
    }


# --- seed 001: CELM's fusion weights chosen on validation, and Table 1 -----------------------------------------------


def _celm_tuner(
    spec: StudySpec, key: str, searches: dict[str, Any], log: Callable[[str], None]
) -> Callable[[nn.Module, LocalizationSet], dict[str, Any]] | None:
    """For a model that a CELM row of ``spec`` maps, the search of its alpha and beta on val against the first such
    row's table (its masks and threshold), recorded in ``searches[key]``; None for every other model."""
    table = next((t for t in spec.tables for row in t.rows if row.model == key and row.method == "celm"), None)
    if table is None:
        return None

    def tune(model: nn.Module, data: LocalizationSet) -> dict[str, Any]:
        search = tune_celm(model, data, table.mask_set, table.threshold)
        if search is None:
            log("no positive validation image: CELM keeps alpha = beta = 0.5")
            return {}
        searches[key] = search.record()
        log(f"CELM fusion weights chosen on val: alpha {search.alpha:g}, beta {search.beta:g}")
        return {"celm_alpha": search.alpha, "celm_beta": search.beta}

    return tune


def tune_celm(model: nn.Module, data: LocalizationSet, mask_set: str, threshold: float) -> WeightSearch | None:
    """CELM's alpha and beta for ``model`` chosen on the positive validation images of ``data`` against their
    ``mask_set`` masks (:func:`core.heatmaps.celm.search_weights`: the grid {0, 0.25, ..., 1}^2, pooled Dice at
    ``threshold``, the table's threshold); None when val has no positive image."""
    positive = data.rows("val")["label"].to_numpy() == 1
    if not positive.any():
        return None
    x, _ = data.tensors("val")
    masks = np.stack([mask_labels(m) for m in data.masks("val", mask_set)[positive]])
    return search_weights(model, get_spec("celnet").layers(model), x[positive], masks, threshold=threshold)


def classification_rows(trained: dict[str, tuple[ModelInfo, nn.Module]]) -> list[dict[str, Any]]:
    """Seed 001's Table 1 for the trained models: test accuracy (at the threshold chosen on val) and AUC, and the
    parameter count, one row per model key."""
    return [
        {
            "model": key,
            "name": info.name,
            "architecture": info.architecture,
            "options": dict((info.config or {}).get("model_kwargs", {})),
            "test_accuracy": info.metrics.get("test_accuracy"),
            "test_auc": info.metrics.get("test_auc"),
            "parameters": int(sum(p.numel() for p in model.parameters())),
        }
        for key, (info, model) in trained.items()
    ]


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
    """Overlays of each row's map (``maps``: one stack per row, over the table's scored images in order) on the first
    of those images, with the image and its mask."""
    rows_frame = data.rows(table.split)
    positive = table.scored(data)[:_EXAMPLES]
    raw = data.raw(table.split)
    masks = data.masks(table.split, table.mask_set)
    return [
        write_example(
            folder / table.key / str(rows_frame["image_id"][index]),
            _display(data, raw[index]),
            masks[index],
            {label: stack[order] for label, stack in maps.items()},
        )
        for order, index in enumerate(positive)
    ]


def write_example(base: Path, shown: np.ndarray, mask: np.ndarray, maps: dict[str, np.ndarray]) -> dict[str, Any]:
    """One example under ``base``: the image as seen (floats in [0, 1]), its mask, and an overlay per map."""
    root = workspace_dir()
    write_atomic(base / "image.png", png_bytes(np.round(shown * 255).astype(np.uint8)))
    write_atomic(base / "mask.png", png_bytes(mask))
    entry = {
        "image_id": base.name,
        "image": (base / "image.png").relative_to(root).as_posix(),
        "mask": (base / "mask.png").relative_to(root).as_posix(),
        "maps": {},
    }
    for number, (label, heatmap) in enumerate(maps.items()):
        path = base / f"map-{number:02d}.png"
        write_atomic(path, png_bytes(overlay(shown, heatmap, alpha=0.5)))
        entry["maps"][label] = path.relative_to(root).as_posix()
    return entry


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
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = print_progress,
    overrides: dict[str, dict[str, Any]] | None = None,
    models: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run one study end to end (module docstring) and store its tables with the seed model; returns the stored
    report. ``data_dir`` reuses a set on disk (or is where a new one is written; default: the workspace's
    ``datasets/<kind>-<size>px-seed<seed>``); ``counts``/``size``/``channels``/``epochs`` shrink it for tests.
    ``overrides`` patches a model plan's fields by key (e.g. ``{"main": {"lr": 0.05}}``; callers taking them from
    users check them first, :func:`check_overrides`); ``models`` trains only those plans (and the main one), the
    rows of the others left out. Slide studies
    (:data:`services.slides.SLIDE_STUDIES`) run :func:`services.slides.run_slide_study` with the same arguments."""
    from services.slides import SLIDE_STUDIES, run_slide_study  # services.slides imports this module

    if study in SLIDE_STUDIES:
        options = {"data_dir": data_dir, "counts": counts, "size": size, "epochs": epochs, "seed": seed}
        return run_slide_study(
            study, **options, prefix=prefix, log=log, progress=progress, overrides=overrides, models=models
        )
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; expected one of {', '.join(study_titles())}")
    spec = STUDIES[study]
    unknown = set(models or ()) - set(spec.models)
    if unknown:
        raise ValueError(
            f"the {study} study trains no model {', '.join(sorted(unknown))}; its models: {', '.join(spec.models)}"
        )
    size = size or spec.size
    channels = channels or spec.channels
    init_db()
    root = Path(data_dir) if data_dir else workspace_dir() / "datasets" / f"{spec.kind}-{size}px-seed{seed}"
    if (root / "dataset.json").is_file():
        data = read_set(root)
        if data.kind != spec.kind:
            raise ValueError(f"{root} holds a {data.kind} set; the {study} study needs {spec.kind}")
        log(f"using the {data.kind} set in {root}")
    else:
        log(f"writing a synthetic {spec.kind} set to {root}")
        # the scored-only mislabelled images (Set4) scale with the test split when a study is shrunk
        mislabelled = spec.mislabelled if not counts else max(2, round(spec.mislabelled * counts[2] / spec.counts[2]))
        data = generate_set(
            spec.kind, root, counts=counts or spec.counts, size=size, channels=channels, seed=seed, overwrite=False,
            mislabelled=mislabelled if spec.mislabelled else 0,
        )  # fmt: skip
    stamp = prefix or f"{KINDS[spec.kind]}-{study}-{datetime.now():%Y%m%d-%H%M%S}"
    trained: dict[str, tuple[ModelInfo, nn.Module]] = {}
    searches: dict[str, Any] = {}  # CELM's alpha and beta chosen on val, per model key (seed 001)
    inputs = {key: background_masked(data) for key, plan in spec.models.items() if plan.mask_background}
    for key, plan in spec.models.items():
        if models is not None and key not in models and key != spec.main:
            continue
        config = replace(plan, **(overrides or {}).get(key, {})).config(epochs=epochs, seed=seed)
        tune = _celm_tuner(spec, key, searches, log)
        trained[key] = train_on_set(
            config, inputs.get(key, data), name=f"{stamp}-{key}", log=log, progress=progress, tune=tune
        )
    main_info = trained[spec.main][0]
    folder = workspace_dir() / "models" / main_info.name / "examples"
    tables = []
    for table in spec.tables:
        if not len(table.scored(data)):
            log(f"{table.key}: the set has no {table.split} images holding the feature; its table is left out")
            continue
        log(f"scoring maps against the {table.mask_set} masks at threshold {table.threshold} ({table.key})")
        rows, maps = score_rows(trained, data, table, bootstrap=bootstrap, seed=seed, inputs=inputs)
        entry = {
            "mask_set": table.mask_set,
            "threshold": table.threshold,
            "set": table.title,
            "split": table.split,
            "n_images": len(table.scored(data)),
            "rows": rows,
        }
        if spec.kind == "spectral":
            figures = workspace_dir() / "models" / main_info.name / "figures" / table.mask_set
            columns, entry["figures"] = spot_figures(trained, data, table, figures, inputs=inputs)
            entry["rows"] = [{**row, **extra} for row, extra in zip(rows, columns, strict=True)]
        entry["examples"] = _write_examples(data, table, maps, folder)
        tables.append(entry)
    report = {
        "study": study,
        "title": spec.title,
        "models": {key: info.name for key, (info, _) in trained.items()},
        "tables": tables,
        "scored_on": "each table's images holding the feature: its split's positives, every mislabelled image "
        "(segmentation); all test images (image AUC)",
        "classification": classification_rows(trained),
    }
    if searches:
        report["celm_weights"] = searches
    with session_scope() as session:
        report["evaluation_id"] = repo.add_evaluation(
            session, main_info.id, title=spec.title, dataset=data.describe(), report=jsonable(report)
        )
        claim(session, evaluations=[report["evaluation_id"]])
    return report


_ARCHITECTURE_TITLES = {"efficientnet_b2": "EfficientNet-B2", "resnet18": "ResNet-18", "tiny_cnn": "tiny CNN"}


@dataclass(frozen=True)
class MosaicMapSpec:
    """One row of the mosaic table: a trained patch classifier's map stitched over each held-out mosaic.

    ``method`` is a heatmap method, or ``probability`` for the windows' probabilities alone (no CAM,
    :func:`core.heatmaps.mosaic.window_probability_map`); ``step`` is a fraction of the window, or None for the
    study's slow step (the one Score-CAM affords; its CAM twin uses it too, so the two compare like for like)."""

    model: str
    method: str = "cam"
    mode: str = "exact"
    step: float | None = 0.25
    sigma: float | None = 5.0
    share: int | None = 16  # fast mode: the stride up to which the trunk is shared; None: the whole trunk

    def step_px(self, window: int, slow_step: int) -> int:
        return slow_step if self.step is None else max(1, round(self.step * window))

    def label(self, architecture: str, step: int, context: int = 0) -> str:
        title = _ARCHITECTURE_TITLES.get(architecture, architecture)
        if context:
            title += f" (trained with {context} px context)"
        what = "window probability (no CAM)" if self.method == "probability" else method_title(self.method)
        sigma = "no Gaussian" if self.sigma is None else f"σ {self.sigma:g}"
        fast = ""
        if self.mode == "fast":
            fast = (
                ", fast"
                if self.share == 16
                else ", fast, whole trunk"
                if self.share is None
                else f", fast, share {self.share}"
            )
        return f"{title} + {what}, step {step}, {sigma}{fast}"


@dataclass(frozen=True)
class MosaicStudySpec:
    """A study on whole mosaics: patch classifiers trained on patches of ``counts[0]`` mosaics (validation patches
    from ``counts[1]``), their maps scored on ``counts[2]`` other mosaics of ``size`` px against the masks."""

    title: str
    main: str
    models: dict[str, ModelPlan]
    rows: tuple[MosaicMapSpec, ...]
    counts: tuple[int, int, int]
    size: int
    window: int
    patches: int  # per training mosaic
    threshold: float = 0.5
    mask_set: str = "aspecific"


MOSAIC_STUDIES: dict[str, MosaicStudySpec] = {
    "rcm": MosaicStudySpec(
        title="EfficientNet-B2 CAM and Score-CAM stitched over synthetic RCM mosaics (seed 002, Table 2)",
        main="main",
        models={
            # The paper's own recipe ("rcm": SGD, momentum 0.9, decay 0.9 per 10 of 500 epochs) does not train B2
            # from scratch in a CPU budget: validation AUC 0.46-0.61 after 4 epochs at rates 0.02-0.1 and 0.83
            # after 8, against 0.975 after 4 with Adam (1,200 patches of 128 px from 4 mosaics). So Adam (the
            # default recipe) with the paper's dropout and augmentation; the baseline trains the same way.
            "main": ModelPlan("efficientnet_b2", {"drop_rate": 0.75}, lr=1e-3, epochs=8, batch_size=32, augment=True),
            "baseline": ModelPlan("resnet18", lr=1e-3, epochs=8, batch_size=32, augment=True),
            # The same B2 trained with 32 px of mosaic around each window, only the window's feature cells pooled
            # (services.mosaic): its features hold with the whole trunk shared over the mosaic, which the plain
            # network's do not (python -m bench.mosaic --parity: pixel AUC 0.984 vs 0.746, 68 x the loop's speed).
            "context": ModelPlan(
                "efficientnet_b2", {"drop_rate": 0.75}, lr=1e-3, epochs=8, batch_size=32, augment=True, context=32
            ),
        },
        rows=(
            MosaicMapSpec("main", "cam", step=0.25, sigma=None),
            MosaicMapSpec("main", "cam", step=0.25, sigma=5.0),
            MosaicMapSpec("main", "cam", step=0.5, sigma=5.0),
            MosaicMapSpec("main", "cam", step=None, sigma=5.0),
            MosaicMapSpec("main", "scorecam", step=None, sigma=5.0),
            MosaicMapSpec("main", "cam", mode="fast", step=0.25, sigma=5.0),
            MosaicMapSpec("main", "probability", step=0.25, sigma=5.0),
            MosaicMapSpec("baseline", "cam", step=0.25, sigma=5.0),
            MosaicMapSpec("main", "cam", mode="fast", step=0.25, sigma=5.0, share=None),
            MosaicMapSpec("context", "cam", step=0.25, sigma=5.0),
            MosaicMapSpec("context", "cam", mode="fast", step=0.25, sigma=5.0, share=None),
        ),
        counts=(6, 1, 4),
        size=512,
        window=128,
        patches=400,
    ),
    # Table 2 whole: steps 25, 50 and 100 px of a 256 px window (scaled with the window), sigma none, 1, 2.5, 5-10,
    # for CAM and for Score-CAM: 54 rows of one EfficientNet-B2. Every sigma row of a (method, step) comes from one
    # pass over the windows (core.heatmaps.mosaic_sigmas), so the cost is 3 passes per method, and Score-CAM's
    # passes are nearly all of it: 1,408 masked B2 passes per window, measured 7.8 s per 64 px window on one shared
    # CPU core (CAM: 0.7 s per mosaic at step 6). CPU defaults: 64 px windows (steps 6, 12 and 25 px; the B2's CAM is
    # 2 x 2 per window, the stitching makes it finer), 128 px mosaics (121 + 36 + 9 = 166 windows per mosaic; every
    # default mosaic holds both classes), 4 test mosaics for Fig. 11's resamples: 664 Score-CAM windows, about 90 min
    # on one core (nine times that stitched per sigma); --window 256 --size 2048 is the paper's geometry (a GPU's
    # work). B2 on 64 px patches learns slowly: 4 epochs on 4 mosaics reached validation AUC 0.66. The model trains
    # as the rcm study's (Adam, dropout 0.75, flips and jitter; the paper's SGD recipe and its noise and blurring:
    # --set main.recipe=rcm --set main.weight_decay=5e-4 --set main.noise=0.05 --set main.blur=1).
    "rcm-grid": MosaicStudySpec(
        title="EfficientNet-B2 CAM and Score-CAM over synthetic RCM mosaics: steps x Gaussian sigma (seed 002, "
        "Table 2 grid, Fig. 11)",
        main="main",
        models={
            "main": ModelPlan("efficientnet_b2", {"drop_rate": 0.75}, lr=1e-3, epochs=8, batch_size=32, augment=True),
        },
        rows=tuple(
            MosaicMapSpec("main", method, step=step, sigma=sigma)
            for method in ("cam", "scorecam")
            for step in (25 / 256, 50 / 256, 100 / 256)
            for sigma in (None, 1.0, 2.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
        ),
        counts=(6, 1, 4),
        size=128,
        window=64,
        patches=300,
    ),
}


def study_titles() -> dict[str, str]:
    """Every study's name and title, for menus and help."""
    from services.slides import SLIDE_STUDIES  # services.slides imports this module

    return {
        **{k: v.title for k, v in STUDIES.items()},
        **{k: v.title for k, v in MOSAIC_STUDIES.items()},
        **{k: v.title for k, v in SLIDE_STUDIES.items()},
    }


def _split_counts(masks: list[np.ndarray]) -> dict[str, int]:
    return {"images": len(masks), "positive": int(sum(bool((m == POSITIVE).any()) for m in masks))}


def run_mosaic_study(
    study: str = "rcm",
    *,
    counts: tuple[int, int, int] | None = None,
    size: int | None = None,
    window: int | None = None,
    patches: int | None = None,
    slow_step: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    bootstrap: int = 500,
    prefix: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = print_progress,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run a mosaic study end to end (module docstring, ``rcm``, ``rcm-grid``) and store its table with the seed
    model; returns the stored report. ``counts`` (train, val, test mosaics), ``size`` (mosaic side), ``window``
    (patch and window side), ``patches`` (per training mosaic) and ``epochs`` shrink it; ``slow_step`` is the
    Score-CAM rows' step in px (default: one window, no overlap: Score-CAM runs one masked pass per channel, 1,408 for
    EfficientNet-B2, per window). Mosaic seeds: :func:`core.data.synth_rcm.mosaic_seeds`."""
    from services.mosaic import train_patch_classifier  # services.mosaic imports the training service too

    if study not in MOSAIC_STUDIES:
        raise ValueError(f"unknown mosaic study {study!r}; expected one of {', '.join(MOSAIC_STUDIES)}")
    spec = MOSAIC_STUDIES[study]
    n_train, n_val, n_test = counts or spec.counts
    if n_train < 1 or n_val < 1 or n_test < 1:
        raise ValueError("a mosaic study needs at least one training, one validation and one test mosaic")
    size, window = size or spec.size, window or spec.window
    if window > size:
        raise ValueError(f"a {window} px window does not fit a {size} px mosaic; give a smaller --window")
    slow_step = slow_step or window
    init_db()
    seeds = mosaic_seeds((n_train, n_val, n_test), seed)
    log(f"drawing {n_train + n_val + n_test} synthetic RCM mosaics of {size} px (seeds from {seeds['train'][0]})")
    train, val, test = (
        [make_rcm_mosaic(size, size, seed=s) for s in seeds[split]] for split in ("train", "val", "test")
    )
    stamp = prefix or f"RCM-{study}-{datetime.now():%Y%m%d-%H%M%S}"
    trained: dict[str, tuple[ModelInfo, nn.Module]] = {}
    contexts: dict[str, int] = {}
    for key, plan in spec.models.items():
        plan = replace(plan, **(overrides or {}).get(key, {}))
        config = plan.config(epochs=epochs, seed=seed, task="aspecific", modality="RCM", image_size=window)
        contexts[key] = plan.context
        trained[key] = train_patch_classifier(
            config,
            {"train": train, "val": val, "test": test[:1]},  # the patch AUC: patches of the first test mosaic
            name=f"{stamp}-{key}",
            patches_per_mosaic=patches or spec.patches,
            seed=seed,
            context=plan.context,
            log=log,
            progress=progress,
        )
    masks = [mask_labels(mask) for _, mask in test]
    patch_accuracy = {
        key: mosaic_patch_accuracy(model, test, window, patches or spec.patches, seed=seed)
        for key, (_, model) in trained.items()
    }
    # every exact-mode row of one (model, method, step) is one pass over the windows, stitched with all its sigmas
    shared: dict[tuple[str, str, str, int, int | None], list[float | None]] = {}
    for row in spec.rows:
        method = "cam" if row.method == "probability" else row.method
        sigmas = shared.setdefault((row.model, method, row.mode, row.step_px(window, slow_step), row.share), [])
        if row.sigma not in sigmas:
            sigmas.append(row.sigma)
    stitched: dict[tuple[str, str, str, int, int | None], dict[float | None, list[MosaicResult]]] = {}
    rows, maps, methods = [], {}, {}
    for row in spec.rows:
        info, model = trained[row.model]
        step = row.step_px(window, slow_step)
        label = row.label(info.architecture, step, contexts[row.model])
        if label in maps:  # two models of one architecture (a test's tiny stand-ins)
            label = f"{label} [{row.model}]"
        method = "cam" if row.method == "probability" else row.method
        key = (row.model, method, row.mode, step, row.share)
        cache = stitched.setdefault(key, {})
        if row.sigma not in cache:
            sigmas = [row.sigma] if row.mode == "fast" else shared[key]
            once = f" (one pass for its {len(sigmas)} sigma rows)" if len(sigmas) > 1 else ""
            log(f"stitching {label} over {len(test)} mosaics{once}")
            cache.update(_stitch_rows(model, test, key, sigmas, window))
        results = cache[row.sigma]
        stack = [
            window_probability_map(result, size, size) if row.method == "probability" else result.map
            for result in results
        ]
        maps[label] = stack
        methods[label] = (row.model, row.method)
        report = score_maps(stack, masks, threshold=spec.threshold, bootstrap=bootstrap, seed=seed)
        rows.append(
            _table_row(
                label,
                label,
                info,
                spec.threshold,
                report,
                step=step,
                sigma=row.sigma,
                mode=row.mode,
                share=row.share if row.mode == "fast" else None,
                context=contexts[row.model],
                windows=int(results[0].window_probabilities.size),
                seconds=float(np.mean([r.seconds for r in results])),
                stitch_shared_by=1 if row.mode == "fast" else len(shared[key]),
                patch_accuracy=patch_accuracy[row.model]["accuracy"],
                **per_mosaic_scores(stack, masks, report["dice"]["best_threshold"]),
            )
        )
    main_info = trained[spec.main][0]
    best = _best_rows(rows, methods, spec.main)
    figures = workspace_dir() / "models" / main_info.name / "figures" / spec.mask_set
    table: dict[str, Any] = {"mask_set": spec.mask_set, "threshold": spec.threshold, "rows": rows}
    if best:
        curves = {label: bootstrap_pixel_roc(maps[label], masks, bootstrap=bootstrap, seed=seed) for label in best}
        table["figures"] = {"bootstrap_roc": _write_band_roc(figures / "bootstrap-roc", curves, len(test), bootstrap)}
    folder = workspace_dir() / "models" / main_info.name / "examples" / spec.mask_set
    shown = {label: maps[label] for label in best} if best and len(maps) > _EXAMPLE_ROWS else maps
    table["examples"] = _mosaic_examples(test, shown, folder, seeds["test"])
    dataset = {
        "kind": "rcm",
        "modality": "RCM",
        "size": size,
        "window": window,
        "patches_per_mosaic": patches or spec.patches,
        "mask_sets": [spec.mask_set],
        "mosaic_seeds": seeds,
        "splits": {
            "train": _split_counts([m for _, m in train]),
            "val": _split_counts([m for _, m in val]),
            "test": _split_counts([m for _, m in test]),
        },
    }
    report = {
        "study": study,
        "title": spec.title,
        "models": {key: info.name for key, (info, _) in trained.items()},
        "tables": [table],
        "patch_accuracy": patch_accuracy,
        "scored_on": f"{n_test} held-out mosaics, every labeled pixel (pixel AUC CI: bootstrap over mosaics); image "
        "AUC: patches of the first test mosaic; patch accuracy: patches of every test mosaic at probability 0.5",
    }
    with session_scope() as session:
        report["evaluation_id"] = repo.add_evaluation(
            session, main_info.id, title=spec.title, dataset=dataset, report=jsonable(report)
        )
        claim(session, evaluations=[report["evaluation_id"]])
    return report


_EXAMPLE_ROWS = 12  # a table with more rows shows example maps of its Fig. 11 rows only


def _stitch_rows(
    model: nn.Module,
    test: list[tuple[np.ndarray, np.ndarray]],
    key: tuple[str, str, str, int, int | None],
    sigmas: list[float | None],
    window: int,
) -> dict[float | None, list[MosaicResult]]:
    """The stitched maps of the test mosaics for the rows of one (model, method, mode, step, share) ``key`` at
    ``sigmas``, by sigma: exact mode from one pass over each mosaic's windows
    (:func:`core.heatmaps.mosaic_sigmas.stitch_sigmas`), fast mode (one sigma, ``share`` of the trunk) by
    :func:`core.heatmaps.mosaic.stitch_mosaic`."""
    _, method, mode, step, share = key
    batch_size = 4 if method == "scorecam" else 32
    if mode == "fast":
        (sigma,) = sigmas
        options = {"window": window, "step": step, "sigma": sigma, "mode": mode, "method": method, "share": share}
        return {sigma: [stitch_mosaic(model, image, **options, batch_size=batch_size) for image, _ in test]}
    passes = [
        stitch_sigmas(model, image, window=window, step=step, sigmas=sigmas, method=method, batch_size=batch_size)
        for image, _ in test
    ]
    return {sigma: [by_sigma[sigma] for by_sigma in passes] for sigma in sigmas}


def per_mosaic_scores(stack: list[np.ndarray], masks: list[np.ndarray], threshold: float | None) -> dict[str, Any]:
    """Each mosaic's own pixel AUC (None where its mask holds one class only: seed 002, Figs. 9 and 10) and Dice at
    the row's best pooled threshold (None where 0/0), in test order."""
    return {
        "mosaic_auc": [pixel_auc([m], [k], bootstrap=0)["estimate"] for m, k in zip(stack, masks, strict=True)],
        "mosaic_dice": None if threshold is None else dice_per_image(stack, masks, threshold)["per_image"],
        "mosaic_dice_threshold": threshold,
    }


def _best_rows(rows: list[dict[str, Any]], methods: dict[str, tuple[str, str]], main: str) -> list[str]:
    """Seed 002's Fig. 11 rows: the main model's CAM row and its Score-CAM row with the highest pixel AUC (first on
    ties), those that exist."""
    best = []
    for method in ("cam", "scorecam"):
        scored = [r for r in rows if methods[r["row"]] == (main, method) and r["pixel_auc"] is not None]
        if scored:
            best.append(max(scored, key=lambda r: r["pixel_auc"])["row"])
    return best


def mosaic_patch_accuracy(
    model: nn.Module, test: list[tuple[np.ndarray, np.ndarray]], window: int, count: int, *, seed: int = 0
) -> dict[str, Any]:
    """Seed 002's patch-level accuracy ("the model correctly classifies 88.44% of patches"): ``count`` patches of
    each test mosaic, labelled as training patches are (their centre pixel, :func:`core.data.synth_rcm.sample_patches`)
    but drawn uniformly over the labeled centres (the mosaics' own class balance), called aspecific at probability
    0.5. Mosaic ``i`` draws with seed ``seed + 100_000 + i``, apart from the training draws."""
    from services.mosaic import patch_tensors  # services.mosaic imports the training service too

    drawn = [
        sample_patches(image, mask, count, size=window, seed=seed + 100_000 + index, balanced=False)
        for index, (image, mask) in enumerate(test)
    ]
    labels = np.concatenate([y for _, y in drawn])
    probabilities = expit(predict_logits(model, patch_tensors(np.concatenate([x for x, _ in drawn]))))
    return {
        "accuracy": float(np.mean((probabilities >= 0.5) == (labels == 1))),
        "threshold": 0.5,
        "patches": int(labels.size),
        "positive": int(labels.sum()),
    }


def _write_band_roc(base: Path, curves: dict[str, dict[str, Any]], mosaics: int, bootstrap: int) -> dict[str, Any]:
    """Fig. 11 as ``base``.csv (``row``, ``fpr``, ``tpr_mean``, ``tpr_low``, ``tpr_high``) and ``base``.plotly.json:
    per row the mean ROC over the bootstrap resamples (solid) and its band (dashed); returns the figure's entry for
    the table (workspace-relative paths, title, the mean curves' AUC, what it was scored on)."""
    frame = pd.DataFrame(
        [
            {"row": label, "fpr": f, "tpr_mean": m, "tpr_low": low, "tpr_high": high}
            for label, curve in curves.items()
            if curve["tpr_mean"] is not None
            for f, m, low, high in zip(
                curve["fpr"],
                curve["tpr_mean"],
                curve["tpr_low"] or [None] * len(curve["fpr"]),
                curve["tpr_high"] or [None] * len(curve["fpr"]),
                strict=True,
            )
        ],
        columns=["row", "fpr", "tpr_mean", "tpr_low", "tpr_high"],
    )
    figure = go.Figure()
    for number, (label, curve) in enumerate(curves.items()):
        if curve["tpr_mean"] is None:
            continue
        colour = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")[number % 4]
        figure.add_scatter(
            x=curve["fpr"], y=curve["tpr_mean"], mode="lines", name=_roc_name(label, curve["auc_mean"]),
            line={"color": colour}, legendgroup=label,
        )  # fmt: skip
        for bound in ("tpr_low", "tpr_high"):
            if curve[bound] is not None:
                figure.add_scatter(
                    x=curve["fpr"], y=curve[bound], mode="lines", line={"color": colour, "dash": "dash"},
                    legendgroup=label, showlegend=False, name=f"{label} {bound}",
                )  # fmt: skip
    figure.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot", "color": "grey"})
    band = f"{bootstrap} bootstrap resamples of the {mosaics} test mosaics" if bootstrap else f"the {mosaics} mosaics"
    title = (
        f"Mean pixel ROC over {band}, 95 % band dashed (Fig. 11)"
        if bootstrap
        else f"Pixel ROC of {band} (Fig. 11 without resampling)"
    )
    written = _write_roc_files(base, frame, figure, title, "best row per method (AUC of the mean curve)")
    return {
        **written,
        "auc": {label: curve["auc_mean"] for label, curve in curves.items()},
        "resamples": {label: curve["resamples"] for label, curve in curves.items()},
        "scored_on": f"every labeled pixel of {band}, pooled per resample",
    }


def _mosaic_examples(
    test: list[tuple[np.ndarray, np.ndarray]], maps: dict[str, list[np.ndarray]], folder: Path, seeds: list[int]
) -> list[dict[str, Any]]:
    """Each row's stitched map over the first two held-out mosaics (named by seed), with the mosaic and its mask."""
    return [
        write_example(
            folder / f"mosaic-{seeds[index]}",
            image.astype(np.float32) / 255.0,
            mask,
            {label: stack[index] for label, stack in maps.items()},
        )
        for index, (image, mask) in enumerate(test[:2])
    ]


# --- per-model recipe overrides ----------------------------------------------------------------------------------

_OVERRIDABLE = ("lr", "epochs", "batch_size", "augment", "recipe", "weight_decay", "noise", "blur", "context")
_AUGMENT_LIMITS = {"noise": 1.0, "blur": 64.0}  # noise: SD in [0, 1] grey levels; blur: SD in px


def _in_unit(value: Any, *, open_low: bool) -> bool:
    """Whether ``value`` is a number in [0, 1) (``open_low``: in (0, 1))."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (0 < value < 1) if open_low else (0 <= value < 1)


def _study_plans(study: str) -> dict[str, ModelPlan]:
    """The model plans of any study by name (localisation, mosaic or slide)."""
    from services.slides import SLIDE_STUDIES  # services.slides imports this module

    for specs in (STUDIES, MOSAIC_STUDIES, SLIDE_STUDIES):
        if study in specs:
            return dict(getattr(specs[study], "models", {}))
    raise ValueError(f"unknown study {study!r}; expected one of {', '.join(study_titles())}")


def check_overrides(study: str, overrides: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """A study's per-model recipe overrides checked before anything trains, ``{model key: {field: value}}``.

    Fields are a plan's recipe settings (``lr``, ``epochs``, ``batch_size``, ``augment``, ``recipe``,
    ``weight_decay``, ``noise``, ``blur``) or an option of the model's builder (``drop_rate``, ``width``...,
    :func:`core.models.model_options`), which joins the plan's own options. The architecture is not overridable: it
    is what a row of the table means. Returns the overrides with each model's builder options merged into
    ``model_kwargs``; ``ValueError`` says what to change."""
    from core.models import check_model_options, model_options
    from core.train import RECIPES

    plans = _study_plans(study)
    checked: dict[str, dict[str, Any]] = {}
    for key, changes in (overrides or {}).items():
        if key not in plans:
            raise ValueError(f"the {study} study trains no model {key!r}; its models: {', '.join(plans)}")
        plan, fields_, options = plans[key], {}, {}
        builder_options = model_options(plan.architecture)
        for name, value in (changes or {}).items():
            if name in builder_options:
                options[name] = value
            elif name == "model_kwargs" and isinstance(value, dict):
                options.update(value)
            elif name not in _OVERRIDABLE:
                offered = ", ".join((*_OVERRIDABLE, *builder_options))
                raise ValueError(f"{key}.{name} cannot be overridden; {key} ({plan.architecture}) takes: {offered}")
            elif name == "recipe" and value not in RECIPES:
                raise ValueError(f"{key}.recipe must be one of {', '.join(sorted(RECIPES))}, not {value!r}")
            elif name == "augment" and not isinstance(value, bool):
                raise ValueError(f"{key}.augment must be true or false, not {value!r}")
            elif name in ("epochs", "batch_size") and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000
            ):
                raise ValueError(f"{key}.{name} must be a whole number from 1 to 10000, not {value!r}")
            elif name in ("lr", "weight_decay") and not _in_unit(value, open_low=name == "lr"):
                interval = "(0, 1)" if name == "lr" else "[0, 1)"
                raise ValueError(f"{key}.{name} must be a number in {interval}, not {value!r}")
            elif name == "context" and study not in MOSAIC_STUDIES:
                raise ValueError(f"{key}.context applies to the mosaic studies only ({', '.join(MOSAIC_STUDIES)})")
            elif name == "context" and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1024
            ):
                raise ValueError(f"{key}.context is px of mosaic around each training window: 0 to 1024, not {value!r}")
            elif name in _AUGMENT_LIMITS and (
                isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < _AUGMENT_LIMITS[name]
            ):
                unit = "grey levels of the [0, 1] scale" if name == "noise" else "px"
                high = _AUGMENT_LIMITS[name]
                raise ValueError(f"{key}.{name} is an SD in {unit}: a number in [0, {high:g}), not {value!r}")
            else:
                fields_[name] = value
        if options:
            fields_["model_kwargs"] = {**plan.model_kwargs, **check_model_options(plan.architecture, options)}
        checked[key] = fields_
    return checked
