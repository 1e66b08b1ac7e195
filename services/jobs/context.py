"""What a running job's code sees: progress and log reporting, and the guard that keeps a cancelled job from storing.

Library and service code stays job-agnostic: it takes ``log`` and ``progress`` callbacks as before. The one hook is
:func:`claim`, which every transaction that stores a product (a registered model, a prediction, an evaluation, an
imported cohort) calls inside itself. Outside a job it does nothing. Inside one, it reads the job's row in the same
write transaction and refuses (:class:`JobStopped`, rolling the product back) once the job was cancelled, and
otherwise records the product in the job's ``result``, so a product and its job's record of it land together.
On SQLite the write transaction already holds the database's write lock; on PostgreSQL the row is locked
(``FOR UPDATE``), so a cancel either lands before the product (nothing stored) or after it (the job lists it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job

__all__ = ["JobStopped", "RunningJob", "claim", "current_job", "running_job"]


class JobStopped(Exception):
    """The job was cancelled (or otherwise ended) while its code still ran: stop, store nothing more."""


@dataclass(frozen=True)
class RunningJob:
    """The job the current code runs for."""

    id: int
    kind: str
    submitted_by: int | None


_current: ContextVar[RunningJob | None] = ContextVar("ioai_job", default=None)


def current_job() -> RunningJob | None:
    """The job this code runs inside, if any."""
    return _current.get()


@contextmanager
def running_job(job: RunningJob) -> Iterator[None]:
    """Run the block as ``job`` (``claim`` checks and records against it)."""
    token = _current.set(job)
    try:
        yield
    finally:
        _current.reset(token)


def claim(session: Session, **products: Any) -> None:
    """Inside a job: refuse with :class:`JobStopped` unless the job is still running, else add ``products``
    (JSON-able, e.g. ``model="fl-1"``, ``model_id=3``) to its result. A list value is appended to. Outside a job:
    nothing."""
    job = _current.get()
    if job is None:
        return
    row = session.scalar(select(Job).where(Job.id == job.id).with_for_update())
    if row is None or row.state != "running":
        raise JobStopped(f"job {job.id} is {row.state if row else 'gone'}; nothing more is stored")
    if products:
        result: dict[str, Any] = dict(row.result or {})
        for key, value in products.items():
            if isinstance(value, list):
                result[key] = [*result.get(key, []), *value]
            else:
                result[key] = value
        row.result = result
