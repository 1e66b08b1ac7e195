"""Users (PI): every account; add one, change its role, deactivate or reactivate it, reset its password, or lift a
sign-in lockout. Every change is made and audited by ``services.accounts``; the account's open sessions end at
their next interaction when its role, access or password changes."""

from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from app.auth import require_role
from core.text import md_escape
from db.models import ROLES
from services import accounts

user = require_role("pi")
st.title("Users")
st.caption(
    "Accounts of this workspace. Imported and simulated readers hold reads from elsewhere and never sign in. "
    "Sign-in locks for 15 minutes after 5 failed attempts; unlocking or resetting the password lifts it."
)


def _act(
    action: Callable[[], Any],
    done: Callable[[Any], str],
    reveal: Callable[[Any], tuple[str, str]] | None = None,
) -> None:
    """Run an account action: show its refusal, or keep what it did for the next run (and, from ``reveal``, a
    temporary password to show once) and rerun so the table shows the change."""
    try:
        result = action()
    except accounts.AccountError as error:
        st.error(md_escape(str(error)))
        return
    st.session_state["users_done"] = done(result)
    if reveal is not None:
        st.session_state["users_temporary"] = reveal(result)
    st.rerun()


done = st.session_state.pop("users_done", None)
if done:
    st.success(md_escape(done))
temporary = st.session_state.pop("users_temporary", None)
if temporary:
    name, password = temporary
    st.warning(
        f"Temporary password for {md_escape(name)}, shown only now: give it to them in person. They choose their "
        "own at their next sign-in."
    )
    st.code(password, language=None)

rows = accounts.list_accounts()
st.dataframe(
    pd.DataFrame(
        [
            {
                "username": r.user.username,
                "name": r.user.display_name,
                "role": r.user.role,
                "active": r.user.active,
                "signs in": r.user.can_sign_in,
                "must change password": r.user.must_change_password,
                "sign-in locked until (UTC)": r.locked_until,
            }
            for r in rows
        ]
    ),
    hide_index=True,
    width="stretch",
    key="users_table",
)

st.subheader("Add an account")
with st.form("users_add_form", clear_on_submit=True):
    left, right = st.columns(2)
    new_name = left.text_input(
        "Username", key="users_add_username", help="Lower-case; with single sign-on, the person's e-mail address."
    )
    new_display = right.text_input("Display name", key="users_add_display")
    new_role = left.selectbox("Role", ROLES, index=ROLES.index("reader"), key="users_add_role")
    new_password = right.text_input(
        "Password", type="password", key="users_add_password", help="Leave empty to get a temporary password."
    )
    add = st.form_submit_button("Add account", type="primary")
if add:
    password = new_password or accounts.temporary_password(new_name.strip())
    _act(
        lambda: (
            accounts.add_user(
                new_name, password, new_role, new_display, actor_id=user.id, must_change_password=True
            ).username
        ),
        lambda name: f"Added {name} ({new_role}). They set their own password at their first sign-in.",
        None if new_password else lambda name: (name, password),
    )

managed = [r for r in rows if r.user.can_sign_in]
if managed:
    st.subheader("Change an account")
    by_name = {r.user.username: r for r in managed}
    target = st.selectbox("Account", list(by_name), key="users_target")
    row = by_name[target]
    role_col, access_col, password_col, lock_col = st.columns(4)
    role = role_col.selectbox("Role", ROLES, index=ROLES.index(row.user.role), key=f"users_role_{target}")
    if role_col.button("Set role", key="users_set_role", disabled=role == row.user.role):
        _act(
            lambda: accounts.set_role(target, role, actor_id=user.id),
            lambda u: f"{u.username} now has the {u.role} role; their open sessions end.",
        )
    if row.user.active:
        if access_col.button("Deactivate", key="users_deactivate"):
            _act(
                lambda: accounts.deactivate(target, actor_id=user.id),
                lambda u: f"{u.username} is deactivated; their open sessions end.",
            )
    elif access_col.button("Reactivate", key="users_activate"):
        _act(lambda: accounts.activate(target, actor_id=user.id), lambda u: f"{u.username} can sign in again.")
    if password_col.button("Reset password", key="users_reset"):
        _act(
            lambda: accounts.reset_password(target, actor_id=user.id),
            lambda _password: f"{target}'s password was reset; their open sessions end.",
            lambda temporary_password: (target, temporary_password),
        )
    if lock_col.button("Unlock sign-in", key="users_unlock", disabled=row.locked_until is None):
        _act(lambda: accounts.unlock(target, actor_id=user.id), lambda _was: f"Sign-in for {target} is unlocked.")
