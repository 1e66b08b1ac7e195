"""Many people on one study database at once: ``python -m bench.concurrency``.

Issue 13 found "database is locked" crashes: six people pressing Sign in together (five got Streamlit's error
page) and a PI export failing about half the time while readers read. The rule that fixed them lives in
``db.session``: every write transaction starts as a writer (SQLite ``BEGIN IMMEDIATE``) and is retried with
backoff; reads are read-only transactions that never upgrade. This benchmark puts the app's own use cases under the
load the issue names, on SQLite and on PostgreSQL, in threads of one process as Streamlit serves its sessions:

- ``--readers`` (16) readers read a two-arm study: the next case (``services.studies.reader_state``), then an answer
  (``record_read``), again and again, with a short pause (``--think-ms``) between;
- once every reader is reading, ``--sign-ins`` (50) people press Sign in at the same instant
  (``services.accounts.sign_in``, a barrier releases them together), each from their own client;
- meanwhile ``--exporters`` (4) PI sessions download, back to back, the reads, the answer history, the cases with
  truth and the audit log (``services.exports``), ``--exports`` (5) rounds each.

Before the load, three more people sign in one after the other and the PI downloads the four files once, with
nothing else going on (``sign_in_alone``, ``export_alone``): the baseline the loaded figures are read against.
Every exception, and every sign-in that did not let its user in, is an error. The same load is run a second time
under the rule the app had before (``legacy``: deferred ``BEGIN`` on SQLite, so a transaction that reads and then
writes fails at its first write when another writer committed meanwhile; sign-ins, exports and the audit write of
each in one such transaction, none retried), side by side in the same run, unless ``--rules new``. Readers record
their answers through ``record_read`` under both rules (it already retried before). Per backend and rule the table
gives operations done, errors, and p50 / p95 / max milliseconds per kind of operation. Results go to
``bench/results/concurrency-cpu.json``. PostgreSQL is a throwaway server (``tests/postgres.py``); without its
binaries the benchmark says so and measures SQLite only.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy
from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from bench.databases import BACKENDS, fresh_database, postgres_missing
from bench.diagnosis import start, write_results
from db import repo
from db.audit import audit_table, log_event
from db.chain import track_transactions
from db.session import SQLITE_BUSY_TIMEOUT_MS, init_db, read_scope, session_scope
from services import accounts, exports, studies
from services.studies import ArmSpec

__all__ = ["BACKENDS", "OPERATIONS", "RULES", "main"]

RULES = ("new", "legacy")
OPERATIONS = ("sign_in_alone", "sign_in", "serve", "record", "export_alone", "export")
_QUIET = 3  # accounts that sign in one after the other before the load: the unloaded baseline
_PASSWORD = "Concurrency-bench-{i:03d}"


@dataclass(frozen=True)
class Settings:
    backends: tuple[str, ...]
    rules: tuple[str, ...]
    readers: int
    sign_ins: int
    exporters: int
    exports: int
    cases: int
    think_ms: float
    seed: int
    out: Path
    quick: bool


@dataclass
class _Tally:
    """What one run saw: latencies per operation, and every error."""

    millis: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, operation: str, call: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - every failure is the measurement
            with self.lock:
                self.errors.append(f"{operation}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            return None
        with self.lock:
            self.millis[operation].append((time.perf_counter() - began) * 1000.0)
        return result

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)


@dataclass(frozen=True)
class Row:
    backend: str
    rule: str
    operation: str
    done: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both")
    parser.add_argument(
        "--rules", choices=[*RULES, "both"], default="both", help="the app's rule, the old one, or both"
    )
    parser.add_argument("--readers", type=int, default=16)
    parser.add_argument("--sign-ins", type=int, default=50, help="people pressing Sign in at the same instant")
    parser.add_argument("--exporters", type=int, default=4, help="PI sessions exporting back to back")
    parser.add_argument("--exports", type=int, default=5, help="rounds of the four downloads per exporter")
    parser.add_argument("--cases", type=int, default=100, help="study cases (each read in two arms)")
    parser.add_argument("--think-ms", type=float, default=20.0, help="a reader's pause between answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="4 readers, 8 sign-ins, 2 exporters x 2, 12 cases")
    args = parser.parse_args(argv)
    if args.quick:
        args.readers, args.sign_ins, args.exporters, args.exports, args.cases = 4, 8, 2, 2, 12
    return Settings(
        backends=BACKENDS if args.backend == "both" else (args.backend,),
        rules=RULES if args.rules == "both" else (args.rules,),
        readers=args.readers,
        sign_ins=args.sign_ins,
        exporters=args.exporters,
        exports=args.exports,
        cases=args.cases,
        think_ms=args.think_ms,
        seed=args.seed,
        out=args.out,
        quick=args.quick,
    )


# ------------------------------------------------------------------------------------------------ the database


@dataclass(frozen=True)
class _Built:
    study_id: int
    pi: int
    readers: list[int]
    people: list[tuple[str, str]]  # (username, password) of those who sign in together
    quiet: list[tuple[str, str]]  # ... and of those who sign in alone, before the load


def _build(settings: Settings) -> _Built:
    """The accounts, ``--cases`` specimens with an FL and a WL image row each, and the study, every reader invited.
    Reading never renders pixels here, so the image rows point at paths that need not exist."""
    init_db()
    with session_scope() as session:
        pi = repo.create_user(session, "bench-pi", _PASSWORD.format(i=999), "pi").id
        readers = [
            repo.create_user(session, f"bench-reader-{i:02d}", _PASSWORD.format(i=500 + i), "reader").id
            for i in range(settings.readers)
        ]
        people = [(f"bench-person-{i:03d}", _PASSWORD.format(i=i)) for i in range(settings.sign_ins + _QUIET)]
        for i, (name, password) in enumerate(people):
            repo.create_user(session, name, password, ("clinician", "reader", "pi")[i % 3])
        specimens = []
        for i in range(settings.cases):
            specimen = repo.add_specimen(session, f"P{i // 8:03d}", f"S{i:04d}", split="test", tumor=bool(i % 2))
            for modality in ("FL", "WL"):
                repo.add_specimen_image(session, specimen, modality, f"images/{i}.png", f"{i:064d}", 64, 80)
            specimens.append(specimen)
        study = studies.create_study(
            session,
            title="Concurrency benchmark",
            task="tumor",
            specimen_ids=specimens,
            arms=(ArmSpec("FL", "FL"), ArmSpec("WL", "WL")),
            reader_ids=readers,
            created_by=pi,
        )
    return _Built(study.id, pi, readers, people[: settings.sign_ins], people[settings.sign_ins :])


# ----------------------------------------------------------------------------------------------- the old rule


def _legacy_maker(url: str) -> sessionmaker[Session]:
    """Sessions as ``db.session`` made them before the rule: on SQLite a deferred ``BEGIN`` (a transaction that
    reads, then writes, takes the write lock only at its first write)."""
    if not url.startswith("sqlite"):
        engine = create_engine(url)
    else:
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            for pragma in ("journal_mode=WAL", "foreign_keys=ON", f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}"):
                dbapi_connection.execute(f"PRAGMA {pragma}")

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN")

    track_transactions(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _once(maker: sessionmaker[Session], work: Callable[[Session], Any]) -> Any:
    """One transaction of the old kind: no retry."""
    with maker() as session, session.begin():
        return work(session)


def _legacy_sign_in(maker: sessionmaker[Session], username: str, password: str) -> bool:
    """The sign-in as it was: verify and audit in one transaction that reads first."""

    def work(session: Session) -> bool:
        user = repo.find_credentials(session, username)
        ok = user is not None and repo.verify_password(user.password_hash, password)
        log_event(session, "sign_in" if ok else "sign_in_failed", username=username)
        return ok

    return _once(maker, work)


def _legacy_export(maker: sessionmaker[Session], study_id: int, pi: int) -> None:
    """The four downloads as they were: each read and its audit row in one transaction that reads first."""
    for build, action in (
        (lambda s: studies.export_reads(s, study_id), "reads_exported"),
        (lambda s: studies.export_reads(s, study_id, history=True), "reads_exported"),
        (lambda s: studies.export_cases(s, study_id), "cases_exported"),
        (audit_table, "csv_downloaded"),
    ):
        _once(maker, lambda s, build=build, action=action: (build(s), log_event(s, action, user_id=pi)))


# ------------------------------------------------------------------------------------------------------ load


def _reader(built: _Built, reader: int, tally: _Tally, stop: threading.Event, settings: Settings) -> None:
    chooser = random.Random(settings.seed * 1000 + reader)
    while not stop.is_set():
        state = tally.timed("serve", lambda: studies.reader_state(built.study_id, reader))
        if state is None:
            continue
        if state.kind != "case":
            return
        case = state.case
        result = tally.timed(
            "record",
            lambda case=case: studies.record_read(
                study_id=built.study_id,
                reader_id=reader,
                arm_id=case.arm_id,
                token=case.token,
                label=chooser.randrange(2),
                rating=chooser.randint(1, 5),
            ),
        )
        if result is not None and result.status != "recorded":
            tally.error(f"record: {result.status} for a freshly served case")
        time.sleep(settings.think_ms / 1000.0 * chooser.random())


def _sign_in(name: str, password: str, rule: str, maker: Any, tally: _Tally, operation: str) -> None:
    if rule == "new":
        result = tally.timed(operation, lambda: accounts.sign_in(name, password, f"bench-client-{name}"))
        if result is not None and not result.ok:
            tally.error(f"{operation}: {name} was not let in: {result.message}")
    else:
        ok = tally.timed(operation, lambda: _legacy_sign_in(maker, name, password))
        if ok is False:
            tally.error(f"{operation}: {name} was not let in")


def _export(built: _Built, rule: str, maker: Any, tally: _Tally, operation: str) -> None:
    """One round of the four downloads."""
    if rule == "legacy":
        tally.timed(operation, lambda: _legacy_export(maker, built.study_id, built.pi))
        return

    def export() -> None:
        exports.reads_csv(built.study_id, user_id=built.pi)
        exports.reads_csv(built.study_id, user_id=built.pi, history=True)
        exports.cases_csv(built.study_id, user_id=built.pi)
        with read_scope() as peek:  # the table as the Data page shows it
            audit = audit_table(peek)
        exports.table_csv(audit, what="audit log", user_id=built.pi)

    tally.timed(operation, export)


def _signer(built: _Built, i: int, rule: str, maker: Any, tally: _Tally, gate: threading.Barrier) -> None:
    name, password = built.people[i]
    gate.wait()
    _sign_in(name, password, rule, maker, tally, "sign_in")


def _exporter(built: _Built, rule: str, maker: Any, tally: _Tally, settings: Settings, gate: threading.Barrier):
    gate.wait()
    for _ in range(settings.exports):
        _export(built, rule, maker, tally, "export")


def _run(built: _Built, rule: str, url: str, settings: Settings) -> tuple[_Tally, float]:
    """First the baseline (a few sign-ins one after the other, one round of downloads, with nothing else going on);
    then readers read, and once all are going, the sign-ins and the exporters start together; readers stop after."""
    tally = _Tally()
    maker = _legacy_maker(url) if rule == "legacy" else None
    for name, password in built.quiet:
        _sign_in(name, password, rule, maker, tally, "sign_in_alone")
    _export(built, rule, maker, tally, "export_alone")
    stop = threading.Event()
    readers = [
        threading.Thread(target=_reader, args=(built, r, tally, stop, settings), name=f"reader-{r}")
        for r in built.readers
    ]
    gate = threading.Barrier(settings.sign_ins + settings.exporters + 1)
    crowd = [
        threading.Thread(target=_signer, args=(built, i, rule, maker, tally, gate), name=f"sign-in-{i}")
        for i in range(settings.sign_ins)
    ] + [
        threading.Thread(target=_exporter, args=(built, rule, maker, tally, settings, gate), name=f"export-{i}")
        for i in range(settings.exporters)
    ]
    began = time.perf_counter()
    for thread in readers + crowd:
        thread.start()
    while sum(len(v) for k, v in tally.millis.items() if k == "record") < len(readers):  # every reader is going
        time.sleep(0.01)
    gate.wait()
    for thread in crowd:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    if maker is not None:
        maker.kw["bind"].dispose()
    return tally, time.perf_counter() - began


def _rows(backend: str, rule: str, tally: _Tally) -> list[Row]:
    failed = Counter(error.split(":", 1)[0] for error in tally.errors)
    rows = []
    for operation in OPERATIONS:
        times = np.asarray(tally.millis.get(operation, []), dtype=float)
        p50, p95 = (round(float(np.percentile(times, q)), 1) for q in (50, 95)) if times.size else (None, None)
        rows.append(
            Row(
                backend=backend,
                rule=rule,
                operation=operation,
                done=int(times.size),
                errors=failed.get(operation, 0),
                p50_ms=p50,
                p95_ms=p95,
                max_ms=round(float(times.max()), 1) if times.size else None,
            )
        )
    return rows


def _table(rows: Sequence[Row]) -> str:
    header = (
        f"{'backend':<11}{'rule':<8}{'operation':<10}{'done':>6}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}"
    )
    lines = [header, "-" * len(header)]

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    for r in rows:
        lines.append(
            f"{r.backend:<11}{r.rule:<8}{r.operation:<10}{r.done:>6}{r.errors:>8}"
            f"{shown(r.p50_ms):>9}{shown(r.p95_ms):>9}{shown(r.max_ms):>9}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    device, began, about = start(1, "cpu")
    about |= {"sqlalchemy": sqlalchemy.__version__, "sqlite": sqlite3.sqlite_version}
    backends = list(settings.backends)
    skipped: dict[str, str] = {}
    if "postgresql" in backends and (reason := postgres_missing()):
        print(reason, flush=True)
        skipped["postgresql"] = reason
        backends.remove("postgresql")
    rows: list[Row] = []
    errors: dict[str, list[str]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for backend in backends:
        for rule in settings.rules:
            with (
                tempfile.TemporaryDirectory(prefix="ioai-bench-concurrency-") as temp,
                fresh_database(backend, Path(temp), workspace=Path(temp)) as url,
            ):
                print(f"{backend}, {rule} rule: building ...", flush=True)
                built = _build(settings)
                tally, seconds = _run(built, rule, url, settings)
                key = f"{backend}/{rule}"
                rows.extend(_rows(backend, rule, tally))
                errors[key] = sorted(Counter(tally.errors).elements())[:50]
                runs[key] = {"seconds": round(seconds, 2), "errors": len(tally.errors)}
                print(f"{key}: {len(tally.errors)} errors in {seconds:.1f} s", flush=True)
                for text, count in Counter(tally.errors).most_common(5):
                    print(f"  {count} x {text}", flush=True)
    print(_table(rows))
    print(
        f"Load: {settings.readers} readers reading, {settings.sign_ins} simultaneous sign-ins, {settings.exporters} "
        f"exporters x {settings.exports} rounds (reads, history, cases, audit log). Goal: 0 errors under the new rule."
    )
    print(f"Total {time.perf_counter() - began:.0f} s.")
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "runs": runs,
        "errors": errors,
        "skipped": skipped,
        "rows": [asdict(row) for row in rows],
    }
    write_results(settings.out, "concurrency", device, settings.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
