"""Engines and sessions: one engine per URL, and every transaction declared a read or a write.

One rule for every caller, so "database is locked" cannot come back through a new page or command:

- **A write starts as a writer.** On SQLite a write transaction begins with ``BEGIN IMMEDIATE``: it takes the write
  lock before it reads anything, so it never reads a snapshot, finds that another writer committed meanwhile and
  fails at its first write (SQLite's ``SQLITE_BUSY_SNAPSHOT``, which no busy timeout helps); writers queue on the
  busy timeout instead. :func:`run_transaction` runs a unit of work as such a transaction and retries it, with
  jittered backoff, when it still lost a race (the busy timeout ran out; PostgreSQL serialization failures and
  deadlocks). Every write from the app goes through it.
- **A read never upgrades.** :func:`read_scope` is a read-only transaction (SQLite ``PRAGMA query_only``,
  PostgreSQL ``READ ONLY``): a write slipped into a read fails at once, in a test, instead of racing in production.
- :func:`session_scope` is a write transaction without the retry, for scripts, the CLI and tests that build data.
- Use cases say which they are: a ``services`` function decorated :func:`reads` or :func:`writes` takes a session
  first; called with one, it joins the caller's transaction (so use cases compose); called without, it runs as its
  own read-only or retried write transaction. Pages call use cases without a session and never open one.

SQLite (the embedded default) also gets write-ahead logging (readers never wait for the writer), foreign keys and a
busy timeout on every connection, so several Streamlit sessions and a CLI share the file; PostgreSQL goes through
the same code. :func:`init_db` brings the schema to the newest migration (``db/migrations``).
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.settings import database_url
from db.chain import track_transactions

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "get_engine",
    "init_db",
    "read_scope",
    "reads",
    "run_transaction",
    "session_scope",
    "writes",
]

T = TypeVar("T")
P = ParamSpec("P")
SQLITE_BUSY_TIMEOUT_MS = 15_000
_MODE = "ioai_transaction"  # execution option: "read" or "write" (the default)
_PG_RETRY_STATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_makers: dict[str, dict[str, sessionmaker[Session]]] = {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling breaks SAVEPOINT; let SQLAlchemy emit BEGIN itself (SQLAlchemy docs,
    # "Serializable isolation / Savepoints / Transactional DDL").
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    if connection.get_execution_options().get(_MODE) == "read":
        connection.exec_driver_sql("PRAGMA query_only=ON")
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("PRAGMA query_only=OFF")
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: the workspace database), created once."""
    url = url or database_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
                event.listen(engine, "connect", _sqlite_pragmas)
                event.listen(engine, "begin", _sqlite_begin)
                reader = engine.execution_options(**{_MODE: "read"})
            else:
                engine = create_engine(url, pool_pre_ping=True)
                reader = engine.execution_options(**{_MODE: "read"}, postgresql_readonly=True)
            track_transactions(engine)
            _engines[url] = engine
            _makers[url] = {
                "write": sessionmaker(engine, expire_on_commit=False),
                "read": sessionmaker(reader, expire_on_commit=False),
            }
        return engine


def init_db(url: str | None = None) -> Engine:
    """Bring the database to the newest schema (``db.migrate``); when it is there already, one read-only query."""
    from db.migrate import head_revision, revision_of, upgrade  # Alembic loads only when a database is opened

    engine = get_engine(url)
    with read_scope(url) as session:
        current = revision_of(session.connection())
    if current != head_revision():
        upgrade(engine)
    return engine


@contextmanager
def _scope(url: str | None, mode: str) -> Iterator[Session]:
    url = url or database_url()
    get_engine(url)
    session = _makers[url][mode]()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One write transaction (SQLite: ``BEGIN IMMEDIATE``): commits when the block ends, rolls back (and re-raises)
    on any error. Not retried: the app writes through :func:`run_transaction`."""
    with _scope(url, "write") as session:
        yield session


@contextmanager
def read_scope(url: str | None = None) -> Iterator[Session]:
    """One read-only transaction: any write inside it fails."""
    with _scope(url, "read") as session:
        yield session


def _transient(error: OperationalError) -> bool:
    state = getattr(error.orig, "sqlstate", None)
    if state in _PG_RETRY_STATES:
        return True
    text = str(error.orig).lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def run_transaction(work: Callable[[Session], T], attempts: int = 10) -> T:
    """Run ``work(session)`` as one write transaction, retried (with jittered backoff) when it lost a race for the
    database; ``work`` must be safe to run again (it is, when it only talks to the session)."""
    for attempt in range(attempts):
        try:
            with session_scope() as session:
                return work(session)
        except OperationalError as error:
            if attempt == attempts - 1 or not _transient(error):
                raise
            time.sleep(random.uniform(0.0, min(0.02 * 2**attempt, 1.0)))
    raise AssertionError("unreachable")


def reads(use_case: Callable[Concatenate[Session, P], T]) -> Callable[..., T]:
    """A use case that only reads: in the caller's session when given one first, else in its own read-only
    transaction."""

    @functools.wraps(use_case)
    def run(*args: Any, **kwargs: Any) -> T:
        if args and isinstance(args[0], Session):
            return use_case(*args, **kwargs)
        with read_scope() as session:
            return use_case(session, *args, **kwargs)

    return run


def writes(use_case: Callable[Concatenate[Session, P], T]) -> Callable[..., T]:
    """A use case that writes: in the caller's session when given one first, else as its own write transaction,
    retried when it lost a race (:func:`run_transaction`)."""

    @functools.wraps(use_case)
    def run(*args: Any, **kwargs: Any) -> T:
        if args and isinstance(args[0], Session):
            return use_case(*args, **kwargs)
        return run_transaction(lambda session: use_case(session, *args, **kwargs))

    return run
