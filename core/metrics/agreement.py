"""Agreement between readers who drew the diagnostic regions of the same cases: pairwise Dice and IoU, the STAPLE
consensus with each reader's sensitivity and specificity, majority vote, the leave-one-out human baseline, and
masks in COCO's compressed RLE.

Masks are boolean (H, W) arrays held as ``{reader: {case: mask}}``; on disk they are ``DIR/<reader>/<case>.png``
(0 background, 255 region; see :func:`read_mask_folder`). A reader may leave a case out: a missing file is a case
that reader did not annotate, an all-zero PNG is an explicit "no region".

- Dice ``2|A n B| / (|A| + |B|)`` and IoU ``|A n B| / |A u B|`` per case. A case where both masks are empty has no
  region to agree on (0/0): it is skipped and counted (``both_empty``); a case only one of two readers annotated is
  skipped for that pair (``n_unpaired``). Means are over the remaining cases, with a percentile bootstrap CI over
  cases (Efron & Tibshirani 1993, ch. 13): ``n_boot`` resamples of the cases drawn from ``seed``, the same draw for
  Dice and IoU. An empty-vs-drawn case scores 0.
- STAPLE (Warfield, Zou & Wells, "Simultaneous truth and performance level estimation (STAPLE): an algorithm for
  the validation of image segmentation", IEEE TMI 23(7):903-921, 2004; ``SimpleITK.STAPLEImageFilter``): an EM
  over pixels i and readers j with decisions D_ij. E-step: ``W_i = a_i / (a_i + b_i)``, ``a_i = g prod_j
  p_j^D_ij (1 - p_j)^(1 - D_ij)``, ``b_i = (1 - g) prod_j q_j^(1 - D_ij) (1 - q_j)^D_ij``, with the prior g the
  mean fraction of region over the readers; M-step: sensitivity ``p_j = sum_i W_i D_ij / sum_i W_i``, specificity
  ``q_j = sum_i (1 - W_i)(1 - D_ij) / sum_i (1 - W_i)``. One run pools the pixels of all cases, so each reader
  gets one p and one q and every pixel a probability W of being region; the consensus is W > 0.5. The EM stops at
  SimpleITK's convergence or after ``max_iterations`` (``converged`` says which). STAPLE needs every reader's
  decision at every pixel, so it uses the cases *all* readers annotated; the others are ``incomplete`` and get no
  consensus. Cases where every reader drew nothing are consensus-empty (W = 0) and left out of the EM, so that
  agreeing on absence does not inflate specificity and an all-empty study does not divide by zero. A reader's
  sensitivity is undefined (None) when the consensus has no region pixel (so when nothing was drawn at all),
  specificity when it has no background pixel; when every reader marked every pixel, g = 1 makes the update 0/0
  (SimpleITK returns NaN) and the consensus is taken as all region, sensitivities 1.
- Majority vote: a pixel is region when more than half of the readers drew it; a tie (an even number of readers
  split evenly) is background.
- Human baseline: each reader against the consensus of the others (leave one out), STAPLE over the others when
  there are at least two, the other reader's own mask when there is one.
- COCO RLE: run lengths of the column-major pixels starting with a background run, written as pycocotools writes
  ``counts`` (6 bits a character, deltas from the run two back after the second run), via ``pycocotools.mask``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image as PILImage
from pycocotools import mask as coco_mask

from core.data.store import png_bytes, write_atomic
from core.stats.compare import bootstrap_ci, bootstrap_counts

__all__ = [
    "CONSENSUS_THRESHOLD",
    "MASK_THRESHOLD",
    "MAX_ITERATIONS",
    "Masks",
    "Staple",
    "agreement_report",
    "dice_iou",
    "leave_one_out",
    "majority_vote",
    "pairwise_agreement",
    "read_mask_folder",
    "rle_decode",
    "rle_encode",
    "staple",
    "write_mask_folder",
]

Masks = Mapping[str, Mapping[str, np.ndarray]]  # reader -> case -> boolean (H, W) mask

CONSENSUS_THRESHOLD = 0.5  # consensus = STAPLE probability > 0.5
MASK_THRESHOLD = 128  # a PNG pixel >= 128 is region: anti-aliased brush edges fall to the nearer side
MAX_ITERATIONS = 1000  # EM cap; readers who agree converge in tens of iterations, independent noise may never
_NOT_PNG = frozenset({".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".npy"})


@dataclass(frozen=True)
class Staple:
    """STAPLE over the cases every reader annotated (see the module docstring)."""

    readers: tuple[str, ...]
    cases: tuple[str, ...]  # every reader annotated them, in case order
    probability: dict[str, np.ndarray]  # per case: P(region) per pixel, float64
    consensus: dict[str, np.ndarray]  # per case: probability > CONSENSUS_THRESHOLD
    sensitivity: dict[str, float | None]
    specificity: dict[str, float | None]
    all_empty: tuple[str, ...]  # nobody drew anything: consensus empty, not part of the EM
    incomplete: tuple[str, ...]  # some reader did not annotate them: no consensus
    iterations: int
    converged: bool


def _read_png(path: Path) -> np.ndarray:
    try:
        with PILImage.open(path) as pil:
            if pil.format != "PNG":
                raise ValueError(f"{path}: not a PNG file (it holds {pil.format})")
            if pil.mode not in ("L", "1"):
                raise ValueError(f"{path}: a mask must be an 8-bit grayscale PNG (0 and 255), not mode {pil.mode}")
            pixels = np.asarray(pil.convert("L"))
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: unreadable mask ({error})") from None
    return pixels >= MASK_THRESHOLD


def read_mask_folder(root: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{reader: {case: mask}}`` from ``root/<reader>/<case>.png``, readers and cases sorted by name.

    Pixels >= 128 are region, the rest background (the contract is 0 and 255; a drawing tool's anti-aliased edge
    falls to the nearer side). Files and folders whose names start with a dot and files that are not images are
    ignored; refused, with the file or folder named: a mask in another image format (JPEG would blur the edges),
    a PNG that is not 8-bit grayscale, PNGs directly in ``root``, a reader folder without PNGs, two files for one
    case, and masks of one case whose sizes differ between readers."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of reader folders ({root}/<reader>/<case>.png)")
    entries = [entry for entry in sorted(root.iterdir()) if not entry.name.startswith(".")]
    if stray := [entry.name for entry in entries if entry.is_file() and entry.suffix.lower() == ".png"]:
        raise ValueError(
            f"{root}: masks go in one folder per reader ({root}/<reader>/<case>.png), "
            f"but {', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''} lie directly in it"
        )
    folders = [entry for entry in entries if entry.is_dir()]
    if not folders:
        raise ValueError(f"{root} holds no reader folders ({root}/<reader>/<case>.png)")
    masks: dict[str, dict[str, np.ndarray]] = {}
    for folder in folders:
        cases: dict[str, np.ndarray] = {}
        for file in sorted(folder.iterdir()):
            suffix = file.suffix.lower()
            if file.name.startswith(".") or not file.is_file():
                continue
            if suffix in _NOT_PNG:
                raise ValueError(f"{file}: masks must be PNG files (0 background, 255 region), not {suffix}")
            if suffix != ".png":
                continue
            if file.stem in cases:
                raise ValueError(f"{folder}: two masks for case {file.stem!r}; keep one")
            cases[file.stem] = _read_png(file)
        if not cases:
            raise ValueError(f"{folder}: reader {folder.name!r} has no mask PNGs (<case>.png)")
        masks[folder.name] = cases
    return _checked(masks)


def _boolean(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask if mask.dtype == bool else mask != 0


def _checked(masks: Masks) -> dict[str, dict[str, np.ndarray]]:
    """The masks as boolean arrays (nonzero = region), checked: 2-D, one size per case across readers."""
    out = {str(reader): {str(case): _boolean(m) for case, m in cases.items()} for reader, cases in masks.items()}
    for reader, cases in out.items():
        for case, m in cases.items():
            if m.ndim != 2:
                raise ValueError(f"case {case!r} of reader {reader!r}: a mask must be 2-D, not shape {m.shape}")
    for case in _cases(out):
        shapes = {reader: cases[case].shape for reader, cases in out.items() if case in cases}
        if len(set(shapes.values())) > 1:
            sizes = ", ".join(f"{reader} {h}x{w}" for reader, (h, w) in shapes.items())
            raise ValueError(f"case {case!r}: the readers' masks differ in size ({sizes}); draw on the same image")
    return out


def _cases(masks: Masks) -> list[str]:
    return sorted({case for cases in masks.values() for case in cases})


def _at_least_two(masks: Masks, what: str) -> None:
    if len(masks) < 2:
        raise ValueError(f"{what} needs at least two readers, found {len(masks)}: {', '.join(masks) or 'none'}")


def dice_iou(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """Dice and IoU of two boolean masks of one shape; None when both are empty (0/0)."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} and {b.shape}")
    inter = int(np.count_nonzero(a & b))
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return None
    return 2.0 * inter / total, inter / (total - inter)


