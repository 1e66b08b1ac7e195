"""CompSegNet: a U-Net whose activation map is pooled into one neuron and trained from sample labels only (seed 004).

A segmenting network is extended by a pooling neuron ``p`` that accumulates the pixel activations of its output
map (seed 004, section 3.1, Figure 2); the loss on ``p`` asks for no active pixels in cancer-free samples and a
minimum share of active pixels in cancer samples (section 3.2), so training on sample labels teaches the U-Net to
segment the tumour. Afterwards the U-Net alone is the segmenter.

Decisions where the paper is silent or inconsistent:

- Topology (section 3.1): the Ronneberger 2015 U-Net -- double 3x3 convolutions, 2x2 max-pool down, 2x2 transposed
  convolution up, skip concatenation, a final 1x1 convolution to one channel -- with any number of input channels
  (the paper: 450 infrared wavenumbers). Convolutions are padded ('same') so the map has the input's size; the input
  size must be divisible by ``2**depth``. The original has ``depth=4`` poolings and ``base=64`` channels (31 M
  parameters at 450 channels); the default here is ``depth=3``, ``base=16`` (0.55 M at 450 channels), small
  enough to train from scratch on a study-sized cohort. Hidden neurons use SoftPlus ("All other neurons use the
  SoftPlus activation function", section 3.2, Implementation); the activation map uses a sigmoid.
- Batch normalisation: the paper does not mention it, and the default (``batch_norm=False``) has none, as in the
  original U-Net. On a seeded toy hyperspectral task (8 channels, 32 px, RMSprop 1e-3, 40 steps, 3 seeds) batch
  norm lowered the training loss but not the eval-mode loss (0.032-0.047 against 0.001-0.030 without) and barely
  separated tumour from background: the pooled objective compares samples, and batch statistics let a batch's
  samples see each other, so what is learnt in train mode does not carry to running statistics. ``batch_norm=True``
  (a batch norm after every hidden convolution, convolutions then without bias) stays available for spectra whose
  channels differ widely in scale; normalising the input is the first remedy.
- Initialisation: PyTorch's defaults, except the 1x1 head's bias, which starts at ``logit(alpha)`` so that the
  initial activation map is about ``alpha`` everywhere. With a zero bias the map starts at .5, where ``sigma`` is
  saturated and only ``gamma``'s gradient remains; the loss then hardly moves for the first epochs.
- Pooling neuron input: ``x`` is the *fraction* of active pixels (the mean activation over the valid, i.e. tissue,
  pixels), not their sum. The paper says ``p`` "counts" active pixels but also that ``alpha`` "specifies the minimum
  percentage of tumor in the cancer samples" (10 %); with the fraction, ``sigma(x)`` saturates at ``alpha`` once
  about 10 % of the tissue is active (``beta * x / alpha = 50 x``, ``sigma(0.1) = 0.0987``), as the prose says;
  with a sum over 256x256 pixels it would saturate after a fraction of one pixel and the loss would be met by a
  single active pixel. The fraction is also independent of image size and of how much background a sample has.
- Background mask (section 2: "Spectra at pixel positions not covered by sample were masked as background"): the
  paper prints the transfer function and the loss, ``g(I, l) = sum_j |o(I_j) - alpha l(j)|`` with
  ``o(I_j) = sigma_{alpha,beta,gamma}(x_j)``, but no formula for the pooled ``x_j``. Read with ``alpha`` as a share
  of the *sample* and with the background masked, it is the active fraction of the tissue pixels ``T_j`` of image
  ``j``: ``x_j = (1 / |T_j|) sum_{i in T_j} a_j(i)``; background pixels neither add activation nor dilute it, so
  a spot's tumour share does not depend on how much of its frame is empty glass or lumen. The mask reaches the
  loss in one of two ways: ``valid`` (``(B, H, W)``, True on tissue) passed to ``loss``/``pooled``/
  ``tumor_fraction``, or masked spectra in the input itself: a pixel whose spectrum holds a non-finite value (NaN,
  a common marking of masked spectra, :func:`mask_background`) is background. The training loop
  (``core.train.recipe``) passes images only, so a set's background mask travels as NaN spectra. The U-Net sees
  zeros there (the tissue mean after per-channel standardisation) and the map is 0 on background (no sample, no
  tumour). Without either (inference on unmasked spectra, training data without a mask) every pixel counts as
  tissue: ``T_j`` is the whole image, as before.
- Loss (section 3.2): ``mean_j |o(I_j) - alpha * l(j)|``. The paper writes the sum over samples and calls it a
  root-mean-squared error; the formula is an absolute error, and the mean has the same minimiser with a learning
  rate independent of batch size. Note that with this loss a cancer sample's loss is smallest at a soft fraction of
  about 14.5 % (where ``sigma`` reaches ``alpha``); above it the linear term ``gamma * x`` adds a small penalty
  (slope ``gamma``), not the incentive section 3.2 ascribes to it.
- Sample decision (section 4, Figure S3): pixels whose activation exceeds ``PIXEL_THRESHOLD`` (.35, the paper's
  .35 * 255 on 8-bit maps) are tumour; the sample score is the tumour fraction among tissue pixels, and the ROC is
  taken over a threshold on that fraction. ``forward`` returns ``logit(clamp(fraction, 1e-4, 1 - 1e-4))`` so that
  ``sigmoid(forward(x))`` is the tumour fraction (monotone, so its ROC is the paper's). The threshold has no
  gradient, so ``forward``'s gradient is that of the logit of the soft fraction (a straight-through estimator):
  gradient-based heatmaps such as Grad-CAM on the last decoder block still get a signal.
- Recipe (section 3.2, Implementation; section 4): RMSprop, learning rate .001, mini-batches of 7 (``RECIPE``).
  The paper used TensorFlow, whose RMSprop decays its mean square by 0.9 (PyTorch's default: 0.99), and gives no
  schedule. The ``compsegnet`` recipe of ``core.train.recipe`` uses decay 0.9 and reaches .001 by a linear warm-up
  over the first 4 epochs. Why: PyTorch's RMSprop starts its mean square at 0 without bias correction, so step
  ``t`` is about ``lr / sqrt(1 - decay**t)`` on every weight at once, 10 x lr at the first with 0.99. At a constant
  1e-3 the map of a study spot set (seed 2) went from .1 to all off and then all on within 3 steps; there the
  sigmoid saturates (and, all on, the pooling neuron's slope is just ``gamma``), so training stayed there. In the
  compsegnet study (``services.localization``, seeds 0-4) this collapsed 2 of 5 seeds before and none after. The
  loss and ``sigma`` match section 3.2 (tests); the collapse is the optimiser's start, not the objective.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.models.checkpoint import load_state_dict
from core.models.registry import register_model

__all__ = [
    "PIXEL_THRESHOLD",
    "RECIPE",
    "CompSegNet",
    "PoolingNeuron",
    "compsegnet",
    "mask_background",
    "pooling_transfer",
    "thresholded_fraction",
    "tissue_of",
]

PIXEL_THRESHOLD = 0.35
"""Activation above which a pixel is tumour (seed 004, section 4: .35 * 255 on 8-bit activation maps)."""

RECIPE: dict[str, str | float | int] = {"optimizer": "rmsprop", "lr": 1e-3, "batch_size": 7}
"""The paper's training recipe (section 3.2, Implementation): RMSprop, learning rate .001, mini-batch size 7."""

