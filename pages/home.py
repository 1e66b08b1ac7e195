"""Home: what this dashboard does for the signed-in role."""

import streamlit as st

from app.auth import require_role
from core.text import md_escape

user = require_role("pi", "clinician", "reader")
st.title("Intraoperative imaging AI")
st.markdown(f"Signed in as **{md_escape(user.display_name)}** ({user.role}).")
if user.role in ("pi", "clinician"):
    st.markdown(
        "- **Diagnose**: upload fluorescence (FL) or white-light (WL) specimen images and get the model's tumor "
        "probability, its decision at the registered operating threshold, and a Grad-CAM heatmap of where the "
        "evidence is. Every upload and result is kept and can be opened again."
    )
if user.role == "pi":
    st.markdown(
        "- **Data**: browse patients, specimens, labels, models, predictions and the audit log; filter and download "
        "CSV.\n- **Studies**: set up blind reader studies (arms, cases, readers), follow progress, export and "
        "import reads.\n- **Results**: the CNN against the readers, with confidence intervals, paired tests and "
        "MRMC.\n- **Models**: every registered model, its training curve, and the localisation evaluations "
        "stored with it (the seed papers' ablation tables with example maps)."
    )
if user.role == "reader":
    st.markdown(
        "- **Read**: the reader studies you are invited to, one case at a time. You see neither the truth nor "
        "other readers' answers; you can pause at any time and continue where you stopped."
    )
st.caption("Research software. Not a medical device: decisions stay with the surgical team and pathology.")
