import math

import numpy as np
import pytest
import torch

from core.train import TrainConfig, class_weights, fit, task_label
from core.train.recipe import _validation_loss, cosine_with_warmup, recipe_for, weighted_bce


def test_class_weights_follow_eq_2():
    labels = torch.tensor([1, 1, 1, 0.0])
    alpha_p, alpha_n = class_weights(labels)
    assert alpha_p == pytest.approx(4 / 6) and alpha_n == pytest.approx(4 / 2)
    with pytest.raises(ValueError, match="both classes"):
        class_weights(torch.ones(5))


def test_weighted_bce_matches_eq_1_averaged():
    logits, targets = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    p = torch.sigmoid(logits)
    by_hand = -(0.7 * torch.log(p[0]) + 1.3 * torch.log(1 - p[1]) + 1.3 * torch.log(1 - p[2])) / 3
    assert weighted_bce(logits, targets, 0.7, 1.3).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_schedule_warms_up_linearly_then_anneals_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine_with_warmup(optimizer, total_steps=20, warmup_steps=4)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(rates[4:], rates[5:], strict=False))
    assert rates[-1] < 0.05


@pytest.mark.parametrize(
    ("task", "labels", "expected"),
    [
        ("tumor", {"tumor": True}, 1),
        ("tumor", {"tumor": None}, None),
        ("grade", {"tumor": True, "grade": "GBM"}, 1),
        ("grade", {"tumor": True, "grade": "DLGG"}, 0),
        ("grade", {"tumor": False, "grade": None}, None),
        ("ki67", {"tumor": True, "ki67": ">=10"}, 1),
        ("ki67", {"tumor": True, "ki67": float("nan")}, None),
    ],
)
def test_task_labels_follow_the_cascade(task, labels, expected):
    assert task_label(task, labels) == expected


def test_fit_learns_an_easy_problem_and_picks_a_sens90_threshold():
    generator = torch.Generator().manual_seed(0)

    def make(n):
        y = (torch.arange(n) % 2).float()
        x = torch.randn(n, 1, 32, 32, generator=generator) * 0.3
        x[y == 1, :, 8:24, 8:24] += 1.5  # positives carry a bright square
        return x, y

    train_x, train_y = make(64)
    val_x, val_y = make(32)
    config = TrainConfig(architecture="tiny_cnn", image_size=32, epochs=6, batch_size=16, lr=3e-3, seed=0)
    seen = []
    result = fit(config, train_x, train_y, val_x, val_y, progress=seen.append)
    assert result.metrics["val_auc"] > 0.9
    assert result.metrics["val_sensitivity"] >= 0.9
    assert result.threshold_policy == "sens90" and 0.0 <= result.threshold <= 1.0
    assert [p.epoch for p in seen if p.val_auc is not None] == list(range(1, 7))
    assert not result.model.training and next(result.model.parameters()).device.type == "cpu"
    assert math.isclose(result.metrics["alpha_p"], 1.0) and len(result.history) == 6
    assert np.all((result.val_probabilities >= 0) & (result.val_probabilities <= 1))


def test_fit_refuses_wrong_channel_count():
    config = TrainConfig(architecture="tiny_cnn", modality="WL", image_size=32, epochs=1)
    x, y = torch.zeros(4, 1, 32, 32), torch.tensor([0, 1, 0, 1.0])
    with pytest.raises(ValueError, match="WL images must be"):
        fit(config, x, y, x, y)


@pytest.mark.parametrize(
    ("architecture", "recipe", "optimizer"),
    [
        ("mlcam_lici", "mlcam", torch.optim.SGD),
        ("celnet", "celnet", torch.optim.SGD),
        ("compsegnet", "compsegnet", torch.optim.RMSprop),
        ("resnet18", "flcnn", torch.optim.Adam),
    ],
)
def test_each_architecture_trains_by_its_papers_recipe(architecture, recipe, optimizer):
    config = TrainConfig(architecture=architecture, lr=0.01)
    chosen = recipe_for(config)
    assert chosen.name == recipe
    built = chosen.optimizer(torch.nn.Linear(2, 1), config)
    assert isinstance(built, optimizer) and built.param_groups[0]["lr"] == 0.01
    if architecture == "celnet":  # seed 001: Nesterov momentum 0.9, L2 1e-5
        group = built.param_groups[0]
        assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 1e-5
    assert recipe_for(TrainConfig(architecture=architecture, recipe="flcnn")).name == "flcnn"
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_for(TrainConfig(architecture=architecture, recipe="nope"))


def test_a_best_validation_loss_recipe_keeps_that_epochs_weights():
    generator = torch.Generator().manual_seed(1)
    y = (torch.arange(48) % 2).float()
    x = torch.randn(48, 1, 32, 32, generator=generator) * 0.3
    x[y == 1, :, 8:20, 8:20] += 1.0
    config = TrainConfig(
        architecture="mlcam_lici", task="diagnostic", modality="CLE", image_size=32, epochs=4, batch_size=8, lr=0.05,
        model_kwargs={"width": 4},
    )  # fmt: skip
    result = fit(config, x[:32], y[:32], x[32:], y[32:])
    losses = [h["val_loss"] for h in result.history]
    assert result.metrics["recipe"] == "mlcam"
    assert result.metrics["kept_epoch"] == 1 + int(np.argmin(losses))
    kept = _validation_loss(result.model, x[32:], y[32:], 1.0, 1.0)
    assert kept == pytest.approx(min(losses), rel=1e-5)


def test_the_rcm_recipe_is_seed_002s_sgd_decayed_fifty_times_over_the_run():
    """Seed 002: SGD momentum 0.9 with the config's weight decay (5e-4 in the paper), x0.9 every 10 of 500 epochs."""
    config = TrainConfig(architecture="efficientnet_b2", recipe="rcm", lr=0.1, weight_decay=5e-4)
    chosen = recipe_for(config)
    assert chosen.augment and chosen.keep == "last"
    optimizer = chosen.optimizer(torch.nn.Linear(2, 1), config)
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD) and group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    total = 500
    schedule = chosen.schedule(optimizer, total, 0)
    for _ in range(total):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**50)