_EPS = 1e-4


def pooling_transfer(x: torch.Tensor, alpha: float = 0.1, beta: float = 5.0, gamma: float = 1e-3) -> torch.Tensor:
    """The pooling neuron's transfer function (seed 004, section 3.2):
    ``sigma(x) = alpha * (2 / (1 + exp(-beta * x / alpha)) - 1) + gamma * x``.

    A sigmoid-like curve with ``sigma(0) = 0`` that saturates at ``alpha`` plus a small linear gain ``gamma * x``
    against vanishing gradients. Computed as ``alpha * tanh(beta * x / (2 * alpha)) + gamma * x``, the same function
    without overflow of ``exp`` for large negative ``x``."""
    return alpha * torch.tanh(beta * x / (2.0 * alpha)) + gamma * x


def _valid_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of ``(B, H, W)`` values over the valid pixels; a sample without valid pixels gives 0.
    Computed in float32, so a fraction under bfloat16 autocast is not rounded to three significant digits."""
    values = values.float()
    if valid is None:
        return values.flatten(1).mean(dim=1)
    if valid.shape != values.shape:
        raise ValueError(f"valid mask of shape {tuple(valid.shape)} does not match maps of shape {tuple(values.shape)}")
    mask = valid.float()
    return (values * mask).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1).clamp_min(1.0)


def thresholded_fraction(
    maps: torch.Tensor, valid: torch.Tensor | None = None, threshold: float = PIXEL_THRESHOLD
) -> torch.Tensor:
    """Per-sample fraction of valid pixels whose activation exceeds ``threshold``: the tumour content that the
    paper's ROC thresholds (seed 004, section 4, Figure S3). Works on maps stitched from windows as well."""
    return _valid_mean(maps > threshold, valid)


