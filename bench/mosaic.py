"""Whole-mosaic heatmaps, fast against per-window: ``python -m bench.mosaic``.

Questions about :func:`core.heatmaps.mosaic.stitch_mosaic` (seed paper 002, D'Alonzo et al.: sliding windows of
256 px over RCM mosaics up to 12,000 x 12,000 px, CAMs stitched with Gaussian weights), side by side in one run:

- ``speed``: a 2048 x 2048 synthetic RCM mosaic (:mod:`core.data.synth_rcm`), window 256, step 25 (5,184 windows),
  sigma 5, EfficientNet-B2 (``in_chans=1``, random weights with batch-norm statistics set from mosaic windows, so
  activations have realistic magnitudes). Fast mode runs on the whole mosaic three ways: ``fast`` (the default,
  stages up to stride ``--share`` shared, the rest per window), ``fast, whole trunk`` (``share=None``: one trunk
  pass and the closed form) and the same with ``phases=2`` (four passes). ``exact`` (batched, ``--batch-size``) and
  ``loop`` (batch 1) run on a random block of about ``--sample`` windows (a crop holding exactly those windows of
  the full grid) and are extrapolated to all windows by their time per window, marked ``extrapolated``; ``--full``
  runs them on the whole mosaic. The block is also explained by both fast variants, to report how far their maps
  are from exact for B2 (random weights: a statement about the approximation, not about localisation), and the
  whole mosaic once more as a single tile, to report the tile seams.
- ``accuracy``: what the fast mode costs in localisation. tiny_cnn (stride 8) is trained for a few seconds on
  128 px patches of one synthetic mosaic (label = the centre pixel's), and both modes, computed in full, are scored
  on another 1024 x 1024 mosaic with its mask: pixel ROC AUC over labeled pixels, and the largest and mean absolute
  difference between the maps, for steps 25, 32 (a multiple of the stride) and 50, with and without the Gaussian,
  and with 1, 2 and 4 trunk passes per axis (``phases``, sigma 5 only). tiny_cnn's stride is below the default
  share, so its fast mode is the closed form.
- ``b2`` (``--b2``, minutes on a CPU): the same for EfficientNet-B2 trained for four epochs on 128 px patches of
  two mosaics, scored on a 768 x 768 mosaic with window 128 at steps 32 and 25: exact against fast with the whole
  trunk shared and with stages up to stride 16, 8 and 4 shared.
- ``parity`` (``--parity``, about 10 minutes a scheme on 2 CPU cores): can the whole trunk be shared at a trained
  network's accuracy? EfficientNet-B2 is trained on the same 128 px patches of the same mosaics
  (:func:`services.mosaic.fit_patch_classifier`) by each of ``--schemes`` (all three by default): ``plain``
  (today's windows, zero-padded at their border), ``context`` (``--context`` px of mosaic around each window, only
  the window's feature cells pooled) and ``mixed`` (context, but a ``--padded-fraction`` of the training samples,
  0.5, seen as lone zero-padded windows: random padding). Each is
  scored on a held-out 768 x 768 mosaic at steps 32 and 16: ``loop`` (one window at a time, the reference map) and
  fast with the whole trunk shared (``share=None``, phases 1 and, where the step is not a multiple of the stride,
  enough passes for every window's own phase), timed side by side: pixel AUC of both, the gap, and loop / fast.
  Then the peak memory of the whole-trunk path at 12,000 x 12,000 px (window 128, the finest step, phases 1, as
  ``memory`` below).
- ``memory``: the peak resident set size of a fresh process that builds B2, draws the mosaic and runs the fast mode
  (``--share``): 2048 x 2048, and with ``--big`` 12,000 x 12,000 (the 2048 mosaic tiled, then cropped: speed and
  memory do not depend on the texture). ``rss_before`` is the resident set just before stitching (interpreter,
  torch, model, mosaic), ``peak_rss`` the high-water mark during it.

Every figure is from single runs after a warm-up on a small crop; timings are wall time with the CUDA queue drained.
Results go to ``bench/results/mosaic-<device>.json`` (``-quick`` appended for ``--quick``).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from bench.diagnosis import machine, reset_peak, start, status_mb, write_results
from core.data.preprocess import standardize
from core.data.synth_rcm import POSITIVE, UNLABELED, make_rcm_mosaic, sample_patches
from core.heatmaps.mosaic import MosaicResult, WindowGrid, stitch_mosaic
from core.models import create_model
from core.train import TrainConfig, fit
from services.mosaic import fit_patch_classifier

__all__ = ["Settings", "main", "parse_args"]

ARCHITECTURE = "efficientnet_b2"
RESULTS = Path(__file__).resolve().parent / "results"
_ACCURACY_STEPS = (25, 32, 50)
_ACCURACY_SIGMAS = (None, 5.0)
_ACCURACY_PHASES = (1, 2, 4)
_B2_SHARES = (None, 16, 8, 4)
_PARITY_SCHEMES = ("plain", "context", "mixed")
_PARITY_SEEDS = {"train": (1, 3), "val": (4,), "score": 2}
_BIG = 12_000


@dataclass(frozen=True)
class Settings:
    """What one run measures (``--quick`` shrinks every size)."""

    size: int
    window: int
    step: int
    sigma: float
    share: int | None
    sample: int
    full: bool
    big: bool
    big_size: int
    b2: bool
    parity: bool
    parity_size: int
    parity_train_size: int
    parity_window: int
    parity_context: int
    parity_padded_fraction: float
    parity_schemes: tuple[str, ...]
    parity_patches: int
    parity_epochs: int
    parity_steps: tuple[int, ...]
    batch_size: int
    tile: int
    accuracy_size: int
    accuracy_window: int
    accuracy_patches: int
    device: str
    threads: int
    out: Path
    quick: bool


def _share(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _schemes(text: str) -> tuple[str, ...]:
    schemes = tuple(dict.fromkeys(name.strip() for name in text.split(",")))
    unknown = [name for name in schemes if name not in _PARITY_SCHEMES]
    if unknown or not schemes:
        raise argparse.ArgumentTypeError(f"schemes are {', '.join(_PARITY_SCHEMES)}, not {text!r}")
    return tuple(name for name in _PARITY_SCHEMES if name in schemes)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`."""
    cores = machine(torch.device("cpu"))["cpu_cores"]
    parser = argparse.ArgumentParser(prog="python -m bench.mosaic", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="mosaic side for the speed figures in px (2048)")
    parser.add_argument("--step", type=int, default=25, help="window step in px (25)")
    parser.add_argument("--sigma", type=float, default=5.0, help="Gaussian concentration, std = window / sigma (5)")
    parser.add_argument("--share", type=_share, default=16, help="fast mode's shared stride, or none (16)")
    parser.add_argument("--sample", type=int, default=64, help="windows timed in exact and loop mode (64)")
    parser.add_argument("--full", action="store_true", help="run exact and loop on every window (slow on a CPU)")
    parser.add_argument("--big", action="store_true", help=f"also the peak memory at {_BIG} x {_BIG} px (minutes)")
    parser.add_argument("--b2", action="store_true", help="also train EfficientNet-B2 and score it (minutes)")
    parser.add_argument(
        "--parity", action="store_true", help="also train B2 per scheme, loop vs whole trunk (10 min a scheme)"
    )
    parser.add_argument("--context", type=int, default=32, help="--parity: context px around each window (32)")
    parser.add_argument(
        "--padded-fraction", type=float, default=0.5, help="--parity, mixed: lone padded windows' share (0.5)"
    )
    parser.add_argument(
        "--schemes", type=_schemes, default=_PARITY_SCHEMES, help="--parity: which of plain,context,mixed (all)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass, exact and fast (32)")
    parser.add_argument("--tile", type=int, default=1024, help="fast-mode trunk tile in px (1024)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    parser.add_argument("--threads", type=int, default=cores, help="torch CPU threads (the usable CPU cores)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (bench/results)")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: runs in seconds")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if min(args.size, args.step, args.sample, args.batch_size, args.tile, args.threads) < 1 or args.sigma <= 0:
        parser.error("sizes, step, sample, batch size, tile, threads and sigma must be positive")
    if args.context < 1:
        parser.error("--context must be positive (a multiple of B2's stride, 32)")
    if not 0 < args.padded_fraction <= 1:
        parser.error("--padded-fraction must be above 0 and at most 1")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    common = {
        "device": device, "threads": args.threads, "out": args.out, "sigma": args.sigma, "full": args.full,
        "share": args.share, "parity": args.parity, "parity_context": args.context,
        "parity_padded_fraction": args.padded_fraction, "parity_schemes": args.schemes,
    }  # fmt: skip
    if args.quick:
        return Settings(
            size=256, window=64, step=16, sample=4, big=False, big_size=512, b2=False, batch_size=4, tile=128,
            accuracy_size=192, accuracy_window=32, accuracy_patches=128, parity_size=192, parity_train_size=256,
            parity_window=64, parity_patches=16, parity_epochs=1, parity_steps=(32,), quick=True, **common,
        )  # fmt: skip
    return Settings(
        size=args.size, window=256, step=args.step, sample=args.sample, big=args.big, big_size=_BIG, b2=args.b2,
        batch_size=args.batch_size, tile=args.tile, accuracy_size=1024, accuracy_window=128, accuracy_patches=1600,
        parity_size=768, parity_train_size=1024, parity_window=128, parity_patches=512, parity_epochs=4,
        parity_steps=(32, 16), quick=False, **common,
    )  # fmt: skip


