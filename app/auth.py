"""Sign-in and role checks.

Session state keeps only the signed-in user's id. Every page asks ``require_role`` which re-reads the account from
the database on each run, so a role can never be forged through session state, and a page reached by URL that
the role may not use refuses itself (hiding its link is not access control).
"""

from __future__ import annotations

import streamlit as st

from db import repo
from db.audit import log_event
from db.repo import UserInfo
from db.session import init_db, session_scope

__all__ = ["USER_KEY", "current_user", "require_role", "sign_in_page", "sign_out"]

USER_KEY = "auth_user_id"


def current_user() -> UserInfo | None:
    """The signed-in, still-active account, or None."""
    user_id = st.session_state.get(USER_KEY)
    if not isinstance(user_id, int):
        return None
    with session_scope() as session:
        user = repo.get_user(session, user_id)
    if user is None:
        st.session_state.pop(USER_KEY, None)
    return user


def require_role(*roles: str) -> UserInfo:
    """Stop the page unless the signed-in user has one of ``roles``."""
    user = current_user()
    if user is None:
        st.error("Please sign in first.")
        st.stop()
    if user.role not in roles:
        st.error(f"This page is not available to the {user.role} role.")
        st.stop()
    return user


def sign_out() -> None:
    user_id = st.session_state.get(USER_KEY)
    if isinstance(user_id, int):
        with session_scope() as session:
            log_event(session, "sign_out", user_id=user_id)
    for key in list(st.session_state.keys()):
        del st.session_state[key]


def sign_in_page() -> None:
    """The sign-in form (the only page before signing in)."""
    st.title("Intraoperative imaging AI")
    st.caption("Sign in with the account your study coordinator gave you.")
    with st.form("signin_form"):
        username = st.text_input("Username", key="signin_username")
        password = st.text_input("Password", type="password", key="signin_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        init_db()
        with session_scope() as session:
            user = repo.authenticate(session, username.strip(), password)
            if user is None:
                log_event(session, "sign_in_failed", username=username.strip()[:64])
            else:
                log_event(session, "sign_in", user_id=user.id, username=user.username)
        if user is None:
            st.error("Unknown username or wrong password. Check both and try again.")
        else:
            st.session_state[USER_KEY] = user.id
            st.rerun()
