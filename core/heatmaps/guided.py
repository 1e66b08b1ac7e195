"""Guided backpropagation (Springenberg et al., ICLR 2015 workshop, section 3.4 and fig. 1) and Guided Grad-CAM
(Selvaraju et al. 2017, section 3.2), with the FL-CNN paper's five views (seed 003, fig. 3).

Guided backpropagation at a ReLU passes a gradient back only where both the forward input and the gradient from
above are positive: ``R_in = 1[x > 0] * 1[R_out > 0] * R_out``. Networks such as EfficientNet use SiLU (and other
smooth rectifiers) instead, where pytorch-grad-cam's guided model replaces only ``nn.ReLU`` modules and so silently
returns the plain input gradient. The rule here, for every rectifier-like activation f (ReLU, ReLU6, LeakyReLU,
ELU, CELU, SELU, SiLU, GELU, Mish, Hardswish, Softplus):

    R_in = max(f'(x), 0) * max(R_out, 0)

which is exactly Springenberg's rule for ReLU (f' = 1[x > 0]) and, for a smooth rectifier, keeps its own local
slope while blocking negative gradient from above and the negative slope of SiLU/GELU below about x = -1.28.
Sigmoid and tanh gates (squeeze-excitation) keep their ordinary gradient: they are gates, not rectifiers.

In-place activations (timm's ``SiLU(inplace=True)``) are run on a copy while guided hooks are attached, so the
derivative is taken at the true input; the model itself is not modified.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from core.heatmaps.base import Explainer, HeatmapResult, as_numpy, minmax, register_method, target_scores
from core.heatmaps.gradcam import GradCAM
from core.heatmaps.render import colorize, overlay, to_uint8

__all__ = ["RECTIFIERS", "GuidedBackprop", "GuidedGradCAM", "five_views", "input_gradient"]

RECTIFIERS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.SiLU,
    nn.GELU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
)


def _slope(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f'(x) of an elementwise activation module, analytic for ReLU and SiLU, by autograd otherwise."""
    if type(module) is nn.ReLU:
        return (x > 0).to(x.dtype)
    if type(module) is nn.SiLU:
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    with torch.enable_grad():
        probe = x.detach().requires_grad_(True)
        inplace = getattr(module, "inplace", False)
        if inplace:
            module.inplace = False  # restored at once; only while computing the slope
        try:
            (slope,) = torch.autograd.grad(module(probe).sum(), probe)
        finally:
            if inplace:
                module.inplace = True
    return slope


class _GuidedRectifier(torch.autograd.Function):
    """Identity on the activation's output forward; the guided rule backward, to the activation's input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(slope.clamp_min(0.0))
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return slope * grad.clamp_min(0.0), None, None


@register_method("guided-backprop", title="Guided backpropagation")
class GuidedBackprop(Explainer):
    """Guided backpropagation to the input (Springenberg et al. 2015), correct for SiLU networks.

    The map is the gradient's magnitude, the maximum of |gradient| over input channels (Simonyan et al. 2014),
    min-max normalised; the signed gradient ``(B, C, H, W)`` is in ``extras["gradient"]``.
    """

    def _attach(self) -> None:
        self._inputs: dict[int, list[torch.Tensor]] = {}
        for module in self.model.modules():
            if isinstance(module, RECTIFIERS):
                self._hook(module.register_forward_pre_hook(self._before))
                self._hook(module.register_forward_hook(self._after))

    def _before(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        self._inputs.setdefault(id(module), []).append(inputs[0])
        if getattr(module, "inplace", False):
            return (inputs[0].clone(), *inputs[1:])
        return None

    def _after(self, module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        x = self._inputs[id(module)].pop()
        if not torch.is_grad_enabled():
            return output
        return _GuidedRectifier.apply(x, output.detach(), _slope(module, x.detach()))

    def gradient(self, x: torch.Tensor, targets: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided gradient of each image's target score with respect to its input, and the logits."""
        self._inputs = {}
        leaf = x.detach().clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                logits = self.model(leaf)
                (gradient,) = torch.autograd.grad(target_scores(logits, targets).sum(), leaf)
        finally:
            self._inputs = {}
        return gradient.detach(), logits.detach()

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        gradient, logits = self.gradient(x, targets)
        raw = gradient.abs().amax(dim=1)
        return HeatmapResult(as_numpy(minmax(raw)), as_numpy(raw), as_numpy(logits), {"gradient": as_numpy(gradient)})


