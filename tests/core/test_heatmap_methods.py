"""Every heatmap method: cross-checked against pytorch-grad-cam, batch-correct, stateless, and sane (Adebayo 2018)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from core.heatmaps import get_method, list_methods, register_model_map
from core.heatmaps.base import _METHODS
from core.heatmaps.guided import GuidedBackprop, input_gradient
from core.models import create_model, get_spec

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget  # noqa: E402

ALL = ["cam", "gradcam", "gradcam-multi", "gradient", "guided-backprop", "guided-gradcam", "scorecam", "celm"]
SIZE = 32


def blob_images(n: int, rng: np.random.Generator, positive: np.ndarray) -> torch.Tensor:
    """Noisy grey images; positives carry one bright 8-px square at a random place."""
    x = rng.normal(0.0, 0.3, size=(n, 1, SIZE, SIZE)).astype(np.float32)
    for i in np.flatnonzero(positive):
        top, left = rng.integers(0, SIZE - 8, size=2)
        x[i, 0, top : top + 8, left : left + 8] += 2.0
    return torch.from_numpy(x)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A tiny CNN trained for a few seconds to find bright squares: realistic logits of several units, so maps that
    disagree show it (a random model's logits are ~1e-4 and hide mismatches)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("tiny_cnn", in_chans=1, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        labels = rng.integers(0, 2, size=32)
        x = blob_images(32, rng, labels)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], torch.from_numpy(labels).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, list[int]]:
    rng = np.random.default_rng(7)
    return blob_images(4, rng, np.array([1, 0, 1, 1])), [1, 0, 1, 0]


def ours(name: str, model: nn.Module, layers, x: torch.Tensor, targets, **options) -> np.ndarray:
    with get_method(name)(model, layers, **options) as explainer:
        return explainer(x, targets).maps


def test_the_model_has_realistic_logits(trained, batch):
    x, _ = batch
    with torch.no_grad():
        logits = trained(x)[:, 0]
    assert logits.abs().max() > 2.0
    assert (logits[[0, 2, 3]] > 0).all() and logits[1] < 0


@pytest.mark.parametrize(
    ("method", "peer"),
    [("cam", "GradCAM"), ("gradcam", "GradCAM"), ("scorecam", "ScoreCAM")],
)
def test_single_layer_maps_agree_with_pytorch_grad_cam(trained, batch, method, peer):
    x, targets = batch
    layer = get_spec("tiny_cnn").target_layer(trained)
    with getattr(pgc, peer)(model=trained, target_layers=[layer]) as reference:
        expected = reference(input_tensor=x, targets=[BinaryClassifierOutputTarget(t) for t in targets])
    got = ours(method, trained, layer, x, targets)
    assert expected.max() == pytest.approx(1.0, abs=1e-6)  # not an all-zero comparison
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_multi_layer_gradcam_agrees_with_pytorch_grad_cam(trained, batch):
    x, targets = batch
    layers = get_spec("tiny_cnn").layers(trained)
    assert len(layers) == 2
    with pgc.GradCAM(model=trained, target_layers=layers) as reference:
        expected = reference(input_tensor=x, targets=[BinaryClassifierOutputTarget(t) for t in targets])
    np.testing.assert_allclose(ours("gradcam-multi", trained, layers, x, targets), expected, atol=1e-4)
    single = ours("gradcam", trained, layers, x, targets)
    assert np.abs(single - expected).max() > 1e-2  # fusing the second layer changes the map


def test_celnet_fusion_weights_the_layers():
    model = create_model("tiny_cnn", in_chans=1, width=8).eval()
    layers = get_spec("tiny_cnn").layers(model)
    x = torch.randn(2, 1, SIZE, SIZE)
    mean = ours("gradcam-multi", model, layers, x, None)
    half = ours("gradcam-multi", model, layers, x, None, fusion="celnet", alpha=0.5)
    deep = ours("gradcam-multi", model, layers, x, None, fusion="celnet", alpha=1.0)
    np.testing.assert_allclose(half, mean, atol=1e-6)
    np.testing.assert_allclose(deep, ours("gradcam", model, layers, x, None), atol=1e-6)
    with pytest.raises(ValueError, match="fusion"):
        get_method("gradcam-multi")(model, layers, fusion="max")


def test_guided_backprop_equals_the_relu_rule_on_relu_networks(trained, batch):
    x, _ = batch
    peer = pgc.GuidedBackpropReLUModel(copy.deepcopy(trained), device="cpu")
    expected = np.stack([peer(x[i : i + 1].clone(), target_category=0) for i in range(len(x))])
    with GuidedBackprop(trained) as guided:
        gradient, _ = guided.gradient(x, [1] * len(x))
    np.testing.assert_allclose(gradient.permute(0, 2, 3, 1).numpy(), expected, atol=1e-6, rtol=1e-4)


def silu_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.SiLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 1),
    ).eval()


def test_guided_backprop_on_silu_differs_from_the_plain_gradient_where_pytorch_grad_cam_does_not():
    model = silu_net()
    x = torch.randn(2, 1, 16, 16)
    plain = input_gradient(model, x)
    with GuidedBackprop(model) as guided:
        gradient, _ = guided.gradient(x, None)
    relative = (gradient - plain).norm() / plain.norm()
    assert relative > 0.1
    peer = pgc.GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")(x[:1].clone(), target_category=0)
    np.testing.assert_allclose(peer[..., 0], plain[0, 0].numpy(), atol=1e-6)  # the peer's silent degradation


def test_guided_rule_by_hand_on_one_silu():
    class Sum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.SiLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.act(x) * weights).sum(dim=(1, 2, 3))[:, None]

    weights = torch.tensor([1.0, -1.0, 1.0, 2.0]).view(1, 1, 1, 4)
    x = torch.tensor([2.0, 1.0, -3.0, 0.5]).view(1, 1, 1, 4)
    net = Sum().eval()
    with GuidedBackprop(net) as guided:
        gradient, _ = guided.gradient(x, None)
    s = torch.sigmoid(x)
    slope = (s * (1 + x * (1 - s))).clamp_min(0)
    expected = slope * weights.clamp_min(0)  # negative gradient from above blocked; SiLU's negative slope too
    np.testing.assert_allclose(gradient.numpy(), expected.numpy(), atol=1e-6)
    assert gradient[0, 0, 0, 1] == 0 and gradient[0, 0, 0, 2] == 0
    assert net.act.inplace is True


@pytest.mark.parametrize("name", ALL)
def test_batch_maps_equal_one_image_at_a_time_and_leave_no_state(trained, batch, name):
    x, targets = batch
    layers = get_spec("tiny_cnn").layers(trained)
    trained.zero_grad(set_to_none=True)  # pytorch-grad-cam's calls in other tests leave .grad behind; ours must not
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    together = ours(name, trained, layers, x, targets)
    alone = np.concatenate([ours(name, trained, layers, x[i : i + 1], [targets[i]]) for i in range(len(x))])
    assert together.shape == (4, SIZE, SIZE) and together.dtype == np.float32
    assert together.min() >= 0.0 and together.max() <= 1.0
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert all(np.ptp(m) > 0 for m in together[[0, 2]])  # images with evidence get a map, not only the first
    for module in trained.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert all(p.grad is None for p in trained.parameters())
    assert not trained.training
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("name", ALL)
def test_hooks_are_released_when_the_call_fails(trained, name):
    layers = get_spec("tiny_cnn").layers(trained)
    with pytest.raises(ValueError), get_method(name)(trained, layers) as explainer:
        explainer(torch.randn(2, 1, SIZE, SIZE), targets=[1])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in trained.modules())


def test_methods_also_run_on_efficientnet_with_silu():
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", in_chans=1).eval()
    layers = get_spec("efficientnet_b0").layers(model)
    x = torch.randn(1, 1, 64, 64)
    for name in ("cam", "gradcam", "gradcam-multi", "guided-gradcam", "celm"):
        assert ours(name, model, layers, x, None).shape == (1, 64, 64)
    with GuidedBackprop(model) as guided:
        gradient, _ = guided.gradient(x, None)
    assert (gradient - input_gradient(model, x)).norm() > 0.1 * gradient.norm()
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.SiLU) and hasattr(m, "inplace"))


def _peak(heatmap: np.ndarray) -> np.ndarray:
    """Centre of the map's top region (maps at feature resolution have plateaus, so argmax alone is arbitrary)."""
    return np.argwhere(heatmap >= 0.9 * heatmap.max()).mean(axis=0)


