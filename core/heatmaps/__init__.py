"""Class activation heatmaps: a registry of methods (``@register_method``), one small file per method.

Every method is a context manager built from ``(model, target_layer)``: hooks are attached on entry and always
released on exit, leaving no state on the model. Called on a batch ``(B, C, H, W)`` it returns one map per image.
"""

from core.heatmaps import gradcam  # noqa: F401  (registers the method)
from core.heatmaps.base import HeatmapResult, get_method, list_methods, method_title, register_method
from core.heatmaps.render import colorize, overlay

__all__ = ["HeatmapResult", "colorize", "get_method", "list_methods", "method_title", "overlay", "register_method"]
