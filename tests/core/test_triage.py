"""Clip triage decoding one batch ahead of the network (core.triage with Clip.batches(ahead=...)): the same
probabilities as one frame at a time, and whatever ends the triage early (a cancel raised by the progress callback, a
clip that breaks off, a frame the model refuses) reaches the caller as before and stops the decoding thread."""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data.clips import ClipError, open_clip
from core.data.io import Image, ImageError
from core.data.store import png_bytes
from core.data.synth_cle import make_cle_clip, write_clip
from core.models import create_model
from core.predict import Predictor
from core.triage import triage_clip

SIZE = 32
N_FRAMES = 30


class Cancelled(Exception):
    """What a job's progress callback raises when the job is cancelled."""


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", in_chans=1, width=8)
    with torch.no_grad():  # batch-norm statistics that are not the initial 0/1
        model.train()
        for _ in range(4):
            model(torch.rand(16, 1, SIZE, SIZE))
    return Predictor(model, {"modality": "CLE", "image_size": SIZE, "architecture": "tiny_cnn"}, 0.5, device="cpu")


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return make_cle_clip(N_FRAMES, SIZE, seed=8, fps=20.0, diagnostic_fraction=0.5).frames


def _zip(frames: np.ndarray, damaged: int | None = None) -> bytes:
    """The frames as a zip of PNGs; frame ``damaged`` (counted from 1) cut in half."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for number, frame in enumerate(frames, start=1):
            data = png_bytes(frame)
            archive.writestr(f"f{number}.png", data[: len(data) // 2] if number == damaged else data)
    return buffer.getvalue()


def _decoding_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("decode ")]


@pytest.mark.parametrize("suffix", ["mp4", "zip", "tif"])
def test_a_triage_decoding_ahead_scores_every_frame_as_one_at_a_time(
    predictor: Predictor, frames: np.ndarray, tmp_path: Path, suffix: str
) -> None:
    path = write_clip(frames, tmp_path / f"site.{suffix}", fps=20.0)
    seen = []
    with open_clip(path) as clip:
        triage = triage_clip(predictor, clip, batch_size=8, top_k=2, heatmap=None, progress=lambda d, _: seen.append(d))
        decoded = list(clip.frames())
        assert not _decoding_threads()
    single = [predictor.diagnose([Image(f, name="f", format="NPY")], heatmap=None)[0].probability for f in decoded]
    np.testing.assert_allclose(triage.probabilities, single, rtol=0, atol=1e-5)
    assert seen == [8, 16, 24, 30] and triage.n_frames == N_FRAMES
    for top in triage.top:
        np.testing.assert_array_equal(top.frame, decoded[top.index])


def test_a_progress_callback_that_raises_cancels_and_stops_the_decoding_thread(
    predictor: Predictor, frames: np.ndarray
) -> None:
    seen = []

    def progress(done: int, total: int | None) -> None:
        seen.append(done)
        if done >= 8:
            raise Cancelled

    with open_clip(_zip(frames), "site") as clip:
        with pytest.raises(Cancelled) as caught:
            triage_clip(predictor, clip, batch_size=4, top_k=1, heatmap=None, progress=progress)
        # stopped by the triage itself, before the clip is closed, while the caller still holds the traceback
        assert not _decoding_threads() and caught.tb is not None
    assert seen == [4, 8]


def test_a_clip_that_breaks_off_raises_its_clip_error_through_the_triage(
    predictor: Predictor, frames: np.ndarray
) -> None:
    data = _zip(frames, damaged=13)
    with open_clip(data, "site") as clip, pytest.raises(ClipError) as sequential:
        list(clip.frames())
    seen = []
    with open_clip(data, "site") as clip:
        with pytest.raises(ClipError) as caught:
            triage_clip(predictor, clip, batch_size=4, top_k=1, heatmap=None, progress=lambda d, _: seen.append(d))
        assert not _decoding_threads()
    assert str(caught.value) == str(sequential.value) and "frame 13 (f13.png)" in caught.value.reason
    assert seen == [4, 8, 12]


def test_a_frame_the_model_refuses_stops_the_decoding_thread(predictor: Predictor) -> None:
    colour = np.zeros((N_FRAMES, SIZE, SIZE, 3), np.uint8)
    colour[..., 0] = 200  # red: a colour photo, which a CLE model refuses
    with open_clip(_zip(colour), "site") as clip:
        with pytest.raises(ImageError, match="site frame 0") as caught:
            triage_clip(predictor, clip, batch_size=4, top_k=1, heatmap=None)
        assert not _decoding_threads() and caught.tb is not None
