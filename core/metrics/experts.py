"""Heatmaps held against the experts who drew the diagnostic regions (issue 16), beside the experts themselves.

Seed 000 (Izadyyazdanabadi et al., weakly supervised feature localisation in CLE glioma images, section 3 and
Table 2) thresholds its final diagnostic feature map (0.03 for intermediate, 0.2 for restrictive features) and
scores the regions against those four neurosurgeons drew, with the mean accuracy, mean IU and frequency-weighted IU
of Long et al. (FCN, 2015, section 5). Here a map is held against each reader and against the readers' STAPLE
consensus, and each reader is held against the consensus of the others (the human baseline), with the same figures,
so the model's row stands beside the readers' rows.

Inputs: ``maps`` ``{case: float map in [0, 1]}`` of any size, resized bilinearly to the case's mask size
(:func:`core.heatmaps.render.resize_map`), and ``masks`` ``{reader: {case: boolean mask}}``
(:data:`core.metrics.agreement.Masks`).

- **Cases.** Only cases every reader annotated count: STAPLE needs every reader's decision at every pixel
  (:func:`core.metrics.agreement.staple`); the others are listed as ``incomplete``. A *region case* is one whose
  STAPLE consensus of all readers holds a region: every pixel figure (Table 2, pixel AUC, Dice sweep, Dice, IoU) is
  computed on the region cases only, as seed 000 scored the diagnostic frames its neurosurgeons annotated. A case
  whose consensus is empty (a non-diagnostic frame, or one where the readers found nothing) has no region to find,
  so only specificity-like figures exist there, reported apart for every row: ``empty_clear``, the share of these
  cases the row leaves without any region, and ``empty_specificity``, the share of their pixels it leaves unmarked
  (a map marked at its operating threshold). A map min-max normalised per image, as every heatmap method gives it,
  marks something on almost every frame at a low threshold, so a model's ``empty_clear`` is low by construction;
  the pixel figure is the one to compare.
- **References.** Every row is held against the consensus of every reader but itself: a model (no reader) against
  the STAPLE consensus of all readers, reader j against the consensus of the others (STAPLE over them when there are
  at least two, else the other reader's mask: the reference of :func:`core.metrics.agreement.leave_one_out`). Both
  consensuses are fitted on the same complete cases. Neither a model nor a reader is ever part of its own reference,
  and both are scored with the same statistics on the same region cases. What is not alike: an n-reader consensus is
  steadier than an (n-1)-reader one, which favours the model a little, most with few readers (with two readers a
  reader's reference is one other reader). The stricter alternative, the model against each reader's leave-one-out
  reference in turn, was not chosen: its figure would be a mean over references that no reader row has. A model is
  also held against each reader alone (``vs_readers``).
- **Figures** of a row against a reference: the Table 2 figures at each threshold
  (:func:`core.metrics.localization.segmentation_scores`, the confusion matrix pooled over the region cases); the
  pooled pixel AUC with a percentile CI from a bootstrap of cases (:func:`~core.metrics.localization.pixel_auc`);
  the Dice sweep's best Dice and its threshold (:func:`~core.metrics.localization.dice_sweep`; maps only: a binary
  mask has nothing to sweep); and Dice and IoU of the row's region (a map at its operating threshold), per case,
  mean over the region cases with a case-bootstrap CI, both-empty cases skipped: the statistic of
  :func:`~core.metrics.agreement.leave_one_out`, so a model's Dice and a reader's leave-one-out Dice are the same
  statistic. A reader's mask enters as a 0/1 map: its Table 2 figures are the same at every threshold in (0, 1],
  and its pixel AUC is the mask's balanced accuracy, (sensitivity + specificity) / 2, meaningful only as that.
- **Within the range of the experts** (:data:`RULE`): the model's Dice against the consensus of all readers, at its
  operating threshold (fixed before these cases were seen, never the sweep's best, which is chosen on them), set
  against the readers' leave-one-out Dice: ``below`` the lowest reader, ``within`` the lowest..highest (ends
  included) or ``above`` the highest. The model localises within the range of the experts when it is not below: it
  agrees with the readers' consensus at least as well as the least-agreeing expert agrees with the others. Mean IU
  at the operating threshold (seed 000's headline figure) is judged by the same rule and reported beside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.heatmaps.render import resize_map
from core.metrics.agreement import MAX_ITERATIONS, Masks, Staple, pairwise_agreement, staple
from core.metrics.localization import dice_sweep, pixel_auc, segmentation_scores

__all__ = [
    "RANGE_METRICS",
    "RULE",
    "ExpertPanel",
    "compare_with_experts",
    "expert_panel",
    "reader_baseline",
    "score_map",
    "within_range",
]

RULE = (
    "A model localises within the range of the experts when its Dice against the STAPLE consensus of all readers, "
    "at its operating threshold, is at least the lowest of the readers' leave-one-out Dice (each reader against the "
    "consensus of the others): 'within' up to the highest reader, 'above' beyond it, 'below' under the lowest. Dice "
    "is per case, averaged over the cases whose consensus has a region; mean IU is judged the same way."
)
RANGE_METRICS = ("dice", "mean_iu")  # the first decides; the second is reported beside it
_BINARY_THRESHOLD = 0.5  # a reader's 0/1 mask as a map: any threshold in (0, 1] gives the same region


@dataclass(frozen=True)
class ExpertPanel:
    """The readers' masks on the cases every reader annotated, with the references rows are held against."""

    readers: tuple[str, ...]
    masks: dict[str, dict[str, np.ndarray]]  # reader -> complete case -> boolean mask
    staple: Staple  # STAPLE of all readers: the model's reference, and each reader's sensitivity and specificity
    others: dict[str, dict[str, np.ndarray]]  # reader -> complete case -> consensus of the other readers
    others_method: dict[str, str]  # reader -> "staple" or "reader" (one other reader: that reader's mask)
    region_cases: tuple[str, ...]  # the consensus of all readers holds a region: the scored cases
    empty_cases: tuple[str, ...]  # the consensus is empty: specificity-like figures only
    incomplete: tuple[str, ...]  # not every reader annotated them: left out

    @property
    def consensus(self) -> dict[str, np.ndarray]:
        return self.staple.consensus


