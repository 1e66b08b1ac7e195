"""The demo workspace's published accounts, and whether the current workspace is a demo workspace.

Kept apart from ``services.demo`` (which loads torch to build the demo) so that signing in and the ``users``
command can apply the demo rule without loading the models: a published demo password is accepted only in a
complete demo workspace.
"""

from __future__ import annotations

from core.settings import workspace_dir

__all__ = ["DEMO_MARKER", "DEMO_PASSWORDS", "DEMO_USERS", "demo_ready"]

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


def demo_ready() -> bool:
    """Whether a complete demo workspace exists."""
    return (workspace_dir() / DEMO_MARKER).exists()
