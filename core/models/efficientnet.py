"""EfficientNet-B0/-B2 (Tan & Le 2019, via timm) with the FL-CNN head (Shen et al. 2021, "Model development").

The FL-CNN replaces the ImageNet classifier by one fully connected neuron (binary task), initialised
Xavier-normal, with dropout 0.5 before it, and fine-tunes all layers. No weights are downloaded: ``pretrained``
means a local timm/ImageNet checkpoint file given by the user; its first convolution is adapted to the number of
input channels by timm (summed over RGB for single-channel fluorescence).
"""

from __future__ import annotations

import timm
from torch import nn

from core.models.pooling import set_pool
from core.models.registry import register_model

__all__ = ["efficientnet_b0", "efficientnet_b2", "flcnn_head", "timm_flcnn"]


def flcnn_head(model: nn.Module) -> nn.Module:
    """Re-initialise the classifier Xavier-normal with zero bias, as the FL-CNN paper does."""
    classifier = model.get_classifier()
    nn.init.xavier_normal_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    return model


OUTPUT_STRIDES = (8, 16, 32)


def timm_flcnn(
    variant: str,
    in_chans: int,
    num_classes: int,
    pretrained_file: str | None,
    drop_rate: float = 0.5,
    output_stride: int = 32,
    pool: str = "avg",
) -> nn.Module:
    """A timm architecture with the FL-CNN head; weights from ``pretrained_file`` (a local file) or random.

    ``output_stride`` 16 or 8 keeps the last stages at that stride by dilating their convolutions instead of striding
    (timm's ``output_stride``): the same weights and parameters, a 2x or 4x finer last feature map, so a finer
    Grad-CAM (at 128 px, 8 x 8 cells instead of 4 x 4: the peak of a perfect map of the demo's tumor masks falls in
    the tumor for 97 % of specimens instead of 69 %, ``python -m bench.pointing``), for 2-4x the last stages' cost.

    ``pool`` "avg" is the paper's global average pooling; "max" keeps the location the classifier scores highest
    (Oquab et al. 2015, :mod:`core.models.pooling`), so the call rests on one place and Grad-CAM peaks there. On the
    honest demo cohort that place was the drape beside the specimen (every cell of these networks sees the whole
    frame): at output_stride 16 without augmentation, test AUC 0.72 / 0.73 and Grad-CAM peak in the tumor 0.13 /
    0.01 for B0 / ResNet-18, worse than "avg" (bench/README.md); :mod:`core.models.flmil` is what localises."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, not {output_stride!r}")
    overlay = {"file": pretrained_file} if pretrained_file else None
    model = timm.create_model(
        variant,
        pretrained=bool(pretrained_file),
        pretrained_cfg_overlay=overlay,
        in_chans=in_chans,
        num_classes=num_classes,
        drop_rate=drop_rate,
        **({"output_stride": output_stride} if output_stride != 32 else {}),
    )
    return set_pool(flcnn_head(model), pool)


def _last_stage(model: nn.Module) -> nn.Module:
    # conv_head -> bn2 (BatchNormAct2d, SiLU included): the output of the last convolutional stage.
    return model.bn2


def _two_scales(model: nn.Module) -> list[nn.Module]:
    # The last stride-16 stage (blocks[4], 14 x 14 at 224 px) and the last stage (stride 32): the two
    # resolutions CELNet fuses (CAM2 and CAM3).
    return [model.blocks[4], model.bn2]


@register_model("efficientnet_b0", target_layer=_last_stage, cam_layers=_two_scales)
def efficientnet_b0(
    in_chans: int = 1,
    num_classes: int = 1,
    pretrained_file: str | None = None,
    drop_rate: float = 0.5,
    output_stride: int = 32,
    pool: str = "avg",
) -> nn.Module:
    """EfficientNet-B0 with the FL-CNN head (5.3 M parameters, 0.39 GFLOPs at 224 px)."""
    return timm_flcnn("efficientnet_b0", in_chans, num_classes, pretrained_file, drop_rate, output_stride, pool)


@register_model("efficientnet_b2", target_layer=_last_stage, cam_layers=_two_scales)
def efficientnet_b2(
    in_chans: int = 1,
    num_classes: int = 1,
    pretrained_file: str | None = None,
    drop_rate: float = 0.5,
    output_stride: int = 32,
    pool: str = "avg",
) -> nn.Module:
    """EfficientNet-B2 with the FL-CNN head (the RCM paper's patch classifier backbone)."""
    return timm_flcnn("efficientnet_b2", in_chans, num_classes, pretrained_file, drop_rate, output_stride, pool)
