"""MLCAM-LICI: multi-layer class activation maps with lateral inhibition and collateral integration (seed 000).

Weakly supervised localisation of glioma diagnostic features in CLE frames from image-level labels only
(diagnostic D / nondiagnostic N). The paper's customised Caffe CNN is not specified; here a small VGG-like stack:
three stages of two 3x3 conv-BN-ReLU blocks, each ending in 2x2 max-pooling, with ``width``, ``2 width``,
``4 width`` channels, so the three depths z1, z2, z3 (the stage outputs) have strides 2, 4 and 8 (64, 32 and 16 px
maps at 128 px; receptive fields of about 6, 16 and 36 px). The shallow map keeps the spatial resolution the paper
wants for fine (restrictive) features, the deep one the predictive power.

Section 2.1 (eqs. 1-4), per depth z_j:

- one 1x1 convolution without bias, 2 output channels: channel 1 is the diagnostic map
  ``DFM(x, y, z_j) = sum_k w_k1 f_k(x, y, z_j)`` (eq. 1), channel 0 the nondiagnostic map NFM with weights w_k0
  (eq. 2);
- class scores S_D, S_N by global pooling of DFM and NFM (eqs. 3-4). Eq. 3 writes a sum over (x, y) while the text
  says GAP; we take the mean (GAP), so the three depths' scores share one scale whatever their resolution;
- each depth's (S_N, S_D) goes through its own two-class softmax and multinomial logistic loss. :meth:`MLCAMLICI.loss`
  is the sum of the three losses (Caffe adds loss layers of weight 1), each averaged over the batch.

The positive logit of the app's contract, ``model(x) -> (B, 1)``, is the mean over the depths of ``S_D - S_N``, the
logit of each depth's two-class softmax; sigmoid of it is the normalised geometric mean of the three depths' odds
(a product of experts), not the mean of their probabilities.

Section 2.2 (eq. 5): DFM' and NFM' are each depth's map upsampled bilinearly to the input size, then normalised:
ReLU and per-image min-max to [0, 1] (a map with no positive activation becomes zeros). ReLU because the paper's
lateral inhibition suppresses DFM where NFM is also *activated* (positive) and because the 0.03 / 0.2 segmentation
thresholds only make sense on maps whose background is exactly zero; min-max is CAM's normalisation. Lateral
inhibition (LI) is ``DFM'_i - DFM'_i NFM'_i``; collateral integration (CI) multiplies it across depths:
``FDFM = sum_{i != j} [DFM'_i - DFM'_i NFM'_i] [DFM'_j - DFM'_j NFM'_j]`` over ordered pairs, then min-max normalised
per image. :func:`final_dfm` implements eq. 5 and its ablations on normalised maps, :meth:`MLCAMLICI.fdfm` on images.

The classification loss only sees ``DFM - NFM`` (through ``w_k1 - w_k0``), so ``w_k1 + w_k0``, the part the two maps
share, is trained by nothing but its initialisation and the feature updates, exactly as in the paper's design; LI
therefore acts where both maps are positive after training, which is what the paper calls the model's confusion.

Ablations of Table 2 (:data:`ABLATIONS`) are inference-time variants of one trained network: M2 (LI + CI, eq. 5),
M3 (no LI), M4-M6 (LI, one depth, no CI), M7-M9 (one depth's DFM' alone); the depths are numbered shallow to deep
(M4 and M7 use z1, M6 and M9 use z3), which the paper does not state. The paper trained its ablated models ("All
models were trained and tested on the same data with the same parameters"), so two builder options make the other
networks of Table 2 and Fig. 2:

- ``depth=k`` (1-3): MLCAM_k (Fig. 2, top), the stages up to z_k with one DFM/NFM head at z_k, trained on that
  depth's loss alone; its map with LI is a trained M4-M6, without LI a trained M7-M9 (:meth:`MLCAMLICI.fdfm` takes
  the depth numbers of the full network, so the Table 2 ablations apply to it unchanged).
- ``pooling="combined"``: M1, MLGAP (Fig. 2, bottom, after Kim et al.): the three depths' DFM/NFM maps upsampled to
  z1's resolution and summed before one GAP and one softmax loss; its map is that combined DFM (ReLU, min-max), with
  no LI or CI.

M10 (plain CAM on a standard backbone) is a ResNet-18 trained by the same recipe (``services.localization``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.models.checkpoint import load_state_dict
from core.models.registry import register_model

__all__ = [
    "ABLATIONS",
    "INTERMEDIATE_THRESHOLD",
    "MLCAMLICI",
    "POOLINGS",
    "RECIPE",
    "RESTRICTIVE_THRESHOLD",
    "final_dfm",
    "mlcam_lici",
    "normalise_map",
]

POOLINGS = ("each", "combined")
"""How the class scores pool the maps: each depth on its own (MLCAM-LICI, MLCAM_k) or combined first (MLGAP, M1)."""

INTERMEDIATE_THRESHOLD = 0.03
"""Threshold on the normalised FDFM segmenting intermediate (medium-sized) features (seed 000, section 3)."""

RESTRICTIVE_THRESHOLD = 0.2
"""Threshold on the normalised FDFM segmenting restrictive (small, fine) features (seed 000, section 3)."""

RECIPE: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.9,
    "step_size": 500,
    "gamma": 0.9,
    "batch_size": 15,
}
"""The paper's training recipe (seed 000, section 3): SGD, initial learning rate 1e-3, momentum 0.9, the rate
multiplied by 0.9 every 500 iterations, batches of 15 images, no crop or rotation augmentation (22,000 iterations,
best validation loss kept). ``core.train`` implements it as the ``mlcam`` recipe."""

ABLATIONS: dict[str, dict[str, Any]] = {
    "M2 (LI+CI)": {"layers": (0, 1, 2), "lateral_inhibition": True, "collateral_integration": True},
    "M3 (no LI)": {"layers": (0, 1, 2), "lateral_inhibition": False, "collateral_integration": True},
    "M4 (LI, layer 1)": {"layers": (0,), "lateral_inhibition": True, "collateral_integration": False},
    "M5 (LI, layer 2)": {"layers": (1,), "lateral_inhibition": True, "collateral_integration": False},
    "M6 (LI, layer 3)": {"layers": (2,), "lateral_inhibition": True, "collateral_integration": False},
    "M7 (layer 1)": {"layers": (0,), "lateral_inhibition": False, "collateral_integration": False},
    "M8 (layer 2)": {"layers": (1,), "lateral_inhibition": False, "collateral_integration": False},
    "M9 (layer 3)": {"layers": (2,), "lateral_inhibition": False, "collateral_integration": False},
}
"""Table 2's ablated models M2-M9 as :meth:`MLCAMLICI.fdfm` keyword arguments (layers 1-3 are z1-z3, shallow to
deep). M1 (MLGAP) and M10 (plain CAM) are other networks, not variants of this one."""


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max of ``(B, H, W)`` maps to [0, 1]; constant maps become zeros."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = flat.max(dim=1).values[:, None, None] - low
    return torch.where(span > 1e-12, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def normalise_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """DFM' or NFM' of eq. 5: ``(B, h, w)`` raw maps upsampled bilinearly (align_corners=False) to ``size``, ReLU'd
    and min-max normalised per image to [0, 1] (zeros where nothing is positive)."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _minmax(torch.relu(maps))


