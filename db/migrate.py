"""Schema migrations (Alembic): every database, new or old, is brought to the newest revision when it is opened.

- A new, empty database gets the whole schema of ``db.models`` at once (``create_all`` plus the append-only
  triggers of ``db.chain``) and is stamped at the newest revision (Alembic's cookbook, "Building an Up to Date
  Database from Scratch").
- A database made before migrations existed (tables but no ``alembic_version``) is stamped at the baseline, then
  upgraded.
- Any other database is upgraded from its revision (``db.session.init_db`` first checks, in one read, whether
  there is anything to do).

Migrations run in one transaction, serialized between processes (SQLite's write lock, a PostgreSQL advisory lock),
so a server and a command line opening the same new database at once do not both build it. SQLite alters tables by
copying them, which its foreign keys would refuse; they are off while a migration runs and checked after it.
``tests/db/test_migrations.py`` upgrades a baseline database and compares it with a new one.

Developers: ``python -m db.migrate revision -m "what changed"`` autogenerates a revision from ``db.models`` against
a scratch database at the newest revision; read and edit it before committing.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, inspect, text

from db.chain import create_append_only_triggers
from db.models import Base

__all__ = ["BASELINE", "head_revision", "revision_of", "upgrade"]

BASELINE = "0001_baseline"
_FOLDER = Path(__file__).resolve().parent / "migrations"
_PG_LOCK = 0x10A1  # advisory lock key: one migration at a time per PostgreSQL database


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_FOLDER))
    config.attributes["connection"] = connection
    return config


@cache
def head_revision() -> str:
    """The newest revision in ``db/migrations/versions``."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def revision_of(connection: Connection) -> str | None:
    """The revision a database is at (None: new, or made before migrations)."""
    return MigrationContext.configure(connection).get_current_revision()


def _migrate(connection: Connection, target: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
    current = revision_of(connection)
    if current == target:
        return  # another process got here first
    config = _config(connection)
    tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
    if current is None and tables:  # made before migrations existed
        command.stamp(config, BASELINE)
    elif current is None and target == head_revision():  # new: the whole schema at once
        Base.metadata.create_all(connection)
        create_append_only_triggers(connection)
        command.stamp(config, target)
        return
    command.upgrade(config, target)


def upgrade(engine: Engine, target: str | None = None) -> None:
    """Bring the database behind ``engine`` to ``target`` (default: the newest revision)."""
    target = target or head_revision()
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:  # a PRAGMA, not a statement: it must run outside any transaction
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                _migrate(connection, target)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
        finally:
            if sqlite:
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


def _revision(message: str) -> None:
    """Autogenerate a revision from ``db.models`` against a scratch SQLite database at the newest revision."""
    with tempfile.TemporaryDirectory() as folder:
        engine = create_engine(f"sqlite:///{Path(folder) / 'scratch.db'}")
        with engine.begin() as connection:
            command.upgrade(_config(connection), "head")
            command.revision(_config(connection), message=message, autogenerate=True)
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m db.migrate", description="schema migrations")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("revision", help="autogenerate a new revision from db.models")
    make.add_argument("-m", "--message", required=True)
    sub.add_parser("upgrade", help="bring the workspace database to the newest revision")
    args = parser.parse_args(argv)
    if args.command == "revision":
        _revision(args.message)
    else:
        from db.session import get_engine

        upgrade(get_engine())
        print(f"at revision {head_revision()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
