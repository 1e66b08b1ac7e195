"""Seed 002's "noise, and blurring" in the training augmentation: off by default (the RCM policy then draws and
returns exactly what it did before them), per-sample strengths, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from core.data.preprocess import _blur, standardize, train_augment


def _rcm_batch(count: int = 8, side: int = 32) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return standardize(torch.from_numpy(rng.random((count, 1, side, side), dtype=np.float32)), "RCM")


def _rcm_before_noise_and_blur(batch: torch.Tensor, generator: torch.Generator, size: int, pad: int) -> torch.Tensor:
    """The RCM policy as it was written before noise and blur, draw for draw: brightness and contrast in
    [0.8, 1.2], horizontal then vertical flip, crop from the zero-padded batch."""
    count = batch.shape[0]
    x = batch.float() * torch.tensor([0.25]).view(-1, 1, 1) + torch.tensor([0.5]).view(-1, 1, 1)
    low, high = max(0.0, 1.0 - 0.2), 1.0 + 0.2

    def draw() -> torch.Tensor:
        return (low + (high - low) * torch.rand(count, generator=generator)).view(count, 1, 1, 1)

    x = (x * draw()).clamp(0.0, 1.0)
    factor = draw()
    x = (factor * x + (1.0 - factor) * x.mean(dim=(-3, -2, -1), keepdim=True)).clamp(0.0, 1.0)
    for dim in (-1, -2):
        x = torch.where((torch.rand(count, generator=generator) < 0.5).view(count, 1, 1, 1), x.flip(dim), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    room = x.shape[-1] + 2 * pad - size + 1
    tops = torch.randint(0, room, (count,), generator=generator)
    lefts = torch.randint(0, room, (count,), generator=generator)
    crops = [padded[i, :, t : t + size, s : s + size] for i, (t, s) in enumerate(zip(tops, lefts, strict=True))]
    return standardize(torch.stack(crops), "RCM")


def test_off_by_default_the_rcm_policy_is_unchanged_draw_for_draw():
    batch = _rcm_batch()
    for options in ({}, {"noise": 0.0, "blur": 0.0}):
        generator, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        out = train_augment("RCM", 32, 16, **options)(batch, generator)
        expected = _rcm_before_noise_and_blur(batch, reference, 32, 16)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        assert torch.equal(generator.get_state(), reference.get_state())  # the same draws, no more


def test_noise_changes_pixels_per_sample_and_is_seed_deterministic():
    flat = standardize(torch.full((32, 1, 24, 24), 0.5), "RCM")  # jitter and flips keep a flat image flat
    clean = train_augment("RCM", 24, 0)(flat, torch.Generator().manual_seed(1))
    augment = train_augment("RCM", 24, 0, noise=0.1)
    noisy = augment(flat, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, augment(flat, torch.Generator().manual_seed(1)))
    assert not torch.equal(noisy, augment(flat, torch.Generator().manual_seed(2)))
    assert clean.flatten(1).std(dim=1).max() < 1e-6
    spread = (noisy * 0.25).flatten(1).std(dim=1)  # per-sample SD in [0, 1] grey levels
    assert spread.max() <= 0.1 * 1.15 and spread.min() < 0.05 < spread.max()  # each draws its own SD up to 0.1
    assert len({round(float(s), 4) for s in spread}) == len(spread)


def test_blur_is_a_per_sample_gaussian_with_edges_replicated():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((3, 1, 20, 20), dtype=np.float32))
    sigmas = torch.tensor([0.0, 0.7, 2.0])
    blurred = _blur(x, sigmas, 2.0)
    assert torch.equal(blurred[0], x[0])  # SD 0 keeps the sample as it is
    for index in (1, 2):
        sample = x[index, 0].double().numpy()
        expected = ndimage.gaussian_filter(sample, float(sigmas[index]), mode="nearest", radius=6)
        np.testing.assert_allclose(blurred[index, 0].numpy(), expected, atol=1e-5)
    dark = torch.zeros(16, 1, 16, 16)
    dark[:, :, 8, 8] = 1.0
    impulse = standardize(dark, "RCM")
    augment = train_augment("RCM", 16, 0, blur=2.0)
    out = augment(impulse, torch.Generator().manual_seed(4))
    assert torch.equal(out, augment(impulse, torch.Generator().manual_seed(4)))
    lit = ((out * 0.25 + 0.5) > 1e-3).flatten(1).sum(dim=1)
    assert (lit > 1).sum() >= 12  # the impulse spreads in (nearly) every sample


def test_strengths_out_of_range_or_on_the_pcam_policy_are_refused():
    for options in ({"noise": -0.1}, {"noise": 1.0}, {"blur": 64.0}, {"blur": True}, {"noise": "0.1"}):
        with pytest.raises(ValueError, match="must be a number"):
            train_augment("RCM", 32, **options)
    with pytest.raises(ValueError, match="pcam"):
        train_augment("CLE", 32, policy="pcam", noise=0.05)
