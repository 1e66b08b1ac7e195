"""Engines and sessions: one engine per URL, one session per unit of work.

SQLite (the embedded default) gets write-ahead logging, foreign keys and a busy timeout on every connection so
several Streamlit sessions and a CLI can share the file; PostgreSQL goes through the same code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from core.settings import database_url
from db.models import Base

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "get_engine", "init_db", "session_scope"]

SQLITE_BUSY_TIMEOUT_MS = 15_000

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_makers: dict[str, sessionmaker[Session]] = {}


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
    connection.exec_driver_sql("BEGIN")


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
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _engines[url] = engine
            _makers[url] = sessionmaker(engine, expire_on_commit=False)
        return engine


def init_db(url: str | None = None) -> Engine:
    """Create missing tables (idempotent) and return the engine."""
    engine = get_engine(url)
    Base.metadata.create_all(engine)
    return engine


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One transaction: commits when the block ends, rolls back (and re-raises) on any error."""
    get_engine(url)
    maker = _makers[url or database_url()]
    session = maker()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
