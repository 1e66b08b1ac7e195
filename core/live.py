"""Live view of a CLE clip: replay it as the probe would stream it, and say whether this machine keeps up.

Why (seed 000, Izadyyazdanabadi et al.; issue 15): a confocal laser endomicroscope streams up to 20 frames a second
while the surgeon moves the probe; a decision aid is only of use during surgery if it scores the frames as they come.
:class:`Replay` simulates that stream from a stored clip: frame ``i`` arrives at ``t_i = i / fps`` seconds after the
start (the clip's own rate, or a given one; 20 frames/s for a clip that states none). The consumer, as a real-time
display would, always takes the newest frame that has arrived and drops the stale ones before it, scores it with the
model (:meth:`core.predict.Predictor.diagnose`, with the model's own heatmap for the shown frame when asked:
MLCAM-LICI's final map, CompSegNet's, CELM for a CeLNet, else Grad-CAM; see :func:`core.triage.default_method`), and
keeps a running decision: the mean probability of the shown frames that arrived in the last ``window_s`` seconds
(0.5 s by default, by the stream's clock, so the window covers the same stretch of tissue whether frames were dropped
or not), against the model's operating threshold.

The clip is decoded as a stream (:meth:`core.data.clips.Clip.frames`): only the frame being scored is held, and the
frames skipped over are decoded and let go (a video cannot seek without decoding). Decoding counts in the consumer's
time, as receiving a frame from the probe would. ``clock`` and ``sleep`` are injected, so tests run the replay on a
fake clock, deterministically, and the benchmark (``bench/live.py``) on the real one. What the caller does between
two shown frames (drawing them on a page) also counts, because the stream goes on meanwhile.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from core.data.clips import Clip
from core.data.io import Image, ImageError
from core.predict import Predictor
from core.triage import default_method

__all__ = ["DEFAULT_FPS", "DEFAULT_WINDOW_S", "DROP_TOLERANCE", "LiveFrame", "LiveStats", "Replay"]

DEFAULT_FPS = 20.0  # a CLE probe's rate, for a clip that states none
DEFAULT_WINDOW_S = 0.5  # the running decision's window
DROP_TOLERANCE = 0.01  # at most 1 frame in 100 may be dropped for the machine to keep up
_EPS = 1e-9  # float slack when a time is turned into a frame index


@dataclass(frozen=True)
class LiveFrame:
    """One shown frame: its index in the clip (0-based), when it arrived (seconds from the stream's start), how long
    after arriving its result was ready, its probability, the running probability and decision over the window, its
    heatmap when asked for (the frame's own size, in [0, 1]), and how many frames were dropped up to it."""

    index: int
    arrival: float
    latency: float
    probability: float
    running_probability: float
    decision: bool
    heatmap: np.ndarray | None
    dropped: int
    frame: np.ndarray


@dataclass(frozen=True)
class LiveStats:
    """How a replay went (so far, or in the end).

    ``arrived``: frames of the stream that have arrived; ``shown``: those scored; ``dropped``: the others.
    ``achieved_fps``: shown frames per second of stream, ``fps * shown / arrived``. Latencies: from a frame's arrival
    to its result (probability, and heatmap when asked), median and 95th percentile over the shown frames.

    The machine **keeps up** when it drops at most :data:`DROP_TOLERANCE` of the frames (1 in 100: an odd hiccup of
    the operating system is no verdict) and 95 % of the shown frames have their result within one frame interval
    (``1 / fps``) of arriving, i.e. before the next frame arrives.
    """

    fps: float
    arrived: int
    shown: int
    dropped: int
    latency_p50: float
    latency_p95: float
    heatmap: str | None

    @property
    def interval(self) -> float:
        """Seconds between two frames of the stream."""
        return 1.0 / self.fps

    @property
    def achieved_fps(self) -> float:
        return self.fps * self.shown / self.arrived if self.arrived else 0.0

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / self.arrived if self.arrived else 0.0

    @property
    def keeps_up(self) -> bool:
        """The rule in the class docstring; no frame shown yet keeps up trivially."""
        if not self.shown:
            return True
        return self.dropped <= DROP_TOLERANCE * self.arrived and self.latency_p95 <= self.interval + _EPS

    def summary(self) -> str:
        """One line for people: ``Keeping up: 20.0 of 20 frames/s, latency 31 ms`` or ``Falling behind: showing
        11.0 of 20 frames/s; 45 frames dropped, latency 240 ms`` (latency: the median)."""
        rate = f"{self.achieved_fps:.1f} of {self.fps:g} frames/s"
        latency = f"latency {self.latency_p50 * 1000:.0f} ms"
        if self.keeps_up:
            return f"Keeping up: {rate}, {latency}"
        frames = "frame" if self.dropped == 1 else "frames"
        return f"Falling behind: showing {rate}; {self.dropped:,} {frames} dropped, {latency}"

    def as_dict(self) -> dict[str, float | int | bool | str | None]:
        """The figures, derived ones included, for JSON."""
        return {
            "fps": self.fps,
            "arrived": self.arrived,
            "shown": self.shown,
            "dropped": self.dropped,
            "dropped_fraction": self.dropped_fraction,
            "achieved_fps": self.achieved_fps,
            "latency_p50_ms": self.latency_p50 * 1000.0,
            "latency_p95_ms": self.latency_p95 * 1000.0,
            "keeps_up": self.keeps_up,
            "heatmap": self.heatmap,
        }


class Replay:
    """A clip replayed as a live stream through ``predictor``; iterate it for one :class:`LiveFrame` per shown frame,
    read :meth:`stats` at any time (the final figures once the iteration ends).

    ``fps``: the stream's rate (default: the clip's, else :data:`DEFAULT_FPS`). ``heatmap``: a method name,
    ``"default"`` (the model's own map, :func:`core.triage.default_method`) or None (no maps: faster).
    ``window_s``: the running decision's window in seconds. ``clock()`` returns seconds (monotonic) and ``sleep(s)``
    waits; both are the real ones unless given. Iterating again replays the clip again from its first frame. A clip
    that breaks off raises :class:`core.data.clips.ClipError`, a frame the model cannot take
    :class:`core.data.io.ImageError`, each from the iteration.
    """

    def __init__(
        self,
        predictor: Predictor,
        clip: Clip,
        *,
        fps: float | None = None,
        heatmap: str | None = "default",
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        rate = float(fps if fps is not None else clip.info.fps or DEFAULT_FPS)
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"fps must be a positive number, not {rate}")
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a positive number of seconds, not {window_s}")
        method = (
            default_method(predictor.methods, predictor.config.get("architecture")) if heatmap == "default" else heatmap
        )
        if method is not None and method not in predictor.methods:
            raise ValueError(
                f"heatmap {method!r} does not apply to this model; use one of: {', '.join(predictor.methods)}"
            )
        self.predictor = predictor
        self.clip = clip
        self.fps = rate
        self.method = method
        self.window_s = float(window_s)
        self._clock = clock
        self._sleep = sleep
        self._latencies: list[float] = []
        self._arrived = 0
        self._dropped = 0

    def __iter__(self) -> Iterator[LiveFrame]:
        return self._run()

    def stats(self) -> LiveStats:
        """The figures of the frames so far."""
        latencies = np.asarray(self._latencies, dtype=np.float64)
        p50, p95 = np.percentile(latencies, [50, 95]).tolist() if latencies.size else (0.0, 0.0)
        return LiveStats(
            fps=self.fps,
            arrived=self._arrived,
            shown=int(latencies.size),
            dropped=self._dropped,
            latency_p50=float(p50),
            latency_p95=float(p95),
            heatmap=self.method,
        )

    def _run(self) -> Iterator[LiveFrame]:
        self._latencies, self._arrived, self._dropped = [], 0, 0
        name = self.clip.info.name
        frames = self.clip.frames()
        # the shown frames inside the running window: (index, probability); a frame is in while it arrived less than
        # window_s before the newest shown one, i.e. less than ``span`` frames before it
        span = self.window_s * self.fps
        window: deque[tuple[int, float]] = deque()
        shown_last = -1
        ended = False
        try:
            start = self._clock()
            while not ended:
                elapsed = self._clock() - start
                newest = math.floor(elapsed * self.fps + _EPS)  # the newest frame that has arrived by now
                if newest < self._arrived:  # ahead of the stream: wait for the next frame
                    self._sleep(max(0.0, self._arrived / self.fps - elapsed))
                    continue
                latest = None
                while self._arrived <= newest:  # take what has arrived; only the newest frame is kept
                    frame = next(frames, None)
                    if frame is None:
                        ended = True
                        break
                    latest = frame
                    self._arrived += 1
                if latest is None:
                    break
                index = self._arrived - 1
                self._dropped += index - shown_last - 1
                shown_last = index
                image = Image(np.asarray(latest), name=f"{name} frame {index}", format="NPY")
                (result,) = self.predictor.diagnose([image], heatmap=self.method, batch_size=1)
                if isinstance(result, ImageError):
                    raise result
                arrival = index / self.fps
                latency = self._clock() - start - arrival
                self._latencies.append(latency)
                window.append((index, result.probability))
                while len(window) > 1 and index - window[0][0] >= span - _EPS:
                    window.popleft()
                running = float(np.mean([p for _, p in window]))
                yield LiveFrame(
                    index=index,
                    arrival=arrival,
                    latency=latency,
                    probability=result.probability,
                    running_probability=running,
                    decision=running >= self.predictor.threshold,
                    heatmap=result.heatmap,
                    dropped=self._dropped,
                    frame=latest,
                )
        finally:
            frames.close()
