"""The Results of a reader study: its cases, truth, the CNN's scores and the readers' answers, put through
``core.stats`` (Table 1 with bootstrap CIs and paired tests per arm, the ROC curve with its band, MRMC, the CNN
against the readers' mean AUC, error analysis).

Per arm, the CNN is the model registered for the arm's modality and the study's task (the newest unless chosen),
at its registered operating threshold (chosen on validation data, as the FL-CNN paper did) unless a policy is asked
for. Readers' confidence becomes an ROC score: on the 0-100 scale it already is one (0 = surely negative); on the
5-point scale, the answer and the confidence make a 10-point scale (negative, certain = 1 ... negative, very unsure
= 5; positive, very unsure = 6 ... positive, certain = 10). Only readers who finished an arm enter its analysis;
the others are listed with their progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.stats.compare import bootstrap_counts, bootstrap_indices
from core.stats.mrmc import model_vs_readers, mrmc_or
from core.stats.report import analyze_reads
from core.stats.thresholds import POLICIES, Threshold
from db import repo
from db.models import Prediction, Read, SpecimenImage, StudyCase, User
from db.repo import ModelInfo
from db.session import session_scope
from services import studies

__all__ = ["ArmInputs", "StudyResults", "arm_inputs", "reader_score", "roc_band", "study_results", "study_version"]


@dataclass(frozen=True)
class ArmInputs:
    arm: str
    modality: str
    model: ModelInfo | None
    cases: pd.DataFrame  # case_id, truth, score (NaN where the model has no prediction yet)
    reads: pd.DataFrame  # case_id, reader_id, arm, label, rating, score (latest version of each answer)
    unfinished: dict[str, int]  # reader -> cases answered, for readers left out of this arm


@dataclass
class StudyResults:
    study: studies.StudyInfo
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> the analyze_reads report (+ extras)
    mrmc: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def reader_score(label: np.ndarray, rating: np.ndarray, scale: str) -> np.ndarray:
    """A reader's ROC score from their answer and confidence (see the module docstring)."""
    label, rating = np.asarray(label, dtype=float), np.asarray(rating, dtype=float)
    if scale == "hundred":
        return rating
    return np.where(label == 1, 5.0 + rating, 6.0 - rating)


def study_version(session: Session, study_id: int) -> tuple[int, int]:
    """Changes whenever a read or a prediction is added: (reads, newest prediction id), the cache key of results."""
    reads = session.scalar(select(func.count(Read.id)).where(Read.study_id == study_id)) or 0
    newest = session.scalar(select(func.max(Prediction.id))) or 0
    return int(reads), int(newest)


def arm_inputs(session: Session, study_id: int, arm_name: str, model: ModelInfo | None) -> ArmInputs:
    """The cases with truth and the model's latest score on the arm's image, and the finished readers' answers."""
    study = studies.get_study(session, study_id)
    arm = next(a for a in study.arms if a.name == arm_name)
    cases = studies.export_cases(session, study_id, user_id=None, audit=False)
    cases = cases[~cases["training"]].drop(columns=["training", "split"]).reset_index(drop=True)
    scores = {}
    if model is not None:
        rows = session.execute(
            select(repo.Specimen.code, Prediction.probability)
            .join(SpecimenImage, SpecimenImage.id == Prediction.image_id)
            .join(repo.Specimen, repo.Specimen.id == SpecimenImage.specimen_id)
            .join(StudyCase, StudyCase.specimen_id == repo.Specimen.id)
            .where(
                StudyCase.study_id == study_id,
                SpecimenImage.modality == arm.modality,
                Prediction.model_id == model.id,
            )
            .order_by(Prediction.id)
        ).all()
        scores = {code: probability for code, probability in rows}  # the newest wins
    cases["score"] = cases["case_id"].map(scores).astype(float)
    reads = studies.export_reads(session, study_id, user_id=None, audit=False)
    reads = reads[reads["arm"] == arm_name][["case_id", "reader_id", "arm", "label", "rating"]]
    counts = reads.groupby("reader_id")["case_id"].nunique()
    finished = counts[counts == len(cases)].index
    invited = session.scalars(select(User.username).where(User.id.in_(study.reader_ids))).all()
    unfinished = {r: int(counts.get(r, 0)) for r in sorted(set(invited) | set(counts.index)) if r not in finished}
    reads = reads[reads["reader_id"].isin(finished)].copy()
    reads["score"] = reader_score(reads["label"], reads["rating"], study.rating_scale)
    return ArmInputs(arm_name, arm.modality, model, cases, reads.reset_index(drop=True), unfinished)


