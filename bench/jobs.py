"""The job engine's figures, side by side in one run: ``python -m bench.jobs``.

Long work runs as jobs: a row in the study database and a Ray task (:mod:`services.jobs`). This benchmark measures
what that costs and what it buys, each part in a fresh temporary workspace (``IOAI_WORKSPACE`` and
``IOAI_DATABASE_URL`` point into it, never at the repository's ``var/``) with its own embedded cluster
(:func:`services.jobs.engine.start_embedded` with ``--cpus``, the machine's CPUs by default), attached through
``IOAI_RAY_ADDRESS`` as a deployment attaches, and stopped at the end:

- ``latency``: ``--jobs`` (6) tiny ``train`` jobs (tiny_cnn, 32 px, one epoch on a 4-patient synthetic cohort),
  submitted one after the other, each once the one before has finished, so that nothing queues behind another job.
  Per job: the ``submit()`` call (parameter check, the queued row, the launch on the supervisor), queued to running
  (``created_at`` -> ``started_at`` in the job's row: Ray schedules the task, a worker process is started or
  reused, imports, claims the job) and running to finished (``started_at`` -> ``finished_at``). The first job is
  reported apart (cold: a fresh worker process and its imports); the others are warm (a reused worker). Connecting
  to the cluster and starting the database's supervisor actor are timed apart, before the first job.
- ``mosaics``: ``--mosaics`` (4) copies of one synthetic RCM mosaic (``--size``, 1024 px) diagnosed with a tiny
  patch classifier (tiny_cnn, ``--window`` 64 px, trained for a few seconds on four 256 px mosaics, as the tests'
  ``rcm_workspace`` fixture), ``--mode`` exact at ``--step`` 16 (so that the work, not the bookkeeping, dominates):
  (a) in this process, the N ``diagnose_mosaic`` calls one after the other with one loaded predictor (torch on every
  usable core; loaded and warmed up on a small crop beforehand, untimed); (b) N ``mosaic`` jobs submitted at once
  (each asks for one CPU and runs torch on one thread), wall time from the first ``submit()`` until every job is
  final. In rotation, so that a change in the machine's load hits both alike: (a), (b) with cold workers, then
  ``--rounds`` (3) times (b) with the workers warm (their models stay loaded by ``cached_predictor``) and (a).
  Ratios of medians: (b) over (a), cold and warm, and warm (b) over cold (b). Also: the most jobs seen running at
  once, the worker processes used, and the largest difference between a job's mosaic probability and the
  in-process one.
  On a 2-core machine the jobs can be at most 2 x faster than one process that already uses both cores for each
  mosaic; they win what one process leaves idle (reading, storing, single-threaded steps) and lose the per-job
  bookkeeping.
- ``first_start`` (``--first-start``, minutes): ``python -m streamlit run app/main.py`` with ``IOAI_DEMO=1`` in an
  empty workspace, without ``IOAI_RAY_ADDRESS`` (the app starts the workspace's own cluster, as ``make run`` does).
  From the launch: the health endpoint answers ``ok``, ``/`` answers 200, and the sign-in page is rendered (a
  websocket session asks for a script run as a browser does; that first run also starts the demo build in the
  background); then, read-only from the workspace's SQLite file, the demo accounts exist, the cluster is up, the demo
  job runs, and the FL-CNN (``FL-CNN-tumor``) is registered; with ``--full`` also until the demo job is final. Then
  the app is stopped and started again on the same workspace (the cluster and the demo job keep running): seconds
  until it serves the sign-in page again. Goals: serve within 60 s of a fresh install's first start, within 20 s
  on later starts, FL model within 10 minutes on 2 cores. When no demo job is queued within two minutes of the
  sign-in page, the build did not start: that is recorded and the wait skipped.

Every process the benchmark starts is stopped at the end (the app's process group, each cluster's processes).
Timings on a shared machine are noisy: read the ratios, measured side by side in one run. The tables are printed
and written to ``bench/results/jobs.json`` (``jobs-quick.json`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench.diagnosis import machine, usable_cores
from core.settings import environment, pointing_at

__all__ = [
    "DEMO_MODEL",
    "Settings",
    "first_start",
    "latency",
    "main",
    "mosaic_jobs",
    "own_cluster",
    "parse_args",
    "report_tables",
]

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = "FL-CNN-tumor"
GOALS_S = {"first_serve": 60.0, "later_serve": 20.0, "fl_model": 600.0}
_TINY_TRAIN = {"architecture": "tiny_cnn", "task": "tumor", "modality": "FL", "image_size": 32, "batch_size": 8}
_JOB_TIMEOUT_S = 900.0
_DEMO_GRACE_S = 120.0  # the first start's demo job is queued within seconds of the first page, or not at all
_POLL_S = 0.05


@dataclass(frozen=True)
class Settings:
    """What one run measures (``--quick`` shrinks every size)."""

    jobs: int
    mosaics: int
    size: int
    window: int
    step: int
    mode: str
    rounds: int
    cpus: int
    first_start: bool
    full: bool
    timeout: float
    out: Path
    quick: bool


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`."""
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6, help="tiny training jobs, one after the other (6)")
    parser.add_argument("--mosaics", type=int, default=4, help="mosaic jobs submitted at once (4)")
    parser.add_argument("--size", type=int, default=1024, help="mosaic side in px (1024)")
    parser.add_argument("--window", type=int, default=64, help="the patch classifier's window in px (64)")
    parser.add_argument("--step", type=int, default=16, help="window step in px (16)")
    parser.add_argument("--mode", choices=["fast", "exact", "loop"], default="exact", help="stitching mode (exact)")
    parser.add_argument("--rounds", type=int, default=3, help="warm (b) and (a) runs, in rotation (3)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of each embedded cluster")
    parser.add_argument("--first-start", action="store_true", help="also the app's first start (minutes)")
    parser.add_argument("--full", action="store_true", help="with --first-start: wait until the demo job is final")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the demo's steps (1800)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (bench/results)")
    parser.add_argument("--quick", action="store_true", help="3 jobs, 2 mosaics of 256 px, 32 px windows")
    args = parser.parse_args(argv)
    if args.full and not args.first_start:
        parser.error("--full needs --first-start")
    if min(args.jobs, args.mosaics, args.size, args.window, args.step, args.rounds, args.cpus) < 1 or args.timeout <= 0:
        parser.error("counts, sizes, step, CPUs and timeout must be positive")
    if args.jobs < 2:
        parser.error("--jobs must be at least 2: the first job is cold, the others warm")
    if args.quick:
        args.jobs, args.mosaics, args.size, args.window, args.rounds = 3, 2, 256, 32, 1
    if args.window > args.size:
        parser.error("the window must fit in the mosaic")
    return Settings(
        jobs=args.jobs, mosaics=args.mosaics, size=args.size, window=args.window, step=args.step, mode=args.mode,
        rounds=args.rounds, cpus=args.cpus, first_start=args.first_start, full=args.full,
        timeout=args.timeout, out=args.out, quick=args.quick,
    )  # fmt: skip


