"""Serving a reader their next case and recording their read: ``python -m bench.reading``.

One blind reader study at the size of a multi-reader trial, on SQLite and on PostgreSQL: ``--readers`` (100) reader
accounts, ``--cases`` (2,000) specimens with an FL and a WL image each, one study with two arms (FL, then WL) over
all of them, every reader invited. The ``reads`` table is pre-filled as the app would have left it: each reader has
answered a random number of cases (0 to all but one of the 2 x cases), always a prefix of their own order
(:func:`core.reading.reader_order`), arm 1 before arm 2, with one ``read_recorded`` audit entry per read, and the
study is frozen. About 200,000 reads at the default sizes.

Each timed request picks a random reader (seeded) and measures, one after the other:

- ``serve_sql``: ``services.studies.reader_state`` in its own read-only transaction, as the reading page calls it:
  the SQL (and the Python around it) that decides which case the reader gets;
- ``encode``: ``services.studies.case_png`` on the served image, the decoding, display rendering and PNG encoding
  of what the browser receives, for every ``--image-size`` (the database points at the first; the other sizes are
  synthetic specimens drawn from the same seeds at that size);
- ``serve``: the two added up, per request: the time to serve the next case;
- ``record``: ``services.studies.record_read`` for that case, its own transaction as the reading page's form
  submit runs it (it re-checks the case through ``reader_state``, inserts the read and its audit entry, commits).

After ``--warmup`` untimed requests, ``--requests`` timed ones; the table gives p50 and p95 in milliseconds per
backend, the median number of SQL statements per call (on SQLite with the ``BEGIN`` the engine sends), and the
share of the serve time spent in SQL. The images are synthetic specimens (:mod:`core.data.synth`), ``--images`` of
each modality stored in a temporary workspace as the importer stores them (content-addressed PNG: 16-bit grey FL,
8-bit RGB WL); the 4,000 image rows point at them in turn. PostgreSQL is a throwaway server (``tests/postgres.py``:
Debian's binaries, ``fsync=off``), analysed after the bulk load as autovacuum would; without its binaries the
benchmark says so and measures SQLite only. Results go to ``bench/results/reading-cpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import random
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy
from sqlalchemy import Engine, event, insert, select, text, update
from sqlalchemy.orm import Session

from bench.databases import BACKENDS, fresh_database, postgres_missing
from bench.diagnosis import start, usable_cores, write_results
from core.data.io import read_image
from core.data.store import store_image
from core.data.synth import CohortConfig, make_specimen
from core.reading import reader_order
from db.chain import link_rows
from db.models import ArmCase, AuditEvent, Label, Patient, Read, Specimen, SpecimenImage, Study, StudyCase, User, utcnow
from db.session import get_engine, init_db, session_scope
from services.studies import ArmSpec, case_png, create_study, reader_state, record_read

__all__ = ["BACKENDS", "MEASUREMENTS", "Row", "Settings", "main", "parse_args"]

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = (ArmSpec("FL", "FL"), ArmSpec("WL", "WL"))
MEASUREMENTS: dict[str, str] = {
    "serve_sql": "serve: reader_state (SQL)",
    "encode": "serve: case_png (encode)",
    "encode_cached": "serve: case_png (rendered ahead)",
    "serve": "serve: total",
    "serve_cached": "serve: total, rendered ahead",
    "record": "record_read",
}
GOAL_MS = 100.0  # the goal for p95
_PLACEHOLDER_HASH = "!bench-reader-cannot-sign-in"  # not an Argon2 hash: these accounts never sign in
_SPECIMENS_PER_PATIENT = 100
_CHUNK = 10_000


@dataclass(frozen=True)
class Settings:
    """What one run measures (``--quick`` shrinks every size)."""

    readers: int
    cases: int
    requests: int
    warmup: int
    backends: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]
    images: int
    seed: int
    out: Path
    quick: bool


@dataclass(frozen=True)
class Row:
    """One measurement on one backend; ``image`` is the rendered size (``HxW``) for the image-dependent ones."""

    backend: str
    measurement: str
    label: str
    image: str | None
    requests: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    max_ms: float
    statements: float | None  # median SQL statements per call
    sql_share: float | None  # serve rows: total SQL time / total serve time


@dataclass
class _Samples:
    """Per-request timings (ms) of one backend, and the SQL statements each call issued."""

    serve_sql: list[float] = field(default_factory=list)
    encode: dict[str, list[float]] = field(default_factory=dict)
    encode_cached: dict[str, list[float]] = field(default_factory=dict)
    record: list[float] = field(default_factory=list)
    serve_statements: list[int] = field(default_factory=list)
    record_statements: list[int] = field(default_factory=list)


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"image size {text!r}: expected HEIGHTxWIDTH, e.g. 256x320") from error
    if min(height, width) < 16:
        raise argparse.ArgumentTypeError(f"image size {text!r}: at least 16 px a side")
    return height, width


def _label(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags to :class:`Settings`."""
    parser = argparse.ArgumentParser(prog="python -m bench.reading", description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=100, help="invited reader accounts (100)")
    parser.add_argument("--cases", type=int, default=2000, help="study cases, each read in both arms (2000)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per backend (300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests first, per backend (20)")
    parser.add_argument("--backend", choices=[*BACKENDS, "both"], default="both", help="database(s) to measure (both)")
    parser.add_argument(
        "--image-size",
        type=_size,
        nargs="+",
        default=[(256, 320), (1024, 1280)],
        help="specimen photo sizes HxW to render; the database points at the first (256x320 1024x1280)",
    )
    parser.add_argument("--images", type=int, default=8, help="distinct synthetic specimens stored per modality (8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the progress, answers and request order (0)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results (bench/results)")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: 3 readers, 20 cases, 10 requests")
    args = parser.parse_args(argv)
    if min(args.readers, args.cases, args.requests, args.images) < 1 or args.warmup < 0:
        parser.error("readers, cases, requests and images must be positive, warmup not negative")
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    sizes = tuple(dict.fromkeys(args.image_size))
    if args.quick:
        return Settings(3, 20, 10, 2, backends, ((64, 80),), 2, args.seed, args.out, True)
    return Settings(
        args.readers, args.cases, args.requests, args.warmup, backends, sizes, args.images, args.seed, args.out, False
    )


