"""CELNet (seed 001, section 2.1): architecture as described, ablation switches, training, heatmaps, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.data.preprocess import train_augment
from core.heatmaps import celm as celm_module
from core.heatmaps import get_method, list_methods
from core.heatmaps.celm import search_weights
from core.models import create_model, get_spec, load_checkpoint, save_checkpoint
from core.models.celnet import MAM, RECIPE, MAResBlock
from core.train import TrainConfig, fit
from core.train import recipe as recipe_module
from core.train.recipe import recipe_for

SIZE = 32
BLOB = 8


def blob_images(labels: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Noisy grey 32-px images; positives carry one bright 8-px square at a random place (its corner returned)."""
    x = rng.normal(0.0, 0.3, size=(len(labels), 1, SIZE, SIZE)).astype(np.float32)
    corners = []
    for i, label in enumerate(labels):
        top, left = (int(v) for v in rng.integers(0, SIZE - BLOB, size=2))
        corners.append((top, left))
        if label:
            x[i, 0, top : top + BLOB, left : left + BLOB] += 2.0
    return torch.from_numpy(x), corners


def mams(model: nn.Module) -> list[MAM]:
    return [m for m in model.modules() if isinstance(m, MAM)]


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def toy() -> dict[str, object]:
    """CELNet (width 8) trained with SGD + Nesterov for a few dozen steps to tell bright squares from noise, with the
    loss on a fixed evaluation batch before and after."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("celnet", in_chans=1, width=8)
    labels = np.tile([0, 1], 16)
    x_eval, _ = blob_images(labels, np.random.default_rng(99))
    y_eval = torch.from_numpy(labels).float()
    model.eval()
    with torch.no_grad():
        before = model.loss(x_eval, y_eval).item()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(25):
        batch = rng.integers(0, 2, size=16)
        x, _ = blob_images(batch, rng)
        loss = model.loss(x, torch.from_numpy(batch).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        after = model.loss(x_eval, y_eval).item()
        logits = model(x_eval)[:, 0]
    return {"model": model, "before": before, "after": after, "logits": logits, "labels": y_eval}


@pytest.mark.parametrize(("size", "in_chans", "width"), [(32, 1, 8), (64, 3, 16), (96, 3, 16), (96, 1, 8)])
def test_one_logit_per_image_and_module_resolutions(size, in_chans, width):
    torch.manual_seed(0)
    model = create_model("celnet", in_chans=in_chans, width=width).eval()
    shapes = []
    handles = [
        stage.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape))) for stage in model.stages
    ]
    with torch.no_grad():
        logits = model(torch.randn(2, in_chans, size, size))
    for handle in handles:
        handle.remove()
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()
    # Head and module 1 at full resolution; modules 2 and 3 halve it (CAM2 at 1/2, CAM3 at 1/4).
    assert shapes == [
        (2, width, size, size),
        (2, 2 * width, size // 2, size // 2),
        (2, 4 * width, size // 4, size // 4),
    ]


def test_parameter_counts_match_table_1():
    full = n_parameters(create_model("celnet", in_chans=3))
    without_mam = n_parameters(create_model("celnet", in_chans=3, attention=False))
    without_ds = n_parameters(create_model("celnet", in_chans=3, deep_supervision=False))
    assert 290_000 <= full <= 305_000  # Table 1: 297K
    assert 285_000 <= without_mam <= 300_000  # Table 1: 292K
    assert 2_000 <= full - without_mam <= 8_000  # Table 1: about 5K of attention
    assert full - without_ds == 2 * (2 * 16)  # the classifier loses module 2's GAP and GMP weights


def test_three_modules_of_three_blocks_with_3x3_stride_2_residual_convolutions():
    model = create_model("celnet", in_chans=3)
    head_conv = model.head[0]
    assert head_conv.kernel_size == (3, 3) and head_conv.stride == (1, 1) and head_conv.out_channels == 16
    assert [len(stage) for stage in model.stages] == [3, 3, 3]
    assert all(isinstance(block, MAResBlock) for stage in model.stages for block in stage)
    for index, stage in enumerate(model.stages):
        for position, block in enumerate(stage):
            downsamples = index > 0 and position == 0
            assert block.conv1.stride == ((2, 2) if downsamples else (1, 1))
            if downsamples:
                conv, norm = block.shortcut
                assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
                assert conv.kernel_size == (3, 3) and conv.stride == (2, 2)
                assert conv.in_channels * 2 == conv.out_channels
            else:
                assert isinstance(block.shortcut, nn.Identity)


def test_mam_has_cbam_channel_attention_and_3_5_7_spatial_branches():
    model = create_model("celnet", in_chans=3, reduction=4)
    assert len(mams(model)) == 9
    for mam, channels in zip(mams(model), [16] * 3 + [32] * 3 + [64] * 3, strict=True):
        assert [branch.kernel_size for branch in mam.branches] == [(3, 3), (5, 5), (7, 7)]
        assert all(b.in_channels == 2 and b.out_channels == 1 for b in mam.branches)
        assert mam.mlp[0].out_channels == channels // 4 and mam.mlp[-1].out_channels == channels


def test_mam_output_is_the_squeezed_map_gated_in_0_1():
    torch.manual_seed(0)
    mam = MAM(16, reduction=4).eval()
    x = torch.relu(torch.randn(2, 16, 8, 8))
    out = mam(x)
    assert out.shape == x.shape
    assert (out >= 0).all() and (out <= x + 1e-6).all()  # two sigmoid gates: scaled down, never up or negated
    with torch.no_grad():
        mam.branches[0].bias.fill_(-1e4)  # spatial attention closed everywhere
    assert mam(x).abs().max() < 1e-6


def test_cbam_in_place_of_mam_has_one_7x7_spatial_branch_and_bad_options_are_refused():
    """Table 1's "CELNet without MAM + CBAM": the same channel attention, CBAM's single 7 x 7 spatial branch."""
    cbam = create_model("celnet", in_chans=3, attention="cbam")
    modules = mams(cbam)
    assert len(modules) == 9 and all([b.kernel_size for b in m.branches] == [(7, 7)] for m in modules)
    full = create_model("celnet", in_chans=3)
    per_block = (2 * 9 + 1) + (2 * 25 + 1)  # the 3 x 3 and 5 x 5 branches CBAM lacks
    assert n_parameters(full) - n_parameters(cbam) == 9 * per_block
    assert 295_000 <= n_parameters(cbam) <= 297_000  # Table 1: 296K
    with pytest.raises(ValueError, match="attention must be"):
        create_model("celnet", in_chans=3, attention="se")


def test_attention_false_removes_every_mam():
    model = create_model("celnet", in_chans=3, attention=False)
    assert mams(model) == []
    assert all(isinstance(block.attention, nn.Identity) for stage in model.stages for block in stage)
    full = create_model("celnet", in_chans=3)
    assert n_parameters(full) - n_parameters(model) == sum(n_parameters(m) for m in mams(full))


def test_deep_supervision_false_feeds_only_module_3_to_the_classifier():
    with_ds = create_model("celnet", in_chans=1, width=8)
    without = create_model("celnet", in_chans=1, width=8, deep_supervision=False)
    assert with_ds.get_classifier().in_channels == 2 * (16 + 32)  # GAP + GMP of modules 2 and 3
    assert without.get_classifier().in_channels == 2 * 32  # GAP + GMP of module 3
    assert without(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 1)


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_module_2_reaches_the_logit_directly_only_with_deep_supervision(deep_supervision):
    """With module 3's output cut from the graph, the logit still depends on module 2 through its companion output
    when deep supervision is on, and not at all when it is off."""
    torch.manual_seed(0)
    model = create_model("celnet", in_chans=1, width=8, deep_supervision=deep_supervision).eval()
    kept = {}
    model.stages[1].register_forward_hook(lambda _m, _i, output: kept.__setitem__("module2", output))
    model.stages[2].register_forward_hook(lambda _m, _i, output: output.detach())
    logit = model(torch.randn(1, 1, SIZE, SIZE)).sum()
    (gradient,) = torch.autograd.grad(logit, kept["module2"], allow_unused=True)
    if deep_supervision:
        assert gradient is not None and gradient.abs().sum() > 0
    else:
        assert gradient is None


def test_loss_is_binary_cross_entropy_on_the_logit():
    torch.manual_seed(0)
    model = create_model("celnet", in_chans=1, width=4).eval()
    x, y = torch.randn(4, 1, SIZE, SIZE), torch.tensor([0.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        expected = nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        assert model.loss(x, y).item() == pytest.approx(expected.item())


def test_recipe_documents_the_papers_training():
    assert RECIPE["optimizer"] == "sgd_nesterov" and RECIPE["lr"] == 1e-4 and RECIPE["weight_decay"] == 1e-5
    assert RECIPE["milestones"] == (0.5, 0.75) and RECIPE["gamma"] == 0.5 and RECIPE["batch_size"] == 64


def test_rectifiers_are_non_inplace_relu_modules_for_guided_backprop():
    model = create_model("celnet", in_chans=1, width=4)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 9 * 2 + 9  # head, two per block, one in each MAM's MLP
    assert not any(m.inplace for m in relus)


def test_training_lowers_the_loss_and_separates_the_classes(toy):
    assert toy["after"] < 0.5 * toy["before"]
    logits, labels = toy["logits"], toy["labels"]
    assert logits[labels == 1].min() > logits[labels == 0].max()


def test_heatmap_methods_that_apply_exclude_cam():
    model = create_model("celnet", in_chans=1, width=4)
    methods = list_methods(model)
    assert {"celm", "gradcam", "gradcam-multi", "guided-backprop", "scorecam"} <= set(methods)
    assert "cam" not in methods  # a 1 x 1 conv over GAP and GMP of two layers is no CAM classifier


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("method", ["celm", "gradcam", "gradcam-multi", "scorecam"])
def test_heatmaps_have_the_input_size(method, in_chans):
    torch.manual_seed(0)
    model = create_model("celnet", in_chans=in_chans, width=4).eval()
    layers = get_spec("celnet").layers(model)
    assert layers == [model.stages[1], model.stages[2]]
    with get_method(method)(model, layers) as explainer:
        result = explainer(torch.randn(2, in_chans, 48, 40))
    assert result.maps.shape == (2, 48, 40)
    assert np.isfinite(result.maps).all() and result.maps.min() >= 0 and result.maps.max() <= 1
    assert result.logits.shape == (2, 1)


@pytest.mark.parametrize("method", ["celm", "gradcam", "gradcam-multi"])
def test_maps_of_the_trained_model_concentrate_on_the_blob(toy, method):
    model = toy["model"]
    x, corners = blob_images(np.ones(6, dtype=int), np.random.default_rng(5))
    with get_method(method)(model, get_spec("celnet").layers(model)) as explainer:
        maps = explainer(x).maps
    for heat, (top, left) in zip(maps, corners, strict=True):
        inside = np.zeros((SIZE, SIZE), dtype=bool)
        inside[top : top + BLOB, left : left + BLOB] = True
        # The square is 1/16 of the image. Observed: 51-67 % of the heat on it after training, 13-28 % before (a
        # bright square excites even random filters), and the peak on it only after training.
        assert heat[inside].sum() > 0.4 * heat.sum()
        assert inside.ravel()[heat.argmax()]


def test_checkpoint_round_trip_rebuilds_the_ablation(tmp_path):
    torch.manual_seed(0)
    kwargs = {"width": 8, "attention": False}
    model = create_model("celnet", in_chans=1, **kwargs)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 1, SIZE, SIZE) * 2 + 1)  # move the batch-norm statistics off their initial values
    model.eval()
    config = {"architecture": "celnet", "in_chans": 1, "model_kwargs": kwargs}
    checkpoint = save_checkpoint(model, config, tmp_path / "celnet")
    loaded, loaded_config = load_checkpoint(tmp_path / "celnet", expected_sha256=checkpoint.sha256)
    assert loaded_config["model_kwargs"] == kwargs
    assert mams(loaded) == [] and loaded.get_classifier().in_channels == 2 * (16 + 32)
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


# --- CELM: fusion weights chosen on validation, saliency readings (seed 001, section 2.2) ---------------------------


def _constructed_components(monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """CELM's parts replaced by constructed 8 x 8 maps: CAM2 marks the left half, CAM3 the right half, the saliency
    the top half (1) over a faint bottom half (0.2). The mask is the top-left quadrant, so alpha = 0 (CAM2 alone)
    and beta = 1 (the product alone) localise it exactly; returns the (2, 8, 8) masks."""
    cam2 = torch.zeros(8, 8)
    cam2[:, :4] = 1.0
    saliency = torch.full((8, 8), 0.2)
    saliency[:4] = 1.0

    def components(self, x, targets):
        n = len(x)
        return cam2.expand(n, 8, 8), (1.0 - cam2).expand(n, 8, 8), saliency.expand(n, 8, 8), torch.zeros(n, 1)

    monkeypatch.setattr(celm_module.CELM, "components", components)
    masks = np.zeros((2, 8, 8), dtype=np.int8)
    masks[:, :4, :4] = 1
    return masks


def test_weight_search_picks_the_known_best_pair(monkeypatch):
    masks = _constructed_components(monkeypatch)
    model = create_model("celnet", in_chans=1, width=4)
    layers = get_spec("celnet").layers(model)
    search = search_weights(model, layers, torch.zeros(2, 1, 8, 8), masks, threshold=0.35, grid=(0.0, 0.5, 1.0))
    assert (search.alpha, search.beta) == (0.0, 1.0) and search.scores[(0.0, 1.0)] == pytest.approx(1.0)
    # beta 0 keeps the whole left half: Dice 2 * 16 / (2 * 16 + 16); alpha 0.5 fuses to a flat map (nothing at 0.35)
    assert search.scores[(0.0, 0.0)] == pytest.approx(2 / 3) and search.scores[(0.5, 1.0)] == 0.0
    assert search.scores[(1.0, 1.0)] == 0.0 and len(search.scores) == 9
    assert search.record()["alpha"] == 0.0 and len(search.record()["grid"]) == 9


def test_ties_go_to_the_pair_nearest_the_neutral_one(monkeypatch):
    masks = _constructed_components(monkeypatch)
    model = create_model("celnet", in_chans=1, width=4)
    layers = get_spec("celnet").layers(model)
    # at threshold 0.5 beta 0.75 (bottom-left at 0.4 after fusion) ties with beta 1: the nearer to 0.5 wins
    search = search_weights(model, layers, torch.zeros(2, 1, 8, 8), masks, threshold=0.5, grid=(0.0, 0.5, 0.75, 1.0))
    assert search.scores[(0.0, 0.75)] == search.scores[(0.0, 1.0)] == pytest.approx(1.0)
    assert (search.alpha, search.beta) == (0.0, 0.75)


def test_celm_uses_the_weights_stored_with_the_model_unless_given(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 1, SIZE, SIZE)
    model = create_model("celnet", in_chans=1, width=4, celm_alpha=0.0, celm_beta=1.0).eval()
    layers = get_spec("celnet").layers(model)

    def celm(m: nn.Module, **options) -> tuple[np.ndarray, tuple[float, float]]:
        with get_method("celm")(m, get_spec("celnet").layers(m), **options) as explainer:
            return explainer(x).maps, (explainer.alpha, explainer.beta)

    stored, weights = celm(model)
    assert weights == (0.0, 1.0)
    assert np.allclose(stored, celm(model, alpha=0.0, beta=1.0)[0])
    assert not np.allclose(stored, celm(model, alpha=0.5, beta=0.5)[0], atol=1e-3)
    assert celm(model, alpha=1.0)[1] == (1.0, 1.0)  # an explicit value wins, the other stays stored
    assert celm(create_model("celnet", in_chans=1, width=4))[1] == (0.5, 0.5)  # none stored: neutral
    config = {
        "architecture": "celnet",
        "in_chans": 1,
        "model_kwargs": {"width": 4, "celm_alpha": 0.0, "celm_beta": 1.0},
    }
    save_checkpoint(model, config, tmp_path / "tuned")
    loaded, _ = load_checkpoint(tmp_path / "tuned")
    assert (loaded.celm_alpha, loaded.celm_beta) == (0.0, 1.0)
    assert np.allclose(celm(loaded)[0], stored, atol=1e-6)
    assert layers == [model.stages[1], model.stages[2]]
    with pytest.raises(ValueError, match="celm_alpha"):
        create_model("celnet", in_chans=1, width=4, celm_alpha=1.5)


def test_signed_saliency_keeps_zero_gradient_mid_range_the_magnitude_erases_it(monkeypatch):
    """A gradient of -2 (left column), 0 (middle) and +2 (right): signed min-max gives 0, 1/2, 1, the magnitude 1, 0,
    1; with beta = 1 CELM is the CAM times that saliency, so the magnitude map is 0 where the gradient is."""
    gradient = torch.zeros(1, 1, 6, 6)
    gradient[..., :2], gradient[..., 4:] = -2.0, 2.0

    def guided(self, x, targets):
        return gradient.expand(len(x), -1, -1, -1).clone(), torch.zeros(len(x), 1)

    monkeypatch.setattr(celm_module.GuidedBackprop, "gradient", guided)
    torch.manual_seed(0)
    model = create_model("celnet", in_chans=1, width=4).eval()
    layers = get_spec("celnet").layers(model)
    x = torch.randn(1, 1, 6, 6)
    results = {}
    for saliency in ("signed", "magnitude"):
        with get_method("celm")(model, layers, beta=1.0, sigma=0.0, saliency=saliency) as explainer:
            results[saliency] = explainer(x)
    signed, magnitude = results["signed"].extras["saliency"][0], results["magnitude"].extras["saliency"][0]
    assert np.allclose(signed[:, :2], 0.0) and np.allclose(signed[:, 2:4], 0.5) and np.allclose(signed[:, 4:], 1.0)
    assert np.allclose(magnitude[:, :2], 1.0) and np.allclose(magnitude[:, 2:4], 0.0)
    assert np.allclose(results["magnitude"].raw[0][:, 2:4], 0.0)
    cam = results["signed"].extras["cam"][0]
    assert np.allclose(results["signed"].raw[0], cam * signed, atol=1e-6)
    with get_method("celm")(model, layers) as explainer:
        assert explainer.saliency == "signed"  # the default, measured (core.heatmaps.celm docstring)
    with pytest.raises(ValueError, match="saliency"):
        get_method("celm")(model, layers, saliency="abs")


# --- PCam augmentation (seed 001, section 3) ---------------------------------------------------------------------


def _dihedral(image: torch.Tensor) -> list[torch.Tensor]:
    """The eight rotations by multiples of 90 degrees of an image and of its horizontal mirror."""
    return [torch.rot90(view, k, dims=(-2, -1)) for view in (image, image.flip(-1)) for k in range(4)]


def test_pcam_augmentation_only_rotates_and_flips_each_sample_in_place():
    batch = torch.arange(16 * 2 * 12 * 12, dtype=torch.float32).view(16, 2, 12, 12)[:, :1].contiguous()
    before = batch.clone()
    augment = train_augment("CLE", 12, policy="pcam")
    out = augment(batch, torch.Generator().manual_seed(0))
    assert torch.equal(batch, before) and out.shape == batch.shape
    seen = set()
    for original, moved in zip(batch, out, strict=True):
        matches = [i for i, view in enumerate(_dihedral(original)) if torch.equal(view, moved)]
        assert len(matches) == 1  # sample i stays sample i (its label with it), its pixels only moved
        seen.add(matches[0])
    assert len(seen) >= 4  # per-sample draws: several of the eight views in one batch
    assert torch.equal(out, augment(batch, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="policy"):
        train_augment("CLE", 12, policy="jitter")


def test_the_celnet_recipe_trains_with_the_pcam_augmentation(monkeypatch):
    assert recipe_for(TrainConfig(architecture="celnet")).augmentation == "pcam"
    assert recipe_for(TrainConfig(architecture="resnet18")).augmentation == "modality"
    policies, pairs = [], []

    def spy(modality, size, padding=16, *, policy="modality", **strengths):
        policies.append(policy)
        inner = train_augment(modality, size, padding, policy=policy, **strengths)

        def run(batch, generator):
            out = inner(batch, generator)
            pairs.append((batch, out))
            return out

        return run

    monkeypatch.setattr(recipe_module, "train_augment", spy)
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 4)
    x, _ = blob_images(labels, rng)
    config = TrainConfig(architecture="celnet", task="diagnostic", modality="CLE", image_size=SIZE, epochs=1,
                         batch_size=4, lr=0.01, model_kwargs={"width": 4})  # fmt: skip
    fit(config, x, torch.tensor(labels), x, torch.tensor(labels))
    assert policies == ["pcam"] and pairs
    for batch, out in pairs:
        assert all(any(torch.equal(v, o) for v in _dihedral(b)) for b, o in zip(batch, out, strict=True))
