"""Model registry (``@register_model``), the architectures, and checkpoint save/load."""

from core.models import celnet, compsegnet, efficientnet, flmil, mlcam, resnet, tiny  # noqa: F401  (registers the architectures)
from core.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, sha256_file
from core.models.registry import (
    ModelSpec,
    check_model_options,
    create_model,
    get_spec,
    list_models,
    model_options,
    register_model,
)

__all__ = [
    "Checkpoint",
    "ModelSpec",
    "check_model_options",
    "create_model",
    "get_spec",
    "list_models",
    "load_checkpoint",
    "model_options",
    "register_model",
    "save_checkpoint",
    "sha256_file",
]
