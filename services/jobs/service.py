"""Jobs as use cases: submit, cancel, retry, wait. Pages and the CLI call these; they import Ray only when they
reach the cluster."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from services.jobs import store
from services.jobs.kinds import KINDS, check_params
from services.jobs.store import FINAL, JobInfo

__all__ = ["JobNotLaunched", "cancel", "retry", "submit", "wait"]


class JobNotLaunched(RuntimeError):
    """The job was queued but the cluster could not be reached; it starts when the cluster is back."""

    def __init__(self, job_id: int, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


def _launch(job_id: int) -> None:
    from services.jobs import engine

    try:
        engine.launch(job_id)
    except Exception as error:  # noqa: BLE001 - the row stays queued; the next supervisor launches it
        raise JobNotLaunched(
            job_id,
            f"job {job_id} is queued, but the cluster could not be reached ({type(error).__name__}: {error}); it "
            "starts when the cluster is back",
        ) from error


def submit(kind: str, params: dict[str, Any], *, user_id: int | None) -> int:
    """Check the parameters (``ValueError`` says what to change), queue the job and launch it; its id."""
    title, complete = check_params(kind, params)
    job_id = store.create_job(kind, title, complete, user_id=user_id)
    _launch(job_id)
    return job_id


def cancel(job_id: int, *, user_id: int | None) -> str:
    """Cancel a queued or running job and stop its worker; the job's state after the call."""
    state = store.request_cancel(job_id, user_id=user_id)
    if state == "cancelled":
        from services.jobs import engine

        with contextlib.suppress(Exception):  # the job is cancelled in the store; its code stores nothing more
            engine.cancel(job_id)
    return state


def retry(job_id: int, *, user_id: int | None) -> int:
    """A new job with the same kind and parameters as a failed, cancelled or interrupted one; its id."""
    job = store.get_job(job_id)
    if job is None:
        raise ValueError(f"no job {job_id}")
    if job.state not in ("failed", "cancelled", "interrupted"):
        raise ValueError(f"job {job_id} is {job.state}; only failed, cancelled or interrupted jobs are retried")
    if job.kind not in KINDS:
        raise ValueError(f"job {job_id} is of an unknown kind {job.kind!r}")
    again = [j.id for j in store.list_jobs(states=store.ACTIVE, kinds=(job.kind,)) if j.retry_of == job_id]
    if again:  # a double click, or two people at once: one retry at a time
        raise ValueError(f"job {job_id} is already being retried as job {again[0]}")
    title, complete = check_params(job.kind, dict(job.params))
    new_id = store.create_job(job.kind, title, complete, user_id=user_id, retry_of=job_id)
    _launch(new_id)
    return new_id


def wait(job_id: int, timeout: float | None = None, poll: float = 0.5) -> JobInfo:
    """Block until the job is final (or ``timeout`` seconds passed); the job as last seen."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = store.get_job(job_id)
        if job is None:
            raise ValueError(f"no job {job_id}")
        if job.state in FINAL or (deadline is not None and time.monotonic() >= deadline):
            return job
        time.sleep(poll)


def on_app_start(*, demo: bool) -> dict[str, Any]:
    """What the app does once per server process, in the background: on a first start with ``demo``, build the
    demo workspace as a job (accounts at once); and when jobs are queued or running in the store, follow them
    again on the cluster (vanished ones become ``interrupted``). Only reaches the cluster when there is work."""
    import os

    from core.settings import workspace_dir

    done: dict[str, Any] = {}
    if demo:
        from services.demo import start_first_run

        done["demo_job"] = start_first_run()
    has_cluster = os.environ.get("IOAI_RAY_ADDRESS") or (workspace_dir() / "ray" / "cluster.json").exists()
    if store.active_job_ids() and has_cluster:
        from services.jobs import engine

        done["reconciled"] = engine.reconcile()
    return done