# ------------------------------------------------------------------------------------------------------ set-up


@contextlib.contextmanager
def _workspace(root: Path) -> Iterator[Path]:
    """Point ``IOAI_WORKSPACE`` (where ``case_png`` reads stored images) at ``root`` for the block."""
    before = os.environ.get("IOAI_WORKSPACE")
    os.environ["IOAI_WORKSPACE"] = str(root)
    try:
        yield root
    finally:
        if before is None:
            os.environ.pop("IOAI_WORKSPACE", None)
        else:
            os.environ["IOAI_WORKSPACE"] = before


def _store_images(root: Path, settings: Settings) -> dict[str, dict[str, list[str]]]:
    """``--images`` synthetic specimens per size, stored as the importer stores them: size -> modality -> paths
    (the same seeds, in the same order, at every size)."""
    stored: dict[str, dict[str, list[str]]] = {}
    for size in settings.image_sizes:
        config = CohortConfig(height=size[0], width=size[1])
        paths: dict[str, list[str]] = {"FL": [], "WL": []}
        for i in range(settings.images):
            tumor = i % 2 == 0
            specimen = make_specimen(
                np.random.default_rng(i), tumor, "GBM" if tumor else None, ">=10" if tumor else None, config
            )
            for modality, array in (("FL", specimen.fl), ("WL", specimen.wl)):
                paths[modality].append(store_image(read_image(array, f"{modality}.png"), root).path)
        stored[_label(size)] = paths
    return stored


def _ids(session: Session, model: Any, rows: list[dict[str, Any]]) -> list[int]:
    """Bulk-insert ``rows`` of ``model`` and return their new ids in the order given."""
    return list(session.scalars(insert(model).returning(model.id, sort_by_parameter_order=True), rows))


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for begin in range(0, len(rows), _CHUNK):
        yield rows[begin : begin + _CHUNK]


