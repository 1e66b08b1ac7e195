"""Training recipes: the FL-CNN recipe (the default) and the weakly supervised localisation papers' recipes.

The FL-CNN recipe (Shen et al. 2021, "Problem formulation" and "Model development"):

- Loss: class-weighted binary cross-entropy, eq. (1), with ``alpha_P = (|P|+|N|)/(2|P|)`` and
  ``alpha_N = (|P|+|N|)/(2|N|)`` (eq. 2) counted on the training set. The paper sums over images; we average over
  the batch (same minimiser, learning rate independent of batch size).
- Optimiser: Adam, learning rate 1e-3, weight decay 1e-4; all layers fine-tuned.
- Schedule: linear warm-up, then cosine annealing, updated every iteration; no early stopping (the last epoch's
  weights are kept, as in the paper).
- Afterwards the operating threshold is chosen on the validation split by a policy: by default the paper's,
  ``sens90`` for tumor ("optimal decision thresholds with sensitivity >90%") and ``closest`` (the ROC point closest
  to (0, 1)) for grade and Ki-67 (:func:`default_policy`; ``sens90`` for the other tasks).
On a GPU: mixed precision (bfloat16 autocast) and channels_last; on the CPU: float32.

The weakly supervised models bring their own loss (``model.loss(x, y)``), and their papers their own optimiser; the
recipes in :data:`RECIPES` are those papers' training sections, with learning rates and step sizes scaled from tens of
thousands of iterations to the few hundred a CPU run affords (each scaling is said in the recipe's ``description``):

- ``mlcam`` (seed 000, section 3): SGD with momentum 0.9, step decay by 0.9; the paper steps every 500 of 22,000
  iterations (44 decays), here every ``total/44`` iterations; the model with the lowest validation loss is kept; no
  crop or rotation augmentation (none at all here).
- ``celnet`` (seed 001, section 3.1): SGD with Nesterov momentum 0.9, L2 1e-5 (weight decay), the rate halved at 50 %
  and 75 % of the epochs; lowest validation loss kept; the PCam augmentation (random 90-degree rotations and
  horizontal flips, ``train_augment(..., policy="pcam")``), which the paper applies to every model it compares.
- ``compsegnet`` (seed 004, "Implementation"): RMSprop (decay 0.9, TensorFlow's), rate 1e-3 after a linear warm-up
  over 4 epochs (without it, PyTorch's RMSprop's first steps, about lr / sqrt(1 - decay^t), saturated the map on some
  seeds); lowest validation loss kept.
- ``rcm`` (seed 002, "Model training"): SGD with momentum 0.9 and weight decay (the paper's 5e-4 is set by the
  study's config), the rate multiplied by 0.9 every 10 of 500 epochs (50 decays), here every ``total/50``
  iterations; the RCM augmentation (flips, grey-level jitter, padded crop); the last epoch kept, as the paper trains
  "without early stopping". The paper's dropout of 0.75 is the builder's ``drop_rate``, set by the study. Its
  "noise, and blurring" are ``TrainConfig.noise`` and ``blur`` (off by default; any recipe with the modality
  augmentation takes them, :func:`core.data.preprocess.train_augment`), recorded in the metrics as applied.

- ``flmil`` (issue 17, no paper): the FL-CNN's optimiser and schedule with the PCam augmentation instead of the FL
  paper's brightness and contrast jitter (:mod:`core.models.flmil`).

Models without a ``loss`` method train on the class-weighted BCE of their logit, whatever the recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch import nn

from core.data.preprocess import channels_for, train_augment
from core.metrics.classification import auc, binary_metrics
from core.models import create_model
from core.runtime import tune_allocator
from core.stats.thresholds import choose_threshold

__all__ = [
    "DATASET_TASKS",
    "DECISIONS",
    "TASK_POLICIES",
    "RECIPES",
    "Recipe",
    "TASKS",
    "Progress",
    "TrainConfig",
    "TrainResult",
    "class_weights",
    "cosine_with_warmup",
    "default_policy",
    "default_recipe",
    "fit",
    "pick_device",
    "predict_logits",
    "recipe_for",
    "task_label",
    "weighted_bce",
]

# task -> (what the positive class is, which specimens it is trained on)
TASKS: dict[str, tuple[str, str]] = {
    "tumor": ("tumor (vs non-tumor)", "all specimens with a known tumor label"),
    "grade": ("GBM (vs DLGG)", "tumor specimens with a known grade"),
    "ki67": ("Ki-67 >= 10 % (vs < 10 %)", "tumor specimens with a known Ki-67 level"),
    "aspecific": ("aspecific region (vs benign), RCM patches", "mosaic patches labelled by their centre pixel"),
    "diagnostic": ("diagnostic (vs non-diagnostic), CLE frames", "frames labelled diagnostic when a region is present"),
    "cancer": ("cancer (vs cancer-free), spectral spots", "spots labelled cancer when they hold tumor pixels"),
}

# tasks whose labels come from a localisation data set's masks (core.data.localization_set), not specimen labels
DATASET_TASKS = {"diagnostic": "cle", "cancer": "spectral"}

# task -> (negative decision, positive decision), the words shown to clinicians
DECISIONS: dict[str, tuple[str, str]] = {
    "tumor": ("non-tumor", "tumor"),
    "grade": ("DLGG", "GBM"),
    "ki67": ("Ki-67 < 10 %", "Ki-67 >= 10 %"),
    "aspecific": ("benign", "aspecific"),
    "diagnostic": ("non-diagnostic", "diagnostic"),
    "cancer": ("cancer-free", "cancer"),
}


# The operating-threshold rule of each task's paper where it is not sens90 (seed 003, "Statistical analysis").
TASK_POLICIES: dict[str, str] = {"grade": "closest", "ki67": "closest"}


def default_policy(task: str) -> str:
    """The threshold policy a model of ``task`` gets when none is asked for: seed 003 picks the tumor threshold at
    sensitivity > 90 % and the grade and Ki-67 thresholds at the ROC point closest to the perfect corner."""
    return TASK_POLICIES.get(task, "sens90")


def task_label(task: str, labels: Mapping[str, Any]) -> int | None:
    """The 0/1 target of one specimen for ``task``, or None when the specimen is not in that task's cohort."""

    def known(value: Any) -> bool:
        return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""

    if task == "aspecific" or task in DATASET_TASKS:
        return None  # learnt from pixel labels (services.mosaic) or localisation data sets, not specimen labels
    tumor = labels.get("tumor")
    if task == "tumor":
        return int(bool(tumor)) if known(tumor) else None
    if not known(tumor) or not bool(tumor):
        return None  # the cascade: grade and Ki-67 models only see tumor specimens
    if task == "grade":
        grade = labels.get("grade")
        return {"GBM": 1, "DLGG": 0}.get(grade) if known(grade) else None
    if task == "ki67":
        ki67 = labels.get("ki67")
        return {">=10": 1, "<10": 0}.get(ki67) if known(ki67) else None
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


