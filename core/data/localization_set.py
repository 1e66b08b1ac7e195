"""Localisation data sets: images with image-level labels for training and pixel masks for scoring, in one folder.

The weakly supervised papers train from image-level labels only and score the maps against experts' masks. A set
on disk is::

    dataset.json          {"kind", "modality", "channels", "size", "mask_sets", "seed", "channel_mean", "channel_std"}
    labels.csv            image_id, split (train / val / test / mislabelled), label (0 / 1), path
    images/<id>.png       8-bit grayscale (CLE) ...
    images/<id>.npy       ... or (C, H, W) float16 many-channel spectra (IR)
    masks/<set>/<id>.png  0 = negative, 255 = positive, anything else = unlabeled (excluded from scoring)

``python -m core synth cle|spectral --out DIR`` writes one from the generators (:mod:`core.data.synth_cle`,
:mod:`core.data.synth_spectral`); any folder of the same shape (real CLE frames with surgeons' masks) trains and
scores the same way. Image-level labels come from the masks exactly as the papers labelled their data: a CLE frame is
diagnostic when any diagnostic region is present (seed 000), a spectral spot is cancer when it holds tumor (seed 004).

Network input: CLE grey levels /255 standardised like every single-channel modality; spectra standardised per
channel by the training split's tissue statistics, which ``dataset.json`` stores so a model sees the same numbers at
training and at scoring time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image as PILImage

from core.data.preprocess import standardize
from core.data.store import npy_bytes, png_bytes, write_atomic

__all__ = ["KINDS", "MISLABELLED", "LocalizationSet", "generate_set", "read_set"]

KINDS = {"cle": "CLE", "spectral": "IR"}  # kind -> modality
_SPLITS = ("train", "val", "test")
MISLABELLED = "mislabelled"
"""An optional split of images that hold the feature but carry the negative label, scored only, never trained or
validated on: seed 000's Set4, "CLE images that were known to be from glioma tumors, but were initially classified
as nondiagnostic"."""
_ALL_SPLITS = (*_SPLITS, MISLABELLED)


