"""Train a model on the workspace's specimens by task and modality, evaluate it, and register it."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch
from scipy.special import expit

from core.data.io import read_image
from core.data.preprocess import channels_for, prepare
from core.metrics.classification import auc, binary_metrics
from core.models import save_checkpoint
from core.predict import Predictor
from core.settings import workspace_dir
from core.stats.report import jsonable
from core.train import DATASET_TASKS, Progress, TrainConfig, TrainResult, fit, predict_logits, task_label
from db import repo
from db.repo import ModelInfo
from db.session import init_db, read_scope, session_scope
from services import pointing
from services.jobs.context import claim

__all__ = ["check_model_name", "default_name", "load_split", "print_progress", "register_trained", "train_and_register"]


def default_name(config: TrainConfig) -> str:
    """A readable unique name, e.g. ``FL-tumor-efficientnet_b0-20261121-153000``."""
    return f"{config.modality}-{config.task}-{config.architecture}-{datetime.now():%Y%m%d-%H%M%S}"


def print_progress(p: Progress) -> None:
    """Console progress: one line per epoch, a live step counter in between."""
    if p.val_auc is not None:
        auc_text = f"val AUC {p.val_auc:.3f}"
        print(f"  epoch {p.epoch}/{p.epochs}: loss {p.loss:.4f}, {auc_text} ({p.seconds:.0f} s)", flush=True)
    elif p.step % 5 == 0:
        print(f"  step {p.step}/{p.steps}: loss {p.loss:.4f}", end="\r", flush=True)


def load_split(
    frame: pd.DataFrame, task: str, modality: str, image_size: int, progress: Callable[[int, int], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared images and 0/1 targets of the rows that belong to ``task``'s cohort."""
    root = workspace_dir()
    targets = [task_label(task, row) for row in frame.to_dict("records")]
    keep = [i for i, t in enumerate(targets) if t is not None]
    images = []
    for done, i in enumerate(keep, start=1):
        path = root / frame.iloc[i]["path"]
        images.append(prepare(read_image(path, Path(path).name), modality, image_size))
        if progress:
            progress(done, len(keep))
    if not images:
        raise ValueError(f"no {modality} specimens with a known {task} label in this split")
    return torch.stack(images), torch.tensor([targets[i] for i in keep], dtype=torch.float32)


def check_model_name(name: str) -> None:
    """Before any training: registry names become folder names (letters, digits, '.', '_' and '-' only) and must
    not be taken yet. Creates the tables if need be."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name):
        raise ValueError(f"model name {name!r} may only contain letters, digits, '.', '_' and '-'")
    init_db()
    with read_scope() as session:
        if repo.find_model(session, name) is not None:
            raise ValueError(f"a model named {name!r} is already registered; choose another --name")


def train_and_register(
    config: TrainConfig,
    *,
    name: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[Progress], None] | None = None,
) -> ModelInfo:
    """Train by the FL-CNN recipe on the train split, pick the threshold on val, score test, save and register."""
    if config.task == "aspecific":
        raise ValueError(
            "aspecific (RCM patch) models learn from mosaic pixel labels, not specimen labels; "
            "see services.mosaic.train_patch_classifier"
        )
    if config.task in DATASET_TASKS:
        raise ValueError(f"{config.task} models learn from a localisation set; train them with --data DIR")
    name = name or default_name(config)
    check_model_name(name)
    with read_scope() as session:
        frame = repo.specimen_images(session, config.modality)
    if frame.empty:
        raise ValueError(f"the workspace has no {config.modality} images; run `python -m core import` first")
    splits = {}
    for split in ("train", "val", "test"):
        part = frame[frame["split"] == split]
        if part.empty and split != "test":
            raise ValueError(f"no {config.modality} specimens in the {split} split")
        if not part.empty:
            log(f"loading {split}: {len(part)} {config.modality} images at {config.image_size} px")
            splits[split] = load_split(part, config.task, config.modality, config.image_size)
    log(f"training {config.architecture} for {config.task} on {len(splits['train'][1])} images")
    result = fit(config, *splits["train"], *splits["val"], progress=progress)
    extra = {}
    if "test" in splits and pointing.applies(config.task, config.modality):
        log("pointing game on the test split: the default heatmap's peak and the brightest pixel against the masks")
        predictor = Predictor(result.model, {**config.to_dict(), "in_chans": channels_for(config.modality)}, 0.5, "cpu")
        report = pointing.evaluate(predictor, pointing.test_rows(config.modality))
        result.model.to(memory_format=torch.contiguous_format)
        if report is not None:
            extra["pointing"] = report
    return register_trained(config, result, name, splits.get("test"), log=log, extra_metrics=extra)


def register_trained(
    config: TrainConfig,
    result: TrainResult,
    name: str,
    test: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    log: Callable[[str], None] = print,
    extra_config: dict | None = None,
    extra_metrics: dict | None = None,
) -> ModelInfo:
    """Score a trained model on its test split (if any), save its checkpoint and register it; ``extra_metrics``
    (e.g. the pointing game, :mod:`services.pointing`) are stored with its metrics."""
    metrics = {**result.metrics, **(extra_metrics or {})}
    if test is not None:
        test_images, test_labels = test
        probs = expit(predict_logits(result.model, test_images))
        truth = test_labels.numpy().astype(int)
        metrics.update({"test_auc": auc(truth, probs), "test_n": len(truth), "test_positives": int(truth.sum())})
        metrics.update({f"test_{k}": v for k, v in binary_metrics(truth, probs, result.threshold).items()})
    metrics["history"] = result.history
    checkpoint_config = {
        **config.to_dict(),
        "in_chans": config.in_chans or channels_for(config.modality),
        "name": name,
        "trained_on": result.device,
        **(extra_config or {}),
    }
    checkpoint = save_checkpoint(result.model, checkpoint_config, workspace_dir() / "models" / name)
    with session_scope() as session:
        info = repo.register_model(
            session,
            name=name,
            architecture=config.architecture,
            task=config.task,
            modality=config.modality,
            image_size=config.image_size,
            checkpoint_path=checkpoint.path.relative_to(workspace_dir()).as_posix(),
            checkpoint_sha256=checkpoint.sha256,
            threshold=result.threshold,
            threshold_policy=result.threshold_policy,
            metrics=jsonable(metrics),
            config=checkpoint_config,
        )
        claim(session, models=[name], model=name, model_id=info.id)
    log(
        f"registered {name}: val AUC {metrics['val_auc']:.3f}"
        + (f", test AUC {metrics['test_auc']:.3f}" if "test_auc" in metrics else "")
        + f", threshold {result.threshold:.3f} ({result.threshold_policy})"
    )
    return info