def _interval(interval: np.ndarray) -> list[float] | None:
    return [float(v) for v in interval] if np.isfinite(interval).all() else None


def _agreement(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], n_boot: int, seed: int, level: float
) -> dict[str, Any]:
    """Per-case Dice and IoU of (case, mask, reference) pairs, both-empty cases skipped, and their means over cases
    with percentile bootstrap CIs (one draw of case resamples from ``seed`` for both)."""
    if n_boot < 0:
        raise ValueError(f"the number of bootstrap resamples must be 0 or more, not {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"the CI level must lie in (0, 1), not {level}")
    per_case, both_empty = [], []
    for case, mask, reference in pairs:
        scores = dice_iou(mask, reference)
        if scores is None:
            both_empty.append(case)
        else:
            per_case.append({"case": case, "dice": scores[0], "iou": scores[1]})
    n = len(per_case)
    result: dict[str, Any] = {"dice": None, "iou": None, "n_cases": n, "dice_ci": None, "iou_ci": None}
    if n:
        values = np.array([[row["dice"], row["iou"]] for row in per_case])
        result["dice"], result["iou"] = (float(v) for v in values.mean(axis=0))
        if n_boot:
            weights = bootstrap_counts(np.random.default_rng(seed).integers(0, n, (n_boot, n)), n)
            interval = bootstrap_ci(weights @ values / n, level)
            result["dice_ci"], result["iou_ci"] = _interval(interval[0]), _interval(interval[1])
    return {**result, "n_both_empty": len(both_empty), "both_empty": both_empty, "per_case": per_case}


def pairwise_agreement(masks: Masks, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[dict[str, Any]]:
    """For each pair of readers (in the given reader order): ``a``, ``b``, mean ``dice`` and ``iou`` over the
    ``n_cases`` cases both annotated and not both left empty, their CIs, the skipped cases and per-case values."""
    masks = _checked(masks)
    _at_least_two(masks, "pairwise agreement")
    rows = []
    for a, b in itertools.combinations(masks, 2):
        shared = [case for case in _cases(masks) if case in masks[a] and case in masks[b]]
        unpaired = len(masks[a].keys() ^ masks[b].keys())
        scores = _agreement(((c, masks[a][c], masks[b][c]) for c in shared), n_boot, seed, level)
        rows.append({"a": a, "b": b, **scores, "n_unpaired": unpaired})
    return rows


def majority_vote(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Region where more than half of the masks are region; an even split is background."""
    if not masks:
        raise ValueError("majority vote needs at least one mask")
    votes = np.sum([np.asarray(m) != 0 for m in masks], axis=0)
    return 2 * votes > len(masks)


def _reader_rate(value: float, defined: bool) -> float | None:
    return float(value) if defined and np.isfinite(value) else None


def _fit(votes: Sequence[np.ndarray], max_iterations: int) -> tuple[np.ndarray, list[tuple[float, float]], int]:
    """One STAPLE EM run over 1-D boolean decisions (one array per reader): P(region) per pixel, each reader's
    (sensitivity, specificity) and the iterations taken. When every reader marked every pixel, STAPLE's prior is 1
    and its update 0/0 (SimpleITK returns NaN): the consensus is then all region and every sensitivity 1."""
    if all(v.all() for v in votes):
        return np.ones(votes[0].size), [(1.0, float("nan"))] * len(votes), 0
    em = sitk.STAPLEImageFilter()
    em.SetForegroundValue(1)
    em.SetMaximumIterations(max_iterations)
    flat = sitk.GetArrayFromImage(em.Execute([sitk.GetImageFromArray(v.astype(np.uint8)[None, :]) for v in votes]))
    flat = flat.ravel().astype(np.float64)
    if not np.isfinite(flat).all():
        raise RuntimeError("STAPLE returned non-finite probabilities; report this with the masks")
    return flat, list(zip(em.GetSensitivity(), em.GetSpecificity(), strict=True)), int(em.GetElapsedIterations())


def staple(masks: Masks, *, max_iterations: int = MAX_ITERATIONS) -> Staple:
    """STAPLE consensus and reader performance (Warfield et al. 2004) over the cases every reader annotated, all
    their pixels pooled in one EM run of ``SimpleITK.STAPLEImageFilter`` (see the module docstring)."""
    masks = _checked(masks)
    _at_least_two(masks, "STAPLE")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be at least 1, not {max_iterations}")
    readers = tuple(masks)
    all_cases = _cases(masks)
    complete = [case for case in all_cases if all(case in masks[r] for r in readers)]
    incomplete = tuple(case for case in all_cases if case not in complete)
    all_empty = tuple(case for case in complete if not any(masks[r][case].any() for r in readers))
    fitted = [case for case in complete if case not in all_empty]
    probability = {case: np.zeros(masks[readers[0]][case].shape) for case in all_empty}
    sensitivity: dict[str, float | None] = dict.fromkeys(readers)
    specificity: dict[str, float | None] = dict.fromkeys(readers)
    iterations = 0
    if fitted:
        votes = [np.concatenate([masks[r][c].ravel() for c in fitted]) for r in readers]
        flat, rates, iterations = _fit(votes, max_iterations)
        sizes = [masks[readers[0]][c].size for c in fitted]
        for case, part in zip(fitted, np.split(flat, np.cumsum(sizes)[:-1]), strict=True):
            probability[case] = part.reshape(masks[readers[0]][case].shape)
        region = flat > CONSENSUS_THRESHOLD
        has_region, has_background = bool(region.any()), bool((~region).any())
        for reader, (p, q) in zip(readers, rates, strict=True):
            sensitivity[reader] = _reader_rate(p, has_region)
            specificity[reader] = _reader_rate(q, has_background)
    probability = {case: probability[case] for case in complete}
    return Staple(
        readers=readers,
        cases=tuple(complete),
        probability=probability,
        consensus={case: p > CONSENSUS_THRESHOLD for case, p in probability.items()},
        sensitivity=sensitivity,
        specificity=specificity,
        all_empty=all_empty,
        incomplete=incomplete,
        iterations=iterations,
        converged=iterations < max_iterations,
    )


def leave_one_out(
    masks: Masks, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95, max_iterations: int = MAX_ITERATIONS
) -> list[dict[str, Any]]:
    """The human baseline: each reader's Dice and IoU against the consensus of the other readers (STAPLE when
    there are at least two others, else the other reader's mask), on the cases that reader and the consensus share,
    both-empty cases skipped; means with bootstrap CIs over cases as in :func:`pairwise_agreement`."""
    masks = _checked(masks)
    _at_least_two(masks, "the leave-one-out baseline")
    rows = []
    for reader in masks:
        others = {other: cases for other, cases in masks.items() if other != reader}
        if len(others) >= 2:
            reference, method = staple(others, max_iterations=max_iterations).consensus, "staple"
        else:
            reference, method = next(iter(others.values())), "reader"
        shared = [case for case in sorted(reference) if case in masks[reader]]
        scores = _agreement(((c, masks[reader][c], reference[c]) for c in shared), n_boot, seed, level)
        rows.append({"reader": reader, "reference": method, "others": list(others), **scores})
    return rows


def agreement_report(
    masks: Masks,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    consensus: Staple | None = None,
    max_iterations: int = MAX_ITERATIONS,
) -> dict[str, Any]:
    """The whole agreement of a reader study's masks, strict-JSON ready (None where undefined): ``readers`` with
    their STAPLE sensitivity and specificity, ``pairwise``, ``staple``, ``majority_vote`` (against the STAPLE
    consensus, on the cases STAPLE used) and ``leave_one_out``. Pass ``consensus`` when :func:`staple` already ran
    on the same masks."""
    masks = _checked(masks)
    _at_least_two(masks, "reader agreement")
    if consensus is None:
        consensus = staple(masks, max_iterations=max_iterations)
    elif consensus.readers != tuple(masks):
        raise ValueError(f"the STAPLE result is of readers {consensus.readers}, not {tuple(masks)}")
    bootstrap = {"n_boot": n_boot, "seed": seed, "level": level, "resampled": "cases"}
    majority = {case: majority_vote([masks[r][case] for r in masks]) for case in consensus.cases}
    readers = [
        {
            "reader": reader,
            "sensitivity": consensus.sensitivity[reader],
            "specificity": consensus.specificity[reader],
            "n_cases": len(cases),
            "n_empty": sum(not m.any() for m in cases.values()),
        }
        for reader, cases in masks.items()
    ]
    return {
        "readers": readers,
        "cases": _cases(masks),
        "pairwise": pairwise_agreement(masks, n_boot=n_boot, seed=seed, level=level),
        "staple": {
            "threshold": CONSENSUS_THRESHOLD,
            "cases": list(consensus.cases),
            "all_empty_cases": list(consensus.all_empty),
            "incomplete_cases": list(consensus.incomplete),
            "iterations": consensus.iterations,
            "converged": consensus.converged,
            "per_case": [
                {"case": case, "pixels": int(m.size), "consensus_pixels": int(np.count_nonzero(m))}
                for case, m in consensus.consensus.items()
            ],
        },
        "majority_vote": {
            "rule": "region where more than half of the readers drew it; an even split is background",
            "vs_staple": _agreement(
                ((c, majority[c], consensus.consensus[c]) for c in consensus.cases), n_boot, seed, level
            ),
        },
        "leave_one_out": leave_one_out(masks, n_boot=n_boot, seed=seed, level=level, max_iterations=max_iterations),
        "bootstrap": bootstrap,
    }


def write_mask_folder(masks: Mapping[str, np.ndarray], folder: str | Path) -> list[Path]:
    """Each boolean mask as ``folder/<case>.png`` (0 background, 255 region), written atomically."""
    folder = Path(folder)
    paths = []
    for case, mask in masks.items():
        path = folder / f"{case}.png"
        write_atomic(path, png_bytes(np.where(np.asarray(mask) != 0, 255, 0).astype(np.uint8)))
        paths.append(path)
    return paths


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a 2-D mask (nonzero = region): ``{"size": [height, width], "counts": str}``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, not shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """The boolean mask of a COCO compressed RLE (``counts`` as str or bytes)."""
    counts = rle["counts"]
    if not isinstance(counts, str | bytes):
        raise ValueError("counts must be COCO's compressed string; uncompressed count lists are not read here")
    height, width = (int(s) for s in rle["size"])
    encoded = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(encoded).astype(bool)
