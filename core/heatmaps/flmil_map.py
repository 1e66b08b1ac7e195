"""Tissue MIL's own map as a heatmap method (:mod:`core.models.flmil`, issue 17).

The network scores every cell of the specimen and calls the image by the mean of its best cells, so its map is
those cell scores: ``tissue_map(x) -> (maps, logits)``, raw scores whatever the call, off-tissue cells at the lowest
tissue score. Min-max normalised and upsampled like every method; offered only for models with ``tissue_map``.
"""

from __future__ import annotations

from core.heatmaps.base import register_model_map

__all__ = ["TissueMILMap"]

TissueMILMap = register_model_map(
    "tissue-mil",
    "Tissue MIL cell scores",
    "tissue_map",
    "Tissue MIL's cell scores over the estimated specimen (the places its call rests on), min-max normalised.",
)
