"""End-to-end fixtures: a real ``streamlit run`` on the shared trained workspace, and a headless system Chromium.

Every test in this folder is marked ``e2e``. Without ``/usr/bin/chromium`` the tests skip locally and fail on CI
(``make test`` installs chromium; ``playwright install`` is never used).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.settings import pointing_at
from db import repo
from db.session import init_db, session_scope

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
SERVER_START_TIMEOUT_S = 60
EXPECT_TIMEOUT_MS = 30_000
PI_USERNAME = "e2e-pi"
PI_PASSWORD = "e2e-pi-password"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this folder ``e2e`` (the hook sees the whole session's items)."""
    here = Path(__file__).resolve().parent
    for item in items:
        if item.path.resolve().is_relative_to(here):
            item.add_marker(pytest.mark.e2e)


@dataclass(frozen=True)
class Server:
    url: str
    log: Path
    username: str
    password: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200 and response.read().decode().strip() == "ok"
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _create_pi(workspace: Path) -> None:
    """Add the PI account to the workspace database, with the env pointing there only while doing so."""
    url = f"sqlite:///{workspace / 'study.db'}"
    with pointing_at(workspace):
        init_db(url)
        with session_scope(url) as session:
            if not any(u.username == PI_USERNAME for u in repo.list_users(session)):
                repo.create_user(session, PI_USERNAME, PI_PASSWORD, "pi", display_name="E2E Investigator")


def settled(page) -> None:
    """Wait until the script run is over and nothing is left on screen from the run before (stale elements)."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stApp")).to_have_attribute("data-test-script-state", "notRunning")
    expect(page.locator("[data-stale=true]")).to_have_count(0)


def submit_sign_in(page, username: str, password: str) -> None:
    """Fill in the sign-in form and press Sign in."""
    from playwright.sync_api import expect

    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    page.get_by_role("textbox", name="Username").fill(username)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def sign_in(page, username: str, password: str) -> None:
    """Sign in and wait until the signed-in page is fully drawn."""
    from playwright.sync_api import expect

    submit_sign_in(page, username, password)
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    settled(page)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing: `make test` installs chromium (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


@contextmanager
def serving(workspace: Path, log: Path, script: str = "app/main.py") -> Iterator[Server]:
    """``streamlit run app/main.py`` (or another ``script``, relative to the repository root) on a free localhost port
    on ``workspace`` (the environment it inherits, e.g. ``IOAI_RAY_ADDRESS``, besides), serving the PI account;
    stopped after the block."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env["IOAI_WORKSPACE"] = str(workspace)
    env["IOAI_DATABASE_URL"] = f"sqlite:///{workspace / 'study.db'}"
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port)]
    command += ["--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if process.poll() is not None:
                pytest.fail(f"streamlit exited with code {process.returncode}:\n{log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"streamlit did not answer {url}/_stcore/health within {SERVER_START_TIMEOUT_S} s:\n"
                    f"{log.read_text(errors='replace')}"
                )
            time.sleep(0.25)
        yield Server(url=url, log=log, username=PI_USERNAME, password=PI_PASSWORD)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def streamlit_server(
    chromium_path: str, trained_workspace: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The app on the trained workspace, with a PI account."""
    _create_pi(trained_workspace)
    with serving(trained_workspace, tmp_path_factory.mktemp("e2e_server") / "streamlit.log") as server:
        yield server


@pytest.fixture(scope="module")
def browser(chromium_path: str):
    """Headless system Chromium. Module-scoped on purpose: a live sync Playwright leaves its asyncio loop marked as
    running in this thread (``asyncio.run`` then fails), so it must be gone before the next test module runs."""
    from playwright.sync_api import expect, sync_playwright

    # Streamlit reruns whole scripts; the first visit of a page imports torch and friends (seconds on 2 cores).
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, streamlit_server: Server):
    """A fresh browser context and page per test (the server log is attached to a failed test's report)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and report.failed:
        server = item.funcargs.get("streamlit_server") if hasattr(item, "funcargs") else None
        if isinstance(server, Server) and server.log.exists():
            report.sections.append(("streamlit server log", server.log.read_text(errors="replace")[-20_000:]))
    return report
