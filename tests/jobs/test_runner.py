"""A job's run in one process (no cluster): claiming, failure, the cancel guard on stored products, progress."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from db import repo
from db.models import AuditEvent, Job
from db.session import init_db, read_scope, session_scope
from services.jobs import store
from services.jobs.context import JobStopped, RunningJob, claim, running_job
from services.jobs.runner import execute

TINY = {"architecture": "tiny_cnn", "task": "tumor", "modality": "FL", "image_size": 32, "batch_size": 8}


def _job(state: str = "queued", kind: str = "train", params: dict | None = None) -> int:
    init_db()
    with session_scope() as session:
        job = Job(kind=kind, title=f"a {kind} job", params=params or {}, state=state)
        session.add(job)
        session.flush()
        return job.id


def test_a_job_runs_once_and_records_its_product(cohort_workspace: Path) -> None:
    job_id = _job(params={**TINY, "epochs": 1, "name": "in-process"})
    assert execute(job_id) == "succeeded"
    assert execute(job_id) == "succeeded"  # claimed once: a second start does nothing
    job = store.get_job(job_id)
    assert job.result["model"] == "in-process" and job.progress == 1.0
    assert [m.name for m in repo.list_models()] == ["in-process"]


def test_a_failing_job_says_why(cohort_workspace: Path) -> None:
    job_id = _job(params={**TINY, "modality": "CLE", "epochs": 1, "name": "no-cle-data"})
    assert execute(job_id) == "failed"
    job = store.get_job(job_id)
    assert "no CLE images" in job.error and "Traceback" in job.log_tail
    assert repo.list_models() == []


def test_a_job_cancelled_before_it_starts_never_runs(cohort_workspace: Path) -> None:
    job_id = _job(params={**TINY, "epochs": 1, "name": "never-ran"})
    assert store.request_cancel(job_id, user_id=None) == "cancelled"
    assert execute(job_id) == "cancelled"
    assert store.get_job(job_id).started_at is None and repo.list_models() == []


@pytest.mark.parametrize("state", ["running", "cancelled"])
def test_the_guard_refuses_products_of_a_job_that_is_not_running(workspace: Path, state: str) -> None:
    job_id = _job(state=state)
    with running_job(RunningJob(job_id, "train", None)), session_scope() as session:
        if state == "running":
            claim(session, models=["a"], model="a")
            claim(session, models=["b"])
        else:
            with pytest.raises(JobStopped):
                claim(session, models=["a"])
    result = store.get_job(job_id).result
    assert result == ({"models": ["a", "b"], "model": "a"} if state == "running" else {})


def test_state_changes_are_audited_and_final_states_stay(workspace: Path) -> None:
    job_id = _job(state="running")
    assert store.finish_job(job_id, "failed", error="boom")
    assert not store.finish_job(job_id, "succeeded")  # a final state is never overwritten
    assert store.request_cancel(job_id, user_id=None) == "failed"
    assert not store.mark_vanished(job_id, "gone")
    with read_scope() as session:
        actions = [e.action for e in session.scalars(select(AuditEvent)) if (e.detail or {}).get("job") == job_id]
    assert actions == ["job_failed"]
    with pytest.raises(ValueError, match="not a final job state"):
        store.finish_job(job_id, "running")
