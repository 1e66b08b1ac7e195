"""CELNet, the cancerous evidence localisation network (Huang & Chung, MICCAI 2019; seed 001, section 2.1, fig. 1).

A 3 x 3 convolution head (stride 1, ``width`` channels) and three MA-ResModules of three residual building blocks
each, at ``width``, ``2 width`` and ``4 width`` channels; the first block of modules 2 and 3 has stride 2, so the
network downsamples only four-fold ("avoid over-downsampling" for densely distributed small evidence). A building
block (fig. 1, right) is conv3x3-BN-ReLU-conv3x3-BN, the multi-branch attention module (MAM), the residual added,
ReLU. Downsampling residual paths use a 3 x 3 stride-2 convolution with BN instead of ResNet's 1 x 1 "to reduce
information loss".

MAM refines a feature map F in two steps. Channel attention as CBAM (Woo et al. 2018, eq. 2): a shared MLP
(C -> C / r -> C, ReLU) on the global-average and global-max pooled descriptors, summed, sigmoid, giving the
squeezed map F_sq = M_c(F) * F. Spatial attention is CBAM's with three branches:
``A_s = sigmoid(sum_{k in {3, 5, 7}} f^{k x k}(D))`` (section 2.1), where D is CBAM's two-channel descriptor of
F_sq (channel-wise mean and max) and f^{k x k} a k x k convolution; MAM outputs F_sq * A_s.

Deep supervision: companion outputs on modules 2 and 3 each concatenate the GAP and GMP vectors of their module's
output; the two are concatenated and a 1 x 1 convolution gives the cancer logit (the sigmoid is left to the loss
and to callers). The 1 x 1 convolution is applied to the pooled vector as a ``(B, K, 1, 1)`` tensor, as the paper
writes it ("a fully convolutional layer, i.e. kernel size 1 x 1"). It is deliberately not an ``nn.Linear``: CAM
(Zhou et al. 2016) and the mosaic's fast mode read a linear classifier after global average pooling as class
weights over the target layer's channels, which does not hold for a head over GAP and GMP of two layers, so they
declare themselves unsupported on CELNet instead of returning a wrong map. Grad-CAM, Grad-CAM fused over
``cam_layers`` (CAM2 and CAM3) and CELM (section 2.2) apply.

Ablations of Tables 1 and 3: ``attention=False`` is "CELNet without MAM" (plain residual blocks, no attention
parameters); ``attention="cbam"`` is Table 1's "CELNet without MAM + CBAM" (the same module with CBAM's single
7 x 7 spatial branch); ``deep_supervision=False`` feeds only module 3's GAP and GMP to the classifier.

CELM's fusion weights alpha and beta (section 2.2, "confirmed by validation") are not parameters of the network
but are stored with it: ``celm_alpha`` and ``celm_beta`` are builder options kept as attributes, so a checkpoint's
config (``model_kwargs``) carries the pair chosen on validation and CELM reads it from the model.

Parameters at ``width=16``, ``reduction=16``, three input channels: 296,391 (Table 1: 297K); 292,497 without MAM
(Table 1: 292K); 295,761 with CBAM instead (Table 1: 296K); 296,327 without deep supervision (the classifier sees
128 instead of 192 pooled features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.models.checkpoint import load_state_dict
from core.models.registry import register_model

__all__ = ["RECIPE", "CELNet", "MAM", "MAResBlock", "celnet"]

RECIPE: dict[str, object] = {
    "optimizer": "sgd_nesterov",
    "lr": 1e-4,
    "momentum": 0.9,
    "weight_decay": 1e-5,
    "epochs": 100,
    "milestones": (0.5, 0.75),
    "gamma": 0.5,
    "batch_size": 64,
}
"""The paper's training (section 3.1), as documentation for the training loop: binary cross-entropy with L2
regularisation 1e-5 (weight decay), SGD with Nesterov momentum 0.9, batch size 64, 100 epochs, learning rate 1e-4
halved at 50 % and 75 % of the epochs; weights of minimum validation loss kept. PCam augmentation: random 90-degree
rotations and horizontal flips (the ``celnet`` training recipe applies them: ``core.train.recipe``)."""

_SPATIAL_KERNELS = {"mam": (3, 5, 7), "cbam": (7,)}  # MAM's branches, k' in {3, 5, 7}; CBAM's one 7 x 7
_BLOCKS = 3  # building blocks per MA-ResModule


def _avg_max_pool(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B, 2C)``: global average pooling then global max pooling, concatenated."""
    return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)