def expert_panel(masks: Masks, *, max_iterations: int = MAX_ITERATIONS) -> ExpertPanel:
    """The STAPLE consensus of all readers and each reader's leave-one-out reference on the complete cases, and the
    split of those cases into region cases and empty ones (module docstring). Needs at least two readers."""
    fitted = staple(masks, max_iterations=max_iterations)
    complete = {r: {c: np.asarray(masks[r][c]) != 0 for c in fitted.cases} for r in fitted.readers}
    others: dict[str, dict[str, np.ndarray]] = {}
    method: dict[str, str] = {}
    for reader in fitted.readers:
        rest = {other: cases for other, cases in complete.items() if other != reader}
        if len(rest) >= 2:
            others[reader], method[reader] = staple(rest, max_iterations=max_iterations).consensus, "staple"
        else:
            others[reader], method[reader] = dict(next(iter(rest.values()))), "reader"
    region = tuple(c for c in fitted.cases if fitted.consensus[c].any())
    return ExpertPanel(
        readers=fitted.readers,
        masks=complete,
        staple=fitted,
        others=others,
        others_method=method,
        region_cases=region,
        empty_cases=tuple(c for c in fitted.cases if c not in region),
        incomplete=fitted.incomplete,
    )


def _check_thresholds(thresholds: Sequence[float], operating: float) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    for t in (*values, float(operating)):
        if not 0.0 < t <= 1.0:
            raise ValueError(f"a threshold must lie in (0, 1] (0 marks every pixel), not {t}")
    return values


def _fit(heatmap: np.ndarray, shape: tuple[int, int], case: str) -> np.ndarray:
    """The map at the mask's size, checked: 2-D, finite, in [0, 1]."""
    heatmap = np.asarray(heatmap)
    if heatmap.ndim != 2 or heatmap.dtype.kind not in "biuf":
        raise ValueError(f"case {case!r}: a map must be a 2-D array of numbers, not {heatmap.dtype} {heatmap.shape}")
    heatmap = heatmap.astype(np.float32)
    if not np.isfinite(heatmap).all() or (heatmap.size and (heatmap.min() < 0.0 or heatmap.max() > 1.0)):
        raise ValueError(f"case {case!r}: map values must be finite and lie in [0, 1]")
    return resize_map(heatmap, shape)


