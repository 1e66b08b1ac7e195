"""CompSegNet's own activation map as a heatmap method (seed 004, sections 3.1 and 4).

The CompSegNet (``core.models.compsegnet``) computes its localisation itself: the sigmoid activation map of its U-Net,
``activation_map(x) -> (maps, logits)``, an attribute name no other model has, so the method is offered only for
CompSegNet models. Like every method, the displayed map is min-max normalised per image, which
discards the map's absolute scale. That scale is the segmentation -- pixels above the absolute threshold .35 are
tumour (section 4) -- so evaluation thresholds the raw map from ``model.segment(x)`` (kept unnormalised in
``HeatmapResult.raw`` as well), never the normalised display map. Spectra masked as background (NaN, section 2;
:func:`core.models.compsegnet.mask_background`) get 0 in the map, and the logits are then the tumour share of the
tissue pixels; an unmasked input counts every pixel as tissue.
"""

from __future__ import annotations

from core.heatmaps.base import register_model_map

__all__ = ["CompSegNetMap"]

CompSegNetMap = register_model_map(
    "compsegnet",
    "CompSegNet map",
    "activation_map",
    "CompSegNet's sigmoid activation map (seed 004), min-max normalised for display; segment with model.segment().",
)