# --- processes and clusters --------------------------------------------------------------------------------------


def _session_members(sid: int) -> list[int]:
    """The live processes of session ``sid`` (Linux /proc; empty elsewhere). A zombie that is this process's own
    child (the embedded cluster's head, once stopped) is reaped instead."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:
                continue
            pid = int(stat.parent.name)
            if fields[0] != "Z":
                members.append(pid)
            elif int(fields[1]) == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
    return members


def _end_session(sid: int, grace: float = 10.0) -> list[int]:
    """Stop what is left of session ``sid`` (a process this benchmark started with a session of its own, and
    its descendants that stayed in it): SIGTERM, then SIGKILL after ``grace`` seconds. The ids it had to stop."""
    left = [pid for pid in _session_members(sid) if pid != os.getpid()]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _session_members(sid):
        time.sleep(0.2)
    for pid in _session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def _stop_cluster(root: Path) -> list[int]:
    """Stop the embedded cluster of the workspace ``root`` and whatever of it is left; the ids stopped last."""
    from services.jobs import engine

    recorded = root / "ray" / "cluster.json"
    head = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        head = int(json.loads(recorded.read_text())["pid"])
    engine.stop_embedded(root)
    left = _end_session(head) if head else []
    if left:
        print(f"  stopped {len(left)} leftover process(es) of the cluster: {left}", flush=True)
    return left


@contextlib.contextmanager
def own_cluster(cpus: int, label: str) -> Iterator[Path]:
    """A fresh temporary workspace with its own embedded cluster of ``cpus`` CPUs, attached through
    ``IOAI_RAY_ADDRESS``; the cluster is stopped and the workspace removed after the block."""
    from db.session import init_db
    from services.jobs import engine

    root = Path(tempfile.mkdtemp(prefix=f"ioai-bench-jobs-{label}-"))
    try:
        with pointing_at(root):
            began = time.perf_counter()
            address = engine.start_embedded(root, cpus=cpus)
            print(f"  cluster at {address} ({cpus} CPUs) started in {time.perf_counter() - began:.1f} s", flush=True)
            with environment(**{engine.ADDRESS_ENV: address}):
                init_db()
                try:
                    yield root
                finally:
                    with contextlib.suppress(Exception):
                        engine.stop_supervisor()
                    engine.disconnect()
    finally:
        _stop_cluster(root)
        shutil.rmtree(root, ignore_errors=True)


# --- part 1: submit-to-running latency ---------------------------------------------------------------------------


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median and max of the values that exist."""
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "max": None}
    return {"median": statistics.median(present), "max": max(present)}


