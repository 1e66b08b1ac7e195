"""Data (PI): the study database as filterable tables with CSV download, and any stored prediction reopened."""

import streamlit as st

from app.auth import require_role
from app.widgets import filterable_table, heatmap_viewer
from db import repo
from db.session import session_scope

require_role("pi")
st.title("Data")
tabs = st.tabs([name.capitalize() for name in repo.TABLES])
with session_scope() as session:
    frames = {name: repo.table(session, name) for name in repo.TABLES}
for tab, (name, frame) in zip(tabs, frames.items(), strict=True):
    with tab:
        filterable_table(frame, key=f"data_{name}", file_name=f"{name}.csv")

predictions = frames["predictions"]
if not predictions.empty:
    st.subheader("Open a prediction")
    chosen = st.selectbox(
        "Prediction",
        predictions["id"].tolist(),
        format_func=lambda pid: f"#{pid} · {predictions.loc[predictions['id'] == pid, 'image'].iloc[0]}",
        key="data_open_prediction",
    )
    with session_scope() as session:
        view = repo.prediction_view(session, int(chosen))
    if view:
        heatmap_viewer(view, key="data_view")