def _calibrate(model: nn.Module, image: np.ndarray, window: int, count: int = 32) -> nn.Module:
    """Set batch-norm running statistics from ``count`` random mosaic windows (cumulative averages), then eval.

    Random weights with the initial statistics (mean 0, variance 1) would give activations that grow layer by layer;
    statistics of the data make logits and CAMs behave as in a trained network, which timing does not need but the
    fast-vs-exact differences do."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    rng = np.random.default_rng(0)
    tops = rng.integers(0, image.shape[0] - window + 1, count)
    lefts = rng.integers(0, image.shape[1] - window + 1, count)
    patches = np.stack([image[t : t + window, s : s + window] for t, s in zip(tops, lefts, strict=True)])
    device = next(model.parameters()).device
    model.train()
    with torch.no_grad():
        for batch in _standardised(patches).split(8):
            model(batch.to(device))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def _standardised(patches: np.ndarray) -> torch.Tensor:
    """uint8 patches (N, S, S) as the model's (N, 1, S, S) input."""
    return standardize(torch.from_numpy(patches[:, None].astype(np.float32) / 255.0), "RCM")


def _difference(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """Largest and mean absolute difference and Pearson correlation (None for a constant map) of two maps."""
    gap = np.abs(a.astype(np.float64) - b)
    r = float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.std() > 0 and b.std() > 0 else None
    return {"max_abs": float(gap.max()), "mean_abs": float(gap.mean()), "pearson": r}


def _block(settings: Settings, image: np.ndarray) -> tuple[np.ndarray, int]:
    """A random square block of about ``sample`` windows of the full grid: the crop holding exactly them."""
    grid = WindowGrid(settings.size, settings.size, settings.window, settings.step)
    side = min(max(1, round(math.sqrt(settings.sample))), *grid.shape)
    rng = np.random.default_rng(1)
    row, col = (int(rng.integers(0, n - side + 1)) for n in grid.shape)
    extent = settings.window + settings.step * (side - 1)
    top, left = row * settings.step, col * settings.step
    return image[top : top + extent, left : left + extent], side * side


def _speed(settings: Settings, device: torch.device) -> dict[str, Any]:
    """Fast (three ways) on the whole mosaic against exact and loop on a block (or everything with --full)."""
    image, _ = make_rcm_mosaic(settings.size, settings.size, seed=0)
    torch.manual_seed(0)
    model = _calibrate(create_model(ARCHITECTURE, in_chans=1).to(device), image, settings.window)
    options = {"window": settings.window, "step": settings.step, "sigma": settings.sigma}
    batched = {**options, "batch_size": settings.batch_size, "tile": settings.tile}
    side = math.ceil(math.sqrt(settings.batch_size))
    warm = image[: settings.window + settings.step * side, : settings.window + settings.step * side]
    for mode in ("exact", "loop"):
        stitch_mosaic(model, warm, mode=mode, **batched)
    for share in (settings.share, None):
        stitch_mosaic(model, warm, share=share, **batched)
    windows = WindowGrid(settings.size, settings.size, settings.window, settings.step).count
    fast: dict[str, MosaicResult] = {}
    variants = {
        "fast": {"share": settings.share},
        "fast, whole trunk": {"share": None},
        "fast, whole trunk, phases=2": {"share": None, "phases": 2},
    }
    for name, extra in variants.items():
        print(f"  {name} on {settings.size} x {settings.size} ({windows:,} windows) ...", flush=True)
        fast[name] = stitch_mosaic(model, image, **batched, **extra)
    print("  fast and fast, whole trunk, as one tile ...", flush=True)
    single = {
        name: stitch_mosaic(model, image, **{**batched, "tile": settings.size}, **variants[name])
        for name in ("fast", "fast, whole trunk")
    }
    block, count = (image, windows) if settings.full else _block(settings, image)
    timed: dict[str, MosaicResult] = {}
    for mode in ("exact", "loop"):
        print(f"  {mode} on {count:,} windows ...", flush=True)
        timed[mode] = stitch_mosaic(model, block, mode=mode, **batched)
    rows = [_row(name, result.seconds, windows, windows) for name, result in fast.items()]
    rows += [_row(mode, result.seconds, count, windows) for mode, result in timed.items()]
    seconds = {row["mode"]: row["seconds"] for row in rows}
    block_fast = {
        name: fast[name] if settings.full else stitch_mosaic(model, block, **batched, **variants[name])
        for name in ("fast", "fast, whole trunk")
    }
    return {
        "mosaic": [settings.size, settings.size],
        "architecture": ARCHITECTURE,
        "weights": "random, batch-norm statistics from 32 mosaic windows",
        "window": settings.window,
        "step": settings.step,
        "sigma": settings.sigma,
        "share": settings.share,
        "tile": settings.tile,
        "batch_size": settings.batch_size,
        "windows": windows,
        "rows": rows,
        "speedup": {
            name: {"vs_exact": seconds["exact"] / seconds[name], "vs_loop": seconds["loop"] / seconds[name]}
            for name in fast
        },
        "block_windows": count,
        "block_vs_exact": {name: _difference(result.map, timed["exact"].map) for name, result in block_fast.items()},
        "block_exact_vs_loop": _difference(timed["exact"].map, timed["loop"].map),
        "tile_seams": {name: _difference(fast[name].map, result.map) for name, result in single.items()},
    }


def _row(mode: str, seconds: float, timed: int, windows: int) -> dict[str, Any]:
    """One speed row: the measured seconds scaled to all ``windows`` when only ``timed`` of them ran."""
    return {
        "mode": mode,
        "windows_timed": timed,
        "measured_seconds": seconds,
        "seconds": seconds * windows / timed,
        "ms_per_window": 1000.0 * seconds / timed,
        "extrapolated": timed < windows,
    }


def _train(
    architecture: str, mosaics: Sequence[int], size: int, window: int, patches: int, device: torch.device, epochs: int
) -> tuple[nn.Module, dict[str, Any]]:
    """A model trained on ``patches`` patches (label = centre pixel) from each of the seeded mosaics, 80/20 split."""
    drawn = [make_rcm_mosaic(size, size, seed=seed) for seed in mosaics]
    parts = [sample_patches(image, mask, patches, size=window, seed=i) for i, (image, mask) in enumerate(drawn)]
    x = _standardised(np.concatenate([p for p, _ in parts]))
    y = torch.from_numpy(np.concatenate([labels for _, labels in parts]))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = len(x) * 4 // 5
    config = TrainConfig(
        architecture=architecture, modality="RCM", image_size=window, epochs=epochs, batch_size=32, device=device.type
    )
    print(f"  training {architecture} on {split} patches of {window} px ...", flush=True)
    trained = fit(config, x[:split], y[:split], x[split:], y[split:])
    about = {"patches": split, "val_auc": trained.metrics["val_auc"], "seconds": trained.metrics["train_seconds"]}
    return trained.model.to(device), about


def _accuracy(settings: Settings, device: torch.device) -> dict[str, Any]:
    """tiny_cnn trained on one mosaic; fast and exact, both in full, scored on another against its mask."""
    size, window = settings.accuracy_size, settings.accuracy_window
    model, about = _train("tiny_cnn", (1,), size, window, settings.accuracy_patches, device, epochs=4)
    image, mask = make_rcm_mosaic(size, size, seed=2)
    labeled = mask != UNLABELED
    truth = mask[labeled] == POSITIVE
    rows = []
    for step in _ACCURACY_STEPS if not settings.quick else (8,):
        for sigma in _ACCURACY_SIGMAS:
            options = {"window": window, "step": step, "sigma": sigma}
            exact = stitch_mosaic(model, image, mode="exact", batch_size=64, **options)
            for phases in _ACCURACY_PHASES if sigma is not None else (1,):
                fast = stitch_mosaic(model, image, mode="fast", phases=phases, **options)
                rows.append(_scored(fast, exact, truth, labeled, step=step, sigma=sigma, phases=phases))
    return {"architecture": "tiny_cnn", "mosaic": [size, size], "window": window, "train": about, "rows": rows}


def _scored(
    fast: MosaicResult, exact: MosaicResult, truth: np.ndarray, labeled: np.ndarray, **keys: Any
) -> dict[str, Any]:
    """One accuracy row: pixel AUC of both maps, their differences and timings."""
    return {
        **keys,
        "windows": fast.window_probabilities.size,
        "auc_fast": float(roc_auc_score(truth, fast.map[labeled])),
        "auc_exact": float(roc_auc_score(truth, exact.map[labeled])),
        **_difference(fast.map, exact.map),
        "probability_max_abs": float(np.abs(fast.window_probabilities - exact.window_probabilities).max()),
        "seconds_fast": fast.seconds,
        "seconds_exact": exact.seconds,
    }


def _b2(settings: Settings, device: torch.device) -> dict[str, Any]:
    """EfficientNet-B2 trained on 128 px patches; exact against fast with every share, on a held-out mosaic."""
    window = 128
    model, about = _train(ARCHITECTURE, (1, 3), 1024, window, 768, device, epochs=4)
    image, mask = make_rcm_mosaic(768, 768, seed=2)
    labeled = mask != UNLABELED
    truth = mask[labeled] == POSITIVE
    rows = []
    for step in (32, 25):
        options = {"window": window, "step": step, "sigma": settings.sigma, "batch_size": settings.batch_size}
        exact = stitch_mosaic(model, image, mode="exact", **options)
        for share in _B2_SHARES:
            fast = stitch_mosaic(model, image, share=share, **options)
            rows.append(_scored(fast, exact, truth, labeled, step=step, share=share))
    return {"architecture": ARCHITECTURE, "mosaic": [768, 768], "window": window, "train": about, "rows": rows}


def _parity(settings: Settings, device: torch.device) -> dict[str, Any]:
    """B2 trained by each scheme on the same patches; per scheme and step, the loop (the reference map) and
    the whole-trunk fast mode timed side by side and scored on a held-out mosaic; then the whole-trunk peak memory
    at ``big_size`` px."""
    window, train_size = settings.parity_window, settings.parity_train_size
    mosaics = {
        split: [make_rcm_mosaic(train_size, train_size, seed=seed) for seed in _PARITY_SEEDS[split]]
        for split in ("train", "val")
    }
    image, mask = make_rcm_mosaic(settings.parity_size, settings.parity_size, seed=_PARITY_SEEDS["score"])
    labeled = mask != UNLABELED
    truth = mask[labeled] == POSITIVE
    config = TrainConfig(
        architecture=ARCHITECTURE, task="aspecific", modality="RCM", image_size=window, epochs=settings.parity_epochs,
        batch_size=32, device=device.type,
    )  # fmt: skip
    schemes: dict[str, Any] = {}
    rows = []
    for scheme in settings.parity_schemes:
        context = settings.parity_context if scheme != "plain" else 0
        padded = settings.parity_padded_fraction if scheme == "mixed" else 0.0
        print(f"  training {ARCHITECTURE} {scheme} (context {context} px, padded {padded}) ...", flush=True)
        trained, _ = fit_patch_classifier(
            config, mosaics, patches_per_mosaic=settings.parity_patches, context=context, padded_fraction=padded,
            log=lambda _m: None,
        )  # fmt: skip
        model = trained.model.to(device).eval()
        schemes[scheme] = {
            "context": context,
            "padded_fraction": padded,
            "train_patches": trained.metrics["train_n"],
            "val_auc": trained.metrics["val_auc"],
            "train_seconds": trained.metrics["train_seconds"],
        }
        stride = window // model.forward_features(torch.zeros(1, 1, window, window, device=device)).shape[-1]
        options = {"window": window, "sigma": settings.sigma, "batch_size": settings.batch_size}
        warm = image[: window + 2 * stride, : window + 2 * stride]
        stitch_mosaic(model, warm, step=stride, mode="loop", **options)
        stitch_mosaic(model, warm, step=stride, share=None, **options)
        for step in settings.parity_steps:
            print(f"  {scheme}: loop and whole trunk at step {step} ...", flush=True)
            loop = stitch_mosaic(model, image, step=step, mode="loop", **options)
            for phases in sorted({1, stride // math.gcd(step, stride)}):
                fast = stitch_mosaic(model, image, step=step, share=None, phases=phases, **options)
                row = _scored(fast, loop, truth, labeled, scheme=scheme, step=step, phases=phases)
                row["auc_loop"] = row.pop("auc_exact")
                row["seconds_loop"] = row.pop("seconds_exact")
                row["auc_gap"] = row["auc_loop"] - row["auc_fast"]
                row["loop_over_fast"] = loop.seconds / fast.seconds
                rows.append(row)
    step = min(settings.parity_steps)
    print(f"  whole trunk on {settings.big_size:,} x {settings.big_size:,} in a fresh process ...", flush=True)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        big = pool.apply(_peak_memory, (settings.big_size, replace(settings, window=window, step=step, share=None)))
    return {
        "architecture": ARCHITECTURE,
        "train_mosaics": {split: list(_PARITY_SEEDS[split]) for split in ("train", "val")},
        "train_mosaic_size": train_size,
        "mosaic": [settings.parity_size, settings.parity_size],
        "mosaic_seed": _PARITY_SEEDS["score"],
        "window": window,
        "stride": stride,
        "sigma": settings.sigma,
        "epochs": settings.parity_epochs,
        "schemes": schemes,
        "rows": rows,
        "memory": big,
    }


def _peak_memory(size: int, settings: Settings) -> dict[str, Any]:
    """In a fresh process: B2 and a ``size`` x ``size`` mosaic, then the fast mode; RSS before and peak during.

    The peak is VmHWM (reset just before stitching where the kernel allows), not ``getrusage``'s ``ru_maxrss``: in a
    spawned child that also counts the parent's memory at fork, which exec carries over (seen: 936 MB reported
    against 15 MB used). ``ru_maxrss`` is recorded as well, for the record."""
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    torch.manual_seed(0)
    model = create_model(ARCHITECTURE, in_chans=1).to(device).eval()
    side = min(size, 2048)
    base, _ = make_rcm_mosaic(side, side, seed=0)
    image = np.ascontiguousarray(np.tile(base, (math.ceil(size / side),) * 2)[:size, :size])
    del base
    before = status_mb("VmRSS")
    reset = reset_peak()
    result = stitch_mosaic(
        model, image, window=settings.window, step=settings.step, sigma=settings.sigma, share=settings.share,
        tile=settings.tile, batch_size=settings.batch_size,
    )  # fmt: skip
    return {
        "size": size,
        "share": settings.share,
        "step": settings.step,
        "tile": settings.tile,
        "window": settings.window,
        "seconds": result.seconds,
        "rss_before_mb": before,
        "peak_rss_mb": status_mb("VmHWM"),
        "peak_reset": reset,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "mosaic_mb": image.nbytes / 2**20,
        "map_mb": result.map.nbytes / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def _memory(settings: Settings) -> list[dict[str, Any]]:
    """:func:`_peak_memory` for each size, each in its own spawned process (a high-water mark cannot be reset)."""
    sizes = [settings.size] + ([settings.big_size] if settings.big else [])
    rows = []
    context = multiprocessing.get_context("spawn")
    for size in sizes:
        print(f"  fast on {size:,} x {size:,} in a fresh process ...", flush=True)
        with context.Pool(1) as pool:
            rows.append(pool.apply(_peak_memory, (size, settings)))
    return rows


def _accuracy_table(section: dict[str, Any], title: str) -> list[str]:
    """An accuracy section as a title line and a fixed-width table."""
    frame = pd.DataFrame(section["rows"]).drop(columns=["pearson"])
    for column in ("sigma", "share"):
        if column in frame:
            frame[column] = ["none" if row[column] is None else f"{row[column]:g}" for row in section["rows"]]
    return [title, frame.to_string(index=False, float_format="{:.4f}".format), ""]


def _tables(document: dict[str, Any]) -> str:
    """The sections as fixed-width tables."""
    speed = document["speed"]
    frame = pd.DataFrame(speed["rows"])[["mode", "windows_timed", "measured_seconds", "ms_per_window", "seconds"]]
    frame["seconds"] = [
        f"{row['seconds']:,.1f}" + (" (extrapolated)" if row["extrapolated"] else "") for row in speed["rows"]
    ]
    lines = [
        f"speed: {ARCHITECTURE}, {speed['mosaic'][0]} x {speed['mosaic'][1]} px, window {speed['window']}, "
        f"step {speed['step']}, sigma {speed['sigma']}, share {speed['share']}: {speed['windows']:,} windows",
        frame.to_string(index=False, float_format="{:,.2f}".format),
    ]
    for name, ratio in speed["speedup"].items():
        lines.append(
            f"{name}: {ratio['vs_exact']:,.1f} x faster than exact (batched), {ratio['vs_loop']:,.1f} x the loop"
        )
    for name, gap in speed["block_vs_exact"].items():
        lines.append(
            f"B2 block ({speed['block_windows']} windows), {name} vs exact: max |diff| {gap['max_abs']:.3f}, "
            f"mean {gap['mean_abs']:.4f}, r {gap['pearson']}"
        )
    lines.append(f"exact vs loop: max |diff| {speed['block_exact_vs_loop']['max_abs']:.1e}")
    for name, gap in speed["tile_seams"].items():
        lines.append(
            f"tile seams, {name} (tile {speed['tile']} vs one tile): max |diff| {gap['max_abs']:.4f}, "
            f"mean {gap['mean_abs']:.5f}"
        )
    lines.append("")
    accuracy = document["accuracy"]
    lines += _accuracy_table(
        accuracy,
        f"accuracy: tiny_cnn (val AUC {accuracy['train']['val_auc']:.3f}), {accuracy['mosaic'][0]} x "
        f"{accuracy['mosaic'][1]} px, window {accuracy['window']}, pixel AUC against the mask, both modes in full",
    )
    if document.get("b2"):
        b2 = document["b2"]
        lines += _accuracy_table(
            b2,
            f"b2: {ARCHITECTURE} trained (val AUC {b2['train']['val_auc']:.3f}), {b2['mosaic'][0]} x "
            f"{b2['mosaic'][1]} px, window {b2['window']}, pixel AUC against the mask, both modes in full",
        )
    if document.get("parity"):
        parity = document["parity"]
        trained = ", ".join(
            f"{name} (context {about['context']} px, padded {about['padded_fraction']:.2f}): "
            f"val AUC {about['val_auc']:.3f} on plain windows, "
            f"{about['train_seconds']:.0f} s"
            for name, about in parity["schemes"].items()
        )
        columns = ["scheme", "step", "phases", "windows", "auc_loop", "auc_fast", "auc_gap", "seconds_loop"]
        frame = pd.DataFrame(parity["rows"])[[*columns, "seconds_fast", "loop_over_fast", "mean_abs"]]
        memory = parity["memory"]
        lines += [
            f"parity: {ARCHITECTURE} trained {parity['epochs']} epochs on {parity['window']} px windows, {trained}",
            f"scored on {parity['mosaic'][0]} x {parity['mosaic'][1]} px: loop against the whole trunk shared",
            frame.to_string(index=False, float_format="{:.4f}".format),
            f"whole trunk at {memory['size']:,} px (window {memory['window']}, step {memory['step']}): "
            f"{memory['seconds']:.0f} s, peak RSS {memory['peak_rss_mb']:,.0f} MB "
            f"({memory['rss_before_mb']:,.0f} before stitching)",
            "",
        ]
    lines += [
        "memory: fast mode in a fresh process (MB)",
        pd.DataFrame(document["memory"]).to_string(index=False, float_format="{:,.1f}".format),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON; returns the exit status."""
    settings = parse_args(argv)
    device, began, about = start(settings.threads, settings.device)
    print("speed ...", flush=True)
    speed = _speed(settings, device)
    print("accuracy ...", flush=True)
    accuracy = _accuracy(settings, device)
    b2 = None
    if settings.b2:
        print("b2 ...", flush=True)
        b2 = _b2(settings, device)
    parity = None
    if settings.parity:
        print("parity ...", flush=True)
        parity = _parity(settings, device)
    print("memory ...", flush=True)
    memory = _memory(settings)
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "speed": speed,
        "accuracy": accuracy,
        "b2": b2,
        "parity": parity,
        "memory": memory,
        "seconds": time.perf_counter() - began,
    }
    print(_tables(document))
    print(f"Total {document['seconds']:.0f} s.")
    write_results(settings.out, "mosaic", device, settings.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
