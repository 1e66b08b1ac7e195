"""Training and inference throughput of each weakly supervised model against ResNet-18: ``python -m bench.models``.

Every registered seed model at the input its paper uses, with random weights (speed does not depend on them), on
random inputs of that size and channel count:

- ``mlcam_lici`` (seed 000, CLE frames): 128 px, 1 channel, width 32; its own map is the final diagnostic feature
  map (``model.fdfm``, eq. 5).
- ``celnet`` (seed 001): 128 px, 1 channel, width 16 (the repository's CLE studies; the paper's PCam patches are
  96 px); its own map is CELM (two-layer Grad-CAM fused with guided backpropagation).
- ``compsegnet`` (seed 004, spectral spots): 64 px, 450 channels, base 16, depth 3; its own map is the U-Net's
  activation map (``model.segment``).
- ``efficientnet_b2`` (seed 002, RCM patch classifier): 256 px patches, 1 channel; map: CAM.
- ``resnet18``, the standard backbone the seeds compare against: 128 px, 1 channel; maps: CAM and Grad-CAM. It is
  also measured at every other (size, channels) a model uses (64 px x 450 and 256 px x 1), so that each model has
  a ResNet-18 reference measured side by side in the same run: ``x_resnet18`` is the model's images/s over
  ResNet-18's for the same step and batch (maps: over ResNet-18 + Grad-CAM).

Steps, each timed after warm-up calls, all calls of one (device, size, channels) group in rotation (one call of
each per round, :func:`bench.diagnosis.rotate`) so that a change in machine load hits the model and its reference
alike:

- ``train``: forward, the model's own ``loss`` (BCE on the logit for models without one), backward and one step of
  its recipe's optimizer (:func:`core.train.recipe_for`), in train mode, as :func:`core.train.fit` runs it;
- ``infer``: logits under ``torch.inference_mode`` in eval mode, as :func:`core.train.predict_logits`;
- ``map``: the model's own map in eval mode, brought to the host (Grad-CAM and CELM need autograd, so no
  inference mode there); the heatmap methods are entered per call, as :class:`core.predict.Predictor` does.

On CUDA the weights and inputs are channels_last and training and inference run under bfloat16 autocast, as
``fit`` and ``predict_logits`` do; maps are computed in float32, as the dashboard serves them. On the CPU
everything is float32 in the default (contiguous) format. The CLE models (and ResNet-18, the CLE studies'
baseline) are also mapped one frame at a time: the per-frame latency and whether it keeps up with the 20 frames/s
a confocal laser endomicroscope acquires (``realtime_20fps``). The markdown table is printed and the rows, with the
machine, go to ``bench/results/models.json`` (``models-quick.json`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.diagnosis import machine, rotate, usable_cores
from core.heatmaps import get_method
from core.models import create_model, get_spec
from core.train import TrainConfig, recipe_for

__all__ = [
    "BASELINE",
    "BASELINE_MAP",
    "CASES",
    "CLE_FPS",
    "Case",
    "Row",
    "Settings",
    "cases_for",
    "main",
    "measure_group",
    "parse_args",
]

BASELINE = "resnet18"  # the standard backbone every seed compares against
BASELINE_MAP = "gradcam"  # maps are compared with ResNet-18 + Grad-CAM, the seeds' standard-backbone map
CLE_FPS = 20.0  # frames per second a confocal laser endomicroscope acquires
OWN_MAPS = ("fdfm", "segment")  # maps the model computes itself (no heatmap method, no autograd)
RESULTS = Path(__file__).resolve().parent / "results"
QUICK_SIZE = 32
QUICK_SPECTRAL_CHANNELS = 8
_LR = 1e-3


@dataclass(frozen=True)
class Case:
    """One architecture as its paper uses it: input size and channels, builder options, the maps it is read with,
    and whether it reads CLE frames live (then its maps are also timed one frame at a time)."""

    architecture: str
    source: str
    in_chans: int
    size: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    maps: tuple[str, ...] = ()
    cle: bool = False
    role: str = "model"  # "model", or "baseline": ResNet-18 measured only as the reference of other models


CASES: tuple[Case, ...] = (
    Case("mlcam_lici", "seed 000, CLE frames", 1, 128, {"width": 32}, ("fdfm",), cle=True),
    Case("celnet", "seed 001, CLE frames (PCam patches: 96 px)", 1, 128, {"width": 16}, ("celm",), cle=True),
    Case("compsegnet", "seed 004, spectral spots", 450, 64, {"base": 16, "depth": 3}, ("segment",)),
    Case("efficientnet_b2", "seed 002, RCM patches", 1, 256, {}, ("cam",)),
    Case(BASELINE, "standard backbone, CLE studies' baseline", 1, 128, {}, ("cam", BASELINE_MAP), cle=True),
)


@dataclass(frozen=True)
class Settings:
    """What one run measures: devices, batches per step, warm-up and timed calls, CPU threads, the JSON path."""

    devices: tuple[str, ...]
    train_batch: int
    infer_batch: int
    map_batch: int
    warmup: int
    repeats: int
    threads: int
    out: Path
    quick: bool


@dataclass(frozen=True)
class Row:
    """One step of one model on one device; ``median_ms`` and ``p90_ms`` are per call (per batch)."""

    device: str
    architecture: str
    role: str
    source: str
    size: int
    in_chans: int
    kwargs: dict[str, Any]
    parameters: int
    parameters_m: float
    recipe: str
    optimizer: str
    step: str  # "train", "infer" or "map"
    method: str | None  # the map: "fdfm", "segment" or a heatmap method; None for train and infer
    batch: int
    repeats: int
    precision: str  # "float32" or "bfloat16 autocast"
    memory_format: str  # of weights and inputs: "contiguous" or "channels_last"
    median_ms: float
    p90_ms: float
    ms_per_image: float
    images_per_s: float
    baseline_images_per_s: float  # ResNet-18's images/s for the same step and batch at this size and channels
    x_resnet18: float  # images_per_s / baseline_images_per_s
    realtime_20fps: bool | None  # maps of CLE models at batch 1: images_per_s >= CLE_FPS; None elsewhere


@dataclass(frozen=True)
class _Timed:
    """What one timed call is: the case, its parameter count, recipe and optimizer, the step, map and batch."""

    case: Case
    parameters: int
    recipe: str
    optimizer: str
    step: str
    method: str | None
    batch: int


def _available_devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`; ``--quick`` overrides batches and calls with tiny values."""
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cpu", "cuda", "all"], default="all", help="all: the CPU and CUDA when present (all)"
    )
    parser.add_argument("--train-batch", type=int, default=16, help="images per training step (16)")
    parser.add_argument("--infer-batch", type=int, default=32, help="images per inference call (32)")
    parser.add_argument("--map-batch", type=int, default=16, help="images per map call (16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each step first (2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each step, in rotation (5)")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch CPU threads (the usable CPU cores)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (bench/results/models[-quick].json)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke-test settings: {QUICK_SIZE} px, {QUICK_SPECTRAL_CHANNELS} spectral channels, batch 2, 1 warm-up "
        "and 2 timed calls",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if min(args.train_batch, args.infer_batch, args.map_batch, args.repeats, args.threads) < 1 or args.warmup < 0:
        parser.error("batches, repeats and threads must be positive, warm-up calls not negative")
    if args.train_batch < 2:
        parser.error("--train-batch must be at least 2: batch norm cannot train on a single image")
    devices = _available_devices() if args.device == "all" else (args.device,)
    out = args.out or RESULTS / f"models{'-quick' if args.quick else ''}.json"
    if args.quick:
        return Settings(devices, 2, 2, 2, 1, 2, args.threads, out, True)
    return Settings(
        devices,
        args.train_batch,
        args.infer_batch,
        args.map_batch,
        args.warmup,
        args.repeats,
        args.threads,
        out,
        False,
    )


