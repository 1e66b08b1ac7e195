"""Reads and the audit log: append-only in the database, tamper-evident by a hash chain.

**Append-only.** Triggers refuse every ``UPDATE`` and ``DELETE`` of ``reads``, ``annotations`` and ``audit_log``
(and ``TRUNCATE`` on PostgreSQL), whoever sends it: the app, a script, or a person at an SQL prompt. A correction is
a new read version; nothing is ever rewritten.

**Tamper-evident.** Each row carries ``row_hash = sha256(previous row's row_hash + "\\n" + the row's content)``, in
insertion (id) order, one chain per table, set when the row is inserted (a mapper event, so every way of adding a
row is covered). Changing, deleting or inserting a row anywhere but at the end, even with the triggers dropped,
breaks the chain from that row on; :func:`verify` walks both chains and names the first broken row
(``python -m core audit verify``). Rewriting a whole chain from some row on is detectable only against a head
recorded earlier, which is why ``verify`` prints the head and checks one you give it.

The content of a row is its columns other than ``id`` and ``row_hash``, as canonical JSON (sorted keys, times in
UTC ISO 8601 with microseconds). Appending takes a per-chain lock for the rest of the transaction: SQLite's write
transactions already exclude each other (``BEGIN IMMEDIATE``); on PostgreSQL an advisory transaction lock does.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Connection, Engine, Table, event, select, text
from sqlalchemy.orm import Session

from db.models import Annotation, AuditEvent, Read

__all__ = [
    "CHAINED",
    "GENESIS",
    "ChainReport",
    "append_only_ddl",
    "chain_rows",
    "link_rows",
    "row_hash",
    "verify",
]

GENESIS = "0" * 64
CHAINED: dict[str, type] = {"audit_log": AuditEvent, "reads": Read, "annotations": Annotation}
_CACHE = "ioai_chain_heads"  # connection.info key: table -> the last row_hash appended in this transaction


def _canonical(column: Column[Any], value: Any) -> Any:
    """A column's value as it reads back from any backend: by the column's Python type, times in UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    kind = column.type.python_type
    if kind in (bool, int, float, str):
        return kind(value)
    return value  # JSON


def _content(table: Table, values: dict[str, Any]) -> str:
    fields = {c.name: _canonical(c, values.get(c.name)) for c in table.columns if c.name not in ("id", "row_hash")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def row_hash(previous: str, table: Table, values: dict[str, Any]) -> str:
    """The chain link of one row: sha256 of the previous link and the row's canonical content."""
    return hashlib.sha256(f"{previous}\n{_content(table, values)}".encode()).hexdigest()


def _head(connection: Connection, table: Table) -> str:
    """The last link of ``table``'s chain, locking the chain until this transaction ends (PostgreSQL)."""
    heads = connection.info.setdefault(_CACHE, {})
    if table.name not in heads:
        if connection.dialect.name == "postgresql":
            key = zlib.crc32(f"ioai-chain-{table.name}".encode())
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        last = connection.execute(
            select(table.c.row_hash).where(table.c.row_hash.is_not(None)).order_by(table.c.id.desc()).limit(1)
        ).scalar()
        heads[table.name] = last or GENESIS
    return heads[table.name]


def _with_defaults(table: Table, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the columns' Python-side defaults filled in: they are applied at INSERT, after the hash."""
    for column in table.columns:
        if values.get(column.name) is None and column.default is not None and column.name not in ("id", "row_hash"):
            default = column.default
            values[column.name] = default.arg(None) if default.is_callable else default.arg
    return values


def _append(connection: Connection, table: Table, values: dict[str, Any]) -> str:
    link = row_hash(_head(connection, table), table, values)
    connection.info[_CACHE][table.name] = link
    return link


def _link(_mapper: Any, connection: Connection, target: Any) -> None:
    table = target.__table__
    values = _with_defaults(table, {c.name: getattr(target, c.key, None) for c in table.columns})
    for column in table.columns:
        if column.name not in ("id", "row_hash"):
            setattr(target, column.key, values[column.name])
    target.row_hash = _append(connection, table, values)


def link_rows(connection: Connection, model: type, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows about to be bulk-inserted with Core (``insert(model)``, which skips mapper events), defaults filled in
    and linked into the chain in the order given; insert them in that order in this transaction."""
    table = model.__table__
    for row in rows:
        _with_defaults(table, row)
        row["row_hash"] = _append(connection, table, row)
    return rows


def _forget(connection: Connection, *_args: Any) -> None:
    connection.info.pop(_CACHE, None)


for _model in CHAINED.values():
    event.listen(_model, "before_insert", _link)


def track_transactions(engine: Engine) -> None:
    """Forget cached chain heads whenever a transaction or savepoint ends, so a rolled-back row never becomes the
    previous link of the next one (``db.session`` calls this for every engine)."""
    for name in ("begin", "commit", "rollback", "rollback_savepoint"):
        event.listen(engine, name, _forget)


def append_only_ddl(dialect: str, table: str) -> list[str]:
    """The statements that make ``table`` append-only on ``dialect`` (sqlite or postgresql)."""
    message = f"{table} is append-only: rows are never changed or deleted"
    if dialect == "sqlite":
        return [
            f"CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            for verb in ("UPDATE", "DELETE")
        ]
    if dialect == "postgresql":
        return [
            "CREATE OR REPLACE FUNCTION ioai_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only: rows are never changed or deleted'; "
            "END $$",
            f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}",
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION ioai_append_only()",
            f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION ioai_append_only()",
        ]
    raise ValueError(f"append-only triggers are written for sqlite and postgresql, not {dialect}")


def create_append_only_triggers(connection: Connection) -> None:
    for table in CHAINED:
        for statement in append_only_ddl(connection.dialect.name, table):
            connection.exec_driver_sql(statement)


def chain_rows(connection: Connection, table_name: str, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """Every row of a chained table in id order, as column -> value (types as the ORM reads them)."""
    table = CHAINED[table_name].__table__
    last = 0
    while True:
        rows = connection.execute(select(table).where(table.c.id > last).order_by(table.c.id).limit(batch)).all()
        if not rows:
            return
        for row in rows:
            yield dict(row._mapping)
        last = rows[-1].id


@dataclass(frozen=True)
class ChainReport:
    table: str
    rows: int
    head: str
    broken_at: int | None = None  # the id of the first row whose link does not match
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify(session: Session) -> list[ChainReport]:
    """Walk every chain from its start; one report per table (``ok``, rows, head, or the first broken row)."""
    reports = []
    connection = session.connection()
    for name, model in CHAINED.items():
        table = model.__table__
        previous, count, broken, reason = GENESIS, 0, None, ""
        for values in chain_rows(connection, name):
            count += 1
            expected = row_hash(previous, table, values)
            if broken is None and values["row_hash"] != expected:
                broken = values["id"]
                reason = (
                    "row has no hash (written around the application)"
                    if values["row_hash"] is None
                    else "hash does not match its content and the row before it (changed, deleted or inserted "
                    "out of order)"
                )
            previous = values["row_hash"] or expected
        reports.append(ChainReport(name, count, previous, broken, reason))
    return reports
