"""Page tests for accounts: a locked sign-in, the forced password change, the Account and Users pages, and sessions
that end (credentials changed, deactivated, idle)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.text import md_escape
from db import repo
from db.models import utcnow
from db.session import init_db, session_scope
from services import accounts
from services.accounts import ACCOUNT_THROTTLE

ROOT = Path(__file__).resolve().parents[2]
MAIN = str(ROOT / "app" / "main.py")
PASSWORD = "correct-horse-42"
NEW_PASSWORD = "violet tram quarry"


@pytest.fixture
def ids(workspace) -> dict[str, int]:
    init_db()
    with session_scope() as s:
        return {
            "pi": repo.create_user(s, "pat", PASSWORD, "pi", "Pat **PI** [x](http://evil.example)").id,
            "clinician": repo.create_user(s, "cleo", PASSWORD, "clinician").id,
            "reader": repo.create_user(s, "rita", PASSWORD, "reader").id,
        }


def _app(user_id: int | None = None, **state) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    if user_id is not None:
        at.session_state["auth_user_id"] = user_id
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def _sign_in(at: AppTest, username: str, password: str) -> AppTest:
    at.text_input(key="signin_username").input(username)
    at.text_input(key="signin_password").input(password)
    return _click(at, "Sign in")


def _click(at: AppTest, label: str) -> AppTest:
    (button,) = [b for b in at.button if b.label == label]
    return button.click().run()


def _change_password(at: AppTest, key: str, current: str, new: str, repeat: str | None = None) -> AppTest:
    at.text_input(key=f"{key}_current_password").input(current)
    at.text_input(key=f"{key}_new_password").input(new)
    at.text_input(key=f"{key}_repeat_password").input(new if repeat is None else repeat)
    return _click(at, "Change password")


def test_a_locked_username_is_refused_even_with_the_right_password(ids):
    start = utcnow() - timedelta(seconds=30)
    t = 0.0
    for failures in range(1, ACCOUNT_THROTTLE.lock_after + 1):
        accounts.sign_in("cleo", "wrong-password", "ip:10.1.1.1", now=start + timedelta(seconds=t))
        t += ACCOUNT_THROTTLE.wait_after(failures).total_seconds() + 0.01
    at = _sign_in(_app(), "cleo", PASSWORD)
    assert not at.exception
    assert "auth_user_id" not in at.session_state
    (error,) = at.error
    assert "locked after 5 failed attempts" in error.value and "principal investigator" in error.value


def test_sidebar_shows_user_typed_names_as_text(ids):
    at = _app(ids["pi"])
    assert not at.exception
    assert [m.value for m in at.sidebar.markdown] == [f"**{md_escape('Pat **PI** [x](http://evil.example)')}**"]
    assert [t.value for t in at.sidebar.text] == ["pi · pat"]


def test_a_reset_password_must_be_replaced_before_anything_else(ids):
    temporary = accounts.reset_password("rita", actor_id=ids["pi"])
    at = _sign_in(_app(), "rita", temporary)
    assert not at.exception
    assert at.title[0].value == "Set a new password"
    assert not at.sidebar.button  # no navigation, no page
    at = _change_password(at, "auth_forced", temporary, "rita-rita-rita")
    assert any("contains the username" in e.value for e in at.error)
    at = _change_password(at, "auth_forced", temporary, NEW_PASSWORD)
    assert not at.exception
    assert at.title[0].value == "Intraoperative imaging AI"  # home
    assert at.session_state["auth_user_id"] == ids["reader"]
    assert accounts.sign_in("rita", NEW_PASSWORD, "ip:10.1.1.2").ok


def test_pages_refuse_an_account_that_must_change_its_password(ids):
    accounts.reset_password("rita", actor_id=ids["pi"])
    at = AppTest.from_file(str(ROOT / "pages" / "account.py"), default_timeout=60)
    at.session_state["auth_user_id"] = ids["reader"]
    at.run()
    assert [e.value for e in at.error] == ["Set a new password first: open the app's start page."]


def test_every_role_changes_its_own_password_on_the_account_page(ids):
    for role in ("pi", "clinician", "reader"):
        at = _app(ids[role])
        at.switch_page("../pages/account.py").run()
        assert not at.exception and at.title[0].value == "Account"
    at = _change_password(at, "account", "not-my-password", NEW_PASSWORD)
    assert [e.value for e in at.error] == [
        md_escape("The current password is wrong: type the password you signed in with.")
    ]
    at = _change_password(at, "account", PASSWORD, NEW_PASSWORD, repeat=NEW_PASSWORD + "!")
    assert "differ" in at.error[0].value
    at = _change_password(at, "account", PASSWORD, NEW_PASSWORD)
    assert not at.exception and not at.error
    assert "Password changed" in at.success[0].value
    at.run()  # this session goes on after its own change
    assert at.title[0].value == "Account" and at.session_state["auth_user_id"] == ids["reader"]
    assert accounts.sign_in("rita", NEW_PASSWORD, "ip:10.1.1.3").ok


def test_users_page_is_for_the_pi_only(ids):
    at = _app(ids["clinician"])
    with pytest.raises(ValueError):
        at.switch_page("../pages/users.py").run()  # not in the clinician's navigation
    at = AppTest.from_file(str(ROOT / "pages" / "users.py"), default_timeout=60)
    at.session_state["auth_user_id"] = ids["reader"]
    at.run()
    assert [e.value for e in at.error] == ["This page is not available to the reader role."]
    assert not at.dataframe


def test_the_pi_adds_deactivates_re_roles_resets_and_unlocks_accounts(ids):
    at = _app(ids["pi"])
    at.switch_page("../pages/users.py").run()
    assert not at.exception and at.title[0].value == "Users"
    assert list(at.dataframe[0].value["username"]) == ["cleo", "pat", "rita"]
    # add, with a temporary password shown once
    at.text_input(key="users_add_username").input("dora@hospital.org")
    at.text_input(key="users_add_display").input("Dr Dora")
    at.selectbox(key="users_add_role").set_value("clinician")
    at = _click(at, "Add account")
    assert not at.exception
    assert "Added dora" in at.success[0].value.replace("\\", "")
    (temporary,) = [c.value for c in at.code]
    assert accounts.sign_in("dora@hospital.org", temporary, "ip:10.1.1.4").user.must_change_password
    at.run()
    assert not at.code  # shown only once
    # the last PI cannot demote itself
    at.selectbox(key="users_target").set_value("pat").run()
    at.selectbox(key="users_role_pat").set_value("reader").run()
    at = _click(at, "Set role")
    assert "last active principal investigator" in at.error[0].value
    # deactivate a reader: their open session ends at its next interaction
    reader = _app(ids["reader"])
    at.selectbox(key="users_target").set_value("rita").run()
    at = _click(at, "Deactivate")
    assert "rita is deactivated" in at.success[0].value
    reader.run()
    assert "auth_user_id" not in reader.session_state
    assert any("deactivated" in w.value for w in reader.warning)
    at = _click(at, "Reactivate")
    assert "rita can sign in again" in at.success[0].value
    # a new role
    at.selectbox(key="users_target").set_value("cleo").run()
    at.selectbox(key="users_role_cleo").set_value("pi").run()
    at = _click(at, "Set role")
    assert dict(zip(at.dataframe[0].value["username"], at.dataframe[0].value["role"], strict=True))["cleo"] == "pi"
    # a lockout, lifted
    start = utcnow() - timedelta(seconds=30)
    t = 0.0
    for failures in range(1, ACCOUNT_THROTTLE.lock_after + 1):
        accounts.sign_in("rita", "wrong-password", "ip:10.1.1.5", now=start + timedelta(seconds=t))
        t += ACCOUNT_THROTTLE.wait_after(failures).total_seconds() + 0.01
    at.run()
    at.selectbox(key="users_target").set_value("rita").run()
    at = _click(at, "Unlock sign-in")
    assert "Sign-in for rita is unlocked" in at.success[0].value.replace("\\", "")
    assert accounts.sign_in("rita", PASSWORD, "ip:10.1.1.5").ok
    # a reset
    at.selectbox(key="users_target").set_value("rita").run()
    at = _click(at, "Reset password")
    (temporary,) = [c.value for c in at.code]
    assert accounts.sign_in("rita", temporary, "ip:10.1.1.6").user.must_change_password
    assert not at.exception


def test_a_session_ends_when_its_credentials_change_elsewhere(ids):
    at = _app(ids["clinician"])
    assert at.session_state["auth_user_id"] == ids["clinician"]
    accounts.set_role("cleo", "reader")
    at.run()
    assert not at.exception and "auth_user_id" not in at.session_state
    assert any("changed since you signed in" in w.value for w in at.warning)
    assert at.text_input(key="signin_username") is not None


def test_an_idle_session_is_signed_out_with_a_message(ids):
    long_ago = utcnow() - timedelta(minutes=31)
    at = _app(ids["pi"], auth_signed_in_at=long_ago, auth_last_seen=long_ago)
    assert not at.exception and "auth_user_id" not in at.session_state
    assert [w.value for w in at.warning] == [
        md_escape("You were signed out after 30 minutes without activity. Sign in again to go on.")
    ]
    recent = utcnow() - timedelta(minutes=29)
    at = _app(ids["pi"], auth_signed_in_at=long_ago, auth_last_seen=recent)
    assert at.session_state["auth_user_id"] == ids["pi"] and not at.warning


AUTH = {
    "redirect_uri": "http://localhost:8501/oauth2callback",
    "cookie_secret": "not-a-secret",
    "client_id": "dashboard",
    "client_secret": "not-a-secret",
    "server_metadata_url": "https://idp.example.org/.well-known/openid-configuration",
}


def _identity_app(**claims) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.secrets["auth"] = AUTH
    at.user = {"is_logged_in": True, "iss": "https://idp.example.org", **claims}
    return at.run()


def test_an_identity_provider_signs_in_the_matching_local_account(ids):
    with session_scope() as s:
        eva = repo.create_user(s, "eva@hospital.org", PASSWORD, "reader", must_change_password=True).id
    at = _identity_app(email="Eva@Hospital.org", email_verified=True)
    assert not at.exception
    assert at.session_state["auth_user_id"] == eva
    assert at.title[0].value == "Intraoperative imaging AI"  # home, no forced password change for a provider sign-in
    assert [t.value for t in at.sidebar.text] == ["reader · eva@hospital.org"]


def test_an_unknown_identity_is_refused_and_the_password_form_stays(ids):
    at = _identity_app(email="mallory@evil.example")
    assert not at.exception and "auth_user_id" not in at.session_state
    assert "No active account here matches email mallory" in at.error[0].value.replace("\\", "")
    labels = [b.label for b in at.button]
    button = md_escape("Sign in with single sign-on")  # a label is markdown: the configured name is escaped
    assert "Sign out of the identity provider" in labels and button in labels
    assert at.text_input(key="signin_username") is not None
    at = _click(at, button)
    assert any("Authlib" in e.value for e in at.error)  # not installed here: said, not crashed


def test_without_an_auth_section_there_is_no_provider_button(ids):
    at = _app()
    assert [b.label for b in at.button] == ["Sign in"]
