"""Global pooling of the last feature map for one-logit classifiers: the paper's average, or the strongest location.

Why: with global average pooling (the FL-CNN paper's EfficientNet-B0) a network may spread its evidence over the
whole frame, for instance the contrast between a bright specimen and the drape around it, and its Grad-CAM then
peaks beside the tissue as often as on the tumor (issue 17's pointing game). Oquab et al., "Is object localization
for free? Weakly-supervised learning with convolutional neural networks" (CVPR 2015) score every location of the
last feature map with the classifier and keep the maximum: the image is called tumor because of one place, and for
a non-tumor image every place, the specimen's edge included, must score low. Their network is trained with image
labels only, like the seeds', and localises by construction.

``ScoreMaxPool`` is that head in timm's slot for global pooling: it scores each location with the model's own
classifier (the same linear layer, referred to, not registered a second time, so the parameters, their Xavier
initialisation, CAM and the checkpoint layout are exactly those of the average-pooled network) and passes on the
feature vector of the best-scoring location, so that ``classifier(pooled)`` is the maximum location score. For
such a model plain CAM is the map of location scores and Grad-CAM's channel weights are the classifier's weights
divided by the number of locations, so Grad-CAM is CAM up to that factor: its peak is the location that decided
the call.

Measured (issue 17, the honest demo cohort, test split): it does not localise with the timm backbones here. Their
last-layer cells each see the whole 128 px frame, and the location that decided the call was the drape beside the
specimen for 40 of 40 inspected tumor specimens: EfficientNet-B0 / ResNet-18 at output_stride 16 without
augmentation, 12 epochs, test AUC 0.72 / 0.73, Grad-CAM peak in the tumor 0.13 / 0.01 (average pooling: 0.44 /
0.40). Kept as an option for backbones with local cells; the FL model that localises is :mod:`core.models.flmil`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["POOLS", "ScoreMaxPool", "set_pool"]

POOLS = ("avg", "max")


class ScoreMaxPool(nn.Module):
    """(B, C, H, W) features -> (B, C): the feature vector at the location ``classifier`` scores highest.

    Only for one-logit classifiers (the binary FL-CNN tasks): with several classes the location to keep depends on
    the class, which a pooling layer does not know. Gradients reach the kept location only, as with max pooling.
    """

    def __init__(self, classifier: nn.Linear) -> None:
        super().__init__()
        if classifier.out_features != 1:
            raise ValueError(f"pool='max' needs a one-logit classifier, not {classifier.out_features} outputs")
        # A plain attribute, not a submodule: registered twice, its tensors would be saved twice (safetensors refuses
        # shared tensors). deepcopy and pickle keep it the model's own classifier (one memo per copy).
        self._classifier = (classifier,)

    @property
    def classifier(self) -> nn.Linear:
        return self._classifier[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, channels = features.shape[:2]
        flat = features.flatten(2)  # (B, C, N)
        scores = torch.einsum("bcn,c->bn", flat, self.classifier.weight[0])
        best = scores.argmax(dim=1)
        return flat[torch.arange(batch, device=features.device), :, best]


def set_pool(model: nn.Module, pool: str) -> nn.Module:
    """Give a timm model with a one-logit classifier the global pooling ``pool`` ("avg" keeps timm's own)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if pool == "max":
        model.global_pool = ScoreMaxPool(model.get_classifier())
    return model
