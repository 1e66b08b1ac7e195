"""Does a model's heatmap find the tumor better than the brightest spot? The pointing game of an FL tumor model on
its test split, next to the baselines that need no model (:mod:`core.metrics.pointing`).

For each test specimen with a tumor mask: does the peak of the model's default heatmap (the one Diagnose shows
first, :func:`core.triage.default_method`), mapped back to the image, lie in the tumor; and does the brightest
smoothed pixel of the tissue. For all test specimens with a tumor label: the model's AUC against the best simple
intensity statistic's. Fluorescence only: the baselines read intensity, which white light does not carry.

Computed once, when a model is trained and registered (:func:`services.training.train_and_register`), and stored
with its metrics under ``"pointing"``: the figures belong to one checkpoint and one test split, both fixed at that
moment, and computing them takes a heatmap per test tumor specimen (tens of seconds on a CPU), which a page must
not wait for. :func:`evaluate_registered` computes them for a model registered before (the benchmark uses it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image as PILImage

from core.data.io import read_image
from core.heatmaps import method_title
from core.metrics.classification import auc
from core.metrics.pointing import (
    INTENSITY_STATISTICS,
    brightest_point,
    hit_rate,
    intensity_aucs,
    intensity_statistics,
    peak,
    point_in_mask,
    tissue_mask,
)
from core.predict import Predictor
from core.settings import workspace_dir
from core.triage import default_method
from db import repo
from db.repo import ModelInfo
from db.session import read_scope
from services.predictions import cached_predictor

__all__ = ["applies", "evaluate", "evaluate_registered", "summary_lines", "test_rows"]

_MODALITIES = ("FL",)
_BATCH = 16


def applies(task: str, modality: str) -> bool:
    """Whether the pointing game and its intensity baselines mean something for such a model."""
    return task == "tumor" and modality in _MODALITIES


def test_rows(modality: str) -> pd.DataFrame:
    """The test split's images of ``modality`` with a known tumor label: specimen, path, mask_path, tumor."""
    columns = ["specimen", "path", "mask_path", "tumor"]
    with read_scope() as session:
        frame = repo.specimen_images(session, modality, ("test",))
    if frame.empty:
        return pd.DataFrame(columns=columns)
    return frame.loc[frame["tumor"].notna(), columns].reset_index(drop=True)


def _mask(path: Path) -> np.ndarray:
    with PILImage.open(path) as pil:
        return np.asarray(pil.convert("L")) > 127


def evaluate(
    predictor: Predictor,
    rows: pd.DataFrame,
    *,
    method: str | None = None,
    tolerance: float = 0.0,
    resamples: int = 2000,
    seed: int = 0,
    root: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | None:
    """The pointing game of ``predictor``'s ``method`` map (default: the model's default map) and the brightest
    pixel over ``rows`` (:func:`test_rows`) with tumor masks, and the model's AUC against the best intensity
    statistic over all ``rows``. None when no row has a tumor mask."""
    root = workspace_dir() if root is None else root
    method = method or default_method(predictor.methods, predictor.config.get("architecture"))
    if method is None:
        return None
    records = rows.to_dict("records")
    labels, scores, statistics = [], [], []
    map_hits, bright_hits = [], []
    for start in range(0, len(records), _BATCH):
        chunk = records[start : start + _BATCH]
        images = [read_image(root / r["path"], Path(r["path"]).name) for r in chunk]
        masks = [_mask(root / r["mask_path"]) if r["tumor"] and r["mask_path"] else None for r in chunk]
        pointed = [i for i, m in enumerate(masks) if m is not None and m.any()]
        plain = predictor.diagnose(images, heatmap=None, batch_size=_BATCH)
        mapped = predictor.diagnose([images[i] for i in pointed], heatmap=method, batch_size=_BATCH) if pointed else []
        for record, image, result in zip(chunk, images, plain, strict=True):
            if isinstance(result, Exception):
                continue
            tissue = tissue_mask(image.array)
            labels.append(int(record["tumor"]))
            scores.append(result.probability)
            statistics.append(intensity_statistics(image.array, tissue))
        for i, result in zip(pointed, mapped, strict=True):
            if isinstance(result, Exception) or result.heatmap is None:
                continue
            mask = masks[i]
            map_hits.append(point_in_mask(peak(result.heatmap), mask, tolerance))
            bright_hits.append(
                point_in_mask(brightest_point(images[i].array, tissue_mask(images[i].array)), mask, tolerance)
            )
        if progress:
            progress(min(start + _BATCH, len(records)), len(records))
    if not map_hits:
        return None
    both = len(set(labels)) == 2
    aucs = intensity_aucs(labels, statistics) if both else {}
    best = max(aucs, key=aucs.get) if aucs else None
    return {
        "method": method,
        "method_title": method_title(method),
        "tolerance_px": tolerance,
        "heatmap": hit_rate(map_hits, resamples, seed).to_dict(),
        "brightest": hit_rate(bright_hits, resamples, seed).to_dict(),
        "n_images": len(labels),
        "n_tumor": int(sum(labels)),
        "model_auc": auc(np.asarray(labels), np.asarray(scores)) if both else None,
        "intensity_aucs": aucs,
        "best_intensity": best,
        "best_intensity_auc": aucs.get(best) if best else None,
    }


def evaluate_registered(model: ModelInfo, **options: Any) -> dict[str, Any] | None:
    """:func:`evaluate` for a registered model on the workspace's test split; None where it does not apply."""
    if not applies(model.task, model.modality):
        return None
    rows = test_rows(model.modality)
    return evaluate(cached_predictor(model), rows, **options) if not rows.empty else None


def _percent(value: float) -> str:
    return f"{100 * value:.0f} %"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Plain sentences for a clinician or PI: where the map points, where the brightest spot does, and whether the
    model beats simple brightness figures. No markdown; the caller escapes them."""
    heat, bright = report["heatmap"], report["brightest"]
    ci = heat.get("ci")
    interval = f" (95 % CI {_percent(ci[0])}-{_percent(ci[1])})" if ci else ""
    bright_ci = bright.get("ci")
    bright_interval = f" (95 % CI {_percent(bright_ci[0])}-{_percent(bright_ci[1])})" if bright_ci else ""
    tolerance = report.get("tolerance_px") or 0
    within = f" (or within {tolerance:g} px of it)" if tolerance else ""
    lines = [
        f"Pointing game: the peak of the {report['method_title']} map falls in the tumor{within} for "
        f"{_percent(heat['rate'])} of {heat['n']} test tumor specimens{interval}; the brightest spot of the "
        f"tissue (no model), for {_percent(bright['rate'])}{bright_interval}."
    ]
    model_auc, best, best_auc = report.get("model_auc"), report.get("best_intensity"), report.get("best_intensity_auc")
    if model_auc is not None and best is not None and best_auc is not None:
        verdict = "above" if model_auc > best_auc else "not above"
        lines.append(
            f"Tumor vs non-tumor on the same {report['n_images']} test specimens: the model's AUC is {model_auc:.3f}, "
            f"{verdict} the best simple brightness figure ({INTENSITY_STATISTICS.get(best, best)}: AUC "
            f"{best_auc:.3f}), a difference of {model_auc - best_auc:+.3f}."
        )
    return lines
