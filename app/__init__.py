"""Streamlit entry (app/main.py) and the shared UI: sign-in, cached resources, widgets."""
