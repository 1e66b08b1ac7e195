"""Whether this machine keeps up with a CLE probe live: ``python -m bench.live``.

The Diagnose page's live view (:class:`core.live.Replay`) replays a clip as the probe streams it (``--fps``, 20
frames/s): each frame arrives at ``i / fps`` seconds, the consumer scores the newest one that has arrived and drops
the stale ones. Here the same replay runs on the real clock, with nothing drawn, per model (``--models``:
EfficientNet-B0 with one input channel, random weights re-calibrated on CLE frames as in ``bench.clips``; MLCAM-LICI
as the demo builds it, width 32, random weights: speed does not depend on the weights), per frame size (``--sizes``,
256 and 512 px) and without and with the heatmap (the model's own map: Grad-CAM for EfficientNet-B0, MLCAM-LICI's
final map).
The clip (``make_cle_clip``, ``--seconds`` long) is an H.264 MP4 decoded as a stream, as a stored clip is.

Reported per row: the frames shown of those that arrived, the achieved rate, the dropped fraction, latency from a
frame's arrival to its result (median and 95th percentile), whether it keeps up (at most 1 % dropped and 95 % of the
results within one frame interval: :class:`core.live.LiveStats`), and the model's own time per frame measured alone
(``score_ms``, the median of a few calls after the warm-up). ``--device cuda`` runs the models on a GPU. Results:
``bench/results/live-<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.diagnosis import start, usable_cores, write_results
from bench.heatmaps import calibrate
from core.data.clips import open_clip
from core.data.io import Image
from core.data.preprocess import prepare_batch
from core.data.synth_cle import make_cle_clip, write_clip
from core.live import Replay
from core.models import create_model
from core.predict import Predictor

__all__ = ["MODELS", "Settings", "main", "measure", "parse_args"]

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("efficientnet_b0", "mlcam_lici")
_WARMUP = 3
_SCORE_CALLS = 5


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    models: tuple[str, ...]
    seconds: float
    fps: float
    threads: int
    device: str
    out: Path
    quick: bool


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`; ``--quick`` shrinks every size."""
    parser = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="frame sizes in px (256 512)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="architectures (both)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the replayed clip in seconds (10)")
    parser.add_argument("--fps", type=float, default=20.0, help="the probe's frame rate (20)")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch threads (the usable cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (bench/results)")
    parser.add_argument("--quick", action="store_true", help="64 px clips of 0.5 s: checks that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seconds = [64], 0.5
    if min(args.sizes) < 32 or any(s % 2 for s in args.sizes):
        parser.error("sizes must be even and at least 32 px (an H.264 clip of CLE frames)")
    if not (args.seconds > 0 and args.fps > 0 and args.threads >= 1):
        parser.error("seconds, fps and threads must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return Settings(
        sizes=tuple(args.sizes), models=tuple(args.models), seconds=args.seconds, fps=args.fps, threads=args.threads,
        device=args.device, out=args.out, quick=args.quick,
    )  # fmt: skip


def _predictor(architecture: str, size: int, frames: list[Image], device: torch.device) -> Predictor:
    """A predictor of ``architecture`` at ``size`` px, random weights (EfficientNet-B0's re-calibrated on the clip's
    frames so that its logits spread like a trained model's)."""
    torch.manual_seed(0)
    model = create_model(architecture, in_chans=1)
    if architecture == "efficientnet_b0":
        calibrate(model, prepare_batch(frames[: min(16, len(frames))], "CLE", size))
    config = {"architecture": architecture, "in_chans": 1, "modality": "CLE", "image_size": size}
    return Predictor(model, config, threshold=0.5, device=device.type)


def _score_ms(predictor: Predictor, frames: list[Image], heatmap: str | None) -> float:
    """The median milliseconds of one frame through ``predictor`` alone, after a warm-up."""
    for frame in frames[:_WARMUP]:
        predictor.diagnose([frame], heatmap=heatmap, batch_size=1)
    times = []
    for frame in frames[_WARMUP : _WARMUP + _SCORE_CALLS] or frames[:1]:
        began = time.perf_counter()
        predictor.diagnose([frame], heatmap=heatmap, batch_size=1)
        times.append((time.perf_counter() - began) * 1000.0)
    return statistics.median(times)


def measure(architecture: str, size: int, settings: Settings, device: torch.device) -> list[dict[str, Any]]:
    """The live replay of one clip of ``size`` px by one model, without and with its heatmap: one row each."""
    n_frames = max(1, round(settings.seconds * settings.fps))
    clip = make_cle_clip(n_frames, size, seed=size, fps=settings.fps)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ioai-bench-live-") as folder:
        path = write_clip(clip.frames, Path(folder) / "clip.mp4", fps=clip.fps)
        with open_clip(path) as opened:
            frames = [Image(np.asarray(f), name=f"frame {i}", format="NPY") for i, f in enumerate(opened.frames())]
        predictor = _predictor(architecture, size, frames, device)
        for heatmap in (None, "default"):
            with open_clip(path) as opened:
                replay = Replay(predictor, opened, heatmap=heatmap)
                score_ms = _score_ms(predictor, frames, replay.method)
                for _ in replay:
                    pass
            stats = replay.stats()
            rows.append(
                {"model": architecture, "size": size, **stats.as_dict(), "frames": len(frames), "score_ms": score_ms}
            )
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    """The table for the terminal."""
    table = pd.DataFrame(
        [
            {
                "model": row["model"],
                "px": row["size"],
                "heatmap": row["heatmap"] or "-",
                "shown": f"{row['shown']}/{row['arrived']}",
                "fps": f"{row['achieved_fps']:.1f} of {row['fps']:g}",
                "dropped": f"{row['dropped_fraction']:.0%}",
                "p50 ms": f"{row['latency_p50_ms']:.0f}",
                "p95 ms": f"{row['latency_p95_ms']:.0f}",
                "model ms": f"{row['score_ms']:.0f}",
                "keeps up": "yes" if row["keeps_up"] else "no",
            }
            for row in rows
        ]
    )
    return table.to_string(index=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Every model and size, without and with the heatmap; print the table, write the JSON."""
    settings = parse_args(argv)
    device, began, about = start(settings.threads, settings.device)
    rows: list[dict[str, Any]] = []
    for architecture in settings.models:
        for size in settings.sizes:
            print(f"{architecture} at {size} px ...", flush=True)
            rows.extend(measure(architecture, size, settings, device))
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "rows": rows,
        "seconds": time.perf_counter() - began,
    }
    print(report(rows))
    print(
        "keeps up: at most 1 % of the frames dropped and 95 % of the results within one frame interval of arriving; "
        "model ms: one frame through the model alone."
    )
    print(f"Total {document['seconds']:.0f} s.")
    write_results(settings.out, "live", device, settings.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
