"""Running one job in a worker process: claim it, run its kind with progress and log reporting, record how it ended.

:func:`execute` is what the cluster's task calls; it needs no Ray, so a job can also run in-process (the tests of
each kind's work do). A job is claimed ``queued`` -> ``running`` in one write transaction, so it never runs twice.
Its output (``print`` and the kinds' ``log`` lines) goes to the job's log tail; progress and log are written at
most every :data:`FLUSH_SECONDS`, and each write returns the job's state, so a cancelled job stops at its next
report even before its worker is stopped.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from services.jobs import store
from services.jobs.context import JobStopped, RunningJob, running_job

__all__ = ["FLUSH_SECONDS", "JobContext", "execute"]

FLUSH_SECONDS = 0.5
_LOG_LINES = 400


@dataclass
class JobContext:
    """What a kind's code gets: the job, the device it may use, and progress and log reporting."""

    id: int
    kind: str
    params: dict[str, Any]
    device: str  # "cuda" or "cpu": what the cluster gave this job
    submitted_by: int | None = None
    _lines: deque[str] = field(default_factory=lambda: deque(maxlen=_LOG_LINES))
    _fraction: float = 0.0
    _message: str = ""
    _last_flush: float = 0.0
    _dirty: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def log(self, line: str) -> None:
        """A line of the job's log (the kinds' ``log`` callbacks); it is also the job's message."""
        text = str(line).rstrip()
        if not text:
            return
        with self._lock:
            self._lines.extend(text.splitlines())
            self._message = text.splitlines()[-1]
            self._dirty = True
        self.flush()

    def progress(self, fraction: float, message: str | None = None) -> None:
        """How far the job is, in [0, 1], with an optional one-line message."""
        with self._lock:
            self._fraction = fraction
            if message is not None:
                self._message = message
            self._dirty = True
        self.flush()

    def span(self, start: float, end: float) -> Any:
        """A ``progress(done, total)`` callback mapped onto [start, end] of this job's bar."""

        def report(done: int, total: int, message: str | None = None) -> None:
            self.progress(start + (end - start) * (done / max(total, 1)), message)

        return report

    def training(self, start: float = 0.0, end: float = 1.0, label: str = "") -> Any:
        """A ``core.train`` progress callback mapped onto [start, end] of this job's bar."""

        def report(p: Any) -> None:
            within = ((p.epoch - 1) + p.step / max(p.steps, 1)) / max(p.epochs, 1)
            auc = "" if p.val_auc is None else f", val AUC {p.val_auc:.3f}"
            self.progress(start + (end - start) * within, f"{label}epoch {p.epoch}/{p.epochs}, loss {p.loss:.3f}{auc}")

        return report

    @property
    def log_tail(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def flush(self, force: bool = False) -> None:
        """Write progress and log to the job row (throttled); raise :class:`JobStopped` once it is not running."""
        now = time.monotonic()
        if not force and (not self._dirty or now - self._last_flush < FLUSH_SECONDS):
            return
        with self._lock:
            fraction, message, tail = self._fraction, self._message, "\n".join(self._lines)
            self._dirty, self._last_flush = False, now
        state = store.update_progress(self.id, progress=fraction, message=message, log_tail=tail)
        if state != "running":
            raise JobStopped(f"job {self.id} is {state}")


class _Tee(io.TextIOBase):
    """A stream that sends whole lines to the job's log (and the original stream)."""

    def __init__(self, context: JobContext, original: Any) -> None:
        self._context, self._original, self._buffer = context, original, ""

    def write(self, text: str) -> int:
        with contextlib.suppress(Exception):
            self._original.write(text)
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            with contextlib.suppress(JobStopped):  # a print must not raise; the next report does
                self._context.log(line)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self._original.flush()


@contextlib.contextmanager
def _captured(context: JobContext) -> Iterator[None]:
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(context, out), _Tee(context, err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


def _device_name() -> str:
    """``cuda`` when this process was given a GPU, else ``cpu``."""
    try:
        import torch

        if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1"):
            return "cuda"
    except Exception:  # noqa: BLE001 - no torch/CUDA: the CPU
        pass
    return "cpu"


def _device_label(device: str) -> str:
    if device == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def execute(job_id: int, *, threads: int | None = None, node: str | None = None) -> str:
    """Run job ``job_id`` here, if it is still queued; returns the state it ended in. ``node`` (the cluster's id
    of this machine) is recorded with the host name."""
    from services.jobs.kinds import KINDS

    device = _device_name()
    job = store.start_job(job_id, device=_device_label(device), pid=os.getpid(), node=node)
    if job is None:
        info = store.get_job(job_id)
        return info.state if info else "gone"
    if threads:
        import torch

        torch.set_num_threads(max(1, threads))
    context = JobContext(id=job.id, kind=job.kind, params=dict(job.params or {}), device=device)
    context.submitted_by = job.submitted_by
    kind = KINDS.get(job.kind)
    try:
        if kind is None:
            raise ValueError(f"unknown job kind {job.kind!r}")
        with running_job(RunningJob(job.id, job.kind, job.submitted_by)), _captured(context):
            result = kind.run(context, context.params) or {}
        store.finish_job(job.id, "succeeded", result=result, log_tail=context.log_tail, message="done")
    except JobStopped:
        pass  # cancelled: the row already says so; nothing more is stored
    except Exception as error:  # noqa: BLE001 - any failure of the work is the job's failure, recorded
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        with contextlib.suppress(JobStopped):
            context.log(traceback.format_exc())
        store.finish_job(job.id, "failed", error=detail, log_tail=context.log_tail, message=detail.splitlines()[-1])
    final = store.get_job(job.id)
    return final.state if final else "gone"
