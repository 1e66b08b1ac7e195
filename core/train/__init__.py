"""Training loops and recipes (the FL-CNN recipe, and the weakly supervised papers' own)."""

from core.train.recipe import (
    DATASET_TASKS,
    DECISIONS,
    RECIPES,
    TASK_POLICIES,
    TASKS,
    Progress,
    Recipe,
    TrainConfig,
    TrainResult,
    class_weights,
    default_policy,
    default_recipe,
    fit,
    predict_logits,
    recipe_for,
    task_label,
)

__all__ = [
    "DATASET_TASKS",
    "DECISIONS",
    "RECIPES",
    "TASK_POLICIES",
    "TASKS",
    "Progress",
    "Recipe",
    "TrainConfig",
    "TrainResult",
    "class_weights",
    "default_policy",
    "default_recipe",
    "fit",
    "predict_logits",
    "recipe_for",
    "task_label",
]
