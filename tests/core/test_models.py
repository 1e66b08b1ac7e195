import json

import pytest
import torch

from core.models import create_model, get_spec, list_models, load_checkpoint, save_checkpoint, sha256_file


def test_registry_lists_the_architectures_and_refuses_unknown_names():
    assert {"efficientnet_b0", "efficientnet_b2", "tiny_cnn"} <= set(list_models())
    with pytest.raises(KeyError, match="registered: "):
        create_model("resnet9000", in_chans=1)


def test_flcnn_head_is_one_logit_with_dropout_half_and_xavier_init():
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", in_chans=1)
    classifier = model.get_classifier()
    assert classifier.out_features == 1
    assert model.drop_rate == 0.5
    assert torch.count_nonzero(classifier.bias) == 0
    fan_in, fan_out = classifier.in_features, classifier.out_features
    expected_std = (2.0 / (fan_in + fan_out)) ** 0.5  # Xavier normal
    assert classifier.weight.std().item() == pytest.approx(expected_std, rel=0.2)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1)


@pytest.mark.parametrize("name", ["efficientnet_b0", "tiny_cnn"])
def test_target_layer_is_a_spatial_feature_map(name):
    model = create_model(name, in_chans=3).eval()
    seen = {}

    def keep(_module, _inputs, output):
        seen["shape"] = output.shape

    handle = get_spec(name).target_layer(model).register_forward_hook(keep)
    model(torch.randn(1, 3, 64, 64))
    handle.remove()
    assert len(seen["shape"]) == 4 and seen["shape"][-1] >= 2


def test_checkpoint_round_trip_and_sha256(tmp_path):
    model = create_model("tiny_cnn", in_chans=1).eval()
    checkpoint = save_checkpoint(model, {"architecture": "tiny_cnn", "in_chans": 1, "modality": "FL"}, tmp_path / "m")
    assert checkpoint.sha256 == sha256_file(checkpoint.path)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["modality"] == "FL"
    loaded, config = load_checkpoint(tmp_path / "m", expected_sha256=checkpoint.sha256)
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(loaded(x), model(x))
    assert config["architecture"] == "tiny_cnn"
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_changed_checkpoint_is_refused(tmp_path):
    model = create_model("tiny_cnn", in_chans=1)
    checkpoint = save_checkpoint(model, {"architecture": "tiny_cnn", "in_chans": 1}, tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        load_checkpoint(checkpoint.path, expected_sha256="0" * 64)


@pytest.mark.parametrize("name", ["tiny_cnn", "efficientnet_b0"])
def test_batchnorm_folding_gives_the_same_outputs_and_leaves_the_model_alone(name):
    from core.models.fold import fold_batchnorm, folded_copy

    torch.manual_seed(0)
    model = create_model(name, in_chans=1)
    with torch.no_grad():  # statistics that are not the initial 0/1, so a wrong fold shows
        model.train()
        for _ in range(3):
            model(torch.randn(8, 1, 64, 64) * 3 + 1)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, pairs = fold_batchnorm(model)
    assert pairs == {"tiny_cnn": 3, "efficientnet_b0": 49}[name]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert folded_copy(model, x) is not model


def test_a_fold_that_changes_the_outputs_is_not_used(monkeypatch):
    import core.models.fold as fold

    model = create_model("tiny_cnn", in_chans=1).eval()
    real = fold.fold_batchnorm

    def broken(m):
        folded, pairs = real(m)
        with torch.no_grad():
            folded.classifier.weight.mul_(2)
        return folded, pairs

    monkeypatch.setattr(fold, "fold_batchnorm", broken)
    assert fold.folded_copy(model, torch.randn(2, 1, 32, 32)) is model


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_output_stride_16_gives_a_finer_map_with_the_same_weights(name, tmp_path):
    from core.heatmaps import get_method
    from core.models.fold import folded_copy

    torch.manual_seed(0)
    coarse = create_model(name, in_chans=1).eval()
    fine = create_model(name, in_chans=1, output_stride=16).eval()
    assert [p.shape for p in fine.parameters()] == [p.shape for p in coarse.parameters()]
    fine.load_state_dict(coarse.state_dict())  # dilation instead of stride: the same weights fit
    x = torch.randn(2, 1, 128, 128)
    with get_method("gradcam")(fine, get_spec(name).layers(fine)) as explainer:
        result = explainer(x)
    with get_method("gradcam")(coarse, get_spec(name).layers(coarse)) as explainer:
        before = explainer(x)
    assert before.raw.shape[-2:] == (4, 4) and result.raw.shape[-2:] == (8, 8)
    assert result.maps.shape == (2, 128, 128)
    folded = folded_copy(fine, x[:1])
    torch.testing.assert_close(folded(x), fine(x), rtol=1e-4, atol=1e-4)
    config = {"architecture": name, "in_chans": 1, "model_kwargs": {"output_stride": 16}}
    checkpoint = save_checkpoint(fine, config, tmp_path / name)
    reloaded, _ = load_checkpoint(checkpoint.path, checkpoint.sha256)
    torch.testing.assert_close(reloaded(x), fine(x))
    with pytest.raises(ValueError, match="output_stride must be one of 8, 16, 32"):
        create_model(name, in_chans=1, output_stride=12)