def mask_background(x: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
    """A copy of the input ``(B, C, H, W)`` whose spectra outside ``tissue`` (``(B, H, W)``, True where a sample
    is) are NaN: the background masked in the input itself (seed 004, section 2), so that a training loop that
    passes images only still pools over tissue (:func:`tissue_of`)."""
    if tissue.shape != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"tissue mask of shape {tuple(tissue.shape)} does not match input of shape {tuple(x.shape)}")
    return x.masked_fill(~tissue.to(device=x.device, dtype=torch.bool)[:, None], float("nan"))


def tissue_of(x: torch.Tensor) -> torch.Tensor | None:
    """``(B, H, W)`` True where every channel of the input is finite (tissue), or None when no pixel is masked
    (then every pixel counts, as for an unmasked image)."""
    finite = torch.isfinite(x).all(dim=1)
    return None if bool(finite.all()) else finite


class PoolingNeuron(nn.Module):
    """The pooling neuron ``p`` (seed 004, section 3.1, Figure 2): the fraction of active pixels of the activation
    map, over the valid (tissue) pixels, passed through ``pooling_transfer`` (section 3.2)."""

    def __init__(self, alpha: float = 0.1, beta: float = 5.0, gamma: float = 1e-3) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = alpha, beta, gamma

    def forward(self, maps: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return pooling_transfer(_valid_mean(maps, valid), self.alpha, self.beta, self.gamma)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}"


def _double_conv(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    """Two 3x3 'same' convolutions, each followed (optionally by batch norm and) by SoftPlus (section 3.2)."""
    layers: list[nn.Module] = []
    for c in (cin, cout):
        layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.Softplus())
    return nn.Sequential(*layers)


