"""The only cached resources: loaded models, one per checkpoint sha256 per process.

A ``Predictor`` carries its own lock, held while hook-based heatmaps run, so sessions share the model safely.
Callers never mutate what the cache returns.
"""

from __future__ import annotations

import streamlit as st

from core.predict import Predictor
from db.repo import ModelInfo
from services.diagnose import load_predictor

__all__ = ["predictor_for"]


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _predictor(checkpoint_sha256: str, _model: ModelInfo) -> Predictor:
    return load_predictor(_model)


def predictor_for(model: ModelInfo) -> Predictor:
    """The shared predictor of a registered model, loaded on first use."""
    return _predictor(model.checkpoint_sha256, model)