def _load() -> float | None:
    """The 1-minute load average: above the cores, other processes were competing for them."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    began = time.perf_counter()
    value = call()
    return value, time.perf_counter() - began


def latency(jobs: int, *, epochs: int = 1) -> dict[str, Any]:
    """``jobs`` tiny training jobs on the current workspace's cluster, each submitted once the one before is final;
    per job the submit call, queued -> running and running -> finished (seconds). Imports a tiny cohort first."""
    from core.data.synth import CohortConfig, write_cohort
    from core.settings import workspace_dir
    from services.importer import import_manifest
    from services.jobs import engine, service

    root = workspace_dir()
    manifest = write_cohort(
        CohortConfig(n_patients=4, specimens_per_patient=(10, 14), height=64, width=80, seed=1), root / "cohort"
    )
    report = import_manifest(manifest, fractions=(0.5, 0.25, 0.25), seed=0)
    if report.errors:
        raise RuntimeError(f"the benchmark's cohort did not import: {report.errors[0]}")
    _, connect_s = _timed(engine.connect)
    _, supervisor_s = _timed(engine.reconcile)  # creates the database's supervisor actor and waits for it
    cpus = engine.cluster_info().cpus
    rows = []
    for i in range(jobs):
        params = {**_TINY_TRAIN, "epochs": epochs, "name": f"bench-latency-{i}"}
        began = time.perf_counter()
        job_id, submit_s = _timed(lambda p=params: service.submit("train", p, user_id=None))
        job = service.wait(job_id, timeout=_JOB_TIMEOUT_S, poll=_POLL_S)
        rows.append(
            {
                "job": job_id,
                "phase": "cold" if i == 0 else "warm",
                "state": job.state,
                "error": job.error,
                "submit_s": submit_s,
                "queued_to_running_s": _seconds(job.created_at, job.started_at),
                "running_to_finished_s": _seconds(job.started_at, job.finished_at),
                "queued_to_finished_s": _seconds(job.created_at, job.finished_at),
                "seen_final_s": time.perf_counter() - began,
            }
        )
        print(f"  job {i + 1}/{jobs}: {job.state} in {rows[-1]['seen_final_s']:.2f} s", flush=True)
    figures = ("submit_s", "queued_to_running_s", "running_to_finished_s", "queued_to_finished_s")
    summary = {
        phase: {key: _spread([row[key] for row in rows if row["phase"] == phase]) for key in figures}
        for phase in ("cold", "warm")
    }
    return {
        "kind": "train",
        "params": {**_TINY_TRAIN, "epochs": epochs},
        "cohort": {"specimens": report.specimens, "images": report.images},
        "cluster_cpus": cpus,
        "connect_s": connect_s,
        "supervisor_s": supervisor_s,
        "rows": rows,
        "summary": summary,
        "all_succeeded": all(row["state"] == "succeeded" for row in rows),
    }


# --- part 2: N mosaic jobs against one process -------------------------------------------------------------------


def _most_at_once(spans: Sequence[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def _worker_pids(job_ids: Sequence[int]) -> list[int | None]:
    from sqlalchemy import select

    from db.models import Job
    from db.session import read_scope

    with read_scope() as session:
        found = dict(session.execute(select(Job.id, Job.worker_pid).where(Job.id.in_(job_ids))).all())
    return [found.get(job_id) for job_id in job_ids]


def _in_process(predictor: Any, model: Any, mosaic: Path, count: int, options: dict[str, Any]) -> dict[str, Any]:
    """(a): ``count`` mosaics diagnosed one after the other in this process with one loaded predictor."""
    from services.mosaic import diagnose_mosaic

    began = time.perf_counter()
    outcomes = [
        diagnose_mosaic(predictor, model, f"mosaic-{i}.png", mosaic, user_id=None, **options) for i in range(count)
    ]
    seconds = time.perf_counter() - began
    errors = [o.error for o in outcomes if o.error]
    return {
        "seconds": seconds,
        "per_mosaic_s": seconds / count,
        "load_1min": _load(),
        "stitch_s": [o.seconds for o in outcomes],
        "windows": outcomes[0].windows,
        "probability": outcomes[0].probability,
        "all_succeeded": not errors,
        "errors": errors,
    }


def _as_jobs(model_name: str, mosaic: Path, count: int, options: dict[str, Any], run: str) -> dict[str, Any]:
    """(b): ``count`` mosaic jobs submitted at once; wall time from the first submit until every job is final."""
    from core.settings import workspace_dir
    from services.jobs import service, store

    uploads = workspace_dir() / "bench-uploads"
    uploads.mkdir(exist_ok=True)
    files = []
    for i in range(count):  # a mosaic job deletes its upload once done: one copy each
        target = uploads / f"{run}-{i}.png"
        shutil.copyfile(mosaic, target)
        files.append(target.relative_to(workspace_dir()).as_posix())
    began = time.perf_counter()
    ids, submits = [], []
    for i, relative in enumerate(files):
        params = {"model": model_name, "file": relative, "name": f"mosaic-{i}.png", **options, "method": "cam"}
        job_id, seconds = _timed(lambda p=params: service.submit("mosaic", p, user_id=None))
        ids.append(job_id)
        submits.append(seconds)
    pending = set(ids)
    jobs = {}
    while pending:
        for job_id in sorted(pending):
            job = store.get_job(job_id)
            if job is not None and job.final:
                jobs[job_id] = job
                pending.discard(job_id)
        if pending:
            if time.perf_counter() - began > _JOB_TIMEOUT_S:
                raise TimeoutError(f"mosaic jobs {sorted(pending)} did not finish in {_JOB_TIMEOUT_S:.0f} s")
            time.sleep(_POLL_S)
    seconds = time.perf_counter() - began
    finished = [jobs[i] for i in ids]
    spans = [(j.started_at, j.finished_at) for j in finished if j.started_at and j.finished_at]
    return {
        "seconds": seconds,
        "per_mosaic_s": seconds / count,
        "load_1min": _load(),
        "submit_s": _spread(submits),
        "queued_to_running_s": _spread([_seconds(j.created_at, j.started_at) for j in finished]),
        "running_to_finished_s": _spread([_seconds(j.started_at, j.finished_at) for j in finished]),
        "most_at_once": _most_at_once(spans),
        "workers": _worker_pids(ids),
        "states": [j.state for j in finished],
        "errors": [j.error for j in finished if j.error],
        "probabilities": [j.result.get("probability") for j in finished],
        "all_succeeded": all(j.state == "succeeded" for j in finished),
    }


def mosaic_jobs(
    count: int,
    *,
    size: int,
    window: int,
    step: int,
    mode: str = "exact",
    rounds: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """N copies of one mosaic, in this process (a) and as N jobs at once (b), on the current workspace's cluster,
    in rotation: a, b (cold workers), then ``rounds`` times b (warm workers) and a. Ratios of medians. Trains and
    registers the tiny patch classifier first."""
    from PIL import Image as PILImage

    from core.data.synth_rcm import make_rcm_mosaic
    from core.settings import workspace_dir
    from core.train import TrainConfig
    from services.jobs import engine
    from services.mosaic import train_patch_classifier
    from services.predictions import load_predictor

    root = workspace_dir()
    config = TrainConfig(
        architecture="tiny_cnn", task="aspecific", modality="RCM", image_size=window, epochs=3, batch_size=16
    )
    training = [make_rcm_mosaic(256, 256, seed=50 + i, blobs=3) for i in range(4)]
    (model, _), train_s = _timed(
        lambda: train_patch_classifier(config, training, name="bench-RCM", patches_per_mosaic=96, log=lambda _m: None)
    )
    image, _ = make_rcm_mosaic(size, size, seed=99)
    mosaic = root / "bench-mosaic.png"
    PILImage.fromarray(image).save(mosaic)
    options = {"step": step, "sigma": 5.0, "mode": mode}
    engine.connect()
    cpus = engine.cluster_info().cpus
    threads = threads or usable_cores()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictor, load_s = _timed(lambda: load_predictor(model, "cpu"))
        side = min(size, 2 * window)
        predictor.stitch(image[:side, :side].astype("float32") / 255.0, **options)  # warm-up, not timed
        print(f"  (a) {count} mosaics in this process ...", flush=True)
        in_process = [_in_process(predictor, model, mosaic, count, options)]
        print(f"  (b) {count} mosaic jobs at once, cold workers ...", flush=True)
        cold = _as_jobs(model.name, mosaic, count, options, "cold")
        warm = []
        for r in range(rounds):
            print(f"  round {r + 1}/{rounds}: (b) warm workers, then (a) ...", flush=True)
            warm.append(_as_jobs(model.name, mosaic, count, options, f"warm{r}"))
            in_process.append(_in_process(predictor, model, mosaic, count, options))
    finally:
        torch.set_num_threads(saved)
    baseline = statistics.median(run["seconds"] for run in in_process)
    warm_s = statistics.median(run["seconds"] for run in warm)
    reference = in_process[0]["probability"]
    found = cold["probabilities"] + [p for run in warm for p in run["probabilities"]]
    gaps = [abs(p - reference) for p in found if p is not None]
    return {
        "cluster_cpus": cpus,
        "usable_cores": usable_cores(),
        "in_process_threads": threads,
        "job_threads": 1,
        "mosaic": [size, size],
        "architecture": "tiny_cnn",
        "window": window,
        "step": step,
        "mode": mode,
        "sigma": 5.0,
        "windows": in_process[0]["windows"],
        "count": count,
        "rounds": rounds,
        "train_s": train_s,
        "load_s": load_s,
        "in_process": in_process,
        "jobs_cold": cold,
        "jobs_warm": warm,
        "in_process_median_s": baseline,
        "jobs_warm_median_s": warm_s,
        "ratios": {
            "jobs_cold_over_in_process": cold["seconds"] / baseline,
            "jobs_warm_over_in_process": warm_s / baseline,
            "jobs_warm_over_jobs_cold": warm_s / cold["seconds"],
        },
        "probability_max_abs_diff": max(gaps) if gaps else None,
        "workers_reused": all(set(run["workers"]) <= set(cold["workers"]) for run in warm),
        "all_succeeded": all(run["all_succeeded"] for run in [*in_process, cold, *warm]),
    }


# --- part 3: the app's first start -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _query(database: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on the app's SQLite file; none while it or its tables do not exist yet."""
    if not database.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2.0)) as connection:
            return connection.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []


