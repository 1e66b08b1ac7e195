"""Seed 001's Table 2 on large synthetic slides: slide-level AUC and FROC of a patch classifier slid over slides.

CELNet on Camelyon16 (seed 001, section 3.1, after Liu et al. 2017): the patch classifier is slid over each slide,
giving a tumour probability per window; the slide's tumour probability is the map's maximum
(:func:`core.heatmaps.regions.slide_score`), scored over slides by the ROC AUC; tumour regions are read from the map
by non-maximum suppression (:func:`core.heatmaps.regions.nms_regions`), each a detection at its window's centre with
the window's probability, scored by Camelyon16's FROC (:mod:`core.metrics.froc`: a detection is a true positive of
the lesion whose evaluation region it falls in; sensitivity at 1/4 ... 8 false positives per slide, their mean).

The study (``celnet-slides``): CELNet and a ResNet-18 baseline, both by the paper's recipe (the ``celnet`` recipe
with the PCam rotations and flips, as every model of its Table 1), are trained from image-level labels on synthetic
CLE frames of one tile (``counts[0]`` train, ``counts[1]`` validation, as many test frames for the patch AUC), then
slid over ``counts[2]`` held-out slides (:mod:`core.data.synth_slides`, half with tumour) of ``size`` px, window one
tile, every ``step`` px. Non-maximum suppression keeps cells at or above ``threshold`` (low, so the FROC curve
reaches several false positives per slide; its points above 0.5 are what a 0.5 threshold would give) within
``radius`` cells. The table stores one row per model; the example pictures are the first tumour and first normal
slide, decimated to at most 512 px.

The defaults (160 / 60 frames of 64 px, 4 epochs, six 1024 px slides, windows every 32 px: 961 per slide) are
sized for a 2-core CPU: measured at 17 minutes on a shared one (CELNet training 9.6 min, sliding it over the six
slides 4.3 min, ResNet-18 1.3 + 1.3 min), with CELNet at slide AUC 1.0 and FROC 0.97 (sensitivity 0.8 at 1/4
false positive per slide, 1.0 from 1/2 on; 5 lesions) and the ResNet-18, whose patch AUC was 0.60 after 4 epochs of
the paper's SGD recipe, at 0.78 and 0.17. Six slides make these figures coarse; ``--counts``/``--size`` scale up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.data.localization_set import LocalizationSet, generate_set, read_set
from core.data.preprocess import standardize
from core.data.synth_slides import SyntheticSlide, make_slides
from core.heatmaps.mosaic import WindowGrid
from core.heatmaps.regions import nms_regions, slide_score
from core.metrics.froc import FP_RATES, SlideMatch, froc, match_detections, slide_auc
from core.settings import workspace_dir
from core.stats.report import jsonable
from core.train import Progress
from db import repo
from db.repo import ModelInfo
from db.session import init_db, session_scope
from services.jobs.context import claim
from services.localization import CELNET_BASELINE_LR, ModelPlan, classification_rows, train_on_set, write_example
from services.training import print_progress

__all__ = ["SLIDE_STUDIES", "SlideStudySpec", "detections", "run_slide_study", "window_probabilities"]

_PICTURE_SIDE = 512


@dataclass(frozen=True)
class SlideStudySpec:
    """A slide-level study: patch classifiers trained on ``counts[0]`` / ``counts[1]`` frames of ``tile`` px, slid
    over ``counts[2]`` slides of ``size`` px every ``step`` px; NMS at ``threshold`` within ``radius`` cells."""

    title: str
    main: str
    models: dict[str, ModelPlan]
    counts: tuple[int, int, int]
    size: int
    tile: int
    step: int
    threshold: float = 0.1
    radius: int = 2


_PLAN = {"recipe": "celnet", "lr": 0.01, "epochs": 4, "batch_size": 32, "augment": True}

SLIDE_STUDIES: dict[str, SlideStudySpec] = {
    "celnet-slides": SlideStudySpec(
        title="CELNet slide-level detection on large synthetic slides (seed 001, Table 2: slide AUC, FROC)",
        main="main",
        models={
            "main": ModelPlan("celnet", **_PLAN),
            "baseline": ModelPlan("resnet18", **{**_PLAN, "lr": CELNET_BASELINE_LR}),  # the rate that trains it
        },
        counts=(160, 60, 6),
        size=1024,
        tile=64,
        step=32,
    ),
}


def window_probabilities(
    model: nn.Module, image: np.ndarray, *, window: int, step: int, batch_size: int = 64
) -> tuple[np.ndarray, WindowGrid]:
    """The classifier's tumour probability of every window of a uint8 CLE slide, ``(rows, cols)`` on the grid of
    :class:`core.heatmaps.mosaic.WindowGrid` (corners every ``step`` px while the window fits), and that grid. Each
    window is scaled and standardised as a CLE frame of the training set is; the probability is the sigmoid of a
    one-logit model (class 1's softmax otherwise)."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a (H, W) uint8 slide, not {image.dtype} {tuple(image.shape)}")
    grid = WindowGrid(image.shape[0], image.shape[1], window, step)
    device = next(model.parameters()).device
    out = np.empty(grid.count, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, grid.count, batch_size):
                corners = [grid.corner(i) for i in range(start, min(start + batch_size, grid.count))]
                crops = np.stack([image[t : t + window, s : s + window] for t, s in corners])
                x = standardize(torch.from_numpy(crops).float().div_(255.0)[:, None], "CLE").to(device)
                logits = model(x).float()
                chosen = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(dim=1)[:, 1]
                out[start : start + len(corners)] = chosen.cpu().numpy()
    finally:
        model.train(was_training)
    return out.reshape(grid.shape), grid


def detections(probabilities: np.ndarray, grid: WindowGrid, *, threshold: float, radius: int) -> np.ndarray:
    """NMS regions of a window-probability map (Liu et al. 2017) as ``(n, 3)`` rows ``(y, x, probability)``: the
    slide pixel at the centre of each kept window, highest probability first."""
    half = grid.window // 2
    found = nms_regions(probabilities, threshold=threshold, radius=radius)
    rows = [(grid.tops[r.y] + half, grid.lefts[r.x] + half, r.probability) for r in found]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def _frames(root: Path, counts: tuple[int, int], tile: int, seed: int, log: Callable[[str], None]) -> LocalizationSet:
    """The CLE frame set the patch classifiers train on: reused from ``root`` or written there."""
    if (root / "dataset.json").is_file():
        data = read_set(root)
        if data.kind != "cle" or data.size != tile:
            raise ValueError(f"{root} holds a {data.kind} set of {data.size} px; the slides need {tile} px CLE frames")
        log(f"using the CLE set in {root}")
        return data
    log(f"writing a synthetic CLE set of {tile} px frames to {root}")
    return generate_set("cle", root, counts=(counts[0], counts[1], counts[1]), size=tile, seed=seed)


def _picture(values: np.ndarray, grid: WindowGrid, side: int) -> np.ndarray:
    """A window-probability map at slide resolution: each window's value over the ``step`` px square at its centre."""
    out = np.zeros((side, side), dtype=np.float32)
    margin = (grid.window - grid.step) // 2
    for r, top in enumerate(grid.tops):
        for c, left in enumerate(grid.lefts):
            out[top + margin : top + margin + grid.step, left + margin : left + margin + grid.step] = values[r, c]
    return out


def _example(base: Path, slide: SyntheticSlide, maps: dict[str, np.ndarray]) -> dict[str, Any]:
    """The slide, its mask and each model's probability map over it, decimated to at most 512 px a side."""
    factor = max(1, slide.image.shape[0] // _PICTURE_SIDE)
    shown = slide.image[::factor, ::factor].astype(np.float32) / 255.0
    decimated = {label: heatmap[::factor, ::factor] for label, heatmap in maps.items()}
    return write_example(base, shown, slide.mask[::factor, ::factor], decimated)


def _row(
    key: str, info: ModelInfo, scores: list[float], labels: list[int], matches: list[SlideMatch], threshold: float
) -> dict[str, Any]:
    """One table row: the slide AUC (in ``image_auc`` too, the column tables show) and the FROC figures."""
    result = froc(matches)
    auc = slide_auc(scores, labels)
    empty = dict.fromkeys(("pixel_auc", "pixel_auc_ci", "best_dice", "best_dice_threshold", "mean_acc", "mean_iu"))
    return {
        "row": f"{info.architecture} ({key})",
        "model": info.name,
        "architecture": info.architecture,
        "map": "window probability, NMS regions",
        "image_auc": auc,
        **empty,
        "threshold": threshold,
        "fw_iu": None,
        "dice": None,
        "precision": None,
        "recall": None,
        "slide_auc": auc,
        "froc": result.score,
        **{
            f"sensitivity_at_{rate:g}_fp": value for rate, value in zip(result.rates, result.sensitivities, strict=True)
        },
        "patch_auc": info.metrics.get("test_auc"),
        "regions": result.n_regions,
        "detections": int(sum(len(m.false_positives) + np.isfinite(m.region_probabilities).sum() for m in matches)),
    }


def run_slide_study(
    study: str = "celnet-slides",
    *,
    data_dir: str | Path | None = None,
    counts: tuple[int, int, int] | None = None,
    size: int | None = None,
    tile: int | None = None,
    step: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    prefix: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = print_progress,
    overrides: dict[str, dict[str, Any]] | None = None,
    models: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run a slide study end to end (module docstring) and store its table with the seed model; returns the stored
    report. ``counts`` (train frames, val frames, test slides), ``size`` (slide side), ``tile`` (frame and window
    side), ``step`` and ``epochs`` shrink it; ``data_dir`` reuses (or is where to write) the frame set, by default
    the workspace's ``datasets/cle-<tile>px-seed<seed>``. ``overrides`` patches a model plan's fields by key
    (callers taking them from users check them first, :func:`services.localization.check_overrides`); ``models``
    trains only those (and the main one)."""
    if study not in SLIDE_STUDIES:
        raise ValueError(f"unknown slide study {study!r}; expected one of {', '.join(SLIDE_STUDIES)}")
    spec = SLIDE_STUDIES[study]
    n_train, n_val, n_slides = counts or spec.counts
    size, tile = size or spec.size, tile or spec.tile
    step = step or min(spec.step, tile)
    if n_slides < 2:
        raise ValueError("a slide study needs at least two test slides (one with tumour, one without)")
    unknown = set(models or ()) - set(spec.models)
    if unknown:
        raise ValueError(
            f"the {study} study trains no model {', '.join(sorted(unknown))}; its models: {', '.join(spec.models)}"
        )
    chosen = {key: plan for key, plan in spec.models.items() if models is None or key in models or key == spec.main}
    init_db()
    root = Path(data_dir) if data_dir else workspace_dir() / "datasets" / f"cle-{tile}px-seed{seed}"
    data = _frames(root, (n_train, n_val), tile, seed, log)
    stamp = prefix or f"CLE-{study}-{datetime.now():%Y%m%d-%H%M%S}"
    trained: dict[str, tuple[ModelInfo, nn.Module]] = {}
    for key, plan in chosen.items():
        config = replace(plan, **overrides.get(key, {})).config(epochs=epochs, seed=seed)
        trained[key] = train_on_set(config, data, name=f"{stamp}-{key}", log=log, progress=progress)
    log(f"drawing {n_slides} synthetic slides of {size} px from {tile} px frames")
    slides = make_slides(n_slides, size, tile, seed=seed)
    labels = [s.label for s in slides]
    rows, pictures = [], {}
    for key, (info, model) in trained.items():
        log(f"sliding {info.name} over {n_slides} slides every {step} px")
        scores, matches = [], []
        for index, slide in enumerate(slides):
            probabilities, grid = window_probabilities(model, slide.image, window=tile, step=step)
            scores.append(slide_score(probabilities))
            found = detections(probabilities, grid, threshold=spec.threshold, radius=spec.radius)
            matches.append(match_detections(found, slide.regions))
            if index in _shown(labels):
                pictures.setdefault(index, {})[f"{info.architecture} ({key})"] = _picture(probabilities, grid, size)
        rows.append(_row(key, info, scores, labels, matches, spec.threshold))
    main_info = trained[spec.main][0]
    folder = workspace_dir() / "models" / main_info.name / "examples" / "slides"
    examples = [_example(folder / f"slide-{index}", slides[index], maps) for index, maps in sorted(pictures.items())]
    tumours = int(sum(labels))
    dataset = {
        "kind": "slides",
        "modality": "CLE",
        "size": size,
        "tile": tile,
        "step": step,
        "frames": data.describe(),
        "splits": {
            **{split: v for split, v in data.describe()["splits"].items() if split != "test"},
            "test": {"images": n_slides, "positive": tumours},
        },
    }
    report = {
        "study": study,
        "title": spec.title,
        "models": {key: info.name for key, (info, _) in trained.items()},
        "tables": [{"mask_set": "slides", "threshold": spec.threshold, "rows": rows, "examples": examples}],
        "fp_rates": list(FP_RATES),
        "nms": {"threshold": spec.threshold, "radius": spec.radius, "window": tile, "step": step},
        "scored_on": f"{n_slides} held-out slides ({tumours} with tumour, {sum(s.lesions for s in slides)} lesions)",
        "classification": classification_rows(trained),
    }
    with session_scope() as session:
        report["evaluation_id"] = repo.add_evaluation(
            session, main_info.id, title=spec.title, dataset=dataset, report=jsonable(report)
        )
        claim(session, evaluations=[report["evaluation_id"]])
    return report


def _shown(labels: list[int]) -> set[int]:
    """The slides pictured: the first with tumour and the first without."""
    first = {label: index for index, label in reversed(list(enumerate(labels)))}
    return set(first.values())
