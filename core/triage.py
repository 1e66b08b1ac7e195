"""Clip triage: every frame of a confocal laser endomicroscopy (CLE) clip scored by a diagnostic-frame model, and the
most diagnostic frames with their heatmaps.

Why (seed 000, Izadyyazdanabadi et al.): a probe streams up to 20 frames a second and most frames of a biopsy site
are nondiagnostic (blood, motion); the surgeon wants the diagnostic ones and where the features are inside them.
The clip is read as a stream (:class:`core.data.clips.Clip`): frames go through the model in batches and are then
dropped, so a 10-minute clip never sits in memory; only the per-frame probabilities (4 bytes a frame) and a bounded
pool of candidate top frames are kept. The next batch is decoded on a thread while the current one runs through the
model (with no heatmap, :class:`core.predict.Predictor` scores with batch norm folded into the convolutions). The
top frames are chosen apart from each other (at least ``min_gap`` frames, half a second by default), since
neighbouring frames of a clip are near copies, and only they get heatmaps: the model's own map where it has one
(MLCAM-LICI's final diagnostic feature map, CompSegNet's activation map, CELM for a CeLNet), else Grad-CAM.
"""

from __future__ import annotations

import heapq
import io
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

import numpy as np

from core.data.clips import Clip
from core.data.io import Image, ImageError
from core.predict import Predictor

__all__ = ["TopFrame", "Triage", "default_method", "frames_csv", "pick_top", "triage_clip"]

_POOL_PER_TOP = 8  # candidate windows kept per requested top frame while the clip streams by
_DECODE_AHEAD = 1  # batches decoded ahead of the network (Clip.batches): decoding overlaps inference


@dataclass(frozen=True)
class TopFrame:
    """One of the most diagnostic frames: its index in the clip (0-based), probability, pixels and heatmap."""

    index: int
    probability: float
    frame: np.ndarray
    heatmap: np.ndarray | None  # (H, W) float32 in [0, 1], the frame's own size


@dataclass(frozen=True)
class Triage:
    """A clip triaged by one model: a probability per frame, the operating threshold, the top frames."""

    name: str
    probabilities: np.ndarray  # (N,) float32, one per frame in clip order
    threshold: float
    fps: float | None
    method: str | None
    top: tuple[TopFrame, ...]
    device: str
    seconds: float  # wall time of the whole triage, decoding included

    @property
    def n_frames(self) -> int:
        return int(self.probabilities.size)

    @property
    def decisions(self) -> np.ndarray:
        """Per frame: diagnostic (probability at or above the threshold)."""
        return self.probabilities >= self.threshold

    @property
    def n_positive(self) -> int:
        return int(self.decisions.sum())

    @property
    def frames_per_second(self) -> float:
        """Frames triaged per second of wall time (decode + inference + heatmaps)."""
        return self.n_frames / self.seconds if self.seconds > 0 else float("inf")


def _image(frame: np.ndarray, clip: str, index: int) -> Image:
    return Image(np.asarray(frame), name=f"{clip} frame {index}", format="NPY")


def default_method(
    methods: dict[str, str] | list[str] | tuple[str, ...], architecture: str | None = None
) -> str | None:
    """The heatmap a model's frames get by default: its own map where it computes one (MLCAM-LICI's final diagnostic
    feature map, CompSegNet's activation map, Tissue MIL's cell scores), CELM for a CeLNet (seed 001's own method),
    else Grad-CAM, else the first method that applies; None when none does."""
    names = list(methods)
    own = [m for m in ("mlcam-lici", "compsegnet", "tissue-mil") if m in names]
    if architecture == "celnet" and "celm" in names:
        own.append("celm")
    return next(iter(own), "gradcam" if "gradcam" in names else names[0] if names else None)


def pick_top(probabilities: np.ndarray, k: int, min_gap: int, candidates: np.ndarray | None = None) -> list[int]:
    """Up to ``k`` frame indices, highest probability first, each at least ``min_gap`` frames from those already
    picked (greedy non-maximum suppression over time). ``candidates`` restricts the choice (default: every frame)."""
    order = np.arange(probabilities.size) if candidates is None else np.asarray(candidates, dtype=int)
    order = order[np.argsort(-probabilities[order], kind="stable")]
    picked: list[int] = []
    for index in order.tolist():
        if len(picked) == k:
            break
        if all(abs(index - other) >= min_gap for other in picked):
            picked.append(index)
    return picked


