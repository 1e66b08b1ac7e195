"""The Results of a reader study: its cases, truth, the CNN's scores and the readers' answers, put through
``core.stats`` (Table 1 with bootstrap CIs and paired tests per arm, the ROC curve with its band, MRMC, the CNN
against the readers' mean AUC, error analysis).

Per arm, the CNN is the model registered for the arm's modality and the study's task (the newest unless chosen),
at its registered operating threshold (chosen on validation data, as the FL-CNN paper did) unless a policy is asked
for. Readers' answers and confidence become ROC scores by the one rule of ``core.stats.ratings`` (the same rule
``python -m core analyze`` and the page's uploaded-CSV path use; a reads export carries the scale and the score, and
``export_predictions`` writes the model's scores, so export -> analyze gives this page's figures). Only readers who
finished an arm enter its analysis; the others are listed with their progress.

Table 1's cross-arm rows (seed 003, FL-CNN paper): in a study with an FL arm and a WL arm, the FL-CNN against the
readers of the WL arm, and the FL-CNN against the WL-CNN (at the WL arm's threshold, its scores as ratings), on the
cases both arms share, by the same analysis as each arm's own rows (``analyze_reads``: case bootstrap CIs, paired
permutation tests, McNemar, DeLong) at the FL arm's threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from core.stats.compare import READERS_MEAN, bootstrap_counts, bootstrap_indices
from core.stats.mrmc import model_vs_readers, mrmc_or
from core.stats.ratings import reader_score
from core.stats.report import analyze_reads
from core.stats.thresholds import POLICIES, Threshold
from db import repo
from db.audit import log_event
from db.models import Prediction, Read, SpecimenImage, StudyCase, User
from db.repo import ModelInfo
from db.session import read_scope, reads, run_transaction, writes
from services import studies

__all__ = [
    "CROSS_MODALITIES",
    "ArmInputs",
    "StudyResults",
    "arm_inputs",
    "arm_predictions",
    "export_predictions",
    "note_results_viewed",
    "roc_band",
    "study_results",
    "study_version",
]


CROSS_MODALITIES = ("FL", "WL")  # Table 1's cross-arm rows: the first modality's CNN against the second's arm


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
    cross: dict[str, Any] | None = None  # the FL-CNN against the WL arm's readers and the WL-CNN (_cross_arm)
    notes: list[str] = field(default_factory=list)


def _study_images(study_id: int, modality: str | None = None) -> Select:
    """The ids of the specimen images of a study's cases (in one modality), as a subquery."""
    stmt = (
        select(SpecimenImage.id)
        .join(StudyCase, StudyCase.specimen_id == SpecimenImage.specimen_id)
        .where(StudyCase.study_id == study_id)
    )
    return stmt if modality is None else stmt.where(SpecimenImage.modality == modality)


@reads
def study_version(session: Session, study_id: int) -> tuple[int, int, int]:
    """The cache key of a study's results: (reads, newest read id, newest prediction id on the study's images). It
    changes when a read of this study or a prediction on one of its images is added, and for nothing else (an upload,
    another study's read, a prediction on another image). Reads and predictions are never updated, only added."""
    reads, newest_read = session.execute(
        select(func.count(Read.id), func.max(Read.id)).where(Read.study_id == study_id)
    ).one()
    newest = session.scalar(select(func.max(Prediction.id)).where(Prediction.image_id.in_(_study_images(study_id))))
    return int(reads or 0), int(newest_read or 0), int(newest or 0)


def arm_predictions(session: Session, study_id: int, arm_name: str, model: ModelInfo | None) -> pd.DataFrame:
    """The arm's analysed cases (training cases left out, in the study's order) with their truth and the model's
    newest score on the arm's image: ``case_id, truth, score`` (NaN where the model has no prediction yet)."""
    study = studies.get_study(session, study_id)
    arm = next(a for a in study.arms if a.name == arm_name)
    cases = studies.export_cases(session, study_id)
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
    return cases


