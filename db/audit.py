"""The audit log: who did what, when.

``log_event`` appends one row in the caller's transaction, so an action and its audit entry land together or not
at all. The log is append-only and hash-chained (``db.chain``). ``run_transaction`` (the one way the app writes,
``db.session``) is importable from here too, since most writes are an action plus its audit row.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AuditEvent, User
from db.session import reads, run_transaction

__all__ = ["audit_table", "log_event", "run_transaction"]


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


@reads
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
