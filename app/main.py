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

from app.auth import current_user, sign_in_page, sign_out  # noqa: E402

st.set_page_config(page_title="Intraoperative imaging AI", page_icon=":material/biotech:", layout="wide")

_PAGES = {
    "home": st.Page("../pages/home.py", title="Home", icon=":material/home:", url_path="home", default=True),
    "diagnose": st.Page("../pages/diagnose.py", title="Diagnose", icon=":material/neurology:", url_path="diagnose"),
    "data": st.Page("../pages/data.py", title="Data", icon=":material/table:", url_path="data"),
}
_ROLE_PAGES = {
    "clinician": ["home", "diagnose"],
    "pi": ["home", "diagnose", "data"],
    "reader": ["home"],
}

user = current_user()
if user is None:
    navigation = st.navigation([st.Page(sign_in_page, title="Sign in", icon=":material/login:")])
else:
    with st.sidebar:
        st.markdown(f"**{user.display_name}**  \n{user.role} · `{user.username}`")
        if st.button("Sign out", key="main_sign_out"):
            sign_out()
            st.rerun()
    navigation = st.navigation([_PAGES[name] for name in _ROLE_PAGES[user.role]])
navigation.run()
