"""The analysis report of a reader study from CSV files: validation with messages that name the row, then
``compare.compare_model_with_readers`` (the CNN against each reader and their average) and ``mrmc.mrmc_or``.

Inputs (``python -m core analyze``):

- predictions: ``case_id, truth, score`` (truth 0/1, score in [0, 1]), one row per case;
- reads: ``case_id, reader_id, label`` and optionally ``rating``, ``rating_scale``, ``score`` and ``arm``, one row per
  reader, case and arm; every reader reads every case of the predictions file (in each arm). The ROC rating of a read
  is its ``score`` when the file has that column (a study's export does); else, when it has ``rating_scale`` (or one
  is given), the answer and ``rating`` on that scale by the one rule of ``core.stats.ratings``; else ``rating`` as
  given (a 0-100 confidence, a probability);
- ratings for MRMC: ``reader, modality, case, truth, rating`` (the Van Dyke long format).

Cells this project's exports escaped against spreadsheet formulas (``core.text``) are read back as they were typed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.stats.compare import compare_model_with_readers
from core.stats.mrmc import mrmc_or
from core.stats.ratings import RATING_SCALES, reader_score, scale_problem
from core.stats.thresholds import POLICIES, Threshold
from core.text import csv_as_typed

__all__ = [
    "AnalysisError",
    "analyze_mrmc",
    "analyze_reads",
    "jsonable",
    "read_predictions",
    "read_ratings",
    "read_reads",
]

MAX_LISTED = 20  # row problems listed in one message


class AnalysisError(ValueError):
    """Input that cannot be analysed, with every problem found (by CSV line) and what to do."""


def _table(source: str | Path | bytes | pd.DataFrame, what: str, required: Iterable[str]) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        frame = source.astype(str).reset_index(drop=True)
    else:
        try:
            raw = source if isinstance(source, bytes) else Path(source).read_bytes()
            frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, skipinitialspace=True)
        except FileNotFoundError:
            raise AnalysisError(f"{what}: no such file {source}") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise AnalysisError(f"{what}: not a readable CSV ({error}); save it as comma-separated UTF-8") from None
        frame = csv_as_typed(frame)
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise AnalysisError(
            f"{what}: missing column(s) {', '.join(missing)}; the header has {', '.join(frame.columns) or 'nothing'}"
        )
    if frame.empty:
        raise AnalysisError(f"{what}: the file has no rows")
    return frame.apply(lambda column: column.str.strip())


def _fail(what: str, problems: list[str]) -> None:
    if problems:
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise AnalysisError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_predictions(source: str | Path | bytes | pd.DataFrame) -> pd.DataFrame:
    """The model's predictions, checked: columns ``case_id, truth`` (int 0/1), ``score`` (float in [0, 1])."""
    what = "predictions"
    frame = _table(source, what, ("case_id", "truth", "score"))
    problems, seen = [], {}
    for index, row in enumerate(frame.itertuples(index=False), start=2):
        if not row.case_id:
            problems.append(f"line {index}: empty case_id")
        elif row.case_id in seen:
            problems.append(f"line {index}: case_id {row.case_id!r} already on line {seen[row.case_id]}")
        seen.setdefault(row.case_id, index)
        if row.truth not in ("0", "1"):
            problems.append(f"line {index}: truth must be 0 or 1, not {row.truth!r}")
        score = _number(row.score)
        if score is None or not 0.0 <= score <= 1.0:
            problems.append(f"line {index}: score must be a number in [0, 1], not {row.score!r}")
    _fail(what, problems)
    out = pd.DataFrame(
        {"case_id": frame["case_id"], "truth": frame["truth"].astype(int), "score": frame["score"].astype(float)}
    )
    if out["truth"].nunique() < 2:
        raise AnalysisError(f"{what}: every case has truth {out['truth'].iloc[0]}; the analysis needs both classes")
    return out


