"""The demo workspace's published accounts, and whether the current workspace is a demo workspace.

Kept apart from ``services.demo`` (which loads torch to build the demo) so that signing in and the ``users``
command can apply the demo rule without loading the models: a published demo password is accepted only in a
complete demo workspace.
"""

from __future__ import annotations

from core.settings import workspace_dir

__all__ = [
    "DEMO_BUILDING",
    "DEMO_MARKER",
    "DEMO_PASSWORDS",
    "DEMO_USERS",
    "claim_first_run",
    "demo_ready",
    "demo_workspace",
]

# (username, password, role, display name): printed by `make run` and listed in the README, so never secrets
DEMO_USERS = (
    ("pi", "demo-pi", "pi", "Principal investigator (demo)"),
    ("clinician", "demo-clinician", "clinician", "Surgeon (demo)"),
    ("reader", "demo-reader", "reader", "Neurosurgeon reader (demo)"),
    ("reader2", "demo-reader2", "reader", "Neurosurgeon reader 2 (demo)"),
    ("reader3", "demo-reader3", "reader", "Neurosurgeon reader 3 (demo)"),
)
DEMO_PASSWORDS = frozenset(password for _, password, _, _ in DEMO_USERS)
DEMO_MARKER = ".demo-complete"  # written by services.demo.build_demo when the demo workspace is complete
DEMO_BUILDING = ".demo-building"  # the workspace is a demo being built (its parts land one by one)


def demo_ready() -> bool:
    """Whether a complete demo workspace exists."""
    return (workspace_dir() / DEMO_MARKER).exists()


def demo_workspace() -> bool:
    """Whether this workspace is a demo workspace: complete, or being built (the first start builds it part by
    part in the background, and its accounts are usable from the start)."""
    root = workspace_dir()
    return (root / DEMO_MARKER).exists() or (root / DEMO_BUILDING).exists()


def claim_first_run() -> bool:
    """Mark an empty workspace (no study database yet) as a demo being built; whether it is one now (claimed here,
    or being built already). The app calls this before its first page touches the database: the sign-in page
    creates ``study.db``, after which an unmarked workspace reads as one holding other data and is never built."""
    root = workspace_dir()
    if (root / DEMO_MARKER).exists():
        return False
    if not (root / "study.db").exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / DEMO_BUILDING).touch()
    return (root / DEMO_BUILDING).exists()
