"""A tiny CNN for tests and smoke runs: three conv blocks, global average pooling, dropout, one linear layer.

It has the same interface as the EfficientNets (``get_classifier``, a named last stage for CAMs) at a thousandth
of the cost, so unit tests exercise the real training, checkpoint and heatmap code in seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from core.models.checkpoint import load_state_dict
from core.models.efficientnet import flcnn_head
from core.models.registry import register_model

__all__ = ["TinyCNN", "tiny_cnn"]


class TinyCNN(nn.Module):
    def __init__(self, in_chans: int = 1, num_classes: int = 1, width: int = 16, drop_rate: float = 0.5) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.features = nn.Sequential(block(in_chans, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(4 * width, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature maps (timm's name), the layer class activation maps are taken from."""
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(torch.flatten(self.pool(features), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(
    "tiny_cnn", target_layer=lambda model: model.features[-1], cam_layers=lambda model: list(model.features[1:])
)
def tiny_cnn(in_chans: int = 1, num_classes: int = 1, pretrained_file: str | None = None, width: int = 16) -> nn.Module:
    """Tiny three-block CNN for tests (about 25 k parameters)."""
    model = flcnn_head(TinyCNN(in_chans, num_classes, width))
    if pretrained_file:
        model.load_state_dict(load_state_dict(pretrained_file), strict=False)
    return model
