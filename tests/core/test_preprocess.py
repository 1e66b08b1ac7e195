"""Tests for core.data.preprocess: properties of the FL/WL pipeline on small seeded images."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy import ndimage

from core.data.io import Image, ImageError, read_image
from core.data.preprocess import (
    MODALITIES,
    autocontrast,
    channels_for,
    denoise,
    display_image,
    fl_normalize,
    pad_to_square,
    prepare,
    prepare_batch,
    square_box,
    standardize,
    to_model_array,
    train_augment,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def _rng(seed: int = 7) -> np.random.Generator:
    """A fresh seeded generator."""
    return np.random.default_rng(seed)


def _fl_image(height: int = 40, width: int = 64, offset: int = 1500) -> Image:
    """A 16-bit fluorescence-like image: ambient offset, a bright blob and Poisson noise."""
    rows, cols = np.mgrid[0:height, 0:width]
    blob = 20000 * np.exp(-((rows - height / 2) ** 2 + (cols - width / 3) ** 2) / 60.0)
    counts = _rng().poisson(blob + 300) + offset
    return read_image(counts.astype(np.uint16), "fl.tif")


def _wl_image(height: int = 48, width: int = 30) -> Image:
    """A uint8 colour photo with distinct channels."""
    return read_image(_rng().integers(0, 256, (height, width, 3), dtype=np.uint8), "wl.jpg")


def test_modalities_and_channels() -> None:
    assert {m: channels_for(m) for m in MODALITIES} == {"FL": 1, "WL": 3, "CLE": 1, "RCM": 1}
    with pytest.raises(ValueError, match="unknown modality"):
        channels_for("MRI")


# --- fl_normalize, autocontrast, denoise ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64, np.uint8])
def test_fl_normalize_is_monotone_and_in_range(dtype: type) -> None:
    high = 255 if dtype == np.uint8 else 60000
    values = (_rng().random((30, 40)) ** 3 * high).astype(dtype)
    out = fl_normalize(values)
    assert out.dtype == np.float32 and out.shape == values.shape
    assert out.min() == 0.0 and out.max() == 1.0
    order = np.argsort(values, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)
    np.testing.assert_array_equal(fl_normalize(values), out)


def test_fl_normalize_is_nonlinear_and_ignores_ambient_offset() -> None:
    ramp = np.linspace(0, 40000, 64 * 64).reshape(64, 64)
    out = fl_normalize(ramp.astype(np.uint16))
    middle = out[32, 0]
    assert 0.55 < middle < 0.85, "a mid-range intensity is lifted above the linear 0.5"
    shifted = fl_normalize((ramp + 12000).astype(np.uint16))
    np.testing.assert_allclose(shifted, out, atol=1e-4)


@pytest.mark.parametrize("value", [0, 1, 65535])
def test_fl_normalize_constant_images_are_safe(value: int) -> None:
    out = fl_normalize(np.full((20, 20), value, dtype=np.uint16))
    assert np.all(np.isfinite(out)) and np.all(out == 0.0)


def test_autocontrast_stretches_percentiles() -> None:
    values = _rng().normal(0.4, 0.05, (50, 50)).astype(np.float32)
    out = autocontrast(values, cutoff=1.0)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert 0.01 <= np.mean(out == 0.0) <= 0.02
    np.testing.assert_array_equal(autocontrast(np.full((8, 8), 0.3)), np.full((8, 8), 0.3, dtype=np.float32))
    with pytest.raises(ValueError):
        autocontrast(values, cutoff=50)


def test_denoise_removes_isolated_pixels_and_keeps_edges() -> None:
    step = np.zeros((20, 20), dtype=np.float32)
    step[:, 10:] = 1.0
    noisy = step.copy()
    noisy[5, 3] = 1.0
    noisy[12, 15] = 0.0
    np.testing.assert_array_equal(denoise(noisy), step)
    colour = np.repeat(noisy[..., None], 3, axis=2)
    np.testing.assert_array_equal(denoise(colour), np.repeat(step[..., None], 3, axis=2))


@pytest.mark.parametrize(
    ("shape", "dtype"), [((37, 50), np.float32), ((16, 17), np.uint16), ((21, 30, 3), np.uint8), ((5, 9), np.float64)]
)
def test_denoise_equals_scipys_median_filter_exactly(shape: tuple[int, ...], dtype: type) -> None:
    rng = np.random.default_rng(3)
    values = (rng.random(shape) * 1000).astype(dtype)
    size = (3, 3) + (1,) * (len(shape) - 2)
    expected = ndimage.median_filter(values, size=size, mode="reflect")
    result = denoise(values)
    assert result.dtype == values.dtype
    np.testing.assert_array_equal(result, expected)


# --- padding geometry -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(30, 50), (50, 30), (31, 50), (40, 40), (1, 7)])
def test_pad_to_square_is_centred_and_matches_square_box(height: int, width: int) -> None:
    top, left, side = square_box(height, width)
    assert side == max(height, width)
    bottom, right = side - height - top, side - width - left
    assert 0 <= bottom - top <= 1 and 0 <= right - left <= 1
    for shape in ((height, width), (height, width, 3)):
        x = _rng().random(shape).astype(np.float32) + 0.5
        square = pad_to_square(x)
        assert square.shape == (side, side) + shape[2:] and square.dtype == x.dtype
        np.testing.assert_array_equal(square[top : top + height, left : left + width], x)
        assert square.sum() == pytest.approx(x.sum(), rel=1e-5), "everything outside the box is zero"
    with pytest.raises(ValueError):
        square_box(0, 5)


# --- modality rule --------------------------------------------------------------------------------------------------


def test_colour_photo_is_refused_for_single_channel_modalities() -> None:
    photo = _wl_image()
    for modality in ("FL", "CLE", "RCM"):
        with pytest.raises(ImageError) as caught:
            to_model_array(photo, modality)
        assert caught.value.name == "wl.jpg"
        assert "colour (RGB) photo" in caught.value.reason
        assert f"{modality} models take single-channel" in caught.value.reason
        assert "choose a WL model" in caught.value.reason


def test_grey_saved_as_rgb_is_reduced_to_one_channel() -> None:
    grey = _rng().integers(10, 240, (24, 36), dtype=np.uint8)
    as_rgb = read_image(np.repeat(grey[..., None], 3, axis=2))
    single = read_image(grey)
    np.testing.assert_array_equal(to_model_array(as_rgb, "FL"), to_model_array(single, "FL"))
    jittered = as_rgb.array.astype(np.int16) + _rng().integers(-1, 2, as_rgb.array.shape)
    near_grey = read_image(np.clip(jittered, 0, 255).astype(np.uint8))
    assert to_model_array(near_grey, "FL").shape == (24, 36, 1)
    sixteen = read_image(np.repeat(grey[..., None].astype(np.uint16) * 200, 3, axis=2))
    assert to_model_array(sixteen, "FL").shape == (24, 36, 1)


def test_wl_rule() -> None:
    grey = read_image(_rng().integers(0, 256, (20, 30), dtype=np.uint8))
    out = to_model_array(grey, "WL")
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_allclose(out[..., 1], grey.array / 255.0, atol=1e-7)
    with pytest.raises(ImageError, match="fluorescence intensity image \\(16-bit\\).*choose an FL model"):
        to_model_array(_fl_image(), "WL")
    with pytest.raises(ImageError, match="float"):
        to_model_array(read_image(np.ones((20, 20), dtype=np.float32)), "WL")
    photo = _wl_image()
    np.testing.assert_allclose(to_model_array(photo, "WL"), photo.array / 255.0, atol=1e-7)


def test_fl_model_array_and_display_image() -> None:
    image = _fl_image()
    model = to_model_array(image, "FL")
    assert model.shape == (40, 64, 1) and model.dtype == np.float32
    assert 0.0 <= model.min() < 0.1 and 0.9 < model.max() <= 1.0, "stretched to the full range, outliers removed"
    shown = display_image(image, "FL")
    assert shown.shape == (40, 64)
    np.testing.assert_array_equal(shown, model[..., 0])
    assert np.unravel_index(shown.argmax(), shown.shape)[1] < 32, "the bright blob stays where it was"
    assert display_image(_wl_image(), "WL").shape == (48, 30, 3)
    eight_bit = read_image(np.linspace(0, 100, 40 * 64).reshape(40, 64).astype(np.uint8))
    assert to_model_array(eight_bit, "FL").max() == 1.0


def test_cle_is_linear_by_dtype_range() -> None:
    array = np.linspace(0, 65535, 20 * 30).reshape(20, 30).astype(np.uint16)
    np.testing.assert_allclose(to_model_array(read_image(array), "CLE")[..., 0], array / 65535.0, atol=1e-6)


# --- prepare and standardize ----------------------------------------------------------------------------------------


def test_prepare_shapes_and_zero_padding() -> None:
    fl = prepare(_fl_image(40, 64), "FL", 32)
    assert fl.shape == (1, 32, 32) and fl.dtype == torch.float32
    assert torch.all(fl[:, 0, :] == -2.0), "the padded rows are black before standardisation"
    assert fl.min() >= -2.0 and fl.max() <= 2.0
    wl = prepare(_wl_image(48, 30), "WL", 32)
    assert wl.shape == (3, 32, 32) and wl.dtype == torch.float32
    expected_black = (-IMAGENET_MEAN / IMAGENET_STD)[:, None]
    torch.testing.assert_close(wl[:, :, 0], expected_black.expand(3, 32))
    assert prepare(_wl_image(48, 30), "WL", 48).shape == (3, 48, 48)


def test_prepare_batch_stacks_prepare() -> None:
    images = [_fl_image(40, 64), _fl_image(64, 40), _fl_image(33, 33)]
    batch = prepare_batch(images, "FL", 24)
    assert batch.shape == (3, 1, 24, 24)
    for index, image in enumerate(images):
        torch.testing.assert_close(batch[index], prepare(image, "FL", 24))
    assert prepare_batch([], "WL", 24).shape == (0, 3, 24, 24)


def test_standardize_constants() -> None:
    torch.testing.assert_close(
        standardize(torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3), "FL"), torch.tensor([[[-2.0, 0.0, 2.0]]])
    )
    ones = torch.ones(2, 3, 4, 4)
    torch.testing.assert_close(standardize(ones, "WL")[1, :, 2, 2], (1 - IMAGENET_MEAN) / IMAGENET_STD)
    with pytest.raises(ValueError):
        standardize(ones, "FL")


# --- train_augment --------------------------------------------------------------------------------------------------


def _batch(modality: str, count: int = 8, size: int = 32) -> torch.Tensor:
    """A standardised batch of distinct images, as prepare_batch gives it."""
    images = _fl_image() if modality == "FL" else _wl_image()
    return prepare_batch([images] * count, modality, size)


@pytest.mark.parametrize("modality", ["FL", "WL"])
def test_train_augment_is_deterministic_per_seed(modality: str) -> None:
    batch = _batch(modality)
    before = batch.clone()
    augment = train_augment(modality, 32)
    first = augment(batch, torch.Generator().manual_seed(3))
    again = augment(batch, torch.Generator().manual_seed(3))
    other = augment(batch, torch.Generator().manual_seed(4))
    assert first.shape == batch.shape and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(batch, before), "the input batch is left untouched"
    assert len({sample.numpy().tobytes() for sample in first}) == len(first), "each sample draws its own parameters"
    assert pickle.loads(pickle.dumps(augment))(batch, torch.Generator().manual_seed(3)).equal(first)


def test_crop_with_padding_keeps_size_and_shifts() -> None:
    ones = standardize(torch.ones(32, 1, 24, 24), "FL")
    out = train_augment("FL", 24, padding=16)(ones, torch.Generator().manual_seed(0))
    assert out.shape == (32, 1, 24, 24)
    black = out == -2.0
    shifted = black.flatten(1).any(dim=1)
    assert shifted.sum() >= 24, "most crops reach into the zero padding"
    assert black.flatten(1).all(dim=1).sum() < 32
    larger = train_augment("WL", 24, padding=0)(standardize(torch.ones(4, 3, 40, 40), "WL"), torch.Generator())
    assert larger.shape == (4, 3, 24, 24)
    with pytest.raises(ValueError):
        train_augment("FL", 64, padding=16)(ones, torch.Generator())


def test_fl_vertical_flip_flips_and_horizontal_never_does() -> None:
    size = 24
    rows = torch.linspace(0.05, 0.5, size).view(size, 1)
    cols = torch.linspace(0.0, 0.45, size).view(1, size)
    ramp = (rows + cols).expand(64, 1, size, size)
    out = train_augment("FL", size, padding=0)(standardize(ramp, "FL"), torch.Generator().manual_seed(1))
    row_profile = out.mean(dim=(1, 3))
    col_profile = out.mean(dim=(1, 2))
    rising = (row_profile.diff(dim=1) >= 0).all(dim=1)
    falling = (row_profile.diff(dim=1) <= 0).all(dim=1)
    assert torch.all(rising | falling), "brightness and contrast keep the ramp monotone"
    flat = rising & falling
    assert 20 <= int((falling & ~flat).sum()) <= 44, "about half the samples are flipped upside down"
    assert 20 <= int((rising & ~flat).sum()) <= 44
    assert torch.all((col_profile.diff(dim=1) >= 0).all(dim=1)), "FL never flips left-right"


def test_wl_flips_and_rotations_reach_every_corner() -> None:
    size = 16
    image = torch.full((3, size, size), 0.2)
    image[:, :3, :10] = 0.9
    batch = standardize(image.expand(64, 3, size, size), "WL")
    out = train_augment("WL", size, padding=0)(batch, torch.Generator().manual_seed(2))
    grey = out.mean(dim=1)
    low, high = grey.amin(dim=(1, 2), keepdim=True), grey.amax(dim=(1, 2), keepdim=True)
    bright = grey > (low + high) / 2
    rows_spanned = bright.any(dim=2).sum(dim=1)
    cols_spanned = bright.any(dim=1).sum(dim=1)
    assert set(zip(rows_spanned.tolist(), cols_spanned.tolist(), strict=True)) == {(3, 10), (10, 3)}, (
        "the bar is only ever flipped or turned by 90 degrees"
    )
    assert 16 <= int((rows_spanned == 10).sum()) <= 48, "about half the samples are rotated by an odd quarter turn"
    corner = bright[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corner.sum(dim=1).eq(1).all()
    assert set(corner.int().argmax(dim=1).tolist()) == {0, 1, 2, 3}