def final_dfm(
    dfm: Sequence[torch.Tensor], nfm: Sequence[torch.Tensor] | None = None, collateral_integration: bool = True
) -> torch.Tensor:
    """The final diagnostic feature map (seed 000, eq. 5) and its ablations, from normalised maps DFM'_i, NFM'_i
    (``(B, H, W)`` in [0, 1], one per depth used).

    Each depth contributes ``DFM'_i - DFM'_i NFM'_i`` (lateral inhibition), or ``DFM'_i`` when ``nfm`` is None.
    With collateral integration the contributions are multiplied over ordered pairs of depths i != j and summed,
    which needs at least two depths; without it exactly one depth is used. The result is min-max normalised per
    image (constant maps become zeros)."""
    if nfm is not None and len(nfm) != len(dfm):
        raise ValueError(f"{len(dfm)} DFMs but {len(nfm)} NFMs")
    terms = list(dfm) if nfm is None else [d - d * n for d, n in zip(dfm, nfm, strict=True)]
    if not collateral_integration:
        if len(terms) != 1:
            raise ValueError(f"without collateral integration exactly one layer is used, got {len(terms)}")
        return _minmax(terms[0])
    if len(terms) < 2:
        raise ValueError(f"collateral integration needs at least two layers, got {len(terms)}")
    # Each unordered pair appears twice among the ordered pairs i != j of eq. 5.
    total = sum(2.0 * terms[i] * terms[j] for i in range(len(terms)) for j in range(i + 1, len(terms)))
    return _minmax(total)


