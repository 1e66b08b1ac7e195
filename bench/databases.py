"""The databases benchmarks measure on: a fresh SQLite file or a throwaway PostgreSQL server, with the app's
settings pointing at it while it is used."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from db.session import get_engine

__all__ = ["BACKENDS", "fresh_database", "postgres_missing"]

BACKENDS = ("sqlite", "postgresql")


def postgres_missing() -> str | None:
    """Why PostgreSQL cannot be measured here, or None when its server binaries are installed."""
    for name in ("initdb", "pg_ctl"):
        if not glob.glob(f"/usr/lib/postgresql/*/bin/{name}") and shutil.which(name) is None:
            return f"PostgreSQL server binaries not found ({name}; Debian package postgresql): measuring SQLite only"
    return None


@contextlib.contextmanager
def fresh_database(backend: str, folder: Path, workspace: Path | None = None) -> Iterator[str]:
    """A fresh, empty database of ``backend`` (a SQLite file in ``folder`` or a throwaway PostgreSQL server), its
    URL yielded; inside the block the settings (``IOAI_DATABASE_URL``, and ``IOAI_WORKSPACE`` when ``workspace`` is
    given) point at it, as they would in the app."""
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{folder / 'study.db'}"
        else:
            from tests.postgres import postgres_server  # the test suite's throwaway server; PostgreSQL runs only

            url = stack.enter_context(postgres_server())
        settings = {"IOAI_DATABASE_URL": url} | ({"IOAI_WORKSPACE": str(workspace)} if workspace else {})
        saved = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        try:
            yield url
        finally:
            get_engine(url).dispose()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