def cases_for(quick: bool) -> list[Case]:
    """:data:`CASES` and a ResNet-18 reference for every other (size, channels) they use, in groups of equal input.

    Quick runs shrink every input to ``QUICK_SIZE`` px and the spectral spots to ``QUICK_SPECTRAL_CHANNELS``."""
    cases = list(CASES)
    if quick:
        cases = [
            replace(case, size=QUICK_SIZE, in_chans=QUICK_SPECTRAL_CHANNELS if case.in_chans > 1 else case.in_chans)
            for case in cases
        ]
    for size, in_chans in dict.fromkeys((case.size, case.in_chans) for case in cases):
        group = [case for case in cases if (case.size, case.in_chans) == (size, in_chans)]
        if not any(case.architecture == BASELINE for case in group):
            cle = any(case.cle for case in group)
            cases.append(Case(BASELINE, "reference", in_chans, size, {}, (BASELINE_MAP,), cle=cle, role="baseline"))
    groups = list(dict.fromkeys((case.size, case.in_chans) for case in cases))
    return sorted(cases, key=lambda case: (groups.index((case.size, case.in_chans)), case.architecture == BASELINE))


def _autocast(device: torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA (as ``fit`` and ``predict_logits``); a disabled context on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's own training loss when it has one (the weakly supervised papers), else BCE on its logit."""
    if callable(getattr(model, "loss", None)):
        return model.loss(x, y).float()
    return F.binary_cross_entropy_with_logits(model(x)[:, 0].float(), y)


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> Callable[[], None]:
    """One optimisation step as ``fit`` takes it: train mode, loss (autocast on CUDA), backward, optimizer step."""

    def run() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = _loss(model, x, y)
        loss.backward()
        optimizer.step()

    return run


def _infer(model: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], torch.Tensor]:
    """Logits of the eval-mode model under ``torch.inference_mode`` (autocast on CUDA), on the host."""

    def run() -> torch.Tensor:
        model.eval()
        with torch.inference_mode(), _autocast(device):
            return model(x).float().cpu()

    return run


