"""Sign-in, the session's lifetime, and role checks (the rules themselves live in ``services.accounts``).

Session state keeps only the signed-in user's id, when the session signed in and when it was last used. Every run
re-reads the account, so a role can never be forged through session state, and the session ends at its next
interaction when the account was deactivated, its password changed or reset, or its role changed after the sign-in,
or when it was idle longer than ``IOAI_IDLE_MINUTES`` (default 30). Every page asks ``require_role``, so a page
reached by URL that the role may not use refuses itself (hiding its link is not access control).

Sign-in is by password, throttled per account and per client; where ``.streamlit/secrets.toml`` has an ``[auth]``
section (Streamlit's OpenID Connect configuration) the sign-in page also offers each identity provider, and an
identity is mapped to the active local account named by its ``IOAI_OIDC_CLAIM`` claim (default: e-mail).
"""

from __future__ import annotations

import importlib.util
import uuid
from datetime import datetime

import streamlit as st

from core.text import md_escape
from db.models import utcnow
from db.repo import UserInfo
from db.session import init_db
from services import accounts

__all__ = [
    "USER_KEY",
    "change_password_form",
    "client_id",
    "current_user",
    "needs_new_password",
    "password_change_page",
    "require_role",
    "sign_in_page",
    "sign_out",
]

USER_KEY = "auth_user_id"
SIGNED_IN_KEY = "auth_signed_in_at"
SEEN_KEY = "auth_last_seen"
_NOTICE_KEY = "auth_notice"  # why the last session ended, shown once on the sign-in page
_CLIENT_KEY = "auth_client"  # this browser session's throttling key where the server sees no address
_OIDC_KEY = "auth_oidc_refused"  # an identity the provider vouched for but no local account matched
_METHOD_KEY = "auth_method"  # "password" or "oidc": how this session signed in


def client_id() -> str:
    """The client that sign-in throttling counts: the address the server saw, or this browser session (Streamlit
    gives no address for connections from localhost)."""
    address = st.context.ip_address
    if address:
        return f"ip:{address}"
    if _CLIENT_KEY not in st.session_state:
        st.session_state[_CLIENT_KEY] = f"session:{uuid.uuid4().hex}"
    return st.session_state[_CLIENT_KEY]


def _oidc_signed_in() -> bool:
    return bool(st.user.get("is_logged_in", False))


def _clear(notice: str) -> None:
    """Forget everything this Streamlit session holds but its throttling key; keep ``notice`` for the sign-in page."""
    client = st.session_state.get(_CLIENT_KEY)
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    if client is not None:
        st.session_state[_CLIENT_KEY] = client
    if notice:
        st.session_state[_NOTICE_KEY] = notice


def _forget(notice: str) -> None:
    """End the session's sign-in, and the identity provider's cookie with it (else the next run would sign straight
    back in; ``st.logout`` starts a new session, so ``notice`` is then lost)."""
    _clear(notice)
    if _oidc_signed_in():
        st.logout()


def _start(user: UserInfo, at: datetime, method: str) -> None:
    _clear("")
    st.session_state[_METHOD_KEY] = method
    st.session_state[USER_KEY] = user.id
    st.session_state[SIGNED_IN_KEY] = at
    st.session_state[SEEN_KEY] = at


def current_user() -> UserInfo | None:
    """The signed-in account, or None: no sign-in, or the session just ended (the reason waits for the sign-in
    page)."""
    user_id = st.session_state.get(USER_KEY)
    if not isinstance(user_id, int):
        return None
    now = utcnow()
    signed_in_at = st.session_state.get(SIGNED_IN_KEY)
    if not isinstance(signed_in_at, datetime):  # set by code, not by a sign-in (page tests): counts from now
        signed_in_at = st.session_state[SIGNED_IN_KEY] = now
    last_seen = st.session_state.get(SEEN_KEY)
    check = accounts.check_session(user_id, signed_in_at, last_seen if isinstance(last_seen, datetime) else now)
    if check.user is None:
        _forget(check.message)
        return None
    st.session_state[SEEN_KEY] = now
    return check.user


def needs_new_password(user: UserInfo) -> bool:
    """Whether this session must set a new password before anything else: the account's password was reset and the
    session signed in with it (an identity provider's sign-in involves no local password)."""
    return user.must_change_password and st.session_state.get(_METHOD_KEY) != "oidc"


