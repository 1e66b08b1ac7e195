"""Account (every role): the signed-in user's own account, and changing its password."""

import streamlit as st

from app.auth import change_password_form, require_role
from core.text import md_escape

user = require_role("pi", "clinician", "reader")
st.title("Account")
st.markdown(f"**{md_escape(user.display_name)}** · username {md_escape(user.username)} · role {user.role}")
st.subheader("Change your password")
if change_password_form("account"):
    st.success("Password changed. This session stays signed in; your sessions in other browsers or tabs end.")
