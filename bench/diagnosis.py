"""How long a diagnosis takes, and where the time goes: ``python -m bench.diagnosis`` (``make bench``).

EfficientNet-B0 with random weights (speed does not depend on the weights, so nothing is downloaded) diagnoses a
16-bit synthetic fluorescence specimen at camera resolution (512 x 640, :mod:`core.data.synth`). For each input
size the benchmark measures, one call after the other in rotation so that every measurement sees the same machine
load:

- ``floor``: a plain timm forward pass on an already prepared tensor under ``torch.inference_mode`` (batch 1), the
  least any diagnosis can cost;
- ``preprocess``: :func:`core.data.preprocess.prepare` alone (FL normalisation, autocontrast, median filter, padding,
  resizing), which the floor leaves out and every diagnosis pays;
- ``diagnose``: :meth:`core.predict.Predictor.diagnose` without heatmap, end to end from the decoded image;
- ``diagnose_gradcam``: the same with the Grad-CAM heatmap;
- ``floor_batch`` and ``diagnose_gradcam_batch``: a batch of ``--batch`` images, plain forward against diagnosis
  with Grad-CAM, for throughput.

Each is warmed up, then repeated; the table gives the median and the 90th percentile in milliseconds, images per
second, ``x floor``: the median time per image divided by the floor's (batch rows by the batch floor's), and the
median minor page faults per call. The same rows go to ``bench/results/diagnosis-<device>.json``. Threads default to
the CPU cores this process may run on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch

from core.data.io import Image, read_image
from core.data.preprocess import prepare, prepare_batch
from core.data.synth import CohortConfig, make_specimen
from core.models import create_model
from core.predict import Predictor

__all__ = [
    "MEASUREMENTS",
    "Row",
    "Settings",
    "machine",
    "main",
    "measure_size",
    "parse_args",
    "reset_peak",
    "rotate",
    "specimen_images",
    "start",
    "status_mb",
    "timed",
    "usable_cores",
    "write_results",
]

ARCHITECTURE = "efficientnet_b0"
MODALITY = "FL"
CAMERA = CohortConfig(height=512, width=640)
RESULTS = Path(__file__).resolve().parent / "results"

MEASUREMENTS: dict[str, str] = {
    "floor": "floor: timm forward",
    "preprocess": "preprocess: prepare()",
    "diagnose": "diagnose, no heatmap",
    "diagnose_gradcam": "diagnose + Grad-CAM",
    "floor_batch": "floor: timm forward",
    "diagnose_gradcam_batch": "diagnose + Grad-CAM",
}
_FLOOR_OF = {
    "floor": "floor",
    "preprocess": "floor",
    "diagnose": "floor",
    "diagnose_gradcam": "floor",
    "floor_batch": "floor_batch",
    "diagnose_gradcam_batch": "floor_batch",
}
_REFERENCE_SIZE = 224
_MIN_REPEATS = 5


@dataclass(frozen=True)
class Settings:
    """What one run measures: input sizes, repeats at 224 px, batch size, device, threads, warm-up runs."""

    sizes: tuple[int, ...]
    repeats: int
    batch: int
    device: str
    threads: int
    warmup: int
    out: Path
    quick: bool

    def latency_repeats(self, size: int) -> int:
        """``repeats`` at 224 px and below, proportionally fewer for larger inputs (at least 5)."""
        scaled = round(self.repeats * _REFERENCE_SIZE / size)
        return min(self.repeats, max(min(self.repeats, _MIN_REPEATS), scaled))

    def batch_repeats(self, size: int) -> int:
        """A quarter of the latency repeats (at least 2): one batch costs about ``batch`` single images."""
        latency = self.latency_repeats(size)
        return min(latency, max(2, latency // 4))


@dataclass(frozen=True)
class Row:
    """One measurement at one input size; ``median_ms`` and ``p90_ms`` are per call (per batch for batch rows)."""

    size: int
    measurement: str
    label: str
    batch: int
    repeats: int
    median_ms: float
    p90_ms: float
    images_per_s: float
    x_floor: float
    page_faults: int  # median minor page faults per call: memory freshly mapped from the kernel


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`; ``--quick`` overrides sizes, repeats and batch with tiny values."""
    parser = argparse.ArgumentParser(prog="python -m bench.diagnosis", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="input sizes in px (224 512)")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed runs per latency measurement at 224 px; fewer above (20)"
    )
    parser.add_argument("--batch", type=int, default=16, help="images per batch for throughput (16)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch CPU threads (the usable CPU cores)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (bench/results)")
    parser.add_argument("--quick", action="store_true", help="smoke-test settings: 64 px, 2 repeats, batch 2")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if min(args.sizes) < 1 or args.repeats < 1 or args.batch < 1 or args.threads < 1:
        parser.error("sizes, repeats, batch and threads must be positive")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    if args.quick:
        return Settings((64,), 2, 2, device, args.threads, 1, args.out, True)
    return Settings(tuple(args.sizes), args.repeats, args.batch, device, args.threads, 2, args.out, False)


