"""Score-CAM (Wang et al., CVPR Workshops 2020, section 3, eqs. 3-6), batched.

Each channel A^k of the target layer is upsampled to the input size (bilinear, ``align_corners=True``), min-max
normalised to a mask ``H^k`` (``(A - min) / (max - min + 1e-8)``), and the input is scored with that mask applied:
``S^k = f_c(X ∘ H^k)``. The channel weights are the softmax of those scores over the channels (eq. 5, the
"softmax over raw logits" convention of pytorch-grad-cam), and the map is ``ReLU(sum_k alpha_k A^k)`` (eq. 6),
normalised with the shared conventions. The RCM-mosaic paper (seed 002) uses it as its second map.

One forward pass per channel and image: 1,280 for EfficientNet-B0. They are run in batches of ``batch_size``
masked inputs taken across the channels of all images in the batch, under ``torch.inference_mode``, in the
memory format of the model's weights (channels_last where the model is), on a copy of the model with batch norm
folded into the convolutions (:mod:`core.models.fold`; checked against the model on the unmasked input, and not
used when it differs by more than 1e-4 of the logits' scale). Channels whose map is constant give an
all-zero mask and so the same score: it is computed once per batch instead of once per channel. On a GPU,
``amp=True`` runs the masked passes in bfloat16 (faster, maps within about 1e-2 of float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.heatmaps.base import Explainer, HeatmapResult, as_numpy, fuse, register_method, target_scores
from core.models.fold import folded_copy

__all__ = ["ScoreCAM"]


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last unless a convolution weight is unambiguously stored contiguous. Weights with one input
    channel per group or 1 x 1 kernels (all of EfficientNet-B0's on one-channel input) are the same bytes in both
    layouts, and channels_last activations are the faster choice for such networks on CPUs and GPUs."""
    for parameter in model.parameters():
        if parameter.ndim == 4 and parameter.shape[1] > 1 and parameter.shape[2] * parameter.shape[3] > 1:
            if parameter.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
            return torch.contiguous_format
    return torch.channels_last


@register_method("scorecam", title="Score-CAM")
class ScoreCAM(Explainer):
    """Score-CAM: channels weighted by the score of the input masked with them (Wang et al. 2020), batched."""

    def __init__(
        self,
        model: nn.Module,
        layers: nn.Module | Sequence[nn.Module] | None = None,
        batch_size: int | None = None,
        amp: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__(model, layers)
        self.batch_size = batch_size
        self.amp = amp
        self.progress = progress

    def _attach(self) -> None:
        self._features: torch.Tensor | None = None
        self._keeping = False
        self._hook(self.target_layer.register_forward_hook(self._keep))

    def _keep(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if self._keeping:  # only the unmasked pass; the masked passes need no activations
            self._features = output.detach().float()

    def explain(self, x: torch.Tensor, targets: Sequence[int] | None) -> HeatmapResult:
        self._features, self._keeping = None, True
        with torch.inference_mode():
            try:
                logits = self.model(x)
            finally:
                self._keeping = False
            activations, self._features = self._features, None
            if activations is None:
                raise RuntimeError("the target layer was not reached by the forward pass")
            scores = self._channel_scores(folded_copy(self.model, x), x, activations, targets)
            weights = torch.softmax(scores, dim=1)
            raw = torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations))
            maps = fuse([raw], tuple(x.shape[-2:]))
        return HeatmapResult(as_numpy(maps), as_numpy(raw), as_numpy(logits))

    def _channel_scores(
        self, model: nn.Module, x: torch.Tensor, activations: torch.Tensor, targets: Sequence[int] | None
    ) -> torch.Tensor:
        """``(B, K)`` target scores of the input masked by each upsampled, normalised channel."""
        batch, channels = activations.shape[:2]
        size = tuple(x.shape[-2:])
        device = x.device
        chosen = list(targets) if targets is not None else [1] * batch
        if len(chosen) != batch:
            raise ValueError(f"{len(chosen)} targets given for a batch of {batch}")
        chunk = self.batch_size or (64 if device.type == "cuda" else 16)
        memory_format = _memory_format(model)
        flat = activations.reshape(batch * channels, 1, *activations.shape[-2:])
        low = flat.amin(dim=(1, 2, 3))
        high = flat.amax(dim=(1, 2, 3))
        varying = (high > low).nonzero()[:, 0]  # constant channels give an all-zero mask
        scores = torch.empty(batch * channels, device=device)
        image_of = torch.arange(batch * channels, device=device) // channels
        target_of = torch.as_tensor(chosen, device=device)[image_of]
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp and device.type == "cuda")
        with autocast:
            if len(varying) < batch * channels:
                zero_logits = model(torch.zeros_like(x[:1])).float()
                constant = (high <= low).nonzero()[:, 0]
                scores[constant] = target_scores(zero_logits.expand(len(constant), -1), target_of[constant].tolist())
            total = len(varying)
            for start in range(0, total, chunk):
                index = varying[start : start + chunk]
                masks = F.interpolate(flat[index], size=size, mode="bilinear", align_corners=True)
                lowest = masks.amin(dim=(2, 3), keepdim=True)  # of the upsampled map, as the peer does
                masks = (masks - lowest) / (masks.amax(dim=(2, 3), keepdim=True) - lowest + 1e-8)
                masked = (x[image_of[index]] * masks).contiguous(memory_format=memory_format)
                out = model(masked).float()
                scores[index] = target_scores(out, target_of[index].tolist())
                if self.progress:
                    self.progress(min(start + chunk, total), total)
        return scores.view(batch, channels)
