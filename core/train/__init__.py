"""Training loops and recipes (the FL-CNN recipe first)."""

from core.train.recipe import (
    DECISIONS,
    TASKS,
    Progress,
    TrainConfig,
    TrainResult,
    class_weights,
    fit,
    predict_logits,
    task_label,
)

__all__ = [
    "DECISIONS",
    "TASKS",
    "Progress",
    "TrainConfig",
    "TrainResult",
    "class_weights",
    "fit",
    "predict_logits",
    "task_label",
]
