"""The live replay on a fake clock: frames arrive at the stream's rate, a slow consumer drops the stale ones and a fast
one none, the running decision covers the last half second, the keeps-up rule, and clip errors surface."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.data.clips import ClipError, open_clip
from core.data.io import Image
from core.data.store import png_bytes
from core.data.synth_cle import make_cle_clip, write_clip
from core.live import DEFAULT_FPS, LiveStats, Replay
from core.models import create_model
from core.predict import Predictor

SIZE = 32
N_FRAMES = 24


class FakeClock:
    """Seconds that pass only when something sleeps or a scored frame costs time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class Costly:
    """A predictor whose every call takes ``cost`` seconds of the fake clock (``map_cost`` more with a heatmap)."""

    def __init__(self, predictor: Predictor, clock: FakeClock, cost: float, map_cost: float = 0.0) -> None:
        self.predictor, self.clock, self.cost, self.map_cost = predictor, clock, cost, map_cost
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.predictor, name)

    def diagnose(self, images: list[Image], heatmap: str | None = None, batch_size: int = 16) -> list:
        self.calls += 1
        self.clock.now += self.cost + (self.map_cost if heatmap else 0.0)
        return self.predictor.diagnose(images, heatmap=heatmap, batch_size=batch_size)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", in_chans=1, width=8)
    with torch.no_grad():  # realistic BatchNorm statistics instead of the initial 0/1
        model.train()
        for _ in range(5):
            model(torch.rand(16, 1, SIZE, SIZE))
    return model


def _predictor(model: torch.nn.Module, threshold: float = 0.5) -> Predictor:
    config = {"modality": "CLE", "image_size": SIZE, "architecture": "tiny_cnn"}
    return Predictor(model, config, threshold, device="cpu")


@pytest.fixture(scope="module")
def clip_frames() -> np.ndarray:
    return make_cle_clip(N_FRAMES, SIZE, seed=4, fps=20.0, diagnostic_fraction=0.5).frames


