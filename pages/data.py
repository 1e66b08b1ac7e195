"""Data (PI): the study database as filterable tables with CSV download, and any stored prediction reopened."""

import streamlit as st

from app.auth import require_role
from app.widgets import filterable_table, open_prediction
from db import repo

require_role("pi")
st.title("Data")
tabs = st.tabs([name.capitalize() for name in repo.TABLES])
frames = {name: repo.table(name) for name in repo.TABLES}
for tab, (name, frame) in zip(tabs, frames.items(), strict=True):
    with tab:
        filterable_table(frame, key=f"data_{name}", file_name=f"{name}.csv")

if not frames["predictions"].empty:
    st.subheader("Open a prediction")
    open_prediction(frames["predictions"], "Prediction", key="data_open")
