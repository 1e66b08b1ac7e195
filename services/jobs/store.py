"""Jobs in the study database: creating them, their state changes (each audited), progress, and reading them back.

States: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``; a queued or running job whose work
vanished (the cluster stopped, the app's cluster was restarted) becomes ``interrupted``. The last four are final;
a final job that did not succeed can be retried as a new job (``retry_of``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.audit import log_event
from db.models import Job, User, utcnow
from db.session import reads, writes

__all__ = [
    "ACTIVE",
    "FINAL",
    "JobInfo",
    "active_job_ids",
    "count_jobs",
    "create_job",
    "finish_job",
    "get_job",
    "list_jobs",
    "mark_vanished",
    "request_cancel",
    "start_job",
    "update_progress",
]

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled", "interrupted")
LOG_TAIL_CHARS = 16_000


@dataclass(frozen=True)
class JobInfo:
    """A job as the pages, the CLI and the dashboard show it."""

    id: int
    kind: str
    title: str
    state: str
    progress: float
    message: str
    params: dict[str, Any]
    result: dict[str, Any]
    error: str | None
    log_tail: str
    submitted_by: int | None
    submitted_by_name: str | None
    retry_of: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    device: str | None
    host: str | None

    @property
    def final(self) -> bool:
        return self.state in FINAL

    @property
    def seconds(self) -> float | None:
        """Run time so far (or in all, once final)."""
        if self.started_at is None:
            return None
        end = self.finished_at or utcnow()
        return max(0.0, (end - self.started_at).total_seconds())

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``jobs show --json`` object."""
        return {
            "id": self.id,
            "kind": self.kind,
            "title": self.title,
            "state": self.state,
            "progress": round(self.progress, 4),
            "message": self.message,
            "device": self.device,
            "host": self.host,
            "result": self.result,
            "error": self.error,
            "params": self.params,
            "submitted_by": self.submitted_by_name,
            "retry_of": self.retry_of,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "log_tail": self.log_tail,
        }


def _info(job: Job, username: str | None) -> JobInfo:
    return JobInfo(
        id=job.id,
        kind=job.kind,
        title=job.title,
        state=job.state,
        progress=float(job.progress or 0.0),
        message=job.message or "",
        params=dict(job.params or {}),
        result=dict(job.result or {}),
        error=job.error,
        log_tail=job.log_tail or "",
        submitted_by=job.submitted_by,
        submitted_by_name=username,
        retry_of=job.retry_of,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at,
        device=job.device,
        host=job.host,
    )


@writes
def create_job(
    session: Session, kind: str, title: str, params: dict[str, Any], *, user_id: int | None, retry_of: int | None = None
) -> int:
    """A new queued job (and its ``job_queued`` audit row); its id."""
    job = Job(kind=kind, title=title[:200], params=params, state="queued", submitted_by=user_id, retry_of=retry_of)
    session.add(job)
    session.flush()
    log_event(session, "job_queued", user_id=user_id, job=job.id, kind=kind, title=job.title, retry_of=retry_of)
    return job.id


@reads
def get_job(session: Session, job_id: int) -> JobInfo | None:
    row = session.execute(
        select(Job, User.username).outerjoin(User, User.id == Job.submitted_by).where(Job.id == job_id)
    ).first()
    return None if row is None else _info(*row)


@reads
def list_jobs(
    session: Session,
    *,
    states: tuple[str, ...] | None = None,
    kinds: tuple[str, ...] | None = None,
    user_id: int | None = None,
    limit: int = 200,
) -> list[JobInfo]:
    """Newest first; optionally only some states, kinds or one submitter's."""
    stmt = select(Job, User.username).outerjoin(User, User.id == Job.submitted_by).order_by(Job.id.desc()).limit(limit)
    if states:
        stmt = stmt.where(Job.state.in_(states))
    if kinds:
        stmt = stmt.where(Job.kind.in_(kinds))
    if user_id is not None:
        stmt = stmt.where(Job.submitted_by == user_id)
    return [_info(job, username) for job, username in session.execute(stmt)]


