"""Streamlit entry: page config, sign-in gate, and navigation by role.

Run from the repository root: ``python -m streamlit run app/main.py`` (``make run`` does).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `streamlit run` puts only app/ on sys.path
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from app.auth import current_user, needs_new_password, password_change_page, sign_in_page, sign_out  # noqa: E402
from app.resources import background_start  # noqa: E402
from core.text import md_escape  # noqa: E402

st.set_page_config(page_title="Intraoperative imaging AI", page_icon=":material/biotech:", layout="wide")

_PAGES = {  # name -> (script, title, icon)
    "home": ("../pages/home.py", "Home", ":material/home:"),
    "diagnose": ("../pages/diagnose.py", "Diagnose", ":material/neurology:"),
    "data": ("../pages/data.py", "Data", ":material/table:"),
    "studies": ("../pages/studies.py", "Studies", ":material/groups:"),
    "results": ("../pages/results.py", "Results", ":material/monitoring:"),
    "models": ("../pages/models.py", "Models", ":material/model_training:"),
    "jobs": ("../pages/jobs.py", "Jobs", ":material/pending_actions:"),
    "read": ("../pages/read.py", "Read", ":material/visibility:"),
    "users": ("../pages/users.py", "Users", ":material/manage_accounts:"),
    "account": ("../pages/account.py", "Account", ":material/account_circle:"),
}
_ROLE_PAGES = {
    "clinician": ["home", "diagnose", "account"],
    "pi": ["home", "diagnose", "data", "studies", "results", "models", "jobs", "users", "account"],
    "reader": ["home", "read", "account"],
}


def _page(name: str, default: bool = False) -> st.Page:
    script, title, icon = _PAGES[name]
    return st.Page(script, title=title, icon=icon, url_path=name, default=default)


background_start()
user = current_user()
if user is None:
    # Every page is routable while signed out, so a reload or a bookmarked link shows the sign-in form (and, after
    # signing in, the page asked for) instead of "page not found"; no page script runs before sign-in.
    pages = [st.Page(sign_in_page, title="Sign in", icon=":material/login:", default=True)]
    st.navigation(pages + [_page(name) for name in _PAGES], position="hidden")
    sign_in_page()
elif needs_new_password(user):
    # A password reset by a principal investigator: nothing else until the user has set their own (same routing).
    pages = [st.Page(password_change_page, title="Set a new password", icon=":material/key:", default=True)]
    st.navigation(pages + [_page(name) for name in _PAGES], position="hidden")
    password_change_page()
else:
    with st.sidebar:
        st.markdown(f"**{md_escape(user.display_name)}**")
        st.text(f"{user.role} · {user.username}")  # plain text: a username is never markdown
        if st.button("Sign out", key="main_sign_out"):
            sign_out()
            st.rerun()
    allowed = _ROLE_PAGES[user.role]
    st.navigation([_page(name, default=name == "home") for name in allowed]).run()
