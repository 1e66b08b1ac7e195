"""A reader's ROC score: the one rule that turns an answer and a confidence into the rating an ROC analysis ranks.

Every path that analyses reads uses it (the Results page for a study and for uploaded CSVs, ``python -m core
analyze``), and a study's reads export carries both the scale and the score, so the same reads give the same AUCs
wherever they are analysed.

- ``"five"``: the binary answer and a 1-5 confidence make a 10-point scale, ordered from surely negative to surely
  positive: negative, certain = 1 ... negative, very unsure = 5; positive, very unsure = 6 ... positive,
  certain = 10. A bare confidence is not an ROC score: a certain "negative" and a certain "positive" would tie,
  and the reader's AUC would fall to about 0.5 whatever their accuracy.
- ``"hundred"``: a 0-100 confidence that the case is positive (0 = surely negative) already is one, as given.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["RATING_SCALES", "reader_score", "scale_problem"]

RATING_SCALES = {"five": (1, 5), "hundred": (0, 100)}  # scale -> the lowest and highest rating


def reader_score(label: Iterable[float] | np.ndarray, rating: Iterable[float] | np.ndarray, scale: str) -> np.ndarray:
    """The ROC score of each read from its ``label`` (1 = the positive answer), ``rating`` and the study's
    ``scale`` (see the module docstring). A missing rating (NaN) gives a missing score."""
    if scale not in RATING_SCALES:
        raise ValueError(f"unknown rating scale {scale!r}; expected one of {', '.join(RATING_SCALES)}")
    label, rating = np.asarray(label, dtype=float), np.asarray(rating, dtype=float)
    if scale == "hundred":
        return rating
    return np.where(label == 1, 5.0 + rating, 6.0 - rating)


def scale_problem(rating: float, scale: str) -> str | None:
    """Why ``rating`` cannot be on ``scale`` (None when it can): the rule is only defined on the scale's whole
    points (five) or its range (hundred)."""
    if scale not in RATING_SCALES:
        return f"rating_scale must be one of {', '.join(RATING_SCALES)}, not {scale!r}"
    low, high = RATING_SCALES[scale]
    if not np.isfinite(rating) or not low <= rating <= high or (scale == "five" and rating != int(rating)):
        whole = "a whole number" if scale == "five" else "a number"
        return f"rating on the {scale} scale must be {whole} from {low} to {high}, not {rating:g}"
    return None
