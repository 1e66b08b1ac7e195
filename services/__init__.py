"""Use cases that join the library (core) and the store (db): import, train and register, diagnose, the demo.

The CLI (``python -m core``) and the Streamlit pages both call these, so a capability is written once. Never imports
streamlit.
"""
