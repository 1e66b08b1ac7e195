"""Two registered models of one task compared on the same specimens: the FL-CNN paper's Table 2 and Fig. 4 (Shen et
al. 2021, grade and Ki-67 level, FL-CNN against WL-CNN).

Both models score the specimens of one split that have a label for the task and an image in each model's modality
(the FL image for the FL model, the WL image for the WL model), so the comparison is paired by specimen. Each model
decides at its own registered threshold (chosen on validation data). The statistics are those of the reader study's
Table 1 (:func:`core.stats.compare.compare_model_with_readers`, with model B in the place of a reader who gave
ratings): AUC, accuracy, sensitivity, specificity and F1 (PPV and NPV too) with percentile CIs from a bootstrap of
specimens (1000 resamples, within each truth class), and two-sided paired permutation tests of the differences
(10,000 permutations: the two models' decisions swapped on a random half of the specimens, as the paper did). For
the AUC, the two models' scores are swapped the same way, and DeLong's test of correlated AUCs is reported beside
it; for sensitivity and specificity, the exact McNemar test.

Scores are ordinary stored predictions on specimen images (:func:`services.study_ai.predict_images` computes the
missing ones), so the Data page lists them and a second comparison reuses them. A comparison run as a job (the Models
page's form) is stored as an evaluation of model A (:func:`store_comparison`), listed by :func:`stored_comparisons`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from scipy.stats import rankdata
from sqlalchemy import select

from core.metrics.classification import weighted_auc
from core.stats.compare import (
    MODEL,
    bootstrap_ci,
    bootstrap_counts,
    bootstrap_indices,
    compare_model_with_readers,
    permutation_p_value,
    swap_masks,
)
from core.stats.report import jsonable
from core.stats.thresholds import POLICIES, Threshold
from core.text import csv_bytes, plot_escape
from core.train import DATASET_TASKS, DECISIONS, task_label
from db import repo
from db.models import Prediction
from db.repo import ModelInfo
from db.session import read_scope, session_scope

__all__ = [
    "COMPARABLE_TASKS",
    "COMPARISON",
    "SHOWN",
    "CompareError",
    "compare_models",
    "compare_scores",
    "comparison_figure",
    "comparison_png",
    "comparison_table",
    "comparisons_among",
    "is_comparison",
    "paired_scores",
    "store_comparison",
    "stored_comparisons",
    "table_csv",
]

SHOWN = ("auc", "accuracy", "sensitivity", "specificity", "f1")  # Table 2's columns, in its order
COMPARABLE_TASKS = tuple(t for t in DECISIONS if t != "aspecific" and t not in DATASET_TASKS)  # specimen labels
COMPARISON = "model-comparison"  # the dataset kind of a comparison stored as an evaluation of model A
_OTHER = "other"  # model B's key where compare_model_with_readers expects a reader
_CHUNK = 1000  # permutations ranked at a time for the AUC test


class CompareError(ValueError):
    """Two models that cannot be compared (different tasks, no shared scored specimens); the message says why."""


def _find(name_or_id: str | int) -> ModelInfo:
    with read_scope() as session:
        model = repo.find_model(session, name_or_id)
    if model is None:
        raise CompareError(f"no registered model {name_or_id!r}")
    return model


def _scored(model: ModelInfo, split: str, progress: Callable[[str], None]) -> pd.DataFrame:
    """``specimen, truth, score`` of the model's modality on ``split``: the specimens in the task's cohort, scored
    (newest prediction of the model on the image; missing ones are computed and stored first)."""
    from services.study_ai import predict_images

    with read_scope() as session:
        frame = repo.specimen_images(session, model.modality, (split,))
    if frame.empty:
        return pd.DataFrame(columns=["specimen", "truth", "score"])
    frame["truth"] = [task_label(model.task, row) for row in frame.to_dict("records")]
    frame = frame[frame["truth"].notna()]
    image_ids = [int(i) for i in frame["image_id"]]
    progress(f"{model.name}: scoring {len(image_ids)} {model.modality} images of the {split} split")
    predict_images(model.id, image_ids)
    with read_scope() as session:
        rows = session.execute(
            select(Prediction.image_id, Prediction.probability)
            .where(Prediction.model_id == model.id, Prediction.image_id.in_(image_ids))
            .order_by(Prediction.id)
        ).all()
    scores = dict(rows)  # the newest wins
    frame["score"] = frame["image_id"].map(scores).astype(float)
    return frame[["specimen", "truth", "score"]].dropna()


def paired_scores(
    model_a: ModelInfo, model_b: ModelInfo, *, split: str = "test", progress: Callable[[str], None] | None = None
) -> pd.DataFrame:
    """The specimens both models scored on ``split``, in specimen order: ``specimen, truth, score_a, score_b``."""
    say = progress or (lambda _m: None)
    a = _scored(model_a, split, say)
    b = _scored(model_b, split, say)
    paired = a.merge(b, on=["specimen", "truth"], suffixes=("_a", "_b")).sort_values("specimen")
    paired["truth"] = paired["truth"].astype(int)
    return paired.reset_index(drop=True)


def _threshold(model: ModelInfo) -> Threshold:
    policy = model.threshold_policy if model.threshold_policy in POLICIES else "fixed"
    return Threshold(model.threshold, policy, float("nan"), float("nan"))


def _auc_permutation(
    truth: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, permutations: int, seed: np.random.Generator
) -> float:
    """Two-sided paired permutation p-value of AUC(a) - AUC(b): each permutation swaps the two models' scores on a
    random half of the specimens (the swap masks of :func:`core.stats.compare.swap_masks`); AUCs by midranks,
    (sum of the positives' ranks - m(m+1)/2) / (m n), a chunk of permutations at a time."""
    positive = truth == 1
    m, n = int(positive.sum()), int((~positive).sum())

    def aucs(scores: np.ndarray) -> np.ndarray:
        ranks = rankdata(scores, axis=-1)
        return (ranks[..., positive].sum(axis=-1) - m * (m + 1) / 2) / (m * n)

    observed = float(aucs(scores_a) - aucs(scores_b))
    masks = swap_masks(truth.size, permutations, seed)
    permuted = []
    for start in range(0, permutations, _CHUNK):
        mask = masks[start : start + _CHUNK]
        permuted.append(aucs(np.where(mask, scores_b, scores_a)) - aucs(np.where(mask, scores_a, scores_b)))
    return permutation_p_value(observed, np.concatenate(permuted))


def compare_scores(
    truth: Any,
    scores_a: Any,
    scores_b: Any,
    threshold_a: float | Threshold,
    threshold_b: float | Threshold,
    *,
    resamples: int = 1000,
    permutations: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Model A (``scores_a >= threshold_a``) against model B on the same cases (see the module docstring).

    Returns ``metrics``: per metric ``{"a", "b"}`` (each ``{"estimate", "ci"}``), the ``difference`` A - B with its
    bootstrap ``ci``, the permutation ``p_value`` (+ ``delong_p`` for the AUC, ``mcnemar_p`` for sensitivity and
    specificity); ``counts`` (confusion counts of each model); ``n_cases``, ``n_positive``, ``n_negative`` and
    ``method``. Thresholds are values or ``Threshold`` objects (policies as registered)."""
    truth = np.asarray(truth)
    scores_a, scores_b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    value_b = threshold_b.value if isinstance(threshold_b, Threshold) else float(threshold_b)
    report = compare_model_with_readers(
        truth,
        scores_a,
        threshold_a,
        {_OTHER: (scores_b >= value_b).astype(np.int8)},
        reader_ratings={_OTHER: scores_b},
        resamples=resamples,
        permutations=permutations,
        seed=seed,
        level=level,
    )
    raters, rows = report["raters"], [c for c in report["comparisons"] if c["b"] == _OTHER]
    metrics: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = metrics.setdefault(
            row["metric"], {"a": raters[MODEL][row["metric"]], "b": raters[_OTHER][row["metric"]]}
        )
        if row["method"] == "DeLong":
            entry["delong_p"] = row["p_value"]
            entry["delong_ci"] = row["ci"]
            continue
        entry |= {"difference": row["difference"], "ci": row["ci"], "p_value": row["p_value"]}
        if "mcnemar_p" in row:
            entry["mcnemar_p"] = row["mcnemar_p"]
    # the AUC difference's bootstrap CI, on the very resamples of the estimates (the seed's first child draws them)
    truth = truth.astype(np.int8)
    weights = bootstrap_counts(bootstrap_indices(truth, resamples, np.random.default_rng(seed).spawn(2)[0]), truth.size)
    auc = metrics["auc"]
    auc["difference"] = auc["a"]["estimate"] - auc["b"]["estimate"]
    interval = bootstrap_ci(weighted_auc(truth, scores_a, weights) - weighted_auc(truth, scores_b, weights), level)
    auc["ci"] = [float(interval[0]), float(interval[1])]
    auc["p_value"] = _auc_permutation(truth, scores_a, scores_b, permutations, np.random.default_rng(seed).spawn(3)[2])
    return {
        "n_cases": report["n_cases"],
        "n_positive": report["n_positive"],
        "n_negative": report["n_negative"],
        "thresholds": {"a": report["threshold"], "b": value_b},
        "metrics": {metric: metrics[metric] for metric in (*SHOWN, "ppv", "npv")},
        "counts": {"a": raters[MODEL]["counts"], "b": raters[_OTHER]["counts"]},
        "method": report["method"]
        | {
            "pairing": "the same cases scored by both models",
            "permutation": "paired swaps of the two models' decisions (scores for the AUC) per case, two-sided, "
            "(1 + k) / (1 + P)",
            "auc_test": "paired permutation of scores; DeLong beside it (delong_p, delong_ci)",
        },
    }


def compare_models(
    model_a: str | int,
    model_b: str | int,
    *,
    split: str = "test",
    resamples: int = 1000,
    permutations: int = 10000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Table 2 of two registered models (names or ids) of one task on ``split``, paired by specimen, each at its
    registered threshold: the :func:`compare_scores` report with ``task``, ``split``, the ``models`` (name,
    modality, threshold and its policy) and the paired ``specimens``. Refuses (:class:`CompareError`) models of
    different tasks, a model compared with itself, and pairs without shared scored specimens of both classes."""
    say = progress or (lambda _m: None)
    a, b = _find(model_a), _find(model_b)
    if a.id == b.id:
        raise CompareError(f"compare {a.name} with another model, not with itself")
    if a.task != b.task:
        raise CompareError(
            f"{a.name} is a {a.task} model and {b.name} a {b.task} model; only models of the same task compare"
        )
    paired = paired_scores(a, b, split=split, progress=say)
    if paired.empty:
        raise CompareError(
            f"{a.name} ({a.modality}) and {b.name} ({b.modality}) share no scored specimen with a {a.task} label "
            f"in the {split} split"
        )
    if paired["truth"].nunique() < 2:
        raise CompareError(
            f"the {len(paired)} specimens both models scored in the {split} split are all "
            f"{DECISIONS[a.task][int(paired['truth'].iloc[0])]}; a comparison needs both classes"
        )
    say(f"bootstrap ({resamples}) and permutation tests ({permutations}) on {len(paired)} specimens")
    report = compare_scores(
        paired["truth"].to_numpy(),
        paired["score_a"].to_numpy(),
        paired["score_b"].to_numpy(),
        _threshold(a),
        _threshold(b),
        resamples=resamples,
        permutations=permutations,
        seed=seed,
    )
    models = {
        key: {"name": m.name, "modality": m.modality, "threshold": m.threshold, "policy": m.threshold_policy}
        for key, m in (("a", a), ("b", b))
    }
    return jsonable(
        {"task": a.task, "split": split, "models": models}
        | report
        | {"specimens": paired.to_dict("records"), "seed": seed, "resamples": resamples, "permutations": permutations}
    )


def store_comparison(report: dict[str, Any]) -> int:
    """Store a :func:`compare_models` report as an evaluation of model A (dataset kind :data:`COMPARISON`, model B
    named in it), so it outlives the job and the app; inside a job it is claimed as the job's product. Its id."""
    from services.jobs.context import claim

    a, b = (_find(report["models"][key]["name"]) for key in ("a", "b"))
    dataset = {
        "kind": COMPARISON,
        "model_b": b.name,
        "model_b_id": b.id,
        "split": report["split"],
        "n_cases": report["n_cases"],
    }
    title = f"{a.name} vs {b.name}: {report['task']} on the {report['split']} split"
    with session_scope() as session:
        evaluation = repo.add_evaluation(session, a.id, title=title, dataset=dataset, report=report)
        claim(session, evaluations=[evaluation])
    return evaluation


def is_comparison(evaluation: dict[str, Any]) -> bool:
    """Whether a stored evaluation (:func:`db.repo.model_evaluations`) is a comparison of two models."""
    return evaluation["dataset"].get("kind") == COMPARISON


def comparisons_among(evaluations: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparisons among stored evaluations (:func:`db.repo.model_evaluations` rows), newest first."""
    found = [evaluation for evaluation in evaluations if is_comparison(evaluation)]
    return sorted(found, key=lambda e: (e["created_at"], e["id"]), reverse=True)


def stored_comparisons() -> list[dict[str, Any]]:
    """Every stored comparison, newest first: the evaluations (id, title, created_at, dataset, report) of the
    registered models that :func:`is_comparison`."""
    with read_scope() as session:
        return comparisons_among(
            evaluation
            for model in repo.list_models(session)
            for evaluation in repo.model_evaluations(session, model.id)
        )


def _cell(summary: dict[str, Any]) -> str:
    estimate, (low, high) = summary["estimate"], summary["ci"]
    if estimate is None or low is None or high is None:
        return "n/a"
    return f"{estimate:.3f} ({low:.3f}-{high:.3f})"


def comparison_table(report: dict[str, Any]) -> pd.DataFrame:
    """Table 2: one row per metric with each model's estimate (95 % CI), the difference A - B (95 % CI) and its
    p-values."""
    a, b = report["models"]["a"]["name"], report["models"]["b"]["name"]
    rows = []
    for metric in SHOWN:
        entry = report["metrics"][metric]
        low, high = entry["ci"]
        difference = entry["difference"]
        rows.append(
            {
                "metric": metric,
                a: _cell(entry["a"]),
                b: _cell(entry["b"]),
                "difference": "n/a" if difference is None else f"{difference:+.3f}",
                "difference 95 % CI": "n/a" if low is None or high is None else f"{low:+.3f} to {high:+.3f}",
                "p (permutation)": entry["p_value"],
                "p (DeLong)": entry.get("delong_p"),
                "p (McNemar)": entry.get("mcnemar_p"),
            }
        )
    return pd.DataFrame(rows)


def table_csv(report: dict[str, Any]) -> bytes:
    """:func:`comparison_table` as CSV bytes, neutralised against spreadsheet formulas (model names are typed)."""
    return csv_bytes(comparison_table(report))


def _bars(report: dict[str, Any], key: str) -> tuple[list[float], list[float], list[float]]:
    """Estimates and the lengths of their CI arms below and above (0 where undefined)."""
    estimates, below, above = [], [], []
    for metric in SHOWN:
        summary = report["metrics"][metric][key]
        estimate, (low, high) = summary["estimate"], summary["ci"]
        estimate = 0.0 if estimate is None else estimate
        estimates.append(estimate)
        below.append(0.0 if low is None else max(estimate - low, 0.0))
        above.append(0.0 if high is None else max(high - estimate, 0.0))
    return estimates, below, above


def _title(report: dict[str, Any]) -> str:
    return (
        f"{DECISIONS[report['task']][1]} vs {DECISIONS[report['task']][0]}: {report['n_cases']} {report['split']} "
        "specimens, 95 % bootstrap CIs"
    )


def comparison_figure(report: dict[str, Any]) -> go.Figure:
    """Fig. 4 for a page: grouped bars of each metric per model with their 95 % CIs (names escaped for plotly)."""
    figure = go.Figure()
    for key, colour in (("a", "#1f77b4"), ("b", "#ff7f0e")):
        estimates, below, above = _bars(report, key)
        model = report["models"][key]
        figure.add_trace(
            go.Bar(
                x=[m.upper() if m in ("auc", "f1") else m for m in SHOWN],
                y=estimates,
                name=plot_escape(f"{model['name']} ({model['modality']})"),
                marker_color=colour,
                error_y={"type": "data", "symmetric": False, "array": above, "arrayminus": below},
            )
        )
    figure.update_layout(
        barmode="group",
        title=plot_escape(_title(report)),
        yaxis={"range": [0, 1.05], "title": "estimate"},
        margin={"l": 10, "r": 10, "t": 50, "b": 10},
    )
    return figure


def comparison_png(report: dict[str, Any]) -> bytes:
    """Fig. 4 as a PNG (matplotlib, no display needed): grouped bars with CI error bars, p-values above each pair."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=120)
    axes = figure.add_subplot()
    x = np.arange(len(SHOWN))
    width = 0.38
    for offset, key in ((-width / 2, "a"), (width / 2, "b")):
        estimates, below, above = _bars(report, key)
        model = report["models"][key]
        axes.bar(
            x + offset, estimates, width, yerr=[below, above], capsize=3, label=f"{model['name']} ({model['modality']})"
        )
    for position, metric in zip(x, SHOWN, strict=True):
        p = report["metrics"][metric]["p_value"]
        axes.text(position, 1.08, "p n/a" if p is None else f"p={p:.3g}", ha="center", fontsize=8)
    axes.set_xticks(x, [m.upper() if m in ("auc", "f1") else m for m in SHOWN])
    axes.set_ylim(0, 1.15)
    axes.set_ylabel("estimate")
    axes.set_title(_title(report), fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
