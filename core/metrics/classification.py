"""Binary classification metrics at a threshold, and the ROC AUC.

``auc`` and ``binary_metrics`` score one data set. ``confusion_counts``, ``metrics_from_counts`` and ``weighted_auc``
score many weighted copies of one data set at once (bootstrap resamples as a (B, N) matrix of case counts), with
matrix products and one sort instead of a Python loop per resample.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["METRICS", "auc", "binary_metrics", "confusion_counts", "metrics_from_counts", "weighted_auc"]

METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")


def auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present (undefined, not an error)."""
    truth = np.asarray(truth).astype(int)
    if np.unique(truth).size < 2:
        return float("nan")
    return float(roc_auc_score(truth, scores))


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def binary_metrics(truth: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, F1 and accuracy of ``scores >= threshold`` (NaN where undefined)."""
    truth = np.asarray(truth).astype(bool)
    decision = np.asarray(scores) >= threshold
    tp = int((decision & truth).sum())
    tn = int((~decision & ~truth).sum())
    fp = int((decision & ~truth).sum())
    fn = int((~decision & truth).sum())
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, len(truth)),
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def confusion_counts(
    truth: np.ndarray, decisions: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """TP, FP, TN and FN of 0/1 ``decisions`` (N,) or (N, R raters), each case counted ``weights`` times.

    ``weights`` is (N,) or (B, N) (e.g. how often each case was drawn in each bootstrap resample); the counts are
    matrix products ``weights @ (truth * decisions)``, shaped like ``weights @ decisions``.
    """
    truth = np.asarray(truth, dtype=float)
    decisions = np.asarray(decisions, dtype=float)
    weights = np.ones(truth.shape[0]) if weights is None else np.asarray(weights, dtype=float)
    positive = truth if decisions.ndim == 1 else truth[:, None]
    tp = weights @ (positive * decisions)
    fp = weights @ ((1.0 - positive) * decisions)
    n_positive = weights @ truth
    n_negative = weights.sum(axis=-1) - n_positive
    if decisions.ndim == 2:
        n_positive, n_negative = n_positive[..., None], n_negative[..., None]
    return {"tp": tp, "fp": fp, "tn": n_negative - fp, "fn": n_positive - tp}


def _ratios(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator, denominator = np.broadcast_arrays(np.asarray(numerator, float), np.asarray(denominator, float))
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def metrics_from_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """The ``METRICS`` element-wise from confusion counts of any shape; NaN where a denominator is 0 (e.g. PPV with
    no positive calls), as in ``binary_metrics``."""
    return {
        "sensitivity": _ratios(tp, tp + fn),
        "specificity": _ratios(tn, tn + fp),
        "ppv": _ratios(tp, tp + fp),
        "npv": _ratios(tn, tn + fn),
        "f1": _ratios(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratios(tp + tn, tp + fp + tn + fn),
    }


def weighted_auc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """ROC AUC of ``scores`` with case weights (N,) or (B, N): one AUC per row, NaN where a class has no weight.

    The Mann-Whitney form (Hanley & McNeil 1982, eq. 1) with ties counted one half:
    AUC = sum_ij w_i w_j [s_i > s_j] + 0.5 [s_i = s_j] / (W+ W-), i positive, j negative. The scores are sorted
    once; per row, the weights are summed within each group of tied scores (``np.add.reduceat``) and a cumulative
    sum gives the negative weight below each group, so a (B, N) matrix costs O(B N) after the O(N log N) sort.
    """
    truth = np.asarray(truth).astype(bool)
    scores = np.asarray(scores, dtype=float)
    weights = np.ones(truth.shape[0]) if weights is None else np.asarray(weights, dtype=float)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    sorted_weights = weights[..., order]
    positive = truth[order]
    pos = np.add.reduceat(sorted_weights * positive, starts, axis=-1)
    neg = np.add.reduceat(sorted_weights * ~positive, starts, axis=-1)
    below = np.cumsum(neg, axis=-1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(axis=-1)
    return _ratios(wins, pos.sum(axis=-1) * neg.sum(axis=-1))
