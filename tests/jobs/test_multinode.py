"""More than one machine: a ``ray start --head`` node that runs no work, a second node joined to it, the app
attached by address, the study database on PostgreSQL and the workspace on a shared path. A training job submitted
from here runs on the second node and lands in the shared database and workspace."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import REPO_ROOT
from db import repo
from services.jobs import engine, service
from tests.postgres import reset_database


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen(  # noqa: S603 - our own interpreter's ray CLI
            [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[str]:
    """A head node with no CPUs for work (as on a dedicated head) and a worker node with 2 CPUs, on this machine."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = _ray(
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=0",
        "--include-dashboard=false",
        log=tmp_path / "head.log",
    )
    worker = None
    try:
        deadline = time.monotonic() + 120
        while not engine._port_open(address):
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.2)
        worker = _ray(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=2", log=tmp_path / "w.log")
        yield address
    finally:
        engine.disconnect()
        if worker is not None:
            _stop(worker)
        _stop(head)


def test_a_job_runs_on_the_second_node_against_postgres(
    two_nodes: str, postgres_url: str, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from core.data.synth import CohortConfig, write_cohort
    from services.importer import import_manifest

    reset_database(postgres_url)
    monkeypatch.setenv("IOAI_DATABASE_URL", postgres_url)
    monkeypatch.setenv(engine.ADDRESS_ENV, two_nodes)
    manifest = write_cohort(
        CohortConfig(n_patients=4, specimens_per_patient=(10, 14), height=64, width=80, seed=2),
        workspace / "cohort",
    )
    assert not import_manifest(manifest, fractions=(0.5, 0.25, 0.25), seed=0).errors
    engine.disconnect()  # attach to the two-node cluster, not the session's
    engine.connect()
    deadline = time.monotonic() + 120
    while len([n for n in ray.nodes() if n["Alive"]]) < 2:
        assert time.monotonic() < deadline, "the second node did not join"
        time.sleep(0.5)
    worker_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
    params = {"architecture": "tiny_cnn", "image_size": 32, "epochs": 1, "batch_size": 8, "name": "on-node-2"}
    try:
        job = service.wait(service.submit("train", params, user_id=None), timeout=240)
        assert job.state == "succeeded", (job.error, job.log_tail)
        assert job.host.endswith(f"(node {worker_node})")  # ran on the second node, not the head
        assert [m.name for m in repo.list_models()] == ["on-node-2"]  # registered in PostgreSQL
        assert (workspace / "models" / "on-node-2").is_dir()  # its checkpoint in the shared workspace
    finally:
        engine.stop_supervisor()
        engine.disconnect()
