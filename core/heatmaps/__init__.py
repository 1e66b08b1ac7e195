"""Class activation heatmaps: a registry of methods (``@register_method``), one small file per method.

Every method is an ``Explainer``, a context manager built from ``(model, layers)``: hooks are attached on entry and
always released on exit, leaving no state on the model. Called on a batch ``(B, C, H, W)`` with one target per
image it returns one map per image (``HeatmapResult``). Registered: ``cam``, ``gradcam``, ``gradcam-multi``,
``gradient``, ``guided-backprop``, ``guided-gradcam``, ``scorecam``, ``celm``; weakly supervised models add their
own maps with ``register_model_map`` (``mlcam-lici``, ``compsegnet``, ``tissue-mil``). Whole mosaics are stitched
from windows by :mod:`core.heatmaps.mosaic`, with several Gaussian sigmas from one pass by
:mod:`core.heatmaps.mosaic_sigmas`.
"""

from core.heatmaps import (  # noqa: F401  (registers the methods)
    cam,
    celm,
    compsegnet_map,
    flmil_map,
    gradcam,
    gradient,
    guided,
    mlcam_map,
    scorecam,
)
from core.heatmaps.base import (
    Explainer,
    HeatmapResult,
    get_method,
    list_methods,
    method_title,
    register_method,
    register_model_map,
)
from core.heatmaps.guided import five_views
from core.heatmaps.render import colorize, overlay

__all__ = [
    "Explainer",
    "HeatmapResult",
    "colorize",
    "five_views",
    "get_method",
    "list_methods",
    "method_title",
    "overlay",
    "register_method",
    "register_model_map",
]