def read_reads(
    source: str | Path | bytes | pd.DataFrame,
    cases: Iterable[str],
    *,
    rating_scale: str | None = None,
    arm: str | None = None,
) -> pd.DataFrame:
    """Readers' answers, checked against the predictions' ``cases``: columns ``case_id, reader_id, arm, label``
    (0/1) and ``rating``, the read's ROC rating (float, NaN when not given): the file's ``score``, else its
    ``rating`` made a score by the file's ``rating_scale`` column or by ``rating_scale`` (for files without one),
    else its ``rating`` as given (see the module docstring). Every reader must have read every case in every arm.
    With ``arm``, only that arm's reads are taken (rows are still named by their line in the file)."""
    what = "reads"
    frame = _table(source, what, ("case_id", "reader_id", "label"))
    if "arm" not in frame:
        frame["arm"] = ""
    if arm is not None:
        arms = sorted(frame["arm"].unique())
        frame = frame[frame["arm"] == arm]
        if frame.empty:
            raise AnalysisError(f"{what}: no reads in arm {arm!r}; the file's arms are {', '.join(map(repr, arms))}")
    if rating_scale is not None:
        if rating_scale not in RATING_SCALES:
            raise AnalysisError(f"unknown rating scale {rating_scale!r}; expected one of {', '.join(RATING_SCALES)}")
        if "score" in frame or "rating_scale" in frame:
            raise AnalysisError(
                f"{what}: the file carries its own {'score' if 'score' in frame else 'rating_scale'} column; "
                "leave the rating scale unset"
            )
        frame["rating_scale"] = rating_scale
    source_column = "score" if "score" in frame else "rating"
    scaled = source_column == "rating" and "rating_scale" in frame
    if scaled and "rating" not in frame:
        raise AnalysisError(f"{what}: a rating_scale without a rating column; add the readers' ratings")
    has_rating = source_column in frame
    known = set(cases)
    problems, seen = [], {}
    for index, row in zip(frame.index + 2, frame.to_dict("records"), strict=True):  # the header is line 1
        if row["case_id"] not in known:
            problems.append(f"line {index}: unknown case_id {row['case_id']!r} (not in the predictions)")
        if not row["reader_id"]:
            problems.append(f"line {index}: empty reader_id")
        key = (row["case_id"], row["reader_id"], row["arm"])
        if key in seen:
            problems.append(
                f"line {index}: duplicate read of {row['case_id']!r} by {row['reader_id']!r}"
                + (f" in arm {row['arm']!r}" if row["arm"] else "")
                + f" (also line {seen[key]})"
            )
        seen.setdefault(key, index)
        if row["label"] not in ("0", "1"):
            problems.append(f"line {index}: label must be 0 or 1, not {row['label']!r}")
        if has_rating and row[source_column] != "":
            value = _number(row[source_column])
            if value is None:
                problems.append(f"line {index}: {source_column} must be a number, not {row[source_column]!r}")
            elif scaled and (problem := scale_problem(value, row["rating_scale"])):
                problems.append(f"line {index}: {problem}")
    _fail(what, problems)
    ratings = pd.Series(np.nan, frame.index)
    if has_rating and not scaled:
        ratings = pd.to_numeric(frame[source_column], errors="coerce")
    elif scaled:
        for scale, rows in frame.groupby("rating_scale").groups.items():
            if scale not in RATING_SCALES:  # only rows without a rating get here (the others were refused above)
                continue
            given = pd.to_numeric(frame.loc[rows, "rating"], errors="coerce")
            ratings[rows] = reader_score(frame.loc[rows, "label"].astype(int), given, scale)
    out = pd.DataFrame(
        {
            "case_id": frame["case_id"],
            "reader_id": frame["reader_id"],
            "arm": frame["arm"],
            "label": frame["label"].astype(int),
            "rating": ratings.astype(float),
        }
    )
    problems = []
    for (arm, reader), group in out.groupby(["arm", "reader_id"], sort=True):
        where = f" in arm {arm!r}" if arm else ""
        missing = sorted(known - set(group["case_id"]))
        if missing:
            listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            problems.append(
                f"reader {reader!r} read {len(group)} of {len(known)} cases{where} (no read of {listed}); every "
                "reader must read every case: remove the cases or the reader, or add the missing reads"
            )
        rated = group["rating"].notna()
        if rated.any() and not rated.all():
            problems.append(f"reader {reader!r} gave a rating for some cases but not all{where}")
    for arm in sorted(out["arm"].unique()):
        readers = set(out.loc[out["arm"] == arm, "reader_id"])
        everyone = set(out["reader_id"])
        for reader in sorted(everyone - readers):
            problems.append(f"reader {reader!r} read nothing in arm {arm!r}")
    _fail(what, problems)
    return out


