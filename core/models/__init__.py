"""Model registry (``@register_model``), the architectures, and checkpoint save/load."""

from core.models import celnet, compsegnet, efficientnet, mlcam, resnet, tiny  # noqa: F401  (registers the architectures)
from core.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, sha256_file
from core.models.registry import ModelSpec, create_model, get_spec, list_models, register_model

__all__ = [
    "Checkpoint",
    "ModelSpec",
    "create_model",
    "get_spec",
    "list_models",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
    "sha256_file",
]
