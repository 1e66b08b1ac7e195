"""Batch-norm folding where the Predictor scores without heatmaps: the folded copy gives the model's probabilities,
the shared model is left alone for the heatmaps, and a fold is kept for logits near 0 (tests/core/test_models.py: a
fold that changes the outputs is refused)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit

from core.data.io import Image
from core.data.preprocess import prepare_batch
from core.data.synth_cle import make_cle_clip
from core.models import create_model
from core.models.fold import folded_copy
from core.predict import Predictor

SIZE = 32


def _trained_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Batch-norm statistics that are not the initial 0/1, so that a wrong fold shows."""
    with torch.no_grad():
        model.train()
        for _ in range(4):
            model(torch.rand(16, 1, SIZE, SIZE) * 2 - 0.5)
    return model.eval()


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return _trained_statistics(create_model("tiny_cnn", in_chans=1, width=8))


def _frames(count: int) -> list[Image]:
    frames = make_cle_clip(count, SIZE, seed=6, diagnostic_fraction=0.5).frames
    return [Image(frame, name=f"frame {i}", format="NPY") for i, frame in enumerate(frames)]


def test_scores_without_a_heatmap_come_from_a_folded_copy_with_the_models_probabilities(model) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predictor = Predictor(model, {"modality": "CLE", "image_size": SIZE, "architecture": "tiny_cnn"}, 0.5, "cpu")
    images = _frames(12)
    one_at_a_time = [predictor.diagnose([image], heatmap=None)[0].probability for image in images]
    batched = [d.probability for d in predictor.diagnose(images, heatmap=None, batch_size=5)]

    scorer = predictor._scorer
    assert scorer is not None and scorer is not predictor.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in scorer.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.model.modules())
    assert all(torch.equal(before[k], v) for k, v in predictor.model.state_dict().items())
    with torch.inference_mode():  # the model itself, unfolded, as the heatmap path runs it
        logits = predictor.model(prepare_batch(images, "CLE", SIZE))[:, 0].double().numpy()
    np.testing.assert_allclose(one_at_a_time, expit(logits), rtol=0, atol=1e-6)
    np.testing.assert_allclose(batched, one_at_a_time, rtol=0, atol=1e-6)
    mapped = predictor.diagnose(images[:3], heatmap="gradcam")  # heatmaps still hook the model itself
    np.testing.assert_allclose([d.probability for d in mapped], one_at_a_time[:3], rtol=0, atol=1e-6)
    assert all(d.heatmap is not None for d in mapped)
    assert all(not m._forward_hooks and not m._backward_hooks for m in predictor.model.modules())


@pytest.mark.parametrize("seed", range(4))
def test_a_fold_is_kept_for_logits_near_zero(model, seed: int) -> None:
    probe = torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a logit of 1e-5 left by large terms that cancel: float rounding is far above 1e-4 of it
        model.classifier.weight.mul_(100)
        model.classifier.bias.sub_(model(probe)[0] - 1e-5)
        assert float(model(probe).abs().max()) < 1e-4
    folded = folded_copy(model, probe)
    assert folded is not model and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert float((folded(probe) - model(probe)).abs().max()) < 1e-4


def test_a_model_without_batch_norm_scores_with_itself() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    assert folded_copy(model.eval(), torch.rand(2, 1, SIZE, SIZE)) is model
