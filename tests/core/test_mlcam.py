"""MLCAM-LICI (seed 000): shapes, the per-depth losses and logit, eq. 5 and its Table 2 ablations, localisation on a
toy task, checkpoints and the heatmap methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.heatmaps import get_method, list_methods
from core.models import create_model, get_spec, load_checkpoint, save_checkpoint
from core.models.mlcam import ABLATIONS, final_dfm, normalise_map

SIZE = 32


def square_images(n: int, rng: np.random.Generator, positive: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy grey images and their masks; positives carry one bright 8-px square at a random place."""
    x = rng.normal(0.0, 0.3, size=(n, 1, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for i in np.flatnonzero(positive):
        top, left = rng.integers(0, SIZE - 8, size=2)
        x[i, 0, top : top + 8, left : left + 8] += 2.0
        masks[i, top : top + 8, left : left + 8] = True
    return torch.from_numpy(x), torch.from_numpy(masks)


def expected_normalised(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """DFM' / NFM' written out: bilinear upsampling, ReLU, per-image min-max (zeros when constant)."""
    up = torch.relu(F.interpolate(raw[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0])
    out = torch.zeros_like(up)
    for b in range(up.shape[0]):
        low, high = up[b].min(), up[b].max()
        if high > low:
            out[b] = (up[b] - low) / (high - low)
    return out


def expected_minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max written out (zeros when constant)."""
    return torch.stack([(m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else 0 * m for m in maps])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, list[float]]:
    """A width-8 MLCAM-LICI trained with its own loss for 40 steps to tell images with a bright square from noise."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("mlcam_lici", in_chans=1, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        labels = rng.integers(0, 2, size=16)
        x, _ = square_images(16, rng, labels)
        loss = model.loss(x, torch.from_numpy(labels).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.zero_grad(set_to_none=True)
    return model.eval(), losses


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    labels = np.array([1, 0] * 6)
    x, masks = square_images(len(labels), np.random.default_rng(1), labels)
    return x, masks, labels


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_shapes(size: int, in_chans: int) -> None:
    torch.manual_seed(0)
    model = create_model("mlcam_lici", in_chans=in_chans, width=4).eval()
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        logits, dfm, nfm = model.layer_maps(x)
        maps, fdfm_logits = model.fdfm(x)
        assert model(x).shape == (2, 1)
        assert torch.equal(logits, model(x))
        assert torch.equal(fdfm_logits, logits)
    assert [tuple(m.shape) for m in dfm] == [(2, size // s, size // s) for s in (2, 4, 8)]
    assert [tuple(m.shape) for m in nfm] == [tuple(m.shape) for m in dfm]
    assert maps.shape == (2, size, size)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert model.loss(x, torch.tensor([0.0, 1.0])).ndim == 0


def test_registry_entry() -> None:
    spec = get_spec("mlcam_lici")
    model = create_model("mlcam_lici", in_chans=1, width=4)
    assert spec.target_layer(model) is model.stages[-1]
    assert spec.layers(model) == list(model.stages)
    with pytest.raises(ValueError, match="one logit"):
        create_model("mlcam_lici", in_chans=1, num_classes=2)


def test_logit_and_loss_follow_eqs_3_4() -> None:
    """The logit is the mean over depths of GAP(DFM) - GAP(NFM); the loss sums each depth's two-class softmax
    cross-entropy (written here as the equivalent binary cross-entropy on S_D - S_N)."""
    torch.manual_seed(1)
    model = create_model("mlcam_lici", in_chans=1, width=4).eval()
    x, y = torch.randn(4, 1, SIZE, SIZE), torch.tensor([1.0, 0.0, 0.0, 1.0])
    with torch.no_grad():
        logits, dfm, nfm = model.layer_maps(x)
        loss = model.loss(x, y)
    per_depth = [d.mean(dim=(1, 2)) - n.mean(dim=(1, 2)) for d, n in zip(dfm, nfm, strict=True)]
    torch.testing.assert_close(logits[:, 0], torch.stack(per_depth).mean(dim=0))
    expected = sum(F.binary_cross_entropy_with_logits(s, y) for s in per_depth)
    torch.testing.assert_close(loss, expected)


def test_training_lowers_loss_and_separates_classes(trained: tuple[nn.Module, list[float]], held_out) -> None:
    model, losses = trained
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    x, _, labels = held_out
    with torch.no_grad():
        logits = model(x)[:, 0]
    assert float(logits[labels == 1].min()) > float(logits[labels == 0].max())


def test_eq5_against_a_loop_over_ordered_pairs() -> None:
    generator = torch.Generator().manual_seed(2)
    dfm = [torch.rand(2, 6, 5, generator=generator) for _ in range(3)]
    nfm = [torch.rand(2, 6, 5, generator=generator) for _ in range(3)]
    expected = torch.zeros(2, 6, 5)
    for i in range(3):
        for j in range(3):
            if i != j:
                expected += (dfm[i] - dfm[i] * nfm[i]) * (dfm[j] - dfm[j] * nfm[j])
    torch.testing.assert_close(final_dfm(dfm, nfm), expected_minmax(expected))
    # Without lateral inhibition (M3): the same sum of DFM'_i * DFM'_j.
    no_li = sum(dfm[i] * dfm[j] for i in range(3) for j in range(3) if i != j)
    torch.testing.assert_close(final_dfm(dfm, None), expected_minmax(no_li))


def test_ablations_match_their_formulas() -> None:
    assert list(ABLATIONS) == [
        "M2 (LI+CI)",
        "M3 (no LI)",
        "M4 (LI, layer 1)",
        "M5 (LI, layer 2)",
        "M6 (LI, layer 3)",
        "M7 (layer 1)",
        "M8 (layer 2)",
        "M9 (layer 3)",
    ]
    torch.manual_seed(3)
    model = create_model("mlcam_lici", in_chans=1, width=4).eval()
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        _, dfm, nfm = model.layer_maps(x)
        got = {name: model.fdfm(x, **kwargs)[0] for name, kwargs in ABLATIONS.items()}
    d = [expected_normalised(m, (SIZE, SIZE)) for m in dfm]
    n = [expected_normalised(m, (SIZE, SIZE)) for m in nfm]
    li = [d[k] - d[k] * n[k] for k in range(3)]
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    expected = {
        "M2 (LI+CI)": expected_minmax(sum(li[i] * li[j] for i, j in pairs)),
        "M3 (no LI)": expected_minmax(sum(d[i] * d[j] for i, j in pairs)),
    }
    for k in range(3):
        expected[f"M{4 + k} (LI, layer {k + 1})"] = expected_minmax(li[k])
        expected[f"M{7 + k} (layer {k + 1})"] = expected_minmax(d[k])
    for name in ABLATIONS:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    assert not torch.allclose(got["M2 (LI+CI)"], got["M3 (no LI)"])  # lateral inhibition changes the map here
    torch.testing.assert_close(model.fdfm(x)[0], got["M2 (LI+CI)"])


def test_maps_are_normalised_and_constant_maps_give_zeros() -> None:
    generator = torch.Generator().manual_seed(4)
    raw = torch.randn(2, 4, 4, generator=generator)
    maps = normalise_map(raw, (16, 16))
    assert maps.shape == (2, 16, 16)
    torch.testing.assert_close(maps.amin(dim=(1, 2)), torch.zeros(2))
    torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(2))
    constant = torch.stack([torch.full((4, 4), 3.0), torch.full((4, 4), -1.0)])
    assert torch.equal(normalise_map(constant, (8, 8)), torch.zeros(2, 8, 8))
    assert torch.equal(normalise_map(-raw.abs() - 0.1, (8, 8)), torch.zeros(2, 8, 8))  # nothing positive
    assert torch.equal(final_dfm([torch.zeros(2, 8, 8)] * 3, [torch.rand(2, 8, 8)] * 3), torch.zeros(2, 8, 8))


def test_invalid_variants_are_refused() -> None:
    model = create_model("mlcam_lici", in_chans=1, width=4)
    x = torch.randn(1, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="exactly one layer"):
        model.fdfm(x, layers=(0, 1), collateral_integration=False)
    with pytest.raises(ValueError, match="at least two layers"):
        model.fdfm(x, layers=(2,), collateral_integration=True)
    with pytest.raises(ValueError, match="distinct depths"):
        model.fdfm(x, layers=(0, 3))
    single, _ = model.fdfm(x, layers=(2,))  # one depth: no collateral integration unless asked
    expected, _ = model.fdfm(x, **ABLATIONS["M6 (LI, layer 3)"])
    assert torch.equal(single, expected)
    for options, message in (({"depth": 4}, "depth must be 0"), ({"pooling": "max"}, "pooling must be one of"),
                             ({"pooling": "combined", "depth": 2}, "takes no single depth")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            create_model("mlcam_lici", in_chans=1, width=4, **options)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_single_depth_network_is_mlcam_k_and_takes_the_full_networks_ablations(depth) -> None:
    torch.manual_seed(0)
    model = create_model("mlcam_lici", in_chans=1, width=4, depth=depth).eval()
    assert len(model.stages) == depth and len(model.heads) == 1 and model.depths == (depth - 1,)
    x = torch.randn(3, 1, SIZE, SIZE)
    logits, dfm, nfm = model.layer_maps(x)
    assert len(dfm) == len(nfm) == 1 and dfm[0].shape[-1] == SIZE // 2**depth
    torch.testing.assert_close(logits, (dfm[0] - nfm[0]).mean(dim=(1, 2))[:, None])
    y = torch.tensor([1.0, 0.0, 1.0])
    scores = torch.stack([nfm[0].mean(dim=(1, 2)), dfm[0].mean(dim=(1, 2))], dim=1)
    torch.testing.assert_close(model.loss(x, y), F.cross_entropy(scores, y.long()))  # the one depth's loss alone
    with_li = ABLATIONS[("M4 (LI, layer 1)", "M5 (LI, layer 2)", "M6 (LI, layer 3)")[depth - 1]]
    without = ABLATIONS[("M7 (layer 1)", "M8 (layer 2)", "M9 (layer 3)")[depth - 1]]
    li_map, _ = model.fdfm(x, **with_li)
    torch.testing.assert_close(model.fdfm(x)[0], li_map)
    plain, _ = model.fdfm(x, **without)
    torch.testing.assert_close(plain, normalise_map(dfm[0], (SIZE, SIZE)))
    with pytest.raises(ValueError, match="this network's heads"):
        model.fdfm(x, layers=((depth % 3),))


def test_mlgap_pools_the_combined_map_once_and_maps_it() -> None:
    torch.manual_seed(0)
    model = create_model("mlcam_lici", in_chans=1, width=4, pooling="combined").eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    _, dfm, nfm = model.layer_maps(x)
    size = dfm[0].shape[-2:]
    up = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in dfm]
    up_n = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in nfm]
    combined_d, combined_n = sum(up), sum(up_n)
    torch.testing.assert_close(model(x), (combined_d - combined_n).mean(dim=(1, 2))[:, None])
    y = torch.tensor([1.0, 0.0])
    scores = torch.stack([combined_n.mean(dim=(1, 2)), combined_d.mean(dim=(1, 2))], dim=1)
    torch.testing.assert_close(model.loss(x, y), F.cross_entropy(scores, y.long()))  # one loss, not three
    maps, _ = model.fdfm(x)
    torch.testing.assert_close(maps, normalise_map(combined_d, (SIZE, SIZE)))
    with pytest.raises(ValueError, match="no per-depth ablations"):
        model.fdfm(x, **ABLATIONS["M2 (LI+CI)"])


def test_trained_fdfm_falls_on_the_square(trained: tuple[nn.Module, list[float]], held_out) -> None:
    model, _ = trained
    x, masks, labels = held_out
    with torch.no_grad():
        maps, _ = model.fdfm(x)
    positive, mask = maps[labels == 1], masks[labels == 1]
    inside, outside = float(positive[mask].mean()), float(positive[~mask].mean())
    assert inside > 0.5
    assert inside > 4 * outside


def test_checkpoint_round_trip(trained: tuple[nn.Module, list[float]], held_out, tmp_path) -> None:
    model, _ = trained
    config = {"architecture": "mlcam_lici", "in_chans": 1, "model_kwargs": {"width": 8}}
    checkpoint = save_checkpoint(model, config, tmp_path / "mlcam")
    loaded, loaded_config = load_checkpoint(checkpoint.path, expected_sha256=checkpoint.sha256)
    x = held_out[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.fdfm(x)[0], model.fdfm(x)[0], rtol=0, atol=0)
    assert loaded_config["model_kwargs"] == {"width": 8}


def test_heatmap_methods(trained: tuple[nn.Module, list[float]], held_out) -> None:
    model, _ = trained
    x = held_out[0][:4]
    layers = get_spec("mlcam_lici").layers(model)
    methods = list_methods(model)
    assert "mlcam-lici" in methods and "gradcam" in methods
    assert "cam" not in methods  # no linear classifier after GAP: CAM declines instead of crashing
    with pytest.raises(ValueError, match="no linear classifier"), get_method("cam")(model, layers):
        pass
    assert "mlcam-lici" not in list_methods(create_model("tiny_cnn", in_chans=1, width=4))
    with get_method("mlcam-lici")(model, layers) as explainer:
        result = explainer(x)
    assert result.maps.shape == (4, SIZE, SIZE)
    np.testing.assert_allclose(result.maps, model.fdfm(x)[0].detach().numpy(), atol=1e-6)


def test_gradcam_on_the_deepest_stage_is_its_dfm_minus_nfm(trained: tuple[nn.Module, list[float]], held_out) -> None:
    """The logit is linear in the last stage through GAP, so Grad-CAM there is ReLU(DFM_3 - NFM_3) / (3 h w)."""
    model, _ = trained
    x = held_out[0][:4]
    with get_method("gradcam")(model, get_spec("mlcam_lici").layers(model)) as explainer:
        result = explainer(x)
    assert result.maps.shape == (4, SIZE, SIZE)
    with torch.no_grad():
        _, dfm, nfm = model.layer_maps(x)
    h, w = dfm[2].shape[-2:]
    expected = torch.relu(dfm[2] - nfm[2]) / (3 * h * w)
    np.testing.assert_allclose(result.raw, expected.numpy(), rtol=1e-4, atol=1e-7)