class MAM(nn.Module):
    """Multi-branch attention module (seed 001, section 2.1): CBAM channel attention, then spatial attention from
    convolution branches (``kernels``: MAM's 3 x 3, 5 x 5 and 7 x 7; CBAM's 7 x 7 alone) summed before the sigmoid."""

    def __init__(self, channels: int, reduction: int = 16, kernels: tuple[int, ...] = _SPATIAL_KERNELS["mam"]) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))
        self.branches = nn.ModuleList(nn.Conv2d(2, 1, k, padding=k // 2) for k in kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        squeezed = x * torch.sigmoid(pooled)  # F_sq, CBAM's channel attention
        descriptor = torch.cat([squeezed.mean(dim=1, keepdim=True), squeezed.amax(dim=1, keepdim=True)], dim=1)
        spatial = torch.stack([branch(descriptor) for branch in self.branches]).sum(dim=0)
        return squeezed * torch.sigmoid(spatial)  # F_sq * A_s


def _attention_kind(attention: bool | str) -> str | None:
    """The attention option as a key of ``_SPATIAL_KERNELS`` (True: MAM) or None (False: no attention)."""
    if attention is True:
        return "mam"
    if attention is False:
        return None
    if attention not in _SPATIAL_KERNELS:
        raise ValueError(f"attention must be True, False or one of {', '.join(_SPATIAL_KERNELS)}, not {attention!r}")
    return attention


class MAResBlock(nn.Module):
    """A building block of an MA-ResModule (seed 001, fig. 1 right): conv3x3-BN-ReLU-conv3x3-BN, MAM, plus the
    residual, ReLU. A block that changes resolution or width takes its residual through a 3 x 3 convolution (stride
    ``stride``) and BN. The ReLUs are separate, non-inplace ``nn.ReLU`` modules so guided backpropagation's hooks
    see every rectifier at its true input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, attention: str | None, reduction: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.attention = MAM(out_channels, reduction, _SPATIAL_KERNELS[attention]) if attention else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.attention(out) + self.shortcut(x))


def _ma_res_module(
    in_channels: int, out_channels: int, stride: int, attention: str | None, reduction: int
) -> nn.Sequential:
    """An MA-ResModule: three building blocks, the first carrying the module's stride and change of width."""
    first = MAResBlock(in_channels, out_channels, stride, attention, reduction)
    rest = (MAResBlock(out_channels, out_channels, 1, attention, reduction) for _ in range(_BLOCKS - 1))
    return nn.Sequential(first, *rest)


class CELNet(nn.Module):
    """CELNet (seed 001, section 2.1): head, three MA-ResModules, deep-supervised GAP + GMP head, one logit."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1,
        width: int = 16,
        reduction: int = 16,
        attention: bool | str = True,
        deep_supervision: bool = True,
        celm_alpha: float | None = None,
        celm_beta: float | None = None,
    ) -> None:
        super().__init__()
        if width < 1 or reduction < 1:
            raise ValueError(f"width and reduction must be positive, got {width} and {reduction}")
        for name, value in (("celm_alpha", celm_alpha), ("celm_beta", celm_beta)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] or None, got {value}")
        attention = _attention_kind(attention)
        self.deep_supervision = deep_supervision
        self.celm_alpha, self.celm_beta = celm_alpha, celm_beta  # CELM's fusion weights chosen on validation
        self.head = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stages = nn.ModuleList(
            [
                _ma_res_module(width, width, 1, attention, reduction),
                _ma_res_module(width, 2 * width, 2, attention, reduction),
                _ma_res_module(2 * width, 4 * width, 2, attention, reduction),
            ]
        )
        pooled = 2 * (2 * width + 4 * width) if deep_supervision else 2 * 4 * width
        self.classifier = nn.Conv2d(pooled, num_classes, 1)

    def get_classifier(self) -> nn.Module:
        """The final 1 x 1 convolution over the concatenated companion outputs."""
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages[0](self.head(x))
        module2 = self.stages[1](features)
        module3 = self.stages[2](module2)
        pooled = _avg_max_pool(module3)
        if self.deep_supervision:
            pooled = torch.cat([_avg_max_pool(module2), pooled], dim=1)
        return self.classifier(pooled[:, :, None, None]).flatten(1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy on the logit (section 3.1); the L2 term is the optimizer's weight decay."""
        logits = self(x)[:, 0]
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))


@register_model(
    "celnet",
    target_layer=lambda model: model.stages[2],
    cam_layers=lambda model: [model.stages[1], model.stages[2]],
)
def celnet(
    in_chans: int = 3,
    num_classes: int = 1,
    pretrained_file: str | None = None,
    width: int = 16,
    reduction: int = 16,
    attention: bool | str = True,
    deep_supervision: bool = True,
    celm_alpha: float | None = None,
    celm_beta: float | None = None,
) -> nn.Module:
    """CELNet with multi-branch attention and deep supervision (seed 001; about 0.3 M parameters at width 16).

    ``celm_alpha`` / ``celm_beta`` are CELM's fusion weights chosen on validation
    (:func:`core.heatmaps.celm.search_weights`); None leaves CELM at its neutral 0.5."""
    model = CELNet(in_chans, num_classes, width, reduction, attention, deep_supervision, celm_alpha, celm_beta)
    if pretrained_file:
        model.load_state_dict(load_state_dict(pretrained_file))
    return model