def input_gradient(model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None = None) -> torch.Tensor:
    """The plain (unguided) gradient of the target scores with respect to the input, for comparison."""
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(target_scores(model(leaf), targets).sum(), leaf)
    return gradient.detach()


@register_method("guided-gradcam", title="Guided Grad-CAM")
class GuidedGradCAM(Explainer):
    """Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM (Selvaraju et al. 2017, sec. 3.2).

    Two passes (Grad-CAM, then guided backpropagation: the guided rule must not change Grad-CAM's weights). The
    map is the magnitude of the product (``GCAM saliency``); ``extras`` hold ``gradcam`` (the Grad-CAM map),
    ``gradient`` (guided backpropagation) and ``guided`` (the signed product, ``(B, C, H, W)``), from which
    ``five_views`` draws the FL-CNN figure.
    """

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        with GradCAM(self.model, self.target_layer) as gradcam:
            cam = gradcam(x, targets)
        with GuidedBackprop(self.model) as guided:
            gradient, _ = guided.gradient(x, targets)
        cam_map = torch.from_numpy(cam.maps).to(gradient.device)
        product = gradient * cam_map[:, None]
        raw = product.abs().amax(dim=1)
        extras = {"gradcam": cam.maps, "gradient": as_numpy(gradient), "guided": as_numpy(product)}
        return HeatmapResult(as_numpy(minmax(raw)), as_numpy(raw), cam.logits, extras)


def _signed_picture(gradient: np.ndarray) -> np.ndarray:
    """A signed ``(C, H, W)`` gradient as a picture, zero at mid-grey: g / max|g| / 2 + 1/2, as RGB floats."""
    scale = float(np.abs(gradient).max()) or 1.0
    picture = np.moveaxis(gradient / scale * 0.5 + 0.5, 0, -1)
    return picture.repeat(3, axis=-1) if picture.shape[-1] == 1 else picture[..., :3]


def five_views(image: np.ndarray, gradcam: np.ndarray, guided: np.ndarray, alpha: float = 0.5) -> dict[str, np.ndarray]:
    """The FL-CNN paper's five Grad-CAM views (seed 003, fig. 3), as uint8 RGB pictures of one image.

    ``image`` is the displayed image ((H, W) or (H, W, 3) floats in [0, 1]), ``gradcam`` the Grad-CAM map (H, W)
    and ``guided`` the signed Guided Grad-CAM (C, H, W), all in the same frame. Colored GCAM: the signed product as
    colour (zero = grey); GCAM saliency: its magnitude; saliency x image: the image weighted by the saliency; GCAM
    heatmap: Grad-CAM coloured; heatmap x image: the coloured Grad-CAM blended over the image.
    """
    base = np.asarray(image, dtype=np.float32)
    base3 = base[..., None].repeat(3, axis=-1) if base.ndim == 2 else base
    saliency = np.abs(guided).max(axis=0)
    saliency = saliency / (float(saliency.max()) or 1.0)
    return {
        "Colored GCAM": to_uint8(_signed_picture(guided)),
        "GCAM saliency": to_uint8(saliency[..., None].repeat(3, axis=-1)),
        "Saliency × image": to_uint8(base3 * saliency[..., None]),
        "GCAM heatmap": colorize(gradcam),
        "Heatmap × image": overlay(base, gradcam, alpha),
    }