@pytest.mark.parametrize("name", ["cam", "gradcam", "scorecam", "celm", "guided-gradcam"])
def test_a_moved_lesion_moves_the_peak(trained, name):
    layers = get_spec("tiny_cnn").layers(trained)
    x = torch.zeros(2, 1, SIZE, SIZE)
    x[0, 0, 2:10, 2:10] = 2.0
    x[1, 0, 22:30, 20:28] = 2.0
    maps = ours(name, trained, layers, x, None)
    assert np.linalg.norm(_peak(maps[0]) - np.array([5.5, 5.5])) < 6
    assert np.linalg.norm(_peak(maps[1]) - np.array([25.5, 23.5])) < 6


@pytest.mark.parametrize("name", ["cam", "gradcam", "scorecam", "guided-backprop", "celm"])
def test_maps_change_when_the_weights_are_randomized(trained, batch, name):
    x, targets = batch
    randomized = copy.deepcopy(trained)
    torch.manual_seed(11)
    for module in randomized.modules():  # cascading randomisation from the top (Adebayo et al. 2018)
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.normal_(module.weight, std=0.5)
    trained_maps = ours(name, trained, get_spec("tiny_cnn").layers(trained), x, targets)
    random_maps = ours(name, randomized, get_spec("tiny_cnn").layers(randomized), x, targets)
    correlation = np.corrcoef(trained_maps[0].ravel(), random_maps[0].ravel())[0, 1]
    assert np.abs(trained_maps - random_maps).mean() > 0.05
    assert correlation < 0.9