def _moment(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


class _Watch:
    """Polls the app's workspace in a thread and records, from ``began``, when each of the demo's steps happened."""

    def __init__(self, root: Path, began: float, poll: float = 0.2) -> None:
        from services.demo_accounts import DEMO_USERS

        self._root, self._began, self._poll = root, began, poll
        self._database = root / "study.db"
        self._users = [name for name, *_ in DEMO_USERS]
        self.seen: dict[str, float] = {}
        self.demo_job: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-watch")
        self._thread.start()

    def _check(self) -> dict[str, bool]:
        marks = ",".join("?" * len(self._users))
        users = _query(self._database, f"SELECT count(*) FROM users WHERE username IN ({marks})", *self._users)
        jobs = _query(
            self._database,
            "SELECT id, state, created_at, started_at, finished_at, message FROM jobs WHERE kind = 'demo' "
            "ORDER BY id LIMIT 1",
        )
        if jobs:
            job_id, state, created, started, finished, message = jobs[0]
            self.demo_job = {
                "id": job_id,
                "state": state,
                "queued_to_running_s": _seconds(_moment(created), _moment(started)),
                "running_to_finished_s": _seconds(_moment(started), _moment(finished)),
                "message": message,
            }
        state = self.demo_job["state"] if self.demo_job else None
        return {
            "accounts": bool(users) and users[0][0] == len(self._users),
            "demo_job_queued": bool(jobs),
            "cluster_up": (self._root / "ray" / "cluster.json").exists(),
            "demo_job_running": state in ("running", "succeeded", "failed", "cancelled", "interrupted"),
            "fl_model": bool(_query(self._database, "SELECT id FROM models WHERE name = ?", DEMO_MODEL)),
            "demo_job_final": state in ("succeeded", "failed", "cancelled", "interrupted"),
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.perf_counter() - self._began
            for event, happened in self._check().items():
                if happened and event not in self.seen:
                    self.seen[event] = now
            self._stop.wait(self._poll)

    def until(self, event: str, timeout: float, alive: Callable[[], bool]) -> float | None:
        """Seconds from the start until ``event``; None when ``timeout`` passed or the app stopped first."""
        while event not in self.seen and time.perf_counter() - self._began < timeout and alive():
            time.sleep(self._poll)
        return self.seen.get(event)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _get(url: str) -> tuple[int, bytes] | None:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - localhost
        return response.status, response.read()
    return None


def _rendered_sign_in(port: int, timeout: float) -> bool:
    """Open a session as a browser does (the websocket, then a script run) and wait for the run to finish; whether
    it showed the sign-in form."""
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
    from websockets.sync.client import connect

    request = BackMsg()
    request.rerun_script.query_string = ""
    request.rerun_script.page_script_hash = ""
    signed_in_form = False
    url = f"ws://127.0.0.1:{port}/_stcore/stream"
    with connect(url, subprotocols=["streamlit"], open_timeout=timeout, max_size=None) as session:
        session.send(request.SerializeToString())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = ForwardMsg()
            message.ParseFromString(session.recv(timeout=max(0.1, deadline - time.monotonic())))
            kind = message.WhichOneof("type")
            if kind == "delta" and 'label: "Sign in"' in str(message.delta):
                signed_in_form = True
            elif kind == "script_finished":
                return signed_in_form and message.script_finished == ForwardMsg.FINISHED_SUCCESSFULLY
    return False


def _serve(process: subprocess.Popen[bytes], port: int, began: float, timeout: float) -> dict[str, Any]:
    """Seconds from ``began`` until the health check says ok, ``/`` answers 200 and the sign-in page is rendered."""
    figures: dict[str, Any] = {"health_s": None, "index_s": None, "sign_in_s": None}
    while time.perf_counter() - began < timeout and process.poll() is None:
        answer = _get(f"http://127.0.0.1:{port}/_stcore/health")
        if answer and answer[0] == 200 and answer[1].strip() == b"ok":
            figures["health_s"] = time.perf_counter() - began
            break
        time.sleep(0.1)
    if figures["health_s"] is None:
        return figures
    answer = _get(f"http://127.0.0.1:{port}/")
    if answer and answer[0] == 200:
        figures["index_s"] = time.perf_counter() - began
    if _rendered_sign_in(port, timeout=max(1.0, timeout - (time.perf_counter() - began))):
        figures["sign_in_s"] = time.perf_counter() - began
    return figures


def _start_app(root: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``python -m streamlit run app/main.py`` from the repository root, in its own session, as ``make run`` starts
    it (``IOAI_DEMO=1``), on the workspace ``root`` and without a cluster address."""
    env = {
        **os.environ,
        "IOAI_WORKSPACE": str(root),
        "IOAI_DATABASE_URL": f"sqlite:///{root / 'study.db'}",
        "IOAI_DEMO": "1",
    }
    env.pop("IOAI_RAY_ADDRESS", None)
    command = [
        sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
        "--server.port", str(port), "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    with open(log, "ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and app
            command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop_app(process: subprocess.Popen[bytes]) -> None:
    """Stop the app's process group (it was started in its own session) and reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    _end_session(process.pid)


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def first_start(*, timeout: float, full: bool) -> dict[str, Any]:
    """The app's first start in an empty workspace (``IOAI_DEMO=1``, its own embedded cluster), then a second start
    on the same workspace; seconds from each launch (see the module's docstring)."""
    root = Path(tempfile.mkdtemp(prefix="ioai-bench-jobs-first-"))
    port = _free_port()
    processes: list[subprocess.Popen[bytes]] = []
    watch = None
    try:
        began = time.perf_counter()
        processes.append(_start_app(root, port, root / "streamlit-1.log"))
        watch = _Watch(root, began)
        print(f"  first start on port {port}, workspace {root} ...", flush=True)
        first = _serve(processes[0], port, began, timeout=min(timeout, 300.0))
        print(f"  served: {first}", flush=True)

        def alive() -> bool:
            return processes[0].poll() is None

        target = "demo_job_final" if full else "fl_model"
        waiting = "the demo job to end" if full else f"{DEMO_MODEL} to be registered"
        grace = (first["sign_in_s"] or 0.0) + _DEMO_GRACE_S
        demo_started = watch.until("demo_job_queued", min(timeout, grace), alive) is not None
        if demo_started:
            print(f"  waiting for {waiting} (up to {timeout:.0f} s) ...", flush=True)
            watch.until(target, timeout, alive)
        else:
            print(
                f"  no demo job {_DEMO_GRACE_S:.0f} s after the sign-in page: the demo build did not start", flush=True
            )
        steps = dict(watch.seen)
        demo_at_restart = dict(watch.demo_job) if watch.demo_job else None
        state = demo_at_restart["state"] if demo_at_restart else None
        app_log = _tail(root / "streamlit-1.log") if not alive() or target not in steps else ""
        _stop_app(processes[0])

        print("  second start on the same workspace ...", flush=True)
        again = time.perf_counter()
        processes.append(_start_app(root, port, root / "streamlit-2.log"))
        second = _serve(processes[1], port, again, timeout=min(timeout, 300.0))
        print(f"  served: {second}", flush=True)
        return {
            "port": port,
            "first": first,
            "steps": steps,
            "demo_job": demo_at_restart,
            "demo_started": demo_started,
            "waited_for": target,
            "second": second,
            "second_while": f"the demo job was {state}" if state else "there was no demo job",
            "goals_s": GOALS_S,
            "met": {
                "first_serve": first["sign_in_s"] is not None and first["sign_in_s"] <= GOALS_S["first_serve"],
                "later_serve": second["sign_in_s"] is not None and second["sign_in_s"] <= GOALS_S["later_serve"],
                "fl_model": "fl_model" in steps and steps["fl_model"] <= GOALS_S["fl_model"],
            },
            "app_log_tail": app_log,
        }
    finally:
        if watch:
            watch.stop()
        for process in processes:
            _stop_app(process)
        _stop_cluster(root)
        shutil.rmtree(root, ignore_errors=True)


# --- the report --------------------------------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report_tables(document: dict[str, Any]) -> str:
    """The sections as readable tables."""
    lines = []
    part = document["latency"]
    lines += [
        "",
        f"latency: {len(part['rows'])} tiny train jobs one after the other, cluster of {part['cluster_cpus']:g} CPUs "
        f"(connect {_s(part['connect_s'])} s, supervisor start {_s(part['supervisor_s'])} s)",
    ]
    table = []
    for phase in ("cold", "warm"):
        summary = part["summary"][phase]
        count = sum(1 for row in part["rows"] if row["phase"] == phase)
        for key, label in (
            ("submit_s", "submit() call"),
            ("queued_to_running_s", "queued -> running"),
            ("running_to_finished_s", "running -> finished"),
            ("queued_to_finished_s", "queued -> finished"),
        ):
            table.append(
                {
                    "jobs": f"{phase} ({count})",
                    "figure": label,
                    "median s": _s(summary[key]["median"], 3),
                    "max s": _s(summary[key]["max"], 3),
                }
            )
    lines.append(pd.DataFrame(table).to_string(index=False))
    lines.append(f"every job succeeded: {part['all_succeeded']}")

    part = document["mosaics"]
    lines += [
        "",
        f"mosaics: {part['count']} x {part['mosaic'][0]} px, tiny_cnn window {part['window']}, step {part['step']}, "
        f"{part['mode']} ({part['windows']:,} windows each); cluster {part['cluster_cpus']:g} CPUs, "
        f"{part['usable_cores']} usable cores",
    ]
    in_process = f"(a) in process, {part['in_process_threads']} threads"
    runs = [(in_process, part["in_process"][0]), ("(b) jobs at once, cold workers", part["jobs_cold"])]
    for r, (warm, again) in enumerate(zip(part["jobs_warm"], part["in_process"][1:], strict=True)):
        runs += [(f"(b) jobs at once, warm workers, round {r + 1}", warm), (f"{in_process}, round {r + 1}", again)]
    rows = []
    for label, run in runs:
        jobs = "queued_to_running_s" in run
        rows.append(
            {
                "run": label,
                "wall s": _s(run["seconds"]),
                "per mosaic s": _s(run["per_mosaic_s"]),
                "queued->running s (med/max)": (
                    f"{_s(run['queued_to_running_s']['median'])} / {_s(run['queued_to_running_s']['max'])}"
                    if jobs
                    else ""
                ),
                "running s (med/max)": (
                    f"{_s(run['running_to_finished_s']['median'])} / {_s(run['running_to_finished_s']['max'])}"
                    if jobs
                    else ""
                ),
                "at once": run["most_at_once"] if jobs else "",
                "workers": len({p for p in run["workers"] if p}) if jobs else "",
                "load 1 min": _s(run["load_1min"]),
            }
        )
    lines.append(pd.DataFrame(rows).to_string(index=False))
    ratios = part["ratios"]
    lines += [
        f"medians: (a) {_s(part['in_process_median_s'])} s, warm (b) {_s(part['jobs_warm_median_s'])} s; "
        f"(b)/(a): cold {ratios['jobs_cold_over_in_process']:.2f}, warm {ratios['jobs_warm_over_in_process']:.2f}; "
        f"warm (b) / cold (b): {ratios['jobs_warm_over_jobs_cold']:.2f}",
        f"(below 1: the jobs were faster; with {part['usable_cores']} cores (b)/(a) cannot go below "
        f"1/{part['usable_cores']})",
        f"model trained in {_s(part['train_s'])} s, loaded in {_s(part['load_s'], 3)} s; workers reused: "
        f"{part['workers_reused']}; largest |job - in-process probability|: "
        f"{_s(part['probability_max_abs_diff'], 6)}; every run succeeded: {part['all_succeeded']}",
    ]

    start = document.get("first_start")
    if start:
        steps = start["steps"]
        job = start["demo_job"] or {}
        served = [
            ("health ok", "health_s"),
            ("/ answers 200", "index_s"),
            ("sign-in page rendered", "sign_in_s"),
        ]
        rows = [
            {"step": label, "first start s": start["first"][key], "second start s": start["second"][key]}
            for label, key in served
        ]
        for label, event in (
            ("demo accounts exist", "accounts"),
            ("demo job queued", "demo_job_queued"),
            ("embedded cluster up", "cluster_up"),
            ("demo job running", "demo_job_running"),
            (f"{DEMO_MODEL} registered", "fl_model"),
            ("demo job final", "demo_job_final"),
        ):
            rows.append({"step": label, "first start s": steps.get(event), "second start s": None})
        for row in rows:
            for column in ("first start s", "second start s"):
                row[column] = _s(row[column], 1)
        frame = pd.DataFrame(rows)
        lines += [
            "",
            "first start: IOAI_DEMO=1, empty workspace, "
            f"the app's own cluster; demo build started: {start['demo_started']}; second start while "
            f"{start['second_while']}",
            frame.to_string(index=False),
            f"demo job: {job.get('state')}, queued -> running {_s(job.get('queued_to_running_s'), 1)} s, "
            f"last message: {job.get('message')!r}",
            "goals: "
            + ", ".join(
                f"{k} <= {v:.0f} s: {'met' if start['met'][k] else 'NOT met'}" for k, v in start["goals_s"].items()
            ),
        ]
    return "\n".join(lines)


def _write(out: Path, quick: bool, document: dict[str, Any]) -> Path:
    path = out / f"jobs{'-quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, allow_nan=False, default=str))
    print(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the parts, print the tables, write the JSON; the exit status (1 when a job did not succeed)."""
    settings = parse_args(argv)
    began = time.perf_counter()
    about = {**machine(torch.device("cpu")), "nproc": os.cpu_count()}
    print("  ".join(f"{key}: {value}" for key, value in about.items()), flush=True)
    print("latency ...", flush=True)
    with own_cluster(settings.cpus, "latency"):
        latency_part = latency(settings.jobs)
    print("mosaics ...", flush=True)
    with own_cluster(settings.cpus, "mosaics"):
        mosaic_part = mosaic_jobs(
            settings.mosaics,
            size=settings.size,
            window=settings.window,
            step=settings.step,
            mode=settings.mode,
            rounds=settings.rounds,
        )
    start_part = None
    if settings.first_start:
        print("first start ...", flush=True)
        start_part = first_start(timeout=settings.timeout, full=settings.full)
    about["load_1min_after"] = _load()
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "latency": latency_part,
        "mosaics": mosaic_part,
        "first_start": start_part,
        "seconds": time.perf_counter() - began,
    }
    print(report_tables(document))
    print(f"Total {document['seconds']:.0f} s.")
    _write(settings.out, settings.quick, document)
    return 0 if latency_part["all_succeeded"] and mosaic_part["all_succeeded"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
