"""Where the workspace lives: one git-ignored folder holding the database, stored images and checkpoints.

``IOAI_WORKSPACE`` moves the folder (default ``var/`` in the repository); ``IOAI_DATABASE_URL`` points the
metadata at another database (default: the SQLite file ``study.db`` inside the workspace; a
``postgresql+psycopg://`` URL works through the same code).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

__all__ = ["REPO_ROOT", "database_url", "environment", "pointing_at", "workspace_dir"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def workspace_dir() -> Path:
    """The workspace folder, created on first use."""
    path = Path(os.environ.get("IOAI_WORKSPACE") or REPO_ROOT / "var").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """The SQLAlchemy URL of the study database."""
    return os.environ.get("IOAI_DATABASE_URL") or f"sqlite:///{workspace_dir() / 'study.db'}"


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, remove) environment variables inside the block; restore them after."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pointing_at(root: Path) -> AbstractContextManager[None]:
    """Point the settings at the workspace ``root`` (and its own SQLite database) inside the block."""
    return environment(IOAI_WORKSPACE=str(root), IOAI_DATABASE_URL=f"sqlite:///{root / 'study.db'}")
