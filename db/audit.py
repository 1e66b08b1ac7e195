"""The audit log and write transactions that survive contention.

``log_event`` appends one row in the caller's transaction, so an action and its audit entry land together or not
at all. ``run_transaction`` retries a unit of work that lost a race for the database: SQLite's "database is
locked" (a deferred transaction that read, then wanted to write after another writer committed, gets SQLITE_BUSY at
once, whatever the busy timeout) and PostgreSQL's serialization failures and deadlocks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pandas as pd
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db.models import AuditEvent, User
from db.session import session_scope

__all__ = ["audit_table", "log_event", "run_transaction"]

T = TypeVar("T")
_PG_RETRY_STATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected


def log_event(
    session: Session,
    action: str,
    *,
    user_id: int | None = None,
    username: str | None = None,
    study_id: int | None = None,
    **detail: Any,
) -> None:
    """Append who did what (``action``, with JSON-able ``detail``) to the audit log, in the caller's transaction."""
    session.add(AuditEvent(user_id=user_id, username=username, action=action, study_id=study_id, detail=detail))


def _transient(error: OperationalError) -> bool:
    state = getattr(error.orig, "sqlstate", None)
    if state in _PG_RETRY_STATES:
        return True
    text = str(error.orig).lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def run_transaction(work: Callable[[Session], T], database: str | None = None, attempts: int = 10) -> T:
    """Run ``work(session)`` in its own transaction, retrying (with jittered backoff) when it lost a race."""
    for attempt in range(attempts):
        try:
            with session_scope(database) as session:
                return work(session)
        except OperationalError as error:
            if attempt == attempts - 1 or not _transient(error):
                raise
            time.sleep(random.uniform(0.0, min(0.02 * 2**attempt, 1.0)))
    raise AssertionError("unreachable")


def audit_table(session: Session, study_id: int | None = None, limit: int = 5000) -> pd.DataFrame:
    """The newest audit entries (optionally one study's), with the account name, for the PI's pages."""
    stmt = (
        select(
            AuditEvent.id,
            AuditEvent.at,
            User.username.label("user"),
            AuditEvent.username.label("typed_username"),
            AuditEvent.action,
            AuditEvent.study_id,
            AuditEvent.detail,
        )
        .outerjoin(User, AuditEvent.user_id == User.id)
        .order_by(AuditEvent.id.desc())
        .limit(limit)
    )
    if study_id is not None:
        stmt = stmt.where(AuditEvent.study_id == study_id)
    frame = pd.DataFrame(session.execute(stmt).mappings().all())
    if not frame.empty:
        frame["detail"] = frame["detail"].map(lambda d: ", ".join(f"{k}={v}" for k, v in (d or {}).items()))
    return frame