def frames_csv(probabilities: np.ndarray, threshold: float) -> str:
    """The per-frame table: ``frame,probability,decision`` (frame 0-based, decision 1 = diagnostic), clip order."""
    out = io.StringIO()
    out.write("frame,probability,decision\n")
    for index, p in enumerate(probabilities.tolist()):
        out.write(f"{index},{p:.6f},{int(p >= threshold)}\n")
    return out.getvalue()


def triage_clip(
    predictor: Predictor,
    clip: Clip,
    *,
    batch_size: int = 8,
    top_k: int = 5,
    heatmap: str | None = "default",
    min_gap: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> Triage:
    """Score every frame of ``clip`` with ``predictor`` (batches of ``batch_size``), then compute ``heatmap`` for the
    ``top_k`` most diagnostic frames, at least ``min_gap`` frames apart (default: half a second at the clip's rate,
    else 10 frames). ``heatmap``: a method name, ``"default"`` (:func:`default_method`) or None (no maps).
    ``progress(frames done, frames in the clip or None)`` after each batch. A frame the model cannot take raises
    :class:`core.data.io.ImageError` naming the frame; a clip that breaks off raises
    :class:`core.data.clips.ClipError`."""
    if batch_size < 1 or top_k < 0:
        raise ValueError("batch_size must be at least 1 and top_k at least 0")
    method = (
        default_method(predictor.methods, predictor.config.get("architecture")) if heatmap == "default" else heatmap
    )
    if method is not None and method not in predictor.methods:
        raise ValueError(f"heatmap {method!r} does not apply to this model; use one of: {', '.join(predictor.methods)}")
    info = clip.info
    gap = min_gap if min_gap is not None else max(1, round(info.fps / 2)) if info.fps else 10
    began = time.perf_counter()
    probabilities: list[float] = []
    # candidates for the top frames: the best frame of each window of ``gap`` frames, for at most ``pool_size``
    # windows (the best ones), so that the candidates are spread over the clip however long it is
    pool: dict[int, tuple[float, int, np.ndarray]] = {}
    pool_size = max(1, top_k) * _POOL_PER_TOP
    # the next batch is decoded on a thread of its own while this one runs through the network; closing the batches
    # (whatever ends the loop: the last batch, a refused frame, a progress callback that raises to cancel) stops it
    with closing(clip.batches(batch_size, ahead=_DECODE_AHEAD)) as batches:
        for batch in batches:
            start = len(probabilities)
            images = [_image(frame, info.name, start + j) for j, frame in enumerate(batch)]
            results = predictor.diagnose(images, heatmap=None, batch_size=batch_size)
            for j, result in enumerate(results):
                if isinstance(result, ImageError):
                    raise result
                probabilities.append(result.probability)
                window = (start + j) // gap
                if top_k and (window not in pool or result.probability > pool[window][0]):
                    pool[window] = (result.probability, start + j, batch[j])
            if len(pool) > pool_size:
                kept = heapq.nlargest(pool_size, pool.items(), key=lambda item: item[1][0])
                pool = dict(kept)
            if progress is not None:
                progress(len(probabilities), info.n_frames)
    scores = np.asarray(probabilities, dtype=np.float32)
    frames = {index: frame for _, index, frame in pool.values()}
    chosen = pick_top(scores, top_k, gap, candidates=np.fromiter(frames, dtype=int)) if frames else []
    maps: list[np.ndarray | None] = [None] * len(chosen)
    if chosen and method is not None:
        images = [_image(frames[i], info.name, i) for i in chosen]
        for k, result in enumerate(predictor.diagnose(images, heatmap=method, batch_size=batch_size)):
            if isinstance(result, ImageError):
                raise result
            maps[k] = result.heatmap
    top = tuple(
        TopFrame(index=i, probability=float(scores[i]), frame=np.asarray(frames[i]), heatmap=maps[k])
        for k, i in enumerate(chosen)
    )
    return Triage(
        name=info.name,
        probabilities=scores,
        threshold=predictor.threshold,
        fps=info.fps,
        method=method if chosen else None,
        top=top,
        device=predictor.device.type,
        seconds=time.perf_counter() - began,
    )
