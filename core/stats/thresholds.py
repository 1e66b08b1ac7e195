"""Operating-threshold policies: how a probability becomes a decision (``decision = probability >= threshold``).

- ``sens90``: the highest threshold whose sensitivity is at least the target (0.90), the FL-CNN paper's rule for
  tumor vs non-tumor ("optimal decision thresholds with sensitivity > 90 %").
- ``closest``: the ROC point closest to the perfect corner (FPR 0, TPR 1), the paper's rule for grade and Ki-67.
- ``youden``: maximal sensitivity + specificity - 1.
- ``fixed``: a given value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_curve

__all__ = ["POLICIES", "POLICY_TEXT", "Threshold", "choose_threshold"]

POLICIES = ("sens90", "closest", "youden", "fixed")
POLICY_TEXT = {
    "sens90": "highest threshold with validation sensitivity >= 0.90",
    "closest": "ROC point closest to perfect on validation",
    "youden": "maximal Youden index on validation",
    "fixed": "fixed by the investigator",
}


@dataclass(frozen=True)
class Threshold:
    value: float
    policy: str
    sensitivity: float
    specificity: float


def _check(truth: np.ndarray, scores: np.ndarray) -> None:
    if truth.shape != scores.shape or truth.ndim != 1:
        raise ValueError("truth and scores must be 1-D arrays of the same length")
    if not np.isin(truth, (0, 1)).all():
        raise ValueError("truth must be 0/1")
    if truth.min() == truth.max():
        raise ValueError("threshold policies need both positive and negative cases")


def choose_threshold(
    truth: np.ndarray, scores: np.ndarray, policy: str = "sens90", *, target: float = 0.90, value: float = 0.5
) -> Threshold:
    """Pick the operating threshold on validation ``scores`` by ``policy`` (see module docstring)."""
    truth, scores = np.asarray(truth).astype(int).ravel(), np.asarray(scores, dtype=float).ravel()
    _check(truth, scores)
    if policy == "fixed":
        chosen = float(value)
    else:
        fpr, tpr, thresholds = roc_curve(truth, scores, drop_intermediate=False)
        thresholds = np.minimum(thresholds, 1.0)  # sklearn puts +inf first; no probability reaches it
        if policy == "sens90":
            index = int(np.argmax(tpr >= target))  # thresholds decrease, so the first hit is the highest
        elif policy == "closest":
            index = int(np.argmin(fpr**2 + (1.0 - tpr) ** 2))
        elif policy == "youden":
            index = int(np.argmax(tpr - fpr))
        else:
            raise ValueError(f"unknown threshold policy {policy!r}; expected one of {', '.join(POLICIES)}")
        chosen = float(thresholds[index])
    decision = scores >= chosen
    sensitivity = float(decision[truth == 1].mean())
    specificity = float((~decision[truth == 0]).mean())
    return Threshold(chosen, policy, sensitivity, specificity)