class CompSegNet(nn.Module):
    """A U-Net (Ronneberger 2015) with ``in_chans`` inputs, a sigmoid activation map, and the pooling neuron ``p``."""

    def __init__(
        self,
        in_chans: int,
        base: int = 16,
        depth: int = 3,
        batch_norm: bool = False,
        alpha: float = 0.1,
        beta: float = 5.0,
        gamma: float = 1e-3,
    ) -> None:
        super().__init__()
        if depth < 1 or base < 1 or in_chans < 1:
            raise ValueError(f"need in_chans, base and depth >= 1, got {in_chans}, {base}, {depth}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha is a share of tumour pixels in (0, 1), got {alpha}")
        self.depth = depth
        widths = [base * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList(
            _double_conv(cin, cout, batch_norm) for cin, cout in zip([in_chans, *widths[:-1]], widths, strict=True)
        )
        self.downsample = nn.MaxPool2d(2)
        levels = list(reversed(range(depth)))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in levels)
        self.dec = nn.ModuleList(_double_conv(2 * widths[i], widths[i], batch_norm) for i in levels)
        self.head = nn.Conv2d(base, 1, 1)
        nn.init.constant_(self.head.bias, math.log(alpha / (1.0 - alpha)))
        self.pool = PoolingNeuron(alpha, beta, gamma)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """The activation map ``a = sigmoid(head(U-Net(x)))``, ``(B, H, W)`` in [0, 1] at the input's size; 0 on
        masked background (non-finite spectra, :func:`mask_background`), which the U-Net sees as zeros.

        This raw map is the segmentation: pixels above ``PIXEL_THRESHOLD`` are tumour (section 4). The heatmap
        method ``compsegnet`` min-max normalises it for display, which loses that absolute scale, so evaluation
        thresholds ``segment``, not the displayed map."""
        step = 2**self.depth
        if x.ndim != 4 or x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(
                f"CompSegNet with depth {self.depth} needs a batch (B, C, H, W) with H and W divisible by {step}, "
                f"got shape {tuple(x.shape)}; crop or pad the input"
            )
        tissue = tissue_of(x)
        if tissue is not None:
            x = torch.where(tissue[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        skips = []
        for block in self.down[:-1]:
            x = block(x)
            skips.append(x)
            x = self.downsample(x)
        x = self.down[-1](x)
        for up, block, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = block(torch.cat([skip, up(x)], dim=1))
        maps = torch.sigmoid(self.head(x))[:, 0]
        return maps if tissue is None else maps * tissue

    def pooled(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The pooling neuron's output ``o(I)``, ``(B,)`` (sections 3.1-3.2), over the tissue pixels: ``valid``
        where given, else the input's unmasked pixels (:func:`tissue_of`; all of them for an unmasked input)."""
        return self.pool(self.segment(x), _tissue(x, valid))

    def loss(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``mean_j |o(I_j) - alpha * l(j)|`` over the batch (section 3.2; the paper sums, same minimiser).
        ``y`` holds the 0/1 sample labels ``(B,)``; ``valid`` the tissue pixels ``(B, H, W)``, default: the
        input's unmasked pixels (every pixel of an unmasked input)."""
        return (self.pooled(x, valid) - self.pool.alpha * y.to(x.dtype)).abs().mean()

    def tumor_fraction(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Fraction of tissue pixels above ``PIXEL_THRESHOLD``, ``(B,)``: the paper's sample score (section 4);
        tissue as in :meth:`pooled`."""
        return thresholded_fraction(self.segment(x), _tissue(x, valid))

    def _logits(self, maps: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``logit(clamp(tumour fraction))`` as ``(B, 1)``, with the gradient of the soft fraction's logit."""
        hard = torch.logit(thresholded_fraction(maps, valid).clamp(_EPS, 1 - _EPS))
        soft = torch.logit(_valid_mean(maps, valid).clamp(_EPS, 1 - _EPS))
        return (hard + (soft - soft.detach()))[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 1)`` whose sigmoid is the tumour fraction of the tissue (clamped to [1e-4, 1 - 1e-4])."""
        return self._logits(self.segment(x), tissue_of(x))

    def activation_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The activation map ``(B, H, W)`` and the logits of the same pass, for the ``compsegnet`` heatmap."""
        maps = self.segment(x)
        return maps, self._logits(maps, tissue_of(x))


def _tissue(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor | None:
    """The tissue pixels: ``valid`` where given, else those of the input (:func:`tissue_of`)."""
    return valid if valid is not None else tissue_of(x)


@register_model("compsegnet", target_layer=lambda model: model.dec[-1], cam_layers=lambda model: [model.dec[-1]])
def compsegnet(
    in_chans: int = 450,
    num_classes: int = 1,
    pretrained_file: str | None = None,
    base: int = 16,
    depth: int = 3,
    batch_norm: bool = False,
    alpha: float = 0.1,
    beta: float = 5.0,
    gamma: float = 1e-3,
) -> nn.Module:
    """CompSegNet (seed 004): U-Net + pooling neuron, weakly supervised tumour segmentation from sample labels."""
    if num_classes != 1:
        raise ValueError(f"CompSegNet has one output (the tumour fraction), got num_classes={num_classes}")
    model = CompSegNet(in_chans, base, depth, batch_norm, alpha, beta, gamma)
    if pretrained_file:
        model.load_state_dict(load_state_dict(pretrained_file))
    return model
