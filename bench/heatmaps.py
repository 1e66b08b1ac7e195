"""Heatmap speed against pytorch-grad-cam, and the CLE frame rate: ``python -m bench.heatmaps``.

Two groups of figures from one run, on the CPU here or on the GPU when there is one:

- **Peer comparison.** Our Grad-CAM and Score-CAM (:mod:`core.heatmaps`) against pytorch-grad-cam's, on the same
  EfficientNet-B0, target layer (``spec.target_layer``), inputs and targets: ours on the model as it is
  (contiguous) and on a channels_last copy, at the default Score-CAM batch and others (``--scorecam-batches``);
  seconds per image, images per second, ``x peer`` (our time / pytorch-grad-cam's) and the largest difference
  between our maps and the peer's (``< 1e-4``: equal maps).
- **CLE frame rate.** Single-channel 512 x 512 frames diagnosed through :class:`core.predict.Predictor` with no
  heatmap, CAM and Grad-CAM, one frame at a time (live use) and in batches, against the 20 frames/s a confocal laser
  endomicroscope acquires; with glibc's default allocator thresholds and with those :func:`core.runtime.tune_allocator`
  sets, each in fresh processes (the thresholds cannot be undone within one), with page faults and resident memory.

Random weights (speed does not depend on them), with the BatchNorm statistics re-estimated on synthetic FL
specimens and the one-logit head rescaled, so that activations and logits have a trained network's spread and map
differences cannot hide behind logits of 1e-5. Calls of one group are timed in rotation, as in
:mod:`bench.diagnosis`, so that a change in machine load hits all of them alike. The tables are printed and written
to ``bench/results/heatmaps-<device>.json``.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
from scipy.ndimage import gaussian_filter
from torch import nn

from bench.diagnosis import reset_peak, rotate, specimen_images, start, status_mb, usable_cores, write_results
from core.data.io import Image, read_image
from core.data.preprocess import prepare_batch
from core.heatmaps import get_method
from core.models import create_model, get_spec
from core.predict import Predictor
from core.runtime import OPT_OUT_ENV, tune_allocator

__all__ = [
    "ALLOCATORS",
    "CLE_FPS",
    "EQUAL_MAPS",
    "PEER",
    "FrameRow",
    "PeerRow",
    "Settings",
    "calibrate",
    "cle_frames",
    "main",
    "measure_cle",
    "measure_gradcam",
    "measure_scorecam",
    "parse_args",
]

ARCHITECTURE = "efficientnet_b0"
QUICK_SCORECAM_ARCHITECTURE = "tiny_cnn"
RESULTS = Path(__file__).resolve().parent / "results"
CLE_FPS = 20.0  # frames per second a confocal laser endomicroscope acquires
EQUAL_MAPS = 1e-4  # the tolerance of the cross-check in tests/core/test_heatmap_methods.py
PEER = "pytorch-grad-cam"
PEER_SCORECAM_BATCH = 16  # pytorch-grad-cam's ScoreCAM: 16 masked inputs per forward unless given batch_size
_CALIBRATION_IMAGES = 16
_CALIBRATION_BATCH = 8
_LOGIT_STD = 3.0  # logits spread over several units, like a trained classifier's
ALLOCATORS = ("default", "tuned")  # glibc's own thresholds; those of core.runtime.tune_allocator


@dataclass(frozen=True)
class Settings:
    """What one run measures. ``scorecam_batches``: masked inputs per forward of our Score-CAM (None: its default)."""

    size: int
    batch: int
    repeats: int
    scorecam_repeats: int
    scorecam_batches: tuple[int | None, ...]
    scorecam_architecture: str
    cle_sizes: tuple[int, ...]
    cle_batch: int
    cle_rounds: int  # fresh processes per CLE arm and size, the arms alternating
    cle_thread: bool  # also call from a worker thread, as a Streamlit session does
    device: str
    threads: int
    warmup: int
    out: Path
    quick: bool

    @property
    def batch_repeats(self) -> int:
        """Repeats of the CLE batch rows per process: a third of ``repeats`` (at least 3); a batch costs
        ``cle_batch`` frames."""
        return min(self.repeats, max(3, self.repeats // 3))

    @property
    def cle_arms(self) -> tuple[tuple[str, str], ...]:
        """(allocator, thread) of each CLE arm: calls on the main thread, and from a worker one with ``cle_thread``."""
        threads = ("main", "worker") if self.cle_thread else ("main",)
        return tuple((allocator, thread) for thread in threads for allocator in ALLOCATORS)


@dataclass(frozen=True)
class PeerRow:
    """One implementation of one method on the same inputs; ``median_s`` and ``p90_s`` are per call."""

    method: str
    implementation: str  # "ours" or "pytorch-grad-cam"
    memory_format: str  # of the model's weights: "contiguous" or "channels_last"
    scorecam_batch: int | None  # masked inputs per forward pass (Score-CAM); None: our default
    amp: bool
    architecture: str
    size: int
    images: int  # images per call
    repeats: int
    median_s: float
    p90_s: float
    s_per_image: float
    images_per_s: float
    x_peer: float  # median time / pytorch-grad-cam's for the same method: below 1, ours is faster
    max_abs_diff: float  # largest |our map - pytorch-grad-cam's map| over every pixel of every image
    equal_maps: bool  # max_abs_diff < EQUAL_MAPS


@dataclass(frozen=True)
class FrameRow:
    """CLE frames diagnosed through ``Predictor.diagnose``; ``median_ms`` and ``p90_ms`` are per call (per batch),
    over the samples of all the arm's processes; the memory figures are the median over those processes."""

    allocator: str  # "default": glibc's thresholds; "tuned": core.runtime.tune_allocator's
    thread: str  # "main": calls on the process's main thread (CLI, Ray tasks); "worker": on another (Streamlit)
    heatmap: str | None
    memory_format: str
    batch: int
    size: int
    repeats: int
    median_ms: float
    p90_ms: float
    frames_per_s: float
    x_single: float  # frames_per_s / the same arm's, size's and heatmap's one-frame rate: above 1, batching pays
    x_default: float  # frames_per_s / the default allocator's for the same thread, size, heatmap and batch
    x_realtime: float  # frames_per_s / CLE_FPS: 1 or more keeps up with the endomicroscope
    page_faults: int  # median minor page faults per call (see bench/README.md)
    peak_rss_mb: float | None  # the process's resident high-water mark over its timed calls (VmHWM; Linux)
    rss_after_mb: float | None  # resident memory after its last call: what it keeps between calls


