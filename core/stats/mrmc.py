"""Multi-reader multi-case (MRMC) ROC analysis: Obuchowski-Rockette (OR) with Hillis (2007) degrees of freedom.

Every reader rates every case in every modality (fully crossed). Each (modality t, reader r) gets a figure of merit
theta_tr: the empirical (Wilcoxon, trapezoidal) AUC, or for binary decisions the sensitivity or the specificity. The
OR model (Obuchowski & Rockette 1995) is theta_tr = mu + tau_t + R_r + (tau R)_tr + e_tr, where the case-sampling
errors e are correlated because all readings share the cases: Var = Var(e_tr), Cov1 = Cov(e_tr, e_t'r) (same
reader), Cov2 = Cov(e_tr, e_tr') (same modality), Cov3 = Cov(e_tr, e_t'r') (neither). With T modalities, R readers
and the mean squares MS(T), MS(R), MS(T*R) of the T x R table of theta_tr, the three analyses of the Iowa OR-DBM
MRMC 2.51 program (Hillis et al. 2005; Hillis 2007; Hillis, Berbaum & Metz 2008) are:

- random readers and random cases (``rrrc``): F = MS(T) / E on (T - 1, ddf_H) df with the error term
  E = MS(T*R) + R max(Cov2 - Cov3, 0) and ddf_H = E^2 / {MS(T*R)^2 / [(T - 1)(R - 1)]} (Hillis 2007); a difference
  of two modality means has SE sqrt(2 E / R) and a t interval on ddf_H df;
- fixed readers and random cases (``frrc``): X2 = (T - 1) MS(T) / E on T - 1 df, E = Var - Cov1 + (R - 1)
  max(Cov2 - Cov3, 0); SE sqrt(2 E / R), z interval; per reader, SE sqrt(2 (Var_r - Cov1_r)) with Var_r and Cov1_r
  averaged over that reader's modalities;
- random readers and fixed cases (``rrfc``): F = MS(T) / MS(T*R) on (T - 1, (T - 1)(R - 1)) df, i.e. the repeated
  measures ANOVA of the reader figures of merit (with two modalities, the paired t-test).

Single-modality intervals use that modality's reader mean square and Cov2 only: rrrc SE sqrt([MS(R)_t + R
max(Cov2_t, 0)] / R) on ddf_H_single = [MS(R)_t + R max(Cov2_t, 0)]^2 / [MS(R)_t^2 / (R - 1)] df (Hillis 2007,
section 5.3); frrc SE sqrt([Var_t + (R - 1) max(Cov2_t, 0)] / R), z; rrfc SE sqrt(MS(R)_t / R) on R - 1 df. With more
than two modalities the F and X2 tests are global, and every pairwise difference uses the global error term, as the
Iowa program and RJafroc do.

The case-sampling covariances of the theta_tr come from one of three estimators (``cov=``):

- ``jackknife`` (default; the Iowa program's): delete one case at a time over all K cases, Cov = (K - 1)/K
  sum_k (theta_(k) - theta_(.))(theta'_(k) - theta'_(.)). For the Mann-Whitney AUC the delete-one AUCs are closed
  form: with the placement values V10_j (share of normal cases rated below abnormal case j, ties half) and V01_i
  (share of abnormal cases rated above normal case i), deleting abnormal case j gives (K1 AUC - V10_j) / (K1 - 1) and
  deleting normal case i gives (K0 AUC - V01_i) / (K0 - 1); nothing is refitted.
- ``delong``: DeLong, DeLong & Clarke-Pearson (1988), Cov = S10 / K1 + S01 / K0 with S10, S01 the sample
  covariances (divisor n - 1) of the placement values (structural components) over abnormal and normal cases.
- ``unbiased``: the unbiased U-statistic estimator of the case-sampling covariance of two Mann-Whitney AUCs on the
  same cases (Gallas 2006; Gallas, Pennello & Myers 2007; MRMCaov's ``unbiased``). E[AUC_a AUC_b] splits into kernel
  pairs sharing both cases, only the normal case, only the abnormal case, or neither; replacing each expectation by
  its unbiased sample moment gives Cov = [d (sum_i r_ai r_bi + sum_j c_aj c_bj - sum_ij psi_aij psi_bij)
  + (1 - d) S_a S_b] / (K0 K1)^2 with d = K0 K1 / [(K0 - 1)(K1 - 1)], psi the Mann-Whitney kernel, r its sums over
  abnormal cases (one per normal case), c its sums over normal cases and S its total. Unbiased for independent
  cases, so (unlike the other two) it can come out negative on small samples.

``model_vs_readers`` compares a standalone model (one fixed rater, e.g. the CNN) with the readers' mean AUC on the
same cases; ``mrmc_binary`` runs the OR analysis on the sensitivity or specificity of binary decisions.

References: Obuchowski NA, Rockette HE (1995) Commun Stat Simul Comput 24:285-308. Hillis SL, Obuchowski NA,
Schartz KM, Berbaum KS (2005) Stat Med 24:1579-1607. Hillis SL (2007) Stat Med 26:596-619. Hillis SL, Berbaum KS,
Metz CE (2008) Acad Radiol 15:647-661. DeLong ER, DeLong DM, Clarke-Pearson DL (1988) Biometrics 44:837-845.
Gallas BD (2006) Acad Radiol 13:353-362. Gallas BD, Pennello GA, Myers KJ (2007) J Opt Soc Am A 24:B70-B80.
Chakraborty DP (2017) Observer Performance Methods for Diagnostic Imaging, CRC Press (standalone CAD vs radiologists;
RJafroc ``StSignificanceTestingCadVsRad``). Kooi T, Gubern-Merida A, Mordang JJ, et al. (2016) A comparison between a
deep convolutional neural network and radiologists for classifying regions of interest in mammography, IWDM 2016.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "COV_METHODS",
    "Analysis",
    "Comparison",
    "MRMCResult",
    "ModalityCI",
    "ModelVsReaders",
    "ORComponents",
    "auc_covariance",
    "model_vs_readers",
    "mrmc_binary",
    "mrmc_or",
]

COV_METHODS = ("jackknife", "delong", "unbiased")
BINARY_FOMS = ("sensitivity", "specificity")
COLUMNS = ("reader", "modality", "case", "truth", "rating")
_KERNEL_BLOCK = 1 << 22  # kernel values held at once by the unbiased estimator (32 MiB of float64)


@dataclass(frozen=True)
class Comparison:
    """One difference ``first - second`` of modality mean figures of merit (or of one reader's, when ``reader`` is
    set); ``df`` is infinite for the z-based fixed-reader analysis."""

    first: Hashable
    second: Hashable
    difference: float
    se: float
    df: float
    statistic: float
    p_value: float
    ci: tuple[float, float]
    reader: Hashable | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"first": str(self.first), "second": str(self.second)}
        if self.reader is not None:
            out["reader"] = str(self.reader)
        return out | {
            "difference": _num(self.difference),
            "se": _num(self.se),
            "df": _num(self.df),
            "statistic": _num(self.statistic),
            "p_value": _num(self.p_value),
            "ci": [_num(self.ci[0]), _num(self.ci[1])],
        }


@dataclass(frozen=True)
class ModalityCI:
    """A single-modality interval for the readers' mean figure of merit (``df`` infinite for a z interval)."""

    modality: Hashable
    estimate: float
    se: float
    df: float
    ci: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": _num(self.estimate),
            "se": _num(self.se),
            "df": _num(self.df),
            "ci": [_num(self.ci[0]), _num(self.ci[1])],
        }