def _map(model: nn.Module, architecture: str, method: str, x: torch.Tensor) -> Callable[[], np.ndarray]:
    """The model's own map of ``x`` on the host, in float32: ``fdfm`` and ``segment`` are computed by the model
    under inference mode; heatmap methods are entered per call on the architecture's layers, as ``Predictor`` does."""
    if method in OWN_MAPS:
        compute = model.fdfm if method == "fdfm" else model.segment

        def own() -> np.ndarray:
            model.eval()
            with torch.inference_mode():
                maps = compute(x)
            return (maps[0] if isinstance(maps, tuple) else maps).float().cpu().numpy()

        return own
    layers = get_spec(architecture).layers(model)

    def explained() -> np.ndarray:
        model.eval()
        with get_method(method)(model, layers) as explainer:
            return explainer(x).maps

    return explained


def _parameters(model: nn.Module) -> int:
    """Every parameter of ``model``, trainable or not (what ``sum(p.numel())`` counts)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _steps(case: Case, settings: Settings) -> list[tuple[str, str | None, int]]:
    """(step, map, batch) measured for ``case``: training, inference, every map, and for CLE models every map at 1."""
    steps: list[tuple[str, str | None, int]] = [
        ("train", None, settings.train_batch),
        ("infer", None, settings.infer_batch),
    ]
    steps += [("map", method, settings.map_batch) for method in case.maps]
    if case.cle:
        steps += [("map", method, 1) for method in case.maps if settings.map_batch != 1]
    return steps


def measure_group(cases: Sequence[Case], settings: Settings, device: torch.device) -> list[Row]:
    """Every step of every case of one (size, channels) group, timed in rotation; the group's ResNet-18 is the
    reference of ``x_resnet18``."""
    size, in_chans = cases[0].size, cases[0].in_chans
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    largest = max(settings.train_batch, settings.infer_batch, settings.map_batch)
    images = torch.randn(largest, in_chans, size, size, generator=generator).to(device)
    inputs: dict[int, torch.Tensor] = {}
    targets = (torch.arange(settings.train_batch) % 2).float().to(device)  # 0/1 labels, both classes
    calls: dict[str, Callable[[], object]] = {}
    timed: dict[str, _Timed] = {}
    for index, case in enumerate(cases):
        torch.manual_seed(0)
        model = create_model(case.architecture, in_chans=case.in_chans, **case.kwargs)
        parameters = _parameters(model)
        model = model.to(device, memory_format=memory_format)
        config = TrainConfig(architecture=case.architecture, lr=_LR, in_chans=case.in_chans)
        recipe = recipe_for(config)
        optimizer = recipe.optimizer(model, config)
        for step, method, batch in _steps(case, settings):
            if batch not in inputs:
                inputs[batch] = images[:batch].contiguous(memory_format=memory_format)
            x = inputs[batch]
            key = f"{index}:{step}:{method}:{batch}"
            if step == "train":
                calls[key] = _train_step(model, optimizer, x, targets[:batch], device)
            elif step == "infer":
                calls[key] = _infer(model, x, device)
            else:
                calls[key] = _map(model, case.architecture, str(method), x)
            timed[key] = _Timed(case, parameters, recipe.name, type(optimizer).__name__, step, method, batch)
    samples = rotate(calls, settings.repeats, settings.warmup, device)
    medians = {key: float(np.median([ms for ms, _ in values])) for key, values in samples.items()}
    images_per_s = {key: timed[key].batch * 1000.0 / median for key, median in medians.items()}
    reference = {
        (call.step, call.batch): images_per_s[key]
        for key, call in timed.items()
        if call.case.architecture == BASELINE and call.method in (None, BASELINE_MAP)
    }
    rows = []
    for key, call in timed.items():
        case, step, method, batch = call.case, call.step, call.method, call.batch
        milliseconds = [ms for ms, _ in samples[key]]
        baseline = reference[(step, batch)]
        rows.append(
            Row(
                device=device.type,
                architecture=case.architecture,
                role=case.role,
                source=case.source,
                size=size,
                in_chans=in_chans,
                kwargs=dict(case.kwargs),
                parameters=call.parameters,
                parameters_m=call.parameters / 1e6,
                recipe=call.recipe,
                optimizer=call.optimizer,
                step=step,
                method=method,
                batch=batch,
                repeats=len(milliseconds),
                precision="bfloat16 autocast" if cuda and step != "map" else "float32",
                memory_format="channels_last" if cuda else "contiguous",
                median_ms=medians[key],
                p90_ms=float(np.percentile(milliseconds, 90)),
                ms_per_image=medians[key] / batch,
                images_per_s=images_per_s[key],
                baseline_images_per_s=baseline,
                x_resnet18=images_per_s[key] / baseline,
                realtime_20fps=images_per_s[key] >= CLE_FPS if case.cle and step == "map" and batch == 1 else None,
            )
        )
    return rows


def _machine(devices: Sequence[str]) -> dict[str, Any]:
    """The CPU model, the CUDA device (None without one), torch and timm versions, threads and load."""
    cpu = machine(torch.device("cpu"))
    return {
        "cpu": cpu["device_name"],
        "cuda": torch.cuda.get_device_name(0) if "cuda" in devices else None,
        "devices": list(devices),
        **{key: value for key, value in cpu.items() if key not in ("device", "device_name")},
    }


def _table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    header = ["device", "model", "input", "params M", "step", "batch", "images/s", "ms/image", "x ResNet-18", "20 fps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        realtime = "" if row.realtime_20fps is None else ("yes" if row.realtime_20fps else "no")
        cells = [
            row.device,
            row.architecture + (" (reference)" if row.role == "baseline" else ""),
            f"{row.size} px x {row.in_chans}",
            f"{row.parameters_m:.2f}",
            row.step if row.method is None else f"map: {row.method}",
            str(row.batch),
            f"{row.images_per_s:,.1f}",
            f"{row.ms_per_image:,.2f}",
            f"{row.x_resnet18:.2f}",
            realtime,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the machine and the markdown table, write the JSON; returns the exit status."""
    settings = parse_args(argv)
    torch.set_num_threads(settings.threads)
    began = time.perf_counter()
    about = _machine(settings.devices)
    print("  ".join(f"{key}: {value}" for key, value in about.items()), flush=True)
    cases = cases_for(settings.quick)
    groups: dict[tuple[int, int], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.size, case.in_chans), []).append(case)
    rows: list[Row] = []
    for name in settings.devices:
        device = torch.device(name)
        for (size, in_chans), group in groups.items():
            print(f"{name}, {size} px x {in_chans}: {', '.join(case.architecture for case in group)} ...", flush=True)
            rows += measure_group(group, settings, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    seconds = time.perf_counter() - began
    print()
    print(_table(rows))
    print(
        f"\nimages/s: batch / median time per call. x ResNet-18: images/s over ResNet-18's for the same step, batch, "
        f"device, size and channels (maps: over ResNet-18 + Grad-CAM). 20 fps: a CLE model's map at batch 1 keeps up "
        f"with the {CLE_FPS:g} frames/s of the endomicroscope."
    )
    print(f"Total {seconds:.0f} s.")
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "baseline": {"architecture": BASELINE, "map": BASELINE_MAP},
        "cle_fps": CLE_FPS,
        "seconds": seconds,
        "rows": [asdict(row) for row in rows],
    }
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(document, indent=2, allow_nan=False))
    print(f"wrote {settings.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