def test_scorecam_batching_and_constant_channels_give_the_same_map(trained, batch):
    x, targets = batch
    layer = get_spec("tiny_cnn").target_layer(trained)
    one = ours("scorecam", trained, layer, x, targets, batch_size=1)
    many = ours("scorecam", trained, layer, x, targets, batch_size=1000)
    np.testing.assert_allclose(one, many, atol=1e-5)
    dark = torch.zeros(1, 1, SIZE, SIZE)  # ReLU stages: most channels constant on a black image
    with pgc.ScoreCAM(model=trained, target_layers=[layer]) as reference:
        expected = reference(input_tensor=dark, targets=[BinaryClassifierOutputTarget(1)])
    np.testing.assert_allclose(ours("scorecam", trained, layer, dark, [1]), expected, atol=1e-4)


def test_scorecam_reports_progress(trained, batch):
    x, _ = batch
    seen: list[tuple[int, int]] = []
    with get_method("scorecam")(
        trained, trained.features[-1], batch_size=20, progress=lambda d, t: seen.append((d, t))
    ) as explainer:
        explainer(x[:1], None)
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_model_maps_plug_into_the_registry():
    class OwnMap(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))[:, None]

        def localization_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x[:, 0, ::4, ::4], self(x)

    cls = register_model_map("test-own-map", "Own map", "localization_map", "A model's own map (test).")
    try:
        model = OwnMap()
        assert "test-own-map" in list_methods(model)
        assert "test-own-map" not in list_methods(create_model("tiny_cnn", in_chans=1))
        assert "cam" not in list_methods(model)  # no linear classifier: CAM does not apply
        x = torch.zeros(2, 1, 16, 16)
        x[1, 0, 8:, 8:] = 1.0
        with get_method("test-own-map")(model) as explainer:
            result = explainer(x)
        assert result.maps.shape == (2, 16, 16) and result.maps[0].max() == 0.0 and result.maps[1, 15, 15] == 1.0
        with pytest.raises(ValueError, match="cannot explain"), cls(create_model("tiny_cnn", in_chans=1)):
            pass
    finally:
        _METHODS.pop("test-own-map", None)


def test_registry_lists_every_method_with_a_summary():
    assert set(ALL) <= set(list_methods())
    assert all(summary for summary in list_methods().values())


@pytest.mark.parametrize(("outputs", "target"), [(1, 1), (1, 0), (3, 2)])
def test_plain_gradient_is_autograds_input_gradient_max_over_channels(outputs, target):
    """Seed 001's "Backprop" baseline (Simonyan et al. 2014, eq. 3): on a linear model the gradient is the weights
    (negated for class 0 of a one-logit model), and the map its maximum magnitude over channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 5, outputs))
    x = torch.randn(2, 3, 6, 5)
    with get_method("gradient")(model) as explainer:
        result = explainer(x, [target, target])
    leaf = x.clone().requires_grad_(True)
    logits = model(leaf)
    sign = -1.0 if outputs == 1 and target == 0 else 1.0
    score = sign * logits[:, 0 if outputs == 1 else target]
    (autograd,) = torch.autograd.grad(score.sum(), leaf)
    weights = model[1].weight.detach()[0 if outputs == 1 else target].view(3, 6, 5)
    assert np.allclose(result.extras["gradient"], autograd.numpy(), atol=1e-6)
    assert np.allclose(result.extras["gradient"][1], sign * weights.numpy(), atol=1e-6)
    magnitude = autograd.abs().amax(dim=1).numpy()
    assert np.allclose(result.raw, magnitude, atol=1e-6)
    low, span = magnitude.min(axis=(1, 2), keepdims=True), np.ptp(magnitude, axis=(1, 2), keepdims=True)
    assert np.allclose(result.maps, (magnitude - low) / span, atol=1e-5)


def test_plain_gradient_differs_from_guided_backprop_on_a_relu_network(trained, batch):
    x, _ = batch
    with get_method("gradient")(trained) as plain:
        ours_plain = plain(x).extras["gradient"]
    with GuidedBackprop(trained) as guided:
        ours_guided = guided(x).extras["gradient"]
    assert np.allclose(ours_plain, input_gradient(trained, x).numpy(), atol=1e-6)
    assert not np.allclose(ours_plain, ours_guided, atol=1e-4)
