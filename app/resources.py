"""The app's process-wide resources: loaded models, and the work started once per server process.

Models come from ``services.predictions.cached_predictor``, the one per-process cache (a few models, least
recently used goes first, keyed by checkpoint sha256), shared with study AI output computed in this process. A
``Predictor`` carries its own lock, held while hook-based heatmaps run, so sessions share the model safely. Callers
never mutate what the cache returns.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

import streamlit as st

from services.demo_accounts import claim_first_run

if TYPE_CHECKING:
    from core.predict import Predictor
    from db.repo import ModelInfo

__all__ = ["background_start", "predictor_for"]


def predictor_for(model: ModelInfo) -> Predictor:
    """The shared predictor of a registered model, loaded on first use."""
    from services.predictions import cached_predictor  # torch: loaded by the first page that needs a model

    with st.spinner("Loading the model…", show_time=False):
        return cached_predictor(model)


def _start_in_background() -> None:
    from services.jobs.service import on_app_start

    try:
        on_app_start(demo=os.environ.get("IOAI_DEMO") == "1")
    except Exception:  # the pages serve regardless; the Jobs page shows what did not start
        logging.getLogger(__name__).exception("starting background work failed")


@st.cache_resource(show_spinner=False)
def background_start() -> bool:
    """Once per server process, without delaying the first page: the first start's demo build (``make run`` sets
    ``IOAI_DEMO=1``) and following the cluster's jobs again after a restart. An empty workspace is claimed for the
    demo here, before the sign-in page creates its database."""
    if os.environ.get("IOAI_DEMO") == "1":
        claim_first_run()
    threading.Thread(target=_start_in_background, daemon=True, name="app-start").start()
    return True
