"""CompSegNet (seed 004): U-Net shape contract, the pooling neuron's sigma and loss, the .35 tumour fraction and its
logit, SoftPlus hidden units, weakly supervised training on a toy hyperspectral task, checkpoints, heatmap method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from core.heatmaps import get_method
from core.models import create_model, get_spec, load_checkpoint, save_checkpoint
from core.models.compsegnet import (
    PIXEL_THRESHOLD,
    RECIPE,
    CompSegNet,
    PoolingNeuron,
    mask_background,
    pooling_transfer,
    thresholded_fraction,
    tissue_of,
)
from core.train import TrainConfig, fit, recipe_for

SIZE = 32


def paper_sigma(x: float, alpha: float = 0.1, beta: float = 5.0, gamma: float = 1e-3) -> float:
    """Section 3.2 as printed: alpha * (2 / (1 + exp(-beta x / alpha)) - 1) + gamma x."""
    return alpha * (2.0 / (1.0 + math.exp(-beta * x / alpha)) - 1.0) + gamma * x


def tiny(in_chans: int = 8, **kwargs: object) -> CompSegNet:
    torch.manual_seed(0)
    return create_model("compsegnet", in_chans=in_chans, base=4, depth=2, **kwargs).eval()


def toy_spectra(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy 8-channel spectral images; every other one (positive) holds a 12-px square (14 % of the pixels) whose
    spectrum is shifted by a small ramp. Returns images, labels, and the squares' masks."""
    labels = np.arange(n) % 2
    x = rng.normal(0.0, 1.0, size=(n, 8, SIZE, SIZE)).astype(np.float32)
    square = np.zeros((n, SIZE, SIZE), dtype=bool)
    ramp = np.linspace(-0.5, 0.5, 8, dtype=np.float32)[:, None, None]
    for i in np.flatnonzero(labels):
        top, left = rng.integers(0, SIZE - 12, size=2)
        square[i, top : top + 12, left : left + 12] = True
        x[i, :, top : top + 12, left : left + 12] += ramp
    return torch.from_numpy(x), torch.from_numpy(labels).float(), torch.from_numpy(square)


@pytest.mark.parametrize(("in_chans", "size", "depth"), [(1, 16, 2), (3, 32, 3), (450, 16, 2), (8, 48, 4)])
def test_activation_map_has_the_input_size_and_lies_in_unit_interval(in_chans, size, depth):
    torch.manual_seed(0)
    model = create_model("compsegnet", in_chans=in_chans, base=4, depth=depth).eval()
    with torch.no_grad():
        maps = model.segment(torch.randn(2, in_chans, size, size + 2**depth))
        logits = model(torch.randn(2, in_chans, size, size))
    assert maps.shape == (2, size, size + 2**depth)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert logits.shape == (2, 1)


def test_input_not_divisible_by_two_to_the_depth_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 8, 18, 16))
    with pytest.raises(ValueError, match="num_classes"):
        create_model("compsegnet", in_chans=8, num_classes=2)


def test_pooling_transfer_is_the_papers_sigma():
    x = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 3.0], dtype=torch.float64)
    o = pooling_transfer(x)
    assert float(o[0]) == 0.0
    torch.testing.assert_close(o, torch.tensor([paper_sigma(v) for v in x.tolist()], dtype=torch.float64))
    assert bool((o.diff() > 0).all())  # monotone
    assert bool((o <= 0.1 + 1e-3 * x).all()) and float(o[-1]) == pytest.approx(0.1 + 3e-3, abs=1e-9)
    assert float(pooling_transfer(torch.tensor(0.1))) == pytest.approx(0.0987, abs=1e-4)  # 10 % tumour: saturated
    assert float(pooling_transfer(torch.tensor(0.2), alpha=0.2, beta=1.0, gamma=0.0)) == pytest.approx(
        paper_sigma(0.2, 0.2, 1.0, 0.0)
    )


def test_pooling_neuron_takes_the_active_fraction_of_valid_pixels_only():
    neuron = PoolingNeuron()
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 1.0  # 4 of 16 pixels active
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[:, :2] = True  # the top half is tissue
    assert neuron(maps)[0] == pytest.approx(paper_sigma(4 / 16))
    assert neuron(maps, valid)[0] == pytest.approx(paper_sigma(4 / 8))
    background_changed = maps.clone()
    background_changed[:, 2:] = 1.0
    torch.testing.assert_close(neuron(background_changed, valid), neuron(maps, valid))
    assert not torch.allclose(neuron(background_changed), neuron(maps))
    with pytest.raises(ValueError, match="valid mask"):
        neuron(maps, valid[:, :2])


