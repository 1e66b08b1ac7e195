"""The Predictor: every applicable method, maps in the image's own frame, and safe sharing between threads."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from core.data.io import Image
from core.models import create_model
from core.predict import Predictor, _to_image_frame


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", in_chans=1, width=8)
    with torch.no_grad():  # realistic BatchNorm statistics instead of the initial 0/1
        model.train()
        for _ in range(5):
            model(torch.randn(16, 1, 32, 32) * 2 + 1)
    return Predictor(model, {"modality": "FL", "image_size": 32, "architecture": "tiny_cnn"}, 0.5, device="cpu")


def images(n: int) -> list[Image]:
    rng = np.random.default_rng(1)
    return [Image(rng.random((24 + 4 * i, 40)).astype(np.float32), f"img{i}.tif", "TIFF") for i in range(n)]


def test_every_method_maps_back_to_each_images_frame(predictor):
    assert {"cam", "gradcam", "scorecam", "celm", "guided-gradcam"} <= set(predictor.methods)
    batch = images(3)
    for method in predictor.methods:
        results = predictor.diagnose(batch, heatmap=method, batch_size=2)
        for image, result in zip(batch, results, strict=True):
            assert result.heatmap.shape == (image.height, image.width) and result.method == method
            assert all(v.shape[-2:] == (image.height, image.width) for v in result.extras.values())
    guided = predictor.diagnose(batch[:1], heatmap="guided-gradcam")[0]
    assert set(guided.extras) == {"gradcam", "gradient", "guided"} and guided.extras["guided"].ndim == 3


def test_signed_extras_keep_their_sign_and_maps_stay_in_range():
    square = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8).repeat(2, axis=0)
    signed = _to_image_frame(square, 4, 8)
    assert signed.shape == (2, 4, 8) and signed.min() < 0
    assert _to_image_frame(np.abs(square[0]), 8, 4).min() >= 0


def test_unknown_or_inapplicable_methods_are_refused_before_any_work(predictor):
    with pytest.raises(KeyError, match="available"):
        predictor.diagnose(images(1), heatmap="nope")


def test_threads_sharing_one_predictor_get_the_maps_they_would_get_alone(predictor):
    batch = images(4)
    methods = ["gradcam", "scorecam", "guided-backprop", "cam", "celm", "gradcam-multi"]
    alone = {m: predictor.diagnose(batch, heatmap=m)[0].heatmap for m in methods}
    with ThreadPoolExecutor(max_workers=6) as pool:
        maps = pool.map(lambda m: predictor.diagnose(batch, heatmap=m)[0].heatmap, methods)
        together = dict(zip(methods, maps, strict=True))
    for method in methods:
        np.testing.assert_allclose(together[method], alone[method], atol=1e-6)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in predictor.model.modules())