@dataclass
class TrainConfig:
    architecture: str = "efficientnet_b0"
    task: str = "tumor"
    modality: str = "FL"
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float | None = None  # None: the recipe's own (1e-4; CELNet's L2 1e-5; none for CompSegNet)
    warmup_epochs: float = 1.0
    threshold_policy: str | None = None  # None: the task's paper rule (default_policy)
    seed: int = 0
    device: str = "auto"
    pretrained_file: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None  # a key of RECIPES; None: the architecture's own (default_recipe)
    in_chans: int | None = None  # None: the modality's channels; set for many-channel data (hyperspectral spots)
    augment: bool = True  # False: no augmentation whatever the recipe (like-for-like baselines)
    noise: float = 0.0  # Gaussian noise, max per-sample SD in [0, 1] grey levels (seed 002; modality policies only)
    blur: float = 0.0  # Gaussian blur, max per-sample SD in px (seed 002; modality policies only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    val_auc: float | None
    seconds: float


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    threshold: float
    threshold_policy: str
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    val_probabilities: np.ndarray
    device: str


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when there is one (or when asked), else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def class_weights(labels: torch.Tensor) -> tuple[float, float]:
    """(alpha_P, alpha_N) of eq. (2); a class absent from training is an error, not a division by zero."""
    positives = int((labels == 1).sum())
    negatives = int((labels == 0).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"training needs both classes; got {positives} positive and {negatives} negative images")
    total = positives + negatives
    return total / (2 * positives), total / (2 * negatives)


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, alpha_p: float, alpha_n: float) -> torch.Tensor:
    """Eq. (1) on logits (numerically stable), averaged over the batch."""
    weights = torch.where(targets > 0.5, alpha_p, alpha_n).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), weight=weights)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the base rate, then cosine annealing to 0, stepped every iteration."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Recipe:
    """How a model is optimised: the optimiser, its schedule (stepped every iteration), whether the training images
    are augmented and how (``augmentation``: a :func:`core.data.preprocess.train_augment` policy, ``modality`` for the
    modality's own paper), and which epoch's weights are kept (``last``, or ``best`` by validation loss)."""

    name: str
    description: str
    optimizer: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]
    schedule: Callable[[torch.optim.Optimizer, int, int], torch.optim.lr_scheduler.LRScheduler]
    augment: bool = True
    keep: str = "last"
    augmentation: str = "modality"


