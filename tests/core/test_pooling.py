"""pool="max": the call rests on the location the classifier scores highest (Oquab et al. 2015), and Grad-CAM and
CAM both peak there."""

import numpy as np
import pytest
import torch

from core.heatmaps import get_method
from core.models import create_model, get_spec, load_checkpoint, save_checkpoint
from core.models.fold import folded_copy

pytestmark = pytest.mark.usefixtures("one_thread")


def _location_scores(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    features = model.forward_features(x)
    classifier = model.get_classifier()
    return torch.einsum("bchw,c->bhw", features, classifier.weight[0]) + classifier.bias[0]


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_the_logit_is_the_best_location_score_and_both_maps_peak_there(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, in_chans=1, output_stride=16, pool="max").eval()
    x = torch.randn(3, 1, 96, 96)
    with torch.no_grad():
        scores = _location_scores(model, x)
        logits = model(x)[:, 0]
    torch.testing.assert_close(logits, scores.flatten(1).amax(1))
    average = create_model(name, in_chans=1, output_stride=16).eval()
    average.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("global_pool.")})
    with torch.no_grad():
        assert not torch.allclose(average(x)[:, 0], logits)  # the same weights pooled by average give another call

    best = scores.flatten(1).argmax(1).numpy()
    for method in ("gradcam", "cam"):
        with get_method(method)(model, get_spec(name).layers(model)) as explainer:
            result = explainer(x)
        np.testing.assert_allclose(result.logits[:, 0], logits.numpy(), rtol=1e-5, atol=1e-5)
        assert result.raw.shape[-2:] == (6, 6)
        np.testing.assert_array_equal(result.raw.reshape(3, -1).argmax(1), best)

    folded = folded_copy(model, x[:1])
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    config = {"architecture": name, "in_chans": 1, "model_kwargs": {"output_stride": 16, "pool": "max"}}
    checkpoint = save_checkpoint(model, config, tmp_path / name)
    reloaded, _ = load_checkpoint(checkpoint.path, checkpoint.sha256)
    assert reloaded.global_pool.classifier is reloaded.get_classifier()  # still one classifier after loading
    torch.testing.assert_close(reloaded(x), model(x))


def test_only_the_decisive_location_gets_a_gradient():
    torch.manual_seed(1)
    model = create_model("resnet18", in_chans=1, pool="max").train()
    features = torch.rand(2, 512, 3, 3, requires_grad=True)
    model.forward_head(features).sum().backward()
    touched = (features.grad.abs().sum(1) > 0).flatten(1)
    assert touched.sum(1).tolist() == [1, 1]


def test_refusals():
    with pytest.raises(ValueError, match="pool must be one of avg, max"):
        create_model("resnet18", in_chans=1, pool="mean")
    with pytest.raises(ValueError, match="one-logit classifier"):
        create_model("efficientnet_b0", in_chans=1, num_classes=2, pool="max")
