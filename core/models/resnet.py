"""ResNet-18 (He et al. 2016, via timm): the standard backbone the weakly supervised papers compare against.

Seed 001 compares CELNet with "ResNet18 + GradCAM" and "ResNet18 + Backprop"; seed 000's M10 is plain CAM on a GAP
network. Here ResNet-18 carries the FL-CNN head (one logit, dropout 0.5, Xavier-normal init) so plain CAM, Grad-CAM
and the saliency methods all apply. Random weights unless a local checkpoint file is given.
"""

from __future__ import annotations

from torch import nn

from core.models.efficientnet import timm_flcnn
from core.models.registry import register_model

__all__ = ["resnet18"]


@register_model(
    "resnet18",
    target_layer=lambda model: model.layer4,
    cam_layers=lambda model: [model.layer3, model.layer4],
)
def resnet18(
    in_chans: int = 1,
    num_classes: int = 1,
    pretrained_file: str | None = None,
    drop_rate: float = 0.5,
    output_stride: int = 32,
    pool: str = "avg",
) -> nn.Module:
    """ResNet-18 with the FL-CNN head (11.2 M parameters), the seeds' standard-backbone baseline."""
    return timm_flcnn("resnet18", in_chans, num_classes, pretrained_file, drop_rate, output_stride, pool)