def require_role(*roles: str) -> UserInfo:
    """Stop the page unless the signed-in user has one of ``roles``."""
    user = current_user()
    if user is None:
        st.error("Please sign in first.")
        st.stop()
    if needs_new_password(user):
        st.error("Set a new password first: open the app's start page.")
        st.stop()
    if user.role not in roles:
        st.error(f"This page is not available to the {user.role} role.")
        st.stop()
    return user


def sign_out() -> None:
    """Sign out (audited); the caller reruns."""
    user_id = st.session_state.get(USER_KEY)
    if isinstance(user_id, int):
        accounts.sign_out(user_id)
    _forget("")


def _providers() -> list[tuple[str | None, str]]:
    """The identity providers configured for ``st.login`` in ``.streamlit/secrets.toml`` (none without ``[auth]``)."""
    if not st.secrets.load_if_toml_exists():
        return []
    auth = st.secrets.get("auth")
    return accounts.oidc_providers(auth) if auth is not None else []


def _identity_sign_in() -> None:
    """Map the identity the provider vouched for (``st.user``) to a local account, once per Streamlit session."""
    if _OIDC_KEY not in st.session_state:
        claims = st.user.to_dict()
        result = accounts.sign_in_identity(
            claims, client=client_id(), provider=str(claims.get("iss") or "oidc"), claim=accounts.oidc_claim()
        )
        if result.user is not None:
            _start(result.user, result.at, "oidc")
            st.rerun()
        st.session_state[_OIDC_KEY] = result.message
    st.error(md_escape(st.session_state[_OIDC_KEY]))
    if st.button("Sign out of the identity provider", key="signin_oidc_logout"):
        st.logout()


def sign_in_page() -> None:
    """The sign-in form (the only page before signing in), and a button per configured identity provider."""
    init_db()
    st.title("Intraoperative imaging AI")
    notice = st.session_state.pop(_NOTICE_KEY, None)
    if notice:
        st.warning(md_escape(notice))
    providers = _providers()
    if providers and _oidc_signed_in():
        _identity_sign_in()
    st.caption("Sign in with the account your study coordinator gave you.")
    with st.form("signin_form"):
        username = st.text_input("Username", key="signin_username")
        password = st.text_input("Password", type="password", key="signin_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        result = accounts.sign_in(username, password, client_id())
        if result.user is not None:
            _start(result.user, result.at, "password")
            st.rerun()
        st.error(md_escape(result.message))
    for provider, label in providers:
        if st.button(f"Sign in with {md_escape(label)}", key=f"signin_oidc_{provider or 'default'}"):
            if importlib.util.find_spec("authlib") is None:
                st.error("Sign-in through an identity provider needs Authlib: `pip install 'Authlib>=1.3.2'`.")
            else:
                st.login(provider)


def change_password_form(key: str) -> bool:
    """A form to change the signed-in user's own password; True once it was changed (this session stays signed
    in, every other session of the account ends)."""
    st.caption(
        f"At least {accounts.MIN_PASSWORD_LENGTH} characters, not containing your username, not a common or "
        "published demo password. A passphrase of a few unrelated words works well."
    )
    with st.form(f"{key}_password_form", clear_on_submit=True):
        current = st.text_input("Current password", type="password", key=f"{key}_current_password")
        new = st.text_input("New password", type="password", key=f"{key}_new_password")
        repeat = st.text_input("New password again", type="password", key=f"{key}_repeat_password")
        submitted = st.form_submit_button("Change password", type="primary")
    user_id = st.session_state.get(USER_KEY)
    if not submitted or not isinstance(user_id, int):
        return False
    try:
        changed_at = accounts.change_password(user_id, current, new, repeat=repeat, client=client_id())
    except accounts.AccountError as error:
        st.error(md_escape(str(error)))
        return False
    st.session_state[SIGNED_IN_KEY] = changed_at
    return True


def password_change_page() -> None:
    """The only page for an account that must set its own password (reset by a principal investigator)."""
    st.title("Set a new password")
    st.info("Your password was reset by a principal investigator. Choose your own before going on.")
    if change_password_form("auth_forced"):
        st.rerun()
    if st.button("Sign out", key="auth_forced_sign_out"):
        sign_out()
        st.rerun()