def arm_inputs(session: Session, study_id: int, arm_name: str, model: ModelInfo | None) -> ArmInputs:
    """The cases with truth and the model's latest score on the arm's image, and the finished readers' answers (in a
    regions study a reader's score is the read's label: whether a region was drawn; readers are operating points)."""
    study = studies.get_study(session, study_id)
    arm = next(a for a in study.arms if a.name == arm_name)
    cases = arm_predictions(session, study_id, arm_name, model)
    reads = studies.export_reads(session, study_id)
    reads = reads[reads["arm"] == arm_name][["case_id", "reader_id", "arm", "label", "rating"]]
    counts = reads.groupby("reader_id")["case_id"].nunique()
    finished = counts[counts == len(cases)].index
    invited = session.scalars(select(User.username).where(User.id.in_(study.reader_ids))).all()
    unfinished = {r: int(counts.get(r, 0)) for r in sorted(set(invited) | set(counts.index)) if r not in finished}
    reads = reads[reads["reader_id"].isin(finished)].copy()
    if study.question == "regions":  # a drawing has no confidence: the read's label (a region drawn) is its score
        reads["score"] = reads["label"].astype(float)
    else:
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
) -> StudyResults:
    """Everything the Results page shows for a study. ``models`` maps arm -> model id (default: the newest model of
    the study's task for the arm's modality). Missing model predictions on the study's images are computed first."""
    say = progress or (lambda _m: None)
    with read_scope() as session:
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
    for arm in study.arms:
        model = chosen[arm.name]
        if model is not None:
            say(f"{arm.name}: the model's predictions on the study images")
            _predict_arm(study_id, arm.modality, model)
        with read_scope() as session:
            inputs = arm_inputs(session, study_id, arm.name, model)
        results.arms[arm.name] = _arm_report(inputs, policy, bootstrap, permutations, seed, results.notes, say)
    say("MRMC")
    results.mrmc = _mrmc(results, study)
    results.cross = _cross_arm(results, bootstrap, permutations, seed, say)
    return results


def _predict_arm(study_id: int, modality: str, model: ModelInfo) -> None:
    """Compute the model's missing predictions on the study's images of the arm's modality."""
    from services.study_ai import predict_images

    with read_scope() as session:
        image_ids = session.scalars(_study_images(study_id, modality)).all()
    predict_images(model.id, list(image_ids))


def export_predictions(
    study_id: int, arm_name: str | None = None, *, model: int | str | None = None, user_id: int | None
) -> tuple[pd.DataFrame, ModelInfo]:
    """The model's scores on one arm's cases as the Results page uses them, in the predictions format of
    ``python -m core analyze`` (``case_id, truth, score``, the study's case order), with the model: the arm's default
    (the newest for the study's task and the arm's modality) unless ``model`` (a name or id) is given. Missing
    predictions are computed first. Analysed with the reads export at the model's registered threshold (and the same
    bootstrap, permutations and seed), it gives the page's Table 1 for the arm. Audited."""
    with read_scope() as session:
        study = studies.get_study(session, study_id)
        if study is None:
            raise studies.StudyError(f"there is no study #{study_id}")
        names = [a.name for a in study.arms]
        if arm_name is None and len(names) > 1:
            raise studies.StudyError(f"the study has several arms; name one ({', '.join(names)})")
        arm = next((a for a in study.arms if a.name == (arm_name or names[0])), None)
        if arm is None:
            raise studies.StudyError(f"unknown arm {arm_name!r}; this study's arms are {', '.join(names)}")
        chosen = (
            repo.find_model(session, model) if model is not None else repo.model_for(session, study.task, arm.modality)
        )
        if chosen is None:
            raise studies.StudyError(
                f"no model {model!r}" if model is not None else f"no {arm.modality} {study.task} model is registered"
            )
        if (chosen.task, chosen.modality) != (study.task, arm.modality):
            raise studies.StudyError(
                f"model {chosen.name} is a {chosen.modality} {chosen.task} model; arm {arm.name} needs "
                f"{arm.modality} {study.task}"
            )
    _predict_arm(study_id, arm.modality, chosen)

    with read_scope() as session:
        frame = arm_predictions(session, study_id, arm.name, chosen)
    run_transaction(
        lambda session: log_event(
            session, "predictions_exported", user_id=user_id, study_id=study_id, arm=arm.name, model=chosen.name,
            rows=len(frame),
        )
    )  # fmt: skip
    return frame, chosen


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


