"""CLE clip triage speed, side by side in one run: ``python -m bench.clips``.

A confocal laser endomicroscope streams up to 20 frames/s; the clip triage (:func:`core.triage.triage_clip`) scores
every frame and maps the top ones. Per frame size (``--sizes``, 256 and 512 px), on one synthetic clip
(:func:`core.data.synth_cle.make_cle_clip`, ``--frames`` frames) written as an H.264 MP4 and read back as a stream
through :func:`core.data.clips.open_clip`, with EfficientNet-B0 (one input channel, random weights re-calibrated on
CLE frames so that its logits spread like a trained model's; speed does not depend on the weights), timed in
rotation (one of each per round, ``--rounds``), so that a change in machine load hits all alike:

- ``decode``: the clip's frames decoded, nothing else.
- ``single``: the frames (already decoded) diagnosed one at a time, as the live view does: ``Predictor.diagnose``
  with one frame and no heatmap.
- ``triage``: the whole clip end to end, decoding included, in batches of ``--batch`` frames, no heatmaps
  (``top_k=0``); the next batch is decoded on a thread while the network runs (``Clip.batches(ahead=1)``).
- ``triage_maps``: the same with the top ``--top`` frames and their Grad-CAM maps, as the Diagnose page runs it.

``single`` and ``triage`` score through the same no-heatmap path of :class:`core.predict.Predictor` (a copy of the
network with batch norm folded into the convolutions, under ``torch.inference_mode`` in channels_last), so their
ratio is what batching and decoding ahead add, nothing else. The probabilities of the triage are compared with those
of the timed one-at-a-time run, every frame.

Reported as frames per second (medians over the rounds), the ratio of batched triage to one frame at a time (goal:
at least 2 on the 2-core CPU), the end-to-end rate against 60 frames/s at 256 px (the issue's goal) and against the
probe's 20 frames/s, and minor page faults per frame. ``--device cuda`` runs the same on a GPU. Results:
``bench/results/clips-<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.diagnosis import start, timed, usable_cores, write_results
from bench.heatmaps import ARCHITECTURE, calibrate
from core.data.clips import open_clip
from core.data.io import Image
from core.data.preprocess import prepare_batch
from core.data.synth_cle import make_cle_clip, write_clip
from core.models import create_model
from core.predict import Predictor
from core.triage import triage_clip

__all__ = ["GOAL_FPS_256", "GOAL_RATIO", "Settings", "main", "measure_size", "parse_args"]

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_FPS = 20.0
GOAL_FPS_256 = 60.0  # end to end (decode + triage) at 256 px on the 2-core CPU
GOAL_RATIO = 2.0  # batched triage against one frame at a time


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    frames: int
    batch: int
    top: int
    rounds: int
    threads: int
    device: str
    out: Path
    quick: bool


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`; ``--quick`` shrinks every size."""
    parser = argparse.ArgumentParser(prog="python -m bench.clips", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="frame sizes in px (256 512)")
    parser.add_argument("--frames", type=int, default=200, help="frames in the clip (200: 10 s at 20 frames/s)")
    parser.add_argument("--batch", type=int, default=8, help="frames per forward pass in the triage (8)")
    parser.add_argument("--top", type=int, default=5, help="top frames mapped in triage_maps (5)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each measurement once per round (3)")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch threads (the usable cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (bench/results)")
    parser.add_argument("--quick", action="store_true", help="one 128 px clip of 24 frames, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.frames, args.rounds, args.top = [128], 24, 1, 2
    if min(*args.sizes, args.frames, args.batch, args.rounds, args.threads) < 1 or args.top < 0:
        parser.error("sizes, frames, batch, rounds and threads must be positive, top 0 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return Settings(
        sizes=tuple(args.sizes), frames=args.frames, batch=args.batch, top=args.top, rounds=args.rounds,
        threads=args.threads, device=args.device, out=args.out, quick=args.quick,
    )  # fmt: skip


def measure_size(model: torch.nn.Module, size: int, settings: Settings, device: torch.device) -> dict[str, Any]:
    """Every measurement on one clip of ``size`` px frames; frames/s and faults/frame per measurement."""
    clip = make_cle_clip(settings.frames, size, seed=size, fps=PROBE_FPS)
    with tempfile.TemporaryDirectory(prefix="ioai-bench-clips-") as folder:
        path = write_clip(clip.frames, Path(folder) / "clip.mp4", fps=clip.fps)
        with open_clip(path) as opened:  # the frames as the triage sees them (H.264 is lossy)
            frames = [Image(np.asarray(f), name=f"frame {i}", format="NPY") for i, f in enumerate(opened.frames())]
        model = copy.deepcopy(model)
        calibrate(model, prepare_batch(frames[: min(16, len(frames))], "CLE", size).to(device))
        config = {"architecture": ARCHITECTURE, "in_chans": 1, "modality": "CLE", "image_size": size}
        predictor = Predictor(model, config, threshold=0.5, device=device.type)
        outcome: dict[str, Any] = {}

        def decode() -> None:
            with open_clip(path) as opened:
                outcome["decoded"] = sum(1 for _ in opened.frames())

        def single() -> None:
            outcome["single"] = [predictor.diagnose([frame], heatmap=None)[0].probability for frame in frames]

        def triage(top: int) -> Callable[[], None]:
            def run() -> None:
                with open_clip(path) as opened:
                    result = triage_clip(predictor, opened, batch_size=settings.batch, top_k=top, heatmap="gradcam")
                outcome[f"top_{top}"] = result

            return run

        calls = {"decode": decode, "single": single, "triage": triage(0), "triage_maps": triage(settings.top)}
        for call in calls.values():  # warm up: allocator, kernels, decoder
            call()
        samples: dict[str, list[tuple[float, int]]] = {name: [] for name in calls}
        for _ in range(settings.rounds):
            for name, call in calls.items():
                milliseconds, faults = timed(device, call)
                samples[name].append((milliseconds / 1000.0, faults))
    n = settings.frames
    rows = {}
    for name, values in samples.items():
        seconds = statistics.median(s for s, _ in values)
        rows[name] = {
            "seconds": seconds,
            "frames_per_s": n / seconds,
            "x_probe": n / seconds / PROBE_FPS,
            "faults_per_frame": statistics.median(f for _, f in values) / n,
            "rounds": len(values),
        }
    single_fps = rows["single"]["frames_per_s"]
    mapped = outcome[f"top_{settings.top}"]
    return {
        "size": size,
        "frames": n,
        "decoded": outcome["decoded"],
        "rows": rows,
        "ratios": {
            "triage_over_single": rows["triage"]["frames_per_s"] / single_fps,
            "triage_maps_over_single": rows["triage_maps"]["frames_per_s"] / single_fps,
            "decode_share_of_triage": rows["decode"]["seconds"] / rows["triage"]["seconds"],
        },
        "top_frames": [t.index for t in mapped.top],
        "batched_vs_single_max_abs_diff": float(np.max(np.abs(mapped.probabilities - np.array(outcome["single"])))),
    }


def report(document: dict[str, Any]) -> str:
    """The tables for the terminal."""
    lines = []
    for part in document["sizes"]:
        frame = pd.DataFrame(
            [
                {
                    "measurement": name,
                    "frames/s": f"{row['frames_per_s']:.1f}",
                    "x probe (20/s)": f"{row['x_probe']:.2f}",
                    "faults/frame": f"{row['faults_per_frame']:.0f}",
                    "median s": f"{row['seconds']:.2f}",
                }
                for name, row in part["rows"].items()
            ]
        )
        ratios = part["ratios"]
        lines += [
            "",
            f"{part['size']} px, {part['frames']} frames (MP4, decoded as a stream), "
            f"batch {document['settings']['batch']}",
            frame.to_string(index=False),
            f"triage / one frame at a time: {ratios['triage_over_single']:.2f} x (goal {GOAL_RATIO:g} x); with the "
            f"top frames' Grad-CAM {ratios['triage_maps_over_single']:.2f} x; decoding is "
            f"{ratios['decode_share_of_triage']:.0%} of the triage's time; batched vs single probabilities differ by "
            f"at most {part['batched_vs_single_max_abs_diff']:.1e} over all {part['frames']} frames",
        ]
        if part["size"] == 256:
            fps = part["rows"]["triage"]["frames_per_s"]
            lines.append(f"end to end at 256 px: {fps:.1f} frames/s (goal {GOAL_FPS_256:g})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every size, print the tables, write the JSON."""
    settings = parse_args(argv)
    device, began, about = start(settings.threads, settings.device)
    torch.manual_seed(0)
    model = create_model(ARCHITECTURE, in_chans=1)
    parts = []
    for size in settings.sizes:
        print(f"{size} px ...", flush=True)
        parts.append(measure_size(model, size, settings, device))
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "sizes": parts,
        "seconds": time.perf_counter() - began,
    }
    print(report(document))
    print(f"Total {document['seconds']:.0f} s.")
    write_results(settings.out, "clips", device, settings.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
