"""The engine: jobs run as Ray tasks, watched by one supervisor per database.

**Where the cluster is.** ``IOAI_RAY_ADDRESS`` attaches to a running cluster (``ray start --head`` on a GPU box,
more nodes joined to it). Without it the workspace gets its own embedded local cluster: a ``ray start --head
--block`` process started once, in its own session, and recorded in ``<workspace>/ray/cluster.json``. It is a
separate process on purpose: it outlives an app restart, so jobs keep running and are followed again (and Ray
cannot start a local cluster from a Streamlit script thread: its processes die with the thread that made them).
Every cluster the app starts uses Ray's token authentication, with Ray's default token file
(``~/.ray/auth_token``, mode 600, created here if missing); set ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN[_PATH]``
yourself to attach to a cluster configured otherwise. Ray reads them when it is imported, so this module sets them
before importing Ray.

**Who watches.** A detached actor per database (``jobs-<hash of the URL>``) launches each job as a task, keeps
its reference, and records how a task ended when the task could not (its worker was killed, its node died:
``failed``; force-cancelled: ``cancelled``). A task is never retried by Ray: a job runs at most once, and a retry
is a new job. When a supervisor starts (a new cluster, or the old one restarted), it reconciles the database:
queued jobs are launched, running ones it does not hold became ``interrupted``.

**Resources.** A job's task asks for its kind's CPUs (capped by the largest node) and, for work on a network,
one GPU when the cluster has any. Tasks reuse worker processes, so models cached in a worker
(``services.predictions``) stay loaded from one job to the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import REPO_ROOT, database_url, workspace_dir
from services.jobs import store


def _default_token() -> Path:
    """Ray's default token file, created (random, mode 600) if missing."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token.exists() and not os.environ.get("RAY_AUTH_TOKEN"):
        token.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
    return token


os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_default_token()

import ray  # noqa: E402 - after the authentication settings it reads at import

__all__ = [
    "ADDRESS_ENV",
    "ClusterInfo",
    "cancel",
    "cluster_info",
    "connect",
    "disconnect",
    "launch",
    "reconcile",
    "start_embedded",
    "stop_embedded",
    "supervisor",
]

ADDRESS_ENV = "IOAI_RAY_ADDRESS"
NAMESPACE = "ioai"
_START_TIMEOUT_S = 120.0
_log = logging.getLogger(__name__)
_lock = threading.RLock()


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    embedded: bool
    nodes: int
    cpus: float
    gpus: float


# --- the cluster -------------------------------------------------------------------------------------------------


def _cluster_dir(root: Path | None = None) -> Path:
    folder = (root or workspace_dir()) / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(OSError, ValueError):  # a zombie (our own child, exited) is not alive
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
        return True
    return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _recorded(folder: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((folder / "cluster.json").read_text())
    except (OSError, ValueError):
        return None
    if _alive(int(info["pid"])) and _port_open(info["address"]):
        return info
    return None


def start_embedded(root: Path | None = None, *, cpus: int | None = None, gpus: int | None = None) -> str:
    """The workspace's embedded cluster's address, starting it if it is not running (one per workspace, whoever
    asks first: a file lock keeps two processes from starting two)."""
    folder = _cluster_dir(root)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = _recorded(folder)
        if info:
            return str(info["address"])
        port = _free_port()
        address = f"127.0.0.1:{port}"
        ray_cli = Path(sys.executable).with_name("ray")
        command = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
        command += [
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus or os.cpu_count() or 1}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--object-store-memory=500000000",
        ]
        if gpus is not None:
            command.append(f"--num-gpus={gpus}")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(folder / "cluster.log", "ab") as log:
            process = subprocess.Popen(  # noqa: S603 - our own interpreter's ray CLI
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _port_open(address):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the embedded Ray cluster did not start; see {folder / 'cluster.log'}")
            time.sleep(0.2)
        (folder / "cluster.json").write_text(json.dumps({"address": address, "pid": process.pid}))
        return address


def stop_embedded(root: Path | None = None, timeout: float = 60.0) -> bool:
    """Stop the workspace's embedded cluster (and every job on it); False when none was running."""
    folder = _cluster_dir(root)
    try:
        info = json.loads((folder / "cluster.json").read_text())
    except (OSError, ValueError):
        return False
    pid = int(info["pid"])
    if ray.is_initialized() and _connected_to == info["address"]:
        disconnect()
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    (folder / "cluster.json").unlink(missing_ok=True)
    return True


_connected_to: str | None = None


def connect() -> str:
    """Connect this process to the cluster (``IOAI_RAY_ADDRESS``, else the workspace's embedded one); idempotent
    and thread-safe. Returns the address."""
    global _connected_to
    with _lock:
        if ray.is_initialized():  # inside a worker, or already connected
            return _connected_to or "this cluster"
        address = os.environ.get(ADDRESS_ENV)
        if not address:
            address = start_embedded()
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        )
        _connected_to = address
        return address


def disconnect() -> None:
    """Leave the cluster (jobs keep running on it)."""
    global _connected_to
    with _lock:
        if ray.is_initialized():
            ray.shutdown()
        _connected_to = None