def test_loss_is_the_mean_absolute_error_to_alpha_times_label(monkeypatch):
    model = tiny()
    maps = torch.zeros(3, 4, 4)
    maps[0] = 0.5  # fraction .5
    maps[1, 0, :2] = 1.0  # fraction 2/16
    maps[2, 0, 0] = 0.8  # fraction .05
    monkeypatch.setattr(model, "segment", lambda x: maps)
    y = torch.tensor([1.0, 0.0, 1.0])
    expected = (abs(paper_sigma(0.5) - 0.1) + abs(paper_sigma(2 / 16)) + abs(paper_sigma(0.05) - 0.1)) / 3
    assert float(model.loss(torch.zeros(3, 8, 4, 4), y)) == pytest.approx(expected, rel=1e-5)
    valid = torch.zeros(3, 4, 4, dtype=torch.bool)
    valid[:, 0] = True  # first row only: fractions .5, 2/4, .8/4
    expected = (abs(paper_sigma(0.5) - 0.1) + abs(paper_sigma(0.5)) + abs(paper_sigma(0.2) - 0.1)) / 3
    assert float(model.loss(torch.zeros(3, 8, 4, 4), y, valid)) == pytest.approx(expected, rel=1e-5)


def constant_map(value: float) -> CompSegNet:
    """A tiny CompSegNet whose activation map is ``value`` at every pixel (head weights zero)."""
    model = tiny()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(math.log(value / (1.0 - value)))
    return model


def test_masked_background_is_left_out_of_the_active_fraction_and_the_loss():
    """A quarter of each frame is sample, the map is .04 on it: over tissue the active fraction is .04; counting
    the background (where the masked map is 0) would make it .01 and change the loss."""
    model = constant_map(0.04)
    x = torch.randn(2, 8, 16, 16)
    tissue = torch.zeros(2, 16, 16, dtype=torch.bool)
    tissue[:, :8, :8] = True
    masked = mask_background(x, tissue)
    assert bool(masked[:, :, 8:].isnan().all()) and torch.equal(masked[:, :, :8, :8], x[:, :, :8, :8])
    torch.testing.assert_close(tissue_of(masked), tissue)
    y = torch.tensor([0.0, 0.0])  # cancer-free: the loss is o(I) itself
    over_tissue, with_background = paper_sigma(0.04), paper_sigma(0.01)
    assert over_tissue - with_background > 0.04
    with torch.no_grad():
        maps = model.segment(masked)
        assert float(maps[:, :8, :8].min()) == pytest.approx(0.04) and float(maps[:, 8:].abs().max()) == 0.0
        assert float(model.loss(masked, y)) == pytest.approx(over_tissue, rel=1e-4)
        assert float(model.loss(masked, y, tissue)) == pytest.approx(over_tissue, rel=1e-4)
        assert float(model.pool(maps).mean()) == pytest.approx(paper_sigma(0.01), rel=1e-4)  # background counted
        torch.testing.assert_close(model.pooled(masked), torch.full((2,), paper_sigma(0.04)))
        # the background's spectra do not matter once masked: other values there, same input, same loss
        other = x.clone()
        other[:, :, 8:] += 5.0
        torch.testing.assert_close(model.loss(mask_background(other, tissue), y), model.loss(masked, y))
    with pytest.raises(ValueError, match="tissue mask"):
        mask_background(x, tissue[:, :8])


def test_a_batch_without_mask_pools_over_the_whole_image_as_before():
    model = tiny()
    x, y = torch.randn(3, 8, 16, 16), torch.tensor([1.0, 0.0, 1.0])
    assert tissue_of(x) is None
    with torch.no_grad():
        maps = model.segment(x)
        whole = (pooling_transfer(maps.flatten(1).mean(dim=1)) - 0.1 * y).abs().mean()
        torch.testing.assert_close(model.loss(x, y), whole)
        torch.testing.assert_close(model.loss(x, y, torch.ones(3, 16, 16, dtype=torch.bool)), whole)
        torch.testing.assert_close(torch.sigmoid(model(x))[:, 0], thresholded_fraction(maps).clamp(1e-4, 1 - 1e-4))