def _cross_arm(
    results: StudyResults, bootstrap: int, permutations: int, seed: int, say: Callable[[str], None]
) -> dict[str, Any] | None:
    """Table 1's cross-arm rows when the study has an FL arm and a WL arm, both with a scored model: the FL-CNN at
    its arm's threshold against the readers who finished the WL arm (``vs_readers``, None without any) and against
    the WL-CNN at its arm's threshold, with its scores as ratings (``vs_model``), on the cases both arms share.
    None (with a note when only the analysis failed) otherwise."""
    first, second = CROSS_MODALITIES
    arms = {modality: next((a for a in results.arms.values() if a["modality"] == modality), None)
            for modality in CROSS_MODALITIES}  # fmt: skip
    if any(a is None or "raters" not in a for a in arms.values()):
        return None
    fl, wl = arms[first], arms[second]
    shared = fl["inputs"].cases.merge(wl["inputs"].cases, on=["case_id", "truth"], suffixes=("", "_other"))
    predictions = shared[["case_id", "truth", "score"]]
    threshold = Threshold(fl["threshold"]["value"], fl["threshold"]["policy"], float("nan"), float("nan"))
    other = wl["inputs"].model
    model_reads = pd.DataFrame(
        {
            "case_id": shared["case_id"],
            "reader_id": f"{second}-CNN",
            "arm": second,
            "label": (shared["score_other"] >= wl["threshold"]["value"]).astype(int),
            "rating": shared["score_other"],
        }
    )
    readers = wl["inputs"].reads
    readers = readers[readers["case_id"].isin(shared["case_id"])].assign(rating=readers["score"])
    say(f"{first}-CNN against the {second} arm: bootstrap and permutation tests")
    settings = {"threshold": threshold, "bootstrap": bootstrap, "permutations": permutations, "seed": seed}
    try:
        vs_readers = analyze_reads(predictions, readers, **settings) if not readers.empty else None
        vs_model = analyze_reads(predictions, model_reads, **settings)
    except ValueError as error:  # e.g. the shared cases hold too few of one class
        results.notes.append(f"The {first}-CNN cannot be compared with the {second} arm on their shared cases: {error}")
        return None
    vs_model["raters"].pop(READERS_MEAN)  # one "reader", the WL-CNN: its mean is itself
    vs_model["comparisons"] = [c for c in vs_model["comparisons"] if c["b"] != READERS_MEAN]
    return {
        "arms": {first: fl["inputs"].arm, second: wl["inputs"].arm},
        "models": {first: fl["model"], second: other.name},
        "thresholds": {first: threshold.value, second: wl["threshold"]["value"]},
        "n_cases": len(shared),
        "n_positive": int(shared["truth"].sum()),
        "vs_readers": vs_readers,
        "vs_model": vs_model,
    }


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
    try:
        return mrmc_or(ratings).to_dict()
    except ValueError as error:  # e.g. fewer than two cases of a class
        results.notes.append(f"MRMC cannot be computed on these cases: {error}.")
        return None


@writes
def note_results_viewed(session: Session, study_id: int, user_id: int) -> None:
    """Audit that this user looked at the study's results (the page calls it once per study and session)."""
    log_event(session, "results_viewed", user_id=user_id, study_id=study_id)
