"""Jobs on a real local Ray cluster: a tiny training job end to end, cancel, a worker killed mid-job, restart
reconciliation, retry, and the CLI contract."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from core.settings import REPO_ROOT
from db import repo
from db.models import AuditEvent, Job
from db.session import read_scope, session_scope
from services.jobs import engine, service, store

TINY = {"architecture": "tiny_cnn", "task": "tumor", "modality": "FL", "image_size": 32, "batch_size": 8}


@pytest.fixture
def jobs(ray_cluster: str, cohort_workspace: Path) -> Iterator[Path]:
    """A workspace with a tiny cohort, attached to the session's cluster; its supervisor is removed after."""
    yield cohort_workspace
    engine.stop_supervisor()


def _until(predicate, timeout: float = 120.0, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out waiting")


def _pid(job_id: int) -> int:
    with read_scope() as session:
        return session.scalar(select(Job.worker_pid).where(Job.id == job_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _actions(job_id: int) -> list[str]:
    with read_scope() as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        return [r.action for r in rows if (r.detail or {}).get("job") == job_id]


def _models() -> list[str]:
    return [m.name for m in repo.list_models()]


def test_a_tiny_training_job_runs_end_to_end(jobs: Path) -> None:
    job_id = service.submit("train", {**TINY, "epochs": 2, "name": "tiny-job"}, user_id=None)
    job = service.wait(job_id, timeout=180)
    assert job.state == "succeeded", (job.error, job.log_tail)
    assert job.result["model"] == "tiny-job" and job.result["models"] == ["tiny-job"]
    assert job.progress == 1.0 and job.device.startswith("cpu") and job.host
    assert "registered tiny-job" in job.log_tail
    assert _models() == ["tiny-job"]
    assert _actions(job_id) == ["job_queued", "job_running", "job_succeeded"]


def test_bad_parameters_never_become_a_job(jobs: Path) -> None:
    for params, message in (
        ({**TINY, "architecture": "nope"}, "unknown architecture"),
        ({**TINY, "epochs": 0}, "epochs must be between"),
        ({**TINY, "name": "../evil"}, "may only contain"),
        ({**TINY, "surprise": 1}, "unknown training parameter"),
    ):
        with pytest.raises(ValueError, match=message):
            service.submit("train", params, user_id=None)
    with pytest.raises(ValueError, match="unknown job kind"):
        service.submit("format-disk", {}, user_id=None)
    assert store.list_jobs() == []


def test_cancel_stops_the_worker_and_registers_nothing(jobs: Path) -> None:
    job_id = service.submit("train", {**TINY, "epochs": 400, "name": "never"}, user_id=None)
    _until(lambda: store.get_job(job_id).state == "running" and store.get_job(job_id).progress > 0)
    pid = _pid(job_id)
    assert service.cancel(job_id, user_id=None) == "cancelled"
    _until(lambda: not _alive(pid), timeout=30)  # the worker process itself was stopped
    time.sleep(1.0)  # the supervisor records the cancelled task; the job must stay cancelled
    job = store.get_job(job_id)
    assert job.state == "cancelled" and job.finished_at is not None
    assert "never" not in _models() and not (jobs / "models" / "never" / "model.safetensors").exists()
    assert _actions(job_id)[-1] == "job_cancelled"
    assert service.cancel(job_id, user_id=None) == "cancelled"  # a second click changes nothing
    assert _actions(job_id).count("job_cancelled") == 1


def test_a_worker_killed_mid_job_fails_the_job_and_registers_nothing(jobs: Path) -> None:
    job_id = service.submit("train", {**TINY, "epochs": 400, "name": "killed"}, user_id=None)
    _until(lambda: store.get_job(job_id).state == "running" and store.get_job(job_id).progress > 0)
    os.kill(_pid(job_id), signal.SIGKILL)
    job = _until(lambda: (j := store.get_job(job_id)).final and j)
    assert job.state in ("failed", "interrupted")
    assert "stopped unexpectedly" in job.error
    assert "killed" not in _models()
    retried = service.retry(job_id, user_id=None)  # same parameters, a new job
    with read_scope() as session:
        assert session.get(Job, retried).retry_of == job_id


def test_a_job_outlives_the_process_that_submitted_it(jobs: Path) -> None:
    """``jobs submit`` exits at once; the job runs on and is followed by the cluster, as after an app restart."""
    command = [sys.executable, "-m", "core", "jobs", "submit", "train", "--task", "tumor", "--modality", "FL"]
    command += ["--epochs", "1", "--image-size", "32", "--name", "from-cli", "--architecture", "tiny_cnn"]
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, env=os.environ)
    assert out.returncode == 0, out.stderr
    job_id = json.loads(out.stdout.strip().splitlines()[-1])["id"]
    waited = subprocess.run(
        [sys.executable, "-m", "core", "jobs", "wait", str(job_id), "--timeout", "180"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=os.environ,
    )
    assert waited.returncode == 0, waited.stdout + waited.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "core", "jobs", "show", str(job_id), "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    body = json.loads(shown.stdout)
    assert {"id", "kind", "state", "progress", "message", "device", "result"} <= set(body)
    assert (body["id"], body["kind"], body["state"]) == (job_id, "train", "succeeded")
    assert body["result"]["model"] == "from-cli"


def test_jobs_whose_work_vanished_are_interrupted_and_queued_ones_launched(jobs: Path) -> None:
    job_id = service.submit("train", {**TINY, "epochs": 400, "name": "vanishes"}, user_id=None)
    _until(lambda: store.get_job(job_id).state == "running")
    engine.stop_supervisor()  # its tasks die with it, as when the cluster restarts under a running job
    with session_scope() as session:  # and a job queued while no supervisor was there
        waiting = Job(kind="train", title="queued meanwhile", params={**TINY, "epochs": 1, "name": "queued-later"})
        session.add(waiting)
        session.flush()
        waiting_id = waiting.id
    report = engine.reconcile()  # a new supervisor reconciles on start
    assert store.get_job(job_id).state == "interrupted"
    assert "interrupted" in _actions(job_id)[-1]
    assert job_id in report["interrupted"] or store.get_job(job_id).state == "interrupted"
    assert service.wait(waiting_id, timeout=180).state == "succeeded"
    assert "vanishes" not in _models() and "queued-later" in _models()


def test_cli_contract_exit_codes(jobs: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "core", "jobs", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=240,
            env=os.environ,
        )

    bad = cli("submit", "train", "--architecture", "nope")
    assert bad.returncode == 2 and "unknown architecture" in bad.stderr and store.list_jobs() == []
    out = cli("submit", "train", "--architecture", "tiny_cnn", "--epochs", "400", "--image-size", "32")
    job_id = json.loads(out.stdout)["id"]
    _until(lambda: store.get_job(job_id).state == "running")
    cancelled = cli("cancel", str(job_id))
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["state"] == "cancelled"
    waited = cli("wait", str(job_id), "--timeout", "30")
    assert waited.returncode != 0 and json.loads(waited.stdout)["state"] == "cancelled"
    listed = json.loads(cli("list", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]
    assert cli("show", "999").returncode == 2


def test_the_app_follows_jobs_again_when_it_starts(jobs: Path) -> None:
    """A job the store says is running but no supervisor holds (its cluster restarted while the app was down) is
    interrupted when the app starts; with no active job the app does not reach the cluster at all."""
    from services.jobs.service import on_app_start

    assert on_app_start(demo=False) == {}
    with session_scope() as session:
        orphan = Job(kind="train", title="orphan", params={}, state="running")
        session.add(orphan)
        session.flush()
        orphan_id = orphan.id
    assert "reconciled" in on_app_start(demo=False)  # (a new supervisor reconciles as it starts)
    job = store.get_job(orphan_id)
    assert job.state == "interrupted" and "retry it" in job.error