def _decay(config: TrainConfig, default: float) -> float:
    """The weight decay asked for in ``config``, else the recipe's own ``default``."""
    return default if config.weight_decay is None else float(config.weight_decay)


def _adam(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=_decay(config, 1e-4))


def _sgd(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=_decay(config, 1e-4))


def _sgd_nesterov(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=_decay(config, 1e-5)
    )


def _rmsprop(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """RMSprop with TensorFlow's decay 0.9 (the CompSegNet paper's framework; PyTorch's default is 0.99)."""
    return torch.optim.RMSprop(model.parameters(), lr=config.lr, alpha=0.9, weight_decay=_decay(config, 0.0))


def _step_decay(optimizer: torch.optim.Optimizer, total: int, _warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, total // 44), gamma=0.9)


def _decay_fifty_times(
    optimizer: torch.optim.Optimizer, total: int, _warmup: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, total // 50), gamma=0.9)


def _halve_at_half_and_three_quarters(
    optimizer: torch.optim.Optimizer, total: int, _warmup: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[total // 2, (3 * total) // 4], gamma=0.5)


def _warm_then_constant(
    optimizer: torch.optim.Optimizer, _total: int, warmup: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The rate rises linearly over ``4 * warmup`` steps (4 x ``warmup_epochs``), then stays constant."""
    steps = 4 * max(1, warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / steps))


RECIPES: dict[str, Recipe] = {
    "flcnn": Recipe(
        "flcnn",
        "FL-CNN (seed 003): Adam, weight decay, warm-up then cosine, class-weighted BCE, augmentation, last epoch",
        _adam,
        cosine_with_warmup,
    ),
    "mlcam": Recipe(
        "mlcam",
        "MLCAM-LICI (seed 000): SGD momentum 0.9, step decay 0.9 (44 steps over the run, as 22,000/500), no "
        "augmentation, lowest validation loss",
        _sgd,
        _step_decay,
        augment=False,
        keep="best",
    ),
    "celnet": Recipe(
        "celnet",
        "CELNet (seed 001): SGD Nesterov momentum 0.9, L2 1e-5, rate halved at 50 % and 75 % of the run, random "
        "90-degree rotations and horizontal flips (PCam), lowest validation loss",
        _sgd_nesterov,
        _halve_at_half_and_three_quarters,
        keep="best",
        augmentation="pcam",
    ),
    "rcm": Recipe(
        "rcm",
        "RCM patch classifier (seed 002): SGD momentum 0.9, weight decay from the config (paper 5e-4), rate x0.9 "
        "50 times over the run (as every 10 of 500 epochs), flips and intensity augmentation, last epoch",
        _sgd,
        _decay_fifty_times,
    ),
    # Tissue MIL (core.models.flmil, issue 17): the FL-CNN's optimiser and schedule; a specimen has no up or down, so
    # random 90-degree rotations and horizontal flips, but no brightness or contrast jitter: scaled anywhere in
    # [0, 2] (the FL paper's, meant for its pretrained network), a from-scratch network loses the relative
    # brightness of tumor and normal tissue (measured: bench/README.md, "Does the FL-CNN earn its heatmaps?").
    "flmil": Recipe(
        "flmil",
        "Tissue MIL (issue 17): the FL-CNN's Adam, warm-up then cosine, class-weighted BCE; random 90-degree "
        "rotations and horizontal flips, no intensity jitter; last epoch",
        _adam,
        cosine_with_warmup,
        augmentation="pcam",
    ),
    # RMSprop with TensorFlow's decay 0.9 (the paper's framework; PyTorch's default is 0.99) and the rate warmed up
    # linearly over 4 x warmup_epochs (4 epochs), then constant. PyTorch's RMSprop has no bias correction: step t is
    # about lr / sqrt(1 - decay**t) on every weight at once, 10 x lr at t = 1 with 0.99; at the paper's 1e-3 that
    # drove the map to all on or all off, where the sigmoid saturates and training stays (core.models.compsegnet).
    "compsegnet": Recipe(
        "compsegnet",
        "CompSegNet (seed 004): RMSprop (decay 0.9) at a constant rate after a linear warm-up (4 epochs), no "
        "augmentation, lowest validation loss",
        _rmsprop,
        _warm_then_constant,
        augment=False,
        keep="best",
    ),
}

_ARCHITECTURE_RECIPES = {"mlcam_lici": "mlcam", "celnet": "celnet", "compsegnet": "compsegnet", "flmil": "flmil"}


def default_recipe(architecture: str) -> str:
    """The recipe an architecture's paper trained it with; the FL-CNN recipe for the standard backbones."""
    return _ARCHITECTURE_RECIPES.get(architecture, "flcnn")


def recipe_for(config: TrainConfig) -> Recipe:
    """The config's recipe, or its architecture's own."""
    name = config.recipe or default_recipe(config.architecture)
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}") from None


def _loss(
    model: nn.Module,
    batch: torch.Tensor,
    target: torch.Tensor,
    alpha_p: float,
    alpha_n: float,
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The model's own training loss when it has one (the weakly supervised papers), else eq. (1) on its logit
    (``logits(model, batch)`` when given, else ``model(batch)``)."""
    if logits is not None:
        return weighted_bce(logits(model, batch)[:, 0].float(), target, alpha_p, alpha_n)
    if callable(getattr(model, "loss", None)):
        return model.loss(batch, target).float()
    return weighted_bce(model(batch)[:, 0].float(), target, alpha_p, alpha_n)


@torch.no_grad()
def _validation_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, alpha_p: float, alpha_n: float, batch_size: int = 64
) -> float:
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch, target = images[start : start + batch_size].to(device), labels[start : start + batch_size].to(device)
        total += float(_loss(model, batch, target, alpha_p, alpha_n)) * len(batch)
    return total / max(1, len(images))


@torch.inference_mode()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Logits of an eval-mode model for prepared images, batched, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out.append(model(batch).float().cpu())
        else:
            out.append(model(batch).cpu())
    return torch.cat(out)[:, 0].numpy() if out else np.zeros(0, dtype=np.float32)


def fit(
    config: TrainConfig,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    progress: Callable[[Progress], None] | None = None,
    train_logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train one binary model on prepared ``(N, C, S, S)`` images and 0/1 labels by its recipe (:func:`recipe_for`:
    the FL-CNN recipe unless the architecture's paper has its own).

    ``train_logits(model, batch)``, when given, replaces ``model(batch)`` for the training batches' logits (eq. 1 is
    taken on them); validation still runs the plain model. ``services.mosaic`` uses it to pool only a context crop's
    central feature cells.

    Returns the trained model (eval mode, CPU), its validation metrics, and the operating threshold chosen on the
    validation split by ``config.threshold_policy`` (None: :func:`default_policy` of the task).
    """
    if config.task not in TASKS:
        raise ValueError(f"unknown task {config.task!r}; expected one of {', '.join(TASKS)}")
    recipe = recipe_for(config)
    expected = config.in_chans or channels_for(config.modality)
    if train_images.ndim != 4 or train_images.shape[1] != expected:
        raise ValueError(f"{config.modality} images must be (N, {expected}, S, S); got {tuple(train_images.shape)}")
    torch.manual_seed(config.seed)
    tune_allocator()  # saved activations stay in the heap between steps (core/runtime.py): no page faults per step
    device = pick_device(config.device)
    alpha_p, alpha_n = class_weights(train_labels)
    model = create_model(
        config.architecture, in_chans=expected, pretrained_file=config.pretrained_file, **config.model_kwargs
    ).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = recipe.optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_images) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = recipe.schedule(optimizer, total, max(1, round(config.warmup_epochs * steps_per_epoch)))
    augment = (
        train_augment(
            config.modality, config.image_size, policy=recipe.augmentation, noise=config.noise, blur=config.blur
        )
        if recipe.augment and config.augment
        else None
    )
    generator = torch.Generator().manual_seed(config.seed)
    labels = train_labels.float()
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor], np.ndarray] | None = None  # val loss, epoch, weights, val probs
    started = time.perf_counter()
    step = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        losses = []
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            if len(index) < 2:
                continue  # batch norm cannot train on a single image
            batch = (augment(train_images[index], generator) if augment else train_images[index]).to(device)
            target = labels[index].to(device)
            if device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = _loss(model, batch, target, alpha_p, alpha_n, train_logits)
            else:
                loss = _loss(model, batch, target, alpha_p, alpha_n, train_logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
            if progress:
                progress(Progress(epoch, config.epochs, step, total, losses[-1], None, time.perf_counter() - started))
        val_probs = expit(predict_logits(model, val_images))
        val_auc = auc(val_labels.numpy(), val_probs)
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "val_auc": val_auc}
        if recipe.keep == "best":
            record["val_loss"] = _validation_loss(model, val_images, val_labels.float(), alpha_p, alpha_n)
            if best is None or record["val_loss"] < best[0]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = (record["val_loss"], epoch, state, val_probs)
        history.append(record)
        if progress:
            progress(
                Progress(epoch, config.epochs, step, total, history[-1]["loss"], val_auc, time.perf_counter() - started)
            )
    kept_epoch = config.epochs
    if best is not None:
        _, kept_epoch, state, val_probs = best
        model.load_state_dict(state)
    truth = val_labels.numpy().astype(int)
    threshold = choose_threshold(truth, val_probs, config.threshold_policy or default_policy(config.task))
    metrics = {
        "val_auc": auc(truth, val_probs),
        "val_n": len(truth),
        "val_positives": int(truth.sum()),
        "train_n": len(train_labels),
        "train_positives": int(train_labels.sum()),
        "alpha_p": alpha_p,
        "alpha_n": alpha_n,
        "recipe": recipe.name,
        "weight_decay": optimizer.param_groups[0]["weight_decay"],
        "noise": config.noise if augment else 0.0,
        "blur": config.blur if augment else 0.0,
        "kept_epoch": kept_epoch,
        "train_seconds": time.perf_counter() - started,
        **{f"val_{k}": v for k, v in binary_metrics(truth, val_probs, threshold.value).items()},
    }
    return TrainResult(
        model=model.cpu().eval(),
        config=config,
        threshold=threshold.value,
        threshold_policy=threshold.policy,
        metrics=metrics,
        history=history,
        val_probabilities=val_probs,
        device=device.type,
    )
