"""Accounts in a real browser: wrong passwords until the username locks (then even the right password is refused),
a password change on the Account page, a PI's reset that ends the user's open session and forces a new password,
a published demo password refused outside a demo workspace, and ten browsers pressing Sign in at the same moment.

Each test makes its own accounts (unique usernames) straight in the database the server reads. The server's
workspace is the shared trained workspace, which is not a demo workspace.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path

from playwright.sync_api import Browser, Page, expect
from sqlalchemy import select

from core.settings import pointing_at
from db import repo
from db.models import AuditEvent, SignInAttempt
from db.session import init_db, session_scope
from services.accounts import ACCOUNT_THROTTLE
from tests.e2e.conftest import EXPECT_TIMEOUT_MS, Server, settled, sign_in, submit_sign_in

PASSWORD = "e2e violet tram quarry"
NEW_PASSWORD = "e2e amber kite orchard"
CROWD = 10  # browsers signing in at once (issue 13, item 2)
CROWD_TIMEOUT_MS = 120_000  # ten first page loads at once on 2 CPU cores


def _accounts(workspace: Path, roles: list[str], password: str = PASSWORD) -> list[str]:
    """Fresh accounts (unique usernames), one per role in ``roles``."""
    tag = uuid.uuid4().hex[:6]
    with pointing_at(workspace):
        init_db()
        with session_scope() as s:
            return [
                repo.create_user(s, f"e2e-{role}{i}-{tag}", password, role).username for i, role in enumerate(roles)
            ]


def _error(page: Page):
    return page.get_by_test_id("stAlertContentError")


def _no_errors(page: Page) -> None:
    expect(page.get_by_test_id("stException")).to_have_count(0)
    expect(_error(page)).to_have_count(0)


def _audit(workspace: Path, action: str) -> list[tuple[str | None, dict]]:
    with session_scope(f"sqlite:///{workspace / 'study.db'}") as s:
        rows = s.execute(select(AuditEvent.username, AuditEvent.detail).where(AuditEvent.action == action))
        return [(username, dict(detail or {})) for username, detail in rows]


def test_wrong_passwords_lock_the_username_and_then_the_right_one_is_refused(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    (name,) = _accounts(trained_workspace, ["clinician"])
    page.goto(streamlit_server.url)
    expected = [
        "Unknown username or wrong password. Check both and try again.",
        "3 more failed attempts lock this username for 15 min.",
        "2 more failed attempts lock this username for 15 min.",
        "1 more failed attempt locks this username for 15 min.",
        "locked after 5 failed attempts",
    ]
    for failures, text in enumerate(expected, start=1):
        submit_sign_in(page, name, f"wrong password {failures}")
        expect(_error(page)).to_contain_text(text)
        settled(page)
        time.sleep(ACCOUNT_THROTTLE.wait_after(failures).total_seconds() + 0.3)  # the backoff, as a person waits
    submit_sign_in(page, name, PASSWORD)
    expect(_error(page)).to_contain_text("even with the right password")
    expect(_error(page)).to_contain_text("ask your principal investigator to unlock the account")
    settled(page)
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    assert [u for u, _ in _audit(trained_workspace, "sign_in_locked")].count(name) == 1
    assert [(u, d["reason"]) for u, d in _audit(trained_workspace, "sign_in_refused") if u == name] == [
        (name, "account locked")
    ]


def test_a_user_changes_their_password_on_the_account_page(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    (name,) = _accounts(trained_workspace, ["reader"])
    page.goto(streamlit_server.url + "/account")
    sign_in(page, name, PASSWORD)
    expect(page.get_by_role("heading", name="Account")).to_be_visible()
    page.get_by_role("textbox", name="Current password").fill(PASSWORD)
    page.get_by_role("textbox", name="New password", exact=True).fill(NEW_PASSWORD)
    page.get_by_role("textbox", name="New password again").fill(NEW_PASSWORD)
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_test_id("stAlertContentSuccess")).to_contain_text("Password changed")
    settled(page)
    page.get_by_role("button", name="Sign out").click()
    submit_sign_in(page, name, PASSWORD)
    expect(_error(page)).to_contain_text("wrong password")
    settled(page)
    sign_in(page, name, NEW_PASSWORD)
    _no_errors(page)


def test_a_reset_ends_the_open_session_and_forces_a_new_password(
    page: Page, browser: Browser, streamlit_server: Server, trained_workspace: Path
) -> None:
    (name,) = _accounts(trained_workspace, ["reader"])
    reader_context = browser.new_context(viewport={"width": 1400, "height": 1000})
    reader_context.set_default_timeout(EXPECT_TIMEOUT_MS)
    try:
        reader = reader_context.new_page()
        reader.goto(streamlit_server.url)
        sign_in(reader, name, PASSWORD)
        # the PI resets the reader's password on the Users page and reads the temporary one
        page.goto(streamlit_server.url + "/users")
        sign_in(page, streamlit_server.username, streamlit_server.password)
        expect(page.get_by_role("heading", name="Users")).to_be_visible()
        page.get_by_test_id("stSelectbox").filter(has_text="Account").click()
        page.keyboard.type(name)  # the list shows only its first options: with many accounts, filter it first
        page.get_by_role("option", name=name, exact=True).click()
        settled(page)
        page.get_by_role("button", name="Reset password").click()
        expect(page.get_by_test_id("stAlertContentSuccess")).to_contain_text("password was reset")
        temporary = page.get_by_test_id("stCode").inner_text().strip()
        assert len(temporary) >= 10
        # the reader's open session ends at its next interaction
        reader.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Read", exact=True).click()
        expect(reader.get_by_test_id("stAlertContentWarning")).to_contain_text("changed since you signed in")
        expect(reader.get_by_role("button", name="Sign out")).to_have_count(0)
        # the temporary password leads to the forced change, then to the home page
        submit_sign_in(reader, name, temporary)
        expect(reader.get_by_role("heading", name="Set a new password")).to_be_visible()
        reader.get_by_role("textbox", name="Current password").fill(temporary)
        reader.get_by_role("textbox", name="New password", exact=True).fill(NEW_PASSWORD)
        reader.get_by_role("textbox", name="New password again").fill(NEW_PASSWORD)
        reader.get_by_role("button", name="Change password").click()
        expect(reader.get_by_role("heading", name="Read")).to_be_visible()  # the page the reader asked for
        settled(reader)
        expect(reader.get_by_test_id("stSidebar").get_by_role("button", name="Sign out")).to_be_visible()
        _no_errors(reader)
    finally:
        reader_context.close()


def test_a_published_demo_password_is_refused_outside_a_demo_workspace(
    page: Page, streamlit_server: Server, trained_workspace: Path
) -> None:
    with pointing_at(trained_workspace):
        init_db()
        with session_scope() as s:
            if not any(u.username == "reader3" for u in repo.list_users(s)):
                repo.create_user(s, "reader3", "demo-reader3", "reader")  # as a copied demo database would have it
    assert not (trained_workspace / ".demo-complete").exists()
    page.goto(streamlit_server.url)
    submit_sign_in(page, "reader3", "demo-reader3")
    expect(_error(page)).to_contain_text("published demo password")
    expect(_error(page)).to_contain_text("works only in the demo workspace")
    settled(page)
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)


def test_ten_browsers_press_sign_in_at_the_same_moment(
    browser: Browser, streamlit_server: Server, trained_workspace: Path
) -> None:
    """Item 2 of issue 13: simultaneous sign-ins all land on their home page, with no error and no "database is
    locked" in the server log (the Argon2 verify runs outside the write transaction)."""
    names = _accounts(trained_workspace, ["reader", "clinician", "pi", "reader", "clinician"] * (CROWD // 5))
    contexts = [browser.new_context(viewport={"width": 1200, "height": 800}) for _ in names]
    try:
        pages = []
        for context, name in zip(contexts, names, strict=True):
            context.set_default_timeout(CROWD_TIMEOUT_MS)
            p = context.new_page()
            p.goto(streamlit_server.url)
            expect(p.get_by_role("button", name="Sign in")).to_be_visible(timeout=CROWD_TIMEOUT_MS)
            p.get_by_role("textbox", name="Username").fill(name)
            p.get_by_role("textbox", name="Password").fill(PASSWORD)
            pages.append(p)
        # every page clicks its own Sign in button at the same wall-clock moment, from its own timer
        moment = int(time.time() * 1000) + 1500
        for p in pages:
            p.evaluate(
                """moment => setTimeout(() => [...document.querySelectorAll("button")]
                    .find(b => b.innerText.trim() === "Sign in").click(), moment - Date.now())""",
                moment,
            )
        time.sleep(1.6)
        for p in pages:
            expect(p.get_by_role("button", name="Sign out")).to_be_visible(timeout=CROWD_TIMEOUT_MS)
            expect(p.get_by_text("Signed in as")).to_be_visible(timeout=CROWD_TIMEOUT_MS)
            settled(p)
            _no_errors(p)
    finally:
        for context in contexts:
            context.close()
    signed_in = [u for u, _ in _audit(trained_workspace, "sign_in")]
    assert all(signed_in.count(name) == 1 for name in names), signed_in
    with session_scope(f"sqlite:///{trained_workspace / 'study.db'}") as s:
        moments = list(s.scalars(select(SignInAttempt.at).where(SignInAttempt.username.in_(names))))
    assert len(moments) == CROWD
    assert max(moments) - min(moments) < timedelta(seconds=5), moments  # they really did arrive together
    log = streamlit_server.log.read_text(errors="replace")
    assert "database is locked" not in log.lower() and "Traceback" not in log