def cluster_info() -> ClusterInfo:
    address = connect()
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(
        address=address,
        embedded=not os.environ.get(ADDRESS_ENV),
        nodes=len(nodes),
        cpus=float(resources.get("CPU", 0.0)),
        gpus=float(resources.get("GPU", 0.0)),
    )


# --- the supervisor and the job task -----------------------------------------------------------------------------


@ray.remote(max_retries=0)
def _run_job(job_id: int, url: str, root: str, threads: int) -> str:
    os.environ["IOAI_DATABASE_URL"], os.environ["IOAI_WORKSPACE"] = url, root
    from services.jobs.runner import execute

    return execute(job_id, threads=threads, node=ray.get_runtime_context().get_node_id())


def _describe_failure(error: BaseException) -> tuple[str, str]:
    """How a task that did not return ended: (state, reason)."""
    name = type(error).__name__
    if isinstance(error, ray.exceptions.TaskCancelledError):
        return "cancelled", "cancelled; its worker was stopped"
    if isinstance(error, ray.exceptions.NodeDiedError) or "NodeDied" in name:
        return "interrupted", "the machine running it left the cluster"
    if isinstance(error, ray.exceptions.WorkerCrashedError | ray.exceptions.OutOfMemoryError):
        return "failed", "its worker process stopped unexpectedly (killed, or out of memory); nothing more was stored"
    return "failed", f"{name}: {error}"[:4000]


@ray.remote(num_cpus=0, max_concurrency=32, max_restarts=0)
class _Supervisor:
    """One per database: launches its jobs, holds their task references, records how each ended."""

    def __init__(self, url: str, root: str) -> None:
        os.environ["IOAI_DATABASE_URL"], os.environ["IOAI_WORKSPACE"] = url, root
        self._url, self._root = url, root
        self._refs: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.reconcile()
        threading.Thread(target=self._watch, daemon=True, name="job-watch").start()

    def _resources(self, cpus: int, network: bool) -> dict[str, Any]:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        largest = max((r.get("CPU", 0.0) for r in nodes), default=1.0)
        gpu = network and any(r.get("GPU", 0.0) >= 1 for r in nodes)
        return {"num_cpus": max(1, min(cpus, int(largest))), "num_gpus": 1 if gpu else 0}

    def launch(self, job_id: int) -> bool:
        """Start a queued job's task (once); False when it is not queued or already held."""
        from services.jobs.kinds import KINDS

        with self._lock:
            if job_id in self._refs:
                return False
            job = store.get_job(job_id)
            if job is None or job.state != "queued":
                return False
            kind = KINDS.get(job.kind)
            options = self._resources(kind.cpus if kind else 1, kind.network if kind else False)
            ref = _run_job.options(**options, name=f"job-{job_id}-{job.kind}").remote(
                job_id, self._url, self._root, options["num_cpus"]
            )
            self._refs[job_id] = ref
            return True

    def cancel(self, job_id: int) -> bool:
        """Stop a held job's worker (the caller marked the job cancelled first)."""
        with self._lock:
            ref = self._refs.get(job_id)
        if ref is None:
            return False
        ray.cancel(ref, force=True)
        return True

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._refs)

    def reconcile(self) -> dict[str, list[int]]:
        """Launch queued jobs nobody holds; running jobs nobody holds vanished: ``interrupted``."""
        launched, vanished = [], []
        for job_id, state in store.active_job_ids().items():
            with self._lock:
                if job_id in self._refs:
                    continue
            if state == "queued":
                if self.launch(job_id):
                    launched.append(job_id)
            elif store.mark_vanished(job_id, "its work was lost (the cluster or its supervisor restarted); retry it"):
                vanished.append(job_id)
        return {"launched": launched, "interrupted": vanished}

    def _watch(self) -> None:
        while True:
            with self._lock:
                refs = {ref: job_id for job_id, ref in self._refs.items()}
            if not refs:
                time.sleep(0.2)
                continue
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            for ref in ready:
                job_id = refs[ref]
                try:
                    ray.get(ref)
                except Exception as error:  # noqa: BLE001 - the task died: record why, unless it already did
                    state, reason = _describe_failure(error)
                    if state == "interrupted":
                        store.mark_vanished(job_id, reason)
                    else:
                        store.finish_job(job_id, state, error=reason, message=reason)
                with self._lock:
                    self._refs.pop(job_id, None)


def _supervisor_name(url: str) -> str:
    return "jobs-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def supervisor() -> Any:
    """This database's supervisor (created, and the database reconciled, on first use)."""
    connect()
    url, root = database_url(), str(workspace_dir())
    return _Supervisor.options(name=_supervisor_name(url), lifetime="detached", get_if_exists=True).remote(url, root)


def launch(job_id: int) -> bool:
    return bool(ray.get(supervisor().launch.remote(job_id)))


def cancel(job_id: int) -> bool:
    return bool(ray.get(supervisor().cancel.remote(job_id)))


def reconcile() -> dict[str, list[int]]:
    return ray.get(supervisor().reconcile.remote())


def stop_supervisor() -> None:
    """Remove this database's supervisor (its running jobs stop with it; tests, and switching databases)."""
    connect()
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(_supervisor_name(database_url()), namespace=NAMESPACE))