def read_ratings(source: str | Path | bytes | pd.DataFrame) -> pd.DataFrame:
    """MRMC ratings in the long format ``reader, modality, case, truth, rating``; rows checked here, the crossing
    (every reader x modality x case) by ``mrmc_or``."""
    what = "ratings"
    frame = _table(source, what, ("reader", "modality", "case", "truth", "rating"))
    problems, seen = [], {}
    for index, row in enumerate(frame.itertuples(index=False), start=2):
        if row.truth not in ("0", "1"):
            problems.append(f"line {index}: truth must be 0 or 1, not {row.truth!r}")
        if _number(row.rating) is None:
            problems.append(f"line {index}: rating must be a number, not {row.rating!r}")
        key = (row.reader, row.modality, row.case)
        if key in seen:
            problems.append(
                f"line {index}: duplicate rating of case {row.case!r} by reader {row.reader!r} in modality "
                f"{row.modality!r} (also line {seen[key]})"
            )
        seen.setdefault(key, index)
    _fail(what, problems)
    return frame.assign(truth=frame["truth"].astype(int), rating=frame["rating"].astype(float))


def analyze_reads(
    predictions: pd.DataFrame,
    reads: pd.DataFrame,
    *,
    threshold: float | Threshold | None = None,
    policy: str | None = None,
    bootstrap: int = 1000,
    permutations: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """The Table-1 analysis per arm, at ``threshold`` (a value, or a ``Threshold`` chosen on validation data whose
    policy is then reported), or by ``policy`` on these cases, or at 0.5. With one arm (or no ``arm`` column) its
    result is the report itself; with several, the report holds each under ``arms`` and repeats the first (sorted)
    at the top, named in ``arm``."""
    if threshold is not None and policy is not None:
        raise AnalysisError("give either a threshold or a policy, not both")
    if policy is not None and policy not in POLICIES:
        raise AnalysisError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
    value = threshold.value if isinstance(threshold, Threshold) else threshold
    if value is not None and not 0.0 <= value <= 1.0:
        raise AnalysisError(f"the threshold must lie in [0, 1], not {value}")
    chosen: float | Threshold | str = threshold if threshold is not None else (policy or 0.5)
    order = predictions.set_index("case_id")
    per_arm = {}
    for arm, group in reads.groupby("arm", sort=True):
        wide = group.pivot(index="case_id", columns="reader_id", values="label").loc[order.index]
        ratings = group.pivot(index="case_id", columns="reader_id", values="rating").loc[order.index]
        rated = {r: ratings[r].to_numpy(float) for r in ratings.columns if ratings[r].notna().all()}
        per_arm[str(arm)] = compare_model_with_readers(
            order["truth"].to_numpy(),
            order["score"].to_numpy(),
            chosen,
            {r: wide[r].to_numpy(int) for r in wide.columns},
            reader_ratings=rated or None,
            resamples=bootstrap,
            permutations=permutations,
            seed=seed,
        )
    first = next(iter(per_arm))
    report = dict(per_arm[first])
    if len(per_arm) > 1:
        report["arm"] = first
        report["arms"] = per_arm
    elif first:
        report["arm"] = first
    return report


def analyze_mrmc(ratings: pd.DataFrame, *, cov: str = "jackknife", alpha: float = 0.05) -> dict[str, Any]:
    """The OR-Hillis MRMC analysis of ``read_ratings`` output, JSON-ready."""
    return mrmc_or(ratings, cov=cov, alpha=alpha).to_dict()


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made plain and NaN or infinite numbers made None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