def roc_band(
    truth: np.ndarray, scores: np.ndarray, *, resamples: int = 500, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """Pointwise bootstrap band of the ROC curve on a grid of false-positive rates (cases resampled within class,
    vectorised: one weight matrix, cumulative sums over the cases sorted by score): columns fpr, tpr, low, high."""
    truth = np.asarray(truth, dtype=int)
    scores = np.asarray(scores, dtype=float)
    grid = np.linspace(0.0, 1.0, 101)
    weights = bootstrap_counts(bootstrap_indices(truth, resamples, seed), truth.size).astype(np.float64)
    band = _roc_on_grid(truth, scores, weights, grid)
    tail = (1.0 - level) / 2.0
    return pd.DataFrame(
        {
            "fpr": grid,
            "tpr": _roc_on_grid(truth, scores, np.ones((1, truth.size)), grid)[0],
            "low": np.quantile(band, tail, axis=0),
            "high": np.quantile(band, 1.0 - tail, axis=0),
        }
    )


def _roc_on_grid(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The ROC step function of each row of case ``weights``, read at the false-positive rates ``grid``:
    (rows, grid) TPRs, the highest TPR reached at FPR <= g."""
    rows = weights.shape[0]
    order = np.argsort(-scores, kind="stable")
    pos = np.cumsum(weights[:, order] * truth[order], axis=1)
    neg = np.cumsum(weights[:, order] * (1 - truth[order]), axis=1)
    # thresholds between tied scores are not operating points: keep the last index of each run of equal scores
    last = np.r_[scores[order][1:] != scores[order][:-1], True]
    tpr = np.concatenate([np.zeros((rows, 1)), pos[:, last] / pos[:, -1:]], axis=1)
    fpr = np.concatenate([np.zeros((rows, 1)), neg[:, last] / neg[:, -1:]], axis=1)
    # FPR and TPR rise along each row, so the answer is the TPR at the last point with FPR <= g: one searchsorted
    # over all rows, each shifted by 2 x its index so the rows do not overlap
    shift = 2.0 * np.arange(rows)[:, None]
    last_point = np.searchsorted((fpr + shift).ravel(), (grid[None, :] + shift).ravel(), side="right") - 1
    return tpr.ravel()[last_point].reshape(rows, grid.size)


def study_results(
    study_id: int,
    *,
    models: dict[str, int] | None = None,
    policy: str | None = None,
    bootstrap: int = 1000,
    permutations: int = 10000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    database: str | None = None,
) -> StudyResults:
    """Everything the Results page shows for a study. ``models`` maps arm -> model id (default: the newest model of
    the study's task for the arm's modality). Missing model predictions on the study's images are computed first."""
    say = progress or (lambda _m: None)
    with session_scope(database) as session:
        study = studies.get_study(session, study_id)
        if study is None:
            raise studies.StudyError(f"there is no study #{study_id}")
        chosen = {}
        for arm in study.arms:
            model_id = (models or {}).get(arm.name)
            model = (
                repo.find_model(session, model_id) if model_id else repo.model_for(session, study.task, arm.modality)
            )
            chosen[arm.name] = model
    results = StudyResults(study)
    if study.simulated:
        results.notes.append("The reads of this study are SIMULATED (generated by a program), not given by readers.")
    from services.study_ai import predict_images

    for arm in study.arms:
        model = chosen[arm.name]
        if model is not None:
            say(f"{arm.name}: the model's predictions on the study images")
            with session_scope(database) as session:
                image_ids = session.scalars(
                    select(SpecimenImage.id)
                    .join(StudyCase, StudyCase.specimen_id == SpecimenImage.specimen_id)
                    .where(StudyCase.study_id == study_id, SpecimenImage.modality == arm.modality)
                ).all()
            predict_images(model.id, image_ids, database=database)
        with session_scope(database) as session:
            inputs = arm_inputs(session, study_id, arm.name, model)
        results.arms[arm.name] = _arm_report(inputs, policy, bootstrap, permutations, seed, results.notes, say)
    say("MRMC")
    results.mrmc = _mrmc(results, study)
    return results


def _arm_report(inputs: ArmInputs, policy, bootstrap, permutations, seed, notes, say) -> dict[str, Any]:
    base = {"modality": inputs.modality, "unfinished": inputs.unfinished, "model": None, "inputs": inputs}
    if inputs.model is None:
        notes.append(f"Arm {inputs.arm}: no {inputs.modality} model is registered for this task; readers only.")
    if inputs.reads.empty:
        notes.append(f"Arm {inputs.arm}: no reader has finished it yet.")
        return base
    if inputs.model is None or inputs.cases["score"].isna().any():
        return base
    say(f"{inputs.arm}: bootstrap and permutation tests")
    predictions = inputs.cases[["case_id", "truth", "score"]]
    try:
        report = analyze_reads(
            predictions,
            inputs.reads.assign(rating=inputs.reads["score"]),
            threshold=None if policy else _registered(inputs.model),
            policy=policy,
            bootstrap=bootstrap,
            permutations=permutations,
            seed=seed,
        )
    except ValueError as error:  # e.g. too few cases of one class for DeLong or a policy
        notes.append(f"Arm {inputs.arm} cannot be analysed: {error}.")
        return base
    truth = predictions["truth"].to_numpy()
    report["roc_band"] = roc_band(truth, predictions["score"].to_numpy(), seed=seed)
    readers = sorted(inputs.reads["reader_id"].unique())
    if len(readers) >= 2:
        wide = inputs.reads.pivot(index="case_id", columns="reader_id", values="score").loc[predictions["case_id"]]
        report["model_vs_readers"] = model_vs_readers(
            predictions["score"].to_numpy(), wide[readers].to_numpy().T, truth
        ).to_dict()
    return base | report | {"model": inputs.model.name}


def _registered(model: ModelInfo) -> Threshold:
    """The model's own operating threshold, reported with the policy that chose it on validation data."""
    policy = model.threshold_policy if model.threshold_policy in POLICIES else "fixed"
    return Threshold(model.threshold, policy, float("nan"), float("nan"))


def _mrmc(results: StudyResults, study: studies.StudyInfo) -> dict[str, Any] | None:
    """OR-Hillis MRMC across arms (as modalities) for the readers who finished every arm, when there are two arms
    or more and two such readers or more; None (with a note) otherwise."""
    frames = [a["inputs"].reads for a in results.arms.values()]
    if len(frames) < 2 or any(f.empty for f in frames):
        return None
    common = set.intersection(*(set(f["reader_id"]) for f in frames))
    if len(common) < 2:
        results.notes.append("MRMC needs two readers or more who finished every arm.")
        return None
    truth = results.arms[study.arms[0].name]["inputs"].cases.set_index("case_id")["truth"]
    long = pd.concat(frames)
    long = long[long["reader_id"].isin(common)]
    ratings = pd.DataFrame(
        {
            "reader": long["reader_id"],
            "modality": long["arm"],
            "case": long["case_id"],
            "truth": long["case_id"].map(truth),
            "rating": long["score"],
        }
    )
    return mrmc_or(ratings).to_dict()
