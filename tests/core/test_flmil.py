"""Tissue MIL (core.models.flmil): local cell scores over the estimated specimen, top-k pooled; its heatmaps are
zero off the tissue and peak at the cell that scores highest."""

import numpy as np
import pytest
import torch

from core.heatmaps import get_method
from core.models import create_model, get_spec, load_checkpoint, save_checkpoint
from core.models.flmil import RECEPTIVE_FIELD, tissue_cells, top_k_mean
from core.models.fold import folded_copy

pytestmark = pytest.mark.usefixtures("one_thread")


def _specimen(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Standardised FL-like frames: a dark drape (-2) with a brighter, textured specimen in rows 16-47, columns 8-39."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.full((batch, 1, size, size), -2.0) + 0.05 * torch.randn(batch, 1, size, size, generator=generator)
    x[:, :, 16:48, 8:40] = 0.3 * torch.randn(batch, 1, 32, 32, generator=generator)
    return x


def test_tissue_cells_cover_the_specimen_and_nothing_else():
    cells = tissue_cells(_specimen(), (16, 16))[:, 0]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:12, 2:10] = True  # the specimen's 4 px cells
    assert torch.equal(cells[0], expected) and torch.equal(cells[1], expected)
    flat = tissue_cells(torch.zeros(1, 1, 32, 32), (8, 8))
    assert flat.all()  # no contrast: every cell counts, the model still answers


def test_the_square_padding_is_not_taken_for_the_background():
    """A 48 x 64 frame padded to 64 x 64 (zero rows at the exact minimum, as pad_to_square makes them) with a small
    dim specimen: the drape, barely above the padding, must not join the specimen's class (before the padding was
    left out of the histogram, every drape cell here was called tissue)."""
    generator = torch.Generator().manual_seed(4)
    x = -1.8 + 0.02 * torch.randn(1, 1, 64, 64, generator=generator)  # the dark drape
    x[:, :, 24:32, 24:32] = -1.3 + 0.02 * torch.randn(1, 1, 8, 8, generator=generator)  # a small, dim specimen
    x[:, :, :8], x[:, :, 56:] = -2.0, -2.0  # the padding rows
    cells = tissue_cells(x, (16, 16))[0, 0]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[6:8, 6:8] = True
    assert torch.equal(cells, expected)


def test_top_k_mean_takes_the_highest_share_of_the_valid_cells():
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    valid = torch.tensor([[False, True, True, True, True], [True, False, False, False, False]])
    # row 0: valid 1, 4, 3, 9 -> the top half (2 cells) 9 and 4; row 1: one valid cell, k at least 1
    torch.testing.assert_close(top_k_mean(scores, valid, 0.5), torch.tensor([6.5, 1.0]))
    torch.testing.assert_close(top_k_mean(scores, valid, 0.01), torch.tensor([9.0, 1.0]))
    none = torch.zeros_like(valid)  # no valid cell: all of them count, never -inf
    torch.testing.assert_close(top_k_mean(scores, none, 0.4), torch.tensor([7.0, 4.5]))


def test_the_logit_is_the_top_k_mean_of_tissue_cells_and_grad_cam_peaks_at_the_best_cell(tmp_path):
    torch.manual_seed(0)
    model = create_model("flmil", in_chans=1, width=8, stem_stride=1).eval()
    x = _specimen(3)
    with torch.no_grad():
        scores, valid = model.cell_scores(x)
        logits = model(x)[:, 0]
    assert scores.shape == (3, 1, 16, 16) and bool((scores[~valid.expand_as(scores)] == 0).all())
    torch.testing.assert_close(logits, top_k_mean(scores[:, 0].flatten(1), valid.flatten(1), 0.1))

    weights_only = scores - model.classifier.bias.view(1, -1, 1, 1) * valid  # Grad-CAM leaves the bias out
    best = weights_only.flatten(1).argmax(1).numpy()
    with get_method("gradcam")(model, get_spec("flmil").layers(model)) as explainer:
        result = explainer(x)
    np.testing.assert_allclose(result.logits[:, 0], logits.numpy(), rtol=1e-5, atol=1e-5)
    raw = result.raw.reshape(3, -1)
    assert (raw[~valid.flatten(1).numpy()] == 0).all()  # nothing off the tissue
    positive = raw.max(1) > 0
    assert positive.any()
    np.testing.assert_array_equal(raw.argmax(1)[positive], best[positive])

    folded = folded_copy(model, x[:1])
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    config = {"architecture": "flmil", "in_chans": 1, "model_kwargs": {"width": 8, "stem_stride": 1}}
    checkpoint = save_checkpoint(model, config, tmp_path / "flmil")
    reloaded, _ = load_checkpoint(checkpoint.path, checkpoint.sha256)
    torch.testing.assert_close(reloaded(x), model(x))


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_a_cell_sees_only_its_receptive_field(stem_stride):
    torch.manual_seed(1)
    model = create_model("flmil", in_chans=1, width=8, tissue=False, stem_stride=stem_stride).eval()
    x = torch.randn(1, 1, 160, 160, requires_grad=True)
    scores, _ = model.cell_scores(x)
    middle = scores.shape[-1] // 2
    scores[0, 0, middle, middle].backward()
    rows, cols = torch.nonzero(x.grad[0, 0].abs() > 0, as_tuple=True)
    field = RECEPTIVE_FIELD[stem_stride]
    assert rows.max() - rows.min() + 1 <= field and cols.max() - cols.min() + 1 <= field
    assert rows.max() - rows.min() + 1 >= field - 4 * stem_stride  # and about all of it


def test_the_tissue_gets_every_gradient_and_the_drape_none():
    torch.manual_seed(2)  # in eval mode: in training, batch norm's statistics tie every pixel to every other
    model = create_model("flmil", in_chans=1, width=8, top_k=1.0, stem_stride=1).eval()
    x = _specimen(2).requires_grad_(True)
    model(x).sum().backward()
    far = x.grad[:, 0, :, 58:]  # beyond the last tissue cell (centre near column 37.5) plus half the receptive field
    assert far.abs().max() == 0 and x.grad[:, 0, 16:48, 8:40].abs().max() > 0


def test_refusals():
    with pytest.raises(ValueError, match="top_k is a share"):
        create_model("flmil", in_chans=1, top_k=0.0)
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
        create_model("flmil", in_chans=1, stem_stride=4)


def test_its_own_map_is_the_cell_scores_whatever_the_call_and_the_default():
    torch.manual_seed(3)
    model = create_model("flmil", in_chans=1, width=8, stem_stride=1).eval()
    with torch.no_grad():
        model.classifier.bias.fill_(-50.0)  # every cell scores below zero: a non-tumor call everywhere
    x = _specimen(2)
    with torch.no_grad():
        scores, valid = model.cell_scores(x)
    with get_method("tissue-mil")(model) as explainer:
        result = explainer(x)
    assert (result.logits[:, 0] < 0).all()
    inside = valid[:, 0].flatten(1).numpy()
    raw = result.raw.reshape(2, -1)
    np.testing.assert_array_equal(raw.argmax(1), scores[:, 0].masked_fill(~valid[:, 0], -1e9).flatten(1).argmax(1))
    assert (raw[~inside] == raw[inside].reshape(2, -1).min(1).repeat((~inside).sum(1))).all()  # off tissue: the floor
    assert result.maps.shape == (2, 64, 64) and result.maps.max() == 1.0

    from core.triage import default_method

    assert default_method(["gradcam", "scorecam", "tissue-mil"], "flmil") == "tissue-mil"