def _figures(
    maps: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    cases: Sequence[str],
    *,
    thresholds: tuple[float, ...],
    operating: float,
    sweep: bool,
    n_boot: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    """One row's figures against one reference on the region cases (module docstring, "Figures")."""
    labels = [np.asarray(r, dtype=np.int8) for r in reference]
    table = []
    for t in thresholds:
        scores = segmentation_scores(maps, labels, t)
        table.append({"threshold": t, **{k: scores[k] for k in ("mean_acc", "mean_iu", "fw_iu")}})
    at = segmentation_scores(maps, labels, operating)
    auc = pixel_auc(maps, labels, bootstrap=n_boot, seed=seed, level=level)
    best = dice_sweep(maps, labels) if sweep else {"dice": None, "best_threshold": None}
    regions = {
        "row": {c: m >= operating for c, m in zip(cases, maps, strict=True)},
        "reference": dict(zip(cases, reference, strict=True)),
    }
    overlap = pairwise_agreement(regions, n_boot=n_boot, seed=seed, level=level)[0]
    return {
        "table2": table,
        "operating": {"threshold": operating, **{k: at[k] for k in ("mean_acc", "mean_iu", "fw_iu")}},
        "mean_iu": at["mean_iu"],
        "pixel_auc": auc["estimate"],
        "pixel_auc_ci": auc["ci"],
        "best_dice": best["dice"],
        "best_dice_threshold": best["best_threshold"],
        "dice": overlap["dice"],
        "dice_ci": overlap["dice_ci"],
        "iou": overlap["iou"],
        "iou_ci": overlap["iou_ci"],
        "n_cases": overlap["n_cases"],
        "n_both_empty": overlap["n_both_empty"],
    }


def _empty(regions: Sequence[np.ndarray]) -> dict[str, Any]:
    """Specificity-like figures of a row's regions on the cases whose consensus is empty (None without such cases)."""
    pixels = sum(int(r.size) for r in regions)
    return {
        "n_cases": len(regions),
        "clear": float(np.mean([not r.any() for r in regions])) if regions else None,
        "specificity": 1.0 - sum(int(np.count_nonzero(r)) for r in regions) / pixels if pixels else None,
    }


def score_map(
    maps: Mapping[str, np.ndarray],
    panel: ExpertPanel,
    *,
    thresholds: Sequence[float],
    operating_threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """A model's maps (one per case of the panel) against the consensus of all readers (``vs_consensus``) and
    against each reader (``vs_readers``) on the region cases, and its regions at ``operating_threshold`` on the
    empty cases (``empty``). A case the panel scores without a map is refused, naming it."""
    thresholds = _check_thresholds(thresholds, operating_threshold)
    if not panel.region_cases:
        raise ValueError("no case has a region in the readers' consensus: there is nothing to localise")
    missing = [c for c in (*panel.region_cases, *panel.empty_cases) if c not in maps]
    if missing:
        raise ValueError(f"no map for case(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    fitted = {c: _fit(maps[c], panel.consensus[c].shape, c) for c in (*panel.region_cases, *panel.empty_cases)}
    cases = panel.region_cases
    shown = [fitted[c] for c in cases]
    options = {"thresholds": thresholds, "operating": float(operating_threshold), "sweep": True}
    options |= {"n_boot": n_boot, "seed": seed, "level": level}
    return {
        "operating_threshold": float(operating_threshold),
        "vs_consensus": _figures(shown, [panel.consensus[c] for c in cases], cases, **options),
        "vs_readers": {
            reader: _figures(shown, [panel.masks[reader][c] for c in cases], cases, **options)
            for reader in panel.readers
        },
        "empty": _empty([fitted[c] >= operating_threshold for c in panel.empty_cases]),
    }


def reader_baseline(
    panel: ExpertPanel, *, thresholds: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> list[dict[str, Any]]:
    """The human baseline: each reader's mask against the consensus of the other readers on the region cases, with
    a model's figures (no sweep), and their empty-case figures; in reader order."""
    thresholds = _check_thresholds(thresholds, _BINARY_THRESHOLD)
    if not panel.region_cases:
        raise ValueError("no case has a region in the readers' consensus: there is nothing to localise")
    cases = panel.region_cases
    rows = []
    for reader in panel.readers:
        masks = panel.masks[reader]
        figures = _figures(
            [masks[c].astype(np.float32) for c in cases],
            [panel.others[reader][c] for c in cases],
            cases,
            thresholds=thresholds,
            operating=_BINARY_THRESHOLD,
            sweep=False,
            n_boot=n_boot,
            seed=seed,
            level=level,
        )
        others = [r for r in panel.readers if r != reader]
        rows.append(
            {
                "reader": reader,
                "reference": panel.others_method[reader],
                "others": others,
                **figures,
                "empty": _empty([masks[c] for c in panel.empty_cases]),
            }
        )
    return rows


def within_range(value: float | None, baseline: Sequence[float | None]) -> dict[str, Any]:
    """Where ``value`` falls against the readers' figures (:data:`RULE`): ``low`` and ``high`` (the lowest and
    highest defined reader figure), ``verdict`` ``below`` / ``within`` / ``above`` and ``answer`` (not below); all
    None when the value or every reader figure is undefined."""
    defined = [float(v) for v in baseline if v is not None]
    if value is None or not defined:
        return {"value": value, "low": None, "high": None, "verdict": None, "answer": None}
    low, high = min(defined), max(defined)
    verdict = "below" if value < low else "above" if value > high else "within"
    return {"value": float(value), "low": low, "high": high, "verdict": verdict, "answer": verdict != "below"}


def compare_with_experts(
    maps: Mapping[str, Mapping[str, np.ndarray]],
    masks: Masks,
    *,
    thresholds: Sequence[float],
    operating: Mapping[str, float],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    max_iterations: int = MAX_ITERATIONS,
) -> dict[str, Any]:
    """The whole comparison, strict-JSON ready (None where undefined): ``maps`` holds a row (a model and method)
    -> case -> map, ``operating`` each row's operating threshold. Returns ``cases`` (region, empty, incomplete),
    ``readers`` (the human baseline with each reader's STAPLE sensitivity and specificity), ``models`` (per row:
    :func:`score_map` and the ``range`` verdict per metric of :data:`RANGE_METRICS`), ``range`` (the readers' lowest
    and highest figure per metric) and the ``rule``."""
    panel = expert_panel(masks, max_iterations=max_iterations)
    readers = reader_baseline(panel, thresholds=thresholds, n_boot=n_boot, seed=seed, level=level)
    for row in readers:
        row["staple_sensitivity"] = panel.staple.sensitivity[row["reader"]]
        row["staple_specificity"] = panel.staple.specificity[row["reader"]]
    baseline = {metric: [row[metric] for row in readers] for metric in RANGE_METRICS}
    models = []
    for label, row_maps in maps.items():
        if label not in operating:
            raise ValueError(f"no operating threshold for {label!r}")
        scored = score_map(
            row_maps,
            panel,
            thresholds=thresholds,
            operating_threshold=operating[label],
            n_boot=n_boot,
            seed=seed,
            level=level,
        )
        verdicts = {m: within_range(scored["vs_consensus"][m], baseline[m]) for m in RANGE_METRICS}
        models.append({"row": label, **scored, "range": verdicts})
    return {
        "rule": RULE,
        "thresholds": [float(t) for t in thresholds],
        "cases": {
            "region": list(panel.region_cases),
            "empty": list(panel.empty_cases),
            "incomplete": list(panel.incomplete),
        },
        "staple": {"iterations": panel.staple.iterations, "converged": panel.staple.converged},
        "readers": readers,
        "models": models,
        "range": {m: _span(baseline[m]) for m in RANGE_METRICS},
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level, "resampled": "cases"},
    }


def _span(values: Sequence[float | None]) -> dict[str, float | None]:
    defined = [v for v in values if v is not None]
    return {"low": min(defined), "high": max(defined)} if defined else {"low": None, "high": None}