def test_training_through_the_recipe_on_masked_spectra_uses_the_tissue_and_stays_finite():
    """The training loop passes images only; masked spectra carry the background mask to the loss."""
    rng = np.random.default_rng(1)
    images, labels, _ = toy_spectra(8, rng)
    tissue = torch.ones(8, SIZE, SIZE, dtype=torch.bool)
    tissue[:, :, SIZE // 2 :] = False  # the right half of every frame holds no sample
    masked = mask_background(images, tissue)
    config = TrainConfig(
        architecture="compsegnet", task="cancer", modality="IR", in_chans=8, image_size=SIZE, epochs=2,
        batch_size=4, model_kwargs={"base": 4, "depth": 2},
    )  # fmt: skip
    result = fit(config, masked[:6], labels[:6], masked[6:], labels[6:])
    assert all(math.isfinite(p) for p in torch.cat([q.flatten() for q in result.model.parameters()]).tolist())
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["val_loss"]) for h in result.history)
    with torch.no_grad():
        kept = result.model.loss(masked[6:], labels[6:], tissue[6:])
        assert min(h["val_loss"] for h in result.history) == pytest.approx(float(kept), rel=1e-5)
        assert float(result.model.segment(masked).masked_select(~tissue).abs().max()) == 0.0


def test_tumor_fraction_thresholds_at_point_35_and_sigmoid_of_forward_is_it(monkeypatch):
    assert PIXEL_THRESHOLD == 0.35
    maps = torch.full((2, 4, 4), 0.34)
    maps[0, 0, :3] = 0.36  # 3 of 16 above .35
    maps[1] = 0.9  # all above
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[0, 1:] = False  # only the first row counts: 3 of 4
    torch.testing.assert_close(thresholded_fraction(maps), torch.tensor([3 / 16, 1.0]))
    torch.testing.assert_close(thresholded_fraction(maps, valid), torch.tensor([3 / 4, 1.0]))
    model = tiny()
    monkeypatch.setattr(model, "segment", lambda x: maps)
    x = torch.zeros(2, 8, 4, 4)
    torch.testing.assert_close(model.tumor_fraction(x, valid), torch.tensor([3 / 4, 1.0]))
    torch.testing.assert_close(torch.sigmoid(model(x))[:, 0], torch.tensor([3 / 16, 1 - 1e-4]))


def test_sigmoid_of_forward_equals_tumor_fraction_and_activation_map_returns_the_map():
    model = tiny()
    x = torch.randn(3, 8, SIZE, SIZE)
    with torch.no_grad():  # centre the map's median on the threshold, so the fractions are neither 0 nor 1
        model.head.bias += math.log(0.35 / 0.65) - float(torch.logit(model.segment(x)).median())
        fraction = model.tumor_fraction(x)
        assert bool(((fraction > 0.05) & (fraction < 0.95)).all())
        torch.testing.assert_close(torch.sigmoid(model(x))[:, 0], fraction)
        maps, logits = model.activation_map(x)
        torch.testing.assert_close(maps, model.segment(x))
        torch.testing.assert_close(logits, model(x))


def test_hidden_units_are_softplus_and_the_map_is_a_sigmoid():
    model = create_model("compsegnet", in_chans=450, base=16, depth=3)
    assert not any(isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU)) for m in model.modules())
    assert sum(isinstance(m, nn.Softplus) for m in model.modules()) == 4 * 3 + 2  # two per block, 2*depth+1 blocks
    assert sum(p.numel() for p in model.parameters()) == 546_401
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in tiny(batch_norm=True).modules()) == 2 * 5
    assert float(torch.sigmoid(model.head.bias.detach())) == pytest.approx(0.1)  # starts where sigma is not saturated
    assert RECIPE == {"optimizer": "rmsprop", "lr": 1e-3, "batch_size": 7}