def _build(url: str, settings: Settings, images: dict[str, list[str]], first: tuple[int, int]) -> dict[str, Any]:
    """Create the schema, accounts, specimens, the study and the pre-filled reads; returns the ids and counts."""
    init_db(url)
    rng = np.random.default_rng(settings.seed)
    with session_scope(url) as session:
        users = [{"username": "pi", "display_name": "PI", "role": "pi", "password_hash": _PLACEHOLDER_HASH}]
        users += [
            {
                "username": f"reader{i:03d}",
                "display_name": f"Reader {i}",
                "role": "reader",
                "password_hash": _PLACEHOLDER_HASH,
            }
            for i in range(1, settings.readers + 1)
        ]
        pi, *readers = _ids(session, User, users)
        n_patients = math.ceil(settings.cases / _SPECIMENS_PER_PATIENT)
        patients = _ids(session, Patient, [{"code": f"P{p:03d}"} for p in range(n_patients)])
        patient_of = [patients[i // _SPECIMENS_PER_PATIENT] for i in range(settings.cases)]
        specimens = _ids(
            session,
            Specimen,
            [{"code": f"S{i:05d}", "patient_id": patient, "split": "test"} for i, patient in enumerate(patient_of)],
        )
        labels = [{"specimen_id": s, "tumor": bool(i % 3), "source": "bench"} for i, s in enumerate(specimens)]
        session.execute(insert(Label), labels)
        image_rows = []
        for i, specimen_id in enumerate(specimens):
            for modality, paths in images.items():
                path = paths[i % len(paths)]
                image_rows.append(
                    {
                        "specimen_id": specimen_id,
                        "modality": modality,
                        "path": path,
                        "sha256": Path(path).stem,
                        "height": first[0],
                        "width": first[1],
                    }
                )
        session.execute(insert(SpecimenImage), image_rows)
        study = create_study(
            session,
            title="Benchmark: FL then WL",
            task="tumor",
            specimen_ids=specimens,
            arms=ARMS,
            reader_ids=readers,
            created_by=pi,
        )
        case_ids = list(session.scalars(select(StudyCase.id).where(StudyCase.study_id == study.id)))
        tokens = {
            (arm_id, case_id): token
            for arm_id, case_id, token in session.execute(
                select(ArmCase.arm_id, ArmCase.case_id, ArmCase.token).where(ArmCase.case_id.in_(case_ids))
            )
        }
        reads, audit, first_read = _prefill(rng, study.id, [a.id for a in study.arms], readers, case_ids, tokens)
        for chunk in _chunks(reads):  # Core inserts skip mapper events: link the rows into their chains here
            session.execute(insert(Read), link_rows(session.connection(), Read, chunk))
        for chunk in _chunks(audit):
            session.execute(insert(AuditEvent), link_rows(session.connection(), AuditEvent, chunk))
        if first_read is not None:
            session.execute(update(Study).where(Study.id == study.id).values(frozen_at=first_read))
    return {"study_id": study.id, "readers": readers, "reads": len(reads), "audit_events": len(audit) + 1}


def _prefill(
    rng: np.random.Generator,
    study_id: int,
    arm_ids: list[int],
    readers: list[int],
    case_ids: list[int],
    tokens: dict[tuple[int, int], str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Any]:
    """Reads (and their audit entries) as readers at random progress would have left them: a prefix of each
    reader's order in arm 1, then in arm 2, at least one case still to read."""
    n = len(case_ids)
    begin = utcnow() - timedelta(days=30)
    reads: list[dict[str, Any]] = []
    audit: list[dict[str, Any]] = []
    for reader_id in readers:
        answered = int(rng.integers(0, len(arm_ids) * n))
        moment = begin + timedelta(minutes=float(rng.uniform(0, 60)))
        for position, arm_id in enumerate(arm_ids):
            count = min(n, max(0, answered - position * n))
            order = reader_order(case_ids, study_id, reader_id, arm_id)[:count]
            durations = rng.uniform(3.0, 40.0, count)
            labels = rng.integers(0, 2, count)
            ratings = rng.integers(1, 6, count)
            for case_id, duration, label, rating in zip(order, durations, labels, ratings, strict=True):
                shown = moment
                moment = shown + timedelta(seconds=float(duration))
                reads.append(
                    {
                        "study_id": study_id,
                        "arm_id": arm_id,
                        "case_id": case_id,
                        "reader_id": reader_id,
                        "version": 1,
                        "label": int(label),
                        "rating": int(rating),
                        "shown_at": shown,
                        "answered_at": moment,
                        "duration_s": float(duration),
                        "source": "browser",
                    }
                )
                detail = {"arm": ARMS[position].name, "case": tokens[(arm_id, case_id)], "version": 1}
                audit.append(
                    {
                        "at": moment,
                        "user_id": reader_id,
                        "action": "read_recorded",
                        "study_id": study_id,
                        "detail": detail,
                    }
                )
    first = min((r["answered_at"] for r in reads), default=None)
    return reads, audit, first


# ------------------------------------------------------------------------------------------------- measuring


class _Statements:
    """Counts the SQL statements an engine sends while attached."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.count = engine, 0

    def _seen(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> _Statements:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: Any) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def _serve(url: str, study_id: int, reader_id: int) -> tuple[Any, float]:
    """``reader_state`` in its own read-only transaction, as the reading page calls it, and its milliseconds."""
    began = time.perf_counter()
    state = reader_state(study_id, reader_id)
    return state, (time.perf_counter() - began) * 1000.0


def _encode(image_path: str, modality: str) -> tuple[float, float]:
    """Milliseconds of ``case_png`` on one stored image: rendered from the file (the cache bypassed), and served
    from the case cache as the reading page leaves it after rendering the reader's next cases ahead."""
    began = time.perf_counter()
    case_png(image_path, modality, cache=False)
    cold = (time.perf_counter() - began) * 1000.0
    case_png(image_path, modality)  # fills the cache, as the page's read-ahead thread does
    began = time.perf_counter()
    case_png(image_path, modality)
    return cold, (time.perf_counter() - began) * 1000.0


def _record(url: str, study_id: int, reader_id: int, case: Any, chooser: random.Random) -> float:
    """Milliseconds of ``record_read`` for the case just served (a random answer)."""
    shown_at = utcnow()
    began = time.perf_counter()
    result = record_read(
        study_id=study_id,
        reader_id=reader_id,
        arm_id=case.arm_id,
        token=case.token,
        label=chooser.randrange(2),
        rating=chooser.randint(1, 5),
        shown_at=shown_at,
    )
    elapsed = (time.perf_counter() - began) * 1000.0
    if result.status != "recorded":
        raise RuntimeError(f"record_read answered {result.status!r} for a freshly served case")
    return elapsed


def _next_case(
    url: str, study_id: int, pool: list[int], chooser: random.Random, statements: _Statements
) -> tuple[int, Any, float, int]:
    """Serve a random reader from ``pool`` (dropping those who have read everything): the reader, their case, the
    serve milliseconds and the SQL statements it took."""
    while pool:
        reader_id = chooser.choice(pool)
        statements.count = 0
        state, sql_ms = _serve(url, study_id, reader_id)
        if state.kind == "case":
            return reader_id, state.case, sql_ms, statements.count
        pool.remove(reader_id)
    raise RuntimeError("every reader has finished the study: ask for fewer --requests")


def _measure(
    url: str, built: dict[str, Any], settings: Settings, translate: dict[str, dict[str, str]]
) -> tuple[_Samples, int]:
    """Warm-up, then the timed requests over random readers; returns the samples and the readers who finished."""
    study_id = built["study_id"]
    pool = list(built["readers"])
    chooser = random.Random(settings.seed)
    samples = _Samples(encode={size: [] for size in translate}, encode_cached={size: [] for size in translate})
    with _Statements(get_engine(url)) as statements:
        for request in range(settings.warmup + settings.requests):
            reader_id, case, sql_ms, served = _next_case(url, study_id, pool, chooser, statements)
            encoded = {size: _encode(paths[case.image_path], case.modality) for size, paths in translate.items()}
            statements.count = 0
            record_ms = _record(url, study_id, reader_id, case, chooser)
            if request >= settings.warmup:
                samples.serve_sql.append(sql_ms)
                samples.serve_statements.append(served)
                for size, (cold, cached) in encoded.items():
                    samples.encode[size].append(cold)
                    samples.encode_cached[size].append(cached)
                samples.record.append(record_ms)
                samples.record_statements.append(statements.count)
    return samples, len(built["readers"]) - len(pool)


def _row(
    backend: str,
    name: str,
    values: Sequence[float],
    image: str | None = None,
    statements: Sequence[int] | None = None,
    sql_share: float | None = None,
) -> Row:
    return Row(
        backend=backend,
        measurement=name,
        label=MEASUREMENTS[name],
        image=image,
        requests=len(values),
        p50_ms=float(np.percentile(values, 50)),
        p95_ms=float(np.percentile(values, 95)),
        mean_ms=float(np.mean(values)),
        max_ms=float(np.max(values)),
        statements=None if statements is None else float(np.median(statements)),
        sql_share=sql_share,
    )


def _rows(backend: str, samples: _Samples) -> list[Row]:
    sql = np.asarray(samples.serve_sql)
    rows = [_row(backend, "serve_sql", sql, statements=samples.serve_statements)]
    for name, encodes in (("encode", samples.encode), ("encode_cached", samples.encode_cached)):
        for size, encode in encodes.items():
            rows.append(_row(backend, name, encode, image=size))
    for name, encodes in (("serve", samples.encode), ("serve_cached", samples.encode_cached)):
        for size, encode in encodes.items():
            total = sql + np.asarray(encode)
            rows.append(_row(backend, name, total, image=size, sql_share=float(sql.sum() / total.sum())))
    rows.append(_row(backend, "record", samples.record, statements=samples.record_statements))
    return rows


def _server_version(url: str) -> str:
    with session_scope(url) as session:
        if url.startswith("sqlite"):
            return f"SQLite {sqlite3.sqlite_version}"
        return f"PostgreSQL {session.scalar(text('SHOW server_version'))}"


def _backend(
    backend: str, folder: Path, settings: Settings, stored: dict[str, dict[str, list[str]]]
) -> tuple[dict[str, Any], list[Row]]:
    """Build, measure and describe one backend."""
    first = settings.image_sizes[0]
    served = stored[_label(first)]
    translate = {
        size: {served[modality][i]: path for modality in ("FL", "WL") for i, path in enumerate(paths[modality])}
        for size, paths in stored.items()
    }
    with fresh_database(backend, folder) as url:
        began = time.perf_counter()
        built = _build(url, settings, served, first)
        if backend == "postgresql":
            with get_engine(url).connect() as connection:  # what autovacuum would do after a bulk load
                connection.execute(text("ANALYZE"))
                connection.commit()
        setup = time.perf_counter() - began
        print(
            f"{backend}: {settings.readers} readers, {settings.cases} cases x {len(ARMS)} arms, "
            f"{built['reads']:,} reads pre-filled in {setup:.1f} s; measuring {settings.requests} requests ...",
            flush=True,
        )
        gc.collect()  # the set-up's garbage, so that its collection does not land in a timed request
        collections = gc.get_stats()[2]["collections"]
        began = time.perf_counter()
        samples, finished = _measure(url, built, settings, translate)
        about = {
            "server": _server_version(url),
            "setup_seconds": setup,
            "measure_seconds": time.perf_counter() - began,
            "reads_prefilled": built["reads"],
            "audit_events_prefilled": built["audit_events"],
            "readers_finished": finished,
            "full_gc_while_measuring": gc.get_stats()[2]["collections"] - collections,
            "analyzed": backend == "postgresql",
        }
    print(
        f"{backend}: {about['server']}, {settings.requests} requests in {about['measure_seconds']:.0f} s, "
        f"{about['full_gc_while_measuring']} full garbage collection(s) meanwhile",
        flush=True,
    )
    return about, _rows(backend, samples)


def _table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table for the terminal."""
    frame = pd.DataFrame([asdict(row) for row in rows])
    frame["image"] = frame["image"].fillna("")
    frame["statements"] = ["" if v is None or math.isnan(v) else f"{v:g}" for v in frame["statements"]]
    frame["sql_share"] = ["" if v is None or math.isnan(v) else f"{v:.0%}" for v in frame["sql_share"]]
    frame = frame[["backend", "label", "image", "requests", "p50_ms", "p95_ms", "max_ms", "statements", "sql_share"]]
    frame.columns = ["backend", "measurement", "image", "requests", "p50 ms", "p95 ms", "max ms", "SQL stmts", "SQL %"]
    return frame.to_string(
        index=False,
        formatters={"p50 ms": "{:,.1f}".format, "p95 ms": "{:,.1f}".format, "max ms": "{:,.1f}".format},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the machine and the table, write the JSON; returns the exit status."""
    settings = parse_args(argv)
    device, began, about = start(usable_cores(), "cpu")
    about |= {"sqlalchemy": sqlalchemy.__version__, "sqlite": sqlite3.sqlite_version}
    backends = list(settings.backends)
    skipped: dict[str, str] = {}
    if "postgresql" in backends and (reason := postgres_missing()):
        print(reason, flush=True)
        skipped["postgresql"] = reason
        backends.remove("postgresql")
    databases: dict[str, Any] = {}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ioai-bench-reading-") as temp:
        folder = Path(temp)
        with _workspace(folder / "workspace") as root:
            print(f"storing {settings.images} synthetic specimens per size and modality ...", flush=True)
            stored = _store_images(root, settings)
            for backend in backends:
                databases[backend], measured = _backend(backend, folder, settings, stored)
                rows.extend(measured)
    seconds = time.perf_counter() - began
    print(_table(rows))
    print(
        "serve: reader_state + case_png, per request. SQL %: the serve time spent in reader_state. "
        f"Goal: p95 below {GOAL_MS:.0f} ms for serve and for record_read."
    )
    print(f"Total {seconds:.0f} s.")
    document = {
        "machine": about,
        "settings": {**asdict(settings), "out": str(settings.out)},
        "goal_p95_ms": GOAL_MS,
        "databases": databases,
        "skipped": skipped,
        "seconds": seconds,
        "rows": [asdict(row) for row in rows],
    }
    write_results(settings.out, "reading", device, settings.quick, document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