def _stage(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU blocks and a 2x2 max-pool (flat, so batch-norm folding finds the conv-BN pairs)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class MLCAMLICI(nn.Module):
    """MLCAM-LICI (seed 000, section 2): a three-stage CNN with a DFM/NFM 1x1 convolution at each stage output."""

    def __init__(self, in_chans: int = 1, width: int = 32, depth: int = 0, pooling: str = "each") -> None:
        super().__init__()
        if depth not in (0, 1, 2, 3):
            raise ValueError(f"depth must be 0 (all three depths) or a single depth 1-3, not {depth!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        if pooling == "combined" and depth:
            raise ValueError("MLGAP (pooling='combined') combines all three depths; it takes no single depth")
        channels = [width, 2 * width, 4 * width][: depth or 3]
        inputs = [in_chans, *channels[:-1]]
        self.depths = (depth - 1,) if depth else (0, 1, 2)
        self.pooling = pooling
        self.stages = nn.ModuleList(_stage(cin, cout) for cin, cout in zip(inputs, channels, strict=True))
        # Output channel 0 is NFM (weights w_k0, eq. 2), channel 1 DFM (w_k1, eq. 1); no bias, as in the equations.
        self.heads = nn.ModuleList(nn.Conv2d(channels[k], 2, 1, bias=False) for k in self.depths)
        for module in self.stages.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each head's ``(B, 2, h_i, w_i)`` NFM/DFM pair, shallow to deep."""
        maps = []
        for k, stage in enumerate(self.stages):
            x = stage(x)
            if k in self.depths:
                maps.append(self.heads[self.depths.index(k)](x))
        return maps

    def _pooled(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The maps the class scores pool: each head's own, or (MLGAP) their sum at the shallowest map's size."""
        if self.pooling == "each":
            return list(maps)
        size = tuple(maps[0].shape[-2:])
        return [sum(F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False) for m in maps)]

    def _scores(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, pooled maps, 2)`` class scores (S_N, S_D) by global average pooling (eqs. 3-4, mean for the
        sum): one per depth, or one of the combined map (MLGAP)."""
        return torch.stack([m.float().mean(dim=(2, 3)) for m in self._pooled(maps)], dim=1)

    @staticmethod
    def _logit(scores: torch.Tensor) -> torch.Tensor:
        """``(B, 1)``: the mean over depths of S_D - S_N, each depth's two-class softmax logit."""
        return (scores[..., 1] - scores[..., 0]).mean(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1)`` logit of the diagnostic class."""
        return self._logit(self._scores(self._maps(x)))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The paper's training loss: one softmax + multinomial logistic loss per depth on (S_N, S_D), each averaged
        over the batch, summed over the depths (one loss for MLCAM_k and for MLGAP's combined scores). ``y`` is 1 for
        diagnostic, 0 for nondiagnostic."""
        scores = self._scores(self._maps(x))
        target = y.reshape(-1).long()
        return sum(F.cross_entropy(scores[:, depth], target) for depth in range(scores.shape[1]))

    def layer_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The ``(B, 1)`` logits and the raw DFMs and NFMs (eqs. 1-2) per head (the depths in ``self.depths``),
        ``(B, h_i, w_i)``, shallow to deep, from one forward pass."""
        maps = self._maps(x)
        return self._logit(self._scores(maps)), [m[:, 1] for m in maps], [m[:, 0] for m in maps]

    def fdfm(
        self,
        x: torch.Tensor,
        layers: Sequence[int] | None = None,
        lateral_inhibition: bool = True,
        collateral_integration: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final DFM (eq. 5) or one of Table 2's ablations (:data:`ABLATIONS`) at input resolution,
        ``(B, H, W)`` in [0, 1], and the ``(B, 1)`` logits of the same pass. ``layers`` picks depths of the full
        network (0 = z1; default: every depth this network has a head at), ``collateral_integration`` defaults to
        "when more than one depth". MLGAP's map is its combined DFM: it takes no layers, LI or CI."""
        size = (x.shape[-2], x.shape[-1])
        if self.pooling == "combined":
            if layers is not None or collateral_integration:
                raise ValueError("MLGAP's map is its combined DFM; it has no per-depth ablations")
            maps = self._maps(x)
            return normalise_map(self._pooled(maps)[0][:, 1], size), self._logit(self._scores(maps))
        layers = self.depths if layers is None else tuple(layers)
        if not layers or len(set(layers)) != len(layers) or not all(k in self.depths for k in layers):
            raise ValueError(f"layers must be distinct depths among {self.depths} (this network's heads), got {layers}")
        logits, dfm, nfm = self.layer_maps(x)
        heads = [self.depths.index(k) for k in layers]
        dfm_n = [normalise_map(dfm[h], size) for h in heads]
        nfm_n = [normalise_map(nfm[h], size) for h in heads] if lateral_inhibition else None
        integrate = len(layers) > 1 if collateral_integration is None else collateral_integration
        return final_dfm(dfm_n, nfm_n, integrate), logits


@register_model("mlcam_lici", target_layer=lambda model: model.stages[-1], cam_layers=lambda model: list(model.stages))
def mlcam_lici(
    in_chans: int = 1,
    num_classes: int = 1,
    pretrained_file: str | None = None,
    width: int = 32,
    depth: int = 0,
    pooling: str = "each",
) -> nn.Module:
    """MLCAM-LICI weakly supervised localiser, seed 000 (about 287 k parameters at width 32, grey input); ``depth``
    1-3 makes MLCAM_k (one depth), ``pooling="combined"`` MLGAP (M1)."""
    if num_classes != 1:
        raise ValueError(f"MLCAM-LICI is a diagnostic / nondiagnostic model with one logit, not {num_classes} classes")
    model = MLCAMLICI(in_chans, width, depth, pooling)
    if pretrained_file:
        model.load_state_dict(load_state_dict(pretrained_file))
    return model
