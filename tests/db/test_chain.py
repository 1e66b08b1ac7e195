"""Reads and the audit log are append-only (triggers) and tamper-evident (hash chains walked by ``audit verify``),
on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from db import chain, repo
from db.audit import log_event
from db.models import AuditEvent, User
from db.session import get_engine, init_db, read_scope, run_transaction, session_scope
from services import studies
from services.cli import main
from services.studies import ArmSpec
from tests.postgres import reset_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, workspace, monkeypatch):
    if request.param == "sqlite":
        url = f"sqlite:///{workspace / 'study.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        reset_database(url)
        monkeypatch.setenv("IOAI_DATABASE_URL", url)
    init_db(url)
    return url


def _study_with_reads(url: str, n: int = 3) -> tuple[int, int]:
    """A one-arm study of ``n`` specimens, answered by one reader; returns (study id, reader id)."""
    with session_scope(url) as s:
        reader = repo.create_user(s, "r1", "r1-password-long", "reader").id
        ids = []
        for i in range(n):
            sid = repo.add_specimen(s, "P1", f"S{i}", split="test", tumor=bool(i % 2))
            repo.add_specimen_image(s, sid, "FL", f"images/{i}.png", f"{i:064d}", 8, 8)
            ids.append(sid)
        study = studies.create_study(s, title="T", task="tumor", specimen_ids=ids, arms=[ArmSpec("FL", "FL")],
                                     reader_ids=[reader])  # fmt: skip
    for _ in range(n):
        with read_scope(url) as s:
            case = studies.reader_state(s, study.id, reader).case
        studies.record_read(study_id=study.id, reader_id=reader, arm_id=case.arm_id, token=case.token, label=1,
                            rating=3)  # fmt: skip
    return study.id, reader


def _verify(url: str) -> dict[str, chain.ChainReport]:
    with read_scope(url) as s:
        return {r.table: r for r in chain.verify(s)}


def test_rows_added_every_way_form_intact_chains(url):
    _study_with_reads(url)
    with session_scope(url) as s:  # Core bulk inserts skip mapper events: link_rows links them
        user = s.scalar(select(User.id))
        rows = [{"action": "bulk", "user_id": user, "detail": {"n": i}} for i in range(3)]
        s.execute(insert(AuditEvent), chain.link_rows(s.connection(), AuditEvent, rows))
    reports = _verify(url)
    assert reports["reads"].ok and reports["reads"].rows == 3
    assert reports["audit_log"].ok and reports["audit_log"].rows == 1 + 3 + 3  # created, 3 recorded, 3 bulk
    assert len(reports["reads"].head) == 64 and reports["reads"].head != chain.GENESIS


@pytest.mark.parametrize("statement", ["UPDATE reads SET label = 0", "DELETE FROM reads",
                                       "UPDATE audit_log SET action = 'x'", "DELETE FROM audit_log"])  # fmt: skip
def test_reads_and_the_audit_log_refuse_changes_and_deletions(url, statement):
    _study_with_reads(url, n=1)
    with pytest.raises((IntegrityError, DBAPIError), match="append-only"), session_scope(url) as s:
        s.execute(text(statement))
    assert all(r.ok for r in _verify(url).values())


def test_truncate_is_refused_on_postgresql(postgres_url, workspace, monkeypatch):
    """SQLite has no TRUNCATE (its DELETE is refused above); PostgreSQL's skips row triggers, so it has its own."""
    reset_database(postgres_url)
    monkeypatch.setenv("IOAI_DATABASE_URL", postgres_url)
    init_db(postgres_url)
    url = postgres_url
    _study_with_reads(url, n=1)
    with pytest.raises(DBAPIError, match="append-only"), session_scope(url) as s:
        s.execute(text("TRUNCATE reads CASCADE"))


def _without_triggers(url: str, statement: str) -> None:
    """What someone with the database file and an SQL prompt could do: drop the triggers, then edit."""
    with get_engine(url).begin() as connection:
        if connection.dialect.name == "sqlite":
            for name in ("reads", "audit_log"):
                connection.exec_driver_sql(f"DROP TRIGGER {name}_no_update")
                connection.exec_driver_sql(f"DROP TRIGGER {name}_no_delete")
        else:
            for name in ("reads", "audit_log"):
                connection.exec_driver_sql(f"DROP TRIGGER {name}_append_only ON {name}")
        connection.exec_driver_sql(statement)


@pytest.mark.parametrize(
    ("statement", "table", "broken"),
    [
        ("UPDATE reads SET label = 0 WHERE id = 2", "reads", 2),
        ("DELETE FROM reads WHERE id = 2", "reads", 3),
        ("UPDATE audit_log SET detail = '{}' WHERE id = 1", "audit_log", 1),
    ],
)
def test_an_edit_around_the_triggers_breaks_the_chain_at_that_row(url, statement, table, broken, capsys):
    _study_with_reads(url)
    assert main(["audit", "verify"]) == 0  # the command reads the settings' database: this one
    _without_triggers(url, statement)
    report = _verify(url)[table]
    assert not report.ok and report.broken_at == broken
    assert main(["audit", "verify"]) == 2
    assert f"{table}: the chain breaks at row id {broken}" in capsys.readouterr().err


def test_the_cli_verifies_chains_and_heads_recorded_earlier(workspace, capsys):
    init_db()
    _study_with_reads(f"sqlite:///{workspace / 'study.db'}")
    assert main(["audit", "verify"]) == 0
    out = capsys.readouterr().out
    heads = [line.split("head ")[1] for line in out.splitlines() if "chain intact; head" in line]
    assert len(heads) == 3  # reads, annotations (none yet: the genesis link) and the audit log
    with session_scope() as s:
        log_event(s, "later")
    assert main(["audit", "verify", *(f"--head={head}" for head in heads)]) == 0
    assert main(["audit", "verify", "--head", "f" * 64]) == 2
    assert "not in any chain" in capsys.readouterr().err
    _without_triggers(f"sqlite:///{workspace / 'study.db'}", "UPDATE reads SET rating = 5 WHERE id = 1")
    assert main(["audit", "verify"]) == 2
    assert "reads: the chain breaks at row id 1" in capsys.readouterr().err


def test_a_rolled_back_savepoint_does_not_become_the_previous_link(url):
    """record_read's duplicate path: a row is inserted inside a savepoint that is rolled back, and the transaction
    goes on to append another."""

    class Undo(Exception):
        pass

    with session_scope(url) as s:
        log_event(s, "first")
        with pytest.raises(Undo), s.begin_nested():
            log_event(s, "rolled back")
            s.flush()  # inserted (and linked) inside the savepoint
            raise Undo
        log_event(s, "after")
    with read_scope(url) as s:
        assert s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all() == ["first", "after"]
    assert _verify(url)["audit_log"].ok


def test_concurrent_writers_keep_one_chain(url):
    errors = []

    def write(i: int) -> None:
        try:
            for j in range(5):
                run_transaction(lambda s, j=j: log_event(s, "w", n=i * 10 + j))
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = _verify(url)["audit_log"]
    assert report.ok and report.rows == 30


def test_times_with_an_offset_are_stored_as_the_same_instant_in_utc(url):
    local = datetime(2026, 1, 2, 10, 0, tzinfo=timezone(timedelta(hours=2)))
    with session_scope(url) as s:
        s.add(AuditEvent(action="tz", at=local))
    with read_scope(url) as s:
        stored = s.scalar(select(AuditEvent.at).where(AuditEvent.action == "tz"))
    assert stored == datetime(2026, 1, 2, 8, 0, tzinfo=UTC) and stored.tzinfo is not None
    assert _verify(url)["audit_log"].ok
