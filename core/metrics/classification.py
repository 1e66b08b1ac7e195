"""Binary classification metrics at a threshold, and the ROC AUC."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["auc", "binary_metrics"]


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