@reads
def active_job_ids(session: Session) -> dict[int, str]:
    """Queued and running jobs: id -> state."""
    return {job_id: state for job_id, state in session.execute(select(Job.id, Job.state).where(Job.state.in_(ACTIVE)))}


@reads
def count_jobs(session: Session, state: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.state == state)) or 0


@writes
def start_job(session: Session, job_id: int, *, device: str, pid: int, node: str | None = None) -> Job | None:
    """Claim a queued job for this worker (``running``); None when it is no longer queued (cancelled meanwhile,
    or already claimed), so a job never runs twice."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None or job.state != "queued":
        return None
    now = utcnow()
    job.state, job.started_at, job.heartbeat_at = "running", now, now
    host = socket.gethostname() + (f" (node {node})" if node else "")
    job.device, job.host, job.worker_pid = device[:80], host[:200], pid
    log_event(session, "job_running", user_id=job.submitted_by, job=job.id, kind=job.kind, device=device)
    session.flush()
    session.expunge(job)
    return job


@writes
def update_progress(
    session: Session, job_id: int, *, progress: float | None, message: str | None, log_tail: str | None
) -> str:
    """Record progress of a running job; returns the job's state (a worker stops when it is no longer running)."""
    job = session.get(Job, job_id)
    if job is None:
        return "gone"
    if job.state == "running":
        if progress is not None:
            job.progress = min(1.0, max(0.0, float(progress)))
        if message is not None:
            job.message = message[:2000]
        if log_tail is not None:
            job.log_tail = log_tail[-LOG_TAIL_CHARS:]
        job.heartbeat_at = utcnow()
    return job.state


@writes
def finish_job(
    session: Session,
    job_id: int,
    state: str,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    log_tail: str | None = None,
    message: str | None = None,
    only_from: tuple[str, ...] = ACTIVE,
) -> bool:
    """Move an active job to a final ``state``; False (nothing written) when it is not in ``only_from``, e.g.
    already cancelled. Audited as ``job_<state>``."""
    if state not in FINAL:
        raise ValueError(f"{state!r} is not a final job state")
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None or job.state not in only_from:
        return False
    job.state, job.finished_at = state, utcnow()
    if state == "succeeded":
        job.progress = 1.0
    if result:
        job.result = {**(job.result or {}), **result}
    if error is not None:
        job.error = error[:4000]
    if log_tail is not None:
        job.log_tail = log_tail[-LOG_TAIL_CHARS:]
    if message is not None:
        job.message = message[:2000]
    log_event(session, f"job_{state}", user_id=job.submitted_by, job=job.id, kind=job.kind, error=job.error)
    return True


@writes
def request_cancel(session: Session, job_id: int, *, user_id: int | None) -> str:
    """Cancel a queued or running job: it becomes ``cancelled`` at once (its worker is stopped next, and its code
    can store nothing more, see ``context.claim``). Returns the job's state after the call."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None:
        raise ValueError(f"no job {job_id}")
    if job.state not in ACTIVE:
        return job.state
    job.state, job.finished_at = "cancelled", utcnow()
    job.message = "cancelled" + (f" ({job.message})" if job.message else "")
    log_event(session, "job_cancelled", user_id=user_id, job=job.id, kind=job.kind, submitted_by=job.submitted_by)
    return job.state


@writes
def mark_vanished(session: Session, job_id: int, reason: str) -> bool:
    """A queued or running job whose work is gone: ``interrupted`` (it can be retried)."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None or job.state not in ACTIVE:
        return False
    job.state, job.finished_at, job.error = "interrupted", utcnow(), reason[:4000]
    log_event(session, "job_interrupted", user_id=job.submitted_by, job=job.id, kind=job.kind, reason=reason)
    return True
