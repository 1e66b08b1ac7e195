"""A model against human readers on the same cases: the statistics of a paired diagnostic accuracy study (the FL-CNN
paper's Table 1, Fig. 2 and error analysis).

Methods, all vectorized (no Python loop per resample or permutation):

- Bootstrap: cases drawn with replacement, by default within each truth class (stratified), so every resample keeps
  the study's numbers of positive and negative cases and sensitivity, specificity and AUC are always defined. One
  (B, N) index matrix is shared by all raters (readers are resampled on the same cases as the model) and turned into
  a (B, N) matrix of case counts W; confusion counts are ``W @ indicators`` and AUCs come from one sort
  (``core.metrics.classification.weighted_auc``). The model's threshold is held fixed, not re-chosen per resample.
- Confidence intervals: percentile intervals (Efron & Tibshirani 1993, ch. 13) over the resamples where the metric
  is defined. An estimate that is undefined on the data (PPV with no positive calls) is NaN; its interval still
  comes from the resamples where it is defined, and is NaN when none is.
- Readers' average: the mean over readers of each reader's metric (the paper's "average of neurosurgeons"), per
  resample too; NaN where any reader's metric is undefined.
- Paired permutation test: under H0 the model's and a reader's decisions on a case are exchangeable, so each
  permutation swaps them on a random half of the cases (a (P, N) swap mask; confusion counts move by
  ``mask @ (case indicators of the disagreements)``). Against the readers' average the same mask swaps the model
  with every reader, and the statistic is the mean of the per-reader differences. Two-sided p-value
  (1 + #{|d*| >= |d|}) / (1 + P) (Phipson & Smyth 2010), over the permutations where the difference is defined.
- Exact McNemar test (McNemar 1947) on the discordant cases: diseased cases only for sensitivity, non-diseased only
  for specificity; two-sided binomial p-value with p = 1/2. Not defined against the readers' average (None).
- DeLong's test for two correlated AUCs (DeLong, DeLong & Clarke-Pearson 1988), in the O(N log N) midrank form of
  Sun & Xu 2014 (IEEE Signal Process. Lett. 21:1389, eqs. 7-13), for the model against each reader who gave
  ratings; comparisons of AUC against the readers as a random sample belong to ``core.stats.mrmc``.
- Error analysis: of the cases a reader got wrong, how many the model got right (the paper's "> 70 % corrected").

Random numbers: ``np.random.default_rng(seed).spawn(2)``; the first child draws the bootstrap, the second the swap
masks, so a study re-run with the same seed gives the same intervals and p-values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import binom, norm, rankdata
from sklearn.metrics import roc_curve

from core.metrics.classification import METRICS, auc, confusion_counts, metrics_from_counts, weighted_auc
from core.stats.thresholds import POLICY_TEXT, Threshold, choose_threshold

__all__ = [
    "MODEL",
    "READERS_MEAN",
    "DeLong",
    "McNemar",
    "bootstrap_ci",
    "bootstrap_counts",
    "bootstrap_indices",
    "compare_model_with_readers",
    "delong_test",
    "error_analysis",
    "mcnemar_exact",
    "paired_permutation_test",
    "permutation_p_value",
    "rater_metrics",
    "swap_masks",
]

MODEL = "model"
READERS_MEAN = "readers_mean"
_TOLERANCE = 1e-9  # |d*| >= |d| up to rounding: the readers' average is summed in a different order per permutation

Seed = int | np.random.Generator


class McNemar(NamedTuple):
    a_only: int  # cases rater a got right and rater b wrong
    b_only: int
    p_value: float


class DeLong(NamedTuple):
    auc_a: float
    auc_b: float
    difference: float
    se: float
    z: float
    p_value: float
    ci: tuple[float, float]


def _truth(truth: Any) -> np.ndarray:
    truth = np.asarray(truth)
    if truth.ndim != 1 or truth.size == 0:
        raise ValueError("truth must be a non-empty 1-D array")
    if not np.isin(truth, (0, 1)).all():
        raise ValueError("truth must be 0/1 (1 = diseased)")
    if truth.min() == truth.max():
        raise ValueError("truth must contain both positive and negative cases")
    return truth.astype(np.int8)


def _labels(name: str, labels: Any, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} has shape {labels.shape}; expected ({n},), one value per case")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} must be 0/1 decisions (1 = positive call)")
    return labels.astype(np.int8)


def _scores(name: str, scores: Any, n: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    if scores.shape != (n,):
        raise ValueError(f"{name} has shape {scores.shape}; expected ({n},), one value per case")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} must be finite")
    return scores


def _count(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def bootstrap_indices(truth: Any, resamples: int = 1000, seed: Seed = 0, *, stratify: bool = True) -> np.ndarray:
    """A (resamples, N) matrix of case indices drawn with replacement; with ``stratify`` the positions of the
    positive cases draw among the positive cases and likewise the negatives, so each row keeps both class sizes."""
    truth = _truth(truth)
    resamples = _count("resamples", resamples)
    rng = np.random.default_rng(seed)
    if not stratify:
        return rng.integers(0, truth.size, (resamples, truth.size))
    indices = np.empty((resamples, truth.size), dtype=np.int64)
    for label in (0, 1):
        members = np.flatnonzero(truth == label)
        indices[:, members] = members[rng.integers(0, members.size, (resamples, members.size))]
    return indices


def bootstrap_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each of the ``n`` cases occurs in each row of ``indices``: a (B, n) float matrix W such that a
    sum over a resample is ``W @ values``."""
    indices = np.asarray(indices)
    rows = indices.shape[0]
    flat = (indices + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(float)


def rater_metrics(truth: Any, decisions: Any, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The ``METRICS`` of 0/1 ``decisions`` (N,) or (N, R raters), on the data or on each row of case counts
    ``weights`` (B, N): arrays shaped like ``weights @ decisions``."""
    truth = _truth(truth)
    return metrics_from_counts(**confusion_counts(truth, decisions, weights))


def bootstrap_ci(samples: Any, level: float = 0.95) -> np.ndarray:
    """Percentile interval over axis 0 of ``samples`` (resamples first), from the finite values only: shape
    ``samples.shape[1:] + (2,)``; NaN where no resample is finite."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), not {level}")
    samples = np.asarray(samples, dtype=float)
    tail = 50.0 * (1.0 - level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN, as documented
        interval = np.nanpercentile(np.where(np.isfinite(samples), samples, np.nan), [tail, 100.0 - tail], axis=0)
    return np.moveaxis(interval, 0, -1)


def swap_masks(n: int, permutations: int = 10000, seed: Seed = 0) -> np.ndarray:
    """A (permutations, n) boolean matrix, each entry True with probability 1/2 (random bits, 8 per byte drawn)."""
    permutations = _count("permutations", permutations)
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (permutations, (n + 7) // 8), dtype=np.uint8)
    return np.unpackbits(packed, axis=1, count=n).astype(bool)


def _permutation_differences(
    truth: np.ndarray, a: np.ndarray, b: np.ndarray, masks: np.ndarray
) -> dict[str, np.ndarray]:
    """metric(a) - metric(b_r) per permutation and reader: (P, R) per metric, where permutation p swaps ``a`` and
    every column of ``b`` (N, R) on the cases ``masks[p]`` marks. Counts shift by ``masks @ (case indicator of a
    disagreement)``; the sums are integers below 2**24, exact in float32."""
    positive = truth.astype(float)
    negative = 1.0 - positive
    delta = b - a[:, None].astype(float)
    shifts = masks.astype(np.float32) @ np.hstack([positive[:, None] * delta, negative[:, None] * delta]).astype(
        np.float32
    )
    readers = b.shape[1]
    tp_shift, fp_shift = shifts[:, :readers].astype(float), shifts[:, readers:].astype(float)
    n_positive, n_negative = positive.sum(), negative.sum()
    tp_a, fp_a = positive @ a, negative @ a
    tp_b, fp_b = positive @ b, negative @ b
    tp_a, fp_a = tp_a + tp_shift, fp_a + fp_shift
    tp_b, fp_b = tp_b - tp_shift, fp_b - fp_shift
    metrics_a = metrics_from_counts(tp_a, fp_a, n_negative - fp_a, n_positive - tp_a)
    metrics_b = metrics_from_counts(tp_b, fp_b, n_negative - fp_b, n_positive - tp_b)
    return {metric: metrics_a[metric] - metrics_b[metric] for metric in METRICS}


def permutation_p_value(observed: float, permuted: np.ndarray) -> float:
    """Two-sided (1 + #{|d*| >= |d|}) / (1 + P) over the finite permuted differences; NaN when ``observed`` is."""
    permuted = np.asarray(permuted, dtype=float)
    permuted = permuted[np.isfinite(permuted)]
    if not math.isfinite(observed):
        return float("nan")
    extreme = np.count_nonzero(np.abs(permuted) >= abs(observed) - _TOLERANCE)
    return float((extreme + 1) / (permuted.size + 1))


def paired_permutation_test(
    truth: Any,
    a_decisions: Any,
    b_decisions: Any,
    metric: str = "accuracy",
    *,
    permutations: int = 10000,
    seed: Seed = 0,
) -> dict[str, float]:
    """Paired permutation test of metric(a) - metric(b) for 0/1 decisions on the same cases.

    ``b_decisions`` is (N,) for one rater or (N, R) for the mean of R raters' metrics (see the module docstring).
    Returns the observed ``difference``, the two-sided ``p_value`` and the number of ``permutations`` used.
    """
    truth = _truth(truth)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    a = _labels("a_decisions", a_decisions, truth.size)
    b = np.asarray(b_decisions)
    b = b[:, None] if b.ndim == 1 else b
    if b.ndim != 2:
        raise ValueError("b_decisions must be (N,) or (N, raters)")
    b = np.column_stack([_labels("b_decisions", column, truth.size) for column in b.T])
    observed = float(rater_metrics(truth, a)[metric] - rater_metrics(truth, b)[metric].mean())
    masks = swap_masks(truth.size, permutations, seed)
    permuted = _permutation_differences(truth, a, b, masks)[metric].mean(axis=1)
    return {"difference": observed, "p_value": permutation_p_value(observed, permuted), "permutations": permutations}


def mcnemar_exact(a_correct: Any, b_correct: Any) -> McNemar:
    """Exact McNemar test of two raters' paired right/wrong outcomes: the cases only a got right (n_a) against those
    only b got right (n_b), two-sided p = min(1, 2 P[X <= min(n_a, n_b)]), X ~ Binomial(n_a + n_b, 1/2); 1 when
    the raters never disagree."""
    a_correct, b_correct = np.asarray(a_correct).astype(bool), np.asarray(b_correct).astype(bool)
    if a_correct.shape != b_correct.shape or a_correct.ndim != 1:
        raise ValueError("a_correct and b_correct must be 1-D arrays of the same length")
    a_only = int(np.count_nonzero(a_correct & ~b_correct))
    b_only = int(np.count_nonzero(b_correct & ~a_correct))
    p_value = min(1.0, 2.0 * float(binom.cdf(min(a_only, b_only), a_only + b_only, 0.5)))
    return McNemar(a_only, b_only, p_value)


def delong_test(truth: Any, scores_a: Any, scores_b: Any, *, level: float = 0.95) -> DeLong:
    """DeLong's test of AUC(a) - AUC(b) for two sets of scores on the same cases (Sun & Xu 2014, fast DeLong).

    With m positive and n negative cases and midranks T_z (all cases), T_x (positives), T_y (negatives):
    AUC = (sum T_z over positives - m(m+1)/2) / (m n); the structural components V10 = (T_z - T_x) / n (positives)
    and V01 = 1 - (T_z - T_y) / m (negatives) give Var = S10 / m + S01 / n, S the 2x2 covariances. Normal
    z = difference / se, two-sided p, and the Wald interval at ``level``.
    """
    truth = _truth(truth)
    scores = np.vstack([_scores("scores_a", scores_a, truth.size), _scores("scores_b", scores_b, truth.size)])
    positive = truth == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if min(m, n) < 2:
        raise ValueError("DeLong's test needs at least two positive and two negative cases")
    t_z = rankdata(scores, axis=1)
    t_x = rankdata(scores[:, positive], axis=1)
    t_y = rankdata(scores[:, ~positive], axis=1)
    aucs = (t_z[:, positive].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (t_z[:, positive] - t_x) / n
    v01 = 1.0 - (t_z[:, ~positive] - t_y) / m
    covariance = np.cov(v10) / m + np.cov(v01) / n
    difference = float(aucs[0] - aucs[1])
    se = math.sqrt(max(float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]), 0.0))
    if se > 0:
        z = difference / se
        p_value = float(2 * norm.sf(abs(z)))
    else:  # identical rankings, or both perfect: no variance
        z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
        p_value = 1.0 if difference == 0 else 0.0
    half = float(norm.ppf(0.5 + level / 2)) * se
    return DeLong(float(aucs[0]), float(aucs[1]), difference, se, z, p_value, (difference - half, difference + half))


def error_analysis(truth: Any, model_decisions: Any, reader_decisions: Mapping[Any, Any]) -> dict[str, Any]:
    """Of the cases each reader got wrong, how many the model got right.

    ``per_reader[r]``: ``errors``, ``corrected_by_model`` and their ``fraction`` (NaN without errors); ``pooled``:
    the same summed over readers (a case two readers missed counts twice).
    """
    truth = _truth(truth)
    model_right = _labels("model_decisions", model_decisions, truth.size) == truth
    per_reader = {}
    for reader, decisions in reader_decisions.items():
        wrong = _labels(f"reader {reader!r} decisions", decisions, truth.size) != truth
        per_reader[str(reader)] = _corrected(int(wrong.sum()), int((wrong & model_right).sum()))
    pooled = _corrected(
        sum(row["errors"] for row in per_reader.values()),
        sum(row["corrected_by_model"] for row in per_reader.values()),
    )
    return {"per_reader": per_reader, "pooled": pooled}


def _corrected(errors: int, corrected: int) -> dict[str, Any]:
    return {"errors": errors, "corrected_by_model": corrected, "fraction": corrected / errors if errors else math.nan}


def _threshold(truth: np.ndarray, scores: np.ndarray, threshold: float | Threshold | str) -> dict[str, Any]:
    if isinstance(threshold, str):
        chosen = choose_threshold(truth, scores, threshold)
        return {
            "value": chosen.value,
            "policy": chosen.policy,
            "description": POLICY_TEXT[chosen.policy],
            "chosen_on_evaluated_cases": True,
        }
    if isinstance(threshold, Threshold):
        value, policy = threshold.value, threshold.policy
    else:
        value, policy = float(threshold), "fixed"
    if not math.isfinite(value):
        raise ValueError(f"threshold must be finite, not {value}")
    return {"value": value, "policy": policy, "description": POLICY_TEXT[policy], "chosen_on_evaluated_cases": False}


def _readers(reader_labels: Mapping[Any, Any], n: int) -> dict[str, np.ndarray]:
    if not reader_labels:
        raise ValueError("reader_labels must name at least one reader")
    readers = {str(reader): _labels(f"reader {reader!r} labels", labels, n) for reader, labels in reader_labels.items()}
    if len(readers) != len(reader_labels):
        raise ValueError("reader ids must stay distinct as strings")
    reserved = {MODEL, READERS_MEAN} & set(readers)
    if reserved:
        raise ValueError(f"reader ids {sorted(reserved)} are reserved")
    return readers


def _summary(estimate: float, interval: np.ndarray) -> dict[str, Any]:
    return {"estimate": float(estimate), "ci": [float(interval[0]), float(interval[1])]}


def _roc(truth: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    fpr, tpr, thresholds = roc_curve(truth, scores)
    thresholds[0] = np.nextafter(scores.max(), np.inf)  # sklearn's +inf: above every score, no positive call
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def compare_model_with_readers(
    truth: Any,
    model_scores: Any,
    threshold: float | Threshold | str,
    reader_labels: Mapping[Any, Any],
    *,
    reader_ratings: Mapping[Any, Any] | None = None,
    resamples: int = 1000,
    permutations: int = 10000,
    seed: int = 0,
    level: float = 0.95,
    stratify: bool = True,
) -> dict[str, Any]:
    """The model (``model_scores >= threshold``) against each reader and the readers' average on the same cases.

    ``threshold`` is a value (policy "fixed"), a ``Threshold`` chosen on validation data, or a policy name, chosen
    here on the evaluated cases (optimistic; flagged in the result). ``reader_ratings`` (optional, per reader, e.g.
    a 1-5 confidence) give that reader an AUC and a DeLong comparison with the model.

    Returns ``threshold``; ``raters`` keyed by "model", each reader id and "readers_mean", each with every metric
    as ``{"estimate", "ci"}`` (+ ``counts`` for single raters, ``auc`` for the model and readers with ratings and
    the model's ``roc``); ``comparisons``, a list of ``{"a", "b", "metric", "difference", "ci", "p_value",
    "method"}`` (+ ``mcnemar_p`` for sensitivity and specificity, and ``se``/``z`` for DeLong); ``error_analysis``;
    ``method``, the settings. See the module docstring for the methods.
    """
    truth = _truth(truth)
    n = truth.size
    scores = _scores("model_scores", model_scores, n)
    readers = _readers(reader_labels, n)
    ratings = {str(reader): _scores(f"reader {reader!r} ratings", r, n) for reader, r in (reader_ratings or {}).items()}
    unknown = set(ratings) - set(readers)
    if unknown:
        raise ValueError(f"ratings for readers without labels: {sorted(unknown)}")
    resamples, permutations = _count("resamples", resamples), _count("permutations", permutations)
    chosen = _threshold(truth, scores, threshold)

    names = list(readers)
    decisions = np.column_stack([(scores >= chosen["value"]).astype(np.int8), *readers.values()])
    boot_rng, perm_rng = np.random.default_rng(seed).spawn(2)
    weights = bootstrap_counts(bootstrap_indices(truth, resamples, boot_rng, stratify=stratify), n)
    counts = confusion_counts(truth, decisions)
    estimates = metrics_from_counts(**counts)
    resampled = rater_metrics(truth, decisions, weights)

    raters: dict[str, dict[str, Any]] = {}
    for column, rater in enumerate([MODEL, *names]):
        raters[rater] = {
            metric: _summary(estimates[metric][column], bootstrap_ci(resampled[metric][:, column], level))
            for metric in METRICS
        }
        raters[rater]["counts"] = {key: int(value[column]) for key, value in counts.items()}
    raters[READERS_MEAN] = {
        metric: _summary(estimates[metric][1:].mean(), bootstrap_ci(resampled[metric][:, 1:].mean(axis=1), level))
        for metric in METRICS
    }
    model_auc = weighted_auc(truth, scores, weights)
    raters[MODEL]["auc"] = _summary(auc(truth, scores), bootstrap_ci(model_auc, level))
    raters[MODEL]["roc"] = _roc(truth, scores)
    for reader, values in ratings.items():
        raters[reader]["auc"] = _summary(auc(truth, values), bootstrap_ci(weighted_auc(truth, values, weights), level))

    permuted = _permutation_differences(truth, decisions[:, 0], decisions[:, 1:], swap_masks(n, permutations, perm_rng))
    comparisons = []
    for metric in METRICS:
        boot_differences = resampled[metric][:, :1] - resampled[metric][:, 1:]
        targets = [(reader, column, permuted[metric][:, column]) for column, reader in enumerate(names)]
        targets.append((READERS_MEAN, None, permuted[metric].mean(axis=1)))
        for reader, column, permuted_differences in targets:
            if column is None:
                difference = float(estimates[metric][0] - estimates[metric][1:].mean())
                interval = bootstrap_ci(boot_differences.mean(axis=1), level)
            else:
                difference = float(estimates[metric][0] - estimates[metric][column + 1])
                interval = bootstrap_ci(boot_differences[:, column], level)
            row = {
                "a": MODEL,
                "b": reader,
                "metric": metric,
                "difference": difference,
                "ci": [float(interval[0]), float(interval[1])],
                "p_value": permutation_p_value(difference, permuted_differences),
                "method": "paired permutation",
            }
            if metric in ("sensitivity", "specificity"):
                row["mcnemar_p"] = None if column is None else _mcnemar(truth, decisions, column + 1, metric)
            comparisons.append(row)
    for reader, values in ratings.items():
        test = delong_test(truth, scores, values, level=level)
        comparisons.append(
            {
                "a": MODEL,
                "b": reader,
                "metric": "auc",
                "difference": test.difference,
                "ci": list(test.ci),
                "p_value": test.p_value,
                "method": "DeLong",
                "se": test.se,
                "z": test.z,
            }
        )

    return {
        "n_cases": n,
        "n_positive": int(truth.sum()),
        "n_negative": int(n - truth.sum()),
        "threshold": chosen,
        "raters": raters,
        "comparisons": comparisons,
        "error_analysis": error_analysis(truth, decisions[:, 0], readers),
        "method": {
            "bootstrap": "cases with replacement" + (", stratified by truth" if stratify else ""),
            "resamples": resamples,
            "ci": f"percentile, {level:.0%}",
            "permutation": "paired swaps of model and reader decisions per case, two-sided, (1 + k) / (1 + P)",
            "permutations": permutations,
            "seed": seed,
            "readers_mean": "mean of the readers' metrics",
        },
    }


def _mcnemar(truth: np.ndarray, decisions: np.ndarray, column: int, metric: str) -> float:
    label = 1 if metric == "sensitivity" else 0
    cases = truth == label
    return mcnemar_exact(decisions[cases, 0] == label, decisions[cases, column] == label).p_value