@pytest.fixture(scope="module")
def clip_file(clip_frames: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(clip_frames, tmp_path_factory.mktemp("live") / "site.tif", fps=20.0)


def _single(predictor: Predictor, frames: np.ndarray) -> np.ndarray:
    images = [Image(f, name="f", format="NPY") for f in frames]
    return np.array([r.probability for r in predictor.diagnose(images, heatmap=None, batch_size=1)])


def _replay(predictor: Any, clip_file: Path, clock: FakeClock, **options: Any) -> tuple[list, LiveStats]:
    with open_clip(clip_file) as clip:
        replay = Replay(predictor, clip, clock=clock, sleep=clock.sleep, **options)
        records = list(replay)
        return records, replay.stats()


def test_a_fast_consumer_shows_every_frame_as_it_arrives(model, clip_file, clip_frames) -> None:
    clock = FakeClock()
    predictor = _predictor(model)
    records, stats = _replay(Costly(predictor, clock, cost=0.01), clip_file, clock, heatmap=None)
    assert [r.index for r in records] == list(range(N_FRAMES))
    assert [r.arrival for r in records] == pytest.approx([i / 20.0 for i in range(N_FRAMES)])
    assert [r.latency for r in records] == pytest.approx([0.01] * N_FRAMES)
    assert all(r.dropped == 0 and r.heatmap is None for r in records)
    # it waited for each frame, never ran ahead; the stream's end shows when the next frame would have come
    assert clock.now == pytest.approx(N_FRAMES / 20.0)
    np.testing.assert_allclose([r.probability for r in records], _single(predictor, clip_frames), atol=1e-5)
    np.testing.assert_array_equal(records[5].frame, clip_frames[5])
    assert (stats.arrived, stats.shown, stats.dropped) == (N_FRAMES, N_FRAMES, 0)
    assert stats.achieved_fps == 20.0 and stats.latency_p50 == pytest.approx(0.01) and stats.keeps_up
    assert stats.summary() == "Keeping up: 20.0 of 20 frames/s, latency 10 ms"


def test_a_slow_consumer_drops_stale_frames_and_always_takes_the_newest(model, clip_file, clip_frames) -> None:
    clock = FakeClock()
    predictor = _predictor(model)
    costly = Costly(predictor, clock, cost=0.12)  # 2.4 frame intervals per frame
    records, stats = _replay(costly, clip_file, clock, heatmap=None)
    indices = [r.index for r in records]
    # frame 0 is done at 0.12 s, when frame 2 is the newest; frame 2 at 0.24 s, when frame 4 is; then 7, 9, 12, ...
    assert indices[:6] == [0, 2, 4, 7, 9, 12]
    assert indices[-1] == N_FRAMES - 1  # the last frame is always shown
    assert costly.calls == len(records) == stats.shown
    for shown, record in enumerate(records, start=1):
        assert record.dropped == record.index + 1 - shown  # frames passed over so far
        assert record.latency >= 0.12 - 1e-9
        assert record.probability == pytest.approx(_single(predictor, clip_frames[record.index : record.index + 1])[0])
    assert stats.arrived == N_FRAMES and stats.shown + stats.dropped == N_FRAMES and stats.dropped > N_FRAMES / 3
    assert stats.achieved_fps == pytest.approx(20.0 * stats.shown / N_FRAMES)
    assert stats.latency_p95 > stats.interval and not stats.keeps_up
    assert stats.summary().startswith(f"Falling behind: showing {stats.achieved_fps:.1f} of 20 frames/s; ")
    assert f"{stats.dropped} frames dropped" in stats.summary()


def test_the_heatmap_is_the_models_own_and_can_make_the_machine_fall_behind(model, clip_file, clip_frames) -> None:
    plain_clock, mapped_clock = FakeClock(), FakeClock()
    predictor = _predictor(model)
    _, plain = _replay(Costly(predictor, plain_clock, 0.03, map_cost=0.04), clip_file, plain_clock, heatmap=None)
    records, mapped = _replay(Costly(predictor, mapped_clock, 0.03, map_cost=0.04), clip_file, mapped_clock)
    assert plain.keeps_up and plain.heatmap is None
    assert not mapped.keeps_up and mapped.dropped > 0 and mapped.heatmap == "gradcam"  # tiny_cnn has no own map
    for record in records:
        assert record.heatmap.shape == (SIZE, SIZE) and 0.0 <= record.heatmap.min() <= record.heatmap.max() <= 1.0
    chosen = _replay(Costly(predictor, FakeClock(), 0.0), clip_file, FakeClock(), heatmap="cam")[1]
    assert chosen.heatmap == "cam"
    with open_clip(clip_file) as clip, pytest.raises(ValueError, match="does not apply"):
        Replay(predictor, clip, heatmap="mlcam-lici")


def test_the_running_decision_is_the_mean_over_the_frames_of_the_last_window(model, clip_file, clip_frames) -> None:
    single = _single(_predictor(model), clip_frames)
    # the threshold in the middle of the running means, so that both decisions occur
    means = np.array([single[max(0, i - 9) : i + 1].mean() for i in range(N_FRAMES)])
    threshold = float(np.median(means))
    predictor = _predictor(model, threshold)
    clock = FakeClock()
    records, _ = _replay(Costly(predictor, clock, 0.0), clip_file, clock, heatmap=None)
    np.testing.assert_allclose([r.running_probability for r in records], means, atol=1e-5)
    assert [r.decision for r in records] == [r.running_probability >= threshold for r in records]
    assert {r.decision for r in records} == {True, False}
    # a 0.1 s window at 20 frames/s: this frame and the one before
    clock = FakeClock()
    short, _ = _replay(Costly(predictor, clock, 0.0), clip_file, clock, heatmap=None, window_s=0.1)
    np.testing.assert_allclose(
        [r.running_probability for r in short],
        [single[max(0, i - 1) : i + 1].mean() for i in range(N_FRAMES)],
        atol=1e-5,
    )
    # a slow consumer: the window is by arrival, so it holds fewer shown frames (0.12 s each: 10 frames, 4 shown)
    clock = FakeClock()
    slow, _ = _replay(Costly(predictor, clock, 0.12), clip_file, clock, heatmap=None)
    for record in slow:
        inside = [r.probability for r in slow if record.index - 10 < r.index <= record.index]
        assert record.running_probability == pytest.approx(np.mean(inside))


def test_keeps_up_allows_one_dropped_frame_in_a_hundred_and_needs_p95_latency_within_an_interval() -> None:
    def stats(dropped: int, p95: float, arrived: int = 200, shown: int | None = None) -> LiveStats:
        shown = arrived - dropped if shown is None else shown
        return LiveStats(fps=20.0, arrived=arrived, shown=shown, dropped=dropped, latency_p50=0.03, latency_p95=p95,
                         heatmap=None)  # fmt: skip

    assert stats(0, 0.049).keeps_up and stats(2, 0.05).keeps_up  # 1 % dropped, the result just before the next frame
    assert not stats(3, 0.04).keeps_up  # 1.5 % dropped
    assert not stats(0, 0.051).keeps_up  # 1 in 20 frames late
    assert stats(0, 0.0, arrived=0, shown=0).keeps_up and stats(0, 0.0, arrived=0, shown=0).achieved_fps == 0.0
    falling = stats(90, 0.2)
    assert falling.achieved_fps == 11.0 and falling.dropped_fraction == 0.45
    assert falling.summary() == "Falling behind: showing 11.0 of 20 frames/s; 90 frames dropped, latency 30 ms"
    assert stats(1, 0.2).summary().endswith("; 1 frame dropped, latency 30 ms")
    figures = stats(2, 0.03).as_dict()
    assert figures["keeps_up"] is True and figures["latency_p95_ms"] == pytest.approx(30.0)
    assert figures["achieved_fps"] == pytest.approx(19.8)


def test_the_rate_is_the_clips_else_given_else_twenty_and_bad_settings_refused(model, clip_frames, tmp_path) -> None:
    predictor = _predictor(model)
    frames = write_clip(clip_frames[:6], tmp_path / "frames.zip")  # a zip of frames states no rate
    with open_clip(frames) as clip:
        assert clip.info.fps is None and Replay(predictor, clip).fps == DEFAULT_FPS == 20.0
        assert Replay(predictor, clip, fps=10.0).fps == 10.0
        for bad in ({"fps": 0.0}, {"fps": float("nan")}, {"window_s": 0.0}, {"window_s": -1.0}):
            with pytest.raises(ValueError):
                Replay(predictor, clip, **bad)
    clock = FakeClock()
    records, stats = _replay(Costly(predictor, clock, 0.01), frames, clock, fps=10.0, heatmap=None)
    assert [r.arrival for r in records] == pytest.approx([i / 10.0 for i in range(6)]) and stats.fps == 10.0


def test_a_replay_stopped_early_and_run_again_starts_over(model, clip_file) -> None:
    clock = FakeClock()
    with open_clip(clip_file) as clip:
        replay = Replay(Costly(_predictor(model), clock, 0.01), clip, heatmap=None, clock=clock, sleep=clock.sleep)
        stream = iter(replay)
        assert [next(stream).index for _ in range(3)] == [0, 1, 2]
        stream.close()  # as a page does when a rerun stops its loop
        assert replay.stats().shown == 3 and replay.stats().arrived == 3
        clock.now = 100.0
        assert [r.index for r in replay] == list(range(N_FRAMES))
        assert replay.stats().shown == N_FRAMES


def test_a_clip_that_breaks_off_raises_clip_error_after_the_frames_before(model, clip_frames) -> None:
    good = [png_bytes(frame) for frame in clip_frames[:4]]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, data in enumerate([good[0], good[1], good[2][: len(good[2]) // 2], good[3]], start=1):
            archive.writestr(f"f{i}.png", data)
    clock = FakeClock()
    shown = []
    with open_clip(buffer.getvalue(), "site.zip") as clip, pytest.raises(ClipError) as caught:
        for record in Replay(Costly(_predictor(model), clock, 0.01), clip, clock=clock, sleep=clock.sleep):
            shown.append(record.index)
    assert shown == [0, 1] and "frame 3 (f3.png)" in str(caught.value)