@dataclass(frozen=True)
class Analysis:
    """One generalization (``rrrc``, ``frrc`` or ``rrfc``): the global test of equal modality means (F, or X2 for
    ``frrc``, whose ``ddf`` is infinite), its error term, the pairwise differences, the single-modality intervals,
    and for ``frrc`` the per-reader differences."""

    name: str
    statistic: float
    ndf: float
    ddf: float
    p_value: float
    error_term: float
    comparisons: tuple[Comparison, ...]
    modalities: tuple[ModalityCI, ...]
    readers: tuple[Comparison, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        if self.name == "frrc":
            out: dict[str, Any] = {"chi2": _num(self.statistic), "df": _num(self.ndf)}
        else:
            out = {"f": _num(self.statistic), "ndf": _num(self.ndf), "ddf": _num(self.ddf)}
        out["p_value"] = _num(self.p_value)
        if len(self.comparisons) == 1:
            (only,) = self.comparisons
            out |= {"difference": _num(only.difference), "se": _num(only.se), "ci": [_num(c) for c in only.ci]}
        out["comparisons"] = [c.to_dict() for c in self.comparisons]
        out["modalities"] = {str(m.modality): m.to_dict() for m in self.modalities}
        if self.readers:
            out["readers"] = [c.to_dict() for c in self.readers]
        return out


@dataclass(frozen=True)
class ORComponents:
    """OR error covariances, variance components and mean squares; the ``*_by_modality`` and ``*_by_reader`` tuples
    follow ``MRMCResult.modalities`` and ``MRMCResult.readers``."""

    var: float
    cov1: float
    cov2: float
    cov3: float
    var_r: float
    var_tr: float
    ms_t: float
    ms_r: float
    ms_tr: float
    ms_r_by_modality: tuple[float, ...]
    var_by_modality: tuple[float, ...]
    cov2_by_modality: tuple[float, ...]
    var_by_reader: tuple[float, ...]
    cov1_by_reader: tuple[float, ...]

    @property
    def correlations(self) -> tuple[float, float, float]:
        """r1, r2, r3 = Cov1 / Var, Cov2 / Var, Cov3 / Var."""
        return _ratio(self.cov1, self.var), _ratio(self.cov2, self.var), _ratio(self.cov3, self.var)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            out[key] = [_num(v) for v in value] if isinstance(value, tuple) else _num(value)
        return out


@dataclass(frozen=True, eq=False)
class MRMCResult:
    """An OR analysis. ``fom[t, r]`` is the figure of merit of ``modalities[t]`` read by ``readers[r]``;
    ``covariance`` is its case-sampling covariance matrix over the flattened (modality-major) pairs."""

    figure_of_merit: str
    cov_method: str
    alpha: float
    modalities: tuple[Hashable, ...]
    readers: tuple[Hashable, ...]
    n_normal: int
    n_abnormal: int
    fom: np.ndarray
    covariance: np.ndarray
    components: ORComponents
    rrrc: Analysis
    frrc: Analysis
    rrfc: Analysis

    @property
    def mean_fom(self) -> np.ndarray:
        return self.fom.mean(axis=1)

    @property
    def auc(self) -> np.ndarray:
        """Reader AUCs ``[modality, reader]``; only for an AUC analysis (a binary one has ``fom``)."""
        if self.figure_of_merit != "auc":
            raise AttributeError(f"this analysis' figure of merit is {self.figure_of_merit}; use .fom")
        return self.fom

    @property
    def mean_auc(self) -> np.ndarray:
        return self.auc.mean(axis=1)

    def dbm_components(self) -> dict[str, float]:
        """The Dorfman-Berbaum-Metz variance components equivalent to the OR ones (Hillis et al. 2005):
        Var(C) = K Cov3, Var(T*C) = K (Cov2 - Cov3), Var(R*C) = K (Cov1 - Cov3), Var(T*R*C) + Var(error) =
        K (Var - Cov1 - Cov2 + Cov3); Var(R) and Var(T*R) are shared."""
        c, k = self.components, self.n_normal + self.n_abnormal
        return {
            "var_r": c.var_r,
            "var_c": k * c.cov3,
            "var_tr": c.var_tr,
            "var_tc": k * (c.cov2 - c.cov3),
            "var_rc": k * (c.cov1 - c.cov3),
            "var_trc_error": k * (c.var - c.cov1 - c.cov2 + c.cov3),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: per-modality per-reader and mean figures of merit under ``auc`` / ``mean_auc`` (or
        ``sensitivity`` / ``mean_sensitivity`` ...), the OR components and the three analyses (non-finite numbers
        become None)."""
        name = self.figure_of_merit
        return {
            "figure_of_merit": name,
            "cov_method": self.cov_method,
            "alpha": self.alpha,
            "modalities": [str(m) for m in self.modalities],
            "readers": [str(r) for r in self.readers],
            "n_normal": self.n_normal,
            "n_abnormal": self.n_abnormal,
            name: {
                str(m): {str(r): _num(v) for r, v in zip(self.readers, row, strict=True)}
                for m, row in zip(self.modalities, self.fom, strict=True)
            },
            f"mean_{name}": {str(m): _num(v) for m, v in zip(self.modalities, self.mean_fom, strict=True)},
            "components": self.components.to_dict(),
            "rrrc": self.rrrc.to_dict(),
            "frrc": self.frrc.to_dict(),
            "rrfc": self.rrfc.to_dict(),
        }


@dataclass(frozen=True, eq=False)
class ModelVsReaders:
    """A standalone model against the readers' mean AUC; ``difference`` = model AUC - readers' mean AUC, with the
    OR statistics of the per-reader differences (``ms_r``: their reader mean square; ``var``, ``cov2``: their
    case-sampling variance and same-cases covariance)."""

    cov_method: str
    alpha: float
    model_auc: float
    reader_auc: np.ndarray
    difference: float
    se: float
    df: float
    t: float
    p_value: float
    ci: tuple[float, float]
    ms_r: float
    var: float
    cov2: float

    @property
    def mean_reader_auc(self) -> float:
        return float(self.reader_auc.mean())

    def to_dict(self) -> dict[str, Any]:
        return {
            "cov_method": self.cov_method,
            "alpha": self.alpha,
            "model_auc": _num(self.model_auc),
            "reader_auc": [_num(a) for a in self.reader_auc],
            "mean_reader_auc": _num(self.mean_reader_auc),
            "difference": _num(self.difference),
            "se": _num(self.se),
            "df": _num(self.df),
            "t": _num(self.t),
            "p_value": _num(self.p_value),
            "ci": [_num(self.ci[0]), _num(self.ci[1])],
            "ms_r": _num(self.ms_r),
            "var": _num(self.var),
            "cov2": _num(self.cov2),
        }


def auc_covariance(ratings: np.ndarray, truth: np.ndarray, method: str = "jackknife") -> tuple[np.ndarray, np.ndarray]:
    """Empirical AUC of each row of ``ratings`` (raters x cases, all on the same cases) and the case-sampling
    covariance matrix of those AUCs by ``method`` (see the module docstring)."""
    if method not in COV_METHODS:
        raise ValueError(f"unknown covariance method {method!r}; expected one of {', '.join(COV_METHODS)}")
    ratings = np.atleast_2d(np.asarray(ratings, dtype=float))
    truth = _truth_vector(truth, ratings.shape[1])
    if not np.isfinite(ratings).all():
        raise ValueError("ratings must be finite numbers")
    neg, pos = ratings[:, truth == 0], ratings[:, truth == 1]
    k0, k1 = neg.shape[1], pos.shape[1]
    v10, v01 = _placements(neg, pos)
    auc = v10.mean(axis=1)
    if method == "jackknife":
        deleted = np.concatenate([(k0 * auc[:, None] - v01) / (k0 - 1), (k1 * auc[:, None] - v10) / (k1 - 1)], axis=1)
        return auc, _jackknife(deleted)
    if method == "delong":
        return auc, _sample_cov(v10) / k1 + _sample_cov(v01) / k0
    n = k0 * k1
    rows, cols, total = k1 * v01, k0 * v10, n * auc
    d = n / ((k0 - 1) * (k1 - 1))
    shared = rows @ rows.T + cols @ cols.T - _kernel_products(neg, pos)
    return auc, (d * shared + (1.0 - d) * np.outer(total, total)) / n**2


def mrmc_or(
    ratings: pd.DataFrame | np.ndarray,
    truth: np.ndarray | None = None,
    *,
    cov: str = "jackknife",
    alpha: float = 0.05,
) -> MRMCResult:
    """OR analysis of reader AUCs with Hillis (2007) ddf (module docstring). ``ratings`` is either long format with
    columns reader, modality, case, truth (0/1, 1 = diseased), rating (higher = more likely diseased), or an array
    (modality, reader, case) with ``truth`` per case. Refuses, naming the first offending cell, anything that is not
    fully crossed."""
    if cov not in COV_METHODS:
        raise ValueError(f"unknown covariance method {cov!r}; expected one of {', '.join(COV_METHODS)}")
    _check_alpha(alpha)
    cube, truth, modalities, readers = _crossed(ratings, truth)
    t, r, k = cube.shape
    auc, covariance = auc_covariance(cube.reshape(t * r, k), truth, cov)
    return _or_result("auc", cov, alpha, auc.reshape(t, r), covariance, modalities, readers, truth)


def mrmc_binary(
    decisions: pd.DataFrame | np.ndarray,
    truth: np.ndarray | None = None,
    *,
    fom: str = "sensitivity",
    threshold: float | None = None,
    alpha: float = 0.05,
) -> MRMCResult:
    """OR analysis of binary decisions (input as for ``mrmc_or``; ``rating`` 1 = called diseased, or any rating
    with ``threshold``: called diseased when rating >= threshold). The figure of merit is the sensitivity (share of
    diseased cases called diseased) or the specificity (share of non-diseased called non-diseased); its covariance is
    the jackknife over the cases it is computed on, which for a proportion equals the sample covariance of the
    decisions / n, i.e. DeLong's and the unbiased estimator too (Gallas, Pennello & Myers 2007)."""
    if fom not in BINARY_FOMS:
        raise ValueError(f"unknown binary figure of merit {fom!r}; expected one of {', '.join(BINARY_FOMS)}")
    _check_alpha(alpha)
    cube, truth, modalities, readers = _crossed(decisions, truth)
    if threshold is not None:
        cube = (cube >= threshold).astype(float)
    elif not np.isin(cube, (0.0, 1.0)).all():
        bad = cube[~np.isin(cube, (0.0, 1.0))][0]
        raise ValueError(f"binary MRMC needs 0/1 decisions in 'rating' (or a threshold); got {bad:g}")
    t, r, _ = cube.shape
    hits = cube[..., truth == 1] if fom == "sensitivity" else 1.0 - cube[..., truth == 0]
    flat = hits.reshape(t * r, -1)
    n = flat.shape[1]
    value = flat.mean(axis=1)
    covariance = _jackknife((n * value[:, None] - flat) / (n - 1))
    return _or_result(fom, "jackknife", alpha, value.reshape(t, r), covariance, modalities, readers, truth)


def model_vs_readers(
    model_scores: np.ndarray,
    reader_ratings: np.ndarray,
    truth: np.ndarray,
    *,
    cov: str = "jackknife",
    alpha: float = 0.05,
) -> ModelVsReaders:
    """Compare a standalone model's AUC with the mean AUC of readers (rows of ``reader_ratings``) on the same cases,
    readers random, the model fixed, cases random: the single-treatment OR analysis of the per-reader differences
    D_r = AUC_model - AUC_r (Hillis 2007, section 5.3; Chakraborty 2017 and RJafroc's ``StSignificanceTestingCadVsRad``
    method "1T-RRRC").

    The model is one fixed rater, not a sample of raters, so its AUC enters each D_r as a constant plus case noise:
    D_r = mu_D + R_r + e_r, Var(e_r) = Var, Cov(e_r, e_r') = Cov2 (the same cases), both from the covariance of
    (AUC_model, AUC_1, ..., AUC_R) contrasted to the differences. Then Var(mean D) = [sigma_R^2 + Var + (R - 1) Cov2]
    / R, estimated by [MS(R) + R max(Cov2, 0)] / R with E[MS(R)] = sigma_R^2 + Var - Cov2, and t = mean D / SE on
    ddf_H_single = [MS(R) + R max(Cov2, 0)]^2 / [MS(R)^2 / (R - 1)] df. This is exactly the OR-RRRC test of a
    two-modality study whose first modality is the model's scores copied for every reader (Kooi et al. 2016), whereas
    entering the model as a one-reader modality breaks the crossed design and a fixed-reader (z) comparison ignores
    the between-reader variance and is anti-conservative for the reader population.
    """
    if cov not in COV_METHODS:
        raise ValueError(f"unknown covariance method {cov!r}; expected one of {', '.join(COV_METHODS)}")
    _check_alpha(alpha)
    model = np.asarray(model_scores, dtype=float).ravel()
    readers = np.asarray(reader_ratings, dtype=float)
    if readers.ndim != 2 or readers.shape[1] != model.size:
        raise ValueError(f"reader_ratings must be (readers, cases) with {model.size} cases; got shape {readers.shape}")
    r = readers.shape[0]
    if r < 2:
        raise ValueError(f"the readers' mean needs at least two readers (got {r})")
    if not np.isfinite(model).all():
        raise ValueError(f"the model has no score for case {int(np.flatnonzero(~np.isfinite(model))[0])}")
    missing = np.argwhere(~np.isfinite(readers))
    if missing.size:
        raise ValueError(f"reader {missing[0][0]} has no rating for case {missing[0][1]}")
    auc, covariance = auc_covariance(np.vstack([model, readers]), truth, cov)
    contrast = np.hstack([np.ones((r, 1)), -np.eye(r)])
    diffs, cov_d = contrast @ auc, contrast @ covariance @ contrast.T
    var = float(np.diag(cov_d).mean())
    cov2 = float((cov_d.sum() - np.trace(cov_d)) / (r * (r - 1)))
    ms_r = float(diffs.var(ddof=1))
    error = ms_r + r * max(cov2, 0.0)
    se = math.sqrt(error / r)
    df = _hillis_ddf(error, ms_r, r - 1)
    difference = float(diffs.mean())
    t_stat, p_value, ci = _t_test(difference, se, df, alpha)
    return ModelVsReaders(cov, alpha, float(auc[0]), auc[1:], difference, se, df, t_stat, p_value, ci, ms_r, var, cov2)


def _or_result(
    name: str,
    cov_method: str,
    alpha: float,
    fom: np.ndarray,
    covariance: np.ndarray,
    modalities: tuple[Hashable, ...],
    readers: tuple[Hashable, ...],
    truth: np.ndarray,
) -> MRMCResult:
    components = _components(fom, covariance)
    rrrc, frrc, rrfc = _analyses(fom, components, modalities, readers, alpha)
    k1 = int(truth.sum())
    return MRMCResult(
        name, cov_method, alpha, modalities, readers, truth.size - k1, k1, fom, covariance, components, rrrc, frrc, rrfc
    )


def _components(fom: np.ndarray, covariance: np.ndarray) -> ORComponents:
    """Average the case covariances into Var, Cov1, Cov2, Cov3 (overall, per modality, per reader) and take the
    T x R ANOVA of the figures of merit; Var(R) and Var(T*R) from the expected mean squares (Hillis et al. 2005)."""
    t, r = fom.shape
    c = covariance.reshape(t, r, t, r)
    modality = np.repeat(np.arange(t), r)
    reader = np.tile(np.arange(r), t)
    same_t = modality[:, None] == modality[None, :]
    same_r = reader[:, None] == reader[None, :]
    var = float(covariance[same_t & same_r].mean())
    cov1 = float(covariance[~same_t & same_r].mean())
    cov2 = float(covariance[same_t & ~same_r].mean())
    cov3 = float(covariance[~same_t & ~same_r].mean())
    diagonal = np.einsum("trtr->tr", c)
    by_modality = np.einsum("tatb->tab", c)  # (t, r, r) blocks of one modality
    by_reader = np.einsum("arbr->rab", c)  # (r, t, t) blocks of one reader
    cov2_t = (by_modality.sum(axis=(1, 2)) - diagonal.sum(axis=1)) / (r * (r - 1))
    cov1_r = (by_reader.sum(axis=(1, 2)) - diagonal.sum(axis=0)) / (t * (t - 1))
    grand, mean_t, mean_r = fom.mean(), fom.mean(axis=1), fom.mean(axis=0)
    ms_t = float(r * ((mean_t - grand) ** 2).sum() / (t - 1))
    ms_r = float(t * ((mean_r - grand) ** 2).sum() / (r - 1))
    ms_tr = float(((fom - mean_t[:, None] - mean_r[None, :] + grand) ** 2).sum() / ((t - 1) * (r - 1)))
    return ORComponents(
        var=var,
        cov1=cov1,
        cov2=cov2,
        cov3=cov3,
        var_r=(ms_r - ms_tr) / t - cov1 + cov3,
        var_tr=ms_tr - var + cov1 + cov2 - cov3,
        ms_t=ms_t,
        ms_r=ms_r,
        ms_tr=ms_tr,
        ms_r_by_modality=tuple(float(v) for v in fom.var(axis=1, ddof=1)),
        var_by_modality=tuple(float(v) for v in diagonal.mean(axis=1)),
        cov2_by_modality=tuple(float(v) for v in cov2_t),
        var_by_reader=tuple(float(v) for v in diagonal.mean(axis=0)),
        cov1_by_reader=tuple(float(v) for v in cov1_r),
    )


def _analyses(
    fom: np.ndarray, c: ORComponents, modalities: tuple[Hashable, ...], readers: tuple[Hashable, ...], alpha: float
) -> tuple[Analysis, Analysis, Analysis]:
    t, r = fom.shape
    means = fom.mean(axis=1)
    pairs = list(combinations(range(t), 2))
    ndf = float(t - 1)

    def compare(se: float, df: float) -> tuple[Comparison, ...]:
        out = []
        for a, b in pairs:
            diff = float(means[a] - means[b])
            out.append(Comparison(modalities[a], modalities[b], diff, se, df, *_t_test(diff, se, df, alpha)))
        return tuple(out)

    def single(se: np.ndarray, df: np.ndarray) -> tuple[ModalityCI, ...]:
        half = stats.t.ppf(1 - alpha / 2, df) * se
        return tuple(
            ModalityCI(modalities[i], float(means[i]), float(se[i]), float(df[i]), _ci(means[i], half[i]))
            for i in range(t)
        )

    ms_r_t = np.array(c.ms_r_by_modality)
    cov2_t = np.maximum(np.array(c.cov2_by_modality), 0.0)

    error = c.ms_tr + r * max(c.cov2 - c.cov3, 0.0)
    ddf = _hillis_ddf(error, c.ms_tr, (t - 1) * (r - 1))
    f = _ratio(c.ms_t, error)
    single_error = ms_r_t + r * cov2_t
    single_df = np.array([_hillis_ddf(e, m, r - 1) for e, m in zip(single_error, ms_r_t, strict=True)])
    rrrc = Analysis(
        "rrrc",
        f,
        ndf,
        ddf,
        _f_sf(f, ndf, ddf),
        error,
        compare(float(_root(2 * error / r)), ddf),
        single(_root(single_error / r), single_df),
    )

    error = c.var - c.cov1 + (r - 1) * max(c.cov2 - c.cov3, 0.0)
    chi2 = _ratio((t - 1) * c.ms_t, error)
    se_reader = _root(2 * (np.array(c.var_by_reader) - np.array(c.cov1_by_reader)))
    per_reader = []
    for j, reader in enumerate(readers):
        for a, b in pairs:
            diff = float(fom[a, j] - fom[b, j])
            stat, p, ci = _t_test(diff, float(se_reader[j]), math.inf, alpha)
            per_reader.append(
                Comparison(modalities[a], modalities[b], diff, float(se_reader[j]), math.inf, stat, p, ci, reader)
            )
    frrc = Analysis(
        "frrc",
        chi2,
        ndf,
        math.inf,
        float(stats.chi2.sf(chi2, t - 1)),
        error,
        compare(float(_root(2 * error / r)), math.inf),
        single(_root((np.array(c.var_by_modality) + (r - 1) * cov2_t) / r), np.full(t, np.inf)),
        tuple(per_reader),
    )

    ddf = float((t - 1) * (r - 1))
    f = _ratio(c.ms_t, c.ms_tr)
    rrfc = Analysis(
        "rrfc",
        f,
        ndf,
        ddf,
        _f_sf(f, ndf, ddf),
        c.ms_tr,
        compare(float(_root(2 * c.ms_tr / r)), ddf),
        single(_root(ms_r_t / r), np.full(t, r - 1.0)),
    )
    return rrrc, frrc, rrfc


def _crossed(
    data: pd.DataFrame | np.ndarray, truth: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, tuple[Hashable, ...], tuple[Hashable, ...]]:
    """The (modality, reader, case) ratings cube, truth per case and the sorted modality and reader labels."""
    if isinstance(data, pd.DataFrame):
        if truth is not None:
            raise ValueError("with long-format ratings, truth comes from their 'truth' column; do not pass truth")
        cube, truth, modalities, readers = _from_long(data)
    else:
        cube = np.asarray(data, dtype=float)
        if cube.ndim != 3:
            raise ValueError(f"array ratings must be (modality, reader, case); got shape {cube.shape}")
        if truth is None:
            raise ValueError("array ratings need truth per case")
        truth = _truth_vector(truth, cube.shape[2])
        modalities, readers = tuple(range(cube.shape[0])), tuple(range(cube.shape[1]))
        missing = np.argwhere(np.isnan(cube))
        if missing.size:
            m, r, k = missing[0]
            raise ValueError(f"reader {r} has no rating for case {k} in modality {m}{_more(len(missing))}")
    if len(modalities) < 2:
        raise ValueError(f"an MRMC comparison needs at least two modalities (got {len(modalities)})")
    if len(readers) < 2:
        raise ValueError(f"an MRMC analysis needs at least two readers (got {len(readers)})")
    if not np.isfinite(cube).all():
        raise ValueError("ratings must be finite numbers")
    return cube, truth, modalities, readers


def _from_long(data: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, tuple[Hashable, ...], tuple[Hashable, ...]]:
    absent = [c for c in COLUMNS if c not in data.columns]
    if absent:
        raise ValueError(f"ratings need columns {', '.join(COLUMNS)}; missing {', '.join(absent)}")
    keys = ["modality", "reader", "case"]
    if data[keys].isna().any().any():
        raise ValueError("reader, modality and case must not be empty")
    rating = pd.to_numeric(data["rating"], errors="coerce")
    bad = rating.isna() & data["rating"].notna()
    if bad.any():
        row = data[bad].iloc[0]
        raise ValueError(
            f"rating must be numeric; reader {row['reader']} gave {row['rating']!r} for case {row['case']} "
            f"in modality {row['modality']}"
        )
    repeated = data.duplicated(keys)
    if repeated.any():
        row = data[repeated].iloc[0]
        raise ValueError(
            f"reader {row['reader']} rated case {row['case']} more than once in modality {row['modality']}"
        )
    per_case = data.groupby("case", sort=True)["truth"]
    conflicting = per_case.nunique(dropna=False)
    if (conflicting > 1).any():
        case = conflicting.index[conflicting > 1][0]
        values = sorted(data.loc[data["case"] == case, "truth"].astype(str).unique())
        raise ValueError(f"case {case} has conflicting truth ({' and '.join(values)})")
    first = per_case.first()
    cases = tuple(_plain(c) for c in first.index)
    truth = _truth_vector(first.to_numpy(), len(cases), cases)
    modalities = tuple(_plain(m) for m in sorted(data["modality"].unique()))
    readers = tuple(_plain(r) for r in sorted(data["reader"].unique()))
    grid = pd.MultiIndex.from_product([modalities, readers, cases], names=keys)
    values = pd.Series(rating.to_numpy(dtype=float), index=pd.MultiIndex.from_frame(data[keys]))
    cube = values.reindex(grid).to_numpy(dtype=float).reshape(len(modalities), len(readers), len(cases))
    missing = np.argwhere(np.isnan(cube))
    if missing.size:
        m, r, k = missing[0]
        raise ValueError(
            f"reader {readers[r]} has no rating for case {cases[k]} in modality {modalities[m]}{_more(len(missing))}"
            "; MRMC needs every reader to rate every case in every modality"
        )
    return cube, truth, modalities, readers


def _truth_vector(truth: np.ndarray, n: int, cases: tuple[Hashable, ...] | None = None) -> np.ndarray:
    values = np.asarray(truth)
    if values.ndim != 1 or values.size != n:
        raise ValueError(f"truth must have one value per case ({n}); got shape {values.shape}")
    numeric = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    wrong = ~np.isin(numeric, (0.0, 1.0))
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise ValueError(f"truth must be 0 or 1; case {cases[i] if cases else i} has {_plain(values[i])!r}")
    truth = numeric.astype(int)
    k1 = int(truth.sum())
    if min(k1, n - k1) < 2:
        raise ValueError(f"needs at least two diseased and two non-diseased cases (got {k1} and {n - k1})")
    return truth


def _placements(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Placement values per rater (row): V10[:, j] = share of normal cases rated below abnormal case j, V01[:, i] =
    share of abnormal cases rated above normal case i, ties counting half; from midranks, without a case loop."""
    k0, k1 = neg.shape[1], pos.shape[1]
    both = stats.rankdata(np.concatenate([neg, pos], axis=1), axis=1)
    v10 = (both[:, k0:] - stats.rankdata(pos, axis=1)) / k0
    v01 = 1.0 - (both[:, :k0] - stats.rankdata(neg, axis=1)) / k1
    return v10, v01


def _kernel_products(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """sum over (normal i, abnormal j) of psi_a(i, j) psi_b(i, j) for every pair of raters, in blocks of normal
    cases so that memory stays bounded."""
    g, k0 = neg.shape
    k1 = pos.shape[1]
    step = max(1, _KERNEL_BLOCK // (g * k1))
    out = np.zeros((g, g))
    for start in range(0, k0, step):
        x, y = neg[:, start : start + step, None], pos[:, None, :]
        psi = ((y > x) + 0.5 * (y == x)).reshape(g, -1)
        out += psi @ psi.T
    return out


def _jackknife(deleted: np.ndarray) -> np.ndarray:
    """(n - 1)/n sum of cross-products of the delete-one estimates' deviations (rows: estimates, columns: deletions)."""
    n = deleted.shape[1]
    d = deleted - deleted.mean(axis=1, keepdims=True)
    return (n - 1) / n * (d @ d.T)


def _sample_cov(x: np.ndarray) -> np.ndarray:
    d = x - x.mean(axis=1, keepdims=True)
    return d @ d.T / (x.shape[1] - 1)


def _hillis_ddf(error: float, ms: float, df: float) -> float:
    """Satterthwaite-type ddf of an error term built on a mean square with ``df`` degrees of freedom (Hillis 2007)."""
    return math.inf if ms == 0 else float(error**2 / (ms**2 / df))


def _root(x: float | np.ndarray) -> np.ndarray:
    """Square root; NaN, not an error, for a negative variance estimate (the unbiased covariance can give one)."""
    x = np.asarray(x, dtype=float)
    return np.sqrt(np.where(x >= 0, x, np.nan))


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.nan if numerator == 0 else math.inf
    return float(numerator / denominator)


def _f_sf(f: float, ndf: float, ddf: float) -> float:
    if math.isinf(ddf):
        return float(stats.chi2.sf(f * ndf, ndf))
    return float(stats.f.sf(f, ndf, ddf))


def _t_test(estimate: float, se: float, df: float, alpha: float) -> tuple[float, float, tuple[float, float]]:
    """Statistic, two-sided p-value and 1 - alpha interval of ``estimate`` on ``df`` df (infinite: z)."""
    statistic = _ratio(estimate, se)
    p_value = float(2 * stats.t.sf(abs(statistic), df)) if not math.isnan(statistic) else math.nan
    return statistic, p_value, _ci(estimate, float(stats.t.ppf(1 - alpha / 2, df)) * se)


def _ci(estimate: float, half: float) -> tuple[float, float]:
    return float(estimate - half), float(estimate + half)


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie between 0 and 1; got {alpha}")


def _more(n_missing: int) -> str:
    return f" (and {n_missing - 1} more missing)" if n_missing > 1 else ""


def _plain(label: Hashable) -> Hashable:
    return label.item() if isinstance(label, np.generic) else label


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