def test_the_recipe_starts_rmsprop_gently_so_the_first_steps_do_not_saturate_the_map():
    """PyTorch's RMSprop has no bias correction: with its default decay 0.99 the first step is 10 x lr on every
    weight. At the study's width (128 channels, base 16, depth 3) three such steps at the paper's constant 1e-3 switch
    the map off, where the sigmoid saturates. The recipe's RMSprop (TensorFlow's decay 0.9, the rate warmed up
    linearly over 4 x ``warmup`` steps, 4 epochs by default) keeps it near its start."""
    config = TrainConfig(architecture="compsegnet", in_chans=128, lr=1e-3)
    recipe = recipe_for(config)
    x, y = torch.randn(4, 128, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.0, 1.0, 0.0, 1.0])

    def three_steps(make_optimizer, warmup: int | None) -> tuple[list[float], float]:
        torch.manual_seed(0)
        model = create_model("compsegnet", in_chans=128)
        optimizer = make_optimizer(model)
        schedule = (  # None: the constant rate the recipe had before
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            if warmup is None
            else recipe.schedule(optimizer, 300, warmup)
        )
        rates = []
        for _ in range(3):
            rates.append(optimizer.param_groups[0]["lr"])
            loss = model.loss(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            return rates, float(model.segment(x).mean())

    rates, before = three_steps(lambda model: torch.optim.RMSprop(model.parameters(), lr=1e-3), warmup=None)
    assert rates == [1e-3] * 3 and before < 0.01  # collapsed: the map all off (it starts at 0.079)
    rates, after = three_steps(lambda model: recipe.optimizer(model, config), warmup=15)
    assert rates == pytest.approx([1e-3 / 60, 2e-3 / 60, 3e-3 / 60])
    assert 0.05 < after < 0.1
    assert recipe.optimizer(nn.Linear(1, 1), config).defaults["alpha"] == 0.9


def test_weak_supervision_on_a_toy_hyperspectral_task_segments_the_shifted_square():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("compsegnet", in_chans=8, base=4, depth=2)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=RECIPE["lr"])
    held_out, labels, squares = toy_spectra(16, np.random.default_rng(100))
    with torch.no_grad():
        before = float(model.eval().loss(held_out, labels))
    model.train()
    for _ in range(40):
        x, y, _ = toy_spectra(8, rng)
        loss = model.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = float(model.loss(held_out, labels))
        maps = model.segment(held_out)
    assert after < 0.8 * before
    positive = labels.bool()
    inside, outside = maps[positive][squares[positive]], maps[positive][~squares[positive]]
    assert float(inside.mean()) > 3 * float(outside.mean())
    assert float(maps[~positive].mean()) < float(inside.mean())


def test_checkpoint_round_trip_rebuilds_from_model_kwargs(tmp_path):
    model = create_model("compsegnet", in_chans=6, base=3, depth=2, gamma=2e-3)
    with torch.no_grad():
        model.head.bias.fill_(0.0)
    model.eval()
    config = {"architecture": "compsegnet", "in_chans": 6, "model_kwargs": {"base": 3, "depth": 2, "gamma": 2e-3}}
    checkpoint = save_checkpoint(model, config, tmp_path / "csn")
    loaded, _ = load_checkpoint(tmp_path / "csn", expected_sha256=checkpoint.sha256)
    x = torch.randn(2, 6, 16, 16)
    y = torch.tensor([1.0, 0.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.segment(x), model.segment(x))
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(loaded.loss(x, y), model.loss(x, y))
    assert loaded.pool.gamma == 2e-3


def test_heatmap_methods_run_on_it(tmp_path):
    model = tiny()
    x = torch.randn(2, 8, SIZE, SIZE)
    with get_method("compsegnet")(model) as explainer:
        result = explainer(x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(result.raw), model.segment(x))
    assert result.maps.shape == (2, SIZE, SIZE) and result.maps.min() == 0.0 and result.maps.max() == 1.0
    layer = get_spec("compsegnet").target_layer(model)
    assert layer is model.dec[-1] and get_spec("compsegnet").layers(model) == [layer]
    with get_method("gradcam")(model, layer) as explainer:  # the same image for both classes: ReLU(s) + ReLU(-s)
        gradcam = explainer(x[:1].expand(2, -1, -1, -1), [1, 0])
    assert gradcam.maps.shape == (2, SIZE, SIZE)
    assert float(gradcam.raw.sum()) > 0  # the threshold has no gradient; the straight-through soft fraction has


def test_the_heatmap_of_a_masked_spot_is_zero_on_background_and_its_logits_are_the_tissue_share():
    model = tiny()
    x = torch.randn(2, 8, SIZE, SIZE)
    tissue = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    tissue[:, 4:28, 4:20] = True
    masked = mask_background(x, tissue)
    with get_method("compsegnet")(model) as explainer:
        result = explainer(masked)
    assert np.isfinite(result.maps).all() and (result.raw[~tissue.numpy()] == 0).all()
    assert (result.raw[tissue.numpy()] > 0).all()
    with torch.no_grad():
        share = thresholded_fraction(model.segment(masked), tissue).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(torch.sigmoid(torch.from_numpy(result.logits))[:, 0], share)