@dataclass(frozen=True)
class LocalizationSet:
    """A localisation data set read from disk (see the module docstring)."""

    root: Path
    kind: str
    modality: str
    channels: int
    size: int
    mask_sets: tuple[str, ...]
    frame: pd.DataFrame  # image_id, split, label, path
    channel_mean: np.ndarray | None = None
    channel_std: np.ndarray | None = None

    def rows(self, split: str) -> pd.DataFrame:
        if split not in _ALL_SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(_ALL_SPLITS)}")
        return self.frame[self.frame["split"] == split].reset_index(drop=True)

    def raw(self, split: str) -> np.ndarray:
        """The split's images as stored: (N, H, W) uint8 for CLE, (N, C, H, W) float32 for spectra."""
        paths = [self.root / p for p in self.rows(split)["path"]]
        if self.kind == "cle":
            return np.stack([_read_png(p) for p in paths]) if paths else np.zeros((0, self.size, self.size), np.uint8)
        if not paths:
            return np.zeros((0, self.channels, self.size, self.size), np.float32)
        return np.stack([np.load(p).astype(np.float32) for p in paths])

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input ``(N, C, H, W)`` float32 and 0/1 labels of a split."""
        return self.to_input(self.raw(split)), torch.tensor(self.rows(split)["label"].to_numpy(), dtype=torch.float32)

    def to_input(self, raw: np.ndarray) -> torch.Tensor:
        """Stored images (as :meth:`raw` returns them) to standardised network input."""
        if self.kind == "cle":
            return standardize(torch.from_numpy(raw).float().div_(255.0)[:, None], "CLE").contiguous()
        mean = torch.from_numpy(self.channel_mean).float()[None, :, None, None]
        std = torch.from_numpy(self.channel_std).float()[None, :, None, None]
        return ((torch.from_numpy(raw).float() - mean) / std).contiguous()

    def masks(self, split: str, mask_set: str) -> np.ndarray:
        """(N, H, W) uint8 masks of a split (0 / 255, other values unlabeled)."""
        if mask_set not in self.mask_sets:
            raise ValueError(f"this set has no {mask_set!r} masks; it has {', '.join(self.mask_sets)}")
        ids = self.rows(split)["image_id"]
        return np.stack([_read_png(self.root / "masks" / mask_set / f"{i}.png") for i in ids])

    def describe(self) -> dict[str, Any]:
        """What the set holds, for the record stored with an evaluation."""
        counts = {
            split: {"images": int(len(part)), "positive": int(part["label"].sum())}
            for split, part in self.frame.groupby("split")
        }
        return {
            "root": str(self.root),
            "kind": self.kind,
            "modality": self.modality,
            "channels": self.channels,
            "size": self.size,
            "mask_sets": list(self.mask_sets),
            "splits": counts,
        }


def _read_png(path: Path) -> np.ndarray:
    try:
        with PILImage.open(path) as image:
            return np.asarray(image.convert("L"))
    except (OSError, EOFError) as error:
        raise ValueError(f"{path}: unreadable PNG ({error})") from None


def read_set(root: str | Path) -> LocalizationSet:
    """Read and check a set; a clear ValueError names what is missing or wrong."""
    root = Path(root)
    meta_path, labels_path = root / "dataset.json", root / "labels.csv"
    for path in (meta_path, labels_path):
        if not path.is_file():
            raise ValueError(f"{root} is not a localisation data set: {path.name} is missing")
    meta = json.loads(meta_path.read_text())
    frame = pd.read_csv(labels_path, dtype={"image_id": str, "split": str, "path": str})
    missing = {"image_id", "split", "label", "path"} - set(frame.columns)
    if missing:
        raise ValueError(f"{labels_path}: missing column(s) {', '.join(sorted(missing))}")
    bad = frame[~frame["split"].isin(_ALL_SPLITS) | ~frame["label"].isin([0, 1])]
    if not bad.empty:
        line = int(bad.index[0]) + 2
        raise ValueError(f"{labels_path} line {line}: split must be train/val/test/{MISLABELLED} and label 0 or 1")
    frame["label"] = frame["label"].astype(int)
    absent = [p for p in frame["path"] if not (root / p).is_file()]
    if absent:
        raise ValueError(f"{root}: {len(absent)} image file(s) listed in labels.csv are missing, e.g. {absent[0]}")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{meta_path}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    stats = {k: np.asarray(meta[k], dtype=np.float32) if meta.get(k) else None for k in ("channel_mean", "channel_std")}
    return LocalizationSet(
        root=root,
        kind=kind,
        modality=KINDS[kind],
        channels=int(meta["channels"]),
        size=int(meta["size"]),
        mask_sets=tuple(meta["mask_sets"]),
        frame=frame,
        **stats,
    )


def _cle_items(
    n: int, size: int, seed: int, _channels: int, positive_fraction: float = 0.5
) -> list[tuple[np.ndarray, dict[str, np.ndarray], int]]:
    from core.data.synth_cle import make_cle_frames

    frames = make_cle_frames(n, size, seed=seed, positive_fraction=positive_fraction)
    return [(f.image, {"intermediate": f.intermediate, "restrictive": f.restrictive}, f.label) for f in frames]


def _spectral_items(n: int, size: int, seed: int, channels: int) -> list[tuple[np.ndarray, dict[str, np.ndarray], int]]:
    from core.data.synth_spectral import make_spectral_spots

    spots = make_spectral_spots(n, size, channels, seed=seed)
    return [(s.image.astype(np.float16), {"tumor": s.mask}, s.label) for s in spots]


_GENERATORS: dict[str, Callable[..., list[tuple[np.ndarray, dict[str, np.ndarray], int]]]] = {
    "cle": _cle_items,
    "spectral": _spectral_items,
}


def generate_set(
    kind: str,
    root: str | Path,
    *,
    counts: tuple[int, int, int] = (400, 100, 200),
    size: int = 128,
    channels: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    mislabelled: int = 0,
) -> LocalizationSet:
    """Write a synthetic set of ``kind`` (``cle`` or ``spectral``) with ``counts`` = (train, val, test) images, and
    (CLE) ``mislabelled`` frames with diagnostic features labelled nondiagnostic in the :data:`MISLABELLED` split.

    Each split is drawn from its own seed, so a split never shares an image with another. The folder is written
    under a temporary name and renamed when complete: an interrupted run leaves no half-written set."""
    if mislabelled and kind != "cle":
        raise ValueError("only CLE sets have mislabelled frames (seed 000's Set4)")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if min(counts) < 2:
        raise ValueError("every split needs at least 2 images")
    root = Path(root)
    if root.exists():
        if not overwrite:
            raise ValueError(f"{root} already exists; choose another folder or overwrite it")
        shutil.rmtree(root)
    channels = 1 if kind == "cle" else channels
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    mask_sets: set[str] = set()
    tissue_sum = np.zeros(channels, np.float64)
    tissue_sq = np.zeros(channels, np.float64)
    tissue_n = 0
    plan = [(split, n, {}) for split, n in zip(_SPLITS, counts, strict=True)]
    if mislabelled:
        plan.append((MISLABELLED, mislabelled, {"positive_fraction": 1.0}))
    for offset, (split, n, options) in enumerate(plan):
        items = _GENERATORS[kind](n, size, seed * 1000 + offset, channels, **options)
        for index, (image, masks, label) in enumerate(items):
            if split == MISLABELLED:
                label = 0  # features present, labelled nondiagnostic
            image_id = f"{split}-{index:05d}"
            suffix = ".png" if kind == "cle" else ".npy"
            path = f"images/{image_id}{suffix}"
            write_atomic(partial / path, png_bytes(image) if kind == "cle" else npy_bytes(image))
            for name, mask in masks.items():
                write_atomic(partial / "masks" / name / f"{image_id}.png", png_bytes(mask))
                mask_sets.add(name)
            rows.append({"image_id": image_id, "split": split, "label": int(label), "path": path})
            if kind == "spectral" and split == "train":
                tissue = next(iter(masks.values())) != 128
                pixels = image.astype(np.float64)[:, tissue]
                tissue_sum += pixels.sum(axis=1)
                tissue_sq += (pixels**2).sum(axis=1)
                tissue_n += pixels.shape[1]
    meta: dict[str, Any] = {
        "kind": kind,
        "modality": KINDS[kind],
        "channels": channels,
        "size": size,
        "seed": seed,
        "mask_sets": sorted(mask_sets),
    }
    if kind == "spectral":
        mean = tissue_sum / max(1, tissue_n)
        std = np.sqrt(np.maximum(tissue_sq / max(1, tissue_n) - mean**2, 1e-12))
        meta.update(channel_mean=mean.tolist(), channel_std=std.tolist())
    pd.DataFrame(rows).to_csv(partial / "labels.csv", index=False)
    (partial / "dataset.json").write_text(json.dumps(meta, indent=2))
    partial.rename(root)
    return read_set(root)
