"""How long the analysis of a reader study takes, against a per-resample loop: ``python -m bench.analysis``.

A simulated study at the FL-CNN paper's test-set size (Table 1: 608 cases, 60 % tumor), seeded: a model score per
case (Beta(5, 2) for tumor, Beta(2, 5) for not), and ``--readers`` (3) readers who read every case in two arms, FL
and WL, each giving a binary call and a 1-5 confidence. The ROC rating of a read is the call and the confidence
on one 10-point scale (not tumor, certain = 1 ... tumor, certain = 10), as the Results page scores them. A reader's
evidence for tumor is the truth (further apart in FL than in WL), a case effect shared by every reader and both
arms, a reader's bias and noise.

Timed, in rotation after a warm-up (as in :mod:`bench.diagnosis`), median and best of ``--repeats``:

- ``analyze_reads``: :func:`core.stats.report.analyze_reads` on both arms at the threshold 0.5: the model against
  each reader and the readers' average, percentile CIs from ``--bootstrap`` (1,000) stratified case resamples,
  paired permutation tests with ``--permutations`` (10,000) swaps, exact McNemar, DeLong for every reader;
- ``analyze_mrmc``: :func:`core.stats.report.analyze_mrmc`, OR-Hillis MRMC (jackknife covariance) of the readers'
  ratings with the two arms as modalities, built from the reads as the app builds it;
- ``model_vs_readers``: :func:`core.stats.mrmc.model_vs_readers` per arm, the model against the readers' mean AUC;
- ``report``: the three together, the whole report (the issue's goal: under 2 s);
- ``validation``: ``read_predictions``, ``read_reads`` and ``read_ratings`` on the same tables, which the command
  line and the CSV upload run first; not part of the report.

The loop baseline computes the same numbers the straightforward way, once: per bootstrap resample
``binary_metrics`` of every rater and sklearn's ``roc_auc_score`` of every rater with scores, per permutation the
swapped decisions' ``binary_metrics`` for every reader, the O(m n) DeLong of the 1988 paper, scipy's ``binomtest``
for McNemar; for MRMC and the model against the readers, a loop over the cases recomputing every AUC with one case
deleted (sklearn), then the OR-Hillis random-reader formulas. It draws its resamples and swap masks with the
library's own generators (``bootstrap_indices``, ``swap_masks``) from the same seed, so the intervals and p-values
must agree (up to rounding, below ``TOLERANCE``); ``x loop`` is its time over the median of the vectorized code.
Left out of the comparison (no resampling, under a millisecond): the ROC curve points, the error analysis, and the
fixed-reader and fixed-case MRMC analyses, closed forms of the same covariances. ``--threads`` (the usable cores)
limits numpy's BLAS and the OpenMP pool. The table is printed and written to ``bench/results/analysis-cpu.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy
import sklearn
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_info, threadpool_limits

from bench.diagnosis import rotate, start, usable_cores, write_results
from core.metrics.classification import METRICS, binary_metrics
from core.stats.compare import MODEL, READERS_MEAN, bootstrap_indices, swap_masks
from core.stats.mrmc import model_vs_readers
from core.stats.report import analyze_mrmc, analyze_reads, read_predictions, read_ratings, read_reads

__all__ = [
    "ARMS",
    "MEASUREMENTS",
    "Row",
    "Settings",
    "Study",
    "agreement",
    "loop_mrmc",
    "loop_reads",
    "loop_versus",
    "main",
    "parse_args",
    "report_numbers",
    "simulate",
    "whole_report",
]

RESULTS = Path(__file__).resolve().parent / "results"
ARMS: dict[str, float] = {"FL": 2.4, "WL": 1.6}  # arm -> separation of tumor and not in the readers' evidence
TUMOR_SHARE = 0.6
THRESHOLD = 0.5
GOAL_S = 2.0  # the goal for the whole report
TOLERANCE = (1e-9, 1e-12)  # (relative, absolute): the loop and the vectorized code agree within this
MEASUREMENTS: dict[str, str] = {
    "analyze_reads": "analyze_reads (2 arms)",
    "analyze_mrmc": "analyze_mrmc (FL vs WL)",
    "model_vs_readers": "model_vs_readers (2 arms)",
    "report": "the whole report",
    "validation": "validation (read_*)",
}
_CONFIDENCE_STEP = 0.5  # evidence per confidence level away from the reader's cut-off


@dataclass(frozen=True)
class Settings:
    """What one run measures (``--quick`` shrinks every size)."""

    cases: int
    readers: int
    bootstrap: int
    permutations: int
    repeats: int
    threads: int
    seed: int
    out: Path
    quick: bool


@dataclass(frozen=True)
class Study:
    """The simulated study as the app hands it over (``predictions``, ``reads``) and as arrays for the loop:
    ``labels[arm]`` and ``ratings[arm]`` map each reader to their calls and 10-point ratings, case by case."""

    predictions: pd.DataFrame  # case_id, truth, score
    reads: pd.DataFrame  # case_id, reader_id, arm, label, rating
    truth: np.ndarray
    scores: np.ndarray
    labels: dict[str, dict[str, np.ndarray]]
    ratings: dict[str, dict[str, np.ndarray]]


@dataclass(frozen=True)
class Row:
    """One measurement: the vectorized code's median and best of ``repeats`` runs, and the loop's one run."""

    measurement: str
    label: str
    repeats: int
    median_ms: float
    best_ms: float
    loop_ms: float | None
    x_loop: float | None  # loop_ms / median_ms


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`; ``--quick`` overrides every size with a tiny one."""
    parser = argparse.ArgumentParser(prog="python -m bench.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=608, help="study cases, 60 %% tumor (608)")
    parser.add_argument("--readers", type=int, default=3, help="readers, each reading every case in both arms (3)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--permutations", type=int, default=10000, help="permutations per test (10000)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of the vectorized code (10)")
    parser.add_argument(
        "--threads", type=int, default=usable_cores(), help="BLAS and OpenMP threads (the usable CPU cores)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the study and of the resampling (0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (bench/results)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke-test settings: 60 cases, 50 resamples, 200 permutations, 2 runs"
    )
    args = parser.parse_args(argv)
    if args.cases < 20 or args.readers < 2:
        parser.error("at least 20 cases and 2 readers (MRMC needs two readers)")
    if min(args.bootstrap, args.permutations, args.repeats, args.threads) < 1:
        parser.error("bootstrap, permutations, repeats and threads must be positive")
    if args.quick:
        return Settings(60, args.readers, 50, 200, 2, args.threads, args.seed, args.out, True)
    sizes = (args.cases, args.readers, args.bootstrap, args.permutations, args.repeats)
    return Settings(*sizes, args.threads, args.seed, args.out, False)


def simulate(cases: int, readers: int, seed: int) -> Study:
    """A seeded study: 60 % tumor, model scores, and every reader's call and 1-5 confidence in every arm."""
    rng = np.random.default_rng(seed)
    positives = round(TUMOR_SHARE * cases)
    truth = rng.permutation(np.r_[np.ones(positives, dtype=int), np.zeros(cases - positives, dtype=int)])
    scores = np.where(truth == 1, rng.beta(5, 2, cases), rng.beta(2, 5, cases))
    case_ids = np.array([f"S{i:04d}" for i in range(cases)])
    reader_ids = [f"reader{r + 1}" for r in range(readers)]
    case_effect = rng.normal(0.0, 0.6, cases)
    bias = rng.normal(0.0, 0.25, readers)
    labels: dict[str, dict[str, np.ndarray]] = {}
    ratings: dict[str, dict[str, np.ndarray]] = {}
    frames = []
    for arm, separation in ARMS.items():
        labels[arm], ratings[arm] = {}, {}
        for r, reader in enumerate(reader_ids):
            evidence = separation * (truth - 0.5) + case_effect + bias[r] + rng.normal(0.0, 0.8, cases)
            label = (evidence > 0).astype(int)
            confidence = 1 + np.minimum(np.abs(evidence) // _CONFIDENCE_STEP, 4)
            rating = np.where(label == 1, 5.0 + confidence, 6.0 - confidence)
            labels[arm][reader], ratings[arm][reader] = label, rating
            frames.append(
                pd.DataFrame({"case_id": case_ids, "reader_id": reader, "arm": arm, "label": label, "rating": rating})
            )
    predictions = pd.DataFrame({"case_id": case_ids, "truth": truth, "score": scores})
    return Study(predictions, pd.concat(frames, ignore_index=True), truth, scores, labels, ratings)


def _ratings_long(study: Study) -> pd.DataFrame:
    """The reads as MRMC ratings (``reader, modality, case, truth, rating``), the arms as modalities."""
    truth = study.predictions.set_index("case_id")["truth"]
    reads = study.reads
    return pd.DataFrame(
        {
            "reader": reads["reader_id"],
            "modality": reads["arm"],
            "case": reads["case_id"],
            "truth": reads["case_id"].map(truth),
            "rating": reads["rating"],
        }
    )


def _reads_report(study: Study, settings: Settings) -> dict[str, Any]:
    return analyze_reads(
        study.predictions,
        study.reads,
        threshold=THRESHOLD,
        bootstrap=settings.bootstrap,
        permutations=settings.permutations,
        seed=settings.seed,
    )


def _versus(study: Study) -> dict[str, Any]:
    """``model_vs_readers`` per arm on the readers' ratings, pivoted from the reads in the predictions' case order."""
    truth, scores = study.predictions["truth"].to_numpy(), study.predictions["score"].to_numpy()
    out = {}
    for arm, group in study.reads.groupby("arm", sort=True):
        wide = group.pivot(index="case_id", columns="reader_id", values="rating").loc[study.predictions["case_id"]]
        out[str(arm)] = model_vs_readers(scores, wide.to_numpy().T, truth).to_dict()
    return out


def whole_report(study: Study, settings: Settings) -> dict[str, Any]:
    """The report as the app computes it: both arms' Table 1, MRMC across the arms, the model against the readers."""
    return {
        "reads": _reads_report(study, settings),
        "mrmc": analyze_mrmc(_ratings_long(study)),
        "model_vs_readers": _versus(study),
    }


def _validate(study: Study) -> None:
    predictions = read_predictions(study.predictions)
    read_reads(study.reads, predictions["case_id"])
    read_ratings(_ratings_long(study))


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _put(numbers: dict[str, float], key: str, **values: Any) -> None:
    """``key/name`` for every value; a ``ci`` pair becomes ``key/ci_low`` and ``key/ci_high``."""
    for name, value in values.items():
        if name == "ci":
            numbers[f"{key}/ci_low"], numbers[f"{key}/ci_high"] = _number(value[0]), _number(value[1])
        else:
            numbers[f"{key}/{name}"] = _number(value)


def report_numbers(report: Mapping[str, Any]) -> dict[str, float]:
    """The vectorized report's numbers that the loop recomputes, under the loop's keys."""
    numbers: dict[str, float] = {}
    for arm, result in report["reads"]["arms"].items():
        for rater, summaries in result["raters"].items():
            for metric in (*METRICS, "auc"):
                if metric in summaries:
                    _put(
                        numbers,
                        f"{arm}/{rater}/{metric}",
                        estimate=summaries[metric]["estimate"],
                        ci=summaries[metric]["ci"],
                    )
        for row in result["comparisons"]:
            extra = {name: row[name] for name in ("mcnemar_p", "se") if name in row}
            key = f"{arm}/{row['a']}-{row['b']}/{row['metric']}"
            _put(numbers, key, difference=row["difference"], ci=row["ci"], p_value=row["p_value"], **extra)
    mrmc = report["mrmc"]
    for modality, per_reader in mrmc["auc"].items():
        for reader, value in per_reader.items():
            _put(numbers, f"mrmc/auc/{modality}", **{reader: value})
    components = mrmc["components"]
    _put(
        numbers,
        "mrmc/components",
        **{name: components[name] for name in ("var", "cov1", "cov2", "cov3", "ms_t", "ms_tr")},
    )
    rrrc = mrmc["rrrc"]
    _put(numbers, "mrmc/rrrc", **{name: rrrc[name] for name in ("f", "ddf", "p_value", "difference", "se", "ci")})
    for arm, versus in report["model_vs_readers"].items():
        names = ("model_auc", "difference", "se", "df", "t", "p_value", "ci")
        _put(numbers, f"versus/{arm}", **{name: versus[name] for name in names})
        _put(numbers, f"versus/{arm}/reader_auc", **{str(i): v for i, v in enumerate(versus["reader_auc"])})
    return numbers


def _percentiles(samples: Any) -> tuple[float, float]:
    """The 95 % percentile interval of the finite samples (NaN when there is none)."""
    values = np.asarray(samples, dtype=float)
    values = values[np.isfinite(values)]
    if not values.size:
        return math.nan, math.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _p_value(observed: float, permuted: Any) -> float:
    """(1 + #{|d*| >= |d|}) / (1 + P) over the finite permuted differences, |d| less 1e-9 for rounding."""
    values = np.asarray(permuted, dtype=float)
    values = values[np.isfinite(values)]
    if not math.isfinite(observed):
        return math.nan
    return (1 + sum(1 for d in values if abs(d) >= abs(observed) - 1e-9)) / (1 + values.size)


def _delong(truth: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """DeLong, DeLong & Clarke-Pearson (1988) with the O(m n) kernel psi = [x > y] + 0.5 [x = y]."""
    components = []
    for scores in (a, b):
        x, y = scores[truth == 1], scores[truth == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        components.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = int(truth.sum()), int((truth == 0).sum())
    s10 = np.cov([components[0][1], components[1][1]])
    s01 = np.cov([components[0][2], components[1][2]])
    covariance = s10 / m + s01 / n
    difference = float(components[0][0] - components[1][0])
    se = math.sqrt(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    half = float(stats.norm.ppf(0.975)) * se
    p_value = float(2 * stats.norm.sf(abs(difference / se)))
    return {"difference": difference, "se": se, "p_value": p_value, "ci": (difference - half, difference + half)}


def _mcnemar(truth: np.ndarray, model: np.ndarray, reader: np.ndarray, label: int) -> float:
    """Exact McNemar on the cases of class ``label``: scipy's two-sided binomial test of the discordant pairs."""
    cases = truth == label
    model_right, reader_right = model[cases] == label, reader[cases] == label
    model_only = int((model_right & ~reader_right).sum())
    discordant = model_only + int((reader_right & ~model_right).sum())
    return float(stats.binomtest(model_only, discordant, 0.5).pvalue) if discordant else 1.0


def _loop_arm(
    arm: str,
    truth: np.ndarray,
    scores: np.ndarray,
    labels: Mapping[str, np.ndarray],
    ratings: Mapping[str, np.ndarray],
    settings: Settings,
) -> dict[str, float]:
    """One arm's Table 1 with a Python loop per bootstrap resample and per permutation."""
    boot_rng, perm_rng = np.random.default_rng(settings.seed).spawn(2)
    indices = bootstrap_indices(truth, settings.bootstrap, boot_rng)
    masks = swap_masks(truth.size, settings.permutations, perm_rng)
    model = (scores >= THRESHOLD).astype(int)
    raters = {MODEL: model, **labels}
    rated = {MODEL: scores, **ratings}
    boot: dict[str, dict[str, list[float]]] = {rater: {m: [] for m in (*METRICS, "auc")} for rater in raters}
    for rows in indices:
        resampled = truth[rows]
        for rater, decisions in raters.items():
            metrics = binary_metrics(resampled, decisions[rows], 0.5)
            for metric in METRICS:
                boot[rater][metric].append(metrics[metric])
        for rater, values in rated.items():
            boot[rater]["auc"].append(roc_auc_score(resampled, values[rows]))
    permuted: dict[str, dict[str, list[float]]] = {reader: {m: [] for m in METRICS} for reader in labels}
    for mask in masks:
        for reader, decisions in labels.items():
            a = binary_metrics(truth, np.where(mask, decisions, model), 0.5)
            b = binary_metrics(truth, np.where(mask, model, decisions), 0.5)
            for metric in METRICS:
                permuted[reader][metric].append(a[metric] - b[metric])

    numbers: dict[str, float] = {}
    point = {rater: binary_metrics(truth, decisions, 0.5) for rater, decisions in raters.items()}
    for rater in raters:
        for metric in METRICS:
            _put(
                numbers, f"{arm}/{rater}/{metric}", estimate=point[rater][metric], ci=_percentiles(boot[rater][metric])
            )
    for rater, values in rated.items():
        _put(numbers, f"{arm}/{rater}/auc", estimate=roc_auc_score(truth, values), ci=_percentiles(boot[rater]["auc"]))
    for metric in METRICS:
        model_boot = np.array(boot[MODEL][metric])
        readers_boot = np.mean([boot[reader][metric] for reader in labels], axis=0)
        readers_point = float(np.mean([point[reader][metric] for reader in labels]))
        _put(numbers, f"{arm}/{READERS_MEAN}/{metric}", estimate=readers_point, ci=_percentiles(readers_boot))
        for reader in labels:
            difference = point[MODEL][metric] - point[reader][metric]
            _put(
                numbers,
                f"{arm}/{MODEL}-{reader}/{metric}",
                difference=difference,
                ci=_percentiles(model_boot - np.array(boot[reader][metric])),
                p_value=_p_value(difference, permuted[reader][metric]),
            )
            if metric in ("sensitivity", "specificity"):
                label = 1 if metric == "sensitivity" else 0
                numbers[f"{arm}/{MODEL}-{reader}/{metric}/mcnemar_p"] = _mcnemar(truth, model, labels[reader], label)
        difference = point[MODEL][metric] - readers_point
        _put(
            numbers,
            f"{arm}/{MODEL}-{READERS_MEAN}/{metric}",
            difference=difference,
            ci=_percentiles(model_boot - readers_boot),
            p_value=_p_value(difference, np.mean([permuted[reader][metric] for reader in labels], axis=0)),
        )
    for reader, values in ratings.items():
        _put(numbers, f"{arm}/{MODEL}-{reader}/auc", **_delong(truth, scores, values))
    return numbers


def loop_reads(study: Study, settings: Settings) -> dict[str, float]:
    """``analyze_reads`` of both arms, the straightforward way."""
    numbers: dict[str, float] = {}
    for arm in sorted(ARMS):
        numbers |= _loop_arm(arm, study.truth, study.scores, study.labels[arm], study.ratings[arm], settings)
    return numbers


def _loop_jackknife(ratings: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUC of every row (sklearn) and their jackknife covariance: each AUC recomputed with each case deleted in turn,
    Cov = (K - 1)/K sum_k (theta_(k) - theta_(.))(theta'_(k) - theta'_(.))."""
    k = truth.size
    aucs = np.array([roc_auc_score(truth, row) for row in ratings])
    deleted = np.empty((len(ratings), k))
    keep = np.ones(k, dtype=bool)
    for case in range(k):
        keep[case] = False
        for g, row in enumerate(ratings):
            deleted[g, case] = roc_auc_score(truth[keep], row[keep])
        keep[case] = True
    deviations = deleted - deleted.mean(axis=1, keepdims=True)
    return aucs, (k - 1) / k * deviations @ deviations.T


def loop_mrmc(study: Study) -> dict[str, float]:
    """OR-Hillis random readers and random cases (Hillis 2007) over a per-case loop jackknife, the arms as
    modalities: Var, Cov1 (same reader), Cov2 (same arm), Cov3 (neither) averaged pair by pair, F = MS(T) / E with
    E = MS(T*R) + R max(Cov2 - Cov3, 0) on ddf_H = E^2 / [MS(T*R)^2 / ((T - 1)(R - 1))]."""
    arms = sorted(ARMS)
    readers = sorted(study.ratings[arms[0]])
    t, r = len(arms), len(readers)
    flat = np.array([study.ratings[arm][reader] for arm in arms for reader in readers])
    aucs, covariance = _loop_jackknife(flat, study.truth)
    sums = {"var": [], "cov1": [], "cov2": [], "cov3": []}
    for i in range(t * r):
        for j in range(t * r):
            same_arm, same_reader = i // r == j // r, i % r == j % r
            kind = {(True, True): "var", (False, True): "cov1", (True, False): "cov2"}.get((same_arm, same_reader))
            sums[kind or "cov3"].append(covariance[i, j])
    c = {kind: float(np.mean(values)) for kind, values in sums.items()}
    fom = aucs.reshape(t, r)
    grand, arm_means, reader_means = fom.mean(), fom.mean(axis=1), fom.mean(axis=0)
    ms_t = r * float(((arm_means - grand) ** 2).sum()) / (t - 1)
    ms_tr = float(((fom - arm_means[:, None] - reader_means[None, :] + grand) ** 2).sum()) / ((t - 1) * (r - 1))
    error = ms_tr + r * max(c["cov2"] - c["cov3"], 0.0)
    ddf = error**2 / (ms_tr**2 / ((t - 1) * (r - 1)))
    f = ms_t / error
    difference = float(arm_means[0] - arm_means[1])
    se = math.sqrt(2 * error / r)
    half = float(stats.t.ppf(0.975, ddf)) * se
    numbers: dict[str, float] = {}
    for i, arm in enumerate(arms):
        _put(numbers, f"mrmc/auc/{arm}", **{reader: fom[i, j] for j, reader in enumerate(readers)})
    _put(numbers, "mrmc/components", ms_t=ms_t, ms_tr=ms_tr, **c)
    _put(
        numbers,
        "mrmc/rrrc",
        f=f,
        ddf=ddf,
        p_value=stats.f.sf(f, t - 1, ddf),
        difference=difference,
        se=se,
        ci=(difference - half, difference + half),
    )
    return numbers


def loop_versus(study: Study) -> dict[str, float]:
    """The model against the readers' mean AUC per arm (Hillis 2007, section 5.3) over a per-case loop jackknife of
    (model, readers): D_r = AUC_model - AUC_r, t = mean D / sqrt([MS(R) + R max(Cov2, 0)] / R)."""
    numbers: dict[str, float] = {}
    for arm in sorted(ARMS):
        readers = sorted(study.ratings[arm])
        r = len(readers)
        aucs, covariance = _loop_jackknife(
            np.array([study.scores, *(study.ratings[arm][reader] for reader in readers)]), study.truth
        )
        differences = aucs[0] - aucs[1:]
        cov_d = np.array(
            [
                [covariance[0, 0] - covariance[0, b] - covariance[a, 0] + covariance[a, b] for b in range(1, r + 1)]
                for a in range(1, r + 1)
            ]
        )
        cov2 = float(np.mean([cov_d[a, b] for a in range(r) for b in range(r) if a != b]))
        ms_r = float(differences.var(ddof=1))
        error = ms_r + r * max(cov2, 0.0)
        se = math.sqrt(error / r)
        df = error**2 / (ms_r**2 / (r - 1))
        difference = float(differences.mean())
        t = difference / se
        half = float(stats.t.ppf(0.975, df)) * se
        _put(
            numbers,
            f"versus/{arm}",
            model_auc=aucs[0],
            difference=difference,
            se=se,
            df=df,
            t=t,
            p_value=2 * stats.t.sf(abs(t), df),
            ci=(difference - half, difference + half),
        )
        _put(numbers, f"versus/{arm}/reader_auc", **{str(i): v for i, v in enumerate(aucs[1:])})
    return numbers


def agreement(vectorized: Mapping[str, float], loop: Mapping[str, float]) -> dict[str, Any]:
    """How far the loop's numbers are from the vectorized ones: the largest absolute and relative differences, the
    keys outside ``TOLERANCE`` (NaN agrees only with NaN) and the permutation p-values that differ at all."""
    relative, absolute = TOLERANCE
    missing = sorted(set(loop) - set(vectorized))
    worst_abs = worst_rel = 0.0
    outside, p_values, p_differ = [], 0, []
    for key in sorted(set(loop) & set(vectorized)):
        a, b = vectorized[key], loop[key]
        if math.isnan(a) or math.isnan(b):
            if math.isnan(a) != math.isnan(b):
                outside.append(key)
            continue
        gap = abs(a - b)
        worst_abs = max(worst_abs, gap)
        worst_rel = max(worst_rel, gap / abs(b) if b else gap)
        if gap > absolute + relative * abs(b):
            outside.append(key)
        if key.endswith("/p_value") and not key.endswith("/auc/p_value") and not key.startswith(("mrmc", "versus")):
            p_values += 1
            if a != b:
                p_differ.append(key)
    return {
        "numbers_compared": len(set(loop) & set(vectorized)),
        "missing_in_report": missing,
        "max_abs_difference": worst_abs,
        "max_rel_difference": worst_rel,
        "tolerance": {"relative": relative, "absolute": absolute},
        "outside_tolerance": outside,
        "permutation_p_values": p_values,
        "permutation_p_values_differing": p_differ,
        "agree": not missing and not outside and not p_differ,
    }


def _machine() -> dict[str, Any]:
    """The library versions and BLAS threads that the figures depend on."""
    blas = sorted({f"{pool['prefix']} x{pool['num_threads']}" for pool in threadpool_info()})
    return {
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "pandas": pd.__version__,
        "thread_pools": ", ".join(blas),
    }


def _describe(study: Study, report: Mapping[str, Any]) -> dict[str, Any]:
    """What was simulated: sizes and the AUCs that came out."""
    mrmc = report["mrmc"]
    return {
        "cases": int(study.truth.size),
        "tumor": int(study.truth.sum()),
        "readers": len(mrmc["readers"]),
        "arms": list(mrmc["modalities"]),
        "model_auc": report["reads"]["raters"][MODEL]["auc"]["estimate"],
        "reader_auc": mrmc["auc"],
        "mean_reader_auc": mrmc["mean_auc"],
        "rrrc_p_value": mrmc["rrrc"]["p_value"],
    }


def _table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table for the terminal."""
    frame = pd.DataFrame([asdict(row) for row in rows])
    frame["loop_ms"] = ["" if v is None or math.isnan(v) else f"{v:,.0f}" for v in frame["loop_ms"]]
    frame["x_loop"] = ["" if v is None or math.isnan(v) else f"{v:,.0f}" for v in frame["x_loop"]]
    frame = frame[["label", "repeats", "median_ms", "best_ms", "loop_ms", "x_loop"]]
    frame.columns = ["measurement", "runs", "median ms", "best ms", "loop ms", "x loop"]
    return frame.to_string(
        index=False, justify="left", formatters={"median ms": "{:,.1f}".format, "best ms": "{:,.1f}".format}
    )


def _measure(
    study: Study, settings: Settings, device: torch.device
) -> tuple[list[Row], dict[str, Any], dict[str, float]]:
    """Time the vectorized calls in rotation and the loop once; the rows, the report and the loop's numbers."""
    calls = {
        "analyze_reads": lambda: _reads_report(study, settings),
        "analyze_mrmc": lambda: analyze_mrmc(_ratings_long(study)),
        "model_vs_readers": lambda: _versus(study),
        "report": lambda: whole_report(study, settings),
        "validation": lambda: _validate(study),
    }
    samples = rotate(calls, settings.repeats, 1, device)
    report = whole_report(study, settings)
    print("the loop baseline, once ...", flush=True)
    baseline = {
        "analyze_reads": lambda: loop_reads(study, settings),
        "analyze_mrmc": lambda: loop_mrmc(study),
        "model_vs_readers": lambda: loop_versus(study),
    }
    loops: dict[str, float] = {}
    numbers: dict[str, float] = {}
    for name, call in baseline.items():
        began = time.perf_counter()
        numbers |= call()
        loops[name] = (time.perf_counter() - began) * 1000.0
        print(f"  {name}: {loops[name] / 1000.0:.1f} s", flush=True)
    loops["report"] = sum(loops.values())
    rows = []
    for name, values in samples.items():
        milliseconds = [ms for ms, _ in values]
        median, loop = float(np.median(milliseconds)), loops.get(name)
        x_loop = None if loop is None else loop / median
        rows.append(Row(name, MEASUREMENTS[name], len(values), median, min(milliseconds), loop, x_loop))
    return rows, report, numbers


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the machine and the table, write the JSON; returns the exit status (1 when the loop
    and the vectorized code disagree)."""
    settings = parse_args(argv)
    device, began, about = start(settings.threads, "cpu")
    study = simulate(settings.cases, settings.readers, settings.seed)
    print(
        f"{settings.cases} cases, {settings.readers} readers x {len(ARMS)} arms; bootstrap {settings.bootstrap:,}, "
        f"permutations {settings.permutations:,}; timing the vectorized report {settings.repeats} times ...",
        flush=True,
    )
    with threadpool_limits(limits=settings.threads):
        about |= _machine()
        print(f"thread pools: {about['thread_pools']}", flush=True)
        rows, report, numbers = _measure(study, settings, device)
    agreed = agreement(report_numbers(report), numbers)
    seconds = time.perf_counter() - began
    about["load_1min_after"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    print(_table(rows))
    whole = next(row for row in rows if row.measurement == "report")
    print(
        f"x loop: the loop's one run / the vectorized median. Goal: the whole report under {GOAL_S:.0f} s "
        f"(median {whole.median_ms / 1000.0:.3f} s). The loop ran every resample and permutation (nothing "
        "extrapolated)."
    )
    print(
        f"Loop and vectorized {'agree' if agreed['agree'] else 'DISAGREE'}: {agreed['numbers_compared']} numbers, "
        f"max |diff| {agreed['max_abs_difference']:.1e} (relative {agreed['max_rel_difference']:.1e}); "
        f"{agreed['permutation_p_values']} permutation p-values, "
        f"{len(agreed['permutation_p_values_differing'])} differing."
    )
    if not agreed["agree"]:
        print("  outside tolerance: " + ", ".join(agreed["outside_tolerance"][:10]))
    print(f"Total {seconds:.0f} s.")
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "study": _describe(study, report),
        "goal_seconds": GOAL_S,
        "agreement": agreed,
        "seconds": seconds,
        "rows": [asdict(row) for row in rows],
    }
    write_results(settings.out, "analysis", device, settings.quick, document)
    return 0 if agreed["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
