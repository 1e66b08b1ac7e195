"""Migrations: a new database is built at the newest revision; a database of the first releases (with data, with
or without a migration stamp) upgrades to exactly the same schema, its studies get per-arm tokens and its reads and
audit log a valid hash chain. Every test runs on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from db import chain
from db.migrate import BASELINE, head_revision, revision_of, upgrade
from db.models import ArmCase, Base, StudyCase
from db.session import get_engine, init_db, read_scope, session_scope
from tests.postgres import reset_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, workspace):
    if request.param == "sqlite":
        return f"sqlite:///{workspace / 'study.db'}"
    url = request.getfixturevalue("postgres_url")
    reset_database(url)
    return url


def _differences(url: str) -> list:
    with get_engine(url).connect() as connection:
        return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)


def _baseline_with_data(url: str) -> None:
    """A database as the first releases left it: two arms, three cases (one training) sharing one token per case,
    two reads and two audit rows."""
    upgrade(get_engine(url), BASELINE)
    when = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)
    statements = [
        "INSERT INTO users (id, username, display_name, role, password_hash, active, created_at) VALUES "
        "(1, 'pi', 'PI', 'pi', 'x', true, :when), (2, 'r1', 'R1', 'reader', 'x', true, :when)",
        "INSERT INTO patients (id, code, created_at) VALUES (1, 'P1', :when)",
        "INSERT INTO specimens (id, code, patient_id, split, created_at) VALUES (1, 'S1', 1, 'test', :when), "
        "(2, 'S2', 1, 'test', :when), (3, 'S3', 1, 'train', :when)",
        "INSERT INTO studies (id, title, description, task, rating_scale, allow_revisions, status, simulated, "
        "created_at) VALUES (1, 'Old study', '', 'tumor', 'five', false, 'open', false, :when)",
        "INSERT INTO study_arms (id, study_id, position, name, modality, show_probability, show_decision, "
        "washout_days) VALUES (1, 1, 0, 'FL', 'FL', false, false, 0), (2, 1, 1, 'WL', 'WL', false, false, 0)",
        "INSERT INTO study_cases (id, study_id, specimen_id, token, position, training) VALUES "
        "(1, 1, 1, 'tok-a', 1, false), (2, 1, 2, 'tok-b', 2, false), (3, 1, 3, 'tok-c', 0, true)",
        "INSERT INTO study_readers (study_id, user_id, invited_at) VALUES (1, 2, :when)",
        "INSERT INTO reads (id, study_id, arm_id, case_id, reader_id, version, label, rating, comment, answered_at, "
        "duration_s, source) VALUES (1, 1, 1, 1, 2, 1, 1, 4, 'first', :when, 3.5, 'browser'), "
        "(2, 1, 1, 2, 2, 1, 0, 2, NULL, :when, NULL, 'browser')",
        "INSERT INTO audit_log (id, at, user_id, username, action, study_id, detail) VALUES "
        "(1, :when, 1, NULL, 'study_created', 1, '{\"title\": \"Old study\"}'), "
        "(2, :when, 2, NULL, 'read_recorded', 1, '{\"case\": \"tok-a\"}')",
    ]
    with get_engine(url).begin() as connection:
        for statement in statements:
            connection.execute(text(statement), {"when": when})
        if connection.dialect.name == "postgresql":  # the explicit ids above leave the sequences behind
            for table in ("users", "patients", "specimens", "studies", "study_arms", "study_cases", "reads"):
                connection.execute(text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))"))
            connection.execute(text("SELECT setval('audit_log_id_seq', (SELECT max(id) FROM audit_log))"))


def test_a_new_database_has_exactly_the_models_schema_at_the_newest_revision(url):
    init_db(url)
    with read_scope(url) as session:
        assert revision_of(session.connection()) == head_revision()
    assert _differences(url) == []


@pytest.mark.parametrize("stamped", [True, False], ids=["stamped", "before-migrations"])
def test_a_first_release_database_upgrades_to_the_same_schema_keeping_its_data(url, stamped):
    _baseline_with_data(url)
    if not stamped:  # made by create_all before migrations existed: no alembic_version table
        with get_engine(url).begin() as connection:
            connection.execute(text("DROP TABLE alembic_version"))
    init_db(url)
    assert _differences(url) == []
    assert "token" not in {c["name"] for c in inspect(get_engine(url)).get_columns("study_cases")}
    with read_scope(url) as session:
        assert revision_of(session.connection()) == head_revision()
        tokens = session.execute(select(ArmCase.arm_id, ArmCase.case_id, ArmCase.token)).all()
        assert sorted((a, c) for a, c, _ in tokens) == [(1, 1), (1, 2), (2, 1), (2, 2)]  # training case: none
        assert len({t for _, _, t in tokens}) == 4 and not {t for _, _, t in tokens} & {"tok-a", "tok-b"}
        assert session.scalar(select(StudyCase.position).where(StudyCase.id == 3)) == 0
        reports = {r.table: r for r in chain.verify(session)}
    assert reports["reads"].ok and reports["reads"].rows == 2
    assert reports["audit_log"].ok and reports["audit_log"].rows == 2
    with session_scope(url) as session:  # new rows continue the migrated chains
        session.execute(text("SELECT 1"))
        from db.audit import log_event

        log_event(session, "after_upgrade", user_id=1)
    with read_scope(url) as session:
        assert all(r.ok for r in chain.verify(session))
    with pytest.raises(Exception, match="append-only"), session_scope(url) as session:
        session.execute(text("UPDATE reads SET label = 0 WHERE id = 1"))


def test_upgrading_twice_and_opening_an_upgraded_database_change_nothing(url):
    init_db(url)
    upgrade(get_engine(url))  # already at the newest revision: nothing to do
    init_db(url)
    assert _differences(url) == []
