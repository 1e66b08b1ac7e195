"""Context training of the seed 002 patch classifier: crops of window + 2 context px, only the window's cells pooled."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from core.data.synth_rcm import make_rcm_mosaic, sample_patches
from core.heatmaps.mosaic import stitch_mosaic
from core.models.tiny import TinyCNN
from core.train import TrainConfig
from services import mosaic as service
from services.mosaic import (
    CentreCells,
    PaddedOrContext,
    context_stride,
    fit_patch_classifier,
    patch_tensors,
    train_patch_classifier,
)

WINDOW, CONTEXT, STRIDE = 32, 8, 8  # tiny_cnn: three stride-2 blocks
CONFIG = TrainConfig(
    architecture="tiny_cnn", task="aspecific", modality="RCM", image_size=WINDOW, epochs=1, batch_size=8
)


def _mosaics() -> list[tuple[np.ndarray, np.ndarray]]:
    return [make_rcm_mosaic(96, 96, seed=50 + i, blobs=3) for i in range(3)]


def _quiet(_message: str) -> None:
    pass


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return service.create_model("tiny_cnn", in_chans=1).eval()


def test_centre_cells_pool_the_window_cells_and_give_the_whole_trunk_window_probability():
    model = _model()
    image, _ = make_rcm_mosaic(48, 48, seed=1)
    crop = patch_tensors(image[None])  # the 32 px window at (8, 8) with 8 px of context
    with torch.no_grad():
        features = model.forward_features(crop)
        assert features.shape[-2:] == (6, 6)
        pooled = model.get_classifier()(features[..., 1:5, 1:5].mean(dim=(2, 3)))
        assert torch.allclose(CentreCells(1)(model, crop), pooled, atol=1e-6)
        assert torch.allclose(CentreCells(0)(model, crop), model(crop), atol=1e-6)
        assert not torch.allclose(CentreCells(1)(model, crop), model(crop), atol=1e-4)
        with pytest.raises(ValueError, match="no cells inside a margin of 3"):
            CentreCells(3)(model, crop)
    # the stitcher's whole trunk over the same 48 px: window (1, 1) of the step-8 grid starts at (8, 8)
    result = stitch_mosaic(model, image, window=WINDOW, step=STRIDE, sigma=None, share=None)
    assert result.window_probabilities.shape == (3, 3)
    assert result.window_probabilities[1, 1] == pytest.approx(float(torch.sigmoid(pooled[0, 0])), abs=1e-5)


def test_context_crops_are_the_training_set_and_plain_windows_validate(monkeypatch):
    seen = {}
    real_fit = service.fit

    def spy(config, train_x, train_y, val_x, val_y, progress=None, train_logits=None):
        seen.update(config=config, train=(train_x, train_y), val=(val_x, val_y), logits=train_logits)
        return real_fit(config, train_x, train_y, val_x, val_y, progress=progress, train_logits=train_logits)

    monkeypatch.setattr(service, "fit", spy)
    mosaics = _mosaics()
    result, test = fit_patch_classifier(CONFIG, mosaics, patches_per_mosaic=16, seed=4, context=CONTEXT, log=_quiet)
    crop = WINDOW + 2 * CONTEXT
    assert seen["config"] == replace(CONFIG, image_size=crop) and seen["logits"] == CentreCells(1)
    assert result.config == CONFIG  # the result describes the window classifier
    # training: crops centred on the window, labelled by the window's centre pixel (= the crop's), train mosaic seed 4
    patches, labels = sample_patches(*mosaics[0], 16, size=crop, seed=4)
    assert crop // 2 == CONTEXT + WINDOW // 2
    train_x, train_y = seen["train"]
    assert train_x.shape == (16, 1, crop, crop)
    assert torch.equal(train_x, patch_tensors(patches)) and torch.equal(train_y, torch.from_numpy(labels).float())
    # validation (last mosaic, seed 6) and test (seed 5): plain windows, as a single patch is classified
    val_patches, val_labels = sample_patches(*mosaics[2], 16, size=WINDOW, seed=6)
    assert torch.equal(seen["val"][0], patch_tensors(val_patches))
    assert torch.equal(seen["val"][1], torch.from_numpy(val_labels).float())
    assert test[0].shape == (16, 1, WINDOW, WINDOW)


def test_without_context_training_is_unchanged(monkeypatch):
    seen = {}
    real_fit = service.fit

    def spy(config, train_x, train_y, val_x, val_y, progress=None, **options):
        seen.update(config=config, shape=tuple(train_x.shape), options=options)
        return real_fit(config, train_x, train_y, val_x, val_y, progress=progress, **options)

    monkeypatch.setattr(service, "fit", spy)
    fit_patch_classifier(CONFIG, _mosaics(), patches_per_mosaic=16, log=_quiet)
    assert seen == {"config": CONFIG, "shape": (16, 1, WINDOW, WINDOW), "options": {}}


def test_training_with_context_is_deterministic_by_seed():
    def weights(seed: int) -> dict[str, torch.Tensor]:
        result, _ = fit_patch_classifier(
            CONFIG, _mosaics(), patches_per_mosaic=16, seed=seed, context=CONTEXT, log=_quiet
        )
        return result.model.state_dict()

    first, again, other = weights(1), weights(1), weights(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_the_registered_context_model_is_the_plain_architecture(workspace):
    from services.diagnose import load_predictor

    info, model = train_patch_classifier(
        CONFIG, _mosaics(), name="ctx-rcm", patches_per_mosaic=16, context=CONTEXT, log=_quiet
    )
    assert isinstance(model, TinyCNN) and info.image_size == WINDOW
    assert info.config["window"] == WINDOW and info.config["context"] == CONTEXT and info.config["image_size"] == WINDOW
    assert 0.0 <= info.metrics["test_auc"] <= 1.0 and info.metrics["test_n"] == 16
    predictor = load_predictor(info)
    image, _ = make_rcm_mosaic(64, 64, seed=9)
    fast = predictor.stitch(image, step=16, mode="fast")
    assert fast.map.shape == (64, 64) and fast.window_probabilities.shape == (3, 3)
    plain, _ = train_patch_classifier(CONFIG, _mosaics(), name="plain-rcm", patches_per_mosaic=16, log=_quiet)
    assert "context" not in plain.config


@pytest.mark.parametrize(
    ("context", "words"),
    [
        (5, r"multiple of tiny_cnn's stride \(8 px\), not 5; try 8"),
        (-8, "whole number of pixels"),
        (8.0, "whole number of pixels"),
        (True, "whole number of pixels"),
        (40, "96 x 96 px train mosaic does not hold a 112 px crop .* lower context"),
    ],
)
def test_bad_context_is_refused_before_training(context, words):
    with pytest.raises(ValueError, match=words):
        fit_patch_classifier(CONFIG, _mosaics(), patches_per_mosaic=16, context=context, log=_quiet)


def test_context_needs_a_pooling_head_and_whole_cells():
    with pytest.raises(ValueError, match=r"no loss of its own; celnet is not one \(train it with context=0\)"):
        context_stride(replace(CONFIG, architecture="celnet"), 8)
    with pytest.raises(ValueError, match="a 36 px window gives"):
        context_stride(replace(CONFIG, image_size=36), 8)
    assert context_stride(CONFIG, 16) == STRIDE


def test_fit_takes_the_training_logits_from_the_hook_and_validates_the_plain_model():
    from core.train import fit

    calls = []

    def hook(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        return CentreCells(1)(model, batch)

    generator = torch.Generator().manual_seed(0)
    crops, windows = torch.randn(12, 1, 48, 48, generator=generator), torch.randn(6, 1, WINDOW, WINDOW)
    labels = torch.tensor([0.0, 1.0] * 6)
    result = fit(replace(CONFIG, image_size=48), crops, labels, windows, labels[:6], train_logits=hook)
    assert calls == [(8, 1, 48, 48), (4, 1, 48, 48)]  # every training batch, augmented crops, through the hook
    assert len(result.val_probabilities) == 6  # validation: the plain model on 32 px windows


def test_padded_or_context_draws_its_choices_from_the_seed():
    def draws(seed: int) -> torch.Tensor:
        logits = PaddedOrContext(1, CONTEXT, 0.5, seed)
        return torch.cat([logits.choose(8) for _ in range(4)])

    first = draws(3)
    assert torch.equal(first, draws(3)) and not torch.equal(first, draws(4))
    assert 0 < int(first.sum()) < 32  # both kinds of sample
    assert (
        not PaddedOrContext(1, CONTEXT, 0.0, 3).choose(64).any()
        and PaddedOrContext(1, CONTEXT, 1.0, 3).choose(64).all()
    )
    # a stream of its own: not the draws of a generator seeded like fit's
    assert not torch.equal(first, torch.rand(32, generator=torch.Generator().manual_seed(3)) < 0.5)


def test_padded_samples_are_the_plain_model_on_the_window_and_the_rest_keep_their_context():
    model = _model()
    crops = patch_tensors(np.stack([make_rcm_mosaic(48, 48, seed=s)[0] for s in range(6)]))
    windows = crops[..., CONTEXT:-CONTEXT, CONTEXT:-CONTEXT]
    with torch.no_grad():
        plain, context = model(windows), CentreCells(1)(model, crops)
        assert torch.allclose(PaddedOrContext(1, CONTEXT, 1.0, 0)(model, crops), plain, atol=1e-6)
        assert torch.allclose(PaddedOrContext(1, CONTEXT, 0.0, 0)(model, crops), context, atol=1e-6)
        lone = PaddedOrContext(1, CONTEXT, 0.5, 8).choose(6)
        assert lone.tolist() == [False, True, False, True, False, True]  # interleaved: the order is restored
        mixed = PaddedOrContext(1, CONTEXT, 0.5, 8)(model, crops)
        assert torch.allclose(mixed, torch.where(lone[:, None], plain, context), atol=1e-6)
        assert not torch.allclose(plain, context, atol=1e-4)  # the two really differ


def test_padded_fraction_zero_is_context_training_and_one_trains_on_the_windows(monkeypatch):
    seen = []
    real_fit = service.fit

    def spy(config, train_x, train_y, val_x, val_y, progress=None, train_logits=None):
        seen.append(train_logits)
        return real_fit(config, train_x, train_y, val_x, val_y, progress=progress, train_logits=train_logits)

    monkeypatch.setattr(service, "fit", spy)

    def weights(**options) -> dict[str, torch.Tensor]:
        result, _ = fit_patch_classifier(CONFIG, _mosaics(), patches_per_mosaic=16, seed=1, log=_quiet, **options)
        return result.model.state_dict()

    context, zero = weights(context=CONTEXT), weights(context=CONTEXT, padded_fraction=0.0)
    assert seen[:2] == [CentreCells(1), CentreCells(1)]
    assert all(torch.equal(context[k], zero[k]) for k in context)
    half, again = weights(context=CONTEXT, padded_fraction=0.5), weights(context=CONTEXT, padded_fraction=0.5)
    assert isinstance(seen[2], PaddedOrContext) and (seen[2].cells, seen[2].context, seen[2].fraction) == (1, 8, 0.5)
    assert all(torch.equal(half[k], again[k]) for k in half)  # deterministic by seed
    assert not all(torch.equal(half[k], context[k]) for k in half)
    # fraction 1: every training batch is the plain model on the (augmented) crop's central window
    shapes = []
    monkeypatch.setattr(TinyCNN, "forward", _recording(TinyCNN.forward, shapes))
    weights(context=CONTEXT, padded_fraction=1.0)
    assert shapes[:2] == [(8, 1, WINDOW, WINDOW), (8, 1, WINDOW, WINDOW)]
    assert all(shape[-2:] == (WINDOW, WINDOW) for shape in shapes)  # never a whole crop


def _recording(forward, shapes: list):
    def recorded(self, x):
        shapes.append(tuple(x.shape))
        return forward(self, x)

    return recorded


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"context": CONTEXT, "padded_fraction": 1.5}, "probability between 0 and 1, not 1.5"),
        ({"context": CONTEXT, "padded_fraction": -0.1}, "probability between 0 and 1, not -0.1"),
        ({"context": CONTEXT, "padded_fraction": float("nan")}, "probability between 0 and 1, not nan"),
        ({"context": CONTEXT, "padded_fraction": True}, "probability between 0 and 1, not True"),
        ({"context": CONTEXT, "padded_fraction": "0.5"}, "probability between 0 and 1, not '0.5'"),
        ({"padded_fraction": 0.5}, "padded_fraction 0.5 needs context > 0"),
    ],
)
def test_bad_padded_fraction_is_refused_before_training(monkeypatch, options, words):
    monkeypatch.setattr(service, "fit", None)  # never reached
    with pytest.raises(ValueError, match=words):
        fit_patch_classifier(CONFIG, _mosaics(), patches_per_mosaic=16, log=_quiet, **options)
    with pytest.raises(ValueError, match=words):
        train_patch_classifier(CONFIG, _mosaics(), name="bad-rcm", patches_per_mosaic=16, log=_quiet, **options)


def test_the_padded_fraction_is_recorded_in_the_registered_config(workspace):
    info, model = train_patch_classifier(
        CONFIG, _mosaics(), name="mixed-rcm", patches_per_mosaic=16, context=CONTEXT, padded_fraction=0.25, log=_quiet
    )
    assert isinstance(model, TinyCNN)
    assert (info.config["window"], info.config["context"], info.config["padded_fraction"]) == (WINDOW, CONTEXT, 0.25)
    context, _ = train_patch_classifier(
        CONFIG, _mosaics(), name="ctx-only-rcm", patches_per_mosaic=16, context=CONTEXT, log=_quiet
    )
    assert "padded_fraction" not in context.config
