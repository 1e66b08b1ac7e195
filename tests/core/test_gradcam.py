import numpy as np
import pytest
import torch
from torch import nn

from core.heatmaps import colorize, get_method, list_methods, overlay
from core.models import create_model, get_spec


class Spotlight(nn.Module):
    """One conv channel that copies the input; the logit is its mean. Grad-CAM must light up the bright spot."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def test_gradcam_finds_the_evidence_per_image_in_a_batch():
    model = Spotlight().eval()
    x = torch.zeros(2, 1, 32, 32)
    x[0, 0, 2:8, 2:8] = 1.0
    x[1, 0, 20:30, 22:30] = 1.0
    with get_method("gradcam")(model, model.conv) as cam:
        result = cam(x)
    assert result.maps.shape == (2, 32, 32) and result.maps.dtype == np.float32
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    assert result.maps[0, 4, 4] > 0.9 and result.maps[0, 25, 25] < 0.1
    assert result.maps[1, 25, 25] > 0.9 and result.maps[1, 4, 4] < 0.1


def test_negative_target_explains_the_other_class():
    model = Spotlight().eval()
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, :4, :4] = 1.0
    with get_method("gradcam")(model, model.conv) as cam:
        positive = cam(x, targets=[1]).maps[0]
        negative = cam(x, targets=[0]).maps[0]
    assert positive.max() == 1.0
    assert negative.max() == 0.0  # ReLU removes evidence against the class: nothing argues for class 0


def test_hooks_are_released_even_on_error():
    model = create_model("tiny_cnn", in_chans=1).eval()
    layer = get_spec("tiny_cnn").target_layer(model)
    with pytest.raises(ValueError), get_method("gradcam")(model, layer) as cam:
        assert len(layer._forward_hooks) == 1
        cam(torch.randn(2, 1, 32, 32), targets=[1])  # two images, one target
    assert len(layer._forward_hooks) == 0
    assert all(p.grad is None for p in model.parameters())


def test_outside_context_is_an_error_and_registry_lists_gradcam():
    model = create_model("tiny_cnn", in_chans=1).eval()
    with pytest.raises(RuntimeError, match="context manager"):
        get_method("gradcam")(model, model.features[-1])(torch.randn(1, 1, 32, 32))
    assert "gradcam" in list_methods()
    with pytest.raises(KeyError, match="available"):
        get_method("nope")


def test_colorize_and_overlay():
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None].repeat(8, 0)
    picture = colorize(ramp)
    assert picture.shape == (8, 64, 3) and picture.dtype == np.uint8
    assert not np.array_equal(picture[0, 0], picture[0, -1])
    blended = overlay(np.zeros((8, 64), np.float32), ramp, alpha=1.0)
    assert np.array_equal(blended, picture)
    with pytest.raises(ValueError):
        overlay(np.zeros((4, 4)), ramp)


def test_graph_only_from_the_target_layer_gives_the_full_graph_maps_and_restores_grad_mode():
    torch.manual_seed(0)
    model = create_model("tiny_cnn", in_chans=1).eval()
    layer = get_spec("tiny_cnn").target_layer(model)
    x = torch.randn(3, 1, 48, 48)
    kept = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.__setitem__("a", out))
    logits = model(x)
    (gradient,) = torch.autograd.grad(logits[:, 0].sum(), kept["a"])
    handle.remove()
    reference = torch.relu((gradient.mean((2, 3), keepdim=True) * kept["a"]).sum(1)).detach().numpy()
    with torch.no_grad(), get_method("gradcam")(model, layer) as cam:
        result = cam(x)
        assert not torch.is_grad_enabled()
    np.testing.assert_allclose(result.raw, reference, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.logits[:, 0], logits[:, 0].detach().numpy(), rtol=1e-6)
