"""Batch-norm folding: an inference copy of a model with every eval-mode BatchNorm merged into its convolution.

A convolution followed by batch normalisation with frozen statistics is one affine map, so
``W' = W * gamma / sqrt(var + eps)`` and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta`` compute the same
function with one pass over memory less per layer. timm's ``BatchNormAct2d`` keeps its activation (and dropout) after
the fold. Pairs are found as a Conv2d immediately followed by a BatchNorm2d among a module's children, which is how
timm's EfficientNets and the tiny test CNN are written; the copy is checked against the original on a probe input by
the caller (:func:`folded_copy`), and the original model is never modified.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_batchnorm", "folded_copy"]


def _activation_of(norm: nn.BatchNorm2d) -> nn.Module:
    drop, act = getattr(norm, "drop", None), getattr(norm, "act", None)
    parts = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` (in eval mode) with conv + batch-norm pairs folded, and the number of pairs."""
    folded = copy.deepcopy(model).eval()
    pairs = 0
    for parent in folded.modules():
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = parent._modules[first], parent._modules[second]
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)):
                continue
            if norm.running_mean is None or norm.running_var is None or conv.out_channels != norm.num_features:
                continue
            with torch.no_grad():
                scale = torch.rsqrt(norm.running_var + norm.eps)
                if norm.affine:
                    scale = scale * norm.weight
                shift = norm.bias if norm.affine else torch.zeros_like(scale)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
                conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
                conv.bias = nn.Parameter((bias - norm.running_mean) * scale + shift)
            parent._modules[second] = _activation_of(norm)
            pairs += 1
    return folded, pairs


def folded_copy(model: nn.Module, probe: torch.Tensor, rtol: float = 1e-4) -> nn.Module:
    """The folded copy when it reproduces ``model(probe)`` to ``rtol`` of the output's scale, else ``model``.

    The scale is the largest output magnitude, and at least 1: outputs are logits or scores, for which an error of
    ``rtol`` (1e-4, i.e. at most 2.5e-5 in a sigmoid probability) is far below anything that shows, while a fold's
    float rounding (about 1e-7 relative) can exceed ``rtol`` of an output that happens to lie near 0."""
    folded, pairs = fold_batchnorm(model)
    if pairs == 0:
        return model
    with torch.inference_mode():
        reference, candidate = model(probe).float(), folded(probe).float()
    scale = max(float(reference.abs().max()), 1.0)
    return folded if float((candidate - reference).abs().max()) <= rtol * scale else model
