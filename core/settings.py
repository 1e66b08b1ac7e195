"""Where the workspace lives: one git-ignored folder holding the database, stored images and checkpoints.

``IOAI_WORKSPACE`` moves the folder (default ``var/`` in the repository); ``IOAI_DATABASE_URL`` points the
metadata at another database (default: the SQLite file ``study.db`` inside the workspace; a
``postgresql+psycopg://`` URL works through the same code).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "database_url", "workspace_dir"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def workspace_dir() -> Path:
    """The workspace folder, created on first use."""
    path = Path(os.environ.get("IOAI_WORKSPACE") or REPO_ROOT / "var").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """The SQLAlchemy URL of the study database."""
    return os.environ.get("IOAI_DATABASE_URL") or f"sqlite:///{workspace_dir() / 'study.db'}"