def specimen_images(count: int) -> list[Image]:
    """``count`` 16-bit FL specimens at camera resolution, alternately tumor and not, as the upload path reads them."""
    images = []
    for i in range(count):
        tumor = i % 2 == 0
        specimen = make_specimen(
            np.random.default_rng(i),
            tumor,
            "GBM" if tumor else None,
            ">=10" if tumor else None,
            CAMERA,
            specimen_id=f"P000-S{i:03d}",
        )
        images.append(read_image(specimen.fl, "bench.png"))
    return images


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on; ``load_1min`` above ``threads`` means other processes compete for cores."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_cores": usable_cores(),
        "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timed(device: torch.device, call: Callable[[], object]) -> tuple[float, int]:
    """Milliseconds and minor page faults of one call; on CUDA the queue is drained before and after.

    Page faults count the memory the process had to take fresh from the kernel (mapped and zeroed) during the call:
    allocator memory returned to the system after one call and touched again by the next one shows up here.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    began = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - began) * 1000.0
    return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def rotate(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[tuple[float, int]]]:
    """Warm every call up, then time them in rotation (one of each per round), so load drifts hit all alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            samples[name].append(timed(device, call))
    return samples


def _forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The floor: the network alone, no autograd bookkeeping, on a tensor already on the device."""

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def measure_size(
    model: torch.nn.Module, images: Sequence[Image], size: int, settings: Settings, device: torch.device
) -> list[Row]:
    """Every measurement at one input size; ``images[0]`` is the single image, ``images`` the batch."""
    config = {"architecture": ARCHITECTURE, "in_chans": 1, "modality": MODALITY, "image_size": size}
    predictor = Predictor(model, config, threshold=0.5, device=device.type)
    image = images[0]
    single = prepare(image, MODALITY, size)[None].to(device)
    batch = prepare_batch(images, MODALITY, size).to(device)
    latency = rotate(
        {
            "floor": _forward(predictor.model, single),
            "preprocess": lambda: prepare(image, MODALITY, size),
            "diagnose": lambda: predictor.diagnose([image], heatmap=None),
            "diagnose_gradcam": lambda: predictor.diagnose([image], heatmap="gradcam"),
        },
        settings.latency_repeats(size),
        settings.warmup,
        device,
    )
    throughput = rotate(
        {
            "floor_batch": _forward(predictor.model, batch),
            "diagnose_gradcam_batch": lambda: predictor.diagnose(images, heatmap="gradcam", batch_size=len(images)),
        },
        settings.batch_repeats(size),
        1,
        device,
    )
    samples = latency | throughput
    medians = {name: float(np.median([ms for ms, _ in values])) for name, values in samples.items()}
    rows = []
    for name, values in samples.items():
        count = len(images) if name in throughput else 1
        milliseconds, faults = zip(*values, strict=True)
        floor = _FLOOR_OF[name]
        rows.append(
            Row(
                size=size,
                measurement=name,
                label=MEASUREMENTS[name],
                batch=count,
                repeats=len(values),
                median_ms=medians[name],
                p90_ms=float(np.percentile(milliseconds, 90)),
                images_per_s=count * 1000.0 / medians[name],
                x_floor=medians[name] / medians[floor],
                page_faults=int(np.median(faults)),
            )
        )
    return rows


def _table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table for the terminal."""
    frame = pd.DataFrame([asdict(row) for row in rows])
    frame = frame[["size", "label", "batch", "median_ms", "p90_ms", "images_per_s", "x_floor", "page_faults"]]
    frame.columns = ["size", "measurement", "batch", "median ms", "p90 ms", "images/s", "x floor", "page faults"]
    return frame.to_string(
        index=False,
        justify="left",
        formatters={
            "median ms": "{:,.1f}".format,
            "p90 ms": "{:,.1f}".format,
            "images/s": "{:,.2f}".format,
            "x floor": "{:.2f}".format,
            "page faults": "{:,}".format,
        },
    )


def start(threads: int, device: str) -> tuple[torch.device, float, dict[str, Any]]:
    """Set the torch threads, print the machine header; the device, the start time and the machine facts."""
    torch.set_num_threads(threads)
    chosen = torch.device(device)
    began = time.perf_counter()
    about = machine(chosen)
    print("  ".join(f"{key}: {value}" for key, value in about.items()), flush=True)
    return chosen, began, about


def status_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MB; None elsewhere."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0
    return None


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (``echo 5 > /proc/self/clear_refs``, Linux 4.0+)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def write_results(out: Path, name: str, device: torch.device, quick: bool, document: dict[str, Any]) -> Path:
    """Write ``<out>/<name>-<device>[-quick].json`` (strict JSON) and say where."""
    path = out / f"{name}-{device.type}{'-quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False))
    print(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the machine and the table, write the JSON; returns the exit status."""
    settings = parse_args(argv)
    device, began, about = start(settings.threads, settings.device)
    torch.manual_seed(0)
    model = create_model(ARCHITECTURE, in_chans=1)
    images = specimen_images(settings.batch)
    rows: list[Row] = []
    for size in settings.sizes:
        print(f"measuring {size} px ...", flush=True)
        rows.extend(measure_size(model, images, size, settings, device))
    seconds = time.perf_counter() - began
    print(_table(rows))
    print("x floor: median time per image / the floor's (batch rows: / the batch floor's).")
    print("page faults: median minor page faults per call (memory taken fresh from the kernel).")
    print(f"Total {seconds:.0f} s.")
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "input": {"architecture": ARCHITECTURE, "modality": MODALITY, "height": CAMERA.height, "width": CAMERA.width},
        "seconds": seconds,
        "rows": [asdict(row) for row in rows],
    }
    write_results(settings.out, "diagnosis", device, settings.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