def _scorecam_batch(text: str) -> int | None:
    """``default`` (our explainer's own choice) or a positive number of masked inputs per forward pass."""
    if text == "default":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("Score-CAM batch sizes must be positive or 'default'")
    return value


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`; ``--quick`` overrides sizes, repeats and batches with tiny values."""
    parser = argparse.ArgumentParser(prog="python -m bench.heatmaps", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input px of the peer comparison (224)")
    parser.add_argument("--batch", type=int, default=8, help="images per Grad-CAM call in the peer comparison (8)")
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed rounds of Grad-CAM and of one-frame CLE diagnoses (10)"
    )
    parser.add_argument(
        "--scorecam-repeats", type=int, default=3, help="timed rounds of Score-CAM, one image per call (3)"
    )
    parser.add_argument(
        "--scorecam-batches",
        type=_scorecam_batch,
        nargs="+",
        default=None,
        help="our Score-CAM's masked inputs per forward: 'default' and numbers (default 64 on CPU, default 256 on GPU)",
    )
    parser.add_argument("--cle-size", type=int, nargs="+", default=[512], help="CLE frame px, one or more (512)")
    parser.add_argument("--cle-batch", type=int, default=8, help="CLE frames per batch for throughput (8)")
    parser.add_argument(
        "--cle-rounds", type=int, default=2, help="fresh processes per CLE allocator arm and size, alternating (2)"
    )
    parser.add_argument(
        "--cle-thread", action="store_true", help="also time the CLE calls from a worker thread (a Streamlit session)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch CPU threads (the usable CPU cores)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (bench/results)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke-test settings: 64 px, 2 repeats, batch 2, Score-CAM on tiny_cnn"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    counts = (
        args.size,
        args.batch,
        args.repeats,
        args.scorecam_repeats,
        *args.cle_size,
        args.cle_batch,
        args.cle_rounds,
        args.threads,
    )
    if min(counts) < 1:
        parser.error("sizes, batches, repeats and threads must be positive")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    batches = tuple(args.scorecam_batches or (None, 256 if device == "cuda" else 64))
    if args.quick:
        return Settings(
            64,
            2,
            2,
            2,
            (None, 64),
            QUICK_SCORECAM_ARCHITECTURE,
            (64,),
            2,
            1,
            args.cle_thread,
            device,
            args.threads,
            1,
            args.out,
            True,
        )
    return Settings(
        args.size,
        args.batch,
        args.repeats,
        args.scorecam_repeats,
        batches,
        ARCHITECTURE,
        tuple(args.cle_size),
        args.cle_batch,
        args.cle_rounds,
        args.cle_thread,
        device,
        args.threads,
        2,
        args.out,
        False,
    )


def calibrate(model: nn.Module, x: torch.Tensor, batch: int = _CALIBRATION_BATCH) -> dict[str, list[float]]:
    """Give a randomly initialised classifier a trained network's activations and logits; returns the logits.

    BatchNorm running statistics are re-estimated from ``x`` (train-mode forward passes under ``no_grad``,
    cumulative averages), since random-init statistics (mean 0, variance 1) leave EfficientNet-B0's logits near
    1e-5. Then the one-logit head is rescaled and shifted so that the logits of ``x`` have mean 0 and standard
    deviation ``_LOGIT_STD``: Score-CAM's softmax over masked-input scores that differ by hundredths would give
    every map nearly the channel mean and hide disagreements between implementations. The model is left in eval.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    with torch.no_grad():
        before = model.eval()(x)[:, 0]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over all calibration batches
        model.train()
        for chunk in x.split(batch):
            model(chunk)
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        recalibrated = model.eval()(x)[:, 0]
        classifier = model.get_classifier()
        scale = _LOGIT_STD / float(recalibrated.std().clamp_min(1e-12))
        classifier.weight.mul_(scale)
        classifier.bias.sub_(recalibrated.mean()).mul_(scale)
        after = model(x)[:, 0]
    return {
        name: [round(float(v), 6) for v in logits]
        for name, logits in (
            ("random_init", before),
            ("batchnorm_recalibrated", recalibrated),
            ("head_rescaled", after),
        )
    }


def _ours(
    name: str, model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int], **options: Any
) -> np.ndarray:
    """Our maps, with the explainer entered per call as :class:`core.predict.Predictor` does."""
    with get_method(name)(model, layer, **options) as explainer:
        return explainer(x, targets).maps


def _peer(cam_class: type, model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """pytorch-grad-cam's maps; its Score-CAM progress bars (tqdm, on stderr) go to the null device."""
    with open(os.devnull, "w") as sink, redirect_stderr(sink), cam_class(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(t) for t in targets])


def _keeping(maps: dict[str, np.ndarray], key: str, call: Callable[[], np.ndarray]) -> Callable[[], None]:
    """``call`` that keeps its latest maps under ``key``, to be compared once the timing is over."""

    def run() -> None:
        maps[key] = call()

    return run


def _channels_last(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with channels_last weights (``model.to(memory_format=torch.channels_last)``)."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _peer_rows(
    method: str,
    variants: dict[str, dict[str, Any]],
    samples: dict[str, list[tuple[float, int]]],
    maps: dict[str, np.ndarray],
    architecture: str,
    x: torch.Tensor,
) -> list[PeerRow]:
    """Rows of one method; the variant keyed ``PEER`` is the reference of ``x peer`` and of the map difference."""
    medians = {key: float(np.median([ms for ms, _ in values])) / 1000.0 for key, values in samples.items()}
    images, size = int(x.shape[0]), int(x.shape[-1])
    rows = []
    for key, about in variants.items():
        seconds = [ms / 1000.0 for ms, _ in samples[key]]
        difference = float(np.abs(maps[key] - maps[PEER]).max())
        rows.append(
            PeerRow(
                method=method,
                implementation="pytorch-grad-cam" if key == PEER else "ours",
                memory_format=about["memory_format"],
                scorecam_batch=about.get("scorecam_batch"),
                amp=about.get("amp", False),
                architecture=architecture,
                size=size,
                images=images,
                repeats=len(seconds),
                median_s=medians[key],
                p90_s=float(np.percentile(seconds, 90)),
                s_per_image=medians[key] / images,
                images_per_s=images / medians[key],
                x_peer=medians[key] / medians[PEER],
                max_abs_diff=difference,
                equal_maps=difference < EQUAL_MAPS,
            )
        )
    return rows


def measure_gradcam(
    model: nn.Module, x: torch.Tensor, targets: list[int], settings: Settings, device: torch.device
) -> list[PeerRow]:
    """Our Grad-CAM (contiguous and channels_last model) against pytorch-grad-cam's, on a batch of images."""
    spec = get_spec(ARCHITECTURE)
    fast = _channels_last(model)
    variants: dict[str, dict[str, Any]] = {
        "contiguous": {"memory_format": "contiguous"},
        "channels_last": {"memory_format": "channels_last"},
        PEER: {"memory_format": "contiguous"},
    }
    maps: dict[str, np.ndarray] = {}
    calls = {
        "contiguous": _keeping(
            maps, "contiguous", lambda: _ours("gradcam", model, spec.target_layer(model), x, targets)
        ),
        "channels_last": _keeping(
            maps, "channels_last", lambda: _ours("gradcam", fast, spec.target_layer(fast), x, targets)
        ),
        PEER: _keeping(maps, PEER, lambda: _peer(pgc.GradCAM, model, spec.target_layer(model), x, targets)),
    }
    samples = rotate(calls, settings.repeats, settings.warmup, device)
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's backward leaves .grad on the parameters
    return _peer_rows("gradcam", variants, samples, maps, ARCHITECTURE, x)


def _warm_masked_passes(models: Sequence[nn.Module], x: torch.Tensor, batches: Sequence[int]) -> None:
    """One forward pass of every masked-batch shape in every model: a Score-CAM call is 1,280 such passes for
    EfficientNet-B0, so one call as warm-up would cost a whole round while its first pass already warms the rest."""
    with torch.inference_mode():
        for model in models:
            for batch in batches:
                model(x[:1].expand(batch, *x.shape[1:]).contiguous())


def measure_scorecam(
    model: nn.Module, x: torch.Tensor, targets: list[int], settings: Settings, device: torch.device
) -> list[PeerRow]:
    """Our Score-CAM against pytorch-grad-cam's on ``x``: contiguous weights at the first of ``scorecam_batches``,
    channels_last weights at each of them (and with bfloat16 autocast on CUDA). The sweep runs on the faster
    format only: on the CPU one call of EfficientNet-B0 takes 10-30 s, and the default run should end in minutes."""
    architecture = settings.scorecam_architecture
    spec = get_spec(architecture)
    by_format = {"contiguous": model, "channels_last": _channels_last(model)}
    variants: dict[str, dict[str, Any]] = {}
    maps: dict[str, np.ndarray] = {}
    calls: dict[str, Callable[[], None]] = {}
    swept = [(batch, False) for batch in settings.scorecam_batches] + ([(None, True)] if device.type == "cuda" else [])
    options = {"contiguous": swept[:1], "channels_last": swept}
    for memory_format, net in by_format.items():
        for batch, amp in options[memory_format]:
            key = f"{memory_format}/{batch or 'default'}{'/amp' if amp else ''}"
            variants[key] = {"memory_format": memory_format, "scorecam_batch": batch, "amp": amp}
            layer = spec.target_layer(net)
            calls[key] = _keeping(
                maps,
                key,
                lambda net=net, layer=layer, batch=batch, amp=amp: _ours(
                    "scorecam", net, layer, x, targets, batch_size=batch, amp=amp
                ),
            )
    variants[PEER] = {"memory_format": "contiguous", "scorecam_batch": PEER_SCORECAM_BATCH}
    calls[PEER] = _keeping(maps, PEER, lambda: _peer(pgc.ScoreCAM, model, spec.target_layer(model), x, targets))
    default = 64 if device.type == "cuda" else 16  # the explainer's own choice (core/heatmaps/scorecam.py)
    shapes = sorted({batch or default for batch in settings.scorecam_batches} | {default, PEER_SCORECAM_BATCH})
    _warm_masked_passes(list(by_format.values()), x, shapes)
    samples = rotate(calls, settings.scorecam_repeats, 0, device)
    return _peer_rows("scorecam", variants, samples, maps, architecture, x)


def cle_frames(count: int, size: int) -> list[Image]:
    """``count`` 8-bit single-channel ``size`` x ``size`` frames of synthetic tissue texture, as the upload path
    reads them: cell-sized blobs and coarser structure under speckle. Content does not change the speed."""
    frames = []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        cells = gaussian_filter(rng.random((size, size), dtype=np.float32), sigma=2.0)
        tissue = gaussian_filter(rng.random((size, size), dtype=np.float32), sigma=12.0)
        texture = 4.0 * (cells - cells.mean()) / cells.std() + 2.0 * (tissue - tissue.mean()) / tissue.std()
        texture += rng.normal(0.0, 1.0, size=(size, size)).astype(np.float32)
        pixels = np.clip(128.0 + 16.0 * texture, 0, 255).astype(np.uint8)
        frames.append(read_image(pixels, f"cle-{i:03d}.npy"))
    return frames


def _weights_format(model: nn.Module) -> str:
    """``channels_last`` or ``contiguous``: the strides of the first convolution weight whose two layouts differ.

    ``is_contiguous(memory_format=...)`` cannot tell them apart on EfficientNet-B0, whose convolutions are all 1 x 1,
    depthwise or single-channel: such weights count as contiguous in both formats, yet their strides, which decide
    the layout the convolutions compute in, differ.
    """
    for parameter in model.parameters():
        if parameter.ndim != 4:
            continue
        _, channels, height, width = parameter.shape
        contiguous = (channels * height * width, height * width, width, 1)
        channels_last = (height * width * channels, 1, width * channels, channels)
        if contiguous != channels_last:
            return "channels_last" if parameter.stride() == channels_last else "contiguous"
    return "contiguous"


def _cle_process(settings: Settings, size: int, allocator: str, thread: str) -> dict[str, Any]:
    """One CLE arm at one size, in a fresh (spawned) process: the allocator decided first, as in any process that
    builds a :class:`core.predict.Predictor`, then EfficientNet-B0 calibrated on the frames, then the calls with no
    heatmap, CAM and Grad-CAM, one frame at a time and in batches of ``cle_batch``, each group in rotation, made on
    this process's main thread or from a worker thread. Returns the samples, the weights' memory format and the
    resident memory: before the calls, its high-water mark over them and after them."""
    if allocator == "default":
        os.environ[OPT_OUT_ENV] = "0"
    else:
        os.environ.pop(OPT_OUT_ENV, None)
    tuned = tune_allocator()
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    torch.manual_seed(0)
    frames = cle_frames(settings.cle_batch, size)
    model = create_model(ARCHITECTURE, in_chans=1).to(device)
    calibrate(model, prepare_batch(frames, "CLE", size).to(device))  # CLE statistics: logits of a few units
    config = {"architecture": ARCHITECTURE, "in_chans": 1, "modality": "CLE", "image_size": size}
    predictor = Predictor(model, config, threshold=0.5, device=device.type)
    heatmaps: tuple[str | None, ...] = (None, "cam", "gradcam")
    live = {str(h): lambda h=h: predictor.diagnose(frames[:1], heatmap=h) for h in heatmaps}
    batched = {str(h): lambda h=h: predictor.diagnose(frames, heatmap=h, batch_size=len(frames)) for h in heatmaps}
    with ThreadPoolExecutor(1, thread_name_prefix="cle") as worker:
        if thread == "worker":
            live, batched = (
                {key: lambda call=call: worker.submit(call).result() for key, call in calls.items()}
                for calls in (live, batched)
            )
        before = status_mb("VmRSS")
        reset = reset_peak()
        samples = {
            1: rotate(live, settings.repeats, settings.warmup, device),
            len(frames): rotate(batched, settings.batch_repeats, 1, device),
        }
    after = status_mb("VmRSS")
    # the kernel folds its per-thread RSS counters into VmHWM lazily, so a fresh VmRSS can read a little above it
    peak = status_mb("VmHWM") if reset else None
    return {
        "tuned": tuned,
        "memory_format": _weights_format(predictor.model),
        "samples": samples,
        "rss_before_mb": before,
        "peak_rss_mb": None if peak is None else max(peak, after or 0.0),
        "rss_after_mb": after,
    }


def _median(values: Sequence[float | None]) -> float | None:
    """The median of the values that were measured; None when none was."""
    known = [value for value in values if value is not None]
    return float(np.median(known)) if known else None


def measure_cle(settings: Settings) -> tuple[list[FrameRow], list[dict[str, Any]]]:
    """CLE frames through ``Predictor.diagnose`` for each size and arm (:func:`_cle_process`), each arm in
    ``cle_rounds`` fresh processes per size with the arms' order reversed every round, so that a change in machine
    load hits them alike; the samples of an arm's processes are pooled. glibc's thresholds cannot be reset within a
    process, hence a process per arm. The predictor chooses the memory format of the weights; rows record it.
    Returns the rows and a record of each process: its arm, whether its allocator was tuned, its resident memory."""
    context = multiprocessing.get_context("spawn")
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    processes: list[dict[str, Any]] = []
    for size in settings.cle_sizes:
        for round_ in range(settings.cle_rounds):
            for allocator, thread in settings.cle_arms[:: 1 if round_ % 2 == 0 else -1]:
                print(f"  {size} px, {allocator} allocator, {thread} thread, round {round_ + 1} ...", flush=True)
                with context.Pool(1) as pool:
                    run = pool.apply(_cle_process, (settings, size, allocator, thread))
                if allocator == "tuned" and not run["tuned"]:
                    print("  tune_allocator() changed nothing here (not glibc, or the environment sets the thresholds)")
                runs.setdefault((allocator, thread, size), []).append(run)
                memory = {key: run[key] for key in ("tuned", "rss_before_mb", "peak_rss_mb", "rss_after_mb")}
                processes.append({"size": size, "allocator": allocator, "thread": thread, "round": round_, **memory})
    figures: dict[tuple[str, str, int, str, int], dict[str, Any]] = {}
    for (allocator, thread, size), arm in runs.items():
        for batch in arm[0]["samples"]:
            for heatmap in arm[0]["samples"][batch]:
                values = [sample for run in arm for sample in run["samples"][batch][heatmap]]
                milliseconds, faults = zip(*values, strict=True)
                median = float(np.median(milliseconds))
                figures[allocator, thread, size, heatmap, batch] = {
                    "memory_format": arm[0]["memory_format"],
                    "repeats": len(values),
                    "median_ms": median,
                    "p90_ms": float(np.percentile(milliseconds, 90)),
                    "frames_per_s": batch * 1000.0 / median,
                    "page_faults": int(np.median(faults)),
                    "peak_rss_mb": _median([run["peak_rss_mb"] for run in arm]),
                    "rss_after_mb": _median([run["rss_after_mb"] for run in arm]),
                }
    rows = []
    for (allocator, thread, size, heatmap, batch), figure in figures.items():
        rate = figure["frames_per_s"]
        rows.append(
            FrameRow(
                allocator=allocator,
                thread=thread,
                heatmap=None if heatmap == "None" else heatmap,
                batch=batch,
                size=size,
                x_single=rate / figures[allocator, thread, size, heatmap, 1]["frames_per_s"],
                x_default=rate / figures["default", thread, size, heatmap, batch]["frames_per_s"],
                x_realtime=rate / CLE_FPS,
                **figure,
            )
        )
    rows.sort(key=lambda row: (row.size, row.thread != "main", row.heatmap or "", row.allocator, row.batch))
    return rows, processes


def _render(columns: dict[str, list[Any]], formats: dict[str, str]) -> str:
    """Columns (heading -> values) as a fixed-width table: text left-aligned, numbers by ``formats``."""
    formatters: dict[str, Callable[[Any], str]] = {heading: form.format for heading, form in formats.items()}
    for heading, values in columns.items():
        if values and isinstance(values[0], str):
            width = max(len(heading), *(len(value) for value in values))
            formatters[heading] = lambda value, width=width: f"{value:<{width}}"
    return pd.DataFrame(columns).to_string(index=False, justify="left", formatters=formatters)


def _peer_table(rows: Sequence[PeerRow]) -> str:
    """The peer comparison for the terminal."""
    return _render(
        {
            "method": [row.method for row in rows],
            "implementation": [
                row.implementation
                + (f", batch {row.scorecam_batch or 'default'}" if row.method == "scorecam" else "")
                + (", bf16" if row.amp else "")
                for row in rows
            ],
            "weights": [row.memory_format for row in rows],
            "images": [row.images for row in rows],
            "median s": [row.median_s for row in rows],
            "p90 s": [row.p90_s for row in rows],
            "s/image": [row.s_per_image for row in rows],
            "images/s": [row.images_per_s for row in rows],
            "x peer": [row.x_peer for row in rows],
            "max |diff|": [row.max_abs_diff for row in rows],
            "equal maps": ["yes" if row.equal_maps else "NO" for row in rows],
        },
        {
            "median s": "{:.3f}",
            "p90 s": "{:.3f}",
            "s/image": "{:.4f}",
            "images/s": "{:.2f}",
            "x peer": "{:.2f}",
            "max |diff|": "{:.1e}",
        },
    )


def _megabytes(value: float | None) -> str:
    """A memory figure for the table; ``n/a`` where the platform gave none."""
    return "n/a" if value is None else f"{value:,.0f}"


def _frame_table(rows: Sequence[FrameRow]) -> str:
    """The CLE frame rates for the terminal."""
    realtime = f"x {CLE_FPS:g} fps"
    return _render(
        {
            "px": [row.size for row in rows],
            "thread": [row.thread for row in rows],
            "heatmap": [row.heatmap or "none" for row in rows],
            "allocator": [row.allocator for row in rows],
            "batch": [row.batch for row in rows],
            "median ms": [row.median_ms for row in rows],
            "frames/s": [row.frames_per_s for row in rows],
            "x single": [row.x_single for row in rows],
            "x default": [row.x_default for row in rows],
            realtime: [row.x_realtime for row in rows],
            "page faults": [row.page_faults for row in rows],
            "peak MB": [_megabytes(row.peak_rss_mb) for row in rows],
            "RSS after MB": [_megabytes(row.rss_after_mb) for row in rows],
        },
        {
            "median ms": "{:,.1f}",
            "frames/s": "{:.2f}",
            "x single": "{:.2f}",
            "x default": "{:.2f}",
            realtime: "{:.2f}",
            "page faults": "{:,}",
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the machine and the tables, write the JSON; returns the exit status."""
    settings = parse_args(argv)
    tuned = tune_allocator()  # the peer comparison runs as the app's processes do; the CLE arms decide their own
    device, began, about = start(settings.threads, settings.device)
    torch.manual_seed(0)
    images = specimen_images(max(settings.batch, 4 if settings.quick else _CALIBRATION_IMAGES))
    x = prepare_batch(images, "FL", settings.size).to(device)
    targets = [1 - i % 2 for i in range(settings.batch)]  # 1, 0, 1, ...: both signs of the one logit
    model = create_model(ARCHITECTURE, in_chans=1).to(device)
    calibration = {ARCHITECTURE: calibrate(model, x)}
    scorecam_model = model
    if settings.scorecam_architecture != ARCHITECTURE:
        scorecam_model = create_model(settings.scorecam_architecture, in_chans=1).to(device)
        calibration[settings.scorecam_architecture] = calibrate(scorecam_model, x)
    for name, logits in calibration.items():
        print(
            f"{name} logits of {len(x)} FL specimens: "
            + ", ".join(f"{stage} std {np.std(values):.2g}" for stage, values in logits.items()),
            flush=True,
        )
    print(f"Grad-CAM, {settings.batch} images at {settings.size} px ...", flush=True)
    peer = measure_gradcam(model, x[: settings.batch], targets, settings, device)
    print(f"Score-CAM, 1 image at {settings.size} px ({settings.scorecam_architecture}) ...", flush=True)
    peer += measure_scorecam(scorecam_model, x[:1], targets[:1], settings, device)
    sizes = ", ".join(map(str, settings.cle_sizes))
    print(f"CLE frames at {sizes} px, each allocator arm in fresh processes ...", flush=True)
    cle, processes = measure_cle(settings)
    seconds = time.perf_counter() - began
    print(f"\nOurs against {PEER} (same model, target layer, inputs and targets):")
    print(_peer_table(peer))
    print(
        f"x peer: median time / {PEER}'s (below 1: ours is faster). weights: memory format of the model's weights. "
        f"equal maps: max |diff| < {EQUAL_MAPS:g}."
    )
    print(
        f"\nCLE frames ({sizes} px square, weights {cle[0].memory_format}) through Predictor.diagnose; the CLE "
        f"acquires {CLE_FPS:g} frames/s:"
    )
    print(_frame_table(cle))
    print(
        "x single: frames/s / the same allocator's one frame per call (above 1: batching pays). x default: frames/s / "
        "glibc's default thresholds' (above 1: tuning pays). page faults: median per call. peak MB: resident "
        "high-water mark over the timed calls; RSS after MB: resident after them (medians over the arm's processes)."
    )
    print(f"Total {seconds:.0f} s.")
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "input": {
            "architecture": ARCHITECTURE,
            "modality": "FL",
            "cle_modality": "CLE",
            "targets": targets,
            "cle_fps": CLE_FPS,
            "equal_maps_tolerance": EQUAL_MAPS,
        },
        "calibration_logits": calibration,
        "allocator_tuned": tuned,  # this process's, for the peer comparison
        "seconds": seconds,
        "peer": [asdict(row) for row in peer],
        "cle": [asdict(row) for row in cle],
        "cle_processes": processes,
    }
    write_results(settings.out, "heatmaps", device, settings.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
